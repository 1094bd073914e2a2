"""The README's main command, ``python -m sparkle.demo``, on the CPU and on an OpenCL device."""

import ast
import re

import pytest

from sparkle import demo

from _opencl import opencl_device_ids, opencl_params, sparkle_cache  # noqa: F401  (fixture)


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
    layer_rows = [line for line in out.splitlines() if line.startswith(("conv1", "res"))]
    assert len(layer_rows) == 8 and all(line.endswith(f"yes   {device}") for line in layer_rows), layer_rows


@pytest.mark.parametrize("device", ["gpu", "reference", "auto", "opencl:99"])
def test_demo_rejects_devices_it_cannot_time(device, capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--device", device])
    assert info.value.code == 2
    assert "--device" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "reference", "auto", "opencl:99"])
def test_demo_lists_only_the_devices_it_accepts(device, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--device", device])
    err = capsys.readouterr().err
    listed = ast.literal_eval(re.search(r"argument --device: must be one of (\[[^]]*\])", err)[1])
    ids = opencl_device_ids()
    assert listed == ["cpu", *(["opencl", *ids] if ids else [])]
    assert ("no OpenCL device is available: " in err) == (not ids)


def test_demo_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "through sparkle.conv2d, checked against the float64 reference" in " ".join(out.split())
    assert "`" not in out and not re.search(r":(func|class|meth|mod|attr):", out), out  # no reST markup
