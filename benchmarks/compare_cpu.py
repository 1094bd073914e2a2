"""Sparkle against PyTorch CPU conv2d and numpy matmul, each library in its own process; conv2d extra memory.

Run from the repository root:

    PYTHONPATH=. python benchmarks/compare_cpu.py [--repeat R] [--rounds K] [--threads T] [--batch N]
                                                  [--json PATH] [--markdown PATH]

Two OpenMP runtimes (Numba's and PyTorch's) or a BLAS thread pool in one process take cores
from each other, so every library runs in a child process of its own: this script with
``--worker NAME``, which prints its figures as JSON. The children run one at a time, all in
this run, alternating for ``--rounds`` rounds, each with the same number of threads. A child
warms up (compiles), checks that result against Sparkle's float64 reference, then calls every
workload ``--repeat`` times; the best time of each workload over all rounds and calls is kept.

The numpy child runs without OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (some machines set them to
force an older kernel), so that OpenBLAS picks its own kernel for the CPU; the report names it.
Prints markdown; without PyTorch installed, Sparkle's conv2d figures alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

# Bars of issue 7 (AVX-512 machines): conv2d geomean and worst layer of sparkle/torch, matmul sparkle/numpy.
CONV_BAR = 0.9
CONV_MIN_BAR = 0.6
MATMUL_BAR = 0.8
# The 16-core host of the H200 machine: conv2d at N=1 and N=32.
CONV_HOST_BAR = 0.8

# Relative L2 error of a float32 result against the float64 reference, as the tests allow.
TOLERANCE = 1e-5
CHECK_POINTS = 4096  # conv2d outputs checked when the whole reference would be slow (N > 1)
CHECK_ROWS = 128  # matmul rows checked (with the first and last few) against the reference

MEMORY_LAYER = "res2_3x3"
MEMORY_BATCH = 8
MIB = 1024 * 1024

WORKERS = ("sparkle-conv", "torch-conv", "sparkle-matmul", "numpy-matmul")
# Set by some machines to force OpenBLAS's Haswell kernel (older OpenBLAS crashed on newer CPUs).
OPENBLAS_FORCING_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
REPORTED_VARIABLES = ("OMP_PROC_BIND", "OMP_PLACES", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                      "NUMBA_THREADING_LAYER", "NUMBA_NUM_THREADS", "SPARKLE_CPU_ISA")
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


class WrongResult(Exception):
    """A library's result is not close to the float64 reference: its timing would mean nothing."""


# ---------------------------------------------------------------------------------------------
# Worker side: one library in this process. Libraries are imported here, not at the top, so that
# the parent process never loads an OpenMP runtime or a BLAS of its own.


def rel_l2(y, ref):
    """||y - ref|| / ||ref||, in float64."""
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm((y - ref).ravel()) / max(np.linalg.norm(ref.ravel()), np.finfo(np.float64).tiny))


def conv2d_error(y, x, w, kwargs):
    """Relative L2 error of a conv2d result: all of it at N=1, else a random sample and the corners."""
    import numpy as np

    from sparkle import reference

    y = np.asarray(y)
    if x.shape[0] == 1:
        return rel_l2(y, reference.conv2d(x, w, **kwargs))
    rng = np.random.default_rng(1)
    points = np.stack([rng.integers(0, size, CHECK_POINTS) for size in y.shape], axis=1)
    points[:2] = [[0, 0, 0, 0], [size - 1 for size in y.shape]]
    return rel_l2(y[tuple(points.T)], reference.conv2d_at(x, w, points=points, **kwargs))


def matmul_error(c, a, b):
    """Relative L2 error of a matmul result on a sample of rows (the first and last ones among them)."""
    import numpy as np

    from sparkle import reference

    rng = np.random.default_rng(1)
    edge = min(8, a.shape[0])
    rows = np.unique(np.concatenate([np.arange(edge), np.arange(a.shape[0] - edge, a.shape[0]),
                                     rng.integers(0, a.shape[0], CHECK_ROWS)]))
    return rel_l2(np.asarray(c)[rows], reference.matmul(a[rows], b))


def warm_up_and_check(calls, checks, library):
    """Call each workload once (compiling it) and check that result; {workload: error}."""
    errors = {}
    for name, fn in calls.items():
        errors[name] = checks[name](fn())
        if not errors[name] <= TOLERANCE:  # also catches NaN
            raise WrongResult(f"{library} {name}: relative L2 error {errors[name]:.3e} against the float64 "
                              f"reference exceeds {TOLERANCE:g}")
    return errors


def conv_workloads(batch):
    from sparkle.workloads import RESNET50_LAYERS, layer_flops, layer_inputs

    workloads = {}
    for layer in RESNET50_LAYERS:
        x, w = layer_inputs(layer, batch)
        workloads[layer.name] = (x, w, layer.conv_kwargs(), layer_flops(layer, x, w))
    return workloads


def matmul_workloads():
    import numpy as np

    from sparkle.workloads import MATMUL_SIZES

    rng = np.random.default_rng(0)
    return {str(size): (rng.standard_normal((size, size), dtype=np.float32),
                        rng.standard_normal((size, size), dtype=np.float32), 2 * size ** 3)
            for size in MATMUL_SIZES}


def sparkle_kernel(spec):
    """The micro-kernel shape ("rows x vectors") Sparkle's CPU plan picks, or None when the planning
    module cannot tell (it is being reworked)."""
    try:
        from sparkle.cpu.plan import plan_conv2d, uses_direct_kernel

        if uses_direct_kernel(spec):
            return "direct"
        plan = plan_conv2d(spec)
        return f"{plan.mr}x{plan.nv}"
    except Exception:  # noqa: BLE001 - a report detail, never a reason to fail the benchmark
        return None


def sparkle_info():
    """Numba's threading, and the CPU device entry with the instruction set Sparkle runs. Gathered after
    timing: listing devices starts the OpenCL runtimes, whose threads must not run during the timing."""
    import dataclasses

    import numba

    import sparkle

    info = {"numba": numba.__version__, "numba_threads": numba.get_num_threads(),
            "numba_threading_layer": numba.threading_layer()}
    device = sparkle.devices()[0]
    info["device"] = repr(device)
    info["device_fields"] = dataclasses.asdict(device) if dataclasses.is_dataclass(device) else None
    info["device_isa"] = getattr(device, "isa", None)
    try:
        from sparkle.cpu.isa import active_isa

        info["active_isa"] = active_isa().name
    except Exception:  # noqa: BLE001 - older or changing module: report it as unknown
        info["active_isa"] = None
    return info


def measure_memory():
    """Peak extra memory of one conv2d call next to the sizes it is made of."""
    import numpy as np

    import sparkle
    from sparkle import api
    from sparkle.cpu.backend import plan_conv2d, workspace_bytes
    from sparkle.timing import peak_extra_memory
    from sparkle.workloads import RESNET50_LAYERS, layer_inputs

    layer = next(layer for layer in RESNET50_LAYERS if layer.name == MEMORY_LAYER)
    x, w = layer_inputs(layer, MEMORY_BATCH)
    kwargs = layer.conv_kwargs()
    sparkle.conv2d(x, w, device="cpu", **kwargs)  # warm-up: compile outside the measurement
    peak = peak_extra_memory(lambda: sparkle.conv2d(x, w, device="cpu", **kwargs))
    spec = api.conv2d_spec(x, w, **kwargs)
    reduction = spec.in_channels * spec.kernel_h * spec.kernel_w
    output = int(np.prod(spec.output_shape)) * x.itemsize
    return {"layer": layer.name, "batch": MEMORY_BATCH, "x": list(x.shape), "w": list(w.shape),
            "peak_extra_bytes": peak, "output_bytes": output, "workspace_bytes": peak - output,
            # From the backend's own plan, so it follows the path the call takes.
            "scratch_bytes": workspace_bytes(spec, plan_conv2d(spec)),
            "input_bytes": x.nbytes,
            "whole_im2col_bytes": spec.batch * reduction * spec.out_h * spec.out_w * x.itemsize}


def run_sparkle_conv(args):
    import functools

    import numba

    import sparkle
    from sparkle import api
    from sparkle.timing import interleaved_best

    numba.set_num_threads(args.threads)
    workloads = conv_workloads(args.batch)
    calls = {name: functools.partial(sparkle.conv2d, x, w, device="cpu", **kwargs)
             for name, (x, w, kwargs, _) in workloads.items()}
    checks = {name: functools.partial(conv2d_error, x=x, w=w, kwargs=kwargs)
              for name, (x, w, kwargs, _) in workloads.items()}
    errors = warm_up_and_check(calls, checks, "sparkle")
    best = interleaved_best(calls, args.repeat)
    report = {"seconds": best, "errors": errors,
              "workloads": {name: {"x": list(x.shape), "w": list(w.shape), "flops": flops,
                                   "kernel": sparkle_kernel(api.conv2d_spec(x, w, **kwargs))}
                            for name, (x, w, kwargs, flops) in workloads.items()}}
    if args.memory:
        report["memory"] = measure_memory()
    report["info"] = sparkle_info()
    return report


def run_torch_conv(args):
    import functools

    import torch

    from sparkle.timing import interleaved_best

    torch.set_num_threads(args.threads)
    workloads = conv_workloads(args.batch)
    conv = torch.nn.functional.conv2d
    calls = {name: functools.partial(conv, torch.from_numpy(x), torch.from_numpy(w), **kwargs)
             for name, (x, w, kwargs, _) in workloads.items()}
    checks = {name: (lambda y, x=x, w=w, kwargs=kwargs: conv2d_error(y.numpy(), x, w, kwargs))
              for name, (x, w, kwargs, _) in workloads.items()}
    with torch.inference_mode():
        errors = warm_up_and_check(calls, checks, "torch")
        best = interleaved_best(calls, args.repeat)
    return {"seconds": best, "errors": errors,
            "info": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                     "mkldnn": torch.backends.mkldnn.is_available()}}


def run_sparkle_matmul(args):
    import functools

    import numba

    import sparkle
    from sparkle import api
    from sparkle.api import matmul_as_conv2d_spec
    from sparkle.timing import interleaved_best

    numba.set_num_threads(args.threads)
    workloads = matmul_workloads()
    calls = {name: functools.partial(sparkle.matmul, a, b, device="cpu") for name, (a, b, _) in workloads.items()}
    checks = {name: functools.partial(matmul_error, a=a, b=b) for name, (a, b, _) in workloads.items()}
    errors = warm_up_and_check(calls, checks, "sparkle")
    best = interleaved_best(calls, args.repeat)
    return {"seconds": best, "errors": errors,
            "workloads": {name: {"flops": flops,
                                 "kernel": sparkle_kernel(matmul_as_conv2d_spec(api.matmul_spec(a, b)))}
                          for name, (a, b, flops) in workloads.items()},
            "info": sparkle_info()}


def blas_pools():
    """The BLAS thread pools loaded in this process as threadpoolctl sees them (kernel, version, threads)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    keys = ("internal_api", "architecture", "version", "num_threads", "threading_layer", "filepath")
    return [{key: pool.get(key) for key in keys} for pool in threadpool_info() if pool.get("user_api") == "blas"]


def run_numpy_matmul(args):
    import contextlib
    import functools

    import numpy as np

    from sparkle.timing import interleaved_best

    try:
        from threadpoolctl import threadpool_limits
        limits = threadpool_limits(args.threads, user_api="blas")
    except ImportError:  # OPENBLAS_NUM_THREADS from the parent still sets the pool size
        limits = contextlib.nullcontext()
    with limits:
        workloads = matmul_workloads()
        calls = {name: functools.partial(np.matmul, a, b) for name, (a, b, _) in workloads.items()}
        checks = {name: functools.partial(matmul_error, a=a, b=b) for name, (a, b, _) in workloads.items()}
        errors = warm_up_and_check(calls, checks, "numpy")
        best = interleaved_best(calls, args.repeat)
        pools = blas_pools()
    return {"seconds": best, "errors": errors,
            "info": {"numpy": np.__version__, "blas": pools,
                     "forcing_variables_seen": {name: os.environ.get(name) for name in OPENBLAS_FORCING_VARIABLES}}}


WORKER_RUNNERS = {"sparkle-conv": run_sparkle_conv, "torch-conv": run_torch_conv,
                  "sparkle-matmul": run_sparkle_matmul, "numpy-matmul": run_numpy_matmul}


def worker_main(args):
    try:
        report = WORKER_RUNNERS[args.worker](args)
    except WrongResult as error:
        print(f"{args.worker}: WRONG RESULT, not timed: {error}", file=sys.stderr)
        return 3
    print(json.dumps(report))  # the last line of stdout: what the parent reads
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: runs the workers, combines their figures, prints the report.


def default_threads():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model():
    """lscpu's model name, else the platform's processor string."""
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"},
                                check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in output.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return platform.processor() or platform.machine()


def worker_environment(worker, threads):
    """The child's environment and the variables removed from it."""
    env = dict(os.environ)
    # The children import this checkout's sparkle, whatever the caller's PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), env.get("PYTHONPATH")]))
    env["OPENBLAS_NUM_THREADS"] = str(threads)  # read when numpy loads, so before the child starts
    if threads > (os.cpu_count() or 1):
        env["NUMBA_NUM_THREADS"] = str(threads)  # numba.set_num_threads cannot exceed the pool size
    unset = {}
    if worker == "numpy-matmul":
        unset = {name: env.pop(name) for name in OPENBLAS_FORCING_VARIABLES if name in env}
    return env, unset


def run_worker(worker, args, memory):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, "--repeat", str(args.repeat),
               "--threads", str(args.threads), "--batch", str(args.batch)]
    if memory:
        command.append("--memory")
    env, unset = worker_environment(worker, args.threads)
    completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)  # stderr passes through
    if completed.returncode != 0:
        raise SystemExit(f"worker {worker} failed (exit status {completed.returncode}); no figures are reported")
    lines = completed.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    report["unset"] = unset
    return report


def run_rounds(args, workers):
    """{worker: [report of each round]}; the worker order rotates from round to round."""
    reports = {worker: [] for worker in workers}
    for round_index in range(args.rounds):
        shift = round_index % len(workers)
        for worker in workers[shift:] + workers[:shift]:
            print(f"round {round_index + 1}/{args.rounds}: {worker}", file=sys.stderr, flush=True)
            memory = worker == "sparkle-conv" and not args.no_memory and round_index == 0
            reports[worker].append(run_worker(worker, args, memory))
    return reports


def best_seconds(rounds):
    """{workload: best seconds over the rounds}, and {workload: each round's best seconds}."""
    per_round = {name: [report["seconds"][name] for report in rounds] for name in rounds[0]["seconds"]}
    return {name: min(values) for name, values in per_round.items()}, per_round


def worst_error(rounds):
    return {name: max(report["errors"][name] for report in rounds) for name in rounds[0]["errors"]}


def geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def combine_conv(reports):
    sparkle_rounds = reports["sparkle-conv"]
    workloads = sparkle_rounds[0]["workloads"]
    sparkle_best, sparkle_per_round = best_seconds(sparkle_rounds)
    sparkle_error = worst_error(sparkle_rounds)
    torch_rounds = reports.get("torch-conv")
    if torch_rounds:
        torch_best, torch_per_round = best_seconds(torch_rounds)
        torch_error = worst_error(torch_rounds)
    rows = []
    for name, workload in workloads.items():
        flops = workload["flops"]
        row = {"layer": name, "x": workload["x"], "w": workload["w"], "sparkle_kernel": workload["kernel"],
               "sparkle_ms": sparkle_best[name] * 1e3, "sparkle_gflops": flops / sparkle_best[name] / 1e9,
               "sparkle_ms_per_round": [s * 1e3 for s in sparkle_per_round[name]],
               "sparkle_rel_l2": sparkle_error[name]}
        if torch_rounds:
            row.update(torch_ms=torch_best[name] * 1e3, torch_gflops=flops / torch_best[name] / 1e9,
                       torch_ms_per_round=[s * 1e3 for s in torch_per_round[name]], torch_rel_l2=torch_error[name],
                       ratio=torch_best[name] / sparkle_best[name])
        rows.append(row)
    return rows


def combine_matmul(reports):
    sparkle_rounds, numpy_rounds = reports["sparkle-matmul"], reports["numpy-matmul"]
    sparkle_best, sparkle_per_round = best_seconds(sparkle_rounds)
    numpy_best, numpy_per_round = best_seconds(numpy_rounds)
    sparkle_error, numpy_error = worst_error(sparkle_rounds), worst_error(numpy_rounds)
    rows = []
    for name, workload in sparkle_rounds[0]["workloads"].items():
        flops = workload["flops"]
        rows.append({"size": int(name), "sparkle_kernel": workload["kernel"],
                     "sparkle_ms": sparkle_best[name] * 1e3, "sparkle_gflops": flops / sparkle_best[name] / 1e9,
                     "numpy_ms": numpy_best[name] * 1e3, "numpy_gflops": flops / numpy_best[name] / 1e9,
                     "ratio": numpy_best[name] / sparkle_best[name],
                     "sparkle_ms_per_round": [s * 1e3 for s in sparkle_per_round[name]],
                     "numpy_ms_per_round": [s * 1e3 for s in numpy_per_round[name]],
                     "sparkle_rel_l2": sparkle_error[name], "numpy_rel_l2": numpy_error[name]})
    return rows


def largest_spread(conv_rows, matmul_rows):
    """(ratio, what) of the widest gap between a workload's slowest and fastest round: how noisy the run was."""
    spreads = []
    tables = ((conv_rows, "layer", ("sparkle", "torch")), (matmul_rows, "size", ("sparkle", "numpy")))
    for rows, key, libraries in tables:
        for row in rows:
            for library in libraries:
                per_round = row.get(f"{library}_ms_per_round")
                if per_round:
                    spreads.append((max(per_round) / min(per_round), f"{library} {row[key]}"))
    return max(spreads)


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(met):
    return "meets" if met else "MISSES"


def describe_blas(pools):
    if pools is None:
        return "unknown (threadpoolctl is not installed)"
    if not pools:
        return "no BLAS library loaded"
    return "; ".join(f"{pool['internal_api']} {pool['version']}, kernel {pool.get('architecture') or 'unknown'}, "
                     f"{pool['num_threads']} threads ({pool.get('threading_layer') or 'unknown'} threading)"
                     for pool in pools)


def machine_lines(args, machine, reports):
    sparkle = reports["sparkle-conv"][0]["info"]
    numpy_info = reports["numpy-matmul"][0]["info"]
    unset = reports["numpy-matmul"][0]["unset"]
    isa = sparkle["device_isa"] or sparkle["active_isa"] or "not reported by this Sparkle"
    lines = [f"- Machine: {machine['cpu_model']}, {machine['cores']} cores available, Python {machine['python']}",
             f"- Sparkle: instruction set **{isa}** (device entry `isa`: {sparkle['device_isa']}, "
             f"backend family: {sparkle['active_isa']}); `sparkle.devices()[0]` = `{sparkle['device']}`",
             f"- Numba {sparkle['numba']}, threading layer {sparkle['numba_threading_layer']}, "
             f"{sparkle['numba_threads']} threads"]
    if "torch-conv" in reports:
        torch_info = reports["torch-conv"][0]["info"]
        lines.append(f"- PyTorch {torch_info['torch']}, {torch_info['torch_threads']} threads, "
                     f"oneDNN {'available' if torch_info['mkldnn'] else 'unavailable'}")
    else:
        lines.append("- PyTorch is not installed: Sparkle's conv2d figures only")
    unset_text = ", ".join(f"{name}={value}" for name, value in unset.items()) or "none (neither was set)"
    lines.append(f"- numpy {numpy_info['numpy']}, BLAS: {describe_blas(numpy_info['blas'])}")
    lines.append(f"- Unset in the numpy process only: {unset_text}")
    environment = ", ".join(f"{name}={value}" for name, value in machine["environment"].items()) or "none"
    lines.append(f"- Thread and ISA variables of this run's environment: {environment}")
    lines.append(f"- Load average (1, 5, 15 min) at the start: {machine['load_average']}; at the end: "
                 f"{machine['load_average_end']}")
    lines.append(f"- Timing: each library in its own process; rounds: {args.rounds}, the processes alternating; "
                 f"each process warms up, checks its result against the float64 reference (relative L2 "
                 f"<= {TOLERANCE:g}), then takes the best of {args.repeat} calls per workload; the best over "
                 f"rounds is kept. {args.threads} threads for every library. GFLOPS count a multiply-add as 2.")
    return lines


def conv_lines(rows, batch, have_torch):
    lines = [f"### conv2d, ResNet-50 layers, float32, N={batch}", ""]
    if not have_torch:
        lines.append(markdown_table(["layer", "sparkle kernel", "sparkle ms", "sparkle GFLOPS"],
                                    [(r["layer"], r["sparkle_kernel"], f"{r['sparkle_ms']:.2f}",
                                      f"{r['sparkle_gflops']:.1f}") for r in rows]))
        return lines, None
    lines.append(markdown_table(
        ["layer", "sparkle kernel", "sparkle ms", "sparkle GFLOPS", "torch ms", "torch GFLOPS", "sparkle/torch"],
        [(r["layer"], r["sparkle_kernel"], f"{r['sparkle_ms']:.2f}", f"{r['sparkle_gflops']:.1f}",
          f"{r['torch_ms']:.2f}", f"{r['torch_gflops']:.1f}", f"{r['ratio']:.2f}") for r in rows]))
    ratio = geomean([r["ratio"] for r in rows])
    worst = min(rows, key=lambda r: r["ratio"])
    lines += ["", f"Geomean sparkle/torch: **{ratio:.2f}**; lowest layer: **{worst['ratio']:.2f}** ({worst['layer']}).",
              f"AVX-512 bar (geomean >= {CONV_BAR}, no layer below {CONV_MIN_BAR}): "
              f"{verdict(ratio >= CONV_BAR and worst['ratio'] >= CONV_MIN_BAR)}. "
              f"16-core H200 host bar (>= {CONV_HOST_BAR} at N=1 and N=32): geomean {verdict(ratio >= CONV_HOST_BAR)}, "
              f"lowest layer {verdict(worst['ratio'] >= CONV_HOST_BAR)}."]
    return lines, {"geomean": ratio, "min": worst["ratio"], "min_layer": worst["layer"]}


def matmul_lines(rows):
    lines = ["### matmul, float32, square", "", markdown_table(
        ["M=N=K", "sparkle kernel", "sparkle ms", "sparkle GFLOPS", "numpy ms", "numpy GFLOPS", "sparkle/numpy",
         f">= {MATMUL_BAR}"],
        [(r["size"], r["sparkle_kernel"], f"{r['sparkle_ms']:.1f}", f"{r['sparkle_gflops']:.1f}",
          f"{r['numpy_ms']:.1f}", f"{r['numpy_gflops']:.1f}", f"{r['ratio']:.2f}",
          "yes" if r["ratio"] >= MATMUL_BAR else "NO") for r in rows])]
    return lines


def memory_lines(memory):
    labels = (("peak extra memory of the call", "peak_extra_bytes"),
              ("of which: the output", "output_bytes"),
              ("of which: everything else", "workspace_bytes"),
              ("workspace the plan allocates (implicit path: the padded copy of the input; weights are read in place)",
               "scratch_bytes"),
              ("input", "input_bytes"),
              ("whole-input im2col matrix (not allocated)", "whole_im2col_bytes"))
    rows = [(label, f"{memory[key]:,}", f"{memory[key] / MIB:.2f}", f"{memory[key] / memory['input_bytes']:.2f}")
            for label, key in labels]
    return [f"### conv2d extra memory, {memory['layer']} (x {memory['x']}, w {memory['w']}), float32", "",
            "Peak bytes allocated during one `sparkle.conv2d` call (tracemalloc, after a warm-up call), "
            "in the Sparkle process.", "", markdown_table(["quantity", "bytes", "MiB", "x input"], rows)]


def parent_main(args):
    have_torch = importlib.util.find_spec("torch") is not None
    workers = tuple(worker for worker in WORKERS if have_torch or worker != "torch-conv")
    machine = {"cpu_model": cpu_model(), "cores": default_threads(), "python": platform.python_version(),
               "environment": {name: os.environ[name] for name in REPORTED_VARIABLES if name in os.environ},
               # Other work on the machine shows in the timings: the run says how busy it was.
               "load_average": " ".join(f"{load:.2f}" for load in os.getloadavg())}
    reports = run_rounds(args, workers)
    machine["load_average_end"] = " ".join(f"{load:.2f}" for load in os.getloadavg())
    conv_rows = combine_conv(reports)
    matmul_rows = combine_matmul(reports)
    memory = reports["sparkle-conv"][0].get("memory")

    lines = machine_lines(args, machine, reports) + [""]
    conv_text, conv_ratios = conv_lines(conv_rows, args.batch, have_torch)
    lines += conv_text + [""] + matmul_lines(matmul_rows)
    if args.rounds > 1:
        spread, where = largest_spread(conv_rows, matmul_rows)
        lines += ["", f"Round to round, a workload's best time varied by up to {spread:.2f}x ({where}); "
                      "the tables keep the best round."]
    if memory:
        lines += [""] + memory_lines(memory)
    markdown = "\n".join(lines) + "\n"
    print(markdown, end="")
    if args.markdown:
        Path(args.markdown).write_text(markdown)
        print(f"\nMarkdown written to {args.markdown}")
    if args.json:
        results = {"machine": machine, "sparkle": reports["sparkle-conv"][0]["info"],
                   "torch": reports["torch-conv"][0]["info"] if have_torch else None,
                   "numpy": reports["numpy-matmul"][0]["info"], "unset_for_numpy": reports["numpy-matmul"][0]["unset"],
                   "repeat": args.repeat, "rounds": args.rounds, "threads": args.threads, "batch": args.batch,
                   "tolerance_rel_l2": TOLERANCE, "conv2d": conv_rows,
                   "conv2d_geomean_ratio": conv_ratios and conv_ratios["geomean"],
                   "conv2d_min_ratio": conv_ratios and conv_ratios["min"],
                   "conv2d_bar": CONV_BAR, "conv2d_min_bar": CONV_MIN_BAR, "conv2d_host_bar": CONV_HOST_BAR,
                   "matmul": matmul_rows, "matmul_bar": MATMUL_BAR, "memory": memory}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"Results written to {args.json}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per workload in each process (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of one process per library, alternating (default 3)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for every library: Numba, PyTorch and OpenBLAS (default: all cores)")
    parser.add_argument("--batch", type=int, default=1, help="conv2d batch size N (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown report to PATH")
    parser.add_argument("--no-memory", action="store_true", help="skip the extra-memory measurement")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)  # the child processes' mode
    parser.add_argument("--memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeat", "rounds", "threads", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    return worker_main(args) if args.worker else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
