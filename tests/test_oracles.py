"""External oracles (../shared/oracles, or $SPARKLE_ORACLES): ONNX Conv node tests with expected
outputs, and DeepBench conv/GEMM shapes compared against the float64 reference on random data.

These cases were written outside this project. CI always has the directory, so a missing one
is a failure, never a skip.
"""

import json
import os
import pathlib

import numpy as np
import pytest

import sparkle
from sparkle import api, reference

from _helpers import Unchanged, assert_close_to_reference, make_array


def oracle_dir():
    override = os.environ.get("SPARKLE_ORACLES")
    if override:
        return pathlib.Path(override)
    return pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "oracles"


ORACLES = oracle_dir()
MISSING = "oracles-missing"
ONNX_SUITES = {"onnx_conv": 6, "onnx_conv_pytorch_exported": 12}  # case counts from the oracles' README


def require_oracles():
    if not ORACLES.is_dir():
        pytest.fail(f"oracle directory {ORACLES} not found: check out the shared oracles next to the repository "
                    f"or point SPARKLE_ORACLES at them", pytrace=False)


def read_json(relative):
    require_oracles()
    path = ORACLES / relative
    if not path.is_file():
        pytest.fail(f"oracle file {path} not found", pytrace=False)
    return json.loads(path.read_text())


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


def test_oracle_directory_complete():
    require_oracles()
    for suite, count in ONNX_SUITES.items():
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
    kwargs = dict(stride=tuple(torch["stride"]), dilation=tuple(torch["dilation"]), groups=torch["groups"],
                  padding=tuple(torch["padding_tblr"]))
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
    np.testing.assert_allclose(out, y, rtol=1e-3, atol=1e-5)
    return out, (x, w, bias), kwargs


@pytest.mark.parametrize("suite, name", onnx_case_ids(), ids=lambda v: str(v))
@pytest.mark.parametrize("device", ["cpu", "reference"])
def test_onnx_conv_expected_output(suite, name, device):
    check_onnx_case(suite, name, device)


@pytest.mark.parametrize("suite, name", onnx_case_ids(), ids=lambda v: str(v))
def test_onnx_conv_in_float64(suite, name):
    # The same problem promoted to float64 must agree with the float32 expected output as well.
    _, arrays, kwargs = load_onnx_case(suite, name)
    bias = arrays.get("b")
    out = sparkle.conv2d(arrays["x"].astype(np.float64), arrays["w"].astype(np.float64),
                         None if bias is None else bias.astype(np.float64), device="cpu", **kwargs)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, arrays["y"], rtol=1e-3, atol=1e-5)


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
            np.testing.assert_allclose(out, arrays["y"], rtol=1e-3, atol=1e-5)
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
                np.testing.assert_allclose(out, arrays["y"], rtol=1e-3, atol=1e-5)
                checked += 1
    assert checked >= 1


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
    n, c, h, w = problem["x_shape_nchw"]
    k, _, r, s = problem["w_shape_kcrs"]
    h = max(min(h, MAX_CONV_SIZE), r - top - bottom, 1)
    w = max(min(w, MAX_CONV_SIZE), s - left - right, 1)
    return dict(x_shape=(1, min(c, MAX_CONV_CHANNELS), h, w), w_shape=(min(k, MAX_CONV_CHANNELS),
                min(c, MAX_CONV_CHANNELS), r, s), stride=tuple(torch["stride"]), padding=(top, bottom, left, right))


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
        kwargs = dict(stride=shapes["stride"], padding=shapes["padding"])
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
