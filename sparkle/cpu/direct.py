"""Direct convolution for groups with very few output channels (depthwise and the like).

A GEMM micro-kernel computes ``mr`` output channels at once; a group with one output
channel would waste most of every block. Here each job computes whole output rows of
one channel: for every input channel of its group and every tap, one weight times the
(strided) input rectangle the tap reads, accumulated in place, then bias and ReLU. The
inner loop runs over output columns: a vectorized stream for stride 1.

Taps that fall in the padding are skipped, except that a non-finite weight still adds
``weight * 0`` there (NaN), exactly as the reference's zero-padded product does.
"""

import numpy as np
from numba import njit, prange, uint64

from .atomics import fetch_add
from .conv2d import kernel_source_fingerprint, kernel_variants
from .operands import RELU, ROW_CHUNKS, THREADS, USE_BIAS, geometry_of
from .threads import bind_slot, capture_binding


@njit(cache=True, inline="always")
def _valid_range(origin, stride, size, count):
    """Outputs [first, end) of ``count`` whose input index ``o * stride + origin`` is in [0, size)."""
    first = 0 if origin >= 0 else (-origin + stride - 1) // stride
    end = 0 if origin > size - 1 else min(count, (size - 1 - origin) // stride + 1)
    return min(first, count), max(min(first, count), end)


@njit(cache=True, inline="always")
def _add_padding_products(out, destination, out_w, row_begin, row_end, rows, cols, weight):
    """Add weight * 0 where a tap reads padding (outside ``rows`` x ``cols``); only a
    non-finite weight changes anything."""
    if np.isfinite(weight):
        return
    for oh in range(row_begin, row_end):
        for ow in range(out_w):
            if not (rows[0] <= oh < rows[1] and cols[0] <= ow < cols[1]):
                out[destination + oh * out_w + ow] += weight * 0.0


@kernel_variants
def direct_conv2d_kernel(parallel):
    """The direct kernel, with the fingerprint of the sources it compiles in its closure: Numba keys the
    disk-cache entry by this file and the closure, and the kernel inlines threads.py, affinity.py,
    atomics.py and operands.py, so an edit there must change the key too. ``parallel=False`` compiles it
    without Numba's parallel launch, for calls of one thread (small work)."""
    source_fingerprint = kernel_source_fingerprint()

    @njit(cache=True, parallel=parallel)
    def direct_conv2d(x, w, bias, out, params):
        """``x``, ``w``, ``out``: flat C-order NCHW, KCRS, NKHW arrays; ``bias`` has K entries; ``params``:
        ``operands.call_params`` (``params[ROW_CHUNKS]`` jobs per output plane, ``params[THREADS]`` slots).

        A job is a band of output rows of one (image, channel) plane, accumulated in place in
        ``out``: per input channel and tap, one weight times the input rectangle the tap reads.
        """
        _ = source_fingerprint, parallel  # part of the closure, hence of the disk cache key
        (batch, channels, height, width, k_total, kernel_h, kernel_w, stride_h, stride_w,
         pad_top, pad_left, dilation_h, dilation_w, groups, out_h, out_w) = geometry_of(params)
        use_bias, relu = params[USE_BIAS] != 0, params[RELU] != 0
        row_chunks, threads = params[ROW_CHUNKS], params[THREADS]
        c_group = channels // groups
        k_group = k_total // groups
        taps = kernel_h * kernel_w
        jobs = batch * k_total * row_chunks
        next_job = np.zeros(1, dtype=np.int64)
        cpus, caller = capture_binding(threads)
        for thread in prange(threads):
            bind_slot(cpus, caller, thread)
            while True:
                job = fetch_add(next_job, 0, 1)
                if job >= jobs:
                    break
                chunk = job % row_chunks
                plane = job // row_chunks  # = image * k_total + k
                image = plane // k_total
                k = plane - image * k_total
                first_channel = (k // k_group) * c_group
                row_begin = chunk * out_h // row_chunks
                row_end = (chunk + 1) * out_h // row_chunks
                destination = plane * out_h * out_w
                out[destination + row_begin * out_w:destination + row_end * out_w] = 0.0
                for c in range(c_group):
                    source = (image * channels + first_channel + c) * height * width
                    for r in range(kernel_h):
                        row_origin = r * dilation_h - pad_top
                        rows = _valid_range(row_origin, stride_h, height, out_h)
                        rows = (max(rows[0], row_begin), max(max(rows[0], row_begin), min(rows[1], row_end)))
                        for s in range(kernel_w):
                            weight = w[(k * c_group + c) * taps + r * kernel_w + s]
                            col_origin = s * dilation_w - pad_left
                            cols = _valid_range(col_origin, stride_w, width, out_w)
                            for oh in range(rows[0], rows[1]):
                                input_row = source + (oh * stride_h + row_origin) * width + col_origin
                                output_row = destination + oh * out_w
                                # Unsigned indices: Numba adds no negative-index wraparound, so LLVM
                                # vectorizes (8x faster on a unit stride).
                                if stride_w == 1:
                                    for ow in range(cols[0], cols[1]):
                                        out[uint64(output_row + ow)] += weight * x[uint64(input_row + ow)]
                                else:
                                    for ow in range(cols[0], cols[1]):
                                        out[uint64(output_row + ow)] += weight * x[uint64(input_row + ow * stride_w)]
                            _add_padding_products(out, destination, out_w, row_begin, row_end, rows, cols, weight)
                for index in range(destination + row_begin * out_w, destination + row_end * out_w):
                    value = out[index] + bias[k] if use_bias else out[index]
                    out[index] = 0.0 if relu and value < 0 else value  # NaN stays NaN

    return direct_conv2d


direct_conv2d = direct_conv2d_kernel()
