"""Placement: predictions per device, the choice among them (with bounded exploration), and splits.

Pure functions of the profile, the model and the call's features: no device is touched here.
"""

from __future__ import annotations

import math

from .explain import Prediction
from .model import HUBER_LIMIT, MIN_NOISE

FEW_CALLS = 3  # a history of fewer calls that lies far above the model may be a stall (see predict)

EXPLORE_TRIES = 2  # a device is tried for a signature until this many of its calls are measured
SPLIT_GAIN = 0.85  # split only when the parts together are predicted to take at most this share of the best
SPLIT_OVERHEAD_SECONDS = 150e-6  # handing parts to threads and joining them (measured: 60-120 us, 2 cores)
HOST_COPY_BYTES_PER_SECOND = 4e9  # the parts' outputs are copied into the result
SPLIT_CANDIDATE_RATIO = 4.0  # a device predicted more than 4x slower than the best takes no part


def normal_cdf(z):
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def prior(profile, features, transfer, rate_share=1.0):
    """The profile's physical estimate: (fixed seconds = transfer + overhead, compute seconds), and where
    the call lies for the shape model. ``rate_share``: the share of the profiled rate the call can use (a CPU
    call on one of 16 threads: 1/16)."""
    fixed = transfer + profile.overhead_seconds
    compute = features.flops * features.prior_slowdown / (profile.gflops * 1e9 * rate_share)
    return fixed, compute, features.shape_point(transfer / (fixed + compute))


def predict(device, profile, shape_model, history, features, transfer, compiled, verified, calls_so_far=0,
            build_seconds=None, rate_share=1.0, signature=None, extra_overhead=0.0):
    """The device's predicted time for one call: the profile's prior (``transfer`` seconds, overhead,
    flops at the profiled rate) corrected by the device's shape model, refined by this signature's
    measured history on the device if there is one.

    A kernel not built yet adds its build time, shared among the calls this signature is expected to get:
    as many again as it has had (``calls_so_far + 1``). A shape seen once runs where nothing must be
    built; one called often moves to the faster device and pays the build once (and meanwhile the
    scheduler builds it ahead, off the caller's thread). ``build_seconds``: what a build takes on the
    device as measured so far (default: the profile's probe). ``signature``: the call's; the shape model's point
    of it is left out, so its history counts once. ``extra_overhead``: seconds per call the device's calls
    showed beyond the profile's overhead for calls of this one's data class (``DeviceModel.extra_overhead``), part
    of the prior's fixed cost."""
    overhead = profile.overhead_seconds + extra_overhead
    build = profile.compile_seconds if build_seconds is None else build_seconds
    compile_seconds = 0.0 if compiled else build / (calls_so_far + 1)
    fixed, prior_compute, point = prior(profile, features, transfer, rate_share)
    fixed += extra_overhead
    # The model as the other shapes inform it: this signature's own history is weighed in below, once.
    correction, variance = shape_model.predict(point, excluding=signature if history is not None else None)
    log_total = math.log(fixed + prior_compute) + correction
    log_variance = variance + MIN_NOISE ** 2
    count = history.count if history is not None else 0
    if count:
        history_variance = history.spread ** 2 / count + MIN_NOISE ** 2
        weight_model, weight_history = 1.0 / log_variance, 1.0 / history_variance
        z = (history.typical - log_total) / math.sqrt(log_variance + history_variance)
        stall_suspected = count < FEW_CALLS and z > HUBER_LIMIT
        if stall_suspected:
            # One or two calls far slower than the model expects: a stall (another process, a page fault) as
            # likely as a truth. Huber-weighted, and the spread covers both, so the device is tried again
            # rather than abandoned on one stalled call.
            weight_history *= HUBER_LIMIT / z
        log_model = log_total
        log_total = (log_total * weight_model + history.typical * weight_history) / (weight_model + weight_history)
        log_variance = 1.0 / (weight_model + weight_history)
        if stall_suspected:
            log_variance = max(log_variance, (0.5 * (history.typical - log_model)) ** 2)
    total = math.exp(log_total)
    # The breakdown keeps the prior's transfer and overhead; what the model adds or removes is compute.
    return Prediction(device, total + compile_seconds, transfer, max(total - fixed, 0.0), overhead, compile_seconds,
                      math.sqrt(log_variance), count, verified)


def probability_faster(a, b):
    """P(a's time < b's time) for log-normal times."""
    spread = math.sqrt(a.spread ** 2 + b.spread ** 2)
    return normal_cdf((math.log(b.seconds) - math.log(a.seconds)) / spread)


def expected_saving(other, best):
    """Seconds per call that running on ``other`` instead of ``best`` is expected to save, counting only the
    outcomes where ``other`` is faster (the expected improvement, in log space for log-normal times)."""
    spread = math.sqrt(other.spread ** 2 + best.spread ** 2)
    gap = math.log(best.seconds) - math.log(other.seconds)  # > 0 where other is predicted faster
    z = gap / spread
    improvement = gap * normal_cdf(z) + spread * math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return best.seconds * (1.0 - math.exp(-improvement))


def choose(predictions, explore, tried=None, budget=math.inf, calls_so_far=0, surcharges=None):
    """(best, device to explore or None, confidence that best is the fastest). A device is tried when what
    learning its speed is expected to save (the expected saving per call, over as many calls again as the
    signature has had) outweighs what the trial is predicted to cost over the best; ``tried``: how many times
    each device was already tried for this signature (at most EXPLORE_TRIES); ``budget``: seconds exploration
    may still cost in all; ``surcharges``: seconds a trial on each device has cost beyond its prediction so far
    (on a GPU a first call loads the kernel's module and is verified: milliseconds for a call predicted in
    tenths of one), added to the trial's cost."""
    tried = tried or {}
    surcharges = surcharges or {}
    usable = sorted((p for p in predictions if p.usable), key=lambda p: p.seconds)
    if not usable:
        return None, None, 0.0
    best = usable[0]
    confidence = min((1.0 - probability_faster(other, best) for other in usable[1:]), default=1.0)
    if not explore:
        return best, None, confidence
    candidates = []
    for other in usable[1:]:
        if max(other.measured_calls, tried.get(other.device, 0)) >= EXPLORE_TRIES:
            continue
        cost = other.seconds - best.seconds + surcharges.get(other.device, 0.0)
        value = expected_saving(other, best) * (calls_so_far + 1)
        if cost <= budget and value > cost:
            candidates.append((value - cost, other))
    trial = max(candidates, key=lambda item: item[0])[1] if candidates else None
    return best, trial, confidence


def balance(units, parts):
    """Whole units (images, channels, rows) per device so that the parts finish together.

    ``parts``: (device, fixed seconds, seconds per unit). Returns ((device, units), ...) without empty parts,
    and the predicted time of the slowest part."""
    active = list(parts)
    while active:
        inverse = sum(1.0 / per_unit for _, _, per_unit in active)
        finish = (units + sum(fixed / per_unit for _, fixed, per_unit in active)) / inverse
        too_slow = [part for part in active if part[1] >= finish]
        if not too_slow:
            break
        active = [part for part in active if part[1] < finish]
    shares = [(device, (finish - fixed) / per_unit) for device, fixed, per_unit in active]
    counts = [max(0, math.floor(share)) for _, share in shares]
    # Hand out the rounding remainder to the parts that lose most by rounding down.
    order = sorted(range(len(shares)), key=lambda i: shares[i][1] - counts[i], reverse=True)
    for i in order[:units - sum(counts)]:
        counts[i] += 1
    split = tuple((shares[i][0], counts[i]) for i in range(len(shares)) if counts[i] > 0)
    slowest = max(fixed + count * per_unit for (device, fixed, per_unit), count in zip(active, counts) if count)
    return split, slowest
