"""Issue 12's throughput table on whatever GPUs this machine has: ResNet-50 layers at large batches, images per
second on each single GPU (numpy in and out, and operands already on the device), and through a scheduler that may
split the batch across every GPU and the CPU (numpy in and out), with the split it chose and its cost.

On a one-GPU machine this gives the single-GPU baseline the two-GPU figures are measured against, and what the
scheduler does with one GPU and the CPU. Every result is checked against the float64 reference on a sample of
images before anything is timed.

    python benchmarks/gpu_throughput.py [--batch 64 256] [--layers res2_3x3 ...] [--repeat 5] [--json PATH]
"""

import argparse
import json
import sys
import time

import numpy as np

import sparkle
from sparkle import reference
from sparkle.devices import devices
from sparkle.scheduler import Scheduler
from sparkle.workloads import RESNET50_LAYERS, layer_inputs

TOLERANCE = 1e-5  # relative L2, float32, as every other check
CHECKED_IMAGES = 2


def relative_l2(got, exact):
    exact = np.asarray(exact, np.float64)
    return float(np.sqrt(np.square(np.asarray(got, np.float64) - exact).sum() / max(np.square(exact).sum(), 1e-300)))


def check(result, x, w, kwargs, where):
    """The first images of ``result`` against the float64 reference (raises on a wrong result)."""
    host = result.get() if hasattr(result, "get") else result
    error = relative_l2(host[:CHECKED_IMAGES], reference.conv2d(x[:CHECKED_IMAGES], w, **kwargs))
    if not error <= TOLERANCE:
        raise AssertionError(f"{where}: relative L2 error {error:.3g} > {TOLERANCE:g}")


def best_seconds(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        if hasattr(result, "get"):  # a device array: its kernel has run once the copy back returns
            result.get()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--layers", nargs="+", default=["res2_3x3", "res3_3x3", "res4_3x3", "res5_3x3", "res2_1x1"])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    layers = {layer.name: layer for layer in RESNET50_LAYERS}
    unknown = [name for name in args.layers if name not in layers]
    if unknown:
        parser.error(f"unknown layers {unknown}; choose from {sorted(layers)}")
    gpus = [d.id for d in devices() if d.kind == "gpu"] or [d.id for d in devices() if d.id.startswith("opencl")][:1]
    if not gpus:
        sys.exit("no OpenCL device")
    scheduler = Scheduler(["cpu", *gpus], progress=False)
    rows = []
    print(f"GPUs: {gpus}; images per second (best of {args.repeat}); 'auto' may split across {['cpu', *gpus]}")
    print("| layer | N | " + " | ".join(f"{g} numpy | {g} resident" for g in gpus) + " | auto numpy | auto's choice |")
    print("|---|---|" + "---|---|" * len(gpus) + "---|---|")
    for batch in args.batch:
        for name in args.layers:
            layer = layers[name]
            x, w = layer_inputs(layer, batch)
            kwargs = layer.conv_kwargs()
            row = {"layer": name, "batch": batch}
            cells = []
            for gpu in gpus:
                check(sparkle.conv2d(x, w, device=gpu, **kwargs), x, w, kwargs, f"{gpu} numpy")
                best, _ = best_seconds(lambda: sparkle.conv2d(x, w, device=gpu, **kwargs), args.repeat)
                x_dev, w_dev = sparkle.to_device(x, gpu), sparkle.to_device(w, gpu)
                check(sparkle.conv2d(x_dev, w_dev, **kwargs), x, w, kwargs, f"{gpu} resident")
                resident, _ = best_seconds(lambda: sparkle.conv2d(x_dev, w_dev, **kwargs), args.repeat)
                del x_dev, w_dev
                row[gpu] = {"numpy_seconds": best, "resident_seconds": resident}
                cells += [f"{batch / best:,.0f}", f"{batch / resident:,.0f}"]
            for _ in range(3):  # the scheduler learns the layer (and may build or split) before it is timed
                check(scheduler.conv2d(x, w, **kwargs), x, w, kwargs, "auto")
            auto, _ = best_seconds(lambda: scheduler.conv2d(x, w, **kwargs), args.repeat)
            decision = scheduler.explain("conv2d", x, w, **kwargs)
            choice = (" + ".join(f"{device} {share:.0%}" for device, share in decision.split) if decision.split
                      else decision.device)
            row["auto"] = {"seconds": auto, "choice": choice, "predicted_seconds": decision.predicted_seconds}
            rows.append(row)
            print(f"| {name} | {batch} | " + " | ".join(cells) + f" | {batch / auto:,.0f} | {choice} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"gpus": gpus, "repeat": args.repeat, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
