"""Run-time verification: a sample of a call's outputs against float64 values computed at those points
only (``reference.conv2d_at`` / ``matmul_at``), so checking costs a small fraction of the call.

The sample always holds the output's corners along every axis (where edge and padding bugs live) and
random points inside.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .. import reference

RANDOM_POINTS = 48
EPSILON = {"float32": float(np.finfo(np.float32).eps), "float64": float(np.finfo(np.float64).eps)}


def sample_points(shape, rng):
    """Indices into an output of ``shape``: every corner combination, then RANDOM_POINTS random ones."""
    corners = np.array(list(itertools.product(*[sorted({0, size - 1}) for size in shape])), dtype=np.int64)
    inside = np.stack([rng.integers(0, size, RANDOM_POINTS) for size in shape], axis=1)
    return np.concatenate([corners.reshape(-1, len(shape)), inside])


def tolerance(dtype, reduction):
    """Allowed |error| relative to the sum of |products| at a point: rounding that grows as sqrt(length)."""
    return 8 * EPSILON[dtype] * max(1.0, math.sqrt(reduction))


def conv2d_arguments(spec):
    """The keyword arguments of ``sparkle.conv2d`` that give ``spec`` (padding resolved)."""
    return dict(stride=(spec.stride_h, spec.stride_w),
                padding=(spec.pad_top, spec.pad_bottom, spec.pad_left, spec.pad_right),
                dilation=(spec.dilation_h, spec.dilation_w), groups=spec.groups, activation=spec.activation)


def check(op, spec, operands, result, rng):
    """(passed, worst error / allowed) for host ``operands`` and host ``result`` of one call."""
    if result.size == 0:
        return result.shape == _expected_shape(op, spec), 0.0
    points = sample_points(result.shape, rng)
    if op == "conv2d":
        kwargs = conv2d_arguments(spec)
        x, w, bias = operands
        exact = reference.conv2d_at(x, w, bias, points=points, **kwargs)
        scale = reference.conv2d_at(x, w, bias, points=points, absolute=True, **kwargs)
        reduction = spec.reduction
    else:
        a, b = operands
        exact = reference.matmul_at(a, b, points=points)
        scale = reference.matmul_at(a, b, points=points, absolute=True)
        reduction = spec.k
    got = result[tuple(points.T)].astype(np.float64)
    allowed = tolerance(spec.dtype.name, reduction) * scale + np.finfo(np.float64).tiny
    with np.errstate(invalid="ignore"):
        error = np.abs(got - exact)
        same_nan = np.isnan(got) & np.isnan(exact)
        same_inf = np.isinf(got) & (got == exact)
    ratio = np.where(same_nan | same_inf, 0.0, np.nan_to_num(error / allowed, nan=np.inf))
    worst = float(ratio.max()) if ratio.size else 0.0
    return worst <= 1.0, worst


def _expected_shape(op, spec):
    return (spec.m, spec.n) if op == "matmul" else spec.output_shape
