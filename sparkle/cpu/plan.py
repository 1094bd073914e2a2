"""Planning a CPU call: which micro-kernel, which tiles, how the work splits over threads."""

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numba

from ..memory import TileSizes, cache_optimal_tile_size, detect_memory_params
from .implicit import in_place_reads_thrash, virtual_layout
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
    return (spec.out_h - 1) * virtual_layout(spec).pitch + spec.out_w


# Each shape after the first in a family's list reuses B less: it must save this much padding.
SHAPE_PREFERENCE_STEP = 0.05


def choose_microkernel(spec, isa, implicit=False):
    """The micro-kernel of the family ``isa`` that wastes the least work on padding.

    Output channels of a group are padded to whole ``mr`` panels and the pixels of an
    image to whole ``nr`` panels; a family's shapes issue about as many vector FMAs per
    step, so the one with the smaller padded area is faster, unless it ranks lower in the
    family's order (SHAPE_PREFERENCE_STEP per place, ``Isa.preference``): where B streams from
    L2 (the implicit path over a long reduction) shapes with more rows reuse each B vector more;
    where B sits in L1 (packed panels, or a reduction short enough that a whole panel of B fits)
    shapes with fewer loads per FMA win.
    """
    lanes = isa.lanes(spec.dtype.itemsize)
    k_group = spec.out_channels // spec.groups
    pixels = grid_pixels(spec, implicit)
    reduction = spec.reduction
    widest_panel = max(nv for _, nv in isa.microkernels) * isa.vector_bytes
    b_in_l1 = not implicit or reduction * widest_panel <= detect_memory_params().l1d // 2

    # Families planned as on AVX2 machines pick by padded area alone, ties to the default.
    step = SHAPE_PREFERENCE_STEP if isa.planning == "streaming" else 0

    def cost(rank_and_shape):
        rank, (mr, nv) = rank_and_shape
        padded_area = panel_count(k_group, mr) * mr * panel_count(pixels, nv * lanes) * nv * lanes
        return padded_area * (1 + step * rank), rank

    return min(enumerate(isa.preference(b_in_l1)), key=cost)[1]


def implicit_tiles(spec, mr, nr):
    """Tiles for the implicit path: the whole reduction in one block. A block ends in a masked
    read-modify-write of C, one run per output row; measured on AVX-512 (16 and 2 cores, ResNet-50
    layers at N=1 and 32), one block beat L1-sized and 256-long ones by 5-50 %, most on the small
    images (B streams from L2 either way). mc and nc as for the packed path."""
    tiles = cache_optimal_tile_size(mr, nr, spec.dtype.itemsize)
    return dataclasses.replace(tiles, kc=spec.reduction)


# Reduction block of the packed path (matmul, mostly). Its B micro-panel then outgrows L1 and
# streams from L2, but C is read and written back a quarter as often as with L1-sized blocks:
# measured on 2 and 16 AVX-512 cores at 1024-2048, 384-512 beat the L1-sized 128 by 5-20 %.
PACKED_KC = 512


def packed_tiles(spec, mr, nr):
    """Tiles for the packed path: the reduction in equal blocks of at most PACKED_KC, the A block
    (mc x kc) in half of L2 and the packed B panel (kc x nc) in a quarter, as for L1-sized blocks."""
    itemsize = spec.dtype.itemsize
    reduction = spec.reduction
    kc = panel_count(reduction, panel_count(reduction, PACKED_KC))
    l2 = detect_memory_params().l2
    mc = max(mr, l2 // 2 // (kc * itemsize) // mr * mr)
    nc = max(nr, l2 // 4 // (kc * itemsize) // nr * nr)
    return TileSizes(kc=kc, mc=mc, nc=nc)


def prefers_implicit(spec):
    """The implicit path, except where its in-place reads would thrash the caches or TLBs (large
    unpadded 1x1 convolutions); packed panels do not."""
    return not in_place_reads_thrash(spec)


# One thread's speed on small work and what Numba's parallel launch of n threads costs, back to back
# (benchmarks/serial_threshold.py, results/serial_threshold_h100host.json for 16 threads and
# serial_threshold_2core.json for 2): one thread runs small 3x3 and 1x1 convolutions at 40-100 GFLOPS (40 taken:
# slower CPUs), the direct kernel (depthwise) at 5-15 GFLOPS, and streams operands it packs at about 8 GB/s (a
# 1 x 1024 x 1024 matmul: 525 us on one thread, 303 us on two); a launch costs about 6 us + 3.6 us per thread
# (10-15 us for 2 threads, 60 us for 16: it grows with the team). After 1 ms of other work the workers sleep and
# a launch costs 15-25 us more on the 2-core VM, which only moves the crossover up.
SERIAL_GFLOPS = 40.0
SERIAL_DIRECT_GFLOPS = 10.0
SERIAL_BYTES_PER_SECOND = 8e9
LAUNCH_SECONDS = 6e-6
LAUNCH_SECONDS_PER_THREAD = 3.6e-6


def serial_max_seconds(threads):
    """Calls that one thread is expected to finish within this many seconds run on one thread, in kernels
    compiled without Numba's parallel launch: up to there, what ``threads`` threads save (a share of 1 - 1/threads
    of the time) is less than their launch costs. About 26 us for 2 threads, 68 us for 16."""
    if threads <= 1:
        return math.inf
    return (LAUNCH_SECONDS + LAUNCH_SECONDS_PER_THREAD * threads) * threads / (threads - 1)


def serial_max_flops(threads):
    """The flops one thread does in ``serial_max_seconds`` on the GEMM paths (about 1.1 MFLOP for 2 threads,
    2.7 MFLOP for 16): calls of fewer flops and few bytes run on one thread."""
    return SERIAL_GFLOPS * 1e9 * serial_max_seconds(threads)


def serial_seconds(spec):
    """What one thread is expected to take for a conv2d ``spec``: its flops at one thread's rate or its
    operands at one thread's bandwidth, whichever is longer."""
    rate = SERIAL_DIRECT_GFLOPS if uses_direct_kernel(spec) else SERIAL_GFLOPS
    elements = (spec.batch * spec.in_channels * spec.height * spec.width + spec.out_channels * spec.reduction
                + math.prod(spec.output_shape))
    return max(spec.flops / (rate * 1e9), elements * spec.dtype.itemsize / SERIAL_BYTES_PER_SECOND)


def default_threads(spec):
    """Threads for a call when none are asked for: one for small work, else all of Numba's."""
    threads = numba.get_num_threads()
    return 1 if serial_seconds(spec) <= serial_max_seconds(threads) else threads


def plan_conv2d(spec, microkernel=None, tiles=None, threads=None, isa=None, implicit=None):
    """Choose the path, micro-kernel, tile sizes and parallel split for a conv2d spec.

    ``isa`` (an ``isa.Isa``) defaults to the family this process runs; ``implicit`` to
    ``prefers_implicit(spec)``; ``threads`` to ``default_threads(spec)`` (a plan of one thread runs
    the kernels compiled without a parallel launch). Plans are remembered per spec, family and
    thread count.
    """
    return _plan(spec, microkernel, tiles, threads or default_threads(spec), isa or active_isa(), implicit)


@lru_cache(maxsize=512)
def _plan(spec, microkernel, tiles, threads, isa, implicit):
    streaming = isa.planning == "streaming"
    implicit = (streaming and prefers_implicit(spec)) if implicit is None else bool(implicit)
    mr, nv = microkernel or choose_microkernel(spec, isa, implicit)
    if (mr, nv) not in isa.microkernels:
        raise ValueError(f"microkernel must be one of {isa.microkernels} ({isa.name}), got {(mr, nv)}")
    itemsize = spec.dtype.itemsize
    nr = nv * isa.lanes(itemsize)
    if not streaming:
        return _l1_plan(spec, mr, nv, nr, tiles or cache_optimal_tile_size(mr, nr, itemsize), threads, implicit)
    tiles = tiles or (implicit_tiles(spec, mr, nr) if implicit else packed_tiles(spec, mr, nr))
    pixels = grid_pixels(spec, implicit)
    # Blocks of equal size (whole micro-panels), not nc-sized blocks and a short remainder.
    blocks = panel_count(pixels, tiles.nc)
    images = spec.batch * spec.groups
    if 4 * threads <= images * blocks < BALANCED_JOBS_PER_THREAD * threads and (images * blocks) % threads:
        # Few jobs that do not divide among the threads leave some idle at the end (conv1 at
        # N=1: 11 blocks on 2 threads ran at 0.9x of 12): take the next count that divides.
        per_image = threads // math.gcd(images, threads)
        blocks = min(panel_count(pixels, nr), panel_count(blocks, per_image) * per_image)
    pixel_block = min(tiles.nc, panel_count(panel_count(pixels, blocks), nr) * nr)
    pixel_jobs = images * panel_count(pixels, pixel_block)
    channel_chunks = 1
    if pixel_jobs < 4 * threads:
        pixel_block, channel_chunks = split_few_jobs(spec, pixels, pixel_block, mr, nr, threads, implicit)
    return CpuPlan(mr, nv, nr, tiles.kc, tiles.mc, pixel_block, channel_chunks, threads, implicit)


def _l1_plan(spec, mr, nv, nr, tiles, threads, implicit):
    """The planning of families with ``planning == "l1"`` (see ``Isa.planning``): equal pixel
    blocks of at most nc, and output channels split only when there are too few pixel blocks to
    give every thread the same number of jobs."""
    pixels = grid_pixels(spec, implicit)
    blocks = panel_count(pixels, tiles.nc)
    pixel_block = min(tiles.nc, panel_count(panel_count(pixels, blocks), nr) * nr)
    pixel_jobs = spec.batch * spec.groups * panel_count(pixels, pixel_block)
    channel_chunks = 1
    if pixel_jobs < 4 * threads:
        panels = panel_count(spec.out_channels // spec.groups, mr)
        channel_chunks = min(panels, threads // math.gcd(pixel_jobs, threads))
    return CpuPlan(mr, nv, nr, tiles.kc, tiles.mc, pixel_block, channel_chunks, threads, implicit)


# The packed path reads its image region, writes it packed and reads the panel again.
PACKED_READS = 3

# Expected extra time, in jobs, that the slowest thread adds to a call (see split_few_jobs).
TAIL_JOBS = 0.5

# Below this many jobs per thread, the job count is made a multiple of the thread count.
BALANCED_JOBS_PER_THREAD = 8

# Multiply-adds a core issues per byte it reads from the shared cache, roughly (64 flops a cycle
# against some 8 bytes a cycle of L3 bandwidth per core): prices the data a job brings in.
FLOPS_PER_BYTE = 8


def split_few_jobs(spec, pixels, largest_block, mr, nr, threads, implicit=True):
    """(pixel block, channel chunks) for a call with too few pixel blocks to feed every thread.

    Jobs are cut both ways, pixel blocks x output-channel chunks: more chunks means each job
    reads the image region again, more blocks that it reads the weights again. The estimate per
    job is its padded multiply-adds plus the bytes it reads, priced at FLOPS_PER_BYTE, times the
    rounds of jobs the threads need plus TAIL_JOBS: a thread that runs slow (a core shared with
    the caller's unbound thread, a preempted vCPU) holds the call up by up to a job, so smaller
    jobs cost less there. On the packed path a job also packs its image region (written, then
    read again: PACKED_READS times the bytes). The cheapest split wins (fewer jobs on a tie).
    """
    image_reads = 1 if implicit else PACKED_READS
    k_group = spec.out_channels // spec.groups
    panels = panel_count(k_group, mr)
    reduction = spec.reduction
    image_bytes = spec.in_channels // spec.groups * spec.height * spec.width * spec.dtype.itemsize
    weight_bytes = k_group * reduction * spec.dtype.itemsize
    best = None
    for blocks in range(1, panel_count(pixels, nr) + 1):
        block = min(largest_block, panel_count(panel_count(pixels, blocks), nr) * nr)
        real_blocks = panel_count(pixels, block)
        for chunks in range(1, panels + 1):
            jobs = spec.batch * spec.groups * real_blocks * chunks
            work = 2 * block * panel_count(panels, chunks) * mr * reduction
            data = image_reads * image_bytes * block / pixels + weight_bytes / chunks
            cost = ((panel_count(jobs, threads) + TAIL_JOBS) * (work + FLOPS_PER_BYTE * data), jobs)
            if best is None or cost < best[0]:
                best = (cost, block, chunks)
    return best[1], best[2]


# Groups with fewer output channels than this run the direct kernel: a GEMM block would
# compute mostly padding rows (depthwise: 1 real row of 4 or 6).
DIRECT_MAX_GROUP_OUTPUTS = 3


def uses_direct_kernel(spec):
    return spec.out_channels // spec.groups <= DIRECT_MAX_GROUP_OUTPUTS
