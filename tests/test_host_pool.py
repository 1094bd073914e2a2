"""Results on reused host memory: a block goes back to the pool only once no array or view uses it."""

import gc
import pickle
import threading

import numpy as np
import pytest

import sparkle
from sparkle import host_pool, reference
from sparkle.host_pool import SMALLEST_POOLED_BYTES, HostPool

BIG = (SMALLEST_POOLED_BYTES // 4) * 2  # float32 elements: 2 MiB


def test_arrays_look_like_np_empty():
    pool = HostPool()
    for shape, dtype in [((BIG,), np.float32), ((4, 512, 512), np.float64), ((3, 7), np.float32)]:
        array = pool.empty(shape, dtype)
        assert array.shape == shape and array.dtype == dtype
        assert array.flags.c_contiguous and array.flags.writeable and array.flags.aligned
        if array.nbytes >= SMALLEST_POOLED_BYTES:
            assert array.ctypes.data % host_pool.ALIGNMENT_BYTES == 0
            assert not isinstance(array.base, np.ndarray)  # owned by a lease, not by a view's base array
        array[...] = 1
        assert array.sum() == array.size


def test_a_block_returns_only_when_every_view_is_gone():
    pool = HostPool()
    first = pool.empty((BIG,), np.float32)
    address = first.ctypes.data
    view = first[10:20].reshape(2, 5)
    del first
    gc.collect()
    second = pool.empty((BIG,), np.float32)
    assert not np.shares_memory(second, view)
    view[...] = 7
    second[...] = 3
    assert np.all(view == 7)  # the live view keeps its memory to itself
    del view
    gc.collect()
    third = pool.empty((BIG,), np.float32)
    assert third.ctypes.data == address  # the block came back and is reused
    assert not np.shares_memory(third, second)


def test_idle_blocks_stay_under_the_limit_longest_idle_first():
    limit = 5 * SMALLEST_POOLED_BYTES
    pool = HostPool(idle_limit_bytes=limit)
    arrays = [pool.empty((BIG,), np.float32) for _ in range(4)]
    addresses = [a.ctypes.data for a in arrays]
    while arrays:
        del arrays[0]  # given back in order: the first is the longest idle
    assert 0 < pool.idle_bytes <= limit
    reused = pool.empty((BIG,), np.float32)
    assert reused.ctypes.data in addresses[2:]  # the oldest idle blocks went back to the system
    pool.clear()
    assert pool.idle_bytes == 0


def test_arrays_larger_than_the_limit_and_object_arrays_are_plain():
    pool = HostPool(idle_limit_bytes=SMALLEST_POOLED_BYTES)
    assert pool.empty((BIG,), np.float32).flags.owndata
    assert HostPool().empty((BIG // 2,), object).flags.owndata


@pytest.mark.parametrize("text", ["-1", "lots", "1.5"])
def test_bad_limit_in_the_environment_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("SPARKLE_HOST_POOL_BYTES", text)
    with pytest.raises(ValueError, match=r"SPARKLE_HOST_POOL_BYTES.*byte count.*" + text):
        host_pool._idle_limit_from_environment()


def test_the_default_limit_grows_with_the_machine_within_bounds(monkeypatch):
    monkeypatch.delenv("SPARKLE_HOST_POOL_BYTES", raising=False)
    page = 4096
    for physical_gib, expected_mib in ((8, 512), (24, 768), (128, 4096), (1024, 4096)):
        pages = physical_gib * (1 << 30) // page
        monkeypatch.setattr(host_pool.os, "sysconf",
                            lambda name, pages=pages: pages if name == "SC_PHYS_PAGES" else page)
        assert host_pool._idle_limit_from_environment() == expected_mib << 20


def test_zero_in_the_environment_turns_the_pool_off(monkeypatch):
    monkeypatch.setenv("SPARKLE_HOST_POOL_BYTES", "0")
    pool = HostPool(host_pool._idle_limit_from_environment())
    assert pool.empty((BIG,), np.float32).flags.owndata


def test_pooled_arrays_pickle_and_copy_as_plain_arrays():
    array = HostPool().empty((BIG,), np.float32)
    array[:] = np.arange(array.size, dtype=np.float32)
    for clone in (pickle.loads(pickle.dumps(array)), array.copy()):
        assert np.array_equal(clone, array) and not np.shares_memory(clone, array)


def test_threads_never_share_a_live_block():
    pool = HostPool(idle_limit_bytes=8 * BIG * 4)
    errors = []

    def work(tag):
        for round_ in range(40):
            arrays = [pool.empty((BIG,), np.float32) for _ in range(2)]
            for i, array in enumerate(arrays):
                array[...] = tag * 1000 + round_ * 2 + i
            for i, array in enumerate(arrays):
                if not np.all(array == tag * 1000 + round_ * 2 + i):
                    errors.append((tag, round_, i))

    threads = [threading.Thread(target=work, args=(tag,)) for tag in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert pool.idle_bytes <= pool.idle_limit_bytes


def test_successive_cpu_results_are_right_whether_kept_or_dropped():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 16, 40, 40)).astype(np.float32)
    w = rng.standard_normal((64, 16, 3, 3)).astype(np.float32)
    expected = reference.conv2d(x, w, padding=1)
    assert expected.size * 4 >= SMALLEST_POOLED_BYTES  # the results come from the pool
    kept = []
    for i in range(6):
        result = sparkle.conv2d(x, w, padding=1, device="cpu")
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)
        if i % 2:
            kept.append(result)  # the others are dropped and their blocks reused
    for result in kept:
        np.testing.assert_allclose(result, expected, rtol=1e-4, atol=1e-4)
    assert all(not np.shares_memory(a, b) for a in kept for b in kept if a is not b)



def test_a_pool_with_an_owned_limit_overflows_to_ordinary_memory():
    pool = HostPool(idle_limit_bytes=8 * SMALLEST_POOLED_BYTES, owned_limit_bytes=5 * SMALLEST_POOLED_BYTES)
    kept = [pool.empty((BIG,), np.float32) for _ in range(2)]  # 2 MiB each (plus the granule): 2 blocks
    assert pool.owned_bytes > 4 * SMALLEST_POOLED_BYTES
    overflow = pool.empty((BIG,), np.float32)  # a third block would pass 5 MiB
    assert not np.shares_memory(overflow, kept[0]) and not np.shares_memory(overflow, kept[1])
    assert pool.owned_bytes <= pool.owned_limit_bytes
    overflow[...] = 2
    assert np.all(overflow == 2)
    address = kept[0].ctypes.data
    del kept[0]
    gc.collect()
    again = pool.empty((BIG,), np.float32)  # an idle block of its own comes first
    assert again.ctypes.data == address
    owned = pool.owned_bytes
    del again
    gc.collect()
    pool.clear()
    assert pool.owned_bytes == owned - pool_block_bytes(BIG * 4)


def pool_block_bytes(nbytes):
    granule = host_pool.BLOCK_GRANULE_BYTES
    return -(-(nbytes + host_pool.ALIGNMENT_BYTES) // granule) * granule
