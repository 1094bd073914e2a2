"""asv benchmarks: sparkle.matmul against numpy's ``@`` on square float32 matrices."""

import numpy as np

import sparkle
from sparkle.timing import best_time, interleaved_best
from sparkle.workloads import MATMUL_SIZES

GFLOPS_REPEAT = 5  # calls per track sample; the best is kept


class MatmulSquare:
    params = [list(MATMUL_SIZES)]
    param_names = ["size"]
    timeout = 300

    def setup(self, size):
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((size, size), dtype=np.float32)
        self.b = rng.standard_normal((size, size), dtype=np.float32)
        self.flops = 2 * size ** 3
        sparkle.matmul(self.a, self.b)  # compiles outside the timing

    def time_sparkle_matmul(self, size):
        sparkle.matmul(self.a, self.b)

    def time_numpy_matmul(self, size):
        self.a @ self.b

    def track_gflops_sparkle_matmul(self, size):
        return self.flops / best_time(lambda: sparkle.matmul(self.a, self.b), GFLOPS_REPEAT) / 1e9

    track_gflops_sparkle_matmul.unit = "GFLOPS"

    def track_ratio_to_numpy(self, size):
        """Sparkle's speed as a fraction of numpy's (the bar is 0.6), timed interleaved."""
        calls = {"sparkle": lambda: sparkle.matmul(self.a, self.b), "numpy": lambda: self.a @ self.b}
        best = interleaved_best(calls, GFLOPS_REPEAT, burst=3, settle=0.2)  # see compare_cpu.py
        return best["numpy"] / best["sparkle"]

    track_ratio_to_numpy.unit = "ratio"
