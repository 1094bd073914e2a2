"""Where the CPU backend's threads run, and what that costs: res3 3x3 at N=1, one fresh process per run.

    PYTHONPATH=. python benchmarks/thread_placement.py packing [--runs 20] [--threads 2]
    PYTHONPATH=. python benchmarks/thread_placement.py after-torch [--tree NAME=PATH ...]

``packing``: the same call in many fresh processes, with worker binding and with
``SPARKLE_BIND_THREADS=0``. On VMs that pack unbound threads onto one vCPU some processes
run several times slower for their whole life; binding should leave no such outliers.

``after-torch``: the call in a fresh process, after a PyTorch CPU op, and after PyTorch
initialized CUDA (``torch.zeros(1).cuda()``), importing Sparkle before or after PyTorch.
``--tree NAME=PATH`` runs the Sparkle package found under PATH (several trees compare
versions); each worker also reports the caller's affinity before and after, the OpenMP
runtimes loaded and where every thread of the process may run, to say why a case is slow.

Each run is this script with ``--worker``, which prints one JSON line. Results are checked
against sparkle.reference.
"""

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import time

LAYER = "res3_3x3"


def _thread_masks():
    """{Cpus_allowed_list: number of threads} over every thread of this process."""
    masks = collections.Counter()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/status") as status:
                for line in status:
                    if line.startswith("Cpus_allowed_list:"):
                        masks[line.split(":", 1)[1].strip()] += 1
        except OSError:
            pass
    return dict(masks)


def _runtimes_loaded():
    """Threading runtimes mapped into this process (two OpenMP runtimes compete for cores)."""
    names = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if any(key in path for key in ("gomp", "iomp", "libomp", "tbb")):
                names.add(path)
    return sorted(names)


def _torch_step(step):
    import torch
    if step == "torch-cuda":
        torch.zeros(1).cuda()
        torch.cuda.synchronize()
    elif step == "torch-cpu":
        torch.nn.functional.conv2d(torch.randn(1, 64, 56, 56), torch.randn(64, 64, 3, 3), padding=1)


def worker(args):
    record = {"affinity_at_start": sorted(os.sched_getaffinity(0))}
    if args.order == "torch-first" and args.before != "none":
        _torch_step(args.before)
    import numba
    import numpy as np

    import sparkle
    from sparkle import reference
    from sparkle.workloads import RESNET50_LAYERS, layer_inputs
    if args.order == "sparkle-first" and args.before != "none":
        _torch_step(args.before)
    record["affinity_before_call"] = sorted(os.sched_getaffinity(0))
    if args.threads:
        numba.set_num_threads(args.threads)
    layer = next(item for item in RESNET50_LAYERS if item.name == LAYER)
    x, w = layer_inputs(layer)
    y = sparkle.conv2d(x, w, device="cpu", **layer.conv_kwargs())
    expected = reference.conv2d(x, w, **layer.conv_kwargs())
    record["relative_error"] = float(np.linalg.norm(y - expected) / np.linalg.norm(expected))
    times = []
    deadline = time.perf_counter() + args.seconds
    while len(times) < args.repeat and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        sparkle.conv2d(x, w, device="cpu", **layer.conv_kwargs())
        times.append(time.perf_counter() - start)
    record.update(best_ms=1e3 * min(times), median_ms=1e3 * statistics.median(times), calls=len(times),
                  affinity_after_call=sorted(os.sched_getaffinity(0)), threading_layer=numba.threading_layer(),
                  numba_threads=numba.get_num_threads(), runtimes=_runtimes_loaded(), thread_masks=_thread_masks(),
                  OMP_PROC_BIND=os.environ.get("OMP_PROC_BIND"))
    if "torch" in sys.modules:
        record["torch_threads"] = sys.modules["torch"].get_num_threads()
    print(json.dumps(record), flush=True)


def run_worker(tree, before="none", order="torch-first", env=None, threads=0, repeat=20, seconds=3.0, timeout=60):
    command = [sys.executable, __file__, "--worker", "--before", before, "--order", order,
               "--threads", str(threads), "--repeat", str(repeat), "--seconds", str(seconds)]
    environment = dict(os.environ, PYTHONPATH=tree, **(env or {}))
    started = time.perf_counter()
    try:
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr or done.stdout)[-600:]}
    record = json.loads(lines[-1])
    record["process_s"] = round(time.perf_counter() - started, 1)
    return record


def packing(args):
    tree = args.tree[0].split("=", 1)[1] if args.tree else "."
    variants = {"bound": (tree, {"SPARKLE_BIND_THREADS": "1"}),
                "unbound (SPARKLE_BIND_THREADS=0)": (tree, {"SPARKLE_BIND_THREADS": "0"})}
    if args.old_tree:
        variants["old: OMP_PROC_BIND=true on import"] = (args.old_tree, {})
    run_worker(tree, threads=args.threads, repeat=2)  # compile once (disk cache)
    if args.old_tree:
        run_worker(args.old_tree, threads=args.threads, repeat=2)
    results = {name: [] for name in variants}
    for _ in range(args.runs):  # interleaved, so that drift hits every variant alike
        for name, (path, env) in variants.items():
            record = run_worker(path, env=env, threads=args.threads, repeat=args.repeat)
            results[name].append(record)
            if "error" in record:
                print(name, record["error"], file=sys.stderr)
    print(f"\n{LAYER} N=1, {args.threads} threads, best of {args.repeat} calls per process, "
          f"{args.runs} fresh processes per variant (ms)\n")
    print("| variant | min | median | max | processes > 2x min | max error |")
    print("|---|---|---|---|---|---|")
    for name, records in results.items():
        best = sorted(r["best_ms"] for r in records if "best_ms" in r)
        if not best:
            print(f"| {name} | failed | | | | |")
            continue
        slow = sum(b > 2 * best[0] for b in best)
        error = max(r["relative_error"] for r in records if "best_ms" in r)
        print(f"| {name} | {best[0]:.2f} | {statistics.median(best):.2f} | {best[-1]:.2f} | {slow} | {error:.1e} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


def after_torch(args):
    trees = dict(item.split("=", 1) for item in args.tree) or {"current": "."}
    cases = [("fresh", "none", "torch-first"), ("torch CPU op first", "torch-cpu", "torch-first"),
             ("torch CUDA first, then import sparkle", "torch-cuda", "torch-first"),
             ("import sparkle, then torch CUDA", "torch-cuda", "sparkle-first")]
    extra = [(label, env) for label, env in (item.split("=", 1) for item in args.env_variant)]
    compiling = [subprocess.Popen([sys.executable, __file__, "--worker", "--repeat", "1"], stdout=subprocess.DEVNULL,
                                  env=dict(os.environ, PYTHONPATH=path)) for path in trees.values()]
    for process in compiling:  # fills each tree's disk cache
        process.wait()
    rows = []
    for name, path in trees.items():
        variants = [(name, {}, cases)]
        variants += [(f"{name} {label}", dict([env.split(":", 1)]), [c for c in cases if "CUDA" in c[0]])
                     for label, env in extra]
        for label, env, tree_cases in variants:
            for case, before, order in tree_cases:
                record = run_worker(path, before=before, order=order, env=env, repeat=args.repeat)
                record.update(tree=label, case=case)
                rows.append(record)
                print(json.dumps(record), flush=True)
                if args.json:
                    with open(args.json, "w") as out:
                        json.dump(rows, out, indent=1)
    print(f"\n{LAYER} N=1, all threads, best and median of up to {args.repeat} calls (ms)\n")
    print("| code | case | best | median | vs fresh | caller's CPUs before -> after | layer | thread masks |")
    print("|---|---|---|---|---|---|---|---|")
    fresh = {}
    for row in rows:
        if "best_ms" not in row:
            print(f"| {row['tree']} | {row['case']} | failed: {row.get('error', '')[-120:]!r} | | | | | |")
            continue
        fresh.setdefault(row["tree"], row["best_ms"])
        before, after = _cpu_ranges(row["affinity_before_call"]), _cpu_ranges(row["affinity_after_call"])
        masks = ", ".join(f"{mask}: {count}" for mask, count in sorted(row["thread_masks"].items()))
        print(f"| {row['tree']} | {row['case']} | {row['best_ms']:.2f} | {row['median_ms']:.2f} | "
              f"{row['best_ms'] / fresh[row['tree']]:.2f}x | {before} -> {after} | {row['threading_layer']} | {masks} |")


def _cpu_ranges(cpus):
    if not cpus:
        return "-"
    ranges, start = [], cpus[0]
    for previous, cpu in zip(cpus, cpus[1:] + [None]):
        if cpu != previous + 1 if cpu is not None else True:
            ranges.append(f"{start}-{previous}" if previous != start else f"{start}")
            start = cpu
    return ",".join(ranges)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=["packing", "after-torch"], default="packing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", default="none", choices=["none", "torch-cpu", "torch-cuda"])
    parser.add_argument("--order", default="torch-first", choices=["torch-first", "sparkle-first"])
    parser.add_argument("--threads", type=int, default=0, help="numba.set_num_threads (0: all)")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per process")
    parser.add_argument("--seconds", type=float, default=4.0, help="stop timing a process after this long")
    parser.add_argument("--runs", type=int, default=20, help="packing: fresh processes per variant")
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a Sparkle checkout")
    parser.add_argument("--old-tree", help="packing: also time the Sparkle checkout at this path")
    parser.add_argument("--env-variant", action="append", default=[],
                        help="after-torch: LABEL=VAR:VALUE, each tree's CUDA cases again with this variable set")
    parser.add_argument("--json", help="write every run's record here")
    args = parser.parse_args()
    if args.worker:
        worker(args)
    elif args.mode == "packing":
        packing(args)
    else:
        after_torch(args)


if __name__ == "__main__":
    main()
