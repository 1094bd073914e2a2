"""asv benchmarks: sparkle.conv2d on the Numba CPU backend, ResNet-50 layers (float32, N=1), and its extra memory.

Each layer is a parameter by name (``RESNET50_LAYERS``); ``setup`` compiles (or loads) the kernels and checks
the result against ``sparkle.reference`` before anything is timed.
"""

import sparkle
from sparkle.timing import best_time, peak_extra_memory
from sparkle.workloads import RESNET50_LAYERS, layer_flops, layer_inputs

from . import check_conv2d, cpu_backend_or_skip

LAYERS = {layer.name: layer for layer in RESNET50_LAYERS}
GFLOPS_REPEAT = 10  # calls per track_gflops sample; the best is kept


class _Conv2dCPU:
    """Shared setup: inputs of one layer, the kernels compiled and the result checked outside the timing."""

    def _prepare(self, layer, batch=1):
        cpu_backend_or_skip()
        self.x, self.w = layer_inputs(layer, batch)
        self.kwargs = layer.conv_kwargs()
        self.flops = layer_flops(layer, self.x, self.w)
        check_conv2d(self.run(), self.x, self.w, self.kwargs, f"conv2d {layer.name} N={batch} on the CPU")

    def run(self):
        return sparkle.conv2d(self.x, self.w, **self.kwargs, device="cpu")


class Conv2dResNet50(_Conv2dCPU):
    params = [list(LAYERS)]
    param_names = ["layer"]

    def setup(self, name):
        self._prepare(LAYERS[name])

    def time_conv2d(self, name):
        self.run()

    def track_gflops_conv2d(self, name):
        return self.flops / best_time(self.run, GFLOPS_REPEAT) / 1e9

    track_gflops_conv2d.unit = "GFLOPS"


class Conv2dMemory(_Conv2dCPU):
    """res2 3x3 at N=8: memory of one call, to compare with the 9x-input of a whole-input im2col."""

    layer = LAYERS["res2_3x3"]
    batch = 8

    def setup(self):
        self._prepare(self.layer, self.batch)

    def track_extra_memory_res2_3x3_n8(self):
        """Peak bytes allocated by one call, its output included (tracemalloc)."""
        return peak_extra_memory(self.run)

    track_extra_memory_res2_3x3_n8.unit = "bytes"

    def peakmem_conv2d_res2_3x3_n8(self):
        self.run()
