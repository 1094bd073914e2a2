"""Issue 9 reproducer: small CPU and OpenCL calls on the main thread beside a pure-Python thread and while new
OpenCL kernels are built (and warmed up) on another thread, at CPython's default switch interval (5 ms) and at the
one the scheduler sets while it builds ahead (``builds.BUILD_SWITCH_INTERVAL``). Prints median ms per call.

    python benchmarks/gil_convoy_probe.py        (on the GPU machine: source .gpu/setup.sh first)

Results: benchmarks/results/gil_probe_h100.log.
"""
import sys, threading, time
import numpy as np
import sparkle
from sparkle import api
from sparkle.scheduler import builds, calls
from sparkle.scheduler.scheduler import _executor

cases = [((1, 3, 32, 32), (16, 3, 3, 3), {"stride": 2, "padding": 1}),
         ((1, 32, 32, 32), (32, 1, 3, 3), {"padding": 1, "groups": 32}),
         ((1, 64, 56, 56), (64, 64, 3, 3), {"padding": 1})]
ops = [(np.random.rand(*xs).astype(np.float32), np.random.rand(*ws).astype(np.float32), kw) for xs, ws, kw in cases]
for dev in ("cpu", "opencl:0"):
    for x, w, kw in ops:
        for _ in range(10): sparkle.conv2d(x, w, device=dev, **kw)

def latencies(dev, n=20):
    out = []
    for x, w, kw in ops:
        ts = []
        for _ in range(n):
            t = time.perf_counter(); sparkle.conv2d(x, w, device=dev, **kw); ts.append(time.perf_counter() - t)
        out.append(np.median(ts) * 1e3)
    return out

def show(label, dev, values):
    print(f"{label:52s} {dev:9s} " + "  ".join(f"{v:6.2f}" for v in values), flush=True)

print("median ms per call: stem 3x3/2 32x32, depthwise 32x32, 3x3 64ch 56x56")
for dev in ("opencl:0", "cpu"):
    show("alone", dev, latencies(dev))
    for interval in (0.005, 1e-4):
        stop = [False]
        def spin():
            while not stop[0]: sum(range(1000))
        th = threading.Thread(target=spin); th.start(); sys.setswitchinterval(interval)
        show(f"beside a Python thread, switch interval {interval*1e3:.1f} ms", dev, latencies(dev))
        stop[0] = True; th.join(); sys.setswitchinterval(0.005)

ocl = _executor("opencl:0")
for lowered in (False, True):
    for dev in ("opencl:0", "cpu"):
        done = threading.Event(); took = []
        def builder(offset):
            for c in range(4):
                spec = api.conv2d_spec(np.zeros((1, 8 + c + offset, 20, 20), np.float32),
                                       np.zeros((24, 8 + c + offset, 3, 3), np.float32), padding=1)
                p = ocl.prepare("conv2d", spec)
                t = time.perf_counter()
                if lowered:
                    with builds.responsive_interpreter():
                        p.build(); p(*calls.zero_operands("conv2d", spec))
                else:
                    p.build(); p(*calls.zero_operands("conv2d", spec))
                took.append(time.perf_counter() - t)
            done.set()
        offset = (10 if lowered else 0) + (5 if dev == "cpu" else 0)
        th = threading.Thread(target=builder, args=(offset,)); th.start()
        seen = []
        while not done.is_set():
            seen.append(latencies(dev, 3))
        th.join()
        show(f"during GPU builds ({'lowered' if lowered else 'default'}; {len(took)} x {np.mean(took)*1e3:.0f} ms)", dev,
             np.median(np.array(seen), axis=0))
