"""The scheduler (sparkle.Scheduler): placement, splits, learning, verification, faults, explain, persistence.

Simulated devices (``sparkle.SimulatedDevice``) compute with the CPU backend and then wait until their
modelled time has passed, so their speeds are known exactly and the scheduler's choices can be checked
against the truth. Their rates here (0.01-0.8 GFLOPS) keep the CPU work inside them a small part of
their time even on a loaded machine. Every result is compared with the float64 reference.
"""

import json
import logging
import math
import sys
import threading
import time

import numpy as np
import pytest
from _helpers import assert_close_to_reference

import sparkle
from sparkle import reference
from sparkle.scheduler import Scheduler, SimulatedDevice, builds, reviews
from sparkle.scheduler import scheduler as scheduler_module
from sparkle.scheduler import verify as verify_module
from sparkle.scheduler.model import REGIME_STREAK, History, ShapeModel
from sparkle.scheduler.profile import PROFILE_VERSION
from sparkle.scheduler.store import MODEL_VERSION


def conv_inputs(batch=8, channels=16, size=16, out_channels=16, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, size, size)).astype(dtype)
    w = rng.standard_normal((out_channels, channels, 3, 3)).astype(dtype)
    return x, w


def make(devices, tmp_path, **kwargs):
    kwargs.setdefault("progress", False)
    return Scheduler(devices, cache_dir=tmp_path, **kwargs)


def single_device_conv(seed=0):
    """A call the scheduler cannot split (N = 1, groups > 1): it must pick one device."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    return x, w, dict(padding=1, groups=2)


# --- placement and learning ---------------------------------------------------------------------------


def test_the_faster_device_wins_a_call_that_cannot_split(tmp_path):
    fast, slow = SimulatedDevice("fast", 4e+08, 2e-4), SimulatedDevice("slow", 1e+08, 2e-4)
    scheduler = make([slow, fast], tmp_path)
    scheduler.profile()
    probes = slow.calls
    x, w, kwargs = single_device_conv()
    expected = reference.conv2d(x, w, **kwargs)
    for _ in range(12):
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    decision = scheduler.explain("conv2d", x, w, **kwargs)
    assert decision.device == "sim:fast" and not decision.split
    assert slow.calls - probes <= 2  # at most a bounded exploration
    assert "sim:slow" in decision.reason


def test_split_ratio_converges_to_the_speed_ratio(tmp_path):
    a, b = SimulatedDevice("a", 6e+08, 1e-4), SimulatedDevice("b", 2e+08, 1e-4)
    scheduler = make([a, b], tmp_path)
    x, w = conv_inputs(batch=16, size=24)
    expected = reference.conv2d(x, w, padding=1)
    for _ in range(20):
        assert_close_to_reference(scheduler.conv2d(x, w, padding=1), expected, np.float32)
    decision = scheduler.explain("conv2d", x, w, padding=1)
    assert decision.split_axis == "batch"
    shares = dict(decision.split)
    assert shares["sim:a"] == pytest.approx(0.75, abs=1 / 16 + 1e-9)  # the speed ratio 3:1, to one image
    single = min(p.seconds for p in decision.predictions)
    assert decision.predicted_seconds < 0.85 * single


def test_matmul_splits_by_rows_in_proportion(tmp_path):
    scheduler = make([SimulatedDevice("a", 3e+08, 1e-4), SimulatedDevice("b", 3e+08, 1e-4)], tmp_path)
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((256, 384)).astype(np.float32), rng.standard_normal((384, 256)).astype(np.float32)
    for _ in range(10):
        assert_close_to_reference(scheduler.matmul(a, b), reference.matmul(a, b), np.float32)
    decision = scheduler.explain("matmul", a, b)
    assert decision.split_axis == "rows"
    assert dict(decision.split)["sim:a"] == pytest.approx(0.5, abs=0.1)


def test_devices_computing_on_the_host_cores_never_split_a_call_between_them(tmp_path):
    a, b = SimulatedDevice("a", 3e+08, 1e-4), SimulatedDevice("b", 3e+08, 1e-4)
    a.kind = b.kind = "cpu"  # as the CPU backend and an OpenCL CPU driver (PoCL): the same cores
    scheduler = make([a, b], tmp_path)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((256, 384)).astype(np.float32), rng.standard_normal((384, 256)).astype(np.float32)
    for _ in range(10):
        assert_close_to_reference(scheduler.matmul(x, y), reference.matmul(x, y), np.float32)
    assert not scheduler.explain("matmul", x, y).split


def test_a_device_that_slows_down_is_avoided(tmp_path):
    slowing = SimulatedDevice("slowing", 4e+08, 2e-4)
    steady = SimulatedDevice("steady", 1.5e+08, 2e-4)
    scheduler = make([slowing, steady], tmp_path)
    x, w, kwargs = single_device_conv()
    expected = reference.conv2d(x, w, **kwargs)
    for _ in range(6):
        scheduler.conv2d(x, w, **kwargs)
    assert scheduler.explain("conv2d", x, w, **kwargs).device == "sim:slowing"
    slowing.slow_down(30)
    for _ in range(20):
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    assert scheduler.explain("conv2d", x, w, **kwargs).device == "sim:steady"
    assert [record["device"] for record in scheduler.history()[-5:]] == ["sim:steady"] * 5


def test_a_device_that_starts_failing_is_avoided_and_no_call_fails(tmp_path, caplog):
    failing = SimulatedDevice("failing", 4e+08, 2e-4)
    steady = SimulatedDevice("steady", 1.5e+08, 2e-4)
    scheduler = make([failing, steady], tmp_path)
    x, w, kwargs = single_device_conv()
    expected = reference.conv2d(x, w, **kwargs)
    with caplog.at_level(logging.WARNING, logger="sparkle.scheduler"):
        for call in range(20):
            if call == 8:
                assert scheduler.explain("conv2d", x, w, **kwargs).device == "sim:failing"
                failing.fail()
            assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    assert any("sim:failing failed" in message for message in caplog.messages)
    decision = scheduler.explain("conv2d", x, w, **kwargs)
    assert decision.device == "sim:steady"
    failing_prediction = next(p for p in decision.predictions if p.device == "sim:failing")
    assert not failing_prediction.usable and "fault" in failing_prediction.note


def test_exploration_is_bounded(tmp_path):
    """A device predicted much slower is tried at most a few times per signature (here: never, since
    it is slower with near certainty after its profile)."""
    slow = SimulatedDevice("slow", 2e+07, 2e-4)
    scheduler = make([SimulatedDevice("fast", 4e+08, 2e-4), slow], tmp_path)
    x, w, kwargs = single_device_conv()
    scheduler.profile()
    probes = slow.calls
    for _ in range(30):
        scheduler.conv2d(x, w, **kwargs)
    assert slow.calls - probes <= 2


def count_decisions(scheduler, monkeypatch):
    """A list that grows by one each time ``scheduler`` decides a plan again (a review)."""
    decided = []
    decide = scheduler._decide

    def counting(plan):
        decided.append(plan.shape_text)
        decide(plan)

    monkeypatch.setattr(scheduler, "_decide", counting)
    return decided


def test_a_first_call_that_confirms_its_decision_arms_the_fast_path_without_another_review(tmp_path, monkeypatch):
    x, w, kwargs = single_device_conv()
    make([SimulatedDevice("warm", 4e+08, 2e-4)], tmp_path / "warm").conv2d(x, w, **kwargs)  # JIT-compiled now
    fast, slow = SimulatedDevice("fast", 4e+08, 2e-4), SimulatedDevice("slow", 2e+07, 2e-4)
    scheduler = make([fast, slow], tmp_path)
    scheduler.profile()
    decided = count_decisions(scheduler, monkeypatch)
    expected = reference.conv2d(x, w, **kwargs)
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    assert len(decided) == 1
    key = next(iter(scheduler._plans))
    assert scheduler._plans[key].runner is not None  # verified and as fast as predicted: armed at once
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    assert len(decided) == 1


def test_a_first_call_slower_than_another_device_is_predicted_is_decided_again(tmp_path, monkeypatch):
    x, w, kwargs = single_device_conv()
    make([SimulatedDevice("warm", 4e+08, 2e-4)], tmp_path / "warm").conv2d(x, w, **kwargs)  # JIT-compiled now
    stalling = SimulatedDevice("stalling", 4e+08, 2e-4)
    scheduler = make([stalling, SimulatedDevice("other", 3e+08, 2e-4)], tmp_path, explore=False)
    scheduler.profile()
    decided = count_decisions(scheduler, monkeypatch)
    stalling.slow_down(1.8)  # its first call is a sample (< 2x its prediction), slower than the other's prediction
    scheduler.conv2d(x, w, **kwargs)
    scheduler.conv2d(x, w, **kwargs)
    assert len(decided) == 2


def test_a_fast_path_slower_than_another_device_is_predicted_is_decided_again(tmp_path, monkeypatch):
    """Reviews far apart: calls on the chosen device that typically take longer than the other device is predicted
    to take question the decision at once (a 1.8x slowdown is no outlier for a history of two calls)."""
    x, w, kwargs = single_device_conv()
    make([SimulatedDevice("warm", 4e+08, 2e-4)], tmp_path / "warm").conv2d(x, w, **kwargs)  # JIT-compiled now
    slowing = SimulatedDevice("slowing", 4e+08, 2e-4)
    scheduler = make([slowing, SimulatedDevice("other", 3e+08, 2e-4)], tmp_path, explore=False)
    scheduler.profile()
    monkeypatch.setattr(reviews, "spacing", lambda calls, decision, review_seconds: 1000)
    decided = count_decisions(scheduler, monkeypatch)
    scheduler.conv2d(x, w, **kwargs)
    assert scheduler.history(1)[0]["device"] == "sim:slowing" and len(decided) == 1  # confirmed: fast path armed
    slowing.slow_down(1.8)
    devices = []
    for _ in range(6):
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), reference.conv2d(x, w, **kwargs), np.float32)
        devices.append(scheduler.history(1)[0]["device"])
    assert devices[:2] == ["sim:slowing"] * 2  # one slow call among two is no evidence yet (the faster counts)
    assert devices[-2:] == ["sim:other"] * 2, devices
    assert len(decided) <= 4


def test_one_stalled_call_does_not_drive_a_signature_off_its_device(tmp_path):
    """A new signature's first measured call stalls (30x: another process took the core) on a device whose
    speed the model knows from other shapes: the device is tried again rather than abandoned on that call."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    kwargs = dict(padding=1, groups=2)
    known = [rng.standard_normal((1, 16, size, size)).astype(np.float32) for size in (16, 20, 28, 32)]
    x = rng.standard_normal((1, 16, 24, 24)).astype(np.float32)
    make([SimulatedDevice("warm", 4e+08, 2e-4)], tmp_path / "warm").conv2d(x, w, **kwargs)  # JIT-compiled now
    fast = SimulatedDevice("fast", 4e+08, 2e-4, first_call_seconds=0.05)
    scheduler = make([fast, SimulatedDevice("other", 1.5e+08, 2e-4)], tmp_path)
    scheduler.profile()
    for _ in range(4):
        for other_shape in known:
            scheduler.conv2d(other_shape, w, **kwargs)
    scheduler.conv2d(x, w, **kwargs)  # its one-time cost makes the first call no sample
    fast.slow_down(30.0)
    scheduler.conv2d(x, w, **kwargs)
    fast.slow_down(1.0)
    devices = []
    for _ in range(12):
        scheduler.conv2d(x, w, **kwargs)
        devices.append(scheduler.history(1)[0]["device"])
    assert devices[-6:] == ["sim:fast"] * 6, devices


def test_reviews_are_spaced_so_they_cost_a_small_share_of_the_calls_between_them():
    from sparkle.scheduler.explain import Decision

    def decision(seconds):
        return Decision(op="conv2d", shape="s", device="cpu", split=(), predicted_seconds=seconds,
                        predictions=(), confidence=0.5, verified=True, explored=False, reason="")

    review = 150e-6
    for seconds in (20e-6, 50e-6, 300e-6, 2e-3):
        spacing = reviews.spacing(10, decision(seconds), review)
        assert review <= reviews.COST_SHARE * spacing * seconds or \
            spacing == reviews.LONGEST_INTERVAL
    assert reviews.spacing(10, decision(50e-3), review) == 10  # long calls: geometric
    assert reviews.spacing(10, decision(float("nan")), review) == 10


def test_trials_learn_what_a_first_call_costs_beyond_its_prediction(tmp_path):
    """A device 20 % slower than the other, which loads each kernel on its first call (10 ms, as a GPU loads
    a module): once a trial shows that surcharge, new signatures are no longer tried there for the small saving
    they promise. (Without the surcharge: 10 trials here, until the exploration budget ran out.)"""
    loader = SimulatedDevice("loader", 1.6e+08, 2e-4, first_call_seconds=0.01)
    scheduler = make([SimulatedDevice("steady", 2e+08, 2e-4), loader], tmp_path)
    scheduler.profile()
    probes = loader.calls
    rng = np.random.default_rng(3)
    for size in range(8, 24):  # 16 signatures, none splittable (N = 1, groups = 2), each called 6 times
        x = rng.standard_normal((1, 16, size, size)).astype(np.float32)
        w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
        for _ in range(6):
            scheduler.conv2d(x, w, padding=1, groups=2)
    state = scheduler._by_id["sim:loader"]
    assert state.trial.measured >= 1 and state.trial.seconds > 0.005
    assert loader.calls - probes <= 3


def test_a_device_faster_than_its_profile_is_tried_on_a_signature_called_often_and_then_used(tmp_path):
    surprising = SimulatedDevice("surprising", 1e+08, 1e-4)
    scheduler = make([SimulatedDevice("steady", 2e+08, 1e-4), surprising], tmp_path)
    scheduler.profile()
    surprising.slow_down(0.1)  # from now on 10x faster than it profiled: 5x faster than the other device
    x, w, kwargs = single_device_conv()
    expected = reference.conv2d(x, w, **kwargs)
    assert scheduler.explain("conv2d", x, w, **kwargs).device == "sim:steady"
    for _ in range(60):
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    assert scheduler.explain("conv2d", x, w, **kwargs).device == "sim:surprising"
    assert scheduler.history()[-1]["device"] == "sim:surprising"


def test_prediction_improves_with_measurements(tmp_path):
    # Slow enough that its modelled time (53 ms), not the CPU work inside it (~0.2 ms), sets its speed.
    device = SimulatedDevice("only", 2.5e+07, 1e-4)
    scheduler = make([device], tmp_path)
    x, w, kwargs = single_device_conv()
    for _ in range(10):
        scheduler.conv2d(x, w, **kwargs)
    truth = 1e-4 + 2 * 16 * 24 * 24 * 8 * 9 / 0.025e9  # the simulated device's model
    predicted = scheduler.explain("conv2d", x, w, **kwargs).predicted_seconds
    assert predicted == pytest.approx(truth, rel=0.25)


# --- run-time verification ------------------------------------------------------------------------------


def test_a_planted_wrong_kernel_is_caught_quarantined_and_never_returned(tmp_path, caplog):
    wrong = SimulatedDevice("wrong", 8e+08, 1e-4, wrong="conv2d")
    right = SimulatedDevice("right", 1e+08, 1e-4)
    scheduler = make([wrong, right], tmp_path)
    x, w, kwargs = single_device_conv()
    expected = reference.conv2d(x, w, **kwargs)
    with caplog.at_level(logging.WARNING, logger="sparkle.scheduler"):
        for _ in range(8):
            assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    assert any("quarantined" in message for message in caplog.messages)
    decision = scheduler.explain("conv2d", x, w, **kwargs)
    assert decision.device == "sim:right"
    wrong_prediction = next(p for p in decision.predictions if p.device == "sim:wrong")
    assert not wrong_prediction.usable and "quarantined" in wrong_prediction.note
    stored = json.loads((tmp_path / "scheduler-quarantine-v1.json").read_text())
    assert any("planted-wrong" in key for entries in stored.values() for key in entries)
    # A new scheduler on the same cache directory remembers the quarantine.
    again = make([SimulatedDevice("wrong", 8e+08, 1e-4, wrong="conv2d"), SimulatedDevice("right", 1e+08, 1e-4)], tmp_path)
    assert again.explain("conv2d", x, w, **kwargs).device == "sim:right"


def test_without_verification_the_planted_kernel_would_be_returned(tmp_path):
    """The check above is what stops it: with verify="off" the wrong result goes through."""
    scheduler = make([SimulatedDevice("wrong", 8e+08, 1e-4, wrong="conv2d")], tmp_path, verify="off")
    x, w, kwargs = single_device_conv()
    result = scheduler.conv2d(x, w, **kwargs)
    assert not np.allclose(result, reference.conv2d(x, w, **kwargs), rtol=1e-3, atol=1e-3)


def test_verification_samples_every_corner(tmp_path):
    """A bug confined to one edge of the output (here the last column) is inside every sample."""
    rng = np.random.default_rng(0)
    points = verify_module.sample_points((2, 3, 5, 7), rng)
    corners = {(n, k, h, w) for n in (0, 1) for k in (0, 2) for h in (0, 4) for w in (0, 6)}
    assert corners <= {tuple(p) for p in points}


@pytest.mark.parametrize("mode, checks", [("first", 1), ("always", 6), ("off", 0)])
def test_verify_modes(tmp_path, monkeypatch, mode, checks):
    scheduler = make([SimulatedDevice("only", 2e+08, 1e-4)], tmp_path, verify=mode)
    scheduler.profile()  # the profile's probes are checked too: not counted here
    counted = []
    original = verify_module.check
    monkeypatch.setattr(verify_module, "check", lambda *args: counted.append(1) or original(*args))
    x, w, kwargs = single_device_conv()
    for _ in range(6):
        scheduler.conv2d(x, w, **kwargs)
    assert len(counted) == checks


def test_verify_mode_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLE_VERIFY", "off")
    assert make([SimulatedDevice("only", 2e+08)], tmp_path).verify_mode == "off"
    monkeypatch.setenv("SPARKLE_VERIFY", "sometimes")
    with pytest.raises(ValueError, match=r"^verify must be one of .*SPARKLE_VERIFY.*'sometimes'"):
        make([SimulatedDevice("only", 2e+08)], tmp_path)
    monkeypatch.delenv("SPARKLE_VERIFY")
    with pytest.raises(ValueError, match=r"^verify must be one of"):
        make([SimulatedDevice("only", 2e+08)], tmp_path, verify=True)


# --- forcing, logging, explain, history, reset ----------------------------------------------------------


def test_sparkle_device_forces_one_device(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLE_DEVICE", "sim:slow")
    scheduler = make([SimulatedDevice("fast", 8e+08), SimulatedDevice("slow", 1e+08)], tmp_path)
    x, w, kwargs = single_device_conv()
    for _ in range(3):
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), reference.conv2d(x, w, **kwargs), np.float32)
    decision = scheduler.explain("conv2d", x, w, **kwargs)
    assert decision.device == "sim:slow" and decision.forced and "SPARKLE_DEVICE" in decision.reason
    assert {record["device"] for record in scheduler.history()} == {"sim:slow"}
    monkeypatch.setenv("SPARKLE_DEVICE", "gpu:7")
    with pytest.raises(ValueError, match=r"SPARKLE_DEVICE must be one of .*'gpu:7'"):
        make([SimulatedDevice("fast", 8e+08)], tmp_path)


def test_sparkle_log_decisions(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPARKLE_LOG", "decisions")
    scheduler = make([SimulatedDevice("only", 2e+08)], tmp_path)
    x, w, kwargs = single_device_conv()
    with caplog.at_level(logging.INFO, logger="sparkle.scheduler"):
        for _ in range(3):
            scheduler.conv2d(x, w, **kwargs)
    lines = [r.getMessage() for r in caplog.records if r.name == "sparkle.scheduler" and r.levelno == logging.INFO]
    assert len(lines) == 3 and all("conv2d" in line and "sim:only" in line for line in lines)


def test_explain_runs_nothing_and_breaks_the_time_down(tmp_path):
    devices = [SimulatedDevice("a", 4e+08, 1e-4, transfer_bytes_per_second=2e9), SimulatedDevice("b", 1e+08, 1e-4)]
    scheduler = make(devices, tmp_path)
    scheduler.profile()
    calls = [d.calls for d in devices]
    x, w, kwargs = single_device_conv()
    decision = scheduler.explain("conv2d", x, w, **kwargs)
    assert [d.calls for d in devices] == calls
    assert {p.device for p in decision.predictions} == {"sim:a", "sim:b"}
    for p in decision.predictions:
        assert p.seconds == pytest.approx(p.transfer + p.compute + p.overhead + p.compile, rel=1e-9)
        assert math.isfinite(p.spread) and p.spread > 0
    assert 0.5 <= decision.confidence <= 1.0
    assert decision.reason and decision.shape in decision.summary()
    text = str(decision)
    assert "sim:a" in text and "sim:b" in text and "transfer" in text and "compile" in text
    with pytest.raises(ValueError, match=r"^op must be 'conv2d' or 'matmul', got 'conv3d'"):
        scheduler.explain("conv3d", x, w)


def test_history_records_each_measured_call(tmp_path):
    # calls of 0.3 ms and more are each timed (faster ones are sampled: the next test)
    scheduler = make([SimulatedDevice("only", 2e+08, 3e-4)], tmp_path)
    x, w, kwargs = single_device_conv()
    a = np.ones((8, 8), np.float32)
    for _ in range(3):
        scheduler.conv2d(x, w, **kwargs)
        scheduler.matmul(a, a)
    records = scheduler.history()
    assert [r["op"] for r in records] == ["conv2d", "matmul"] * 3
    assert all(r["device"] == "sim:only" and r["measured"] > 0 for r in records)
    assert all(math.isfinite(r["predicted"]) for r in records[2:])
    assert "16x24x24" in records[0]["shape"]


def test_small_calls_are_timed_one_in_a_stride_and_a_slowdown_is_still_seen(tmp_path):
    """Past its first SAMPLE_AFTER_CALLS calls, the fast path times and records one small call in
    ``plan.sample_every`` (its bookkeeping would cost 40 % of a 12 us call), a record standing for the calls since
    the last; every call still runs right and counts, and a device that slows down is left as soon."""
    # 40 us calls (sampled) against 2 ms ones: a loaded host's stalls do not make the fast device look slower
    fast, spare = SimulatedDevice("fast", 1e+09, 40e-6), SimulatedDevice("spare", 1e+09, 2e-3)
    scheduler = make([fast, spare], tmp_path, explore=False)  # no trials: every call goes where the model says
    a = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    expected = reference.matmul(a, a)
    for _ in range(reviews.SAMPLE_AFTER_CALLS):  # decided, verified, on the fast path: every call recorded
        assert_close_to_reference(scheduler.matmul(a, a), expected, np.float32)
    assert len(scheduler.history()) == reviews.SAMPLE_AFTER_CALLS
    assert all(record["calls"] == 1 for record in scheduler.history())
    plan = scheduler._plans[next(key for key in scheduler._plans if key[0] == "matmul")]
    assert plan.runner is not None and plan.sample_every == reviews.sample_stride(plan.predicted) >= 2
    most = reviews.SAMPLE_EVERY_MAX  # a review re-arms the plan: its stride follows the new prediction
    calls_before, records_before, fast_calls_before = plan.calls, len(scheduler.history()), fast.calls
    for _ in range(10 * most):
        assert_close_to_reference(scheduler.matmul(a, a), expected, np.float32)
    assert fast.calls - fast_calls_before == 10 * most  # all ran there
    records = scheduler.history()[records_before:]
    assert 8 <= len(records) <= 10 * most // 2 + 2  # sampled: a stride of 2 to SAMPLE_EVERY_MAX
    assert {r["device"] for r in records} == {"sim:fast"} and all(1 <= r["calls"] <= most for r in records)
    # Every call is counted (reviews are spaced in calls) but the untimed ones since the last timed call; the
    # records stand for as many calls
    assert 10 * most - 2 * most <= plan.calls - calls_before <= 10 * most
    assert 10 * most - 2 * most <= sum(r["calls"] for r in records) <= 10 * most
    stride = plan.sample_every
    fast.slow_down(10000.0)  # 1 us of compute -> 10 ms: slower than the spare's 2 ms
    calls_to_leave = None
    for call in range(1, 20 * most):
        spare_calls_before = spare.calls
        assert_close_to_reference(scheduler.matmul(a, a), expected, np.float32)
        if spare.calls > spare_calls_before:
            calls_to_leave = call
            break
    # REGIME_STREAK timed calls in a row were outliers: as many timed calls as when every call is timed
    assert calls_to_leave is not None and calls_to_leave <= (REGIME_STREAK + 1) * stride + 2, (calls_to_leave, stride)
    spare_calls_before = spare.calls
    for _ in range(20):
        assert_close_to_reference(scheduler.matmul(a, a), expected, np.float32)
    assert spare.calls - spare_calls_before == 20, "the slowed device kept calls"


def test_reset_forgets_what_was_learned(tmp_path):
    scheduler = make([SimulatedDevice("wrong", 8e+08, wrong="conv2d"), SimulatedDevice("right", 1e+08)], tmp_path)
    x, w, kwargs = single_device_conv()
    for _ in range(3):
        scheduler.conv2d(x, w, **kwargs)
    scheduler.reset()
    assert scheduler.history() == []
    prediction = next(p for p in scheduler.explain("conv2d", x, w, **kwargs).predictions if p.device == "sim:wrong")
    assert prediction.usable and prediction.measured_calls == 0


def test_bad_arguments_are_reported_as_by_sparkle_conv2d(tmp_path):
    scheduler = make([SimulatedDevice("only", 2e+08)], tmp_path)
    x, w = conv_inputs()
    with pytest.raises(ValueError, match=r"^padding must be non-negative"):
        scheduler.conv2d(x, w, padding=-1)
    with pytest.raises(TypeError, match=r"^x must be a numpy.ndarray"):
        scheduler.conv2d([[1.0]], w)
    with pytest.raises(ValueError, match=r"^a.shape\[1\] must equal b.shape\[0\]"):
        scheduler.matmul(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"^devices must not repeat a device"):
        make([SimulatedDevice("x", 1e+08), SimulatedDevice("x", 1e+08)], tmp_path)
    with pytest.raises(ValueError, match=r"^devices must name at least one device"):
        make([], tmp_path)


# --- the model ------------------------------------------------------------------------------------------


def test_one_outlier_barely_moves_a_history_and_a_new_regime_restarts_it():
    history = History()
    for _ in range(20):
        history.add(math.log(1e-3))
    history.add(math.log(50e-3))  # another process took the core once
    assert math.exp(history.mean) == pytest.approx(1e-3, rel=0.15)
    changed = [history.add(math.log(20e-3)) for _ in range(4)]  # the device slowed down 20x
    assert any(changed) and math.exp(history.mean) == pytest.approx(20e-3, rel=0.01)


def test_a_history_of_few_calls_is_not_dragged_by_one_stalled_call():
    history = History()
    for seconds in (1e-3, 1.1e-3, 60e-3, 0.9e-3, 1e-3):  # the third call waited for a descheduled core
        history.add(math.log(seconds))
    assert math.exp(history.typical) == pytest.approx(1e-3, rel=0.1)
    assert History.from_json(history.to_json()).typical == history.typical


def _matmul_point(m, n, k):
    return (math.log(m), math.log(n), math.log(k), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_the_shape_model_interpolates_between_measured_shapes_and_falls_back_to_the_prior_far_away():
    model = ShapeModel()
    assert model.predict(_matmul_point(64, 64, 64)) == (0.0, pytest.approx(0.5))  # nothing measured: the prior
    # The device runs 4x slower than its profile on small GEMMs, at the profiled speed on large ones.
    for size in (16, 24, 32, 48, 64, 96, 128, 256, 512, 1024):
        truth = math.log(4.0) * max(0.0, 1.0 - math.log(size / 16) / math.log(128 / 16))
        model.observe(f"{size}", _matmul_point(size, size, size), truth, 0.03 ** 2)
    for size, truth in ((40, 4.0 ** (1 - math.log(40 / 16) / math.log(8))), (384, 1.0), (768, 1.0)):
        mean, variance = model.predict(_matmul_point(size, size, size))
        assert math.exp(mean) == pytest.approx(truth, rel=0.2)
        assert variance < 0.05
    _, far_variance = model.predict((10.0, 0.0, 10.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0))
    assert far_variance > 0.2  # nothing measured near: uncertain again


def test_the_shape_model_predicts_a_point_from_the_others_alone_as_a_refit_without_it_would():
    rng = np.random.default_rng(3)
    points = {f"s{i}": (tuple(rng.uniform(0, 4, 3)), float(rng.normal(0, 0.5)), 0.01 + 0.05 * i) for i in range(12)}
    model = ShapeModel(points)
    model.predict(points["s0"][0])  # fit, hyperparameters chosen
    for key in ("s0", "s5", "s11"):
        others = ShapeModel({k: v for k, v in points.items() if k != key})
        others.hyperparameters, others._selected_at = model.hyperparameters, len(points)  # the same kernel
        mean, variance = model.predict(points[key][0], excluding=key)
        expected_mean, expected_variance = others.predict(points[key][0])
        assert mean == pytest.approx(expected_mean, abs=1e-9)
        assert variance == pytest.approx(expected_variance, rel=1e-6)
        assert model.predict(points[key][0], excluding="not a point") == model.predict(points[key][0])


def test_one_or_two_calls_far_slower_than_a_confident_model_are_weighed_as_a_possible_stall():
    from sparkle.scheduler import policy
    from sparkle.scheduler.features import CallFeatures
    from sparkle.scheduler.profile import DeviceProfile

    profile = DeviceProfile("d", "d", 100.0, 1e-5, math.inf, math.inf, 0.0, 0.0, 0.0, 0.0)
    features = CallFeatures("matmul", 2 * 256 ** 3, (1 << 18, 1 << 18), 1 << 18, (256, 256, 256), "gemm", "float32")

    class ConfidentModel:  # the other shapes say: the prior is right, to within +-10 %
        def predict(self, point, excluding=None):
            return 0.0, 0.01

    def predicted(calls, seconds):
        history = History()
        for _ in range(calls):
            history.add(math.log(seconds))
        return policy.predict("d", profile, ConfidentModel(), history, features, 0.0, True, True)

    expected = 1e-5 + features.flops / 100e9
    one = predicted(1, 30 * expected)  # one call took 30x the model's time
    assert one.seconds < 2 * expected and one.spread > 1.0  # held as likely a stall, and uncertain
    many = predicted(4, 30 * expected)  # four calls agree: the model is wrong for this shape
    assert many.seconds > 5 * expected
    close = predicted(1, 1.3 * expected)  # within what the model allows: simply weighed in
    assert expected < close.seconds < 1.3 * expected and close.spread < 0.2


def test_a_per_call_overhead_the_profile_missed_is_learned_and_large_calls_keep_the_prior():
    """Small calls each take 0.2 ms more than the profile's overhead says (a host woken after idle): the device
    learns that as an additive overhead, so their shape-model residuals stay near zero and a large call far from
    them is predicted from the prior, not from an offset that the small calls pushed up."""
    from sparkle.scheduler import policy
    from sparkle.scheduler.features import CallFeatures
    from sparkle.scheduler.model import DeviceModel
    from sparkle.scheduler.profile import DeviceProfile

    profile = DeviceProfile("d", "d", 100.0, 4e-6, math.inf, math.inf, 0.0, 0.0, 0.0, 0.0)  # 100 GFLOPS, 4 us
    stream_overhead = 2e-4

    def matmul_features(m, n, k):
        return CallFeatures("matmul", 2 * m * n * k, (4 * m * k, 4 * k * n), 4 * m * n, (m, n, k), "gemm", "float32")

    def fold(model, m, n, k):
        features = matmul_features(m, n, k)
        fixed, compute, point = policy.prior(profile, features, 0.0)
        truth = fixed + stream_overhead + compute
        model.observe_fold("matmul", f"{m}x{n}x{k}", point, math.log(truth), fixed, compute, 0.01)

    def predicted(model, m, n, k):
        return policy.predict("d", profile, model.shape_model("matmul"), None, matmul_features(m, n, k), 0.0, True,
                              True, extra_overhead=model.extra_overhead(0.0)).seconds

    learned = DeviceModel()
    for size in (8, 12, 16, 24, 32, 48, 64, 96):
        fold(learned, size, size, size)
    assert learned.extra_overhead(0.0) == pytest.approx(stream_overhead, rel=0.01)
    residuals = [residual for _, residual, _ in learned.shape_model("matmul").points.values()]
    assert max(abs(r) for r in residuals) < 0.01  # the shape model has nothing left to explain
    large = 1024
    truth = 4e-6 + stream_overhead + 2 * large ** 3 / 100e9
    assert predicted(learned, large, large, large) == pytest.approx(truth, rel=0.1)
    # The points are made again with the overhead it has now, whichever order the evidence came in.
    restored = DeviceModel.from_json(json.loads(json.dumps(learned.to_json())))
    assert restored.extra_overheads == learned.extra_overheads and restored.folds == learned.folds
    assert predicted(restored, large, large, large) == pytest.approx(predicted(learned, large, large, large))


def test_each_data_class_learns_its_own_per_call_overhead():
    """Calls that move data (numpy operands on a GPU) and calls that move none (device arrays there, numpy on the
    CPU) pay different per-call costs beyond the profile: each class learns its own, and a signature that changes
    class leaves the other's evidence."""
    from sparkle.scheduler import policy
    from sparkle.scheduler.features import CallFeatures
    from sparkle.scheduler.model import MOVING, RESIDENT, DeviceModel
    from sparkle.scheduler.profile import DeviceProfile

    profile = DeviceProfile("d", "d", 100.0, 4e-6, 1e9, 1e9, 1e-5, 1e-5, 0.0, 0.0)

    def fold(model, size, transfer, extra):
        features = CallFeatures("matmul", 2 * size ** 3, (4 * size * size,) * 2, 4 * size * size, (size,) * 3,
                                "gemm", "float32")
        fixed, compute, point = policy.prior(profile, features, transfer)
        model.observe_fold("matmul", f"{size}|{transfer}", point, math.log(fixed + extra + compute), fixed, compute,
                           0.01, transfer)

    model = DeviceModel()
    for size in (8, 12, 16, 24, 32):
        fold(model, size, 3e-5, 3e-4)  # on numpy data: 0.3 ms more than the profile says
    assert model.extra_overhead(3e-5) == pytest.approx(3e-4, rel=0.01) and model.extra_overheads[MOVING] > 0
    assert model.extra_overhead(0.0) == 0.0
    for size in (8, 12, 16):
        fold(model, size, 0.0, 5e-6)  # on device arrays: 5 us more
    assert model.extra_overhead(0.0) == pytest.approx(5e-6, rel=0.01)
    assert model.extra_overhead(3e-5) == pytest.approx(3e-4, rel=0.01)
    residuals = [residual for _, residual, _ in model.shape_model("matmul").points.values()]
    assert max(abs(r) for r in residuals) < 0.01  # each point measured against its own class's overhead
    restored = DeviceModel.from_json(json.loads(json.dumps(model.to_json())))
    assert restored.extra_overheads == model.extra_overheads and restored.folds == model.folds
    assert restored.overheads[RESIDENT] == model.overheads[RESIDENT]


def test_the_shape_model_keeps_the_latest_point_of_a_signature_and_a_bounded_number_of_points():
    model = ShapeModel()
    model.observe("a", _matmul_point(64, 64, 64), math.log(2.0), 0.01)
    model.observe("a", _matmul_point(64, 64, 64), math.log(3.0), 0.01)
    assert math.exp(model.predict(_matmul_point(64, 64, 64))[0]) == pytest.approx(3.0, rel=0.05)
    for index in range(300):
        model.observe(str(index), _matmul_point(8 + index, 64, 64), 0.0, 0.01)
    assert len(model.points) == 256 and "a" not in model.points


def test_a_kernel_is_built_ahead_while_another_device_serves_the_calls(tmp_path):
    x, w, kwargs = single_device_conv()
    fast = SimulatedDevice("fast", 2e+10, 1e-5, compile_seconds=1.0, first_call_seconds=0.05)
    scheduler = make([SimulatedDevice("slow", 2e+08, 1e-5), fast], tmp_path, explore=False)
    expected = reference.conv2d(x, w, **kwargs)
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    first = scheduler.history()[-1]
    assert first["device"] == "sim:slow"  # a 1 s build is not worth it for one call of ~10 ms...
    waiting = scheduler.explain("conv2d", x, w, **kwargs).predictions[1]
    assert waiting.device == "sim:fast" and waiting.compile > 0  # ...and it is being built, not built yet
    deadline = time.monotonic() + 30
    while scheduler.explain("conv2d", x, w, **kwargs).predictions[1].compile > 0:
        assert time.monotonic() < deadline, "the kernel was never built ahead"
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    for _ in range(3):
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), expected, np.float32)
    assert scheduler.history()[-1]["device"] == "sim:fast"  # built by then: the calls moved without paying for it
    assert [thread for op, thread in fast.builds if op == "conv2d"] == ["sparkle-build_0"]  # no caller waited
    on_fast = [entry["measured"] for entry in scheduler.history() if entry["device"] == "sim:fast"]
    assert max(on_fast) < 0.05  # the first launch (a module load on a GPU) was the build thread's warm-up


def test_a_signature_moves_to_a_device_once_primed_there_without_paying_its_first_call(tmp_path):
    x, w, kwargs = single_device_conv()  # 1.3 MFLOP: 0.66 ms on "steady", 0.33 ms on "gpu" once warm
    gpu = SimulatedDevice("gpu", 4e+09, 1e-5, first_call_seconds=0.05)  # a first call loads a module, say
    scheduler = make([SimulatedDevice("steady", 2e+09, 1e-5), gpu], tmp_path, explore=False)
    scheduler.conv2d(x, w, **kwargs)
    assert scheduler.history()[-1]["device"] == "sim:gpu" and scheduler.history()[-1]["measured"] > 0.05
    assert scheduler._by_id["sim:gpu"].first_call.seconds > 0.04  # learned from that first call
    x2 = x[:, :, :20, :20].copy()
    scheduler.forced = "sim:steady"  # a signature that runs on "steady" already
    scheduler.conv2d(x2, w, **kwargs)
    scheduler.forced = None
    expected = reference.conv2d(x2, w, **kwargs)
    assert_close_to_reference(scheduler.conv2d(x2, w, **kwargs), expected, np.float32)
    waiting = scheduler.explain("conv2d", x2, w, **kwargs)
    on_gpu = next(p for p in waiting.predictions if p.device == "sim:gpu")
    assert waiting.device == "sim:steady"  # saving 0.3 ms once is not worth a 50 ms first call...
    assert on_gpu.note == "its first call here" and on_gpu.compile > 0.01
    deadline = time.monotonic() + 30
    while scheduler.explain("conv2d", x2, w, **kwargs).device != "sim:gpu":  # ...so it is primed ahead
        assert time.monotonic() < deadline, "the signature never moved to the primed device"
        assert_close_to_reference(scheduler.conv2d(x2, w, **kwargs), expected, np.float32)
        time.sleep(0.01)
    for _ in range(3):
        assert_close_to_reference(scheduler.conv2d(x2, w, **kwargs), expected, np.float32)
    moved = [entry["measured"] for entry in scheduler.history()
             if entry["device"] == "sim:gpu" and entry["shape"] != scheduler.history()[0]["shape"]]
    assert moved and max(moved) < 0.04  # the first call's 50 ms were paid by the warm-up on the build thread


def test_the_switch_interval_is_lowered_while_a_kernel_is_built_ahead_and_restored_after(tmp_path):
    # The caller gets the GIL back within 0.1 ms, not 5 ms, after each enqueue or wait while a build runs Python.
    x, w, kwargs = single_device_conv()
    fast = SimulatedDevice("fast", 2e+10, 1e-5, compile_seconds=0.5)
    scheduler = make([SimulatedDevice("slow", 2e+08, 1e-5), fast], tmp_path, explore=False)
    before = sys.getswitchinterval()
    assert before > builds.BUILD_SWITCH_INTERVAL
    scheduler.conv2d(x, w, **kwargs)
    deadline = time.monotonic() + 30
    while sys.getswitchinterval() != pytest.approx(builds.BUILD_SWITCH_INTERVAL):
        assert time.monotonic() < deadline, "no build ahead lowered the switch interval"
        time.sleep(0.01)
    while scheduler._builds_running or scheduler.explain("conv2d", x, w, **kwargs).predictions[1].compile > 0:
        assert time.monotonic() < deadline, "the kernel was never built ahead"
        time.sleep(0.01)
    assert sys.getswitchinterval() == before


def test_the_switch_interval_comes_back_after_nested_builds_unless_changed_meanwhile():
    before = sys.getswitchinterval()
    try:
        with builds.responsive_interpreter():
            with builds.responsive_interpreter():
                assert sys.getswitchinterval() == pytest.approx(builds.BUILD_SWITCH_INTERVAL)
            assert sys.getswitchinterval() == pytest.approx(builds.BUILD_SWITCH_INTERVAL)  # one build still runs
        assert sys.getswitchinterval() == before
        with builds.responsive_interpreter():
            sys.setswitchinterval(0.002)  # the application's own choice, made during a build: kept
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


def test_calls_leave_a_device_while_a_build_blocks_it_and_come_back_after(tmp_path):
    gpu = SimulatedDevice("gpu", 2e+10, 1e-5, compile_seconds=1.0, builds_block=True)  # as NVIDIA's driver
    scheduler = make([SimulatedDevice("steady", 2e+08, 1e-5), gpu], tmp_path, explore=False)
    x, w, kwargs = single_device_conv()
    served = reference.conv2d(x, w, **kwargs)
    deadline = time.monotonic() + 30
    while scheduler.explain("conv2d", x, w, **kwargs).device != "sim:gpu":  # built ahead, then served there
        assert time.monotonic() < deadline, "the first kernel was never built"
        scheduler.conv2d(x, w, **kwargs)
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), served, np.float32)
    assert scheduler.history(last=1)[0]["device"] == "sim:gpu"
    x2 = x[:, :, :20, :20].copy()  # a new shape: its kernel is built ahead on the GPU, blocking it for 1 s
    scheduler.conv2d(x2, w, **kwargs)
    building = scheduler.explain("conv2d", x, w, **kwargs)
    assert building.device == "sim:steady"  # waiting ~1 s for the GPU costs more than running elsewhere
    assert "waits for a kernel build" in next(p.note for p in building.predictions if p.device == "sim:gpu")
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), served, np.float32)
    assert scheduler.history(last=1)[0]["device"] == "sim:steady"
    # Once the build has ended (the device's busy time is a prediction from the builds measured so far: on a
    # loaded machine a build may outlast it), the calls come back to the GPU.
    while len(gpu.builds) < 4 or scheduler._builds_running or \
            scheduler.explain("conv2d", x, w, **kwargs).device != "sim:gpu":
        assert time.monotonic() < deadline, "the build never ended"
        time.sleep(0.05)
    assert len(gpu.builds) == 4  # two profile probes, then the two conv kernels
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), served, np.float32)
    assert scheduler.history(last=1)[0]["device"] == "sim:gpu"  # back once the build ended


def test_a_build_that_outlasts_its_prediction_keeps_calls_away_until_it_ends(tmp_path):
    gpu = SimulatedDevice("gpu", 2e+10, 1e-5, compile_seconds=0.2, builds_block=True)
    scheduler = make([SimulatedDevice("steady", 2e+08, 1e-5), gpu], tmp_path, explore=False)
    x, w, kwargs = single_device_conv()
    served = reference.conv2d(x, w, **kwargs)
    deadline = time.monotonic() + 30
    while scheduler.explain("conv2d", x, w, **kwargs).device != "sim:gpu":  # builds of 0.2 s learned
        assert time.monotonic() < deadline, "the first kernel was never built"
        scheduler.conv2d(x, w, **kwargs)
    gpu._compile_seconds = 1.5  # the next build takes 7x what the builds so far predict
    scheduler.conv2d(x[:, :, :20, :20].copy(), w, **kwargs)
    while not scheduler._builds_running:
        assert time.monotonic() < deadline, "the second kernel was never built ahead"
        time.sleep(0.01)
    started = time.monotonic()
    time.sleep(0.6)  # well past the predicted end of the build, well before its real end
    assert scheduler._builds_running, "the machine is too slow for this test's timing"
    waiting = scheduler.explain("conv2d", x, w, **kwargs)
    assert waiting.device == "sim:steady"
    assert "waits for a kernel build" in next(p.note for p in waiting.predictions if p.device == "sim:gpu")
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), served, np.float32)
    assert scheduler.history(last=1)[0]["device"] == "sim:steady"
    assert time.monotonic() - started < 1.2  # the call above did not wait for the build
    while scheduler._builds_running or scheduler.explain("conv2d", x, w, **kwargs).device != "sim:gpu":
        assert time.monotonic() < deadline, "the calls never came back to the GPU"
        time.sleep(0.05)


def test_nothing_is_built_ahead_for_the_device_that_serves_the_calls(tmp_path):
    only = SimulatedDevice("only", 2e+08, 1e-4, compile_seconds=0.05)
    scheduler = make([only], tmp_path)
    x, w, kwargs = single_device_conv()
    for _ in range(3):
        assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), reference.conv2d(x, w, **kwargs), np.float32)
    assert [thread for op, thread in only.builds if op == "conv2d"] == ["MainThread"]  # by its first call


def test_build_costs_are_learned_from_the_builds_measured_not_only_the_profiles_probe(tmp_path):
    device = SimulatedDevice("only", 2e+08, 1e-4, compile_seconds=0.3)
    device.compile_seconds = lambda: 0.001  # the probe's small kernel builds far faster than real ones
    scheduler = make([device], tmp_path)
    x, w, kwargs = single_device_conv()
    scheduler.conv2d(x, w, **kwargs)  # builds its kernel: 0.3 s
    x2, w2 = x[:, :, :20, :20].copy(), w.copy()
    compile_estimate = scheduler.explain("conv2d", x2, w2, **kwargs).predictions[0].compile
    assert compile_estimate == pytest.approx(0.3, rel=0.3)


# --- persistence ----------------------------------------------------------------------------------------


def test_profiles_and_model_persist_as_json_and_reload(tmp_path):
    x, w, kwargs = single_device_conv()
    first = make([SimulatedDevice("only", 2e+08, 1e-4)], tmp_path)
    for _ in range(5):
        first.conv2d(x, w, **kwargs)
    first.save()
    for name in (f"scheduler-profiles-v{PROFILE_VERSION}.json", f"scheduler-model-v{MODEL_VERSION}.json"):
        json.loads((tmp_path / name).read_text())  # JSON, not pickle
    device = SimulatedDevice("only", 2e+08, 1e-4)
    second = make([device], tmp_path)
    prediction = second.explain("conv2d", x, w, **kwargs).predictions[0]
    assert prediction.measured_calls >= 3
    assert device.calls == 0  # the stored profile was used: nothing measured again


def test_a_changed_device_starts_afresh(tmp_path):
    x, w, kwargs = single_device_conv()
    first = make([SimulatedDevice("only", 2e+08, 1e-4)], tmp_path)
    for _ in range(5):
        first.conv2d(x, w, **kwargs)
    first.save()
    changed = SimulatedDevice("only", 3e+08, 1e-4)  # another speed: another identity (as a new driver would be)
    second = make([changed], tmp_path)
    assert second.explain("conv2d", x, w, **kwargs).predictions[0].measured_calls == 0
    assert changed.calls > 0  # profiled anew


def test_a_damaged_model_file_is_ignored_not_fatal(tmp_path):
    (tmp_path / f"scheduler-model-v{MODEL_VERSION}.json").write_text("{not json")
    x, w, kwargs = single_device_conv()
    with pytest.warns(RuntimeWarning, match="unreadable"):
        scheduler = make([SimulatedDevice("only", 2e+08)], tmp_path)
    assert_close_to_reference(scheduler.conv2d(x, w, **kwargs), reference.conv2d(x, w, **kwargs), np.float32)


# --- threads --------------------------------------------------------------------------------------------


def test_eight_threads_of_mixed_calls_through_one_scheduler(tmp_path):
    scheduler = make(["cpu", SimulatedDevice("sim", 3e+08, 1e-4)], tmp_path)
    rng = np.random.default_rng(0)
    cases = []
    for index in range(6):
        if index % 2:
            a = rng.standard_normal((16 + 8 * index, 24)).astype(np.float32)
            b = rng.standard_normal((24, 40)).astype(np.float32)
            cases.append(("matmul", (a, b), {}, reference.matmul(a, b)))
        else:
            x, w = conv_inputs(batch=1 + index, size=10 + index, seed=index)
            cases.append(("conv2d", (x, w), {"padding": 1}, reference.conv2d(x, w, padding=1)))
    failures = []

    def worker(seed):
        order = np.random.default_rng(seed).integers(0, len(cases), 50)
        for index in order:
            op, args, kwargs, expected = cases[index]
            try:
                result = getattr(scheduler, op)(*args, **kwargs)
                assert_close_to_reference(result, expected, np.float32)
            except Exception as error:  # noqa: BLE001 - collected and reported below
                failures.append(repr(error))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    records = scheduler.history()
    assert len([r for r in records if "part" not in r["shape"]]) <= 400
    scheduler.save()
    for state in scheduler._states:
        for op, model in state.model.shapes.items():
            for features, residual, variance in model.points.values():
                assert np.all(np.isfinite(features)) and math.isfinite(residual) and variance > 0, op
            for features, _, _ in model.points.values():
                mean, variance = model.predict(features)
                assert math.isfinite(mean) and variance > 0
        for history in state.model.histories.values():
            assert history.count >= 0 and math.isfinite(history.mean) and history.spread > 0


# --- device="auto" --------------------------------------------------------------------------------------


def test_auto_uses_the_default_scheduler_and_is_correct():
    x, w = conv_inputs(batch=2, size=12)
    bias = np.linspace(-1, 1, 16).astype(np.float32)
    expected = reference.conv2d(x, w, bias, padding=1, activation="relu")
    for _ in range(3):
        result = sparkle.conv2d(x, w, bias, padding=1, activation="relu")
        assert type(result) is np.ndarray
        assert_close_to_reference(result, expected, np.float32)
    assert sparkle.default_scheduler() is scheduler_module.default_scheduler()
    assert any(record["op"] == "conv2d" for record in sparkle.default_scheduler().history())


def test_history_gives_the_latest_calls_and_refuses_a_bad_count(tmp_path):
    scheduler = make([SimulatedDevice("only", 2e+08, 1e-4)], tmp_path)
    a = np.ones((4, 4), np.float32)
    for _ in range(3):
        scheduler.matmul(a, a)
    assert scheduler.history(last=2) == scheduler.history()[-2:] and len(scheduler.history(last=2)) == 2
    assert scheduler.history(last=0) == []
    with pytest.raises(ValueError, match="last must be a non-negative int"):
        scheduler.history(last=-1)
    with pytest.raises(TypeError, match="last must be a non-negative int"):
        scheduler.history(last=1.5)


def test_a_profile_taken_while_the_host_stalls_keeps_the_transfer_speed_seen_after_the_stall():
    """The GEMM and transfer probes are taken twice, before and after the compile probe: a device whose
    transfers are 13x slower until then (a host stall, as an H100 machine's once was) is profiled at its
    true bandwidth."""
    from sparkle.scheduler import profile as profiling

    class StallsAtFirst(SimulatedDevice):
        def __init__(self):
            super().__init__("stalls", 2e9, 1e-5, transfer_bytes_per_second=2e10)
            self.stalled = True

        def compile_seconds(self):
            self.stalled = False  # the stall ends while the compile probe runs
            return super().compile_seconds()

        def transfer_seconds(self, nbytes):
            up, down = super().transfer_seconds(nbytes)
            factor = 13.0 if self.stalled else 1.0
            return up * factor, down * factor

    measured = profiling.measure(StallsAtFirst())
    assert measured.upload_bytes_per_second == pytest.approx(2e10, rel=1e-9)
    assert measured.download_bytes_per_second == pytest.approx(2e10, rel=1e-9)
