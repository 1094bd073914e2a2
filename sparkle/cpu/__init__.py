"""Numba CPU backend: micro-kernel, packing, the fused conv2d driver and the planner.

Importing it changes nothing in the process: no environment variable, no thread's
affinity (see ``threads.py`` for how the parallel drivers place their threads).
"""
