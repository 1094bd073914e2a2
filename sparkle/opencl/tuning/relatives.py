"""Which tuned device is the nearest relative of one that has no tuning of its own.

A device's traits are plain data (read from the runtime's device object, stored beside its tuned workloads).
Tiles transfer between devices of the same vendor, kind and architecture (an H200 is the H100's sm_90 chip
with more memory: the H100's winners are the best guess there); among those, the one with the most similar
compute units, local memory, work-group limit and memory is the nearest. Another architecture is never a
relative: its register file, local memory banks and vector width decide other tiles.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class DeviceTraits:
    vendor: str
    kind: str  # "gpu" or "cpu"
    architecture: str  # NVIDIA "sm_90", PoCL's LLVM CPU target ("znver3"), else the device's name
    compute_units: int
    local_memory: int  # bytes
    max_work_group_size: int
    memory: int  # bytes of global memory

    @classmethod
    def of(cls, device):
        """The traits of a runtime device (attributes only: no call into the driver)."""
        return cls(device.vendor, device.kind, device.architecture, int(device.compute_units),
                   int(device.local_memory), int(device.max_work_group_size), int(device.memory))

    def to_json(self):
        return asdict(self)

    @classmethod
    def from_json(cls, data):
        """The traits stored in a database entry, or None where they are missing or of another layout."""
        try:
            return cls(**data)
        except TypeError:
            return None

    def family(self):
        return self.vendor, self.kind, self.architecture

    def describe(self):
        return f"{self.architecture}, {self.compute_units} compute units"


def _log_ratio(a, b):
    return abs(math.log2(a / b)) if a > 0 and b > 0 else 0.0


def kinship(traits, other):
    """How unlike two devices of one family are (0: alike in every trait); None: not of one family."""
    if traits.family() != other.family():
        return None
    return (_log_ratio(traits.compute_units, other.compute_units)
            + _log_ratio(traits.local_memory, other.local_memory)
            + 0.5 * _log_ratio(traits.max_work_group_size, other.max_work_group_size)
            + 0.25 * _log_ratio(traits.memory, other.memory))


def nearest(traits, candidates):
    """``candidates``: {identity: DeviceTraits or None}; their identities ordered nearest first, relatives only."""
    ranked = []
    for identity, other in candidates.items():
        gap = kinship(traits, other) if other is not None else None
        if gap is not None:
            ranked.append((gap, identity))
    return [identity for _, identity in sorted(ranked)]
