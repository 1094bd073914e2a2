"""Identical devices (two H200s in one host) share programs and tuning but are profiled and modelled apart."""

from __future__ import annotations

import types

from sparkle.opencl import runtime


def identity(name):
    return f"NVIDIA CUDA|OpenCL 3.0 CUDA|NVIDIA Corporation|{name}|OpenCL 3.0 CUDA|580"


def test_identical_devices_are_kept_apart_by_their_unit():
    """The scheduler's executor identity carries the unit: the PCI location, else the order among twins."""
    from sparkle.scheduler.executors import OpenCLExecutor

    def device(index, identity, pci=None):
        return types.SimpleNamespace(id=f"opencl:{index}", kind="gpu", name="NVIDIA H200", identity=identity,
                                     pci_location=pci)

    twins = [device(0, identity("NVIDIA H200")), device(1, "PoCL|x|x|cpu|x|x"), device(2, identity("NVIDIA H200"))]
    runtime.assign_units(twins)
    assert [d.unit for d in twins] == ["#0", "#0", "#1"]
    located = [device(0, identity("NVIDIA H200"), "pci 0000:1b:00"), device(1, identity("NVIDIA H200"),
                                                                          "pci 0000:43:00")]
    runtime.assign_units(located)
    assert [d.unit for d in located] == ["pci 0000:1b:00", "pci 0000:43:00"]
    identities = {OpenCLExecutor(d).identity for d in twins + located}
    assert len(identities) == 5  # each unit its own profile and model...
    assert len({d.identity for d in twins + located}) == 2  # ...while programs and tuning stay shared
