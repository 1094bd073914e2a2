"""Reproducer (GPU machine): CPU-backend calls right after an NVIDIA OpenCL call take milliseconds instead of
microseconds. Prints CPU call times alone and after a GPU call with growing gaps, and the busiest threads.

    source .gpu/setup.sh && python3 benchmarks/cpu_stall_after_gpu.py
"""

import os
import subprocess
import threading
import time

import numba
import numpy as np

import sparkle


def milliseconds(function, *args):
    start = time.perf_counter()
    function(*args)
    return round((time.perf_counter() - start) * 1e3, 2)


def main():
    rng = np.random.default_rng(0)
    cpu = sparkle.Scheduler(["cpu"], persist=False, progress=False)
    gpu = sparkle.Scheduler(["opencl:0"], persist=False, progress=False)
    x = rng.standard_normal((1, 64, 56, 56), dtype=np.float32)
    w = rng.standard_normal((256, 64, 1, 1), dtype=np.float32)
    a = rng.standard_normal((128, 128), dtype=np.float32)
    for _ in range(3):
        cpu.conv2d(x, w)
        gpu.conv2d(x, w)
        cpu.matmul(a, a)
    print("cpu conv alone:", [milliseconds(cpu.conv2d, x, w) for _ in range(8)])
    print("cpu matmul 128 alone:", [milliseconds(cpu.matmul, a, a) for _ in range(8)])
    for gap in (0, 0.001, 0.01, 0.05, 0.2):
        times = []
        for _ in range(4):
            gpu.conv2d(x, w)
            time.sleep(gap)
            times.append(milliseconds(cpu.conv2d, x, w))
        print(f"cpu conv after a gpu call, gap {gap * 1e3:.0f} ms:", times)
    gpu.conv2d(x, w)
    listing = subprocess.run(["ps", "-L", "-o", "tid,pcpu,psr,stat,comm", "-p", str(os.getpid())],
                             capture_output=True, text=True, check=False).stdout.splitlines()
    print(listing[0])
    print("\n".join(sorted(listing[1:], key=lambda line: -float(line.split()[1]))[:8]))
    print("threads:", threading.active_count(), "numba threads", numba.get_num_threads())


if __name__ == "__main__":
    main()
