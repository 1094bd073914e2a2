"""The OpenCL buffer pool (README, "Buffer pool"): device buffers are reused by size, a buffer returns to
its device's pool when its DeviceArray is collected, so repeated calls of one shape allocate nothing after
the first. And a DeviceArray's ``reshape`` is a view of the same buffer (README, "Device arrays").

Allocations are counted where they really happen: every ``pyopencl.Buffer`` constructed while a test runs
(Sparkle's only device allocation is ``cl.Buffer`` in ``runtime.BufferPool.take``, looked up at call time).
Every call must run on the device: a fallback to the CPU would allocate nothing and prove nothing.
"""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import pyopencl as cl  # noqa: E402

import sparkle  # noqa: E402
from sparkle import DeviceArray, reference  # noqa: E402

from _helpers import assert_close_to_reference  # noqa: E402
from _opencl import opencl_params, runtime_device, sparkle_cache  # noqa: E402,F401

pytestmark = [pytest.mark.usefixtures("sparkle_cache"),
              pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")]

CALLS = 5


@pytest.fixture
def allocations(monkeypatch):
    """The sizes of the device buffers allocated from now on, in order."""
    sizes = []
    real = cl.Buffer

    class CountingBuffer(real):
        def __init__(self, context, flags, size=0, *args, **kwargs):
            sizes.append(size)
            super().__init__(context, flags, size, *args, **kwargs)

    monkeypatch.setattr(cl, "Buffer", CountingBuffer)
    return sizes


@pytest.fixture(params=opencl_params())
def device(request):
    device = runtime_device(request.param)
    device.pool_buffer(1)  # the context and its pool exist
    device.pool.clear()  # buffers kept by earlier tests would hide the first call's allocations
    return device


def conv_problem(dtype=np.float32):
    # Sizes no other test uses, so that every buffer of the first call is a new allocation.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 13, 11)).astype(dtype)
    w = rng.standard_normal((5, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(5).astype(dtype)
    kwargs = {"padding": 1, "activation": "relu"}
    return (x, w, b), kwargs, reference.conv2d(x, w, b, **kwargs)


def test_allocation_counter_sees_the_pools_allocations(device, allocations):
    buffer = device.pool_buffer(12345)
    assert allocations == [12345] and isinstance(buffer, cl.Buffer)
    device.pool.give(buffer)
    assert device.pool_buffer(12345) is buffer and allocations == [12345]


def test_repeated_calls_with_numpy_inputs_allocate_nothing_after_the_first(device, allocations):
    (x, w, b), kwargs, expected = conv_problem()
    per_call = []
    for _ in range(CALLS):
        before = len(allocations)
        y = sparkle.conv2d(x, w, b, device=device.id, **kwargs)
        per_call.append(allocations[before:])
        assert type(y) is np.ndarray
        assert_close_to_reference(y, expected, np.float32)
    # The first call allocates the input, weights, bias and output, nothing else (no im2col buffer), ...
    assert sorted(per_call[0]) == sorted([x.nbytes, w.nbytes, b.nbytes, y.nbytes])
    # ... and every later call takes them from the pool.
    assert per_call[1:] == [[]] * (CALLS - 1)


def test_repeated_matmul_calls_allocate_nothing_after_the_first(device, allocations):
    rng = np.random.default_rng(12)
    a = rng.standard_normal((19, 23)).astype(np.float32)
    b = rng.standard_normal((23, 29)).astype(np.float32)
    counts = []
    for _ in range(CALLS):
        before = len(allocations)
        c = sparkle.matmul(a, b, device=device.id)
        counts.append(len(allocations) - before)
        assert_close_to_reference(c, reference.matmul(a, b), np.float32)
    assert counts[0] > 0 and counts[1:] == [0] * (CALLS - 1)


def test_repeated_calls_with_device_inputs_allocate_nothing_after_the_first(device, allocations):
    (x, w, b), kwargs, expected = conv_problem()
    x_d, w_d, b_d = (sparkle.to_device(a, device.id) for a in (x, w, b))
    assert sorted(allocations) == sorted([x.nbytes, w.nbytes, b.nbytes])  # to_device copies once
    allocations.clear()
    per_call = []
    for _ in range(CALLS):
        before = len(allocations)
        y = sparkle.conv2d(x_d, w_d, b_d, **kwargs)
        per_call.append(allocations[before:])
        assert isinstance(y, DeviceArray)
        assert_close_to_reference(y.get(), expected, np.float32)
        del y  # the result is collected: its buffer goes back to the pool
    assert per_call[0] == [expected.size * 4]  # only the output
    assert per_call[1:] == [[]] * (CALLS - 1)


def test_result_kept_while_the_next_call_runs_costs_one_more_buffer_then_none(device, allocations):
    """``y = conv2d(...)`` in a loop keeps the previous result alive during each call, so two output
    buffers take turns: the second call allocates one more, later calls nothing."""
    (x, w, b), kwargs, expected = conv_problem()
    x_d, w_d, b_d = (sparkle.to_device(a, device.id) for a in (x, w, b))
    allocations.clear()
    counts = []
    y = None
    for _ in range(CALLS):
        before = len(allocations)
        y = sparkle.conv2d(x_d, w_d, b_d, **kwargs)
        counts.append(len(allocations) - before)
    assert_close_to_reference(y.get(), expected, np.float32)
    assert counts == [1, 1] + [0] * (CALLS - 2)


def test_a_buffer_returns_to_the_pool_when_its_last_device_array_is_collected(device, allocations):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    d = sparkle.to_device(x, device.id)
    buffer = d.buffer
    assert allocations == [x.nbytes]
    view = d.reshape(6, 20)  # a view: the same buffer, no allocation, no copy
    assert view.buffer is buffer and allocations == [x.nbytes]
    del d
    gc.collect()
    # The view keeps the owner, hence the buffer, alive: it is not in the pool, and reads the right values.
    assert all(buffer is not kept for kept in device.pool.free.get(x.nbytes, []))
    np.testing.assert_array_equal(view.get(), x.reshape(6, 20))
    del view
    gc.collect()
    assert any(buffer is kept for kept in device.pool.free.get(x.nbytes, []))
    again = sparkle.to_device(x, device.id)
    assert again.buffer is buffer and allocations == [x.nbytes]  # reused, not allocated
    np.testing.assert_array_equal(again.get(), x)


def test_a_copy_of_a_device_array_is_a_view_and_the_buffer_goes_back_once(device, allocations):
    x = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    d = sparkle.to_device(x, device.id)
    buffer = d.buffer
    twin = copy.copy(d)
    assert twin.buffer is buffer and twin.shape == d.shape and allocations == [x.nbytes]
    del d
    gc.collect()
    np.testing.assert_array_equal(twin.get(), x)  # the copy keeps the buffer alive
    assert all(buffer is not kept for kept in device.pool.free.get(x.nbytes, []))
    del twin
    gc.collect()
    assert sum(buffer is kept for kept in device.pool.free.get(x.nbytes, [])) == 1


def test_buffers_taken_and_given_back_from_eight_threads_are_never_held_twice(device):
    """The pool's warm take and give run without a lock (list.pop and list.append are atomic): no buffer may
    be handed to two holders at once."""
    pool, nbytes = device.pool, 4096 + 64
    held, lock, failures = set(), threading.Lock(), []

    def worker():
        for _ in range(500):
            buffer = pool.take(nbytes)
            with lock:
                if id(buffer) in held:
                    failures.append(buffer)
                held.add(id(buffer))
            time.sleep(0)  # let the other threads take and give while this one holds it
            with lock:
                held.discard(id(buffer))
            pool.give(buffer)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    kept = pool.free[nbytes]
    assert len({id(buffer) for buffer in kept}) == len(kept) <= pool.max_kept_per_size + 8


def test_device_arrays_alive_at_interpreter_exit_leave_no_error(device):
    """Buffers go back to the pool in DeviceArray.__del__, which also runs while the interpreter shuts down."""
    script = f"""
import copy, numpy as np, sparkle
x = sparkle.to_device(np.ones((1, 4, 8, 8), np.float32), {device.id!r})
w = sparkle.to_device(np.ones((4, 4, 3, 3), np.float32), {device.id!r})
kept = [sparkle.conv2d(x, w, padding=1, device={device.id!r}) for _ in range(3)]
view, twin = kept[0].reshape(-1), copy.copy(kept[1])
print(float(kept[2].get().sum()))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    x, w = np.ones((1, 4, 8, 8), np.float32), np.ones((4, 4, 3, 3), np.float32)
    assert float(done.stdout.split()[-1]) == pytest.approx(float(reference.conv2d(x, w, padding=1).sum()))
    assert "Exception ignored" not in done.stderr and "Error" not in done.stderr, done.stderr


def test_inputs_on_another_device_are_copied_through_the_host(device, monkeypatch):
    """README, "Device arrays": inputs on another device than the one that runs the call are copied through
    the host. The other device is a second runtime device on the same OpenCL device (its own context)."""
    from sparkle import api
    from sparkle.opencl import backend, runtime

    other = runtime.OpenCLDevice(device.index, device.cl_device)
    (x, w, b), kwargs, expected = conv_problem()
    x_d, w_d = sparkle.to_device(x, device.id), sparkle.to_device(w, device.id)
    reads = []
    real_get = DeviceArray.get

    def get(self):
        reads.append(self.shape)
        return real_get(self)

    monkeypatch.setattr(DeviceArray, "get", get)
    y = backend.conv2d(x_d, w_d, b, api.conv2d_spec(x, w, b, **kwargs), other)
    assert sorted(reads) == sorted([x.shape, w.shape])  # each foreign input read to the host once
    assert isinstance(y, DeviceArray) and y._device is other and y.buffer.context == other.context
    assert_close_to_reference(real_get(y), expected, np.float32)
