"""Which vector instruction set the CPU backend's micro-kernels are built for.

The micro-kernel is explicit LLVM vector IR and target-neutral; what differs between
instruction sets is the register file, so each family is a vector width, a register
count and the block shapes that fill that register file. The widest family the host
runs is chosen at run time (from the features LLVM compiles for, which is what the
JIT targets); ``SPARKLE_CPU_ISA`` forces a narrower one for tests and comparisons.
Only the drivers of the chosen family are ever compiled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

ISA_ENV = "SPARKLE_CPU_ISA"


@dataclass(frozen=True)
class Isa:
    """One micro-kernel family: vector width, register file and the block shapes that fit it."""

    name: str
    vector_bytes: int
    registers: int
    requires: frozenset  # LLVM feature names the host must have
    # (rows, vectors of columns), most rows first: more rows reuse each loaded B vector more
    # (what counts when B streams from L2). The first is the default. Each leaves registers
    # for the B vectors and a broadcast besides the rows * vectors accumulators.
    microkernels: tuple
    description: str
    # How calls are planned for this family: "streaming" (the implicit path by default, long
    # reduction blocks, jobs split by a cost model: measured on AVX-512) or "l1" (the packed path,
    # L1-sized blocks, output channels split only to feed every thread: the planning measured on
    # AVX2 machines, kept so that they do not regress).
    planning: str = "l1"
    # The same shapes in the order preferred where B sits in L1 (the packed path's panels, short
    # reductions): fewest loads per FMA first. Empty: the same order as ``microkernels``.
    l1_preference: tuple = ()

    def lanes(self, itemsize):
        """Elements of one vector register for elements of ``itemsize`` bytes."""
        return self.vector_bytes // itemsize

    @property
    def default_microkernel(self):
        return self.microkernels[0]

    def preference(self, b_in_l1):
        """The shapes in the order preferred when B is read from L1 (True) or streams from L2."""
        return self.l1_preference if b_in_l1 and self.l1_preference else self.microkernels


# Widest first: the first one the host supports is the default.
ISAS = (
    # 32 zmm registers: up to 28 accumulators, 2-4 B vectors, a broadcast.
    # Where B comes from L1 (packed panels, short reductions), fewer loads per FMA win (6 x 4: 10
    # loads for 24 FMAs; 14 x 2: 16 for 28). Measured on 2 cores: matmul 1024-2048, 6 x 4 and
    # 8 x 3 at 225-258 GFLOPS against 190-248 for 14 x 2; res2 1x1 (reduction 64) 280 against 240.
    Isa("avx512", 64, 32, frozenset({"avx512f", "fma"}), ((14, 2), (8, 3), (6, 4)),
        "AVX-512: 16 fp32 lanes, 32 registers", planning="streaming", l1_preference=((6, 4), (8, 3), (14, 2))),
    # 16 ymm registers: 12 accumulators, 2-3 B vectors, a broadcast.
    Isa("avx2", 32, 16, frozenset({"avx2", "fma"}), ((6, 2), (4, 3)), "AVX2 + FMA: 8 fp32 lanes, 16 registers"),
    # Any other CPU (SSE-only x86, aarch64 NEON, ...): 128-bit vectors, which every 64-bit
    # target LLVM knows has; the multiply-add fuses only where the target has an FMA.
    Isa("portable", 16, 16, frozenset(), ((6, 2), (4, 3)), "portable: 128-bit vectors, any CPU"),
)
ISA_NAMES = tuple(isa.name for isa in ISAS)


def _enabled_features(feature_string):
    return {item[1:] for item in feature_string.split(",") if item.startswith("+")}


@lru_cache(maxsize=1)
def target_features():
    """The CPU features Numba compiles for: NUMBA_CPU_FEATURES if set, none for a named generic
    NUMBA_CPU_NAME, else the host's as LLVM detects them."""
    import llvmlite.binding as llvm
    from numba.core import config

    if config.CPU_FEATURES:
        return frozenset(_enabled_features(config.CPU_FEATURES))
    if config.CPU_NAME and config.CPU_NAME != "host":
        return frozenset()  # a named portable target (e.g. for a shared cache): assume nothing
    return frozenset(_enabled_features(llvm.get_host_cpu_features().flatten()))


def supported_isas(features=None):
    """The families this machine can run, widest first (``portable`` is always among them)."""
    features = target_features() if features is None else features
    return tuple(isa for isa in ISAS if isa.requires <= features)


def isa_by_name(name):
    for isa in ISAS:
        if isa.name == name:
            return isa
    raise ValueError(f"{ISA_ENV} must be one of {list(ISA_NAMES)}, got {name!r}")


def select_isa(requested=None, features=None):
    """The family to run: ``requested`` (a name) if the host supports it, else the widest supported."""
    supported = supported_isas(features)
    if not requested:
        return supported[0]
    wanted = isa_by_name(requested.strip().lower())
    if wanted not in supported:
        raise ValueError(f"{ISA_ENV}={requested!r} asks for an instruction set this CPU lacks (it needs "
                         f"{sorted(wanted.requires)}); this CPU runs {[isa.name for isa in supported]}")
    return wanted


@lru_cache(maxsize=1)
def active_isa():
    """The family the CPU backend uses in this process (``SPARKLE_CPU_ISA`` read once)."""
    return select_isa(os.environ.get(ISA_ENV))
