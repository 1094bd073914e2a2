"""The autotuner: times candidate kernels of the search space on one device and stores the winner.

A candidate must build, fit the device, and match the float64 reference on the workload before its time
counts; every other outcome is recorded as rejected, with the reason. Tuning runs only on request.
"""

from __future__ import annotations

import difflib
import numbers
import random
import time
from dataclasses import dataclass, field

import numpy as np

from .. import api, reference
from ..device_array import DeviceArray
from ..devices import resolve_tuning_device
from . import codegen, launch, transfer
from .codegen import Workload
from .tuning import database, space
from .tuning.relatives import DeviceTraits

TOLERANCE = {"float32": 1e-5, "float64": 1e-12}  # relative L2 error against the float64 reference
SAMPLE_POINTS = 512


@dataclass
class TuneResult:
    device: str
    workload: str
    best: dict | None  # parameters of the fastest correct candidate
    best_seconds: float | None
    default_seconds: float | None  # the device defaults' time, for comparison
    gflops: float | None
    tried: int
    rejected: list = field(default_factory=list)  # {"params", "reason"}

    def __str__(self):
        if self.best is None:
            return f"{self.workload} on {self.device}: no correct candidate in {self.tried} tried"
        gain = f", {self.default_seconds / self.best_seconds:.2f}x the defaults" if self.default_seconds else ""
        return (f"{self.workload} on {self.device}: {self.best_seconds * 1e3:.3f} ms, {self.gflops:.1f} GFLOPS "
                f"with {self.best}{gain} ({self.tried} tried, {len(self.rejected)} rejected)")


class _Problem:
    """Random inputs of the workload's shapes on the device, and the reference at sampled outputs."""

    def __init__(self, spec, device, rng):
        self.spec = spec
        dtype = np.dtype(spec.dtype)
        if isinstance(spec, api.MatmulSpec):
            self.a = rng.standard_normal((spec.m, spec.k)).astype(dtype)
            self.b = rng.standard_normal((spec.k, spec.n)).astype(dtype)
            self.image, self.weights, self.bias = self.b, self.a, None
            self.out_shape = (spec.m, spec.n)
        else:
            self.image = rng.standard_normal((spec.batch, spec.in_channels, spec.height, spec.width)).astype(dtype)
            fan_in = spec.in_channels // spec.groups * spec.kernel_h * spec.kernel_w
            self.weights = (rng.standard_normal((spec.out_channels, fan_in // (spec.kernel_h * spec.kernel_w),
                                                 spec.kernel_h, spec.kernel_w)) / np.sqrt(fan_in)).astype(dtype)
            self.bias = rng.standard_normal(spec.out_channels).astype(dtype) if spec.has_bias else None
            self.out_shape = spec.output_shape
        size = int(np.prod(self.out_shape))
        if size <= SAMPLE_POINTS:
            self.points = np.argwhere(np.ones(self.out_shape, dtype=bool))
        else:
            self.points = np.stack([rng.integers(0, s, SAMPLE_POINTS) for s in self.out_shape], 1)
        self.expected = self._reference()
        self.x_dev = transfer.upload(device, self.image, dtype)
        self.w_dev = transfer.upload(device, self.weights, dtype)
        self.b_dev = transfer.upload(device, self.bias if self.bias is not None else np.zeros(1, dtype), dtype)
        self.out = transfer.empty(device, self.out_shape, dtype)

    def launch(self, device, workload, params):
        """Enqueue the kernel for ``params`` on this problem's device buffers; returns the event."""
        return launch.enqueue(device, workload, params, self.x_dev.buffer, self.w_dev.buffer, self.b_dev.buffer,
                              self.out.buffer, has_bias=self.bias is not None,
                              relu=getattr(self.spec, "activation", None) == "relu")

    def _reference(self):
        spec = self.spec
        if isinstance(spec, api.MatmulSpec):
            return reference.matmul_at(self.a, self.b, points=self.points)
        return reference.conv2d_at(self.image, self.weights, self.bias, points=self.points,
                                   stride=(spec.stride_h, spec.stride_w),
                                   padding=(spec.pad_top, spec.pad_bottom, spec.pad_left, spec.pad_right),
                                   dilation=(spec.dilation_h, spec.dilation_w), groups=spec.groups,
                                   activation=spec.activation)

    def error(self, result):
        got = result[tuple(self.points.T)].astype(np.float64)
        if not np.all(np.isfinite(got)):
            return np.inf
        scale = np.linalg.norm(self.expected)
        return float(np.linalg.norm(got - self.expected) / (scale if scale else 1.0))


TUNE_KEYWORDS = ("device", "time_budget", "max_candidates", "progress", "seed")
OPERANDS = {"conv2d": ("x", "w", "bias"), "matmul": ("a", "b")}  # positional, in order
CONV2D_KEYWORDS = ("stride", "padding", "dilation", "groups", "activation")


def _unexpected_keyword(name, known):
    """TypeError naming sparkle.tune() for an unknown keyword, with the nearest known name as a hint."""
    hint = ""
    if name == "relu":
        hint = " (did you mean activation='relu'?)"
    else:
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            hint = f" (did you mean {close[0]!r}?)"
    return TypeError(f"sparkle.tune() got an unexpected keyword argument {name!r}{hint}")


def _spec(op, operands, kwargs):
    """The op's spec; argument errors name sparkle.tune() and the op, never the internal functions."""
    name = getattr(op, "__name__", op)
    if not isinstance(name, str) or name not in OPERANDS:
        raise ValueError(f"op must be 'conv2d' or 'matmul' (or the sparkle function), got {op!r}")
    op_keywords = CONV2D_KEYWORDS + ("bias",) if name == "conv2d" else ()
    for keyword in kwargs:
        if name == "matmul" and keyword in CONV2D_KEYWORDS + ("bias",):
            raise TypeError(f"sparkle.tune() got an unexpected keyword argument {keyword!r}: matmul takes no "
                            "keyword arguments (its operands give every size)")
        if keyword not in op_keywords:
            raise _unexpected_keyword(keyword, TUNE_KEYWORDS + op_keywords)
    if not 2 <= len(operands) <= len(OPERANDS[name]):
        expected = "x, w and optionally bias" if name == "conv2d" else "a and b"
        raise TypeError(f"sparkle.tune({name!r}, ...) takes the operands {expected}, "
                        f"got {len(operands)} operand{'s' if len(operands) != 1 else ''}")
    if "bias" in kwargs and len(operands) == 3:
        raise TypeError("sparkle.tune() got multiple values for argument 'bias'")
    if name == "conv2d":
        return api.conv2d_spec(*operands, **kwargs)
    return api.matmul_spec(*operands)


def _likely_first(found, rng):
    """Shuffled, with the parameter sets that usually win on their device kind first: register blocks of
    32-64 accumulators (GPU) or vectorized ones (CPU), and 64-256 work-items per group."""
    def likely(p):
        if p["ALGO"] == codegen.WINOGRAD:
            return 4 <= p["WRK"] * p["WRT"] <= 8 and 64 <= space.threads(p) <= 256
        if p["USE_LOCAL"]:
            return 32 <= p["WM"] * p["WN"] <= 64 and 64 <= space.threads(p) <= 256
        return p["VN"] >= 4 and p["WM"] * p["WN"] >= 32
    rng.shuffle(found)
    found.sort(key=likely)  # stable: shuffled within each class; pop() takes the likely ones first
    return found


def _taking_turns(queues):
    """One queue (popped from the end, like each of ``queues``) in which the queues take turns: every
    algorithm that applies is tried early."""
    turns = []
    while any(queues):
        turns += [queue.pop() for queue in queues if queue]
    return turns[::-1]


def _order(workload, device, limits, rng):
    """Defaults first, then the stored best of the nearest shape, then the search space (likely winners
    first, see ``_likely_first``), three candidates of the device's own family for each of the other."""
    other_kind = "cpu" if device.kind == "gpu" else "gpu"
    own, other = (_taking_turns([_likely_first(space.candidates(workload, limits, family), rng)
                                 for family in space.KIND_FAMILIES[kind]])
                  for kind in (device.kind, other_kind))
    mixed = []
    while own or other:
        mixed += [own.pop() for _ in range(min(3, len(own)))]
        if other:
            mixed.append(other.pop())
    first = [space.default_params(workload, limits, device.kind)]
    nearest, _ = database.lookup(device.identity, workload, limits, traits=DeviceTraits.of(device))
    first.append(nearest)
    seen, order = set(), []
    for params in first + mixed:
        if params is None:
            continue
        key = space.identity(params)
        if key not in seen:
            seen.add(key)
            order.append(space.complete(params))
    return order


def _time(device, workload, params, problem, min_seconds=0.05, max_runs=50):
    runs = []
    start = time.perf_counter()
    while len(runs) < 3 or (sum(runs) < min_seconds and len(runs) < max_runs):
        runs.append(launch.event_seconds(problem.launch(device, workload, params)))
        if time.perf_counter() - start > 10 * min_seconds + 5:
            break
    return float(np.median(runs))


def _target(device, operands):
    """The OpenCL device to tune on: ``device`` ("opencl", "opencl:N", or "auto" for the device of the
    DeviceArray operands); ValueError listing the devices tuning accepts otherwise."""
    if device == "auto":
        resident = [a for a in operands if isinstance(a, DeviceArray)]
        if resident:
            return resident[0]._device
        try:
            return resolve_tuning_device(device)
        except ValueError as error:
            raise ValueError(f"{error} ('auto' tunes on the device of DeviceArray operands, and there is none)") \
                from None
    return resolve_tuning_device(device)


def tune(op, *operands, device="opencl", time_budget=30.0, max_candidates=None, progress=True, seed=0,
         **kwargs):
    """Search the kernel space for ``op`` ("conv2d" or "matmul") on the shapes of ``operands``.

    Runs on random data of those shapes (the operands give shapes and dtype only), checks every
    candidate against the float64 reference, times the correct ones with OpenCL events, and stores the
    fastest in the tuning database for that device. Stops after ``time_budget`` seconds or
    ``max_candidates`` candidates. Returns a :class:`TuneResult`.

    ``device`` is "opencl", an available "opencl:N", or "auto" (the device of DeviceArray operands);
    ``kwargs`` are conv2d's keyword arguments (stride, padding, dilation, groups, activation; matmul takes
    none). Without pyopencl, or with no OpenCL device, it raises the ValueError conv2d raises, saying why.
    """
    spec = _spec(op, operands, kwargs)
    if isinstance(time_budget, bool) or not (isinstance(time_budget, numbers.Real) and time_budget > 0):
        raise ValueError(f"time_budget must be a positive number of seconds, got {time_budget!r}")
    if max_candidates is not None and (isinstance(max_candidates, bool)
                                       or not isinstance(max_candidates, numbers.Integral) or max_candidates < 1):
        raise ValueError(f"max_candidates must be a positive int or None, got {max_candidates!r}")
    target = _target(device, operands)  # without pyopencl: says so and how to install it
    # (tqdm's plain text bar: tqdm.auto needs ipywidgets in notebooks and warns without them.)
    import pyopencl as cl
    from tqdm import tqdm

    workload = Workload.from_spec(spec)
    limits = space.DeviceLimits.of(target)
    rng = random.Random(seed)
    problem = _Problem(spec, target, np.random.default_rng(seed))
    order = _order(workload, target, limits, rng)
    if max_candidates is not None:
        order = order[:max_candidates]
    tolerance = TOLERANCE[workload.dtype]
    best, best_seconds, default_seconds, rejected, tried = None, None, None, [], 0
    deadline = time.perf_counter() + time_budget
    poison = np.full(problem.out_shape, np.nan, dtype=np.dtype(workload.dtype))
    with tqdm(total=len(order), desc=f"tuning {workload.key} on {target.id}", disable=not progress,
              unit="variant") as bar:
        for params in order:
            if time.perf_counter() > deadline:
                break
            tried += 1
            bar.update(1)
            try:
                cl.enqueue_copy(target.queue, problem.out.buffer, poison)
                problem.launch(target, workload, params).wait()
                error = problem.error(problem.out.get())
                if not error <= tolerance:
                    rejected.append({"params": params, "reason": f"wrong result: relative error {error:.2e} "
                                                                 f"over {tolerance:.0e}"})
                    continue
                seconds = _time(target, workload, params, problem)
            except cl.Error as fault:
                rejected.append({"params": params, "reason": f"{type(fault).__name__}: "
                                                             f"{str(fault).strip().splitlines()[0][:200]}"})
                continue
            if tried == 1:
                default_seconds = seconds
            if best_seconds is None or seconds < best_seconds:
                best, best_seconds = params, seconds
                bar.set_postfix(best=f"{workload.flops / seconds / 1e9:.1f} GFLOPS")
    gflops = workload.flops / best_seconds / 1e9 if best_seconds else None
    database.record(target.identity, workload,
                    {"params": best, "seconds": best_seconds, "gflops": gflops} if best else None,
                    rejected, tried, traits=DeviceTraits.of(target))
    return TuneResult(target.id, workload.key, best, best_seconds, default_seconds, gflops, tried, rejected)
