"""Reproducer (GPU machine): do CPU-backend calls take milliseconds instead of microseconds right after an
NVIDIA OpenCL call? Compares, for each gap, a CPU call after ``sleep(gap)`` alone (the control: idle
wake-up of the worker threads and of the vCPUs) with a CPU call after a GPU call and the same sleep.

    source .gpu/setup.sh && python3 benchmarks/cpu_stall_after_gpu.py [--samples 12]

Run it under different thread settings (``NUMBA_NUM_THREADS``, ``SPARKLE_BIND_THREADS=0``) to compare.
"""

import argparse
import os
import statistics
import subprocess
import threading
import time

import numba
import numpy as np

import sparkle

GAPS_MS = (0, 1, 10, 50, 200)


def milliseconds(function, *args):
    start = time.perf_counter()
    function(*args)
    return (time.perf_counter() - start) * 1e3


def summary(samples):
    return f"median {statistics.median(samples):6.2f}  max {max(samples):6.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=12)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    cpu = sparkle.Scheduler(["cpu"], persist=False, progress=False)
    gpu = sparkle.Scheduler(["opencl:0"], persist=False, progress=False)
    x = rng.standard_normal((1, 64, 56, 56), dtype=np.float32)
    w = rng.standard_normal((256, 64, 1, 1), dtype=np.float32)
    for _ in range(5):
        cpu.conv2d(x, w)
        gpu.conv2d(x, w)
    print(f"threads: numba {numba.get_num_threads()}, SPARKLE_BIND_THREADS={os.environ.get('SPARKLE_BIND_THREADS', '1')}")
    print("cpu conv back to back (ms):", summary([milliseconds(cpu.conv2d, x, w) for _ in range(args.samples)]))
    for gap in GAPS_MS:
        alone, after_gpu = [], []
        for _ in range(args.samples):  # interleaved, so that a slow phase of the machine hits both
            time.sleep(gap / 1e3)
            alone.append(milliseconds(cpu.conv2d, x, w))
            gpu.conv2d(x, w)
            time.sleep(gap / 1e3)
            after_gpu.append(milliseconds(cpu.conv2d, x, w))
        print(f"gap {gap:>3} ms: cpu conv after sleep alone {summary(alone)} | after a gpu call {summary(after_gpu)}")
    gpu.conv2d(x, w)
    listing = subprocess.run(["ps", "-L", "-o", "tid,pcpu,psr,stat,comm", "-p", str(os.getpid())],
                             capture_output=True, text=True, check=False).stdout.splitlines()
    print(listing[0])
    print("\n".join(sorted(listing[1:], key=lambda line: -float(line.split()[1]))[:6]))
    print("python threads:", threading.active_count())


if __name__ == "__main__":
    main()
