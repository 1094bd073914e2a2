"""Timing and memory measurement shared by the demo and the benchmarks.

Timings on a shared machine are noisy: take the best of several calls, and interleave
the candidates being compared so that a slow phase cannot take all of one's samples.
"""

import time
import tracemalloc


def timed(fn):
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_time(fn, repeat):
    """Best wall time of ``repeat`` calls: the least disturbed by other work on the machine."""
    return min(timed(fn)[0] for _ in range(repeat))


def interleaved_best(calls, repeat, burst=1, settle=0.0):
    """Best seconds of each named callable over ``repeat`` rounds; each round calls every
    one ``burst`` times in a row. Round-robin spreads each one's samples over the run, so
    a slow phase of a noisy machine cannot take all of them. Warm calls up beforehand.

    ``settle`` seconds of sleep before each burst let the previous library's worker
    threads stop spinning (OpenBLAS's spin for up to about 0.1 s after a call and would
    take cores from whatever runs next)."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeat):
        for name, fn in calls.items():
            time.sleep(settle)
            for _ in range(burst):
                best[name] = min(best[name], timed(fn)[0])
    return best


def peak_extra_memory(fn):
    """Peak bytes allocated while ``fn()`` runs, its result included, as tracemalloc sees them
    (numpy reports its buffers to tracemalloc; memory allocated inside compiled code is not seen)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result  # held until the peak is read, so that the output counts
    finally:
        tracemalloc.stop()
    return peak - before
