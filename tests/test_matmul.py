"""sparkle.matmul on the CPU against the float64 reference: dtypes, layouts, degenerate sizes; the
reference device against numpy's float64 product, "auto" against the CPU device, and matmul against the
equivalent 1x1 convolution, each against independent float64 values.

The cases run on device="cpu" only: on "reference" they would compare the reference with itself,
and "auto" with numpy inputs is the CPU path (test_auto_device_is_the_cpu_device checks that).
"""

import numpy as np
import pytest
from _helpers import (
    DTYPES,
    LAYOUTS,
    Unchanged,
    assert_close_to_reference,
    make_array,
    rel_l2,
)

import sparkle
from sparkle import reference


def check_matmul(a, b, device):
    unchanged = Unchanged(a, b)
    c = sparkle.matmul(a, b, device=device)
    unchanged.check()
    assert c.shape == (a.shape[0], b.shape[1])
    assert c.dtype == a.dtype
    assert c.flags.c_contiguous
    assert not np.shares_memory(c, a) and not np.shares_memory(c, b)
    return c


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(1, 1, 1), (3, 64, 5), (37, 29, 41), (64, 300, 9), (128, 96, 200)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matmul_matches_reference(dtype, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(m + 7 * k + 31 * n)
    a, b = make_array(rng, (m, k), dtype), make_array(rng, (k, n), dtype)
    c = check_matmul(a, b, "cpu")
    assert_close_to_reference(c, reference.matmul(a, b), dtype)


@pytest.mark.boundscheck
@pytest.mark.parametrize("layout_b", LAYOUTS)
@pytest.mark.parametrize("layout_a", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_any_memory_layout(dtype, layout_a, layout_b):
    rng = np.random.default_rng(3)
    a = make_array(rng, (19, 23), dtype, layout_a)
    b = make_array(rng, (23, 27), dtype, layout_b)
    c = check_matmul(a, b, "cpu")
    assert_close_to_reference(c, reference.matmul(a, b), dtype)
    # Layout must not change the arithmetic: same result as contiguous copies.
    np.testing.assert_array_equal(c, sparkle.matmul(np.ascontiguousarray(a), np.ascontiguousarray(b), device="cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(0, 4, 5), (4, 0, 5), (4, 5, 0), (0, 0, 0), (0, 3, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matmul_zero_sizes(dtype, mkn):
    # An empty reduction (K = 0) is a sum of nothing: exact zeros.
    m, k, n = mkn
    rng = np.random.default_rng(4)
    a, b = make_array(rng, (m, k), dtype), make_array(rng, (k, n), dtype)
    c = check_matmul(a, b, "cpu")
    np.testing.assert_array_equal(c, np.zeros((m, n), dtype))


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(1, 9, 11), (9, 1, 11), (9, 11, 1), (1, 1, 50), (50, 1, 1), (1, 50, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matmul_unit_sizes(dtype, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(5)
    a, b = make_array(rng, (m, k), dtype, "F"), make_array(rng, (k, n), dtype, "negative")
    c = check_matmul(a, b, "cpu")
    assert_close_to_reference(c, reference.matmul(a, b), dtype)


def numpy_float64_product(a, b):
    """a @ b from numpy in float64 (its BLAS or einsum, none of Sparkle's code)."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(1, 1, 1), (3, 64, 5), (37, 29, 41), (4, 0, 5), (0, 3, 2), (1, 50, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_reference_device_matches_numpy_float64(dtype, mkn):
    # The oracle itself: the float64 product rounded once to the input dtype.
    m, k, n = mkn
    rng = np.random.default_rng(m + 7 * k + 31 * n + 1)
    a, b = make_array(rng, (m, k), dtype, "F"), make_array(rng, (k, n), dtype, "negative")
    c = check_matmul(a, b, "reference")
    expected = numpy_float64_product(a, b)
    if dtype == np.float64:
        assert rel_l2(c, expected) <= 1e-14
    else:  # within half a float32 ulp of the float64 value, give or take float64 rounding
        np.testing.assert_allclose(c, expected, rtol=2.0 ** -24 * (1 + 1e-6), atol=1e-30)
    assert rel_l2(reference.matmul(a, b), expected) <= 1e-14


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", [(37, 29, 41), (1, 9, 11), (4, 0, 5)], ids=lambda s: "x".join(map(str, s)))
def test_auto_device_is_the_cpu_device(dtype, mkn):
    # With numpy inputs, "auto" runs the CPU backend: the same numbers, bit for bit.
    m, k, n = mkn
    rng = np.random.default_rng(m + 7 * k + 31 * n + 2)
    a, b = make_array(rng, (m, k), dtype), make_array(rng, (k, n), dtype)
    np.testing.assert_array_equal(check_matmul(a, b, "auto"), check_matmul(a, b, "cpu"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_equals_pointwise_conv(dtype):
    # (M, K) @ (K, N) is a 1x1 convolution of a (1, K, 1, N) image: both public paths against numpy's
    # float64 product (matmul) and einsum over the convolution's own axes (conv2d).
    rng = np.random.default_rng(5)
    a, b = make_array(rng, (9, 14), dtype), make_array(rng, (14, 11), dtype)
    image, weights = b.reshape(1, 14, 1, 11), a.reshape(9, 14, 1, 1)
    via_conv = sparkle.conv2d(image, weights, device="cpu")
    expected_conv = np.einsum("nchw,kc->nkhw", image.astype(np.float64), weights[:, :, 0, 0].astype(np.float64))
    assert via_conv.dtype == dtype
    assert_close_to_reference(via_conv, expected_conv, dtype)
    assert_close_to_reference(sparkle.matmul(a, b, device="cpu"), numpy_float64_product(a, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_outer_product_is_exact(dtype):
    # K = 1: every output is a single product, so it is exactly a[i] * b[j] in the input dtype.
    rng = np.random.default_rng(6)
    a, b = make_array(rng, (13, 1), dtype), make_array(rng, (1, 17), dtype)
    np.testing.assert_array_equal(sparkle.matmul(a, b, device="cpu"), a * b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_read_only_inputs(dtype):
    rng = np.random.default_rng(7)
    a, b = make_array(rng, (10, 12), dtype), make_array(rng, (12, 14), dtype)
    a.flags.writeable = False
    b.flags.writeable = False
    c = check_matmul(a, b, "cpu")
    assert_close_to_reference(c, reference.matmul(a, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_nan_and_inf_propagate(dtype):
    rng = np.random.default_rng(8)
    a, b = make_array(rng, (9, 10), dtype), make_array(rng, (10, 11), dtype)
    a[2, 3], a[5, 0], b[4, 7] = np.nan, np.inf, -np.inf
    with np.errstate(invalid="ignore"):
        c, ref = sparkle.matmul(a, b, device="cpu"), reference.matmul(a, b)
    assert np.isnan(ref).any() and np.isinf(ref).any()
    np.testing.assert_array_equal(np.isnan(c), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(c), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(c), np.isneginf(ref))


@pytest.mark.parametrize("a, b, error, match", [
    (np.zeros(3), np.zeros((3, 2)), ValueError, r"^a\b"),
    (np.zeros((1, 2, 3)), np.zeros((3, 2)), ValueError, r"^a\b"),
    (np.zeros((2, 3)), np.zeros(3), ValueError, r"^b\b"),
    (np.zeros((2, 3)), np.zeros((3, 2, 1)), ValueError, r"^b\b"),
    (np.zeros((2, 3)), np.zeros((4, 2)), ValueError, r"inner|a\.shape\[1\]"),
    (np.zeros((2, 3), np.int32), np.zeros((3, 2), np.int32), TypeError, r"^a\b"),
    (np.zeros((2, 3)), np.zeros((3, 2), np.float16), TypeError, r"^b\b"),
    (np.zeros((2, 3), np.complex128), np.zeros((3, 2), np.complex128), TypeError, r"^a\b"),
    (np.zeros((2, 3), np.float32), np.zeros((3, 2)), TypeError, r"\ba\b.*\bb\b"),
    ([[1.0, 2.0]], np.zeros((2, 2)), TypeError, r"^a\b"),
    (np.zeros((2, 2)), None, TypeError, r"^b\b"),
    (1.0, np.zeros((1, 1)), TypeError, r"^a\b"),
], ids=["a-1d", "a-3d", "b-1d", "b-3d", "inner-mismatch", "int32", "float16", "complex", "mixed", "list", "none",
        "scalar"])
def test_matmul_bad_input(a, b, error, match):
    unchanged = Unchanged(a, b)
    with pytest.raises(error, match=match):
        sparkle.matmul(a, b)
    unchanged.check()


@pytest.mark.parametrize("device", ["gpu", "CPU", "", "opencl:99"])
def test_matmul_unknown_device_lists_available(device):
    with pytest.raises(ValueError, match="device") as info:
        sparkle.matmul(np.zeros((2, 2)), np.zeros((2, 2)), device=device)
    for known in ["cpu", "reference", "auto"]:
        assert repr(known) in str(info.value)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_ndarray_subclass_works_or_is_rejected_clearly(dtype):
    # np.matrix is an ndarray subclass, so validation accepts it (and the reference device
    # computes it). The CPU device must then compute it too, or reject it up front with a
    # TypeError naming the argument, never fail inside the backend.
    rng = np.random.default_rng(9)
    a = np.asmatrix(make_array(rng, (6, 5), dtype))
    b = np.asmatrix(make_array(rng, (5, 7), dtype))
    try:
        c = sparkle.matmul(a, b, device="cpu")
    except TypeError as error:
        assert str(error).startswith(("a ", "b ")), error
        return
    assert c.shape == (6, 7) and c.dtype == np.dtype(dtype)
    assert_close_to_reference(c, reference.matmul(np.asarray(a), np.asarray(b)), dtype)


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype, inner", [(np.float32, 1024), (np.float32, 2048), (np.float64, 512)])
def test_cache_aliasing_row_widths(dtype, inner):
    # Rows of 4 KiB multiples map onto the same cache sets: the packed path and the micro-kernel's
    # row pointers must still give the reference result there.
    rng = np.random.default_rng(inner)
    a = rng.standard_normal((13, inner)).astype(dtype)
    b = rng.standard_normal((inner, 21)).astype(dtype)
    a_before, b_before = a.copy(), b.copy()
    result = sparkle.matmul(a, b, device="cpu")
    expected = reference.matmul(a, b)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    assert np.linalg.norm(result - expected) / np.linalg.norm(expected) <= tolerance
    np.testing.assert_array_equal(a, a_before)
    np.testing.assert_array_equal(b, b_before)
