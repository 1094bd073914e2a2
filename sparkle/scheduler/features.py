"""What the cost model sees of a call: its work, its bytes, its GEMM sizes and its shape class.

Computed once per call signature (cold path) from the validated spec; the hot path never recomputes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..api import Conv2dSpec, MatmulSpec


@dataclass(frozen=True)
class CallFeatures:
    op: str  # "conv2d" or "matmul"
    flops: int
    operand_bytes: tuple  # bytes of each operand, in argument order (x, w, bias) or (a, b)
    output_bytes: int
    gemm: tuple  # (m, n, k): output channels, output pixels, reduction length (per group)
    shape_class: str  # kernel family: what a verified variant is trusted for
    dtype: str
    is_part: bool = False  # a share of a split call, running beside the other devices' shares

    @property
    def input_bytes(self):
        return sum(self.operand_bytes)

    @property
    def prior_slowdown(self):
        """How much slower than the GEMM probe the profile's prior expects this call: float64 2x, thin groups
        (depthwise and the like) 1.5x; the shape model learns the rest."""
        thin = 1.5 if self._thin else 1.0
        return thin * (2.0 if self.dtype == "float64" else 1.0)

    @property
    def _thin(self):
        return "depthwise" in self.shape_class or "thin" in self.shape_class

    def shape_point(self, transfer_share):
        """Where the call lies for the shape model: log GEMM sizes, kernel-family flags, and the share of
        the prior's time spent moving data (``transfer_share``, 0 to 1), and whether it is a split's part
        (devices running at once can slow each other: memory bandwidth, a host thread feeding a GPU)."""
        m, n, k = self.gemm
        return (math.log(m), math.log(n), math.log(k), 1.0 if self._thin else 0.0,
                1.0 if self.dtype == "float64" else 0.0, 1.0 if "/1x1/" in self.shape_class else 0.0,
                1.0 if "/strided" in self.shape_class else 0.0, transfer_share, 1.0 if self.is_part else 0.0)

    def part(self, fraction, axis):
        """The features of the share ``fraction`` of this call along ``axis`` (see :data:`SPLIT_AXES`)."""
        scaled_operands, gemm_index = SPLIT_AXES[(self.op, axis)]
        operands = tuple(int(size * fraction) if index in scaled_operands else size
                         for index, size in enumerate(self.operand_bytes))
        gemm = list(self.gemm)
        gemm[gemm_index] = max(1, round(gemm[gemm_index] * fraction))
        return CallFeatures(self.op, max(1, round(self.flops * fraction)), operands,
                            int(self.output_bytes * fraction), tuple(gemm), self.shape_class, self.dtype, True)


# How a call splits: (op, axis) -> (indices of the operands that are split, the GEMM size that shrinks).
# conv2d splits images (x) or output channels (w and bias); matmul splits rows (a) or columns (b).
SPLIT_AXES = {("conv2d", "batch"): ((0,), 1), ("conv2d", "channels"): ((1, 2), 0),
              ("matmul", "rows"): ((0,), 0), ("matmul", "columns"): ((1,), 1)}


def _conv_class(spec):
    k_group = spec.out_channels // spec.groups
    c_group = spec.in_channels // spec.groups
    if spec.groups > 1 and k_group <= 3:
        family = "depthwise" if c_group == 1 else "thin-groups"
    elif spec.groups > 1:
        family = "grouped"
    else:
        family = "dense"
    stride = "s1" if spec.stride_h == spec.stride_w == 1 else "strided"
    dilated = "/dilated" if spec.dilation_h > 1 or spec.dilation_w > 1 else ""
    kernel = "1x1" if spec.kernel_h == spec.kernel_w == 1 else "RxS"
    return f"conv2d/{family}/{kernel}/{stride}{dilated}/{spec.dtype.name}"


def features_of(spec):
    """CallFeatures of a validated :class:`Conv2dSpec` or :class:`MatmulSpec`."""
    itemsize = spec.dtype.itemsize
    if isinstance(spec, MatmulSpec):
        return CallFeatures("matmul", max(1, spec.flops), (spec.m * spec.k * itemsize, spec.k * spec.n * itemsize),
                            spec.m * spec.n * itemsize, (max(1, spec.m), max(1, spec.n), max(1, spec.k)),
                            f"matmul/{spec.dtype.name}", spec.dtype.name)
    assert isinstance(spec, Conv2dSpec)
    operands = (spec.batch * spec.in_channels * spec.height * spec.width * itemsize,
                spec.out_channels * spec.reduction * itemsize)
    if spec.has_bias:
        operands += (spec.out_channels * itemsize,)
    output = spec.batch * spec.out_channels * spec.out_h * spec.out_w * itemsize
    gemm = (max(1, spec.out_channels // spec.groups), max(1, spec.batch * spec.out_h * spec.out_w * spec.groups),
            max(1, spec.reduction))
    return CallFeatures("conv2d", max(1, spec.flops), operands, output, gemm, _conv_class(spec), spec.dtype.name)
