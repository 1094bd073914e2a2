"""The ResNet-50 layer suite through ``sparkle.conv2d``, checked against the float64 reference.

Run ``python -m sparkle.demo [--batch N] [--dtype float32|float64] [--repeat R]``.
Prints time, GFLOPS and error per layer; exits with status 1 if any layer's relative
L2 error against ``sparkle.reference.conv2d`` exceeds the tolerance of its dtype.

The input helpers and timers here are shared with ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import tracemalloc

import numba
import numpy as np

from . import api, reference
from .devices import devices
from .ops import conv2d
from .workloads import RESNET50_LAYERS

# Largest accepted relative L2 error of a result against the float64 reference.
TOLERANCES = {"float32": 1e-5, "float64": 1e-12}


def layer_inputs(layer, batch=1, dtype=np.float32, seed=0):
    """Random (x, w) for a workload layer; weights scaled by 1/sqrt(fan-in) as in a trained net."""
    x_shape, w_shape = layer.shapes(batch)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    w = (rng.standard_normal(w_shape) / np.sqrt(fan_in)).astype(dtype)
    return x, w


def layer_flops(layer, x, w):
    return api.conv2d_spec(x, w, **layer.conv_kwargs()).flops


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_time(fn, repeat):
    """Best wall time of ``repeat`` calls: the least disturbed by other work on the machine."""
    return min(timed(fn)[0] for _ in range(repeat))


def interleaved_best(calls, repeat, burst=1):
    """Best seconds of each named callable over ``repeat`` rounds; each round calls every
    one ``burst`` times in a row. Round-robin spreads each one's samples over the run, so
    a slow phase of a noisy machine cannot take all of them. Warm calls up beforehand."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeat):
        for name, fn in calls.items():
            for _ in range(burst):
                best[name] = min(best[name], timed(fn)[0])
    return best


def peak_extra_memory(fn):
    """Peak bytes allocated while ``fn()`` runs, its result included, as tracemalloc sees them
    (numpy reports its buffers to tracemalloc; memory allocated inside compiled code is not seen)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result  # held until the peak is read, so that the output counts
    finally:
        tracemalloc.stop()
    return peak - before


def errors(result, expected):
    """(max abs error, relative L2 error) of ``result`` against a float64 ``expected``."""
    difference = result.astype(np.float64) - expected
    norm = np.linalg.norm(expected)
    max_abs = float(np.max(np.abs(difference))) if difference.size else 0.0
    rel_l2 = float(np.linalg.norm(difference) / norm) if norm else float(np.linalg.norm(difference))
    return max_abs, rel_l2


def shape_text(shape):
    return "x".join(str(size) for size in shape)


def run_suite(batch, dtype, repeat):
    """Time every layer, then check every result; one report row per layer."""
    rows, calls, checks = [], {}, []
    for layer in RESNET50_LAYERS:
        x, w = layer_inputs(layer, batch, dtype)
        kwargs = layer.conv_kwargs()
        calls[layer.name] = functools.partial(conv2d, x, w, **kwargs)
        first_s, result = timed(calls[layer.name])  # the first call compiles
        rows.append({"layer": layer.name, "x": x.shape, "w": w.shape, "first_s": first_s})
        checks.append((result, functools.partial(reference.conv2d, x, w, **kwargs), layer_flops(layer, x, w)))
    best = interleaved_best(calls, repeat)
    # Checks come after all timings: numpy's BLAS threads, which they use, keep spinning
    # for a while afterwards and would slow the timings that follow.
    for row, (result, expected, flops) in zip(rows, checks):
        row["seconds"] = best[row["layer"]]
        row["gflops"] = flops / row["seconds"] / 1e9
        row["max_abs"], row["rel_l2"] = errors(result, expected())
    return rows


def print_table(rows, tolerance):
    header = f"{'layer':<12} {'x (NCHW)':<15} {'w (KCRS)':<14} {'ms':>8} {'GFLOPS':>7} {'max abs err':>11} " \
             f"{'rel L2 err':>10}  ok"
    print(header)
    print("-" * len(header))
    for row in rows:
        ok = "yes" if row["rel_l2"] <= tolerance else "NO"
        print(f"{row['layer']:<12} {shape_text(row['x']):<15} {shape_text(row['w']):<14} "
              f"{row['seconds'] * 1e3:8.2f} {row['gflops']:7.1f} {row['max_abs']:11.2e} {row['rel_l2']:10.2e}  {ok}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m sparkle.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default="float32")
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed rounds over all layers after the warm-up call (best kept, default 10)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeat < 1:
        parser.error("--batch and --repeat must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype, tolerance = np.dtype(args.dtype), TOLERANCES[args.dtype]
    print("Note: the first sparkle.conv2d call compiles the CPU kernels (Numba JIT; later runs load them "
          "from the on-disk cache), so it is timed separately.")
    threads = numba.get_num_threads()  # also starts Numba's thread pool, so the layer name is known
    print(f"Device: {devices()[0].name}, {threads} threads ({numba.threading_layer()}); ResNet-50 layers, "
          f"N={args.batch}, {dtype}; best of {args.repeat} rounds after a warm-up call; "
          f"checked against the float64 reference (rel L2 <= {tolerance:g}).")
    rows = run_suite(args.batch, dtype, args.repeat)
    print(f"First call ({rows[0]['layer']}, compile or cache load + run): {rows[0]['first_s'] * 1e3:.0f} ms; "
          f"first calls of all layers: {sum(row['first_s'] for row in rows) * 1e3:.0f} ms\n")
    print_table(rows, tolerance)
    total_s = sum(row["seconds"] for row in rows)
    total_flops = sum(row["gflops"] * row["seconds"] for row in rows)
    print(f"\nAll layers: {total_s * 1e3:.1f} ms, {total_flops / total_s:.1f} GFLOPS")
    failed = [row["layer"] for row in rows if not row["rel_l2"] <= tolerance]  # `not <=` also catches NaN
    if failed:
        print(f"FAILED: relative L2 error above {tolerance:g} on {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"All {len(rows)} layers match the float64 reference (rel L2 <= {tolerance:g}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
