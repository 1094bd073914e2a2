"""sparkle.dask throughput: a ResNet-50 layer over a batch chunked along N, on Dask worker processes, next to
the same calls made directly in one process.

Run from the repository root:

    python benchmarks/dask_throughput.py [--layer res3_3x3] [--batch 64] [--chunk 8] [--workers 1 2]
        [--repeat 5] [--mixed] [--from-client] [--json PATH] [--markdown PATH]

What is measured (float32):

1. Raw: in this process, ``sparkle.conv2d(x, w)`` of the whole batch, and of one chunk (best of ``--repeat``,
   after a warm-up call), through the default scheduler.
2. Dask, per worker count k: a LocalCluster of k worker processes, one task at a time each, the cores split
   between them (``NUMBA_NUM_THREADS`` = cores // k and, for k > 1, ``SPARKLE_BIND_THREADS=0``), a
   ``SparklePlugin`` that compiles the chunk's call at setup. The images are generated on the workers and
   persisted first; then each repetition persists ``sparkle.dask.conv2d`` of them (with weights that differ
   per repetition, so nothing is reused) and waits: images/s over the whole batch, best of ``--repeat``.
   Per-chunk overhead = (wall time x k / chunks) - the raw call on one chunk.
3. ``--mixed`` (the GPU machine): two workers, one with OpenCL hidden (``SPARKLE_OPENCL=0``: CPU only) and one
   with every device. Dask places each chunk where its input lives (the images are persisted first) and moves
   chunks to a faster worker only by work stealing; reported: chunks and devices per worker.
4. ``--from-client`` (every configuration of the run, ``--mixed`` included): the images are not persisted
   first. Each repetition's graph makes them: one task per chunk, with no dependencies, that draws the chunk
   from a seed (numpy's generator seeded with (repetition, chunk index); uniform in [-0.5, 0.5), cheaper to
   draw than normal values), fused with that chunk's conv2d into one task (as when a task reads its images
   from storage). No worker holds an image before the computation, so Dask's scheduler gives each chunk's task
   to whichever worker has a free thread (a faster worker frees its thread sooner and takes more chunks). With
   the drawing and the conv2d as two tasks, the cheap drawings spread evenly and each conv2d followed its
   images: 8 and 8 chunks of 16 on the H100 machine's mixed cluster (2026-12-06). With more
   chunks than twice the cluster's threads, Dask queues these tasks and hands a worker of one thread at most 2
   at a time (``distributed.scheduler.worker-saturation``, 1.1 by default), so the slower worker still takes
   about 2 unless they are stolen from it; more chunks give the placement more room. The weights
   travel as in the other mode (one key per graph). The timed wall time includes drawing the images; the
   drawing alone (the images' tasks persisted, without the conv2d) is timed on the same cluster and reported
   as the input generation time. For this mode, besides the warm-up's first chunk, one chunk computed by each
   worker in the last repetition (the one whose placement is reported) is checked, its images drawn again
   here from the same seed.

Every result is checked against the float64 reference on one chunk (``--from-client``: also on one chunk per
worker). Reported per configuration: the input mode, the chunks each worker computed (last repetition; the
workers named, the mixed cluster's "cpu-only" and "all-devices") and what each worker's scheduler placed on
which device (``worker_devices``), so one can see whether the work went to the faster worker.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

import sparkle
import sparkle.dask
from sparkle.workloads import RESNET50_LAYERS, layer_inputs


def cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def best_seconds(call, repeat):
    call()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def check(result, x, w, kwargs):
    expected = sparkle.reference.conv2d(x, w, **kwargs)
    error = float(np.linalg.norm(result - expected) / np.linalg.norm(expected))
    if not error <= 1e-5:
        sys.exit(f"wrong result: relative L2 error {error:.2e}")
    return error


def chunk_images(seed, index, shape):
    """Chunk ``index`` of the images of repetition ``seed``, drawn from (seed, index): the same array wherever
    it is drawn (a worker, or this process for the check). float32, uniform in [-0.5, 0.5)."""
    images = np.random.default_rng([seed, index]).random(shape, dtype=np.float32)
    images -= np.float32(0.5)
    return images


def images_from_seed(seed, x_shape, chunk):
    """A dask array of the images, chunked along N, each chunk one task with no dependencies
    (``chunk_images``): no worker holds it before it is computed, so the scheduler may run it on any."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    sizes = tuple(min(chunk, x_shape[0] - start) for start in range(0, x_shape[0], chunk))
    name = f"bench-images-{seed}-{tokenize(x_shape, chunk)}"
    trailing = (0,) * (len(x_shape) - 1)
    layer = {(name, index) + trailing: (chunk_images, seed, index, (size,) + tuple(x_shape[1:]))
             for index, size in enumerate(sizes)}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[])
    return da.Array(graph, name, (sizes,) + tuple((size,) for size in x_shape[1:]), dtype=np.float32,
                    meta=np.empty((0,) * len(x_shape), np.float32))


def drawn_in_each_task(output, images):
    """``output`` with each chunk's drawing of ``images`` inlined into the task that convolves it: a chunk's one
    task needs only the weights, which every worker gets, so the scheduler hands it to whichever worker has a
    free thread. (Two tasks per chunk spread evenly: the drawings are cheap everywhere, and each conv2d then
    follows its images.)"""
    import dask.array as da
    from dask.core import flatten
    from dask.optimization import cull, inline

    graph = dict(output.__dask_graph__())
    keys = list(flatten(output.__dask_keys__()))
    drawn = inline(graph, keys=list(flatten(images.__dask_keys__())), inline_constants=False)
    culled, _ = cull(drawn, keys)
    return da.Array(culled, output.name, output.chunks, dtype=output.dtype, meta=output._meta)


def chunks_per_worker(client, persisted):
    """({worker address: chunks it holds}, {address: the first chunk index it holds}) of a persisted array."""
    placed, first = {}, {}
    for key, workers in client.who_has(persisted).items():
        for address in workers:
            placed[address] = placed.get(address, 0) + 1
            index = key[1] if isinstance(key, tuple) else int(str(key).strip("()").split(",")[1])
            first[address] = min(first.get(address, index), index)
    return placed, first


def run_cluster(cluster_factory, layer, batch, chunk, repeat, cores_per_worker, from_client=False):
    """{seconds, median, chunks_per_worker, worker_names, worker_devices[, input_generation_seconds,
    checked_chunks]} of persisting the layer's conv2d (``from_client``: the images made in each graph)."""
    import dask.array as da
    from distributed import Client, wait

    x_shape, w_shape = layer.shapes(batch)
    kwargs = layer.conv_kwargs()
    _, w = layer_inputs(layer, 1)
    with cluster_factory() as cluster, Client(cluster) as client:
        client.register_plugin(sparkle.dask.SparklePlugin(prepare=[("conv2d", (chunk,) + x_shape[1:], w_shape,
                                                                     kwargs)]))
        if not from_client:
            images = da.random.default_rng(0).standard_normal(x_shape, chunks=(chunk,) + x_shape[1:],
                                                              dtype=np.float32).persist()
            wait(images)
        times, placed, extra = [], {}, {}
        for repetition in range(repeat + 1):
            if from_client:  # a new seed, so new keys: nothing of an earlier repetition is reused
                images = images_from_seed(repetition, x_shape, chunk)
            weights = (w * np.float32(1 + repetition)).astype(np.float32)
            output = sparkle.dask.conv2d(images, weights, **kwargs)
            if from_client:
                output = drawn_in_each_task(output, images)
            start = time.perf_counter()
            persisted = output.persist()
            wait(persisted)
            seconds = time.perf_counter() - start
            if repetition == 0:  # warm-up; its first chunk is checked
                check(persisted.blocks[0].compute(), images.blocks[0].compute(), weights, kwargs)
            else:
                times.append(seconds)
            if repetition == repeat:  # where the last repetition's chunks were computed
                placed, first = chunks_per_worker(client, persisted)
                if from_client:  # one chunk computed by each worker, its images drawn again here
                    extra["checked_chunks"] = {}
                    for address, index in sorted(first.items()):
                        size = min(chunk, batch - index * chunk)
                        expected_x = chunk_images(repetition, index, (size,) + tuple(x_shape[1:]))
                        error = check(persisted.blocks[index].compute(), expected_x, weights, kwargs)
                        extra["checked_chunks"][address] = {"chunk": index, "relative_error": error}
            del persisted
        if from_client:  # drawing the images alone, on the same cluster (seeds not used above)
            generation = []
            for repetition in range(repeat):
                images = images_from_seed(repeat + 1 + repetition, x_shape, chunk)
                start = time.perf_counter()
                drawn = images.persist()
                wait(drawn)
                generation.append(time.perf_counter() - start)
                del drawn
            extra["input_generation_seconds"] = min(generation)
        names = {address: str(info.get("name", address))
                 for address, info in client.scheduler_info()["workers"].items()}
        report = sparkle.dask.worker_devices(client)
    return {"seconds": min(times), "median": statistics.median(times), "chunks_per_worker": placed,
            "worker_names": names, "worker_devices": report, **extra}


def local_cluster_factory(workers, cores):
    from distributed import LocalCluster

    per_worker = max(1, cores // workers)
    env = {"NUMBA_NUM_THREADS": str(per_worker), "OPENBLAS_NUM_THREADS": "1"}
    if workers > 1:
        env["SPARKLE_BIND_THREADS"] = "0"
    return lambda: LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                                env=env, silence_logs=40)


def mixed_cluster_factory(cores):
    """A CPU-only worker (OpenCL hidden) and a worker with every device, each with half the cores."""
    from distributed import Nanny, Scheduler, SpecCluster

    half = str(max(1, cores // 2))
    common = {"NUMBA_NUM_THREADS": half, "SPARKLE_BIND_THREADS": "0", "OPENBLAS_NUM_THREADS": "1"}
    workers = {"cpu-only": {"cls": Nanny, "options": {"nthreads": 1, "env": {**common, "SPARKLE_OPENCL": "0"}}},
               "all-devices": {"cls": Nanny, "options": {"nthreads": 1, "env": common}}}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    return lambda: SpecCluster(workers=workers, scheduler=scheduler, silence_logs=40)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="res3_3x3", choices=[layer.name for layer in RESNET50_LAYERS])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                        help="worker counts of the LocalCluster runs (none: only --mixed)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--mixed", action="store_true", help="a CPU-only worker beside one with every device")
    parser.add_argument("--from-client", action="store_true",
                        help="images not persisted on the workers first: each graph draws every chunk in a task "
                             "of its own from a seed, so Dask may run each chunk on whichever worker is free "
                             "(timed with the drawing; the drawing alone is reported too)")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    layer = next(layer for layer in RESNET50_LAYERS if layer.name == args.layer)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    kwargs = layer.conv_kwargs()
    input_mode = "from-client" if args.from_client else "persisted"
    x, w = layer_inputs(layer, args.batch)
    chunk_x = x[:args.chunk].copy()
    check(sparkle.conv2d(chunk_x, w, **kwargs), chunk_x, w, kwargs)
    whole_best, whole_median = best_seconds(lambda: sparkle.conv2d(x, w, **kwargs), args.repeat)
    chunk_best, chunk_median = best_seconds(lambda: sparkle.conv2d(chunk_x, w, **kwargs), args.repeat)
    chunks = -(-args.batch // args.chunk)
    pieces = [x[start:start + args.chunk].copy() for start in range(0, args.batch, args.chunk)]
    # Chunk by chunk, every output kept (as Dask keeps them): each output lands in fresh memory.
    kept_best, kept_median = best_seconds(lambda: [sparkle.conv2d(piece, w, **kwargs) for piece in pieces],
                                          args.repeat)
    report = {"machine": {"cpu": cpu_model(), "cores": cores, "python": platform.python_version(),
                          "date": time.strftime("%Y-%m-%d %H:%M"), "devices": [d.id for d in sparkle.devices()]},
              "layer": layer.name, "batch": args.batch, "chunk": args.chunk, "chunks": chunks,
              "raw": {"whole_batch_seconds": whole_best, "whole_batch_median": whole_median,
                      "chunk_seconds": chunk_best, "chunk_median": chunk_median,
                      "chunks_kept_seconds": kept_best, "chunks_kept_median": kept_median},
              "inputs": input_mode, "dask": []}
    print(f"{layer.name} N={args.batch} in chunks of {args.chunk}, {cores} cores ({cpu_model()})")
    print(f"raw, this process: whole batch {whole_best * 1e3:.1f} ms ({args.batch / whole_best:.0f} images/s), "
          f"one chunk {chunk_best * 1e3:.2f} ms; chunk by chunk, outputs kept: {kept_best * 1e3:.1f} ms")
    configurations = [(f"{k} worker{'s' if k > 1 else ''}", local_cluster_factory(k, cores), k)
                      for k in args.workers]
    if args.mixed:
        configurations.append(("CPU-only worker + all-devices worker", mixed_cluster_factory(cores), 2))
    if not configurations:
        parser.error("nothing to run: give --workers counts, or --mixed")
    print(f"inputs: {INPUT_MODES[input_mode]}")
    for label, factory, workers in configurations:
        result = run_cluster(factory, layer, args.batch, args.chunk, args.repeat, max(1, cores // workers),
                             from_client=args.from_client)
        best, median, placed = result["seconds"], result["median"], result["chunks_per_worker"]
        per_chunk = best * workers / chunks - chunk_best
        row = {"configuration": label, "inputs": input_mode, "workers": workers, "seconds": best, "median": median,
               "images_per_second": args.batch / best, "overhead_per_chunk_seconds": per_chunk,
               "chunks_per_worker": placed, "worker_names": result["worker_names"],
               "worker_devices": result["worker_devices"]}
        for key in ("input_generation_seconds", "checked_chunks"):
            if key in result:
                row[key] = result[key]
        report["dask"].append(row)
        print(f"{label}: {best * 1e3:.1f} ms ({args.batch / best:.0f} images/s, {whole_best / best:.2f}x the raw "
              f"batch), overhead per chunk {per_chunk * 1e3:+.2f} ms; chunks per worker {placed}")
        print(f"    chunks per worker, by name: {named_counts(row)}; devices used (calls per device): "
              + "; ".join(f"{result['worker_names'].get(address, address)}: {info.get('calls')}"
                          for address, info in result["worker_devices"].items()))
        if "input_generation_seconds" in row:
            checked = ", ".join(f"{result['worker_names'].get(address, address)} chunk {item['chunk']} "
                                f"(error {item['relative_error']:.1e})"
                                for address, item in row["checked_chunks"].items())
            print(f"    drawing the images alone: {row['input_generation_seconds'] * 1e3:.1f} ms; checked: "
                  f"{checked}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w") as out:
            out.write(markdown(report))
    return report


INPUT_MODES = {"persisted": "persisted on the workers before the timed computations",
               "from-client": "drawn from a seed inside each computation's graph (--from-client)"}


def named_counts(row):
    """'name (port): chunks, ...' of a row: which worker computed how many chunks."""
    names = row.get("worker_names", {})
    return ", ".join(f"{names.get(address, '?')} ({address.rsplit(':', 1)[-1]}): {count}"
                     for address, count in sorted(row["chunks_per_worker"].items()))


def markdown(report):
    raw = report["raw"]
    inputs = report.get("inputs", "persisted")
    lines = [f"# sparkle.dask throughput: {report['layer']}, N={report['batch']}, chunks of {report['chunk']}", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores; devices "
             f"{report['machine']['devices']}; {report['machine']['date']}.", "",
             f"Images {INPUT_MODES[inputs]}.", "",
             "| configuration | ms (best) | ms (median) | images/s | vs raw batch | overhead per chunk (ms) |"
             " chunks per worker |", "|---|---|---|---|---|---|---|",
             f"| raw call, this process (whole batch) | {raw['whole_batch_seconds'] * 1e3:.1f} | "
             f"{raw['whole_batch_median'] * 1e3:.1f} | {report['batch'] / raw['whole_batch_seconds']:.0f} | 1.00 | - | - |",
             f"| raw call, one chunk | {raw['chunk_seconds'] * 1e3:.2f} | {raw['chunk_median'] * 1e3:.2f} | "
             f"{report['chunk'] / raw['chunk_seconds']:.0f} | - | - | - |",
             f"| raw calls chunk by chunk, outputs kept | {raw['chunks_kept_seconds'] * 1e3:.1f} | "
             f"{raw['chunks_kept_median'] * 1e3:.1f} | {report['batch'] / raw['chunks_kept_seconds']:.0f} | "
             f"{raw['whole_batch_seconds'] / raw['chunks_kept_seconds']:.2f} | - | - |"]
    for row in report["dask"]:
        label = row["configuration"] + (", inputs from the graph" if row.get("inputs") == "from-client" else "")
        lines.append(f"| {label} | {row['seconds'] * 1e3:.1f} | {row['median'] * 1e3:.1f} | "
                     f"{row['images_per_second']:.0f} | {raw['whole_batch_seconds'] / row['seconds']:.2f} | "
                     f"{row['overhead_per_chunk_seconds'] * 1e3:+.2f} | {named_counts(row)} |")
    details = []
    for row in report["dask"]:
        names = row.get("worker_names", {})
        devices = "; ".join(f"{names.get(address, address)}: {info.get('calls')}"
                            for address, info in sorted(row.get("worker_devices", {}).items()))
        line = f"- {row['configuration']}: calls per device on each worker: {devices}"
        if "input_generation_seconds" in row:
            checked = ", ".join(f"{names.get(address, address)} chunk {item['chunk']} "
                                f"({item['relative_error']:.1e})" for address, item in row["checked_chunks"].items())
            line += (f"; drawing the images alone {row['input_generation_seconds'] * 1e3:.1f} ms; checked against "
                     f"the float64 reference: {checked}")
        details.append(line)
    return "\n".join(lines + [""] + details) + "\n"


if __name__ == "__main__":
    main()
