"""Kernel source for one workload and one parameter set: pure text, no device involved.

The template ``kernels/conv2d.cl`` holds the kernel; this module prepends ``#define``s for the
workload's shape (so the compiler folds every index computation) and for the tile parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import resources

import numpy as np

from ..api import Conv2dSpec, ConvGeometry, MatmulSpec, matmul_as_conv2d_spec
from . import winograd

TEMPLATE_VERSION = 1  # part of the tuning database key: bump when the kernel's meaning of a tunable changes


@dataclass(frozen=True)
class Workload(ConvGeometry):
    """The shape of one OpenCL launch: conv2d, with matmul as a 1x1 conv of a (1, K, 1, N) image."""

    op: str = "conv2d"  # "conv2d" or "matmul" (same kernel; kept apart in the tuning database)
    dtype: str = "float32"  # "float32" or "float64"

    @classmethod
    def from_spec(cls, spec):
        if isinstance(spec, MatmulSpec):
            op, spec = "matmul", matmul_as_conv2d_spec(spec)
        elif isinstance(spec, Conv2dSpec):
            op = "conv2d"
        else:
            raise TypeError(f"spec must be a Conv2dSpec or MatmulSpec, got {type(spec).__name__}")
        geometry = {f.name: getattr(spec, f.name) for f in fields(ConvGeometry)}
        return cls(op=op, dtype=np.dtype(spec.dtype).name, **geometry)

    # The implicit GEMM per group: (gemm_m x gemm_k) weights times (gemm_k x gemm_n) im2col.
    @property
    def gemm_m(self):
        return self.out_channels // self.groups

    @property
    def gemm_n(self):
        return self.batch * self.out_h * self.out_w

    @property
    def gemm_k(self):
        return self.in_channels // self.groups * self.kernel_h * self.kernel_w

    @property
    def flops(self):
        return 2 * self.groups * self.gemm_m * self.gemm_n * self.gemm_k

    @property
    def key(self):
        """Stable text id, used by the tuning database."""
        if self.op == "matmul":
            return f"matmul:m{self.out_channels}_k{self.in_channels}_n{self.width}:{self.dtype}"
        return (f"conv2d:n{self.batch}_c{self.in_channels}_h{self.height}_w{self.width}_k{self.out_channels}"
                f"_r{self.kernel_h}_s{self.kernel_w}_st{self.stride_h}x{self.stride_w}"
                f"_p{self.pad_top}.{self.pad_bottom}.{self.pad_left}.{self.pad_right}"
                f"_d{self.dilation_h}x{self.dilation_w}_g{self.groups}:{self.dtype}")

    def as_dict(self):
        return asdict(self)


# Tunables, in the order they appear in the source; each has a default in the template. ALGO picks the
# algorithm; the implicit GEMM reads TM..KSPLIT, the fused Winograd F(m x m, 3 x 3) reads WINO_M..WRT, Winograd
# around a batched GEMM reads WINO_M and the GEMM's TM..VEC_B.
TUNABLES = ("ALGO", "TM", "TN", "TK", "WM", "WN", "VW", "USE_LOCAL", "VEC_A", "VEC_B", "VN", "KSPLIT",
            "WINO_M", "WBK", "WBT", "WBC", "WRK", "WRT")
GEMM_TUNABLES = TUNABLES[1:12]
WINOGRAD_TUNABLES = TUNABLES[12:]
IMPLICIT_GEMM, WINOGRAD, WINOGRAD_GEMM = 0, 1, 2
TEMPLATE_FILES = ("kernels/conv2d.cl", "kernels/winograd.cl", "kernels/winograd_gemm.cl")
# The transforms' own shape under ALGO 2 (the GEMM takes the plain names): CONV_ + these of shape_defines.
CONV_SHAPE = ("N_IMG", "C_IN", "H_IN", "W_IN", "K_OUT", "PAD_T", "PAD_L", "P_OUT", "Q_OUT", "HAS_BIAS", "RELU")


@lru_cache(maxsize=1)
def template():
    """Every kernel's source, ALGO choosing among them at compile time."""
    return "\n".join(resources.files(__package__).joinpath(name).read_text() for name in TEMPLATE_FILES)


def _index_type(workload):
    """32-bit indices unless a buffer holds 2**31 elements or more."""
    largest = max(workload.batch * workload.in_channels * workload.height * workload.width,
                  workload.out_channels * workload.gemm_k,
                  workload.batch * workload.out_channels * workload.out_h * workload.out_w)
    return "int" if largest < 2**31 else "long"


def shape_defines(workload, has_bias, relu):
    return {
        "N_IMG": workload.batch, "C_IN": workload.in_channels, "H_IN": workload.height, "W_IN": workload.width,
        "K_OUT": workload.out_channels, "R_K": workload.kernel_h, "S_K": workload.kernel_w,
        "STRIDE_H": workload.stride_h, "STRIDE_W": workload.stride_w, "PAD_T": workload.pad_top,
        "PAD_L": workload.pad_left, "DIL_H": workload.dilation_h, "DIL_W": workload.dilation_w,
        "GROUPS": workload.groups, "P_OUT": workload.out_h, "Q_OUT": workload.out_w,
        "HAS_BIAS": int(bool(has_bias)), "RELU": int(bool(relu)), "POINTWISE": int(workload.pointwise),
        "INDEX": _index_type(workload),
    }


def render(workload, params, *, has_bias=False, relu=False):
    """OpenCL C source for ``workload`` with tile ``params`` (a dict over TUNABLES; missing ones keep defaults)."""
    unknown = set(params) - set(TUNABLES)
    if unknown:
        raise ValueError(f"params has unknown tunables {sorted(unknown)}; known: {list(TUNABLES)}")
    lines = [f"// sparkle kernel for {workload.key}"]
    if workload.dtype == "float64":
        lines.append("#define SPARKLE_FP64 1")
    complete = {**DEFAULTS, **params}
    shape = shape_defines(workload, has_bias, relu)
    if complete["ALGO"] == WINOGRAD_GEMM:  # the GEMM's shape under the plain names, the conv's as CONV_*
        gemm = winograd_gemm_workload(workload, complete)
        conv = shape
        shape = shape_defines(gemm, has_bias=False, relu=False)
        shape["INDEX"] = "long" if "long" in (conv["INDEX"], shape["INDEX"]) else "int"
        shape.update({f"CONV_{name}": conv[name] for name in CONV_SHAPE})
        shape["T_COLS"] = gemm.width
    lines += [f"#define {name} {value}" for name, value in shape.items()]
    lines += [f"#define {name} {int(params[name])}" for name in TUNABLES if name in params]
    if complete["ALGO"] in (WINOGRAD, WINOGRAD_GEMM):  # the transforms of this tile size, as straight-line sums
        lines.append(winograd.defines(int(complete["WINO_M"])))
    return "\n".join(lines) + "\n" + template()


def winograd_tiles(workload, params=None):
    """m x m output tiles of a Winograd launch (m = WINO_M)."""
    m = {**DEFAULTS, **(params or {})}["WINO_M"]
    return workload.batch * -(-workload.out_h // m) * -(-workload.out_w // m)


def winograd_gemm_workload(workload, params):
    """The batched GEMM inside Winograd ALGO 2, as the grouped 1x1 conv conv2d.cl computes: alpha^2 groups (one per
    transformed point) of (K x C) filters times (C x T_COLS) patches, T_COLS the tiles rounded up to 4."""
    m = {**DEFAULTS, **params}["WINO_M"]
    points = (m + 2) ** 2
    columns = -(-winograd_tiles(workload, {"WINO_M": m}) // 4) * 4
    return Workload(op="conv2d", dtype=workload.dtype, batch=1, in_channels=points * workload.in_channels, height=1,
                    width=columns, out_channels=points * workload.out_channels, kernel_h=1, kernel_w=1,
                    stride_h=1, stride_w=1, pad_top=0, pad_bottom=0, pad_left=0, pad_right=0, dilation_h=1,
                    dilation_w=1, groups=points, out_h=1, out_w=columns)


def gemm_params(params):
    """The implicit-GEMM parameters of a Winograd ALGO 2 variant's batched GEMM."""
    return {**DEFAULTS, **params, "ALGO": IMPLICIT_GEMM}


def launch_geometry(workload, params):
    """(global size, local size) of the main kernel (``conv2d``) for ``params`` (defaults filled in)."""
    p = {**DEFAULTS, **params}
    if p["ALGO"] == WINOGRAD_GEMM:
        return launch_geometry(winograd_gemm_workload(workload, p), gemm_params(p))
    if p["ALGO"] == WINOGRAD:
        threads_t, threads_k = p["WBT"] // p["WRT"], p["WBK"] // p["WRK"]
        groups_t = -(-winograd_tiles(workload, p) // p["WBT"])
        groups_k = -(-workload.out_channels // p["WBK"])
        return (groups_t * threads_t, groups_k * threads_k, 1), (threads_t, threads_k, 1)
    threads_n, threads_m = p["TN"] // p["WN"], p["TM"] // p["WM"]
    tiles_n = -(-workload.gemm_n // p["TN"])
    tiles_m = -(-workload.gemm_m // p["TM"])
    return (tiles_n * threads_n, tiles_m * threads_m, workload.groups * p["KSPLIT"]), (threads_n, threads_m, 1)


def output_size(workload):
    return workload.batch * workload.out_channels * workload.out_h * workload.out_w


def work_groups(workload, params):
    """Work-groups the main kernel launches (what fills a device's compute units)."""
    p = {**DEFAULTS, **params}
    if p["ALGO"] == WINOGRAD_GEMM:
        return work_groups(winograd_gemm_workload(workload, p), gemm_params(p))
    if p["ALGO"] == WINOGRAD:
        return -(-winograd_tiles(workload, p) // p["WBT"]) * -(-workload.out_channels // p["WBK"])
    return -(-workload.gemm_n // p["TN"]) * -(-workload.gemm_m // p["TM"]) * workload.groups * p["KSPLIT"]


def _one_per_item(count, rows=None):
    """Geometry of one work-item per element of ``count`` (x ``rows``, a second dimension, when given)."""
    columns = -(-count // REDUCE_LOCAL) * REDUCE_LOCAL
    if rows is None:
        return (columns,), (REDUCE_LOCAL,)
    return (columns, rows), (REDUCE_LOCAL, 1)


@dataclass(frozen=True)
class Step:
    """One kernel launch of a variant: the kernel, its buffer arguments by role, and its geometry.

    Roles: "x", "w", "bias", "out" (the call's buffers) and the variant's workspaces (``workspaces``)."""

    kernel: str
    args: tuple
    global_size: tuple
    local_size: tuple


def workspaces(workload, params):
    """{role: bytes} of the device buffers a variant needs besides the call's own."""
    p = {**DEFAULTS, **params}
    itemsize = 8 if workload.dtype == "float64" else 4
    if p["ALGO"] == WINOGRAD:
        return {"u": (p["WINO_M"] + 2) ** 2 * workload.out_channels * workload.in_channels * itemsize}
    if p["ALGO"] == WINOGRAD_GEMM:  # transformed filters U, patches V and products M
        gemm = winograd_gemm_workload(workload, p)
        return {"u": gemm.out_channels * workload.in_channels * itemsize,
                "v": gemm.in_channels * gemm.width * itemsize, "m": gemm.out_channels * gemm.width * itemsize}
    if p["KSPLIT"] > 1:
        return {"partial": p["KSPLIT"] * output_size(workload) * itemsize}
    return {}


def launch_plan(workload, params):
    """The variant's kernel launches, in queue order."""
    p = {**DEFAULTS, **params}
    main = launch_geometry(workload, p)
    if p["ALGO"] == WINOGRAD_GEMM:
        columns = winograd_gemm_workload(workload, p).width
        return (Step(WINOGRAD_FILTER_KERNEL, ("w", "u"), *_one_per_item(workload.out_channels * workload.in_channels)),
                Step(WINOGRAD_INPUT_KERNEL, ("x", "v"), *_one_per_item(columns, workload.in_channels)),
                Step(MAIN_KERNEL, ("v", "u", "bias", "m"), *main),
                Step(WINOGRAD_OUTPUT_KERNEL, ("m", "bias", "out"),
                     *_one_per_item(winograd_tiles(workload, p), workload.out_channels)))
    if p["ALGO"] == WINOGRAD:
        filters = _one_per_item(workload.out_channels * workload.in_channels)
        return (Step(WINOGRAD_FILTER_KERNEL, ("w", "u"), *filters),
                Step(MAIN_KERNEL, ("x", "u", "bias", "out"), *main))
    if p["KSPLIT"] > 1:
        return (Step(MAIN_KERNEL, ("x", "w", "bias", "partial"), *main),
                Step(REDUCE_KERNEL, ("partial", "bias", "out"), *_one_per_item(output_size(workload))))
    return (Step(MAIN_KERNEL, ("x", "w", "bias", "out"), *main),)


# Mirrors the template's #ifndef defaults (tests check the two agree).
DEFAULTS = {"ALGO": 0, "TM": 32, "TN": 32, "TK": 8, "WM": 4, "WN": 4, "VW": 1, "USE_LOCAL": 1, "VEC_A": 1, "VEC_B": 1,
            "VN": 1, "KSPLIT": 1, "WINO_M": 2, "WBK": 32, "WBT": 32, "WBC": 8, "WRK": 2, "WRT": 2}

MAIN_KERNEL = "conv2d"
REDUCE_KERNEL = "reduce_slices"  # split-K's reduction (in the source when KSPLIT > 1)
WINOGRAD_FILTER_KERNEL = "winograd_filter"  # Winograd's filter transform (in the source when ALGO is 1 or 2)
WINOGRAD_INPUT_KERNEL = "winograd_input"  # ALGO 2's input and output transforms
WINOGRAD_OUTPUT_KERNEL = "winograd_output"
REDUCE_LOCAL = 64  # work-group size of the one-work-item-per-element kernels
