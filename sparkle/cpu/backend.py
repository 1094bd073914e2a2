"""The Numba CPU backend: runs validated conv2d and matmul calls on the compiled kernels."""

import numba
import numpy as np

from ..api import matmul_as_conv2d_spec
from .conv2d import fused_conv2d_driver
from .direct import direct_conv2d
from .implicit import copy_size, implicit_conv2d_driver, needs_copy, reduction_offsets, virtual_input
from .operands import allocate_scratch, bias_vector, geometry, read_only_flat, weight_rows
from .plan import plan_conv2d, uses_direct_kernel

__all__ = ["conv2d", "matmul", "plan_conv2d", "uses_direct_kernel"]


def _run_direct(x, w, bias, spec, out):
    """Direct convolution (see ``direct.py``) into ``out``."""
    threads = numba.get_num_threads()
    planes = spec.batch * spec.out_channels
    row_chunks = min(spec.out_h, -(-4 * threads // planes)) if planes < 4 * threads else 1
    direct_conv2d(read_only_flat(x), read_only_flat(w), bias_vector(bias, spec), out.reshape(-1), geometry(spec),
                  spec.has_bias, spec.activation == "relu", row_chunks, threads)


def _run_implicit(x, w, bias, spec, plan, out):
    """Implicit GEMM read straight from the (padded) input (see ``implicit.py``) into ``out``."""
    w_rows, lda = weight_rows(w)
    source, layout, plane = virtual_input(read_only_flat(x), spec)
    offsets = reduction_offsets(spec, layout, plane)
    driver = implicit_conv2d_driver(plan.mr, plan.nv, plan.nr)
    shape = (spec.batch, spec.in_channels, spec.out_channels, spec.groups, spec.out_h, spec.out_w, layout.phases)
    driver(source, plane, layout.pitch, offsets, read_only_flat(w_rows), lda, bias_vector(bias, spec), out.reshape(-1),
           shape, spec.has_bias, spec.activation == "relu", plan.kc, plan.mc, plan.nc, plan.channel_chunks,
           plan.threads)


def _run_fused(x, w, bias, spec, plan, out):
    """Fused im2col + GEMM (see ``conv2d.py``) into ``out``."""
    w_rows, lda = weight_rows(w)
    scratch = allocate_scratch(spec, plan)
    driver = fused_conv2d_driver(plan.mr, plan.nv, plan.nr)
    driver(read_only_flat(x), read_only_flat(w_rows), lda, bias_vector(bias, spec), out.reshape(-1),
           geometry(spec), spec.has_bias, spec.activation == "relu", plan.kc, plan.mc, plan.nc,
           plan.channel_chunks, scratch.panel, scratch.origins, scratch.offsets, scratch.runs, scratch.rows,
           scratch.tile)


def workspace_bytes(spec, plan):
    """Bytes a call with ``plan`` allocates besides its output: the implicit path's padded or
    phase copy of the input (none when it reads the input in place), the packed path's per-thread
    scratch."""
    if not plan.implicit:
        return allocate_scratch(spec, plan).nbytes
    if not needs_copy(spec):
        return 0
    planes, plane = copy_size(spec)
    return planes * plane * spec.dtype.itemsize


def conv2d(x, w, bias, spec, plan=None):
    """Convolution of validated inputs; returns a new C-contiguous array of ``spec.dtype``.

    Without a plan, groups with very few output channels take the direct kernel and
    everything else the fused im2col + GEMM driver; a plan always means the GEMM driver.
    """
    out = np.empty(spec.output_shape, dtype=spec.dtype)
    if out.size == 0:
        return out
    if plan is None and uses_direct_kernel(spec):
        _run_direct(x, w, bias, spec, out)
    else:
        plan = plan or plan_conv2d(spec)
        (_run_implicit if plan.implicit else _run_fused)(x, w, bias, spec, plan, out)
    return out


def matmul(a, b, spec, plan=None):
    """Matrix product of validated inputs through the packed driver (B's rows, read in place, are a
    row of N apart: pages apart for large N, where packed panels win)."""
    if spec.m == 0 or spec.n == 0 or spec.k == 0:
        return np.zeros((spec.m, spec.n), dtype=spec.dtype)
    conv_spec = matmul_as_conv2d_spec(spec)
    plan = plan or plan_conv2d(conv_spec, implicit=False)
    image = b.reshape(1, spec.k, 1, spec.n)
    weights = a.reshape(spec.m, spec.k, 1, 1)
    return conv2d(image, weights, None, conv_spec, plan).reshape(spec.m, spec.n)
