"""Fused im2col + GEMM convolution on the CPU.

out[n, k, pixel] = sum_p W[k, p] * patch[p, pixel] per group, where the patch is
never materialized for the whole input: each job packs the patch of one block of
output pixels, one reduction block at a time, and the micro-kernel consumes it while
it is hot in cache. Jobs are (image, group, pixel block, channel chunk); threads take
them from a shared atomic counter and work in per-thread scratch buffers.
"""

import functools
import hashlib
import pathlib

import numpy as np
from numba import njit, prange

from .atomics import fetch_add
from .microkernel import microkernel
from .operands import CHANNEL_CHUNKS, KC, LDA, MC, NC, PADDED_PIXELS, RELU, USE_BIAS, geometry_of
from .packing import pack_im2col_block, pixel_origins, tap_offsets
from .threads import bind_slot, capture_binding


@njit(cache=True, inline="always")
def _in_range(offset, extent, size):
    return 0 <= offset and offset + extent <= size


@njit(cache=True, inline="always")
def gemm_job(job, channel_chunks, pixel_blocks, groups, panels):
    """Job number -> (image, group, pixel block, first and end output-channel panel): jobs are
    (image, group, pixel block, channel chunk), the chunk fastest."""
    chunk = job % channel_chunks
    rest = job // channel_chunks
    block = rest % pixel_blocks
    rest //= pixel_blocks
    return (rest // groups, rest % groups, block, chunk * panels // channel_chunks,
            (chunk + 1) * panels // channel_chunks)


@njit(cache=True, inline="always")
def _block_kernel(mr, nv, lanes, nr, depth, a, a_off, lda, b, b_off, out, c_off, ldc, rows, cols, accumulate,
                  bias, bias_off, use_bias, relu, tile):
    """One mr x nr block of C; edge blocks go through a private tile.

    The micro-kernel reads and writes through raw pointers, so every operand range is
    checked here (a few compares per thousands of flops). Returns False, having touched
    nothing, when one is out of range; raising inside a prange loop would serialize it.
    """
    if not (_in_range(a_off, (rows - 1) * lda + depth, a.size) and _in_range(b_off, depth * nr, b.size)
            and _in_range(bias_off, rows, bias.size) and _in_range(c_off, (rows - 1) * ldc + cols, out.size)
            and rows >= 1 and cols >= 1):
        return False
    if rows == mr and cols == nr:
        microkernel(mr, nv, lanes, depth, a, a_off, lda, rows, b, b_off, out, c_off, ldc, accumulate,
                    bias, bias_off, use_bias, relu)
        return True
    if accumulate:
        for i in range(rows):
            for j in range(cols):
                tile[i * nr + j] = out[c_off + i * ldc + j]
    microkernel(mr, nv, lanes, depth, a, a_off, lda, rows, b, b_off, tile, 0, nr, accumulate,
                bias, bias_off, use_bias, relu)
    for i in range(rows):
        for j in range(cols):
            out[c_off + i * ldc + j] = tile[i * nr + j]
    return True


def kernel_source_fingerprint():
    """Hash of the sources compiled into the driver.

    Numba's disk cache revalidates a function against its own file only; the driver
    inlines code from its sibling modules, so their contents go into its cache key.
    """
    digest = hashlib.sha256()
    for module in ("affinity.py", "atomics.py", "conv2d.py", "direct.py", "implicit.py", "microkernel.py",
                   "operands.py", "packing.py", "threads.py"):
        digest.update((pathlib.Path(__file__).parent / module).read_bytes())
    return int.from_bytes(digest.digest()[:7], "little")


def kernel_variants(build):
    """Cache a factory of compiled kernels: one dispatcher per variant (its closure constants and
    ``parallel``), whether ``parallel`` is given by keyword or left to its default (lru_cache alone
    would key those two calls apart and compile the variant twice). ``parallel`` is keyword-only;
    ``cache_info`` is lru_cache's."""
    cached = functools.lru_cache(maxsize=None)(build)

    @functools.wraps(build)
    def factory(*constants, parallel=True):
        return cached(*constants, bool(parallel))

    factory.cache_info = cached.cache_info
    return factory


@kernel_variants
def fused_conv2d_driver(mr, nv, nr, parallel):
    """The compiled driver for an ``mr x nv``-vector micro-kernel of ``nr`` columns
    (``nr // nv`` lanes per vector: the instruction set's width for the dtype).

    ``mr``, ``nv`` and ``nr`` are closure constants, so the micro-kernel and the packing
    loops (fully unrolled over a panel's ``nr`` pixels) are specialized at compile time,
    while Numba's disk cache still tells the variants apart (it hashes
    closure contents, the source fingerprint included). Shapes are runtime values: a new
    shape never compiles. ``parallel=False`` compiles the same code without Numba's parallel
    launch, for plans of one thread (small work: see ``plan.default_threads``).
    """
    source_fingerprint = kernel_source_fingerprint()
    lanes = nr // nv

    @njit(cache=True, parallel=parallel)
    def conv2d_fused(x, w, bias, out, params, value_scratch, index_scratch):
        """Run the whole convolution. ``x`` and ``out`` are flat C-order NCHW arrays, ``w`` the flat
        K x (C/groups * R * S) weight matrix with rows ``params[LDA]`` apart; ``bias`` has K entries
        (zeros when unused); ``params``: ``operands.call_params``; the scratch rows, one per thread, are
        laid out as ``operands.ScratchLayout`` says."""
        _ = source_fingerprint, parallel  # part of the closure, hence of the disk cache key
        (batch, channels, height, width, k_total, kernel_h, kernel_w, stride_h, stride_w,
         pad_top, pad_left, dilation_h, dilation_w, groups, out_h, out_w) = geometry_of(params)
        use_bias, relu, lda = params[USE_BIAS] != 0, params[RELU] != 0, params[LDA]
        kc, mc, nc, channel_chunks = params[KC], params[MC], params[NC], params[CHANNEL_CHUNKS]
        padded_block = params[PADDED_PIXELS]
        c_group = channels // groups
        k_group = k_total // groups
        taps = kernel_h * kernel_w
        reduction = taps * c_group
        pixels = out_h * out_w
        plane = height * width
        panels = (k_group + mr - 1) // mr
        pixel_blocks = (pixels + nc - 1) // nc
        jobs = batch * groups * pixel_blocks * channel_chunks
        threads = value_scratch.shape[0]
        mc_panels = max(1, mc // mr)
        # Scratch layout (operands.scratch_layout): panel, tile | origins, offsets, runs, rows.
        panel_size = kc * padded_block
        offsets_start = 2 * padded_block
        runs_start = offsets_start + taps * padded_block
        rows_start = runs_start + taps * (padded_block // nr)
        # Scratch rows shorter than the parameters say, or blocks wider than padded_block: stop before any
        # job runs (raising here, outside the parallel loop, costs nothing on the way through).
        if (value_scratch.shape[1] < panel_size + mr * nr or index_scratch.shape[0] < threads
                or index_scratch.shape[1] < rows_start + 2 * kc or padded_block % nr
                or padded_block < (min(nc, pixels) + nr - 1) // nr * nr):
            raise IndexError("conv2d_fused: the scratch layout falls outside its buffer")
        faults = np.zeros(threads, dtype=np.int64)
        next_job = np.zeros(1, dtype=np.int64)
        cpus, caller = capture_binding(threads)
        for thread in prange(threads):
            bind_slot(cpus, caller, thread)
            values = value_scratch[thread]
            indices = index_scratch[thread]
            panel = values[:panel_size]
            tile = values[panel_size:panel_size + mr * nr]
            row_origin = indices[:padded_block]
            col_origin = indices[padded_block:offsets_start]
            offsets = indices[offsets_start:runs_start].reshape((taps, padded_block))
            runs = indices[runs_start:rows_start].reshape((taps, padded_block // nr))
            row_sources = indices[rows_start:rows_start + 2 * kc].reshape((kc, 2))
            while True:
                job = fetch_add(next_job, 0, 1)
                if job >= jobs:
                    break
                image, group, block, first_panel, end_panel = gemm_job(job, channel_chunks, pixel_blocks, groups,
                                                                        panels)
                first_pixel = block * nc
                block_pixels = min(nc, pixels - first_pixel)
                padded_pixels = (block_pixels + nr - 1) // nr * nr
                pixel_origins(first_pixel, block_pixels, padded_pixels, out_w, stride_h, stride_w, pad_top,
                              pad_left, row_origin, col_origin)
                tap_offsets(kernel_h, kernel_w, dilation_h, dilation_w, height, width, stride_w, nr, padded_pixels,
                            row_origin, col_origin, offsets, runs)
                image_offset = (image * channels + group * c_group) * plane
                for pc in range(0, reduction, kc):
                    depth = min(kc, reduction - pc)
                    pack_im2col_block(x, image_offset, plane, taps, pc, depth, stride_w, nr, padded_pixels, offsets,
                                      runs, row_sources, panel)
                    accumulate = pc > 0
                    last = pc + depth >= reduction
                    for ic in range(first_panel, end_panel, mc_panels):
                        ic_end = min(ic + mc_panels, end_panel)
                        for jp in range(padded_pixels // nr):
                            cols = min(nr, block_pixels - jp * nr)
                            for ip in range(ic, ic_end):
                                rows = min(mr, k_group - ip * mr)
                                channel = group * k_group + ip * mr
                                c_off = (image * k_total + channel) * pixels + first_pixel + jp * nr
                                if not _block_kernel(mr, nv, lanes, nr, depth, w, channel * lda + pc, lda,
                                                     panel, jp * depth * nr, out, c_off, pixels, rows, cols,
                                                     accumulate, bias, channel, use_bias and last, relu and last,
                                                     tile):
                                    faults[thread] += 1
        if faults.sum():
            raise IndexError("conv2d_fused: a micro-kernel operand fell outside its buffer")

    return conv2d_fused
