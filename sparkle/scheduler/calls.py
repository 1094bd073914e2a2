"""What the scheduler knows of a call: its text for humans, and how it splits into parts."""

from __future__ import annotations

import numpy as np

from .. import reference
from . import verify


def operands(op, args, kwargs):
    if op == "conv2d":
        x = args[0] if args else kwargs.get("x")
        w = args[1] if len(args) > 1 else kwargs.get("w")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return (x, w, bias)
    return tuple(args[:2])


def signature_text(op, spec):
    if op == "matmul":
        return f"matmul {spec.m}x{spec.k}x{spec.n} {spec.dtype.name}"
    return (f"conv2d {spec.batch}x{spec.in_channels}x{spec.height}x{spec.width} k{spec.out_channels}x"
            f"{spec.kernel_h}x{spec.kernel_w} s{spec.stride_h},{spec.stride_w} p{spec.pad_top},{spec.pad_bottom},"
            f"{spec.pad_left},{spec.pad_right} d{spec.dilation_h},{spec.dilation_w} g{spec.groups}"
            f"{' bias' if spec.has_bias else ''}{' relu' if spec.activation else ''} {spec.dtype.name}")


def shape_text(op, spec):
    if op == "matmul":
        return f"({spec.m}x{spec.k}) @ ({spec.k}x{spec.n}) {spec.dtype.name}"
    return (f"x {spec.batch}x{spec.in_channels}x{spec.height}x{spec.width}, w {spec.out_channels}x"
            f"{spec.in_channels // spec.groups}x{spec.kernel_h}x{spec.kernel_w} {spec.dtype.name}")


def split_axis(op, spec):
    """The axis a call splits along and its number of units: images, else output channels (conv2d);
    rows of ``a`` (matmul)."""
    if op == "matmul":
        return "rows", spec.m
    if spec.batch >= 2:
        return "batch", spec.batch
    return ("channels", spec.out_channels) if spec.groups == 1 else ("batch", 1)


def zero_operands(op, spec):
    """Host operands of ``spec``'s shapes, all zeros (a warm-up call's; conv2d's bias None without one)."""
    if op == "matmul":
        return (np.zeros((spec.m, spec.k), spec.dtype), np.zeros((spec.k, spec.n), spec.dtype))
    x = np.zeros((spec.batch, spec.in_channels, spec.height, spec.width), spec.dtype)
    w = np.zeros((spec.out_channels, spec.in_channels // spec.groups, spec.kernel_h, spec.kernel_w), spec.dtype)
    return (x, w, np.zeros(spec.out_channels, spec.dtype) if spec.has_bias else None)


def part_spec(op, spec, start, stop):
    import dataclasses

    if op == "matmul":
        return dataclasses.replace(spec, m=stop - start)
    if spec.batch >= 2:
        return dataclasses.replace(spec, batch=stop - start)
    return dataclasses.replace(spec, out_channels=stop - start)


def part_operands(op, axis, operands, start, stop):
    if op == "matmul":
        a, b = operands
        return (a[start:stop], b)
    x, w, bias = operands
    if axis == "batch":
        return (x[start:stop], w, bias)
    return (x, w[start:stop], None if bias is None else bias[start:stop])


def part_view(op, axis, out, start, stop):
    if op == "matmul" or axis == "batch":
        return out[start:stop]
    return out[:, start:stop]


def output_shape(op, spec):
    return (spec.m, spec.n) if op == "matmul" else spec.output_shape


def reference_result(op, spec, host_operands):
    if op == "matmul":
        return np.ascontiguousarray(reference.matmul(*host_operands), dtype=spec.dtype)
    x, w, bias = host_operands
    return np.ascontiguousarray(reference.conv2d(x, w, bias, **verify.conv2d_arguments(spec)), dtype=spec.dtype)


def deliver(result, home):
    """The result on ``home``'s device (where the call's device-resident operands live)."""
    from ..opencl import transfer

    return transfer.upload(home.device, result, result.dtype)
