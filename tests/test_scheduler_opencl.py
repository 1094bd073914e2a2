"""The scheduler with a real OpenCL device (PoCL here): calls whose operands live on the device return once
queued, so they are timed by the device's own events, read once the launches have run."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import api, reference  # noqa: E402
from sparkle.opencl import launch, transfer  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402
from sparkle.scheduler import Scheduler, executors  # noqa: E402

from _helpers import assert_close_to_reference, make_array  # noqa: E402
from _opencl import opencl_params, runtime_device, sparkle_cache  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("sparkle_cache")


@pytest.mark.parametrize("device_id", opencl_params())
def test_device_array_calls_are_timed_by_the_devices_events(device_id):
    device = runtime_device(device_id)
    rng = np.random.default_rng(0)
    x, w = make_array(rng, (2, 32, 20, 20), np.dtype(np.float32)), make_array(rng, (32, 32, 3, 3), np.dtype(np.float32))
    scheduler = Scheduler([device_id], persist=False, progress=False)
    x_dev, w_dev = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
    results = [scheduler.conv2d(x_dev, w_dev, padding=1) for _ in range(4)]  # compile, verify, fast path
    assert_close_to_reference(results[-1].get(), reference.conv2d(x, w, padding=1), np.float32)

    queued = []
    for call in range(120):
        start = time.perf_counter()
        results.append(scheduler.conv2d(x_dev, w_dev, padding=1))
        queued.append(time.perf_counter() - start)
        if call % 4 == 3:
            results[-1].get()  # the queue drains now and then: the watched launches have run
    measured = [record["measured"] for record in scheduler.history()[4:]]
    # Sampled (one launch timed TIME_EVERY calls after the last reading, its state queried every
    # LAUNCH_CHECK_EVERY calls; a review waits for its call's launch), not every call: the launches that ran
    # are recorded, the others not at all.
    spacing = executors.TIME_EVERY + 2 * executors.LAUNCH_CHECK_EVERY
    assert 120 // spacing <= len(measured) <= 120 // executors.LAUNCH_CHECK_EVERY + 2, len(measured)
    # The same kernel timed directly by its events, on the same buffers.
    spec = api.conv2d_spec(x, w, None, padding=1)
    prepared = scheduler._plans[next(iter(scheduler._plans))].prepared_call(scheduler._by_id[device_id])
    out = transfer.empty(device, spec.output_shape, np.float32)
    direct = [launch.enqueue(device, Workload.from_spec(spec), prepared.source.params, x_dev.buffer, w_dev.buffer,
                             transfer.empty(device, (1,), np.float32).buffer, out.buffer, has_bias=False,
                             relu=False).seconds for _ in range(10)]
    kernel = statistics.median(direct)
    assert 0.5 * kernel <= statistics.median(measured) <= 2.0 * kernel, (statistics.median(measured), kernel)
    # what the model learned is the device's time, not the enqueue's
    assert statistics.median(measured) > 2 * statistics.median(queued) or kernel < 2 * statistics.median(queued)


@pytest.mark.parametrize("device_id", opencl_params())
def test_an_overhead_learned_from_calls_on_numpy_data_is_not_charged_to_calls_on_device_arrays(device_id):
    """The GPU's calls on numpy data once showed 0.29 ms each beyond its profile (staging, waiting for the
    result); charged to calls whose operands are already on the GPU (20-30 us of host time) it kept them on the
    CPU, which had to download them first. Each data class has its own learned overhead."""
    from sparkle.scheduler.model import MOVING, RESIDENT

    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((1, 4, 8, 8)).astype(np.float32), rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    x_dev, w_dev = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
    scheduler = Scheduler(["cpu", device_id], persist=False, progress=False)
    scheduler.profile()

    def opencl_seconds(*operands):
        decision = scheduler.explain("conv2d", *operands, padding=1)
        return next(p.seconds for p in decision.predictions if p.device == device_id)

    resident, moving = opencl_seconds(x_dev, w_dev), opencl_seconds(x, w)
    model = scheduler._by_id[device_id].model
    model.extra_overheads[MOVING] = 0.5  # as folds of calls on numpy data would set it
    assert opencl_seconds(x_dev, w_dev) == pytest.approx(resident, rel=1e-9)
    assert opencl_seconds(x, w) == pytest.approx(moving + 0.5, rel=1e-3)
    model.extra_overheads[RESIDENT] = 0.25
    assert opencl_seconds(x_dev, w_dev) == pytest.approx(resident + 0.25, rel=1e-3)
    # and calls placed meanwhile still give the reference's values
    result = scheduler.conv2d(x_dev, w_dev, padding=1)
    assert_close_to_reference(np.asarray(result.get()), reference.conv2d(x, w, padding=1), np.float32)


@pytest.mark.parametrize("device_id", opencl_params())
def test_a_signature_on_a_device_the_scheduler_does_not_use_is_refused_without_validating_it_again(
        device_id, monkeypatch):
    from sparkle.scheduler import scheduler as scheduler_module

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((1, 4, 8, 8)).astype(np.float32), rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    x_dev, w_dev = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
    scheduler = Scheduler(["cpu"], persist=False, progress=False)
    validations = []
    real_spec = scheduler_module.api.conv2d_spec
    monkeypatch.setattr(scheduler_module.api, "conv2d_spec",
                        lambda *args, **kwargs: validations.append(1) or real_spec(*args, **kwargs))
    for _ in range(3):
        with pytest.raises(scheduler_module.UnscheduledDevice, match=rf"lives on {device_id}"):
            scheduler.conv2d(x_dev, w_dev, padding=1)
    assert len(validations) == 1
    # sparkle.conv2d runs such a call where its operands live, and bad arguments are still refused there
    assert_close_to_reference(sparkle.conv2d(x_dev, w_dev, padding=1).get(), reference.conv2d(x, w, padding=1),
                              np.float32)
    with pytest.raises(ValueError, match=r"^padding"):
        sparkle.conv2d(x_dev, w_dev, padding=-1)
