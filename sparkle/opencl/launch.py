"""Build and enqueue one generated kernel variant on one device; the only place that launches the kernels.

A split-K variant (KSPLIT > 1) is two kernels on the device's in-order queue: the slices write their partial
sums into a workspace, then ``reduce_slices`` adds them in slice order into the output. The workspace comes
from the device's buffer pool and goes back as soon as both are enqueued: the queue is in order, so a later
call that takes it runs after this call's reduction.
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
        return (self.last.profile.end - self.first.profile.start) * 1e-9


def kernel_for(device, workload, params, has_bias, relu, name="conv2d"):
    source = codegen.render(workload, params, has_bias=has_bias, relu=relu)
    return device.kernel(source, name)


def workspace_bytes(workload, params):
    """Bytes of split-K's partial sums (0 for a variant without split)."""
    slices = codegen.split_slices(params)
    itemsize = 8 if workload.dtype == "float64" else 4
    return slices * codegen.output_size(workload) * itemsize if slices > 1 else 0


def enqueue(device, workload, params, x_buf, w_buf, bias_buf, out_buf, *, has_bias, relu, wait_for=None):
    """Run the variant for ``workload`` with ``params`` on buffers already on ``device``; returns a Span."""
    kernel = kernel_for(device, workload, params, has_bias, relu)
    global_size, local_size = codegen.launch_geometry(workload, params)
    if codegen.split_slices(params) == 1:
        with device.launch_lock:
            event = kernel(device.queue, global_size, local_size, x_buf, w_buf, bias_buf, out_buf,
                           wait_for=wait_for)
        return Span(event, event)
    reduce = kernel_for(device, workload, params, has_bias, relu, codegen.REDUCE_KERNEL)
    reduce_global, reduce_local = codegen.reduce_geometry(workload)
    workspace = device.pool_buffer(workspace_bytes(workload, params))
    try:
        with device.launch_lock:
            first = kernel(device.queue, global_size, local_size, x_buf, w_buf, bias_buf, workspace,
                           wait_for=wait_for)
            last = reduce(device.queue, reduce_global, reduce_local, workspace, bias_buf, out_buf)
    finally:
        device.pool.give(workspace)
    return Span(first, last)


def event_seconds(span):
    """Device time of a launch (a Span, or one event)."""
    if isinstance(span, Span):
        return span.seconds
    span.wait()
    return (span.profile.end - span.profile.start) * 1e-9
