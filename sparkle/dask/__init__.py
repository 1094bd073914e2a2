"""Sparkle on Dask (``pip install 'sparkle[dask]'``): conv2d and matmul of dask arrays, one Sparkle call per
chunk on the workers, each worker placing its chunks on its own devices through its own scheduler.

    from dask.distributed import Client
    import sparkle.dask

    client = Client("tcp://scheduler:8786")
    client.register_plugin(sparkle.dask.SparklePlugin())   # one scheduler per worker, its devices profiled
    y = sparkle.dask.conv2d(x, w, padding=1)               # x: a dask array chunked along the batch
    y.compute()
"""

from __future__ import annotations

try:
    import dask.array  # noqa: F401
    import distributed  # noqa: F401
except ImportError as error:  # pragma: no cover - the extra is missing
    raise ImportError(f"sparkle.dask needs dask and distributed ({error}); install them with: "
                      "pip install 'sparkle[dask]'") from error

from .arrays import RechunkWarning, conv2d, matmul
from .worker import SparklePlugin, worker_devices

__all__ = ["conv2d", "matmul", "SparklePlugin", "worker_devices", "RechunkWarning"]
