"""The public operations: validate once, pick the backend, run."""

import numpy as np

from . import api, named_device
from .device_array import to_host
from .devices import resolve_device
from .scheduler.scheduler import UnscheduledDevice, default_scheduler


def conv2d(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None, device="auto"):
    """2-D convolution (cross-correlation, as in PyTorch) of NCHW input with KCRS weights.

    Parameters
    ----------
    x : ndarray (N, C, H, W), float32 or float64
    w : ndarray (K, C // groups, R, S), same dtype as ``x``
    bias : ndarray (K,) or None
    stride, dilation : int or (h, w) pair of positive ints
    padding : int, (pad_h, pad_w), (top, bottom, left, right), "valid" or "same"
        ("same" is ONNX SAME_UPPER: output = ceil(input / stride), odd padding at the end)
    groups : int dividing both C and K
    activation : None or "relu", fused into the write-back after the bias
    device : "auto" (the default: the scheduler places the call, see :class:`sparkle.Scheduler`), "cpu",
        "opencl", "opencl:N" or "reference".

    Returns a new C-contiguous (N, K, OH, OW) array of the input's dtype; a :class:`DeviceArray`
    when the call runs on an OpenCL device and an input was already there. Inputs are never modified.
    """
    if device == "auto":
        try:
            return default_scheduler()._conv2d_positional(x, w, bias, stride, padding, dilation, groups, activation)
        except UnscheduledDevice:
            pass  # an operand lives on a device the scheduler does not use: run there, as asked
    return named_device.conv2d(x, w, bias, device, stride, padding, dilation, groups, activation)


def matmul(a, b, *, device="auto"):
    """(M, K) @ (K, N) for float32 or float64 arrays of one dtype; returns a new C-contiguous array.

    ``device`` as for :func:`conv2d`; the result is a :class:`DeviceArray` when the call runs on an
    OpenCL device and an input was already there.
    """
    if device == "auto":
        try:
            return default_scheduler().matmul(a, b)
        except UnscheduledDevice:
            pass
    return named_device.matmul(a, b, device)


def to_device(array, device="opencl"):
    """Copy ``array`` to ``device`` once; returns a DeviceArray (numpy array for "cpu").

    conv2d and matmul take the result and return device arrays, so chained calls stay on the device.
    """
    source = api.as_float_array(array, "array")  # numpy or DeviceArray
    target = resolve_device(device, (array,))
    if target in ("cpu", "reference"):
        return np.array(to_host(source), copy=True, order="C")
    from .opencl import transfer

    return transfer.copy_to(target, source)
