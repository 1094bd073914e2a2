"""Generate the fused-path oracle cases: convolutions that reach the CPU backend's GEMM paths.

    python tests/oracles/fused_cases/generate.py        (needs PyTorch; the tests do not)

Writes ``<name>.npz`` (float32 ``x``, ``w``, ``b`` when the case has a bias; float64 expected ``y``) and
``cases.json`` next to this script. The expected outputs are computed without any of Sparkle's code:
``torch.nn.functional.conv2d`` in float64 on the float32 inputs (every float32 value is exact in
float64, so the only error is float64 rounding), after an explicit ``torch.nn.functional.pad`` for the
padding, so that asymmetric padding never goes through a convolution's own padding argument.

``padding="same"`` is ONNX SAME_UPPER: the output has ceil(input / stride) pixels along each axis and
the total padding that needs, (out - 1) * stride + (kernel - 1) * dilation + 1 - input, is split with
the odd pixel at the end (bottom, right). ``same_upper_padding`` computes it here from that definition;
for stride-1 cases the result is also checked against PyTorch's own ``padding="same"``, which puts the
odd pixel at the end too.

Every case has at least 4 output channels per group, so the CPU backend never takes its direct kernel.
``expected_path`` records the path its planner (sparkle/cpu/plan.py) must take on each instruction-set
family: families planned as on AVX2 machines ("avx2", "portable") always take the packed path; AVX-512
takes the implicit path except where reading the input in place would thrash the caches, which needs
stride 1 and no padding (no copy of the input) and an image plane a multiple of 4 KiB (32 x 32 or 16 x 64
float32 pixels here). Inputs are drawn from fixed seeds, so a rerun writes the same inputs and expected
outputs equal to float64 rounding.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import numpy as np
import torch
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
SEED = 20250608

IMPLICIT = {"avx512": "implicit", "avx2": "packed", "portable": "packed"}
PACKED = {"avx512": "packed", "avx2": "packed", "portable": "packed"}



def conv(*, x, w, bias, stride, dilation, groups, padding, path, what):
    """One case: shapes and PyTorch-style arguments; ``padding`` is the argument given to sparkle.conv2d
    ("same", or (top, bottom, left, right)), ``path`` the CPU path per instruction-set family."""
    return {"x": x, "w": w, "bias": bias, "stride": stride, "dilation": dilation, "groups": groups,
            "padding": padding, "path": path, "what": what}


CASES = {
    "bottom_right_padding": conv(
        x=(2, 5, 9, 11), w=(6, 5, 3, 3), bias=True, stride=(1, 1), dilation=(1, 1), groups=1,
        padding=(0, 2, 0, 1), path=IMPLICIT,
        what="padding only at the bottom and right, batch 2"),
    "top_left_padding_stride_2x1": conv(
        x=(1, 7, 13, 10), w=(9, 7, 3, 2), bias=True, stride=(2, 1), dilation=(1, 1), groups=1,
        padding=(2, 0, 1, 0), path=IMPLICIT,
        what="padding only at the top and left, unequal strides, even kernel width"),
    "same_upper_odd_stride_2": conv(
        x=(1, 6, 10, 12), w=(8, 6, 3, 3), bias=True, stride=(2, 2), dilation=(1, 1), groups=1,
        padding="same", path=IMPLICIT,
        what="SAME_UPPER with stride 2: one pixel of padding per axis, at the bottom and right"),
    "same_upper_even_kernel_dilated": conv(
        x=(2, 6, 8, 11), w=(8, 6, 4, 3), bias=False, stride=(1, 1), dilation=(1, 2), groups=1,
        padding="same", path=IMPLICIT,
        what="SAME_UPPER with a 4-row kernel (3 rows of padding: 1 top, 2 bottom) and dilation (1, 2)"),
    "same_upper_stride_3x2_odd": conv(
        x=(1, 5, 14, 9), w=(7, 5, 5, 2), bias=True, stride=(3, 2), dilation=(1, 1), groups=1,
        padding="same", path=IMPLICIT,
        what="SAME_UPPER with unequal strides (3, 2): odd total padding on both axes"),
    "dilation_2x3_padded": conv(
        x=(1, 4, 12, 14), w=(8, 4, 3, 3), bias=True, stride=(1, 1), dilation=(2, 3), groups=1,
        padding=(2, 2, 3, 3), path=IMPLICIT,
        what="unequal dilations with matching padding"),
    "groups_2_padded": conv(
        x=(1, 8, 10, 9), w=(12, 4, 3, 3), bias=True, stride=(1, 1), dilation=(1, 1), groups=2,
        padding=(1, 1, 1, 1), path=IMPLICIT,
        what="2 groups of 6 output channels"),
    "groups_3_stride_1x2_dilated_asymmetric": conv(
        x=(2, 9, 11, 12), w=(12, 3, 3, 3), bias=True, stride=(1, 2), dilation=(2, 2), groups=3,
        padding=(2, 1, 0, 2), path=IMPLICIT,
        what="3 groups of 4 output channels, stride (1, 2), dilation 2, asymmetric padding, batch 2"),
    "many_channels_edge_tiles": conv(
        x=(1, 12, 15, 17), w=(20, 12, 3, 3), bias=True, stride=(1, 1), dilation=(1, 1), groups=1,
        padding=(0, 1, 0, 1), path=IMPLICIT,
        what="20 output channels and 255 pixels: partial micro-panels both ways, bottom/right padding"),
    "pointwise_plane_4k_packed": conv(
        x=(1, 16, 32, 32), w=(8, 16, 1, 1), bias=True, stride=(1, 1), dilation=(1, 1), groups=1,
        padding=(0, 0, 0, 0), path=PACKED,
        what="1x1 on 32x32 planes (4 KiB apart: in-place reads would thrash): packed on AVX-512 too"),
    "groups_dilated_plane_4k_packed": conv(
        x=(1, 8, 32, 32), w=(8, 4, 3, 3), bias=False, stride=(1, 1), dilation=(2, 2), groups=2,
        padding=(0, 0, 0, 0), path=PACKED,
        what="3x3 dilation 2, 2 groups of 4 output channels, 32x32 planes: packed on AVX-512 too"),
    "wide_kernel_plane_4k_packed": conv(
        x=(2, 3, 16, 64), w=(5, 3, 3, 5), bias=True, stride=(1, 1), dilation=(1, 1), groups=1,
        padding=(0, 0, 0, 0), path=PACKED,
        what="3x5 kernel on 16x64 planes (4 KiB), batch 2: packed on AVX-512 too"),
}


def same_upper_padding(size, kernel, stride, dilation):
    """(before, after) padding of one axis for SAME_UPPER: ceil(size / stride) outputs, odd pixel after."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + (kernel - 1) * dilation + 1 - size)
    return total // 2, total - total // 2


def padding_tblr(case):
    if case["padding"] != "same":
        return tuple(case["padding"])
    _, _, height, width = case["x"]
    _, _, kernel_h, kernel_w = case["w"]
    top, bottom = same_upper_padding(height, kernel_h, case["stride"][0], case["dilation"][0])
    left, right = same_upper_padding(width, kernel_w, case["stride"][1], case["dilation"][1])
    return top, bottom, left, right


def expected_output(x, w, b, case, tblr):
    """float64 PyTorch convolution of the explicitly zero-padded input."""
    top, bottom, left, right = tblr
    x64 = torch.from_numpy(x.astype(np.float64))
    w64 = torch.from_numpy(w.astype(np.float64))
    b64 = None if b is None else torch.from_numpy(b.astype(np.float64))
    padded = F.pad(x64, (left, right, top, bottom))  # F.pad takes the last axis first
    y = F.conv2d(padded, w64, b64, stride=case["stride"], padding=0, dilation=case["dilation"],
                 groups=case["groups"])
    if case["padding"] == "same":
        # SAME_UPPER's defining property, and PyTorch's own "same" where it has one (stride 1).
        assert y.shape[2:] == tuple(-(-size // s) for size, s in zip(x.shape[2:], case["stride"])), y.shape
        if case["stride"] == (1, 1):
            with warnings.catch_warnings():  # "may require a zero-padded copy" (even kernels): only speed
                warnings.simplefilter("ignore", UserWarning)
                same = F.conv2d(x64, w64, b64, padding="same", dilation=case["dilation"], groups=case["groups"])
            assert torch.equal(same, y), "PyTorch's padding='same' disagrees with the explicit SAME_UPPER padding"
    return y.numpy()


def main():
    torch.use_deterministic_algorithms(True)
    for old in HERE.glob("*.npz"):
        old.unlink()
    index = {}
    for number, (name, case) in enumerate(CASES.items()):
        rng = np.random.default_rng(SEED + number)
        k, c_group, _, _ = case["w"]
        assert k % case["groups"] == 0 and case["x"][1] == c_group * case["groups"]
        assert k // case["groups"] >= 4, "every group needs 4 output channels, or the direct kernel runs"
        x = rng.standard_normal(case["x"]).astype(np.float32)
        w = rng.standard_normal(case["w"]).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32) if case["bias"] else None
        tblr = padding_tblr(case)
        y = expected_output(x, w, b, case, tblr)
        arrays = {"x": x, "w": w, "y": y} if b is None else {"x": x, "w": w, "b": b, "y": y}
        np.savez_compressed(HERE / f"{name}.npz", **arrays)
        index[name] = {
            "file": f"{name}.npz",
            "what": case["what"],
            "x_shape": list(x.shape),
            "w_shape": list(w.shape),
            "y_shape": list(y.shape),
            "has_bias": b is not None,
            "stride": list(case["stride"]),
            "dilation": list(case["dilation"]),
            "groups": case["groups"],
            "padding_tblr": list(tblr),
            "sparkle_padding": case["padding"] if case["padding"] == "same" else list(case["padding"]),
            "expected_path": case["path"],
            "source": f"tests/oracles/fused_cases/generate.py (seed {SEED + number}); "
                      f"y: torch {torch.__version__} F.conv2d in float64 after F.pad",
        }
    (HERE / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    total = sum(path.stat().st_size for path in HERE.iterdir() if path.suffix in (".npz", ".json"))
    print(f"wrote {len(index)} cases to {HERE} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
