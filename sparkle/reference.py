"""Float64 oracle for conv2d and matmul: written to be obviously right, not fast.

Every other path in Sparkle is tested against these functions. They follow the
definition directly: zero-pad the input, then for every kernel tap (r, s) add the
strided input window times that tap's weights, group by group.
"""

import numpy as np

from . import api


def conv2d(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """conv2d in float64. Returns float64 whatever the input dtype."""
    spec = api.conv2d_spec(x, w, bias, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, activation=activation)
    x64 = np.asarray(x, dtype=np.float64)
    w64 = np.asarray(w, dtype=np.float64)
    padded = np.pad(x64, ((0, 0), (0, 0), (spec.pad_top, spec.pad_bottom), (spec.pad_left, spec.pad_right)))
    out = np.zeros(spec.output_shape, dtype=np.float64)
    c_per_group = spec.in_channels // spec.groups
    k_per_group = spec.out_channels // spec.groups
    for g in range(spec.groups):
        x_group = padded[:, g * c_per_group:(g + 1) * c_per_group]
        w_group = w64[g * k_per_group:(g + 1) * k_per_group]
        for r in range(spec.kernel_h):
            for s in range(spec.kernel_w):
                top = r * spec.dilation_h
                left = s * spec.dilation_w
                window = x_group[:, :,
                                 top:top + spec.stride_h * (spec.out_h - 1) + 1:spec.stride_h,
                                 left:left + spec.stride_w * (spec.out_w - 1) + 1:spec.stride_w]
                # window (N, Cg, OH, OW) x weights (Kg, Cg) -> (N, Kg, OH, OW)
                out[:, g * k_per_group:(g + 1) * k_per_group] += np.einsum(
                    "nchw,kc->nkhw", window, w_group[:, :, r, s])
    if bias is not None:
        out += np.asarray(bias, dtype=np.float64)[None, :, None, None]
    if activation == "relu":
        out = np.maximum(out, 0.0)  # np.maximum propagates NaN
    return out


def matmul(a, b):
    """(M, K) @ (K, N) in float64, summing products explicitly."""
    api.matmul_spec(a, b)
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    return np.einsum("mk,kn->mn", a64, b64)


def conv2d_at(x, w, bias=None, *, points, stride=1, padding=0, dilation=1, groups=1, activation=None,
              absolute=False):
    """float64 conv2d output at ``points``, an (n, 4) int array of (image, channel, row, column).

    Computes each element from the definition (its receptive field times its filter), so a large
    problem can be checked on a random sample without the cost of the full reference.
    ``absolute=True`` gives the sum of |products| (and |bias|) at the points instead, activation ignored:
    the scale that rounding errors grow with, without taking |x| of the whole input.
    """
    spec = api.conv2d_spec(x, w, bias, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, activation=activation)
    points = np.asarray(points, dtype=np.int64).reshape(-1, 4)
    c_per_group = spec.in_channels // spec.groups
    k_per_group = spec.out_channels // spec.groups
    taps_h = np.arange(spec.kernel_h) * spec.dilation_h
    taps_w = np.arange(spec.kernel_w) * spec.dilation_w
    values = np.empty(len(points), dtype=np.float64)
    # Points in chunks of at most ~1M window elements: one gather per chunk, not one per point.
    chunk = max(1, 2**20 // max(1, c_per_group * spec.kernel_h * spec.kernel_w))
    for start in range(0, len(points), chunk):
        n, k, oh, ow = points[start:start + chunk].T
        rows = oh[:, None] * spec.stride_h - spec.pad_top + taps_h  # (points, kernel_h)
        cols = ow[:, None] * spec.stride_w - spec.pad_left + taps_w  # (points, kernel_w)
        inside = (((rows >= 0) & (rows < spec.height))[:, :, None]
                  & ((cols >= 0) & (cols < spec.width))[:, None, :])  # (points, kernel_h, kernel_w)
        channels = (k // k_per_group)[:, None] * c_per_group + np.arange(c_per_group)  # (points, c_per_group)
        # One C-order flat index per window element (a single take: cheaper than four broadcast index arrays).
        at = (((n[:, None] * spec.in_channels + channels) * (spec.height * spec.width))[:, :, None, None]
              + (rows.clip(0, spec.height - 1) * spec.width)[:, None, :, None]
              + cols.clip(0, spec.width - 1)[:, None, None, :])
        window = np.take(x, at)
        # the zero padding, multiplied like any input (inf * 0 is NaN)
        window = np.where(inside[:, None], window.astype(np.float64), 0.0)
        filters = np.asarray(w[k], dtype=np.float64)
        if absolute:
            window, filters = np.abs(window), np.abs(filters)
        values[start:start + chunk] = (window * filters).sum(axis=(1, 2, 3))
    if bias is not None:
        bias_at = np.asarray(bias, dtype=np.float64)[points[:, 1]]
        values += np.abs(bias_at) if absolute else bias_at
    if activation == "relu" and not absolute:
        values = np.maximum(values, 0.0)
    return values


def matmul_at(a, b, *, points, absolute=False):
    """float64 (a @ b) at ``points``, an (n, 2) int array of (row, column); ``absolute=True``: the sum of
    |products| there instead (as for ``conv2d_at``)."""
    api.matmul_spec(a, b)
    points = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    rows = np.asarray(a[points[:, 0]], dtype=np.float64)
    cols = np.asarray(b[:, points[:, 1]], dtype=np.float64)
    if absolute:
        rows, cols = np.abs(rows), np.abs(cols)
    return np.einsum("pk,kp->p", rows, cols)
