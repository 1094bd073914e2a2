"""Planning a CPU call: which micro-kernel, which tiles, how the work splits over threads."""

import math
from dataclasses import dataclass

import numba

from ..memory import cache_optimal_tile_size
from .microkernel import lanes_for
from .packing import panel_count

# Micro-kernel shapes the backend may choose: (rows, vectors of columns). 6 x 2 vectors
# uses 12 accumulator registers of the 16 ymm registers of AVX2.
MICROKERNELS = ((6, 2), (4, 3))
DEFAULT_MICROKERNEL = (6, 2)


@dataclass(frozen=True)
class CpuPlan:
    mr: int
    nv: int
    nr: int
    kc: int
    mc: int
    nc: int
    channel_chunks: int
    threads: int


def choose_microkernel(spec):
    """The micro-kernel that wastes the least work on padding rows and columns.

    Output channels of a group are padded to whole ``mr`` panels and the pixels of an
    image to whole ``nr`` panels; both shapes issue 12 vector FMAs per step, so the one
    with the smaller padded area is faster. Ties go to the default.
    """
    lanes = lanes_for(8 * spec.dtype.itemsize)
    k_group = spec.out_channels // spec.groups
    pixels = spec.out_h * spec.out_w

    def padded_area(shape):
        mr, nv = shape
        return panel_count(k_group, mr) * mr * panel_count(pixels, nv * lanes) * nv * lanes

    return min(MICROKERNELS, key=lambda shape: (padded_area(shape), shape != DEFAULT_MICROKERNEL))


def plan_conv2d(spec, microkernel=None, tiles=None, threads=None):
    """Choose the micro-kernel, tile sizes and parallel split for a conv2d spec."""
    mr, nv = microkernel or choose_microkernel(spec)
    if (mr, nv) not in MICROKERNELS:
        raise ValueError(f"microkernel must be one of {MICROKERNELS}, got {(mr, nv)}")
    itemsize = spec.dtype.itemsize
    nr = nv * lanes_for(8 * itemsize)
    tiles = tiles or cache_optimal_tile_size(mr, nr, itemsize)
    threads = threads or numba.get_num_threads()
    pixels = spec.out_h * spec.out_w
    # Blocks of equal size (whole micro-panels), not nc-sized blocks and a short remainder.
    blocks = panel_count(pixels, tiles.nc)
    pixel_block = min(tiles.nc, panel_count(panel_count(pixels, blocks), nr) * nr)
    pixel_jobs = spec.batch * spec.groups * panel_count(pixels, pixel_block)
    channel_chunks = 1
    if pixel_jobs < 4 * threads:
        # Split output channels too, so that every thread gets the same number of jobs.
        panels = panel_count(spec.out_channels // spec.groups, mr)
        channel_chunks = min(panels, threads // math.gcd(pixel_jobs, threads))
    return CpuPlan(mr, nv, nr, tiles.kc, tiles.mc, pixel_block, channel_chunks, threads)


# Groups with fewer output channels than this run the direct kernel: a GEMM block would
# compute mostly padding rows (depthwise: 1 real row of 4 or 6).
DIRECT_MAX_GROUP_OUTPUTS = 3


def uses_direct_kernel(spec):
    return spec.out_channels // spec.groups <= DIRECT_MAX_GROUP_OUTPUTS
