"""Uploads of ordinary (pageable) host memory staged through a small ring of pinned memory.

A GPU driver copies pageable memory through its own staging buffers: 10-16 GB/s on the H100 machine, against
52-55 GB/s from pinned memory. Copying the array into pinned memory first pays only with the copy spread over
the host's cores (``sparkle.cpu.copy``): measured there, a 51 MB upload took 3.5 ms direct and 1.4 ms staged
in 8 MiB chunks, a 205 MB one 19.6 ms and 6.4 ms (``benchmarks/results/staged_uploads_h100_2026-12-06.md``).
Chunks pipeline: the copy of one into its slot runs while the device reads the one before. The source is
fully copied when ``write`` returns, so the caller may change it at once; the last chunks' device copies may
still be queued, ahead of whatever the caller enqueues next on the device's (in-order) queue. A GPU's own
results already lie in pinned memory (``opencl/pinned.py``): fed back as inputs, they go up directly.
The ring holds 32 MiB of pinned memory per device, taken at the first staged upload."""

from __future__ import annotations

import threading

import numpy as np

from .. import host_pool
from ..cpu.copy import parallel_copy
from .pinned import pinned_block

CHUNK_BYTES = 8 << 20
SLOTS = 4
# Smaller uploads go straight to the driver: the staging's fixed costs (a parallel region, two enqueues)
# are comparable with the whole copy below a few MB (H100 machine: 4 MiB took 0.29 ms direct, 0.23 staged).
SMALLEST_STAGED_BYTES = 4 << 20


class StagingRing:
    """``slots`` pinned chunks of ``chunk_bytes``, reused in turn; one upload at a time per device."""

    def __init__(self, device, chunk_bytes=CHUNK_BYTES, slots=SLOTS):
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.slots = slots
        self._memory = pinned_block(device, chunk_bytes * slots)
        self._pending = [None] * slots  # the device copy still reading each slot
        self._next = 0
        self._lock = threading.Lock()

    def write(self, buffer, host):
        """Enqueue the copy of the C-contiguous array ``host`` into ``buffer`` (at offset 0)."""
        source = host.reshape(-1).view(np.uint8)
        queue = self.device.queue
        with self._lock:
            for start in range(0, source.size, self.chunk_bytes):
                stop = min(start + self.chunk_bytes, source.size)
                slot = self._next
                self._next = (slot + 1) % self.slots
                if self._pending[slot] is not None:
                    self._pending[slot].wait()
                    self._pending[slot] = None
                staged = self._memory[slot * self.chunk_bytes:slot * self.chunk_bytes + stop - start]
                parallel_copy(staged, source[start:stop])
                self._pending[slot] = _enqueue_copy(queue, buffer, staged, start)


def _enqueue_copy(queue, buffer, staged, offset):
    """The event of a queued copy of host memory ``staged`` into ``buffer`` from byte ``offset``."""
    import pyopencl as cl

    return cl.enqueue_copy(queue, buffer, staged, dst_offset=offset, is_blocking=False)


_LOCK = threading.Lock()


def _ring(device):
    """The device's staging ring, made on first use; None where pinned memory cannot be had (the driver's
    own path is used from then on)."""
    import pyopencl as cl

    if device._staging is None:
        with _LOCK:
            if device._staging is None and device.staged_uploads:
                try:
                    device._staging = StagingRing(device, CHUNK_BYTES, SLOTS)
                except (cl.Error, MemoryError):
                    device.staged_uploads = False
    return device._staging


def _pinned_here(device, host):
    """Whether ``host`` lies in this device's pinned result memory (a result fed back as an input): the device
    reads it at the bus's speed, no staging needed."""
    pool = device._result_pool
    return pool is not None and device.pinned_results and host_pool.lease_owner(host) is pool


def write(device, buffer, host):
    """Enqueue the copy of the C-contiguous numpy array ``host`` into the device buffer ``buffer``: staged
    through pinned memory where the device stages uploads and the array is large enough, else directly.
    ``host`` may be changed or freed as soon as this returns."""
    import pyopencl as cl

    if device.staged_uploads and host.nbytes >= SMALLEST_STAGED_BYTES and not _pinned_here(device, host):
        ring = _ring(device)
        if ring is not None:
            ring.write(buffer, host)
            return
    cl.enqueue_copy(device.queue, buffer, host, is_blocking=True)
