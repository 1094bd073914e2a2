"""sparkle.Scheduler: places every call on the device predicted fastest (or splits it), learns from what
it measures, verifies each kernel variant on its first call, and explains its decisions.

Hot path: a repeated call signature finds its plan in a dict and runs the prepared call of its device;
it then adds the measured time to plain-float statistics and appends one tuple to a list. Everything
else (decisions, model updates, verification, splits, exploration) runs on the plan's review calls,
which come geometrically less often as a signature ages and never cost more than a small share of its calls
(reviews.py), or at once when a device's times change regime or a device faults.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import math
import os
import threading
import time
import weakref
from math import log
from time import perf_counter

import numpy as np

from .. import api
from .. import signature as signatures
from ..device_array import DeviceArray
from . import builds, calls, decisions, policy, reviews, safeguards
from . import split as split_calls
from .decisions import DEVICE_ENV
from .executors import CpuExecutor, DeviceFault, OpenCLExecutor, is_sample
from .model import MIN_NOISE
from .profile import ProfileStore, ensure_profiles
from .state import DeviceState, Plan
from .store import ModelStore, QuarantineStore

logger = logging.getLogger("sparkle.scheduler")

VERIFY_MODES = ("first", "always", "off")
VERIFY_ENV, LOG_ENV = "SPARKLE_VERIFY", "SPARKLE_LOG"
EXPLORE_BUDGET_SHARE = 0.05  # exploration may cost at most 5 % of the time spent...
EXPLORE_ALLOWANCE_SECONDS = 0.05  # ...plus this much
HISTORY_LIMIT = 100_000
FOLD_COUNT_LIMIT = 4  # repeated calls of one signature count as at most this many independent samples
PLANS_KEPT = 512  # call signatures with a cached plan (each holds prepared calls and their buffers)


class UnscheduledDevice(ValueError):
    """An operand lives on a device the scheduler does not place calls on (a simulator, an unavailable device)."""


class Scheduler:
    """Places conv2d and matmul calls on the best device, learning from every call.

    ``devices``: executors or device ids (default: the CPU and every available OpenCL device).
    ``verify``: "first" (default; check the first call of each device, kernel variant and shape class on a
    sample of outputs), "always" or "off"; ``$SPARKLE_VERIFY`` sets the default. ``explore``: try a device
    that may be faster, within a bounded budget. ``persist``: keep profiles and the model in the cache
    directory (``cache_dir`` overrides it). ``$SPARKLE_DEVICE=<id>`` forces every call onto one device.
    """

    def __init__(self, devices=None, *, verify=None, explore=True, persist=True, cache_dir=None, progress=True):
        verify = os.environ.get(VERIFY_ENV, "first") if verify is None else verify
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES} (argument or ${VERIFY_ENV}), got {verify!r}")
        self.verify_mode = verify
        self.explore = bool(explore)
        self.progress = progress
        self._lock = threading.RLock()
        self._profiles = ProfileStore(cache_dir) if persist else None
        self._models = ModelStore(cache_dir if persist else None, persist)
        self._quarantine = QuarantineStore(cache_dir if persist else None, persist)
        executors = _default_executors() if devices is None else [_executor(d) for d in devices]
        if not executors:
            raise ValueError("devices must name at least one device, got an empty list")
        ids = [e.id for e in executors]
        if len(set(ids)) != len(ids):
            raise ValueError(f"devices must not repeat a device, got {ids}")
        self._states = [DeviceState(e, self._models.model(e.identity)) for e in executors]
        self._by_id = {state.id: state for state in self._states}
        self._by_executor = {id(state.executor): state for state in self._states}
        forced = os.environ.get(DEVICE_ENV) or None
        if forced is not None and forced not in self._by_id:
            raise ValueError(f"${DEVICE_ENV} must be one of {ids}, got {forced!r}")
        self.forced = forced
        self._log_decisions = "decisions" in os.environ.get(LOG_ENV, "").split(",")
        if self._log_decisions and not logger.handlers:
            logger.addHandler(logging.StreamHandler())
            logger.setLevel(logging.INFO)
        self._plans = {}
        self._unscheduled = {}  # signature key -> why it is not placed here (an operand on another device)
        # (signature, device) -> (state, op, signature, features, history, transfer seconds): signatures measured
        # since the last fold into the shape models
        self._unfolded = {}
        self._dirty = set()  # plans whose fast path ran since the last fold
        self._records = collections.deque(maxlen=HISTORY_LIMIT)
        self._verified = set()
        self._spent_seconds = 0.0
        self._explored_excess = 0.0
        self._review_seconds = reviews.FIRST_GUESS_SECONDS  # a review's cost here: an average of measured ones
        self._split_pool = None
        self._build_pool = None  # one thread building kernels ahead while another device serves the calls
        self._builds_running = 0  # calls timed meanwhile are not samples: a build takes a host core
        self._rng = np.random.default_rng(0)
        if persist:
            atexit.register(_save_at_exit, weakref.ref(self))

    # --- public API ---------------------------------------------------------------------------------

    @property
    def devices(self):
        """The ids of the devices this scheduler places calls on."""
        return [state.id for state in self._states]

    def conv2d(self, x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None):
        """``sparkle.conv2d`` on the device this scheduler picks (see :func:`sparkle.conv2d`)."""
        return self._conv2d_positional(x, w, bias, stride, padding, dilation, groups, activation)

    def _conv2d_positional(self, x, w, bias, stride, padding, dilation, groups, activation):
        """:meth:`conv2d` with every argument by position: ``sparkle.conv2d``'s hot path (keywords cost ~0.5 us)."""
        try:
            key = signatures.conv2d_key(x, w, bias, stride, padding, dilation, groups, activation)
            plan = self._plans.get(key)
        except (AttributeError, TypeError):  # not arrays, or unhashable arguments: the slow path says why
            key, plan = None, None
        if plan is None:
            self._refuse_unscheduled(key)
            spec = api.conv2d_spec(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                   activation=activation)
            plan = self._plan(key, "conv2d", spec, (x, w, bias))
        return self._call(plan, (x, w, bias))

    def matmul(self, a, b):
        """``sparkle.matmul`` on the device this scheduler picks."""
        try:
            key = signatures.matmul_key(a, b)
            plan = self._plans.get(key)
        except (AttributeError, TypeError):
            key, plan = None, None
        if plan is None:
            self._refuse_unscheduled(key)
            plan = self._plan(key, "matmul", api.matmul_spec(a, b), (a, b))
        return self._call(plan, (a, b))

    def explain(self, op, *args, **kwargs):
        """The :class:`Decision` this scheduler would take for ``op`` ("conv2d" or "matmul") with these
        arguments (those of ``sparkle.conv2d`` / ``sparkle.matmul``, without ``device``); runs nothing."""
        if op not in ("conv2d", "matmul"):
            raise ValueError(f"op must be 'conv2d' or 'matmul', got {op!r}")
        spec = api.conv2d_spec(*args, **kwargs) if op == "conv2d" else api.matmul_spec(*args, **kwargs)
        operands = calls.operands(op, args, kwargs)
        try:  # the plan the call would take, if it has one: its built kernels and its calls so far count
            key_of = signatures.conv2d_key if op == "conv2d" else signatures.matmul_key
            plan = self._plans.get(key_of(*args, **kwargs))
        except (AttributeError, TypeError):
            plan = None
        if plan is None:
            plan = Plan(op, spec, tuple(self._home_of(o) for o in operands))
        with self._lock:
            ensure_profiles(self)
            self._fold_pending()
            return decisions.decide(self, plan, explore=False)

    def profile(self, force=False):
        """Profile every device not yet profiled (or all of them with ``force``); returns {id: DeviceProfile}."""
        with self._lock:
            ensure_profiles(self, force=force)
            return {state.id: state.profile for state in self._states}

    def history(self, last=None):
        """The measured calls, oldest first: dicts of op, shape, device, predicted and measured seconds, and
        calls: how many calls the record stands for on that device (itself and the untimed calls before it: past
        its first 64 calls, a repeated signature whose calls are predicted under 0.2 ms is timed one call in a
        few, ``reviews.sample_stride``); ``last``: only the latest that many records."""
        if last is not None and (not isinstance(last, int) or isinstance(last, bool)):
            raise TypeError(f"last must be a non-negative int or None, got {last!r}")
        if last is not None and last < 0:
            raise ValueError(f"last must be a non-negative int or None, got {last!r}")
        records = list(self._records) if last is None else list(itertools.islice(reversed(self._records), last))[::-1]
        return [dict(op=op, shape=shape, device=device, predicted=predicted, measured=measured, calls=calls)
                for op, shape, device, predicted, measured, calls in records]

    def reset(self):
        """Forget everything learned (model, histories, verifications, quarantine, plans), here and on disk.
        Profiles are kept; ``profile(force=True)`` measures them again."""
        with self._lock:
            self._plans.clear()
            self._unfolded = {}
            self._dirty = set()
            self._records.clear()
            self._verified.clear()
            self._spent_seconds = self._explored_excess = 0.0
            self._models.clear()
            self._quarantine.clear()
            for state in self._states:
                state.model = self._models.model(state.executor.identity)
                state.faults, state.avoid_until = 0, 0.0

    def save(self):
        """Write the learned model to the cache directory now (also done at exit)."""
        with self._lock:
            self._fold_pending()
            self._models.save()

    # --- the call path --------------------------------------------------------------------------------

    def _refuse_unscheduled(self, key):
        """Raise at once for a signature already found to have an operand on a device this scheduler does not
        use (sparkle.conv2d then runs it there): validating it again on every call cost ~60 us on PoCL."""
        message = self._unscheduled.get(key) if key is not None else None
        if message is not None:
            raise UnscheduledDevice(message)

    def _plan(self, key, op, spec, operands):
        try:
            homes = tuple(self._home_of(o) for o in operands)
        except UnscheduledDevice as error:
            if key is not None:
                if len(self._unscheduled) >= PLANS_KEPT:
                    self._unscheduled.clear()
                self._unscheduled[key] = str(error)
            raise
        plan = Plan(op, spec, homes)
        if key is not None:
            with self._lock:
                if key not in self._plans and len(self._plans) >= PLANS_KEPT:
                    del self._plans[next(iter(self._plans))]  # the oldest signature: its prepared calls go too
                plan = self._plans.setdefault(key, plan)
        return plan

    def _call(self, plan, operands):
        runner = plan.runner
        if runner is None or plan.calls >= plan.next_review:
            return self._slow_call(plan, operands)
        countdown = plan.countdown - 1
        if countdown > 0:  # counted, not timed (reviews.sample_stride); a lost count between threads is harmless
            plan.countdown = countdown
            start = None
        else:
            covered = plan.period  # this call and the untimed ones since the last timed call
            plan.period = plan.countdown = reviews.sample_period(plan.calls, plan.sample_every)
            start = perf_counter()
        try:
            result = runner(*operands)
        except Exception as error:  # noqa: BLE001 - a device fault: the slow path records it, runs elsewhere
            return safeguards.after_fault(self, plan, plan.state, operands, error)
        if start is not None:
            self._note_fast_call(plan, covered, perf_counter() - start)
        if plan.home is not None and plan.state.executor is not plan.home:
            result = calls.deliver(result, plan.home)
        if self._log_decisions:
            logger.info("%s (cached)", plan.decision.summary())
        return result

    def _note_fast_call(self, plan, covered, seconds):
        """The hot path's bookkeeping of a timed call standing for ``covered`` calls: plain floats, a set and a
        deque; folded into the model on review."""
        self._spent_seconds += covered * seconds
        timer = plan.timer
        # Queued on the device, a call returns before it ran: what counts is the device time of a launch that has
        # run (sampled, read without waiting), not this call's host time.
        measured = (seconds,) if timer is None else timer.after_call()
        with plan.lock:
            plan.calls += covered
            for seconds in measured:
                plan.fast_calls += 1
                if self._builds_running:
                    continue
                log_seconds = log(seconds) if seconds > 1e-9 else -20.7
                history = plan.history
                if history.add(log_seconds) or (log_seconds > plan.surprise_log and
                                                history.typical > plan.surprise_log):
                    # Its times changed regime, or its typical time is now above what another device was
                    # predicted to take (the premise of the decision): decide again on the next call.
                    plan.next_review = plan.calls
        if measured:
            self._dirty.add(plan)
            for seconds in measured:
                self._records.append((plan.op, plan.shape_text, plan.state.id, plan.predicted, seconds, covered))
                covered = 1  # a timer's readings beyond the first stand for themselves

    def _record(self, plan, state, history, seconds, transfer_seconds, predicted):
        """Hot-path bookkeeping: plain floats and list appends only."""
        with plan.lock:
            plan.calls += 1
            if history.add(math.log(max(seconds, 1e-9))):
                plan.next_review = plan.calls  # its times changed regime: decide again on the next call
        self._note_measured(state, plan.op, plan.signature, plan.features, history, transfer_seconds,
                            plan.prepared_call(state).rate_share)
        self._records.append((plan.op, plan.shape_text, state.id, predicted, seconds, 1))
        self._spent_seconds += seconds

    def _note_measured(self, state, op, signature, features, history, transfer_seconds, rate_share=1.0,
                       table=None):
        """Remember that ``signature`` was measured on ``state`` since the last fold (in ``table``, default the
        scheduler's)."""
        table = self._unfolded if table is None else table
        table[(signature, state.id)] = (state, op, signature, features, history, transfer_seconds, rate_share)

    def _slow_call(self, plan, operands):
        with self._lock:
            ensure_profiles(self)
            if plan.decision is None or plan.calls >= plan.next_review:
                self._review(plan)
            decision, trial = plan.decision, plan.trial
            plan.trial = None
        if self._log_decisions:
            logger.info("%s%s", decision.summary(), f" (trying {trial} to learn its speed)" if trial else "")
        if decision.split and trial is None:
            return split_calls.run_split(self, plan, decision, operands)
        if decision.device is None:
            raise DeviceFault(f"no device can run {plan.op} {plan.shape_text}: {decision.reason}")
        state = self._by_id[trial or decision.device]
        return self._run_on(plan, state, operands, decision, explored=trial is not None)

    def _run_on(self, plan, state, operands, decision, explored=False):
        try:
            prepared = plan.prepared_call(state)
            compiled = prepared.compiled
            first_here = state.id not in plan.primed
            # The result stays on the device where the operands live: the call returns once queued, and its
            # time is the launch's device time.
            timer = plan.launch_timer(state) if plan.home is state.executor else None
            token = timer.before_call() if timer is not None else None
            start = time.perf_counter()
            result = prepared(*operands)
            seconds = time.perf_counter() - start
            if timer is not None:
                seconds = timer.wait_for_call(token) or seconds
        except Exception as error:  # noqa: BLE001 - any failure of a device is a fault (bad input re-raised)
            return safeguards.after_fault(self, plan, state, operands, error)
        prediction = next((p for p in decision.predictions if p.device == state.id), None)
        predicted = prediction.seconds if prediction else float("nan")
        transfer = prediction.transfer if prediction else 0.0
        result = safeguards.checked(self, plan, state, prepared, operands, result)
        trial_seconds = time.perf_counter() - start  # the verification included: the whole cost of a trial
        if not compiled and prediction is not None:  # this call built its kernel: learn what a build costs
            with self._lock:
                state.model.observe_build(max(seconds - (prediction.seconds - prediction.compile), 0.1 * seconds))
        sampled = is_sample(prepared, compiled, seconds, predicted) and not self._builds_running
        if sampled:
            self._record(plan, state, state.history(plan.signature), seconds, transfer, predicted)
        else:
            with plan.lock:
                plan.calls += 1
            self._records.append((plan.op, plan.shape_text, state.id, predicted, seconds, 1))
        plan.primed.add(state.id)
        with self._lock:
            if first_here and compiled and prediction is not None:
                state.first_call.observe(trial_seconds - (prediction.seconds - prediction.compile))
            if explored:
                self._explored_excess += max(0.0, trial_seconds - decision.predicted_seconds)
                state.trial.observe(trial_seconds - decision.predicted_seconds)
            if plan.runner is None and self.verify_mode != "always":
                if not explored and sampled and reviews.confirms(decision, state.id, seconds):
                    self._arm(plan)  # as the decision expected: the fast path from the next call, no review
                    plan.next_review = max(plan.next_review, plan.calls + reviews.spacing(
                        plan.calls, decision, self._review_seconds))
                else:
                    plan.next_review = plan.calls  # verified, compiled or explored now: decide again next call
        if plan.home is not None and state.executor is not plan.home:
            result = calls.deliver(result, plan.home)
        return result

    # --- decisions ------------------------------------------------------------------------------------

    def _review(self, plan):
        """Fold new measurements into the model and decide this plan's placement again (lock held)."""
        start = time.perf_counter()
        self._decide(plan)
        self._arm(plan)
        seconds = time.perf_counter() - start  # a first review that prepared a call counts at most 4x the average
        self._review_seconds += 0.1 * (min(seconds, 4.0 * self._review_seconds) - self._review_seconds)

    def _decide(self, plan):
        self._fold_pending()
        budget = EXPLORE_ALLOWANCE_SECONDS + EXPLORE_BUDGET_SHARE * self._spent_seconds - self._explored_excess
        decision = decisions.decide(self, plan, explore=self.explore and budget > 0, budget=budget)
        plan.decision = decision
        plan.trial = decision.device if decision.explored else None
        if decision.explored:
            # the decision names the trial; the plan keeps the best for later calls
            plan.trials[decision.device] = plan.trials.get(decision.device, 0) + 1
            best = decisions.best_usable(decision)
            plan.decision = decisions.replace(decision, device=best.device, explored=False,
                                              predicted_seconds=best.seconds, verified=best.verified,
                                              reason=decisions.reason(best, decision.predictions))
        plan.next_review = plan.calls + reviews.spacing(plan.calls, plan.decision, self._review_seconds)
        plan.runner = None
        builds.build_ahead(self, plan, decision)

    def _arm(self, plan):
        """Give the plan its fast path (the prepared call, bound) where its decision is final: one device,
        its kernel built and verified (lock held)."""
        device = plan.decision.device
        if device is None or plan.decision.split or plan.trial:
            return
        state = self._by_id[device]
        try:
            prepared = plan.prepared_call(state)
        except Exception:  # noqa: BLE001 - preparing faulted: the slow path will meet it and record it
            return
        verified = (state.executor.identity, prepared.variant, plan.features.shape_class) in self._verified
        if prepared.compiled and (verified or self.verify_mode == "off") and self.verify_mode != "always":
            prediction = next(p for p in plan.decision.predictions if p.device == device)
            plan.state, plan.history = state, state.history(plan.signature)
            plan.transfer_seconds = prediction.transfer
            plan.predicted = prediction.seconds
            # The decision holds while calls here stay below every other usable device's prediction.
            plan.surprise_log = math.log(reviews.premise_seconds(plan.decision, device))
            plan.timer = plan.launch_timer(state) if plan.home is state.executor else None
            # A LaunchTimer samples launches itself: it is told of every call.
            plan.sample_every = 1 if plan.timer is not None else reviews.sample_stride(prediction.seconds)
            plan.countdown = plan.period = 1  # the first fast call is timed
            # Numpy operands (home None) skip the conversions a device array would need.
            plan.runner = prepared.host_run if plan.home is None else prepared.run

    def _fold_pending(self):
        """Fold what was measured since the last fold into the shape models: per (signature, device), the
        history's typical time becomes that signature's point (repeated calls are not independent evidence:
        they narrow its variance as FOLD_COUNT_LIMIT calls at most)."""
        unfolded, self._unfolded = self._unfolded, {}
        dirty, self._dirty = self._dirty, set()
        for plan in dirty:
            calls, plan.fast_calls = plan.fast_calls, 0
            if calls and plan.state is not None:
                self._note_measured(plan.state, plan.op, plan.signature, plan.features, plan.history,
                                    plan.transfer_seconds, plan.prepared_call(plan.state).rate_share, unfolded)
        for state, op, signature, features, history, transfer, rate_share in unfolded.values():
            if state.profile is None or not history.count:
                continue
            fixed, compute, point = policy.prior(state.profile, features, transfer, rate_share)
            variance = history.spread ** 2 / min(history.count, FOLD_COUNT_LIMIT) + MIN_NOISE ** 2
            state.model.observe_fold(op, signature, point, history.typical, fixed, compute, variance, transfer)
        if unfolded:
            self._models.mark_changed(len(unfolded))

    def _home_of(self, operand):
        if isinstance(operand, DeviceArray):
            for state in self._states:
                if state.executor.holds(operand):
                    return state.executor
            raise UnscheduledDevice(f"an operand lives on {operand.device}, which this scheduler does not use "
                                    f"(its devices: {self.devices})")
        return None


# --- helpers -----------------------------------------------------------------------------------------


def _default_executors():
    from ..devices import opencl_backend_device, opencl_unavailable_reason
    from ..opencl import runtime

    executors = [CpuExecutor()]
    if opencl_unavailable_reason() is None:
        for device in runtime.opencl_devices():
            # An OpenCL CPU driver (PoCL) runs on the cores the Numba backend already uses, at 6-12 % of its
            # speed, and its worker threads compete with Numba's: it is no second device. Name it in
            # Scheduler(devices=[...]) to include it.
            if device.simulator or device.kind == "cpu":
                continue
            try:
                executors.append(OpenCLExecutor(opencl_backend_device(device.id)))
            except ValueError:  # unavailable (its health check failed): not a place to run calls
                continue
    return executors


def _executor(device):
    from ..devices import opencl_backend_device
    from .executors import Executor

    if isinstance(device, Executor):
        return device
    if device == "cpu":
        return CpuExecutor()
    if isinstance(device, str) and device.startswith("opencl"):
        return OpenCLExecutor(opencl_backend_device(device))
    raise ValueError(f"devices must hold 'cpu', 'opencl', 'opencl:N' or executors, got {device!r}")


def _save_at_exit(reference_to_scheduler):
    scheduler = reference_to_scheduler()
    if scheduler is not None:
        try:
            scheduler.save()
        except Exception:  # noqa: BLE001 - never fail an interpreter exit over a cache file
            pass


_default = None
_default_lock = threading.Lock()


def default_scheduler():
    """The scheduler behind ``device="auto"``: every available device, created on first use."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Scheduler()
    return _default
