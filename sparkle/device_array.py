"""Arrays that live in an OpenCL device's memory, so a chain of calls moves no data through the host."""

from __future__ import annotations

import weakref

import numpy as np


class DeviceArray:
    """A C-contiguous array in device memory. Made by :func:`sparkle.to_device` or returned by an op.

    ``.get()`` copies it back to a new numpy array; ``shape``, ``dtype``, ``ndim``, ``size`` and
    ``device`` (the device id) describe it. Its buffer returns to the device's pool when it is collected.
    """

    __array_priority__ = 1000  # numpy operators defer to us instead of treating us as an object scalar

    def __init__(self, device, buffer, shape, dtype):
        self._device = device
        self.buffer = buffer
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        if device.pool is not None:
            weakref.finalize(self, device.pool.give, buffer)

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

        host = np.empty(self.shape, dtype=self.dtype)
        if host.size:
            cl.enqueue_copy(self._device.queue, host, self.buffer, is_blocking=True)
        return host

    def __array__(self, dtype=None, copy=None):
        host = self.get()
        return host if dtype is None else host.astype(dtype, copy=False)

    def reshape(self, *shape):
        """A view of the same buffer with another shape of the same size (no copy)."""
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if int(np.prod(shape, dtype=np.int64)) != self.size or any(int(s) < 0 for s in shape):
            raise ValueError(f"shape must keep the size {self.size}, got {tuple(shape)}")
        view = object.__new__(DeviceArray)
        view._device, view.buffer, view.dtype = self._device, self.buffer, self.dtype
        view.shape = tuple(int(s) for s in shape)
        view._base = self  # keeps the owner (and so its buffer) alive
        return view

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype.name}, device={self.device!r})"


def to_host(array):
    """``array`` as a host value: a DeviceArray's contents as numpy, anything else (numpy, None) as is."""
    return array.get() if isinstance(array, DeviceArray) else array
