"""The OpenCL backend: runs validated conv2d and matmul calls on one OpenCL device.

Parameters come from the tuning database (this workload, else the nearest tuned shape) or the device
kind's defaults. A fault (build failure, launch beyond device resources, out of memory, lost device)
makes the call run on the Numba CPU backend instead, with a warning naming the cause; the variant that
failed is not tried again for that workload in this process.
"""

from __future__ import annotations

import threading
import warnings

import numpy as np

from ..cpu import backend as cpu_backend
from ..device_array import DeviceArray, to_host
from . import buildlog, launch, transfer
from .codegen import Workload
from .tuning import database, space


class OpenCLFallbackWarning(RuntimeWarning):
    """An OpenCL call ran on the CPU backend instead; the message names the cause."""


_failed = {}  # (device identity, workload key) -> list of parameter sets that faulted
_failed_lock = threading.Lock()


def failed_variants(device, workload):
    with _failed_lock:
        return list(_failed.get((device.identity, workload.key), ()))


def _mark_failed(device, workload, params):
    with _failed_lock:
        _failed.setdefault((device.identity, workload.key), []).append(dict(params))


def choose_params(device, workload):
    """(params, source): tuned, nearest tuned shape, or defaults; (None, reason) if no variant is left."""
    limits = space.DeviceLimits.of(device)
    excluded = failed_variants(device, workload)
    params, source = database.lookup(device.identity, workload, limits, excluded)
    if params is not None:
        return params, source
    skip = {space.identity(p) for p in excluded}
    for params in (space.DEVICE_DEFAULTS[device.kind], space.complete({})):
        if space.identity(params) not in skip and not space.violations(params, workload, limits):
            return dict(params), "default"
    if workload.dtype == "float64" and not device.has_fp64:
        return None, f"{device.id} ({device.name}) has no float64 support"
    return None, "every variant for this workload failed on this device" if excluded else \
        "no kernel variant fits this device's limits"


def _fault_name(error, device):
    import pyopencl as cl

    text = buildlog.status_line(error) or type(error).__name__
    names = {cl.status_code.BUILD_PROGRAM_FAILURE: "the kernel failed to build",
             cl.status_code.OUT_OF_RESOURCES: "the launch exceeds the device's resources",
             cl.status_code.INVALID_WORK_GROUP_SIZE: "the launch exceeds the device's work-group limits",
             cl.status_code.MEM_OBJECT_ALLOCATION_FAILURE: "the device is out of memory",
             cl.status_code.OUT_OF_HOST_MEMORY: "the host is out of memory",
             cl.status_code.DEVICE_NOT_AVAILABLE: "the device was lost or is not available"}
    try:
        code = error.code
    except AttributeError:
        code = None
    if code == cl.status_code.BUILD_PROGRAM_FAILURE:
        return buildlog.fallback_cause(device, error)  # the reason is in the build log, not the status
    return f"{names.get(code, 'OpenCL error')} ({text})"


def _fallback(device, cause, run_on_cpu, to_device):
    warnings.warn(f"{device.id} ({device.name}): {cause}; this call ran on the Numba CPU backend instead",
                  OpenCLFallbackWarning, stacklevel=5)  # the line that called sparkle.conv2d/matmul
    result = run_on_cpu()
    if to_device:
        try:
            return transfer.upload(device, result, result.dtype)
        except Exception:  # the device is gone: the host result is still correct
            return result
    return result


def _run(device, workload, image, weights, bias, out_shape, relu, run_on_cpu):
    """Launch on ``device``, falling back to ``run_on_cpu`` on faults. Returns numpy or a DeviceArray."""
    import pyopencl as cl

    on_device = any(isinstance(a, DeviceArray) for a in (image, weights, bias))
    dtype = np.dtype(workload.dtype)
    if int(np.prod(out_shape)) == 0 or workload.gemm_k == 0:
        host = run_on_cpu()  # nothing to launch; sizes with zeros are exact on the host
        return transfer.upload(device, host, dtype) if on_device else host
    params, source = choose_params(device, workload)
    if params is None:
        return _fallback(device, source, run_on_cpu, on_device)
    largest = max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                  for shape in (image.shape, weights.shape, out_shape))
    if largest > device.max_alloc:
        return _fallback(device, f"a buffer of {largest / 2**20:.0f} MiB exceeds the device's largest allocation "
                                 f"({device.max_alloc / 2**20:.0f} MiB)", run_on_cpu, on_device)
    try:
        x_dev = transfer.upload(device, image, dtype)
        w_dev = transfer.upload(device, weights, dtype)
        b_dev = transfer.upload(device, bias, dtype) if bias is not None else transfer.empty(device, (1,), dtype)
        out = transfer.empty(device, out_shape, dtype)
        launch.enqueue(device, workload, params, x_dev.buffer, w_dev.buffer, b_dev.buffer, out.buffer,
                       has_bias=bias is not None, relu=relu)
        return out if on_device else out.get()
    except (cl.Error, MemoryError) as error:
        _mark_failed(device, workload, params)  # the next call tries the next variant
        cause = _fault_name(error, device) if isinstance(error, cl.Error) else f"the host is out of memory ({error})"
        return _fallback(device, cause, run_on_cpu, on_device)


def conv2d(x, w, bias, spec, device):
    workload = Workload.from_spec(spec)
    return _run(device, workload, x, w, bias, spec.output_shape, spec.activation == "relu",
                lambda: cpu_backend.conv2d(to_host(x), to_host(w), to_host(bias), spec))


def matmul(a, b, spec, device):
    workload = Workload.from_spec(spec)
    image = b.reshape(1, spec.k, 1, spec.n) if isinstance(b, DeviceArray) else b
    return _run(device, workload, image, a, None, (spec.m, spec.n), False,
                lambda: cpu_backend.matmul(to_host(a), to_host(b), spec))


__all__ = ["conv2d", "matmul", "choose_params", "OpenCLFallbackWarning", "failed_variants"]
