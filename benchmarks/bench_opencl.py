"""asv benchmarks: the OpenCL backend on every OpenCL device, with the data already on the device.

The timed calls take DeviceArrays and return one (no transfer), then wait for the device's queue to
finish, so a time is the kernel plus the call's host overhead. ``track_gflops`` reports that call's
speed (wall time, best of several calls); ``track_kernel_gflops`` the kernel's alone, from OpenCL
profiling events; ``time_*_from_host`` the same call on numpy arrays (upload and download included).

Kernel parameters come from the tuning database in Sparkle's cache directory, as for any call: run
``sparkle tune ...`` first to benchmark tuned kernels; without entries the device defaults run.
Shapes stay small (N = 1, a few ResNet-50 layers) so that a run on PoCL, a CPU OpenCL driver, is quick.
Every OpenCL device found when asv loads this file is a parameter; where pyopencl or the device is
missing, ``setup`` raises NotImplementedError, which asv reports as skipped.
"""

import numpy as np

import sparkle
from sparkle.timing import best_time
from sparkle.workloads import RESNET50_LAYERS, layer_flops, layer_inputs

LAYERS = {layer.name: layer for layer in RESNET50_LAYERS}
QUICK_LAYERS = ["conv1_7x7s2", "res2_3x3", "res4_1x1", "res5_3x3"]  # first layer, 3x3 and 1x1, 7x7 output
MATMUL_SIZES = [256, 1024]
GFLOPS_REPEAT = 10  # calls per track sample; the best is kept


def _device_ids():
    try:
        import pyopencl  # noqa: F401

        from sparkle.opencl import runtime
    except ImportError:
        return ["opencl:0"]  # a parameter still, so that setup can report the skip
    return [device.id for device in runtime.opencl_devices()] or ["opencl:0"]


DEVICES = _device_ids()


def _runtime_device(device_id):
    """The runtime device, or NotImplementedError (asv's skip) saying why there is none."""
    try:
        import pyopencl  # noqa: F401
    except ImportError as error:
        raise NotImplementedError(f"pyopencl is not installed ({error})") from None
    from sparkle.devices import opencl_unavailable_reason
    from sparkle.opencl import runtime

    device = runtime.opencl_device(device_id)
    if device is None:
        raise NotImplementedError(f"no OpenCL device {device_id}: {opencl_unavailable_reason() or 'not listed'}")
    return device


class _OnDevice:
    """Shared setup: operands on the device, the kernel built and run once outside the timing."""

    def _prepare(self, device_id, spec, image, weights, call, host_call):
        from sparkle.opencl import backend, launch, transfer
        from sparkle.opencl.codegen import Workload

        self.device = _runtime_device(device_id)
        self.workload = Workload.from_spec(spec)
        params, source = backend.choose_params(self.device, self.workload)
        if params is None:
            raise NotImplementedError(f"{device_id} cannot run {self.workload.key}: {source}")
        self.flops = self.workload.flops
        self.call, self.host_call = call, host_call
        # The kernel alone, on buffers of the same shapes (image = the im2col source, weights = A).
        image_dev, weights_dev = transfer.upload(self.device, image, image.dtype), transfer.upload(
            self.device, weights, weights.dtype)
        bias_dev = transfer.empty(self.device, (1,), image.dtype)
        out_dev = transfer.empty(self.device, spec.output_shape if hasattr(spec, "output_shape")
                                 else (spec.m, spec.n), image.dtype)
        self._kernel_buffers = (image_dev, weights_dev, bias_dev, out_dev)  # kept alive with their buffers

        def kernel():
            event = launch.enqueue(self.device, self.workload, params, image_dev.buffer, weights_dev.buffer,
                                   bias_dev.buffer, out_dev.buffer, has_bias=False, relu=False)
            return launch.event_seconds(event)

        self.kernel = kernel
        result = self.run()  # builds the program (or loads its binary) outside the timing
        if not isinstance(result, sparkle.DeviceArray):
            raise NotImplementedError(f"the call did not stay on {device_id} (fell back to the CPU backend?)")
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

        layer = LAYERS[name]
        x, w = layer_inputs(layer)
        kwargs = layer.conv_kwargs()
        _runtime_device(device_id)
        x_dev, w_dev = sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)
        self._prepare(device_id, api.conv2d_spec(x, w, **kwargs), x, w,
                      lambda: sparkle.conv2d(x_dev, w_dev, **kwargs),
                      lambda: sparkle.conv2d(x, w, **kwargs, device=device_id))
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
    params = [DEVICES, MATMUL_SIZES]
    param_names = ["device", "size"]
    timeout = 300

    def setup(self, device_id, size):
        from sparkle import api

        _runtime_device(device_id)
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        a_dev, b_dev = sparkle.to_device(a, device_id), sparkle.to_device(b, device_id)
        # matmul runs as a 1x1 conv of the (1, K, 1, N) image b with weights a.
        self._prepare(device_id, api.matmul_spec(a, b), b.reshape(1, size, 1, size), a,
                      lambda: sparkle.matmul(a_dev, b_dev), lambda: sparkle.matmul(a, b, device=device_id))

    def time_matmul(self, device_id, size):
        self.run()

    def time_matmul_from_host(self, device_id, size):
        self.host_call()

    def track_gflops(self, device_id, size):
        return self._gflops()

    track_gflops.unit = "GFLOPS"

    def track_kernel_gflops(self, device_id, size):
        return self._kernel_gflops()

    track_kernel_gflops.unit = "GFLOPS"
