"""What runs on the workers: the per-chunk calls, the plugin that gives each worker its own scheduler, and
the report of what each worker's scheduler knows.

A worker process with the plugin places its chunks through the plugin's scheduler (its devices profiled at
setup, its learned model in that machine's cache directory); without it, through ``sparkle``'s default
scheduler of that process. Either way a worker with a GPU uses it and a worker without one its CPU.
"""

from __future__ import annotations

import threading

import numpy as np
from distributed import WorkerPlugin

from ..device_array import to_host

_scheduler_lock = threading.Lock()
_scheduler = None  # the plugin's scheduler in this worker process


def current_scheduler():
    """The scheduler that places this worker's chunks: the plugin's, else sparkle's default."""
    from ..scheduler.scheduler import default_scheduler

    return _scheduler if _scheduler is not None else default_scheduler()


def conv2d_chunk(x, w, bias=None, *, device="auto", **keywords):
    """One chunk's conv2d on this worker (``device`` "auto": the worker's scheduler places it)."""
    if device == "auto":
        return to_host(current_scheduler().conv2d(x, w, bias, **keywords))
    import sparkle

    return to_host(sparkle.conv2d(x, w, bias, device=device, **keywords))


def matmul_chunk(a, b, *, device="auto"):
    if device == "auto":
        return to_host(current_scheduler().matmul(a, b))
    import sparkle

    return to_host(sparkle.matmul(a, b, device=device))


class SparklePlugin(WorkerPlugin):
    """A worker plugin (``client.register_plugin(SparklePlugin())``): on each worker, at its start (and
    again after a restart), one :class:`sparkle.Scheduler` that places that worker's chunks.

    devices: the device ids the worker may use (None: all of that worker's devices, as ``sparkle.Scheduler``).
    cache_dir: where profiles and the learned model live (None: Sparkle's cache directory on that machine, so
        a restarted worker loads what it measured and learned instead of profiling again).
    verify: as ``sparkle.Scheduler`` ("first", "always", "off"; None: $SPARKLE_VERIFY or "first").
    prepare: calls to make once at setup, so their kernels are compiled and checked before the first task:
        ("conv2d", x shape, w shape, {conv2d keywords}) or ("matmul", a shape, b shape), float32 unless a
        fifth element names the dtype.
    """

    name = "sparkle"

    def __init__(self, devices=None, *, cache_dir=None, verify=None, prepare=()):
        self.devices = None if devices is None else list(devices)
        self.cache_dir = None if cache_dir is None else str(cache_dir)
        self.verify = verify
        self.prepare = [_prepared_call(item) for item in prepare]  # checked now, on the client

    def setup(self, worker):
        global _scheduler
        from ..scheduler.scheduler import Scheduler

        scheduler = Scheduler(self.devices, verify=self.verify, cache_dir=self.cache_dir, progress=False)
        scheduler.profile()
        for op, shapes, keywords, dtype in self.prepare:
            operands = [np.zeros(shape, dtype) for shape in shapes]
            getattr(scheduler, op)(*operands, **keywords)
        with _scheduler_lock:
            _scheduler = scheduler

    def teardown(self, worker):
        global _scheduler
        with _scheduler_lock:
            scheduler, _scheduler = _scheduler, None
        if scheduler is not None:
            scheduler.save()


def _prepared_call(item):
    """(op, shapes, keywords, dtype) of one ``prepare`` entry; ValueError/TypeError naming what is wrong."""
    from .. import api

    if not isinstance(item, (tuple, list)) or len(item) < 3 or item[0] not in ("conv2d", "matmul"):
        raise ValueError(f"prepare entries must be ('conv2d', x shape, w shape, {{keywords}}) or ('matmul', a shape, "
                         f"b shape), got {item!r}")
    op, extra = item[0], list(item[3:])
    keywords = dict(extra.pop(0) or {}) if op == "conv2d" and extra else {}
    dtype = np.dtype(extra[0] if extra else np.float32)
    shapes = [tuple(int(size) for size in shape) for shape in item[1:3]]
    operands = [np.broadcast_to(np.zeros((), dtype), shape) for shape in shapes]
    (api.conv2d_spec if op == "conv2d" else api.matmul_spec)(*operands, **keywords)  # the errors of the call
    return op, shapes, keywords, dtype


def worker_devices(client):
    """{worker address: what its scheduler knows}: its devices (id, name, kind), their profiles (GFLOPS,
    per-call overhead, transfer rates), how many calls it placed on each device, and whether the plugin made
    the scheduler."""
    return client.run(_describe)


def _describe():
    scheduler = current_scheduler()
    from ..devices import devices as all_devices

    names = {device.id: (device.name, device.kind) for device in all_devices()}
    placed = {}
    for record in scheduler.history():
        placed[record["device"]] = placed.get(record["device"], 0) + record["calls"]
    profiles = scheduler.profile()
    return {
        "plugin": _scheduler is not None,
        "devices": [{"id": device, "name": names.get(device, (device, "?"))[0],
                     "kind": names.get(device, (device, "?"))[1]} for device in scheduler.devices],
        "profiles": {device: None if profile is None else profile.to_json() for device, profile in profiles.items()},
        "calls": placed,
    }
