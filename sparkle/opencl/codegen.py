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


# Tunables, in the order they appear in the source; each has a default in the template.
TUNABLES = ("TM", "TN", "TK", "WM", "WN", "VW", "USE_LOCAL", "VEC_A", "VEC_B", "VN", "KSPLIT")


@lru_cache(maxsize=1)
def template():
    return resources.files(__package__).joinpath("kernels/conv2d.cl").read_text()


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
    lines += [f"#define {name} {value}" for name, value in shape_defines(workload, has_bias, relu).items()]
    lines += [f"#define {name} {int(params[name])}" for name in TUNABLES if name in params]
    return "\n".join(lines) + "\n" + template()


def launch_geometry(workload, params):
    """(global size, local size) of the launch for ``params`` (defaults filled in)."""
    p = {**DEFAULTS, **params}
    threads_n, threads_m = p["TN"] // p["WN"], p["TM"] // p["WM"]
    tiles_n = -(-workload.gemm_n // p["TN"])
    tiles_m = -(-workload.gemm_m // p["TM"])
    return (tiles_n * threads_n, tiles_m * threads_m, workload.groups * p["KSPLIT"]), (threads_n, threads_m, 1)


def output_size(workload):
    return workload.batch * workload.out_channels * workload.out_h * workload.out_w


def work_groups(workload, params):
    """Work-groups the main kernel launches (what fills a device's compute units)."""
    p = {**DEFAULTS, **params}
    return -(-workload.gemm_n // p["TN"]) * -(-workload.gemm_m // p["TM"]) * workload.groups * p["KSPLIT"]


def split_slices(params):
    """Split-K's slice count (1: no split, one kernel writes the output)."""
    return int({**DEFAULTS, **params}["KSPLIT"])


def reduce_geometry(workload):
    """(global size, local size) of split-K's reduction: one work-item per output element."""
    return (-(-output_size(workload) // REDUCE_LOCAL) * REDUCE_LOCAL,), (REDUCE_LOCAL,)


# Mirrors the template's #ifndef defaults (tests check the two agree).
DEFAULTS = {"TM": 32, "TN": 32, "TK": 8, "WM": 4, "WN": 4, "VW": 1, "USE_LOCAL": 1, "VEC_A": 1, "VEC_B": 1, "VN": 1,
            "KSPLIT": 1}

# Split-K's reduction kernel (defined in the source when KSPLIT > 1) and its work-group size.
REDUCE_KERNEL = "reduce_slices"
REDUCE_LOCAL = 64
