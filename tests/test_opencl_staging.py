"""Uploads staged through pinned memory (a GPU's default; forced here on whatever OpenCL device there is, with a
small ring so that chunks wrap around): every byte arrives, the source is free once the call returns, uploads
from many threads stay apart, and a device without pinned memory falls back to the driver's copy."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import reference  # noqa: E402
from sparkle.cpu.copy import parallel_copy  # noqa: E402
from sparkle.opencl import staging, transfer  # noqa: E402
from sparkle.opencl.runtime import opencl_device  # noqa: E402

from _helpers import assert_close_to_reference  # noqa: E402
from _opencl import opencl_params, sparkle_cache  # noqa: E402,F401

pytestmark = [pytest.mark.usefixtures("sparkle_cache"),
              pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")]

DEVICES = opencl_params()
CHUNK_BYTES = 1 << 20  # two slots of it: a 3.3 MiB upload wraps around the ring
SLOTS = 2


@pytest.fixture
def staging_device(request, monkeypatch):
    device = opencl_device(request.param)
    monkeypatch.setattr(device, "staged_uploads", True)
    monkeypatch.setattr(device, "_staging", None)
    monkeypatch.setattr(staging, "CHUNK_BYTES", CHUNK_BYTES)
    monkeypatch.setattr(staging, "SLOTS", SLOTS)
    monkeypatch.setattr(staging, "SMALLEST_STAGED_BYTES", 4096)
    yield request.param, device
    if device._staging is not None:
        device.queue.finish()


def _random(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * 100).astype(dtype)


@pytest.mark.boundscheck
@pytest.mark.parametrize("nbytes", [0, 1, 3, 4097, (256 << 10) + 5, (512 << 10) - 1, (1 << 20) + 12345, 5 << 20])
def test_parallel_copy_copies_every_byte(nbytes):
    source = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    destination = np.zeros(nbytes + 2, np.uint8)  # a guard byte on each side
    parallel_copy(destination[1:-1], source)
    assert np.array_equal(destination[1:-1], source)
    assert destination[0] == 0 and destination[-1] == 0


def test_parallel_copy_rejects_a_destination_of_another_size():
    with pytest.raises(ValueError, match="destination"):
        parallel_copy(np.zeros(10, np.uint8), np.zeros(11, np.uint8))


@pytest.mark.parametrize("staging_device", DEVICES, indirect=True)
@pytest.mark.parametrize("shape, dtype", [((1,), np.float32), ((1000, 5), np.float32), ((3, 300, 1001), np.float32),
                                          ((2, 2, 1 << 16), np.float64), ((7, 1 << 17), np.int16)])
def test_staged_uploads_arrive_whole(staging_device, shape, dtype):
    _, device = staging_device
    host = _random(shape, dtype, 1)
    on_device = transfer.upload(device, host, host.dtype)
    assert np.array_equal(on_device.get(), host)
    assert (device._staging is not None) == (host.nbytes >= staging.SMALLEST_STAGED_BYTES)


@pytest.mark.parametrize("staging_device", DEVICES, indirect=True)
def test_the_source_may_change_once_the_upload_returns(staging_device):
    _, device = staging_device
    host = _random((5 * CHUNK_BYTES // 4 + 99,), np.float32, 2)
    kept = host.copy()
    uploads = [transfer.upload(device, host, np.float32)]
    host[:] = -1.0  # the last chunks' device copies may still be queued: they read the ring, not the source
    uploads.append(transfer.upload(device, host, np.float32))
    assert np.array_equal(uploads[0].get(), kept)
    assert np.array_equal(uploads[1].get(), host)


@pytest.mark.parametrize("staging_device", DEVICES, indirect=True)
def test_a_conversion_or_a_strided_source_is_staged_too(staging_device):
    _, device = staging_device
    source = _random((600, 2000), np.float64, 3)
    converted = transfer.upload(device, source[:, ::2], np.float32)
    assert np.array_equal(converted.get(), source[:, ::2].astype(np.float32))


@pytest.mark.parametrize("staging_device", DEVICES, indirect=True)
def test_staged_operands_give_the_right_conv2d(staging_device):
    device_id, _ = staging_device
    x = _random((2, 16, 130, 130), np.float32, 4) / 100
    w = _random((32, 16, 3, 3), np.float32, 5) / 100
    assert x.nbytes > SLOTS * CHUNK_BYTES
    got = sparkle.conv2d(x, w, padding=1, device=device_id)
    assert_close_to_reference(got, reference.conv2d(x, w, padding=1), np.float32)


@pytest.mark.parametrize("staging_device", DEVICES, indirect=True)
def test_uploads_from_many_threads_stay_apart(staging_device):
    _, device = staging_device
    sources = [_random((CHUNK_BYTES // 4 * 3 // 2 + 17 * index,), np.float32, 10 + index) for index in range(8)]
    wrong = []

    def upload_many(source):
        for _ in range(5):
            if not np.array_equal(transfer.upload(device, source, np.float32).get(), source):
                wrong.append(source.size)

    threads = [threading.Thread(target=upload_many, args=(source,)) for source in sources]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


@pytest.mark.parametrize("staging_device", DEVICES, indirect=True)
def test_without_pinned_memory_uploads_go_straight_to_the_driver(staging_device, monkeypatch):
    _, device = staging_device

    def no_pinned_memory(device, nbytes):
        raise MemoryError("no pinned memory here")

    monkeypatch.setattr(staging, "pinned_block", no_pinned_memory)
    host = _random((3 * CHUNK_BYTES // 4,), np.float32, 6)
    assert np.array_equal(transfer.upload(device, host, np.float32).get(), host)
    assert device.staged_uploads is False and device._staging is None


class _LateDevice:
    """A device whose copies read the staged memory only when their event is waited for: a ring that reused a
    slot before its copy ran would send the wrong bytes."""

    def __init__(self, nbytes):
        self.memory = np.zeros(nbytes, np.uint8)
        self.queue = self
        self.events = []

    def enqueue_copy(self, queue, buffer, staged, offset):
        device = self

        class Event:
            done = False

            def wait(self):
                if not self.done:
                    device.memory[offset:offset + staged.size] = staged
                    self.done = True

        self.events.append(Event())
        return self.events[-1]

    def finish(self):
        for event in self.events:
            event.wait()


def test_a_slot_is_reused_only_once_its_copy_has_run(monkeypatch):
    host = np.random.default_rng(7).integers(0, 256, 5 * 1000 + 1, dtype=np.uint8)
    device = _LateDevice(host.nbytes)
    monkeypatch.setattr(staging, "pinned_block", lambda device, nbytes: np.zeros(nbytes, np.uint8))
    monkeypatch.setattr(staging, "_enqueue_copy", device.enqueue_copy)
    ring = staging.StagingRing(device, chunk_bytes=1000, slots=2)
    ring.write(device.memory, host)
    assert len(device.events) == 6
    device.finish()
    assert np.array_equal(device.memory, host)


@pytest.mark.parametrize("staging_device", DEVICES, indirect=True)
def test_a_result_in_pinned_memory_goes_up_directly(staging_device, monkeypatch):
    device_id, device = staging_device
    monkeypatch.setattr(device, "pinned_results", True)
    monkeypatch.setattr(device, "_result_pool", None)
    staged = []
    write = staging.StagingRing.write
    monkeypatch.setattr(staging.StagingRing, "write", lambda ring, buffer, host: (staged.append(host.nbytes),
                                                                                 write(ring, buffer, host)))
    rng = np.random.default_rng(8)
    a = rng.standard_normal((600, 500)).astype(np.float32)
    b = rng.standard_normal((500, 700)).astype(np.float32)
    product = sparkle.matmul(sparkle.to_device(a, device_id), sparkle.to_device(b, device_id)).get()
    assert staging._pinned_here(device, product) and staging._pinned_here(device, product[100:])
    staged.clear()
    for host in (product, product[100:]):  # the result, and a view of it: straight from pinned memory
        assert host.nbytes >= staging.SMALLEST_STAGED_BYTES
        assert np.array_equal(transfer.upload(device, host, np.float32).get(), host)
    assert staged == []
    ordinary = product.copy()  # the same values in ordinary memory: staged
    assert np.array_equal(transfer.upload(device, ordinary, np.float32).get(), ordinary)
    assert staged == [ordinary.nbytes]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity calls on this system")
def test_a_parallel_copy_leaves_the_callers_cpu_affinity_alone():
    before = os.sched_getaffinity(0)
    source = np.arange(8 << 20, dtype=np.uint8)
    destination = np.empty_like(source)
    parallel_copy(destination, source)
    assert np.array_equal(destination, source)
    assert os.sched_getaffinity(0) == before
