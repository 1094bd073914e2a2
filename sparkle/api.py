"""Argument normalization and validation shared by every backend.

Each public entry point turns its arguments into a frozen spec here, so backends
receive shapes that are already checked and never see user objects directly.
Errors name the argument, what was expected and what was given.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
ACTIVATIONS = (None, "relu")


@dataclass(frozen=True)
class ConvGeometry:
    """The shape of a convolution: sizes, kernel, strides, padding, dilation, groups and output size."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    dilation_h: int
    dilation_w: int
    groups: int
    out_h: int
    out_w: int

    @property
    def pointwise(self):
        """1x1, stride 1, no padding: the convolution is a plain GEMM per image."""
        return (self.kernel_h == self.kernel_w == 1 and self.stride_h == self.stride_w == 1
                and not (self.pad_top or self.pad_bottom or self.pad_left or self.pad_right))


@dataclass(frozen=True)
class Conv2dSpec(ConvGeometry):
    """A fully resolved conv2d problem: shapes, geometry, dtype and epilogue."""

    dtype: np.dtype
    has_bias: bool
    activation: str | None

    @property
    def output_shape(self):
        return (self.batch, self.out_channels, self.out_h, self.out_w)

    @property
    def reduction(self):
        """Length of each output's dot product: C/groups x R x S (a row of the weight matrix)."""
        return (self.in_channels // self.groups) * self.kernel_h * self.kernel_w

    @property
    def flops(self):
        """Multiply-adds counted as two operations, as GFLOPS figures conventionally do."""
        return 2 * self.batch * self.out_channels * self.out_h * self.out_w * self.reduction

    @property
    def is_pointwise(self):
        return self.pointwise


@dataclass(frozen=True)
class MatmulSpec:
    m: int
    k: int
    n: int
    dtype: np.dtype

    @property
    def flops(self):
        return 2 * self.m * self.k * self.n


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_float_array(value, name):
    """Return ``value`` (an ndarray or a DeviceArray) of float32/float64 without copying or modifying it."""
    from .device_array import DeviceArray

    if not isinstance(value, (np.ndarray, DeviceArray)):
        raise TypeError(f"{name} must be a numpy.ndarray or sparkle DeviceArray of float32 or float64, "
                        f"got {type(value).__name__}")
    if value.dtype not in SUPPORTED_DTYPES:
        if value.dtype.newbyteorder("=") in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must have dtype float32 or float64 in the machine's byte order, got "
                            f"{value.dtype.str} (convert it with {name}.astype({name}.dtype.newbyteorder('=')))")
        raise TypeError(f"{name} must have dtype float32 or float64, got {value.dtype}")
    return value


def _operand_pair(ndim, first, second):
    """Two float arrays of ``ndim`` dimensions and one dtype, each given as (value, name, layout)."""
    arrays = []
    for value, name, layout in (first, second):
        array = as_float_array(value, name)
        if array.ndim != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got {array.ndim}-D with shape {array.shape}")
        arrays.append(array)
    (_, first_name, _), (_, second_name, _) = first, second
    if arrays[0].dtype != arrays[1].dtype:
        raise TypeError(f"{first_name} and {second_name} must have the same dtype, "
                        f"got {first_name} {arrays[0].dtype} and {second_name} {arrays[1].dtype}")
    return arrays


def _positive_pair(value, name):
    """An int or a pair of ints, each >= 1, as a (h, w) tuple."""
    if _is_int(value):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        pair = tuple(value)
    else:
        raise TypeError(f"{name} must be a positive int or a (h, w) pair of positive ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(pair[0]), int(pair[1])


def _same_padding(size, kernel, stride, dilation):
    """ONNX SAME_UPPER: output = ceil(size / stride), the odd pixel of padding at the end."""
    out = -(-size // stride)
    effective = (kernel - 1) * dilation + 1
    total = max(0, (out - 1) * stride + effective - size)
    return total // 2, total - total // 2


def _explicit_padding(padding):
    """(top, bottom, left, right) from an int, a pair or a 4-tuple of non-negative ints."""
    if _is_int(padding):
        pads = (padding,) * 4
    elif isinstance(padding, (tuple, list)) and len(padding) in (2, 4) and all(_is_int(p) for p in padding):
        pads = (padding[0], padding[0], padding[1], padding[1]) if len(padding) == 2 else tuple(padding)
    else:
        raise TypeError("padding must be an int, (pad_h, pad_w), (top, bottom, left, right), "
                        f"'valid' or 'same', got {padding!r}")
    if min(pads) < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return tuple(int(p) for p in pads)


def _resolve_padding(padding, height, width, kernel, stride, dilation):
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            top, bottom = _same_padding(height, kernel[0], stride[0], dilation[0])
            left, right = _same_padding(width, kernel[1], stride[1], dilation[1])
            return (top, bottom, left, right)
        raise ValueError(f"padding must be 'valid' or 'same' when given as a string, got {padding!r}")
    return _explicit_padding(padding)


def _nhwc_hint(x, w, groups):
    """A hint when ``x``'s channels do not fit ``w`` read as NCHW but would read as NHWC (x.shape[3] = C).

    An NHWC input whose H equals its C fits both readings, so it cannot be caught; only mismatches are.
    """
    channels = x.shape[3]
    if channels % groups or w.shape[1] != channels // groups:
        return ""
    from .device_array import DeviceArray

    transpose = ("sparkle.to_device(x.get().transpose(0, 3, 1, 2), x.device)" if isinstance(x, DeviceArray)
                 else "x.transpose(0, 3, 1, 2)")
    return f"; x looks like NHWC; Sparkle takes NCHW ({transpose})"


def conv2d_spec(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """Validate conv2d arguments and resolve them into a :class:`Conv2dSpec`."""
    x, w = _operand_pair(4, (x, "x", "(N, C, H, W)"), (w, "w", "(K, C // groups, R, S)"))
    if not _is_int(groups):
        raise TypeError(f"groups must be a positive int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    groups = int(groups)  # a numpy integer would change the compiled kernels' argument types
    batch, channels, height, width = x.shape
    out_channels, group_channels, kernel_h, kernel_w = w.shape
    if channels % groups:
        raise ValueError(f"groups must divide the input channels C={channels}, got groups={groups}"
                         + _nhwc_hint(x, w, groups))
    if out_channels % groups:
        raise ValueError(f"groups must divide the output channels K={out_channels}, got groups={groups}")
    if group_channels != channels // groups:
        raise ValueError(f"w.shape[1] must be C // groups = {channels // groups} for x with C={channels} "
                         f"and groups={groups}, got w.shape={w.shape}" + _nhwc_hint(x, w, groups))
    for name, size in (("x height", height), ("x width", width), ("w kernel height", kernel_h),
                       ("w kernel width", kernel_w), ("x channels", channels), ("w output channels", out_channels)):
        if size < 1:
            raise ValueError(f"{name} must be at least 1, got shape x={x.shape}, w={w.shape}")
    if bias is not None:
        bias = as_float_array(bias, "bias")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have the dtype of x ({x.dtype}), got {bias.dtype}")
        if bias.shape != (out_channels,):
            raise ValueError(f"bias must have shape (K,) = ({out_channels},), got {bias.shape}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    stride_hw = _positive_pair(stride, "stride")
    dilation_hw = _positive_pair(dilation, "dilation")
    top, bottom, left, right = _resolve_padding(padding, height, width, (kernel_h, kernel_w),
                                                stride_hw, dilation_hw)
    span_h = (kernel_h - 1) * dilation_hw[0] + 1
    span_w = (kernel_w - 1) * dilation_hw[1] + 1
    out_h = (height + top + bottom - span_h) // stride_hw[0] + 1
    out_w = (width + left + right - span_w) // stride_hw[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"output size must be at least 1x1, got {out_h}x{out_w}: the dilated kernel "
            f"{span_h}x{span_w} does not fit the padded input {height + top + bottom}x{width + left + right}")
    return Conv2dSpec(
        batch=batch, in_channels=channels, height=height, width=width, out_channels=out_channels,
        kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_hw[0], stride_w=stride_hw[1],
        pad_top=top, pad_bottom=bottom, pad_left=left, pad_right=right,
        dilation_h=dilation_hw[0], dilation_w=dilation_hw[1], groups=groups,
        out_h=out_h, out_w=out_w, dtype=x.dtype, has_bias=bias is not None, activation=activation)


def matmul_spec(a, b):
    """Validate matmul arguments and resolve them into a :class:`MatmulSpec`."""
    a, b = _operand_pair(2, (a, "a", "(M, K)"), (b, "b", "(K, N)"))
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"a.shape[1] must equal b.shape[0] (inner dimension K), got a {a.shape} and b {b.shape}")
    return MatmulSpec(m=a.shape[0], k=a.shape[1], n=b.shape[1], dtype=a.dtype)


def matmul_as_conv2d_spec(spec):
    """(M, K) @ (K, N) is a 1x1 convolution of a (1, K, 1, N) image with (M, K, 1, 1) weights."""
    return Conv2dSpec(batch=1, in_channels=spec.k, height=1, width=spec.n, out_channels=spec.m, kernel_h=1,
                      kernel_w=1, stride_h=1, stride_w=1, pad_top=0, pad_bottom=0, pad_left=0, pad_right=0,
                      dilation_h=1, dilation_w=1, groups=1, out_h=1, out_w=spec.n, dtype=spec.dtype,
                      has_bias=False, activation=None)


def output_array(out, shape, dtype):
    """``out`` once checked to be where a result of ``shape`` and ``dtype`` may be written: a writeable
    C-contiguous numpy array of exactly that shape and dtype (a kernel writes it as flat memory)."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array, got {type(out).__name__}")
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    if out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous or not out.flags.writeable:
        problems = "".join([" (not C-contiguous)" if not out.flags.c_contiguous else "",
                            " (read-only)" if not out.flags.writeable else ""])
        raise ValueError(f"out must be a writeable C-contiguous {dtype} array of shape {shape}, "
                         f"got {out.dtype} {out.shape}{problems}")
    return out
