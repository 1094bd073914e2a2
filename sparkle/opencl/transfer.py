"""Host <-> device copies with pooled buffers: each numpy input is copied once per call."""

from __future__ import annotations

import numpy as np

from ..device_array import DeviceArray


def upload(device, array, dtype):
    """A DeviceArray holding ``array`` (numpy or a DeviceArray of another device) on ``device``."""
    import pyopencl as cl

    if isinstance(array, DeviceArray):
        if array._device is device:
            return array
        array = array.get()
    host = np.ascontiguousarray(array, dtype=dtype)
    result = DeviceArray(device, device.pool_buffer(host.nbytes), host.shape, dtype)
    if host.size:
        cl.enqueue_copy(device.queue, result.buffer, host, is_blocking=False)
    return result


def empty(device, shape, dtype):
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return DeviceArray(device, device.pool_buffer(nbytes), shape, dtype)
