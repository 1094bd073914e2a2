"""Splitting one call across devices: how to share it out (by images or output channels, rows or columns,
in proportion to the devices' predicted speeds) and running the parts at once, each verified and timed like
a whole call, a failing part rerun elsewhere.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

from ..device_array import to_host
from . import calls, decisions, policy, verify
from .executors import is_sample

logger = logging.getLogger("sparkle.scheduler")


def plan_split(scheduler, plan, predictions, best):
    """((device, fraction), ...), axis and predicted seconds of the best split, or None if none pays."""
    axis, units = calls.split_axis(plan.op, plan.spec)
    if units < 2 or plan.home is not None:
        return None
    candidates = [p for p in predictions if p.usable and p.seconds <= policy.SPLIT_CANDIDATE_RATIO * best.seconds]
    # Devices computing on the host's cores (the CPU backend, an OpenCL CPU driver) would share them: at most
    # one of them, the fastest, takes a part.
    on_host = sorted((p for p in candidates if scheduler._by_id[p.device].executor.kind == "cpu"),
                     key=lambda p: p.seconds)
    candidates = [p for p in candidates if p not in on_host[1:]]
    if len(candidates) < 2:
        return None
    parts = [(p.device, p.overhead + p.compile, max(p.seconds - p.overhead - p.compile, 1e-9) / units)
             for p in candidates]
    split, slowest = policy.balance(units, parts)
    for _ in range(2):  # refine with the predictions of the parts themselves (efficiency changes with size)
        if len(split) < 2:
            return None
        refined = []
        start = 0
        for device, count in split:
            part = (start, start + count)
            start += count
            prediction = decisions.predict(scheduler, scheduler._by_id[device], plan, part,
                                            plan.features.part(count / units, axis))
            fixed = prediction.overhead + prediction.compile
            refined.append((device, fixed, max(prediction.seconds - fixed, 1e-9) / count))
        split, slowest = policy.balance(units, refined)
    if len(split) < 2:
        return None
    # Parts on devices that write their slice of the result in place cost no copy; the others' results are
    # copied in at host speed.
    copied = sum(count for device, count in split if not scheduler._by_id[device].executor.writes_parts_in_place)
    seconds = (slowest + policy.SPLIT_OVERHEAD_SECONDS
               + copied / units * plan.features.output_bytes / policy.HOST_COPY_BYTES_PER_SECOND)
    if seconds > policy.SPLIT_GAIN * best.seconds:
        return None
    return tuple((device, count / units) for device, count in split), axis, seconds


def run_split(scheduler, plan, decision, operands):
    axis, units = calls.split_axis(plan.op, plan.spec)
    parts, start = [], 0
    for device, fraction in decision.split:
        count = max(1, round(fraction * units)) if device != decision.split[-1][0] else units - start
        parts.append((scheduler._by_id[device], (start, start + count)))
        start += count
    # Each part writes its slice of the result itself; the result lies where the largest part lands fastest
    # (a GPU's pinned memory), so the bulk of it needs no copy at host speed.
    owner = max(parts, key=lambda item: (item[0].executor.kind == "gpu", item[1][1] - item[1][0]))[0]
    out = owner.executor.host_array(calls.output_shape(plan.op, plan.spec), plan.spec.dtype)
    if scheduler._split_pool is None:
        scheduler._split_pool = ThreadPoolExecutor(max_workers=max(2, len(scheduler._states)),
                                                   thread_name_prefix="sparkle-split")
    futures = [scheduler._split_pool.submit(_run_part, scheduler, plan, state, part, operands, out, axis, units)
               for state, part in parts[1:]]
    _run_part(scheduler, plan, *parts[0], operands, out, axis, units)
    for future in futures:
        future.result()
    with plan.lock:
        plan.calls += 1
    return out


def _run_part(scheduler, plan, state, part, operands, out, axis, units):
    start, stop = part
    part_operands = calls.part_operands(plan.op, axis, operands, start, stop)
    target = calls.part_view(plan.op, axis, out, start, stop)
    features = plan.features.part((stop - start) / units, axis)
    try:
        prepared = plan.prepared_call(state, part)
        compiled = prepared.compiled
        begin = time.perf_counter()
        prepared.run_into(target, *part_operands)
        seconds = time.perf_counter() - begin
    except Exception as error:  # noqa: BLE001 - the part runs on the CPU (or the reference) instead
        with scheduler._lock:
            state.record_fault()
            plan.next_review = plan.calls
        logger.warning("sparkle scheduler: %s failed on part %s of %s %s (%s); the part runs elsewhere",
                       state.id, part, plan.op, plan.shape_text, error)
        target[...] = _part_elsewhere(scheduler, plan, state, part, part_operands)
        return
    part_spec = calls.part_spec(plan.op, plan.spec, start, stop)
    key = (state.executor.identity, prepared.variant, features.shape_class)
    if scheduler.verify_mode == "always" or (scheduler.verify_mode == "first" and key not in scheduler._verified):
        passed, worst = verify.check(plan.op, part_spec, part_operands, target, scheduler._rng)
        with scheduler._lock:
            if passed:
                scheduler._verified.add(key)
            else:
                scheduler._quarantine.add(*key, dict(op=plan.op, shape=plan.shape_text, part=part,
                                                worst_error_over_tolerance=worst))
                plan.next_review = plan.calls
        if not passed:
            logger.warning("sparkle scheduler: %s kernel variant %r gave a wrong result; quarantined",
                           state.id, prepared.variant)
            target[...] = calls.reference_result(plan.op, part_spec, part_operands)
    if is_sample(prepared, compiled, seconds, decisions.predict(scheduler, state, plan, part, features).seconds):
        signature = f"{plan.signature}|part={part}"
        history = state.history(signature)
        with plan.lock:
            history.add(math.log(max(seconds, 1e-9)))
        with scheduler._lock:
            scheduler._note_measured(state, plan.op, signature, features, history,
                                     decisions.transfer_seconds(scheduler, state, plan, features), prepared.rate_share)
        scheduler._records.append((plan.op, f"{plan.shape_text} part {start}:{stop} of {axis}", state.id,
                              float("nan"), seconds, 1))


def _part_elsewhere(scheduler, plan, failed_state, part, part_operands):
    """A failed part's result from the CPU executor if it is usable and not the one that failed, else from the
    float64 reference."""
    for state in scheduler._states:
        if state is failed_state or state.executor.kind != "cpu":
            continue
        try:
            return to_host(plan.prepared_call(state, part)(*part_operands))
        except Exception:  # noqa: BLE001 - fall through to the reference
            break
    return calls.reference_result(plan.op, calls.part_spec(plan.op, plan.spec, *part), part_operands)
