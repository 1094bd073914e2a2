"""Ship tuning results: merge one device's tuned winners from a tuning database into Sparkle's shipped seed
(``sparkle/opencl/tuning/pretuned.json``), with the device's traits, so that the device and its relatives (same
vendor, kind and architecture) start from them without tuning.

    python benchmarks/ship_tuning.py DATABASE.json [--device SUBSTRING] [--seed PATH] [--dry-run]

DATABASE.json is a tuning database file (``opencl-tuning-v<N>.json`` from the cache directory of the machine
that tuned, e.g. brought back from the GPU machine). ``--device`` picks the device whose name contains the
text (needed when the file holds several). A shipped winner is replaced only by a faster one; the rejected
candidates and counts stay behind (the seed holds winners only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SEED = Path(__file__).resolve().parents[1] / "sparkle" / "opencl" / "tuning" / "pretuned.json"


def merge(database, seed, device_text=None):
    """(seed with the device's winners merged in, identity, [workload keys added or improved])."""
    devices = database.get("devices", {})
    chosen = [identity for identity in devices if device_text is None or device_text in identity.split("|")[3]]
    if len(chosen) != 1:
        names = [identity.split("|")[3] for identity in devices]
        raise ValueError(f"--device must pick one device of {names}, got {device_text!r} ({len(chosen)} match)")
    identity = chosen[0]
    source = devices[identity]
    if "traits" not in source:
        raise ValueError(f"{identity}: the database has no traits for this device (tuned by a Sparkle before "
                         "tuning recorded them): tune one workload again to record them")
    shipped = seed.setdefault("devices", {}).setdefault(identity, {"traits": source["traits"], "workloads": {}})
    shipped["traits"] = source["traits"]
    changed = []
    for key, entry in source.get("workloads", {}).items():
        best = entry.get("best")
        if not best or best.get("seconds") is None:
            continue
        old = shipped["workloads"].get(key, {}).get("best")
        if old is None or old.get("seconds") is None or best["seconds"] < old["seconds"]:
            shipped["workloads"][key] = {"best": best, "workload": entry["workload"]}
            changed.append(key)
    return seed, identity, changed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path)
    parser.add_argument("--device", help="text in the device's name (when the database holds several)")
    parser.add_argument("--seed", type=Path, default=SEED)
    parser.add_argument("--dry-run", action="store_true", help="say what would change, write nothing")
    args = parser.parse_args(argv)
    seed = json.loads(args.seed.read_text())
    try:
        seed, identity, changed = merge(json.loads(args.database.read_text()), seed, args.device)
    except ValueError as error:
        sys.exit(f"ship_tuning: {error}")
    print(f"{identity.split('|')[3]}: {len(changed)} winners added or improved")
    for key in changed:
        print(f"  {key}")
    if not args.dry_run and changed:
        temporary = args.seed.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(seed, indent=1) + "\n")
        temporary.replace(args.seed)  # atomic: the seed is never half-written
        print(f"written: {args.seed}")


if __name__ == "__main__":
    main()
