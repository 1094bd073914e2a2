"""Packing of the im2col patch into the panel layout the micro-kernel reads.

The weights need no packing: as a row-major K x (C/groups * R * S) matrix they are
already what the micro-kernel streams (one sequential stream per output channel).
The patch of a block of output pixels is packed, one reduction block at a time, into
panels of ``nr`` pixels with the reduction index p = (c * R + r) * S + s slowest,
matching the weights. It is read straight from the input; taps that fall in the
padding read as zero. Source offsets depend on the tap and the pixel but not on the
channel, so they are computed once per block of pixels and reused for every channel.
"""

from numba import njit, uint64

_FAR_AWAY = -(1 << 40)  # origin of padding pixels: every tap of theirs misses the input


def panel_count(size, panel):
    """Panels of ``panel`` elements needed to cover ``size`` elements."""
    return -(-size // panel)


@njit(cache=True, inline="always")
def pixel_origins(first_pixel, pixel_count, padded_count, out_w, stride_h, stride_w, pad_top, pad_left,
                  row_origin, col_origin):
    """Top-left input coordinate of each output pixel of a block. The output row and column step along
    (one division per block: a 64-bit division per pixel took most of a small convolution's time on Zen 1)."""
    row = first_pixel // out_w
    col = first_pixel - row * out_w
    for q in range(padded_count):
        if q < pixel_count:
            row_origin[q] = row * stride_h - pad_top
            col_origin[q] = col * stride_w - pad_left
            col += 1
            if col == out_w:
                col = 0
                row += 1
        else:
            row_origin[q] = _FAR_AWAY
            col_origin[q] = _FAR_AWAY


@njit(cache=True, inline="always")
def tap_offsets(kernel_h, kernel_w, dilation_h, dilation_w, height, width, stride_w, nr, padded_count,
                row_origin, col_origin, offsets, runs):
    """For every tap t = r * S + s and pixel q: ``offsets[t, q]``, the offset inside one
    input channel plane that the tap reads, or -1 where it falls in the padding; and
    ``runs[t, jp]``, the first offset of panel ``jp`` when its ``nr`` pixels read valid
    elements ``stride_w`` apart (one input row: a strided copy), else -1."""
    for r in range(kernel_h):
        for s in range(kernel_w):
            tap = r * kernel_w + s
            for q in range(padded_count):
                row = row_origin[q] + r * dilation_h
                col = col_origin[q] + s * dilation_w
                inside = (0 <= row) & (row < height) & (0 <= col) & (col < width)
                offsets[tap, q] = row * width + col if inside else -1  # branch-free: vectorizes
            for jp in range(padded_count // nr):
                start = offsets[tap, jp * nr]
                runs[tap, jp] = start
                for j in range(nr):
                    if start < 0 or offsets[tap, jp * nr + j] != start + j * stride_w:
                        runs[tap, jp] = -1
                        break


@njit(cache=True, inline="always")
def pack_im2col_block(x, image_offset, plane, taps, first_reduction, depth, stride_w, nr, padded_count,
                      offsets, runs, row_sources, panel):
    """Pack reduction rows [first_reduction, first_reduction + depth) of the im2col patch
    into ``panel`` as (padded_count // nr) panels of (depth, nr).

    Panel by panel, so that the writes form one sequential stream; ``row_sources`` (at
    least ``depth`` entries) caches each reduction row's channel plane and tap.
    """
    channel = first_reduction // taps
    tap = first_reduction - channel * taps
    for pp in range(depth):  # the tap steps along, as the pixels do in pixel_origins
        row_sources[pp, 0] = image_offset + channel * plane
        row_sources[pp, 1] = tap
        tap += 1
        if tap == taps:
            tap = 0
            channel += 1
    for jp in range(padded_count // nr):
        for pp in range(depth):
            source = row_sources[pp, 0]
            tap = row_sources[pp, 1]
            destination = (jp * depth + pp) * nr
            run = runs[tap, jp]
            # Unsigned indices: Numba then adds no negative-index wraparound and LLVM
            # vectorizes the copies.
            if run >= 0 and stride_w == 1:
                for j in range(nr):
                    panel[uint64(destination + j)] = x[uint64(source + run + j)]
            elif run >= 0:
                for j in range(nr):
                    panel[uint64(destination + j)] = x[uint64(source + run + j * stride_w)]
            else:
                for j in range(nr):
                    # Branch-free: read a valid element either way, keep it only for a real tap.
                    offset = offsets[tap, jp * nr + j]
                    value = x[uint64(source + max(offset, 0))]
                    panel[uint64(destination + j)] = value if offset >= 0 else 0.0
