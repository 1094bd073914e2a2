"""Edge cases of sparkle.conv2d, each checked against the float64 reference (or exactly, where the
result is determined without rounding)."""

import numpy as np
import pytest

import sparkle
from sparkle import reference

from _helpers import DTYPES, Unchanged, assert_close_to_reference, make_array

pytestmark = pytest.mark.boundscheck


def run_both(x, w, bias=None, **kwargs):
    """sparkle (cpu) and reference results, checking the common contract on the way."""
    unchanged = Unchanged(x, w, bias)
    y = sparkle.conv2d(x, w, bias, device="cpu", **kwargs)
    ref = reference.conv2d(x, w, bias, **kwargs)
    unchanged.check()
    assert y.dtype == x.dtype
    assert y.flags.c_contiguous
    assert y.shape == ref.shape
    return y, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [
    # (x shape, w shape, kwargs): every case has a 1x1 output.
    ((1, 3, 5, 5), (4, 3, 5, 5), {}),
    ((2, 2, 1, 1), (3, 2, 1, 1), {}),
    ((1, 2, 9, 9), (5, 2, 3, 3), {"stride": 7}),
    ((1, 3, 7, 5), (2, 3, 3, 3), {"dilation": (3, 2)}),
    ((1, 4, 1, 1), (4, 1, 3, 3), {"padding": 1, "groups": 4}),
], ids=["kernel-covers-input", "one-pixel", "big-stride", "dilated-span", "depthwise-padded-pixel"])
def test_output_size_one(dtype, case):
    x_shape, w_shape, kwargs = case
    rng = np.random.default_rng(1)
    x, w = make_array(rng, x_shape, dtype), make_array(rng, w_shape, dtype)
    y, ref = run_both(x, w, **kwargs)
    assert y.shape[2:] == (1, 1)
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_hw, kernel, padding, dilation", [
    ((3, 3), (7, 7), 2, 1),                  # kernel exactly the padded input
    ((3, 5), (4, 5), (0, 1, 0, 0), 1),       # asymmetric padding makes the fit exact
    ((1, 1), (5, 3), (2, 1), 1),             # input is a single pixel, all the rest padding
    ((3, 3), (3, 3), (1, 1, 1, 1), (2, 2)),  # dilated kernel spans the padded input
])
def test_kernel_as_large_as_padded_input(dtype, x_hw, kernel, padding, dilation):
    rng = np.random.default_rng(2)
    x = make_array(rng, (2, 3, *x_hw), dtype)
    w = make_array(rng, (5, 3, *kernel), dtype)
    bias = make_array(rng, (5,), dtype)
    y, ref = run_both(x, w, bias, padding=padding, dilation=dilation)
    assert y.shape == (2, 5, 1, 1)
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride, padding", [
    ((2, 2), 5, 0), ((1, 1), 3, 0), ((3, 1), (4, 6), 1), ((1, 2), (3, 5), "same"), ((2, 3), 4, (0, 3, 1, 2)),
])
def test_stride_larger_than_kernel(dtype, kernel, stride, padding):
    # Input pixels between windows are skipped entirely.
    rng = np.random.default_rng(3)
    x = make_array(rng, (2, 4, 17, 19), dtype)
    w = make_array(rng, (7, 4, *kernel), dtype)
    y, ref = run_both(x, w, stride=stride, padding=padding)
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("device", ["cpu", "reference", "auto"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs, expected_hw", [
    ({}, (6, 5)),
    ({"padding": "same", "stride": 2}, (4, 4)),
    ({"stride": (2, 3), "padding": (1, 0, 2, 1), "dilation": 2}, (3, 2)),
])
def test_empty_batch_gives_empty_result_of_right_shape(device, dtype, kwargs, expected_hw):
    rng = np.random.default_rng(4)
    x = make_array(rng, (0, 4, 8, 7), dtype)
    w = make_array(rng, (6, 2, 3, 3), dtype)
    bias = make_array(rng, (6,), dtype)
    y = sparkle.conv2d(x, w, bias, groups=2, activation="relu", device=device, **kwargs)
    assert y.shape == (0, 6, *expected_hw)
    assert y.dtype == np.dtype(dtype)
    assert y.flags.c_contiguous


def special_values_case(rng, dtype, where):
    """Moderate finite data with a few NaN / +Inf / -Inf entries placed in x, w or bias."""
    x = make_array(rng, (2, 5, 9, 8), dtype)
    w = make_array(rng, (7, 5, 3, 3), dtype)
    bias = make_array(rng, (7,), dtype)
    target = {"x": x, "w": w, "bias": bias}[where]
    flat = target.reshape(-1)
    positions = rng.choice(flat.size, size=min(3, flat.size), replace=False)
    flat[positions] = [np.nan, np.inf, -np.inf][:len(positions)]
    return x, w, bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["x", "w", "bias"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("padding", [0, 1])
def test_nan_and_inf_propagate_as_in_reference(dtype, where, activation, padding):
    rng = np.random.default_rng(5)
    x, w, bias = special_values_case(rng, dtype, where)
    with np.errstate(invalid="ignore"):
        y, ref = run_both(x, w, bias, padding=padding, activation=activation)
    assert np.isnan(ref).any(), "test data must produce NaN somewhere"
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(y), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(y), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(y[finite], ref[finite], rtol=1e-4 if dtype == np.float32 else 1e-11,
                               atol=1e-4 if dtype == np.float32 else 1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("use_bias, activation", [(False, None), (True, "relu")])
def test_pointwise_1x1_stride_1(dtype, groups, use_bias, activation):
    # 1x1, stride 1, no padding: a plain GEMM per image.
    rng = np.random.default_rng(6)
    x = make_array(rng, (3, 12, 11, 13), dtype)
    w = make_array(rng, (15, 12 // groups, 1, 1), dtype)
    bias = make_array(rng, (15,), dtype) if use_bias else None
    y, ref = run_both(x, w, bias, groups=groups, activation=activation)
    assert y.shape == (3, 15, 11, 13)
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_zeroes_negative_outputs_exactly(dtype):
    rng = np.random.default_rng(7)
    x = make_array(rng, (2, 6, 10, 10), dtype)
    w = make_array(rng, (9, 6, 3, 3), dtype)
    bias = make_array(rng, (9,), dtype)
    y, ref = run_both(x, w, bias, padding=1, activation="relu")
    plain = reference.conv2d(x, w, bias, padding=1)
    assert (plain < 0).mean() > 0.3 and (plain > 0).mean() > 0.3, "need both signs before the relu"
    assert (y[plain < -1e-3] == 0).all()
    assert (y >= 0).all()
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_is_applied_after_bias(dtype):
    # Positive convolution outputs pushed negative by the bias must come out as zero, and
    # negative ones pushed positive must survive: relu(conv + b), not relu(conv) + b.
    rng = np.random.default_rng(8)
    x = np.abs(make_array(rng, (1, 3, 6, 6), dtype))
    w = np.abs(make_array(rng, (2, 3, 3, 3), dtype))
    w[1] *= -1
    conv = reference.conv2d(x, w)
    bias = np.array([-conv[:, 0].max() - 1.0, -conv[:, 1].min() + 1.0], dtype=dtype)
    y, ref = run_both(x, w, bias, activation="relu")
    assert (y[:, 0] == 0).all()
    assert (y[:, 1] > 0).all()
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_only(dtype):
    # Zero input: every output is exactly its channel's bias (no rounding is involved).
    rng = np.random.default_rng(9)
    x = np.zeros((2, 4, 7, 5), dtype=dtype)
    w = make_array(rng, (6, 2, 3, 3), dtype)
    bias = make_array(rng, (6,), dtype)
    y, _ = run_both(x, w, bias, padding=1, groups=2)
    np.testing.assert_array_equal(y, np.broadcast_to(bias[None, :, None, None], y.shape))


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_reading_only_padding_equal_bias(dtype):
    # With padding wider than the kernel, border outputs see only zeros: exactly bias, then relu.
    rng = np.random.default_rng(10)
    x = make_array(rng, (1, 3, 4, 4), dtype)
    w = make_array(rng, (5, 3, 1, 1), dtype)
    bias = make_array(rng, (5,), dtype)
    y, ref = run_both(x, w, bias, padding=2, activation="relu")
    border = np.ones(y.shape[2:], dtype=bool)
    border[2:-2, 2:-2] = False
    expected = np.maximum(bias, 0)[:, None]
    np.testing.assert_array_equal(y[0][:, border], np.broadcast_to(expected, (5, border.sum())))
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_cache_blocks(dtype):
    # Reduction (64 * 3 * 3 = 576) longer than kc and more output pixels than nc with the
    # default tiles: partial sums are carried across kc blocks and pixel blocks.
    rng = np.random.default_rng(11)
    x = make_array(rng, (2, 64, 40, 40), dtype, layout="F")
    w = make_array(rng, (70, 64, 3, 3), dtype)
    bias = make_array(rng, (70,), dtype)
    y, ref = run_both(x, w, bias, padding=1, activation="relu")
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_read_only_and_broadcast_inputs(dtype):
    # Arrays the caller cannot write (frozen buffers, zero-stride broadcasts) are valid inputs.
    rng = np.random.default_rng(12)
    x = make_array(rng, (2, 3, 8, 8), dtype)
    x.flags.writeable = False
    w = np.broadcast_to(make_array(rng, (1, 3, 3, 3), dtype), (4, 3, 3, 3))
    bias = make_array(rng, (4,), dtype)
    bias.flags.writeable = False
    y, ref = run_both(x, w, bias, padding=1)
    assert_close_to_reference(y, ref, dtype)
