"""Sparkle's OpenCL backend against cuDNN/cuBLAS (or PyTorch CPU) and Sparkle's Numba CPU backend.

Run from the repository root (PyTorch is used only where installed):

    python benchmarks/compare_opencl.py [--device opencl:0] [--batch 32 1] [--tune SECONDS]
        [--matmul 4096 8192] [--markdown PATH] [--json PATH]

float32, data already on the device. Sparkle's time is kernel time from OpenCL events (median of
``--repeat`` launches of the kernel the public call would run); PyTorch on CUDA is timed with CUDA
events, TF32 off (the bars compare against true fp32). Every Sparkle result is first checked against
the float64 reference on a random sample of outputs: a wrong result fails the run instead of being timed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import numpy as np

import sparkle
from sparkle import api, reference
from sparkle.devices import resolve_device
from sparkle.opencl import backend, codegen, launch, transfer
from sparkle.opencl.codegen import Workload
from sparkle.opencl.tuning import space
from sparkle.workloads import RESNET50_LAYERS, layer_inputs

try:
    import torch
except ImportError:
    torch = None

# The bars against cuDNN/cuBLAS on an H100/H200 (issue 10): geomean over these layers at N=32 (tuned; 0.8 untuned)
# with every 3x3 layer at THREE_BY_THREE_BAR or more, geomean at N=1, and each matmul size.
BAR_LAYERS = ("conv1_7x7s2", "res2_3x3", "res2_1x1", "res3_3x3", "res4_3x3", "res5_3x3")
CONV_BARS = {32: 0.9, 1: 0.7}
UNTUNED_CONV_BAR, THREE_BY_THREE_BAR, MATMUL_BAR = 0.8, 0.75, 0.85
TOLERANCE = 1e-5


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def sampled_error(result, expected_at, shape, rng, count=512):
    points = np.stack([rng.integers(0, s, count) for s in shape], 1)
    expected = expected_at(points)
    got = result[tuple(points.T)].astype(np.float64)
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def sparkle_kernel_seconds(device, spec, operands, repeat):
    """Median event time of the kernel that ``sparkle.conv2d``/``matmul`` runs for ``spec`` on ``device``."""
    workload = Workload.from_spec(spec)
    params, source = backend.choose_params(device, workload)
    # matmul runs as a conv of the image b with the weights a (see codegen.Workload)
    image, weights = operands[::-1] if isinstance(spec, api.MatmulSpec) else operands
    out = transfer.empty(device, (workload.gemm_m * workload.groups, workload.gemm_n), spec.dtype)
    no_bias = transfer.empty(device, (1,), spec.dtype)
    run = lambda: launch.enqueue(device, workload, params, image.buffer, weights.buffer, no_bias.buffer,
                                 out.buffer, has_bias=False, relu=False)
    run().wait()
    times = [launch.event_seconds(run()) for _ in range(repeat)]
    return float(np.median(times)), params, source


def torch_seconds(x, w, conv_kwargs, repeat):
    """(seconds, backend name) of PyTorch on CUDA (events, TF32 off) or on the CPU (best wall time)."""
    if torch is None:
        return None, None
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    xt, wt = torch.from_numpy(x).to(device), torch.from_numpy(w).to(device)
    call = (lambda: xt @ wt) if conv_kwargs is None else (lambda: torch.nn.functional.conv2d(xt, wt, **conv_kwargs))
    for _ in range(3):
        call()
    if not cuda:
        times = []
        for _ in range(max(3, repeat // 4)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times), "torch-cpu"
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return float(np.median(times)), ("cuBLAS" if conv_kwargs is None else "cuDNN")


def numba_seconds(call, repeat=5):
    call()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def measure(device, name, spec, host, conv_kwargs, args, rng):
    flops = spec.flops
    if args.tune:
        result = sparkle.tune("matmul" if conv_kwargs is None else "conv2d", *host, device=device.id,
                              time_budget=args.tune, progress=False, **(conv_kwargs or {}))
        print(f"  tuned: {result}", flush=True)
    operands = [sparkle.to_device(a, device.id) for a in host]
    if conv_kwargs is None:
        result = sparkle.matmul(*operands).get()
        expected_at = lambda p: reference.matmul_at(*host, points=p)
    else:
        result = sparkle.conv2d(*operands, **conv_kwargs).get()
        expected_at = lambda p: reference.conv2d_at(*host, points=p, **conv_kwargs)
    error = sampled_error(result, expected_at, result.shape, rng)
    if not error <= TOLERANCE:
        raise SystemExit(f"{name}: WRONG RESULT on {device.id}: relative error {error:.2e}")
    seconds, params, source = sparkle_kernel_seconds(device, spec, operands, args.repeat)
    row = {"workload": name, "sparkle_ms": seconds * 1e3, "sparkle_gflops": flops / seconds / 1e9,
           "params": params, "params_from": source, "error": error}
    torch_s, torch_name = torch_seconds(*host, conv_kwargs, args.repeat) if not args.no_torch else (None, None)
    if torch_s:
        row.update(torch=torch_name, torch_ms=torch_s * 1e3, torch_gflops=flops / torch_s / 1e9,
                   ratio=torch_s / seconds)
    if args.numba:
        cpu_call = (lambda: sparkle.matmul(*host, device="cpu")) if conv_kwargs is None else \
            (lambda: sparkle.conv2d(*host, device="cpu", **conv_kwargs))
        cpu_s = numba_seconds(cpu_call)
        row.update(numba_ms=cpu_s * 1e3, numba_gflops=flops / cpu_s / 1e9)
    print(f"  {name}: {row['sparkle_gflops']:.1f} GFLOPS" + (f", {torch_name} {row['torch_gflops']:.1f}, "
                                                            f"ratio {row['ratio']:.2f}" if torch_s else ""),
          flush=True)
    return row


def algorithm(params):
    """The variant's algorithm in words: "winograd F(2x2) fused", "winograd F(4x4) + GEMM", "split-K 8" or
    "implicit GEMM"."""
    complete = space.complete(params)
    if complete["ALGO"] == codegen.WINOGRAD:
        return f"winograd F({complete['WINO_M']}x{complete['WINO_M']}) fused"
    if complete["ALGO"] == codegen.WINOGRAD_GEMM:
        return f"winograd F({complete['WINO_M']}x{complete['WINO_M']}) + GEMM"
    return f"split-K {complete['KSPLIT']}" if complete["KSPLIT"] > 1 else "implicit GEMM"


def table(rows, title):
    has_torch = any("torch_ms" in r for r in rows)
    has_numba = any("numba_ms" in r for r in rows)
    headers = ["workload", "sparkle ms", "sparkle GFLOPS"]
    if has_torch:
        headers += ["torch", "torch ms", "torch GFLOPS", "sparkle/torch"]
    if has_numba:
        headers += ["Numba CPU ms", "Numba CPU GFLOPS"]
    headers += ["algorithm", "params from"]
    body = []
    for r in rows:
        row = [r["workload"], f"{r['sparkle_ms']:.3f}", f"{r['sparkle_gflops']:.0f}"]
        if has_torch:
            row += [r.get("torch", "-"), f"{r['torch_ms']:.3f}" if "torch_ms" in r else "-",
                    f"{r['torch_gflops']:.0f}" if "torch_ms" in r else "-",
                    f"{r['ratio']:.2f}" if "ratio" in r else "-"]
        if has_numba:
            row += [f"{r['numba_ms']:.3f}" if "numba_ms" in r else "-",
                    f"{r['numba_gflops']:.1f}" if "numba_ms" in r else "-"]
        row += [algorithm(r["params"]), r["params_from"]]
        body.append(row)
    return f"### {title}\n\n" + markdown_table(headers, body)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="opencl", help="OpenCL device id (default: first GPU, else first)")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--layers", nargs="+", default=[layer.name for layer in RESNET50_LAYERS])
    parser.add_argument("--matmul", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--tune", type=float, default=0.0, help="tuning budget in seconds per workload (0: none)")
    parser.add_argument("--numba", action="store_true", help="also time the Numba CPU backend")
    parser.add_argument("--numba-max-batch", type=int, default=1, help="largest batch timed on the CPU backend")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if isinstance(device, str):
        parser.error(f"--device must be an OpenCL device, got {args.device!r}")
    rng = np.random.default_rng(0)
    header = (f"Device: {device.id} {device.name} ({device.identity}); host {platform.node()} "
              f"{platform.processor() or platform.machine()}; torch {torch.__version__ if torch else 'absent'}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(header, flush=True)
    sections, results = [header], {"device": device.identity, "conv2d": {}, "matmul": []}
    for batch in args.batch:
        rows = []
        numba = args.numba and batch <= args.numba_max_batch
        for layer in (layer for layer in RESNET50_LAYERS if layer.name in args.layers):
            x, w = layer_inputs(layer, batch)
            spec = api.conv2d_spec(x, w, **layer.conv_kwargs())
            run_args = argparse.Namespace(**{**vars(args), "numba": numba})
            rows.append(measure(device, layer.name, spec, (x, w), layer.conv_kwargs(), run_args, rng))
        results["conv2d"][batch] = rows
        text = table(rows, f"conv2d, ResNet-50 layers, float32, N={batch}, on {device.name}")
        ratios = [r["ratio"] for r in rows if "ratio" in r and r["workload"] in BAR_LAYERS]
        if ratios and len(ratios) == len(BAR_LAYERS):
            text += (f"\n\nGeomean sparkle/{rows[0]['torch']} over {', '.join(BAR_LAYERS)}: "
                     f"**{geomean(ratios):.2f}**")
            if batch in CONV_BARS:
                untuned = f" tuned, {UNTUNED_CONV_BAR} untuned" if batch == 32 else ""
                text += f" (bar {CONV_BARS[batch]}{untuned})"
            if batch == 32:
                lowest = min((r["ratio"], r["workload"]) for r in rows if "ratio" in r and "3x3" in r["workload"])
                text += f"; lowest 3x3 layer {lowest[1]} **{lowest[0]:.2f}** (bar {THREE_BY_THREE_BAR})"
        sections.append(text)
    rows = []
    for size in args.matmul:
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        run_args = argparse.Namespace(**{**vars(args), "numba": args.numba and size <= 2048})
        rows.append(measure(device, f"matmul {size}", api.matmul_spec(a, b), (a, b), None, run_args, rng))
    if rows:
        results["matmul"] = rows
        text = table(rows, f"matmul, float32, on {device.name}")
        if all("ratio" in r for r in rows):
            worst = min(r["ratio"] for r in rows)
            text += f"\n\nLowest sparkle/{rows[0]['torch']}: **{worst:.2f}** (bar {MATMUL_BAR})"
        sections.append(text)
    report = "\n\n".join(sections) + "\n"
    print("\n" + report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
