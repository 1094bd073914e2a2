"""What keeps a wrong or failing device from reaching the caller: each (device, kernel variant, shape class)
is checked on its first call at sampled outputs (``verify``: "first", "always" or "off"); a variant that gives
a wrong result is quarantined and the call's result recomputed on a verified path; a device that faults is
avoided for a growing time and the call runs where the decision then puts it.
"""

from __future__ import annotations

import logging

from ..device_array import to_host
from . import calls, decisions, verify
from . import split as split_calls
from .executors import DeviceFault

logger = logging.getLogger("sparkle.scheduler")


def checked(scheduler, plan, state, prepared, operands, result):
    """The result, checked on a sample of outputs when this (device, variant, shape class) is new (or
    always, with verify="always"); a wrong variant is quarantined and the result recomputed elsewhere."""
    key = (state.executor.identity, prepared.variant, plan.features.shape_class)
    if scheduler.verify_mode == "off" or (scheduler.verify_mode == "first" and key in scheduler._verified):
        return result
    host_operands = tuple(None if o is None else to_host(o) for o in operands)
    host_result = to_host(result)
    with scheduler._lock:
        passed, worst = verify.check(plan.op, plan.spec, host_operands, host_result, scheduler._rng)
        if passed:
            scheduler._verified.add(key)
            return result
        scheduler._quarantine.add(state.executor.identity, prepared.variant, plan.features.shape_class,
                             dict(op=plan.op, shape=plan.shape_text, worst_error_over_tolerance=worst))
        plan.runner, plan.next_review = None, plan.calls  # decide again without the variant
        bad_variant = prepared.variant
        prepared.quarantine()  # the backend moves to its next variant, if it has one
    logger.warning("sparkle scheduler: %s kernel variant %r gave a wrong result for %s %s (error %.3g x "
                   "the tolerance); it is quarantined and this call's result comes from a verified path",
                   state.id, bad_variant, plan.op, plan.shape_text, worst)
    return _recompute_verified(scheduler, plan, state, host_operands)

def _recompute_verified(scheduler, plan, failed_state, host_operands):
    """The call's result from another device whose variant verifies, else from the float64 reference."""
    for state in scheduler._states:
        if state is failed_state or not decisions.device_usable(state)[0]:
            continue
        try:
            prepared = plan.prepared_call(state)
            if scheduler._quarantine.holds(state.executor.identity, prepared.variant, plan.features.shape_class):
                continue
            result = to_host(prepared(*host_operands))
            passed, _ = verify.check(plan.op, plan.spec, host_operands, result, scheduler._rng)
        except Exception:  # noqa: BLE001 - any failure here means: try the next path
            continue
        if passed:
            scheduler._verified.add((state.executor.identity, prepared.variant, plan.features.shape_class))
            return calls.deliver(result, plan.home) if plan.home is not None else result
    result = calls.reference_result(plan.op, plan.spec, host_operands)
    return calls.deliver(result, plan.home) if plan.home is not None else result

def after_fault(scheduler, plan, state, operands, error):
    if isinstance(error, (ValueError, TypeError)) and not isinstance(error, DeviceFault):
        raise error  # bad input is the caller's, not the device's
    with scheduler._lock:
        cooldown = state.record_fault()
        plan.runner, plan.next_review = None, plan.calls
        scheduler._review(plan)
        decision = plan.decision
    logger.warning("sparkle scheduler: %s failed on %s %s (%s); avoided for %.0f s, this call runs on %s",
                   state.id, plan.op, plan.shape_text, error, cooldown, decision.choice())
    if decision.device is None and not decision.split:
        raise DeviceFault(f"no device can run {plan.op} {plan.shape_text}: the last error was {error}") from error
    if decision.split:
        return split_calls.run_split(scheduler, plan, decision, operands)
    return scheduler._run_on(plan, scheduler._by_id[decision.device], operands, decision)
