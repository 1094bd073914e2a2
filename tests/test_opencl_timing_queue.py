"""Timed launches on a queue of their own (SPARKLE_TIMING_QUEUE=separate, the default on GPUs): ordinary
commands go on a queue without profiling, launches whose device time is read go on a profiling queue spliced
into its order. Checked here on every OpenCL device (PoCL in CI) with the separate queues forced: results
that depend on each other across the two queues match the float64 reference, timed launches carry device
times, untimed ones leave the last timed launch alone."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import api, reference  # noqa: E402
from sparkle.opencl import backend, launch, runtime, transfer  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402
from sparkle.scheduler import Scheduler  # noqa: E402

from _helpers import assert_close_to_reference  # noqa: E402
from _opencl import opencl_params, runtime_device, sparkle_cache  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("sparkle_cache")


@pytest.fixture(params=opencl_params())
def device(request, monkeypatch):
    """The device with separate queues: discovery is cached by environment, so this is a fresh device object
    (its own context) for this test."""
    monkeypatch.setenv(runtime.TIMING_QUEUE_ENV, "separate")
    device = runtime_device(request.param)
    assert device.separate_timing_queue and device.queue is not device.timing_queue
    return device


def test_results_chained_across_the_two_queues_match_the_reference(device):
    """Each call reads the previous call's result; every other call is timed (on the profiling queue). A timed
    launch that did not wait for the queue's earlier work, or later work that did not wait for it, would read a
    result not yet written (pool buffers hold whatever they held before)."""
    n = 256  # a few ms per call on PoCL: long enough for a launch that does not wait to overtake it
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    prepared = backend.prepare_matmul(api.matmul_spec(a, b), device)
    b_dev = sparkle.to_device(b, device.id)
    current, expected = sparkle.to_device(a, device.id), a.astype(np.float64)
    timed = []
    for step in range(8):
        if step % 2:
            prepared.request_timing()
        before = prepared.last_launch
        current = prepared(current, b_dev)
        expected = expected @ b.astype(np.float64)
        if step % 2:
            assert prepared.last_launch is not before
            timed.append(prepared.last_launch)
        else:
            assert prepared.last_launch is before  # an untimed launch is not the last timed one
    assert_close_to_reference(current.get(), expected, np.float32)
    for first, last in timed:
        assert launch.span_seconds(first, last) > 0


def test_tuner_launches_and_uploads_keep_their_order(device):
    """launch.enqueue (the tuner's path: every launch timed) between uploads and untimed prepared calls on the
    same buffers."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 32, 48, 48)).astype(np.float32)
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32) / 17
    spec = api.conv2d_spec(x, w, None, padding=1)
    prepared = backend.prepare_conv2d(spec, device)
    w_dev = sparkle.to_device(w, device.id)
    no_bias = transfer.empty(device, (1,), np.float32)
    expected = x.astype(np.float64)
    current = sparkle.to_device(x, device.id)
    for step in range(6):
        if step % 2:
            out = transfer.empty(device, spec.output_shape, np.float32)
            span = launch.enqueue(device, Workload.from_spec(spec), prepared.params, current.buffer, w_dev.buffer,
                                  no_bias.buffer, out.buffer, has_bias=False, relu=False)
            current = out
            assert span.seconds > 0
        else:
            current = prepared(current, w_dev)
        expected = reference.conv2d(expected, w.astype(np.float64), padding=1)
    assert_close_to_reference(current.get(), expected, np.float32)


def test_a_launch_that_fails_half_enqueued_still_ends_before_the_next_command(device):
    """A timed launch whose later step fails to enqueue (split-K's reduction, say) after an earlier one was
    enqueued: the earlier kernel still ends before the queue's next command, which here reads its output."""
    n = 256
    rng = np.random.default_rng(3)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    prepared = backend.prepare_matmul(api.matmul_spec(a, b), device)
    assert prepared.build()
    variant = prepared._ready
    a_dev, b_dev = sparkle.to_device(a, device.id), sparkle.to_device(b, device.id)
    out = transfer.empty(device, (n, n), np.float32)
    buffers = (b_dev.buffer, a_dev.buffer, prepared.unused_bias.buffer, out.buffer)  # b is the kernel's image

    def fails_after_the_first_kernel(queue, after):
        variant._enqueue_steps(queue, buffers, after)
        raise RuntimeError("the next step could not be enqueued")

    with pytest.raises(RuntimeError, match="could not be enqueued"):
        device.timed(fails_after_the_first_kernel)
    assert_close_to_reference(out.get(), a.astype(np.float64) @ b.astype(np.float64), np.float32)


def test_scheduler_samples_device_times_from_the_timing_queue(device):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 32, 20, 20)).astype(np.float32)
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    scheduler = Scheduler([device.id], persist=False, progress=False)
    x_dev, w_dev = sparkle.to_device(x, device.id), sparkle.to_device(w, device.id)
    results = []
    for call in range(80):
        results.append(scheduler.conv2d(x_dev, w_dev, padding=1))
        if call % 4 == 3:
            results[-1].get()  # the queue drains now and then: the timed launches have run
    measured = [record["measured"] for record in scheduler.history()]
    assert len(measured) >= 5 and min(measured) > 0
    expected = reference.conv2d(x, w, padding=1)
    for result in results[-3:]:
        assert_close_to_reference(result.get(), expected, np.float32)


def test_a_bad_timing_queue_setting_is_refused(monkeypatch):
    monkeypatch.setenv(runtime.TIMING_QUEUE_ENV, "sometimes")
    with pytest.raises(ValueError, match="SPARKLE_TIMING_QUEUE must be one of .*'sometimes'"):
        runtime._timing_queue_mode("gpu")
    monkeypatch.setenv(runtime.TIMING_QUEUE_ENV, "Shared ")
    assert runtime._timing_queue_mode("gpu") == "shared"
    monkeypatch.delenv(runtime.TIMING_QUEUE_ENV)
    assert runtime._timing_queue_mode("gpu") == "separate" and runtime._timing_queue_mode("cpu") == "shared"
