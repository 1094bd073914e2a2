"""`sparkle explain` and `sparkle profile`: the scheduler on the command line."""

import pytest

from sparkle.cli import main


def test_explain_conv2d_prints_the_decision(capsys):
    assert main(["explain", "conv2d", "--x", "1,8,16,16", "--w", "8,8,3,3", "--padding", "1"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("conv2d x 1x8x16x16, w 8x8x3x3 float32 -> ")
    assert "predicted" in out and "confidence" in out
    for column in ("device", "total", "transfer", "compute", "overhead", "compile"):
        assert column in out
    assert "\n  cpu " in out


def test_explain_matmul_and_options(capsys):
    assert main(["explain", "matmul", "--m", "64", "--k", "32", "--n", "16", "--dtype", "float64"]) == 0
    assert capsys.readouterr().out.startswith("matmul (64x32) @ (32x16) float64 -> ")


@pytest.mark.parametrize("argv, message", [
    (["explain", "conv2d", "--x", "1,8,16,16", "--w", "8,4,3,3"], "w.shape[1] must be C // groups"),
    (["explain", "conv2d", "--x", "1,8,16", "--w", "8,8,3,3"], "expected 4 comma-separated positive ints"),
])
def test_explain_bad_arguments_exit_2_naming_them(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_profile_lists_every_device(capsys):
    assert main(["profile"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["device", "GFLOPS"]
    row = next(line for line in out.splitlines() if line.startswith("cpu "))
    assert float(row.split()[1]) > 0  # GFLOPS measured
