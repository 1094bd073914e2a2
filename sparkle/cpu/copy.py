"""Copies between host arrays spread over the CPU backend's bound threads.

One thread copies 11-13 GB/s on the H100 machine's 16-core host; 16 threads copy 50-100 GB/s. A GPU upload
of a numpy array staged through pinned memory pays off only with the copy into the pinned memory spread
this way (``sparkle.opencl.staging``)."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .threads import bind_slot, capture_binding

# Each thread copies at least this much, or one thread copies it all: a parallel region's start (binding, a
# wake-up) costs a few microseconds. A region always has one slot per thread of Numba's pool, as the CPU
# backend's kernels do (a first version with fewer slots than threads once took 7 ms for a 2 MiB staged upload
# on the H100 machine's host, against 0.2 ms; a copy-only probe did not reproduce it).
SMALLEST_SLOT_BYTES = 256 << 10


@njit(parallel=True, nogil=True, cache=True)
def _copy_in_slots(destination, source, slots):
    cpus, caller = capture_binding(slots)
    size = source.size
    for slot in prange(slots):
        bind_slot(cpus, caller, slot)
        start = size * slot // slots
        stop = size * (slot + 1) // slots
        destination[start:stop] = source[start:stop]


def parallel_copy(destination, source):
    """Copy the bytes of ``source`` into ``destination``: both one-dimensional C-contiguous uint8 arrays of
    the same size (views of the caller's arrays)."""
    if destination.shape != source.shape:
        raise ValueError(f"destination: expected {source.shape[0]} bytes like the source, got {destination.shape}")
    threads = numba.get_num_threads()
    if threads < 2 or source.size < threads * SMALLEST_SLOT_BYTES:
        np.copyto(destination, source)
    else:
        _copy_in_slots(destination, source, threads)
