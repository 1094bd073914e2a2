"""The OpenCL backend: runs validated conv2d and matmul calls on one OpenCL device.

Parameters come from the tuning database (this workload, else the nearest tuned shape) or the device
kind's defaults. A fault (build failure, launch beyond device resources, out of memory, lost device)
makes the call run on the Numba CPU backend instead, with a warning naming the cause; the variant that
failed is not tried again for that workload in this process.

``prepare_conv2d``/``prepare_matmul`` decide all of that once for a call signature and return a callable
(see ``prepared.py``); ``conv2d``/``matmul`` prepare for the one call they make.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import warnings

from .. import cache
from . import buildlog, transfer
from .tuning import database, space
from .tuning.relatives import DeviceTraits


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
    """(params, source): tuned, nearest tuned shape, a tuned relative's, or defaults; (None, reason) if no
    variant is left."""
    limits = space.DeviceLimits.of(device)
    excluded = failed_variants(device, workload)
    params, source = database.lookup(device.identity, workload, limits, excluded, traits=DeviceTraits.of(device))
    if params is not None:
        return params, source
    params = space.default_params(workload, limits, device.kind, {space.identity(p) for p in excluded})
    if params is not None:
        return params, "default"
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


class OpenCLFault(RuntimeError):
    """A prepared call made with ``on_fault="raise"`` could not run on its device; ``cause`` says why.

    The variant that faulted is excluded as after a fallback; the prepared call chose another already.
    """

    def __init__(self, device, cause):
        super().__init__(f"{device.id} ({device.name}): {cause}")
        self.device_id, self.cause = device.id, cause


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _caller_stacklevel():
    """The stacklevel, for a warning issued by this function's caller, of the first frame outside Sparkle
    (the line that called sparkle.conv2d, matmul or a prepared call, however many Sparkle frames are between)."""
    frame, level = sys._getframe(2), 2  # level 1 is the caller, which warns
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def _fallback(device, cause, run_on_cpu, to_device):
    warnings.warn(f"{device.id} ({device.name}): {cause}; this call ran on the Numba CPU backend instead",
                  OpenCLFallbackWarning, stacklevel=_caller_stacklevel())
    result = run_on_cpu()
    if to_device:
        try:
            return transfer.upload(device, result, result.dtype)
        except Exception:  # noqa: BLE001 (the device is gone, however it says so: the host result is right)
            return result
    return result


def prepare_conv2d(spec, device, *, on_fault="fallback"):
    """A callable ``prepared(x, w, bias)`` for conv2d calls of ``spec`` on the runtime OpenCL ``device``,
    with ``variant``, ``compiled``, ``on_device``, ``build()`` and ``quarantine()`` (see ``prepared.py``).

    It does not build: ``build()`` does, else the first call. Results as :func:`conv2d`: numpy operands give
    a numpy array, any DeviceArray operand a DeviceArray. ``on_fault``: "fallback" (run on the CPU backend
    with an OpenCLFallbackWarning) or "raise" (:class:`OpenCLFault`).
    """
    from .prepared import PreparedConv2d

    return PreparedConv2d(spec, device, on_fault=on_fault)


def prepare_matmul(spec, device, *, on_fault="fallback"):
    """A callable ``prepared(a, b)`` for matmul calls of ``spec``; otherwise as :func:`prepare_conv2d`."""
    from .prepared import PreparedMatmul

    return PreparedMatmul(spec, device, on_fault=on_fault)


def conv2d(x, w, bias, spec, device):
    from .prepared import PreparedConv2d

    return _kept_call(PreparedConv2d, spec, device)(x, w, bias)


def matmul(a, b, spec, device):
    from .prepared import PreparedMatmul

    return _kept_call(PreparedMatmul, spec, device)(a, b)


# sparkle.conv2d / matmul on an OpenCL device: the prepared call of each recent signature, kept so that a call
# neither looks its parameters up in the tuning database again (0.05-0.6 ms) nor renders its kernels' sources
# (0.5 ms for Winograd's four), and resident operands take the prepared call's direct path. A tuning result
# recorded in this process (database.generation), other device limits, another cache directory, or another
# choose_params, template or renderer (a test's stand-in) makes new ones; a database another process changes
# meanwhile is read by signatures not kept.
KEPT_CALLS = 64
_kept_calls = collections.OrderedDict()
_kept_lock = threading.Lock()


def _kept_call(factory, spec, device):
    from . import codegen

    key = (factory, spec, device, space.DeviceLimits.of(device), database.generation(), cache.cache_dir(),
           choose_params, codegen.template, codegen.render)
    with _kept_lock:
        prepared = _kept_calls.get(key)
        if prepared is not None:
            _kept_calls.move_to_end(key)
            return prepared
    prepared = factory(spec, device)
    with _kept_lock:
        _kept_calls[key] = prepared
        while len(_kept_calls) > KEPT_CALLS:
            _kept_calls.popitem(last=False)
    return prepared


def forget_kept_calls():
    """Drop the kept prepared calls (tests that change the backend's internals between calls)."""
    with _kept_lock:
        _kept_calls.clear()


__all__ = ["OpenCLFallbackWarning", "OpenCLFault", "choose_params", "conv2d", "failed_variants", "matmul",
           "prepare_conv2d", "prepare_matmul"]
