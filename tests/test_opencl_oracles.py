"""The oracles on every OpenCL device: the ONNX Conv node tests (expected outputs written outside this
project), the fused-path cases (expected outputs from PyTorch in float64), and DeepBench problems at
batch 1 and full size, checked against the float64 reference (convolutions at sampled output points,
GEMMs in full).

The oracle files are found as tests/test_oracles.py finds them (tests/oracles, or $SPARKLE_ORACLES);
a missing directory fails, as there. Expected outputs are checked with test_oracles' float32 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyopencl")

from _helpers import Unchanged, assert_close_to_reference, make_array
from _opencl import opencl_params, runtime_device, sparkle_cache  # noqa: F401
from test_oracles import (
    DEEPBENCH_SEED,
    check_fused_case,
    check_onnx_case,
    deepbench_conv_sample,
    fused_case_names,
    onnx_case_ids,
    read_json,
)

import sparkle
from sparkle import reference

pytestmark = [pytest.mark.usefixtures("sparkle_cache"),
              pytest.mark.filterwarnings("error::sparkle.opencl.backend.OpenCLFallbackWarning")]

DEVICES = opencl_params()


def assert_same_on_device(out, operands, kwargs, device_id):
    # The same problem with the operands already on the device gives the same numbers.
    on_device = sparkle.conv2d(*(None if a is None else sparkle.to_device(a, device_id) for a in operands),
                               **kwargs)
    np.testing.assert_array_equal(on_device.get(), out)


@pytest.mark.parametrize("suite, name", onnx_case_ids(), ids=lambda v: str(v))
@pytest.mark.parametrize("device_id", DEVICES)
def test_onnx_conv_expected_output(device_id, suite, name):
    out, operands, kwargs = check_onnx_case(suite, name, device_id)
    assert_same_on_device(out, operands, kwargs, device_id)


@pytest.mark.parametrize("name", fused_case_names())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("device_id", DEVICES)
def test_fused_case_expected_output(device_id, dtype, name):
    # Asymmetric and odd SAME_UPPER padding, dilation, groups and unequal strides at float32's (and,
    # where the device has float64, float64's) accuracy.
    if dtype == np.float64 and not runtime_device(device_id).has_fp64:
        pytest.skip(f"{device_id} has no float64 support")
    out, operands, kwargs = check_fused_case(name, device_id, dtype)
    assert_same_on_device(out, operands, kwargs, device_id)


# --- DeepBench at batch 1 ----------------------------------------------------------------------------

MAX_CONV_FLOPS = 3e8  # per problem at N = 1: a fraction of a second on PoCL
MAX_GEMM_FLOPS = 1e8
SAMPLED_POINTS = 1500


def deepbench_convs(count=6):
    """One problem of each distinct kernel/stride/padding geometry in test_oracles' sample, at N = 1 (the
    first ``count``: each costs a program build)."""
    picks, geometries = [], set()
    for problem in deepbench_conv_sample():
        k, cg, r, s = problem["w_shape_kcrs"]
        _, _, p, q = problem["y_shape_nkpq"]
        geometry = (r, s, tuple(problem["torch"]["stride"]), tuple(problem["torch"]["padding_tblr"]))
        if 2 * k * p * q * cg * r * s <= MAX_CONV_FLOPS and geometry not in geometries:
            geometries.add(geometry)
            picks.append(problem)
    return picks[:count]


def conv_id(problem):
    _, c, h, w = problem["x_shape_nchw"]
    k, _, r, s = problem["w_shape_kcrs"]
    return f"{problem['list']}-c{c}h{h}w{w}-k{k}r{r}s{s}-st{problem['hstride']}"


def test_deepbench_selection_is_varied():
    picks = deepbench_convs()
    assert len(picks) >= 5, [conv_id(p) for p in picks]
    assert len({p["w_shape_kcrs"][2] for p in picks}) >= 3  # kernel heights
    assert len({p["hstride"] for p in picks}) >= 2


@pytest.mark.parametrize("problem", deepbench_convs(), ids=conv_id)
@pytest.mark.parametrize("device_id", DEVICES)
def test_deepbench_conv_batch_1(device_id, problem):
    rng = np.random.default_rng(DEEPBENCH_SEED + problem["source_line"])
    torch = problem["torch"]
    x = make_array(rng, (1, *problem["x_shape_nchw"][1:]), np.float32)
    w = make_array(rng, problem["w_shape_kcrs"], np.float32)
    bias = make_array(rng, problem["w_shape_kcrs"][:1], np.float32)
    kwargs = {"stride": tuple(torch["stride"]), "padding": tuple(torch["padding_tblr"]),
              "dilation": tuple(torch["dilation"]), "groups": torch["groups"]}
    y = sparkle.conv2d(x, w, bias, device=device_id, **kwargs)
    assert y.shape == (1, *problem["y_shape_nkpq"][1:]) and y.dtype == np.float32
    assert np.isfinite(y).all()
    points = np.stack([rng.integers(0, size, SAMPLED_POINTS) for size in y.shape], axis=1)
    points[:4] = [[0, 0, 0, 0], [0, y.shape[1] - 1, y.shape[2] - 1, y.shape[3] - 1],  # the corners too
                  [0, 0, y.shape[2] - 1, 0], [0, y.shape[1] - 1, 0, y.shape[3] - 1]]
    expected = reference.conv2d_at(x, w, bias, points=points, **kwargs)
    assert_close_to_reference(y[tuple(points.T)], expected, np.float32)


def deepbench_gemms(count=3):
    """The first ``count`` DeepBench GEMMs (in a fixed random order) small enough to run at full size."""
    problems = read_json("deepbench_gemm.json")["problems"]
    order = np.random.default_rng(DEEPBENCH_SEED + 4).permutation(len(problems))
    small = [problems[i] for i in order if 2 * problems[i]["M"] * problems[i]["N"] * problems[i]["K"]
             <= MAX_GEMM_FLOPS]
    return small[:count]


@pytest.mark.parametrize("problem", deepbench_gemms(),
                         ids=lambda p: f"m{p['M']}n{p['N']}k{p['K']}{'-at' if p['a_t'] else ''}"
                                       f"{'-bt' if p['b_t'] else ''}")
@pytest.mark.parametrize("device_id", DEVICES)
def test_deepbench_gemm_full_size(device_id, problem):
    rng = np.random.default_rng(DEEPBENCH_SEED + problem["source_line"])
    m, n, k = problem["M"], problem["N"], problem["K"]
    # DeepBench operands are column-major: untransposed ones are transposed views of row-major buffers.
    a = make_array(rng, (m, k), np.float32) if problem["a_t"] else make_array(rng, (k, m), np.float32).T
    b = make_array(rng, (k, n), np.float32) if problem["b_t"] else make_array(rng, (n, k), np.float32).T
    unchanged = Unchanged(a, b)
    c = sparkle.matmul(a, b, device=device_id)
    unchanged.check()
    assert c.shape == (m, n) and c.dtype == np.float32
    assert_close_to_reference(c, reference.matmul(a, b), np.float32)
