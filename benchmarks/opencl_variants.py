"""Build, check and time many kernel parameter sets on one OpenCL device, in one process.

For exploring the search space on a lent GPU: every variant is checked against the float64
reference on a random sample of outputs before its time counts. Usage:
    python benchmarks/opencl_variants.py --device opencl:0 --workloads matmul4096 res2_3x3 --batch 32
"""

import argparse
import json
import sys
import time

import numpy as np

from sparkle import api, reference
from sparkle.opencl import codegen, launch, runtime
from sparkle.workloads import RESNET50_LAYERS, layer_inputs


def sample_error(spec, x, w, out, rng, count=256):
    if isinstance(spec, api.MatmulSpec):
        points = np.stack([rng.integers(0, spec.m, count), rng.integers(0, spec.n, count)], 1)
        ref = reference.matmul_at(x, w, points=points)
        got = out[points[:, 0], points[:, 1]]
    else:
        shape = spec.output_shape
        points = np.stack([rng.integers(0, s, count) for s in shape], 1)
        ref = reference.conv2d_at(x, w, points=points, stride=(spec.stride_h, spec.stride_w),
                                  padding=(spec.pad_top, spec.pad_bottom, spec.pad_left, spec.pad_right),
                                  groups=spec.groups)
        got = out[tuple(points.T)]
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def problem(name, batch, rng):
    if name.startswith("matmul"):
        n = int(name[len("matmul"):])
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        return api.matmul_spec(a, b), a, b, {}
    layer = next(layer for layer in RESNET50_LAYERS if layer.name == name)
    x, w = layer_inputs(layer, batch)
    return api.conv2d_spec(x, w, **layer.conv_kwargs()), x, w, layer.conv_kwargs()


def measure_variant(device, workload, params, buffers, repeat):
    x_buf, w_buf, b_buf, o_buf = buffers
    launch.enqueue(device, workload, params, x_buf, w_buf, b_buf, o_buf, has_bias=False, relu=False).wait()
    times = []
    for _ in range(repeat):
        event = launch.enqueue(device, workload, params, x_buf, w_buf, b_buf, o_buf, has_bias=False, relu=False)
        times.append(launch.event_seconds(event))
    return float(np.median(times)), float(min(times))


def _kwargs(spec):
    if isinstance(spec, api.MatmulSpec):
        return None
    return dict(stride=(spec.stride_h, spec.stride_w), padding=(spec.pad_top, spec.pad_left))


def torch_time(name, spec, x, w, kwargs, flops, repeat=50):
    import torch
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    xt, wt = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
    call = (lambda: xt @ wt) if kwargs is None else (lambda: torch.nn.functional.conv2d(xt, wt, **kwargs))
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); call(); end.record(); end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    med = float(np.median(times))
    print(f"{name:12s} torch {med * 1e3:8.3f} ms {flops / med / 1e12:7.2f} TFLOPS", flush=True)


def main(argv=None):
    import pyopencl as cl

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default=None)
    parser.add_argument("--workloads", nargs="+", default=["matmul4096"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--params", default=None, help="JSON list of parameter dicts")
    parser.add_argument("--json", default=None)
    parser.add_argument("--torch", action="store_true", help="also time cuDNN/cuBLAS (TF32 off)")
    args = parser.parse_args(argv)
    devices = runtime.opencl_devices()
    device = next((d for d in devices if d.id == args.device), None) if args.device else \
        next((d for d in devices if d.kind == "gpu"), devices[0])
    print("device:", device, device.identity, flush=True)
    text = args.params or "[{}]"
    param_sets = json.load(open(text[1:])) if text.startswith("@") else json.loads(text)
    rng = np.random.default_rng(0)
    rows = []
    for name in args.workloads:
        spec, x, w, _ = problem(name, args.batch, rng)
        workload = codegen.Workload.from_spec(spec)
        mf = cl.mem_flags
        ctx = device.context
        if isinstance(spec, api.MatmulSpec):
            x_host, w_host = np.ascontiguousarray(w), np.ascontiguousarray(x)  # image = b, weights = a
            out_shape = (spec.m, spec.n)
        else:
            x_host, w_host = np.ascontiguousarray(x), np.ascontiguousarray(w)
            out_shape = spec.output_shape
        buffers = (cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x_host),
                   cl.Buffer(ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=w_host),
                   cl.Buffer(ctx, mf.READ_ONLY, 4),
                   cl.Buffer(ctx, mf.READ_WRITE, int(np.prod(out_shape)) * 4))
        if args.torch:
            torch_time(name, spec, x, w, _kwargs(spec), workload.flops)
        for params in param_sets:
            if params.get("VEC_B") == 4 and not (workload.pointwise and (workload.out_h * workload.out_w) % 4 == 0):
                continue
            if params.get("VEC_A") == 4 and workload.gemm_k % 4:
                continue
            poison = np.full(out_shape, np.nan, np.float32)
            cl.enqueue_copy(device.queue, buffers[3], poison)
            start = time.perf_counter()
            try:
                launch.enqueue(device, workload, params, *buffers, has_bias=False, relu=False).wait()
            except cl.Error as error:
                print(f"{name:12s} {params} FAILED {str(error).splitlines()[0][:100]}", flush=True)
                continue
            build = time.perf_counter() - start
            out = np.empty(out_shape, np.float32)
            cl.enqueue_copy(device.queue, out, buffers[3])
            unwritten = int(np.isnan(out).sum())
            err = sample_error(spec, x, w, out, rng)
            med, best = measure_variant(device, workload, params, buffers, args.repeat)
            tflops = workload.flops / med / 1e12
            rows.append(dict(workload=name, params=params, err=err, unwritten=unwritten, median_s=med,
                             tflops=tflops, build_s=build))
            print(f"{name:12s} {json.dumps(params):90s} err={err:.1e} unwritten={unwritten} "
                  f"{med * 1e3:8.3f} ms {tflops:7.2f} TFLOPS build {build:.2f}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
