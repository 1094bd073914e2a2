"""Cache hierarchy detection and the tile sizes derived from it.

The CPU backend blocks its loops so that a micro-kernel's operands stay in L1,
the packed weight block in L2 and the packed im2col panel in L2/L3. Sizes are read
from the operating system; where that fails, safe defaults for a current x86 core
are used (32 KiB L1d, 512 KiB L2, 8 MiB L3).
"""

from __future__ import annotations

import numbers
import os
import pathlib
from dataclasses import dataclass
from functools import lru_cache

DEFAULT_L1D = 32 * 1024
DEFAULT_L2 = 512 * 1024
DEFAULT_L3 = 8 * 1024 * 1024
DEFAULT_LINE = 64

_SYS_CACHE = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")


@dataclass(frozen=True)
class MemoryParams:
    """Per-core data cache sizes in bytes (L3 is the whole shared cache) and the line size."""

    l1d: int
    l2: int
    l3: int
    line: int
    source: str  # where the figures came from: "sysfs", "sysconf" or "defaults"


@dataclass(frozen=True)
class TileSizes:
    """Blocking of the GEMM loops: kc (reduction), mc (rows of A), nc (columns of B)."""

    kc: int
    mc: int
    nc: int


def _parse_size(text):
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _from_sysfs(root=_SYS_CACHE):
    sizes = {}
    line = DEFAULT_LINE
    for index in sorted(root.glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
            line = int((index / "coherency_line_size").read_text())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified"):
            sizes[level] = size
    if 1 in sizes and 2 in sizes:
        return MemoryParams(sizes[1], sizes[2], sizes.get(3, DEFAULT_L3), line, "sysfs")
    return None


def _from_sysconf():
    names = ("SC_LEVEL1_DCACHE_SIZE", "SC_LEVEL2_CACHE_SIZE", "SC_LEVEL3_CACHE_SIZE", "SC_LEVEL1_DCACHE_LINESIZE")
    try:
        values = [os.sysconf(n) if n in os.sysconf_names else 0 for n in names]
    except (OSError, ValueError):
        return None
    l1d, l2, l3, line = values
    if l1d > 0 and l2 > 0:
        return MemoryParams(l1d, l2, l3 if l3 > 0 else DEFAULT_L3, line if line > 0 else DEFAULT_LINE, "sysconf")
    return None


@lru_cache(maxsize=1)
def detect_memory_params():
    """Cache sizes of this machine, from sysfs, then sysconf, then defaults."""
    return _from_sysfs() or _from_sysconf() or MemoryParams(DEFAULT_L1D, DEFAULT_L2, DEFAULT_L3, DEFAULT_LINE,
                                                            "defaults")


def _round_down(value, multiple):
    return max(multiple, value // multiple * multiple)


def cache_optimal_tile_size(mr, nr, itemsize, params=None):
    """Tile sizes for an ``mr x nr`` micro-kernel on elements of ``itemsize`` bytes.

    - kc: one A micro-panel (mr x kc) and one B micro-panel (kc x nr) fill at most
      half of L1, leaving room for the C tile and the next panels' prefetch.
    - mc: the packed A block (mc x kc) fills at most half of L2.
    - nc: the packed B panel (kc x nc) fills at most a quarter of L2, so it stays
      in L2 beside the A block while every row block of A sweeps over it.
    """
    for name, value in (("mr", mr), ("nr", nr), ("itemsize", itemsize)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be a positive int, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    params = params or detect_memory_params()
    kc = _round_down(params.l1d // 2 // ((mr + nr) * itemsize), 8)
    mc = _round_down(params.l2 // 2 // (kc * itemsize), mr)
    nc = _round_down(params.l2 // 4 // (kc * itemsize), nr)
    return TileSizes(kc=kc, mc=mc, nc=nc)
