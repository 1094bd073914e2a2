"""Sparkle: conv2d and GEMM, JIT-compiled, fast and checked against a float64 reference."""

from .devices import Device, devices
from .memory import cache_optimal_tile_size, detect_memory_params
from .device_array import DeviceArray
from .ops import conv2d, matmul, to_device
from .opencl.tuner import tune

__all__ = ["conv2d", "matmul", "devices", "Device", "to_device", "DeviceArray", "tune", "detect_memory_params",
           "cache_optimal_tile_size"]
__version__ = "0.1.0"
