"""The kernel's search space, declared as data: values per tunable, per kernel family, and constraints.

A candidate is a dict over ``codegen.TUNABLES``. ``violations`` says, in words, why a candidate cannot
run a workload on a device; the tuner and the call path both use it, so nothing invalid is ever built.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..codegen import (DEFAULTS, GEMM_TUNABLES, IMPLICIT_GEMM, WINOGRAD, WINOGRAD_GEMM, WINOGRAD_TUNABLES,
                       gemm_params, winograd_gemm_workload, winograd_tiles, work_groups, workspaces)
from ..winograd import TILE_SIZES

# Split-K slice counts. A split pays only while the output tiles leave compute units idle: the candidates
# stop at the first count that gives every compute unit OCCUPANCY work-groups (one: a ResNet-50 3x3 layer at
# N=32 has 196 tiles of 64x128 for the H100's 132 units and is not split), and each slice keeps at least
# MIN_SLICE_TILES reduction tiles (fewer: the reduction's extra pass costs more than the slices gain).
SPLITS = (1, 2, 4, 8, 16, 32)
OCCUPANCY = 1
MIN_SLICE_TILES = 4

# F(4x4, 3x3) trades accuracy for a 4x cut in multiplications: its float32 error, measured on PoCL with random
# inputs, was 0.6-1.1e-6 at 3-16 input channels, 2.5e-6 at 256 and 4.0e-6 at 512 (F(2x2, 3x3): 1.3e-7 to 7.5e-7),
# against the bound of 1e-5 every variant is held to. It is offered up to 512 channels (ResNet-50's widest
# 3x3 layer); the tuner checks every candidate against the reference anyway.
WINOGRAD_4_MAX_CHANNELS = 512

# GPU family: local-memory tiles, work-groups of 64-256 work-items. CPU family (PoCL): no local memory,
# no barriers, each work-item streams a register block straight from global memory. Winograd family:
# F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 undilated single-group convs, local-memory tiles (GPU devices);
# its candidates keep the implicit GEMM's tunables at their defaults. Winograd-GEMM family: the same transforms
# around the GEMM family's kernel, batched over the alpha^2 points (register blocks up to 8x8 where the fused
# kernel holds 1x2..2x2); the fused kernel's tunables stay at their defaults.
SPACES = {
    "gpu": {"USE_LOCAL": (1,), "TM": (32, 64, 128), "TN": (32, 64, 128, 256), "TK": (8, 16, 32),
            "WM": (4, 8), "WN": (4, 8, 16), "VW": (1, 4), "VEC_A": (1, 4), "VEC_B": (1, 4), "VN": (1,),
            "KSPLIT": SPLITS},
    "cpu": {"USE_LOCAL": (0,), "TM": (4, 8, 16, 32), "TN": (8, 16, 32, 64, 128), "TK": (8,),
            "WM": (1, 2, 4, 8), "WN": (4, 8, 16, 32), "VW": (1,), "VEC_A": (1,), "VEC_B": (1,), "VN": (1, 4, 8, 16),
            "KSPLIT": SPLITS},
    "winograd": {"ALGO": (WINOGRAD,), "WINO_M": TILE_SIZES, "WBK": (16, 32, 64), "WBT": (16, 32, 64),
                 "WBC": (4, 8), "WRK": (1, 2, 4), "WRT": (1, 2, 4)},
    "winograd_gemm": {"ALGO": (WINOGRAD_GEMM,), "WINO_M": TILE_SIZES, "USE_LOCAL": (1,), "TM": (32, 64, 128),
                      "TN": (32, 64, 128), "TK": (8, 16), "WM": (4, 8), "WN": (4, 8), "VW": (1, 4), "VEC_A": (1, 4),
                      "VEC_B": (1, 4)},
}
# The families a device kind's tuner searches (its own first).
KIND_FAMILIES = {"gpu": ("gpu", "winograd", "winograd_gemm"), "cpu": ("cpu",)}

# Starting points per device kind. The GPU one needs 128 work-items and 12.8 KB of local memory in float32
# (25.6 KB in float64); where it does not fit, the template's defaults apply. On the H100 it came within
# 0-40 % of the tuned best on ResNet-50 layers at N=32.
DEVICE_DEFAULTS = {
    "gpu": {"USE_LOCAL": 1, "TM": 64, "TN": 128, "TK": 16, "WM": 8, "WN": 8, "VW": 4, "VEC_A": 1, "VEC_B": 1,
            "VN": 1},
    "cpu": {"USE_LOCAL": 0, "TM": 8, "TN": 32, "TK": 8, "WM": 4, "WN": 16, "VW": 1, "VEC_A": 1, "VEC_B": 1,
            "VN": 8},
}


@dataclass(frozen=True)
class DeviceLimits:
    max_work_group_size: int
    local_memory: int  # bytes
    has_fp64: bool = True
    compute_units: int = 1  # what split-K fills
    max_alloc: int = 1 << 62  # bytes of the largest buffer (split-K's workspace must fit)

    @classmethod
    def of(cls, device):
        return cls(device.max_work_group_size, device.local_memory, device.has_fp64, device.compute_units,
                   device.max_alloc)


def complete(params):
    """``params`` with the template's defaults filled in."""
    return {**DEFAULTS, **params}


def identity(params):
    """A hashable id of a parameter set: equal for sets that generate the same kernel."""
    return tuple(sorted(complete(params).items()))


# Local memory a driver keeps for itself in every kernel that uses some: NVIDIA's OpenCL reports 16 bytes more
# than the two tiles (seen on the H100 for each of 8 tile shapes, float32 and float64).
LOCAL_MEMORY_RESERVE = 16


def local_memory_bytes(params, itemsize):
    """Local memory the kernel needs with ``params``: its two tiles plus the driver's reserve (0 if no tiles)."""
    p = complete(params)
    if p["ALGO"] == WINOGRAD:  # transformed patches and filters, alpha^2 of each per channel step
        return (p["WINO_M"] + 2) ** 2 * p["WBC"] * (p["WBT"] + p["WBK"]) * itemsize + LOCAL_MEMORY_RESERVE
    if not p["USE_LOCAL"]:
        return 0
    pad_a = 4 if p["VW"] == 4 else 1
    pad_b = 4 if p["VW"] == 4 else 0
    return p["TK"] * (p["TM"] + pad_a + p["TN"] + pad_b) * itemsize + LOCAL_MEMORY_RESERVE


def threads(params):
    """Work-items per work-group of the variant's main kernel."""
    p = complete(params)
    if p["ALGO"] == WINOGRAD:
        return (p["WBK"] // p["WRK"]) * (p["WBT"] // p["WRT"])
    return (p["TM"] // p["WM"]) * (p["TN"] // p["WN"])


def _device_fit(work_items, local_bytes, workload, limits):
    """Reasons a launch of ``work_items`` per group using ``local_bytes`` of local memory does not fit the device."""
    reasons = []
    if work_items > limits.max_work_group_size:
        reasons.append(f"{work_items} work-items exceed the device's {limits.max_work_group_size}")
    if workload.dtype == "float64" and not limits.has_fp64:
        reasons.append("the device has no float64 support")
    if local_bytes > limits.local_memory:
        reasons.append(f"{local_bytes} bytes of local memory exceed the device's {limits.local_memory}")
    return reasons


def violations(params, workload, limits):
    """Reasons ``params`` cannot run ``workload`` on a device with ``limits`` (empty list: it can)."""
    p = complete(params)
    reasons = []
    if p["ALGO"] not in (IMPLICIT_GEMM, WINOGRAD, WINOGRAD_GEMM):
        return [f"ALGO must be {IMPLICIT_GEMM} (implicit GEMM), {WINOGRAD} (fused Winograd) or {WINOGRAD_GEMM} "
                f"(Winograd around a batched GEMM), got {p['ALGO']!r}"]
    if any(not isinstance(p[name], int) or p[name] < 1
           for name in ("TM", "TN", "TK", "WM", "WN", "VW", "VEC_A", "VEC_B", "VN", "KSPLIT") + WINOGRAD_TUNABLES):
        return ["every tile size must be a positive int"]
    if p["ALGO"] == WINOGRAD:
        return _winograd_violations(p, workload, limits)
    if p["ALGO"] == WINOGRAD_GEMM:
        return _winograd_gemm_violations(p, workload, limits)
    if p["USE_LOCAL"] not in (0, 1):
        reasons.append(f"USE_LOCAL must be 0 or 1, got {p['USE_LOCAL']}")
    if p["VW"] not in (1, 4) or p["VEC_A"] not in (1, 4) or p["VEC_B"] not in (1, 4):
        reasons.append("VW, VEC_A and VEC_B must be 1 or 4")
        return reasons
    if p["VN"] not in (1, 2, 4, 8, 16):
        reasons.append(f"VN must be 1, 2, 4, 8 or 16, got {p['VN']}")
        return reasons
    if p["VN"] > 1 and (p["USE_LOCAL"] or p["VW"] != 1 or p["WN"] % p["VN"]):
        reasons.append(f"VN={p['VN']} needs the CPU shape (USE_LOCAL=0), VW=1 and WN a multiple of VN")
    if p["TM"] % p["WM"] or p["TN"] % p["WN"]:
        reasons.append(f"register block {p['WM']}x{p['WN']} must divide the tile {p['TM']}x{p['TN']}")
        return reasons
    if p["WM"] % p["VW"] or p["WN"] % p["VW"]:
        reasons.append(f"VW={p['VW']} must divide WM={p['WM']} and WN={p['WN']}")
    count = threads(p)
    itemsize = 8 if workload.dtype == "float64" else 4
    reasons += _device_fit(count, local_memory_bytes(p, itemsize), workload, limits)
    if p["WM"] * p["WN"] > 128:
        reasons.append(f"register block {p['WM']}x{p['WN']} is over 128 accumulators")
    if p["VEC_A"] == 4 and (workload.gemm_k % 4 or p["TK"] % 4 or not p["USE_LOCAL"]):
        reasons.append("VEC_A=4 needs local tiles and a reduction length and TK that are multiples of 4")
    if p["VEC_B"] == 4 and (not workload.pointwise or (workload.out_h * workload.out_w) % 4
                            or p["TN"] % 4 or not p["USE_LOCAL"]):
        reasons.append("VEC_B=4 needs local tiles and a 1x1 stride-1 unpadded conv with P*Q a multiple of 4")
    if p["KSPLIT"] > 1:
        reasons += _split_violations(p, workload, limits, itemsize)
    if p["USE_LOCAL"]:
        vcols = p["TN"] // p["VEC_B"]
        if count % vcols and vcols % count:
            reasons.append(f"{count} work-items and {vcols} B-tile columns must divide one another")
    return reasons


def winograd_applies(workload):
    """Whether Winograd (F(2x2) or F(4x4), 3x3) computes ``workload``: a 3x3, stride-1, undilated conv of
    one group."""
    return (workload.op == "conv2d" and (workload.kernel_h, workload.kernel_w) == (3, 3)
            and (workload.stride_h, workload.stride_w) == (1, 1)
            and (workload.dilation_h, workload.dilation_w) == (1, 1) and workload.groups == 1)


def _winograd_tile_violations(p, workload):
    """What rules out Winograd's tile size for ``workload``, either form (None: the workload is not one)."""
    if not winograd_applies(workload):
        return None
    if p["WINO_M"] not in TILE_SIZES:
        return [f"WINO_M must be one of {TILE_SIZES}, got {p['WINO_M']}"]
    if p["WINO_M"] == 4 and workload.in_channels > WINOGRAD_4_MAX_CHANNELS:
        return [f"F(4x4, 3x3)'s error grows with the reduction: at most {WINOGRAD_4_MAX_CHANNELS} input "
                f"channels, got {workload.in_channels}"]
    return []


NOT_WINOGRAD = "Winograd (F(2x2) or F(4x4), 3x3) needs a 3x3, stride-1, undilated conv2d of one group"


def _winograd_violations(p, workload, limits):
    tile_reasons = _winograd_tile_violations(p, workload)
    if tile_reasons is None:
        return [NOT_WINOGRAD]
    reasons = []
    if any(p[name] != DEFAULTS[name] for name in GEMM_TUNABLES):
        reasons.append("a Winograd variant keeps the implicit GEMM's tunables at their defaults")
    if p["WINO_M"] not in TILE_SIZES:
        return reasons + tile_reasons
    reasons += tile_reasons
    if p["WBK"] % p["WRK"] or p["WBT"] % p["WRT"]:
        reasons.append(f"WRK={p['WRK']} and WRT={p['WRT']} must divide WBK={p['WBK']} and WBT={p['WBT']}")
        return reasons
    itemsize = 8 if workload.dtype == "float64" else 4
    reasons += _device_fit(threads(p), local_memory_bytes(p, itemsize), workload, limits)
    points = (p["WINO_M"] + 2) ** 2
    if points * p["WRK"] * p["WRT"] > 128:
        reasons.append(f"{points} x {p['WRK']} x {p['WRT']} accumulators are over 128")
    filters = points * workload.out_channels * workload.in_channels * itemsize
    if filters > limits.max_alloc:
        reasons.append(f"the {filters} bytes of transformed filters exceed the device's largest buffer")
    return reasons


def _winograd_gemm_violations(p, workload, limits):
    tile_reasons = _winograd_tile_violations(p, workload)
    if tile_reasons is None:
        return [NOT_WINOGRAD]
    if tile_reasons and p["WINO_M"] not in TILE_SIZES:
        return tile_reasons
    reasons = list(tile_reasons)
    if any(p[name] != DEFAULTS[name] for name in WINOGRAD_TUNABLES[1:]):
        reasons.append("a Winograd-GEMM variant keeps the fused Winograd's tunables at their defaults")
    if p["USE_LOCAL"] != 1 or p["KSPLIT"] != 1 or p["VN"] != 1:
        reasons.append("a Winograd-GEMM variant's GEMM runs with local tiles, unsplit, unvectorized: USE_LOCAL=1, "
                       "KSPLIT=1 and VN=1")
    gemm = winograd_gemm_workload(workload, p)
    reasons += [f"its batched GEMM: {reason}" for reason in violations(gemm_params(p), gemm, limits)]
    largest = max(workspaces(workload, p).values())
    if largest > limits.max_alloc:
        reasons.append(f"its {largest} bytes of transformed data exceed the device's largest buffer")
    return reasons


def _split_violations(p, workload, limits, itemsize):
    tiles = -(-workload.gemm_k // p["TK"])
    reasons = []
    if p["KSPLIT"] not in SPLITS:
        reasons.append(f"KSPLIT must be one of {SPLITS}, got {p['KSPLIT']}")
    elif tiles < p["KSPLIT"] * MIN_SLICE_TILES:
        reasons.append(f"KSPLIT={p['KSPLIT']} leaves slices under {MIN_SLICE_TILES} of the {tiles} reduction tiles")
    workspace = p["KSPLIT"] * workload.batch * workload.out_channels * workload.out_h * workload.out_w * itemsize
    if workspace > limits.max_alloc:
        reasons.append(f"split-K's {workspace} byte workspace exceeds the device's largest buffer")
    return reasons


def split_for_occupancy(params, workload, limits):
    """The least KSPLIT that gives every compute unit OCCUPANCY work-groups of ``params``'s tiles (1 when the
    output tiles do already), within the reduction's length."""
    tiles = work_groups(workload, {**params, "KSPLIT": 1})
    wanted = OCCUPANCY * limits.compute_units
    best = 1
    for slices in SPLITS[1:]:
        if tiles * best >= wanted or _split_violations({**complete(params), "KSPLIT": slices}, workload, limits,
                                                       8 if workload.dtype == "float64" else 4):
            break
        best = slices
    return best


def _power_of_two_above(size, floor):
    return max(floor, 1 << max(0, int(np.ceil(np.log2(max(size, 1))))))


def candidates(workload, limits, kind):
    """Every valid parameter set of the ``kind`` family ("gpu", "cpu" or "winograd") for ``workload``, in
    space order, complete (every tunable named).

    Tiles much larger than the problem are skipped: they only compute padding.
    """
    space = SPACES[kind]
    names = list(space)
    if kind == "winograd_gemm":
        if not winograd_applies(workload):
            return []
        gemms = {m: winograd_gemm_workload(workload, {"WINO_M": m}) for m in space["WINO_M"]}
        cap_m = _power_of_two_above(workload.out_channels, space["TM"][0])
        cap_n = {m: _power_of_two_above(gemm.width, space["TN"][0]) for m, gemm in gemms.items()}
        fits = lambda params: params["TM"] <= cap_m and params["TN"] <= cap_n[params["WINO_M"]]  # noqa: E731
    elif kind == "winograd":
        if not winograd_applies(workload):
            return []
        cap_k = _power_of_two_above(workload.out_channels, space["WBK"][0])
        cap_t = {m: _power_of_two_above(winograd_tiles(workload, {"WINO_M": m}), space["WBT"][0])
                 for m in space["WINO_M"]}
        fits = lambda params: params["WBK"] <= cap_k and params["WBT"] <= cap_t[params["WINO_M"]]  # noqa: E731
    else:
        cap_m = _power_of_two_above(workload.gemm_m, space["TM"][0])
        cap_n = _power_of_two_above(workload.gemm_n, space["TN"][0])
        fits = lambda params: (params["TM"] <= cap_m and params["TN"] <= cap_n  # noqa: E731
                               # no split beyond what fills the device: only the reduction would grow
                               and (params["KSPLIT"] == 1
                                    or params["KSPLIT"] <= split_for_occupancy(params, workload, limits)))
    found = []
    for values in itertools.product(*(space[name] for name in names)):
        params = complete(dict(zip(names, values)))
        if fits(params) and not violations(params, workload, limits):
            found.append(params)
    return found


def default_params(workload, limits, kind, excluded=()):
    """The device kind's defaults if they fit, else the template's, else None (no safe OpenCL variant); on a
    GPU split along the reduction when the output tiles alone leave compute units idle (``split_for_occupancy``).
    ``excluded``: parameter sets that failed (their identities) are passed over."""
    for params in (DEVICE_DEFAULTS[kind], dict(DEFAULTS)):
        if violations(params, workload, limits):
            continue
        options = [params]
        if kind == "gpu":
            split = {**params, "KSPLIT": split_for_occupancy(params, workload, limits)}
            options.insert(0, split)
        for option in options:
            if identity(option) not in excluded:
                return dict(option)
    return None
