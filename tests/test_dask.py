"""sparkle.dask on a LocalCluster of worker processes: results against the float64 reference (conv2d over
every padding and group form, batch-chunked; matmul row-chunked), lazy graphs with the weights as one key,
validation before anything runs, the original exception of a failing chunk, a worker killed mid-computation,
and the plugin's profiles persisting across a worker restart."""

from __future__ import annotations

import os
import signal
import time
import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask  # noqa: E402
from dask.core import get_dependencies  # noqa: E402

import sparkle  # noqa: E402
import sparkle.dask as sparkle_dask  # noqa: E402
from sparkle import reference  # noqa: E402

from _helpers import TOLERANCE, make_array, rel_l2  # noqa: E402


def local_cluster(tmp_path, workers=2):
    """Worker processes with a cache directory of their own (profiles, learned model), one thread each."""
    env = {"SPARKLE_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    dashboard_address=":0", env=env, silence_logs=40)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("dask-cache")) as cluster, distributed.Client(cluster) as client:
        yield client


def images(rng, shape, dtype=np.float32, chunk=2):
    x = make_array(rng, shape, np.dtype(dtype))
    return x, da.from_array(x, chunks=(chunk,) + x.shape[1:])


CONV_CASES = {  # (x shape, w shape, keywords): every padding form and every group form
    "pad int": ((5, 3, 9, 8), (4, 3, 3, 3), dict(padding=1)),
    "pad pair, stride 2": ((4, 3, 9, 9), (6, 3, 3, 3), dict(padding=(1, 2), stride=2)),
    "asymmetric pad, dilation": ((3, 4, 10, 9), (5, 4, 3, 2), dict(padding=(0, 2, 1, 0), dilation=(2, 1))),
    "same": ((5, 2, 7, 7), (3, 2, 4, 4), dict(padding="same")),
    "valid": ((3, 3, 6, 6), (2, 3, 3, 3), dict(padding="valid")),
    "groups": ((4, 6, 7, 7), (9, 2, 3, 3), dict(groups=3, padding=1)),
    "depthwise": ((5, 4, 8, 8), (8, 1, 3, 3), dict(groups=4, padding=1, stride=2)),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_of_batch_chunks_matches_the_reference(client, case, dtype):
    rng = np.random.default_rng(len(case))
    x_shape, w_shape, keywords = CONV_CASES[case]
    x, x_chunks = images(rng, x_shape, dtype)
    w = make_array(rng, w_shape, np.dtype(dtype))
    bias = make_array(rng, w_shape[:1], np.dtype(dtype))
    y = sparkle_dask.conv2d(x_chunks, w, bias, activation="relu", **keywords)
    expected = reference.conv2d(x, w, bias, activation="relu", **keywords)
    assert y.shape == expected.shape and y.dtype == dtype
    assert y.chunks[0] == x_chunks.chunks[0]  # one output chunk per batch chunk
    result = y.compute()
    assert type(result) is np.ndarray and result.dtype == dtype
    assert rel_l2(result, expected) <= TOLERANCE[np.dtype(dtype)]


@pytest.mark.parametrize("b_kind", ["numpy", "dask"])
def test_matmul_of_row_chunks_matches_the_reference(client, b_kind):
    rng = np.random.default_rng(2)
    a, b = make_array(rng, (70, 33), np.dtype(np.float32)), make_array(rng, (33, 21), np.dtype(np.float32))
    product = sparkle_dask.matmul(da.from_array(a, chunks=(16, 33)),
                                  b if b_kind == "numpy" else da.from_array(b, chunks=(11, 7)))
    assert product.chunks == ((16, 16, 16, 16, 6), (21,))
    assert rel_l2(product.compute(), reference.matmul(a, b)) <= TOLERANCE[np.dtype(np.float32)]


def test_graphs_are_lazy_and_hold_the_weights_once():
    made = []

    def make():
        made.append(1)
        return np.ones((6, 3, 5, 5), np.float32)

    x = da.from_delayed(dask.delayed(make)(), (6, 3, 5, 5), np.float32).rechunk((2, 3, 5, 5))
    w = np.full((4, 3, 3, 3), 0.5, np.float32)
    y = sparkle_dask.conv2d(x, w, padding=1)
    assert made == []  # building the graph ran nothing
    graph = dict(y.__dask_graph__())
    weight_keys = [key for key in graph if isinstance(key, tuple) and key[0].startswith("sparkle-w-")]
    assert len(weight_keys) == 1  # the weights are one key of the graph...
    outputs = [k for k in graph if isinstance(k, tuple) and k[0] == y.name]
    assert len(outputs) == 3
    for key in outputs:  # ...which every chunk's task reads
        assert weight_keys[0] in get_dependencies(graph, key)
    result = y.compute(scheduler="sync")
    assert made == [1]
    np.testing.assert_allclose(result, reference.conv2d(np.ones((6, 3, 5, 5), np.float32), w, padding=1),
                               rtol=1e-6)


BAD = [  # arguments, as sparkle.conv2d would get them
    dict(w_shape=(4, 2, 3, 3)),  # C mismatch
    dict(keywords=dict(groups=2), w_shape=(4, 3, 3, 3)),
    dict(keywords=dict(padding=(1, 2, 3))),
    dict(keywords=dict(stride=0)),
    dict(keywords=dict(activation="gelu")),
    dict(w_dtype=np.float64),
    dict(x_dtype=np.int32, w_dtype=np.int32),
    dict(bias_shape=(3,)),
    dict(w_shape=(4, 3, 20, 20)),  # the kernel does not fit
]


@pytest.mark.parametrize("bad", BAD, ids=[str(b) for b in BAD])
def test_bad_arguments_raise_the_errors_of_sparkle_conv2d_before_anything_runs(bad):
    x = np.zeros((4, 3, 8, 8), bad.get("x_dtype", np.float32))
    w = np.zeros(bad.get("w_shape", (4, 3, 3, 3)), bad.get("w_dtype", np.float32))
    bias = np.zeros(bad["bias_shape"], np.float32) if "bias_shape" in bad else None
    keywords = bad.get("keywords", {})
    with pytest.raises((ValueError, TypeError)) as direct:
        sparkle.conv2d(x, w, bias, device="cpu", **keywords)
    with pytest.raises(direct.type) as lazy:
        sparkle_dask.conv2d(da.from_array(x, chunks=(2, 3, 8, 8)), w, bias, **keywords)
    assert str(lazy.value) == str(direct.value)


def test_operands_of_the_wrong_kind_are_named():
    x = np.zeros((2, 3, 5, 5), np.float32)
    with pytest.raises(TypeError, match=r"^x must be a dask.array.Array .* got ndarray; for numpy arrays, use "
                                        r"sparkle.conv2d"):
        sparkle_dask.conv2d(x, np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match=r"^w must be a numpy.ndarray or dask.array.Array .* got list"):
        sparkle_dask.conv2d(da.from_array(x), [[1.0]])
    with pytest.raises(TypeError, match=r"^device must be a str"):
        sparkle_dask.matmul(da.zeros((4, 4), dtype=np.float32), np.zeros((4, 4), np.float32), device=0)
    with pytest.raises(ValueError, match=r"a.shape\[1\] must equal b.shape\[0\]"):
        sparkle_dask.matmul(da.zeros((4, 4), dtype=np.float32), np.zeros((5, 4), np.float32))


def test_chunks_along_channels_are_merged_with_a_warning(client):
    rng = np.random.default_rng(4)
    x = make_array(rng, (4, 6, 7, 7), np.dtype(np.float32))
    w = make_array(rng, (5, 6, 3, 3), np.dtype(np.float32))
    with pytest.warns(sparkle_dask.RechunkWarning, match=r"x is chunked along C, H and W .* rechunked"):
        y = sparkle_dask.conv2d(da.from_array(x, chunks=(2, 3, 7, 4)), w)
    assert y.chunks[0] == (2, 2)
    assert rel_l2(y.compute(), reference.conv2d(x, w)) <= TOLERANCE[np.dtype(np.float32)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batch-only chunks: no warning
        sparkle_dask.conv2d(da.from_array(x, chunks=(1, 6, 7, 7)), w)


def test_a_chunk_that_raises_on_a_worker_gives_the_original_exception(client):
    x = np.zeros((4, 3, 6, 6), np.float32)
    w = np.zeros((2, 3, 3, 3), np.float32)
    with pytest.raises(ValueError) as direct:
        sparkle.conv2d(x[:2], w, device="opencl:99")
    y = sparkle_dask.conv2d(da.from_array(x, chunks=(2, 3, 6, 6)), w, device="opencl:99")  # valid here
    with pytest.raises(ValueError) as remote:
        y.compute()
    assert str(remote.value) == str(direct.value)


def slow_images(block):
    time.sleep(0.05)
    return block


def test_a_worker_killed_mid_computation_loses_nothing(tmp_path):
    rng = np.random.default_rng(9)
    x = make_array(rng, (48, 4, 10, 10), np.dtype(np.float32))
    w = make_array(rng, (6, 4, 3, 3), np.dtype(np.float32))
    expected = reference.conv2d(x, w, padding=1)
    with local_cluster(tmp_path) as cluster, distributed.Client(cluster) as client:
        slow = da.from_array(x, chunks=(2, 4, 10, 10)).map_blocks(slow_images, dtype=np.float32)
        future = client.compute(sparkle_dask.conv2d(slow, w, padding=1))
        deadline = time.monotonic() + 60
        while not any(client.has_what().values()) and time.monotonic() < deadline:
            time.sleep(0.02)  # until some chunks are done
        victim = next(address for address, keys in client.has_what().items() if keys)
        pid = client.run(os.getpid, workers=[victim])[victim]
        assert future.status == "pending"  # mid-computation: some chunks done, others not
        os.kill(pid, signal.SIGKILL)  # the worker process dies with its chunks; its nanny starts another
        result = future.result(timeout=120)
        assert victim not in client.scheduler_info()["workers"]  # the killed worker is gone for good
    assert rel_l2(result, expected) <= TOLERANCE[np.dtype(np.float32)]


def test_the_plugin_profiles_each_worker_once_and_keeps_it_across_a_restart(tmp_path):
    plugin = sparkle_dask.SparklePlugin(["cpu"], prepare=[("conv2d", (2, 3, 8, 8), (4, 3, 3, 3), {"padding": 1}),
                                                         ("matmul", (16, 8), (8, 4))])
    with local_cluster(tmp_path) as cluster, distributed.Client(cluster) as client:
        before_plugin = sparkle_dask.worker_devices(client)
        assert all(not report["plugin"] for report in before_plugin.values())
        client.register_plugin(plugin)
        first = sparkle_dask.worker_devices(client)
        assert len(first) == 2
        for report in first.values():
            assert report["plugin"] and [d["id"] for d in report["devices"]] == ["cpu"]
            assert report["profiles"]["cpu"]["gflops"] > 0
            assert report["calls"].get("cpu", 0) >= 2  # the prepared calls ran (compiled) before any task
        rng = np.random.default_rng(5)
        x, chunks = images(rng, (6, 3, 8, 8))
        w = make_array(rng, (4, 3, 3, 3), np.dtype(np.float32))
        assert rel_l2(sparkle_dask.conv2d(chunks, w, padding=1).compute(),
                      reference.conv2d(x, w, padding=1)) <= TOLERANCE[np.dtype(np.float32)]
        client.restart()
        again = sparkle_dask.worker_devices(client)
        assert all(report["plugin"] for report in again.values())  # the plugin set the restarted workers up
        stored = {report["profiles"]["cpu"]["seconds_to_measure"] for report in first.values()}
        for report in again.values():  # loaded from the cache directory, not measured again
            assert report["profiles"]["cpu"]["seconds_to_measure"] in stored
    assert list(tmp_path.glob("scheduler-*.json")), sorted(p.name for p in tmp_path.iterdir())


def test_bad_prepare_entries_are_refused_on_the_client():
    with pytest.raises(ValueError, match="prepare entries must be"):
        sparkle_dask.SparklePlugin(prepare=[("gemm", (2, 2), (2, 2))])
    with pytest.raises(ValueError, match=r"w.shape\[1\] must be"):
        sparkle_dask.SparklePlugin(prepare=[("conv2d", (1, 3, 8, 8), (4, 2, 3, 3), {})])


def test_persisted_weights_serve_several_computations(client):
    rng = np.random.default_rng(12)
    w = make_array(rng, (5, 3, 3, 3), np.dtype(np.float32))
    weights = da.from_array(w, chunks=(2, 3, 3, 3)).persist()  # several chunks: merged into one block
    for _ in range(2):
        x, chunks = images(rng, (4, 3, 7, 7))
        y = sparkle_dask.conv2d(chunks, weights, padding=1)
        assert rel_l2(y.compute(), reference.conv2d(x, w, padding=1)) <= TOLERANCE[np.dtype(np.float32)]
