"""Planning a CPU call: which micro-kernel, which tiles, how the work splits over threads."""

import math
from dataclasses import dataclass

import numba

from ..memory import cache_optimal_tile_size
from .implicit import reads_alias, supports_implicit, virtual_input_shape
from .isa import active_isa
from .packing import panel_count


@dataclass(frozen=True)
class CpuPlan:
    mr: int
    nv: int
    nr: int  # nv vectors of the instruction set's lanes
    kc: int
    mc: int
    nc: int
    channel_chunks: int
    threads: int
    implicit: bool = False  # B read from the input in place (implicit.py), not packed (conv2d.py)


def grid_pixels(spec, implicit):
    """Output pixels a path computes per image: the real ones, or for the implicit path every
    position of its grid up to the last real pixel (grid columns past out_w included)."""
    if not implicit:
        return spec.out_h * spec.out_w
    _, pitch = virtual_input_shape(spec)
    return (spec.out_h - 1) * pitch + spec.out_w


def choose_microkernel(spec, isa, implicit=False):
    """The micro-kernel of the family ``isa`` that wastes the least work on padding.

    Output channels of a group are padded to whole ``mr`` panels and the pixels of an
    image to whole ``nr`` panels; a family's shapes issue about as many vector FMAs per
    step, so the one with the smaller padded area is faster. Ties go to the default.
    """
    lanes = isa.lanes(spec.dtype.itemsize)
    k_group = spec.out_channels // spec.groups
    pixels = grid_pixels(spec, implicit)

    def padded_area(shape):
        mr, nv = shape
        return panel_count(k_group, mr) * mr * panel_count(pixels, nv * lanes) * nv * lanes

    return min(isa.microkernels, key=lambda shape: (padded_area(shape), shape != isa.default_microkernel))


def prefers_implicit(spec):
    """The implicit path wherever it applies, except for 1x1 kernels read in place from planes
    of a 4 KiB multiple (matmul 1024, say): their B rows would thrash L1, packed ones do not."""
    return supports_implicit(spec) and not reads_alias(spec)


def plan_conv2d(spec, microkernel=None, tiles=None, threads=None, isa=None, implicit=None):
    """Choose the path, micro-kernel, tile sizes and parallel split for a conv2d spec.

    ``isa`` (an ``isa.Isa``) defaults to the family this process runs; ``implicit`` to
    ``prefers_implicit(spec)``.
    """
    isa = isa or active_isa()
    implicit = prefers_implicit(spec) if implicit is None else bool(implicit)
    if implicit and not supports_implicit(spec):
        raise ValueError(f"implicit must be False for a strided kernel larger than 1x1, got {implicit}")
    mr, nv = microkernel or choose_microkernel(spec, isa, implicit)
    if (mr, nv) not in isa.microkernels:
        raise ValueError(f"microkernel must be one of {isa.microkernels} ({isa.name}), got {(mr, nv)}")
    itemsize = spec.dtype.itemsize
    nr = nv * isa.lanes(itemsize)
    tiles = tiles or cache_optimal_tile_size(mr, nr, itemsize)
    threads = threads or numba.get_num_threads()
    pixels = grid_pixels(spec, implicit)
    # Blocks of equal size (whole micro-panels), not nc-sized blocks and a short remainder.
    blocks = panel_count(pixels, tiles.nc)
    pixel_block = min(tiles.nc, panel_count(panel_count(pixels, blocks), nr) * nr)
    pixel_jobs = spec.batch * spec.groups * panel_count(pixels, pixel_block)
    channel_chunks = 1
    if pixel_jobs < 4 * threads:
        # Split output channels too, so that every thread gets the same number of jobs.
        panels = panel_count(spec.out_channels // spec.groups, mr)
        channel_chunks = min(panels, threads // math.gcd(pixel_jobs, threads))
    return CpuPlan(mr, nv, nr, tiles.kc, tiles.mc, pixel_block, channel_chunks, threads, implicit)


# Groups with fewer output channels than this run the direct kernel: a GEMM block would
# compute mostly padding rows (depthwise: 1 real row of 4 or 6).
DIRECT_MAX_GROUP_OUTPUTS = 3


def uses_direct_kernel(spec):
    return spec.out_channels // spec.groups <= DIRECT_MAX_GROUP_OUTPUTS
