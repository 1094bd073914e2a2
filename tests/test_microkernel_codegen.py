"""Both micro-kernel intrinsics, for every family this host runs and each of its shapes, in float32
and float64: the block they compute (against a float64 numpy product), what they must not write,
and the code LLVM makes of them. They must compile to full-width vector FMAs on the family's
registers (zmm for avx512, ymm for avx2, xmm for portable): a kernel that falls back to scalar or
narrower code is still correct (the other tests check that) but 2-16x slower."""

import platform
import re

import numpy as np
import pytest
from numba import njit

from sparkle.cpu.isa import supported_isas, target_features
from sparkle.cpu.microkernel import implicit_microkernel, microkernel

from _helpers import assert_close_to_reference

FAMILY_SHAPES = [(isa, shape) for isa in supported_isas() for shape in isa.microkernels]
FAMILY_IDS = [f"{isa.name}-{mr}x{nv}" for isa, (mr, nv) in FAMILY_SHAPES]
family_and_shape = pytest.mark.parametrize("isa, shape", FAMILY_SHAPES, ids=FAMILY_IDS)
dtypes = pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])

REGISTER = {"avx512": "zmm", "avx2": "ymm", "portable": "xmm"}
X86 = platform.machine().lower() in ("x86_64", "amd64")

# (a_rows, load_c, use_bias, relu) of the calls each compiled kernel makes: full and edge blocks,
# every epilogue flag on and off.
EPILOGUES = [(None, False, False, False), (-1, True, True, True), (1, False, True, False), (1, True, False, True)]


def rows_for(mr, a_rows):
    return mr if a_rows is None else max(1, mr + a_rows) if a_rows < 0 else a_rows


def epilogue(block, a_rows, c_before, load_c, bias, use_bias, relu):
    """The write-back the intrinsics fuse: + C, + bias row, ReLU (float64)."""
    if load_c:
        block = block + c_before
    if use_bias:
        block = block + bias[np.minimum(np.arange(block.shape[0]), a_rows - 1)][:, None]
    return np.maximum(block, 0) if relu else block


def assert_vector_fmas(asm, isa, dtype, count):
    """At least ``count`` packed FMAs (or multiply and add where the target lacks FMA), all on the
    family's registers, and no scalar FMA."""
    if not X86:
        return  # the instruction names below are x86's; the results were checked
    suffix = "ps" if np.dtype(dtype) == np.float32 else "pd"
    register = REGISTER[isa.name]
    scalar_fmas = re.findall(r"vfmadd\w*s[sd]\s[^\n]*", asm)
    assert not scalar_fmas, f"scalar FMAs in the micro-kernel: {scalar_fmas[:3]}"
    fmas = re.findall(rf"vfmadd\w*{suffix}\s[^\n]*", asm)
    if "fma" in target_features():
        on_family = [line for line in fmas if f"%{register}" in line]
        elsewhere = [line for line in fmas if f"%{register}" not in line]
        assert len(on_family) >= count, f"expected at least {count} {register} FMAs, found {len(on_family)}"
        assert not elsewhere, f"FMAs on other registers than {register}: {elsewhere[:3]}"
    else:
        # Only the portable family runs without FMA: a multiply and an add per step.
        assert isa.name == "portable" and not fmas
        multiplies = re.findall(rf"v?mul{suffix}\s[^\n]*%{register}", asm)
        adds = re.findall(rf"v?add{suffix}\s[^\n]*%{register}", asm)
        assert len(multiplies) >= count and len(adds) >= count, (len(multiplies), len(adds))


# --- packed B: microkernel ----------------------------------------------------------------------


def packed_kernel(mr, nv, lanes):
    @njit
    def run(kc, a, a_off, lda, a_rows, b, b_off, c, c_off, ldc, load_c, bias, bias_off, use_bias, relu):
        microkernel(mr, nv, lanes, kc, a, a_off, lda, a_rows, b, b_off, c, c_off, ldc, load_c, bias, bias_off,
                    use_bias, relu)

    return run


@family_and_shape
@dtypes
def test_packed_microkernel_block_and_vector_fmas(isa, shape, dtype):
    mr, nv = shape
    lanes = isa.lanes(np.dtype(dtype).itemsize)
    nr = nv * lanes
    kc, lda, a_off, b_off, c_off, bias_off, ldc = 37, 41, 2, 3, 4, 1, nr + 5
    rng = np.random.default_rng(mr * 100 + nv)
    run = packed_kernel(mr, nv, lanes)
    for a_rows_choice, load_c, use_bias, relu in EPILOGUES:
        a_rows = rows_for(mr, a_rows_choice)
        a = rng.standard_normal(a_off + mr * lda).astype(dtype)
        # Rows at or past a_rows are not part of A: the kernel must repeat the last valid row instead.
        a[a_off + a_rows * lda:] = np.nan
        b = rng.standard_normal(b_off + kc * nr + 3).astype(dtype)
        bias = rng.standard_normal(bias_off + mr + 2).astype(dtype)
        bias[bias_off + a_rows:] = np.nan
        c = rng.standard_normal(c_off + mr * ldc + 6).astype(dtype)
        before = c.copy()
        run(kc, a, a_off, lda, a_rows, b, b_off, c, c_off, ldc, load_c, bias, bias_off, use_bias, relu)

        a_block = a[a_off:a_off + mr * lda].reshape(mr, lda)[np.minimum(np.arange(mr), a_rows - 1), :kc]
        b_block = b[b_off:b_off + kc * nr].reshape(kc, nr)
        written = np.zeros(c.size, bool)
        index = c_off + np.arange(mr)[:, None] * ldc + np.arange(nr)[None, :]
        written[index] = True
        expected = epilogue(a_block.astype(np.float64) @ b_block, a_rows, before[index].astype(np.float64), load_c,
                            bias[bias_off:].astype(np.float64), use_bias, relu)
        assert np.all(np.isfinite(c[index])), "a row past a_rows of A or of the bias was read"
        assert_close_to_reference(c[index], expected, dtype)
        np.testing.assert_array_equal(c[~written], before[~written], err_msg="written outside the block")
    assert_vector_fmas(run.inspect_asm(run.signatures[0]), isa, dtype, mr * nv)


# --- B read from the input: implicit_microkernel ------------------------------------------------


def implicit_kernel(mr, nv, lanes):
    @njit
    def run(kc, a, a_off, lda, a_rows, x, x_off, offsets, v0, v_end, pitch, out_w, c, c_off, ldc, load_c, bias,
            bias_off, use_bias, relu):
        implicit_microkernel(mr, nv, lanes, kc, a, a_off, lda, a_rows, x, x_off, offsets, v0, v_end, pitch, out_w,
                             c, c_off, ldc, load_c, bias, bias_off, use_bias, relu)

    return run


def implicit_expected(a, a_off, lda, a_rows, x, x_off, offsets, v0, v_end, pitch, out_w, c_before, c_off, ldc,
                      load_c, bias, bias_off, use_bias, relu, kc, nr):
    """{index into c: value} of every element the implicit block must store, in float64."""
    stores = {}
    lanes = [l for l in range(nr) if v0 + l < v_end and (v0 + l) % pitch < out_w]
    for i in range(a_rows):
        for l in lanes:
            v = v0 + l
            oh, ow = divmod(v, pitch)
            value = sum(float(a[a_off + i * lda + p]) * float(x[x_off + offsets[p] + v]) for p in range(kc))
            position = c_off + i * ldc + oh * out_w + ow
            if load_c:
                value += float(c_before[position])
            if use_bias:
                value += float(bias[bias_off + i])
            stores[position] = max(value, 0.0) if relu else value
    return stores


@family_and_shape
@dtypes
def test_implicit_microkernel_block_masks_and_vector_fmas(isa, shape, dtype):
    mr, nv = shape
    lanes = isa.lanes(np.dtype(dtype).itemsize)
    nr = nv * lanes
    kc, lda, a_off, x_off, c_off, bias_off = 11, 13, 2, 3, 2, 1
    pitch, out_w = 7, 5  # grid columns 5 and 6 of each output row are computed, never stored
    rng = np.random.default_rng(mr * 100 + nv + 7)
    # B row p is x[x_off + offsets[p] + v]: taps of a 2-channel 2x3 kernel on the grid, in a scrambled order.
    offsets = np.array([c * 97 + r * pitch + s for c in range(2) for r in range(2) for s in range(3)][:kc - 1]
                       + [5], np.int64)[rng.permutation(kc)]
    run = implicit_kernel(mr, nv, lanes)
    # (v0, v_end): a whole panel starting mid-row, the grid's last panel (masked loads), a single lane,
    # a panel starting on a row's first pixel.
    panels = [(10, 10 + nr + 40), (10, 10 + max(1, nr - 3)), (pitch + 4, pitch + 5), (2 * pitch, 2 * pitch + nr)]
    for (v0, v_end), (a_rows_choice, load_c, use_bias, relu) in zip(panels, EPILOGUES):
        a_rows = rows_for(mr, a_rows_choice)
        out_h = (v0 + nr) // pitch + 2
        ldc = out_h * out_w + 3
        a = rng.standard_normal(a_off + mr * lda).astype(dtype)
        x = rng.standard_normal(x_off + int(offsets.max()) + v0 + nr + 5).astype(dtype)
        bias = rng.standard_normal(bias_off + mr + 2).astype(dtype)
        c = rng.standard_normal(c_off + mr * ldc + 4).astype(dtype)  # every element is its own sentinel
        before = c.copy()
        run(kc, a, a_off, lda, a_rows, x, x_off, offsets, v0, v_end, pitch, out_w, c, c_off, ldc, load_c, bias,
            bias_off, use_bias, relu)

        stores = implicit_expected(a, a_off, lda, a_rows, x, x_off, offsets, v0, v_end, pitch, out_w, before, c_off,
                                   ldc, load_c, bias, bias_off, use_bias, relu, kc, nr)
        assert stores, "the case must store something"
        positions = np.array(sorted(stores))
        assert_close_to_reference(c[positions], np.array([stores[p] for p in positions]), dtype)
        untouched = np.ones(c.size, bool)
        untouched[positions] = False
        changed = np.flatnonzero(c[untouched] != before[untouched])
        assert changed.size == 0, (
            f"v0={v0} v_end={v_end} a_rows={a_rows}: wrote {changed.size} elements outside the real pixels of "
            f"rows < a_rows (masked lanes, grid columns >= out_w, pixels >= v_end or rows >= a_rows)")
    assert_vector_fmas(run.inspect_asm(run.signatures[0]), isa, dtype, mr * nv)
