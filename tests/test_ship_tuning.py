"""benchmarks/ship_tuning.py: a device's tuned winners merged into the shipped seed, with its traits; a shipped
winner replaced only by a faster one; the device picked unambiguously."""

from __future__ import annotations

import json

import pytest

from benchmarks import ship_tuning

H200 = "NVIDIA CUDA|OpenCL 3.0 CUDA|NVIDIA Corporation|NVIDIA H200|OpenCL 3.0 CUDA|580"
OTHER = "Portable Computing Language|3.0|GenuineIntel|pthread-CPU|OpenCL 3.0|3.0"
TRAITS = {"vendor": "NVIDIA Corporation", "kind": "gpu", "architecture": "sm_90", "compute_units": 132,
          "local_memory": 49152, "max_work_group_size": 1024, "memory": 150 * 2**30}


def entry(seconds, tm=64):
    return {"workload": {"batch": 1}, "best": {"params": {"TM": tm}, "seconds": seconds, "gflops": 1 / seconds},
            "rejected": [{"params": {}, "reason": "wrong result"}], "tried": 9}


def database(**workloads):
    return {"devices": {H200: {"traits": TRAITS, "workloads": workloads}, OTHER: {"workloads": {"k": entry(1.0)}}}}


def test_winners_and_traits_are_merged_and_only_faster_ones_replace():
    seed = {"devices": {H200: {"traits": TRAITS, "workloads": {"a": {"best": entry(2e-4)["best"], "workload": {}},
                                                               "b": {"best": entry(1e-4)["best"], "workload": {}}}}}}
    merged, identity, changed = ship_tuning.merge(database(a=entry(1e-4, 128), b=entry(3e-4), c=entry(5e-5)),
                                                  json.loads(json.dumps(seed)), "H200")
    assert identity == H200 and sorted(changed) == ["a", "c"]
    shipped = merged["devices"][H200]
    assert shipped["traits"] == TRAITS
    assert shipped["workloads"]["a"]["best"]["params"] == {"TM": 128}  # faster: replaced
    assert shipped["workloads"]["b"]["best"]["seconds"] == 1e-4  # slower: kept
    assert set(shipped["workloads"]["c"]) == {"best", "workload"}  # winners only, no rejected list


def test_the_device_must_be_picked_and_carry_traits():
    with pytest.raises(ValueError, match="must pick one device"):
        ship_tuning.merge(database(a=entry(1e-4)), {}, None)  # two devices in the file
    with pytest.raises(ValueError, match="no traits"):
        ship_tuning.merge(database(a=entry(1e-4)), {}, "pthread")


def test_the_script_writes_the_seed_atomically(tmp_path):
    source, seed = tmp_path / "db.json", tmp_path / "seed.json"
    source.write_text(json.dumps(database(a=entry(1e-4))))
    seed.write_text(json.dumps({"devices": {}}))
    ship_tuning.main([str(source), "--device", "H200", "--seed", str(seed), "--dry-run"])
    assert json.loads(seed.read_text()) == {"devices": {}}
    ship_tuning.main([str(source), "--device", "H200", "--seed", str(seed)])
    assert list(json.loads(seed.read_text())["devices"][H200]["workloads"]) == ["a"]
    assert not list(tmp_path.glob("*.tmp"))
