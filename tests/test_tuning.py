"""The search space as data (defaults, constraints, candidates), the code generator's interface, and the
tuning database (record/lookup, nearest-shape borrowing, failed variants, the shipped seed)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from sparkle import api
from sparkle.cache import JsonDocument
from sparkle.opencl import codegen
from sparkle.opencl.codegen import DEFAULTS, TUNABLES, Workload
from sparkle.opencl.tuning import database, space
from sparkle.opencl.tuning.space import DeviceLimits

from _opencl import opencl_params, runtime_device

BIG = DeviceLimits(max_work_group_size=1024, local_memory=48 * 1024, has_fp64=True)
SMALL = DeviceLimits(max_work_group_size=128, local_memory=16 * 1024, has_fp64=False)


def conv(n=1, c=8, h=10, w=9, k=12, r=3, s=3, dtype=np.float32, **kwargs):
    x = np.zeros((n, c, h, w), dtype)
    weights = np.zeros((k, c // kwargs.get("groups", 1), r, s), dtype)
    return Workload.from_spec(api.conv2d_spec(x, weights, None, **kwargs))


def matmul(m, k, n, dtype=np.float32):
    return Workload.from_spec(api.matmul_spec(np.zeros((m, k), dtype), np.zeros((k, n), dtype)))


WORKLOADS = {
    "3x3 pad": conv(padding=1),
    "3x3 stride2 groups": conv(c=8, k=8, stride=2, groups=2, padding=(1, 0, 2, 1)),
    "1x1 pq%4": conv(h=4, w=6, r=1, s=1),
    "1x1 pq odd": conv(h=3, w=5, r=1, s=1),
    "matmul": matmul(33, 20, 65),
    "matmul k odd": matmul(16, 27, 40),
    "fp64 conv": conv(dtype=np.float64, padding=1),
    "tiny": conv(n=1, c=1, h=1, w=1, k=1, r=1, s=1),
    "large": conv(n=8, c=64, h=28, w=28, k=128, padding=1),
}


# ---- the template and the generator ----

def test_template_defaults_match_codegen_defaults():
    source = codegen.template()
    found = re.findall(r"#ifndef\s+(\w+)\b[^\n]*\n\s*#define\s+\1\s+(-?\d+)\s*\n\s*#endif", source)
    defaults = {name: int(value) for name, value in found}
    assert defaults == DEFAULTS
    assert set(TUNABLES) == set(DEFAULTS)
    # TUNABLES lists them in the order the template declares them
    assert [name for name, _ in found] == [name for name in TUNABLES]


def test_render_defines_the_shape_and_the_given_tunables_only():
    workload = WORKLOADS["3x3 stride2 groups"]
    source = codegen.render(workload, {"TM": 16, "VN": 4}, has_bias=True, relu=True)
    head = source[: len(source) - len(codegen.template())]
    defines = dict(re.findall(r"#define (\w+) (\S+)", head))
    assert defines["TM"] == "16" and defines["VN"] == "4"
    assert not set(TUNABLES) - {"TM", "VN"} & set(defines)  # the others keep the template's defaults
    assert (defines["C_IN"], defines["K_OUT"], defines["GROUPS"], defines["STRIDE_H"]) == ("8", "8", "2", "2")
    assert (defines["PAD_T"], defines["PAD_L"], defines["HAS_BIAS"], defines["RELU"]) == ("1", "2", "1", "1")
    assert "SPARKLE_FP64" not in defines and "SPARKLE_FP64" in codegen.render(WORKLOADS["fp64 conv"], {})


@pytest.mark.parametrize("params", [{"TX": 4}, {"TM": 32, "tm": 8}, {"VEC_C": 4}])
def test_render_rejects_unknown_tunables(params):
    with pytest.raises(ValueError, match="params has unknown tunables") as info:
        codegen.render(WORKLOADS["3x3 pad"], params)
    bad = sorted(set(params) - set(TUNABLES))
    assert str(bad) in str(info.value)


def test_launch_geometry_covers_the_problem():
    for workload in WORKLOADS.values():
        for params in ({}, {"TM": 8, "TN": 32, "WM": 2, "WN": 8}):
            p = space.complete(params)
            (gx, gy, gz), (lx, ly, lz) = codegen.launch_geometry(workload, params)
            assert (lx, ly, lz) == (p["TN"] // p["WN"], p["TM"] // p["WM"], 1)
            assert gx % lx == 0 and gy % ly == 0 and gz == workload.groups
            assert gx // lx * p["TN"] >= workload.gemm_n > (gx // lx - 1) * p["TN"]
            assert gy // ly * p["TM"] >= workload.gemm_m > (gy // ly - 1) * p["TM"]


# ---- constraints ----

def fixed(workload, params, limits=BIG):
    """Assert ``params`` is valid (guards each rejection test against rejecting for another reason)."""
    assert space.violations(params, workload, limits) == [], params
    return params


def rejected_for(params, workload, limits, words):
    reasons = space.violations(params, workload, limits)
    assert any(words in reason for reason in reasons), (params, reasons)


GPU = {"USE_LOCAL": 1, "TM": 32, "TN": 32, "TK": 8, "WM": 4, "WN": 4, "VW": 1, "VEC_A": 1, "VEC_B": 1, "VN": 1}
CPU = {"USE_LOCAL": 0, "TM": 8, "TN": 32, "TK": 8, "WM": 4, "WN": 8, "VW": 1, "VEC_A": 1, "VEC_B": 1, "VN": 8}


def test_work_group_size_limit():
    workload = WORKLOADS["3x3 pad"]
    at_limit = fixed(workload, {**CPU, "TM": 32, "TN": 128, "WM": 4, "WN": 8, "VN": 1})  # 8 x 16 = 128
    assert space.threads(at_limit) == 128
    assert space.violations(at_limit, workload, SMALL) == []
    over = {**at_limit, "TM": 64}  # 256 work-items
    fixed(workload, over)
    rejected_for(over, workload, SMALL, "256 work-items exceed the device's 128")


def test_local_memory_limit():
    workload = WORKLOADS["3x3 pad"]
    params = fixed(workload, {**GPU, "TM": 64, "TN": 128, "TK": 16, "WM": 8, "WN": 8, "VW": 4})
    needed = space.local_memory_bytes(params, 4)
    # a_tile[TK][TM + pad] and b_tile[TK][TN + pad], and what the driver keeps
    assert needed == 16 * ((64 + 4) + (128 + 4)) * 4 + space.LOCAL_MEMORY_RESERVE
    assert space.violations(params, workload, DeviceLimits(1024, needed)) == []
    rejected_for(params, workload, DeviceLimits(1024, needed - 1), f"{needed} bytes of local memory exceed")
    # float64 tiles need twice the bytes
    fp64 = WORKLOADS["fp64 conv"]
    rejected_for(params, fp64, DeviceLimits(1024, needed),
                 f"{2 * needed - space.LOCAL_MEMORY_RESERVE} bytes of local memory")
    assert space.local_memory_bytes(CPU, 8) == 0  # the CPU shape uses none


@pytest.mark.parametrize("device_id", opencl_params())
def test_local_memory_model_matches_the_compiled_kernel(device_id, tmp_path, monkeypatch):
    """The constraint never counts less local memory than the driver reports for the built kernel (NVIDIA
    reports the tiles plus 16 bytes, PoCL 3 the tiles alone, newer PoCL 0), and not much more."""
    import pyopencl as cl

    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path))
    device = runtime_device(device_id)
    workload = WORKLOADS["1x1 pq%4"]
    def reported(params):
        kernel = device.kernel(codegen.render(workload, params), "conv2d")
        return kernel.get_work_group_info(cl.kernel_work_group_info.LOCAL_MEM_SIZE, device.cl_device)

    for params in (GPU, {**GPU, "VW": 4, "VEC_A": 4, "VEC_B": 4, "TN": 64}, {**GPU, "TK": 16, "TN": 64}):
        used, modelled = reported(params), space.local_memory_bytes(params, 4)
        assert used <= modelled, (params, used, modelled)
        assert used == 0 or modelled <= used + 64, (params, used, modelled)  # and not far off
    # no tiles: nothing beyond the driver's own bookkeeping (NVIDIA reports 1 byte)
    assert space.local_memory_bytes(CPU, 4) == 0 and reported(CPU) <= space.LOCAL_MEMORY_RESERVE


def test_vec_a_preconditions():
    good = {**GPU, "VEC_A": 4}
    workload = WORKLOADS["3x3 pad"]  # K = 8 * 9 = 72
    fixed(workload, good)
    words = "VEC_A=4 needs"
    rejected_for(good, WORKLOADS["matmul k odd"], BIG, words)  # reduction 27 is not a multiple of 4
    rejected_for({**good, "TK": 6}, workload, BIG, words)
    rejected_for({**good, "USE_LOCAL": 0}, workload, BIG, words)
    assert fixed(WORKLOADS["matmul k odd"], GPU) == GPU


def test_vec_b_preconditions():
    good = {**GPU, "VEC_B": 4}
    pointwise = WORKLOADS["1x1 pq%4"]
    fixed(pointwise, good)
    words = "VEC_B=4 needs"
    rejected_for(good, WORKLOADS["3x3 pad"], BIG, words)  # not 1x1
    rejected_for(good, WORKLOADS["1x1 pq odd"], BIG, words)  # P*Q = 15
    rejected_for(good, conv(h=4, w=6, r=1, s=1, stride=2), BIG, words)  # strided
    rejected_for(good, conv(h=4, w=6, r=1, s=1, padding=1), BIG, words)  # padded
    rejected_for({**good, "TN": 30, "WN": 6}, pointwise, BIG, words)  # TN not a multiple of 4
    rejected_for({**good, "USE_LOCAL": 0}, pointwise, BIG, words)


def test_vn_preconditions():
    workload = WORKLOADS["3x3 pad"]
    fixed(workload, CPU)
    words = "needs the CPU shape"
    rejected_for({**CPU, "USE_LOCAL": 1}, workload, BIG, words)
    rejected_for({**CPU, "WN": 4}, workload, BIG, words)  # WN not a multiple of VN=8
    rejected_for({**CPU, "VW": 4, "WN": 8, "WM": 4}, workload, BIG, words)
    rejected_for({**CPU, "VN": 3}, workload, BIG, "VN must be 1, 2, 4, 8 or 16")


def test_fp64_needs_device_support():
    fp64 = WORKLOADS["fp64 conv"]
    fixed(fp64, CPU)
    no_fp64 = DeviceLimits(1024, 48 * 1024, has_fp64=False)
    rejected_for(CPU, fp64, no_fp64, "no float64 support")
    assert space.violations(CPU, WORKLOADS["3x3 pad"], no_fp64) == []
    assert space.candidates(fp64, no_fp64, "cpu") == []
    assert space.default_params(fp64, no_fp64, "cpu") is None


@pytest.mark.parametrize("params, words", [
    ({"TM": 0}, "positive int"),
    ({"WN": 2.0}, "positive int"),
    ({"TK": -8}, "positive int"),
    ({"USE_LOCAL": 2}, "USE_LOCAL must be 0 or 1"),
    ({"VW": 2}, "VW, VEC_A and VEC_B must be 1 or 4"),
    ({"VEC_A": 8}, "VW, VEC_A and VEC_B must be 1 or 4"),
    ({"TM": 32, "WM": 3}, "must divide the tile"),
    ({"TN": 32, "WN": 8, "VW": 4, "WM": 2}, "VW=4 must divide"),
    ({"USE_LOCAL": 0, "TM": 16, "TN": 32, "WM": 16, "WN": 16}, "over 128 accumulators"),
    # local tiles: 3 x 4 = 12 work-items cannot share out 32 B-tile columns evenly
    ({"TM": 12, "WM": 4, "TN": 32, "WN": 8}, "must divide one another"),
])
def test_other_constraints(params, words):
    rejected_for({**GPU, **params}, WORKLOADS["3x3 pad"], BIG, words)


def test_other_constraints_accept_their_neighbours():
    workload = WORKLOADS["3x3 pad"]
    for params in ({"TM": 32, "WM": 4}, {"TN": 32, "WN": 8, "VW": 4, "WM": 4},
                   {"USE_LOCAL": 0, "TM": 16, "TN": 32, "WM": 8, "WN": 16}, {"TM": 16, "WM": 4, "TN": 32, "WN": 8}):
        fixed(workload, {**GPU, **params})


@pytest.mark.parametrize("kind", ["gpu", "cpu", "winograd", "winograd_gemm"])
@pytest.mark.parametrize("limits", [BIG, SMALL], ids=["big", "small"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_candidates_are_valid_and_complete(kind, limits, name):
    workload = WORKLOADS[name]
    found = space.candidates(workload, limits, kind)
    if (workload.dtype == "float64" and not limits.has_fp64) or (kind.startswith("winograd")
                                                                 and not space.winograd_applies(workload)):
        assert found == []
        return
    assert found, "no candidate at all"
    keys = [tuple(sorted(p.items())) for p in found]
    assert len(set(keys)) == len(keys), "duplicate candidates"
    family = space.SPACES[kind]
    for params in found:
        assert set(params) == set(TUNABLES)
        assert all(params[name] in values for name, values in family.items())
        assert space.violations(params, workload, limits) == []
    # Every valid combination of the family whose tiles fit the problem is offered.
    names = list(family)
    for values in itertools.product(*(family[n] for n in names)):
        params = space.complete(dict(zip(names, values)))
        if kind == "winograd":
            tiles = workload.batch * -(-workload.out_h // 2) * -(-workload.out_w // 2)
            fits = params["WBK"] <= max(16, workload.out_channels) and params["WBT"] <= max(16, tiles)
        elif kind == "winograd_gemm":
            columns = codegen.winograd_gemm_workload(workload, params).width
            fits = params["TM"] <= max(32, workload.out_channels) and params["TN"] <= max(32, columns)
        else:
            fits = params["TM"] <= max(min(family["TM"]), workload.gemm_m) and \
                params["TN"] <= max(min(family["TN"]), workload.gemm_n)
            # split-K only up to the slice count that fills the device
            fits = fits and params["KSPLIT"] <= space.split_for_occupancy(params, workload, limits)
        if fits and not space.violations(params, workload, limits):
            assert tuple(sorted(params.items())) in set(keys), params


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_device_defaults_fit_any_float32_workload_on_a_modest_device(name):
    workload = WORKLOADS[name]
    for kind in ("gpu", "cpu"):
        params = space.default_params(workload, SMALL if workload.dtype == "float32" else BIG, kind)
        assert params is not None
        if workload.dtype == "float32":
            split = space.split_for_occupancy(params, workload, SMALL) if kind == "gpu" else 1
            assert space.identity(params) == space.identity({**space.DEVICE_DEFAULTS[kind], "KSPLIT": split})
        assert space.violations(params, workload, BIG) == []
    if workload.dtype == "float64":  # twice the local memory: the GPU defaults do not fit 16 KiB
        assert space.default_params(workload, DeviceLimits(128, 16 * 1024), "gpu") == DEFAULTS


# ---- the database ----

IDENTITY = "Test Platform|OpenCL 3.0 test|Test Vendor|Test Device|OpenCL 3.0|1.0"


@pytest.fixture
def document(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(database, "_seed", lambda: {})
    return JsonDocument("opencl-tuning-test", version=1, directory=tmp_path)


def best(params, seconds=1e-3):
    return {"params": params, "seconds": seconds, "gflops": 1.0 / seconds}


def test_record_lookup_round_trip(document):
    workload = WORKLOADS["3x3 pad"]
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (None, None)
    bad = {**GPU, "TK": 16}
    database.record(IDENTITY, workload, best(CPU), [{"params": bad, "reason": "wrong result"}], 5,
                    document=document)
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (CPU, "tuned")
    entry = database.entries(IDENTITY, document)[workload.key]
    assert entry["workload"] == workload.as_dict() and Workload(**entry["workload"]) == workload
    assert entry["best"] == best(CPU) and entry["tried"] == 5 and entry["updated"]
    # A later run adds its rejections (without duplicates) and counts; no new best keeps the old one.
    database.record(IDENTITY, workload, None, [{"params": bad, "reason": "again"},
                                               {"params": GPU, "reason": "failed to build"}], 3, document=document)
    entry = database.entries(IDENTITY, document)[workload.key]
    assert entry["best"] == best(CPU) and entry["tried"] == 8
    assert [r["params"] for r in entry["rejected"]] == [bad, GPU]
    # Other devices see nothing of it.
    assert database.lookup(IDENTITY.replace("Test Device", "Other Device"), workload, BIG,
                           document=document) == (None, None)


def test_record_keeps_the_faster_winner(document):
    workload = WORKLOADS["3x3 pad"]
    database.record(IDENTITY, workload, best(CPU, 2e-3), [], 1, document=document)
    database.record(IDENTITY, workload, best(GPU, 3e-3), [], 1, document=document)  # slower: not kept
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (CPU, "tuned")
    database.record(IDENTITY, workload, best(GPU, 1e-3), [], 1, document=document)  # faster: replaces
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (GPU, "tuned")
    assert database.entries(IDENTITY, document)[workload.key]["best"] == best(GPU, 1e-3)


def test_default_document_lives_in_the_cache_dir_under_the_template_version(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path))
    assert database.DOCUMENT.path == tmp_path / f"opencl-tuning-v{codegen.TEMPLATE_VERSION}.json"


def test_tuned_params_that_do_not_fit_the_device_are_not_used(document):
    workload = WORKLOADS["3x3 pad"]
    big_group = {**CPU, "TM": 32, "TN": 128, "WM": 1, "WN": 8, "VN": 8}  # 32 x 16 = 512 work-items
    database.record(IDENTITY, workload, best(big_group), [], 1, document=document)
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (big_group, "tuned")
    assert database.lookup(IDENTITY, workload, SMALL, document=document) == (None, None)


def test_nearest_shape_is_borrowed_when_valid(document):
    target = conv(c=16, h=14, w=14, k=32, padding=1)
    close = conv(c=16, h=16, w=16, k=32, padding=1)  # same kernel kind, N a bit larger
    farther = conv(c=32, h=16, w=16, k=64, padding=1)
    assert 0 < database.distance(target, close) < database.distance(target, farther) \
        <= database.MAX_BORROW_DISTANCE
    vec_b = {**GPU, "VEC_B": 4}  # only for 1x1 convs
    database.record(IDENTITY, farther, best(CPU), [], 1, document=document)
    database.record(IDENTITY, close, best(GPU), [], 1, document=document)
    assert database.lookup(IDENTITY, target, BIG, document=document) == (GPU, f"nearest {close.key}")
    # the closest one's parameters cannot run the new workload: the next closest valid one is used
    database.record(IDENTITY, close, best(vec_b), [], 1, document=document)
    assert space.violations(vec_b, target, BIG)
    assert database.lookup(IDENTITY, target, BIG, document=document) == (CPU, f"nearest {farther.key}")


def test_nearest_shape_skips_other_dtypes_and_far_shapes(document):
    target = conv(c=16, h=14, w=14, k=32, padding=1)
    other_dtype = conv(c=16, h=14, w=14, k=32, padding=1, dtype=np.float64)
    far = conv(n=16, c=256, h=56, w=56, k=512, padding=1)
    assert database.distance(target, far) > database.MAX_BORROW_DISTANCE
    database.record(IDENTITY, other_dtype, best(GPU), [], 1, document=document)
    database.record(IDENTITY, far, best(CPU), [], 1, document=document)
    assert database.lookup(IDENTITY, target, BIG, document=document) == (None, None)


def test_distance_prefers_the_same_op_and_kernel_kind():
    a = matmul(64, 64, 64)
    pointwise = conv(n=1, c=64, h=8, w=8, k=64, r=1, s=1)
    three = conv(n=1, c=64, h=8, w=8, k=64, padding=1)
    assert database.distance(a, a) == 0
    assert database.distance(a, pointwise) == 0.5 + database.distance(
        a, Workload(**{**pointwise.as_dict(), "op": "matmul"}))
    assert database.distance(pointwise, three) > database.distance(pointwise, pointwise)


def test_excluded_params_are_skipped(document):
    workload = WORKLOADS["3x3 pad"]
    neighbour = conv(padding=1, h=12)
    database.record(IDENTITY, workload, best(CPU), [], 1, document=document)
    database.record(IDENTITY, neighbour, best(GPU), [], 1, document=document)
    assert database.lookup(IDENTITY, workload, BIG, excluded=[dict(CPU)], document=document) == \
        (GPU, f"nearest {neighbour.key}")
    assert database.lookup(IDENTITY, workload, BIG, excluded=[GPU, CPU], document=document) == (None, None)


def test_entries_of_an_older_workload_layout_are_ignored(document):
    workload = WORKLOADS["3x3 pad"]
    neighbour = conv(padding=1, h=12)
    database.record(IDENTITY, neighbour, best(GPU), [], 1, document=document)

    def age(data):  # as if written by a version whose Workload had other fields
        entry = data["devices"][IDENTITY]["workloads"][neighbour.key]
        entry["workload"] = {**entry["workload"], "layout": "NCHW"}

    document.update(age)
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (None, None)


def test_shipped_seed_is_used_after_the_users_own_results(document, monkeypatch):
    workload = WORKLOADS["3x3 pad"]
    other_driver = IDENTITY.rsplit("|", 1)[0] + "|2.0"
    seed = {"devices": {other_driver: {"workloads": {workload.key: {"workload": workload.as_dict(),
                                                                    "best": best(GPU)}}}}}
    monkeypatch.setattr(database, "_seed", lambda: seed)
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (GPU, "tuned")  # same device
    other_device = IDENTITY.replace("Test Device", "Other Device")
    assert database.lookup(other_device, workload, BIG, document=document) == (None, None)
    database.record(IDENTITY, workload, best(CPU), [], 1, document=document)
    assert database.lookup(IDENTITY, workload, BIG, document=document) == (CPU, "tuned")


def test_shipped_seed_file_is_a_valid_database():
    seed = database._seed()
    assert isinstance(seed, dict)
    for identity, device in seed.get("devices", {}).items():
        assert len(identity.split("|")) == 6
        for key, entry in device["workloads"].items():
            workload = Workload(**entry["workload"])
            assert workload.key == key
            if "best" in entry:
                assert set(entry["best"]["params"]) <= set(TUNABLES)
                assert space.violations(entry["best"]["params"], workload, DeviceLimits(1 << 16, 1 << 30)) == []


# ---- the tuner ----

def small_conv(rng=None):
    rng = rng or np.random.default_rng(7)
    x = rng.standard_normal((1, 4, 6, 7)).astype(np.float32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)
    kwargs = dict(padding=1, activation="relu")
    return x, w, b, kwargs, Workload.from_spec(api.conv2d_spec(x, w, b, **kwargs))


def params_key(params):
    return tuple(sorted(space.complete(params).items()))


@pytest.fixture
def tuner_env(tmp_path, monkeypatch):
    """A private tuning database, no shipped seed, no failed variants from other tests."""
    pytest.importorskip("pyopencl")
    from sparkle.opencl import backend

    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(database, "_seed", lambda: {})
    monkeypatch.setattr(backend, "_failed", {})


@pytest.mark.parametrize("device_id", opencl_params())
def test_tune_stores_the_winner_and_calls_use_it(device_id, tuner_env, launched):
    import sparkle
    from sparkle import reference
    from sparkle.opencl import backend

    device = runtime_device(device_id)
    x, w, b, kwargs, workload = small_conv()
    assert backend.choose_params(device, workload)[1] == "default"
    result = sparkle.tune("conv2d", x, w, b, device=device_id, time_budget=120, max_candidates=2, progress=False,
                          **kwargs)
    assert (result.device, result.workload, result.tried, result.rejected) == (device_id, workload.key, 2, [])
    assert result.best is not None and result.best_seconds > 0 and result.default_seconds > 0
    assert result.gflops == pytest.approx(workload.flops / result.best_seconds / 1e9)
    assert result.best_seconds <= result.default_seconds
    assert "GFLOPS" in str(result) and workload.key in str(result)
    stored = database.entries(device.identity)[workload.key]
    assert stored["best"]["params"] == result.best and stored["tried"] == 2
    assert backend.choose_params(device, workload) == (result.best, "tuned")

    launched.clear()  # the tuner's own launches
    y = sparkle.conv2d(x, w, b, device=device_id, **kwargs)
    assert launched == [result.best]
    error = np.linalg.norm(y - reference.conv2d(x, w, b, **kwargs)) / np.linalg.norm(reference.conv2d(x, w, b,
                                                                                                       **kwargs))
    assert error <= 1e-5


@pytest.mark.parametrize("device_id", opencl_params())
def test_tune_rejects_wrong_results_and_build_failures(device_id, tuner_env, monkeypatch):
    """The first candidate tried computes a wrong result and the second does not build: both are rejected
    with the reason, and the third (correct) one wins."""
    import pyopencl as cl
    import sparkle
    from sparkle.opencl import launch

    device = runtime_device(device_id)
    x, w, b, kwargs, workload = small_conv()
    seen = []  # distinct parameter sets in the order the tuner launches them
    real_enqueue, real_render = launch.enqueue, codegen.render

    def enqueue(d, wl, params, x_buf, w_buf, b_buf, out_buf, **kw):
        if params_key(params) not in map(params_key, seen):
            seen.append(dict(params))
        event = real_enqueue(d, wl, params, x_buf, w_buf, b_buf, out_buf, **kw)
        if params_key(params) == params_key(seen[0]):  # overwrite the output: a wrong result
            event.wait()
            return cl.enqueue_fill_buffer(d.queue, out_buf, np.float32(0.5), 0, out_buf.size)
        return event

    def render(wl, params, **kw):
        source = real_render(wl, params, **kw)
        if len(seen) > 1 and params_key(params) == params_key(seen[1]):
            source += "\nthis is not OpenCL C;\n"
        return source

    monkeypatch.setattr(launch, "enqueue", enqueue)
    monkeypatch.setattr(codegen, "render", render)
    result = sparkle.tune("conv2d", x, w, b, device=device_id, time_budget=120, max_candidates=3, progress=False,
                          **kwargs)
    assert len(seen) == 3 and result.tried == 3
    assert [params_key(r["params"]) for r in result.rejected] == [params_key(seen[0]), params_key(seen[1])]
    assert result.rejected[0]["reason"].startswith("wrong result: relative error")
    assert "BUILD_PROGRAM_FAILURE" in result.rejected[1]["reason"]
    assert params_key(result.best) == params_key(seen[2])
    assert result.default_seconds is None  # the defaults were the wrong candidate
    stored = database.entries(device.identity)[workload.key]
    assert [(params_key(r["params"]), r["reason"]) for r in stored["rejected"]] == \
        [(params_key(r["params"]), r["reason"]) for r in result.rejected]
    assert params_key(stored["best"]["params"]) == params_key(seen[2])


@pytest.mark.parametrize("device_id", opencl_params())
def test_tune_stops_at_the_time_budget(device_id, tuner_env):
    import sparkle
    from sparkle.opencl import backend

    x, w, b, kwargs, workload = small_conv()
    result = sparkle.tune("conv2d", x, w, b, device=device_id, time_budget=1e-9, progress=False, **kwargs)
    assert (result.tried, result.best, result.best_seconds) == (0, None, None)
    assert "no correct candidate in 0 tried" in str(result)
    assert "best" not in database.entries(runtime_device(device_id).identity)[workload.key]
    assert backend.choose_params(runtime_device(device_id), workload)[1] == "default"


@pytest.mark.parametrize("device_id", opencl_params())
def test_tune_progress_false_prints_nothing(device_id, tuner_env, capfd):
    import sparkle

    a = np.ones((8, 12), np.float32)
    sparkle.tune("matmul", a, a.T, device=device_id, max_candidates=1, progress=False)
    assert capfd.readouterr() == ("", "")
    sparkle.tune(sparkle.matmul, a, a.T, device=device_id, max_candidates=1, progress=True)
    assert "tuning matmul" in capfd.readouterr().err


X = np.zeros((1, 2, 5, 5), np.float32)
W = np.zeros((3, 2, 3, 3), np.float32)


@pytest.mark.parametrize("args, kwargs, error, words", [
    (("conv3d", X, W), {}, ValueError, "op must be"),
    ((None, X, W), {}, ValueError, "op must be"),
    (("conv2d", X, W), {"time_budget": 0}, ValueError, "time_budget"),
    (("conv2d", X, W), {"time_budget": -1.5}, ValueError, "time_budget"),
    (("conv2d", X, W), {"time_budget": float("nan")}, ValueError, "time_budget"),
    (("conv2d", X, W), {"time_budget": True}, ValueError, "time_budget"),
    (("conv2d", X, W), {"time_budget": "10"}, ValueError, "time_budget"),
    (("conv2d", X, W), {"max_candidates": 0}, ValueError, "max_candidates"),
    (("conv2d", X, W), {"max_candidates": 2.0}, ValueError, "max_candidates"),
    (("conv2d", X, W), {"max_candidates": True}, ValueError, "max_candidates"),
    (("conv2d", X, W), {"device": "cpu"}, ValueError, "device must be an OpenCL device"),
    (("conv2d", X, W), {"device": "reference"}, ValueError, "device must be an OpenCL device"),
    (("conv2d", X, W), {"device": "auto"}, ValueError, "device must be an OpenCL device"),
    (("conv2d", X, W), {"device": "opencl:99"}, ValueError, "device must be an OpenCL device to tune, one of"),
    (("conv2d", X, W), {"device": 0}, TypeError, "device must be a string"),
    (("conv2d", X, W), {"stride": 0}, ValueError, "stride"),
    (("conv2d", X[0], W), {}, ValueError, "x"),
    (("matmul", X[0, 0], X[0, 0]), {"stride": 2}, TypeError, "matmul takes no keyword arguments"),
    # Argument errors name sparkle.tune(), never an internal function, and suggest the nearest name.
    (("conv2d", X, W), {"budget": 5}, TypeError,
     "sparkle.tune() got an unexpected keyword argument 'budget' (did you mean 'time_budget'?)"),
    (("conv2d", X, W), {"relu": True}, TypeError, "argument 'relu' (did you mean activation='relu'?)"),
    (("conv2d", X, W), {"paddin": 1}, TypeError, "argument 'paddin' (did you mean 'padding'?)"),
    (("conv2d", X, W), {"max_candidate": 1}, TypeError, "(did you mean 'max_candidates'?)"),
    (("conv2d", X, W), {"zzz": 1}, TypeError, "sparkle.tune() got an unexpected keyword argument 'zzz'"),
    (("matmul", X[0, 0], X[0, 0]), {"budget": 5}, TypeError, "(did you mean 'time_budget'?)"),
    (("conv2d", X), {}, TypeError, ("sparkle.tune('conv2d', ...) takes the operands x, w and optionally bias, "
                                    "got 1 operand")),
    (("conv2d", X, W, W[:, 0, 0, 0], W), {}, TypeError, "got 4 operands"),
    (("matmul", X[0, 0]), {}, TypeError, "sparkle.tune('matmul', ...) takes the operands a and b, got 1 operand"),
    (("conv2d", X, W, W[:, 0, 0, 0]), {"bias": W[:, 0, 0, 0]}, TypeError,
     "sparkle.tune() got multiple values for argument 'bias'"),
])
def test_tune_bad_arguments(args, kwargs, error, words, tuner_env):
    import sparkle

    with pytest.raises(error, match=re.escape(words)):
        sparkle.tune(*args, progress=False, **kwargs)


@pytest.mark.parametrize("args, kwargs", [(("conv2d", X, W), {"budget": 5}), (("conv2d", X), {}),
                                          (("matmul", X[0, 0]), {"stride": 1})])
def test_tune_argument_errors_never_name_internal_functions(args, kwargs):
    import sparkle

    with pytest.raises(TypeError) as info:
        sparkle.tune(*args, progress=False, **kwargs)
    assert str(info.value).startswith("sparkle.tune(") and "_spec" not in str(info.value)


def test_tune_without_pyopencl_says_how_to_install_it():
    """Without pyopencl, sparkle imports (with OpenCLFallbackWarning and TuneResult), and tune, like conv2d
    and the command line, raises the ValueError that says how to install OpenCL support."""
    import os
    import pathlib
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys
        sys.modules["pyopencl"] = None  # as if it were not installed: importing it raises ImportError
        import numpy as np
        import sparkle
        from sparkle.devices import opencl_unavailable_reason
        from sparkle.opencl import backend, tuner

        assert sparkle.OpenCLFallbackWarning is backend.OpenCLFallbackWarning
        assert sparkle.TuneResult is tuner.TuneResult
        reason = opencl_unavailable_reason()
        assert "pip install 'sparkle[opencl]'" in reason, reason
        a = np.ones((4, 4), np.float32)
        x, w = np.ones((1, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3), np.float32)
        calls = {"conv2d": lambda: sparkle.conv2d(x, w, device="opencl"),
                 "to_device": lambda: sparkle.to_device(a),
                 "tune": lambda: sparkle.tune("matmul", a, a, progress=False),
                 "tune opencl:0": lambda: sparkle.tune("conv2d", x, w, device="opencl:0", progress=False)}
        for name, call in calls.items():
            try:
                call()
            except ValueError as error:
                assert str(error).startswith("device") and reason in str(error), (name, str(error))
            else:
                raise AssertionError(name + " did not raise")
        from sparkle.cli import main
        try:
            main(["tune", "matmul", "--m", "4", "--k", "4", "--n", "4"])
        except SystemExit as exit_:
            assert exit_.code == 2
        print("ok")
    """)
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    env.pop("SPARKLE_OPENCL", None)  # the reason must be pyopencl, not the variable
    result = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
    assert "pip install 'sparkle[opencl]'" in result.stderr  # the command line's usage error says it too
