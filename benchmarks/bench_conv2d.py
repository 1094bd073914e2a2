"""asv benchmarks: sparkle.conv2d on the ResNet-50 layers (float32, N=1) and its extra memory."""

import sparkle
from sparkle.timing import best_time, peak_extra_memory
from sparkle.workloads import RESNET50_LAYERS, layer_flops, layer_inputs

LAYERS = {layer.name: layer for layer in RESNET50_LAYERS}
GFLOPS_REPEAT = 10  # calls per track_gflops sample; the best is kept


class Conv2dResNet50:
    params = [list(LAYERS)]
    param_names = ["layer"]

    def setup(self, name):
        layer = LAYERS[name]
        self.x, self.w = layer_inputs(layer)
        self.kwargs = layer.conv_kwargs()
        self.flops = layer_flops(layer, self.x, self.w)
        self.run()  # compiles (or loads the compiled kernels) outside the timing

    def run(self):
        return sparkle.conv2d(self.x, self.w, **self.kwargs)

    def time_conv2d(self, name):
        self.run()

    def track_gflops_conv2d(self, name):
        return self.flops / best_time(self.run, GFLOPS_REPEAT) / 1e9

    track_gflops_conv2d.unit = "GFLOPS"


class Conv2dMemory:
    """res2 3x3 at N=8: memory of one call, to compare with the 9x-input of a whole-input im2col."""

    layer = LAYERS["res2_3x3"]
    batch = 8

    def setup(self):
        self.x, self.w = layer_inputs(self.layer, self.batch)
        self.kwargs = self.layer.conv_kwargs()
        self.run()

    def run(self):
        return sparkle.conv2d(self.x, self.w, **self.kwargs)

    def track_extra_memory_res2_3x3_n8(self):
        """Peak bytes allocated by one call, its output included (tracemalloc)."""
        return peak_extra_memory(self.run)

    track_extra_memory_res2_3x3_n8.unit = "bytes"

    def peakmem_conv2d_res2_3x3_n8(self):
        self.run()
