"""The README's main command, ``python -m sparkle.demo``, on the CPU and on an OpenCL device."""

import ast
import re

import pytest
from _opencl import opencl_device_ids, opencl_params, sparkle_cache  # noqa: F401  (fixture)

from sparkle import SimulatedDevice, demo
from sparkle.scheduler import Scheduler
from sparkle.scheduler import scheduler as scheduler_module

LAYERS = ("conv1", "res")


def test_demo_on_cpu_checks_every_layer(capsys):
    assert demo.main(["--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "All 8 layers match the float64 reference" in out


@pytest.mark.parametrize("device", opencl_params())
def test_demo_on_opencl_checks_every_layer(device, capsys, sparkle_cache):  # noqa: F811
    assert demo.main(["--device", device, "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Device: {device}" in out and "(OpenCL" in out
    assert "All 8 layers match the float64 reference" in out
    layer_rows = [line for line in out.splitlines() if line.startswith(LAYERS)]
    assert len(layer_rows) == 8 and all(line.endswith(f"yes   {device}") for line in layer_rows), layer_rows


def layer_rows(out):
    """{layer: its row's text} of the demo's table."""
    return {line.split()[0]: line for line in out.splitlines() if line.startswith(LAYERS) and "->" not in line}


@pytest.fixture
def fresh_default_scheduler(monkeypatch, tmp_path):
    """Make ``sparkle.default_scheduler()`` return ``scheduler`` (learning in ``tmp_path``, never the user's
    cache) for one test."""
    def install(devices=None):
        scheduler = Scheduler(devices, cache_dir=tmp_path, progress=False)
        monkeypatch.setattr(scheduler_module, "_default", scheduler)
        return scheduler

    return install


def test_demo_auto_says_which_device_ran_each_layer(fresh_default_scheduler, capsys):
    scheduler = fresh_default_scheduler()
    assert demo.main(["--device", "auto", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Device: auto, placed by sparkle.default_scheduler() on {', '.join(scheduler.devices)}" in out
    assert "All 8 layers match the float64 reference" in out
    rows = layer_rows(out)
    assert len(rows) == 8
    records = scheduler.history()
    assert len(records) >= 8 * 2  # the warm-up call and one timed round per layer, at least
    ran = {record["device"] for record in records}
    assert ran <= set(scheduler.devices)
    for layer, row in rows.items():
        shown = row.split("  yes   ", 1)[1]  # "cpu", or "cpu x10, opencl:0 x1" when calls ran on several
        named = {re.sub(r" x\d+$", "", part) for part in shown.split(", ")}
        assert named and named <= ran, (layer, shown)
    placements = [line for line in out.splitlines() if "->" in line]
    assert len(placements) == 8 and all(any(f"-> {d}" in line for d in scheduler.devices) for line in placements)


def test_demo_auto_names_the_device_the_calls_ran_on(fresh_default_scheduler, monkeypatch, capsys):
    """Forced onto a simulated device (the CPU backend, then a wait), every layer says it ran there."""
    monkeypatch.setenv("SPARKLE_DEVICE", "sim:twin")
    fresh_default_scheduler(["cpu", SimulatedDevice("twin", 1e12)])
    assert demo.main(["--device", "auto", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    rows = layer_rows(out)
    assert len(rows) == 8 and all(row.endswith("yes   sim:twin") for row in rows.values()), rows
    placements = [line for line in out.splitlines() if "->" in line]
    assert len(placements) == 8 and all("-> sim:twin: $SPARKLE_DEVICE=sim:twin" in line for line in placements)


def test_ran_on_names_every_device_that_ran_a_layer():
    assert demo.ran_on_text({"cpu": 11}) == "cpu"
    assert demo.ran_on_text({"opencl:0": 1, "cpu": 10}) == "cpu x10, opencl:0 x1"
    records = [{"shape": "x 1, w 2", "device": "cpu", "calls": 1},
               {"shape": "x 1, w 2 part 0:4 of batch", "device": "opencl:0", "calls": 1},
               {"shape": "x 1, w 22", "device": "cpu", "calls": 1},
               {"shape": "x 1, w 2", "device": "cpu", "calls": 5}]  # a timed call standing for 4 untimed ones too
    assert demo._devices_that_ran(records, "x 1, w 2") == {"cpu": 6, "opencl:0": 1}


@pytest.mark.parametrize("device", ["gpu", "reference", "opencl:99"])
def test_demo_rejects_devices_it_cannot_time(device, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--device", device])
    assert info.value.code == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "reference", "opencl:99"])
def test_demo_lists_only_the_devices_it_accepts(device, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--device", device])
    err = capsys.readouterr().err
    listed = ast.literal_eval(re.search(r"argument --device: must be one of (\[[^]]*\])", err)[1])
    ids = opencl_device_ids()
    assert listed == ["auto", "cpu", *(["opencl", *ids] if ids else [])]
    assert ("no OpenCL device is available: " in err) == (not ids)


def test_demo_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "through sparkle.conv2d, checked against the float64 reference" in " ".join(out.split())
    assert "`" not in out and not re.search(r":(func|class|meth|mod|attr):", out), out  # no reST markup
