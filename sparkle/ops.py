"""The public operations: validate once, pick the backend, run."""

import numpy as np

from . import api, reference
from .cpu import backend as cpu_backend
from .devices import resolve_device


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
    device : "auto", "cpu" or "reference"

    Returns a new C-contiguous (N, K, OH, OW) array of the input's dtype. Inputs are
    never modified.
    """
    spec = api.conv2d_spec(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                           activation=activation)
    target = resolve_device(device)
    if target == "reference":
        result = reference.conv2d(x, w, bias, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                  activation=activation)
        return np.ascontiguousarray(result, dtype=spec.dtype)
    return cpu_backend.conv2d(x, w, bias, spec)


def matmul(a, b, *, device="auto"):
    """(M, K) @ (K, N) for float32 or float64 arrays of one dtype; returns a new C-contiguous array."""
    spec = api.matmul_spec(a, b)
    target = resolve_device(device)
    if target == "reference":
        return np.ascontiguousarray(reference.matmul(a, b), dtype=spec.dtype)
    return cpu_backend.matmul(a, b, spec)
