"""Winograd F(2x2, 3x3) and F(4x4, 3x3), fused (ALGO 1) and around a batched GEMM (ALGO 2): the generated transforms checked in float64 against the direct sum, the
error against the float64 reference over the ONNX oracles and random cases with long reductions, held to the
bound of every other path (relative L2 <= 1e-5 in float32); eligibility; and the place among the tuner's
candidates. Sampled Winograd variants on awkward shapes: test_opencl_variants.py
("winograd" family) and test_opencl_memory_safety.py's sample of every family; memory safety under Oclgrind: test_opencl_memory_safety.py.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import api, reference  # noqa: E402
from sparkle.opencl import backend, codegen, launch, transfer, winograd  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402
from sparkle.opencl.tuning import space  # noqa: E402

from _helpers import TOLERANCE, make_array, rel_l2  # noqa: E402
from _opencl import opencl_params, runtime_device, sparkle_cache  # noqa: E402,F401
from test_oracles import check_onnx_case, onnx_case_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("sparkle_cache")

WINOGRAD = space.complete({"ALGO": codegen.WINOGRAD, "WBK": 16, "WBT": 16, "WBC": 4, "WRK": 2, "WRT": 2})
WINOGRAD_4 = space.complete({**WINOGRAD, "WINO_M": 4, "WRK": 1})  # 36 x 1 x 2 accumulators
# Around a batched GEMM: transforms in their own kernels, the GEMM with 4x4 register blocks (float4 local reads).
WINOGRAD_GEMM = space.complete({"ALGO": codegen.WINOGRAD_GEMM, "WINO_M": 2, "TM": 32, "TN": 32, "TK": 8, "WM": 4,
                                "WN": 4, "VW": 4})
WINOGRAD_GEMM_4 = space.complete({**WINOGRAD_GEMM, "WINO_M": 4, "VEC_B": 4, "VW": 1})
TILES = [pytest.param(WINOGRAD, id="F(2x2,3x3)"), pytest.param(WINOGRAD_4, id="F(4x4,3x3)"),
         pytest.param(WINOGRAD_GEMM, id="F(2x2,3x3)+GEMM"), pytest.param(WINOGRAD_GEMM_4, id="F(4x4,3x3)+GEMM")]


@pytest.mark.parametrize("m", winograd.TILE_SIZES)
def test_the_transform_matrices_compute_the_direct_sum(m):
    bt, g, at = (np.array(matrix, dtype=float) for matrix in winograd.MATRICES[m])
    rng = np.random.default_rng(m)
    for _ in range(5):
        patch, taps = rng.standard_normal((m + 2, m + 2)), rng.standard_normal((3, 3))
        tile = at @ ((g @ taps @ g.T) * (bt @ patch @ bt.T)) @ at.T
        direct = [[np.sum(patch[i:i + 3, j:j + 3] * taps) for j in range(m)] for i in range(m)]
        np.testing.assert_allclose(tile, direct, rtol=0, atol=1e-12)


def test_generated_transforms_leave_out_zeros_and_multiply_only_by_other_constants():
    assert winograd.combination((1, 0, -1, 0), lambda t: f"d{t}") == "d0 - d2"
    assert winograd.combination((0, -4, 0, 1), lambda t: f"d{t}") == "-(real)4 * d1 + d3"
    assert winograd.combination((0, 0), lambda t: "x") == "(real)0"
    text = winograd.defines(4)
    assert "* d[" in text and "(real)0 *" not in text and "(real)1 *" not in text
    with pytest.raises(ValueError, match="tile size must be one of"):
        winograd.defines(3)
BOUND = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}  # the bound of every path (the tuner's)


@pytest.fixture
def winograd_launches(monkeypatch):
    """Every call whose workload Winograd computes runs the Winograd variant; returns the workloads it ran."""
    real = backend.choose_params
    ran = []

    def choose(device, workload):
        if not space.violations(WINOGRAD, workload, space.DeviceLimits.of(device)):
            ran.append(workload)
            return dict(WINOGRAD), "tuned"
        return real(device, workload)

    monkeypatch.setattr(backend, "choose_params", choose)
    return ran


@pytest.mark.parametrize("device_id", opencl_params())
def test_onnx_oracles_through_winograd(device_id, winograd_launches):
    eligible = 0
    for suite, name in onnx_case_ids():
        before = len(winograd_launches)
        out, operands, kwargs = check_onnx_case(suite, name, device_id)  # expected output, float32 tolerance
        if len(winograd_launches) > before:
            eligible += 1
            x, w, bias = operands
            assert rel_l2(out, reference.conv2d(x, w, bias, **kwargs)) <= BOUND[np.dtype(np.float32)], name
    assert eligible >= 3  # basic conv with and without padding, autopad same, PyTorch's Conv2d cases


CASES = {  # (x shape, w shape, padding): reductions up to 512 x 9, odd sizes, one and both pads
    "res4-like C=256": ((1, 256, 9, 7), (24, 256, 3, 3), 1),
    "res5-like C=512": ((1, 512, 5, 6), (12, 512, 3, 3), 1),
    "unpadded odd": ((2, 33, 11, 8), (17, 33, 3, 3), 0),
    "asymmetric pad": ((1, 19, 6, 9), (7, 19, 3, 3), (2, 0, 1, 2)),
}


# Every tile form on every case in float32, and in float64 the fused forms everywhere; the GEMM forms (the same
# transforms, the GEMM's float64 path tested in test_opencl_variants.py) in float64 on one case.
ERROR_RUNS = [pytest.param(case, dtype, tile.values[0], id=f"{case}-{np.dtype(dtype).name}-{tile.id}")
              for tile in TILES for case in CASES for dtype in (np.float32, np.float64)
              if dtype == np.float32 or tile.values[0]["ALGO"] == codegen.WINOGRAD or case == "unpadded odd"]


@pytest.mark.parametrize("case, dtype, params", ERROR_RUNS)
@pytest.mark.parametrize("device_id", opencl_params())
def test_winograd_error_is_within_the_bound_of_every_path(device_id, case, dtype, params):
    device = runtime_device(device_id)
    if dtype == np.float64 and not device.has_fp64:
        pytest.skip(f"{device_id} has no float64")
    x_shape, w_shape, padding = CASES[case]
    rng = np.random.default_rng(len(case))
    x, w = make_array(rng, x_shape, np.dtype(dtype)), make_array(rng, w_shape, np.dtype(dtype))
    bias = make_array(rng, w_shape[:1], np.dtype(dtype))
    spec = api.conv2d_spec(x, w, bias, padding=padding, activation="relu")
    workload = Workload.from_spec(spec)
    assert space.violations(params, workload, space.DeviceLimits.of(device)) == []
    buffers = [transfer.upload(device, a, np.dtype(dtype)) for a in (x, w, bias)]
    out = transfer.empty(device, spec.output_shape, np.dtype(dtype))
    launch.enqueue(device, workload, params, *(b.buffer for b in buffers), out.buffer, has_bias=True,
                   relu=True).wait()
    expected = reference.conv2d(x, w, bias, padding=padding, activation="relu")
    error = rel_l2(out.get(), expected)
    assert error <= BOUND[np.dtype(dtype)], f"{case}: relative L2 {error:.2e}"
    assert error <= TOLERANCE[np.dtype(dtype)]


@pytest.mark.parametrize("device_id", opencl_params())
def test_a_prepared_winograd_call_matches_on_both_paths(device_id, winograd_launches):
    rng = np.random.default_rng(8)
    x, w = make_array(rng, (2, 21, 9, 10), np.dtype(np.float32)), make_array(rng, (13, 21, 3, 3), np.dtype(np.float32))
    expected = reference.conv2d(x, w, None, padding=1)
    prepared = backend.prepare_conv2d(api.conv2d_spec(x, w, None, padding=1), runtime_device(device_id),
                                      on_fault="raise")
    assert prepared.variant.startswith("winograd WINO_M=2 WBK=16")
    host = prepared(x, w)
    assert rel_l2(host, expected) <= BOUND[np.dtype(np.float32)]
    resident = prepared(sparkle.to_device(x, device_id), sparkle.to_device(w, device_id)).get()
    np.testing.assert_array_equal(resident, host)


def workload_of(x_shape, w_shape, dtype=np.float32, **kwargs):
    x, w = np.zeros(x_shape, dtype), np.zeros(w_shape, dtype)
    return Workload.from_spec(api.conv2d_spec(x, w, None, **kwargs))


def test_winograd_applies_only_to_3x3_stride1_undilated_single_group_convs():
    limits = space.DeviceLimits(1024, 48 * 1024, True, 132)
    assert space.violations(WINOGRAD, workload_of((1, 8, 9, 9), (8, 8, 3, 3), padding=1), limits) == []
    for kwargs, w_shape in (({"stride": 2}, (8, 8, 3, 3)), ({"dilation": 2}, (8, 8, 3, 3)),
                            ({"groups": 2}, (8, 4, 3, 3)), ({}, (8, 8, 5, 5)), ({}, (8, 8, 1, 1))):
        reasons = space.violations(WINOGRAD, workload_of((1, 8, 9, 9), w_shape, **kwargs), limits)
        assert reasons == ["Winograd (F(2x2) or F(4x4), 3x3) needs a 3x3, stride-1, undilated conv2d of one group"], kwargs
    gemm = Workload.from_spec(api.matmul_spec(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)))
    assert space.violations(WINOGRAD, gemm, limits)
    assert space.candidates(gemm, limits, "winograd") == []
    layer = workload_of((32, 256, 14, 14), (256, 256, 3, 3), padding=1)
    found = space.candidates(layer, limits, "winograd")
    assert found and all(p["ALGO"] == codegen.WINOGRAD for p in found)
    assert any("keeps the implicit GEMM's tunables" in r for r in space.violations({**WINOGRAD, "TM": 64}, layer,
                                                                                    limits))
    assert any("accumulators" in r for r in space.violations({**WINOGRAD, "WRK": 4, "WRT": 4}, layer, limits))
    assert any("accumulators" in r for r in space.violations({**WINOGRAD_4, "WRK": 2, "WRT": 2}, layer, limits))
    assert space.violations(WINOGRAD_4, layer, limits) == []
    wide = workload_of((1, 1024, 7, 7), (64, 1024, 3, 3), padding=1)  # F(4x4)'s error grows with the reduction
    assert any("at most 512 input channels" in r for r in space.violations(WINOGRAD_4, wide, limits))
    assert space.violations(WINOGRAD, wide, limits) == []
    assert {p["WINO_M"] for p in found} == {2, 4}
    small_local = space.DeviceLimits(1024, 8 * 1024, True, 132)
    assert any("local memory" in r for r in space.violations({**WINOGRAD, "WBK": 64, "WBT": 64}, layer,
                                                              small_local))


def test_winograd_around_a_gemm_is_checked_through_its_gemm():
    limits = space.DeviceLimits(1024, 48 * 1024, True, 132)
    layer = workload_of((32, 128, 28, 28), (128, 128, 3, 3), padding=1)
    assert space.violations(WINOGRAD_GEMM_4, layer, limits) == []
    gemm = codegen.winograd_gemm_workload(layer, WINOGRAD_GEMM_4)  # 36 points, 32 x 7 x 7 tiles
    assert (gemm.groups, gemm.in_channels, gemm.out_channels, gemm.width) == (36, 36 * 128, 36 * 128, 1568)
    assert codegen.work_groups(layer, WINOGRAD_GEMM_4) == 36 * 4 * 49
    odd = workload_of((1, 19, 6, 9), (7, 19, 3, 3))  # 2 x 4 tiles of F(2x2): columns padded to 8
    assert codegen.winograd_gemm_workload(odd, WINOGRAD_GEMM).width == 8
    assert any("its batched GEMM: VEC_A=4" in r for r in space.violations({**WINOGRAD_GEMM, "VEC_A": 4}, odd, limits))
    assert any("fused Winograd's tunables" in r for r in space.violations({**WINOGRAD_GEMM, "WRK": 4}, layer, limits))
    assert any("KSPLIT=1" in r for r in space.violations({**WINOGRAD_GEMM, "KSPLIT": 2}, layer, limits))
    assert space.violations(WINOGRAD_GEMM, workload_of((1, 8, 9, 9), (8, 8, 3, 3), stride=2), limits) == \
        [space.NOT_WINOGRAD]
    wide = workload_of((1, 1024, 4, 4), (8, 1024, 3, 3), padding=1)
    assert any("at most 512 input channels" in r for r in space.violations(WINOGRAD_GEMM_4, wide, limits))
    found = space.candidates(layer, limits, "winograd_gemm")
    assert {p["WINO_M"] for p in found} == {2, 4} and all(p["ALGO"] == codegen.WINOGRAD_GEMM for p in found)
    assert max(p["WM"] * p["WN"] for p in found) == 64  # the register blocks the fused kernel cannot hold


@pytest.mark.parametrize("shared_from", [None, 1], ids=["held workspaces", "workspaces taken per call"])
@pytest.mark.parametrize("device_id", opencl_params())
def test_a_prepared_winograd_gemm_call_matches_on_both_paths(device_id, shared_from, monkeypatch):
    from sparkle.opencl import prepared as prepared_module

    if shared_from is not None:  # every workspace from the pool per call, as large ones are
        monkeypatch.setattr(prepared_module, "SHARED_WORKSPACE_BYTES", shared_from)
    monkeypatch.setattr(backend, "choose_params", lambda device, workload: (dict(WINOGRAD_GEMM_4), "tuned"))
    rng = np.random.default_rng(9)
    x, w = make_array(rng, (2, 12, 9, 10), np.dtype(np.float32)), make_array(rng, (5, 12, 3, 3), np.dtype(np.float32))
    bias = make_array(rng, (5,), np.dtype(np.float32))
    expected = reference.conv2d(x, w, bias, padding=1, activation="relu")
    prepared = backend.prepare_conv2d(api.conv2d_spec(x, w, bias, padding=1, activation="relu"),
                                      runtime_device(device_id), on_fault="raise")
    assert prepared.variant.startswith("winograd-gemm WINO_M=4 TM=32")
    host = prepared(x, w, bias)
    assert rel_l2(host, expected) <= BOUND[np.dtype(np.float32)]
    resident = prepared(*(sparkle.to_device(a, device_id) for a in (x, w, bias))).get()
    np.testing.assert_array_equal(resident, host)
    (variant,) = [prepared._variant]
    assert len(variant.shared_workspaces) == (3 if shared_from else 0)  # U, V and M
    other = backend.prepare_conv2d(api.conv2d_spec(x[:1], w, bias, padding=1, activation="relu"),
                                   runtime_device(device_id), on_fault="raise")
    for _ in range(2):  # two calls of different shapes in turn on the pool's workspaces
        np.testing.assert_array_equal(other(x[:1], w, bias), host[:1])
        np.testing.assert_array_equal(prepared(x, w, bias), host)


def test_the_tuner_offers_winograd_to_gpus_beside_the_implicit_gemm():
    from sparkle.opencl import tuner

    layer = workload_of((1, 64, 14, 14), (64, 64, 3, 3), padding=1)
    gpu = type("Device", (), {"kind": "gpu", "identity": "x|x|x|Fake GPU|x|x", "vendor": "x", "architecture": "x",
                              "compute_units": 132, "local_memory": 48 * 1024, "max_work_group_size": 1024,
                              "memory": 1 << 34})()
    import random

    order = tuner._order(layer, gpu, space.DeviceLimits(1024, 48 * 1024, True, 132), random.Random(0))
    algorithms = [p["ALGO"] for p in order]
    assert {codegen.WINOGRAD, codegen.WINOGRAD_GEMM, codegen.IMPLICIT_GEMM} <= set(algorithms[:12])


@pytest.mark.parametrize("params", TILES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("device_id", opencl_params())
def test_a_non_finite_input_stays_within_the_tiles_around_it(device_id, bad, params):
    """Documented behaviour (README): the transforms spread an inf or NaN over the outputs of the tiles whose
    patches hold it; every output the direct sum makes non-finite is non-finite here too, and the others agree."""
    device = runtime_device(device_id)
    rng = np.random.default_rng(1)
    x, w = make_array(rng, (1, 2, 12, 12), np.dtype(np.float32)), make_array(rng, (3, 2, 3, 3), np.dtype(np.float32))
    x[0, 1, 5, 6] = bad
    spec = api.conv2d_spec(x, w, None, padding=1)
    buffers = [transfer.upload(device, a, np.dtype(np.float32)) for a in (x, w, np.zeros(1, np.float32))]
    out = transfer.empty(device, spec.output_shape, np.dtype(np.float32))
    launch.enqueue(device, Workload.from_spec(spec), params, *(b.buffer for b in buffers), out.buffer,
                   has_bias=False, relu=False).wait()
    got, expected = out.get(), reference.conv2d(x, w, padding=1)
    direct_bad, winograd_bad = ~np.isfinite(expected), ~np.isfinite(got)
    assert (winograd_bad | ~direct_bad).all()  # a superset of the direct sum's non-finite outputs...
    reach = params["WINO_M"] + 2  # a patch's size: no output farther than that from the pixel can see it
    rows, cols = np.nonzero(winograd_bad.any(axis=(0, 1)))
    assert rows.size and all(abs(r - 5) < reach for r in rows) and all(abs(c - 6) < reach for c in cols)
    finite = ~winograd_bad
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4)
