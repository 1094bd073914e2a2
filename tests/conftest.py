"""Shared pytest configuration for the Sparkle suite."""

import os

import pytest
from hypothesis import settings


def pytest_configure(config):
    # CI reruns the tests marked this way under NUMBA_BOUNDSCHECK=1 (`pytest -m boundscheck`):
    # small shapes that still reach every kernel code path (edge tiles, padding, groups, epilogue).
    config.addinivalue_line(
        "markers", "boundscheck: fast small-shape test that exercises every kernel code path; "
                   "CI reruns these under NUMBA_BOUNDSCHECK=1")
    config.addinivalue_line("markers", "oclgrind: runs generated OpenCL kernels on the Oclgrind simulator")
    # Test modules check OpenCL device health while being collected: keep those verdicts out of the user's cache.
    import _opencl

    _opencl.use_test_cache_for_health_checks(config)


# Property tests are compute-bound and the first call of each kernel variant compiles for
# seconds, so a per-example deadline only produces noise. SPARKLE_HYPOTHESIS_PROFILE=ci makes
# the examples the same on every run (reproducible CI logs); the default explores new ones.
settings.register_profile("sparkle", deadline=None, print_blob=True)
settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
settings.load_profile(os.environ.get("SPARKLE_HYPOTHESIS_PROFILE", "sparkle"))


@pytest.fixture(autouse=True)
def fresh_kept_calls():
    """Each test's sparkle.conv2d(device="cpu" / "opencl:...") calls prepare afresh: tests change the backends'
    internals (fault injection, stand-in parameters) that a kept prepared call would not see."""
    from sparkle import named_device
    from sparkle.opencl import backend  # imports pyopencl only when a device is used

    named_device.forget()
    backend.forget_kept_calls()
    yield


@pytest.fixture
def launched(monkeypatch):
    """The parameter sets launched, in order: by launch.enqueue (the tuner, the health check) or by a prepared
    call's own kernels (prepared calls, and sparkle.conv2d / matmul on an OpenCL device)."""
    from sparkle.opencl import launch, prepared

    calls = []
    real_enqueue, real_variant_enqueue = launch.enqueue, prepared._Variant.enqueue

    def spy(device, workload, params, *args, **kwargs):
        calls.append(dict(params))
        return real_enqueue(device, workload, params, *args, **kwargs)

    def variant_spy(variant, *args, **kwargs):
        calls.append(dict(variant.params))
        return real_variant_enqueue(variant, *args, **kwargs)

    monkeypatch.setattr(launch, "enqueue", spy)
    monkeypatch.setattr(prepared._Variant, "enqueue", variant_spy)
    return calls
