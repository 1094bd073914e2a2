"""asv benchmarks: the OpenCL backend on every OpenCL device, with the data already on the device.

The timed calls take DeviceArrays and return one (no transfer), then wait for the device's queue to
finish, so a time is the kernel plus the call's host overhead. ``track_gflops`` reports that call's
speed (wall time, best of several calls); ``track_kernel_gflops`` the kernel's alone, from OpenCL
profiling events; ``time_*_from_host`` the same call on numpy arrays (upload and download included).

Kernel parameters come from the tuning database in Sparkle's cache directory, as for any call: run
``sparkle tune ...`` first to benchmark tuned kernels; without entries the device defaults run.
Shapes stay small (N = 1, a few ResNet-50 layers) so that a run on PoCL, a CPU OpenCL driver, is quick.

Every OpenCL device that ``sparkle.devices()`` lists when asv loads this file is a parameter ("opencl:0"
alone when there is none). ``setup`` builds the kernel, runs both calls once and checks their results
against ``sparkle.reference``; it raises NotImplementedError, which asv reports as skipped, when the device
is missing or unavailable (pyopencl not installed, a driver that cannot run Sparkle's kernels) or when a
call falls back to the CPU backend (``OpenCLFallbackWarning``): a time of the CPU backend under an OpenCL
device's name would be a wrong measurement.
"""

import warnings

import numpy as np

import sparkle
from sparkle.timing import best_time
from sparkle.workloads import RESNET50_LAYERS, layer_flops, layer_inputs

from . import check_conv2d, check_matmul

LAYERS = {layer.name: layer for layer in RESNET50_LAYERS}
QUICK_LAYERS = ["conv1_7x7s2", "res2_3x3", "res4_1x1", "res5_3x3"]  # first layer, 3x3 and 1x1, 7x7 output
MATMUL_SHAPES = {f"{n}x{n}x{n}": (n, n, n) for n in (256, 1024)}  # id -> (M, K, N)
GFLOPS_REPEAT = 10  # calls per track sample; the best is kept
NO_DEVICE = "opencl:0"  # the parameter when Sparkle lists no OpenCL device, so that setup can say why


def _device_ids():
    try:
        found = [device.id for device in sparkle.devices() if device.id.startswith("opencl:")]
    except Exception:  # a broken driver must not stop asv from loading the CPU suites;
        found = []  # setup calls sparkle.devices() again and fails there, with the traceback
    return found or [NO_DEVICE]


DEVICES = _device_ids()


def opencl_device(device_id):
    """The runtime OpenCLDevice for ``device_id``, or NotImplementedError (asv's skip) saying why it cannot run."""
    described = {device.id: device for device in sparkle.devices()}.get(device_id)
    if described is None:
        from sparkle.devices import opencl_unavailable_reason

        raise NotImplementedError(f"Sparkle lists no OpenCL device {device_id}: "
                                  f"{opencl_unavailable_reason() or 'the driver lists fewer devices'}")
    if not described.available:
        raise NotImplementedError(f"{device_id} ({described.name}) is unavailable: {described.reason}")
    from sparkle.opencl import runtime

    device = runtime.opencl_device(device_id)
    if device is None:
        raise NotImplementedError(f"the OpenCL runtime no longer lists {device_id}")
    return device


def on_device_or_skip(call, what):
    """``call()``, or NotImplementedError if it fell back to the CPU backend (an OpenCLFallbackWarning)."""
    from sparkle.opencl.backend import OpenCLFallbackWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)  # raised where the backend would warn
        try:
            return call()
        except OpenCLFallbackWarning as fallback:
            raise NotImplementedError(f"{what} does not run on the device: {fallback}") from None


class _OnDevice:
    """Shared setup: operands on the device, the kernel built, run once and checked outside the timing."""

    def _prepare(self, device, label, spec, image, weights, call, host_call, check):
        """``label``: the workload in words; ``call``: the timed call on DeviceArrays; ``host_call``: the same
        call on numpy arrays; ``check(result, what)``: AssertionError unless a result is right. ``image`` and
        ``weights`` are the kernel's operands (the im2col source and the A matrix) for ``track_kernel_gflops``."""
        from sparkle.opencl import backend, launch, transfer
        from sparkle.opencl.codegen import Workload

        self.device = device
        workload = Workload.from_spec(spec)
        params, source = backend.choose_params(device, workload)
        if params is None:
            raise NotImplementedError(f"{device.id} cannot run {label}: {source}")
        self.flops = workload.flops
        self.call, self.host_call = call, host_call
        # Builds the program (or loads its binary) outside the timing.
        check(on_device_or_skip(self.run, f"{label} on {device.id}"), f"{label} on {device.id}")
        check(on_device_or_skip(host_call, f"{label} from the host on {device.id}"),
              f"{label} from the host on {device.id}")
        # The kernel alone, on buffers of the same shapes, with the parameters the calls just ran.
        image_dev = transfer.upload(device, image, image.dtype)
        weights_dev = transfer.upload(device, weights, weights.dtype)
        bias_dev = transfer.empty(device, (1,), image.dtype)
        out_dev = transfer.empty(device, spec.output_shape if hasattr(spec, "output_shape") else (spec.m, spec.n),
                                 image.dtype)
        self._kernel_buffers = (image_dev, weights_dev, bias_dev, out_dev)  # kept alive with their buffers

        def kernel():
            event = launch.enqueue(device, workload, params, image_dev.buffer, weights_dev.buffer, bias_dev.buffer,
                                   out_dev.buffer, has_bias=False, relu=False)
            return launch.event_seconds(event)

        self.kernel = kernel
        kernel()

    def run(self):
        result = self.call()
        self.device.queue.finish()
        return result

    def _gflops(self):
        return self.flops / best_time(self.run, GFLOPS_REPEAT) / 1e9

    def _kernel_gflops(self):
        return self.flops / min(self.kernel() for _ in range(GFLOPS_REPEAT)) / 1e9


class Conv2dOpenCL(_OnDevice):
    params = [DEVICES, QUICK_LAYERS]
    param_names = ["device", "layer"]
    timeout = 300

    def setup(self, device_id, name):
        from sparkle import api

        device = opencl_device(device_id)
        layer = LAYERS[name]
        x, w = layer_inputs(layer)
        kwargs = layer.conv_kwargs()
        x_dev, w_dev = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
        self._prepare(device, f"conv2d {name}", api.conv2d_spec(x, w, **kwargs), x, w,
                      lambda: sparkle.conv2d(x_dev, w_dev, **kwargs),
                      lambda: sparkle.conv2d(x, w, **kwargs, device=device_id),
                      lambda result, what: check_conv2d(result, x, w, kwargs, what))
        assert self.flops == layer_flops(layer, x, w)

    def time_conv2d(self, device_id, name):
        self.run()

    def time_conv2d_from_host(self, device_id, name):
        self.host_call()

    def track_gflops(self, device_id, name):
        return self._gflops()

    track_gflops.unit = "GFLOPS"

    def track_kernel_gflops(self, device_id, name):
        return self._kernel_gflops()

    track_kernel_gflops.unit = "GFLOPS"


class MatmulOpenCL(_OnDevice):
    params = [DEVICES, list(MATMUL_SHAPES)]
    param_names = ["device", "shape"]
    timeout = 300

    def setup(self, device_id, shape):
        from sparkle import api

        device = opencl_device(device_id)
        m, k, n = MATMUL_SHAPES[shape]
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        a_dev, b_dev = sparkle.to_device(a, device_id), sparkle.to_device(b, device_id)
        # matmul runs as a 1x1 conv of the (1, K, 1, N) image b with weights a.
        self._prepare(device, f"matmul {shape}", api.matmul_spec(a, b), b.reshape(1, k, 1, n), a,
                      lambda: sparkle.matmul(a_dev, b_dev), lambda: sparkle.matmul(a, b, device=device_id),
                      lambda result, what: check_matmul(result, a, b, what))

    def time_matmul(self, device_id, shape):
        self.run()

    def time_matmul_from_host(self, device_id, shape):
        self.host_call()

    def track_gflops(self, device_id, shape):
        return self._gflops()

    track_gflops.unit = "GFLOPS"

    def track_kernel_gflops(self, device_id, shape):
        return self._kernel_gflops()

    track_kernel_gflops.unit = "GFLOPS"
