"""Public surface: devices(), the device= argument, device agreement, and the reference oracle
itself checked against the convolution's definition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparkle
from sparkle import reference

from _helpers import DTYPES, Unchanged, assert_close_to_reference, direct_conv2d, make_array, resolve_padding


def test_devices_lists_cpu_first():
    devices = sparkle.devices()
    assert isinstance(devices, list) and devices
    first = devices[0]
    assert first.id == "cpu"
    assert first.kind == "cpu"
    assert isinstance(first.compute_units, int) and first.compute_units > 0
    assert first.memory >= 0
    assert isinstance(first.name, str) and first.name
    assert len({d.id for d in devices}) == len(devices)


def test_public_names():
    for name in ["conv2d", "matmul", "devices", "detect_memory_params", "cache_optimal_tile_size"]:
        assert callable(getattr(sparkle, name))
        assert name in sparkle.__all__


CONFIGS = [
    dict(x=(2, 6, 11, 9), w=(8, 6, 3, 3), padding=1),
    dict(x=(1, 4, 12, 10), w=(6, 2, 3, 5), groups=2, stride=(2, 1), dilation=(1, 2), padding="same", bias=True),
    dict(x=(3, 5, 7, 7), w=(10, 1, 3, 3), groups=5, padding=(0, 2, 1, 0), activation="relu", bias=True),
    dict(x=(1, 9, 6, 6), w=(4, 9, 1, 1), padding="valid", activation="relu"),
]


def config_inputs(config, dtype, seed=0):
    config = dict(config)
    rng = np.random.default_rng(seed)
    x = make_array(rng, config.pop("x"), dtype, "permuted")
    w_shape = config.pop("w")
    w = make_array(rng, w_shape, dtype, "negative")
    bias = make_array(rng, w_shape[:1], dtype) if config.pop("bias", False) else None
    return x, w, bias, config


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_cpu_and_reference_devices_agree(dtype, config):
    x, w, bias, kwargs = config_inputs(config, dtype)
    unchanged = Unchanged(x, w, bias)
    results = {device: sparkle.conv2d(x, w, bias, device=device, **kwargs) for device in ["cpu", "reference", "auto"]}
    unchanged.check()
    for device, y in results.items():
        assert y.dtype == np.dtype(dtype), device
        assert y.flags.c_contiguous, device
    tolerance = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(results["cpu"], results["reference"], **tolerance)
    # "auto" runs the best device, which is the CPU backend: identical bits.
    np.testing.assert_array_equal(results["auto"], results["cpu"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_device_returns_input_dtype(dtype):
    x, w, bias, kwargs = config_inputs(CONFIGS[1], dtype)
    y = sparkle.conv2d(x, w, bias, device="reference", **kwargs)
    assert y.dtype == np.dtype(dtype) and y.flags.c_contiguous
    # It is the float64 oracle rounded once to the input dtype.
    np.testing.assert_array_equal(y, reference.conv2d(x, w, bias, **kwargs).astype(dtype))
    a, b = make_array(np.random.default_rng(1), (4, 3), dtype), make_array(np.random.default_rng(2), (3, 5), dtype)
    assert sparkle.matmul(a, b, device="reference").dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_are_deterministic(dtype):
    # Each output element is reduced in one fixed order whatever the thread schedule.
    x, w, bias, kwargs = config_inputs(CONFIGS[0], dtype)
    first = sparkle.conv2d(x, w, bias, device="cpu", **kwargs)
    for _ in range(3):
        np.testing.assert_array_equal(sparkle.conv2d(x, w, bias, device="cpu", **kwargs), first)


def test_result_is_a_fresh_array():
    x, w, bias, kwargs = config_inputs(CONFIGS[0], np.float32)
    y1 = sparkle.conv2d(x, w, bias, **kwargs)
    y2 = sparkle.conv2d(x, w, bias, **kwargs)
    assert not np.shares_memory(y1, y2)
    y1[...] = 0  # writable, and owned by the caller
    assert np.abs(y2).sum() > 0


@pytest.mark.parametrize("case", [
    dict(x=(1, 2, 5, 6), w=(3, 2, 3, 2), stride=1, padding=0, dilation=1, groups=1),
    dict(x=(2, 4, 7, 6), w=(6, 2, 3, 3), stride=(2, 1), padding=(1, 0, 2, 1), dilation=(1, 2), groups=2,
         bias=True, activation="relu"),
    dict(x=(1, 3, 6, 7), w=(6, 1, 2, 3), stride=(1, 3), padding="same", dilation=(2, 1), groups=3, bias=True),
    dict(x=(1, 2, 4, 5), w=(2, 2, 4, 1), stride=2, padding=(2, 1), dilation=1, groups=1, activation="relu"),
])
def test_reference_matches_definition(case):
    # The oracle everything else is checked against, checked against explicit loops over the
    # definition: out[n, k, i, j] = b[k] + sum_{c, r, s} x[n, g*Cg + c, i*sh - top + r*dh, j*sw - left + s*dw] w[k, c, r, s].
    rng = np.random.default_rng(3)
    x = make_array(rng, case["x"], np.float64)
    w = make_array(rng, case["w"], np.float64)
    bias = make_array(rng, case["w"][:1], np.float64) if case.get("bias") else None
    tblr = resolve_padding(case["padding"], case["x"][2:], case["w"][2:], case["stride"], case["dilation"])
    expected = direct_conv2d(x, w, bias, case["stride"], tblr, case["dilation"], case["groups"], case.get("activation"))
    got = reference.conv2d(x, w, bias, stride=case["stride"], padding=case["padding"], dilation=case["dilation"],
                           groups=case["groups"], activation=case.get("activation"))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matmul_matches_definition(dtype):
    rng = np.random.default_rng(4)
    a, b = make_array(rng, (4, 6), dtype), make_array(rng, (6, 3), dtype)
    expected = np.array([[sum(float(a[i, p]) * float(b[p, j]) for p in range(6)) for j in range(3)]
                         for i in range(4)])
    np.testing.assert_allclose(reference.matmul(a, b), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_equals_pointwise_conv(dtype):
    # (M, K) @ (K, N) is a 1x1 convolution of a (1, K, 1, N) image: two public paths, one answer.
    rng = np.random.default_rng(5)
    a, b = make_array(rng, (9, 14), dtype), make_array(rng, (14, 11), dtype)
    via_conv = sparkle.conv2d(b.reshape(1, 14, 1, 11), a.reshape(9, 14, 1, 1), device="cpu").reshape(9, 11)
    assert_close_to_reference(sparkle.matmul(a, b, device="cpu"), via_conv.astype(np.float64), dtype)


def test_concurrent_calls_from_python_threads():
    # Servers call from several threads at once. Run in a subprocess: if the parallel runtime
    # cannot take concurrent launches it aborts the whole process instead of raising.
    import os
    import pathlib
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading
        import numpy as np
        import sparkle
        from sparkle import reference
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 8, 20, 20)).astype(np.float32)
        w = rng.standard_normal((12, 8, 3, 3)).astype(np.float32)
        ref = reference.conv2d(x, w, padding=1)
        errors = []
        def work():
            for _ in range(10):
                y = sparkle.conv2d(x, w, padding=1)
                errors.append(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        threads = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(errors) == 40 and max(errors) < 1e-5, errors
        print("ok")
    """)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_integer_arguments(dtype):
    # Geometry often comes from array shapes, i.e. numpy integers; they are ints too.
    x, w, bias, _ = config_inputs(CONFIGS[1], dtype)
    kwargs = dict(stride=(np.int64(2), np.int32(1)), padding=(np.int64(1), np.int16(0), np.uint8(2), 1),
                  dilation=np.int64(2), groups=np.int64(2))
    y = sparkle.conv2d(x, w, bias, **kwargs)
    plain = {k: (tuple(int(i) for i in v) if isinstance(v, tuple) else int(v)) for k, v in kwargs.items()}
    assert_close_to_reference(y, reference.conv2d(x, w, bias, **plain), dtype)


def test_new_public_names_are_the_backend_objects():
    from sparkle.opencl import backend, tuner

    assert sparkle.OpenCLFallbackWarning is backend.OpenCLFallbackWarning
    assert issubclass(sparkle.OpenCLFallbackWarning, RuntimeWarning)
    assert sparkle.TuneResult is tuner.TuneResult
    for name in ["OpenCLFallbackWarning", "TuneResult", "DeviceArray", "tune", "to_device"]:
        assert name in sparkle.__all__
    assert all(hasattr(sparkle, name) for name in sparkle.__all__)


# --- DeviceArray.reshape follows numpy's reshape (shape logic only: a device without OpenCL) -------------

class _NoDevice:
    id = "opencl:test"
    pool = None


def shape_only_array(shape):
    from sparkle import DeviceArray

    return DeviceArray(_NoDevice(), None, shape, np.float32)


def numpy_reshape(shape, new):
    """(shape, None) as numpy reshapes an array of ``shape`` to ``new``, or (None, error type)."""
    try:
        return np.empty(shape, np.float32).reshape(new).shape, None
    except (ValueError, TypeError) as error:
        return None, type(error)


def reshape_outcome(shape, new):
    try:
        return shape_only_array(shape).reshape(new).shape, None
    except (ValueError, TypeError) as error:
        return None, type(error)


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(st.integers(0, 6), min_size=0, max_size=4),
       new=st.lists(st.integers(-3, 8), min_size=0, max_size=4), as_tuple=st.booleans())
def test_device_array_reshape_matches_numpy(shape, new, as_tuple):
    # Except that only -1 is the inferred size: numpy takes any negative size as -1 (not documented).
    expected = (None, ValueError) if min(new, default=0) < -1 else numpy_reshape(tuple(shape), tuple(new))
    array = shape_only_array(tuple(shape))
    try:
        got = (array.reshape(tuple(new)) if as_tuple or not new else array.reshape(*new)).shape, None
    except (ValueError, TypeError) as error:
        got = None, type(error)
    assert got == expected, (shape, new)


@pytest.mark.parametrize("shape, new, expected", [
    ((64, 12), (64, -1), (64, 12)), ((64, 12), ((64, -1),), (64, 12)), ((64, 12), ([-1, 3, 4],), (64, 3, 4)),
    ((3, 4), (-1,), (12,)), ((3, 4), (np.int64(-1), np.int32(2)), (6, 2)), ((0, 3), (-1, 3), (0, 3)),
    ((1,), ((),), ()), ((2, 3), (np.array([3, -1]),), (3, 2)),
])
def test_device_array_reshape_with_minus_one(shape, new, expected):
    view = shape_only_array(shape).reshape(*new)
    assert view.shape == expected == np.empty(shape).reshape(*new).shape
    assert all(type(size) is int for size in view.shape)


@pytest.mark.parametrize("new, words", [
    ((-1, -1), r"^shape may have only one -1 .*got \(-1, -1\) for an array of shape \(3, 4\) \(size 12\)"),
    ((5, -1), (r"^shape must keep the size 12, which the sizes other than -1 \(product 5\) do not divide, "
               r"got \(5, -1\)")),
    ((0, -1), r"^shape cannot infer its -1 when another size is 0, got \(0, -1\)"),
    ((-2, -6), r"^shape sizes must be non-negative, or -1 for one inferred size, got \(-2, -6\)"),
    ((4, -3), r"^shape sizes must be non-negative"),
    ((5, 2), r"^shape must keep the size 12, got \(5, 2\)"),
])
def test_device_array_reshape_errors_name_the_argument(new, words):
    with pytest.raises(ValueError, match=words):
        shape_only_array((3, 4)).reshape(new)


@pytest.mark.parametrize("new", [(1.5,), ((2, "a"),), (None,)])
def test_device_array_reshape_takes_ints(new):
    with pytest.raises(TypeError, match=r"^shape must be ints"):
        shape_only_array((3, 4)).reshape(*new)


# --- NHWC input: the channel mismatch says so ---------------------------------------------------------------

NHWC_CASES = [  # (x shape as NHWC, w shape, groups): w fits x.shape[3], not x.shape[1]
    ((1, 7, 7, 8), (4, 8, 3, 3), 1),
    ((2, 9, 5, 6), (6, 3, 1, 1), 2),  # grouped: w.shape[1] = C // groups with C = x.shape[3]
    ((1, 7, 7, 8), (8, 1, 3, 3), 8),  # depthwise: H = 7 is not divisible by groups = 8
    ((1, 16, 16, 8), (8, 1, 3, 3), 8),  # depthwise: H = 16 is, but w.shape[1] is not 16 // 8
]


@pytest.mark.parametrize("x_shape, w_shape, groups", NHWC_CASES)
def test_nhwc_input_gets_a_hint(x_shape, w_shape, groups):
    x, w = np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32)
    with pytest.raises(ValueError, match=r"^(w\.shape\[1\]|groups) .*; x looks like NHWC; Sparkle takes NCHW "
                                         r"\(x\.transpose\(0, 3, 1, 2\)\)$"):
        sparkle.conv2d(x, w, groups=groups)
    # The hint is right: the transposed input runs.
    y = sparkle.conv2d(x.transpose(0, 3, 1, 2), w, groups=groups)
    assert y.shape[:2] == (x_shape[0], w_shape[0])


@pytest.mark.parametrize("x_shape, w_shape", [((1, 5, 7, 7), (4, 3, 3, 3)), ((1, 5, 7, 6), (4, 4, 3, 3))])
def test_no_nhwc_hint_when_nhwc_would_not_fit_either(x_shape, w_shape):
    with pytest.raises(ValueError, match=r"^w\.shape\[1\]") as info:
        sparkle.conv2d(np.zeros(x_shape, np.float32), np.zeros(w_shape, np.float32))
    assert "NHWC" not in str(info.value)


def test_nhwc_input_with_h_equal_to_c_cannot_be_told_apart():
    # (N, H, W, C) with H == C is also a valid (N, C, H, W): it runs, as NCHW. Nothing can detect that.
    y = sparkle.conv2d(np.ones((1, 4, 6, 4), np.float32), np.ones((2, 4, 3, 3), np.float32))
    assert y.shape == (1, 2, 4, 2)
