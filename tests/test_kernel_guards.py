"""The micro-kernel reads and writes through raw pointers, which NUMBA_BOUNDSCHECK cannot see.
The driver checks every operand range before each call: a buffer that is too short must raise
IndexError and leave memory outside the output untouched, never read or write past an end."""

import numpy as np
import pytest

from sparkle import api
from sparkle.cpu import backend, operands
from sparkle.cpu.conv2d import fused_conv2d_driver


def driver_arguments(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 9, 9)).astype(dtype)
    w = rng.standard_normal((10, 4, 3, 3)).astype(dtype)
    spec = api.conv2d_spec(x, w, padding=1)
    plan = backend.plan_conv2d(spec, microkernel=backend.DEFAULT_MICROKERNEL)
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
