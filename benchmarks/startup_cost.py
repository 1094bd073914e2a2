"""First-call cost of the ResNet-50 suite on Sparkle's CPU backend, with an empty cache and with a warm one.

Run from the repository root:

    PYTHONPATH=. python benchmarks/startup_cost.py [--repeat R] [--threads T] [--json PATH] [--markdown PATH]

Each repetition points NUMBA_CACHE_DIR and SPARKLE_CACHE_DIR at fresh temporary directories,
then runs the suite (conv2d on the ResNet-50 layers at N=1, then a 1024 matmul) in a new process
with that empty cache ("cold"), and again in a second new process that finds the cache the first
one filled ("warm"). Each process times every workload's first call and, to tell compiling and
loading from computing, its second call. The report gives each repetition and, per workload,
the least first-call time over the repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MATMUL_SIZE = 1024
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
# What issue 7 measured before the AVX-512 work: neither figure may grow.
TODAY_COLD_SECONDS_PER_SHAPE = 9.5
TODAY_WARM_SECONDS = 0.45


# ---------------------------------------------------------------------------------------------
# Worker side: one process, one pass over the suite. Sparkle is imported inside, after the clock
# starts, so that its import is measured too and the parent never loads Numba.


def driver_shapes(specs):
    """Distinct drivers the CPU plans pick for the specs: "implicit MRxNV", "packed MRxNV" or "direct"."""
    from sparkle.cpu.plan import plan_conv2d, uses_direct_kernel

    shapes = set()
    for spec in specs:
        if uses_direct_kernel(spec):
            shapes.add("direct")
        else:
            plan = plan_conv2d(spec)
            shapes.add(f"{'implicit' if plan.implicit else 'packed'} {plan.mr}x{plan.nv}")
    return sorted(shapes)


def compiled_driver_count():
    """GEMM drivers (one per path and micro-kernel shape) this process built or loaded."""
    from sparkle.cpu.conv2d import fused_conv2d_driver
    from sparkle.cpu.implicit import implicit_conv2d_driver

    return fused_conv2d_driver.cache_info().currsize + implicit_conv2d_driver.cache_info().currsize


def active_isa_name():
    try:
        from sparkle.cpu.isa import active_isa

        return active_isa().name
    except Exception:  # noqa: BLE001 - older or changing module
        return None


def first_and_second_call(fn):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    start = time.perf_counter()
    fn()
    return first, time.perf_counter() - start


def worker_main(args):
    start = time.perf_counter()
    import numba
    import numpy as np

    import sparkle
    from sparkle import api
    from sparkle.workloads import RESNET50_LAYERS, layer_inputs

    import_seconds = time.perf_counter() - start
    if args.threads:
        numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
    b = rng.standard_normal((MATMUL_SIZE, MATMUL_SIZE), dtype=np.float32)
    inputs = {layer.name: (*layer_inputs(layer), layer.conv_kwargs()) for layer in RESNET50_LAYERS}

    workloads = []
    for name, (x, w, kwargs) in inputs.items():
        first, second = first_and_second_call(lambda: sparkle.conv2d(x, w, device="cpu", **kwargs))
        workloads.append({"workload": name, "first_s": first, "second_s": second})
    first, second = first_and_second_call(lambda: sparkle.matmul(a, b, device="cpu"))
    workloads.append({"workload": f"matmul {MATMUL_SIZE}", "first_s": first, "second_s": second})

    specs = [api.conv2d_spec(x, w, **kwargs) for x, w, kwargs in inputs.values()]
    specs.append(api.matmul_as_conv2d_spec(api.matmul_spec(a, b)))
    report = {"import_s": import_seconds, "workloads": workloads, "shapes": driver_shapes(specs),
              "compiled_drivers": compiled_driver_count(), "isa": active_isa_name(),
              "numba_threads": numba.get_num_threads(), "numba": numba.__version__}
    print(json.dumps(report))  # the last line of stdout: what the parent reads
    return 0


# ---------------------------------------------------------------------------------------------
# Parent side: fresh cache directories, a cold process, a warm process, the report.


def cache_environment(cache_root):
    env = dict(os.environ)
    env["NUMBA_CACHE_DIR"] = str(cache_root / "numba")
    env["SPARKLE_CACHE_DIR"] = str(cache_root / "sparkle")
    # The child imports this checkout's sparkle, whatever the caller's PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPOSITORY_ROOT), env.get("PYTHONPATH")]))
    return env


def cache_file_count(cache_root):
    return sum(1 for path in cache_root.rglob("*") if path.is_file())


def run_worker(env, threads):
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    if threads:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)  # stderr passes through
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"start-up worker failed (exit status {completed.returncode})")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    report["process_wall_s"] = wall
    report["first_calls_s"] = sum(row["first_s"] for row in report["workloads"])
    return report


def measure_pair(threads, keep_cache):
    """(cold report, warm report) with a cache of their own, removed afterwards unless kept."""
    cache_root = Path(tempfile.mkdtemp(prefix="sparkle-startup-"))
    try:
        env = cache_environment(cache_root)
        cold = run_worker(env, threads)
        cold["cache_files"] = cache_file_count(cache_root)
        warm = run_worker(env, threads)
        warm["cache_files"] = cache_file_count(cache_root)
    finally:
        if keep_cache:
            print(f"cache kept in {cache_root}", file=sys.stderr)
        else:
            shutil.rmtree(cache_root, ignore_errors=True)
    return cold, warm


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def report_lines(pairs):
    first_cold = pairs[0][0]
    shapes = first_cold["shapes"]
    drivers = first_cold["compiled_drivers"]
    shape_count = drivers
    lines = [f"### First-call cost, ResNet-50 suite (8 conv2d layers at N=1, float32, and matmul {MATMUL_SIZE}), "
             "CPU backend", "",
             f"- Instruction set: {first_cold['isa'] or 'not reported by this Sparkle'}; Numba "
             f"{first_cold['numba']}, {first_cold['numba_threads']} threads",
             f"- Drivers the plans pick: {', '.join(shapes)}; GEMM drivers built in the cold process: {drivers}",
             f"- Each process is new; cold: empty NUMBA_CACHE_DIR and SPARKLE_CACHE_DIR, warm: the cache the cold "
             f"process left. Best of {len(pairs)} cold/warm pair(s) per workload.", ""]

    rows = []
    for index, workload in enumerate(first_cold["workloads"]):
        cold_first = min(cold["workloads"][index]["first_s"] for cold, _ in pairs)
        warm_first = min(warm["workloads"][index]["first_s"] for _, warm in pairs)
        second = min(report["workloads"][index]["second_s"] for pair in pairs for report in pair)
        rows.append((workload["workload"], f"{cold_first:.2f}", f"{warm_first:.3f}", f"{second * 1e3:.2f}"))
    lines.append(markdown_table(["workload", "cold first call s", "warm first call s", "second call ms"], rows))

    lines += ["", markdown_table(
        ["pair", "cold: import s", "cold: first calls s", "cold: process s", "cache files",
         "warm: import s", "warm: first calls s", "warm: process s"],
        [(index + 1, f"{cold['import_s']:.2f}", f"{cold['first_calls_s']:.2f}", f"{cold['process_wall_s']:.2f}",
          cold["cache_files"], f"{warm['import_s']:.2f}", f"{warm['first_calls_s']:.3f}",
          f"{warm['process_wall_s']:.2f}") for index, (cold, warm) in enumerate(pairs)])]

    cold_total = min(cold["first_calls_s"] for cold, _ in pairs)
    warm_total = min(warm["first_calls_s"] for _, warm in pairs)
    lines.append("")
    if shape_count:
        per_shape = cold_total / shape_count
        lines.append(f"Cold: **{cold_total:.1f} s** of first calls, {per_shape:.1f} s per compiled driver "
                     f"({shape_count}; issue 7's ceiling: about {TODAY_COLD_SECONDS_PER_SHAPE} s per shape): "
                     f"{'within' if per_shape <= TODAY_COLD_SECONDS_PER_SHAPE else 'ABOVE'} it.")
    else:
        lines.append(f"Cold: **{cold_total:.1f} s** of first calls (the number of micro-kernel shapes is unknown).")
    lines.append(f"Warm: **{warm_total:.2f} s** of first calls (issue 7's ceiling: about {TODAY_WARM_SECONDS} s): "
                 f"{'within' if warm_total <= TODAY_WARM_SECONDS else 'ABOVE'} it.")
    return lines


def parent_main(args):
    pairs = []
    for index in range(args.repeat):
        print(f"pair {index + 1}/{args.repeat}: cold process, then warm process", file=sys.stderr, flush=True)
        pairs.append(measure_pair(args.threads, args.keep_cache))
    markdown = "\n".join(report_lines(pairs)) + "\n"
    print(markdown, end="")
    if args.markdown:
        Path(args.markdown).write_text(markdown)
        print(f"\nMarkdown written to {args.markdown}")
    if args.json:
        results = {"repeat": args.repeat, "threads": args.threads, "matmul_size": MATMUL_SIZE,
                   "today_cold_seconds_per_shape": TODAY_COLD_SECONDS_PER_SHAPE,
                   "today_warm_seconds": TODAY_WARM_SECONDS,
                   "pairs": [{"cold": cold, "warm": warm} for cold, warm in pairs]}
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"Results written to {args.json}")
    return 0


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1,
                        help="cold/warm pairs, each with a fresh cache (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="Numba threads (default: Numba's, all cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--markdown", metavar="PATH", help="also write the markdown report to PATH")
    parser.add_argument("--keep-cache", action="store_true", help="leave the temporary cache directories in place")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # the child processes' mode
    args = parser.parse_args(argv)
    if args.repeat < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeat and --threads must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    return worker_main(args) if args.worker else parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
