"""asv benchmarks: sparkle.matmul on the Numba CPU backend against numpy's ``@``, square float32 matrices.

Shapes are parameters by name ("MxKxN"); ``setup`` compiles (or loads) the kernels and checks Sparkle's
result against ``sparkle.reference`` before anything is timed.
"""

import numpy as np

import sparkle
from sparkle.timing import best_time, interleaved_best
from sparkle.workloads import MATMUL_SIZES

from . import check_matmul, cpu_backend_or_skip

SHAPES = {f"{n}x{n}x{n}": (n, n, n) for n in MATMUL_SIZES}  # id -> (M, K, N)
GFLOPS_REPEAT = 5  # calls per track sample; the best is kept


def matmul_operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)


class MatmulSquare:
    params = [list(SHAPES)]
    param_names = ["shape"]
    timeout = 300

    def setup(self, shape):
        cpu_backend_or_skip()
        m, k, n = SHAPES[shape]
        self.a, self.b = matmul_operands(m, k, n)
        self.flops = 2 * m * k * n
        check_matmul(self.run(), self.a, self.b, f"matmul {shape} on the CPU")  # compiles outside the timing

    def run(self):
        return sparkle.matmul(self.a, self.b, device="cpu")

    def time_sparkle_matmul(self, shape):
        self.run()

    def time_numpy_matmul(self, shape):
        self.a @ self.b

    def track_gflops_sparkle_matmul(self, shape):
        return self.flops / best_time(self.run, GFLOPS_REPEAT) / 1e9

    track_gflops_sparkle_matmul.unit = "GFLOPS"

    def track_ratio_to_numpy(self, shape):
        """Sparkle's speed as a fraction of numpy's (the bar is 0.6), timed interleaved."""
        calls = {"sparkle": self.run, "numpy": lambda: self.a @ self.b}
        best = interleaved_best(calls, GFLOPS_REPEAT, burst=3, settle=0.2)  # see compare_cpu.py
        return best["numpy"] / best["sparkle"]

    track_ratio_to_numpy.unit = "ratio"
