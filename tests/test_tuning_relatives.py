"""Tuning that transfers: a device with no tuning of its own borrows the winners of its nearest tuned relative
(same vendor, kind and architecture; then the most similar compute units and memory), and says so."""

from __future__ import annotations

import types

import numpy as np
import pytest

from sparkle import api
from sparkle.cache import JsonDocument
from sparkle.opencl import runtime
from sparkle.opencl.codegen import Workload
from sparkle.opencl.tuning import database, relatives, space
from sparkle.opencl.tuning.relatives import DeviceTraits
from sparkle.opencl.tuning.space import DeviceLimits

LIMITS = DeviceLimits(max_work_group_size=1024, local_memory=48 * 1024, has_fp64=True)
H100 = DeviceTraits("NVIDIA Corporation", "gpu", "sm_90", 132, 49152, 1024, 80 * 2**30)
H200 = DeviceTraits("NVIDIA Corporation", "gpu", "sm_90", 132, 49152, 1024, 141 * 2**30)
SMALL_HOPPER = DeviceTraits("NVIDIA Corporation", "gpu", "sm_90", 66, 49152, 1024, 40 * 2**30)
A100 = DeviceTraits("NVIDIA Corporation", "gpu", "sm_80", 108, 49152, 1024, 80 * 2**30)
ZEN3 = DeviceTraits("AuthenticAMD", "cpu", "znver3", 2, 0, 4096, 0)


def identity(name, driver="1.0"):
    return f"NVIDIA CUDA|OpenCL 3.0 CUDA|NVIDIA Corporation|{name}|OpenCL 3.0 CUDA|{driver}"


def conv(n=1, c=64, h=28, w=28, k=64, padding=1):
    x, weights = np.zeros((n, c, h, w), np.float32), np.zeros((k, c, 3, 3), np.float32)
    return Workload.from_spec(api.conv2d_spec(x, weights, None, padding=padding))


LAYER = conv()
PARAMS_H100 = {"USE_LOCAL": 1, "TM": 64, "TN": 64, "TK": 16, "WM": 4, "WN": 8, "VW": 4}
PARAMS_SMALL = {"USE_LOCAL": 1, "TM": 32, "TN": 64, "TK": 16, "WM": 4, "WN": 8, "VW": 1}  # 64 work-items
PARAMS_A100 = {"USE_LOCAL": 1, "TM": 32, "TN": 32, "TK": 8, "WM": 4, "WN": 4, "VW": 1}


def seeded(devices):
    """A seed document: {identity: (traits or None, {workload: params})}."""
    return {"devices": {ident: {**({"traits": traits.to_json()} if traits else {}),
                                "workloads": {w.key: {"workload": w.as_dict(),
                                                      "best": {"params": p, "seconds": 1e-4, "gflops": 1.0}}
                                              for w, p in workloads.items()}}
                        for ident, (traits, workloads) in devices.items()}}


@pytest.fixture
def document(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path))
    seed = seeded({identity("NVIDIA H100 80GB HBM3"): (H100, {LAYER: PARAMS_H100}),
                   identity("Small Hopper"): (SMALL_HOPPER, {LAYER: PARAMS_SMALL}),
                   identity("NVIDIA A100"): (A100, {LAYER: PARAMS_A100}),
                   identity("Untraited GPU"): (None, {LAYER: PARAMS_A100})})
    monkeypatch.setattr(database, "_seed", lambda: seed)
    return JsonDocument("opencl-tuning-test", version=1, directory=tmp_path)


def test_kinship_needs_one_family_and_grows_with_unlike_traits():
    assert relatives.kinship(H200, H100) == pytest.approx(0.25 * np.log2(141 / 80))
    assert relatives.kinship(H200, SMALL_HOPPER) > relatives.kinship(H200, H100)
    assert relatives.kinship(H200, A100) is None  # another architecture
    assert relatives.kinship(H200, ZEN3) is None
    unrecorded = DeviceTraits("NVIDIA Corporation", "gpu", "sm_90", 132, 0, 1024, 0)
    assert relatives.kinship(H200, unrecorded) == 0  # 0: not recorded, not compared
    assert DeviceTraits.from_json(H100.to_json()) == H100
    assert DeviceTraits.from_json({"vendor": "x"}) is None


def test_an_untuned_device_borrows_its_nearest_relatives_winners_and_names_them(document):
    params, source = database.lookup(identity("NVIDIA H200"), LAYER, LIMITS, document=document, traits=H200)
    assert params == PARAMS_H100
    assert source == "relative NVIDIA H100 80GB HBM3 (sm_90, 132 compute units): tuned"
    nearby = conv(h=32, w=32)  # no tuned entry anywhere: the relative's nearest shape
    params, source = database.lookup(identity("NVIDIA H200"), nearby, LIMITS, document=document, traits=H200)
    assert params == PARAMS_H100 and source.endswith(f": nearest {LAYER.key}")
    # Without traits (or with another architecture's) nothing is borrowed.
    assert database.lookup(identity("NVIDIA H200"), LAYER, LIMITS, document=document) == (None, None)
    sm86 = DeviceTraits("NVIDIA Corporation", "gpu", "sm_86", 84, 49152, 1024, 24 * 2**30)
    assert database.lookup(identity("RTX"), LAYER, LIMITS, document=document, traits=sm86) == (None, None)


def test_a_relatives_parameters_that_do_not_fit_are_passed_over(document):
    tight = DeviceLimits(max_work_group_size=64, local_memory=48 * 1024, has_fp64=True)
    assert space.violations(PARAMS_H100, LAYER, tight) and not space.violations(PARAMS_SMALL, LAYER, tight)
    params, source = database.lookup(identity("NVIDIA H200"), LAYER, tight, document=document, traits=H200)
    assert params == PARAMS_SMALL and source.startswith("relative Small Hopper ")
    params, _ = database.lookup(identity("NVIDIA H200"), LAYER, LIMITS, excluded=[PARAMS_H100],
                                document=document, traits=H200)
    assert params == PARAMS_SMALL


def test_own_tuning_wins_and_the_users_tuned_relatives_count(document):
    h200 = identity("NVIDIA H200")
    own = {"USE_LOCAL": 1, "TM": 128, "TN": 64, "TK": 16, "WM": 8, "WN": 8, "VW": 4}
    database.record(h200, LAYER, {"params": own, "seconds": 5e-5, "gflops": 1.0}, [], 1, document=document,
                    traits=H200)
    assert database.lookup(h200, LAYER, LIMITS, document=document, traits=H200) == (own, "tuned")
    assert database.entries(h200, document)[LAYER.key]["best"]["params"] == own
    assert document.snapshot()["devices"][h200]["traits"] == H200.to_json()
    # Another H200 (another host's driver) finds this user's H200 tuning before the shipped H100's.
    params, source = database.lookup(identity("NVIDIA H200", driver="2.0"), LAYER, LIMITS, document=document,
                                     traits=H200)
    assert params == own and source.startswith("relative NVIDIA H200 ")


def test_a_relatives_winner_for_this_very_shape_comes_before_the_nearest_shape_tuned_here(document):
    h200 = identity("NVIDIA H200")
    other_shape = conv(h=32, w=32)
    own = {"USE_LOCAL": 1, "TM": 128, "TN": 64, "TK": 16, "WM": 8, "WN": 8, "VW": 4}
    database.record(h200, other_shape, {"params": own, "seconds": 5e-5, "gflops": 1.0}, [], 1, document=document,
                    traits=H200)
    params, source = database.lookup(h200, LAYER, LIMITS, document=document, traits=H200)
    assert params == PARAMS_H100 and source == "relative NVIDIA H100 80GB HBM3 (sm_90, 132 compute units): tuned"
    unseen = conv(h=30, w=30)  # tuned nowhere: the nearest shape tuned here comes before a relative's
    assert database.lookup(h200, unseen, LIMITS, document=document, traits=H200) == \
        (own, f"nearest {other_shape.key}")


def test_provenance_says_where_a_devices_parameters_come_from(document):
    text = database.provenance(identity("NVIDIA H200"), H200, document)
    assert "borrows the 1 tuned workloads of NVIDIA H100 80GB HBM3" in text
    assert database.provenance(identity("NVIDIA H100 80GB HBM3"), H100, document) == "tuned workloads: 1 shipped"
    assert "defaults" in database.provenance(identity("Other"), ZEN3, document)


def test_the_shipped_winners_reach_an_untuned_h200(tmp_path, monkeypatch):
    """The shipped seed itself: an H200 gets the H100's tuned parameters for a shape only the H100 was tuned
    on, and an H200 on a driver never tuned gets the shipped H200's own winners (the same device under another
    driver); every shipped device carries traits."""
    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path))
    seed = database._seed()
    assert all(DeviceTraits.from_json(entry.get("traits", {})) for entry in seed["devices"].values())
    h200 = "NVIDIA CUDA|OpenCL 3.0 CUDA 13.0.98|NVIDIA Corporation|NVIDIA H200|OpenCL 3.0 CUDA|580.159.04"
    shipped = {name: next(entry for ident, entry in seed["devices"].items() if name in ident)
               for name in ("H100", "H200")}
    document = JsonDocument("opencl-tuning-test", version=1, directory=tmp_path)
    a, b = np.empty((2048, 2048), np.float32), np.empty((2048, 2048), np.float32)
    matmul = Workload.from_spec(api.matmul_spec(a, b))
    assert matmul.key in shipped["H100"]["workloads"] and matmul.key not in shipped["H200"]["workloads"]
    params, source = database.lookup(h200, matmul, LIMITS, document=document, traits=H200)
    assert params == shipped["H100"]["workloads"][matmul.key]["best"]["params"]
    assert source == "relative NVIDIA H100 80GB HBM3 (sm_90, 132 compute units): tuned"
    res4 = conv(n=32, c=256, h=14, w=14, k=256)
    new_driver = h200.replace("580.159.04", "590.10.01")
    params, source = database.lookup(new_driver, res4, LIMITS, document=document, traits=H200)
    assert params == shipped["H200"]["workloads"][res4.key]["best"]["params"]
    assert source == "tuned"


def fake_device(extensions="", version="OpenCL 3.0", name=" Some GPU ", **answers):
    return types.SimpleNamespace(extensions=extensions, version=version, name=name, **answers)


def test_architecture_comes_from_the_drivers_answers():
    nvidia = fake_device("cl_khr_fp64 cl_nv_device_attribute_query", compute_capability_major_nv=9,
                         compute_capability_minor_nv=0)
    assert runtime._architecture(nvidia, "gpu") == "sm_90"
    amd = fake_device("cl_amd_device_attribute_query", gfxip_major_amd=9, gfxip_minor_amd=4)
    assert runtime._architecture(amd, "gpu") == "gfx94"
    pocl = fake_device(version="OpenCL 3.0 PoCL HSTR: pthread-x86_64-unknown-linux-gnu-znver3")
    assert runtime._architecture(pocl, "cpu") == "znver3"
    silent = fake_device("cl_nv_device_attribute_query")  # lists the extension, answers nothing
    assert runtime._architecture(silent, "gpu") == "Some GPU"

