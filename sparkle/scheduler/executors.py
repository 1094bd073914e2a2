"""The devices as the scheduler sees them: something that prepares a call, runs it, and holds data.

Each executor adapts one backend (the Numba CPU backend, one OpenCL device) or simulates a device for
tests (:class:`SimulatedDevice`). The scheduler knows a device only through these methods and the times
it measures around them.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .. import host_pool
from ..device_array import DeviceArray, to_host


class DeviceFault(RuntimeError):
    """A device could not run a call (the scheduler runs it elsewhere and avoids the device for a while)."""


class Executor:
    """Base: ``id`` (what ``device=`` accepts), ``kind``, ``identity`` (a change re-profiles the device
    and starts its model afresh)."""

    id = "?"
    kind = "?"
    identity = "?"
    builds_block_calls = False  # whether the device's other calls and copies wait while it builds a kernel
    writes_parts_in_place = False  # whether its prepared calls write a split part's slice of the result (into)

    def host_array(self, shape, dtype):
        """Host memory this device's results land in fastest (a split call's whole result is made here by the
        device with the largest part): the process's pool of host arrays, pinned memory for a GPU."""
        return host_pool.empty(shape, dtype)

    def holds(self, operand):
        """Whether ``operand`` already lives in this device's memory."""
        return False

    def prepare(self, op, spec):
        """A callable running ``op`` for operands of ``spec`` here, with ``variant`` (the kernel variant
        that runs, for run-time verification) and ``compiled`` (False while a first call would compile)."""
        raise NotImplementedError

    def transfer_seconds(self, nbytes):
        """(host -> device, device -> host) seconds to move ``nbytes``; zeros where memory is the host's."""
        return 0.0, 0.0

    def compile_seconds(self):
        """Seconds to build a kernel for a shape seen for the first time (0 where shapes never compile)."""
        return 0.0

    def launch_timer(self, prepared):
        """For calls of ``prepared`` whose result stays in this device's memory and returns before the device
        has run it: a LaunchTimer reading the device's own time; None where a call's host time is its time."""
        return None


class PreparedCall:
    """A function with the facts the scheduler needs about it. ``source``, when given, is the backend's
    prepared call: its variant and build state are read live (a fault or a quarantine moves it to the next
    variant)."""

    __slots__ = ("_compiled", "builder", "host_run", "into", "label", "rate_share", "run", "source", "warm")

    def __init__(self, run, label, compiled=True, source=None, host_run=None, builder=None, rate_share=1.0,
                 into=None):
        self.run, self.label, self.source, self._compiled = run, label, source, compiled
        # into(out, *operands): the result written straight into ``out`` (a C-contiguous host array), as a
        # split call's part is; None where only a new result can be made (run_into then copies it).
        self.into = into
        # The share of the device's profiled rate this call can use (the CPU's small calls run on one thread).
        self.rate_share = rate_share
        self.host_run = host_run or run  # the same, for numpy operands only: no conversions on the hot path
        self.warm = False  # the first call pays one-time costs (thread teams, first touch of buffers)
        self.builder = builder or getattr(source, "build", None)

    def __call__(self, *operands):
        return self.run(*operands)

    def run_into(self, out, *operands):
        """The call, its result in ``out`` (a host array of the result's shape and dtype)."""
        if self.into is not None and out.flags.c_contiguous:
            self.into(out, *operands)
        else:
            out[...] = to_host(self.run(*operands))

    @property
    def variant(self):
        return f"{self.label} {self.source.variant}" if self.source is not None else self.label

    @property
    def compiled(self):
        return self.source.compiled if self.source is not None else self._compiled

    @compiled.setter
    def compiled(self, value):
        self._compiled = value

    def build(self):
        """Build the kernel now (the first call would otherwise); the scheduler calls it off the caller's
        thread while another device serves the calls. Raises what the build raises."""
        if self.builder is not None and not self.compiled:
            self.builder()

    def quarantine(self):
        """Move off the current variant (it gave a wrong result); False if there is no other to move to."""
        if self.source is not None and hasattr(self.source, "quarantine"):
            self.source.quarantine()
            return True
        return False


def is_sample(prepared, compiled, seconds, predicted):
    """Whether a measured call tells the device's speed: not one that compiled, and not a first call far
    slower than predicted (one-time costs: a thread team started, buffers touched the first time)."""
    first, prepared.warm = not prepared.warm, True
    prepared.compiled = True
    return compiled and not (first and seconds > 2.0 * predicted)


class CpuExecutor(Executor):
    """The Numba CPU backend on all of Numba's threads."""

    id = "cpu"
    kind = "cpu"
    writes_parts_in_place = True

    def __init__(self):
        import numba

        from ..cpu.conv2d import kernel_source_fingerprint
        from ..cpu.isa import active_isa
        from ..devices import devices

        cpu = devices()[0]
        self.name = cpu.name
        self.identity = (f"cpu|{cpu.name}|{active_isa().name}|threads={numba.get_num_threads()}"
                         f"|kernels={kernel_source_fingerprint():x}")

    def prepare(self, op, spec):
        import numba

        run, variant, prepared = _cpu_call(op, spec)
        return PreparedCall(run, variant, host_run=prepared,
                            rate_share=min(1.0, prepared.threads / numba.get_num_threads()),
                            into=lambda out, *operands: prepared.into(out, *map(to_host, operands)))


def _cpu_call(op, spec, serial=False):
    """(function of any operands, variant name, the backend's prepared call for numpy operands); ``serial``:
    on the calling thread only."""
    from ..api import matmul_as_conv2d_spec
    from ..cpu import backend

    serial = serial and spec.flops > 0  # an empty call plans nothing
    if op == "conv2d":
        plan = backend.plan_conv2d(spec, threads=1) if serial else None
        prepared = backend.prepare_conv2d(spec, plan)
        return ((lambda x, w, bias: prepared(to_host(x), to_host(w), to_host(bias))), f"cpu {prepared.variant}",
                prepared)
    plan = backend.plan_conv2d(matmul_as_conv2d_spec(spec), threads=1, implicit=False) if serial else None
    prepared = backend.prepare_matmul(spec, plan)
    return (lambda a, b: prepared(to_host(a), to_host(b))), f"cpu {prepared.variant}", prepared


# A queued call's device time is sampled: one launch at a time is timed, its state read every LAUNCH_CHECK_EVERY
# calls, and the next one timed TIME_EVERY calls after a reading. A timed launch costs more host time than another
# on a GPU (spliced in from the profiling queue: a marker and a barrier besides the launch).
LAUNCH_CHECK_EVERY = 8
TIME_EVERY = 32


class LaunchTimer:
    """Samples of the device time of one prepared OpenCL call's launches, read once they have run (it never
    waits): a call whose result stays on the device returns when it is enqueued, and its host time (tens of
    microseconds) says nothing of what the device spends on it. One launch at a time is timed (the source's
    ``request_timing``: a profiling queue costs host time on every launch it takes) and its state read every
    LAUNCH_CHECK_EVERY calls, so the hot path pays a counter, not a driver query."""

    def __init__(self, source):
        import pyopencl as cl

        from ..opencl.launch import span_seconds

        self._span_seconds = span_seconds
        self._source = source
        self._complete = cl.command_execution_status.COMPLETE
        self._read = None  # the timed launch read last
        self._calls = 0
        self._request_at = 0  # the call from which the next launch is to be timed
        source.request_timing()

    def after_call(self):
        """After a call: the device seconds of the timed launch if it has run (first kernel's start to last
        kernel's end), else nothing."""
        self._calls += 1
        if self._calls % LAUNCH_CHECK_EVERY:
            return ()
        launch = self._source.last_launch
        if launch is None or launch is self._read:  # nothing new to read: time a launch once it is time to
            if self._calls >= self._request_at:
                self._source.request_timing()
            return ()
        first, last = launch
        status = last.command_execution_status
        if status > self._complete:  # queued, submitted or running
            return ()
        self._read = launch
        self._request_at = self._calls + TIME_EVERY
        if status < 0:  # the launch failed: no time to read (its fault surfaces on the next use)
            return ()
        return (self._span_seconds(first, last),)

    def before_call(self):
        """Before a call the slow path will wait for: its launch is timed. Returns a token for
        ``wait_for_call``."""
        self._source.request_timing()
        return self._source.last_launch

    def wait_for_call(self, token):
        """The device seconds of the launch of the call made after ``before_call`` returned ``token``,
        waiting for it; None if that call launched nothing (a fallback, an empty output)."""
        launch = self._source.last_launch
        if launch is None or launch is token:
            return None
        self._read = launch
        self._request_at = self._calls + TIME_EVERY
        first, last = launch
        last.wait()
        return self._span_seconds(first, last)


class OpenCLExecutor(Executor):
    """One OpenCL device through Sparkle's OpenCL backend; faults are raised, not hidden by a fallback.

    On a GPU, building a kernel is taken to block the device's other calls: NVIDIA's driver held a 64-byte
    copy up to 287 ms while another thread built a conv kernel (H200, driver 580); PoCL did not."""

    writes_parts_in_place = True

    def __init__(self, device):
        from .. import cache
        from ..opencl import codegen

        self.device = device
        self.id = device.id
        self.kind = device.kind
        self.name = device.name
        # The unit keeps two identical GPUs apart: each is profiled and modelled on its own.
        self.identity = (f"{device.identity}|unit={getattr(device, 'unit', '#0')}"
                         f"|kernels={cache.digest(codegen.template(), codegen.TEMPLATE_VERSION)[:16]}")
        self.builds_block_calls = device.kind == "gpu"
        self._compile_seconds = None

    def holds(self, operand):
        return isinstance(operand, DeviceArray) and operand._device is self.device

    def launch_timer(self, prepared):
        return LaunchTimer(prepared.source) if prepared.source is not None else None

    def prepare(self, op, spec):
        from ..opencl import backend

        factory = backend.prepare_conv2d if op == "conv2d" else backend.prepare_matmul
        prepared = factory(spec, self.device, on_fault="raise")
        return PreparedCall(prepared, self.id, source=prepared, into=prepared.into)

    def host_array(self, shape, dtype):
        from ..opencl.pinned import result_pool

        return result_pool(self.device).empty(shape, dtype)

    def transfer_seconds(self, nbytes):
        import pyopencl as cl

        from ..opencl import staging
        from ..opencl.pinned import result_pool

        host = np.ones(max(1, nbytes // 4), np.float32)
        back = result_pool(self.device).empty(host.shape, host.dtype)  # where results land: pinned on a GPU
        buffer = self.device.pool_buffer(host.nbytes)
        try:
            queue = self.device.queue
            staging.write(self.device, buffer, host)  # first touch
            queue.finish()
            up = down = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                staging.write(self.device, buffer, host)  # as uploads go: staged through pinned memory on a GPU
                queue.finish()
                up = min(up, time.perf_counter() - start)
                start = time.perf_counter()
                cl.enqueue_copy(queue, back, buffer, is_blocking=True)
                down = min(down, time.perf_counter() - start)
        finally:
            self.device.pool.give(buffer)
        if not np.array_equal(back, host):
            raise DeviceFault(f"{self.id}: a buffer read back differs from what was written")
        return up, down

    def compile_seconds(self):
        """Build the default conv2d kernel of a shape no cache holds (a fresh program, not stored)."""
        import pyopencl as cl

        from ..opencl import codegen
        from ..opencl.tuning import space

        workload = codegen.Workload(batch=1, in_channels=16, height=12, width=12, out_channels=16, kernel_h=3,
                                    kernel_w=3, stride_h=1, stride_w=1, pad_top=1, pad_bottom=1, pad_left=1,
                                    pad_right=1, dilation_h=1, dilation_w=1, groups=1, out_h=12, out_w=12,
                                    dtype="float32")
        source = codegen.render(workload, dict(space.DEVICE_DEFAULTS[self.kind]))
        source += f"\n// scheduler compile probe {time.time_ns()}\n"  # a source no cache has seen
        start = time.perf_counter()
        cl.Program(self.device.context, source).build(devices=[self.device.cl_device])
        return time.perf_counter() - start


class SimulatedDevice(Executor):
    """A device for testing the scheduler: computes with the CPU backend on one thread, then waits until its modelled
    time (``overhead + flops / flops_per_second``, plus transfers at ``transfer_bytes_per_second``) has
    passed, so its speed is known exactly.

    ``compile_seconds``: each prepared call is built first (by its first call, or ahead of it), taking
    that long, as a GPU kernel of a new shape does; with ``builds_block`` every other call waits meanwhile,
    as on NVIDIA's OpenCL driver. ``first_call_seconds``: each prepared call's first run takes that much
    longer, as a GPU's first launch of a kernel loads its module.

    Faults and slowdowns: :meth:`slow_down` and :meth:`fail` change it from now on; ``slow_after`` /
    ``fail_after`` do the same after that many calls (its profile's probes count: about 55 calls).
    ``wrong`` plants a wrong kernel: ``"conv2d"``, ``"matmul"`` or True (both) compute the last output column
    wrong, as an edge-handling bug would.
    """

    kind = "simulated"

    def __init__(self, name, flops_per_second, overhead=20e-6, *, transfer_bytes_per_second=None,
                 slow_after=None, slow_factor=1.0, fail_after=None, wrong=False, compile_seconds=0.0,
                 builds_block=False, first_call_seconds=0.0):
        if wrong not in (False, True, "conv2d", "matmul"):
            raise ValueError(f"wrong must be False, True, 'conv2d' or 'matmul', got {wrong!r}")
        self.id = f"sim:{name}"
        self.name = f"simulated {name}"
        self.identity = (f"simulated|{name}|{flops_per_second}|{overhead}|{transfer_bytes_per_second}|{wrong}"
                         f"|{compile_seconds}|{first_call_seconds}")
        self._compile_seconds = float(compile_seconds)
        self.first_call_seconds = float(first_call_seconds)
        self.builds_block_calls = bool(builds_block)
        self._device_lock = threading.Lock()  # held by a blocking build, taken by every call
        self.flops_per_second, self.overhead = flops_per_second, overhead
        self.transfer_bytes_per_second = transfer_bytes_per_second
        self.slow_after, self.slow_factor, self.fail_after, self.wrong = slow_after, slow_factor, fail_after, wrong
        self.calls = 0
        self.builds = []  # (op, the thread that built it), for tests
        self._lock = threading.Lock()

    def slow_down(self, factor):
        """Every later call takes ``factor`` times its modelled compute time."""
        self.slow_after, self.slow_factor = self.calls, float(factor)

    def fail(self):
        """Every later call raises :class:`DeviceFault`."""
        self.fail_after = self.calls

    def compile_seconds(self):
        return self._compile_seconds

    def transfer_seconds(self, nbytes):
        if not self.transfer_bytes_per_second:
            return 0.0, 0.0
        seconds = nbytes / self.transfer_bytes_per_second
        return seconds, seconds

    def prepare(self, op, spec):
        run, variant, _ = _cpu_call(op, spec, serial=True)  # one thread: a busy machine stalls it least
        flops = spec.flops
        moved = 0
        if self.transfer_bytes_per_second:
            itemsize = spec.dtype.itemsize
            moved = (spec.batch * spec.in_channels * spec.height * spec.width + spec.out_channels * spec.reduction
                     + int(np.prod(spec.output_shape)) if op == "conv2d" else
                     spec.m * spec.k + spec.k * spec.n + spec.m * spec.n) * itemsize
        planted = self.wrong is True or self.wrong == op
        build_lock = threading.Lock()
        first_call = [self.first_call_seconds]  # spent by this prepared call's first run

        def build():
            with build_lock:
                if not prepared.compiled:
                    if self.builds_block_calls:
                        with self._device_lock:
                            time.sleep(self._compile_seconds)
                    else:
                        time.sleep(self._compile_seconds)
                    self.builds.append((op, threading.current_thread().name))
                    prepared.compiled = True

        def simulated(*operands):
            if not prepared.compiled:
                build()
            if self.builds_block_calls:
                with self._device_lock:  # waits while another of this device's kernels builds
                    pass
            start = time.perf_counter()
            with self._lock:
                self.calls += 1
                calls = self.calls
            if self.fail_after is not None and calls > self.fail_after:
                raise DeviceFault(f"{self.id}: simulated fault (call {calls})")
            result = run(*operands)
            if planted and result.size:
                result = result.copy()
                result[..., -1] += 1.0 + np.abs(result[..., -1])
            slow = self.slow_factor if self.slow_after is not None and calls > self.slow_after else 1.0
            target = self.overhead + slow * flops / self.flops_per_second
            if first_call:
                target += first_call.pop()
            if moved:
                target += moved / self.transfer_bytes_per_second
            remaining = target - (time.perf_counter() - start)
            if remaining > 0:
                time.sleep(remaining)
            return result

        prepared = PreparedCall(simulated, f"{self.id} {'planted-wrong' if planted else variant}",
                                compiled=self._compile_seconds == 0, builder=build)
        return prepared
