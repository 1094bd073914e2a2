"""Pinned host memory for a GPU's results: a device-to-host copy into memory the driver has pinned goes at the
bus's speed, while one into ordinary (pageable) memory goes through the driver's own staging buffers; and a
result that is the next call's input goes back up at that speed too. Blocks are mapped
CL_MEM_ALLOC_HOST_PTR buffers, kept mapped while pooled (``sparkle.host_pool`` bounds the idle ones)."""

from __future__ import annotations

import threading

import numpy as np

from .. import host_pool


def pinned_block(device, nbytes):
    """A uint8 array of ``nbytes`` on pinned memory of ``device``'s context; the array keeps its buffer and
    mapping alive (pyopencl's map holds the buffer)."""
    import pyopencl as cl

    owner = cl.Buffer(device.context, cl.mem_flags.READ_WRITE | cl.mem_flags.ALLOC_HOST_PTR, nbytes)
    array, _ = cl.enqueue_map_buffer(device.queue, owner, cl.map_flags.READ | cl.map_flags.WRITE, 0, (nbytes,),
                                     np.uint8, is_blocking=True)
    return array


_LOCK = threading.Lock()
# Pinned bytes per device, alive results and idle blocks together, as a multiple of the idle bound
# (SPARKLE_HOST_POOL_BYTES): page-locked memory cannot be paged out, so a caller keeping every result alive
# gets ordinary memory past it. Allocating a pinned block is also slow (26 MB in 9.5 ms on the H100 machine,
# against 0.5 ms to copy into one already allocated): it pays only once the block is reused.
PINNED_LIMIT_FACTOR = 2


def result_pool(device):
    """The pool of host memory that ``device``'s results are copied into: pinned for a GPU (or where
    ``device.pinned_results`` says so), the process's ordinary pool elsewhere."""
    if device._result_pool is not None:
        return device._result_pool
    with _LOCK:
        if device._result_pool is None:
            if device.pinned_results:
                limit = host_pool.idle_limit_bytes()
                device._result_pool = host_pool.HostPool(limit, lambda size: pinned_block(device, size),
                                                         owned_limit_bytes=PINNED_LIMIT_FACTOR * limit)
            else:
                device._result_pool = host_pool.pool()
        return device._result_pool
