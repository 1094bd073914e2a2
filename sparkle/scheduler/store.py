"""What the scheduler keeps between processes, in the cache directory: the learned model and the
quarantined kernel variants. Both are JSON (never pickle), written atomically under a file lock, and
keyed by the device's identity (device, driver, Sparkle's kernel sources): a change starts afresh.
"""

from __future__ import annotations

import time

from .. import cache
from .model import DeviceModel

MODEL_VERSION = 6  # 4: the CPU prior counts the share of the threads a call runs on; 5: a learned per-call overhead;
# 6: one per data class (resident, moving)
QUARANTINE_VERSION = 1
HISTORIES_KEPT = 5000  # per device, the most-called signatures


class ModelStore:
    def __init__(self, directory, persist):
        self.document = cache.JsonDocument("scheduler-model", MODEL_VERSION, directory) if persist else None
        self._stored = self.document.load() if persist else {}
        self._models = {}
        self._changes = 0

    def model(self, identity):
        model = self._models.get(identity)
        if model is None:
            try:
                model = DeviceModel.from_json(self._stored[identity])
            except (KeyError, TypeError, ValueError):  # none stored, or written by another layout
                model = DeviceModel()
            self._models[identity] = model
        return model

    def mark_changed(self, count):
        self._changes += count

    def save(self):
        if self.document is None or not self._changes:
            return
        snapshot = {}
        for identity, model in self._models.items():
            data = model.to_json()
            kept = sorted(data["histories"].items(), key=lambda item: -item[1][0])[:HISTORIES_KEPT]
            data["histories"] = dict(kept)
            snapshot[identity] = data
        self.document.update(lambda document: document.update(snapshot))
        self._changes = 0

    def clear(self):
        self._models.clear()
        self._stored = {}
        self._changes = 0
        if self.document is not None:
            self.document.update(lambda document: document.clear())


class QuarantineStore:
    """Kernel variants that gave a wrong result, per device identity and shape class."""

    def __init__(self, directory, persist):
        self.document = cache.JsonDocument("scheduler-quarantine", QUARANTINE_VERSION, directory) if persist else None
        stored = self.document.load() if persist else {}
        self._held = {(identity, key) for identity, entries in stored.items() if isinstance(entries, dict)
                      for key in entries}
        self.records = []

    @staticmethod
    def _key(variant, shape_class):
        return f"{variant} | {shape_class}"

    def holds(self, identity, variant, shape_class):
        return (identity, self._key(variant, shape_class)) in self._held

    def add(self, identity, variant, shape_class, details):
        key = self._key(variant, shape_class)
        self._held.add((identity, key))
        record = dict(details, variant=variant, shape_class=shape_class, when=time.strftime("%Y-%m-%d %H:%M:%S"))
        self.records.append(record)
        if self.document is not None:
            self.document.update(lambda document: document.setdefault(identity, {}).__setitem__(key, record))

    def clear(self):
        self._held.clear()
        self.records.clear()
        if self.document is not None:
            self.document.update(lambda document: document.clear())
