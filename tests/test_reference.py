"""``sparkle.reference.conv2d_at`` and ``matmul_at``: the float64 values at sampled output positions that
decide whether a tuning candidate (``sparkle.tune``) and the large oracle problems are correct.

They are checked against values computed here independently -- conv2d by its definition, one output
element at a time with explicit loops, matmul as ``a.astype(float64) @ b`` -- and against the full
``reference.conv2d`` / ``reference.matmul`` at the same indices, over every padding form, stride, dilation,
groups (depthwise included), bias and ReLU, at random positions and at every corner of the output.
"""

import itertools

import numpy as np
import pytest

from sparkle import reference

from _helpers import as_pair, make_array, output_hw, resolve_padding

CASES = {
    "plain": {"x": (2, 3, 7, 6), "w": (4, 3, 3, 3)},
    "int-padding-bias-relu": {"x": (1, 4, 6, 9), "w": (5, 4, 3, 2), "padding": 2, "bias": True, "activation": "relu"},
    "pair-padding-stride": {"x": (2, 2, 9, 8), "w": (3, 2, 3, 3), "padding": (1, 2), "stride": (2, 3)},
    "tblr-padding-dilation": {"x": (1, 3, 10, 7), "w": (2, 3, 3, 2), "padding": (0, 3, 2, 1), "dilation": (2, 3),
                              "bias": True},
    "same-stride-2": {"x": (1, 2, 9, 10), "w": (4, 2, 4, 3), "padding": "same", "stride": 2, "activation": "relu"},
    "valid-big-kernel": {"x": (2, 2, 8, 9), "w": (3, 2, 5, 7), "padding": "valid", "bias": True},
    "groups": {"x": (2, 6, 7, 7), "w": (9, 2, 3, 3), "groups": 3, "padding": 1, "stride": (1, 2), "bias": True,
               "activation": "relu"},
    "depthwise": {"x": (1, 5, 6, 8), "w": (10, 1, 3, 3), "groups": 5, "padding": (1, 0, 2, 2), "dilation": (1, 2)},
    "pointwise-strided": {"x": (3, 4, 5, 6), "w": (7, 4, 1, 1), "stride": 2},
}


def case_inputs(name, dtype, seed=0):
    config = dict(CASES[name])
    rng = np.random.default_rng(seed)
    x = make_array(rng, config.pop("x"), dtype, "negative")
    w_shape = config.pop("w")
    w = make_array(rng, w_shape, dtype, "F")
    bias = make_array(rng, w_shape[:1], dtype) if config.pop("bias", False) else None
    return x, w, bias, config


def definition_at(x, w, bias, point, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """One output element of conv2d by its definition, in float64 (explicit loops over the receptive field)."""
    n, k, i, j = (int(v) for v in point)
    stride, dilation = as_pair(stride), as_pair(dilation)
    top, _, left, _ = resolve_padding(padding, x.shape[2:], w.shape[2:], stride, dilation)
    c_group = w.shape[1]
    group = k // (w.shape[0] // groups)
    total = 0.0 if bias is None else float(bias[k])
    for c in range(c_group):
        for r in range(w.shape[2]):
            for s in range(w.shape[3]):
                row = i * stride[0] - top + r * dilation[0]
                col = j * stride[1] - left + s * dilation[1]
                if 0 <= row < x.shape[2] and 0 <= col < x.shape[3]:
                    total += float(x[n, group * c_group + c, row, col]) * float(w[k, c, r, s])
    return max(total, 0.0) if activation == "relu" else total


def sample_points(rng, shape, count):
    """``count`` random positions plus every corner of the output (first/last image, channel, row, column)."""
    corners = np.array(list(itertools.product(*[(0, size - 1) for size in shape])))
    random = np.stack([rng.integers(0, size, count) for size in shape], axis=1)
    return np.concatenate([corners, random])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", CASES)
def test_conv2d_at_matches_the_definition_and_the_full_reference(name, dtype):
    x, w, bias, kwargs = case_inputs(name, dtype)
    stride, dilation = kwargs.get("stride", 1), kwargs.get("dilation", 1)
    pads = resolve_padding(kwargs.get("padding", 0), x.shape[2:], w.shape[2:], stride, dilation)
    shape = (x.shape[0], w.shape[0], *output_hw(x.shape[2:], w.shape[2:], stride, pads, dilation))
    points = sample_points(np.random.default_rng(1), shape, 40)
    values = reference.conv2d_at(x, w, bias, points=points, **kwargs)
    assert values.dtype == np.float64 and values.shape == (len(points),)
    expected = np.array([definition_at(x, w, bias, p, **kwargs) for p in points])
    np.testing.assert_allclose(values, expected, rtol=1e-12, atol=1e-12)
    full = reference.conv2d(x, w, bias, **kwargs)
    assert full.shape == shape
    np.testing.assert_allclose(values, full[tuple(points.T)], rtol=1e-12, atol=1e-12)
    if kwargs.get("activation") == "relu":
        assert (values == 0).any() and (values > 0).any()  # the sample really sees ReLU at work


def test_conv2d_at_every_position_of_a_small_problem():
    x, w, bias, kwargs = case_inputs("groups", np.float64, seed=2)
    full = reference.conv2d(x, w, bias, **kwargs)
    points = np.argwhere(np.ones(full.shape, dtype=bool))
    np.testing.assert_allclose(reference.conv2d_at(x, w, bias, points=points, **kwargs), full.ravel(),
                               rtol=1e-12, atol=1e-12)


def test_conv2d_at_over_several_chunks_of_points_and_a_non_contiguous_input():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 32, 34, 64)).transpose(0, 1, 3, 2)[:, :, ::2]  # (1, 32, 32, 34), strided
    w = rng.standard_normal((4, 32, 3, 3))
    full = reference.conv2d(x, w, padding=1)
    points = np.argwhere(np.ones(full.shape, dtype=bool))  # 4352 points: over 1M window elements, so chunked
    assert len(points) * 32 * 9 > 2**20 and not x.flags.c_contiguous
    np.testing.assert_allclose(reference.conv2d_at(x, w, points=points, padding=1), full.ravel(),
                               rtol=1e-12, atol=1e-12)


def test_conv2d_at_takes_no_points_and_one_flat_point():
    x, w, bias, kwargs = case_inputs("plain", np.float32)
    assert reference.conv2d_at(x, w, bias, points=np.zeros((0, 4), int), **kwargs).shape == (0,)
    value = reference.conv2d_at(x, w, bias, points=[1, 3, 4, 3], **kwargs)
    assert value.shape == (1,) and value[0] == pytest.approx(definition_at(x, w, bias, (1, 3, 4, 3)), abs=1e-12)


def test_conv2d_at_propagates_nan_from_the_input_and_through_relu():
    x, w, bias, kwargs = case_inputs("int-padding-bias-relu", np.float64)
    x = x.copy()
    x[0, 1, 2, 3] = np.nan
    full = reference.conv2d(x, w, bias, **kwargs)
    points = np.argwhere(np.ones(full.shape, dtype=bool))
    values = reference.conv2d_at(x, w, bias, points=points, **kwargs)
    np.testing.assert_array_equal(np.isnan(values), np.isnan(full.ravel()))
    assert np.isnan(values).any()


def test_conv2d_at_agrees_with_the_full_reference_for_a_non_finite_weight_on_padding():
    x, w, _bias, _kwargs = case_inputs("plain", np.float64)
    w = w.copy()
    w[1, 0, 0, 0] = np.inf
    with np.errstate(invalid="ignore"):  # inf * 0 on the padding: NaN, as intended
        full = reference.conv2d(x, w, padding=1)
        value = reference.conv2d_at(x, w, points=[[0, 1, 0, 0]], padding=1)
    np.testing.assert_array_equal(np.isnan(value), np.isnan(full[0, 1, 0, 0]))


MATMUL_SHAPES = [(1, 1, 1), (7, 13, 5), (33, 1, 17), (16, 64, 9)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mkn", MATMUL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matmul_at_matches_float64_product_and_the_full_reference(mkn, dtype):
    m, k, n = mkn
    rng = np.random.default_rng(m * 100 + n)
    a = make_array(rng, (m, k), dtype, "F")
    b = make_array(rng, (k, n), dtype, "negative")
    points = sample_points(rng, (m, n), 20)
    values = reference.matmul_at(a, b, points=points)
    assert values.dtype == np.float64 and values.shape == (len(points),)
    product = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(values, product[tuple(points.T)], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(values, reference.matmul(a, b)[tuple(points.T)], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", CASES)
def test_conv2d_at_absolute_is_the_sum_of_absolute_products(name):
    """The scale the run-time check divides by: |x| * |w| summed, plus |bias|, activation ignored, taken from
    the gathered windows only (the inputs are left as they were)."""
    x, w, bias, kwargs = case_inputs(name, np.float64, seed=5)
    assert (x < 0).any() and (w < 0).any()  # so |.| matters
    before = x.copy()
    stride, dilation = kwargs.get("stride", 1), kwargs.get("dilation", 1)
    pads = resolve_padding(kwargs.get("padding", 0), x.shape[2:], w.shape[2:], stride, dilation)
    shape = (x.shape[0], w.shape[0], *output_hw(x.shape[2:], w.shape[2:], stride, pads, dilation))
    points = sample_points(np.random.default_rng(6), shape, 30)
    scale = reference.conv2d_at(x, w, bias, points=points, absolute=True, **kwargs)
    expected = reference.conv2d_at(np.abs(x), np.abs(w), None if bias is None else np.abs(bias), points=points,
                                   **{**kwargs, "activation": None})
    np.testing.assert_allclose(scale, expected, rtol=1e-12, atol=0)
    assert (scale >= np.abs(reference.conv2d_at(x, w, bias, points=points, **kwargs)) - 1e-12).all()
    np.testing.assert_array_equal(x, before)


def test_matmul_at_absolute_is_the_sum_of_absolute_products():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((9, 13)), rng.standard_normal((13, 7))
    points = sample_points(rng, (9, 7), 15)
    np.testing.assert_allclose(reference.matmul_at(a, b, points=points, absolute=True),
                               (np.abs(a) @ np.abs(b))[tuple(points.T)], rtol=1e-12, atol=0)
