"""How much slower are single CPU-backend calls in a mixed stream than the same calls back to back?

The scheduler learns from the calls users make: one call of a shape among many others, often after
another device's call. On a VM those can stall (worker threads asleep, vCPUs halted, cores shared with
another device's driver threads). For each shape of the scheduler-quality mixed workload: the best of 5
back-to-back calls, then single calls in random order, alone and each after a call on ``--other``.

    python benchmarks/cpu_single_calls.py [--other opencl:0] [--passes 3]

Run it under different thread settings (``NUMBA_NUM_THREADS``, ``SPARKLE_BIND_THREADS=0``) to compare.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

import sparkle

sys.path.insert(0, str(Path(__file__).parent))
from scheduler_quality import mixed_workload  # noqa: E402


def seconds(function, *args, **kwargs):
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", help="a device to call between CPU calls (e.g. opencl:0)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cases = mixed_workload(args.quick, np.random.default_rng(0))
    cpu = sparkle.Scheduler(["cpu"], persist=False, progress=False, explore=False)
    other = sparkle.Scheduler([args.other], persist=False, progress=False, explore=False) if args.other else None
    best = {}
    for case in cases:
        for _ in range(3):
            case.run(cpu)
            if other is not None:
                case.run(other)
        best[case.name] = min(seconds(case.run, cpu) for _ in range(5))
    modes = ["alone"] + (["after other"] if other is not None else [])
    single = {mode: {case.name: [] for case in cases} for mode in modes}
    rng = np.random.default_rng(1)
    for _ in range(args.passes):
        for index in rng.permutation(len(cases)):
            case = cases[index]
            for mode in modes:
                if mode == "after other":
                    cases[rng.integers(len(cases))].run(other)
                single[mode][case.name].append(seconds(case.run, cpu))
    total_best = sum(best.values())
    print(f"threads: numba {numba.get_num_threads()} ({numba.threading_layer()}), "
          f"SPARKLE_BIND_THREADS={os.environ.get('SPARKLE_BIND_THREADS', '1')}, other: {args.other}")
    print(f"back to back, best of 5: total {total_best * 1e3:.1f} ms")
    for mode in modes:
        medians = {name: statistics.median(v) for name, v in single[mode].items()}
        total = sum(sum(v) / len(v) for v in single[mode].values())
        ratios = sorted(((max(v) / best[name], name) for name, v in single[mode].items()), reverse=True)
        stalled = sum(1 for name, v in single[mode].items() for t in v if t > 3 * best[name] and t > 2e-3)
        calls = sum(len(v) for v in single[mode].values())
        print(f"single calls {mode}: mean total {total * 1e3:.1f} ms ({total / total_best:.2f}x), median total "
              f"{sum(medians.values()) * 1e3:.1f} ms ({sum(medians.values()) / total_best:.2f}x); "
              f"{stalled} of {calls} calls over 3x their best and 2 ms; "
              f"worst: " + ", ".join(f"{name} {ratio:.0f}x" for ratio, name in ratios[:4]))


if __name__ == "__main__":
    main()
