"""Arrays that live in an OpenCL device's memory, so a chain of calls moves no data through the host."""

from __future__ import annotations

import math
import numbers
import operator

import numpy as np


class DeviceArray:
    """A C-contiguous array in device memory. Made by :func:`sparkle.to_device` or returned by an op.

    ``.get()`` copies it back to a new numpy array, ``.wait()`` waits for the work producing it; ``shape``,
    ``dtype``, ``ndim``, ``size`` and ``device`` (the device id) describe it. Its buffer returns to the device's
    pool when it is collected.
    """

    __array_priority__ = 1000  # numpy operators defer to us instead of treating us as an object scalar
    _pool = None  # where the buffer goes back when the array is collected (None: a view, or no pool)

    def __init__(self, device, buffer, shape, dtype):
        self._device = device
        self.buffer = buffer
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._pool = device.pool

    def __copy__(self):
        # a view: a second owner of the buffer would give it back to the pool twice
        return self.reshape(self.shape)

    def __del__(self):
        # (__del__ rather than weakref.finalize: registering a finalizer cost 2.6 us per result on the 2-core VM,
        # more than a third of a queued call's host time on some drivers)
        pool = self._pool
        if pool is not None:
            try:
                pool.give(self.buffer)
            except Exception:  # noqa: BLE001 - at interpreter exit the pool may be torn down already
                pass

    @property
    def device(self):
        return self._device.id

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def get(self):
        """A new numpy array with the contents (waits for the work that produces them)."""
        import pyopencl as cl

        from .opencl.pinned import result_pool

        host = result_pool(self._device).empty(self.shape, self.dtype)
        if host.size:
            cl.enqueue_copy(self._device.queue, host, self.buffer, is_blocking=True)
        return host

    def wait(self):
        """Block until the work queued to produce this array has run (to time calls that return once queued);
        returns the array."""
        self._device.queue.finish()
        return self

    def __array__(self, dtype=None, copy=None):
        host = self.get()
        return host if dtype is None else host.astype(dtype, copy=False)

    def reshape(self, *shape):
        """A view of the same buffer with another shape of the same size (no copy), as numpy's reshape:
        ``reshape(64, -1)`` or ``reshape((64, -1))``; one size may be -1, inferred from the others."""
        new_shape = _new_shape(shape, self.size, self.shape)
        view = object.__new__(DeviceArray)
        view._device, view.buffer, view.dtype = self._device, self.buffer, self.dtype
        view.shape = new_shape
        view._base = self  # keeps the owner (and so its buffer) alive
        return view

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name}, device={self.device!r})"


def _new_shape(args, size, old_shape):
    """The shape ``reshape(*args)`` asks for, with a -1 resolved; ValueError/TypeError saying why not."""
    if not args:
        raise TypeError("reshape() takes the new shape: reshape(2, -1) or reshape((2, -1))")
    shape = args[0] if len(args) == 1 and not isinstance(args[0], numbers.Integral) else args  # ((2, 3))
    try:
        dims = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be ints (one may be -1), got {shape!r}") from None
    given = f"got {dims} for an array of shape {old_shape} (size {size})"
    if dims.count(-1) > 1:
        raise ValueError(f"shape may have only one -1 (the size inferred from the others), {given}")
    if any(d < -1 for d in dims):
        raise ValueError(f"shape sizes must be non-negative, or -1 for one inferred size, {given}")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if known == 0:
            raise ValueError(f"shape cannot infer its -1 when another size is 0, {given}")
        if size % known:
            raise ValueError(f"shape must keep the size {size}, which the sizes other than -1 (product {known}) "
                             f"do not divide, {given}")
        dims = tuple(size // known if d == -1 else d for d in dims)
    elif known != size:
        raise ValueError(f"shape must keep the size {size}, {given}")
    return dims


def to_host(array):
    """``array`` as a host value: a DeviceArray's contents as numpy, anything else (numpy, None) as is."""
    return array.get() if isinstance(array, DeviceArray) else array
