"""The micro-kernels read and write through raw pointers, which NUMBA_BOUNDSCHECK cannot see.
Both drivers (packed im2col and implicit GEMM) check every operand range before each call: a
buffer that is too short must raise IndexError and leave memory outside the output untouched,
never read or write past an end."""

import numpy as np
import pytest

from sparkle import api, reference
from sparkle.cpu import backend, operands
from sparkle.cpu.conv2d import fused_conv2d_driver
from sparkle.cpu.isa import active_isa


def driver_arguments(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 9, 9)).astype(dtype)
    w = rng.standard_normal((10, 4, 3, 3)).astype(dtype)
    spec = api.conv2d_spec(x, w, padding=1)
    plan = backend.plan_conv2d(spec, microkernel=active_isa().default_microkernel, implicit=False)
    scratch = operands.allocate_scratch(spec, plan)
    w_rows, lda = operands.weight_rows(w)
    # Read-only inputs, as the backend passes them (so the compiled driver is reused).
    arguments = dict(x=operands.read_only_flat(x), w=operands.read_only_flat(w_rows), lda=lda,
                     bias=operands.read_only_flat(np.zeros(10, dtype)),
                     out=np.zeros(int(np.prod(spec.output_shape)), dtype))
    rest = (operands.geometry(spec), False, False, plan.kc, plan.mc, plan.nc, plan.channel_chunks,
            scratch.panel, scratch.origins, scratch.offsets, scratch.runs, scratch.rows, scratch.tile)
    return fused_conv2d_driver(plan.mr, plan.nv, plan.nr), arguments, rest


def call(driver, arguments, rest):
    a = arguments
    driver(a["x"], a["w"], a["lda"], a["bias"], a["out"], *rest)


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_intact_buffers_run(dtype):
    driver, arguments, rest = driver_arguments(dtype)
    call(driver, arguments, rest)
    assert np.any(arguments["out"] != 0)


@pytest.mark.boundscheck
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("operand", ["w", "bias", "out"])
def test_short_operand_raises_instead_of_overrunning(dtype, operand):
    driver, arguments, rest = driver_arguments(dtype)
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

# Its call signature, as backend._run_implicit calls it.
IMPLICIT_ARGUMENTS = ("x", "plane", "pitch", "offsets", "w", "lda", "bias", "out", "shape", "use_bias", "relu", "kc",
                      "mc", "nc", "channel_chunks", "threads")


def implicit_driver_call(dtype, padding, monkeypatch):
    """(driver, its arguments by name, reference result) of a real implicit call, captured on its way
    from the backend to the driver: the padded copy (padding=1) or the input read in place (0)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 9)).astype(dtype)
    w = rng.standard_normal((10, 4, 3, 3)).astype(dtype)
    bias = rng.standard_normal(10).astype(dtype)
    spec = api.conv2d_spec(x, w, bias, padding=padding, activation="relu")
    plan = backend.plan_conv2d(spec, microkernel=active_isa().default_microkernel, implicit=True, threads=2)
    captured = {}
    real_factory = backend.implicit_conv2d_driver

    def capturing_factory(mr, nv, nr):
        driver = real_factory(mr, nv, nr)
        captured["driver"] = driver

        def capture(*args):
            assert len(args) == len(IMPLICIT_ARGUMENTS)
            captured["arguments"] = dict(zip(IMPLICIT_ARGUMENTS, args))
            return driver(*args)

        return capture

    monkeypatch.setattr(backend, "implicit_conv2d_driver", capturing_factory)
    y = backend.conv2d(x, w, bias, spec, plan)
    monkeypatch.undo()
    expected = reference.conv2d(x, w, bias, padding=padding, activation="relu")
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    return captured["driver"], captured["arguments"], expected


def call_implicit(driver, arguments):
    driver(*(arguments[name] for name in IMPLICIT_ARGUMENTS))


@pytest.mark.boundscheck
@pytest.mark.parametrize("padding", [1, 0], ids=["padded-copy", "in-place"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_implicit_intact_buffers_run(dtype, padding, monkeypatch):
    driver, arguments, expected = implicit_driver_call(dtype, padding, monkeypatch)
    arguments["out"] = np.zeros_like(arguments["out"])
    call_implicit(driver, arguments)
    np.testing.assert_allclose(arguments["out"].reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.boundscheck
@pytest.mark.parametrize("padding", [1, 0], ids=["padded-copy", "in-place"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("operand", ["x", "w", "bias", "out"])
def test_implicit_short_operand_raises_instead_of_overrunning(dtype, operand, padding, monkeypatch):
    driver, arguments, _ = implicit_driver_call(dtype, padding, monkeypatch)
    # A view one element short of what the geometry needs, with a sentinel right after it; same
    # writeability as the real argument (so the compiled driver is reused).
    original = arguments[operand]
    backing = np.concatenate([original[:-1], np.array([12345.0], dtype)])
    arguments[operand] = backing[:-1]
    arguments[operand].flags.writeable = original.flags.writeable
    with pytest.raises(IndexError, match="outside its buffer"):
        call_implicit(driver, arguments)
    assert backing[-1] == 12345.0
