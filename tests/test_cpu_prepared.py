"""Prepared CPU calls (``backend.prepare_conv2d`` / ``prepare_matmul``): the same numbers as the
unprepared backend and the float64 reference on every path and compiled variant (one thread: small
work; parallel), repeated and concurrent calls that share nothing, inputs left untouched, weights that
change in place between calls, and the planner's small-work rule. No timings: benchmarks/dispatch_cost.py
measures the cost per call."""

import threading

import numba
import numpy as np
import pytest
from _helpers import DTYPES, LAYOUTS, Unchanged, assert_close_to_reference, make_array

from sparkle import api, reference
from sparkle.cpu import backend, plan, prepared

# (x shape, w shape, conv2d keyword arguments, with a bias): the dispatch benchmark's tiny conv, the
# direct kernel (depthwise, channel multiplier 2), groups, strides, dilation, asymmetric padding, 1x1,
# a batch, edge tiles; all but the last small enough for the one-thread variant by default
# (plan.default_threads).
CONV_CASES = {
    "tiny-3x3-pad1": ((1, 4, 8, 8), (4, 4, 3, 3), dict(padding=1), False),
    "depthwise": ((2, 6, 9, 7), (6, 1, 3, 3), dict(padding=1, groups=6), True),
    "depthwise-multiplier-strided": ((1, 4, 11, 10), (8, 1, 3, 3), dict(stride=2, padding=1, groups=4), False),
    "groups-bias-relu": ((1, 8, 9, 10), (12, 4, 3, 3), dict(padding=1, groups=2, activation="relu"), True),
    "stride-2x1-asymmetric": ((1, 5, 13, 10), (7, 5, 3, 2), dict(stride=(2, 1), padding=(2, 0, 1, 0)), True),
    "dilated": ((1, 3, 12, 11), (5, 3, 3, 3), dict(dilation=(2, 3), padding=2), False),
    "pointwise": ((2, 16, 5, 7), (20, 16, 1, 1), dict(), True),
    "edge-tiles": ((3, 7, 10, 13), (13, 7, 2, 3), dict(padding=(0, 1)), False),
}
MATMUL_CASES = [(8, 8, 8), (1, 1, 1), (1, 17, 3), (13, 7, 29), (37, 64, 41)]


def conv_operands(case, dtype, seed=0):
    x_shape, w_shape, kwargs, with_bias = CONV_CASES[case]
    rng = np.random.default_rng(seed)
    x = make_array(rng, x_shape, dtype)
    w = make_array(rng, w_shape, dtype)
    bias = make_array(rng, (w_shape[0],), dtype) if with_bias else None
    return x, w, bias, kwargs


def check_conv(call, x, w, bias, kwargs, dtype):
    """Run the prepared call on (x, w, bias) and compare it with the float64 reference; returns the result."""
    unchanged = Unchanged(x, w, bias)
    y = call(x, w, bias)
    unchanged.check()
    expected = reference.conv2d(x, w, bias, **kwargs)
    assert y.shape == expected.shape and y.dtype == dtype and y.flags.c_contiguous
    assert_close_to_reference(y, expected, dtype)
    return y


def conv_plans(spec):
    """None (the backend's own choice: the direct kernel for depthwise-like groups), and each GEMM path
    with one thread and with two (the parallel variant)."""
    plans = {"default": None}
    for implicit in (False, True):
        for threads in (1, 2):
            plans[f"{'implicit' if implicit else 'packed'}-{threads}"] = backend.plan_conv2d(
                spec, implicit=implicit, threads=threads)
    return plans


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_prepared_conv2d_matches_reference_on_every_variant(case, dtype):
    x, w, bias, kwargs = conv_operands(case, dtype)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    for name, call_plan in conv_plans(spec).items():
        call = backend.prepare_conv2d(spec, call_plan)
        y = check_conv(call, x, w, bias, kwargs, dtype)
        # The same kernel as the unprepared call: the same numbers, bit for bit.
        np.testing.assert_array_equal(y, backend.conv2d(x, w, bias, spec, call_plan), err_msg=name)
        one_thread = call_plan.threads == 1 if call_plan else plan.default_threads(spec) == 1
        assert call.variant.endswith(" serial") == one_thread, (name, call.variant)


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
def test_direct_kernel_in_both_variants(dtype):
    x, w, bias, kwargs = conv_operands("depthwise", dtype)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    assert backend.uses_direct_kernel(spec)
    expected = reference.conv2d(x, w, bias, **kwargs)
    for threads in (1, 2):
        launch = prepared.DirectLaunch(spec, threads)
        assert launch.variant == ("direct serial" if threads == 1 else "direct")
        y = np.empty(spec.output_shape, dtype)
        launch.run(x, w, bias, y.reshape(-1))
        assert_close_to_reference(y, expected, dtype)


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mkn", MATMUL_CASES, ids=lambda s: "x".join(map(str, s)))
def test_prepared_matmul_matches_reference(mkn, dtype):
    m, k, n = mkn
    rng = np.random.default_rng(m + 7 * k + 31 * n)
    a, b = make_array(rng, (m, k), dtype), make_array(rng, (k, n), dtype)
    spec = api.matmul_spec(a, b)
    conv_spec = api.matmul_as_conv2d_spec(spec)
    for call_plan in (None, backend.plan_conv2d(conv_spec, implicit=False, threads=2)):
        call = backend.prepare_matmul(spec, call_plan)
        unchanged = Unchanged(a, b)
        c = call(a, b)
        unchanged.check()
        assert c.shape == (m, n) and c.dtype == dtype and c.flags.c_contiguous
        assert_close_to_reference(c, reference.matmul(a, b), dtype)
        np.testing.assert_array_equal(c, backend.matmul(a, b, spec, call_plan))
        assert call.variant.startswith("packed ")
    assert backend.prepare_matmul(spec).variant.endswith(" serial")  # small work: one thread


@pytest.mark.parametrize("mkn", [(0, 3, 4), (3, 0, 4), (3, 4, 0)], ids=lambda s: "x".join(map(str, s)))
def test_prepared_matmul_degenerate_sizes(mkn):
    m, k, n = mkn
    a, b = np.ones((m, k), np.float32), np.ones((k, n), np.float32)
    call = backend.prepare_matmul(api.matmul_spec(a, b))
    for _ in range(2):
        c = call(a, b)
        assert c.shape == (m, n) and c.dtype == np.float32 and not c.any()


def test_prepared_conv2d_empty_output():
    x = np.ones((0, 3, 5, 5), np.float32)
    w = np.ones((4, 3, 3, 3), np.float32)
    call = backend.prepare_conv2d(api.conv2d_spec(x, w))
    y = call(x, w, None)
    assert y.shape == (0, 4, 3, 3) and y.dtype == np.float32


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["tiny-3x3-pad1", "depthwise", "stride-2x1-asymmetric"])
def test_repeated_calls_share_no_state(case, dtype):
    """Scratch buffers and padded copies are reused from call to call: each call's result depends on its
    own inputs only, and an earlier result is never written again."""
    x1, w1, b1, kwargs = conv_operands(case, dtype, seed=1)
    x2, w2, b2, _ = conv_operands(case, dtype, seed=2)
    spec = api.conv2d_spec(x1, w1, b1, **kwargs)
    for call_plan in conv_plans(spec).values():
        call = backend.prepare_conv2d(spec, call_plan)
        first = check_conv(call, x1, w1, b1, kwargs, dtype)
        kept = first.copy()
        check_conv(call, x2, w2, b2, kwargs, dtype)
        check_conv(call, x2, w1, b1, kwargs, dtype)  # new data with the weights of the first call
        np.testing.assert_array_equal(first, kept)
        np.testing.assert_array_equal(call(x1, w1, b1), kept)


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_changed_in_place_between_calls_are_used(dtype):
    """The flat view of the weights is remembered while the same array comes back: it must see values
    written into that array between calls, whatever its layout."""
    x, w, bias, kwargs = conv_operands("groups-bias-relu", dtype)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    rng = np.random.default_rng(5)
    for layout in ("C", "F", "sliced"):
        w_layout = make_array(rng, w.shape, dtype, layout)
        bias_layout = make_array(rng, bias.shape, dtype, "sliced" if layout == "sliced" else "C")
        call = backend.prepare_conv2d(spec)
        check_conv(call, x, w_layout, bias_layout, kwargs, dtype)
        w_layout[...] = make_array(rng, w.shape, dtype)
        bias_layout[...] = make_array(rng, bias.shape, dtype)
        check_conv(call, x, w_layout, bias_layout, kwargs, dtype)
    a = np.random.default_rng(6).standard_normal((9, 9)).astype(dtype)
    matmul = backend.prepare_matmul(api.matmul_spec(a, a))
    assert_close_to_reference(matmul(a, a), reference.matmul(a, a), dtype)
    a *= -2
    assert_close_to_reference(matmul(a, a), reference.matmul(a, a), dtype)


@pytest.mark.boundscheck
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_layout_read_only_and_misaligned_inputs(dtype, layout):
    """Inputs in any memory layout, read-only or misaligned give the reference's result, are never
    written, and compile no new version."""
    x, w, bias, kwargs = conv_operands("stride-2x1-asymmetric", dtype)
    rng = np.random.default_rng(7)
    x = make_array(rng, x.shape, dtype, layout)
    w = make_array(rng, w.shape, dtype, layout)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    call = backend.prepare_conv2d(spec)
    check_conv(call, x, w, bias, kwargs, dtype)
    versions = len(call.kernel.signatures)
    read_only = x.copy()
    read_only.flags.writeable = False
    raw = np.zeros(x.nbytes + 1, np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=dtype, count=x.size, offset=1).reshape(x.shape)
    misaligned[...] = x
    assert not misaligned.flags.aligned
    for variant in (read_only, misaligned):
        check_conv(call, variant, w, bias, kwargs, dtype)
    assert len(call.kernel.signatures) == versions


def test_concurrent_calls_on_one_prepared_call():
    """8 Python threads call one prepared call at once (the one-thread variant and, where Numba's threading
    layer takes launches from several threads, the parallel one), each with its own data: every result is
    the reference's, and the scratch pool never holds more sets than calls ran at once."""
    dtype = np.float32
    x, w, bias, kwargs = conv_operands("groups-bias-relu", dtype)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    calls = [backend.prepare_conv2d(spec), backend.prepare_conv2d(spec, backend.plan_conv2d(spec, threads=2))]
    calls[1](x, w, bias)  # starts Numba's thread pool, so that its layer is known
    if numba.threading_layer() == "workqueue":
        calls.pop()  # that layer aborts the process on launches from several threads
    threads, rounds = 8, 20
    problems = [conv_operands("groups-bias-relu", dtype, seed=10 + index) for index in range(threads)]
    expected = [reference.conv2d(*problem[:3], **kwargs) for problem in problems]
    for call in calls:
        results = [[] for _ in range(threads)]
        start = threading.Barrier(threads)

        def work(index, call=call, results=results, start=start):
            px, pw, pbias, _ = problems[index]
            start.wait()
            for _ in range(rounds):
                results[index].append(call(px, pw, pbias))

        workers = [threading.Thread(target=work, args=(index,)) for index in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        for index in range(threads):
            assert len(results[index]) == rounds, call.variant
            for y in results[index]:
                assert_close_to_reference(y, expected[index], dtype)
        launch = call._run.__self__
        if hasattr(launch, "scratch"):  # the packed path's pool (the planner may pick the implicit path here)
            assert 1 <= len(launch.scratch.free) <= threads, call.variant


def test_concurrent_matmul_calls():
    dtype = np.float64
    rng = np.random.default_rng(11)
    call = backend.prepare_matmul(api.matmul_spec(np.ones((8, 8), dtype), np.ones((8, 8), dtype)))
    pairs = [(rng.standard_normal((8, 8)), rng.standard_normal((8, 8))) for _ in range(8)]
    failures = []

    def work(a, b):
        expected = reference.matmul(a, b)
        for _ in range(50):
            c = call(a, b)
            if not np.allclose(c, expected, rtol=1e-12, atol=1e-12):
                failures.append(c)

    workers = [threading.Thread(target=work, args=pair) for pair in pairs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures


def test_small_work_plans_one_thread_and_larger_work_all():
    small = api.conv2d_spec(np.ones((1, 4, 8, 8), np.float32), np.ones((4, 4, 3, 3), np.float32), padding=1)
    large = api.conv2d_spec(np.ones((1, 64, 28, 28), np.float32), np.ones((64, 64, 3, 3), np.float32), padding=1)
    assert small.flops <= plan.serial_max_flops(numba.get_num_threads()) < large.flops
    assert backend.plan_conv2d(small).threads == 1
    assert backend.plan_conv2d(large).threads == numba.get_num_threads()
    assert backend.plan_conv2d(small, threads=2).threads == 2  # asked for: kept
    assert backend.prepare_conv2d(small).variant.endswith(" serial")
    assert backend.prepare_conv2d(large).variant.endswith(" serial") == (numba.get_num_threads() == 1)


@pytest.mark.boundscheck
@pytest.mark.parametrize("threads", [1, 2])
def test_short_scratch_raises_instead_of_overrunning(threads):
    """The packed driver carves its per-thread buffers out of two scratch rows whose layout the parameter
    vector describes; rows too short for it raise IndexError before any job runs."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 9, 9)).astype(np.float32)
    w = rng.standard_normal((10, 4, 3, 3)).astype(np.float32)
    spec = api.conv2d_spec(x, w, padding=1)
    launch = prepared.FusedLaunch(spec, backend.plan_conv2d(spec, implicit=False, threads=threads))
    values, indices = launch.scratch.take()
    out = np.zeros(int(np.prod(spec.output_shape)), np.float32)
    arguments = (prepared.flat_input(x), prepared.flat_input(w), launch.inputs.zero_bias, out, launch.params)
    for short in ((np.ascontiguousarray(values[:, :-1]), indices), (values, np.ascontiguousarray(indices[:, :-1]))):
        with pytest.raises(IndexError, match="outside its buffer"):
            launch.kernel(*arguments, *short)
        assert not out.any()
    versions = len(launch.kernel.signatures)
    launch.kernel(*arguments, values, indices)
    assert len(launch.kernel.signatures) == versions
    assert_close_to_reference(out.reshape(spec.output_shape), reference.conv2d(x, w, padding=1), np.float32)


# ---- into: a result written into the caller's array (a split call's part, its slice of the whole result) ----

@pytest.mark.boundscheck
@pytest.mark.parametrize("case", ["groups-bias-relu", "pointwise", "edge-tiles"])
def test_conv2d_into_writes_a_slice_of_a_larger_result_and_nothing_else(case):
    x, w, bias, kwargs = conv_operands(case, np.float32)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    call = backend.prepare_conv2d(spec)
    whole = np.full((spec.batch + 2, *spec.output_shape[1:]), 7.0, np.float32)  # one image each side
    unchanged = Unchanged(x, w, bias)
    call.into(whole[1:-1], x, w, bias)
    unchanged.check()
    assert_close_to_reference(whole[1:-1], reference.conv2d(x, w, bias, **kwargs), np.float32)
    assert (whole[0] == 7.0).all() and (whole[-1] == 7.0).all()


@pytest.mark.boundscheck
@pytest.mark.parametrize("m, k, n", [(13, 7, 29), (1, 17, 3)])
def test_matmul_into_writes_rows_of_a_larger_product(m, k, n):
    rng = np.random.default_rng(1)
    a, b = make_array(rng, (m, k), np.float64), make_array(rng, (k, n), np.float64)
    call = backend.prepare_matmul(api.matmul_spec(a, b))
    whole = np.full((m + 3, n), -1.0)
    call.into(whole[3:], a, b)
    assert_close_to_reference(whole[3:], reference.matmul(a, b), np.float64)
    assert (whole[:3] == -1.0).all()


def test_into_refuses_an_output_it_cannot_write_and_leaves_it_alone():
    x, w, bias, kwargs = conv_operands("pointwise", np.float32)
    call = backend.prepare_conv2d(api.conv2d_spec(x, w, bias, **kwargs))
    shape = call.spec.output_shape
    read_only = np.zeros(shape, np.float32)
    read_only.flags.writeable = False
    wrong = {"shape": np.zeros(shape[:-1] + (shape[-1] + 1,), np.float32), "dtype": np.zeros(shape, np.float64),
             "not C-contiguous": np.zeros(shape[::-1], np.float32).T, "read-only": read_only}
    for why, out in wrong.items():
        before = out.copy()
        with pytest.raises(ValueError, match=r"^out must be a writeable C-contiguous float32 array of shape"):
            call.into(out, x, w, bias)
        assert np.array_equal(out, before), why
    with pytest.raises(TypeError, match="^out must be a numpy array, got list"):
        call.into([0.0], x, w, bias)
