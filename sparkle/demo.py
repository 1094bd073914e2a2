"""The ResNet-50 layer suite through ``sparkle.conv2d``, checked against the float64 reference.

Run ``python -m sparkle.demo [--device cpu|opencl|opencl:N|auto] [--batch N] [--dtype float32|float64] [--repeat R]``.
Prints time, GFLOPS and error per layer; exits with status 1 if any layer's relative
L2 error against ``sparkle.reference.conv2d`` exceeds the tolerance of its dtype.
With ``--device auto`` the scheduler (``sparkle.default_scheduler()``) places each call; the table says
which device ran each layer (from the scheduler's history) and why it goes there (``explain``).

"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings

import numba
import numpy as np

from . import reference
from .devices import (
    available_opencl_ids,
    devices,
    no_opencl_device_reason,
    opencl_device_ids,
    resolve_device,
)
from .opencl.backend import OpenCLFallbackWarning
from .ops import conv2d
from .scheduler import default_scheduler
from .timing import interleaved_best, timed
from .workloads import RESNET50_LAYERS, layer_flops, layer_inputs

# Largest accepted relative L2 error of a result against the float64 reference.
TOLERANCES = {"float32": 1e-5, "float64": 1e-12}


def errors(result, expected):
    """(max abs error, relative L2 error) of ``result`` against a float64 ``expected``."""
    difference = result.astype(np.float64) - expected
    norm = np.linalg.norm(expected)
    max_abs = float(np.max(np.abs(difference))) if difference.size else 0.0
    rel_l2 = float(np.linalg.norm(difference) / norm) if norm else float(np.linalg.norm(difference))
    return max_abs, rel_l2


def shape_text(shape):
    return "x".join(str(size) for size in shape)


def _recording_fallbacks(call, causes):
    """``call`` made to append the cause of every OpenCL fallback it meets to ``causes`` (and not warn)."""
    def recorded():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OpenCLFallbackWarning)
            result = call()
        causes.extend(str(w.message) for w in caught if issubclass(w.category, OpenCLFallbackWarning))
        return result

    return recorded


def run_suite(batch, dtype, repeat, device="cpu"):
    """Time every layer, then check every result; one report row per layer.

    A row's "fallbacks" lists the causes of the calls that ran on the Numba CPU backend instead of the
    OpenCL device asked for (its time or its result then is the CPU backend's). With ``device="auto"``
    ``default_scheduler()`` places the calls, and a row also has "ran_on" ({device id: calls}, from the
    scheduler's history) and "decision" (the scheduler's explanation of where the layer runs now).
    """
    scheduler = default_scheduler() if device == "auto" else None
    first_record = len(scheduler.history()) if scheduler else 0
    rows, calls, checks, inputs = [], {}, [], []
    for layer in RESNET50_LAYERS:
        x, w = layer_inputs(layer, batch, dtype)
        kwargs = layer.conv_kwargs()
        inputs.append((x, w, kwargs))
        fallbacks = []
        calls[layer.name] = _recording_fallbacks(functools.partial(conv2d, x, w, device=device, **kwargs), fallbacks)
        first_s, result = timed(calls[layer.name])  # the first call compiles
        rows.append({"layer": layer.name, "x": x.shape, "w": w.shape, "first_s": first_s, "fallbacks": fallbacks})
        checks.append((result, functools.partial(reference.conv2d, x, w, **kwargs), layer_flops(layer, x, w)))
    best = interleaved_best(calls, repeat)
    if scheduler:  # read after the timings, so that reading the history is never timed
        records = scheduler.history()[first_record:]
        for row, (x, w, kwargs) in zip(rows, inputs):
            row["decision"] = scheduler.explain("conv2d", x, w, **kwargs)
            row["ran_on"] = _devices_that_ran(records, row["decision"].shape)
    # Checks come after all timings: numpy's BLAS threads, which they use, keep spinning
    # for a while afterwards and would slow the timings that follow.
    for row, (result, expected, flops) in zip(rows, checks):
        row["seconds"] = best[row["layer"]]
        row["gflops"] = flops / row["seconds"] / 1e9
        row["max_abs"], row["rel_l2"] = errors(result, expected())
    return rows


def _devices_that_ran(records, shape):
    """{device id: calls} of the scheduler's history records of one call shape (a split call adds a record
    per part, its shape followed by " part ...")."""
    ran_on = {}
    for record in records:
        if record["shape"] == shape or record["shape"].startswith(f"{shape} part "):
            ran_on[record["device"]] = ran_on.get(record["device"], 0) + record["calls"]
    return ran_on


def ran_on_text(ran_on):
    """"cpu" when every call ran there, else each device with its count of calls, most calls first."""
    if len(ran_on) == 1:
        return next(iter(ran_on))
    return ", ".join(f"{device} x{count}" for device, count in sorted(ran_on.items(), key=lambda item: -item[1]))


def print_table(rows, tolerance, device_id="cpu"):
    """The per-layer table; an OpenCL or auto run gets a "ran on" column (the device, cpu where an OpenCL
    call fell back, or the devices the scheduler ran the layer's calls on)."""
    ran_on = device_id != "cpu"
    header = f"{'layer':<12} {'x (NCHW)':<15} {'w (KCRS)':<14} {'ms':>8} {'GFLOPS':>7} {'max abs err':>11} " \
             f"{'rel L2 err':>10}  ok" + ("   ran on" if ran_on else "")
    print(header)
    print("-" * len(header))
    for row in rows:
        ok = "yes" if row["rel_l2"] <= tolerance else "NO "
        if "ran_on" in row:
            where = f"   {ran_on_text(row['ran_on'])}"
        else:
            where = f"   {'cpu (fallback)' if row['fallbacks'] else device_id}" if ran_on else ""
        print(f"{row['layer']:<12} {shape_text(row['x']):<15} {shape_text(row['w']):<14} "
              f"{row['seconds'] * 1e3:8.2f} {row['gflops']:7.1f} {row['max_abs']:11.2e} {row['rel_l2']:10.2e}  "
              f"{ok}{where}".rstrip())


def where_it_ran(device, rows):
    """The "Device:" line's description of where the suite ran, saying so when OpenCL calls fell back."""
    fell_back = [row for row in rows if row["fallbacks"]]
    opencl = f"{device.id} {device.name} (OpenCL, {device.compute_units} compute units)"
    if not fell_back:
        return opencl
    cause = fell_back[0]["fallbacks"][0]
    if len(fell_back) == len(rows):
        return f"the Numba CPU backend: every layer asked of {opencl} fell back ({cause})"
    return (f"{opencl}, except that {len(fell_back)} of {len(rows)} layers (ran on: cpu) fell back to the Numba "
            f"CPU backend ({cause})")


def _device(parser, device):
    """The id of the device to run on: "auto", "cpu", "opencl" or an available "opencl:N"; a usage error
    listing only those otherwise (the demo refuses "reference": it times a device)."""
    opencl_ids = available_opencl_ids()
    accepted = ["auto", "cpu", *(["opencl", *opencl_ids] if opencl_ids else [])]
    if device == "auto":
        return device
    # "opencl" and listed but unavailable devices go on to resolve_device, which says why they are unavailable.
    if device not in (*accepted, "opencl", *opencl_device_ids()):
        none = "" if opencl_ids else f"; no OpenCL device is available: {no_opencl_device_reason()}"
        parser.error(f"argument --device: must be one of {accepted}, got {device!r}{none}")
    try:
        target = resolve_device(device)
    except ValueError as error:
        parser.error(f"argument --device: {error}")
    return target if isinstance(target, str) else target.id


def parse_args(argv):
    # The docstring's first line, without its reST markup: --help prints it as it is.
    parser = argparse.ArgumentParser(prog="python -m sparkle.demo",
                                     description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--device", default="cpu",
                        help="where to run: cpu (default), opencl (first available GPU, else PoCL), opencl:N, or "
                             "auto (the scheduler picks a device per call and the table says which ran each "
                             "layer); OpenCL timings include copying the arrays to the device and back")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--dtype", choices=sorted(TOLERANCES), default="float32")
    parser.add_argument("--repeat", type=int, default=10,
                        help="timed rounds over all layers after the warm-up call (best kept, default 10)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeat < 1:
        parser.error("--batch and --repeat must be at least 1")
    args.device_id = _device(parser, args.device)
    return args


def main(argv=None):
    args = parse_args(argv)
    dtype, tolerance = np.dtype(args.dtype), TOLERANCES[args.dtype]
    print("Note: the first sparkle.conv2d call compiles the kernels (Numba JIT or the OpenCL build; later runs "
          "load them from the on-disk cache), so it is timed separately.")
    rows = run_suite(args.batch, dtype, args.repeat, args.device_id)
    if args.device_id == "auto":
        where = f"auto, placed by sparkle.default_scheduler() on {', '.join(default_scheduler().devices)}"
    elif args.device_id == "cpu":
        device = next(d for d in devices() if d.id == "cpu")
        threads = numba.get_num_threads()  # also starts Numba's thread pool, so the layer name is known
        where = f"{device.name}, {threads} threads ({numba.threading_layer()})"
    else:  # said after the run: only then is it known whether calls fell back to the CPU backend
        device = next(d for d in devices() if d.id == args.device_id)
        where = where_it_ran(device, rows)
    print(f"Device: {where}; ResNet-50 layers, "
          f"N={args.batch}, {dtype}; best of {args.repeat} rounds after a warm-up call; "
          f"checked against the float64 reference (rel L2 <= {tolerance:g}).")
    print(f"First call ({rows[0]['layer']}, compile or cache load + run): {rows[0]['first_s'] * 1e3:.0f} ms; "
          f"first calls of all layers: {sum(row['first_s'] for row in rows) * 1e3:.0f} ms\n")
    print_table(rows, tolerance, args.device_id)
    total_s = sum(row["seconds"] for row in rows)
    total_flops = sum(row["gflops"] * row["seconds"] for row in rows)
    print(f"\nAll layers: {total_s * 1e3:.1f} ms, {total_flops / total_s:.1f} GFLOPS")
    if args.device_id == "auto":
        print("\nWhere the scheduler places each layer now, and why (sparkle explain shows the full breakdown):")
        for row in rows:
            print(f"  {row['layer']:<12} -> {row['decision'].choice()}: {row['decision'].reason}")
    failed = [row["layer"] for row in rows if not row["rel_l2"] <= tolerance]  # `not <=` also catches NaN
    if failed:
        print(f"FAILED: relative L2 error above {tolerance:g} on {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"All {len(rows)} layers match the float64 reference (rel L2 <= {tolerance:g}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
