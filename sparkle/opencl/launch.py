"""Build and enqueue one generated kernel on one device; the only place that calls the kernel."""

from __future__ import annotations

from . import codegen


def kernel_for(device, workload, params, has_bias, relu):
    source = codegen.render(workload, params, has_bias=has_bias, relu=relu)
    return device.kernel(source, "conv2d")


def enqueue(device, workload, params, x_buf, w_buf, bias_buf, out_buf, *, has_bias, relu, wait_for=None):
    """Run the kernel for ``workload`` with ``params`` on buffers already on ``device``; returns the event."""
    kernel = kernel_for(device, workload, params, has_bias, relu)
    global_size, local_size = codegen.launch_geometry(workload, params)
    with device.launch_lock:
        return kernel(device.queue, global_size, local_size, x_buf, w_buf, bias_buf, out_buf, wait_for=wait_for)


def event_seconds(event):
    event.wait()
    return (event.profile.end - event.profile.start) * 1e-9
