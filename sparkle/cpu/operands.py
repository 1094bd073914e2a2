"""What the compiled kernels are handed: flat read-only inputs, the weight matrix with a
cache-friendly row stride, the geometry tuple and the per-thread scratch buffers."""

from dataclasses import dataclass

import numpy as np

from .packing import panel_count


# Conv2dSpec fields in the order the compiled kernels unpack their geometry tuple.
GEOMETRY_FIELDS = ("batch", "in_channels", "height", "width", "out_channels", "kernel_h", "kernel_w",
                   "stride_h", "stride_w", "pad_top", "pad_left", "dilation_h", "dilation_w", "groups",
                   "out_h", "out_w")


def geometry(spec):
    return tuple(getattr(spec, field) for field in GEOMETRY_FIELDS)


def bias_vector(bias, spec):
    """The bias as a flat read-only vector; zeros when there is none (the kernels then skip it)."""
    return read_only_flat(bias if bias is not None else np.zeros(spec.out_channels, spec.dtype))


@dataclass(frozen=True)
class Scratch:
    """Per-thread work buffers of one call: all the memory a call uses besides its output
    (and contiguous copies of inputs that arrive in another layout)."""

    panel: np.ndarray    # packed im2col patch, kc x (pixel block)
    origins: np.ndarray  # input row/column origin of each pixel of the block
    offsets: np.ndarray  # source offset per tap and pixel
    runs: np.ndarray     # first offset of each contiguous panel per tap
    rows: np.ndarray     # channel plane and tap of each reduction row of a block
    tile: np.ndarray     # one mr x nr edge block

    @property
    def nbytes(self):
        buffers = (self.panel, self.origins, self.offsets, self.runs, self.rows, self.tile)
        return sum(buffer.nbytes for buffer in buffers)


def allocate_scratch(spec, plan):
    padded_pixels = panel_count(min(plan.nc, spec.out_h * spec.out_w), plan.nr) * plan.nr
    taps = spec.kernel_h * spec.kernel_w
    return Scratch(
        panel=np.empty((plan.threads, plan.kc * padded_pixels), dtype=spec.dtype),
        origins=np.empty((plan.threads, 2, padded_pixels), dtype=np.int64),
        offsets=np.empty((plan.threads, taps, padded_pixels), dtype=np.int64),
        runs=np.empty((plan.threads, taps, padded_pixels // plan.nr), dtype=np.int64),
        rows=np.empty((plan.threads, plan.kc, 2), dtype=np.int64),
        tile=np.empty((plan.threads, plan.mr * plan.nr), dtype=spec.dtype))


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
