"""What the compiled kernels are handed: flat read-only inputs, one int64 parameter vector (geometry,
tiles, flags) and the per-thread scratch buffers."""

from dataclasses import dataclass

import numpy as np
from numba import njit

from .packing import panel_count

# Conv2dSpec fields in the order the compiled kernels unpack them (``geometry_of``).
GEOMETRY_FIELDS = ("batch", "in_channels", "height", "width", "out_channels", "kernel_h", "kernel_w",
                   "stride_h", "stride_w", "pad_top", "pad_left", "dilation_h", "dilation_w", "groups",
                   "out_h", "out_w")

# Every scalar a kernel takes, in one int64 vector. Numba's dispatcher takes about 0.1 us per array
# argument, 0.45 us for a tuple of 16 ints, 0.04-0.07 us per int or bool (benchmarks/dispatch_cost.py
# --argument-kinds); the packed driver's 18 arguments (10 arrays, the geometry tuple, 2 bools, 5 ints)
# became 7 arrays, about 1.2 us less on a call that costs 6 us in all. Fields a kernel does not use are 0.
PARAM_FIELDS = GEOMETRY_FIELDS + (
    "use_bias", "relu",            # the epilogue (0 or 1)
    "lda",                         # row stride of the weight matrix
    "kc", "mc", "nc", "channel_chunks", "threads",  # the plan (GEMM paths)
    "padded_pixels",               # packed path: pixels of a block, whole nr panels
    "row_chunks",                  # direct kernel: jobs per output plane
    "phases", "plane", "pitch", "grid_rows", "copy_planes",  # implicit path: its virtual input
)
USE_BIAS, RELU, LDA, KC, MC, NC, CHANNEL_CHUNKS, THREADS, PADDED_PIXELS, ROW_CHUNKS, PHASES, PLANE, PITCH, \
    GRID_ROWS, COPY_PLANES = range(len(GEOMETRY_FIELDS), len(PARAM_FIELDS))


def geometry(spec):
    return tuple(getattr(spec, field) for field in GEOMETRY_FIELDS)


def call_params(spec, **fields):
    """The read-only parameter vector of a kernel call: the spec's geometry and epilogue, and ``fields``
    (names from PARAM_FIELDS)."""
    params = np.zeros(len(PARAM_FIELDS), dtype=np.int64)
    params[:len(GEOMETRY_FIELDS)] = geometry(spec)
    params[USE_BIAS] = spec.has_bias
    params[RELU] = spec.activation == "relu"
    for name, value in fields.items():
        params[PARAM_FIELDS.index(name)] = value
    params.flags.writeable = False  # one compiled version: parameters always arrive read-only
    return params


@njit(cache=True, inline="always")
def geometry_of(params):
    """(batch, channels, height, width, k_total, kernel_h, kernel_w, stride_h, stride_w, pad_top, pad_left,
    dilation_h, dilation_w, groups, out_h, out_w) from a parameter vector."""
    return (params[0], params[1], params[2], params[3], params[4], params[5], params[6], params[7], params[8],
            params[9], params[10], params[11], params[12], params[13], params[14], params[15])


def bias_vector(bias, spec):
    """The bias as a flat read-only vector; zeros when there is none (the kernels then skip it)."""
    return read_only_flat(bias if bias is not None else np.zeros(spec.out_channels, spec.dtype))


@dataclass(frozen=True)
class ScratchLayout:
    """Where the packed path's per-thread work buffers lie in its two scratch rows (one of the dtype,
    one of int64): offsets and lengths in elements, shared by the Python side and the driver."""

    panel: int    # packed im2col patch, kc x (pixel block)
    tile: int     # one mr x nr edge block
    origins: int  # input row/column origin of each pixel of the block (2 x padded pixels)
    offsets: int  # source offset per tap and pixel (taps x padded pixels)
    runs: int     # first offset of each contiguous panel per tap (taps x panels)
    rows: int     # channel plane and tap of each reduction row of a block (kc x 2)

    @property
    def values(self):
        return self.panel + self.tile

    @property
    def indices(self):
        return self.origins + self.offsets + self.runs + self.rows


@dataclass(frozen=True)
class Scratch:
    """Per-thread work buffers of one call: all the memory the packed path uses besides its output
    (and contiguous copies of inputs that arrive in another layout). Row t belongs to thread t."""

    values: np.ndarray   # threads x ScratchLayout.values, of the dtype
    indices: np.ndarray  # threads x ScratchLayout.indices, int64

    @property
    def nbytes(self):
        return self.values.nbytes + self.indices.nbytes


def padded_block_pixels(spec, plan):
    """Pixels of the packed path's largest block, rounded up to whole nr panels."""
    return panel_count(min(plan.nc, spec.out_h * spec.out_w), plan.nr) * plan.nr


def scratch_layout(spec, plan):
    padded_pixels = padded_block_pixels(spec, plan)
    taps = spec.kernel_h * spec.kernel_w
    return ScratchLayout(panel=plan.kc * padded_pixels, tile=plan.mr * plan.nr, origins=2 * padded_pixels,
                         offsets=taps * padded_pixels, runs=taps * (padded_pixels // plan.nr), rows=2 * plan.kc)


def allocate_scratch(spec, plan):
    layout = scratch_layout(spec, plan)
    return Scratch(values=np.empty((plan.threads, layout.values), dtype=spec.dtype),
                   indices=np.empty((plan.threads, layout.indices), dtype=np.int64))


def weight_rows(w):
    """The weights as a K x (C/groups * R * S) matrix and its row stride (a copy only for a
    non-C layout). Rows of a 4 KiB multiple are not padded: the micro-kernel's 6-14 weight rows
    then share L1 sets, but copying them cost more (res4 1x1, 1 MiB of weights: 0.75x the speed
    with the padded copy; matmul 1024-2048 no faster)."""
    rows = np.ascontiguousarray(w).reshape(w.shape[0], -1)
    return rows, rows.shape[1]


def read_only_flat(array):
    """A flat, aligned, C-order read-only view (a copy only when the layout needs one).

    Inputs always reach the driver read-only and aligned, so writable, read-only and
    misaligned user arrays share one compiled version instead of one per combination.
    """
    flat = np.require(np.asarray(array), requirements=("C", "A")).reshape(-1).view()  # asarray: no subclasses
    flat.flags.writeable = False
    return flat


def flat_input(array):
    """``read_only_flat(array)``, without its cost for the common layout: a plain C-contiguous aligned ndarray
    becomes a read-only flat view by ``ravel`` and ``setflags`` (1.3 us on the Zen 1 VM, against 2 us for
    ``read_only_flat``). On every prepared call's path, so written out in one function."""
    if array.__class__ is np.ndarray:
        flags = array.flags
        if flags.c_contiguous and flags.aligned:
            flat = array.ravel()  # a view, and always a new array object: the caller's keeps its flags
            flat.setflags(write=False)
            return flat
    return read_only_flat(array)


def remembered_flat_input(array):
    """(array, its flat read-only view) to reuse while the same array object comes back (weights, bias:
    a view sees in-place changes, and holding the array keeps its id from being reused); (None, a flat
    copy) where the layout needs a copy, which a later call must make again."""
    flags = array.flags if array.__class__ is np.ndarray else None
    viewed = flags is not None and flags.c_contiguous and flags.aligned  # flat_input's view, not a copy
    return (array if viewed else None), flat_input(array)
