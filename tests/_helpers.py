"""Helpers shared by the test modules: array construction in many layouts, error metrics,
and an independent computation of conv2d output geometry."""

from __future__ import annotations

import numpy as np

DTYPES = (np.float32, np.float64)
# Relative L2 error bounds versus the float64 reference (see rel_l2).
TOLERANCE = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}
LAYOUTS = ("C", "F", "negative", "sliced", "permuted")


def make_array(rng, shape, dtype, layout="C", scale=1.0):
    """Standard normal values (times ``scale``) of ``shape`` and ``dtype`` in the given memory layout.

    - "C" / "F": contiguous in C or Fortran order.
    - "negative": a view with negative strides on every axis.
    - "sliced": every other element of a larger buffer, starting at an offset.
    - "permuted": a transposed view (reversed axis order in memory).
    """
    shape = tuple(shape)
    dtype = np.dtype(dtype)

    def normal(s):
        return (rng.standard_normal(s) * scale).astype(dtype)

    if layout == "C":
        return normal(shape)
    if layout == "F":
        return np.asfortranarray(normal(shape))
    if layout == "negative":
        return normal(shape)[(slice(None, None, -1),) * len(shape)]
    if layout == "sliced":
        big = normal(tuple(2 * s + 1 for s in shape))
        return big[tuple(slice(1, 1 + 2 * s, 2) for s in shape)]
    if layout == "permuted":
        return normal(shape[::-1]).transpose()
    raise ValueError(layout)


def owner(array):
    """The array that owns the memory a view looks into (to check that nothing behind a view changes)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class Unchanged:
    """Snapshot of arrays (and the buffers behind them) to assert a call did not write to them."""

    def __init__(self, *arrays):
        self.arrays = [a for a in arrays if isinstance(a, np.ndarray)]
        self.copies = [owner(a).copy() for a in self.arrays]

    def check(self):
        for array, copy in zip(self.arrays, self.copies):
            assert np.array_equal(owner(array), copy, equal_nan=True), "an input array was modified"


def rel_l2(y, ref):
    """||y - ref|| / max(||ref||, tiny), computed in float64."""
    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert y.shape == ref.shape, (y.shape, ref.shape)
    return np.linalg.norm((y - ref).ravel()) / max(np.linalg.norm(ref.ravel()), np.finfo(np.float64).tiny)


def assert_close_to_reference(y, ref, dtype):
    dtype = np.dtype(dtype)
    error = rel_l2(y, ref)
    assert error <= TOLERANCE[dtype], f"relative L2 error {error:.3e} > {TOLERANCE[dtype]:.0e} for {dtype}"


def as_pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def resolve_padding(padding, size_hw, kernel_hw, stride, dilation):
    """(top, bottom, left, right) for any padding form, derived here independently of sparkle.api.

    "same" is ONNX SAME_UPPER: output = ceil(input / stride), the odd pixel at the end.
    """
    stride, dilation = as_pair(stride), as_pair(dilation)
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for size, kernel, s, d in zip(size_hw, kernel_hw, stride, dilation):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (kernel - 1) * d + 1 - size)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if isinstance(padding, int):
        return (padding,) * 4
    if len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    return tuple(padding)


def output_hw(size_hw, kernel_hw, stride, padding_tblr, dilation):
    stride, dilation = as_pair(stride), as_pair(dilation)
    top, bottom, left, right = padding_tblr
    out = []
    for size, kernel, s, d, pads in zip(size_hw, kernel_hw, stride, dilation, ((top, bottom), (left, right))):
        out.append((size + sum(pads) - (kernel - 1) * d - 1) // s + 1)
    return tuple(out)


def direct_conv2d(x, w, bias, stride, padding_tblr, dilation, groups, activation):
    """conv2d by the definition, one output element at a time (float64). Slow: tiny shapes only."""
    stride, dilation = as_pair(stride), as_pair(dilation)
    n_img, channels, height, width = x.shape
    k_total, c_group, kh, kw = w.shape
    top, bottom, left, right = padding_tblr
    oh, ow = output_hw((height, width), (kh, kw), stride, padding_tblr, dilation)
    k_group = k_total // groups
    out = np.zeros((n_img, k_total, oh, ow))
    for n in range(n_img):
        for k in range(k_total):
            g = k // k_group
            for i in range(oh):
                for j in range(ow):
                    total = 0.0 if bias is None else float(bias[k])
                    for c in range(c_group):
                        for r in range(kh):
                            for s in range(kw):
                                row = i * stride[0] - top + r * dilation[0]
                                col = j * stride[1] - left + s * dilation[1]
                                if 0 <= row < height and 0 <= col < width:
                                    total += float(x[n, g * c_group + c, row, col]) * float(w[k, c, r, s])
                    out[n, k, i, j] = max(total, 0.0) if activation == "relu" else total
    return out
