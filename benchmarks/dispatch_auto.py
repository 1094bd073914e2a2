"""Per-call cost of warm calls through device="auto" (the scheduler's cached plans), issue 9's dispatch
targets: tiny conv (1x4x8x8, 3x3) <= 15 us and 8x8 matmul <= 10 us on the CPU; on a GPU, a device-array
conv2d <= 35 us of host time per queued call and <= 60 us latency with sync.

Each figure is the best of ROUNDS loops of CALLS calls, the variants interleaved round by round so that a
noisy neighbour hits them alike; every result is checked against the float64 reference first.

    python benchmarks/dispatch_auto.py [--gpu opencl:N] [--json PATH]

Run it with SPARKLE_TIMING_QUEUE=shared and =separate to compare where timed launches go (one process each).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

import sparkle
from sparkle.cpu import backend
from sparkle.scheduler.scheduler import UnscheduledDevice

ROUNDS, CALLS = 7, 2000


WARM_SECONDS = 2.0


def per_call(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved(variants, calls=CALLS, rounds=ROUNDS):
    for fn in variants.values():
        for _ in range(200):
            fn()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], per_call(fn, calls))
    return {name: seconds * 1e6 for name, seconds in best.items()}


def check(result, expected):
    got = result.get() if isinstance(result, sparkle.DeviceArray) else result
    scale = np.abs(expected).max() or 1.0
    if np.abs(got - expected).max() > 1e-5 * scale:
        raise SystemExit("a result differs from the float64 reference")


def cpu_figures():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    a = rng.standard_normal((8, 8)).astype(np.float32)
    check(sparkle.conv2d(x, w, padding=1), sparkle.reference.conv2d(x, w, padding=1))
    check(sparkle.matmul(a, a), sparkle.reference.matmul(a, a))
    conv_prepared = backend.prepare_conv2d(sparkle.api.conv2d_spec(x, w, padding=1))
    matmul_prepared = backend.prepare_matmul(sparkle.api.matmul_spec(a, a))
    figures = interleaved({
        "conv auto": lambda: sparkle.conv2d(x, w, padding=1),
        "conv prepared CPU call (no scheduler)": lambda: conv_prepared(x, w, None),
        "conv device='cpu' (a named device: its kept signature)": lambda: sparkle.conv2d(x, w, padding=1, device="cpu"),
        "matmul auto": lambda: sparkle.matmul(a, a),
        "matmul prepared CPU call (no scheduler)": lambda: matmul_prepared(a, a),
        "numpy a @ a": lambda: a @ a,
    })
    try:
        import torch

        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        figures.update(interleaved({"torch conv2d": lambda: torch.nn.functional.conv2d(xt, wt, padding=1)}))
    except ImportError:
        pass
    return figures


def gpu_figures(device_id):
    from sparkle.workloads import RESNET50_LAYERS, layer_inputs

    rows = {}
    for layer in [None, *RESNET50_LAYERS]:
        if layer is None:
            rng = np.random.default_rng(1)
            name, kwargs = "tiny 1x4x8x8 3x3", {"padding": 1}
            x, w = rng.standard_normal((1, 4, 8, 8)).astype(np.float32), rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
        else:
            name, kwargs = layer.name, layer.conv_kwargs()
            x, w = layer_inputs(layer)
        x_d, w_d = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
        expected = sparkle.reference.conv2d(x, w, **kwargs)
        # Warm up for 2 s (at least 5 calls): kernels the GPU has not built are built ahead while the CPU
        # serves the first calls; note when the placement last changed.
        scheduler = sparkle.default_scheduler()
        started, warm_calls, placed, moved = time.perf_counter(), 0, None, None
        while warm_calls < 5 or time.perf_counter() - started < WARM_SECONDS:
            check(sparkle.conv2d(x_d, w_d, **kwargs), expected)
            warm_calls += 1
            device = scheduler.history(last=1)[0]["device"]
            if device != placed:
                placed, moved = device, (warm_calls, time.perf_counter() - started)
        queue = x_d._device.queue

        def queued(calls=200):
            start = time.perf_counter()
            for _ in range(calls):
                sparkle.conv2d(x_d, w_d, **kwargs)
            host = (time.perf_counter() - start) / calls
            queue.finish()
            return host

        def latency():
            start = time.perf_counter()
            sparkle.conv2d(x_d, w_d, **kwargs)
            queue.finish()
            return time.perf_counter() - start

        rows[name] = {"device": placed, "placed_at_call": moved[0], "placed_after_ms": moved[1] * 1e3,
                      "queued_us": min(queued() for _ in range(5)) * 1e6,
                      "latency_us": min(latency() for _ in range(200)) * 1e6,
                      "decision": decision_record(scheduler, x_d, w_d, kwargs)}
    return rows


def decision_record(scheduler, x, w, kwargs):
    """Why the layer went where it went: the reason, and each device's prediction in us, broken down (None where
    the scheduler does not use the operands' device: the call ran there, outside the scheduler)."""
    try:
        decision = scheduler.explain("conv2d", x, w, **kwargs)
    except UnscheduledDevice:
        return None
    parts = ("seconds", "transfer", "compute", "overhead", "compile")
    return {"summary": decision.summary(),
            "predictions": {p.device: {**{part: getattr(p, part) * 1e6 for part in parts},
                                       "measured_calls": p.measured_calls, "usable": p.usable, "note": p.note}
                            for p in decision.predictions}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", help="an OpenCL device id for the device-array figures (e.g. opencl:0)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    report = {"machine": platform.processor() or platform.machine(), "cpu": cpu_figures()}
    print(f"{'CPU, warm calls':<56} {'us per call':>12}")
    for name, us in report["cpu"].items():
        print(f"{name:<56} {us:>12.2f}")
    if args.gpu:
        from sparkle.opencl import runtime

        report["gpu"] = gpu_figures(args.gpu)
        # where the launches go: timed ones apart on a profiling queue (SPARKLE_TIMING_QUEUE, GPUs' default)
        report["timing_queue"] = "separate" if runtime.opencl_device(args.gpu).separate_timing_queue else "shared"
        print(f"\ntiming queue: {report['timing_queue']}")
        print(f"{'device arrays on ' + args.gpu:<24} {'placed on':>10} {'since call (ms)':>16} {'queued us':>10} "
              f"{'latency us':>11}")
        for name, row in report["gpu"].items():
            since = f"{row['placed_at_call']} ({row['placed_after_ms']:.0f})"
            print(f"{name:<24} {row['device']:>10} {since:>16} {row['queued_us']:>10.1f} {row['latency_us']:>11.1f}")
        print("\npredicted us per call (transfer + compute + overhead + compile) after the timed calls:")
        for name, row in report["gpu"].items():
            if row["decision"] is None:
                continue
            predictions = ", ".join(f"{device} {p['seconds']:.1f} ({p['transfer']:.1f} + {p['compute']:.1f} + "
                                    f"{p['overhead']:.1f} + {p['compile']:.1f}; {p['measured_calls']} measured)"
                                    for device, p in row["decision"]["predictions"].items())
            print(f"{name:<24} {predictions}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)


if __name__ == "__main__":
    main()
