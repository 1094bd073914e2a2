"""The README's main command, ``python -m sparkle.demo``, on the CPU and on an OpenCL device."""

import pytest

from sparkle import demo

from _opencl import opencl_params, sparkle_cache  # noqa: F401  (fixture)


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
