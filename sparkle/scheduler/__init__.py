"""The scheduler: places every call on the device predicted fastest, or splits it across devices, from a
cost model learned from measured timings; verifies each kernel variant on its first call; explains."""

from .executors import DeviceFault, Executor, SimulatedDevice
from .explain import Decision, Prediction
from .profile import DeviceProfile
from .scheduler import Scheduler, default_scheduler

__all__ = ["Decision", "DeviceFault", "DeviceProfile", "Executor", "Prediction", "Scheduler", "SimulatedDevice",
           "default_scheduler"]
