"""The cost model: per (device, op), a Gaussian process over call shapes of how far measured times lie
from the profile's prediction; per (device, call signature), a robust history of measured times.

Times are modelled in log space: errors are relative, and a slow outlier (another process, a page
fault) is one large residual that the Huber weights shrink instead of letting it drag a mean.

Why a Gaussian process and not a regression: a device's efficiency is not one power law of the GEMM
sizes (a thin 1x1 layer, a depthwise conv and a square GEMM run at very different fractions of the peak),
and a global fit lets a few overhead-bound calls drag its exponents until large calls are predicted
thousands of times too slow. The process only corrects the physical prior (overhead + transfer +
flops / profiled rate) where measured shapes are near, falls back to it far from them, and says how
uncertain it is: exactly what exploration needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Residuals beyond this many standard deviations count with a weight that shrinks as they grow (Huber).
HUBER_LIMIT = 2.5
PRIOR_NOISE = 0.3  # log-space standard deviation of a call's time before anything is measured: +-35 %
MIN_NOISE = 0.03  # timings never agree better than 3 % on a shared machine
REGIME_STREAK = 4  # this many outliers in a row on one side are a new regime, not noise
RECENT_KEPT = 8
SHAPE_FEATURES = ("log m", "log n", "log k", "thin groups", "float64", "1x1", "strided", "transfer share",
                  "split part")
POINTS_KEPT = 256  # measured signatures per (device, op) in the process, the most recently measured
# A shared offset from the prior for every shape (the profile's one GEMM probe may be off for this op):
# variance 0.25 in log space, a factor 1.65 at one standard deviation.
OFFSET_VARIANCE = 0.25
# The shape-dependent part: grids for its length scale (log units: 1 is a factor e in one GEMM size) and
# variance, chosen by marginal likelihood once enough shapes are measured.
LENGTH_SCALES = (0.6, 1.2, 2.4)
SIGNAL_VARIANCES = (0.05, 0.25, 1.0)
DEFAULT_HYPERPARAMETERS = (1.2, 0.25)
MIN_POINTS_TO_SELECT = 6
# Refitting costs a Cholesky factorization (~1 ms at 256 points, ~40 us of numpy overhead at 20; nine of them
# when the hyperparameters are chosen again), and decisions are reviewed often while a signature is new: the
# fit is refreshed once an eighth of its points are new or changed, and the hyperparameters chosen again when
# the points doubled. (Waiting for 4 changes at least saved little and slowed a split's adaptation: its parts
# are new signatures whenever the ratio moves, predicted by the fit alone.)
REFIT_SHARE = 8
# The per-call cost the profile's overhead misses (a caller woken after idle, cold caches; on the H100 machine's
# 16-core host a CPU call in a mixed stream paid 0.1-0.3 ms of it against 4 us profiled back to back) is learned
# as one additive time per device, from the calls whose compute is at most this share of their time: the median
# of what each such signature implies. Left to the shape model, it became a shared offset that small calls
# pushed up, and calls far from them (large ones) were predicted 2-4x too slow.
OVERHEAD_EVIDENCE_SHARE = 0.25
OVERHEADS_KEPT = 64
# The points are refitted with a new overhead once it moved by this share (and at least this many seconds).
OVERHEAD_TOLERANCE = 0.2
OVERHEAD_TOLERANCE_SECONDS = 2e-6
# One per-call overhead per data class of a call on the device: calls whose operands and result are all where they run
# (no bytes cross: numpy on the CPU, device arrays on their device, timed by the launch's device time) and calls
# that move data (staging, pinned copies, waiting for the result). On the H200 machine the GPU's calls on numpy
# data showed 0.29 ms beyond its profile; charged to a call on device arrays (20-30 us of host time), it kept
# them on the CPU, which had to download them first (77 us a call).
RESIDENT, MOVING = "resident", "moving"


def data_class(transfer_seconds):
    """A call's data class on a device, from the seconds its operands and result take to move there and back."""
    return MOVING if transfer_seconds > 0.0 else RESIDENT


def _kernel(a, b, length_scale, signal_variance):
    squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=2)
    return OFFSET_VARIANCE + signal_variance * np.exp(-0.5 * squared / length_scale ** 2)


class ShapeModel:
    """ln(measured seconds) - ln(prior seconds) as a Gaussian process over the call's shape features.

    ``observe`` sets a signature's point (its typical residual and that value's variance); the fit is
    refreshed lazily on the next ``predict`` after a change (cold path: at most POINTS_KEPT points)."""

    def __init__(self, points=None):
        self.points = dict(points or {})  # signature -> (features tuple, residual, variance)
        self.hyperparameters = DEFAULT_HYPERPARAMETERS
        self._fit = None
        self._changes = 0  # observations since the last fit
        self._selected_at = 0  # how many points the hyperparameters were chosen with
        self._predicted = {}  # features -> (mean, variance) under the current fit: a review predicts every device

    def observe(self, key, features, residual, variance):
        self.points.pop(key, None)
        self.points[key] = (tuple(float(v) for v in features), float(residual), float(variance))
        while len(self.points) > POINTS_KEPT:
            del self.points[next(iter(self.points))]
        self._changes += 1
        if self._changes * REFIT_SHARE >= len(self.points):
            self._fit = None

    def predict(self, features, excluding=None):
        """(mean, variance) of the log residual at ``features`` (a tuple); the variance excludes timing noise.

        ``excluding``: a signature whose own point must not count (what the other shapes say about it, to be
        weighed against its own measured history without counting that history twice)."""
        features = features if isinstance(features, tuple) else tuple(features)
        fit = self._fit if self._fit is not None else self._refit()
        length_scale, signal_variance = self.hyperparameters
        prior_variance = OFFSET_VARIANCE + signal_variance
        if fit is None:
            return 0.0, prior_variance
        if excluding in fit.index:
            return fit.without(fit.index[excluding])
        known = self._predicted.get(features)  # (emptied by every refit)
        if known is not None:
            return known
        x = np.asarray(features, float)[None, :]
        inputs, factor_inverse, alpha = fit.inputs, fit.factor_inverse, fit.alpha
        cross = _kernel(x, inputs, length_scale, signal_variance)[0]
        mean = float(cross @ alpha)
        solved = factor_inverse @ cross  # factor^-1 cross: the variance the points explain
        predicted = mean, max(prior_variance - float(solved @ solved), 1e-6)
        if len(self._predicted) >= 4 * POINTS_KEPT:
            self._predicted.clear()
        self._predicted[features] = predicted
        return predicted

    def _refit(self):
        self._predicted.clear()
        if not self.points:
            self._fit = None
            return None
        inputs = np.array([point[0] for point in self.points.values()], float)
        targets = np.array([point[1] for point in self.points.values()], float)
        noise = np.array([point[2] for point in self.points.values()], float)
        self._changes = 0
        candidates = [self.hyperparameters]
        if len(targets) >= max(MIN_POINTS_TO_SELECT, 2 * self._selected_at):
            candidates = [(scale, variance) for scale in LENGTH_SCALES for variance in SIGNAL_VARIANCES]
            self._selected_at = len(targets)
        best = None
        for length_scale, signal_variance in candidates:
            covariance = _kernel(inputs, inputs, length_scale, signal_variance) + np.diag(noise)
            try:
                factor = np.linalg.cholesky(covariance)
            except np.linalg.LinAlgError:
                continue
            # The factor's inverse once per fit: predictions are then two products, not a solve each (a
            # review predicts every device; numpy's solve costs ~10 us of overhead at these sizes).
            factor_inverse = np.linalg.inv(factor)
            alpha = factor_inverse.T @ (factor_inverse @ targets)
            evidence = -0.5 * targets @ alpha - np.log(np.diag(factor)).sum()
            if best is None or evidence > best[0]:
                best = (evidence, (length_scale, signal_variance), factor_inverse, alpha)
        if best is None:
            self._fit = None
            return None
        self.hyperparameters = best[1]
        self._fit = _Fit(inputs, best[2], best[3], targets, noise, list(self.points))
        return self._fit

    def to_json(self):
        return {"points": {key: [list(x), y, v] for key, (x, y, v) in self.points.items()}}

    @classmethod
    def from_json(cls, data):
        points = {}
        for key, (x, y, v) in data["points"].items():
            if len(x) != len(SHAPE_FEATURES) or not (math.isfinite(y) and v > 0):
                raise ValueError("model of another layout")
            points[str(key)] = (tuple(float(value) for value in x), float(y), float(v))
        return cls(points)


class _Fit:
    """A shape model's fit: the points' features, the inverse of the covariance's Cholesky factor and the
    weights (alpha) of the mean, and what leave-one-out predictions need."""

    __slots__ = ("inputs", "factor_inverse", "alpha", "targets", "noise", "index", "precision_diagonal")

    def __init__(self, inputs, factor_inverse, alpha, targets, noise, keys):
        self.inputs, self.factor_inverse, self.alpha = inputs, factor_inverse, alpha
        self.targets, self.noise = targets, noise
        self.index = {key: i for i, key in enumerate(keys)}
        self.precision_diagonal = (factor_inverse ** 2).sum(axis=0)  # the diagonal of the covariance's inverse

    def without(self, i):
        """(mean, variance) at point ``i`` from the other points alone (the closed form of leave-one-out: no
        refit); the variance excludes the point's own noise."""
        precision = float(self.precision_diagonal[i])
        mean = float(self.targets[i]) - float(self.alpha[i]) / precision
        return mean, max(1.0 / precision - float(self.noise[i]), 1e-6)


@dataclass(slots=True)
class History:
    """Measured times of one call signature on one device: count, robust mean and spread of ln(seconds).

    Updated on the hot path (about 1 us): plain floats, no function calls but one square root."""

    count: int = 0
    mean: float = 0.0
    spread: float = PRIOR_NOISE
    outliers: int = 0
    streak: int = 0  # consecutive outliers on the same side: +n slower, -n faster
    # The latest RECENT_KEPT ln(seconds), a ring: their median is what the model and the placement use while a
    # signature has few calls (one stalled call among five would drag a mean by a factor of two or more).
    recent: list = field(default_factory=list)

    @property
    def typical(self):
        """ln(seconds) of a typical recent call: the median of the latest calls (robust to a stalled one); of
        two, the faster (a stall only adds time: the faster of two is the better estimate)."""
        recent = sorted(self.recent)
        if not recent:
            return self.mean
        if len(recent) == 2:
            return recent[0]
        middle = len(recent) // 2
        return recent[middle] if len(recent) % 2 else 0.5 * (recent[middle - 1] + recent[middle])

    def add(self, log_seconds):
        """Add one measured call; True when the times changed regime (REGIME_STREAK outliers in a row on one
        side: the device slowed down or sped up), after which the history restarts from the new level."""
        count = self.count
        recent = self.recent
        if len(recent) < RECENT_KEPT:
            recent.append(log_seconds)
        else:
            recent[count % RECENT_KEPT] = log_seconds
        if count == 0:
            self.count, self.mean = 1, log_seconds
            return False
        residual = log_seconds - self.mean
        size = residual if residual >= 0.0 else -residual
        limit = HUBER_LIMIT * self.spread
        weight = 1.0
        if count >= 3 and size > limit:  # an outlier: Huber weight, and a streak on its side
            weight = limit / size
            self.outliers += 1
            side = 1 if residual > 0 else -1
            streak = self.streak + side if self.streak * side > 0 else side
            if streak >= REGIME_STREAK or streak <= -REGIME_STREAK:
                self.count, self.mean, self.spread, self.streak = 1, log_seconds, PRIOR_NOISE, 0
                recent[:] = [log_seconds]
                return True
            self.streak = streak
        else:
            self.streak = 0
        count += 1
        self.count = count
        rate = weight / count if count < 20 else weight * 0.05  # a moving window: recent calls count most
        self.mean += rate * residual
        square = residual * residual if size <= limit else limit * limit
        spread = math.sqrt((1.0 - rate) * self.spread * self.spread + rate * square)
        self.spread = max(MIN_NOISE, spread)
        return False

    def to_json(self):
        return [self.count, self.mean, self.spread, self.outliers, self.recent]

    @classmethod
    def from_json(cls, data):
        count, mean, spread, outliers, recent = data
        return cls(int(count), float(mean), float(spread), int(outliers), recent=[float(v) for v in recent])


@dataclass
class DeviceModel:
    """Everything learned about one device: a shape model per op and the history of each signature."""

    shapes: dict = field(default_factory=dict)  # op -> ShapeModel
    histories: dict = field(default_factory=dict)  # signature text -> History
    # Kernel builds measured on this device: count and mean ln(seconds). The profile's probe builds one small
    # kernel; real workloads' kernels can take far longer (PoCL: 0.06 s probed, 3-4 s measured).
    builds: int = 0
    build_log_mean: float = 0.0
    # data class -> seconds per call beyond the profile's overhead (see OVERHEAD_EVIDENCE_SHARE, RESIDENT)
    extra_overheads: dict = field(default_factory=lambda: {RESIDENT: 0.0, MOVING: 0.0})
    # data class -> signature -> the extra seconds its calls imply
    overheads: dict = field(default_factory=lambda: {RESIDENT: {}, MOVING: {}})
    # op -> signature -> (shape point, ln(typical seconds), prior fixed seconds, prior compute seconds, variance,
    # data class): what each shape-model point was made from, to make it again when an extra overhead moves.
    folds: dict = field(default_factory=dict)

    def extra_overhead(self, transfer_seconds):
        """Seconds per call beyond the profile's overhead for a call whose data take ``transfer_seconds`` to move."""
        return self.extra_overheads[data_class(transfer_seconds)]

    def observe_fold(self, op, signature, point, log_seconds, fixed, compute, variance, transfer_seconds=0.0):
        """A signature's typical time on this device: its shape-model point, and evidence of the per-call
        overhead of its data class where its compute is a small share of it."""
        kind = data_class(transfer_seconds)
        seconds = math.exp(log_seconds)
        overheads = self.overheads[kind]
        for each in self.overheads.values():
            each.pop(signature, None)
        if compute <= OVERHEAD_EVIDENCE_SHARE * seconds:
            overheads[signature] = max(seconds - fixed - compute, 0.0)
            while len(overheads) > OVERHEADS_KEPT:
                del overheads[next(iter(overheads))]
        # (else its compute is no longer a small share: its excess says more of its kernel than of the overhead)
        folds = self.folds.setdefault(op, {})
        folds.pop(signature, None)
        folds[signature] = (tuple(point), log_seconds, fixed, compute, variance, kind)
        while len(folds) > POINTS_KEPT:
            del folds[next(iter(folds))]
        extra = float(np.median(list(overheads.values()))) if overheads else 0.0
        held = self.extra_overheads[kind]
        moved = abs(extra - held)
        if moved > OVERHEAD_TOLERANCE_SECONDS and moved > OVERHEAD_TOLERANCE * max(extra, held):
            self.extra_overheads[kind] = extra
            for each_op, each_folds in self.folds.items():
                for key, values in each_folds.items():
                    if values[-1] == kind:
                        self._observe_point(each_op, key, *values)
        else:
            self._observe_point(op, signature, point, log_seconds, fixed, compute, variance, kind)

    def _observe_point(self, op, signature, point, log_seconds, fixed, compute, variance, kind):
        residual = log_seconds - math.log(fixed + self.extra_overheads[kind] + compute)
        self.shape_model(op).observe(signature, point, residual, variance)

    def observe_build(self, seconds):
        self.builds += 1
        self.build_log_mean += (math.log(max(seconds, 1e-6)) - self.build_log_mean) / min(self.builds, 20)

    def build_seconds(self, profiled):
        """Expected seconds to build a kernel for a new shape: what builds took here, else the profile's probe."""
        return math.exp(self.build_log_mean) if self.builds else profiled

    def shape_model(self, op):
        model = self.shapes.get(op)
        if model is None:
            model = self.shapes[op] = ShapeModel()
        return model

    def to_json(self):
        return {"shapes": {op: model.to_json() for op, model in self.shapes.items()},
                "histories": {key: history.to_json() for key, history in self.histories.items()},
                "builds": [self.builds, self.build_log_mean], "extra_overheads": dict(self.extra_overheads),
                "overheads": {kind: dict(values) for kind, values in self.overheads.items()},
                "folds": {op: {key: [list(point), *rest] for key, (point, *rest) in folds.items()}
                          for op, folds in self.folds.items()}}

    @classmethod
    def from_json(cls, data):
        builds, build_log_mean = data["builds"]
        kinds = (RESIDENT, MOVING)
        folds = {op: {str(key): (tuple(float(v) for v in point), *(float(v) for v in rest[:4]), str(rest[4]))
                      for key, (point, *rest) in op_folds.items()} for op, op_folds in data["folds"].items()}
        if any(len(values) != 6 or values[5] not in kinds for op_folds in folds.values()
               for values in op_folds.values()) or set(data["extra_overheads"]) != set(kinds):
            raise ValueError("model of another layout")
        return cls({op: ShapeModel.from_json(m) for op, m in data["shapes"].items()},
                   {key: History.from_json(h) for key, h in data["histories"].items()}, int(builds),
                   float(build_log_mean), {kind: float(data["extra_overheads"][kind]) for kind in kinds},
                   {kind: {str(key): float(value) for key, value in data["overheads"][kind].items()}
                    for kind in kinds}, folds)
