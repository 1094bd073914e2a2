"""Results copied back into pinned host memory (a GPU's default; forced here on whatever device there is):
right values, pooled blocks reused only once their results are gone, and a pinned result uploads again."""

from __future__ import annotations

import gc

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import reference  # noqa: E402
from sparkle.host_pool import SMALLEST_POOLED_BYTES  # noqa: E402
from sparkle.opencl import pinned  # noqa: E402
from sparkle.opencl.runtime import opencl_device  # noqa: E402

from _helpers import assert_close_to_reference  # noqa: E402
from _opencl import opencl_params, sparkle_cache  # noqa: E402,F401

pytestmark = [pytest.mark.usefixtures("sparkle_cache"),
              pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")]

DEVICES = opencl_params()


@pytest.fixture
def pinned_device(request, monkeypatch):
    device = opencl_device(request.param)
    monkeypatch.setattr(device, "pinned_results", True)
    monkeypatch.setattr(device, "_result_pool", None)
    return request.param, device


@pytest.mark.parametrize("pinned_device", DEVICES, indirect=True)
def test_results_land_in_pinned_blocks_and_are_right(pinned_device):
    device_id, device = pinned_device
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 8, 48, 48)).astype(np.float32)
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    expected = reference.conv2d(x, w, padding=1)
    assert expected.size * 4 >= SMALLEST_POOLED_BYTES
    on_device = sparkle.conv2d(sparkle.to_device(x, device_id), w, padding=1)
    first = on_device.get()
    assert_close_to_reference(first, expected, np.float32)
    pool = pinned.result_pool(device)
    assert pool is not sparkle.host_pool.pool()  # the device's own pool of pinned blocks
    address = first.ctypes.data
    second = sparkle.conv2d(sparkle.to_device(x, device_id), w, padding=1).get()
    assert not np.shares_memory(first, second)  # the first result is alive: its block is not reused
    assert_close_to_reference(second, expected, np.float32)
    del first
    gc.collect()
    third = on_device.get()
    assert third.ctypes.data == address  # the dead result's pinned block is reused
    assert_close_to_reference(third, expected, np.float32)
    assert_close_to_reference(second, expected, np.float32)


@pytest.mark.parametrize("pinned_device", DEVICES, indirect=True)
def test_a_pinned_result_is_the_next_calls_input(pinned_device):
    device_id, _ = pinned_device
    rng = np.random.default_rng(6)
    a = rng.standard_normal((512, 600)).astype(np.float32)
    b = rng.standard_normal((600, 700)).astype(np.float32)
    c = rng.standard_normal((700, 64)).astype(np.float32)
    ab = sparkle.matmul(sparkle.to_device(a, device_id), sparkle.to_device(b, device_id)).get()
    assert ab.nbytes >= SMALLEST_POOLED_BYTES
    assert_close_to_reference(ab, reference.matmul(a, b), np.float32)
    abc = sparkle.matmul(ab, c, device=device_id)
    assert_close_to_reference(abc, reference.matmul(ab, c), np.float32)


@pytest.mark.parametrize("pinned_device", DEVICES, indirect=True)
def test_pinned_memory_is_rationed(pinned_device):
    _, device = pinned_device
    pool = pinned.result_pool(device)
    assert pool.owned_limit_bytes == pinned.PINNED_LIMIT_FACTOR * pool.idle_limit_bytes
