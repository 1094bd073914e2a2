"""The compute devices Sparkle can run on, and resolution of the ``device=`` argument."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Device:
    id: str  # what ``device=`` accepts
    name: str
    vendor: str
    kind: str  # "cpu" or "gpu"
    compute_units: int
    memory: int  # bytes
    available: bool = True  # False when the device cannot build and run Sparkle's test kernel
    reason: str | None = None  # why it is unavailable, in words (None when available)
    isa: str | None = None  # the CPU backend's vector instruction set (cpu device only)


def _cpu_identity():
    """(model name, vendor) from the first processor in /proc/cpuinfo, else from ``platform``."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():  # end of the first processor's block
                    break
    except OSError:
        pass
    return (fields.get("model name") or platform.processor() or platform.machine(),
            fields.get("vendor_id", "unknown"))


def _physical_memory():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@lru_cache(maxsize=1)
def _cpu_device():
    import numba

    from .cpu.isa import active_isa

    name, vendor = _cpu_identity()
    return Device(id="cpu", name=name, vendor=vendor, kind="cpu", compute_units=numba.config.NUMBA_NUM_THREADS,
                  memory=_physical_memory(), isa=active_isa().name)


def _opencl_devices():
    from .opencl import runtime

    return runtime.opencl_devices()


def opencl_unavailable_reason():
    """None when OpenCL can be used, else why not (pyopencl missing, disabled by SPARKLE_OPENCL=0, no devices)."""
    from .opencl import runtime

    reason = runtime.unavailable_reason()
    if reason is None and not runtime.opencl_devices():
        reason = "no OpenCL platform reports a device (is an ICD such as PoCL installed?)"
    return reason


def _health(device):
    from .opencl import health

    return health.check(device)


def _describe(device):
    verdict = _health(device)
    return Device(id=device.id, name=device.name, vendor=device.vendor, kind=device.kind,
                  compute_units=device.compute_units, memory=device.memory, available=verdict.available,
                  reason=verdict.reason)


def devices():
    """Every device Sparkle can run on: the Numba CPU backend, then each OpenCL device of every platform."""
    return [_cpu_device(), *(_describe(d) for d in _opencl_devices())]


# "reference" is the float64 oracle: always available, never fast. "opencl" is the first available OpenCL
# GPU, else the first available OpenCL device (never a simulator).
PSEUDO_DEVICES = ("auto", "reference", "opencl")


def available_device_ids():
    return [*PSEUDO_DEVICES, *(d.id for d in devices())]


def opencl_backend_device(device_id):
    """The runtime object of an OpenCL device id ("opencl" or "opencl:N"); ValueError saying why if none."""
    found = _opencl_devices()
    if device_id == "opencl":
        return _first_available(found)
    for device in found:
        if device.id == device_id:
            verdict = _health(device)
            if not verdict.available:
                raise ValueError(f"device {device_id!r} ({device.name}) is unavailable: {verdict.reason}")
            return device
    reason = opencl_unavailable_reason()
    raise ValueError(f"device must be one of {available_device_ids()}, got {device_id!r}"
                     + (f" (OpenCL: {reason})" if reason else ""))


def _first_available(found):
    """The first available OpenCL GPU, else the first available OpenCL device; ValueError saying why if none.

    Devices are checked in that order and only until one is available (a check builds a kernel once).
    """
    real = [d for d in found if not d.simulator]
    if not real:
        reason = opencl_unavailable_reason() or "only simulators are listed, and 'opencl' never picks one"
        raise ValueError(f"device='opencl' is not available: {reason}")
    reasons = []
    for device in sorted(real, key=lambda d: d.kind != "gpu"):  # stable: GPUs first, each in listed order
        verdict = _health(device)
        if verdict.available:
            return device
        reasons.append(f"\n  {device.id} ({device.name}): {verdict.reason}")
    raise ValueError("device='opencl' is not available: no OpenCL device can run Sparkle's kernels:"
                     + "".join(reasons))


def opencl_device_ids():
    """Ids ("opencl:N") of every listed OpenCL device, available or not."""
    return [device.id for device in _opencl_devices()]


def available_opencl_ids():
    """Ids ("opencl:N") of the OpenCL devices that passed Sparkle's health check, in listed order."""
    return [device.id for device in _opencl_devices() if _health(device).available]


def no_opencl_device_reason():
    """Why no OpenCL device is available: OpenCL itself is unavailable, or each device failed its check."""
    reasons = [f"{device.id} ({device.name}) is unavailable: {_health(device).reason}"
               for device in _opencl_devices()]
    return opencl_unavailable_reason() or "; ".join(reasons) or "no OpenCL device is listed"


def resolve_tuning_device(device):
    """The runtime object of the OpenCL device ``device`` names, for tuning (which runs only there).

    Accepts "opencl" and the ids of available OpenCL devices; the ValueError for anything else lists only
    those (never "cpu", "auto" or "reference", which tuning refuses), or says why there are none.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a string, 'opencl' or 'opencl:N', got {device!r}")
    if device == "opencl" or device in opencl_device_ids():
        return opencl_backend_device(device)  # says why if it (or every device, for "opencl") is unavailable
    accepted = available_opencl_ids()
    if not accepted:
        raise ValueError(f"device must be an available OpenCL device to tune, got {device!r}, and there is none: "
                         f"{no_opencl_device_reason()}")
    why = " (the cpu backend is not tuned: it takes its tiles from the cache sizes)" if device == "cpu" else ""
    raise ValueError(f"device must be an OpenCL device to tune, one of {['opencl', *accepted]}, "
                     f"got {device!r}{why}")


def resolve_device(device, operands=()):
    """Map a ``device=`` argument to "cpu", "reference" or an OpenCL runtime device.

    "auto" runs where the operands live: on their OpenCL device if any is a DeviceArray, else on the CPU.
    """
    from .device_array import DeviceArray

    if not isinstance(device, str):
        raise TypeError(f"device must be a string, one of {available_device_ids()}, got {device!r}")
    if device == "auto":
        resident = [a for a in operands if isinstance(a, DeviceArray)]
        return resident[0]._device if resident else "cpu"
    if device in ("cpu", "reference"):
        return device
    if device == "opencl" or device.startswith("opencl:"):
        return opencl_backend_device(device)
    raise ValueError(f"device must be one of {available_device_ids()}, got {device!r}")
