"""sparkle.dask in a few lines: a batch of images convolved on a Dask cluster, checked against the reference.

    python examples/dask_quickstart.py                       # a local cluster of 2 worker processes
    python examples/dask_quickstart.py tcp://10.0.0.1:8786   # an existing cluster (dask scheduler / dask worker)
"""

import sys

import dask.array as da
import numpy as np
from dask.distributed import Client, LocalCluster

import sparkle
import sparkle.dask


def main(address=None):
    cluster = None
    if address is None:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                               env={"NUMBA_NUM_THREADS": "1", "SPARKLE_BIND_THREADS": "0"})
    with Client(address or cluster) as client:
        # One scheduler per worker: its devices profiled (or loaded), the listed call compiled before any task.
        client.register_plugin(sparkle.dask.SparklePlugin(prepare=[("conv2d", (8, 16, 28, 28), (32, 16, 3, 3),
                                                                    {"padding": 1})]))
        rng = np.random.default_rng(0)
        images = da.from_array(rng.standard_normal((64, 16, 28, 28)).astype(np.float32), chunks=(8, 16, 28, 28))
        weights = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
        bias = rng.standard_normal(32).astype(np.float32)

        features = sparkle.dask.conv2d(images, weights, bias, padding=1, activation="relu")  # lazy
        pooled = features.mean(axis=(2, 3)).compute()
        print(f"{features.shape} in {features.numblocks[0]} chunks -> pooled {pooled.shape}")

        first = images[:8].compute()
        expected = sparkle.reference.conv2d(first, weights, bias, padding=1, activation="relu").mean(axis=(2, 3))
        error = np.linalg.norm(pooled[:8] - expected) / np.linalg.norm(expected)
        print(f"first chunk against the float64 reference: rel L2 error {error:.1e}")
        assert error < 1e-5

        for address, report in sparkle.dask.worker_devices(client).items():
            devices = ", ".join(f"{d['id']} ({d['name']})" for d in report["devices"])
            print(f"{address}: {devices}; calls placed: {report['calls']}")
    if cluster is not None:
        cluster.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
