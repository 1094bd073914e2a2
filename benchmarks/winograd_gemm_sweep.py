"""Sweep Winograd around a batched GEMM (ALGO 2) over ResNet-50's 3x3 layers, next to the variant Sparkle runs today.

Run from the repository root on an OpenCL device:

    python benchmarks/winograd_gemm_sweep.py [--device opencl:0] [--batch 32] [--record] [--json PATH]

For each layer: the variant ``sparkle.conv2d`` would run (tuned, shipped or default) and a fixed grid of
F(2x2)/F(4x4) + GEMM variants, each checked against the float64 reference on sampled outputs (the tuner's check,
relative L2 <= 1e-5) before it is timed with OpenCL events (the tuner's timer: all steps, transforms included).
``--record`` stores a layer's fastest correct variant in the tuning database when it beats today's variant, as
``sparkle.tune`` would; ``benchmarks/compare_opencl.py`` then measures it against cuDNN.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time

import numpy as np

from sparkle import api
from sparkle.devices import resolve_device
from sparkle.opencl import backend, codegen, tuner
from sparkle.opencl.codegen import Workload
from sparkle.opencl.tuning import database, space
from sparkle.opencl.tuning.relatives import DeviceTraits
from sparkle.workloads import RESNET50_LAYERS, layer_inputs

THREE_BY_THREE = [layer.name for layer in RESNET50_LAYERS if layer.kernel == 3 and layer.stride == 1]
# (TM, TN, WM, WN): the GEMM family's tiles that won elsewhere, and their transposes
TILES = ((64, 128, 8, 8), (128, 64, 8, 8), (128, 128, 8, 8), (64, 64, 8, 8), (64, 64, 4, 8), (32, 128, 4, 8),
         (128, 32, 8, 4), (64, 128, 4, 8))


def grid():
    for m, (tm, tn, wm, wn), tk, vw in itertools.product((4, 2), TILES, (16, 8), (4, 1)):
        yield space.complete({"ALGO": codegen.WINOGRAD_GEMM, "WINO_M": m, "TM": tm, "TN": tn, "WM": wm, "WN": wn,
                              "TK": tk, "VW": vw, "VEC_A": 4, "VEC_B": 4})


def sweep(device, layer, batch, record):
    x, w = layer_inputs(layer, batch)
    spec = api.conv2d_spec(x, w, **layer.conv_kwargs())
    workload = Workload.from_spec(spec)
    limits = space.DeviceLimits.of(device)
    problem = tuner._Problem(spec, device, np.random.default_rng(0))
    today, origin = backend.choose_params(device, workload)
    rows, rejected = [], []
    candidates = [(today, f"today ({origin})")] + [(p, "sweep") for p in grid()
                                                  if not space.violations(p, workload, limits)]
    for params, why in candidates:
        try:
            problem.launch(device, workload, params).wait()
            error = problem.error(problem.out.get())
            if not error <= tuner.TOLERANCE[workload.dtype]:
                rejected.append({"params": params, "reason": f"wrong result: relative error {error:.2e}"})
                continue
            seconds = tuner._time(device, workload, params, problem)
        except Exception as fault:  # a variant that cannot build or launch is recorded, not fatal
            rejected.append({"params": params, "reason": f"{type(fault).__name__}: {str(fault)[:160]}"})
            continue
        rows.append({"layer": layer.name, "batch": batch, "why": why, "params": params, "ms": seconds * 1e3,
                     "tflops": workload.flops / seconds / 1e12, "error": error,
                     "algorithm": _algorithm(params)})
        print(f"  {layer.name} N={batch} {rows[-1]['algorithm']:<22} {seconds * 1e3:7.3f} ms "
              f"{rows[-1]['tflops']:6.1f} TFLOPS err {error:.1e} {why}", flush=True)
    best = min((r for r in rows if r["why"] == "sweep"), key=lambda r: r["ms"], default=None)
    baseline = rows[0] if rows and rows[0]["why"].startswith("today") else None
    if record and best and (baseline is None or best["ms"] < baseline["ms"]):
        database.record(device.identity, workload, {"params": best["params"], "seconds": best["ms"] * 1e-3,
                                                    "gflops": best["tflops"] * 1e3},
                        rejected, len(candidates), traits=DeviceTraits.of(device))
        print(f"  recorded {best['algorithm']} {best['ms']:.3f} ms for {layer.name} N={batch}", flush=True)
    return rows, rejected


def _algorithm(params):
    p = space.complete(params)
    if p["ALGO"] == codegen.WINOGRAD_GEMM:
        return f"F({p['WINO_M']}x{p['WINO_M']})+GEMM {p['TM']}x{p['TN']}/{p['WM']}x{p['WN']} TK{p['TK']} VW{p['VW']}"
    if p["ALGO"] == codegen.WINOGRAD:
        return f"F({p['WINO_M']}x{p['WINO_M']}) fused"
    return f"implicit GEMM KSPLIT={p['KSPLIT']}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="opencl")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--layers", nargs="+", default=THREE_BY_THREE)
    parser.add_argument("--record", action="store_true", help="store winners that beat today's variant")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if isinstance(device, str):
        parser.error(f"--device must be an OpenCL device, got {args.device!r}")
    random.seed(0)
    print(f"{device.id} {device.name} ({device.identity}) {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = {"device": device.identity, "rows": [], "rejected": []}
    for batch in args.batch:
        for layer in (layer for layer in RESNET50_LAYERS if layer.name in args.layers):
            rows, rejected = sweep(device, layer, batch, args.record)
            results["rows"] += rows
            results["rejected"] += [{"layer": layer.name, "batch": batch, **r} for r in rejected]
            if args.json:  # after every layer: a run cut short keeps what it measured
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
