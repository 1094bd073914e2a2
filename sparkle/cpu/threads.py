"""Thread placement for the CPU backend's parallel loops.

Some schedulers (VMs that pack vCPUs, for one) leave unbound worker threads on one
core for a whole process, which makes 2-thread calls 5-8x slower at random. So each
parallel driver binds Numba's worker threads, one CPU each, from the caller's allowed
set captured at call time, starting with the CPU the caller runs on:
slot i -> cpus[i % len(cpus)], where cpus[0] is the caller's CPU. The caller's own
thread runs slot 0 under the OpenMP layer (any slot under TBB, none under workqueue) and
is never bound, so workers land beside it, not on it.

Nothing outside Numba's pool changes: no environment variable is set (an OpenMP runtime
that reads OMP_PROC_BIND pins the caller's thread, every thread it starts later and
every child process), and the caller's mask is never touched. Binding the caller for
the call and restoring its mask afterwards was measured too: on a loaded 2-vCPU VM it
doubled the median call time (benchmarks/thread_placement.py). Numba's pool threads
stay bound between calls; they belong to Numba.

Use in a driver::

    cpus, caller = capture_binding(threads)
    for thread in prange(threads):
        bind_slot(cpus, caller, thread)
        ...

``SPARKLE_BIND_THREADS=0`` (read on import) or ``set_thread_binding(False)`` turns
binding off. Affinity calls that fail are counted (``binding_failures()``) and the slot
runs unbound: raising inside a prange loop would serialize it.
"""

import os

import numpy as np
from numba import njit

from . import affinity
from .affinity import (MASK_WORDS, bind_thread_to_cpu, binding_enabled, count_failure, current_cpu,
                       current_thread_id, get_thread_mask)


def set_thread_binding(enabled):
    """Bind worker threads in later calls (True) or leave all threads alone (False)."""
    affinity.set_enabled(enabled)


def thread_binding_enabled():
    """Whether calls bind their worker threads (False where the OS offers no affinity calls)."""
    return affinity.enabled()


def binding_failures():
    """Affinity calls that failed inside parallel loops since the process started."""
    return affinity.failure_count()


set_thread_binding(os.environ.get("SPARKLE_BIND_THREADS", "1") != "0")


@njit(cache=True)
def allowed_cpus(mask, first):
    """The CPU numbers set in ``mask``, ascending, except that ``first`` (if set) comes first."""
    count = 0
    for word in mask:
        while word:
            word &= word - np.uint64(1)
            count += 1
    cpus = np.empty(count, dtype=np.int64)
    count = 0
    for index in range(mask.size):
        for bit in range(64):
            if (mask[index] >> np.uint64(bit)) & np.uint64(1):
                cpus[count] = index * 64 + bit
                if cpus[count] == first:
                    cpus[0], cpus[count] = cpus[count], cpus[0]
                count += 1
    return cpus


@njit(cache=True)
def capture_binding(slots):
    """On the caller's thread, before a prange over ``slots``: the CPUs to bind slots to,
    the caller's CPU first (empty: bind nothing), and the caller's thread id."""
    if slots < 2 or not binding_enabled():  # one thread: nothing to spread
        return np.empty(0, dtype=np.int64), np.int64(0)
    mask = np.zeros(MASK_WORDS, dtype=np.uint64)
    if get_thread_mask(mask) != 0:
        count_failure()
        return np.empty(0, dtype=np.int64), np.int64(0)
    return allowed_cpus(mask, current_cpu()), current_thread_id()


@njit(cache=True)
def bind_slot(cpus, caller, slot):
    """First thing in prange slot ``slot``: bind the running thread to cpus[slot % len(cpus)],
    unless it is the caller's thread."""
    if cpus.size == 0 or current_thread_id() == caller:
        return
    if bind_thread_to_cpu(cpus[slot % cpus.size]) != 0:
        count_failure()
