"""The direct kernel: groups with at most DIRECT_MAX_GROUP_OUTPUTS output channels (depthwise,
channel multipliers, single-output convolutions) skip the GEMM driver. Same contract as the
rest: the reference's results, NaN/Inf included, for every geometry."""

import numpy as np
import pytest

import sparkle
from sparkle import api, reference
from sparkle.cpu import backend

from _helpers import DTYPES, assert_close_to_reference

CASES = [
    # (N, C, H, W, K, groups, R, S, stride, dilation, padding)
    (1, 8, 9, 11, 8, 8, 3, 3, 1, 1, 1),                 # depthwise
    (2, 6, 12, 10, 12, 6, 5, 4, (2, 1), (1, 2), "same"),  # multiplier 2, strided, dilated
    (1, 5, 7, 9, 15, 5, 3, 3, 3, 1, (0, 2, 1, 3)),      # multiplier 3, stride > kernel reach
    (3, 8, 6, 6, 4, 2, 2, 3, 1, 2, (2, 1)),             # 4 input and 2 output channels per group
    (1, 40, 13, 8, 1, 1, 5, 5, 1, 1, 2),                # one output channel: rows split over threads
    (1, 3, 4, 4, 3, 3, 7, 7, 1, 1, 3),                  # kernel larger than the input
    (2, 4, 1, 17, 4, 4, 1, 3, (1, 2), 1, "valid"),      # one-row images
]


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:8])))
def test_direct_kernel_matches_reference(case, dtype, use_bias, activation):
    n, c, h, w_, k, groups, r, s, stride, dilation, padding = case
    rng = np.random.default_rng(sum(case[:8]))
    x = rng.standard_normal((n, c, h, w_)).astype(dtype)
    w = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype) if use_bias else None
    kwargs = dict(stride=stride, dilation=dilation, padding=padding, groups=groups, activation=activation)
    assert backend.uses_direct_kernel(api.conv2d_spec(x, w, bias, **kwargs))
    y = sparkle.conv2d(x, w, bias, device="cpu", **kwargs)
    assert y.dtype == dtype and y.flags.c_contiguous
    assert_close_to_reference(y, reference.conv2d(x, w, bias, **kwargs), dtype)


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_kernel_non_finite_weights_in_padding_as_reference(dtype):
    # The reference multiplies zero padding by the weight: Inf * 0 is NaN at the border.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 6, 6)).astype(dtype)
    w = rng.standard_normal((4, 1, 3, 3)).astype(dtype)
    w[0, 0, 0, 0], w[2, 0, 1, 2], w[3, 0, 2, 2] = np.inf, -np.inf, np.nan
    y = sparkle.conv2d(x, w, padding=1, groups=4, device="cpu")
    expected = reference.conv2d(x, w, padding=1, groups=4)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert_close_to_reference(y[finite], expected[finite], dtype)


def test_direct_kernel_empty_batch():
    x = np.zeros((0, 4, 5, 5), np.float32)
    w = np.ones((4, 1, 3, 3), np.float32)
    assert sparkle.conv2d(x, w, groups=4, device="cpu").shape == (0, 4, 3, 3)
