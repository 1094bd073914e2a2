"""Faults on an OpenCL device: the call still returns the right result (on the Numba CPU backend), warns
with the cause, and the variant that faulted is not tried again for that workload in this process.

Each fault is injected at the point where the driver would report it, so the backend's own handling runs:
a kernel that does not build (invalid source from the generator), a launch beyond the device's work-group
limit (a real driver error: the parameters reach the device through the tuning-database lookup), device
or host memory exhaustion at buffer allocation, and a lost device at enqueue.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import pyopencl as cl  # noqa: E402

import sparkle  # noqa: E402
from sparkle import api, reference  # noqa: E402
from sparkle.device_array import DeviceArray  # noqa: E402
from sparkle.opencl import backend, codegen, launch, prepared, transfer  # noqa: E402
from sparkle.opencl.backend import OpenCLFallbackWarning  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402
from sparkle.opencl.tuning import database, space  # noqa: E402

from _helpers import assert_close_to_reference  # noqa: E402
from _opencl import opencl_params, runtime_device  # noqa: E402


def cl_error(cls, routine, status):
    """A pyopencl error as the driver wrapper raises it (``cls`` is MemoryError, RuntimeError, ...)."""
    return cls(cl._cl._ErrorRecord(routine, status, "injected by the test"))


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A private cache directory (tuning database, binaries) and no failed variants from other tests."""
    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(backend, "_failed", {})


@pytest.fixture(params=opencl_params())
def device(request):
    return runtime_device(request.param)



# One conv2d problem with every epilogue feature, and one matmul; tiny so the CPU fallback is instant.
def conv_problem(rng, dtype=np.float32):
    x = rng.standard_normal((2, 3, 9, 7)).astype(dtype)
    w = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    kwargs = dict(padding=1, stride=(1, 2), activation="relu")
    expected = reference.conv2d(x, w, b, **kwargs)
    workload = Workload.from_spec(api.conv2d_spec(x, w, b, **kwargs))
    return (x, w, b), kwargs, expected, workload


def run_conv(operands, kwargs, device, inputs):
    x, w, b = operands
    if inputs == "device":
        x, w, b = (sparkle.to_device(a, device.id) for a in (x, w, b))
    return sparkle.conv2d(x, w, b, device=device.id, **kwargs)


def host_result(result, inputs):
    if inputs == "device":
        assert isinstance(result, DeviceArray), "device inputs must give a device result, also after a fallback"
        return result.get()
    assert isinstance(result, np.ndarray)
    return result


def oversized_params(device):
    """Valid-looking parameters whose work-group is larger than the device allows (CPU shape: no local
    memory, one accumulator per work-item, so only the work-group size is out of bounds)."""
    tn = 128
    tm = 1
    while tm * tn <= device.max_work_group_size:
        tm *= 2
    params = space.complete({"USE_LOCAL": 0, "TM": tm, "TN": tn, "WM": 1, "WN": 1, "VW": 1, "VN": 1})
    assert space.threads(params) > device.max_work_group_size
    return params


# ---- the injected faults: each returns (the parameter set that faults, words the warning must contain) ----

def inject_build_failure(monkeypatch, device, workload):
    """The generator emits invalid source for this workload with the parameters it would use first."""
    bad, _ = backend.choose_params(device, workload)
    real = codegen.render

    def render(w, params, **kwargs):
        source = real(w, params, **kwargs)
        if w == workload and space.complete(params) == space.complete(bad):
            source += "\nthis is not OpenCL C;\n"
        return source

    monkeypatch.setattr(codegen, "render", render)
    return bad, "failed to build"


def inject_oversized_launch(monkeypatch, device, workload):
    """The tuning database hands out a work-group larger than the device's maximum; the driver refuses it."""
    bad = oversized_params(device)
    real = database.lookup

    def lookup(identity, w, limits, excluded=(), document=database.DOCUMENT, traits=None):
        if w == workload and bad not in [space.complete(p) for p in excluded]:
            return dict(bad), "tuned"
        return real(identity, w, limits, excluded, document, traits)

    monkeypatch.setattr(database, "lookup", lookup)
    return bad, "exceeds the device's"


def _fail_output_allocation(monkeypatch, device, workload, error):
    """The first allocation of the output buffer raises ``error``."""
    out_bytes = workload.batch * workload.out_channels * workload.out_h * workload.out_w * \
        np.dtype(workload.dtype).itemsize
    real = device.pool_buffer
    state = {"armed": True}

    def pool_buffer(nbytes):
        if state["armed"] and nbytes == out_bytes:
            state["armed"] = False
            raise error
        return real(nbytes)

    monkeypatch.setattr(device, "pool_buffer", pool_buffer)


def inject_device_out_of_memory(monkeypatch, device, workload):
    bad, _ = backend.choose_params(device, workload)
    _fail_output_allocation(monkeypatch, device, workload, cl_error(
        cl.MemoryError, "clCreateBuffer", cl.status_code.MEM_OBJECT_ALLOCATION_FAILURE))
    return bad, "the device is out of memory"


def inject_host_out_of_memory(monkeypatch, device, workload):
    bad, _ = backend.choose_params(device, workload)
    _fail_output_allocation(monkeypatch, device, workload, MemoryError("injected by the test"))
    return bad, "the host is out of memory"


def inject_lost_device(monkeypatch, device, workload):
    """The first enqueue (through launch.enqueue or a prepared call's own kernels) reports the device as gone."""
    bad, _ = backend.choose_params(device, workload)
    real, real_variant = launch.enqueue, prepared._Variant.enqueue
    state = {"armed": True}

    def disarm():
        if state["armed"]:
            state["armed"] = False
            raise cl_error(cl.RuntimeError, "clEnqueueNDRangeKernel", cl.status_code.DEVICE_NOT_AVAILABLE)

    def enqueue(d, w, params, *args, **kwargs):
        disarm()
        return real(d, w, params, *args, **kwargs)

    def variant_enqueue(variant, *args, **kwargs):
        disarm()
        return real_variant(variant, *args, **kwargs)

    monkeypatch.setattr(launch, "enqueue", enqueue)
    monkeypatch.setattr(prepared._Variant, "enqueue", variant_enqueue)
    return bad, "the device was lost or is not available"


FAULTS = {
    "build failure": inject_build_failure,
    "work-group too large": inject_oversized_launch,
    "device out of memory": inject_device_out_of_memory,
    "host out of memory": inject_host_out_of_memory,
    "lost device": inject_lost_device,
}


@pytest.mark.parametrize("inputs", ["numpy", "device"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_falls_back_then_next_call_uses_another_variant(device, fault, inputs, monkeypatch, launched):
    operands, kwargs, expected, workload = conv_problem(np.random.default_rng(1))
    bad, cause = FAULTS[fault](monkeypatch, device, workload)
    assert backend.failed_variants(device, workload) == []

    with pytest.warns(OpenCLFallbackWarning) as record:
        result = run_conv(operands, kwargs, device, inputs)
    assert_close_to_reference(host_result(result, inputs), expected, np.float32)
    messages = [str(w.message) for w in record if issubclass(w.category, OpenCLFallbackWarning)]
    assert len(messages) == 1, messages
    assert cause in messages[0] and device.id in messages[0] and "CPU backend" in messages[0], messages[0]

    # The faulting variant is remembered for this workload; another one is chosen now.
    assert [space.complete(p) for p in backend.failed_variants(device, workload)] == [space.complete(bad)]
    params, source = backend.choose_params(device, workload)
    assert params is not None and space.complete(params) != space.complete(bad), (params, source)

    # The next call (the fault is still injected where it depends on the variant) runs on the device with
    # that other variant, without a warning, and is right.
    launched.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)
        again = run_conv(operands, kwargs, device, inputs)
    assert_close_to_reference(host_result(again, inputs), expected, np.float32)
    assert [space.complete(p) for p in launched] == [space.complete(params)]


@pytest.mark.parametrize("inputs", ["numpy", "device"])
def test_matmul_fault_falls_back(device, inputs, monkeypatch, launched):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((13, 17)).astype(np.float32)
    b = rng.standard_normal((17, 11)).astype(np.float32)
    workload = Workload.from_spec(api.matmul_spec(a, b))
    bad, cause = inject_build_failure(monkeypatch, device, workload)
    args = (a, b) if inputs == "numpy" else (sparkle.to_device(a, device.id), sparkle.to_device(b, device.id))
    with pytest.warns(OpenCLFallbackWarning, match=cause):
        result = sparkle.matmul(*args, device=device.id)
    assert_close_to_reference(host_result(result, inputs), reference.matmul(a, b), np.float32)
    assert [space.complete(p) for p in backend.failed_variants(device, workload)] == [space.complete(bad)]
    launched.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)
        again = sparkle.matmul(*args, device=device.id)
    assert_close_to_reference(host_result(again, inputs), reference.matmul(a, b), np.float32)
    assert len(launched) == 1 and space.complete(launched[0]) != space.complete(bad)


def test_failed_variant_is_excluded_for_that_workload_only(device, monkeypatch):
    rng = np.random.default_rng(3)
    operands, kwargs, _, workload = conv_problem(rng)
    bad, _ = inject_build_failure(monkeypatch, device, workload)
    with pytest.warns(OpenCLFallbackWarning):
        run_conv(operands, kwargs, device, "numpy")
    # A workload of another shape still gets (and builds) the variant that failed for the first one.
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    other = Workload.from_spec(api.conv2d_spec(x, w, None))
    assert backend.failed_variants(device, other) == []
    params, _ = backend.choose_params(device, other)
    assert space.complete(params) == space.complete(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)
        assert_close_to_reference(sparkle.conv2d(x, w, device=device.id), reference.conv2d(x, w), np.float32)


def test_when_every_variant_failed_the_call_runs_on_the_cpu_and_says_so(device, monkeypatch, launched):
    operands, kwargs, expected, workload = conv_problem(np.random.default_rng(4))
    real = codegen.render

    def render(w, params, **kw):  # nothing builds for this workload
        source = real(w, params, **kw)
        return source + "\nthis is not OpenCL C;\n" if w == workload else source

    monkeypatch.setattr(codegen, "render", render)
    tried = []
    while True:
        params, reason = backend.choose_params(device, workload)
        if params is None:
            break
        assert space.complete(params) not in tried, "a variant that failed was chosen again"
        tried.append(space.complete(params))
        with pytest.warns(OpenCLFallbackWarning, match="failed to build"):
            result = run_conv(operands, kwargs, device, "numpy")
        assert_close_to_reference(result, expected, np.float32)
        assert len(tried) < 10
    assert tried, "the device offered no variant at all"
    assert "every variant for this workload failed" in reason
    launched.clear()
    with pytest.warns(OpenCLFallbackWarning, match="every variant for this workload failed"):
        result = run_conv(operands, kwargs, device, "device")
    assert_close_to_reference(host_result(result, "device"), expected, np.float32)
    assert launched == [], "nothing is launched once no variant is left"


@pytest.mark.parametrize("inputs", ["numpy", "device"])
def test_buffer_beyond_the_largest_allocation_falls_back_without_launching(device, inputs, monkeypatch, launched):
    operands, kwargs, expected, workload = conv_problem(np.random.default_rng(7))
    run_args = operands if inputs == "numpy" else [sparkle.to_device(a, device.id) for a in operands]
    largest = max(a.nbytes for a in operands)
    monkeypatch.setattr(device, "max_alloc", largest - 4)
    with pytest.warns(OpenCLFallbackWarning, match="exceeds the device's largest allocation"):
        result = sparkle.conv2d(*run_args, device=device.id, **kwargs)
    assert_close_to_reference(host_result(result, inputs), expected, np.float32)
    assert launched == []
    assert backend.failed_variants(device, workload) == []  # no variant is to blame
    monkeypatch.setattr(device, "max_alloc", largest)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)
        result = sparkle.conv2d(*run_args, device=device.id, **kwargs)
    assert_close_to_reference(host_result(result, inputs), expected, np.float32)
    assert len(launched) == 1


@pytest.mark.parametrize("inputs", ["numpy", "device"])
def test_float64_on_a_device_without_float64_support_falls_back(device, inputs, monkeypatch, launched):
    """README: "float64 on a device without float64 support falls back the same way". The backend reads
    the device's ``has_fp64`` (cl_khr_fp64 or a double_fp_config); here the device says it has none."""
    monkeypatch.setattr(device, "has_fp64", False)
    operands, kwargs, expected, workload = conv_problem(np.random.default_rng(8), np.float64)
    with pytest.warns(OpenCLFallbackWarning) as record:
        result = run_conv(operands, kwargs, device, inputs)
    messages = [str(w.message) for w in record if issubclass(w.category, OpenCLFallbackWarning)]
    assert len(messages) == 1, messages
    assert "no float64 support" in messages[0] and device.id in messages[0] and "CPU backend" in messages[0]
    host = host_result(result, inputs)  # a DeviceArray again for device inputs
    assert host.dtype == np.float64
    assert_close_to_reference(host, expected, np.float64)
    assert launched == []  # nothing reached the device
    assert backend.failed_variants(device, workload) == []  # no variant is to blame

    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((7, 12)), rng.standard_normal((12, 9))
    args = (a, b) if inputs == "numpy" else (sparkle.to_device(a, device.id), sparkle.to_device(b, device.id))
    with pytest.warns(OpenCLFallbackWarning, match="no float64 support"):
        c = sparkle.matmul(*args, device=device.id)
    c = host_result(c, inputs)
    assert c.dtype == np.float64
    assert_close_to_reference(c, reference.matmul(a, b), np.float64)
    assert launched == []

    # float32 on the same device still runs there.
    operands32, kwargs32, expected32, _ = conv_problem(np.random.default_rng(8), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)
        result = run_conv(operands32, kwargs32, device, inputs)
    assert_close_to_reference(host_result(result, inputs), expected32, np.float32)
    assert len(launched) == 1


def test_lost_device_with_device_inputs_still_returns_the_right_values(device, monkeypatch):
    """When even copying the CPU result back to the device fails, the host result is returned."""
    operands, kwargs, expected, _ = conv_problem(np.random.default_rng(5))
    on_device = [sparkle.to_device(a, device.id) for a in operands]

    def gone(*args, **kwargs):
        raise cl_error(cl.RuntimeError, "clEnqueueNDRangeKernel", cl.status_code.DEVICE_NOT_AVAILABLE)

    monkeypatch.setattr(launch, "enqueue", gone)
    monkeypatch.setattr(transfer, "upload", gone)
    with pytest.warns(OpenCLFallbackWarning, match="lost or is not available"):
        result = sparkle.conv2d(*on_device, device=device.id, **kwargs)
    assert isinstance(result, np.ndarray)
    assert_close_to_reference(result, expected, np.float32)


def test_fallback_warning_points_at_the_caller(device, monkeypatch):
    operands, kwargs, _, workload = conv_problem(np.random.default_rng(6))
    inject_lost_device(monkeypatch, device, workload)
    with pytest.warns(OpenCLFallbackWarning) as record:
        run_conv(operands, kwargs, device, "numpy")
    # run_conv is this file's function: the warning names the line that called sparkle.conv2d
    assert [w.filename for w in record] == [__file__]
    a = np.ones((3, 4), np.float32)
    inject_lost_device(monkeypatch, device, Workload.from_spec(api.matmul_spec(a, a.T)))
    with pytest.warns(OpenCLFallbackWarning) as record:
        sparkle.matmul(a, a.T, device=device.id)
    assert [w.filename for w in record] == [__file__]


def test_fault_names(device):
    """The cause in the warning for each driver status the backend knows, and an unknown one."""
    status = cl.status_code
    cases = {
        status.BUILD_PROGRAM_FAILURE: "the kernel failed to build",
        status.OUT_OF_RESOURCES: "the launch exceeds the device's resources",
        status.INVALID_WORK_GROUP_SIZE: "the launch exceeds the device's work-group limits",
        status.MEM_OBJECT_ALLOCATION_FAILURE: "the device is out of memory",
        status.OUT_OF_HOST_MEMORY: "the host is out of memory",
        status.DEVICE_NOT_AVAILABLE: "the device was lost or is not available",
        status.INVALID_VALUE: "OpenCL error",
    }
    for code, words in cases.items():
        name = backend._fault_name(cl_error(cl.Error, "clSomething", code), device)
        assert name.startswith(words) and "clSomething" in name, name
