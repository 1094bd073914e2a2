"""Kernels built ahead: while calls run where they are fastest now, the kernel of a device that would be
faster once built is built on a background thread (OpenVINO AUTO's way), at the lowest CPU priority. Where a
build blocks its device's other calls (a GPU: NVIDIA's driver held a copy up to 287 ms during a build), the
calls that would touch the device are decided again with the remaining build time priced in.

A built kernel is then run once on zeros of the call's shapes, on the same thread: a GPU's first launch of a
kernel loads its module, and its first result takes fresh (pinned) memory, which cost the first real call
1-4 ms on the H100 machine (a ResNet-50 conv predicted at 0.4 ms took 4.3 ms in the mixed workload's pass 2).
A kernel built already (another signature's program) but never run for this signature is primed the same way:
moving a signature to a device prices the first call's one-time costs (decisions.predict) until it is primed.

While a build runs, the interpreter's switch interval is lowered (see ``responsive_interpreter``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from . import calls, decisions

logger = logging.getLogger("sparkle.scheduler")


def build_ahead(scheduler, plan, decision):
    """Start building the kernel of a device that would be the fastest once built, while the calls run
    where the decision put them (OpenVINO AUTO's way); the plan is decided again when the build ends."""
    if scheduler.forced is not None or decision.split:
        return
    usable = [p for p in decision.predictions if p.usable]
    serving = decisions.best_usable(decision).device if decision.explored else decision.device
    for prediction in usable:
        built_seconds = prediction.seconds - prediction.compile
        if prediction.device in plan.building or prediction.device == serving:
            continue  # being built, or the call itself builds it
        if plan.prepared_call(scheduler._by_id[prediction.device]).compiled and prediction.device in plan.primed:
            continue  # nothing to build or prime (its "compile" is a wait for another kernel's build)
        if all(built_seconds < other.seconds for other in usable if other is not prediction):
            plan.building.add(prediction.device)
            if scheduler._build_pool is None:
                scheduler._build_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparkle-build",
                                                           initializer=_lower_priority)
            scheduler._build_pool.submit(_build, scheduler, plan, scheduler._by_id[prediction.device])


def _build(scheduler, plan, state):
    prepared = plan.prepared_call(state)  # made by the review that asked for the build
    building = not prepared.compiled  # else built already (another signature's program): only primed here
    if not building and state.id in plan.primed:  # a call ran there meanwhile
        with plan.lock:
            plan.next_review = plan.calls
        return
    scheduler._builds_running += 1
    plan.warming.add(state.id)  # priced as unbuilt until warmed up: a call meanwhile would pay the first launch
    blocks = building and state.executor.builds_block_calls
    if blocks:  # the device's calls would wait for the build: decide them again, with the wait priced in
        with scheduler._lock:
            state.build_started = time.monotonic()
            state.busy_until = state.build_started + state.model.build_seconds(state.profile.compile_seconds)
            _revisit_plans(scheduler)
    try:
        with responsive_interpreter():
            if building:
                start = time.perf_counter()
                prepared.build()
                with scheduler._lock:
                    state.model.observe_build(time.perf_counter() - start)
            prepared(*calls.zero_operands(plan.op, plan.spec))  # warm-up, see the module's docstring
        plan.primed.add(state.id)
    except Exception as error:  # noqa: BLE001 - a call on the device would meet it: the slow path records it
        logger.debug("sparkle scheduler: building %s %s ahead on %s failed: %s", plan.op, plan.shape_text,
                     state.id, error)
    finally:
        scheduler._builds_running -= 1
        plan.warming.discard(state.id)
        if blocks:
            with scheduler._lock:
                state.busy_until = state.build_started = 0.0
                _revisit_plans(scheduler)
    with plan.lock:
        plan.next_review = plan.calls  # built: decide again on the next call


# Parts of a build run Python and hold the GIL (code generation, the tuning lookup, pyopencl's argument
# setters, the warm-up call). The calling thread releases the GIL in every enqueue, wait and nogil kernel, and with
# CPython's default switch interval (5 ms) it may then wait up to 5 ms to get it back (benchmarks/
# gil_convoy_probe.py: beside a Python thread, 1 ms GPU calls took 22 ms on the H100 machine, 1.3-2.7 ms at 0.1 ms).
BUILD_SWITCH_INTERVAL = 1e-4


class _SwitchInterval:
    """Lowers the interpreter's switch interval to ``BUILD_SWITCH_INTERVAL`` while any build runs, and puts
    back the previous value when the last one ends (unless someone else changed it meanwhile)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._saved = self._lowered = None

    def __enter__(self):
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                if self._saved > BUILD_SWITCH_INTERVAL:
                    sys.setswitchinterval(BUILD_SWITCH_INTERVAL)
                self._lowered = sys.getswitchinterval()
            self._users += 1
        return self

    def __exit__(self, *exc_info):
        with self._lock:
            self._users -= 1
            if self._users == 0 and sys.getswitchinterval() == self._lowered:
                sys.setswitchinterval(self._saved)
        return False


_switch_interval = _SwitchInterval()


def responsive_interpreter():
    """The context in which builds run: the switch interval lowered (one shared, counted lowering)."""
    return _switch_interval


def _revisit_plans(scheduler):
    """Every cached plan decides again on its next call (lock held)."""
    for cached in scheduler._plans.values():
        with cached.lock:
            cached.next_review = cached.calls


def busy_seconds(scheduler, state, plan):
    """Seconds until the builds blocking a device this call would touch (``state``'s, or one holding an
    operand) are expected to end."""
    now = time.monotonic()
    touched = [state] + [scheduler._by_executor[id(home)] for home in plan.operand_homes if home is not None]
    return max((_remaining_build_seconds(device, now) for device in touched), default=0.0)


def _remaining_build_seconds(device, now):
    """The predicted rest of a running blocking build; one that has outlasted its prediction is expected to
    run as long again as it has run so far (a loaded machine can stretch a build several times over)."""
    if not device.build_started:
        return 0.0
    return max(device.busy_until - now, now - device.build_started, 0.0)


def _lower_priority():
    """The build thread yields its core to any other work of the process (a kernel build is CPU work; a parallel
    CPU call whose worker shares a core with it would wait for the scheduler's tick, 4 ms)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: the build runs at normal priority
        pass
