"""The public operations: validate once, pick the backend, run."""

import numpy as np

from . import api, reference
from .cpu import backend as cpu_backend
from .device_array import DeviceArray
from .devices import resolve_device


def _host(array):
    return array.get() if isinstance(array, DeviceArray) else array


def _backend(target):
    if target == "cpu":
        return cpu_backend
    from .opencl import backend as opencl_backend

    return opencl_backend


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
    device : "auto", "cpu", "opencl", "opencl:N" or "reference". "auto" runs where the inputs live.

    Returns a new C-contiguous (N, K, OH, OW) array of the input's dtype; a :class:`DeviceArray`
    when the call runs on an OpenCL device and an input was already there. Inputs are never modified.
    """
    spec = api.conv2d_spec(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           activation=activation)
    target = resolve_device(device, (x, w, bias))
    if target == "reference":
        result = reference.conv2d(_host(x), _host(w), None if bias is None else _host(bias), stride=stride,
                                  padding=padding, dilation=dilation, groups=groups, activation=activation)
        return np.ascontiguousarray(result, dtype=spec.dtype)
    if target == "cpu":
        return cpu_backend.conv2d(_host(x), _host(w), None if bias is None else _host(bias), spec)
    return _backend(target).conv2d(x, w, bias, spec, target)


def matmul(a, b, *, device="auto"):
    """(M, K) @ (K, N) for float32 or float64 arrays of one dtype; returns a new C-contiguous array.

    ``device`` as for :func:`conv2d`; the result is a :class:`DeviceArray` when the call runs on an
    OpenCL device and an input was already there.
    """
    spec = api.matmul_spec(a, b)
    target = resolve_device(device, (a, b))
    if target == "reference":
        return np.ascontiguousarray(reference.matmul(_host(a), _host(b)), dtype=spec.dtype)
    if target == "cpu":
        return cpu_backend.matmul(_host(a), _host(b), spec)
    return _backend(target).matmul(a, b, spec, target)


def to_device(array, device="opencl"):
    """Copy ``array`` to ``device`` once; returns a DeviceArray (numpy array for "cpu").

    conv2d and matmul take the result and return device arrays, so chained calls stay on the device.
    """
    if isinstance(array, DeviceArray):
        source = array
    else:
        source = api.as_float_array(array, "array")
    target = resolve_device(device, (array,))
    if target in ("cpu", "reference"):
        return np.array(_host(source), copy=True, order="C")
    from .opencl import transfer

    result = transfer.upload(target, source, source.dtype)
    if result is source:  # already there: still a new array, as for numpy
        copy = transfer.empty(target, source.shape, source.dtype)
        import pyopencl as cl

        if source.nbytes:
            cl.enqueue_copy(target.queue, copy.buffer, source.buffer, byte_count=source.nbytes)
        return copy
    return result
