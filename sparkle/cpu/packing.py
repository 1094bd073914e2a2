"""Packing of GEMM operands into the panel layouts the micro-kernel reads.

- Weights (K, C/groups, R, S) become, per group, panels of ``mr`` output channels
  with the reduction index p = (r * S + s) * Cg + c running slowest and the
  ``mr`` channels fastest. Channels past the group's end are zero.
- The im2col patch of a block of output pixels becomes panels of ``nr`` pixels,
  reduction index slowest. It is built straight from the input; pixels outside the
  padded input read as zero. The reduction order (r, s, c) lets the source offsets
  of a block's pixels be computed once per kernel tap and reused for every channel.
"""

import numpy as np
from numba import njit


def panel_count(rows, mr):
    return -(-rows // mr)


def pack_weights(w, groups, mr):
    """Pack (K, Cg, R, S) weights into (groups, panels, R*S*Cg, mr) panels."""
    k_total, c_group, kernel_h, kernel_w = w.shape
    k_group = k_total // groups
    panels = panel_count(k_group, mr)
    padded = np.zeros((groups, panels * mr, kernel_h, kernel_w, c_group), dtype=w.dtype)
    # (K, Cg, R, S) -> (G, Kg, R, S, Cg): reduction order (r, s, c).
    padded[:, :k_group] = w.reshape(groups, k_group, c_group, kernel_h, kernel_w).transpose(0, 1, 3, 4, 2)
    reduction = kernel_h * kernel_w * c_group
    packed = padded.reshape(groups, panels, mr, reduction).transpose(0, 1, 3, 2)
    return np.ascontiguousarray(packed).reshape(-1)


def pack_bias(bias, groups, k_total, mr, dtype):
    """Bias padded per group to whole panels; zeros when there is no bias."""
    k_group = k_total // groups
    panels = panel_count(k_group, mr)
    packed = np.zeros((groups, panels * mr), dtype=dtype)
    if bias is not None:
        packed[:, :k_group] = bias.reshape(groups, k_group)
    return packed.reshape(-1)


@njit(cache=True, inline="always")
def pixel_origins(first_pixel, pixel_count, padded_count, out_w, stride_h, stride_w, pad_top, pad_left,
                  row_origin, col_origin):
    """Top-left input coordinate of each output pixel of a block; padding pixels get an
    origin far outside the input so that every tap reads zero for them."""
    for q in range(padded_count):
        if q < pixel_count:
            pixel = first_pixel + q
            row_origin[q] = (pixel // out_w) * stride_h - pad_top
            col_origin[q] = (pixel % out_w) * stride_w - pad_left
        else:
            row_origin[q] = -(1 << 40)
            col_origin[q] = -(1 << 40)


@njit(cache=True, inline="always")
def tap_offsets(r, s, dilation_h, dilation_w, height, width, nr, padded_count, row_origin, col_origin,
                offsets, runs):
    """Offset inside one input channel plane read by tap (r, s) for each pixel, -1 where
    the tap falls in the padding. ``runs[jp]`` is the first offset of panel ``jp`` when
    its ``nr`` pixels read consecutive valid elements (a plain copy), else -1."""
    for q in range(padded_count):
        row = row_origin[q] + r * dilation_h
        col = col_origin[q] + s * dilation_w
        if 0 <= row < height and 0 <= col < width:
            offsets[q] = row * width + col
        else:
            offsets[q] = -1
    for jp in range(padded_count // nr):
        start = offsets[jp * nr]
        runs[jp] = start
        for j in range(nr):
            if start < 0 or offsets[jp * nr + j] != start + j:
                runs[jp] = -1
                break


@njit(cache=True, inline="always")
def pack_im2col_block(x, image_offset, plane, c_group, first_reduction, depth, kernel_w,
                      dilation_h, dilation_w, height, width, nr, padded_count,
                      row_origin, col_origin, offsets, runs, panel):
    """Pack reduction rows [first_reduction, first_reduction + depth) of the im2col patch
    into ``panel`` as (padded_count // nr) panels of (depth, nr)."""
    current_tap = -1
    panels = padded_count // nr
    for pp in range(depth):
        p = first_reduction + pp
        tap = p // c_group
        channel = p - tap * c_group
        if tap != current_tap:
            tap_offsets(tap // kernel_w, tap % kernel_w, dilation_h, dilation_w, height, width,
                        nr, padded_count, row_origin, col_origin, offsets, runs)
            current_tap = tap
        source = image_offset + channel * plane
        for jp in range(panels):
            destination = (jp * depth + pp) * nr
            run = runs[jp]
            if run >= 0:
                for j in range(nr):
                    panel[destination + j] = x[source + run + j]
                continue
            for j in range(nr):
                offset = offsets[jp * nr + j]
                panel[destination + j] = x[source + offset] if offset >= 0 else 0.0
