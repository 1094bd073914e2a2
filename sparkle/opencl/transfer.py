"""Host <-> device copies with pooled buffers: each numpy input is copied once per call."""

from __future__ import annotations

import numpy as np

from ..device_array import DeviceArray
from . import staging


def upload(device, array, dtype):
    """A DeviceArray holding ``array`` (numpy or a DeviceArray of another device) on ``device``."""
    if isinstance(array, DeviceArray):
        if array._device is device:
            return array
        array = array.get()
    host = np.ascontiguousarray(array, dtype=dtype)
    result = DeviceArray(device, device.pool_buffer(host.nbytes), host.shape, dtype)
    if host.size:
        staging.write(device, result.buffer, host)
    return result


def empty(device, shape, dtype):
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return DeviceArray(device, device.pool_buffer(nbytes), shape, dtype)


def copy_to(device, array):
    """A new DeviceArray on ``device`` with the contents of ``array`` (numpy or a DeviceArray anywhere)."""
    import pyopencl as cl

    if not (isinstance(array, DeviceArray) and array._device is device):
        return upload(device, array, array.dtype)
    copy = empty(device, array.shape, array.dtype)  # already there: still a new array, as numpy copies
    if array.nbytes:
        cl.enqueue_copy(device.queue, copy.buffer, array.buffer, byte_count=array.nbytes)
    return copy
