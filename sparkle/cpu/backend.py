"""The Numba CPU backend: runs validated conv2d and matmul calls on the compiled kernels.

``conv2d`` and ``matmul`` plan and allocate per call; ``prepare_conv2d`` and ``prepare_matmul`` do that
once per call signature and return a callable for repeated calls (see ``prepared.py``).
"""

import numpy as np

from .. import host_pool
from ..api import matmul_as_conv2d_spec
from .implicit import copy_size, needs_copy
from .operands import allocate_scratch
from .plan import plan_conv2d, uses_direct_kernel
from .prepared import DirectLaunch, FusedLaunch, ImplicitLaunch, PreparedConv2d, PreparedMatmul

__all__ = ["PreparedConv2d", "PreparedMatmul", "conv2d", "matmul", "plan_conv2d", "prepare_conv2d", "prepare_matmul",
           "uses_direct_kernel"]


def _run_direct(x, w, bias, spec, out):
    """Direct convolution (see ``direct.py``) into ``out``."""
    DirectLaunch(spec).run(x, w, bias, out.reshape(-1))


def _run_implicit(x, w, bias, spec, plan, out):
    """Implicit GEMM read straight from the (padded) input (see ``implicit.py``) into ``out``."""
    ImplicitLaunch(spec, plan).run(x, w, bias, out.reshape(-1))


def _run_fused(x, w, bias, spec, plan, out):
    """Fused im2col + GEMM (see ``conv2d.py``) into ``out``."""
    FusedLaunch(spec, plan).run(x, w, bias, out.reshape(-1))


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
    out = host_pool.empty(spec.output_shape, spec.dtype)
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


def prepare_conv2d(spec, plan=None):
    """A :class:`PreparedConv2d` for repeated calls of ``spec``: ``prepared(x, w, bias)`` returns what
    ``conv2d(x, w, bias, spec, plan)`` does; ``prepared.variant`` names the kernel variant that runs."""
    return PreparedConv2d(spec, plan)


def prepare_matmul(spec, plan=None):
    """A :class:`PreparedMatmul` for repeated calls of ``spec``: ``prepared(a, b)`` returns what
    ``matmul(a, b, spec, plan)`` does; ``prepared.variant`` names the kernel variant that runs."""
    return PreparedMatmul(spec, matmul_as_conv2d_spec(spec), plan)
