"""Several GPUs and a CPU in one host (issue 12), with simulated devices: two equal "GPUs" share a batch
evenly, a GPU loaded by another process gets a smaller slice as the scheduler learns, a GPU that fails
mid-call has its slice run elsewhere, and a split result is the single-device result bit for bit.

Simulated devices (``sparkle.scheduler.SimulatedDevice``) compute with the CPU backend, then wait out their
modelled time, so their speeds are known exactly; every result is compared with the float64 reference.
"""

import logging

import numpy as np
import pytest
from _helpers import assert_close_to_reference

from sparkle import reference
from sparkle.scheduler import Scheduler, SimulatedDevice


def simulated_gpu(name, flops_per_second=6e+08, overhead=1e-4):
    """A simulated device not computing on the host's cores (its kind is not "cpu"), so it may take a slice
    beside any other device, as a GPU does; its profile probes stay small."""
    return SimulatedDevice(name, flops_per_second, overhead)


def batch_conv(batch=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    return x, w


def make(devices, tmp_path):
    return Scheduler(devices, cache_dir=tmp_path, progress=False)


def shares(decision):
    return dict(decision.split)


def test_two_equal_gpus_share_a_batch_evenly_and_a_much_slower_device_is_left_out(tmp_path):
    slow = SimulatedDevice("slow", 2e+07, 1e-4)  # as the host's cores beside two GPUs
    scheduler = make([slow, simulated_gpu("gpu0"), simulated_gpu("gpu1")], tmp_path)
    x, w = batch_conv()
    expected = reference.conv2d(x, w, padding=1)
    for _ in range(12):
        assert_close_to_reference(scheduler.conv2d(x, w, padding=1), expected, np.float32)
    decision = scheduler.explain("conv2d", x, w, padding=1)
    assert decision.split_axis == "batch"
    assert set(shares(decision)) == {"sim:gpu0", "sim:gpu1"}  # 30x slower: a slice would finish last
    assert shares(decision)["sim:gpu0"] == pytest.approx(0.5, abs=2 / 16 + 1e-9)
    single = min(p.seconds for p in decision.predictions)
    assert decision.predicted_seconds < 0.75 * single


def test_a_gpu_loaded_by_another_process_gets_a_smaller_slice(tmp_path):
    loaded, free = simulated_gpu("loaded"), simulated_gpu("free")
    scheduler = make([loaded, free], tmp_path)
    x, w = batch_conv()
    expected = reference.conv2d(x, w, padding=1)
    for _ in range(10):
        scheduler.conv2d(x, w, padding=1)
    before = shares(scheduler.explain("conv2d", x, w, padding=1))
    assert before["sim:loaded"] == pytest.approx(0.5, abs=2 / 16 + 1e-9)
    loaded.slow_down(3)  # another process takes two thirds of it: the free one is 3x faster now
    for _ in range(30):
        assert_close_to_reference(scheduler.conv2d(x, w, padding=1), expected, np.float32)
    after = shares(scheduler.explain("conv2d", x, w, padding=1))
    assert after.get("sim:loaded", 0.0) <= 0.25 + 2 / 16 + 1e-9  # toward 1:3, to two images
    assert after["sim:free"] >= 0.75 - 2 / 16 - 1e-9


def test_a_gpu_that_fails_mid_call_has_its_slice_run_elsewhere_and_the_result_is_exact(tmp_path, caplog):
    failing, steady = simulated_gpu("failing"), simulated_gpu("steady")
    scheduler = make([failing, steady], tmp_path)
    x, w = batch_conv()
    expected = reference.conv2d(x, w, padding=1)
    for _ in range(8):
        scheduler.conv2d(x, w, padding=1)
    assert set(shares(scheduler.explain("conv2d", x, w, padding=1))) == {"sim:failing", "sim:steady"}
    failing.fail()
    with caplog.at_level(logging.WARNING, logger="sparkle.scheduler"):
        result = scheduler.conv2d(x, w, padding=1)  # the split decided before the fault was seen
    assert_close_to_reference(result, expected, np.float32)
    assert any("sim:failing failed on part" in message for message in caplog.messages)
    for _ in range(4):
        assert_close_to_reference(scheduler.conv2d(x, w, padding=1), expected, np.float32)
    decision = scheduler.explain("conv2d", x, w, padding=1)
    assert decision.device == "sim:steady" and not decision.split  # the failing GPU is avoided


@pytest.mark.parametrize("op", ["conv2d", "matmul"])
def test_a_split_result_is_the_single_device_result_bit_for_bit(tmp_path, op):
    rng = np.random.default_rng(2)
    if op == "conv2d":
        operands, kwargs = batch_conv(), {"padding": 1}
    else:
        operands, kwargs = (rng.standard_normal((256, 300)).astype(np.float32),
                            rng.standard_normal((300, 200)).astype(np.float32)), {}
    split_scheduler = make([simulated_gpu("gpu0"), simulated_gpu("gpu1")], tmp_path / "split")
    alone = make([simulated_gpu("gpu0")], tmp_path / "alone")
    call = getattr(split_scheduler, op)
    for _ in range(8):
        call(*operands, **kwargs)
    assert split_scheduler.explain(op, *operands, **kwargs).split
    split_result = call(*operands, **kwargs)
    single_result = getattr(alone, op)(*operands, **kwargs)
    assert split_result.dtype == single_result.dtype and split_result.flags.c_contiguous
    assert split_result.shape == single_result.shape
    assert np.array_equal(split_result, single_result)



@pytest.mark.boundscheck
@pytest.mark.parametrize("op", ["conv2d", "matmul"])
def test_each_part_of_a_split_writes_its_slice_of_the_result_in_place(tmp_path, monkeypatch, op):
    """The CPU's part goes straight into its slice of the result (no copy at host speed after it); a simulated
    device's part, which can only make a new array, is copied in. The split is forced half and half."""
    from sparkle.cpu import prepared as cpu_prepared
    from sparkle.scheduler import split

    rng = np.random.default_rng(3)
    if op == "conv2d":
        operands, kwargs, prepared_class = batch_conv(batch=6, seed=3), {"padding": 1}, cpu_prepared.PreparedConv2d
        expected = reference.conv2d(*operands, padding=1)
    else:
        operands, kwargs, prepared_class = ((rng.standard_normal((10, 7)).astype(np.float32),
                                             rng.standard_normal((7, 5)).astype(np.float32)), {},
                                            cpu_prepared.PreparedMatmul)
        expected = reference.matmul(*operands)
    monkeypatch.setattr(split, "plan_split", lambda scheduler, plan, predictions, best: (
        (("cpu", 0.5), ("sim:gpu", 0.5)), "batch" if op == "conv2d" else "rows", 1e-6))
    slices = []
    into = prepared_class.into

    def recording_into(self, out, *arguments):
        slices.append((out.shape[0], out.base is not None))  # a view: a slice of the whole result
        return into(self, out, *arguments)

    monkeypatch.setattr(prepared_class, "into", recording_into)
    scheduler = make(["cpu", simulated_gpu("gpu")], tmp_path)
    for _ in range(3):
        assert scheduler.explain(op, *operands, **kwargs).split == (("cpu", 0.5), ("sim:gpu", 0.5))
        result = getattr(scheduler, op)(*operands, **kwargs)
        assert result.shape == expected.shape and result.flags.c_contiguous
        assert_close_to_reference(result, expected, np.float32)
    assert slices == [(expected.shape[0] // 2, True)] * 3
