"""benchmarks/dask_throughput.py: the --from-client images (one task per chunk with no dependencies, drawn
again identically in this process for the check) and a short --from-client run on two worker processes that
checks its results and reports which worker computed how many chunks. No timing is asserted."""

from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
import pytest
from _opencl import sparkle_cache  # noqa: F401  (fixture)

pytest.importorskip("dask.array")
pytest.importorskip("distributed")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.dask_throughput")


def test_images_from_a_seed_are_root_tasks_drawn_again_the_same(throughput):
    import dask

    images = throughput.images_from_seed(3, (10, 2, 5, 5), 4)
    assert images.chunks[0] == (4, 4, 2)
    graph = dict(images.__dask_graph__())
    assert len(graph) == 3
    assert all(not dask.core.get_dependencies(graph, key) for key in graph)  # nothing to place them by
    whole = images.compute(scheduler="sync")
    assert whole.dtype == np.float32 and np.all(np.abs(whole) <= 0.5)
    assert np.array_equal(whole[8:], throughput.chunk_images(3, 2, (2, 2, 5, 5)))
    assert images.name != throughput.images_from_seed(4, (10, 2, 5, 5), 4).name  # a new seed, new keys


def test_each_chunk_is_drawn_in_the_task_that_convolves_it(throughput):
    import dask

    import sparkle.dask

    images = throughput.images_from_seed(1, (6, 3, 5, 5), 2)
    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    output = throughput.drawn_in_each_task(sparkle.dask.conv2d(images, w, padding=1, device="cpu"), images)
    graph = dict(output.__dask_graph__())
    chunk_keys = set(dask.core.flatten(output.__dask_keys__()))
    assert len(chunk_keys) == 3 and not any(key[0] == images.name for key in graph)  # no drawing task left
    shared = {dependency for key in chunk_keys for dependency in dask.core.get_dependencies(graph, key)}
    assert len(shared) == 1 and not shared & chunk_keys  # the weights: what every chunk needs, nothing else
    expected = sparkle.reference.conv2d(throughput.chunk_images(1, 2, (2, 3, 5, 5)), w, padding=1)
    np.testing.assert_allclose(output.blocks[2].compute(scheduler="sync"), expected, rtol=1e-4, atol=1e-5)


def test_a_short_from_client_run_is_checked_and_reports_chunks_per_worker(throughput, tmp_path, capsys,
                                                                          sparkle_cache):  # noqa: F811
    json_path, markdown_path = tmp_path / "run.json", tmp_path / "run.md"
    report = throughput.main(["--layer", "res3_3x3", "--batch", "8", "--chunk", "4", "--workers", "2",
                              "--repeat", "1", "--from-client", "--json", str(json_path),
                              "--markdown", str(markdown_path)])
    assert report["inputs"] == "from-client"
    (row,) = report["dask"]
    assert row["inputs"] == "from-client" and row["workers"] == 2
    assert sum(row["chunks_per_worker"].values()) == 2
    assert set(row["checked_chunks"]) == set(row["chunks_per_worker"])  # one chunk of each worker checked
    assert all(item["relative_error"] <= 1e-5 for item in row["checked_chunks"].values())
    assert row["input_generation_seconds"] > 0
    assert json.loads(json_path.read_text())["dask"][0]["chunks_per_worker"] == row["chunks_per_worker"]
    text = markdown_path.read_text()
    assert "inputs from the graph" in text and "checked against the float64 reference" in text
    assert "chunks per worker, by name" in capsys.readouterr().out
