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

    name, vendor = _cpu_identity()
    return Device(id="cpu", name=name, vendor=vendor, kind="cpu", compute_units=numba.config.NUMBA_NUM_THREADS,
                  memory=_physical_memory())


def devices():
    """Every device Sparkle can run on, best first."""
    return [_cpu_device()]


# "reference" is the float64 oracle: always available, never fast.
PSEUDO_DEVICES = ("auto", "reference")


def available_device_ids():
    return [*PSEUDO_DEVICES, *(d.id for d in devices())]


def resolve_device(device):
    """Map a ``device=`` argument to the id of the backend that runs the call."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string, one of {available_device_ids()}, got {device!r}")
    if device == "auto":
        return devices()[0].id  # until the scheduler exists: the best available backend
    if device not in available_device_ids():
        raise ValueError(f"device must be one of {available_device_ids()}, got {device!r}")
    return device
