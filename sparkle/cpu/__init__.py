"""Numba CPU backend: micro-kernel, packing, the fused conv2d driver and the planner."""

from .threads import bind_threads_by_default

bind_threads_by_default()
