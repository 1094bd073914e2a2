"""Prepared OpenCL calls (``backend.prepare_conv2d``/``prepare_matmul``) on every OpenCL device: the same
results as the float64 reference for numpy and device operands, on repeated calls with new data and from
several threads at once; faults fall back to the CPU with a warning (or raise, on request) and the next
call uses another variant; operands of other shapes are refused. No timing is asserted here.
"""

from __future__ import annotations

import gc
import threading
import warnings
from contextlib import contextmanager

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import pyopencl as cl  # noqa: E402

import sparkle  # noqa: E402
from sparkle import DeviceArray, api, reference  # noqa: E402
from sparkle.opencl import backend, codegen  # noqa: E402
from sparkle.opencl.backend import OpenCLFallbackWarning, OpenCLFault  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402
from sparkle.opencl.tuning import space  # noqa: E402

from _helpers import assert_close_to_reference, make_array  # noqa: E402
from _opencl import opencl_params, runtime_device, sparkle_cache, timing_queue_mode  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("sparkle_cache")

# Shapes the other OpenCL tests use too, so their programs are in the test cache already.
CONV_CONFIGS = {
    "strided_bias_relu": {"x": (2, 3, 9, 7), "w": (5, 3, 3, 3), "bias": True, "padding": 1, "stride": (1, 2),
                          "activation": "relu"},
    "grouped_dilated": {"x": (1, 6, 12, 11), "w": (9, 2, 3, 3), "groups": 3, "dilation": (2, 1),
                        "padding": "same", "bias": True},
    "pointwise": {"x": (2, 9, 4, 6), "w": (13, 9, 1, 1), "activation": "relu"},
}
CONV_CASES = [("strided_bias_relu", np.float32), ("grouped_dilated", np.float32), ("pointwise", np.float32),
              ("strided_bias_relu", np.float64)]
MATMUL_CASES = [((7, 13, 5), np.float32), ((64, 40, 96), np.float64)]


@pytest.fixture(autouse=True)
def no_failed_variants(monkeypatch):
    """No variant excluded by another test (faults injected here exclude variants for this test only)."""
    monkeypatch.setattr(backend, "_failed", {})


@pytest.fixture(params=opencl_params())
def device(request, timing_queue_mode):
    device = runtime_device(request.param)
    assert device.separate_timing_queue == (timing_queue_mode == "separate")
    return device


def conv_operands(name, dtype, rng, layouts=("C", "C", "C")):
    config = dict(CONV_CONFIGS[name])
    x = make_array(rng, config.pop("x"), dtype, layouts[0])
    w_shape = config.pop("w")
    w = make_array(rng, w_shape, dtype, layouts[1])
    bias = make_array(rng, w_shape[:1], dtype, layouts[2]) if config.pop("bias", False) else None
    return x, w, bias, config


def prepared_conv(name, dtype, device, **options):
    x, w, bias, kwargs = conv_operands(name, dtype, np.random.default_rng(0))
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    return backend.prepare_conv2d(spec, device, **options), kwargs


def on_device(device, *arrays):
    return [None if a is None else sparkle.to_device(a, device.id) for a in arrays]


@contextmanager
def no_fallback():
    """Inside it, a fallback to the CPU fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)
        yield


# ---- results --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, dtype", CONV_CASES, ids=[f"{n}-{np.dtype(d).name}" for n, d in CONV_CASES])
@pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")
def test_prepared_conv2d_matches_reference_on_new_data_every_call(device, name, dtype):
    prepared, kwargs = prepared_conv(name, dtype, device)
    assert prepared.on_device and prepared.variant.endswith(("(tuned)", "(nearest)", "(default)"))
    rng = np.random.default_rng(1)
    for call in range(3):  # new data each call: a pooled output holding the last result cannot pass
        layouts = ("C", "C", "C") if call == 0 else ("F", "sliced", "negative")
        x, w, bias, _ = conv_operands(name, dtype, rng, layouts)
        expected = reference.conv2d(x, w, bias, **kwargs)
        host = prepared(x, w, bias)
        assert type(host) is np.ndarray and host.dtype == np.dtype(dtype) and host.flags.c_contiguous
        assert_close_to_reference(host, expected, dtype)
        resident = prepared(*on_device(device, x, w, bias))
        assert isinstance(resident, DeviceArray) and resident.device == device.id
        assert resident.shape == expected.shape and resident.dtype == np.dtype(dtype)
        assert_close_to_reference(resident.get(), expected, dtype)
    assert prepared.compiled and prepared.faults == []


@pytest.mark.parametrize("mkn, dtype", MATMUL_CASES, ids=[f"{m}x{k}x{n}-{np.dtype(d).name}"
                                                          for (m, k, n), d in MATMUL_CASES])
@pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")
def test_prepared_matmul_matches_reference_on_new_data_every_call(device, mkn, dtype):
    m, k, n = mkn
    rng = np.random.default_rng(2)
    prepared = backend.prepare_matmul(api.matmul_spec(np.empty((m, k), dtype), np.empty((k, n), dtype)), device)
    for call in range(3):
        a = make_array(rng, (m, k), dtype, "C" if call == 0 else "F")
        b = make_array(rng, (k, n), dtype, "C" if call == 0 else "permuted")
        expected = reference.matmul(a, b)
        host = prepared(a, b)
        assert type(host) is np.ndarray and host.shape == (m, n)
        assert_close_to_reference(host, expected, dtype)
        resident = prepared(*on_device(device, a, b))
        assert isinstance(resident, DeviceArray) and resident.shape == (m, n)
        assert_close_to_reference(resident.get(), expected, dtype)


@pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")
def test_mixed_operands_give_a_device_array(device):
    prepared, kwargs = prepared_conv("strided_bias_relu", np.float32, device)
    x, w, bias, _ = conv_operands("strided_bias_relu", np.float32, np.random.default_rng(3))
    expected = reference.conv2d(x, w, bias, **kwargs)
    for operands in ((sparkle.to_device(x, device.id), w, bias), (x, w, sparkle.to_device(bias, device.id))):
        result = prepared(*operands)
        assert isinstance(result, DeviceArray)
        assert_close_to_reference(result.get(), expected, np.float32)


@pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")
def test_into_copies_the_result_into_a_slice_of_the_callers_array(device):
    """A split call's part: numpy or device operands, the result in its slice of a larger host array (pinned
    memory of the device's context on a GPU), nothing around it touched; a wrong ``out`` is refused."""
    from sparkle.opencl.pinned import result_pool

    prepared, kwargs = prepared_conv("strided_bias_relu", np.float32, device)
    x, w, bias, _ = conv_operands("strided_bias_relu", np.float32, np.random.default_rng(5))
    expected = reference.conv2d(x, w, bias, **kwargs)
    whole = result_pool(device).empty((expected.shape[0] + 1, *expected.shape[1:]), np.float32)
    for operands in ((x, w, bias), on_device(device, x, w, bias)):
        whole[...] = 5.0
        prepared.into(whole[1:], *operands)
        assert_close_to_reference(whole[1:], expected, np.float32)
        assert (whole[0] == 5.0).all()
    matmul = backend.prepare_matmul(api.matmul_spec(np.empty((6, 4), np.float32), np.empty((4, 3), np.float32)),
                                    device)
    a, b = make_array(np.random.default_rng(6), (6, 4), np.float32), make_array(np.random.default_rng(7), (4, 3),
                                                                               np.float32)
    rows = np.zeros((8, 3), np.float32)
    matmul.into(rows[2:], a, b)
    assert_close_to_reference(rows[2:], reference.matmul(a, b), np.float32)
    assert (rows[:2] == 0).all()
    with pytest.raises(ValueError, match="^out must be a writeable C-contiguous float32 array of shape"):
        prepared.into(np.zeros(expected.shape, np.float64), x, w, bias)
    with pytest.raises(ValueError, match=r"\(not C-contiguous\)"):
        matmul.into(np.zeros((3, 6), np.float32).T, a, b)


@pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")
def test_results_of_earlier_calls_stay_intact(device):
    """Each call's output is a buffer of its own while its DeviceArray lives, however many calls follow."""
    prepared, kwargs = prepared_conv("pointwise", np.float32, device)
    rng = np.random.default_rng(4)
    inputs = [conv_operands("pointwise", np.float32, rng)[:2] for _ in range(4)]
    results = [prepared(*on_device(device, x, w)) for x, w in inputs]
    assert len({id(r.buffer) for r in results}) == len(results)
    for (x, w), result in zip(inputs, results):
        assert_close_to_reference(result.get(), reference.conv2d(x, w, **kwargs), np.float32)


@pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")
def test_concurrent_calls_from_several_threads(device):
    prepared, kwargs = prepared_conv("strided_bias_relu", np.float32, device)
    prepared_mm = backend.prepare_matmul(api.matmul_spec(np.empty((7, 13), np.float32),
                                                         np.empty((13, 5), np.float32)), device)
    def work(seed):
        rng = np.random.default_rng(100 + seed)
        for call in range(6):
            if (seed + call) % 3 == 2:
                a, b = rng.standard_normal((7, 13), np.float32), rng.standard_normal((13, 5), np.float32)
                result = prepared_mm(*on_device(device, a, b))
                assert_close_to_reference(result.get(), reference.matmul(a, b), np.float32)
                continue
            x, w, bias, _ = conv_operands("strided_bias_relu", np.float32, rng)
            operands = on_device(device, x, w, bias) if (seed + call) % 3 == 0 else (x, w, bias)
            result = prepared(*operands)
            assert_close_to_reference(result.get() if isinstance(result, DeviceArray) else result,
                                      reference.conv2d(x, w, bias, **kwargs), np.float32)

    run_in_threads(work)


def run_in_threads(work, count=4):
    """``work(seed)`` on ``count`` threads started together; a failure in any of them fails the test here."""
    errors, start = [], threading.Barrier(count)

    def worker(seed):
        try:
            start.wait()
            work(seed)
        except BaseException as error:  # noqa: BLE001 (reported by the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


# ---- what the scheduler reads ---------------------------------------------------------------------

def test_compiled_build_and_variant(device, monkeypatch, tmp_path):
    monkeypatch.setattr(device, "_programs", {})  # nothing built in this process yet
    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path))  # nor on disk
    prepared, kwargs = prepared_conv("pointwise", np.float32, device)
    params, origin = backend.choose_params(device, prepared.workload)
    assert prepared.params == params and prepared.variant.startswith("TM=") and origin.split()[0] in prepared.variant
    assert not prepared.compiled and not prepared.binary_cached, "preparing must not build"
    assert prepared.build() and prepared.compiled and prepared.binary_cached
    again = backend.prepare_conv2d(prepared.spec, device)
    assert again.compiled and again.variant == prepared.variant  # the program is in memory now
    monkeypatch.setattr(device, "_programs", {})
    in_another_process = backend.prepare_conv2d(prepared.spec, device)
    assert not in_another_process.compiled and in_another_process.binary_cached  # building loads the binary
    x, w, _, _ = conv_operands("pointwise", np.float32, np.random.default_rng(5))
    with no_fallback():
        assert_close_to_reference(again(x, w), reference.conv2d(x, w, **kwargs), np.float32)


def test_first_call_builds_when_build_was_not_called(device, monkeypatch):
    monkeypatch.setattr(device, "_programs", {})
    prepared, kwargs = prepared_conv("pointwise", np.float32, device)
    assert not prepared.compiled
    x, w, _, _ = conv_operands("pointwise", np.float32, np.random.default_rng(6))
    with no_fallback():
        result = prepared(*on_device(device, x, w))
    assert prepared.compiled
    assert_close_to_reference(result.get(), reference.conv2d(x, w, **kwargs), np.float32)


def test_device_array_of_a_prepared_call_is_a_whole_device_array(device):
    """The warm path builds its result without DeviceArray.__init__: it must carry the same attributes, and
    its buffer must go back to the pool when it is collected."""
    prepared, _ = prepared_conv("pointwise", np.float32, device)
    x, w, _, _ = conv_operands("pointwise", np.float32, np.random.default_rng(7))
    operands = on_device(device, x, w)
    prepared.build()
    result = prepared(*operands)
    plain = DeviceArray(device, device.pool_buffer(result.nbytes), result.shape, result.dtype)
    assert sorted(vars(result)) == sorted(vars(plain))
    assert (result.shape, result.dtype, result.device) == (plain.shape, plain.dtype, plain.device)
    assert result.reshape(-1).shape == (result.size,)
    buffer = result.buffer
    del result, plain
    gc.collect()
    assert any(kept is buffer for kept in device.pool.free.get(buffer.size, []))


def test_operands_of_another_signature_are_refused(device):
    prepared, _ = prepared_conv("strided_bias_relu", np.float32, device)
    x, w, bias, _ = conv_operands("strided_bias_relu", np.float32, np.random.default_rng(8))
    with pytest.raises(ValueError, match="takes a bias"):
        prepared(x, w, None)
    with pytest.raises(ValueError, match="x must have shape"):
        prepared(x[:, :, :-1], w, bias)
    with pytest.raises(ValueError, match="dtype float32"):
        prepared(*on_device(device, x.astype(np.float64)), w, bias)
    with pytest.raises(ValueError, match="bias must have shape"):
        prepared(*on_device(device, x, w, bias[:-1]))
    with pytest.raises(ValueError, match="x must have shape"):
        prepared(x.tolist(), w, bias)
    mm = backend.prepare_matmul(api.matmul_spec(np.empty((3, 4), np.float32), np.empty((4, 5), np.float32)),
                                device)
    with pytest.raises(ValueError, match="b must have shape"):
        mm(np.ones((3, 4), np.float32), np.ones((4, 6), np.float32))
    with pytest.raises(TypeError, match="Conv2dSpec"):
        backend.prepare_conv2d(mm.spec, device)
    with pytest.raises(ValueError, match="on_fault"):
        backend.prepare_matmul(mm.spec, device, on_fault="ignore")


def test_empty_output_runs_on_the_host_without_a_warning(device):
    x, w = np.zeros((0, 3, 6, 5), np.float32), np.ones((4, 3, 3, 3), np.float32)
    prepared = backend.prepare_conv2d(api.conv2d_spec(x, w, padding=1), device, on_fault="raise")
    assert not prepared.on_device and prepared.variant.startswith("none: empty output")
    with no_fallback():
        assert prepared(x, w).shape == (0, 4, 6, 5)
        resident = prepared(*on_device(device, x, w))
    assert isinstance(resident, DeviceArray) and resident.get().shape == (0, 4, 6, 5)


# ---- faults ---------------------------------------------------------------------------------------

def lost_device(monkeypatch):
    """The next kernel enqueue reports the device as gone (the driver's error, as PyOpenCL raises it)."""
    real = cl.enqueue_nd_range_kernel
    state = {"armed": True}

    def enqueue(*args, **kwargs):
        if state["armed"]:
            state["armed"] = False
            raise cl.RuntimeError(cl._cl._ErrorRecord("clEnqueueNDRangeKernel", cl.status_code.DEVICE_NOT_AVAILABLE,
                                                      "injected by the test"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cl, "enqueue_nd_range_kernel", enqueue)


@pytest.mark.parametrize("inputs", ["numpy", "device"])
def test_fault_falls_back_with_a_warning_then_the_next_call_uses_another_variant(device, inputs, monkeypatch):
    prepared, kwargs = prepared_conv("strided_bias_relu", np.float32, device)
    prepared.build()
    first = prepared.params
    x, w, bias, _ = conv_operands("strided_bias_relu", np.float32, np.random.default_rng(9))
    operands = (x, w, bias) if inputs == "numpy" else on_device(device, x, w, bias)
    expected = reference.conv2d(x, w, bias, **kwargs)
    lost_device(monkeypatch)
    with pytest.warns(OpenCLFallbackWarning, match="lost or is not available") as record:
        result = prepared(*operands)
    assert [w.filename for w in record if issubclass(w.category, OpenCLFallbackWarning)] == [__file__]
    assert isinstance(result, DeviceArray) == (inputs == "device")
    assert_close_to_reference(result.get() if inputs == "device" else result, expected, np.float32)
    assert [space.complete(p) for p in backend.failed_variants(device, prepared.workload)] == \
        [space.complete(first)]
    assert prepared.params is not None and space.complete(prepared.params) != space.complete(first)
    assert len(prepared.faults) == 1
    with no_fallback():
        again = prepared(*operands)
    assert_close_to_reference(again.get() if inputs == "device" else again, expected, np.float32)


def test_on_fault_raise(device, monkeypatch):
    prepared, kwargs = prepared_conv("pointwise", np.float32, device, on_fault="raise")
    x, w, _, _ = conv_operands("pointwise", np.float32, np.random.default_rng(10))
    operands = on_device(device, x, w)
    prepared.build()
    first = prepared.variant
    lost_device(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)
        with pytest.raises(OpenCLFault, match="lost or is not available") as caught:
            prepared(*operands)
    assert caught.value.device_id == device.id and "lost" in caught.value.cause
    assert prepared.variant != first  # excluded; the next call runs another variant
    with no_fallback():
        assert_close_to_reference(prepared(*operands).get(), reference.conv2d(x, w, **kwargs), np.float32)


def test_build_passes_over_a_variant_that_does_not_build(device, monkeypatch):
    prepared, kwargs = prepared_conv("grouped_dilated", np.float32, device)
    bad = prepared.params
    real = codegen.render

    def render(workload, params, **options):
        source = real(workload, params, **options)
        if workload == prepared.workload and space.complete(params) == space.complete(bad):
            source += "\nthis is not OpenCL C;\n"
        return source

    monkeypatch.setattr(codegen, "render", render)
    with no_fallback():
        assert prepared.build()
    assert space.complete(prepared.params) != space.complete(bad) and prepared.compiled
    assert len(prepared.faults) == 1 and "failed to build" in prepared.faults[0]
    x, w, bias, _ = conv_operands("grouped_dilated", np.float32, np.random.default_rng(11))
    with no_fallback():
        result = prepared(*on_device(device, x, w, bias))
    assert_close_to_reference(result.get(), reference.conv2d(x, w, bias, **kwargs), np.float32)


def test_lazy_build_failure_falls_back_on_that_call(device, monkeypatch):
    prepared, kwargs = prepared_conv("pointwise", np.float32, device)
    bad = prepared.params
    real = codegen.render
    monkeypatch.setattr(codegen, "render", lambda workload, params, **options: real(workload, params, **options) + (
        "\nthis is not OpenCL C;\n" if space.complete(params) == space.complete(bad) else ""))
    monkeypatch.setattr(device, "_programs", {})
    x, w, _, _ = conv_operands("pointwise", np.float32, np.random.default_rng(12))
    expected = reference.conv2d(x, w, **kwargs)
    with pytest.warns(OpenCLFallbackWarning, match="failed to build"):
        assert_close_to_reference(prepared(x, w), expected, np.float32)
    with no_fallback():
        assert_close_to_reference(prepared(x, w), expected, np.float32)


def test_quarantine_excludes_the_variant(device):
    prepared, kwargs = prepared_conv("pointwise", np.float32, device)
    first = prepared.params
    prepared.quarantine()
    assert space.complete(prepared.params) != space.complete(first)
    assert [space.complete(p) for p in backend.failed_variants(device, prepared.workload)] == \
        [space.complete(first)]
    assert space.complete(backend.prepare_conv2d(prepared.spec, device).params) != space.complete(first)
    x, w, _, _ = conv_operands("pointwise", np.float32, np.random.default_rng(13))
    with no_fallback():
        assert_close_to_reference(prepared(x, w), reference.conv2d(x, w, **kwargs), np.float32)


@pytest.mark.parametrize("on_fault", ["fallback", "raise"])
def test_float64_without_device_support(device, monkeypatch, on_fault):
    monkeypatch.setattr(device, "has_fp64", False)
    prepared, kwargs = prepared_conv("strided_bias_relu", np.float64, device, on_fault=on_fault)
    assert not prepared.on_device and "no float64 support" in prepared.variant
    x, w, bias, _ = conv_operands("strided_bias_relu", np.float64, np.random.default_rng(14))
    if on_fault == "raise":
        with pytest.raises(OpenCLFault, match="no float64 support"):
            prepared(x, w, bias)
        return
    with pytest.warns(OpenCLFallbackWarning, match="no float64 support"):
        result = prepared(*on_device(device, x, w, bias))
    assert isinstance(result, DeviceArray)
    assert_close_to_reference(result.get(), reference.conv2d(x, w, bias, **kwargs), np.float64)


def test_output_allocation_failure_falls_back(device, monkeypatch):
    prepared, kwargs = prepared_conv("pointwise", np.float32, device)
    prepared.build()
    x, w, _, _ = conv_operands("pointwise", np.float32, np.random.default_rng(15))
    operands = on_device(device, x, w)
    real = device.pool_buffer
    out_bytes = int(np.prod(prepared.out_shape)) * 4

    def pool_buffer(nbytes):
        if nbytes == out_bytes:
            raise cl.MemoryError(cl._cl._ErrorRecord("clCreateBuffer", cl.status_code.MEM_OBJECT_ALLOCATION_FAILURE,
                                                     "injected by the test"))
        return real(nbytes)

    monkeypatch.setattr(device, "pool_buffer", pool_buffer)
    with pytest.warns(OpenCLFallbackWarning, match="out of memory"):
        result = prepared(*operands)
    assert isinstance(result, np.ndarray)  # copying the CPU result back needs that buffer too: host result
    assert_close_to_reference(result, reference.conv2d(x, w, **kwargs), np.float32)


def test_explicit_device_calls_keep_their_prepared_call(device, launched):
    """sparkle.conv2d(device="opencl:N") prepares once per signature and keeps the prepared call (no tuning
    database lookup and no kernel sources rendered again), numpy and resident operands alike; new data every
    call still gives the new result."""
    rng = np.random.default_rng(16)
    x, w, bias, kwargs = conv_operands("strided_bias_relu", np.float32, rng)
    params, _ = backend.choose_params(device, Workload.from_spec(api.conv2d_spec(x, w, bias, **kwargs)))
    with no_fallback():
        result = sparkle.conv2d(x, w, bias, device=device.id, **kwargs)
        kept = dict(backend._kept_calls)
        assert len(kept) == 1
        for _ in range(2):
            x2, w2, bias2, _ = conv_operands("strided_bias_relu", np.float32, rng)
            resident = sparkle.conv2d(*on_device(device, x2, w2, bias2), device=device.id, **kwargs)
            assert_close_to_reference(resident.get(), reference.conv2d(x2, w2, bias2, **kwargs), np.float32)
        assert dict(backend._kept_calls) == kept  # the same prepared call served them
    assert_close_to_reference(result, reference.conv2d(x, w, bias, **kwargs), np.float32)
    assert [space.complete(p) for p in launched] == [space.complete(params)] * 3


@pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")
def test_explicit_device_calls_from_several_threads_while_kept_calls_are_dropped(device, monkeypatch):
    """Four threads call sparkle.conv2d / matmul on the device with five signatures while only two prepared
    calls are kept: calls made with a prepared call that is dropped meanwhile still finish right."""
    monkeypatch.setattr(backend, "KEPT_CALLS", 2)
    shapes = [(1, 3, 9, 7), (2, 3, 9, 7), (1, 3, 11, 6)]
    def work(seed):
        rng = np.random.default_rng(200 + seed)
        for call in range(8):
            if call % 4 == 3:
                m = 5 + (seed + call) % 2
                a, b = rng.standard_normal((m, 13), np.float32), rng.standard_normal((13, 6), np.float32)
                result = sparkle.matmul(a, b, device=device.id)
                assert_close_to_reference(result, reference.matmul(a, b), np.float32)
                continue
            x = make_array(rng, shapes[(seed + call) % len(shapes)], np.float32)
            w = make_array(rng, (5, 3, 3, 3), np.float32)
            operands = on_device(device, x, w) if call % 2 else (x, w)
            result = sparkle.conv2d(*operands, padding=1, device=device.id)
            assert_close_to_reference(result.get() if isinstance(result, DeviceArray) else result,
                                      reference.conv2d(x, w, padding=1), np.float32)

    run_in_threads(work)
    assert len(backend._kept_calls) <= 2
