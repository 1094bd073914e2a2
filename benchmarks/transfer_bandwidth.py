"""Host <-> device copy bandwidth through OpenCL: from ordinary (pageable) numpy memory against memory the
driver pinned (a mapped CL_MEM_ALLOC_HOST_PTR buffer), each direction, best of several.

    python benchmarks/transfer_bandwidth.py --device opencl:0 [--sizes-mb 4 32 128] [--json PATH]

Tells whether results should land in pinned memory on this device: NVIDIA's OpenCL copies from pageable memory
through its own staging buffers (8.3 GB/s host to device on the H100 machine). "up staged" is Sparkle's upload
of pageable memory (``sparkle.opencl.staging``: a parallel copy into a ring of pinned chunks, pipelined with the
device's reads), checked byte for byte.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from sparkle.timing import best_time


def pinned_array(cl, device, nbytes):
    """A uint8 array on pinned memory (mapped while the array lives) and the buffer that owns it."""
    owner = cl.Buffer(device.context, cl.mem_flags.READ_WRITE | cl.mem_flags.ALLOC_HOST_PTR, nbytes)
    array, _ = cl.enqueue_map_buffer(device.queue, owner, cl.map_flags.READ | cl.map_flags.WRITE, 0, (nbytes,),
                                     np.uint8, is_blocking=True)
    return array, owner


def measure(device, megabytes, repeat):
    import pyopencl as cl

    nbytes = int(megabytes * 2**20)
    queue = device.queue
    buffer = cl.Buffer(device.context, cl.mem_flags.READ_WRITE, nbytes)
    pageable = np.ones(nbytes, np.uint8)
    pinned, owner = pinned_array(cl, device, nbytes)
    pinned[:] = 1
    row = {"megabytes": megabytes}
    for name, host in (("pageable", pageable), ("pinned", pinned)):
        up = best_time(lambda host=host: cl.enqueue_copy(queue, buffer, host, is_blocking=True), repeat)
        down = best_time(lambda host=host: cl.enqueue_copy(queue, host, buffer, is_blocking=True), repeat)
        row[f"{name}_up_gbs"] = nbytes / up / 1e9
        row[f"{name}_down_gbs"] = nbytes / down / 1e9
    from sparkle.opencl import staging

    pageable[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    device.staged_uploads = True
    ring = staging._ring(device)  # staged at every size here, even below what uploads stage
    up = best_time(lambda: (ring.write(buffer, pageable), queue.finish()), repeat)
    row["staged_up_gbs"] = nbytes / up / 1e9
    arrived = np.zeros_like(pageable)
    cl.enqueue_copy(queue, arrived, buffer, is_blocking=True)
    if not np.array_equal(arrived, pageable):
        raise SystemExit(f"{megabytes} MB: the staged upload sent wrong bytes")
    fresh = best_time(lambda: np.copyto(np.empty(nbytes, np.uint8), pageable), 3)
    row["host_memcpy_fresh_gbs"] = nbytes / fresh / 1e9
    staged = best_time(lambda: np.copyto(pinned, pageable), repeat)
    row["host_memcpy_into_pinned_gbs"] = nbytes / staged / 1e9
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="opencl:0")
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[4, 32, 128])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from sparkle.opencl.runtime import opencl_device

    device = opencl_device(args.device)
    rows = [measure(device, size, args.repeat) for size in args.sizes_mb]
    print(f"{device.name}: GB/s, best of {args.repeat}")
    print("| MB | up pageable | up staged | up pinned | down pageable | down pinned | memcpy to fresh | "
          "memcpy to pinned |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['megabytes']:g} | {r['pageable_up_gbs']:.1f} | {r['staged_up_gbs']:.1f} | "
              f"{r['pinned_up_gbs']:.1f} | "
              f"{r['pageable_down_gbs']:.1f} | {r['pinned_down_gbs']:.1f} | {r['host_memcpy_fresh_gbs']:.1f} | "
              f"{r['host_memcpy_into_pinned_gbs']:.1f} |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": device.name, "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
