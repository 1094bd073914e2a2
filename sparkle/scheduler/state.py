"""What the scheduler keeps per device (profile, model, fault record, learned surcharges) and per call
signature (spec, decision, prepared calls, the fast path's state)."""

from __future__ import annotations

import math
import threading
import time

from . import calls
from .features import features_of
from .model import History

FAULT_COOLDOWN_SECONDS = 1.0  # a faulting device is avoided 1 s, then 2 s, 4 s, ... (at most 10 min)


class Surcharge:
    """Seconds some calls cost beyond their predictions: a running mean of the latest ~8 (never below 0)."""

    __slots__ = ("measured", "seconds")

    def __init__(self):
        self.seconds = 0.0
        self.measured = 0

    def observe(self, excess):
        self.measured += 1
        self.seconds += (max(0.0, excess) - self.seconds) / min(self.measured, 8)


class DeviceState:
    """A device as the scheduler keeps it: its executor, profile, learned model and fault record."""

    def __init__(self, executor, model):
        self.executor = executor
        self.id = executor.id
        self.profile = None
        self.model = model
        self.faults = 0
        self.avoid_until = 0.0
        self.unprofilable = False
        self.busy_until = 0.0  # a kernel build that blocks the device's calls is predicted to end then
        self.build_started = 0.0  # when that build began (0.0: none running)
        # What a trial on this device costs beyond its prediction (a first call's module load, buffers and
        # verification): learned from the trials, counted in the next trials' cost (policy.choose).
        self.trial = Surcharge()
        # What a signature's first call here costs beyond its warm prediction (a kernel object made, buffers
        # of new sizes, the module's first launch, verification): learned from every first call that built
        # nothing, counted when a signature that runs elsewhere already would move here (decisions.predict).
        self.first_call = Surcharge()

    def record_fault(self):
        """Count a fault and avoid the device for 1 s, 2 s, 4 s, ... (at most 10 min); returns the seconds."""
        self.faults += 1
        cooldown = min(600.0, FAULT_COOLDOWN_SECONDS * 2 ** (self.faults - 1))
        self.avoid_until = time.monotonic() + cooldown
        return cooldown

    def shape_model(self, op):
        return self.model.shape_model(op)

    def history(self, signature):
        history = self.model.histories.get(signature)
        if history is None:
            history = self.model.histories[signature] = History()
        return history


class Plan:
    """Everything about one call signature: its spec, features, decision and prepared calls."""

    def __init__(self, op, spec, operand_homes):
        self.op, self.spec = op, spec
        self.features = features_of(spec)
        self.signature = calls.signature_text(op, spec)
        self.shape_text = calls.shape_text(op, spec)
        self.operand_homes = operand_homes  # the executor holding each operand, None for the host
        self.home = next((home for home in operand_homes if home is not None), None)
        self.lock = threading.Lock()
        self.prepared = {}  # (device id, part) -> PreparedCall
        self.decision = None
        self.trial = None  # a device to try on the next call (exploration)
        self.trials = {}  # device id -> times it was tried for this signature
        self.building = set()  # devices whose kernel for this signature is built ahead (or was)
        self.warming = set()  # devices whose kernel is being built ahead and warmed up: not ready yet
        self.primed = set()  # devices where this signature's prepared call has run (a call or a warm-up ahead)
        self.calls = 0
        self.next_review = 0
        # The fast path: set when the decision is one verified device and nothing is pending.
        self.runner = None
        self.fast_calls = 0  # fast-path calls not yet folded into the model
        self.state = None
        self.history = None
        self.transfer_seconds = 0.0
        self.predicted = 0.0
        self.surprise_log = math.inf  # ln(seconds) above which a fast-path call questions the decision
        self.timer = None  # the fast path's LaunchTimer where calls return before the device ran them
        # The fast path times and records one call in ``sample_every`` (reviews.sample_stride) once the signature
        # has had SAMPLE_AFTER_CALLS calls; ``countdown`` calls are left until the next timed one, which stands
        # for ``period`` calls (itself and the untimed ones before it).
        self.sample_every = 1
        self.countdown = 1
        self.period = 1
        self.timers = {}  # device id -> LaunchTimer (None: host times are the calls' times)

    def launch_timer(self, state):
        """The LaunchTimer of this signature's calls on ``state`` (kept across decisions: its pending launches
        are read later), or None where the device's host times are its times."""
        if state.id not in self.timers:
            self.timers[state.id] = state.executor.launch_timer(self.prepared_call(state))
        return self.timers[state.id]

    def prepared_call(self, state, part=None):
        key = (state.id, part)
        prepared = self.prepared.get(key)
        if prepared is None:
            spec = self.spec if part is None else calls.part_spec(self.op, self.spec, *part)
            prepared = self.prepared[key] = state.executor.prepare(self.op, spec)
        return prepared
