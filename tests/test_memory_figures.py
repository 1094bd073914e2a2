"""The memory figures of the README ("Performance"): "a res2 3x3 call at N = 8 allocates its output
(6.1 MiB) plus a zero-padded copy of its input (6.6 MiB, the only workspace of the implicit path); a
whole-input im2col matrix would be 55 MiB."

The figures are those of the implicit path, which the AVX-512 family plans for this call. The AVX2 and
portable families take the packed path instead: output plus per-thread scratch (about 1 MiB on 2 threads,
``workspace_bytes``), which test_every_path_allocates_its_output_and_stated_workspace_only checks whatever
the family. Allocations are measured with tracemalloc (numpy reports its buffers to it), so a path that
started copying its weights (147 KiB here) or allocating anything else of size would fail these tests.
"""

import numpy as np
import pytest

from sparkle import api, host_pool, reference
from sparkle.cpu import backend
from sparkle.cpu.implicit import copy_size
from sparkle.cpu.isa import isa_by_name
from sparkle.timing import peak_extra_memory

MIB = 2**20
N, C, H, W, K, R = 8, 64, 56, 56, 64, 3  # ResNet-50 res2 3x3 at N = 8, padding 1
FLOAT32 = 4
# What a call may allocate besides the figures: the zero bias vector and index tables (a few KiB), and the
# output's block rounded up to the host pool's granule (sparkle/host_pool.py).
SLACK = 16 * 1024 + host_pool.BLOCK_GRANULE_BYTES


def res2_call():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W)).astype(np.float32)
    w = rng.standard_normal((K, C, R, R)).astype(np.float32)
    return x, w, api.conv2d_spec(x, w, padding=1)


def test_readme_figures_follow_from_the_shapes():
    output = N * K * H * W * FLOAT32  # "same" 3x3: 56 x 56 out
    padded_copy = N * C * (H + 2) * (W + 2) * FLOAT32
    im2col = (C * R * R) * (N * H * W) * FLOAT32
    assert round(output / MIB, 1) == 6.1
    assert round(padded_copy / MIB, 1) == 6.6
    assert round(im2col / MIB) == 55
    _x, _w, spec = res2_call()
    assert spec.output_shape == (N, K, H, W)
    planes, plane = copy_size(spec)  # what the implicit path allocates for its copy
    assert planes * plane * FLOAT32 == padded_copy
    assert backend.workspace_bytes(spec, backend.plan_conv2d(spec, implicit=True)) == padded_copy


def measured(x, w, spec, plan):
    """(peak bytes allocated by one call, its result); a first call beforehand fills the per-spec caches. Its
    result stays alive and idle pooled blocks are let go, so the measured call's output is new memory."""
    first = backend.conv2d(x, w, None, spec, plan)
    host_pool.pool().clear()
    results = [first]
    peak = peak_extra_memory(lambda: results.append(backend.conv2d(x, w, None, spec, plan)) or results[-1])
    return peak, results[-1]


def test_res2_call_allocates_its_output_and_the_padded_copy_only():
    x, w, spec = res2_call()
    # The README's figures are the implicit path's, which the AVX-512 family plans for this call; the path
    # itself runs in any family, so it is measured in the one this process runs.
    assert backend.plan_conv2d(spec, isa=isa_by_name("avx512")).implicit
    plan = backend.plan_conv2d(spec, implicit=True)
    output = N * K * H * W * FLOAT32
    padded_copy = N * C * (H + 2) * (W + 2) * FLOAT32
    peak, y = measured(x, w, spec, plan)
    assert output + padded_copy <= peak <= output + padded_copy + SLACK, peak
    sample = (slice(0, 1), slice(None), slice(0, 8), slice(0, 8))
    expected = reference.conv2d(x[:1], w, padding=1)[:, :, :8, :8]
    np.testing.assert_allclose(y[sample], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("implicit", [False, True], ids=["packed", "implicit"])
def test_every_path_allocates_its_output_and_stated_workspace_only(implicit):
    """``backend.workspace_bytes`` (what benchmarks/compare_cpu.py reports) is what a call allocates
    besides its output, on either path, in whatever family this process runs."""
    x, w, spec = res2_call()
    plan = backend.plan_conv2d(spec, implicit=implicit)
    output = N * K * H * W * FLOAT32
    workspace = backend.workspace_bytes(spec, plan)
    peak, _ = measured(x, w, spec, plan)
    assert output + workspace <= peak <= output + workspace + SLACK, (peak, workspace)


def test_unpadded_stride_1_input_is_read_in_place():
    """README: "an unpadded stride-1 input is read in place" -- the implicit path allocates its output only."""
    x, w, _ = res2_call()
    x = x[:2]
    spec = api.conv2d_spec(x, w)
    plan = backend.plan_conv2d(spec, implicit=True)
    assert backend.workspace_bytes(spec, plan) == 0
    peak, _ = measured(x, w, spec, plan)
    output = 2 * K * (H - 2) * (W - 2) * FLOAT32
    assert output <= peak <= output + SLACK, peak


@pytest.mark.parametrize("l1d, l2, mib", [(32 * 1024, 512 * 1024, 0.28), (48 * 1024, 2 * MIB, 0.97)],
                         ids=["epyc-512k-l2", "xeon-2m-l2"])
def test_packed_path_scratch_follows_the_cache_sizes(monkeypatch, l1d, l2, mib):
    """README: the packed path's per-thread scratch for res2 3x3 at N = 8 on 2 threads (AVX2 family) is
    0.28 MiB with a 512 KiB L2 and 0.97 MiB with a 2 MiB L2: it is sized from the caches."""
    from sparkle import memory
    from sparkle.cpu import plan as plan_module

    params = memory.MemoryParams(l1d, l2, 32 * MIB, 64, "test")
    monkeypatch.setattr(memory, "detect_memory_params", lambda: params)
    monkeypatch.setattr(plan_module, "detect_memory_params", lambda: params)
    plan_module._plan.cache_clear()
    try:
        _x, _w, spec = res2_call()
        plan = backend.plan_conv2d(spec, threads=2, isa=isa_by_name("avx2"))
        assert not plan.implicit
        assert round(backend.workspace_bytes(spec, plan) / MIB, 2) == mib
    finally:
        plan_module._plan.cache_clear()
