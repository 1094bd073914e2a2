"""Host cost of one OpenCL call with its data already on the device (issue 9, "Dispatch in microseconds").

Run from the repository root:

    python benchmarks/dispatch_cost_opencl.py [--device opencl:0] [--layers tiny res2_3x3 ...]
        [--calls 256] [--markdown PATH] [--json PATH]

float32, DeviceArray operands, N=1. For each layer (a tiny 1x4x8x8 3x3 conv, the ResNet-50 layers of
``sparkle.workloads``, a 64x64x64 matmul), each way of calling is timed two ways:

- queued: ``--calls`` calls in a row, then one ``finish``; the host time until the last call returned,
  divided by the number of calls (best of a few rounds). What a caller pays per call when it does not wait.
- latency: one call, then ``finish``; best of many. What a caller waits for one result.

The ways of calling:
- prepared: ``sparkle.opencl.backend.prepare_conv2d(spec, device)`` (``prepare_matmul``), built once, then
  called (what the scheduler does for a repeated call signature);
- explicit device: ``sparkle.conv2d(..., device="opencl:N")``, which validates a signature's first call and
  keeps its spec and the OpenCL backend's prepared call (``sparkle/named_device.py``; ``--breakdown`` times
  each step of a first call on the tiny layer, and the whole kept call);
- raw: PyOpenCL's own kernel call, ``kernel(queue, global, local, *buffers)``, on a kernel object of the
  same program (sets the four buffer arguments and enqueues: the floor for a Python caller);
- torch: ``torch.nn.functional.conv2d`` (``@``) on CUDA tensors, TF32 off, where torch sees a CUDA GPU.

The kernel's own time (OpenCL events, median of 10) is given beside, so that latency minus kernel time
shows what a call adds around the work.

Before any timing, each way's result is compared with the float64 reference (relative L2 error at most
1e-5); a wrong result stops the run instead of being timed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time

import numpy as np

import sparkle
from sparkle import api, reference
from sparkle.devices import resolve_device
from sparkle.workloads import RESNET50_LAYERS, ConvLayer, layer_inputs

try:
    import torch
except ImportError:
    torch = None

TOLERANCE = 1e-5
TINY = ConvLayer("tiny_1x4x8x8_3x3", 4, 4, 8, 3, 1, 1)
MATMUL_SIZE = 64


def rel_error(result, expected):
    result = np.asarray(result, dtype=np.float64)
    return float(np.linalg.norm(result - expected) / max(np.linalg.norm(expected), 1e-300))


def checked(name, way, result, expected):
    error = rel_error(result, expected)
    if not error <= TOLERANCE:  # `not <=` catches NaN
        raise SystemExit(f"{name}: WRONG RESULT from {way}: relative error {error:.2e} over {TOLERANCE:g}")
    return error


def queued_seconds(call, finish, calls, rounds):
    """Best over ``rounds`` of (host time for ``calls`` calls in a row) / calls; the queue drains between rounds."""
    best = math.inf
    for _ in range(rounds):
        finish()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
        finish()
    return best


def latency_seconds(call, finish, budget, most=300):
    """(best, median) of call + finish, repeated up to ``most`` times or ``budget`` seconds."""
    times = []
    deadline = time.perf_counter() + budget
    while len(times) < most and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        call()
        finish()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def time_way(call, finish, args):
    """{queued_us, latency_us, latency_median_us} for one way of calling (warm: called a few times first)."""
    for _ in range(3):
        call()
    finish()
    best, median = latency_seconds(call, finish, args.latency_budget)
    # Few calls where each one is slow (PoCL's kernels run on the host's own cores): the round stays short.
    calls = max(8, min(args.calls, int(args.queue_budget / max(best, 1e-6))))
    queued = queued_seconds(call, finish, calls, args.rounds)
    return {"queued_us": queued * 1e6, "latency_us": best * 1e6, "latency_median_us": median * 1e6,
            "queued_calls": calls}


def raw_call(device, prepared, image, weights):
    """PyOpenCL's own kernel calls of the prepared variant's program, on kernel objects of their own: every step
    of its launch plan (split-K's partial products and their sum, Winograd's transforms), with workspaces of its
    own. A single-kernel call of a split-K variant computes only partial sums (a wrong result)."""
    import pyopencl as cl

    from sparkle.opencl import codegen

    variant = prepared._variant
    workload = variant._call.workload
    program = device.program(variant.source, key=variant.program_key)
    bias = prepared.unused_bias if prepared.unused_bias is not None else sparkle.to_device(
        np.zeros(1, prepared.dtype), device.id)
    out = device.pool_buffer(math.prod(prepared.out_shape) * prepared.dtype.itemsize)
    buffers = {"x": image.buffer, "w": weights.buffer, "bias": bias.buffer, "out": out}
    for role, nbytes in codegen.workspaces(workload, variant.params).items():
        buffers[role] = device.pool_buffer(nbytes)
    steps = [(cl.Kernel(program, step.kernel), [buffers[role] for role in step.args], step.global_size,
              step.local_size) for step in codegen.launch_plan(workload, variant.params)]

    def enqueue(queue, wait_for=None):
        events = []
        for kernel, arguments, global_size, local_size in steps:
            events.append(kernel(queue, global_size, local_size, *arguments, wait_for=wait_for))
            wait_for = None  # one in-order queue: each step follows the last
        return events[0], events[-1]

    def call():
        return enqueue(device.queue)[-1]

    def timed():
        """The same launches on the profiling queue, in the queue's order: their events carry device times."""
        return device.timed(enqueue)

    def result():
        host = np.empty(prepared.out_shape, prepared.dtype)
        cl.enqueue_copy(device.queue, host, out, is_blocking=True)
        return host

    return call, result, timed


def torch_ways(host, conv_kwargs):
    """(call, finish, result) on CUDA, or None where torch or a CUDA GPU is missing."""
    if torch is None or not torch.cuda.is_available():
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    first, second = (torch.from_numpy(a).cuda() for a in host)

    def call():
        if conv_kwargs is None:
            return first @ second
        return torch.nn.functional.conv2d(first, second, **conv_kwargs)

    return call, torch.cuda.synchronize, lambda: call().cpu().numpy()


def measure(device, name, host, conv_kwargs, args):
    from sparkle.opencl import backend, launch

    is_matmul = conv_kwargs is None
    operands = [sparkle.to_device(a, device.id) for a in host]
    if is_matmul:
        spec = api.matmul_spec(*host)
        expected = reference.matmul(*host)
        prepared = backend.prepare_matmul(spec, device)
        image, weights = operands[1], operands[0]  # b is the kernel's image, a its weights
    else:
        spec = api.conv2d_spec(*host, **conv_kwargs)
        expected = reference.conv2d(*host, **conv_kwargs)
        prepared = backend.prepare_conv2d(spec, device)
        image, weights = operands

    def explicit():
        if is_matmul:
            return sparkle.matmul(*operands, device=device.id)
        return sparkle.conv2d(*operands, device=device.id, **conv_kwargs)

    def call():
        return prepared(*operands)

    compiled_before = prepared.compiled
    start = time.perf_counter()
    if not prepared.build():
        raise SystemExit(f"{name}: no kernel variant runs on {device.id}: {prepared.variant}")
    build_seconds = time.perf_counter() - start
    finish = device.queue.finish
    raw, raw_result, raw_timed = raw_call(device, prepared, image, weights)
    row = {"workload": name, "variant": prepared.variant, "compiled_at_prepare": compiled_before,
           "build_s": build_seconds, "gflop": spec.flops / 1e9}
    row["error"] = {"prepared": checked(name, "the prepared call", call().get(), expected),
                    "prepared_numpy": checked(name, "the prepared call (numpy)", prepared(*host), expected),
                    "explicit": checked(name, "sparkle.conv2d", explicit().get(), expected)}
    raw()
    row["error"]["raw"] = checked(name, "the raw kernel call", raw_result(), expected)
    launches = [raw_timed() for _ in range(10)]
    row["kernel_us"] = statistics.median(launch.Span(*events).seconds for events in launches) * 1e6
    ways = {"prepared": (call, finish), "explicit": (explicit, finish), "raw": (raw, finish)}
    torch_call = torch_ways(host, conv_kwargs) if not args.no_torch else None
    if torch_call is not None:
        t_call, t_finish, t_result = torch_call
        row["error"]["torch"] = checked(name, "torch", t_result(), expected)
        ways["torch"] = (t_call, t_finish)
    for way, (run, wait) in ways.items():
        row[way] = time_way(run, wait, args)
    return row


def step_seconds(call, repeat=200, rounds=5):
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            call()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def explicit_breakdown(device, layer):
    """Host µs of each step ``sparkle.conv2d(..., device="opencl:N")`` takes for device operands, timed alone
    (best of a few rounds): validation, the device, the kept prepared call of the signature, its call."""
    from sparkle.devices import resolve_device as resolve
    from sparkle.opencl import backend
    from sparkle.opencl.prepared import PreparedConv2d

    x, w = layer_inputs(layer)
    kwargs = layer.conv_kwargs()
    xd, wd = sparkle.to_device(x, device.id), sparkle.to_device(w, device.id)
    spec = api.conv2d_spec(xd, wd, **kwargs)
    kept = backend._kept_call(PreparedConv2d, spec, device)
    kept(xd, wd)  # built
    variant = kept._ready
    out = device.pool_buffer(kept._out_nbytes)
    buffers = (xd.buffer, wd.buffer, kept.unused_bias.buffer, out)
    steps = {
        "validate the arguments (api.conv2d_spec)": lambda: api.conv2d_spec(xd, wd, **kwargs),
        "resolve the device id": lambda: resolve(device.id, (xd, wd)),
        "find the kept prepared call of the signature": lambda: backend._kept_call(PreparedConv2d, spec, device),
        "the prepared call (its direct path for resident operands)": lambda: kept(xd, wd),
        # where the launches go (SPARKLE_TIMING_QUEUE): the same kernels on each queue, and spliced in
        "the variant's kernels enqueued on the device queue": lambda: variant._enqueue_steps(device.queue, buffers,
                                                                                           None),
        "the same on the profiling queue": lambda: variant._enqueue_steps(device.timing_queue, buffers, None),
        "a timed launch (device.timed: marker, launch, barrier)": lambda: device.timed(
            lambda queue, after: variant._enqueue_steps(queue, buffers, after)),
    }
    rows = {}
    for name, call in steps.items():
        rows[name] = step_seconds(call) * 1e6
        device.timing_queue.finish()
        device.queue.finish()
    device.pool.give(out)
    rows["whole call: sparkle.conv2d(..., device=id), a kept signature"] = step_seconds(
        lambda: sparkle.conv2d(xd, wd, device=device.id, **kwargs)) * 1e6
    device.queue.finish()
    return rows


def fmt(value):
    return "–" if value is None else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


def markdown(rows, header):
    has_torch = any("torch" in r for r in rows)
    ways = ["prepared", "explicit", "raw"] + (["torch"] if has_torch else [])
    names = {"prepared": "prepared", "explicit": "sparkle.conv2d", "raw": "raw pyopencl", "torch": "torch CUDA"}
    head = ["layer"] + [f"{names[w]} queued µs" for w in ways] + [f"{names[w]} latency µs" for w in ways] \
        + ["kernel µs (events)"]
    lines = [header, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["workload"]] + [fmt(r.get(w, {}).get("queued_us")) for w in ways] \
            + [fmt(r.get(w, {}).get("latency_us")) for w in ways] + [fmt(r["kernel_us"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("Variants (parameters, and where they came from), build time at first prepare, and the largest "
                   "relative error of any way against the float64 reference:"), ""]
    lines += ["| layer | variant | built in | max error |", "|---|---|---|---|"]
    for r in rows:
        built = "in memory already" if r["compiled_at_prepare"] else f"{r['build_s'] * 1e3:.0f} ms"
        lines.append(f"| {r['workload']} | {r['variant']} | {built} | {max(r['error'].values()):.1e} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="opencl", help="OpenCL device id (default: first GPU, else first)")
    parser.add_argument("--layers", nargs="+",
                        default=[TINY.name, *(layer.name for layer in RESNET50_LAYERS), f"matmul_{MATMUL_SIZE}"])
    parser.add_argument("--calls", type=int, default=256, help="calls queued per round (fewer where calls are slow)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queue-budget", type=float, default=0.5, help="seconds of device work per queued round")
    parser.add_argument("--latency-budget", type=float, default=0.5, help="seconds per latency measurement")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time each step of sparkle.conv2d(device=id) alone, on the tiny layer")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if isinstance(device, str):
        parser.error(f"--device must be an OpenCL device, got {args.device!r}")
    cuda = torch is not None and torch.cuda.is_available() and not args.no_torch
    header = (f"Device: {device.id} {device.name} ({device.identity}); timing queue "
              f"{'apart' if device.separate_timing_queue else 'shared'}; "
              f"host {platform.processor() or platform.machine()}, Python {platform.python_version()}; "
              f"torch {torch.__version__ if torch else 'absent'}"
              f"{' with CUDA ' + torch.cuda.get_device_name() if cuda else ' (no CUDA: no torch figures)'}; "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(header, flush=True)
    layers = {layer.name: layer for layer in (TINY, *RESNET50_LAYERS)}
    rows = []
    for name in args.layers:
        if name.startswith("matmul_"):
            size = int(name.split("_")[1])
            rng = np.random.default_rng(1)
            host = [rng.standard_normal((size, size)).astype(np.float32) for _ in range(2)]
            rows.append(measure(device, name, host, None, args))
        else:
            layer = layers[name]
            rows.append(measure(device, name, layer_inputs(layer), layer.conv_kwargs(), args))
        r = rows[-1]
        print(f"  {name}: prepared {r['prepared']['queued_us']:.1f} µs queued, {r['prepared']['latency_us']:.1f} µs "
              f"latency; raw {r['raw']['queued_us']:.1f} / {r['raw']['latency_us']:.1f}", flush=True)
    report = markdown(rows, header) + "\n"
    breakdown = None
    if args.breakdown:
        breakdown = explicit_breakdown(device, TINY)
        report += ("\nWhere `sparkle.conv2d(xd, wd, device=id)` spends its host time, each step timed alone on the "
                   "tiny layer (µs per call, queued):\n\n| step | µs |\n|---|---|\n"
                   + "".join(f"| {name} | {fmt(us)} |\n" for name, us in breakdown.items()))
    print("\n" + report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "explicit_breakdown": breakdown}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
