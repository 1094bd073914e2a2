"""benchmarks/scheduler_quality.py: its checks stop a run on a wrong result, its crossover finder, and a
short run (tiny workloads, the CPU alone) that writes the JSON, the Markdown and the plots, and renders them
again from the JSON. No timing is asserted."""

from __future__ import annotations

import importlib
import json
import pathlib

import numpy as np
import pytest
from _opencl import sparkle_cache  # noqa: F401  (fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def quality(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("benchmarks.scheduler_quality")


@pytest.fixture
def tiny_workloads(quality, monkeypatch):
    """Two shapes per section instead of dozens."""
    def mixed(quick, rng):
        return [quality.conv_case("3x3 on 8x8", rng, (1, 4, 8, 8), (4, 4, 3, 3), padding=1),
                quality.matmul_case(24, 16, 8, rng)]

    def unseen(quick, rng):
        return [quality.conv_case("1x1 6x6", rng, (2, 3, 6, 6), (5, 3, 1, 1), bias=True, activation="relu"),
                quality.matmul_case(9, 7, 5, rng)]

    def sweeps(quick, rng):
        return {"matmul n x n x n": ("n", [(n, quality.matmul_case(n, n, n, rng)) for n in (8, 16)])}

    monkeypatch.setattr(quality, "mixed_workload", mixed)
    monkeypatch.setattr(quality, "unseen_workload", unseen)
    monkeypatch.setattr(quality, "crossover_sweeps", sweeps)


def test_crossover_is_where_the_choice_leaves_the_cpu_for_good(quality):
    assert quality.crossover([(1, "cpu"), (2, "cpu"), (4, "opencl:0"), (8, "opencl:0")]) == \
        {"size": 4, "device": "opencl:0", "flips": []}
    assert quality.crossover([(1, "opencl:0"), (2, "cpu"), (4, "opencl:0")]) == \
        {"size": 4, "device": "opencl:0", "flips": [1]}
    assert quality.crossover([(1, "cpu"), (2, "opencl:0"), (4, "cpu")]) == {"size": None, "device": None, "flips": [2]}


@pytest.mark.parametrize("full", [True, False], ids=["full reference", "rows and sampled points"])
def test_a_wrong_result_fails_the_check(quality, monkeypatch, full):
    if not full:  # as for a call whose full reference would take seconds
        monkeypatch.setattr(quality, "FULL_REFERENCE_FLOPS", 0)
    rng = np.random.default_rng(0)
    size = 40
    case = quality.matmul_case(size, size, 8, rng)
    _, _, points, _ = case.expected()
    assert (points is None) == full  # otherwise: rows at both ends, two random rows and sampled points
    right = case.args[0].astype(np.float64) @ case.args[1]
    case.check(right.astype(np.float32), "test")
    for row in (0, size - 1):
        wrong = right.astype(np.float32)
        wrong[row, 3] += 1.0
        with pytest.raises(quality.IncorrectResult, match=rf"^matmul {size}x{size}x8 on test: relative L2 error"):
            case.check(wrong, "test")
    nan = right.astype(np.float32)
    nan[tuple(points[0]) if points is not None else (0, 0)] = np.nan
    with pytest.raises(quality.IncorrectResult):
        case.check(nan, "test")


def test_a_short_run_writes_its_report_and_renders_it_again(quality, tiny_workloads, tmp_path, capsys,
                                                            sparkle_cache):  # noqa: F811
    pytest.importorskip("matplotlib")
    saved = tmp_path / "run.json"
    assert quality.main(["--device-ids", "cpu", "--passes", "2", "--repeat", "1", "--json", str(saved),
                         "--markdown", str(tmp_path / "run.md"), "--plots", str(tmp_path)]) == 0
    report = json.loads(saved.read_text())
    assert report["device_ids"] == ["cpu"] and [p["number"] for p in report["passes"]] == [1, 2]
    assert all(len(p["calls"]) == 2 and {c["auto_device"] for c in p["calls"]} == {"cpu"} for p in report["passes"])
    assert len(report["unseen"]["rows"]) == 2 and report["unseen"]["median_error"] >= 0
    assert report["unseen"]["median_error_in_stream"] >= 0
    assert all(row["measured_in_stream"] > 0 for row in report["unseen"]["rows"])
    assert [row["size"] for row in report["crossover"]["matmul n x n x n"]["rows"]] == [8, 16]
    assert set(report["targets"]) == {"regret_paired", "regret_best", "below_best_single_paired",
                                      "below_best_single_best", "prediction_error", "prediction_error_in_stream",
                                      "one_device_is_the_oracle"}
    assert report["targets"]["one_device_is_the_oracle"] is True  # one device: auto can at best equal it
    assert "cpu is the oracle's device for every shape here" in (tmp_path / "run.md").read_text()
    assert set(report["learned_overhead_after_passes"]) == set(report["learned_overhead_at_end"]) == {"cpu"}
    rows = report["crossover"]["matmul n x n x n"]["rows"]
    assert all(set(row["auto_predicted"]) == {"cpu"} and row["auto_predicted"]["cpu"] > 0 for row in rows)
    markdown = (tmp_path / "run.md").read_text()
    for heading in ("Mixed workload", "Oracle", "Prediction error on unseen shapes", "Crossover: matmul"):
        assert f"### {heading}" in markdown
    for name in ("scheduler_quality_crossover.png", "scheduler_quality_learning_curve.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
        (tmp_path / name).unlink()
    capsys.readouterr()
    again = tmp_path / "again"
    assert quality.main(["--from-json", str(saved), "--markdown", str(tmp_path / "again.md"),
                         "--plots", str(again), "--plot-prefix", "again"]) == 0
    assert (tmp_path / "again.md").read_text() == markdown
    assert {path.name for path in again.iterdir()} == {"again_crossover.png", "again_learning_curve.png"}


def test_an_incorrect_result_fails_the_run(quality, tiny_workloads, monkeypatch, capsys, sparkle_cache):  # noqa: F811
    def off_by_one(case, target):
        result = np.array(getattr(target, case.op)(*case.args, **case.kwargs))
        result.flat[0] += 1.0
        return result

    monkeypatch.setattr(quality.Case, "run", off_by_one)
    assert quality.main(["--device-ids", "cpu", "--passes", "2", "--repeat", "1"]) == 1
    assert "INCORRECT RESULT: 3x3 on 8x8 on cpu: relative L2 error" in capsys.readouterr().err
