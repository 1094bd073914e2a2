"""Sparkle: conv2d and GEMM, JIT-compiled, fast and checked against a float64 reference."""

from .device_array import DeviceArray
from .devices import Device, devices
from .memory import cache_optimal_tile_size, detect_memory_params

# Neither module imports pyopencl: that happens on the first OpenCL call.
from .opencl.backend import OpenCLFallbackWarning
from .opencl.tuner import TuneResult, tune
from .ops import conv2d, matmul, to_device
from .scheduler import Decision, Scheduler, SimulatedDevice, default_scheduler

__all__ = [
    "Decision",
    "Device",
    "DeviceArray",
    "OpenCLFallbackWarning",
    "Scheduler",
    "SimulatedDevice",
    "TuneResult",
    "cache_optimal_tile_size",
    "conv2d",
    "default_scheduler",
    "detect_memory_params",
    "devices",
    "matmul",
    "to_device",
    "tune",
]
__version__ = "0.1.0"
