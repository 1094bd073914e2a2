"""The tuning database: per device identity and workload, the winning parameters and the rejected ones.

Stored as one JSON document in Sparkle's cache directory (atomic writes, file lock). A workload that was
never tuned borrows the parameters of the nearest tuned shape on the same device, if they are valid for it.
A device with no tuning of its own borrows from its nearest tuned relative (``relatives.py``: same vendor,
kind and architecture), and the source it returns names that device.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from importlib import resources

from ...cache import JsonDocument
from ..codegen import TEMPLATE_VERSION
from . import relatives, space

DOCUMENT = JsonDocument("opencl-tuning", version=TEMPLATE_VERSION)


_generation = [0]  # tuning results recorded by this process: what was decided from the database before is stale


def generation():
    """How many tuning results this process has recorded (a change means earlier lookups may be stale)."""
    return _generation[0]


def record(identity, workload, best, rejected, tried, document=DOCUMENT, traits=None):
    """Store a tuning outcome: ``best`` is {"params", "seconds", "gflops"} or None. ``traits`` (the device's
    DeviceTraits) let devices of its family borrow these results."""
    def change(data):
        device = data.setdefault("devices", {}).setdefault(identity, {"workloads": {}})
        if traits is not None:
            device["traits"] = traits.to_json()
        entry = device["workloads"].setdefault(workload.key, {})
        entry["workload"] = workload.as_dict()
        old = entry.get("best")
        if best is not None and (old is None or old.get("seconds") is None or best["seconds"] <= old["seconds"]):
            entry["best"] = best  # a short tuning run must not replace a faster winner found earlier
        known = {space.identity(r["params"]) for r in entry.get("rejected", [])}
        entry["rejected"] = entry.get("rejected", []) + [
            r for r in rejected if space.identity(r["params"]) not in known]
        entry["tried"] = entry.get("tried", 0) + tried
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")

    document.update(change)
    _generation[0] += 1  # after the write: a lookup that follows sees the new result


def entries(identity, document=DOCUMENT):
    """The stored workloads of one device (read-only: shared between calls until the file changes)."""
    return document.snapshot().get("devices", {}).get(identity, {}).get("workloads", {})


@lru_cache(maxsize=1)
def _seed():
    """Results tuned on known devices, shipped with Sparkle (``pretuned.json``, same layout as the database)."""
    try:
        return json.loads(resources.files(__package__).joinpath("pretuned.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _same_device(a, b):
    """Identities name platform|platform version|vendor|device|device version|driver: a driver or
    platform update keeps the device, so its tuned tiles are still the best guess."""
    a_parts, b_parts = a.split("|"), b.split("|")
    return len(a_parts) == len(b_parts) == 6 and (a_parts[0], a_parts[2], a_parts[3]) == \
        (b_parts[0], b_parts[2], b_parts[3])


def seed_entries(identity):
    """Shipped tuning results for this device (exact identity, else the same device under another driver)."""
    devices = _seed().get("devices", {})
    if identity in devices:
        return devices[identity].get("workloads", {})
    for other, value in devices.items():
        if _same_device(identity, other):
            return value.get("workloads", {})
    return {}


def _features(workload):
    return (math.log2(max(workload.gemm_m, 1)), math.log2(max(workload.gemm_n, 1)),
            math.log2(max(workload.gemm_k, 1)))


def distance(a, b):
    """How unlike two workloads are for tiling purposes (0: the same GEMM shape and kernel kind)."""
    gemm = sum(abs(x - y) for x, y in zip(_features(a), _features(b)))
    kind = 0 if (a.pointwise, a.kernel_h, a.kernel_w, a.stride_h) == (b.pointwise, b.kernel_h, b.kernel_w,
                                                                       b.stride_h) else 1
    return gemm + kind + (0 if a.op == b.op else 0.5)


# Borrow a tuned shape's parameters only from a workload this close (log2 units summed over M, N and K,
# plus 1 for another kernel kind): farther away, the device defaults are the better guess.
MAX_BORROW_DISTANCE = 4.0


def _stored_traits(device_entry):
    data = device_entry.get("traits")
    return relatives.DeviceTraits.from_json(data) if isinstance(data, dict) else None


def relatives_of(identity, traits, document=DOCUMENT):
    """[(name, traits, workloads)] of the tuned devices of ``traits``'s family, nearest first (the user's own
    database, then the shipped seed; never ``identity`` itself)."""
    found = {}
    for source in (document.snapshot().get("devices", {}), _seed().get("devices", {})):
        for other, value in source.items():
            if other == identity or other in found or not value.get("workloads"):
                continue
            other_traits = _stored_traits(value)
            if other_traits is not None:
                found[other] = (other_traits, value["workloads"])
    order = relatives.nearest(traits, {other: found[other][0] for other in found})
    return [(other.split("|")[3], *found[other]) for other in order]


def _exact(stored, workload, limits, skip):
    """(params, "tuned") of ``workload``'s own entry in ``stored``, or None when there is none that fits."""
    own = stored.get(workload.key, {}).get("best")
    if own and space.identity(own["params"]) not in skip \
            and not space.violations(own["params"], workload, limits):
        return dict(own["params"]), "tuned"
    return None


def _nearest(stored, workload, limits, skip):
    """(params, "nearest <key>") of the nearest other shape in ``stored`` whose winner fits, or None."""
    from ..codegen import Workload

    ranked = []
    for key, entry in stored.items():
        if key == workload.key or "best" not in entry:
            continue
        try:
            other = Workload(**entry["workload"])
        except TypeError:
            continue  # written by another layout of Workload
        if other.dtype != workload.dtype:
            continue
        gap = distance(workload, other)
        if gap <= MAX_BORROW_DISTANCE:
            ranked.append((gap, key, entry["best"]["params"]))
    for _, key, params in sorted(ranked, key=lambda item: item[:2]):
        if space.identity(params) not in skip and not space.violations(params, workload, limits):
            return dict(params), f"nearest {key}"
    return None


def lookup(identity, workload, limits, excluded=(), document=DOCUMENT, traits=None):
    """(params, source) for ``workload``: source is "tuned", "relative <device>: tuned", "nearest <key>" or
    "relative <device>: nearest <key>" (borrowed from the nearest tuned device of ``traits``'s family), in that
    order of preference, or (None, None) when nothing fits.

    ``excluded`` holds parameter sets that failed in this process; they are passed over.
    """
    skip = {space.identity(p) for p in excluded}
    stored = {**seed_entries(identity), **entries(identity, document)}  # the user's own tuning wins
    family = None
    # This shape tuned here, then tuned on a relative (the same chip family: its winner for this very shape),
    # then the nearest shape tuned here, then on a relative.
    for choose in (_exact, _nearest):
        found = choose(stored, workload, limits, skip)
        if found is not None:
            return found
        if traits is None:
            continue
        family = relatives_of(identity, traits, document) if family is None else family
        for name, other_traits, workloads in family:
            found = choose(workloads, workload, limits, skip)
            if found is not None:
                return found[0], f"relative {name} ({other_traits.describe()}): {found[1]}"
    return None, None


def provenance(identity, traits, document=DOCUMENT):
    """One line on where a device's tuned parameters come from."""
    own, shipped = entries(identity, document), seed_entries(identity)
    if own or shipped:
        parts = [f"{len(own)} tuned here"] if own else []
        parts += [f"{len(shipped)} shipped"] if shipped else []
        return "tuned workloads: " + ", ".join(parts)
    family = relatives_of(identity, traits, document) if traits is not None else []
    if family:
        name, other_traits, workloads = family[0]
        return (f"no tuning of its own: borrows the {len(workloads)} tuned workloads of {name} "
                f"({other_traits.describe()}), its nearest relative")
    return "no tuning of its own and no tuned relative: the device kind's defaults"
