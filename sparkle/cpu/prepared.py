"""Prepared CPU calls: everything a call signature needs, decided once, so that a repeated call only
converts its inputs, allocates its output and enters one compiled kernel.

``backend.prepare_conv2d(spec, plan=None)`` and ``backend.prepare_matmul(spec, plan=None)`` make one.
Preparing chooses the path and plan (as ``backend.conv2d`` does), builds the kernel's int64 parameter
vector, the zero bias and the scratch buffers, and picks the compiled variant: plans of one thread
(small work, see ``plan.default_threads``) run kernels compiled without Numba's parallel launch.

A prepared call may be invoked from several Python threads at once. Its scratch buffers serve one call
at a time (``_ScratchPool``): a call that finds them taken by another thread makes its own, so calls
never wait on each other and never share a buffer. Every kernel writes each scratch element before it
reads it, so nothing carries over from one call to the next.

The inputs must be of the spec's shapes and dtype (validated by the caller). C-contiguous aligned arrays
are read in place through read-only flat views; any other layout is copied first, as ``backend.conv2d``
does. The views of the weights and the bias are reused while the same array objects come back (a view
sees values written into them meanwhile), so a prepared call holds a reference to the last ones. A
prepared call keeps the thread count it was prepared with.
"""

from __future__ import annotations

import numpy as np

from .. import host_pool
from ..api import output_array
from .conv2d import fused_conv2d_driver
from .direct import direct_conv2d_kernel
from .implicit import (copy_size, grid_plane, implicit_conv2d_driver, needs_copy, phase_arrays, reduction_offsets,
                       virtual_input_copier, virtual_layout)
from .operands import allocate_scratch, call_params, flat_input, padded_block_pixels, remembered_flat_input
from .plan import default_threads, plan_conv2d, uses_direct_kernel

__all__ = ["DirectLaunch", "FusedLaunch", "ImplicitLaunch", "PreparedConv2d", "PreparedMatmul", "conv2d_launch"]


class _ScratchPool:
    """Scratch buffer sets for one prepared call. A call pops a free set, or makes one when none is
    free (another thread holds it), and pushes it back afterwards: calls never wait and never share
    a set. list.pop and list.append are atomic, and cost less than taking and releasing a lock. The
    pool holds at most as many sets as calls have run at once; a call that raises drops its set."""

    __slots__ = ("free", "make")

    def __init__(self, make):
        self.make = make
        self.free = [make()]

    def take(self):
        try:
            return self.free.pop()
        except IndexError:
            return self.make()


def _direct_row_chunks(spec, threads):
    """Jobs per output plane: planes are cut into row bands only when there are too few planes to give
    each thread 4 jobs (none on one thread)."""
    planes = spec.batch * spec.out_channels
    if threads == 1 or planes >= 4 * threads:
        return 1
    return min(spec.out_h, -(-4 * threads // planes))


def _scratch_buffers(spec, plan):
    """The packed path's scratch as the driver takes it: (values, indices)."""
    scratch = allocate_scratch(spec, plan)
    return scratch.values, scratch.indices


def _serial_suffix(threads):
    return " serial" if threads == 1 else ""


class _Inputs:
    """Flat read-only views of one call's inputs. The weights' and the bias's views are remembered
    while the same array objects come back (``operands.remembered_flat_input``): a repeated call with
    the same weights converts only ``x``."""

    __slots__ = ("bias", "weights", "zero_bias")

    def __init__(self, spec):
        zero_bias = np.zeros(spec.out_channels, spec.dtype)
        zero_bias.flags.writeable = False
        self.zero_bias = zero_bias
        self.weights = self.bias = (None, None)

    def convert(self, x, w, bias):
        weights = self.weights
        if weights[0] is not w:
            weights = self.weights = remembered_flat_input(w)
        if bias is None:
            return flat_input(x), weights[1], self.zero_bias
        remembered = self.bias
        if remembered[0] is not bias:
            remembered = self.bias = remembered_flat_input(bias)
        return flat_input(x), weights[1], remembered[1]


class DirectLaunch:
    """The direct kernel (``direct.py``) for groups with very few output channels."""

    plan = None

    def __init__(self, spec, threads=None):
        threads = self.threads = threads or default_threads(spec)
        self.kernel = direct_conv2d_kernel(parallel=threads > 1)
        self.variant = "direct" + _serial_suffix(threads)
        self.params = call_params(spec, row_chunks=_direct_row_chunks(spec, threads), threads=threads)
        self.inputs = _Inputs(spec)

    def run(self, x, w, bias, out):
        """Compute into ``out`` (flat, C order, of the output's size)."""
        x, w, bias = self.inputs.convert(x, w, bias)
        self.kernel(x, w, bias, out, self.params)


class FusedLaunch:
    """The packed path (``conv2d.py``): fused im2col + GEMM with per-thread scratch."""

    def __init__(self, spec, plan):
        self.plan = plan
        self.kernel = fused_conv2d_driver(plan.mr, plan.nv, plan.nr, parallel=plan.threads > 1)
        self.variant = f"packed {plan.mr}x{plan.nv}" + _serial_suffix(plan.threads)
        # The weights arrive as a contiguous K x (C/groups * R * S) matrix: rows one reduction apart.
        self.params = call_params(spec, lda=spec.reduction, kc=plan.kc, mc=plan.mc, nc=plan.nc,
                                  channel_chunks=plan.channel_chunks, threads=plan.threads,
                                  padded_pixels=padded_block_pixels(spec, plan))
        self.inputs = _Inputs(spec)
        self.scratch = _ScratchPool(lambda: _scratch_buffers(spec, plan))

    def run(self, x, w, bias, out):
        x, w, bias = self.inputs.convert(x, w, bias)
        pool = self.scratch
        try:  # pool.take(), written out: the tiny calls' path, where a Python call costs 0.2 us of ~10
            scratch = pool.free.pop()
        except IndexError:
            scratch = pool.make()
        self.kernel(x, w, bias, out, self.params, *scratch)
        pool.free.append(scratch)


class ImplicitLaunch:
    """The implicit-GEMM path (``implicit.py``): B read from the input, or from a padded/phase copy of it
    made by a second kernel into a pooled buffer."""

    def __init__(self, spec, plan):
        layout = virtual_layout(spec)
        plane = grid_plane(spec)
        self.plan = plan
        self.kernel = implicit_conv2d_driver(plan.mr, plan.nv, plan.nr, parallel=plan.threads > 1)
        self.variant = f"implicit {plan.mr}x{plan.nv}" + _serial_suffix(plan.threads)
        self.offsets = reduction_offsets(spec, layout, plane)
        planes = copy_size(spec)[0] if needs_copy(spec) else 0
        self.params = call_params(spec, lda=spec.reduction, kc=plan.kc, mc=plan.mc, nc=plan.nc,
                                  channel_chunks=plan.channel_chunks, threads=plan.threads, phases=layout.phases,
                                  plane=plane, pitch=layout.pitch, grid_rows=layout.rows, copy_planes=planes)
        self.inputs = _Inputs(spec)
        self.copies = None
        if planes:
            self.copier = virtual_input_copier(parallel=plan.threads > 1)
            self.row_phases, self.col_phases = phase_arrays(spec)
            self.copies = _ScratchPool(lambda: _copy_buffer(planes * plane, spec.dtype))

    def run(self, x, w, bias, out):
        x, w, bias = self.inputs.convert(x, w, bias)
        if self.copies is None:
            self.kernel(x, self.offsets, w, bias, out, self.params)
            return
        buffer, view = copy = self.copies.take()
        self.copier(x, buffer, self.params, self.row_phases, self.col_phases)
        self.kernel(view, self.offsets, w, bias, out, self.params)
        self.copies.free.append(copy)


def _copy_buffer(size, dtype):
    """(the implicit path's writable copy of the input, a read-only view of it: the input itself arrives
    read-only, so the driver sees one array type either way)."""
    buffer = np.empty(size, dtype=dtype)
    view = buffer.view()
    view.flags.writeable = False
    return buffer, view


class _NoLaunch:
    """An output of no elements: nothing to compute."""

    variant = "empty"
    kernel = plan = None

    def run(self, x, w, bias, out):
        pass


class _ZeroLaunch:
    """A matmul with K = 0: a result of zeros."""

    variant = "zeros"
    kernel = plan = None

    def run(self, x, w, bias, out):
        out.fill(0)


def _threads_of(launch):
    if launch.plan is not None:
        return launch.plan.threads
    return getattr(launch, "threads", 1)  # the direct kernel's; 1 where nothing is launched


def conv2d_launch(spec, plan=None):
    """The launch ``backend.conv2d`` runs: without a plan, groups with very few output channels take the
    direct kernel and everything else the planned GEMM path; a plan always means a GEMM path."""
    if spec.batch * spec.out_channels * spec.out_h * spec.out_w == 0:
        return _NoLaunch()
    if plan is None and uses_direct_kernel(spec):
        return DirectLaunch(spec)
    plan = plan or plan_conv2d(spec)
    return ImplicitLaunch(spec, plan) if plan.implicit else FusedLaunch(spec, plan)


class PreparedConv2d:
    """``prepared(x, w, bias)``: a new C-contiguous result of ``spec.output_shape``, as ``backend.conv2d``.

    ``variant`` names the kernel variant that runs (``"packed 4x3"``, ``"implicit 14x2 serial"``,
    ``"direct"``...); ``kernel`` is its Numba dispatcher; ``plan`` the plan of a GEMM path (None for the
    direct kernel); ``threads`` how many threads a call runs on.
    """

    __slots__ = ("_new_output", "_run", "kernel", "plan", "spec", "threads", "variant")

    def __init__(self, spec, plan=None):
        launch = conv2d_launch(spec, plan)
        self.spec, self.plan = spec, launch.plan
        self.variant, self.kernel = launch.variant, launch.kernel
        self.threads = _threads_of(launch)
        self._run = launch.run
        self._new_output = host_pool.allocator(spec.output_shape, spec.dtype)

    def __call__(self, x, w, bias=None):
        out = self._new_output()
        self._run(x, w, bias, out.ravel())  # a fresh C-contiguous array: ravel is a view
        return out

    def into(self, out, x, w, bias=None):
        """As a call, with the result written into ``out`` (C-contiguous, of the output's shape and dtype: a
        slice of a larger result, as a split call's part) instead of a new array."""
        self._run(x, w, bias, output_array(out, self.spec.output_shape, self.spec.dtype).reshape(-1))

    def __repr__(self):
        return f"PreparedConv2d({self.variant!r}, output {self.spec.output_shape}, {self.spec.dtype})"


class PreparedMatmul:
    """``prepared(a, b)``: a new C-contiguous (M, N) product, as ``backend.matmul``: a 1x1 convolution of
    B as a (1, K, 1, N) image with A as (M, K, 1, 1) weights, on the packed path (``plan`` is that
    convolution's)."""

    __slots__ = ("_new_output", "_run", "kernel", "plan", "spec", "threads", "variant")

    def __init__(self, spec, conv_spec, plan=None):
        if spec.m == 0 or spec.n == 0:
            launch = _NoLaunch()
        elif spec.k == 0:
            launch = _ZeroLaunch()
        else:
            launch = FusedLaunch(conv_spec, plan or plan_conv2d(conv_spec, implicit=False))
        self.spec, self.plan = spec, launch.plan
        self.variant, self.kernel = launch.variant, launch.kernel
        self.threads = _threads_of(launch)
        self._run = launch.run
        self._new_output = host_pool.allocator((spec.m, spec.n), spec.dtype)

    def __call__(self, a, b):
        out = self._new_output()
        self._run(b, a, None, out.ravel())  # a fresh C-contiguous array: ravel is a view
        return out

    def into(self, out, a, b):
        """As a call, with the product written into ``out`` (C-contiguous (M, N) of the dtype)."""
        self._run(b, a, None, output_array(out, (self.spec.m, self.spec.n), self.spec.dtype).reshape(-1))

    def __repr__(self):
        return f"PreparedMatmul({self.variant!r}, output {(self.spec.m, self.spec.n)}, {self.spec.dtype})"
