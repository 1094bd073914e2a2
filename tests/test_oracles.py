"""Oracles (tests/oracles, or $SPARKLE_ORACLES instead): ONNX Conv node tests with expected outputs,
convolutions that reach the CPU backend's GEMM paths with expected outputs computed by PyTorch in float64
(tests/oracles/fused_cases), and DeepBench conv/GEMM shapes compared against the float64 reference on
random data.

None of the expected values comes from Sparkle. The directory is part of the repository, so a missing
one is a failure, never a skip. Float32 results are held to what float32 arithmetic gives (see
FLOAT32_TOLERANCE); the measured errors are a few times smaller.
"""

import json
import os
import pathlib

import numpy as np
import pytest
from _helpers import Unchanged, assert_close_to_reference, make_array, rel_l2

import sparkle
from sparkle import api, reference
from sparkle.cpu import backend, prepared
from sparkle.cpu.isa import ISAS, active_isa


def oracle_dir():
    override = os.environ.get("SPARKLE_ORACLES")
    if override:
        return pathlib.Path(override)
    return pathlib.Path(__file__).resolve().parent / "oracles"


ORACLES = oracle_dir()
MISSING = "oracles-missing"
ONNX_SUITES = {"onnx_conv": 6, "onnx_conv_pytorch_exported": 12}  # case counts from the oracles' README
FUSED_SUITE = "fused_cases"
FUSED_CASES = 12  # as many as fused_cases/generate.py writes

# Float32 results against an expected output: relative L2 error, and the largest elementwise error
# relative to the largest |expected|. Measured: at most 2.4e-7 and 2.4e-7 on every device and path (the
# ONNX expected outputs are float32 results themselves, some 2.4e-7 from the exact value); ONNX's own
# rtol 1e-3 would pass a kernel that drops a tap of a large reduction.
FLOAT32_TOLERANCE = 1e-6
# Float64 results against the float64 expected outputs of the fused cases (measured: 3e-16).
FLOAT64_TOLERANCE = 1e-12


def require_oracles():
    if not ORACLES.is_dir():
        pytest.fail(f"oracle directory {ORACLES} not found: it is part of the repository (tests/oracles); "
                    f"SPARKLE_ORACLES, if set, must point at a copy of it", pytrace=False)


def read_json(relative):
    require_oracles()
    path = ORACLES / relative
    if not path.is_file():
        pytest.fail(f"oracle file {path} not found", pytrace=False)
    return json.loads(path.read_text())


def assert_close_to_expected(out, expected, tolerance=FLOAT32_TOLERANCE):
    """Relative L2 error and largest elementwise error (relative to max |expected|) both <= tolerance."""
    out = np.asarray(out, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape
    assert np.isfinite(out).all()
    l2 = rel_l2(out, expected)
    worst = np.abs(out - expected).max(initial=0.0) / max(np.abs(expected).max(initial=0.0), np.finfo(np.float64).tiny)
    assert l2 <= tolerance and worst <= tolerance, (
        f"relative L2 error {l2:.2e}, largest error {worst:.2e} of max |expected| (tolerance {tolerance:.0e})")


def onnx_case_ids():
    """(suite, case) pairs, read at collection; a single MISSING entry when the oracles are absent,
    so that the test fails rather than being collected with an empty (skipped) parameter set."""
    ids = []
    for suite in ONNX_SUITES:
        cases = ORACLES / suite / "cases.json"
        if not cases.is_file():
            return [(MISSING, MISSING)]
        ids += [(suite, name) for name in json.loads(cases.read_text())]
    return ids


def fused_case_names():
    """The fused-path case names, read at collection (MISSING when absent, as for onnx_case_ids)."""
    cases = ORACLES / FUSED_SUITE / "cases.json"
    return list(json.loads(cases.read_text())) if cases.is_file() else [MISSING]


def test_oracle_directory_complete():
    require_oracles()
    for suite, count in {**ONNX_SUITES, FUSED_SUITE: FUSED_CASES}.items():
        cases = read_json(f"{suite}/cases.json")
        assert len(cases) == count, f"{suite}: expected {count} cases, found {len(cases)}"
        for case in cases.values():
            assert (ORACLES / suite / case["file"]).is_file()
    assert len(read_json("deepbench_conv.json")["problems"]) > 100
    assert len(read_json("deepbench_gemm.json")["problems"]) > 100


def load_onnx_case(suite, name):
    require_oracles()
    case = read_json(f"{suite}/cases.json")[name]
    with np.load(ORACLES / suite / case["file"]) as data:
        arrays = {key: data[key] for key in data.files}
    torch = case["torch_equivalent"]
    kwargs = {"stride": tuple(torch["stride"]), "dilation": tuple(torch["dilation"]), "groups": torch["groups"],
              "padding": tuple(torch["padding_tblr"])}
    return case, arrays, kwargs


def check_onnx_case(suite, name, device):
    """Run one ONNX Conv case on ``device`` and check it against its expected output.

    Returns (output, operands (x, w, bias), conv2d keyword arguments) for further checks.
    """
    case, arrays, kwargs = load_onnx_case(suite, name)
    x, w, y = arrays["x"], arrays["w"], arrays["y"]
    bias = arrays.get("b")
    assert (bias is not None) == case["has_bias"]
    unchanged = Unchanged(x, w, bias)
    out = sparkle.conv2d(x, w, bias, device=device, **kwargs)
    unchanged.check()
    assert type(out) is np.ndarray and out.dtype == y.dtype == np.float32
    assert out.shape == y.shape
    assert_close_to_expected(out, y)
    return out, (x, w, bias), kwargs


@pytest.mark.parametrize("suite, name", onnx_case_ids(), ids=lambda v: str(v))
@pytest.mark.parametrize("device", ["cpu", "reference"])
def test_onnx_conv_expected_output(suite, name, device):
    check_onnx_case(suite, name, device)


@pytest.mark.parametrize("suite, name", onnx_case_ids(), ids=lambda v: str(v))
def test_onnx_conv_in_float64(suite, name):
    # The same problem promoted to float64 must agree with the float32 expected output as well (to the
    # expected output's own float32 error).
    _, arrays, kwargs = load_onnx_case(suite, name)
    bias = arrays.get("b")
    out = sparkle.conv2d(arrays["x"].astype(np.float64), arrays["w"].astype(np.float64),
                         None if bias is None else bias.astype(np.float64), device="cpu", **kwargs)
    assert out.dtype == np.float64
    assert_close_to_expected(out, arrays["y"])


def test_onnx_auto_pad_same_upper_matches_same():
    # Cases whose ONNX auto_pad is SAME_UPPER must give the same padding as padding="same".
    checked = 0
    for suite in ONNX_SUITES:
        for name, case in read_json(f"{suite}/cases.json").items():
            if case["onnx_attributes"].get("auto_pad") != "SAME_UPPER":
                continue
            _, arrays, kwargs = load_onnx_case(suite, name)
            kwargs["padding"] = "same"
            out = sparkle.conv2d(arrays["x"], arrays["w"], arrays.get("b"), device="cpu", **kwargs)
            assert_close_to_expected(out, arrays["y"])
            checked += 1
    # SAME_LOWER coincides with SAME_UPPER when the total padding is even; check those too.
    for suite in ONNX_SUITES:
        for name, case in read_json(f"{suite}/cases.json").items():
            if case["onnx_attributes"].get("auto_pad") != "SAME_LOWER":
                continue
            tblr = case["torch_equivalent"]["padding_tblr"]
            if tblr[0] == tblr[1] and tblr[2] == tblr[3]:
                _, arrays, kwargs = load_onnx_case(suite, name)
                kwargs["padding"] = "same"
                out = sparkle.conv2d(arrays["x"], arrays["w"], arrays.get("b"), device="cpu", **kwargs)
                assert_close_to_expected(out, arrays["y"])
                checked += 1
    assert checked >= 1


# --- Fused-path cases (expected outputs: PyTorch in float64, see oracles/fused_cases/generate.py) --------


def load_fused_case(name, dtype=np.float32):
    """(case, (x, w, bias) as ``dtype``, float64 expected y, conv2d keyword arguments with the sparkle
    padding argument, e.g. "same")."""
    case = read_json(f"{FUSED_SUITE}/cases.json")[name]
    with np.load(ORACLES / FUSED_SUITE / case["file"]) as data:
        arrays = {key: data[key] for key in data.files}
    assert arrays["x"].dtype == arrays["w"].dtype == np.float32 and arrays["y"].dtype == np.float64
    assert ("b" in arrays) == case["has_bias"]
    operands = tuple(None if arrays.get(key) is None else arrays[key].astype(dtype) for key in ("x", "w", "b"))
    padding = case["sparkle_padding"]
    kwargs = {"stride": tuple(case["stride"]), "dilation": tuple(case["dilation"]), "groups": case["groups"],
              "padding": padding if isinstance(padding, str) else tuple(padding)}
    return case, operands, arrays["y"], kwargs


def check_fused_case(name, device, dtype=np.float32):
    """Run one fused-path case on ``device`` and check it against its expected output; returns
    (output, operands, conv2d keyword arguments) as check_onnx_case does."""
    _, operands, y, kwargs = load_fused_case(name, dtype)
    unchanged = Unchanged(*operands)
    out = sparkle.conv2d(*operands, device=device, **kwargs)
    unchanged.check()
    assert type(out) is np.ndarray and out.dtype == dtype and out.shape == y.shape
    assert_close_to_expected(out, y, FLOAT32_TOLERANCE if dtype == np.float32 else FLOAT64_TOLERANCE)
    return out, operands, kwargs


@pytest.fixture
def cpu_paths(monkeypatch):
    """The CPU backend paths ("direct", "implicit", "packed") that ran, in order."""
    ran, depth = [], [0]

    def spy(path, real):
        def run(*args):
            if not depth[0]:  # the outermost only: the backend's paths run the prepared launches below
                ran.append(path)
            depth[0] += 1
            try:
                return real(*args)
            finally:
                depth[0] -= 1

        return run

    for path, function in (("direct", "_run_direct"), ("implicit", "_run_implicit"), ("packed", "_run_fused")):
        monkeypatch.setattr(backend, function, spy(path, getattr(backend, function)))
    # sparkle.conv2d(device="cpu") runs a prepared call (named_device.py): its launch's run, bound when prepared
    for path, launch in (("direct", prepared.DirectLaunch), ("implicit", prepared.ImplicitLaunch),
                         ("packed", prepared.FusedLaunch)):
        monkeypatch.setattr(launch, "run", spy(path, launch.run))
    return ran


@pytest.mark.parametrize("name", fused_case_names())
def test_fused_case_geometry_and_planned_paths(name):
    # "same" resolves to the generator's explicitly computed padding, and the planner picks the
    # recorded path on every instruction-set family (never the direct kernel).
    case, (x, w, bias), y, kwargs = load_fused_case(name)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    assert (spec.pad_top, spec.pad_bottom, spec.pad_left, spec.pad_right) == tuple(case["padding_tblr"])
    assert spec.output_shape == y.shape
    assert not backend.uses_direct_kernel(spec)
    assert set(case["expected_path"]) == {isa.name for isa in ISAS}
    for isa in ISAS:
        plan = backend.plan_conv2d(spec, isa=isa)
        assert ("implicit" if plan.implicit else "packed") == case["expected_path"][isa.name], isa.name


def test_fused_cases_cover_both_gemm_paths_and_the_geometries():
    cases = read_json(f"{FUSED_SUITE}/cases.json")
    on_avx512 = {case["expected_path"]["avx512"] for case in cases.values()}
    assert on_avx512 == {"implicit", "packed"}
    tblr = [case["padding_tblr"] for case in cases.values()]
    assert any(t[0] == t[2] == 0 and t[1] and t[3] for t in tblr), "bottom/right-only padding"
    assert any(c["sparkle_padding"] == "same" and (t[0] + t[1]) % 2 and (c["stride"][0] > 1 or c["stride"][1] > 1)
               for c, t in zip(cases.values(), tblr)), "odd total SAME_UPPER padding with a stride"
    assert any(max(c["dilation"]) > 1 for c in cases.values())
    assert any(c["groups"] > 1 for c in cases.values())
    assert any(c["stride"][0] != c["stride"][1] for c in cases.values())


@pytest.mark.parametrize("name", fused_case_names())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_case_on_cpu(name, dtype, cpu_paths):
    # The path the planner chooses on this machine's family, asserted to be the one that ran.
    check_fused_case(name, "cpu", dtype)
    case = read_json(f"{FUSED_SUITE}/cases.json")[name]
    assert cpu_paths == [case["expected_path"][active_isa().name]]


@pytest.mark.boundscheck
@pytest.mark.parametrize("name", fused_case_names())
@pytest.mark.parametrize("path", ["implicit", "packed"])
def test_fused_case_on_each_gemm_path(name, path, cpu_paths):
    # Both GEMM paths on every case, whichever the planner prefers (the packed path with padding,
    # SAME_UPPER and strides even on AVX-512 machines). Reruns bounds-checked in CI: asymmetric padding
    # is where an edge read would go out of the input.
    _, operands, y, kwargs = load_fused_case(name)
    spec = api.conv2d_spec(*operands, **kwargs)
    out = backend.conv2d(*operands, spec, backend.plan_conv2d(spec, implicit=path == "implicit"))
    assert cpu_paths == [path]
    assert_close_to_expected(out, y)


@pytest.mark.parametrize("name", fused_case_names())
def test_fused_case_reference(name):
    # The float64 oracle against PyTorch's float64 result (float32 inputs are exact in float64).
    _, operands, y, kwargs = load_fused_case(name)
    assert_close_to_expected(reference.conv2d(*operands, **kwargs), y, FLOAT64_TOLERANCE)
    check_fused_case(name, "reference")


# --- DeepBench -----------------------------------------------------------------------------------

DEEPBENCH_SEED = 20240607
MAX_CONV_CHANNELS = 32
MAX_CONV_SIZE = 24
MAX_GEMM_SIZE = 256


def deepbench_conv_problems():
    return read_json("deepbench_conv.json")["problems"]


def test_deepbench_conv_output_shapes():
    # Output geometry for every full-size DeepBench problem, using zero-stride arrays (no memory).
    for problem in deepbench_conv_problems():
        torch = problem["torch"]
        x = np.broadcast_to(np.float32(0), problem["x_shape_nchw"])
        w = np.broadcast_to(np.float32(0), problem["w_shape_kcrs"])
        spec = api.conv2d_spec(x, w, stride=tuple(torch["stride"]), padding=tuple(torch["padding_tblr"]),
                               dilation=tuple(torch["dilation"]), groups=torch["groups"])
        assert spec.output_shape == tuple(problem["y_shape_nkpq"]), problem


def scaled_down(problem):
    """The problem with N = 1, C and K <= 32 and H, W <= 24, keeping kernel, stride and padding
    (the input is kept large enough for the kernel to fit)."""
    torch = problem["torch"]
    top, bottom, left, right = torch["padding_tblr"]
    _, c, h, w = problem["x_shape_nchw"]
    k, _, r, s = problem["w_shape_kcrs"]
    h = max(min(h, MAX_CONV_SIZE), r - top - bottom, 1)
    w = max(min(w, MAX_CONV_SIZE), s - left - right, 1)
    return {"x_shape": (1, min(c, MAX_CONV_CHANNELS), h, w),
            "w_shape": (min(k, MAX_CONV_CHANNELS), min(c, MAX_CONV_CHANNELS), r, s),
            "stride": tuple(torch["stride"]), "padding": (top, bottom, left, right)}


def deepbench_conv_sample(size=20):
    """A fixed pseudo-random sample: one problem of every distinct kernel/stride/padding geometry
    first, then others up to ``size``."""
    problems = deepbench_conv_problems()
    order = np.random.default_rng(DEEPBENCH_SEED).permutation(len(problems))
    picks, geometries = [], set()
    for i in order:
        p = problems[i]
        geometry = (p["R"], p["S"], p["hstride"], p["wstride"], p["pad_h"], p["pad_w"])
        if geometry not in geometries:
            geometries.add(geometry)
            picks.append(i)
    picks += [i for i in order if i not in picks][:max(0, size - len(picks))]
    return [problems[i] for i in sorted(picks)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deepbench_conv_scaled_down(dtype):
    sample = deepbench_conv_sample()
    assert len({(p["R"], p["S"], p["hstride"], p["pad_h"]) for p in sample}) >= 3, "sample too uniform"
    rng = np.random.default_rng(DEEPBENCH_SEED + 1)
    for problem in sample:
        shapes = scaled_down(problem)
        x = make_array(rng, shapes["x_shape"], dtype)
        w = make_array(rng, shapes["w_shape"], dtype)
        bias = make_array(rng, shapes["w_shape"][:1], dtype)
        kwargs = {"stride": shapes["stride"], "padding": shapes["padding"]}
        y = sparkle.conv2d(x, w, bias, device="cpu", **kwargs)
        ref = reference.conv2d(x, w, bias, **kwargs)
        assert y.shape == ref.shape
        assert_close_to_reference(y, ref, dtype)


def deepbench_gemm_sample(count=10):
    problems = read_json("deepbench_gemm.json")["problems"]
    rng = np.random.default_rng(DEEPBENCH_SEED + 2)
    return [problems[i] for i in sorted(rng.choice(len(problems), size=count, replace=False))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deepbench_gemm_scaled_down(dtype):
    rng = np.random.default_rng(DEEPBENCH_SEED + 3)
    for problem in deepbench_gemm_sample():
        m, n, k = (min(problem[key], MAX_GEMM_SIZE) for key in ("M", "N", "K"))
        # DeepBench stores column-major operands: when not transposed, the row-major buffer is
        # (K, M) for A and (N, K) for B, and the math operand is its transpose (a strided view).
        a = make_array(rng, (m, k), dtype) if problem["a_t"] else make_array(rng, (k, m), dtype).T
        b = make_array(rng, (k, n), dtype) if problem["b_t"] else make_array(rng, (n, k), dtype).T
        c = sparkle.matmul(a, b, device="cpu")
        assert c.shape == (m, n)
        assert_close_to_reference(c, reference.matmul(a, b), dtype)
