"""Issue 9 reproducer: what a signature's first call through a fresh scheduler costs on the first OpenCL device
once its kernel is built in the process (as when the mixed workload moves a signature there), with run-time
verification on and off, against the same call made warm; then a profile of such first calls.

    python benchmarks/first_call_cost.py        (on the GPU machine: source .gpu/setup.sh first)

Results: benchmarks/results/first_call_probe_h100_before.log (verification with the per-point loop),
first_call_probe_h100_after.log (vectorized reference.conv2d_at).
"""
import cProfile, os, pstats, sys, time
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scheduler_quality as sq
from sparkle.scheduler import Scheduler

rng = np.random.default_rng(0)
names = ["3x3/2 stem 32x32", "conv1_7x7s2 N=1", "matmul 256x256x256", "matmul 64x4096x64", "matmul 32x2048x1000",
         "matmul 3136x64x256", "depthwise 3x3 32x32", "1x7 17x17", "matmul 256x256x256 float64"]
cases = [c for c in sq.mixed_workload(False, rng) if c.name in names]
alone = Scheduler(["opencl:0"], progress=False)
for c in cases:
    for _ in range(5): c.run(alone)  # as the oracle's phase: programs built, alone's buffers warm
for verify in ("first", "off"):
    fresh = Scheduler(["opencl:0"], progress=False, verify=verify)
    print(f"verify={verify}: ms of the 1st, 2nd, 3rd, 10th call of each signature on a fresh scheduler; alone warm")
    for c in cases:
        times = []
        for i in range(10):
            t = time.perf_counter(); c.run(fresh); times.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter(); c.run(alone); warm = (time.perf_counter() - t) * 1e3
        print(f"  {c.name:28s} " + " ".join(f"{x:6.2f}" for x in (times[0], times[1], times[2], times[9])) + f"   alone {warm:6.2f}")
prof = cProfile.Profile()
fresh = Scheduler(["cpu", "opencl:0"], progress=False)
for c in cases: c.run(fresh)  # first calls (some on the CPU)
fresh2 = Scheduler(["opencl:0"], progress=False)
prof.enable()
for c in cases: c.run(fresh2)
prof.disable()
pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
pstats.Stats(prof).sort_stats("tottime").print_stats(15)
