"""sparkle.conv2d / matmul with a named device keep each recent signature's validated spec and prepared call
(sparkle/named_device.py): a kept signature gives what a first call gives, and follows what it depends on."""

import numba
import numpy as np
import pytest

import sparkle
from sparkle import named_device, reference, signature

from _helpers import assert_close_to_reference


def close(got, expected):
    assert_close_to_reference(got, expected, got.dtype)


def conv_inputs(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, 6, 9, 9)).astype(np.float32),
            rng.standard_normal((8, 6, 3, 3)).astype(np.float32),
            rng.standard_normal(8).astype(np.float32))


def test_a_kept_signature_reads_new_values_of_the_same_arrays_and_of_new_arrays():
    x, w, bias = conv_inputs()
    first = sparkle.conv2d(x, w, bias, padding=1, device="cpu")
    close(first, reference.conv2d(x, w, bias, padding=1))
    w *= -0.5  # in place: the kept call's view of the weights must see it
    x[0, 0, 0, 0] = 100.0
    close(sparkle.conv2d(x, w, bias, padding=1, device="cpu"),
                              reference.conv2d(x, w, bias, padding=1))
    x2, w2, bias2 = conv_inputs(seed=1)
    close(sparkle.conv2d(x2, w2, bias2, padding=1, device="cpu"),
                              reference.conv2d(x2, w2, bias2, padding=1))
    assert len(named_device._kept) == 1  # one signature, three calls


def test_results_are_new_arrays_that_later_calls_leave_alone():
    x, w, bias = conv_inputs()
    results = [sparkle.conv2d(x * (i + 1), w, bias, device="cpu") for i in range(3)]
    for i, result in enumerate(results):
        close(result, reference.conv2d(x * (i + 1), w, bias))
    assert len({id(r) for r in results}) == 3 and not np.shares_memory(results[0], results[1])


def test_layouts_and_arguments_are_their_own_signatures():
    x, w, bias = conv_inputs()
    calls = [
        dict(x=x, w=w, bias=bias),
        dict(x=np.asfortranarray(x), w=w, bias=bias),
        dict(x=x[:, :, ::-1, :], w=w, bias=bias),
        dict(x=x, w=w, bias=None),
        dict(x=x, w=w, bias=bias, stride=2),
        dict(x=x, w=w, bias=bias, padding=(1, 0)),
        dict(x=x, w=w, bias=bias, activation="relu"),
        dict(x=x.astype(np.float64), w=w.astype(np.float64), bias=bias.astype(np.float64)),
    ]
    for _ in range(2):
        for kwargs in calls:
            got = sparkle.conv2d(**kwargs, device="cpu")
            arrays = {k: v for k, v in kwargs.items() if k in ("x", "w", "bias")}
            options = {k: v for k, v in kwargs.items() if k not in arrays}
            assert got.dtype == kwargs["x"].dtype and got.flags.c_contiguous
            close(got, reference.conv2d(**arrays, **options))
    assert len(named_device._kept) == len(calls)


def test_the_thread_count_is_part_of_the_signature():
    x, w, bias = conv_inputs(batch=8)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = sparkle.conv2d(x, w, bias, device="cpu")
    finally:
        numba.set_num_threads(threads)
    close(one, reference.conv2d(x, w, bias))
    close(sparkle.conv2d(x, w, bias, device="cpu"), reference.conv2d(x, w, bias))
    (kept,) = named_device._kept.values()
    assert set(kept.by_threads) == {1, threads}
    assert {prepared.threads for prepared in kept.by_threads.values()} <= {1, threads}


def test_matmul_and_the_reference_device():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.standard_normal((5, 9)).astype(np.float32)
    for _ in range(2):
        close(sparkle.matmul(a, b, device="cpu"), reference.matmul(a, b))
        close(sparkle.matmul(a.T.copy().T, b, device="cpu"), reference.matmul(a, b))
        exact = sparkle.matmul(a, b, device="reference")
        assert exact.dtype == np.float32
        np.testing.assert_array_equal(exact, reference.matmul(a, b).astype(np.float32))
    assert not any(key[0] == "reference" for key in named_device._kept)


def test_the_oldest_signatures_go_beyond_the_limit(monkeypatch):
    monkeypatch.setattr(named_device, "KEPT", 3)
    rng = np.random.default_rng(4)
    for size in range(2, 8):
        a = rng.standard_normal((size, 3)).astype(np.float32)
        b = rng.standard_normal((3, 4)).astype(np.float32)
        close(sparkle.matmul(a, b, device="cpu"), reference.matmul(a, b))
    kept = [key[1] for key in named_device._kept]
    assert kept == [signature.matmul_key(np.empty((size, 3), np.float32), np.empty((3, 4), np.float32))
                    for size in (5, 6, 7)]


@pytest.mark.parametrize("bad", [dict(stride=0), dict(device="gpu"), dict(device=["cpu"])])
def test_a_bad_call_keeps_nothing(bad):
    x, w, bias = conv_inputs()
    with pytest.raises((TypeError, ValueError)):
        sparkle.conv2d(x, w, bias, **{"device": "cpu", **bad})
    assert not named_device._kept
