"""OpenCL test support shared by the tests/test_opencl_* modules.

- ``opencl_device_ids()``: the ids ("opencl:0", ...) of every available OpenCL device (one that passes
  Sparkle's health check), [] without pyopencl.
- ``requires_opencl``: skip marker (with the reason OpenCL is unavailable) for tests that need a device.
- ``opencl_params()``: the ids of every listed device as parameters, an unavailable device's skipped with its
  reason (e.g. PyPI's PoCL on a CPU its LLVM does not know), or one skipped parameter saying why there are
  none, so such a machine reports clean skips with reasons instead of failures or an empty parameter set.
- ``runtime_device(device_id)``: the runtime ``OpenCLDevice`` for an id, looked up afresh each time
  (discovery is cached by environment, so a test that changes SPARKLE_OPENCL gets new device objects:
  never keep one across tests).
- ``timing_queue_mode`` fixture: runs a test with one profiling queue per device and again with timed launches
  on a queue apart (SPARKLE_TIMING_QUEUE), whatever the devices' defaults.
- ``sparkle_cache`` fixture: points SPARKLE_CACHE_DIR at a test-only directory that persists between runs
  (pytest's cache directory), so program binaries built by one run make the next run fast, and the user's
  own cache and tuning database are never read or written by the tests.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import numpy as np
import pytest

_health_cache_dir = None  # where health checks made while collecting keep their verdicts (set by conftest)


def _runtime():
    """``sparkle.opencl.runtime``, or None when pyopencl cannot be imported."""
    try:
        import pyopencl  # noqa: F401
    except ImportError:
        return None
    from sparkle.opencl import runtime

    return runtime


def use_test_cache_for_health_checks(config):
    """Health checks made while collecting keep their verdicts in the tests' cache, never the user's."""
    global _health_cache_dir
    _health_cache_dir = cache_path_for_tests(config, None)


@contextmanager
def _test_cache():
    global _health_cache_dir
    if _health_cache_dir is None:
        _health_cache_dir = tempfile.mkdtemp(prefix="sparkle-opencl-health-")
    before = os.environ.get("SPARKLE_CACHE_DIR")
    os.environ["SPARKLE_CACHE_DIR"] = os.fspath(_health_cache_dir)
    try:
        yield
    finally:
        if before is None:
            del os.environ["SPARKLE_CACHE_DIR"]
        else:
            os.environ["SPARKLE_CACHE_DIR"] = before


def device_health():
    """[(runtime device, Health)] of every OpenCL device the runtime lists (checked once per device identity)."""
    runtime = _runtime()
    if runtime is None:
        return []
    from sparkle.opencl import health

    with _test_cache():
        return [(device, health.check(device)) for device in runtime.opencl_devices()]


def opencl_device_ids():
    """Ids of every available OpenCL device (none when pyopencl is missing or SPARKLE_OPENCL=0)."""
    return [device.id for device, verdict in device_health() if verdict.available]


def _unavailable_text(device, verdict):
    return f"{device.id} ({device.name}) is unavailable: {verdict.reason}"


def unavailable_reason():
    if _runtime() is None:
        return "pyopencl is not installed"
    from sparkle.devices import opencl_unavailable_reason

    unavailable = [_unavailable_text(d, v) for d, v in device_health() if not v.available]
    return opencl_unavailable_reason() or "; ".join(unavailable) or "no OpenCL device"


requires_opencl = pytest.mark.skipif(not opencl_device_ids(), reason=f"OpenCL: {unavailable_reason()}")


def opencl_params():
    """Device ids for ``pytest.mark.parametrize``, unavailable ones skipped with the reason; a single skipped
    parameter when there are none."""
    params = [device.id if verdict.available else
              pytest.param(device.id, marks=pytest.mark.skip(reason=_unavailable_text(device, verdict)))
              for device, verdict in device_health()]
    if params:
        return params
    return [pytest.param(None, id="no-opencl", marks=pytest.mark.skip(reason=f"OpenCL: {unavailable_reason()}"))]


def runtime_device(device_id):
    """The runtime OpenCLDevice with ``device_id`` (fails the test if it has disappeared)."""
    from sparkle.opencl import runtime

    device = runtime.opencl_device(device_id)
    assert device is not None, f"{device_id} is not listed by the OpenCL runtime any more"
    return device


def cache_path_for_tests(config, tmp_path_factory):
    """A cache directory for the tests only: pytest's cache (kept between runs), else a temporary one."""
    cache = getattr(config, "cache", None)
    if cache is not None:  # persistent between runs: warm program binaries
        return cache.mkdir("sparkle-opencl-tests")
    if tmp_path_factory is None:
        return tempfile.mkdtemp(prefix="sparkle-opencl-cache-")
    return tmp_path_factory.mktemp("sparkle-opencl-cache")


@pytest.fixture
def sparkle_cache(request, tmp_path_factory, monkeypatch):
    """SPARKLE_CACHE_DIR for this test: the test-only cache (unless the test sets its own later)."""
    path = cache_path_for_tests(request.config, tmp_path_factory)
    monkeypatch.setenv("SPARKLE_CACHE_DIR", os.fspath(path))
    return path


@pytest.fixture(params=["shared", "separate"], ids=["one-queue", "timing-queue-apart"])
def timing_queue_mode(request, monkeypatch):
    """SPARKLE_TIMING_QUEUE for this test, both ways: devices looked up after it are fresh objects (their own
    contexts) with one profiling queue, or with timed launches on a queue apart (the default on GPUs)."""
    monkeypatch.setenv("SPARKLE_TIMING_QUEUE", request.param)
    return request.param


class GuardedBuffer:
    """``host``'s values in a sub-buffer with NaN guard regions on both sides in one device buffer.

    A kernel that writes outside its array changes a guard (checked by ``guards_intact``); one that reads
    outside its array and uses the value computes a NaN. ``poison=True`` fills the array itself with NaN
    too (an output buffer: every element left NaN was never written).
    """

    def __init__(self, device, host, *, poison=False):
        import pyopencl as cl

        host = np.ascontiguousarray(host)
        self.shape, self.dtype = host.shape, host.dtype
        align = max(device.cl_device.mem_base_addr_align // 8, host.dtype.itemsize)
        self.guard_bytes = -(-1024 // align) * align
        self.guard = self.guard_bytes // host.dtype.itemsize
        size = max(host.size, 1)
        self.full = np.full(2 * self.guard + size, np.nan, dtype=host.dtype)
        if not poison:
            self.full[self.guard:self.guard + host.size] = host.ravel()
        self.device = device
        self.parent = cl.Buffer(device.context, cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR,
                                hostbuf=self.full)
        self.buffer = self.parent.get_sub_region(self.guard_bytes, size * host.dtype.itemsize)

    def read(self):
        """(the array, the guard values) as now on the device."""
        import pyopencl as cl

        full = np.empty_like(self.full)
        cl.enqueue_copy(self.device.queue, full, self.parent, is_blocking=True)
        inside = full[self.guard:self.guard + int(np.prod(self.shape, dtype=np.int64))].reshape(self.shape)
        return inside, np.concatenate([full[:self.guard], full[-self.guard:]])

    def guards_intact(self):
        return bool(np.isnan(self.read()[1]).all())
