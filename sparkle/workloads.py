"""Named workloads shared by the demo, the benchmarks and the tests."""

from dataclasses import dataclass

import numpy as np

from . import api


@dataclass(frozen=True)
class ConvLayer:
    name: str
    in_channels: int
    out_channels: int
    size: int  # input height == width
    kernel: int
    stride: int
    padding: int

    def shapes(self, batch=1):
        """(x shape, w shape) for a batch of ``batch`` images."""
        return ((batch, self.in_channels, self.size, self.size),
                (self.out_channels, self.in_channels, self.kernel, self.kernel))

    def conv_kwargs(self):
        return {"stride": self.stride, "padding": self.padding}


# ResNet-50 layers as the issue names them (input size is the layer's input resolution).
RESNET50_LAYERS = (
    ConvLayer("conv1_7x7s2", 3, 64, 224, 7, 2, 3),
    ConvLayer("res2_3x3", 64, 64, 56, 3, 1, 1),
    ConvLayer("res2_1x1", 64, 256, 56, 1, 1, 0),
    ConvLayer("res3_3x3", 128, 128, 28, 3, 1, 1),
    ConvLayer("res3_1x1s2", 256, 512, 56, 1, 2, 0),
    ConvLayer("res4_3x3", 256, 256, 14, 3, 1, 1),
    ConvLayer("res4_1x1", 1024, 256, 14, 1, 1, 0),
    ConvLayer("res5_3x3", 512, 512, 7, 3, 1, 1),
)

MATMUL_SIZES = (1024, 1536, 2048)


def layer_inputs(layer, batch=1, dtype=np.float32, seed=0):
    """Random (x, w) for a workload layer; weights scaled by 1/sqrt(fan-in) as in a trained net."""
    x_shape, w_shape = layer.shapes(batch)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(dtype)
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    w = (rng.standard_normal(w_shape) / np.sqrt(fan_in)).astype(dtype)
    return x, w


def layer_flops(layer, x, w):
    return api.conv2d_spec(x, w, **layer.conv_kwargs()).flops
