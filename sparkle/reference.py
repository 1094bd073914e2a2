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


def conv2d_at(x, w, bias=None, *, points, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """float64 conv2d output at ``points``, an (n, 4) int array of (image, channel, row, column).

    Computes each element from the definition (its receptive field times its filter), so a large
    problem can be checked on a random sample without the cost of the full reference.
    """
    spec = api.conv2d_spec(x, w, bias, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, activation=activation)
    points = np.asarray(points, dtype=np.int64).reshape(-1, 4)
    c_per_group = spec.in_channels // spec.groups
    k_per_group = spec.out_channels // spec.groups
    taps_h = np.arange(spec.kernel_h) * spec.dilation_h
    taps_w = np.arange(spec.kernel_w) * spec.dilation_w
    values = np.empty(len(points), dtype=np.float64)
    for index, (n, k, oh, ow) in enumerate(points):
        g = k // k_per_group
        rows = oh * spec.stride_h - spec.pad_top + taps_h
        cols = ow * spec.stride_w - spec.pad_left + taps_w
        inside = (rows[:, None] >= 0) & (rows[:, None] < spec.height) & (cols >= 0) & (cols < spec.width)
        window = x[n, g * c_per_group:(g + 1) * c_per_group][:, rows.clip(0, spec.height - 1)][
            :, :, cols.clip(0, spec.width - 1)].astype(np.float64)
        window = np.where(inside, window, 0.0)  # the zero padding, multiplied like any input (inf * 0 is NaN)
        values[index] = (window * np.asarray(w[k], dtype=np.float64)).sum()
    if bias is not None:
        values += np.asarray(bias, dtype=np.float64)[points[:, 1]]
    if activation == "relu":
        values = np.maximum(values, 0.0)
    return values


def matmul_at(a, b, *, points):
    """float64 (a @ b) at ``points``, an (n, 2) int array of (row, column)."""
    api.matmul_spec(a, b)
    points = np.asarray(points, dtype=np.int64).reshape(-1, 2)
    rows = np.asarray(a[points[:, 0]], dtype=np.float64)
    cols = np.asarray(b[:, points[:, 1]], dtype=np.float64)
    return np.einsum("pk,kp->p", rows, cols)
