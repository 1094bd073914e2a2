"""Where one thread beats Numba's parallel launch for small CPU calls when calls do not come back to back.

``benchmarks/dispatch_cost.py --crossover`` times calls back to back, while the workers still spin. In a mixed
workload (the scheduler's, or any program that does other work between calls) the workers have gone to sleep
and the parallel launch must wake them: on the 2-core VM a call after a 1 ms busy gap took up to 3.5 ms at the
90th percentile (0.03 ms median back to back). This times, per size, a prepared call planned on one thread and
one planned on all of Numba's threads: back to back, after a busy gap of Python work, and after a sleep.

    python benchmarks/serial_threshold.py [--gap-ms 1] [--samples 40] [--json PATH]
"""

import argparse
import json
import time

import numba
import numpy as np

from sparkle import api
from sparkle.cpu import backend
from sparkle.cpu.plan import plan_conv2d, serial_max_flops

SHAPES = [  # (x shape, w shape, padding): 3x3 and 1x1 convolutions from 0.1 to 30 MFLOP
    ((1, 8, 12, 12), (8, 8, 3, 3), 1), ((1, 16, 12, 12), (16, 16, 3, 3), 1), ((1, 16, 16, 16), (16, 16, 3, 3), 1),
    ((1, 24, 16, 16), (24, 24, 3, 3), 1), ((1, 32, 16, 16), (32, 32, 3, 3), 1), ((1, 32, 28, 28), (32, 32, 3, 3), 1),
    ((1, 64, 28, 28), (64, 64, 3, 3), 1), ((1, 64, 16, 16), (64, 64, 1, 1), 0), ((1, 128, 16, 16), (128, 128, 1, 1), 0),
    ((1, 256, 14, 14), (256, 256, 1, 1), 0),
]


def busy(seconds):
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def timings(call, operands, gap, samples, sleep):
    times = []
    for _ in range(samples):
        call(*operands)
        if gap:
            (time.sleep if sleep else busy)(gap)
        start = time.perf_counter()
        call(*operands)
        times.append(time.perf_counter() - start)
    return np.median(times), np.percentile(times, 90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gap-ms", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--json")
    args = parser.parse_args()
    gap = args.gap_ms / 1e3
    rng = np.random.default_rng(0)
    print(f"{numba.get_num_threads()} Numba threads ({numba.config.THREADING_LAYER}); "
          f"serial_max_flops {serial_max_flops(numba.get_num_threads()) / 1e6:.2f} MFLOP; median / p90 us")
    print("| x * w | MFLOP | 1 thread b2b | all b2b | 1 thread after busy gap | all after busy gap "
          "| 1 thread after sleep | all after sleep |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for x_shape, w_shape, padding in SHAPES:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        spec = api.conv2d_spec(x, w, padding=padding)
        calls = {threads: backend.prepare_conv2d(spec, plan_conv2d(spec, threads=threads))
                 for threads in (1, numba.get_num_threads())}
        for call in calls.values():
            for _ in range(20):
                call(x, w, None)
        row = {"x": x_shape, "w": w_shape, "flops": spec.flops}
        cells = []
        for label, g, sleep in (("b2b", 0.0, False), ("busy", gap, False), ("sleep", gap, True)):
            for threads, call in calls.items():
                median, p90 = timings(call, (x, w, None), g, args.samples, sleep)
                row[f"{label}_{threads}"] = (median, p90)
                cells.append(f"{median * 1e6:.0f} / {p90 * 1e6:.0f}")
        rows.append(row)
        print(f"| {x_shape} * {w_shape} | {spec.flops / 1e6:.2f} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"threads": numba.get_num_threads(), "gap_ms": args.gap_ms, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
