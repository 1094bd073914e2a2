"""The micro-kernel must compile to full-width FMAs on ymm registers: a kernel that falls back to
scalar or xmm code is still correct (the other tests check that) but 2-8x slower."""

import pathlib
import re

import numpy as np
import pytest
from numba import njit

from sparkle.cpu.backend import MICROKERNELS
from sparkle.cpu.microkernel import microkernel


def cpu_flags():
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    flags = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(flags.group(1).split()) if flags else set()


# Only meaningful where AVX2 and FMA exist (this project's machines and CI have both).
requires_avx2_fma = pytest.mark.skipif(not {"avx2", "fma"} <= cpu_flags(), reason="CPU lacks AVX2 or FMA")


def compiled_kernel(mr, nv, dtype):
    @njit
    def run(a, b, c, bias):
        microkernel(mr, nv, 64, a, 0, 64, mr, b, 0, c, 0, c.shape[1], False, bias, 0, True, True)

    lanes = 32 // np.dtype(dtype).itemsize
    a = np.random.default_rng(0).standard_normal(mr * 64).astype(dtype)
    b = np.random.default_rng(1).standard_normal(64 * nv * lanes).astype(dtype)
    c = np.zeros((mr, nv * lanes), dtype)
    bias = np.zeros(mr, dtype)
    run(a, b, c, bias)
    expected = np.maximum(a.reshape(mr, 64).astype(np.float64) @ b.reshape(64, nv * lanes), 0)
    np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-4)
    return run.inspect_asm(run.signatures[0])


@requires_avx2_fma
@pytest.mark.parametrize("dtype, suffix", [(np.float32, "ps"), (np.float64, "pd")])
@pytest.mark.parametrize("mr, nv", MICROKERNELS)
def test_microkernel_uses_vector_fma_on_ymm(mr, nv, dtype, suffix):
    asm = compiled_kernel(mr, nv, dtype)
    vector_fmas = re.findall(rf"vfmadd\w*{suffix}\s+[^\n]*ymm", asm)
    scalar_fmas = re.findall(r"vfmadd\w*s[sd]\s", asm)
    assert len(vector_fmas) >= mr * nv, f"expected at least {mr * nv} ymm FMAs, found {len(vector_fmas)}"
    assert not scalar_fmas, f"scalar FMAs in the micro-kernel: {scalar_fmas[:3]}"
