"""The micro-kernels read and write through raw pointers, which NUMBA_BOUNDSCHECK cannot see.
Both drivers (packed im2col and implicit GEMM) check every operand range before each call: a
buffer that is too short must raise IndexError and leave memory outside the output untouched,
never read or write past an end."""

import numpy as np
import pytest

from sparkle import api, reference
from sparkle.cpu import backend, operands, prepared
from sparkle.cpu.isa import active_isa

# Plans of one thread run the drivers compiled without a parallel launch: both variants are checked.
THREADS = pytest.mark.parametrize("threads", [1, 2], ids=["serial", "parallel"])


def driver_arguments(dtype, threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 9, 9)).astype(dtype)
    w = rng.standard_normal((10, 4, 3, 3)).astype(dtype)
    spec = api.conv2d_spec(x, w, padding=1)
    plan = backend.plan_conv2d(spec, microkernel=active_isa().default_microkernel, implicit=False, threads=threads)
    launch = prepared.FusedLaunch(spec, plan)
    # Read-only inputs, as the backend passes them (so the compiled driver is reused).
    arguments = dict(x=operands.read_only_flat(x), w=operands.read_only_flat(w),
                     bias=operands.read_only_flat(np.zeros(10, dtype)),
                     out=np.zeros(int(np.prod(spec.output_shape)), dtype))
    rest = (launch.params, *launch.scratch.take())
    return launch.kernel, arguments, rest


def call(driver, arguments, rest):
    a = arguments
    driver(a["x"], a["w"], a["bias"], a["out"], *rest)


@pytest.mark.boundscheck
@THREADS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_intact_buffers_run(dtype, threads):
    driver, arguments, rest = driver_arguments(dtype, threads)
    call(driver, arguments, rest)
    assert np.any(arguments["out"] != 0)


@pytest.mark.boundscheck
@THREADS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("operand", ["w", "bias", "out"])
def test_short_operand_raises_instead_of_overrunning(dtype, operand, threads):
    driver, arguments, rest = driver_arguments(dtype, threads)
    # A view one element short of what the geometry needs, with a sentinel right after it.
    full = arguments[operand].copy()
    backing = np.concatenate([full[:-1], np.array([12345.0], dtype)])
    arguments[operand] = backing[:-1]
    if operand != "out":
        arguments[operand].flags.writeable = False
    with pytest.raises(IndexError, match="outside its buffer"):
        call(driver, arguments, rest)
    assert backing[-1] == 12345.0


# --- the implicit-GEMM driver -------------------------------------------------------------------

# Its call signature, as prepared.ImplicitLaunch calls it.
IMPLICIT_ARGUMENTS = ("x", "offsets", "w", "bias", "out", "params")


def implicit_driver_call(dtype, padding, threads):
    """(driver, its arguments by name, reference result) of a real implicit call, captured on its way
    from the launch to the driver: the padded copy (padding=1) or the input read in place (0)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 9)).astype(dtype)
    w = rng.standard_normal((10, 4, 3, 3)).astype(dtype)
    bias = rng.standard_normal(10).astype(dtype)
    spec = api.conv2d_spec(x, w, bias, padding=padding, activation="relu")
    plan = backend.plan_conv2d(spec, microkernel=active_isa().default_microkernel, implicit=True, threads=threads)
    launch = prepared.ImplicitLaunch(spec, plan)
    driver = launch.kernel
    captured = {}

    def capture(*args):
        assert len(args) == len(IMPLICIT_ARGUMENTS)
        captured["arguments"] = dict(zip(IMPLICIT_ARGUMENTS, args))
        return driver(*args)

    launch.kernel = capture
    y = np.empty(spec.output_shape, dtype)
    launch.run(x, w, bias, y.reshape(-1))
    expected = reference.conv2d(x, w, bias, padding=padding, activation="relu")
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    return driver, captured["arguments"], expected


def call_implicit(driver, arguments):
    driver(*(arguments[name] for name in IMPLICIT_ARGUMENTS))


@pytest.mark.boundscheck
@THREADS
@pytest.mark.parametrize("padding", [1, 0], ids=["padded-copy", "in-place"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_implicit_intact_buffers_run(dtype, padding, threads):
    driver, arguments, expected = implicit_driver_call(dtype, padding, threads)
    arguments["out"] = np.zeros_like(arguments["out"])
    call_implicit(driver, arguments)
    np.testing.assert_allclose(arguments["out"].reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.boundscheck
@THREADS
@pytest.mark.parametrize("padding", [1, 0], ids=["padded-copy", "in-place"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("operand", ["x", "w", "bias", "out"])
def test_implicit_short_operand_raises_instead_of_overrunning(dtype, operand, padding, threads):
    driver, arguments, _ = implicit_driver_call(dtype, padding, threads)
    # A view one element short of what the geometry needs, with a sentinel right after it; same
    # writeability as the real argument (so the compiled driver is reused).
    original = arguments[operand]
    backing = np.concatenate([original[:-1], np.array([12345.0], dtype)])
    arguments[operand] = backing[:-1]
    arguments[operand].flags.writeable = original.flags.writeable
    with pytest.raises(IndexError, match="outside its buffer"):
        call_implicit(driver, arguments)
    assert backing[-1] == 12345.0
