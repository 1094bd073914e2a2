"""The public API on every OpenCL device: conv2d and matmul against the float64 reference, device arrays,
device discovery and resolution, and what happens when OpenCL is disabled or pyopencl is missing.

Every call here must really run on the device: a fallback to the CPU backend (OpenCLFallbackWarning) fails
the test.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import DeviceArray, reference  # noqa: E402
from sparkle.opencl import runtime  # noqa: E402

from _helpers import DTYPES, LAYOUTS, Unchanged, assert_close_to_reference, make_array  # noqa: E402
from _opencl import opencl_device_ids, opencl_params, requires_opencl, sparkle_cache  # noqa: E402,F401

pytestmark = [pytest.mark.usefixtures("sparkle_cache"),
              pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")]

DEVICES = opencl_params()

MATMUL_SHAPES = [(1, 1, 1), (7, 13, 5), (33, 1, 17), (1, 70, 1), (64, 40, 96), (5, 129, 131)]
CONV_CONFIGS = {
    "odd": dict(x=(2, 5, 11, 9), w=(7, 5, 3, 3), padding=1),
    "strided_asym": dict(x=(1, 6, 13, 10), w=(9, 6, 3, 2), stride=(2, 3), padding=(0, 2, 1, 0), bias=True),
    "grouped_dilated": dict(x=(1, 6, 12, 11), w=(9, 2, 3, 3), groups=3, dilation=(2, 1), padding="same",
                            bias=True),
    "depthwise_relu": dict(x=(3, 5, 7, 7), w=(10, 1, 3, 3), groups=5, padding=(1, 1), activation="relu",
                           bias=True),
    "pointwise": dict(x=(2, 9, 4, 6), w=(13, 9, 1, 1), activation="relu"),
    "valid_big_kernel": dict(x=(1, 3, 9, 12), w=(4, 3, 5, 7), padding="valid"),
}


def conv_inputs(config, dtype, layouts=("C", "C", "C"), seed=0):
    config = dict(config)
    rng = np.random.default_rng(seed)
    x = make_array(rng, config.pop("x"), dtype, layouts[0])
    w_shape = config.pop("w")
    w = make_array(rng, w_shape, dtype, layouts[1])
    bias = make_array(rng, w_shape[:1], dtype, layouts[2]) if config.pop("bias", False) else None
    return x, w, bias, config


def no_host_copies(monkeypatch):
    """From now on, copying a DeviceArray to the host fails the test (a chain must stay on the device)."""
    def forbidden(self):
        raise AssertionError("a DeviceArray was copied to the host")

    monkeypatch.setattr(DeviceArray, "get", forbidden)


# --- numpy in, numpy out ---------------------------------------------------------------------------

# Every config in float32, every other one in float64 too (each distinct problem costs a program build).
CONV_CASES = [(name, dtype) for i, name in enumerate(CONV_CONFIGS) for dtype in DTYPES[:1 + (i % 2 == 0)]]
MATMUL_DTYPES = {shape: DTYPES[:1 + (i % 2 == 1)] for i, shape in enumerate(MATMUL_SHAPES)}


@pytest.mark.parametrize("name, dtype", CONV_CASES, ids=[f"{n}-{np.dtype(d).name}" for n, d in CONV_CASES])
@pytest.mark.parametrize("device_id", DEVICES)
def test_conv2d_matches_reference(device_id, name, dtype):
    index = list(CONV_CONFIGS).index(name)
    layouts = [LAYOUTS[(index + i) % len(LAYOUTS)] for i in range(3)]  # non-contiguous inputs in turn
    x, w, bias, kwargs = conv_inputs(CONV_CONFIGS[name], dtype, layouts, seed=index)
    unchanged = Unchanged(x, w, bias)
    y = sparkle.conv2d(x, w, bias, device=device_id, **kwargs)
    unchanged.check()
    expected = reference.conv2d(x, w, bias, **kwargs)
    assert type(y) is np.ndarray and y.dtype == np.dtype(dtype) and y.flags.c_contiguous
    assert y.shape == expected.shape
    assert_close_to_reference(y, expected, dtype)


@pytest.mark.parametrize("mkn, dtype", [(s, d) for s in MATMUL_SHAPES for d in MATMUL_DTYPES[s]],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else np.dtype(v).name)
@pytest.mark.parametrize("device_id", DEVICES)
def test_matmul_matches_reference(device_id, mkn, dtype):
    m, k, n = mkn
    rng = np.random.default_rng(m * k * n)
    layout_a, layout_b = LAYOUTS[(m + k) % len(LAYOUTS)], LAYOUTS[(k + n + 1) % len(LAYOUTS)]
    a, b = make_array(rng, (m, k), dtype, layout_a), make_array(rng, (k, n), dtype, layout_b)
    unchanged = Unchanged(a, b)
    c = sparkle.matmul(a, b, device=device_id)
    unchanged.check()
    assert type(c) is np.ndarray and c.dtype == np.dtype(dtype) and c.flags.c_contiguous and c.shape == (m, n)
    assert_close_to_reference(c, reference.matmul(a, b), dtype)


@pytest.mark.parametrize("device_id", DEVICES)
def test_empty_batch(device_id):
    x = np.zeros((0, 3, 6, 5), np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    y = sparkle.conv2d(x, w, np.ones(4, np.float32), padding=1, device=device_id)
    assert type(y) is np.ndarray and y.shape == (0, 4, 6, 5) and y.dtype == np.float32
    on_device = sparkle.conv2d(sparkle.to_device(x, device_id), w, padding=(0, 1), device=device_id)
    assert isinstance(on_device, DeviceArray) and on_device.shape == (0, 4, 4, 5)
    assert on_device.get().shape == (0, 4, 4, 5)


@pytest.mark.parametrize("mkn", [(0, 4, 3), (3, 0, 4), (3, 4, 0), (0, 0, 0)], ids=str)
@pytest.mark.parametrize("device_id", DEVICES)
def test_matmul_with_zero_sizes(device_id, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(1)
    a, b = make_array(rng, (m, k), np.float64), make_array(rng, (k, n), np.float64)
    c = sparkle.matmul(a, b, device=device_id)
    assert type(c) is np.ndarray and c.shape == (m, n) and c.dtype == np.float64
    np.testing.assert_array_equal(c, np.zeros((m, n)))  # an empty sum is exactly zero
    on_device = sparkle.matmul(sparkle.to_device(a, device_id), b)
    assert isinstance(on_device, DeviceArray) and on_device.shape == (m, n)
    np.testing.assert_array_equal(on_device.get(), np.zeros((m, n)))


@requires_opencl
def test_opencl_means_first_gpu_else_first_device():
    found = [d for d in runtime.opencl_devices() if d.id in opencl_device_ids()]  # available ones only
    expected = next((d for d in found if d.kind == "gpu"), found[0])
    from sparkle.devices import resolve_device

    assert resolve_device("opencl").id == expected.id
    x, w, bias, kwargs = conv_inputs(CONV_CONFIGS["odd"], np.float32)
    y = sparkle.conv2d(x, w, bias, device="opencl", **kwargs)
    assert_close_to_reference(y, reference.conv2d(x, w, bias, **kwargs), np.float32)
    assert sparkle.to_device(x).device == expected.id  # to_device's default is "opencl"


@pytest.mark.parametrize("dtype, activation", [(np.float32, "relu"), (np.float64, None)],
                         ids=["float32-relu", "float64"])
@pytest.mark.parametrize("device_id", DEVICES)
def test_nan_and_inf_propagate(device_id, dtype, activation):
    # As in the reference: a NaN input makes NaN outputs (ReLU keeps them), an infinite one infinite outputs.
    rng = np.random.default_rng(6)
    x, w = make_array(rng, (2, 3, 6, 7), dtype), make_array(rng, (5, 3, 3, 3), dtype)
    bias = make_array(rng, (5,), dtype)
    x[0, 1, 2, 3], x[1, 0, 0, 0], x[1, 2, 5, 6] = np.nan, np.inf, -np.inf
    a, b = make_array(rng, (9, 10), dtype), make_array(rng, (10, 11), dtype)
    a[2, 3], a[5, 0], b[4, 7] = np.nan, np.inf, -np.inf
    with np.errstate(invalid="ignore"):
        results = [(sparkle.conv2d(x, w, bias, padding=1, activation=activation, device=device_id),
                    reference.conv2d(x, w, bias, padding=1, activation=activation)),
                   (sparkle.matmul(a, b, device=device_id), reference.matmul(a, b))]
    for got, expected in results:
        assert np.isnan(expected).any() and np.isinf(expected).any()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
        finite = np.isfinite(expected)
        assert_close_to_reference(got[finite], expected[finite], dtype)


# --- device arrays ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device_id", DEVICES)
def test_to_device_round_trip(device_id, dtype, layout):
    x = make_array(np.random.default_rng(2), (2, 3, 5, 7), dtype, layout)
    unchanged = Unchanged(x)
    d = sparkle.to_device(x, device_id)
    unchanged.check()
    assert isinstance(d, DeviceArray)
    assert d.shape == x.shape and d.dtype == np.dtype(dtype) and d.device == device_id
    assert (d.ndim, d.size, d.nbytes, len(d)) == (4, x.size, x.nbytes, 2)
    back = d.get()
    assert type(back) is np.ndarray and back.flags.c_contiguous and back.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back, x)  # bit for bit
    assert d.wait() is d
    assert back is not d.get()  # each get() is a new array
    np.testing.assert_array_equal(np.asarray(d), x)
    copy = sparkle.to_device(d, device_id)  # a new device array, as numpy would copy
    assert isinstance(copy, DeviceArray) and copy is not d and copy.buffer is not d.buffer
    np.testing.assert_array_equal(copy.get(), x)
    host = sparkle.to_device(d, "cpu")
    assert type(host) is np.ndarray
    np.testing.assert_array_equal(host, x)
    view = d.reshape(6, 35)
    assert view.shape == (6, 35) and view.device == device_id
    np.testing.assert_array_equal(view.get(), np.ascontiguousarray(x).reshape(6, 35))
    with pytest.raises(ValueError, match=r"^shape\b"):
        d.reshape(4, 50)


@pytest.mark.parametrize("device_id", DEVICES)
def test_device_array_reshape_with_minus_one_is_a_view_of_the_same_data(device_id):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    d = sparkle.to_device(x, device_id)
    for new in [(6, -1), ((6, -1),), ((-1, 4, 5),), (-1,), ([2, -1],)]:
        view = d.reshape(*new)
        assert view.buffer is d.buffer and view.device == device_id
        np.testing.assert_array_equal(view.get(), x.reshape(*new))
    with pytest.raises(ValueError, match=r"^shape may have only one -1"):
        d.reshape(-1, 2, -1)
    with pytest.raises(ValueError, match=r"^shape must keep the size 120, which .* \(product 7\)"):
        d.reshape((7, -1))
    with pytest.raises(ValueError, match=r"^shape sizes must be non-negative"):
        d.reshape(-2, 60)
    np.testing.assert_array_equal(d.get(), x)  # refused reshapes change nothing


@pytest.mark.parametrize("device_id", DEVICES)
def test_nhwc_device_array_gets_a_hint_it_can_follow(device_id):
    rng = np.random.default_rng(4)
    x_nhwc = rng.standard_normal((1, 7, 6, 8), dtype=np.float32)
    w = rng.standard_normal((4, 8, 3, 3), dtype=np.float32)
    x = sparkle.to_device(x_nhwc, device_id)
    with pytest.raises(ValueError, match=r"; x looks like NHWC; Sparkle takes NCHW "
                                         r"\(sparkle\.to_device\(x\.get\(\)\.transpose\(0, 3, 1, 2\), x\.device\)\)$"):
        sparkle.conv2d(x, w)
    with pytest.raises(ValueError, match=r"; x looks like NHWC; Sparkle takes NCHW \(x\.transpose\(0, 3, 1, 2\)\)$"):
        sparkle.conv2d(x_nhwc, sparkle.to_device(w, device_id))  # numpy x: numpy's transpose
    y = sparkle.conv2d(sparkle.to_device(x.get().transpose(0, 3, 1, 2), x.device), w)  # what the hint says
    assert_close_to_reference(y.get(), reference.conv2d(x_nhwc.transpose(0, 3, 1, 2), w), np.float32)


@pytest.mark.parametrize("device_id", DEVICES)
def test_empty_device_array(device_id):
    d = sparkle.to_device(np.zeros((0, 3), np.float32), device_id)
    assert d.shape == (0, 3) and d.size == 0 and d.get().shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device_id", DEVICES)
def test_chain_of_convs_stays_on_device(device_id, dtype, monkeypatch):
    rng = np.random.default_rng(3)
    x = make_array(rng, (2, 4, 10, 9), dtype)
    w1, b1 = make_array(rng, (6, 4, 3, 3), dtype), make_array(rng, (6,), dtype)
    w2 = make_array(rng, (4, 3, 3, 1), dtype)
    x_d, w1_d, b1_d, w2_d = (sparkle.to_device(a, device_id) for a in (x, w1, b1, w2))
    with monkeypatch.context() as patch:
        no_host_copies(patch)
        # The device named: device="auto" may move the data where the scheduler predicts a faster finish.
        y1 = sparkle.conv2d(x_d, w1_d, b1_d, padding=1, activation="relu", device=device_id)
        y2 = sparkle.conv2d(y1, w2_d, stride=(2, 1), groups=2, padding=(1, 0), device=device_id)
    for y in (y1, y2):
        assert isinstance(y, DeviceArray) and y.device == device_id and y.dtype == np.dtype(dtype)
    expected1 = reference.conv2d(x, w1, b1, padding=1, activation="relu")
    expected2 = reference.conv2d(expected1, w2.astype(np.float64), stride=(2, 1), groups=2, padding=(1, 0))
    assert y1.shape == expected1.shape and y2.shape == expected2.shape
    assert_close_to_reference(y1.get(), expected1, dtype)
    assert_close_to_reference(y2.get(), expected2, dtype)
    np.testing.assert_array_equal(x_d.get(), x)  # inputs on the device are unchanged too
    np.testing.assert_array_equal(w1_d.get(), w1)


@pytest.mark.parametrize("dtype", [np.float32])  # float64 device arrays: test_chain_of_convs_stays_on_device
@pytest.mark.parametrize("device_id", DEVICES)
def test_matmul_chain_and_reshaped_conv_output_stay_on_device(device_id, dtype, monkeypatch):
    rng = np.random.default_rng(4)
    a, b, c = make_array(rng, (9, 11), dtype), make_array(rng, (11, 6), dtype), make_array(rng, (6, 5), dtype)
    x, w = make_array(rng, (1, 3, 5, 4), dtype), make_array(rng, (8, 3, 1, 1), dtype)
    a_d, b_d, c_d, x_d, w_d = (sparkle.to_device(v, device_id) for v in (a, b, c, x, w))
    with monkeypatch.context() as patch:
        no_host_copies(patch)
        ab = sparkle.matmul(a_d, b_d, device=device_id)
        abc = sparkle.matmul(ab, c_d, device=device_id)
        y = sparkle.conv2d(x_d, w_d, device=device_id)  # (1, 8, 5, 4): as an (8, 20) matrix right of a (2, 8) one
        z = sparkle.matmul(sparkle.to_device(a[:2, :8].copy(), device_id), y.reshape(8, 20), device=device_id)
    for result, shape in ((ab, (9, 6)), (abc, (9, 5)), (z, (2, 20))):
        assert isinstance(result, DeviceArray) and result.shape == shape and result.device == device_id
    assert_close_to_reference(ab.get(), reference.matmul(a, b), dtype)
    assert_close_to_reference(abc.get(), reference.matmul(reference.matmul(a, b), c.astype(np.float64)), dtype)
    y_expected = reference.conv2d(x, w)
    assert_close_to_reference(z.get(), reference.matmul(a[:2, :8].astype(np.float64), y_expected.reshape(8, 20)), dtype)


@pytest.mark.parametrize("device_id", DEVICES)
def test_mixing_device_arrays_and_numpy(device_id):
    x, w, bias, kwargs = conv_inputs(CONV_CONFIGS["strided_asym"], np.float32, ("F", "negative", "sliced"))
    expected = reference.conv2d(x, w, bias, **kwargs)
    unchanged = Unchanged(x, w, bias)
    x_d, w_d = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
    for args in ((x_d, w, bias), (x, w_d, bias), (x, w, sparkle.to_device(bias, device_id))):
        y = sparkle.conv2d(*args, **kwargs)  # "auto": where an input lives
        assert isinstance(y, DeviceArray) and y.device == device_id
        assert_close_to_reference(y.get(), expected, np.float32)
    for device in ("cpu", "reference"):  # device arrays as inputs of a host device: numpy out
        y = sparkle.conv2d(x_d, w_d, bias, device=device, **kwargs)
        assert type(y) is np.ndarray
        assert_close_to_reference(y, expected, np.float32)
    unchanged.check()
    rng = np.random.default_rng(5)
    a, b = make_array(rng, (6, 7), np.float32, "F"), make_array(rng, (7, 9), np.float32, "negative")
    for args in ((sparkle.to_device(a, device_id), b), (a, sparkle.to_device(b, device_id))):
        c = sparkle.matmul(*args)
        assert isinstance(c, DeviceArray) and c.device == device_id
        assert_close_to_reference(c.get(), reference.matmul(a, b), np.float32)
    c = sparkle.matmul(sparkle.to_device(a, device_id), b, device="cpu")
    assert type(c) is np.ndarray
    assert_close_to_reference(c, reference.matmul(a, b), np.float32)


# --- discovery -------------------------------------------------------------------------------------

def test_devices_lists_cpu_and_each_opencl_device():
    listed = sparkle.devices()
    assert listed[0].id == "cpu"
    assert [d.id for d in listed[1:]] == [d.id for d in runtime.opencl_devices()]
    assert [d.id for d in listed[1:] if d.available] == opencl_device_ids()
    assert listed[0].available is True and listed[0].reason is None
    by_id = {d.id: d for d in runtime.opencl_devices()}
    for device in listed[1:]:
        assert isinstance(device, sparkle.Device)
        assert isinstance(device.name, str) and device.name
        assert isinstance(device.vendor, str)
        assert device.kind == by_id[device.id].kind and device.kind in ("cpu", "gpu")
        assert isinstance(device.compute_units, int) and device.compute_units > 0
        assert isinstance(device.memory, int) and device.memory > 0
        assert isinstance(device.available, bool)
        assert (device.reason is None) == device.available and isinstance(device.reason, (str, type(None)))


def check_cpu_still_works():
    x, w, bias, kwargs = conv_inputs(CONV_CONFIGS["grouped_dilated"], np.float32)
    expected = reference.conv2d(x, w, bias, **kwargs)
    for device in ("auto", "cpu"):
        y = sparkle.conv2d(x, w, bias, device=device, **kwargs)
        assert type(y) is np.ndarray
        assert_close_to_reference(y, expected, np.float32)


def check_opencl_refused(reason_pattern):
    assert [d.id for d in sparkle.devices()] == ["cpu"]
    assert runtime.opencl_devices() == []
    x, w, bias, kwargs = conv_inputs(CONV_CONFIGS["odd"], np.float32)
    with pytest.raises(ValueError, match=r"^device='opencl' is not available: .*" + reason_pattern):
        sparkle.conv2d(x, w, bias, device="opencl", **kwargs)
    with pytest.raises(ValueError, match=r"^device='opencl'.*" + reason_pattern):
        sparkle.to_device(x)
    with pytest.raises(ValueError, match=r"^device\b.*'opencl:0'.*" + reason_pattern):
        sparkle.matmul(x[0, 0], x[0, 0].T.copy(), device="opencl:0")
    from sparkle.devices import opencl_unavailable_reason

    reason = opencl_unavailable_reason()
    assert reason is not None
    return reason


def test_sparkle_opencl_0_hides_opencl(monkeypatch):
    with monkeypatch.context() as patch:
        patch.setenv("SPARKLE_OPENCL", "0")
        reason = check_opencl_refused(r"SPARKLE_OPENCL=0")
        assert "SPARKLE_OPENCL=0" in reason
        check_cpu_still_works()
    # Discovery is keyed by the environment: the devices are back once the variable is gone.
    assert [d.id for d in sparkle.devices()[1:]] == [d.id for d in runtime.opencl_devices()]


def test_missing_pyopencl_leaves_cpu_working(monkeypatch):
    def no_pyopencl():
        raise ImportError("No module named 'pyopencl'")

    before = opencl_device_ids()
    try:
        with monkeypatch.context() as patch:
            patch.delenv("SPARKLE_OPENCL", raising=False)  # the reason must be pyopencl, not the variable
            patch.setattr(runtime, "_import_pyopencl", no_pyopencl)
            runtime._discover.cache_clear()
            reason = check_opencl_refused(r"pyopencl")
            assert "pyopencl" in reason and "pip install" in reason
            check_cpu_still_works()
    finally:
        runtime._discover.cache_clear()  # later tests discover the real devices again
    assert opencl_device_ids() == before


@pytest.mark.parametrize("device_id", DEVICES)
def test_calls_from_many_threads_match_the_reference(device_id):
    # Kernel objects are shared per device; setting their arguments and enqueuing must not interleave.
    import threading

    rng = np.random.default_rng(7)
    problems = [(rng.standard_normal((1, 8, 9 + i, 10), dtype=np.float32),
                 rng.standard_normal((6, 8, 3, 3), dtype=np.float32)) for i in range(4)]
    expected = [reference.conv2d(x, w, padding=1) for x, w in problems]
    errors, failures = [], []

    def work(first):
        try:
            for step in range(6):
                index = (first + step) % len(problems)
                out = sparkle.conv2d(*problems[index], padding=1, device=device_id)
                errors.append(np.linalg.norm(out - expected[index]) / np.linalg.norm(expected[index]))
        except Exception as error:  # reported below: a thread's exception would otherwise be lost
            failures.append(error)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    assert len(errors) == 36 and max(errors) <= 1e-5


@pytest.mark.parametrize("device_id", DEVICES)
def test_auto_returns_device_arrays_where_the_inputs_live(device_id):
    """device="auto" may run a call elsewhere (the scheduler counts what moving the data costs), but the
    result lives where the inputs did, so a chain of calls never changes type."""
    rng = np.random.default_rng(5)
    x, w = make_array(rng, (2, 4, 10, 9), np.float32), make_array(rng, (6, 4, 3, 3), np.float32)
    x_d, w_d = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
    for _ in range(3):
        y = sparkle.conv2d(x_d, w_d, padding=1)
        assert isinstance(y, DeviceArray) and y.device == device_id
        assert_close_to_reference(y.get(), reference.conv2d(x, w, padding=1), np.float32)
    c = sparkle.matmul(sparkle.to_device(x.reshape(8, 90), device_id), x.reshape(90, 8))
    assert isinstance(c, DeviceArray) and c.device == device_id
    assert_close_to_reference(c.get(), reference.matmul(x.reshape(8, 90), x.reshape(90, 8)), np.float32)
