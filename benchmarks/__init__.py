"""Sparkle's benchmarks: the asv suite (``bench_*.py``) and scripts run by hand (the other modules).

Helpers for the asv suite's ``setup`` methods. Every benchmark checks one result against the float64
``sparkle.reference`` before anything is timed: a fast wrong kernel is a bug, reported as a failure. A
benchmark that cannot run here (no such device, a device that cannot run Sparkle's kernels, a call that
fell back to the CPU backend) raises NotImplementedError in ``setup``, which asv reports as skipped; the
reason is printed as ``asv: skipped: ...`` (``asv run -e`` shows it). Sparkle is imported only inside
these functions, so that the scripts of this package can import it without loading Numba.
"""

TOLERANCE = 1e-5  # relative L2 error of a float32 result against the float64 reference, as the tests allow
CHECK_ROWS = 64  # matmul rows checked against the reference (with the first and last ones)
CHECK_POINTS = 512  # conv2d outputs checked at N > 1 (the full reference would add to a peakmem benchmark)


def relative_error(result, expected):
    """||result - expected|| / ||expected||, in float64."""
    import numpy as np

    result = np.asarray(result, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(float(np.linalg.norm(expected.ravel())), np.finfo(np.float64).tiny)
    return float(np.linalg.norm((result - expected).ravel())) / scale


def _require_close(error, what):
    if not error <= TOLERANCE:  # `not <=` also catches NaN
        raise AssertionError(f"{what}: relative L2 error {error:.3e} against sparkle.reference exceeds "
                             f"{TOLERANCE:g}; a wrong result is not benchmarked")


def check_conv2d(result, x, w, kwargs, what):
    """AssertionError unless ``result`` (numpy or a DeviceArray) is ``conv2d(x, w, **kwargs)``: all of it
    at N=1, else a random sample of outputs with the first and the last."""
    import numpy as np

    from sparkle import reference

    result = np.asarray(result)
    if x.shape[0] == 1:
        _require_close(relative_error(result, reference.conv2d(x, w, **kwargs)), what)
        return
    rng = np.random.default_rng(1)
    points = np.stack([rng.integers(0, size, CHECK_POINTS) for size in result.shape], axis=1)
    points[:2] = [[0] * result.ndim, [size - 1 for size in result.shape]]
    expected = reference.conv2d_at(x, w, points=points, **kwargs)
    _require_close(relative_error(result[tuple(points.T)], expected), what)


def check_matmul(result, a, b, what):
    """AssertionError unless ``result`` is ``a @ b`` on a sample of rows (the full float64 product of
    the largest sizes would take seconds)."""
    import numpy as np

    from sparkle import reference

    m = a.shape[0]
    edge = min(4, m)
    rng = np.random.default_rng(1)
    rows = np.unique(np.concatenate([np.arange(edge), np.arange(m - edge, m), rng.integers(0, m, CHECK_ROWS)]))
    _require_close(relative_error(np.asarray(result)[rows], reference.matmul(a[rows], b)), what)


def cpu_backend_or_skip():
    """NotImplementedError (asv's skip) when the Numba CPU backend cannot run here, e.g. SPARKLE_CPU_ISA
    asks for an instruction set this CPU lacks."""
    from sparkle.cpu.isa import active_isa

    try:
        active_isa()
    except ValueError as error:
        raise NotImplementedError(f"the CPU backend cannot run: {error}") from None
