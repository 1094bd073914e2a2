"""How well ``sparkle.Scheduler`` places calls: regret against a per-shape oracle on a mixed workload,
prediction error on shapes it never ran, and where it moves from the CPU to another device.

Run from the repository root:

    python benchmarks/scheduler_quality.py [--quick] [--device-ids cpu opencl:0] [--passes 5] [--repeat 3]
        [--json PATH] [--markdown PATH] [--plots DIR] [--seed 0]
    python benchmarks/scheduler_quality.py --from-json PATH [--markdown PATH] [--plots DIR] [--plot-prefix NAME]

On a GPU machine without a package index (matplotlib absent): ``source .gpu/setup.sh`` first (see
shared/gpu/README.md), pick the devices with ``--device-ids cpu opencl:0`` (``sparkle devices`` lists them;
leave PoCL out unless it is to be measured: it is slow), save ``--json``, and make the plots elsewhere with
``--from-json``.

What is measured (float32 and a few float64 calls, numpy inputs, so every OpenCL call copies its data):

1. Oracle. Each shape runs on each device alone, through ``Scheduler([device_id])`` (the same call path and
   overhead as auto): one warm-up call (compiles, checked), then the best of ``--repeat`` calls or more, the
   devices taking turns call by call (a call under 50 ms after an untimed one: see measure_case). The oracle's
   device for a shape is the one with the best time; the oracle's total is the sum of those best times. All in
   this process, before the passes, so kernels are compiled and cached before auto's first call: the passes
   measure placement, not compilation.
2. Mixed workload. One fresh ``Scheduler(device_ids, persist=False)`` (nothing loaded from disk: it learns from
   scratch; its profiling is timed separately) runs every shape once per pass, in a new random order each
   pass. Right before or after each auto call (in random order) the same shape runs once on the oracle's device
   and once on the best single device, through their own schedulers: the "paired" totals, measured under the
   same machine conditions as auto's calls. Regret = auto's total / the oracle's total, both paired and against
   the best-of figures of step 1 (single calls against a best-of: that ratio counts noise against auto).
3. Unseen shapes. After the passes, ``explain`` predicts shapes never run; then they are measured (median of
   ``--repeat`` warm calls per device) and run once through auto. Prediction error = |predicted - measured| /
   measured for the device auto chose (its compile time excluded: the measured calls are warm).
4. Crossover. matmul n x n x n and one ResNet-50 layer over a batch sweep: each device's best time, and auto's
   choice before the first call (``explain``) and after three calls.

Every result (oracle, paired, auto, unseen, sweep) is checked against ``sparkle.reference`` in float64: the full
output where the reference is cheap, otherwise whole images or rows at both ends and two random ones plus
2048 random output points; an incorrect result stops the run with exit status 1.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

if __name__ == "__main__":
    # One BLAS thread for numpy: its only BLAS calls here are the checks' norms, and OpenBLAS's threads
    # spin-wait after each call on every core, so a CPU-backend call that follows waits a scheduler tick
    # (4 ms) for a core its worker is bound to: 2-core VM, in 35-50 % of the calls (the 16-core GPU host:
    # single calls 10x their best). Set before numpy loads; an explicit setting is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np

import sparkle
from sparkle import api, reference, signature

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: the package
from benchmarks import relative_error  # noqa: E402
from sparkle.device_array import to_host
from sparkle.workloads import RESNET50_LAYERS

TOLERANCES = {"float32": 1e-5, "float64": 1e-12}  # relative L2 error against the float64 reference
FULL_REFERENCE_FLOPS = 1e9  # above this, check slices and sampled points: the full reference takes seconds
SAMPLED_POINTS = 2048
TARGET_REGRET = 1.10
TARGET_PREDICTION_ERROR = 0.25
SLOW_CALL_SECONDS = 2.0  # a device this slow on a shape is timed once after its warm-up call
MIN_TIMED_SECONDS = 0.05
LEAD_IN_BELOW_SECONDS = 0.05
SWEEP_AUTO_CALLS = 3
SWEEP_SLOW_SECONDS = 5.0
RESNET = {layer.name: layer for layer in RESNET50_LAYERS}


class IncorrectResult(AssertionError):
    """A result differs from the float64 reference by more than its dtype's tolerance."""


# --- workloads --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One call signature: operands, keyword arguments and the float64 check of its results."""

    name: str
    op: str  # "conv2d" or "matmul"
    args: tuple
    kwargs: dict = field(default_factory=dict)
    _expected: tuple | None = None

    def __post_init__(self):
        spec_of = api.conv2d_spec if self.op == "conv2d" else api.matmul_spec
        self.spec = spec_of(*self.args, **self.kwargs)
        self.flops = self.spec.flops
        self.dtype = self.spec.dtype.name

    def run(self, target):
        """The call through ``target`` (a Scheduler)."""
        return getattr(target, self.op)(*self.args, **self.kwargs)

    def explain(self, scheduler):
        return scheduler.explain(self.op, *self.args, **self.kwargs)

    def _reference(self, leading):
        """float64 reference for the images (conv2d) or rows (matmul) ``leading`` of the first operand."""
        first, *rest = self.args
        operands = (first[leading], *rest)
        if self.op == "conv2d":
            return reference.conv2d(*operands, **self.kwargs)
        return reference.matmul(*operands)

    def _reference_at(self, points):
        if self.op == "conv2d":
            return reference.conv2d_at(*self.args, points=points, **self.kwargs)
        return reference.matmul_at(*self.args, points=points)

    def expected(self):
        """(leading indices, reference there, sampled points or None, reference at the points); computed once."""
        if self._expected is None:
            lead = self.args[0].shape[0]
            if self.flops <= FULL_REFERENCE_FLOPS or lead <= 4:
                self._expected = (slice(None), self._reference(slice(None)), None, None)
            else:
                rng = np.random.default_rng(lead)
                leading = sorted({0, lead - 1, *(int(i) for i in rng.choice(np.arange(1, lead - 1), 2, replace=False))})
                shape = (self.spec.m, self.spec.n) if self.op == "matmul" else self.spec.output_shape
                points = np.stack([rng.integers(0, size, SAMPLED_POINTS) for size in shape], axis=1)
                self._expected = (leading, self._reference(leading), points, self._reference_at(points))
        return self._expected

    def check(self, result, where):
        """Raise IncorrectResult if ``result`` (from ``where``) is off the float64 reference."""
        result = np.asarray(to_host(result))
        leading, expected, points, at_points = self.expected()
        tolerance = TOLERANCES[self.dtype]
        parts = [(result[leading], expected)]
        if points is not None:
            parts.append((result[tuple(points.T)], at_points))
        for got, exact in parts:
            error = relative_error(got, exact)
            if not error <= tolerance:  # `not <=` also catches NaN
                raise IncorrectResult(f"{self.name} on {where}: relative L2 error {error:.3g} > {tolerance:g}")


def conv_case(name, rng, x_shape, w_shape, bias=False, dtype=np.float32, **kwargs):
    x = rng.standard_normal(x_shape).astype(dtype)
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    w = (rng.standard_normal(w_shape) / math.sqrt(fan_in)).astype(dtype)  # as in a trained net
    args = (x, w, rng.standard_normal(w_shape[0]).astype(dtype)) if bias else (x, w)
    return Case(name, "conv2d", args, kwargs)


def resnet_case(layer_name, batch, rng):
    layer = RESNET[layer_name]
    x_shape, w_shape = layer.shapes(batch)
    return conv_case(f"{layer_name} N={batch}", rng, x_shape, w_shape, **layer.conv_kwargs())


def matmul_case(m, k, n, rng, dtype=np.float32, name=None):
    a = rng.standard_normal((m, k)).astype(dtype)
    b = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(dtype)
    label = f"matmul {m}x{k}x{n}" + ("" if dtype == np.float32 else f" {np.dtype(dtype).name}")
    return Case(name or label, "matmul", (a, b))


def mixed_workload(quick, rng):
    """At least 40 shapes from a 3x3 convolution on 8x8 to ResNet-50 layers at N=32 (fewer with ``quick``)."""
    f64 = np.float64
    convs = [
        ("3x3 on 8x8, 4 ch", (1, 4, 8, 8), (4, 4, 3, 3), {"padding": 1}),
        ("3x3 on 8x8, 16 ch", (1, 16, 8, 8), (16, 16, 3, 3), {"padding": 1}),
        ("3x3 16x16 bias relu", (1, 16, 16, 16), (32, 16, 3, 3), {"padding": 1, "bias": True, "activation": "relu"}),
        ("1x1 16x16", (1, 32, 16, 16), (64, 32, 1, 1), {}),
        ("3x3/2 stem 32x32", (1, 3, 32, 32), (16, 3, 3, 3), {"stride": 2, "padding": 1}),
        ("depthwise 3x3 32x32", (1, 32, 32, 32), (32, 1, 3, 3), {"padding": 1, "groups": 32}),
        ("depthwise 3x3/2 56x56", (1, 64, 56, 56), (64, 1, 3, 3), {"stride": 2, "padding": 1, "groups": 64}),
        ("grouped 3x3 g4 28x28", (1, 64, 28, 28), (64, 16, 3, 3), {"padding": 1, "groups": 4}),
        ("dilated 3x3 d2 28x28", (1, 32, 28, 28), (32, 32, 3, 3), {"padding": 2, "dilation": 2}),
        ("5x5 24x24", (1, 16, 24, 24), (32, 16, 5, 5), {"padding": 2}),
        ("1x7 17x17", (1, 64, 17, 17), (64, 64, 1, 7), {"padding": (0, 3)}),
        ("3x3 14x14 N=4", (4, 64, 14, 14), (64, 64, 3, 3), {"padding": 1}),
        ("1x1 7x7 N=8", (8, 512, 7, 7), (128, 512, 1, 1), {}),
        ("3x3 56x56 N=8 bias relu", (8, 32, 56, 56), (32, 32, 3, 3),
         {"padding": 1, "bias": True, "activation": "relu"}),
        ("3x3 64x64 N=2 float64", (2, 16, 64, 64), (16, 16, 3, 3), {"padding": 1, "dtype": f64}),
        ("1x1 28x28 float64", (1, 64, 28, 28), (64, 64, 1, 1), {"dtype": f64}),
    ]
    matmuls = [(8, 8, 8), (16, 16, 16), (32, 32, 32), (64, 64, 64), (128, 128, 128), (256, 256, 256),
               (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048), (1, 1024, 1024), (4096, 64, 64),
               (64, 4096, 64), (3136, 64, 256), (256, 2304, 196), (32, 2048, 1000), (100, 300, 200)]
    big_batch = 32
    if quick:
        convs = convs[::2]
        matmuls = [size for size in matmuls if max(size) <= 1024][::2]
        big_batch = 4
    cases = []
    for name, x_shape, w_shape, kwargs in convs:
        kwargs = dict(kwargs)
        bias, dtype = kwargs.pop("bias", False), kwargs.pop("dtype", np.float32)
        cases.append(conv_case(name, rng, x_shape, w_shape, bias=bias, dtype=dtype, **kwargs))
    layers = [layer.name for layer in RESNET50_LAYERS]
    for batch in (1, big_batch):
        cases += [resnet_case(name, batch, rng) for name in (layers[::2] if quick else layers)]
    cases += [matmul_case(m, k, n, rng) for m, k, n in matmuls]
    cases.append(matmul_case(256, 256, 256, rng, dtype=f64))
    return cases


def unseen_workload(quick, rng):
    """Shapes the mixed workload never ran (about 15; 8 with ``quick``)."""
    cases = [
        conv_case("3x3 12x12, 8 ch", rng, (1, 8, 12, 12), (8, 8, 3, 3), padding=1),
        conv_case("3x3 20x20 N=2", rng, (2, 24, 20, 20), (24, 24, 3, 3), padding=1),
        conv_case("1x1 28x28 96->48", rng, (1, 96, 28, 28), (48, 96, 1, 1)),
        conv_case("depthwise 3x3 28x28", rng, (1, 48, 28, 28), (48, 1, 3, 3), padding=1, groups=48),
        conv_case("3x3 14x14 N=2 128 ch", rng, (2, 128, 14, 14), (128, 128, 3, 3), padding=1),
        conv_case("5x5 32x32", rng, (1, 8, 32, 32), (16, 8, 5, 5), padding=2),
        resnet_case("res2_3x3", 4, rng),
        resnet_case("res4_1x1", 8, rng),
        matmul_case(96, 96, 96, rng),
        matmul_case(384, 384, 384, rng),
        matmul_case(200, 300, 400, rng),
        matmul_case(48, 1024, 48, rng),
        matmul_case(768, 768, 768, rng),
        matmul_case(1536, 256, 512, rng),
        matmul_case(2, 512, 2048, rng),
    ]
    return cases[::2] if quick else cases


def crossover_sweeps(quick, rng):
    """{sweep name: (size label, [(size, Case)])}: matmul n x n x n, and res3_3x3 over the batch size."""
    matmul_sizes = [32, 64, 128, 256, 512, 1024] if quick else [32, 64, 128, 256, 512, 1024, 2048, 4096]
    batches = [1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32, 64]
    return {
        "matmul n x n x n": ("n", [(n, matmul_case(n, n, n, rng)) for n in matmul_sizes]),
        "conv2d res3_3x3 (128 ch, 28x28, 3x3)": ("N", [(batch, resnet_case("res3_3x3", batch, rng))
                                                      for batch in batches]),
    }


# --- measuring --------------------------------------------------------------------------------------------


def timed(function, *args):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def single_device_schedulers(device_ids):
    """One scheduler per device, profiled (profiling is not part of any timing)."""
    schedulers = {}
    for device_id in device_ids:
        scheduler = sparkle.Scheduler([device_id], persist=False, explore=False, progress=False)
        scheduler.profile()
        schedulers[device_id] = scheduler
    return schedulers


def measure_case(case, schedulers, repeat):
    """{device id: {best, median, seconds} of warm calls, or {error} if the device cannot run ``case``}.

    Each device makes one warm-up call (compiles; its result checked), then the devices take turns, one
    timed call each per round, in alternating order, so that a stall of the machine hits no device's samples
    all at once. A call under LEAD_IN_BELOW_SECONDS is preceded by an untimed one: switching devices costs
    the next few calls (the other device's worker threads still spinning, this one's waking up: up to
    tens of ms on the 16-core H200 host). At least ``repeat`` rounds; a cheap shape gets more (up to
    4 x ``repeat``, until MIN_TIMED_SECONDS are timed), a device slower than SLOW_CALL_SECONDS stops after
    one timed call."""
    measured, times, lead_in = {}, {}, {}
    for device_id, scheduler in schedulers.items():
        try:
            seconds, result = timed(case.run, scheduler)
            case.check(result, device_id)
            times[device_id] = []
            lead_in[device_id] = seconds < LEAD_IN_BELOW_SECONDS
        except IncorrectResult:
            raise
        except Exception as error:  # noqa: BLE001 - a device that cannot run a shape is not a candidate for it
            measured[device_id] = {"error": f"{type(error).__name__}: {error}"}

    def done(device_id):
        samples = times[device_id]
        return bool(samples) and (samples[-1] > SLOW_CALL_SECONDS or len(samples) >= 4 * repeat
                                  or (len(samples) >= repeat and sum(samples) > MIN_TIMED_SECONDS))

    for round_number in range(4 * repeat):
        active = [device_id for device_id in times if not done(device_id)]
        for device_id in active if round_number % 2 == 0 else reversed(active):
            try:
                if lead_in[device_id]:
                    case.run(schedulers[device_id])
                seconds = timed(case.run, schedulers[device_id])[0]
                times[device_id].append(seconds)
                lead_in[device_id] = seconds < LEAD_IN_BELOW_SECONDS
            except Exception as error:  # noqa: BLE001 - it ran the warm-up call, then faulted
                measured[device_id] = {"error": f"{type(error).__name__}: {error}"}
                del times[device_id]
    for device_id, samples in times.items():
        measured[device_id] = {"best": min(samples), "median": statistics.median(samples), "seconds": samples}
    return {device_id: measured[device_id] for device_id in schedulers}


def measure_devices(cases, schedulers, repeat, say):
    """{case name: {device id: measurement}} (see measure_case)."""
    measured = {}
    for case in cases:
        measured[case.name] = measure_case(case, schedulers, repeat)
        times = "  ".join(f"{d} {_ms(m.get('best'))}" for d, m in measured[case.name].items())
        say(f"  {case.name:<28} {times}")
    return measured


def fastest(measurements, key="best"):
    """The device id with the least ``key`` time, or None if no device ran the shape."""
    usable = {device: m[key] for device, m in measurements.items() if key in m}
    return min(usable, key=usable.get) if usable else None


def label(decision):
    """A decision's device, or "split a+b" for a split."""
    return f"split {'+'.join(sorted(decision.devices))}" if decision.split else decision.device


class CollectionClock:
    """Seconds the garbage collector ran (any generation), read before and after a call: a full collection of a
    process holding many objects takes tens of milliseconds, which would read as the call's own time."""

    def __init__(self):
        self.seconds = 0.0
        self._started = None
        gc.callbacks.append(self._callback)

    def _callback(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None


COLLECTIONS = CollectionClock()


_SEEN = {}  # id(scheduler) -> the (shape, device) pairs its calls through run_auto have run


def fast_path_device(scheduler, case):
    """The device of the fast path that ``case``'s signature has on ``scheduler``, or None."""
    key_of = signature.conv2d_key if case.op == "conv2d" else signature.matmul_key
    plan = scheduler._plans.get(key_of(*case.args, **case.kwargs))
    return plan.state.id if plan is not None and plan.runner is not None and plan.state is not None else None


def run_auto(case, scheduler, decision):
    """(seconds, device label, diagnostics) of one auto call, its result checked. The label comes from the
    history records the call added, "split a+b" for a split. ``decision``: explain's, just before the call: a
    split's parts that compiled add no record, so a call without records that was to split is taken as split, and
    one that was not ran on its plan's fast path (which times one small call in a few).
    Diagnostics: whether a kernel was being built ahead meanwhile, whether the call was its signature's first on
    that device, and how long the garbage collector ran during it (where the excess over the oracle comes from).

    Nothing is allocated right before the timed call (the oracle's calls get no such work either): building the
    whole history there (thousands of dicts) left auto's small CPU calls 10-20 % slower than the oracle's."""
    log = scheduler._records
    marker = log[-1] if log else None  # the latest record before the call: the call's records follow it
    builds_running = scheduler._builds_running
    collected = COLLECTIONS.seconds
    seconds, result = timed(case.run, scheduler)
    collected = COLLECTIONS.seconds - collected
    added = []
    for record in reversed(list(log)):  # a snapshot: a build-ahead thread may add records meanwhile
        if record is marker:
            break
        added.append(record)
    records = [dict(zip(("op", "shape", "device", "predicted", "measured"), record)) for record in reversed(added)]
    seen = _SEEN.setdefault(id(scheduler), set())
    diagnostics = {"builds_running": builds_running,
                   "first_on_device": any((r["shape"], r["device"]) not in seen for r in records),
                   "predicted": sum(r["predicted"] for r in records), "gc_seconds": collected}
    seen.update((r["shape"], r["device"]) for r in records)
    devices = {record["device"] for record in records}
    if any(" part " in record["shape"] for record in records) or (not records and decision.split):
        device = f"split {'+'.join(sorted(devices | set(decision.devices if decision.split else ())))}"
    elif records:
        device = "+".join(sorted(devices))
    else:  # a repeated small call on the fast path, not timed (one in a few is): it ran on its plan's device
        device = fast_path_device(scheduler, case) or "?"
    case.check(result, f"auto ({device})")
    return seconds, device, diagnostics


def run_passes(cases, auto, alone, oracle, passes, rng, say):
    """Per pass: auto's calls and the paired calls of the oracle's device and the best single device."""
    totals = {device: sum(oracle[c.name][device].get("best", math.inf) for c in cases) for device in alone}
    best_single = min(totals, key=totals.get)
    results = []
    for number in range(1, passes + 1):
        rows = []
        for index in rng.permutation(len(cases)):
            case = cases[index]
            oracle_device = fastest(oracle[case.name])
            # What auto would choose now without exploring: a call elsewhere explored (or met a fault).
            decision = case.explain(auto)
            decided = label(decision)
            seconds = {}
            # Of a pair of the same call, the first runs colder (the second finds the shape's code and data warm:
            # an A/A run measured the first 1.3-1.5x the second on small calls). Auto goes first in every other
            # case and every other pass, so both sides pay it equally; the best single device anywhere.
            order = ["auto", oracle_device] if (number + index) % 2 else [oracle_device, "auto"]
            if best_single != oracle_device:
                order.insert(int(rng.integers(0, len(order) + 1)), best_single)
            for runner in order:
                if runner == "auto":
                    seconds["auto"], device, diagnostics = run_auto(case, auto, decision)
                else:
                    seconds[runner], result = timed(case.run, alone[runner])
                    case.check(result, runner)
                    # Gone before the next runner, as auto's is when run_auto returns: a result kept alive here
                    # held memory the next call would have reused warm (small calls paid 2-9 % for it).
                    del result
            rows.append({"case": case.name, "auto_device": device, "auto_decided": decided, "auto": seconds["auto"],
                         "oracle_device": oracle_device, "oracle_paired": seconds[oracle_device],
                         "best_single_paired": seconds[best_single], **diagnostics,
                         "auto_before_oracle": order.index("auto") < order.index(oracle_device),
                         # every device's prediction as explain gave it before the call: why auto chose what it did
                         "predictions": {p.device: p.seconds for p in decision.predictions}})
        summary = pass_summary(number, rows, cases, oracle, totals, best_single)
        say(f"  pass {number}: auto {_ms(summary['auto'])}, oracle paired {_ms(summary['oracle_paired'])} "
            f"(regret {summary['regret_paired']:.3f}), oracle best-of {_ms(summary['oracle_best'])} "
            f"(regret {summary['regret_best']:.3f}); off the oracle's device: {summary['off_oracle']} calls, "
            f"{summary['explored']} explored; excess over the oracle "
            + ", ".join(f"{where.replace('_', ' ')} {_ms(value)}" for where, value in summary["excess"].items()))
        results.append({**summary, "calls": rows})
    return results, best_single, totals


def pass_summary(number, rows, cases, oracle, device_totals, best_single):
    auto = sum(row["auto"] for row in rows)
    oracle_paired = sum(row["oracle_paired"] for row in rows)
    oracle_best = sum(oracle[c.name][fastest(oracle[c.name])]["best"] for c in cases)
    # What auto's choices would cost at each device's best-of time: placement alone, without noise.
    chosen = sum(oracle[row["case"]].get(row["auto_device"], {}).get("best", row["auto"]) for row in rows)
    off = [row for row in rows if row["auto_device"] != row["oracle_device"]]
    devices = {}
    for row in rows:
        devices[row["auto_device"]] = devices.get(row["auto_device"], 0) + 1
    return {"number": number, "auto": auto, "oracle_paired": oracle_paired, "oracle_best": oracle_best,
            "best_single": best_single, "best_single_paired": sum(row["best_single_paired"] for row in rows),
            "device_totals": device_totals, "regret_paired": auto / oracle_paired, "regret_best": auto / oracle_best,
            "choice_regret": chosen / oracle_best, "off_oracle": len(off),
            "explored": sum(row["auto_device"] != row["auto_decided"] for row in rows),
            "off_oracle_cases": [f"{row['case']} on {row['auto_device']}"
                                 + (" (explored)" if row["auto_device"] != row["auto_decided"] else "")
                                 for row in off],
            "auto_devices": devices, "excess": excess_sources(rows)}


def excess_sources(rows):
    """Auto's seconds beyond the paired oracle, by where they were spent: calls while a kernel was built
    ahead, first calls of a signature on a device, and the rest (placement and noise); and, apart, how long the
    garbage collector ran inside auto's calls."""
    sources = {"during_builds": 0.0, "first_on_device": 0.0, "other": 0.0,
               "gc_in_auto_calls": sum(row.get("gc_seconds", 0.0) for row in rows)}
    for row in rows:
        source = ("during_builds" if row.get("builds_running") else
                  "first_on_device" if row.get("first_on_device") else "other")
        sources[source] += row["auto"] - row["oracle_paired"]
    return sources


STREAM_ROUNDS = 3


def stream_times(cases, alone, rounds=STREAM_ROUNDS):
    """{case name: {device: median seconds}} of single calls in a stream: the cases in a new random order
    each round, every device in turn: calls as a mixed workload makes them (caches cold, worker threads
    possibly asleep), unlike the warm back-to-back calls of measure_case."""
    samples = {case.name: {device: [] for device in alone} for case in cases}
    rng = np.random.default_rng(7)
    for _ in range(rounds):
        for index in rng.permutation(len(cases)):
            case = cases[index]
            for device, scheduler in alone.items():
                try:
                    samples[case.name][device].append(timed(case.run, scheduler)[0])
                except Exception:  # noqa: BLE001, S110 - a device that cannot run it has no time for it
                    pass
    return {name: {device: statistics.median(v) for device, v in by_device.items() if v}
            for name, by_device in samples.items()}


def prediction_errors(cases, auto, alone, repeat, say):
    """explain() for every unseen case first, then the measurements (warm back-to-back calls, then single
    calls in a stream), then one checked auto call each."""
    decisions = {case.name: case.explain(auto) for case in cases}
    measured = measure_devices(cases, alone, repeat, say)
    in_stream = stream_times(cases, alone)
    rows = []
    for case in cases:
        decision = decisions[case.name]
        predictions = {p.device: p.seconds - p.compile for p in decision.predictions if p.usable}
        auto_seconds, auto_device, _ = run_auto(case, auto, decision)
        if decision.split:  # a split's truth is auto's own (split) call
            chosen, predicted, truth = label(decision), decision.predicted_seconds, auto_seconds
        else:
            chosen = decision.device
            predicted, truth = predictions.get(chosen), measured[case.name].get(chosen, {}).get("median")
        per_device = {device: abs(predictions[device] - m["median"]) / m["median"]
                      for device, m in measured[case.name].items() if "median" in m and device in predictions}
        error = abs(predicted - truth) / truth if predicted is not None and truth else None
        stream_truth = in_stream[case.name].get(chosen) if not decision.split else auto_seconds
        stream_error = abs(predicted - stream_truth) / stream_truth if predicted is not None and stream_truth else None
        rows.append({"case": case.name, "chosen": chosen, "predicted": predicted, "measured": truth, "error": error,
                     "measured_in_stream": stream_truth, "error_in_stream": stream_error,
                     "fastest": fastest(measured[case.name], "median"), "auto_ran_on": auto_device,
                     "per_device_error": per_device, "measurements": measured[case.name]})
    errors = [row["error"] for row in rows if row["error"] is not None]
    stream_errors = [row["error_in_stream"] for row in rows if row["error_in_stream"] is not None]
    by_device = {}
    for row in rows:
        for device, error in row["per_device_error"].items():
            by_device.setdefault(device, []).append(error)
    return {"rows": rows, "median_error": statistics.median(errors) if errors else None,
            "median_error_in_stream": statistics.median(stream_errors) if stream_errors else None,
            "median_error_by_device": {device: statistics.median(v) for device, v in by_device.items()}}


def run_sweeps(sweeps, auto, alone, repeat, say):
    results = {}
    for name, (size_label, points) in sweeps.items():
        say(f"  {name}")
        rows, too_slow = [], {}
        for size, case in points:
            # A device past SWEEP_SLOW_SECONDS at one size is not measured at larger ones (PoCL at matmul 4096:
            # ~100 s a call); auto's calls still run wherever auto puts them.
            measuring = {device: scheduler for device, scheduler in alone.items() if device not in too_slow}
            measured = measure_devices([case], measuring, repeat, say)[case.name]
            measured.update({device: {"error": f"not measured: {seconds:.1f} s at the previous size"}
                             for device, seconds in too_slow.items()})
            too_slow.update({device: m["best"] for device, m in measured.items()
                             if m.get("best", 0.0) > SWEEP_SLOW_SECONDS})
            decision = case.explain(auto)
            predicted = {p.device: p.seconds for p in decision.predictions if p.usable}
            devices = [run_auto(case, auto, case.explain(auto))[1] for _ in range(SWEEP_AUTO_CALLS)]
            rows.append({"size": size, "case": case.name, "measured": measured, "fastest": fastest(measured),
                         "auto_predicted": predicted, "auto_first": label(decision), "auto_calls": devices,
                         "auto_settled": devices[-1]})
        results[name] = {"size_label": size_label, "rows": rows,
                         "true_crossover": crossover([(r["size"], r["fastest"]) for r in rows]),
                         "auto_crossover": crossover([(r["size"], r["auto_settled"]) for r in rows])}
    return results


def learned_overheads(scheduler):
    """{device: seconds per call} the scheduler learned beyond each profile's overhead for calls on numpy data
    (what this benchmark runs: resident on the CPU, moving data on an OpenCL device; model.extra_overheads)."""
    return {state.id: state.model.extra_overhead(0.0 if state.executor.kind == "cpu" else 1.0)
            for state in scheduler._states}


def crossover(labelled):
    """Where the choice leaves the CPU for good: {size, device, flips}; size None if the CPU keeps the last
    size (then ``flips`` lists any sizes where another device was chosen)."""
    off_cpu = [size for size, device in labelled if device != "cpu"]
    if not labelled or labelled[-1][1] == "cpu":
        return {"size": None, "device": None, "flips": off_cpu}
    start = len(labelled) - 1
    while start > 0 and labelled[start - 1][1] != "cpu":
        start -= 1
    return {"size": labelled[start][0], "device": labelled[-1][1],
            "flips": [size for size in off_cpu if size < labelled[start][0]]}


# --- reporting --------------------------------------------------------------------------------------------


def _ms(seconds):
    if seconds is None or not math.isfinite(seconds):
        return "-"
    return f"{seconds * 1e3:.3f} ms" if seconds < 0.1 else f"{seconds:.3f} s"


def _num(seconds, digits=2):
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.{digits}f}"


def cpu_model():
    if shutil.which("lscpu"):
        output = subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout
        for line in output.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(device_ids):
    listed = {device.id: device for device in sparkle.devices()}
    devices = []
    for device_id in device_ids:
        device = listed.get(device_id)
        devices.append({"id": device_id, "name": device.name if device else device_id,
                        "kind": device.kind if device else "?"})
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "devices": devices}


def later_passes(report):
    """The passes the targets are about: from pass 2 on (pass 1 learns every shape)."""
    return [p for p in report["passes"] if p["number"] >= 2]


def targets(report):
    later = later_passes(report)
    best_single = report["best_single_device"]
    single_total = report["device_totals"][best_single]
    met = {
        "regret_paired": all(p["regret_paired"] <= TARGET_REGRET for p in later),
        "regret_best": all(p["regret_best"] <= TARGET_REGRET for p in later),
        "below_best_single_paired": all(p["auto"] < p["best_single_paired"] for p in later),
        "below_best_single_best": all(p["auto"] < single_total for p in later),
        # Where one device is the oracle's for every shape, auto can at best equal it: "below" is then a coin
        # flip of noise, and what counts is the regret above (the oracle is that device).
        "one_device_is_the_oracle": all(fastest(measured) == best_single for measured in report["oracle"].values()),
    }
    error = report["unseen"]["median_error"]
    met["prediction_error"] = error is not None and error <= TARGET_PREDICTION_ERROR
    stream_error = report["unseen"].get("median_error_in_stream")
    met["prediction_error_in_stream"] = stream_error is not None and stream_error <= TARGET_PREDICTION_ERROR
    return met


def markdown_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markdown_report(report):
    machine, devices = report["machine"], report["device_ids"]
    out = [f"CPU: {machine['cpu']}, {machine['cores']} cores; devices: "
           + ", ".join(f"{d['id']} ({d['name']})" for d in machine["devices"])
           + f"; Python {machine['python']}, numpy {machine['numpy']}; {machine['date']}; "
           f"{report['settings']['shapes']} shapes, {report['settings']['passes']} passes, "
           f"oracle best of {report['settings']['repeat']}, seed {report['settings']['seed']}"
           + (", --quick" if report["settings"]["quick"] else "") + ".",
           f"\nProfiling the devices (auto's fresh scheduler): {report['profile_seconds']:.2f} s, not in any total."]
    out.append("\n### Mixed workload: totals per pass (ms)\n")
    headers = ["pass", "auto", "oracle (paired)", "regret (paired)", "oracle (best of)", "regret (best of)",
               "auto's choices at best-of", f"{report['best_single_device']} (paired)",
               *[f"{d} alone (best of)" for d in devices], "auto's calls per device",
               "calls off the oracle's device", "explored calls"]
    rows = [[p["number"], _num(p["auto"], 1), _num(p["oracle_paired"], 1), f"{p['regret_paired']:.3f}",
             _num(p["oracle_best"], 1), f"{p['regret_best']:.3f}", f"{p['choice_regret']:.3f}",
             _num(p["best_single_paired"], 1), *[_num(report["device_totals"][d], 1) for d in devices],
             ", ".join(f"{d} {n}" for d, n in sorted(p["auto_devices"].items())),
             f"{p['off_oracle']} of {report['settings']['shapes']}", p["explored"]] for p in report["passes"]]
    out.append(markdown_table(headers, rows))
    out.append("\nExplored calls: auto ran the call elsewhere than `explain` said just before it (trying a device to "
               "learn its speed, or a decision changed by the review that came with the call). Auto's choices at "
               "best-of: the sum, over its calls, of the best-of time of the device it ran each call on, over the "
               "oracle's: its placement without the noise of single calls.")
    met = report["targets"]
    out.append(f"\nTargets from pass 2 on: auto within {TARGET_REGRET:.2f}x of the oracle: "
               f"{'met' if met['regret_paired'] else 'NOT met'} (paired), "
               f"{'met' if met['regret_best'] else 'NOT met'} (best of); auto below the best single device "
               f"({report['best_single_device']}): {'met' if met['below_best_single_paired'] else 'NOT met'} "
               f"(paired), {'met' if met['below_best_single_best'] else 'NOT met'} (best of)"
               + (f"; {report['best_single_device']} is the oracle's device for every shape here, so auto can at "
                  "best equal it (the regret above is that comparison)." if met.get("one_device_is_the_oracle")
                  else "."))
    later = later_passes(report)
    if later:
        auto, paired = sum(p["auto"] for p in later), sum(p["oracle_paired"] for p in later)
        noise = paired / sum(p["oracle_best"] for p in later)
        out.append(f"\nPasses 2-{later[-1]['number']} together: auto {_num(auto, 1)} ms, paired oracle "
                   f"{_num(paired, 1)} ms ({auto / paired:.3f}x). The host's noise: the paired oracle took "
                   f"{noise:.2f}x its best-of times (the same calls back to back).")
    last = report["passes"][-1]
    if last["off_oracle_cases"]:
        out.append(f"\nLast pass, calls off the oracle's device: {'; '.join(last['off_oracle_cases'])}.")
    out.append("\n### Oracle: each shape on each device alone (best of, ms)\n")
    headers = ["shape", "GFLOP", *devices, "oracle", "auto (last pass)"]
    last_devices = {row["case"]: row["auto_device"] for row in last["calls"]}
    rows = []
    for name, measured in report["oracle"].items():
        rows.append([name, f"{report['flops'][name] / 1e9:.4f}",
                     *[cell(measured[d]) for d in devices],
                     fastest(measured), last_devices.get(name, "-")])
    out.append(markdown_table(headers, rows))
    unseen = report["unseen"]
    out.append("\n### Prediction error on unseen shapes\n")
    headers = ["shape", "auto chose", "predicted ms", "measured ms (median)", "error", "in a stream ms (median)",
               "error in a stream", "fastest measured", "auto ran on", *[f"error {d}" for d in devices]]
    rows = [[r["case"], r["chosen"], _num(r["predicted"], 3), _num(r["measured"], 3),
             "-" if r["error"] is None else f"{r['error']:.0%}", _num(r.get("measured_in_stream"), 3),
             "-" if r.get("error_in_stream") is None else f"{r['error_in_stream']:.0%}", r["fastest"], r["auto_ran_on"],
             *[f"{r['per_device_error'][d]:.0%}" if d in r["per_device_error"] else "-" for d in devices]]
            for r in unseen["rows"]]
    out.append(markdown_table(headers, rows))
    error = unseen["median_error"]
    out.append(f"\nMedian |predicted - measured| / measured for the device auto chose: "
               f"{'-' if error is None else f'{error:.1%}'} (target <= {TARGET_PREDICTION_ERROR:.0%}: "
               f"{'met' if met['prediction_error'] else 'NOT met'}); per device: "
               + ", ".join(f"{d} {e:.1%}" for d, e in unseen["median_error_by_device"].items()) + ".")
    stream_error = unseen.get("median_error_in_stream")
    if stream_error is not None:
        out.append(f"Against single calls in a stream (the cases in random order, {STREAM_ROUNDS} rounds, as the mixed "
                   f"workload makes its calls): median error {stream_error:.1%}.")
    for name, sweep in report["crossover"].items():
        out.append(f"\n### Crossover: {name} (best of, ms)\n")
        headers = [sweep["size_label"], *devices, "fastest", "auto before its first call", "auto after 3 calls"]
        rows = [[r["size"], *[cell(r["measured"][d]) for d in devices], r["fastest"], r["auto_first"],
                 r["auto_settled"]]
                for r in sweep["rows"]]
        out.append(markdown_table(headers, rows))
        out.append(f"\nTrue crossover: {crossover_text(sweep['true_crossover'], sweep['size_label'])}; "
                   f"auto's: {crossover_text(sweep['auto_crossover'], sweep['size_label'])}.")
    return "\n".join(out) + "\n"


def cell(measurement):
    """A table's entry for one device's measurement: ms, "skipped" or "fails"."""
    if "best" in measurement:
        return _num(measurement["best"], 3)
    return "skipped" if measurement["error"].startswith("not measured") else "fails"


def crossover_text(found, size_label):
    if found["size"] is None:
        text = "none in the sweep (the CPU is chosen at the largest size)"
    else:
        text = f"{size_label} = {found['size']} (to {found['device']})"
    if found["flips"]:
        text += f"; off the CPU also at {size_label} = {', '.join(str(s) for s in found['flips'])}"
    return text


def save_plots(report, directory, prefix):
    """Crossover (times per device, auto's choices marked) and learning curve (regret per pass) as PNGs;
    returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    devices = report["device_ids"]
    colors = {device: f"C{index}" for index, device in enumerate(devices)}
    sweeps = report["crossover"]
    figure, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.5), squeeze=False)
    for axis, (name, sweep) in zip(axes[0], sweeps.items()):
        sizes = [r["size"] for r in sweep["rows"]]
        for device in devices:
            times = [r["measured"][device].get("best", math.nan) * 1e3 for r in sweep["rows"]]
            axis.plot(sizes, times, "-o", color=colors[device], markersize=3, label=f"{device} alone")
        # Auto's choices on the chosen device's curve: a ring after three calls, a cross before the first.
        for key, marker, size in (("auto_settled", "o", 11), ("auto_first", "x", 8)):
            for row in sweep["rows"]:
                chosen = row[key].removeprefix("split ").split("+")[0]
                if "best" in row["measured"].get(chosen, {}):
                    axis.plot(row["size"], row["measured"][chosen]["best"] * 1e3, marker, markersize=size,
                              markerfacecolor="none", markeredgecolor=colors.get(chosen, "k"), markeredgewidth=1.5)
        axis.plot([], [], "o", markersize=11, markerfacecolor="none", markeredgecolor="k",
                  label="auto's choice after 3 calls")
        axis.plot([], [], "x", markersize=8, markeredgecolor="k", label="auto's choice before the first call")
        for found, style, label in ((sweep["true_crossover"], "--", "true crossover"),
                                    (sweep["auto_crossover"], ":", "auto moves off the CPU")):
            if found["size"] is not None:
                axis.axvline(found["size"], color="gray", linestyle=style, label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel(sweep["size_label"])
        axis.set_ylabel("ms per call (best of)")
        axis.set_title(name, fontsize=10)
        axis.legend(fontsize=8)
    figure.tight_layout()
    paths = [os.path.join(directory, f"{prefix}_{name}.png") for name in ("crossover", "learning_curve")]
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    numbers = [p["number"] for p in report["passes"]]
    axis.plot(numbers, [p["regret_paired"] for p in report["passes"]], "-o", label="auto / oracle (paired)")
    axis.plot(numbers, [p["regret_best"] for p in report["passes"]], "-s", label="auto / oracle (best of)")
    axis.plot(numbers, [p["choice_regret"] for p in report["passes"]], "-^", label="auto's choices at best-of times")
    axis.axhline(TARGET_REGRET, color="gray", linestyle="--", label=f"target {TARGET_REGRET:.2f}")
    axis.axhline(1.0, color="black", linewidth=0.5)
    axis.set_xticks(numbers)
    axis.set_xlabel("pass")
    axis.set_ylabel("regret (total time / oracle)")
    axis.set_title(f"Learning curve, {report['settings']['shapes']} shapes, fresh scheduler", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)
    return paths


# --- main -------------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer and smaller shapes, 3 passes, shorter sweeps (a few minutes)")
    parser.add_argument("--device-ids", nargs="+", metavar="ID",
                        help="devices to schedule across, e.g. cpu opencl:0 (default: every device the default "
                             "scheduler uses)")
    parser.add_argument("--passes", type=int, help="passes through the mixed workload (default 5; 3 with --quick)")
    parser.add_argument("--repeat", type=int, help="timed calls per shape and device, at least (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="inputs and pass order (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown")
    parser.add_argument("--plots", metavar="DIR", help="save PNG plots here (needs matplotlib)")
    parser.add_argument("--plot-prefix", default="scheduler_quality", metavar="NAME",
                        help="the plots' file names: NAME_crossover.png, NAME_learning_curve.png (default "
                             "%(default)s)")
    parser.add_argument("--from-json", metavar="PATH",
                        help="measure nothing: print (and --markdown, --plots) the report saved by --json, e.g. a "
                             "run on a machine without matplotlib")
    args = parser.parse_args(argv)
    args.passes = args.passes or (3 if args.quick else 5)
    args.repeat = args.repeat or 3
    if args.passes < 2 or args.repeat < 1:
        parser.error("--passes must be at least 2 (the targets start at pass 2) and --repeat at least 1")
    if args.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plots needs matplotlib: pip install 'sparkle[plot]'")
    return args


def main(argv=None):
    args = parse_args(argv)

    def say(text):
        print(text, flush=True)

    if args.from_json:
        with open(args.from_json) as file:
            report = json.load(file)
        if report.get("complete", True):
            report["targets"] = targets(report)  # as this version judges them
        write_report(report, args, say)
        return 0
    device_ids = args.device_ids or sparkle.Scheduler(persist=False, progress=False).devices
    rng = np.random.default_rng(args.seed)
    cases = mixed_workload(args.quick, rng)
    unseen = unseen_workload(args.quick, rng)
    sweeps = crossover_sweeps(args.quick, rng)
    report = {"machine": machine_description(device_ids), "device_ids": device_ids,
              "settings": {"quick": args.quick, "passes": args.passes, "repeat": args.repeat, "seed": args.seed,
                           "shapes": len(cases)},
              "flops": {case.name: case.flops for case in cases}}
    say(f"devices: {', '.join(device_ids)}; {len(cases)} shapes, {args.passes} passes")

    def checkpoint():  # what is measured so far survives a run cut short (a time limit on a lent machine)
        if args.json:
            with open(args.json, "w") as file:
                json.dump(dict(report, complete=False), file, indent=1, default=str)

    try:
        alone = single_device_schedulers(device_ids)
        say("oracle: each shape on each device alone")
        report["oracle"] = measure_devices(cases, alone, args.repeat, say)
        checkpoint()
        unsupported = [name for name, measured in report["oracle"].items() if fastest(measured) is None]
        if unsupported:
            raise SystemExit(f"no device ran {unsupported}: {report['oracle'][unsupported[0]]}")
        auto = sparkle.Scheduler(device_ids, persist=False, progress=False)
        report["profile_seconds"], profiles = timed(auto.profile)
        report["profiles"] = {device: profile.to_json() if profile else None for device, profile in profiles.items()}
        say(f"auto: profiled in {report['profile_seconds']:.2f} s; mixed workload")
        passes, best_single, totals = run_passes(cases, auto, alone, report["oracle"], args.passes,
                                                 np.random.default_rng(args.seed + 1), say)
        report.update(passes=passes, best_single_device=best_single, device_totals=totals,
                      learned_overhead_after_passes=learned_overheads(auto))
        checkpoint()
        say("unseen shapes")
        report["unseen"] = prediction_errors(unseen, auto, alone, args.repeat, say)
        checkpoint()
        say("crossover")
        report["crossover"] = run_sweeps(sweeps, auto, alone, args.repeat, say)
        report["learned_overhead_at_end"] = learned_overheads(auto)
    except IncorrectResult as error:
        print(f"INCORRECT RESULT: {error}", file=sys.stderr)
        return 1
    report["targets"] = targets(report)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1, default=str)
    write_report(report, args, say)
    return 0


def write_report(report, args, say):
    text = markdown_report(report)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as file:
            file.write(text)
    if args.plots:
        say(f"plots: {', '.join(save_plots(report, args.plots, args.plot_prefix))}")


if __name__ == "__main__":
    sys.exit(main())
