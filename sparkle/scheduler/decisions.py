"""The scheduler's decisions: each device's predicted time for a call (transfers, compute, overhead, compile,
a build it waits for), and the choice among them (forced, split, explored or fastest) with its reason in words.
Functions of the Scheduler's state; the Scheduler calls them on its review calls, never on the hot path."""

from __future__ import annotations

import dataclasses
import math
import time

from . import builds, policy
from . import split as split_calls
from .explain import Decision, Prediction

DEVICE_ENV = "SPARKLE_DEVICE"


def decide(scheduler, plan, explore, budget=0.0):
    """The plan's Decision: forced, split, an exploration trial, or the device predicted fastest."""
    predictions = tuple(predict(scheduler, state, plan) for state in scheduler._states)
    if scheduler.forced is not None:
        forced = next(p for p in predictions if p.device == scheduler.forced)
        return Decision(plan.op, plan.shape_text, scheduler.forced, predictions=predictions,
                        predicted_seconds=forced.seconds, verified=forced.verified, forced=True,
                        reason=f"${DEVICE_ENV}={scheduler.forced} forces every call onto this device")
    surcharges = {state.id: state.trial.seconds for state in scheduler._states}
    best, trial, confidence = policy.choose(predictions, explore, plan.trials, budget, plan.calls, surcharges)
    if best is None:
        notes = "; ".join(f"{p.device}: {p.note}" for p in predictions)
        return Decision(plan.op, plan.shape_text, None, predictions=predictions, confidence=0.0,
                        reason=f"no device can run it now ({notes})")
    split = split_calls.plan_split(scheduler, plan, predictions, best)
    if split is not None:
        parts, axis, seconds = split
        share = ", ".join(f"{device} {fraction:.0%}" for device, fraction in parts)
        return Decision(plan.op, plan.shape_text, None, split=parts, split_axis=axis, predictions=predictions,
                        predicted_seconds=seconds, confidence=confidence,
                        verified=all(p.verified for p in predictions if p.device in dict(parts)),
                        reason=f"splitting by {axis} ({share}) is predicted to take {seconds / best.seconds:.0%} "
                               f"of the fastest single device ({best.device})")
    if trial is not None:
        return Decision(plan.op, plan.shape_text, trial.device, predictions=predictions,
                        predicted_seconds=trial.seconds, confidence=confidence, verified=trial.verified,
                        explored=True, reason=f"trying {trial.device} to learn its speed: it is faster than "
                                              f"{best.device} with probability "
                                              f"{policy.probability_faster(trial, best):.0%}")
    return Decision(plan.op, plan.shape_text, best.device, predictions=predictions,
                    predicted_seconds=best.seconds, confidence=confidence, verified=best.verified,
                    reason=reason(best, predictions))

def best_usable(decision):
    return min((p for p in decision.predictions if p.usable), key=lambda p: p.seconds)

def device_usable(state):
    """(whether ``state``'s device can take calls now, why not)."""
    if state.profile is None:
        return False, "not profiled"
    if state.avoid_until > time.monotonic():
        return False, f"avoided after {state.faults} fault(s), for {state.avoid_until - time.monotonic():.0f} s more"
    return True, ""

def predict(scheduler, state, plan, part=None, features=None):
    """``state``'s Prediction for the plan (or one part of a split), with the reasons it cannot run it."""
    usable, note = device_usable(state)
    features = features or plan.features
    if state.profile is None:
        return Prediction(state.id, math.inf, 0.0, 0.0, 0.0, 0.0, 1.0, 0, False, False, note)
    verified = False
    compiled = True
    rate_share = 1.0
    try:
        prepared = plan.prepared_call(state, part)
        rate_share = prepared.rate_share
        compiled = prepared.compiled and state.id not in plan.warming
        verified = (state.executor.identity, prepared.variant, features.shape_class) in scheduler._verified
        if scheduler._quarantine.holds(state.executor.identity, prepared.variant, features.shape_class):
            usable, note = False, f"kernel variant {prepared.variant!r} is quarantined for this shape class"
    except Exception as error:  # noqa: BLE001 - a device that cannot prepare the call cannot run it
        usable, note = False, f"cannot prepare the call: {error}"
    signature = plan.signature if part is None else f"{plan.signature}|part={part}"
    history = state.model.histories.get(signature)
    transfer = transfer_seconds(scheduler, state, plan, features)
    prediction = policy.predict(state.id, state.profile, state.shape_model(plan.op), history, features, transfer,
                                compiled, verified, plan.calls,
                                state.model.build_seconds(state.profile.compile_seconds), rate_share, signature,
                                state.model.extra_overhead(transfer))
    if part is None and plan.primed and state.id not in plan.primed and state.first_call.seconds > 0.0:
        # The signature runs elsewhere already: moving it here pays a first call's one-time costs, shared like
        # a build among as many calls again as it has had (the kernel is primed ahead meanwhile: builds.py).
        surcharge = state.first_call.seconds / (plan.calls + 1)
        prediction = replace(prediction, seconds=prediction.seconds + surcharge,
                             compile=prediction.compile + surcharge, note="its first call here")
    busy = builds.busy_seconds(scheduler, state, plan)
    if busy > 0.0:
        prediction = replace(prediction, seconds=prediction.seconds + busy, compile=prediction.compile + busy,
                              note="waits for a kernel build")
    if not usable:
        return replace(prediction, usable=False, note=note)
    return prediction

def transfer_seconds(scheduler, state, plan, features):
    """Seconds to bring the operands to ``state``'s device and the result to where it must end up."""
    seconds = 0.0
    for size, home in zip(features.operand_bytes, plan.operand_homes):
        seconds += move_seconds(scheduler, size, home, state.executor)
    return seconds + move_seconds(scheduler, features.output_bytes, state.executor, plan.home)

def move_seconds(scheduler, size, source, target):
    """Seconds to move ``size`` bytes from ``source`` to ``target`` (executors; None: the host)."""
    if source is target or not size:
        return 0.0
    seconds = 0.0
    if source is not None:  # off the source device
        profile = scheduler._by_executor[id(source)].profile
        seconds += profile.download_latency_seconds + size / profile.download_bytes_per_second if profile else 0.0
    if target is not None:
        profile = scheduler._by_executor[id(target)].profile
        seconds += profile.upload_latency_seconds + size / profile.upload_bytes_per_second if profile else 0.0
    return seconds


def reason(best, predictions):
    """The decision's one-line reason in words."""
    others = sorted((p for p in predictions if p.usable and p is not best), key=lambda p: p.seconds)
    if not others:
        return f"the only usable device ({', '.join(f'{p.device}: {p.note}' for p in predictions if not p.usable)})" \
            if len(predictions) > 1 else "the only device"
    runner_up = others[0]
    ratio = runner_up.seconds / best.seconds
    why = max((("transfers", runner_up.transfer - best.transfer), ("compute", runner_up.compute - best.compute),
               ("per-call overhead", runner_up.overhead - best.overhead),
               ("compiling a new kernel", runner_up.compile - best.compile)), key=lambda item: item[1])[0]
    return f"predicted {ratio:.1f}x faster than {runner_up.device} (which loses most on {why})"


def replace(decision_or_prediction, **changes):
    return dataclasses.replace(decision_or_prediction, **changes)
