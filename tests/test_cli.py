"""The ``sparkle`` command line: devices, tune (real tuning on every OpenCL device), cache, bad arguments.

Tuning tests keep the tuning database and the program binaries in a private SPARKLE_CACHE_DIR (tmp_path),
then check that what the command stored is used by the next call and gives the reference's result.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import sparkle
from sparkle import api, reference
from sparkle.cli import main

from _helpers import assert_close_to_reference
from _opencl import device_health, opencl_device_ids, opencl_params, runtime_device


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``sparkle argv`` run in this process."""
    try:
        status = main(argv)
    except SystemExit as exit_:  # argparse errors and --help
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLE_CACHE_DIR", os.fspath(tmp_path))
    return tmp_path


def binaries(directory):
    return sorted(directory.glob("opencl-programs-v*/*.bin"))


def tuned_entry(device_id, key):
    from sparkle.opencl.tuning import database

    return database.entries(runtime_device(device_id).identity).get(key)


# --- sparkle devices -------------------------------------------------------------------------------------

def test_devices_lists_every_device(capsys):
    status, out, _ = run(["devices"], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["id", "kind", "name", "vendor", "compute", "units", "memory", "available"]
    listed = sparkle.devices()
    assert [d.id for d in listed][:1] == ["cpu"]
    for device, line in zip(listed, lines[1:]):
        assert line.startswith(device.id + " ")
        for field in (device.kind, device.name, device.vendor, str(device.compute_units),
                      f"{device.memory / 2**30:.1f} GiB"):
            assert field in line, (field, line)
        assert line.endswith("  yes" if device.available else "  NO"), line
        assert (f"{device.id} is unavailable: {device.reason}" in out) == (not device.available)
    assert f"cpu runs the {sparkle.devices()[0].isa} micro-kernels (" in out
    assert lines[len(listed) + 1] == ""  # the table has exactly one row per device
    ids = opencl_device_ids()
    if ids:
        from sparkle.devices import opencl_backend_device

        assert f'device="opencl" means {opencl_backend_device("opencl").id}' in out
        assert "OpenCL is unavailable" not in out
    else:
        assert "OpenCL is unavailable: " in out or "device='opencl' is not available: " in out


def test_devices_says_why_opencl_is_unavailable(monkeypatch, capsys):
    monkeypatch.setenv("SPARKLE_OPENCL", "0")
    status, out, _ = run(["devices"], capsys)
    assert status == 0
    assert "OpenCL is unavailable: OpenCL is disabled by SPARKLE_OPENCL=0" in out
    assert "opencl:" not in out
    assert re.search(r"^cpu +cpu ", out, re.MULTILINE)


def test_python_dash_m_sparkle(private_cache):
    completed = subprocess.run([sys.executable, "-m", "sparkle", "devices"], capture_output=True, text=True,
                               timeout=120, env=os.environ.copy())
    assert completed.returncode == 0, completed.stderr
    rows = [line.split()[0] for line in completed.stdout.splitlines()[1:] if line.strip()]
    assert rows[0] == "cpu"
    assert [row for row in rows if row.startswith("opencl:")] == [device.id for device, _ in device_health()]


# --- sparkle tune ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_id", opencl_params())
def test_tune_matmul_stores_a_correct_winner_and_cache_lists_and_clears_it(device_id, private_cache, capsys):
    from sparkle.opencl import backend
    from sparkle.opencl.codegen import Workload

    # A shape no other test builds, so the kernels compile here and land in this test's cache.
    m, k, n = 24, 40, 12
    status, out, _ = run(["tune", "matmul", "--m", str(m), "--k", str(k), "--n", str(n), "--device", device_id,
                          "--time-budget", "120", "--max-candidates", "2", "--no-progress"], capsys)
    assert status == 0, out
    key = f"matmul:m{m}_k{k}_n{n}:float32"
    assert out.startswith(f"{key} on {device_id}: ")
    assert "(2 tried, 0 rejected)" in out
    assert f"tuning database: {private_cache}" in out
    entry = tuned_entry(device_id, key)
    assert entry is not None and entry["tried"] == 2
    best = entry["best"]["params"]
    assert all(f"'{name}': {value}" in out for name, value in best.items())  # the winner is printed

    # The next call of that shape runs the stored winner, and it is right.
    rng = np.random.default_rng(1)
    a = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal((k, n), dtype=np.float32)
    device = runtime_device(device_id)
    assert backend.choose_params(device, Workload.from_spec(api.matmul_spec(a, b))) == (best, "tuned")
    assert_close_to_reference(sparkle.matmul(a, b, device=device_id), reference.matmul(a, b), np.float32)

    stored = binaries(private_cache)
    assert stored, "tuning built kernels but no program binary was cached"
    status, out, _ = run(["cache", "--verbose"], capsys)
    assert status == 0
    assert f"cache directory: {private_cache}" in out
    assert f"{device_id} ({device.name}): 1 tuned workload" in out
    assert key in out
    assert f"program binaries: {len(stored)} (" in out

    status, out, _ = run(["cache", "--clear"], capsys)
    assert status == 0 and "removed: " in out
    assert not binaries(private_cache) and not list(private_cache.glob("opencl-tuning-v*.json"))
    status, out, _ = run(["cache"], capsys)
    assert "(none yet: run 'sparkle tune ...')" in out
    assert "program binaries: 0 (0 B)" in out


@pytest.mark.parametrize("device_id", opencl_params())
def test_tune_conv2d_passes_every_option(device_id, private_cache, capsys):
    argv = ["tune", "conv2d", "--input", "2,6,9,7", "--weight", "4,3,3,2", "--stride", "2,1", "--padding", "same",
            "--dilation", "1,2", "--groups", "2", "--bias", "--activation", "relu", "--device", device_id,
            "--time-budget", "120", "--max-candidates", "1", "--no-progress"]
    status, out, _ = run(argv, capsys)
    assert status == 0, out
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 6, 9, 7), dtype=np.float32)
    w = rng.standard_normal((4, 3, 3, 2), dtype=np.float32)
    bias = rng.standard_normal(4, dtype=np.float32)
    kwargs = {"stride": (2, 1), "padding": "same", "dilation": (1, 2), "groups": 2, "activation": "relu"}
    from sparkle.opencl.codegen import Workload

    workload = Workload.from_spec(api.conv2d_spec(x, w, bias, **kwargs))
    assert out.startswith(f"{workload.key} on {device_id}: ")
    entry = tuned_entry(device_id, workload.key)
    assert entry["workload"] == workload.as_dict() and entry["tried"] == 1 and "best" in entry
    y = sparkle.conv2d(x, w, bias, device=device_id, **kwargs)
    assert_close_to_reference(y, reference.conv2d(x, w, bias, **kwargs), np.float32)


@pytest.mark.parametrize("device_id", opencl_params())
def test_tune_resnet50_layers(device_id, private_cache, capsys):
    from sparkle.opencl.codegen import Workload
    from sparkle.workloads import RESNET50_LAYERS, layer_inputs

    status, out, _ = run(["tune", "resnet50", "--batch", "1", "--layers", "res2_1x1", "--device", device_id,
                          "--time-budget-per-layer", "120", "--max-candidates", "1", "--no-progress"], capsys)
    assert status == 0, out
    layer = next(layer for layer in RESNET50_LAYERS if layer.name == "res2_1x1")
    x, w = layer_inputs(layer)
    workload = Workload.from_spec(api.conv2d_spec(x, w, **layer.conv_kwargs()))
    assert "best" in tuned_entry(device_id, workload.key)
    assert f"ResNet-50, batch 1, float32, on {device_id}:" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("res")]
    assert len(rows) == 1 and rows[0][0] == "res2_1x1" and rows[0][-1] == "1"
    assert float(rows[0][2]) > 0  # GFLOPS


# --- sparkle cache ---------------------------------------------------------------------------------------

def test_cache_lists_absent_devices_and_old_layouts_and_clears_only_its_own_files(private_cache, capsys):
    from sparkle.opencl.codegen import Workload
    from sparkle.opencl.tuning import database

    spec = api.matmul_spec(np.ones((8, 4), np.float32), np.ones((4, 8), np.float32))
    params = {"TM": 8, "TN": 8}
    database.record("Some Platform|Vendor|Gone GPU|1.0|1.0|1.0", Workload.from_spec(spec),
                    {"params": params, "seconds": 1e-3, "gflops": 0.5}, [], 3)
    old = private_cache / "opencl-tuning-v0.json"
    old.write_text("{}")
    (private_cache / "opencl-programs-v0").mkdir()
    (private_cache / "opencl-programs-v0" / "abc.bin").write_bytes(b"x" * 2048)
    mine = private_cache / "notes.txt"  # SPARKLE_CACHE_DIR may point at a directory holding other files
    mine.write_text("keep")

    status, out, _ = run(["cache", "-v"], capsys)
    assert status == 0
    assert "Some Platform|Vendor|Gone GPU|1.0|1.0|1.0 (not present now): 1 tuned workload" in out
    assert "matmul:m8_k4_n8:float32: 0.5 GFLOPS" in out
    assert f"tuning database of an older kernel template (not used): {old}" in out
    assert f"program binaries of an older cache layout (not used): 1 (2.0 KiB) in {private_cache}" in out
    assert "program binaries: 0 (0 B)" in out

    status, out, _ = run(["cache", "--clear", "programs"], capsys)
    assert status == 0 and not (private_cache / "opencl-programs-v0").exists()
    assert database.DOCUMENT.path.exists() and old.exists()
    status, out, _ = run(["cache", "--clear"], capsys)
    assert status == 0
    assert not database.DOCUMENT.path.exists() and not old.exists()
    assert mine.read_text() == "keep"
    assert sorted(p.name for p in private_cache.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("device_id", opencl_params())
def test_cache_counts_the_shipped_pretuned_parameters_of_present_devices(device_id, private_cache, monkeypatch,
                                                                        capsys):
    from sparkle.opencl.tuning import database

    device = runtime_device(device_id)
    shipped = {"devices": {device.identity: {"workloads": {"a": {}, "b": {}}}, "Other|1|X|Y|1|1": {}}}
    monkeypatch.setattr(database, "_seed", lambda: shipped)
    status, out, _ = run(["cache"], capsys)
    assert status == 0
    assert f"{device_id} ({device.name}): tuned workloads: 2 shipped" in out


@pytest.mark.parametrize("device_id", opencl_params())
def test_cache_names_the_relative_an_untuned_device_borrows_from(device_id, private_cache, monkeypatch, capsys):
    from sparkle.opencl.tuning import database
    from sparkle.opencl.tuning.relatives import DeviceTraits

    device = runtime_device(device_id)
    sibling = device.identity.replace(device.name, "Sibling Device")
    traits = DeviceTraits.of(device)
    shipped = {"devices": {sibling: {"traits": {**traits.to_json(), "compute_units": 2 * traits.compute_units},
                                     "workloads": {"a": {}, "b": {}, "c": {}}}}}
    monkeypatch.setattr(database, "_seed", lambda: shipped)
    status, out, _ = run(["cache"], capsys)
    assert status == 0
    assert (f"{device_id} ({device.name}): no tuning of its own: borrows the 3 tuned workloads of Sibling Device "
            f"({traits.architecture}, {2 * traits.compute_units} compute units), its nearest relative") in out


# --- bad arguments ---------------------------------------------------------------------------------------

CONV = ["tune", "conv2d", "--input", "1,8,6,6", "--weight", "4,8,3,3"]
BAD = {
    "no command": ([], "required: COMMAND"),
    "unknown command": (["frobnicate"], "invalid choice: 'frobnicate'"),
    "no op": (["tune"], "required: OP"),
    "input of 3 sizes": (["tune", "conv2d", "--input", "1,8,6", "--weight", "4,8,3,3"],
                         "argument --input: expected 4 comma-separated positive ints N,C,H,W, got '1,8,6'"),
    "input not ints": (["tune", "conv2d", "--input", "1,8,x,6", "--weight", "4,8,3,3"], "argument --input"),
    "zero size": (["tune", "conv2d", "--input", "1,8,6,6", "--weight", "0,8,3,3"], "argument --weight"),
    "missing weight": (["tune", "conv2d", "--input", "1,8,6,6"], "required: --weight"),
    "weight channels": (["tune", "conv2d", "--input", "1,8,6,6", "--weight", "4,3,3,3"],
                        "is not a valid conv2d: w.shape[1] must be C // groups = 8"),
    "groups not dividing": ([*CONV, "--groups", "3"], "groups must divide the input channels C=8"),
    "kernel too big": (["tune", "conv2d", "--input", "1,8,2,2", "--weight", "4,8,3,3"], "output size"),
    "stride 0": ([*CONV, "--stride", "0"], "argument --stride"),
    "padding of 3": ([*CONV, "--padding", "1,2,3"], "argument --padding"),
    "padding word": ([*CONV, "--padding", "full"], "argument --padding"),
    "negative padding": ([*CONV, "--padding", "-1"], "argument --padding"),
    "time budget 0": ([*CONV, "--time-budget", "0"], "argument --time-budget: expected a positive number of seconds"),
    "time budget nan": ([*CONV, "--time-budget", "nan"], "argument --time-budget"),
    "old budget 0": ([*CONV, "--budget", "0"], "argument --budget: expected a positive number of seconds"),
    "per layer 0": (["tune", "resnet50", "--time-budget-per-layer", "0"], "argument --time-budget-per-layer"),
    "activation": ([*CONV, "--activation", "sigmoid"], "argument --activation: invalid choice: 'sigmoid'"),
    "max candidates 0": ([*CONV, "--max-candidates", "0"], "argument --max-candidates"),
    "dtype": ([*CONV, "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    "cpu cannot be tuned": ([*CONV, "--device", "cpu"], "argument --device: device must be an "),
    "no such device": ([*CONV, "--device", "opencl:99"], "argument --device: device must be an "),
    "nhwc input": (["tune", "conv2d", "--input", "1,6,6,8", "--weight", "4,8,3,3"],
                   "x looks like NHWC; Sparkle takes NCHW"),
    "matmul zero": (["tune", "matmul", "--m", "4", "--k", "0", "--n", "3"], "argument --k: expected a positive int"),
    "matmul missing n": (["tune", "matmul", "--m", "4", "--k", "2"], "required: --n"),
    "resnet layer": (["tune", "resnet50", "--layers", "res9"], "argument --layers: invalid choice: 'res9'"),
    "resnet batch": (["tune", "resnet50", "--batch", "0"], "argument --batch"),
    "cache clear what": (["cache", "--clear", "everything"], "argument --clear: invalid choice"),
}


@pytest.mark.parametrize("argv, message", BAD.values(), ids=BAD.keys())
def test_bad_arguments_exit_2_with_a_message(argv, message, private_cache, capsys):
    status, _, err = run(argv, capsys)
    assert status == 2
    assert message in err
    assert "usage: sparkle" in err
    assert not list(private_cache.iterdir()), "a rejected command must not touch the cache"


def test_tune_without_opencl_exits_2_saying_why(monkeypatch, capsys):
    monkeypatch.setenv("SPARKLE_OPENCL", "0")
    status, _, err = run(["tune", "matmul", "--m", "4", "--k", "2", "--n", "3"], capsys)
    assert status == 2
    assert "argument --device: device='opencl' is not available: OpenCL is disabled by SPARKLE_OPENCL=0" in err
    assert "argument --device: device must be an available OpenCL device to tune, got 'opencl:0', and there is " \
        "none: OpenCL is disabled by SPARKLE_OPENCL=0" in run([*CONV, "--device", "opencl:0"], capsys)[2]


@pytest.mark.parametrize("device", ["cpu", "auto", "reference", "opencl:99", "gpu"])
def test_tune_lists_only_the_devices_it_accepts(device, private_cache, capsys):
    from sparkle.devices import resolve_tuning_device

    status, _, err = run([*CONV, "--device", device], capsys)
    assert status == 2
    ids = opencl_device_ids()
    if not ids:
        assert "and there is none: " in err
        return
    listed = ast.literal_eval(re.search(r"device must be an OpenCL device to tune, one of (\[[^]]*\])", err)[1])
    assert listed == ["opencl", *ids]
    for accepted in listed:  # every id offered is accepted
        assert resolve_tuning_device(accepted).id in ids
    assert ("the cpu backend is not tuned" in err) == (device == "cpu")


# --- option names: the API's keywords in kebab case; the old spellings still work, hidden -----------------

SHAPES = ["--input", "1,8,6,6", "--weight", "4,8,3,3"]
RENAMED = {  # old option: (argv with the old spelling, the same argv with the new one)
    "--budget": (["tune", "conv2d", *SHAPES, "--budget", "7"], ["tune", "conv2d", *SHAPES, "--time-budget", "7"]),
    "--relu": (["tune", "conv2d", *SHAPES, "--relu"], ["tune", "conv2d", *SHAPES, "--activation", "relu"]),
    "--quiet": (["tune", "matmul", "--m", "2", "--k", "3", "--n", "4", "--quiet"],
                ["tune", "matmul", "--m", "2", "--k", "3", "--n", "4", "--no-progress"]),
    "--budget-per-layer": (["tune", "resnet50", "--budget-per-layer", "7"],
                           ["tune", "resnet50", "--time-budget-per-layer", "7"]),
}


def parsed(argv):
    from sparkle.cli import build_parser

    values = vars(build_parser().parse_args(argv))
    return {key: value for key, value in values.items() if key not in ("parser", "run")}


def option_listed(option, text):
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


@pytest.mark.parametrize("old", RENAMED)
def test_old_option_names_still_work_and_are_hidden_from_help(old, capsys):
    old_argv, new_argv = RENAMED[old]
    new = new_argv[old_argv.index(old)]
    assert parsed(old_argv) == parsed(new_argv)  # the same command, defaults included
    err = capsys.readouterr().err
    assert f"note: {old} is now {new}" in err
    assert parsed(new_argv) and capsys.readouterr().err == ""  # the new spelling says nothing
    status, out, _ = run([*new_argv[:2], "--help"], capsys)
    assert status == 0
    assert option_listed(new, out) and not option_listed(old, out), out


def test_no_renamed_option_is_listed_anywhere(capsys):
    for argv in HELP_COMMANDS:
        _, out, _ = run([*argv, "--help"], capsys)
        for old in RENAMED:
            assert not option_listed(old, out), (argv, old)


def test_options_named_after_api_keywords(capsys):
    # The options that set an API keyword are named after it (tune(time_budget=, max_candidates=, seed=,
    # progress=, device=), conv2d(stride=, padding=, dilation=, groups=, activation=, bias=)).
    _, conv, _ = run(["tune", "conv2d", "--help"], capsys)
    for option in ["--device", "--time-budget", "--max-candidates", "--seed", "--no-progress", "--stride",
                   "--padding", "--dilation", "--groups", "--activation", "--bias"]:
        assert option_listed(option, conv), option
    _, resnet, _ = run(["tune", "resnet50", "--help"], capsys)
    assert option_listed("--time-budget-per-layer", resnet)


HELP_COMMANDS = [[], ["devices"], ["tune"], ["tune", "conv2d"], ["tune", "matmul"], ["tune", "resnet50"],
                 ["cache"]]


@pytest.mark.parametrize("argv", HELP_COMMANDS, ids=lambda argv: " ".join(argv) or "sparkle")
def test_help_is_plain_text(argv, capsys):
    status, out, _ = run([*argv, "--help"], capsys)
    assert status == 0 and out.startswith("usage: sparkle")
    assert "`" not in out and not re.search(r":(func|class|meth|mod|attr):", out), out  # no reST markup


def test_version(capsys):
    status, out, _ = run(["--version"], capsys)
    assert status == 0
    assert out == f"sparkle {sparkle.__version__}\n"
    try:
        from importlib.metadata import PackageNotFoundError, version
        installed = version("sparkle")
    except PackageNotFoundError:
        installed = None
    if installed is not None:  # an installed copy describes the same version
        assert installed == sparkle.__version__
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return
    import pathlib

    project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == sparkle.__version__


# --- exit status 1: no correct candidate -----------------------------------------------------------------

NOTHING_CORRECT = {
    "conv2d": ["tune", "conv2d", "--input", "1,4,5,5", "--weight", "3,4,3,3"],
    "matmul": ["tune", "matmul", "--m", "8", "--k", "4", "--n", "8"],
    "resnet50": ["tune", "resnet50", "--layers", "res2_1x1"],
}


@pytest.mark.parametrize("op", NOTHING_CORRECT)
@pytest.mark.parametrize("device_id", opencl_params())
def test_tuning_that_finds_no_correct_candidate_exits_1(op, device_id, private_cache, monkeypatch, capsys):
    from sparkle.opencl import tuner

    # No error can be below a negative tolerance: every candidate is rejected as wrong.
    monkeypatch.setattr(tuner, "TOLERANCE", {"float32": -1.0, "float64": -1.0})
    status, out, _ = run([*NOTHING_CORRECT[op], "--device", device_id, "--max-candidates", "1", "--no-progress"],
                         capsys)
    assert status == 1, out
    assert "no correct candidate in 1 tried" in out
    assert "rejected {" in out and "wrong result: relative error" in out
