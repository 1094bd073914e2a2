"""Build and enqueue one generated kernel variant on one device (``codegen.launch_plan``'s steps, in order on
the device's in-order queue): the path of the tuner (which times each candidate over up to 50 launches) and of
the health check.
Prepared calls (prepared.py: ``sparkle.conv2d`` on an OpenCL device, the scheduler) run the same plan with kernel
objects and workspaces of their own.
"""

from __future__ import annotations

from . import codegen


class Span:
    """The events of one launch: one kernel's, or split-K's slices and reduction."""

    def __init__(self, first, last):
        self.first, self.last = first, last

    def wait(self):
        self.last.wait()

    @property
    def seconds(self):
        """Device time from the first kernel's start to the last one's end (waits for it)."""
        self.last.wait()
        return span_seconds(self.first, self.last)


def span_seconds(first, last):
    """Seconds from ``first``'s start to ``last``'s end: events of kernels that have run (profiling queue)."""
    return (last.profile.end - first.profile.start) * 1e-9


def kernel_for(device, workload, params, has_bias, relu, name=codegen.MAIN_KERNEL):
    source = codegen.render(workload, params, has_bias=has_bias, relu=relu)
    return device.kernel(source, name)


def _steps(device, workload, params, has_bias, relu):
    """(the variant's launch plan, a kernel object per step), made once per variant on the device: rendering
    its sources again on every launch cost ~0.5 ms (Winograd's four kernels, H200 host), for every one of a
    tuning candidate's timed launches. The template, the renderer and the planner are part of the key, so
    another codegen (an edited template, a test's fault injection) never meets these kernels."""
    key = (workload, tuple(sorted(params.items())), has_bias, relu, codegen.template, codegen.render,
           codegen.launch_plan)
    steps = device.launch_kernels.get(key)
    if steps is None:
        plan = codegen.launch_plan(workload, params)
        steps = plan, [kernel_for(device, workload, params, has_bias, relu, step.kernel) for step in plan]
        device.launch_kernels[key] = steps
    return steps


def enqueue(device, workload, params, x_buf, w_buf, bias_buf, out_buf, *, has_bias, relu, wait_for=None):
    """Run the variant for ``workload`` with ``params`` on buffers already on ``device``; returns a Span
    (its events carry device times: the launch runs through ``device.timed``).

    Workspaces (split-K's partial sums, Winograd's transformed filters) come from the device's pool and go
    back once every step is enqueued: the queue is in order, so their next user runs after this call."""
    plan, kernels = _steps(device, workload, params, has_bias, relu)
    buffers = {"x": x_buf, "w": w_buf, "bias": bias_buf, "out": out_buf}
    taken = []
    try:
        for role, nbytes in codegen.workspaces(workload, params).items():
            buffers[role] = device.pool_buffer(nbytes)
            taken.append(buffers[role])

        def steps(queue, after):
            events = []
            for kernel, step in zip(kernels, plan):
                waits = [*(wait_for or ()), *(after or ())] if not events else None
                events.append(kernel(queue, step.global_size, step.local_size,
                                     *(buffers[role] for role in step.args), wait_for=waits or None))
            return events[0], events[-1]

        with device.launch_lock:
            first, last = device.timed(steps)  # every launch here is timed: on the profiling queue
    finally:
        for buffer in taken:
            device.pool.give(buffer)
    return Span(first, last)


def event_seconds(span):
    """Device time of a launch (a Span, or one event)."""
    if isinstance(span, Span):
        return span.seconds
    span.wait()
    return span_seconds(span, span)
