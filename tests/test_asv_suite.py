"""The asv suite (benchmarks/bench_*.py) runs: every benchmark class's ``setup`` and each of its benchmark
methods once, on tiny workloads added to the suite's named shapes, the way ``asv run`` calls them.

An OpenCL benchmark whose device is missing or unavailable, or whose call falls back to the CPU backend,
must raise NotImplementedError in ``setup`` (asv's skip) instead of failing or timing the CPU; a wrong
result must fail ``setup``. Program binaries and health verdicts go to the tests' cache (``sparkle_cache``).
"""

from __future__ import annotations

import importlib
import inspect
import pathlib

import numpy as np
import pytest

import sparkle
from sparkle.workloads import ConvLayer

from _opencl import opencl_params, sparkle_cache  # noqa: F401

pytestmark = pytest.mark.usefixtures("sparkle_cache")

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARK_PREFIXES = ("time_", "track_", "peakmem_", "mem_", "timeraw_")  # asv's benchmark kinds
TINY_LAYER = ConvLayer("tiny_3x3", 5, 7, 9, 3, 1, 1)  # C=5 -> K=7, 9x9 input
TINY_MATMUL = ("13x17x11", (13, 17, 11))
UNAVAILABLE = sparkle.Device(id="opencl:0", name="Simulated", vendor="none", kind="gpu", compute_units=1,
                             memory=1 << 30, available=False, reason="simulated: the test kernel does not build")


@pytest.fixture
def suite(monkeypatch):
    """The benchmark modules as asv imports them (package ``benchmarks``), with tiny named workloads added and
    fewer repeats; imported after ``sparkle_cache`` has pointed the cache at the tests' directory."""
    monkeypatch.syspath_prepend(str(ROOT))
    modules = {name: importlib.import_module(f"benchmarks.{name}")
               for name in ("bench_conv2d", "bench_matmul", "bench_opencl")}
    for module in (modules["bench_conv2d"], modules["bench_opencl"]):
        monkeypatch.setitem(module.LAYERS, TINY_LAYER.name, TINY_LAYER)
    monkeypatch.setitem(modules["bench_matmul"].SHAPES, *TINY_MATMUL)
    monkeypatch.setitem(modules["bench_opencl"].MATMUL_SHAPES, *TINY_MATMUL)
    monkeypatch.setattr(modules["bench_conv2d"].Conv2dMemory, "layer", TINY_LAYER)
    monkeypatch.setattr(modules["bench_conv2d"].Conv2dMemory, "batch", 3)  # N > 1: the sampled check
    for module in modules.values():
        monkeypatch.setattr(module, "GFLOPS_REPEAT", 2)
    return modules


def benchmark_methods(cls):
    return [name for name, _ in inspect.getmembers(cls, inspect.isfunction) if name.startswith(BENCHMARK_PREFIXES)]


def run_benchmark(cls, *params):
    """setup, then every benchmark method once, as asv does (a fresh instance, as asv's fresh process)."""
    instance = cls()
    instance.setup(*params)
    methods = benchmark_methods(cls)
    assert methods, f"{cls.__name__} has no benchmarks"
    for name in methods:
        value = getattr(instance, name)(*params)
        if name.startswith("track_"):
            assert np.isfinite(value) and value > 0, f"{cls.__name__}.{name}{params} returned {value!r}"


def test_cpu_benchmarks_run(suite):
    run_benchmark(suite["bench_conv2d"].Conv2dResNet50, TINY_LAYER.name)
    run_benchmark(suite["bench_conv2d"].Conv2dMemory)
    run_benchmark(suite["bench_matmul"].MatmulSquare, TINY_MATMUL[0])


def test_parameters_are_named_shapes(suite):
    from sparkle.workloads import RESNET50_LAYERS

    assert suite["bench_conv2d"].Conv2dResNet50.params == [[layer.name for layer in RESNET50_LAYERS]]
    for cls in (suite["bench_matmul"].MatmulSquare, suite["bench_opencl"].MatmulOpenCL):
        assert all(isinstance(shape, str) and shape.count("x") == 2 for shape in cls.params[-1])


def test_opencl_benchmarks_list_sparkles_devices(suite):
    listed = [device.id for device in sparkle.devices() if device.id.startswith("opencl:")]
    assert suite["bench_opencl"].DEVICES == (listed or ["opencl:0"])
    for cls in (suite["bench_opencl"].Conv2dOpenCL, suite["bench_opencl"].MatmulOpenCL):
        assert cls.params[0] is suite["bench_opencl"].DEVICES


@pytest.mark.parametrize("device_id", opencl_params())
def test_opencl_benchmarks_run(suite, device_id):
    run_benchmark(suite["bench_opencl"].Conv2dOpenCL, device_id, TINY_LAYER.name)
    run_benchmark(suite["bench_opencl"].MatmulOpenCL, device_id, TINY_MATMUL[0])


def opencl_setups(suite, device_id):
    return [lambda: suite["bench_opencl"].Conv2dOpenCL().setup(device_id, TINY_LAYER.name),
            lambda: suite["bench_opencl"].MatmulOpenCL().setup(device_id, TINY_MATMUL[0])]


def test_unavailable_device_is_skipped(suite, monkeypatch):
    monkeypatch.setattr(sparkle, "devices", lambda: [UNAVAILABLE])
    for setup in opencl_setups(suite, "opencl:0"):
        with pytest.raises(NotImplementedError, match="unavailable: simulated: the test kernel does not build"):
            setup()


def test_missing_device_is_skipped(suite, monkeypatch):
    monkeypatch.setenv("SPARKLE_OPENCL", "0")  # what a machine without pyopencl or drivers looks like
    for setup in opencl_setups(suite, "opencl:0"):
        with pytest.raises(NotImplementedError, match="no OpenCL device opencl:0: OpenCL is disabled"):
            setup()


@pytest.mark.parametrize("device_id", opencl_params())
def test_fallback_to_the_cpu_is_skipped(suite, monkeypatch, device_id):
    """Every launch of the backend fails, as on a device out of memory: the calls run on the CPU backend with an
    OpenCLFallbackWarning, and the benchmark is skipped instead of timing the CPU under the device's name."""
    from sparkle.opencl import backend, prepared

    def failing_enqueue(*args, **kwargs):
        raise MemoryError("simulated")

    # the backend's launches only (prepared calls' own kernels), not the health check's (launch.enqueue)
    monkeypatch.setattr(prepared._Variant, "enqueue", failing_enqueue)
    monkeypatch.setattr(backend, "_failed", {})  # forget the variants marked failed here afterwards
    for setup in opencl_setups(suite, device_id):
        with pytest.raises(NotImplementedError, match="does not run on the device: .*ran on the Numba CPU backend"):
            setup()


def test_wrong_result_fails_setup(suite, monkeypatch):
    """A fast wrong kernel is a bug: setup fails (asv reports it failed) instead of timing it."""
    monkeypatch.setattr(sparkle, "conv2d", lambda x, w, **kwargs: np.zeros((1, 7, 9, 9), np.float32))
    monkeypatch.setattr(sparkle, "matmul", lambda a, b, **kwargs: (a @ b) * np.float32(1.001))
    with pytest.raises(AssertionError, match="relative L2 error"):
        suite["bench_conv2d"].Conv2dResNet50().setup(TINY_LAYER.name)
    with pytest.raises(AssertionError, match="relative L2 error"):
        suite["bench_matmul"].MatmulSquare().setup(TINY_MATMUL[0])
