"""Split-K variants: the reduction cut into slices whose partial sums a second kernel adds in slice order.

Deterministic (the same bits on every run, through launch.enqueue and through a prepared call's own
workspace), checked against the float64 reference, and chosen by the defaults only where the output tiles
alone leave a device's compute units idle. Memory safety under Oclgrind: test_opencl_memory_safety.py; sampled
split variants on awkward shapes: test_opencl_variants.py ("split_k").
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import api, reference  # noqa: E402
from sparkle.opencl import backend, codegen, launch, transfer  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402
from sparkle.opencl.tuning import database, space  # noqa: E402

from _helpers import TOLERANCE, make_array, rel_l2  # noqa: E402
from _opencl import opencl_params, runtime_device, sparkle_cache  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("sparkle_cache")

GPU_SPLIT = {"USE_LOCAL": 1, "TM": 32, "TN": 32, "TK": 8, "WM": 4, "WN": 4, "VW": 1, "KSPLIT": 4}
CPU_SPLIT = {"USE_LOCAL": 0, "TM": 8, "TN": 16, "TK": 8, "WM": 2, "WN": 4, "VN": 1, "KSPLIT": 4}
SPLITS = [pytest.param(GPU_SPLIT, id="gpu-shape"), pytest.param(CPU_SPLIT, id="cpu-shape")]


def late_layer(rng, dtype=np.float32, bias=True, activation="relu"):
    """A small late layer at N=1: 30 output pixels, a reduction of 549 (69 tiles of 8: uneven slices)."""
    x = make_array(rng, (1, 61, 5, 6), np.dtype(dtype))
    w = make_array(rng, (7, 61, 3, 3), np.dtype(dtype))
    b = make_array(rng, (7,), np.dtype(dtype)) if bias else None
    kwargs = dict(padding=1, activation=activation)
    return x, w, b, api.conv2d_spec(x, w, b, **kwargs), reference.conv2d(x, w, b, **kwargs)


def launch_once(device, params, x, w, b, spec):
    workload = Workload.from_spec(spec)
    dtype = np.dtype(spec.dtype)
    buffers = [transfer.upload(device, a, dtype) for a in (x, w, b if b is not None else np.zeros(1, dtype))]
    out = transfer.upload(device, np.full(spec.output_shape, np.nan, dtype), dtype)
    span = launch.enqueue(device, workload, params, *(a.buffer for a in buffers), out.buffer,
                          has_bias=b is not None, relu=spec.activation == "relu")
    assert span.seconds > 0  # the span runs from the slices' start to the reduction's end
    return out.get()


@pytest.mark.parametrize("params", SPLITS)
@pytest.mark.parametrize("device_id", opencl_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_split_k_gives_the_same_bits_on_every_run_and_matches_the_reference(device_id, params, dtype):
    device = runtime_device(device_id)
    if dtype == np.float64 and not device.has_fp64:
        pytest.skip(f"{device_id} has no float64")
    x, w, b, spec, expected = late_layer(np.random.default_rng(3), dtype)
    assert space.violations(params, Workload.from_spec(spec), space.DeviceLimits.of(device)) == []
    runs = [launch_once(device, params, x, w, b, spec) for _ in range(3)]
    assert rel_l2(runs[0], expected) <= TOLERANCE[np.dtype(dtype)]
    for other in runs[1:]:
        assert np.array_equal(runs[0].view(f"u{runs[0].itemsize}"), other.view(f"u{other.itemsize}"))
    unsplit = launch_once(device, {**params, "KSPLIT": 1}, x, w, b, spec)
    assert rel_l2(unsplit, expected) <= TOLERANCE[np.dtype(dtype)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("device_id", opencl_params())
def test_a_prepared_call_runs_a_tuned_split_variant_on_both_paths(device_id, bias):
    device = runtime_device(device_id)
    x, w, b, spec, expected = late_layer(np.random.default_rng(5), bias=bias, activation=None if bias else "relu")
    workload = Workload.from_spec(spec)
    database.record(device.identity, workload, {"params": GPU_SPLIT, "seconds": 1e-4, "gflops": 1.0}, [], 1)
    prepared = backend.prepare_conv2d(spec, device, on_fault="raise")
    assert prepared.params["KSPLIT"] == 4 and "KSPLIT=4" in prepared.variant
    operands = (x, w, b) if bias else (x, w)
    host = prepared(*operands)
    assert rel_l2(host, expected) <= TOLERANCE[np.dtype(np.float32)]
    resident = [sparkle.to_device(a, device_id) for a in operands]
    first, second = prepared(*resident).get(), prepared(*resident).get()
    assert np.array_equal(first.view(np.uint32), host.view(np.uint32))
    assert np.array_equal(second.view(np.uint32), host.view(np.uint32))


RESNET_N1 = {"res4 3x3": (1, 256, 14, 14, 256, 3), "res5 3x3": (1, 512, 7, 7, 512, 3),
             "res4 1x1": (1, 1024, 14, 14, 256, 1)}
H100_LIMITS = space.DeviceLimits(max_work_group_size=1024, local_memory=48 * 1024, has_fp64=True,
                                 compute_units=132, max_alloc=20 * 2**30)


def resnet(n, c, h, w, k, r):
    x, weights = np.zeros((n, c, h, w), np.float32), np.zeros((k, c, r, r), np.float32)
    return Workload.from_spec(api.conv2d_spec(x, weights, None, padding=r // 2))


@pytest.mark.parametrize("layer", list(RESNET_N1))
def test_defaults_split_the_reduction_only_where_tiles_leave_compute_units_idle(layer):
    small = resnet(*RESNET_N1[layer])
    params = space.default_params(small, H100_LIMITS, "gpu")
    unsplit = codegen.work_groups(small, {**params, "KSPLIT": 1})
    assert unsplit < space.OCCUPANCY * H100_LIMITS.compute_units  # too few tiles for 132 units...
    assert params["KSPLIT"] > 1  # ...so the defaults split, and not past what fills the device
    assert codegen.work_groups(small, {**params, "KSPLIT": params["KSPLIT"] // 2}) \
        < space.OCCUPANCY * H100_LIMITS.compute_units
    assert space.violations(params, small, H100_LIMITS) == []
    large = resnet(32, *RESNET_N1[layer][1:])  # N=32: split only where the tiles are still too few (res5)
    large_params = space.complete(space.default_params(large, H100_LIMITS, "gpu"))
    enough = codegen.work_groups(large, {**large_params, "KSPLIT": 1}) >= H100_LIMITS.compute_units
    assert (large_params["KSPLIT"] == 1) == enough and (enough or layer == "res5 3x3")
    # a CPU device (PoCL) never gets a split by default, and the tuner sees splits only up to the filling count
    assert space.complete(space.default_params(small, H100_LIMITS, "cpu"))["KSPLIT"] == 1
    found = space.candidates(small, H100_LIMITS, "gpu")
    assert {1, 2, 4} <= {p["KSPLIT"] for p in found}
    for workload in (small, large):
        for params in space.candidates(workload, H100_LIMITS, "gpu"):
            if params["KSPLIT"] > 1:  # a split only where half as many slices leave units idle
                half = codegen.work_groups(workload, {**params, "KSPLIT": params["KSPLIT"] // 2})
                assert half < space.OCCUPANCY * H100_LIMITS.compute_units, params


def test_split_constraints_are_explained():
    small = resnet(*RESNET_N1["res4 3x3"])
    short = resnet(1, 8, 14, 14, 16, 3)  # a reduction of 72: 9 tiles of 8
    assert any("leaves slices under" in r for r in space.violations({**GPU_SPLIT, "KSPLIT": 4}, short, H100_LIMITS))
    assert any("must be one of" in r for r in space.violations({**GPU_SPLIT, "KSPLIT": 3}, small, H100_LIMITS))
    tiny_alloc = space.DeviceLimits(1024, 48 * 1024, True, 132, max_alloc=100_000)
    assert any("workspace" in r for r in space.violations(GPU_SPLIT, small, tiny_alloc))
