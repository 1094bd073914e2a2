"""Compilation contract: one compiled driver per dtype and micro-kernel, never per shape,
and a second process loads it from Numba's disk cache instead of compiling."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import sparkle
from sparkle.cpu import backend
from sparkle.cpu.conv2d import fused_conv2d_driver


def test_new_shapes_and_layouts_do_not_compile():
    rng = np.random.default_rng(0)
    driver = fused_conv2d_driver(*backend.DEFAULT_MICROKERNEL, 16)
    problems = [((1, 3, 9, 9), (6, 3, 3, 3)), ((2, 8, 17, 5), (12, 4, 2, 1)), ((1, 5, 30, 31), (7, 5, 5, 5))]
    for x_shape, w_shape in problems:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        groups = x_shape[1] // w_shape[1]
        x_read_only = np.asfortranarray(x)
        x_read_only.flags.writeable = False
        for x_variant in (x, x_read_only, x[:, :, ::-1]):
            spec = sparkle.api.conv2d_spec(x_variant, w, groups=groups, padding=1)
            plan = backend.plan_conv2d(spec, microkernel=backend.DEFAULT_MICROKERNEL)
            backend.conv2d(x_variant, w, None, spec, plan)
    float32_signatures = [sig for sig in driver.signatures if str(sig[0].dtype) == "float32"]
    assert len(float32_signatures) == 1, driver.signatures


def test_second_process_loads_kernels_from_disk_cache():
    script = textwrap.dedent("""
        import numpy as np, sparkle
        from sparkle.cpu.conv2d import fused_conv2d_driver
        x = np.ones((1, 2, 6, 6), np.float32); w = np.ones((6, 2, 3, 3), np.float32)
        sparkle.conv2d(x, w, device="cpu")
        stats = fused_conv2d_driver(6, 2, 16).stats
        print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
    """)
    for _ in range(2):  # the first run may have to compile and write the cache
        output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    hits, misses = output.split()
    assert int(hits) >= 1 and int(misses) == 0, output


def compiled_versions():
    from sparkle.cpu.direct import direct_conv2d

    drivers = [fused_conv2d_driver(mr, nv, 8 * nv) for mr, nv in backend.MICROKERNELS]  # float32 widths
    return sum(len(dispatcher.signatures) for dispatcher in [*drivers, direct_conv2d])


@pytest.mark.parametrize("out_channels", [4, 12], ids=["direct", "gemm"])
def test_numpy_integer_arguments_do_not_compile_new_versions(out_channels):
    x = np.ones((1, 4, 8, 8), np.float32)
    w = np.ones((out_channels, 2, 3, 3), np.float32)
    sparkle.conv2d(x, w, groups=2, padding=1, device="cpu")
    before = compiled_versions()
    result = sparkle.conv2d(x, w, groups=np.int32(2), stride=np.int64(1), padding=(np.int16(1), np.int8(1)),
                            dilation=np.uint8(1), device="cpu")
    assert compiled_versions() == before
    np.testing.assert_allclose(result, sparkle.reference.conv2d(x, w, groups=2, padding=1), rtol=1e-5)


def test_misaligned_inputs_work_without_a_new_version():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    sparkle.conv2d(x, w, device="cpu")
    before = compiled_versions()
    raw = np.zeros(x.nbytes + 1, np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=np.float32, count=x.size, offset=1).reshape(x.shape)
    misaligned[...] = x
    assert not misaligned.flags.aligned
    result = sparkle.conv2d(misaligned, w, device="cpu")
    assert compiled_versions() == before
    np.testing.assert_allclose(result, sparkle.reference.conv2d(x, w), rtol=1e-5, atol=1e-5)
