"""Implicit-GEMM convolution on the CPU: B read straight from the input, nothing packed.

For a stride-1 convolution, number the output pixels on the padded input's row pitch
(``v = oh * pitch + ow``). Then row p = (c, r, s) of the im2col matrix, over a run of
consecutive ``v``, is a contiguous slice of the padded input starting at
``c * plane + r * dilation_h * pitch + s * dilation_w + v``: the micro-kernel loads it
with plain vector loads through a per-p offset table, and stores only the real columns
(``ow < out_w``) with masked stores. A strided convolution is the same on phase planes of
the input (see ``VirtualLayout``). The padded/phase copy is made once per call (in
parallel, unless the plan has one thread); a stride-1 input without padding is read in place.

Packing the im2col patch costs about as much per element as the multiply-adds it feeds
when a layer has few output channels (64 channels: 2 cycles of FMAs per element on
AVX-512); this path does no per-element work besides the multiply-adds.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit, prange

from .atomics import fetch_add
from .conv2d import _in_range, gemm_job, kernel_source_fingerprint, kernel_variants
from .microkernel import implicit_microkernel
from .operands import (CHANNEL_CHUNKS, COPY_PLANES, GRID_ROWS, KC, LDA, MC, NC, PHASES, PITCH, PLANE, RELU, THREADS,
                       USE_BIAS, geometry_of)
from .threads import bind_slot, capture_binding


@dataclass(frozen=True)
class VirtualLayout:
    """The input grid the implicit kernel reads, one plane per (channel, row phase, column phase).

    Tap (r, s) of output pixel (oh, ow) reads input row oh * stride_h + r * dilation_h: in
    phase a = (r * dilation_h) % stride_h, that is row oh + (r * dilation_h) // stride_h of
    the plane holding input rows a, a + stride_h, ... So every stride is a stride-1 read of
    one phase plane, and only the phases some tap reads are made.
    """

    row_phases: tuple
    col_phases: tuple
    rows: int   # of each phase plane
    pitch: int  # columns of each phase plane: the row pitch of the output grid

    @property
    def phases(self):
        """Phase planes per input channel."""
        return len(self.row_phases) * len(self.col_phases)


@lru_cache(maxsize=256)
def virtual_layout(spec):
    row_phases = tuple(sorted({(r * spec.dilation_h) % spec.stride_h for r in range(spec.kernel_h)}))
    col_phases = tuple(sorted({(s * spec.dilation_w) % spec.stride_w for s in range(spec.kernel_w)}))
    rows = spec.out_h + (spec.kernel_h - 1) * spec.dilation_h // spec.stride_h
    pitch = spec.out_w + (spec.kernel_w - 1) * spec.dilation_w // spec.stride_w
    return VirtualLayout(row_phases, col_phases, rows, pitch)


def needs_copy(spec):
    """The input itself is the grid only for stride 1 without padding."""
    return spec.stride_h > 1 or spec.stride_w > 1 or spec.pad_top or spec.pad_bottom or spec.pad_left or spec.pad_right


def plane_stride(rows, pitch, itemsize):
    """Elements from one plane of the copy to the next: a plane whose size is a multiple of
    4 KiB would map the rows a block reads, one per channel, onto the same cache sets."""
    plane = rows * pitch
    return plane + 64 // itemsize if (plane * itemsize) % 4096 == 0 else plane


# In-place reads of more channels than this, each on pages of its own, walk more pages per
# reduction pass than the TLBs keep (matmul 1536 read in place ran at 0.4x the packed path).
IN_PLACE_MAX_PAGE_ROWS = 512


def in_place_reads_thrash(spec):
    """Whether B read in place would thrash: planes a 4 KiB multiple apart map every row a block
    reads onto the same L1 sets, and many planes of a page or more each outrun the TLBs."""
    if needs_copy(spec):
        return False
    plane_bytes = spec.height * spec.width * spec.dtype.itemsize
    rows = spec.reduction
    return plane_bytes % 4096 == 0 or (plane_bytes >= 4096 and rows > IN_PLACE_MAX_PAGE_ROWS)


@kernel_variants
def virtual_input_copier(parallel):
    """The compiled padded/phase copy of the input (``parallel=False``: without Numba's parallel launch,
    for plans of one thread)."""
    source_fingerprint = kernel_source_fingerprint()

    @njit(cache=True, parallel=parallel)
    def copy_virtual_input(x, out, params, row_phases, col_phases):
        """Plane q = ((image * C + c) * len(row_phases) + ia) * len(col_phases) + ib of ``out``:
        out[q, i, j] = x[image, c, i * stride_h + row_phases[ia] - pad_top, j * stride_w + col_phases[ib] - pad_left],
        zero outside x; planes ``params[PLANE]`` apart, ``params[GRID_ROWS]`` rows of ``params[PITCH]``."""
        _ = source_fingerprint, parallel  # part of the closure, hence of the disk cache key
        (_, _, height, width, _, _, _, stride_h, stride_w, pad_top, pad_left, _, _, _, _, _) = geometry_of(params)
        planes, rows, pitch, plane = params[COPY_PLANES], params[GRID_ROWS], params[PITCH], params[PLANE]
        phases = row_phases.size * col_phases.size
        if planes * plane > out.size or rows * pitch > plane or (planes // phases) * height * width > x.size:
            raise IndexError("copy_virtual_input: the copy or the input fell outside its buffer")
        for q in prange(planes):
            source = (q // phases) * height * width
            a = row_phases[(q % phases) // col_phases.size]
            b = col_phases[q % col_phases.size]
            destination = q * plane
            # Columns [first, end) read inside x; the loop over them has no branch, so it vectorizes.
            first = min(pitch, max(0, (pad_left - b + stride_w - 1) // stride_w))
            end = max(first, min(pitch, (width + pad_left - b + stride_w - 1) // stride_w))
            for i in range(rows):
                row = i * stride_h + a - pad_top
                start = destination + i * pitch
                if row < 0 or row >= height:
                    for j in range(pitch):
                        out[start + j] = 0.0
                    continue
                for j in range(first):
                    out[start + j] = 0.0
                origin = source + row * width + b - pad_left
                for j in range(first, end):
                    out[start + j] = x[origin + j * stride_w]
                for j in range(end, pitch):
                    out[start + j] = 0.0

    return copy_virtual_input


def copy_size(spec):
    """(planes, plane stride) of the padded/phase copy of the input for ``spec``."""
    layout = virtual_layout(spec)
    return spec.batch * spec.in_channels * layout.phases, plane_stride(layout.rows, layout.pitch, spec.dtype.itemsize)


def grid_plane(spec):
    """Elements from one plane of the grid the implicit kernel reads to the next: of the copy, or of x."""
    layout = virtual_layout(spec)
    return copy_size(spec)[1] if needs_copy(spec) else layout.rows * layout.pitch


def phase_arrays(spec):
    """The row and column phases of the copy as int64 arrays (the copy kernel's arguments)."""
    layout = virtual_layout(spec)
    return np.array(layout.row_phases, np.int64), np.array(layout.col_phases, np.int64)


@lru_cache(maxsize=256)
def reduction_offsets(spec, layout, plane):
    """Offset of B row p = (c, r, s) (the weights' order) from the start of its group's first plane
    (read-only: remembered per spec)."""
    c = np.arange(spec.in_channels // spec.groups, dtype=np.int64)[:, None, None]
    row, a = np.divmod(np.arange(spec.kernel_h, dtype=np.int64)[None, :, None] * spec.dilation_h, spec.stride_h)
    col, b = np.divmod(np.arange(spec.kernel_w, dtype=np.int64)[None, None, :] * spec.dilation_w, spec.stride_w)
    plane_index = (c * len(layout.row_phases) + np.searchsorted(layout.row_phases, a)) * len(layout.col_phases) \
        + np.searchsorted(layout.col_phases, b)
    offsets = (plane_index * plane + row * layout.pitch + col).reshape(-1)
    offsets.flags.writeable = False
    return offsets


@kernel_variants
def implicit_conv2d_driver(mr, nv, nr, parallel):
    """The compiled implicit-GEMM driver for an ``mr x nv``-vector micro-kernel of ``nr`` columns.

    As for ``fused_conv2d_driver``, the block shape is a closure constant and shapes are
    runtime values: a new shape never compiles; ``parallel=False`` for plans of one thread.
    """
    source_fingerprint = kernel_source_fingerprint()
    lanes = nr // nv

    @njit(cache=True, parallel=parallel)
    def conv2d_implicit(x, offsets, w, bias, out, params):
        """``x``: the flat virtual input (the copy ``virtual_input_copier`` makes, or the input itself),
        planes ``params[PLANE]`` apart, rows ``params[PITCH]`` apart, ``params[PHASES]`` planes per channel;
        ``offsets``: ``reduction_offsets``; ``w``: K x (C/groups * R * S) rows ``params[LDA]`` apart;
        ``params``: ``operands.call_params``."""
        _ = source_fingerprint, parallel  # part of the closure, hence of the disk cache key
        (batch, channels, _, _, k_total, _, _, _, _, _, _, _, _, groups, out_h, out_w) = geometry_of(params)
        use_bias, relu, lda = params[USE_BIAS] != 0, params[RELU] != 0, params[LDA]
        kc, mc, nc, channel_chunks = params[KC], params[MC], params[NC], params[CHANNEL_CHUNKS]
        threads, phases, plane, pitch = params[THREADS], params[PHASES], params[PLANE], params[PITCH]
        c_group = channels // groups
        k_group = k_total // groups
        reduction = offsets.size
        pixels = out_h * out_w
        grid_end = (out_h - 1) * pitch + out_w  # one past the last real pixel on the grid
        panels = (k_group + mr - 1) // mr
        pixel_blocks = (grid_end + nc - 1) // nc
        jobs = batch * groups * pixel_blocks * channel_chunks
        mc_panels = max(1, mc // mr)
        lowest, highest = offsets.min(), offsets.max()
        faults = np.zeros(threads, dtype=np.int64)
        next_job = np.zeros(1, dtype=np.int64)
        cpus, caller = capture_binding(threads)
        for thread in prange(threads):
            bind_slot(cpus, caller, thread)
            while True:
                job = fetch_add(next_job, 0, 1)
                if job >= jobs:
                    break
                image, group, block, first_panel, end_panel = gemm_job(job, channel_chunks, pixel_blocks, groups,
                                                                        panels)
                v_first = block * nc
                v_last = min(v_first + nc, grid_end)
                x_off = (image * channels + group * c_group) * phases * plane
                # Every read is x[x_off + offsets[p] + v] with v < v_last: check the extremes once.
                if lowest < 0 or not _in_range(x_off + lowest + v_first, highest - lowest + v_last - v_first,
                                               x.size):
                    faults[thread] += 1
                    continue
                for pc in range(0, reduction, kc):
                    depth = min(kc, reduction - pc)
                    block_offsets = offsets[pc:pc + depth]
                    accumulate = pc > 0
                    last = pc + depth >= reduction
                    for ic in range(first_panel, end_panel, mc_panels):
                        ic_end = min(ic + mc_panels, end_panel)
                        for v0 in range(v_first, v_last, nr):
                            for ip in range(ic, ic_end):
                                rows = min(mr, k_group - ip * mr)
                                channel = group * k_group + ip * mr
                                c_off = (image * k_total + channel) * pixels
                                a_off = channel * lda + pc
                                if not (_in_range(a_off, (rows - 1) * lda + depth, w.size)
                                        and _in_range(channel, rows, bias.size)
                                        and _in_range(c_off, (rows - 1) * pixels + pixels, out.size)):
                                    faults[thread] += 1
                                    continue
                                implicit_microkernel(mr, nv, lanes, depth, w, a_off, lda, rows, x, x_off,
                                                     block_offsets, v0, v_last, pitch, out_w, out, c_off, pixels,
                                                     accumulate, bias, channel, use_bias and last, relu and last)
        if faults.sum():
            raise IndexError("conv2d_implicit: a micro-kernel operand fell outside its buffer")

    return conv2d_implicit
