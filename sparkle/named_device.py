"""Calls that name their device (``device="cpu"``, ``"opencl:0"``): what a repeated signature needs, kept.

Validating the arguments, resolving the device and preparing the CPU kernel cost ~100 us of host time on a
2-core VM, against ~10 us for the prepared call itself: the latest KEPT signatures (signature.py's key and the
device asked for) keep their validated spec, their device and a call that runs them. The CPU's is a prepared
call (cpu/prepared.py) per Numba thread count, which its plan depends on; an OpenCL device's goes through the
OpenCL backend's own kept prepared calls, which also follow its tuning database. A signature not kept takes
the whole path and is kept. "auto" is the scheduler's and "reference" is not kept.
"""

from __future__ import annotations

import collections
import threading

import numba
import numpy as np

from . import api, reference, signature
from .cpu import backend as cpu_backend
from .device_array import to_host
from .devices import resolve_device

# A kept CPU call holds its scratch (0.1-0.4 MiB on 2 threads, up to ~3 MiB on 16, for ResNet-50's layers): 64
# signatures cover a network's distinct layers, as the OpenCL backend's 64 kept calls do.
KEPT = 64
_kept = collections.OrderedDict()
_lock = threading.Lock()


def conv2d(x, w, bias, device, stride, padding, dilation, groups, activation):
    """sparkle.conv2d(x, w, bias, ..., device=device) for a device other than "auto" (arguments by position: the
    hot path)."""
    try:
        key = (device, signature.conv2d_key(x, w, bias, stride, padding, dilation, groups, activation))
        runner = _kept.get(key)
    except (AttributeError, TypeError):  # not arrays, or unhashable arguments: validation says why
        key, runner = None, None
    if runner is None:
        arguments = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation=activation)
        spec = api.conv2d_spec(x, w, bias, **arguments)
        target = resolve_device(device, (x, w, bias))
        if target == "reference":
            result = reference.conv2d(to_host(x), to_host(w), to_host(bias), **arguments)
            return np.ascontiguousarray(result, dtype=spec.dtype)
        runner = _keep(key, _conv2d_runner(spec, target, (x, w, bias)))
    return runner(x, w, bias)


def matmul(a, b, device):
    """sparkle.matmul(a, b, device=device) for a device other than "auto"."""
    try:
        key = (device, signature.matmul_key(a, b))
        runner = _kept.get(key)
    except (AttributeError, TypeError):
        key, runner = None, None
    if runner is None:
        spec = api.matmul_spec(a, b)
        target = resolve_device(device, (a, b))
        if target == "reference":
            return np.ascontiguousarray(reference.matmul(to_host(a), to_host(b)), dtype=spec.dtype)
        runner = _keep(key, _matmul_runner(spec, target, (a, b)))
    return runner(a, b)


def forget():
    """Drop every kept signature (tests that change a backend's internals between calls)."""
    with _lock:
        _kept.clear()


def _conv2d_runner(spec, target, operands):
    if target == "cpu":
        if all(o is None or isinstance(o, np.ndarray) for o in operands):
            return _PreparedPerThreadCount(cpu_backend.prepare_conv2d, spec)
        return lambda x, w, bias: cpu_backend.conv2d(to_host(x), to_host(w), to_host(bias), spec)
    from .opencl import backend as opencl_backend

    return lambda x, w, bias: opencl_backend.conv2d(x, w, bias, spec, target)


def _matmul_runner(spec, target, operands):
    if target == "cpu":
        if all(isinstance(o, np.ndarray) for o in operands):
            return _PreparedPerThreadCount(cpu_backend.prepare_matmul, spec)
        return lambda a, b: cpu_backend.matmul(to_host(a), to_host(b), spec)
    from .opencl import backend as opencl_backend

    return lambda a, b: opencl_backend.matmul(a, b, spec, target)


class _PreparedPerThreadCount:
    """The CPU's prepared call of a spec for Numba's thread count at each call (``numba.set_num_threads``)."""

    __slots__ = ("by_threads", "prepare", "spec")

    def __init__(self, prepare, spec):
        self.prepare, self.spec, self.by_threads = prepare, spec, {}

    def __call__(self, *operands):
        threads = _thread_count()
        prepared = self.by_threads.get(threads)
        if prepared is None:
            prepared = self.by_threads.setdefault(threads, self.prepare(self.spec))
        return prepared(*operands)


def _thread_count():
    """``numba.get_num_threads()`` (per calling thread), without its checks on every call: 0.4 us, not 2.6, on the
    2-core VM. Its threading layer's reader exists once Numba's pool is launched; the public call launches it."""
    global _thread_count
    from numba.np.ufunc import parallel

    threads = numba.get_num_threads()
    reader = getattr(parallel, "_get_num_threads", None)
    if callable(reader) and reader() == threads:
        _thread_count = _checked_reader(reader)
    return threads


def _checked_reader(reader):
    def thread_count():
        threads = reader()
        return threads if threads > 0 else numba.get_num_threads()  # numba's call says what went wrong

    return thread_count


def _keep(key, runner):
    if key is not None:
        with _lock:
            _kept[key] = runner
            while len(_kept) > KEPT:
                _kept.popitem(last=False)
    return runner
