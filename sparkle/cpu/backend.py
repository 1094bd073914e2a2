"""The Numba CPU backend: plans a call (micro-kernel, tiles, parallel split) and runs it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ..api import Conv2dSpec
from ..memory import cache_optimal_tile_size
from .conv2d import fused_conv2d_driver
from .direct import direct_conv2d
from .microkernel import lanes_for
from .packing import panel_count

# Micro-kernel shapes the backend may choose: (rows, vectors of columns). 6 x 2 vectors
# uses 12 accumulator registers of the 16 ymm registers of AVX2.
MICROKERNELS = ((6, 2), (4, 3))
DEFAULT_MICROKERNEL = (6, 2)


@dataclass(frozen=True)
class CpuPlan:
    mr: int
    nv: int
    nr: int
    kc: int
    mc: int
    nc: int
    channel_chunks: int
    threads: int


def choose_microkernel(spec):
    """The micro-kernel that wastes the least work on padding rows and columns.

    Output channels of a group are padded to whole ``mr`` panels and the pixels of an
    image to whole ``nr`` panels; both shapes issue 12 vector FMAs per step, so the one
    with the smaller padded area is faster. Ties go to the default.
    """
    lanes = lanes_for(8 * spec.dtype.itemsize)
    k_group = spec.out_channels // spec.groups
    pixels = spec.out_h * spec.out_w

    def padded_area(shape):
        mr, nv = shape
        return panel_count(k_group, mr) * mr * panel_count(pixels, nv * lanes) * nv * lanes

    return min(MICROKERNELS, key=lambda shape: (padded_area(shape), shape != DEFAULT_MICROKERNEL))


def plan_conv2d(spec, microkernel=None, tiles=None, threads=None):
    """Choose the micro-kernel, tile sizes and parallel split for a conv2d spec."""
    mr, nv = microkernel or choose_microkernel(spec)
    if (mr, nv) not in MICROKERNELS:
        raise ValueError(f"microkernel must be one of {MICROKERNELS}, got {(mr, nv)}")
    itemsize = spec.dtype.itemsize
    nr = nv * lanes_for(8 * itemsize)
    tiles = tiles or cache_optimal_tile_size(mr, nr, itemsize)
    threads = threads or numba.get_num_threads()
    pixels = spec.out_h * spec.out_w
    # Blocks of equal size (whole micro-panels), not nc-sized blocks and a short remainder.
    blocks = panel_count(pixels, tiles.nc)
    pixel_block = min(tiles.nc, panel_count(panel_count(pixels, blocks), nr) * nr)
    pixel_jobs = spec.batch * spec.groups * panel_count(pixels, pixel_block)
    channel_chunks = 1
    if pixel_jobs < 4 * threads:
        # Split output channels too, so that every thread gets the same number of jobs.
        panels = panel_count(spec.out_channels // spec.groups, mr)
        channel_chunks = min(panels, threads // math.gcd(pixel_jobs, threads))
    return CpuPlan(mr, nv, nr, tiles.kc, tiles.mc, pixel_block, channel_chunks, threads)


def _geometry(spec):
    return (spec.batch, spec.in_channels, spec.height, spec.width, spec.out_channels, spec.kernel_h,
            spec.kernel_w, spec.stride_h, spec.stride_w, spec.pad_top, spec.pad_left, spec.dilation_h,
            spec.dilation_w, spec.groups, spec.out_h, spec.out_w)


@dataclass(frozen=True)
class Scratch:
    """Per-thread work buffers of one call: all the memory a call uses besides its output
    (and contiguous copies of inputs that arrive in another layout)."""

    panel: np.ndarray    # packed im2col patch, kc x (pixel block)
    origins: np.ndarray  # input row/column origin of each pixel of the block
    offsets: np.ndarray  # source offset per tap and pixel
    runs: np.ndarray     # first offset of each contiguous panel per tap
    rows: np.ndarray     # channel plane and tap of each reduction row of a block
    tile: np.ndarray     # one mr x nr edge block

    @property
    def nbytes(self):
        return sum(buffer.nbytes for buffer in (self.panel, self.origins, self.offsets, self.runs, self.rows, self.tile))


def allocate_scratch(spec, plan):
    padded_pixels = panel_count(min(plan.nc, spec.out_h * spec.out_w), plan.nr) * plan.nr
    taps = spec.kernel_h * spec.kernel_w
    return Scratch(
        panel=np.empty((plan.threads, plan.kc * padded_pixels), dtype=spec.dtype),
        origins=np.empty((plan.threads, 2, padded_pixels), dtype=np.int64),
        offsets=np.empty((plan.threads, taps, padded_pixels), dtype=np.int64),
        runs=np.empty((plan.threads, taps, padded_pixels // plan.nr), dtype=np.int64),
        rows=np.empty((plan.threads, plan.kc, 2), dtype=np.int64),
        tile=np.empty((plan.threads, plan.mr * plan.nr), dtype=spec.dtype))


def padded_leading_dimension(row_elements, itemsize, line=64, sets=1024):
    """Row stride (in elements) at which ``mr`` weight rows read side by side do not all
    land in the same few cache sets.

    A row length that is a multiple of many cache lines (1024 floats: every row starts on
    the same 4 KiB boundary) maps the rows of a weight block onto a few sets of L1 and L2,
    which then thrash. Such rows get one extra cache line of padding; others are kept.
    """
    row_bytes = row_elements * itemsize
    if row_bytes % line or math.gcd(row_bytes // line, sets) < 64:
        return row_elements
    return row_elements + line // itemsize


def weight_rows(w):
    """The weights as a K x (C/groups * R * S) matrix and its row stride (padded when the
    natural one would alias in the caches; a copy only then or for a non-C layout)."""
    rows = np.ascontiguousarray(w).reshape(w.shape[0], -1)
    lda = padded_leading_dimension(rows.shape[1], rows.itemsize)
    if lda == rows.shape[1]:
        return rows, lda
    padded = np.zeros((rows.shape[0], lda), dtype=rows.dtype)
    padded[:, :rows.shape[1]] = rows
    return padded, lda


def _read_only_flat(array):
    """A flat C-order read-only view (a copy only when the layout needs one).

    Inputs always reach the driver read-only, so writable and read-only user arrays
    share one compiled version instead of compiling one per combination.
    """
    flat = np.ascontiguousarray(array).reshape(-1).view()
    flat.flags.writeable = False
    return flat


# Groups with fewer output channels than this run the direct kernel: a GEMM block would
# compute mostly padding rows (depthwise: 1 real row of 4 or 6).
DIRECT_MAX_GROUP_OUTPUTS = 3


def uses_direct_kernel(spec):
    return spec.out_channels // spec.groups <= DIRECT_MAX_GROUP_OUTPUTS


def conv2d_direct(x, w, bias, spec, threads=None):
    """Direct convolution (see ``direct.py``) of validated inputs."""
    out = np.empty(spec.output_shape, dtype=spec.dtype)
    if out.size == 0:
        return out
    threads = threads or numba.get_num_threads()
    planes = spec.batch * spec.out_channels
    row_chunks = min(spec.out_h, -(-4 * threads // planes)) if planes < 4 * threads else 1
    bias_flat = _read_only_flat(bias if bias is not None else np.zeros(spec.out_channels, spec.dtype))
    direct_conv2d(_read_only_flat(x), _read_only_flat(w), bias_flat, out.reshape(-1), _geometry(spec),
                  spec.has_bias, spec.activation == "relu", row_chunks, threads)
    return out


def conv2d(x, w, bias, spec, plan=None):
    """Convolution of validated inputs; returns a new C-contiguous array of ``spec.dtype``.

    Without a plan, groups with very few output channels take the direct kernel and
    everything else the fused im2col + GEMM driver; a plan always means the GEMM driver.
    """
    if plan is None and uses_direct_kernel(spec):
        return conv2d_direct(x, w, bias, spec)
    out = np.empty(spec.output_shape, dtype=spec.dtype)
    if out.size == 0:
        return out
    plan = plan or plan_conv2d(spec)
    x_flat = _read_only_flat(x)
    w_rows, lda = weight_rows(w)
    w_flat = _read_only_flat(w_rows)
    bias_flat = _read_only_flat(bias if bias is not None else np.zeros(spec.out_channels, spec.dtype))
    scratch = allocate_scratch(spec, plan)
    driver = fused_conv2d_driver(plan.mr, plan.nv, plan.nr)
    driver(x_flat, w_flat, lda, bias_flat, out.reshape(-1), _geometry(spec), spec.has_bias,
           spec.activation == "relu", plan.kc, plan.mc, plan.nc, plan.channel_chunks,
           scratch.panel, scratch.origins, scratch.offsets, scratch.runs, scratch.rows, scratch.tile)
    return out


def matmul_as_conv2d_spec(spec):
    """(M, K) @ (K, N) is a 1x1 convolution of a (1, K, 1, N) image with (M, K, 1, 1) weights."""
    return Conv2dSpec(batch=1, in_channels=spec.k, height=1, width=spec.n, out_channels=spec.m, kernel_h=1,
                      kernel_w=1, stride_h=1, stride_w=1, pad_top=0, pad_bottom=0, pad_left=0, pad_right=0,
                      dilation_h=1, dilation_w=1, groups=1, out_h=1, out_w=spec.n, dtype=spec.dtype,
                      has_bias=False, activation=None)


def matmul(a, b, spec, plan=None):
    """Matrix product of validated inputs through the convolution driver's packing and micro-kernel."""
    if spec.m == 0 or spec.n == 0 or spec.k == 0:
        return np.zeros((spec.m, spec.n), dtype=spec.dtype)
    conv_spec = matmul_as_conv2d_spec(spec)
    image = b.reshape(1, spec.k, 1, spec.n)
    weights = a.reshape(spec.m, spec.k, 1, 1)
    return conv2d(image, weights, None, conv_spec, plan).reshape(spec.m, spec.n)
