"""Issue 12's throughput table on whatever GPUs this machine has: ResNet-50 layers at large batches, images per
second on each single GPU (numpy in and out, and operands and result on the device), and through a scheduler that may
split the batch across every GPU and the CPU (numpy in and out), with the split it chose and its cost.

On a one-GPU machine this gives the single-GPU baseline the two-GPU figures are measured against, and what the
scheduler does with one GPU and the CPU. Every result is checked against the float64 reference on a sample of
images before anything is timed.

    python benchmarks/gpu_throughput.py [--batch 64 256] [--layers res2_3x3 ...] [--repeat 5] [--json PATH]
"""

import argparse
import json
import os
import sys
import time

import numpy as np

import sparkle
from sparkle.devices import devices
from sparkle.scheduler import Scheduler
from sparkle.workloads import RESNET50_LAYERS, layer_inputs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the package
from benchmarks import check_conv2d  # noqa: E402


def check(result, x, w, kwargs, where):
    """AssertionError unless ``result`` (numpy or a DeviceArray) is the conv2d, on a sample of its outputs."""
    check_conv2d(result.get() if hasattr(result, "get") else result, x, w, kwargs, where)


def best_seconds(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        if hasattr(result, "wait"):  # a device array, returned once its kernel was queued: it stays there
            result.wait()
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
