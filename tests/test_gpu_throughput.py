"""benchmarks/gpu_throughput.py (issue 12's table): a short run on the first OpenCL device (PoCL here) writes a
row per layer with every GPU's figures and auto's choice, and a wrong result stops it. No timing is asserted."""

from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
import pytest
from _opencl import requires_opencl, sparkle_cache  # noqa: F401  (fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def throughput(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.gpu_throughput")


@requires_opencl
def test_a_short_run_writes_every_device_and_autos_choice(throughput, sparkle_cache, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    throughput.main(["--batch", "2", "--layers", "res5_3x3", "--repeat", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["gpus"] and len(report["rows"]) == 1
    row = report["rows"][0]
    assert row["layer"] == "res5_3x3" and row["batch"] == 2
    for gpu in report["gpus"]:
        assert row[gpu]["numpy_seconds"] > 0 and row[gpu]["resident_seconds"] > 0
    assert row["auto"]["seconds"] > 0 and row["auto"]["choice"]
    assert "| res5_3x3 | 2 |" in capsys.readouterr().out


def test_a_wrong_result_stops_the_run(throughput):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    from sparkle import reference
    good = reference.conv2d(x, w, padding=1).astype(np.float32)
    throughput.check(good, x, w, {"padding": 1}, "right")
    bad = good.copy()
    bad[0, 0, 0, 0] += 1.0
    with pytest.raises(AssertionError, match="relative L2 error"):
        throughput.check(bad, x, w, {"padding": 1}, "planted")
