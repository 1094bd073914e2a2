"""Host arrays for results, on memory that earlier results have already touched.

A fresh large numpy array is fresh pages from the kernel: the first write to each page faults, which on the
2-core VMs costs about 10 ms per 100 MB (res2 1x1 at N=32 took 27 ms with a fresh output, 17 ms writing into
one it had used before). ``empty`` hands out large arrays on blocks that results no longer alive have used;
a block returns to the pool when its array and every view of it are gone, never earlier: each array's data is
owned by a ``_Lease`` that numpy keeps as the array's (and every view's) base.

Idle blocks are bounded (``SPARKLE_HOST_POOL_BYTES``; default 512 MiB, or a 32nd of physical memory up to 4 GiB
where that is more; 0 turns the pool off): past the
bound, the longest idle go back to the system. A pool of pinned memory (``sparkle.opencl.pinned``) also bounds
the bytes it owns, alive or idle, and hands out ordinary memory past that bound.
"""

import functools
import math
import os
import threading
import weakref
from collections import OrderedDict

import numpy as np

# Below this, malloc's own free lists already reuse memory: nothing to gain.
SMALLEST_POOLED_BYTES = 1 << 20
# Blocks are counted in pages, so arrays of nearly the same size share blocks.
BLOCK_GRANULE_BYTES = 1 << 16
ALIGNMENT_BYTES = 64
DEFAULT_IDLE_LIMIT_BYTES = 512 << 20  # ... or a 32nd of the machine's memory where that is more, up to:
LARGEST_DEFAULT_IDLE_LIMIT_BYTES = 4 << 30


def default_idle_limit_bytes():
    """512 MiB, or a 32nd of physical memory up to 4 GiB where that is more: a result larger than the bound is
    never pooled, and on a GPU lands in fresh pageable memory (an 822 MB result came back at 3.6 GB/s on the
    H100 machine, against 55 GB/s into a pooled pinned block)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):  # not a POSIX system: the fixed default
        return DEFAULT_IDLE_LIMIT_BYTES
    return max(DEFAULT_IDLE_LIMIT_BYTES, min(physical // 32, LARGEST_DEFAULT_IDLE_LIMIT_BYTES))


def _idle_limit_from_environment():
    text = os.environ.get("SPARKLE_HOST_POOL_BYTES", "").strip()
    if not text:
        return default_idle_limit_bytes()
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"SPARKLE_HOST_POOL_BYTES: expected a byte count >= 0 (0 turns the pool off), got {text!r}")
    return value


class _Lease:
    """One result's hold on a pooled block: numpy keeps it as the base of the array and of every view."""

    __slots__ = ("__array_interface__", "__weakref__", "block", "owner")

    def __init__(self, block, shape, dtype, owner=None):
        self.block = block
        self.owner = owner  # the HostPool the block came from
        address = block.ctypes.data
        self.__array_interface__ = {"version": 3, "shape": shape, "typestr": dtype.str,
                                    "data": (address + (-address) % ALIGNMENT_BYTES, False)}


class HostPool:
    """Blocks by size; ``empty`` takes one (or allocates), a lease's end gives it back."""

    def __init__(self, idle_limit_bytes=DEFAULT_IDLE_LIMIT_BYTES, allocate_block=None, owned_limit_bytes=None):
        self.idle_limit_bytes = idle_limit_bytes
        # At most this many bytes of blocks, alive or idle (None: no bound); past it, arrays come from the
        # process's pool of ordinary memory: pinned memory cannot be paged out, so it is rationed.
        self.owned_limit_bytes = owned_limit_bytes
        self._owned_bytes = 0
        # block bytes -> a new uint8 array of them (default: ordinary memory; an OpenCL GPU gives pinned memory)
        self._allocate_block = allocate_block or (lambda size: np.empty(size, np.uint8))
        self._idle = OrderedDict()  # id(block) -> block, oldest idle first
        self._by_size = {}          # block bytes -> [block, ...]
        self._idle_bytes = 0
        self._lock = threading.RLock()  # a lease can end (and give back) inside another call's critical section

    @property
    def idle_bytes(self):
        return self._idle_bytes

    @property
    def owned_bytes(self):
        """Bytes of the blocks this pool allocated and has not freed (alive results and idle blocks)."""
        return self._owned_bytes

    def empty(self, shape, dtype):
        """A new C-contiguous array like ``np.empty(shape, dtype)``, its contents undefined."""
        shape, dtype = _shape_tuple(shape), np.dtype(dtype)
        if not self.pools(shape, dtype):
            return np.empty(shape, dtype)
        return self._lease(shape, dtype)

    def pools(self, shape, dtype):
        """Whether arrays of this shape and dtype come from the pool."""
        nbytes = math.prod(shape) * dtype.itemsize
        return SMALLEST_POOLED_BYTES <= nbytes <= self.idle_limit_bytes and not dtype.hasobject

    def _lease(self, shape, dtype):
        nbytes = math.prod(shape) * dtype.itemsize
        size = -(-(nbytes + ALIGNMENT_BYTES) // BLOCK_GRANULE_BYTES) * BLOCK_GRANULE_BYTES
        block = self._take(size)
        if block is None:
            with self._lock:
                if self.owned_limit_bytes is not None and self._owned_bytes + size > self.owned_limit_bytes:
                    return pool().empty(shape, dtype)
                self._owned_bytes += size  # counted before the allocation, so racing callers stay under
            try:
                block = self._allocate_block(size)
            except BaseException:
                with self._lock:
                    self._owned_bytes -= size
                raise
        lease = _Lease(block, shape, dtype, self)
        weakref.finalize(lease, self._give_back, block).atexit = False
        return np.asarray(lease)

    def clear(self):
        """Give every idle block back to the system."""
        with self._lock:
            self._owned_bytes -= self._idle_bytes
            self._idle.clear()
            self._by_size.clear()
            self._idle_bytes = 0

    def _take(self, size):
        with self._lock:
            blocks = self._by_size.get(size)
            if not blocks:
                return None
            block = blocks.pop()
            del self._idle[id(block)]
            self._idle_bytes -= block.nbytes
            return block

    def _give_back(self, block):
        with self._lock:
            self._idle[id(block)] = block
            self._by_size.setdefault(block.nbytes, []).append(block)
            self._idle_bytes += block.nbytes
            while self._idle_bytes > self.idle_limit_bytes:
                key, oldest = self._idle.popitem(last=False)
                same_size = self._by_size[oldest.nbytes]
                del same_size[next(i for i, block in enumerate(same_size) if id(block) == key)]
                self._idle_bytes -= oldest.nbytes
                self._owned_bytes -= oldest.nbytes


def lease_owner(array):
    """The HostPool whose block holds ``array`` (a pooled result or a view of one), else None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base.owner if isinstance(base, _Lease) else None


_POOL = None
_POOL_LOCK = threading.Lock()


def idle_limit_bytes():
    """The bound on idle bytes of every pool (``SPARKLE_HOST_POOL_BYTES``)."""
    return pool().idle_limit_bytes


def pool():
    """The process's pool, made on first use (so a bad ``SPARKLE_HOST_POOL_BYTES`` fails a call, not the import)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = HostPool(_idle_limit_from_environment())
    return _POOL


def empty(shape, dtype):
    """``np.empty(shape, dtype)`` for a result: large ones on reused memory (see the module's docstring)."""
    return (_POOL or pool()).empty(shape, dtype)


def allocator(shape, dtype):
    """A call with no arguments that gives ``empty(shape, dtype)``, decided once: a prepared call's output
    (small outputs cost nothing more than ``np.empty``)."""
    shape, dtype = _shape_tuple(shape), np.dtype(dtype)
    host_pool = pool()
    if host_pool.pools(shape, dtype):
        return functools.partial(host_pool._lease, shape, dtype)
    return functools.partial(np.empty, shape, dtype)


def _shape_tuple(shape):
    return tuple(int(n) for n in shape) if isinstance(shape, (tuple, list)) else (int(shape),)
