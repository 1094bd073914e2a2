"""The CPU backend under every micro-kernel of every family this host runs (avx512, avx2,
portable), on both paths (packed im2col and implicit GEMM), with odd tile sizes, thread counts
and channel splits.

Shapes are chosen so that output channels, output pixels and the reduction length are not
multiples of mr, nr or kc, so every edge-tile and partial-block path runs.
"""

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparkle
from sparkle import api, reference
from sparkle.cpu import backend
from sparkle.cpu.isa import ISAS, active_isa, supported_isas
from sparkle.memory import MemoryParams, TileSizes, cache_optimal_tile_size, detect_memory_params

from _helpers import DTYPES, Unchanged, assert_close_to_reference, make_array
from _strategies import build_inputs, conv_problem

# Every (family, micro-kernel) this host can run: on an AVX-512 host avx512, avx2 and portable.
FAMILY_SHAPES = [(isa, shape) for isa in supported_isas() for shape in isa.microkernels]
FAMILY_IDS = [f"{isa.name}-{mr}x{nv}" for isa, (mr, nv) in FAMILY_SHAPES]
family_and_shape = pytest.mark.parametrize("isa, microkernel", FAMILY_SHAPES, ids=FAMILY_IDS)


def register_width(isa, microkernel, dtype):
    """nr of a micro-kernel: its vectors of columns times the lanes of one of the family's registers."""
    return microkernel[1] * isa.lanes(np.dtype(dtype).itemsize)


def check_plan(plan, isa, microkernel, dtype, implicit, threads=None):
    assert (plan.mr, plan.nv, plan.nr) == (microkernel[0], microkernel[1], register_width(isa, microkernel, dtype))
    assert plan.implicit is implicit
    assert threads is None or plan.threads == threads


def tile_configs(mr, nr):
    """Tile sizes from degenerate to default; None means the planner's own choice."""
    return {
        "default": None,
        "kc1-minimal": TileSizes(kc=1, mc=mr, nc=nr),
        "kc2-mc-below-mr": TileSizes(kc=2, mc=1, nc=1),
        "kc3-odd-nc": TileSizes(kc=3, mc=2 * mr, nc=nr + 3),
        "kc8-mc-not-multiple": TileSizes(kc=8, mc=3 * mr + 1, nc=2 * nr),
        "kc5-small-nc": TileSizes(kc=5, mc=mr, nc=5),
    }


TILE_NAMES = list(tile_configs(1, 1))

# (x shape, w shape, kwargs) with awkward sizes: K in {13, 9, 8, 7, 5}, pixels in {63, 30, 9, 30, 148},
# reductions in {45, 12, 25, 17, 27}. Wide rows (and the pointwise case) give micro-panels whose
# pixels read consecutive input elements next to panels that cross padding or row ends.
CONV_CASES = {
    "3x3-pad": ((2, 5, 7, 9), (13, 5, 3, 3), dict(padding=1, activation="relu", bias=True)),
    "grouped-strided-dilated": ((1, 6, 11, 10), (9, 2, 3, 2),
                                dict(groups=3, stride=(2, 1), dilation=(1, 2), padding=(1, 0, 2, 1), bias=True)),
    "depthwise-x2-same": ((1, 4, 6, 5), (8, 1, 5, 5), dict(groups=4, stride=2, padding="same")),
    "pointwise": ((2, 17, 5, 6), (7, 17, 1, 1), dict(activation="relu")),
    "wide-rows": ((1, 3, 4, 37), (5, 3, 3, 3), dict(padding=1, bias=True, activation="relu")),
}


def conv_inputs(case, dtype, seed=0):
    x_shape, w_shape, kwargs = CONV_CASES[case]
    kwargs = dict(kwargs)
    rng = np.random.default_rng(seed)
    x = make_array(rng, x_shape, dtype, layout="negative")
    w = make_array(rng, w_shape, dtype, layout="F")
    bias = make_array(rng, (w_shape[0],), dtype) if kwargs.pop("bias", False) else None
    return x, w, bias, kwargs


def run_backend_conv(x, w, bias, kwargs, plan):
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    unchanged = Unchanged(x, w, bias)
    y = backend.conv2d(x, w, bias, spec, plan)
    unchanged.check()
    assert y.shape == spec.output_shape and y.dtype == x.dtype and y.flags.c_contiguous
    return y, reference.conv2d(x, w, bias, **kwargs), spec


def case_paths(cases):
    """(case, implicit) pairs: the packed path for every case, the implicit one where it applies."""
    pairs = []
    for case in cases:
        x_shape, w_shape, kwargs = CONV_CASES[case]
        kwargs = {key: value for key, value in kwargs.items() if key != "bias"}
        pairs += [(case, False), (case, True)]
    return pairs


CASE_PATHS = case_paths(CONV_CASES)
CASE_PATH_IDS = [f"{case}-{'implicit' if implicit else 'packed'}" for case, implicit in CASE_PATHS]
# The bounds-checked rerun (NUMBA_BOUNDSCHECK=1, every driver compiled again) covers every family,
# micro-kernel, dtype, case and path, with the degenerate and the awkward tilings.
BOUNDSCHECK_TILES = ("kc1-minimal", "kc2-mc-below-mr", "kc3-odd-nc")


def test_cases_cover_both_paths():
    assert {implicit for _, implicit in CASE_PATHS} == {False, True}
    assert {case for case, _ in CASE_PATHS} == set(CONV_CASES)
    assert ("pointwise", True) in CASE_PATHS and ("3x3-pad", True) in CASE_PATHS and ("wide-rows", True) in CASE_PATHS


def tiles_with_boundscheck_subset(names, subset):
    return [pytest.param(name, marks=pytest.mark.boundscheck) if name in subset else name for name in names]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tiles", tiles_with_boundscheck_subset(TILE_NAMES, BOUNDSCHECK_TILES))
@pytest.mark.parametrize("case, implicit", CASE_PATHS, ids=CASE_PATH_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@family_and_shape
def test_conv2d_every_microkernel_and_tiling(isa, microkernel, dtype, case, implicit, tiles, threads):
    x, w, bias, kwargs = conv_inputs(case, dtype)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    mr, nr = microkernel[0], register_width(isa, microkernel, dtype)
    plan = backend.plan_conv2d(spec, microkernel=microkernel, tiles=tile_configs(mr, nr)[tiles], threads=threads,
                               isa=isa, implicit=implicit)
    check_plan(plan, isa, microkernel, dtype, implicit, threads)
    y, ref, _ = run_backend_conv(x, w, bias, kwargs, plan)
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.boundscheck
@pytest.mark.parametrize("implicit", [False, True], ids=["packed", "implicit"])
@pytest.mark.parametrize("chunks", [2, 3, "all", "more-than-panels"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@family_and_shape
def test_conv2d_channel_chunks(isa, microkernel, dtype, threads, chunks, implicit):
    # Output-channel panels split across jobs, including chunks that get no panel at all.
    x, w, bias, kwargs = conv_inputs("3x3-pad", dtype, seed=1)
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    plan = backend.plan_conv2d(spec, microkernel=microkernel,
                               tiles=TileSizes(kc=4, mc=microkernel[0],
                                               nc=register_width(isa, microkernel, dtype) + 1),
                               threads=threads, isa=isa, implicit=implicit)
    check_plan(plan, isa, microkernel, dtype, implicit, threads)
    panels = -(-spec.out_channels // plan.mr)
    count = {"all": panels, "more-than-panels": panels + 2}.get(chunks, chunks)
    y, ref, _ = run_backend_conv(x, w, bias, kwargs, dataclasses.replace(plan, channel_chunks=count))
    assert_close_to_reference(y, ref, dtype)


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_planner_channel_split_is_within_panel_count(threads):
    x = np.zeros((1, 8, 2, 2), np.float32)
    small = api.conv2d_spec(x, np.zeros((60, 8, 1, 1), np.float32))
    plan = backend.plan_conv2d(small, threads=threads)
    assert plan.threads == threads
    assert 1 <= plan.channel_chunks <= -(-60 // plan.mr)
    assert plan.kc > 0 and plan.mc > 0 and plan.nc > 0
    # Plenty of pixel blocks: no reason to split output channels.
    big = api.conv2d_spec(np.zeros((8, 8, 64, 64), np.float32), np.zeros((60, 8, 1, 1), np.float32))
    assert backend.plan_conv2d(big, threads=threads).channel_chunks == 1


def test_plan_rejects_unknown_microkernel():
    spec = api.conv2d_spec(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 1, 1), np.float32))
    with pytest.raises(ValueError, match="microkernel"):
        backend.plan_conv2d(spec, microkernel=(5, 5))
    for isa in supported_isas():
        with pytest.raises(ValueError, match=rf"microkernel must be one of .*\({isa.name}\)"):
            backend.plan_conv2d(spec, microkernel=(5, 5), isa=isa)


@pytest.mark.parametrize("isa", supported_isas(), ids=lambda isa: isa.name)
def test_plan_rejects_another_familys_microkernel(isa):
    spec = api.conv2d_spec(np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 1, 1), np.float32))
    foreign = {shape for other in ISAS for shape in other.microkernels} - set(isa.microkernels)
    assert foreign
    for shape in sorted(foreign):
        with pytest.raises(ValueError, match=isa.name):
            backend.plan_conv2d(spec, microkernel=shape, isa=isa)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", supported_isas(), ids=lambda isa: isa.name)
def test_plan_uses_the_requested_family(isa, dtype):
    spec = api.conv2d_spec(np.zeros((1, 16, 20, 20), dtype), np.zeros((32, 16, 3, 3), dtype), padding=1)
    plan = backend.plan_conv2d(spec, isa=isa)
    assert (plan.mr, plan.nv) in isa.microkernels
    assert plan.nr == plan.nv * isa.lanes(np.dtype(dtype).itemsize)
    default = backend.plan_conv2d(spec)
    assert (default.mr, default.nv) in active_isa().microkernels
    assert default.nr == default.nv * active_isa().lanes(np.dtype(dtype).itemsize)


@pytest.mark.parametrize("isa", ISAS, ids=lambda isa: isa.name)
def test_plan_path_choice(isa):
    # Paths can be chosen with any family; the planner's own choice depends on the family.
    x = np.zeros((1, 8, 12, 12), np.float32)
    stride1 = api.conv2d_spec(x, np.zeros((16, 8, 3, 3), np.float32), padding=1)
    strided_1x1 = api.conv2d_spec(x, np.zeros((16, 8, 1, 1), np.float32), stride=2)
    strided_3x3 = api.conv2d_spec(x, np.zeros((16, 8, 3, 3), np.float32), stride=2)
    streaming = isa.planning == "streaming"
    for spec in (stride1, strided_1x1, strided_3x3):
        assert backend.plan_conv2d(spec, implicit=False, isa=isa).implicit is False
        assert backend.plan_conv2d(spec, implicit=True, isa=isa).implicit is True
        # AVX-512: every stride becomes phase planes, read by the implicit path. Families planned
        # as on AVX2 machines keep the packed path, which was measured there.
        assert backend.plan_conv2d(spec, isa=isa).implicit is streaming
    # In place, planes 4 KiB apart (32 x 32 floats) would map every B row onto the same L1 sets,
    # and many planes of a page or more would outrun the TLBs: those take the packed path.
    aliasing = api.conv2d_spec(np.zeros((1, 8, 32, 32), np.float32), np.zeros((16, 8, 1, 1), np.float32))
    many_pages = api.conv2d_spec(np.zeros((1, 600, 40, 40), np.float32), np.zeros((16, 600, 1, 1), np.float32))
    few_pages = api.conv2d_spec(np.zeros((1, 64, 40, 40), np.float32), np.zeros((16, 64, 1, 1), np.float32))
    assert backend.plan_conv2d(aliasing, isa=isa).implicit is False
    assert backend.plan_conv2d(many_pages, isa=isa).implicit is False
    assert backend.plan_conv2d(few_pages, isa=isa).implicit is streaming


MATMUL_SHAPES = [(1, 1, 1), (1, 5, 7), (5, 7, 13), (13, 17, 33), (33, 100, 17), (100, 33, 7), (17, 1, 100),
                 (7, 13, 1), (100, 100, 100)]


MATMUL_BOUNDSCHECK_SHAPES = ((5, 7, 13), (33, 100, 17), (17, 1, 100))


@pytest.mark.parametrize("implicit", [False, True], ids=["packed", "implicit"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tiles", ["default", "kc1-minimal", "kc3-odd-nc", "kc8-mc-not-multiple"])
@pytest.mark.parametrize("mkn", [pytest.param(s, marks=pytest.mark.boundscheck) if s in MATMUL_BOUNDSCHECK_SHAPES
                                 else s for s in MATMUL_SHAPES], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES)
@family_and_shape
def test_matmul_every_microkernel_and_tiling(isa, microkernel, dtype, mkn, tiles, threads, implicit):
    m, k, n = mkn
    rng = np.random.default_rng(m * 10000 + k * 100 + n)
    a = make_array(rng, (m, k), dtype, layout="F")
    b = make_array(rng, (k, n), dtype, layout="sliced")
    spec = api.matmul_spec(a, b)
    mr, nr = microkernel[0], register_width(isa, microkernel, dtype)
    plan = backend.plan_conv2d(backend.matmul_as_conv2d_spec(spec), microkernel=microkernel,
                               tiles=tile_configs(mr, nr)[tiles], threads=threads, isa=isa, implicit=implicit)
    check_plan(plan, isa, microkernel, dtype, implicit, threads)
    unchanged = Unchanged(a, b)
    c = backend.matmul(a, b, spec, plan)
    unchanged.check()
    assert c.shape == (m, n) and c.dtype == np.dtype(dtype) and c.flags.c_contiguous
    assert_close_to_reference(c, reference.matmul(a, b), dtype)


# --- cache detection and tile sizes -------------------------------------------------------------


def test_detect_memory_params_positive():
    params = sparkle.detect_memory_params()
    assert params.l1d > 0 and params.l2 > 0 and params.l3 > 0 and params.line > 0
    assert params.l1d <= params.l2
    assert params.source in ("sysfs", "sysconf", "defaults")


def test_sysfs_cache_description_is_parsed(tmp_path):
    # A fake /sys/devices/system/cpu/cpu0/cache tree: the instruction cache must be ignored.
    from sparkle.memory import _from_sysfs

    entries = [("Data", 1, "48K"), ("Instruction", 1, "32K"), ("Unified", 2, "2048K"), ("Unified", 3, "36M")]
    for i, (kind, level, size) in enumerate(entries):
        index = tmp_path / f"index{i}"
        index.mkdir()
        (index / "type").write_text(kind + "\n")
        (index / "level").write_text(f"{level}\n")
        (index / "size").write_text(size + "\n")
        (index / "coherency_line_size").write_text("64\n")
    params = _from_sysfs(tmp_path)
    assert (params.l1d, params.l2, params.l3, params.line) == (48 * 1024, 2048 * 1024, 36 * 1024 ** 2, 64)
    assert _from_sysfs(tmp_path / "missing") is None


def check_tiles(tiles, mr, nr):
    assert tiles.kc > 0 and tiles.mc > 0 and tiles.nc > 0
    assert tiles.kc % 8 == 0
    assert tiles.mc % mr == 0
    assert tiles.nc % nr == 0
    assert all(isinstance(v, int) for v in (tiles.kc, tiles.mc, tiles.nc))


@pytest.mark.parametrize("itemsize", [4, 8])
@family_and_shape
def test_cache_optimal_tile_size_for_this_machine(isa, microkernel, itemsize):
    mr, nr = microkernel[0], microkernel[1] * isa.lanes(itemsize)
    tiles = sparkle.cache_optimal_tile_size(mr, nr, itemsize)
    check_tiles(tiles, mr, nr)
    # A micro-panel pair of A and B fits in L1.
    assert (mr + nr) * tiles.kc * itemsize <= detect_memory_params().l1d


@settings(max_examples=100, deadline=None)
@given(mr=st.integers(1, 16), nr=st.integers(1, 64), itemsize=st.sampled_from([1, 2, 4, 8, 16]),
       l1d=st.integers(1, 1 << 20), l2=st.integers(1, 1 << 25), l3=st.integers(1, 1 << 30))
def test_cache_optimal_tile_size_any_cache(mr, nr, itemsize, l1d, l2, l3):
    # Even absurd caches (a few bytes) must give usable positive, aligned tiles.
    params = MemoryParams(l1d=l1d, l2=l2, l3=l3, line=64, source="test")
    check_tiles(cache_optimal_tile_size(mr, nr, itemsize, params), mr, nr)


@pytest.mark.parametrize("mr, nr, itemsize", [(0, 16, 4), (6, 0, 4), (6, 16, 0), (-6, 16, 4), (6, 16, -4)])
def test_cache_optimal_tile_size_rejects_non_positive(mr, nr, itemsize):
    with pytest.raises(ValueError, match="positive"):
        sparkle.cache_optimal_tile_size(mr, nr, itemsize)


@pytest.mark.parametrize("mr, nr, itemsize", [(2.5, 16, 4), (6, 16.0, 4), (6, 16, 4.5), ("6", 16, 4), (6, None, 4)])
def test_cache_optimal_tile_size_rejects_non_integers(mr, nr, itemsize):
    # Tile sizes are loop bounds and array sizes; floats must not leak into them.
    with pytest.raises((TypeError, ValueError), match=r"mr|nr|itemsize"):
        sparkle.cache_optimal_tile_size(mr, nr, itemsize)


@st.composite
def plan_choice(draw):
    isa, microkernel = draw(st.sampled_from(FAMILY_SHAPES))
    return dict(isa=isa, microkernel=microkernel, implicit=draw(st.booleans()), kc=draw(st.integers(1, 40)),
                mc=draw(st.integers(1, 40)), nc=draw(st.integers(1, 80)), threads=draw(st.integers(1, 3)),
                extra_chunks=draw(st.integers(0, 3)))


@pytest.mark.boundscheck
@settings(max_examples=300, deadline=None)
@given(problem=conv_problem(max_channels=20, max_size=20), choice=plan_choice())
def test_conv2d_random_problem_and_random_plan(problem, choice):
    # Any family, micro-kernel, path, tiling, thread count and channel split of any problem gives
    # the reference result.
    x, w, bias = build_inputs(problem)
    implicit = choice["implicit"]
    kwargs = dict(stride=problem["stride"], padding=problem["padding"], dilation=problem["dilation"],
                  groups=problem["groups"], activation=problem["activation"])
    spec = api.conv2d_spec(x, w, bias, **kwargs)
    plan = backend.plan_conv2d(spec, microkernel=choice["microkernel"],
                               tiles=TileSizes(choice["kc"], choice["mc"], choice["nc"]), threads=choice["threads"],
                               isa=choice["isa"], implicit=implicit)
    check_plan(plan, choice["isa"], choice["microkernel"], problem["dtype"], implicit, choice["threads"])
    panels = -(-(spec.out_channels // spec.groups) // plan.mr)
    plan = dataclasses.replace(plan, channel_chunks=min(plan.channel_chunks + choice["extra_chunks"], panels + 1))
    y, ref, _ = run_backend_conv(x, w, bias, kwargs, plan)
    assert_close_to_reference(y, ref, problem["dtype"])


# --- the planner's micro-kernel choice (README, "Micro-kernel") ------------------------------------------

def padded_area(k_group, pixels, mr, cols):
    """Multiply-add positions of a group's GEMM once output channels are padded to whole mr panels and
    pixels to whole panels of ``cols``: the real work plus the padding rows and columns."""
    return -(-k_group // mr) * mr * (-(-pixels // cols) * cols)


# (C, H, W, kernel, padding): 1-row images (pixels = W on both paths), and padded 3x3 ones, whose implicit
# grid also computes the 2 * padding columns between output rows. Reductions 3 to 1152: B in L1 or not.
PLANNER_SHAPES = [(3, 1, 56, 1, 0), (64, 1, 100, 1, 0), (128, 1, 3136, 1, 0), (1, 1, 7, 1, 0),
                  (16, 7, 7, 3, 1), (128, 14, 14, 3, 1), (8, 56, 56, 3, 1), (64, 28, 28, 3, 1)]


def expected_microkernel(isa, k_group, channels, height, width, kernel, padding, itemsize, implicit):
    """The planner's rule, computed here from the shapes: the least padded area; in a family planned as on
    AVX-512 ("streaming"), each place down the family's preference order costs 5 % more (the order: fewest
    loads per FMA first where B sits in L1 -- packed panels, or a reduction whose widest B panel fits in
    half of L1 -- else most rows first). Ties go to the earlier shape in the order."""
    out_h, out_w = height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1
    pixels = (out_h - 1) * (width + 2 * padding) + out_w if implicit else out_h * out_w
    lanes = isa.vector_bytes // itemsize
    reduction = channels * kernel * kernel
    widest_panel = max(nv for _, nv in isa.microkernels) * isa.vector_bytes
    b_in_l1 = not implicit or reduction * widest_panel <= detect_memory_params().l1d // 2
    order = isa.l1_preference if b_in_l1 and isa.l1_preference else isa.microkernels
    step = 0.05 if isa.planning == "streaming" else 0.0
    costs = {shape: padded_area(k_group, pixels, shape[0], shape[1] * lanes) * (1 + step * rank)
             for rank, shape in enumerate(order)}
    return min(order, key=lambda shape: (costs[shape], order.index(shape))), order, pixels, lanes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("isa", ISAS, ids=lambda isa: isa.name)
def test_planner_takes_the_microkernel_that_wastes_least_on_padding(isa, dtype):
    from sparkle.cpu.plan import choose_microkernel

    itemsize = np.dtype(dtype).itemsize
    for channels, height, width, kernel, padding in PLANNER_SHAPES:
        x = np.zeros((1, channels, height, width), dtype)
        for k_group in range(1, 66):
            spec = api.conv2d_spec(x, np.zeros((k_group, channels, kernel, kernel), dtype), padding=padding)
            for implicit in (False, True):
                expected, order, pixels, lanes = expected_microkernel(isa, k_group, channels, height, width, kernel,
                                                                      padding, itemsize, implicit)
                chosen = choose_microkernel(spec, isa, implicit)
                assert chosen == expected, (isa.name, spec, implicit)
                areas = {shape: padded_area(k_group, pixels, shape[0], shape[1] * lanes) for shape in order}
                if isa.planning != "streaming":  # exactly the least padding
                    assert areas[chosen] == min(areas.values())
                else:  # never more than 5 % per place of preference above the least
                    assert areas[chosen] <= min(areas.values()) * (1 + 0.05 * (len(order) - 1))
                if k_group % 16 == 1:  # what a call runs: plan_conv2d takes the same shape
                    plan = backend.plan_conv2d(spec, isa=isa, implicit=implicit)
                    assert (plan.mr, plan.nv) == chosen


def test_avx512_preference_can_outweigh_a_little_padding():
    """On AVX-512 the planner's choice is not always the least padding: K = 25 on the packed path (B in L1,
    6 x 4 preferred) keeps 6 x 4 (30 rows x 64 columns of 56 pixels: 1920) over 14 x 2 (28 x 64: 1792),
    since 14 x 2 is two places down the order and saves less than 10 %."""
    from sparkle.cpu.plan import choose_microkernel

    avx512 = next(isa for isa in ISAS if isa.name == "avx512")
    spec = api.conv2d_spec(np.zeros((1, 3, 1, 56), np.float32), np.zeros((25, 3, 1, 1), np.float32))
    assert padded_area(25, 56, 6, 64) == 1920 and padded_area(25, 56, 14, 32) == 1792
    assert avx512.l1_preference.index((14, 2)) - avx512.l1_preference.index((6, 4)) == 2
    assert choose_microkernel(spec, avx512, implicit=False) == (6, 4)


@pytest.mark.parametrize("channels", [3, 64, 511, 512, 513, 1024, 1152, 2304])
def test_avx512_tiles(channels):
    """README, "Tiles" (AVX-512): the implicit path runs the whole reduction in one block; the packed path
    takes equal blocks of at most 512 (plan.PACKED_KC), with the A block (mc x kc) in half of L2 and the
    packed panel (kc x pixel block) in a quarter. Planning is pure arithmetic: any host can check it."""
    from sparkle.cpu.plan import PACKED_KC

    avx512 = next(isa for isa in ISAS if isa.name == "avx512")
    spec = api.conv2d_spec(np.zeros((1, channels, 30, 30), np.float32), np.zeros((64, channels, 1, 1), np.float32))
    l2 = detect_memory_params().l2
    implicit = backend.plan_conv2d(spec, isa=avx512, implicit=True)
    assert implicit.kc == channels
    packed = backend.plan_conv2d(spec, isa=avx512, implicit=False)
    assert PACKED_KC == 512
    blocks = -(-channels // 512)  # as few blocks as 512 allows, all of one length
    assert packed.kc == -(-channels // blocks) <= 512
    assert packed.mc % packed.mr == 0 and packed.nc % packed.nr == 0
    assert packed.mc == packed.mr or packed.mc * packed.kc * 4 <= l2 // 2
    assert packed.nc == packed.nr or packed.kc * packed.nc * 4 <= l2 // 4
