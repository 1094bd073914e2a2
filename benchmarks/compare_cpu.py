"""Sparkle against PyTorch CPU conv2d and numpy matmul, timed in one run; conv2d extra memory.

Run from the repository root:

    PYTHONPATH=. python benchmarks/compare_cpu.py [--repeat R] [--threads T] [--json PATH]

Candidates are timed interleaved: each round goes through every workload and library, a
few calls each, and the best call of each is kept, so a noisy machine slows them alike.
Prints markdown tables.
Without PyTorch installed, prints Sparkle's conv2d figures alone.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import sys

import numba
import numpy as np

import sparkle
from sparkle import api
from sparkle.cpu.backend import plan_conv2d
from sparkle.cpu.operands import allocate_scratch
from sparkle.timing import interleaved_best, peak_extra_memory
from sparkle.workloads import MATMUL_SIZES, RESNET50_LAYERS, layer_flops, layer_inputs

try:
    import torch
except ImportError:
    torch = None

CONV_BAR = 0.5  # geomean of Sparkle / PyTorch GFLOPS over the ResNet-50 layers
MATMUL_BAR = 0.6  # Sparkle / numpy GFLOPS, at every size
MEMORY_LAYER = "res2_3x3"
MEMORY_BATCH = 8
MIB = 1024 * 1024
# Calls of one candidate in a row per round: a call straight after another library's can
# be slowed by that library's thread pool still spinning, which is no property of either.
BURST = 3
SETTLE_SECONDS = 0.2  # let the other library's spinning worker threads go idle before a burst


def best_of_rounds(calls, repeat):
    """Warm every call up, then the best seconds of each over ``repeat`` interleaved rounds."""
    for fn in calls.values():
        fn()
    return interleaved_best(calls, repeat, burst=BURST, settle=SETTLE_SECONDS)


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def compare_conv2d(repeat):
    calls, layers = {}, {}
    for layer in RESNET50_LAYERS:
        x, w = layer_inputs(layer)
        kwargs = layer.conv_kwargs()
        layers[layer.name] = (x.shape, w.shape, layer_flops(layer, x, w))
        calls[layer.name, "sparkle"] = functools.partial(sparkle.conv2d, x, w, **kwargs)
        if torch is not None:
            calls[layer.name, "torch"] = functools.partial(torch.nn.functional.conv2d, torch.from_numpy(x),
                                                           torch.from_numpy(w), **kwargs)
    best = best_of_rounds(calls, repeat)
    rows = []
    for name, (x_shape, w_shape, flops) in layers.items():
        row = {"layer": name, "x": list(x_shape), "w": list(w_shape),
               "sparkle_ms": best[name, "sparkle"] * 1e3, "sparkle_gflops": flops / best[name, "sparkle"] / 1e9}
        if torch is not None:
            row.update(torch_ms=best[name, "torch"] * 1e3, torch_gflops=flops / best[name, "torch"] / 1e9,
                       ratio=best[name, "torch"] / best[name, "sparkle"])
        rows.append(row)
    return rows


def print_conv2d(rows, geomean_ratio):
    print("### conv2d, ResNet-50 layers, float32, N=1\n")
    if torch is None:
        print("PyTorch is not installed: Sparkle figures only.\n")
        print(markdown_table(["layer", "sparkle ms", "sparkle GFLOPS"],
                             [(r["layer"], f"{r['sparkle_ms']:.2f}", f"{r['sparkle_gflops']:.1f}") for r in rows]))
        return
    print(markdown_table(
        ["layer", "sparkle ms", "sparkle GFLOPS", "torch ms", "torch GFLOPS", "sparkle/torch"],
        [(r["layer"], f"{r['sparkle_ms']:.2f}", f"{r['sparkle_gflops']:.1f}", f"{r['torch_ms']:.2f}",
          f"{r['torch_gflops']:.1f}", f"{r['ratio']:.2f}") for r in rows]))
    verdict = "meets" if geomean_ratio >= CONV_BAR else "MISSES"
    print(f"\nGeomean sparkle/torch: **{geomean_ratio:.2f}** ({verdict} the bar of {CONV_BAR})")


def compare_matmul(repeat):
    rng = np.random.default_rng(0)
    calls = {}
    for size in MATMUL_SIZES:
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        calls[size, "sparkle"] = functools.partial(sparkle.matmul, a, b)
        calls[size, "numpy"] = functools.partial(np.matmul, a, b)
    best = best_of_rounds(calls, repeat)
    rows = []
    for size in MATMUL_SIZES:
        flops = 2 * size ** 3
        rows.append({"size": size, "sparkle_ms": best[size, "sparkle"] * 1e3,
                     "sparkle_gflops": flops / best[size, "sparkle"] / 1e9,
                     "numpy_ms": best[size, "numpy"] * 1e3, "numpy_gflops": flops / best[size, "numpy"] / 1e9,
                     "ratio": best[size, "numpy"] / best[size, "sparkle"]})
    return rows


def print_matmul(rows):
    print("### matmul, float32, square\n")
    print(markdown_table(
        ["M=N=K", "sparkle ms", "sparkle GFLOPS", "numpy ms", "numpy GFLOPS", "sparkle/numpy", f">= {MATMUL_BAR}"],
        [(r["size"], f"{r['sparkle_ms']:.1f}", f"{r['sparkle_gflops']:.1f}", f"{r['numpy_ms']:.1f}",
          f"{r['numpy_gflops']:.1f}", f"{r['ratio']:.2f}", "yes" if r["ratio"] >= MATMUL_BAR else "NO")
         for r in rows]))


def measure_memory():
    """Peak extra memory of one conv2d call next to the sizes it is made of."""
    layer = next(layer for layer in RESNET50_LAYERS if layer.name == MEMORY_LAYER)
    x, w = layer_inputs(layer, MEMORY_BATCH)
    kwargs = layer.conv_kwargs()
    sparkle.conv2d(x, w, **kwargs)  # warm-up: compile outside the measurement
    peak = peak_extra_memory(lambda: sparkle.conv2d(x, w, **kwargs))
    spec = api.conv2d_spec(x, w, **kwargs)
    reduction = spec.in_channels * spec.kernel_h * spec.kernel_w
    output = int(np.prod(spec.output_shape)) * x.itemsize
    return {"layer": layer.name, "batch": MEMORY_BATCH, "x": list(x.shape), "w": list(w.shape),
            "peak_extra_bytes": peak, "output_bytes": output, "workspace_bytes": peak - output,
            # Sizes from the backend's own plan, so they follow its packing.
            "scratch_bytes": allocate_scratch(spec, plan_conv2d(spec)).nbytes,
            "input_bytes": x.nbytes,
            "whole_im2col_bytes": spec.batch * reduction * spec.out_h * spec.out_w * x.itemsize}


def print_memory(memory):
    print(f"### conv2d extra memory, {memory['layer']} (x {memory['x']}, w {memory['w']}), float32\n")
    print("Peak bytes allocated during one `sparkle.conv2d` call (tracemalloc, after a warm-up call).\n")
    labels = (("peak extra memory of the call", "peak_extra_bytes"),
              ("of which: the output", "output_bytes"),
              ("of which: everything else", "workspace_bytes"),
              ("per-thread scratch the plan allocates (weights are read in place)", "scratch_bytes"),
              ("input", "input_bytes"),
              ("whole-input im2col matrix (not allocated)", "whole_im2col_bytes"))
    rows = [(label, f"{memory[key]:,}", f"{memory[key] / MIB:.2f}", f"{memory[key] / memory['input_bytes']:.2f}")
            for label, key in labels]
    print(markdown_table(["quantity", "bytes", "MiB", "x input"], rows))


def machine_info():
    info = {"cpu": sparkle.devices()[0].name, "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "numba_threading_layer": numba.threading_layer(), "OMP_PROC_BIND": os.environ.get("OMP_PROC_BIND")}
    if torch is not None:
        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return info


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="timing rounds (best kept, default 10)")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for Sparkle and PyTorch alike (default: Numba's); numpy's BLAS "
                             "keeps its own (set OPENBLAS_NUM_THREADS)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())  # same thread count for both
    info = machine_info()
    print("Machine: " + ", ".join(f"{key} {value}" for key, value in info.items()))
    print(f"Timing: best of {args.repeat} rounds, each calling every candidate {BURST} times in a row, "
          "after a warm-up call; GFLOPS count a multiply-add as 2.\n")
    with torch.inference_mode() if torch is not None else contextlib.nullcontext():
        conv_rows = compare_conv2d(args.repeat)
    conv_ratio = geomean([row["ratio"] for row in conv_rows]) if torch is not None else None
    print_conv2d(conv_rows, conv_ratio)
    print()
    matmul_rows = compare_matmul(args.repeat)
    print_matmul(matmul_rows)
    print()
    memory = measure_memory()
    print_memory(memory)
    if args.json:
        results = {"machine": info, "repeat": args.repeat, "conv2d": conv_rows, "conv2d_geomean_ratio": conv_ratio,
                   "conv2d_bar": CONV_BAR, "matmul": matmul_rows, "matmul_bar": MATMUL_BAR, "memory": memory}
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
        print(f"\nResults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
