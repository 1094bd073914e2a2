"""Numba CPU backend: micro-kernel, packing, the fused conv2d driver, the planner and prepared calls
(``prepared.py``: one call signature set up once, for repeated calls that cost microseconds).

Importing it changes nothing in the process: no environment variable, no thread's
affinity (see ``threads.py`` for how the parallel drivers place their threads).
"""
