"""Bad input aimed at an OpenCL device fails exactly as on the CPU: the cases of tests/test_bad_input.py and
tests/test_matmul.py (imported, not copied) with device="opencl:N", the same exception types and messages,
and inputs unchanged; the same malformed arrays given as DeviceArrays; and misuse of to_device.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import sparkle  # noqa: E402
from sparkle import DeviceArray  # noqa: E402

import test_bad_input as cpu_cases  # noqa: E402
import test_matmul as cpu_matmul  # noqa: E402
from _helpers import Unchanged  # noqa: E402
from _opencl import opencl_device_ids, opencl_params, sparkle_cache  # noqa: E402,F401
from test_bad_input import ARRAY_CASES, BAD_PADDINGS, BAD_PAIRS, call_conv, good_inputs, zeros  # noqa: E402

pytestmark = pytest.mark.usefixtures("sparkle_cache")

DEVICES = opencl_params()


def parametrized(function, argnames):
    """The parameter sets of ``function``'s ``@pytest.mark.parametrize(argnames, ...)`` (cases not copied)."""
    for mark in function.pytestmark:
        if mark.name == "parametrize" and mark.args[0] == argnames:
            return list(mark.args[1])
    raise LookupError(f"{function.__name__} has no parametrize({argnames!r}, ...)")


def case_id(value):
    return repr(value) if not isinstance(value, dict) else ",".join(
        f"{k}={getattr(v, 'shape', v)}{getattr(v, 'dtype', '')}" for k, v in value.items())


# --- the CPU cases, on the device ------------------------------------------------------------------

@pytest.mark.parametrize("arguments, error, match", ARRAY_CASES, ids=[case_id(c[0]) for c in ARRAY_CASES])
@pytest.mark.parametrize("device_id", DEVICES)
def test_bad_arrays(device_id, arguments, error, match):
    with pytest.raises(error, match=match):
        call_conv(sparkle.conv2d, device=device_id, **arguments)


@pytest.mark.parametrize("value, error", parametrized(cpu_cases.test_bad_groups, "value, error"), ids=case_id)
@pytest.mark.parametrize("device_id", DEVICES)
def test_bad_groups(device_id, value, error):
    with pytest.raises(error, match=r"^groups\b"):
        call_conv(groups=value, device=device_id)


@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value, error", BAD_PAIRS, ids=[repr(v) for v, _ in BAD_PAIRS])
@pytest.mark.parametrize("device_id", DEVICES)
def test_bad_stride_and_dilation(device_id, name, value, error):
    with pytest.raises(error, match=rf"^{name}\b"):
        call_conv(**{name: value}, device=device_id)


@pytest.mark.parametrize("value, error", BAD_PADDINGS, ids=[repr(v) for v, _ in BAD_PADDINGS])
@pytest.mark.parametrize("device_id", DEVICES)
def test_bad_padding(device_id, value, error):
    with pytest.raises(error, match=r"^padding\b"):
        call_conv(padding=value, device=device_id)


@pytest.mark.parametrize("x_hw, kernel, kwargs",
                         parametrized(cpu_cases.test_output_smaller_than_one_pixel, "x_hw, kernel, kwargs"))
@pytest.mark.parametrize("device_id", DEVICES)
def test_output_smaller_than_one_pixel(device_id, x_hw, kernel, kwargs):
    with pytest.raises(ValueError, match=r"^output size"):
        call_conv(x=zeros((1, 4, *x_hw)), w=zeros((6, 4, *kernel)), device=device_id, **kwargs)


@pytest.mark.parametrize("value", parametrized(cpu_cases.test_bad_activation, "value"), ids=case_id)
@pytest.mark.parametrize("device_id", DEVICES)
def test_bad_activation(device_id, value):
    with pytest.raises(ValueError, match=r"^activation\b"):
        call_conv(activation=value, device=device_id)


@pytest.mark.parametrize("device_id", DEVICES)
def test_groups_must_divide_channels(device_id):
    with pytest.raises(ValueError, match=r"^groups\b"):
        call_conv(w=zeros((6, 1, 3, 3)), groups=3, device=device_id)
    with pytest.raises(ValueError, match=r"^groups\b"):
        call_conv(x=zeros((1, 6, 8, 8)), w=zeros((5, 3, 3, 3)), bias=zeros(5), groups=2, device=device_id)


MATMUL_CASES = parametrized(cpu_matmul.test_matmul_bad_input, "a, b, error, match")


@pytest.mark.parametrize("a, b, error, match", MATMUL_CASES,
                         ids=[f"{case_id(getattr(a, 'shape', a))}@{case_id(getattr(b, 'shape', b))}"
                              for a, b, _, _ in MATMUL_CASES])
@pytest.mark.parametrize("device_id", DEVICES)
def test_matmul_bad_input(device_id, a, b, error, match):
    unchanged = Unchanged(a, b)
    with pytest.raises(error, match=match):
        sparkle.matmul(a, b, device=device_id)
    unchanged.check()


@pytest.mark.parametrize("device", ["opencl:99", "opencl:-1", "opencl:", "opencl:0 ", "OpenCL:0", "opencl0"])
def test_unknown_opencl_device_lists_available_ones(device):
    with pytest.raises(ValueError, match=r"^device\b") as info:
        call_conv(device=device)
    for available in ["auto", "reference", "opencl", *(d.id for d in sparkle.devices())]:
        assert repr(available) in str(info.value)
    assert set(opencl_device_ids()) <= {d.id for d in sparkle.devices()}


# --- the same malformed arrays as DeviceArrays -----------------------------------------------------

def on_device(value, device_id):
    """A float numpy array as a DeviceArray; anything else (ints, lists, scalars) as it is."""
    if isinstance(value, np.ndarray) and value.dtype in (np.float32, np.float64):
        return sparkle.to_device(value, device_id)
    return value


DEVICE_ARRAY_CASES = [case for case in ARRAY_CASES
                      if any(isinstance(v, np.ndarray) and v.dtype in (np.float32, np.float64)
                             for v in case[0].values())]


@pytest.mark.parametrize("arguments, error, match", DEVICE_ARRAY_CASES,
                         ids=[case_id(c[0]) for c in DEVICE_ARRAY_CASES])
@pytest.mark.parametrize("device_id", DEVICES)
def test_bad_device_arrays(device_id, arguments, error, match):
    # Wrong shapes and dtype mismatches given as DeviceArrays (the good inputs too): same errors, and every
    # device array holds what it held before.
    given = dict(zip(("x", "w", "bias"), good_inputs()), **arguments)
    args = {name: on_device(value, device_id) for name, value in given.items()}
    before = {name: value.get() for name, value in args.items() if isinstance(value, DeviceArray)}
    assert any(name in before for name in arguments)
    for device in ("auto", device_id):
        with pytest.raises(error, match=match):
            sparkle.conv2d(args["x"], args["w"], args["bias"], device=device)
    for name, host in before.items():
        np.testing.assert_array_equal(args[name].get(), host)


@pytest.mark.parametrize("a_shape, b_shape, a_dtype, b_dtype, error, match", [
    ((2, 3), (4, 2), np.float32, np.float32, ValueError, r"a\.shape\[1\]"),
    ((2, 3, 1), (3, 2), np.float32, np.float32, ValueError, r"^a\b.*2-D"),
    ((2, 3), (3,), np.float64, np.float64, ValueError, r"^b\b.*2-D"),
    ((2, 3), (3, 2), np.float32, np.float64, TypeError, r"\ba\b.*\bb\b.*dtype"),
])
@pytest.mark.parametrize("device_id", DEVICES)
def test_matmul_bad_device_arrays(device_id, a_shape, b_shape, a_dtype, b_dtype, error, match):
    a, b = np.ones(a_shape, a_dtype), np.ones(b_shape, b_dtype)
    for a_given, b_given in itertools.product((a, sparkle.to_device(a, device_id)),
                                              (b, sparkle.to_device(b, device_id))):
        if isinstance(a_given, np.ndarray) and isinstance(b_given, np.ndarray):
            continue  # covered by test_matmul_bad_input
        with pytest.raises(error, match=match):
            sparkle.matmul(a_given, b_given)


@pytest.mark.parametrize("value, error", [
    ([[1.0, 2.0], [3.0, 4.0]], TypeError), (np.zeros((2, 2), np.int64), TypeError),
    (np.zeros(3, np.int32), TypeError), (np.zeros((2, 2), np.float16), TypeError),
    (np.zeros(2, np.complex64), TypeError), (np.zeros(2, bool), TypeError), (3.0, TypeError),
    (np.float32(3.0), TypeError), (None, TypeError), ("array", TypeError),
], ids=repr)
@pytest.mark.parametrize("device_id", DEVICES)
def test_to_device_rejects_non_float_arrays(device_id, value, error):
    unchanged = Unchanged(value)
    with pytest.raises(error, match=r"^array\b"):
        sparkle.to_device(value, device_id)
    unchanged.check()


@pytest.mark.parametrize("device", ["gpu", "opencl:99", "", "CPU"])
def test_to_device_unknown_device(device):
    x = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"^device\b"):
        sparkle.to_device(x, device)


@pytest.mark.parametrize("device", [None, 0, ["opencl"]])
def test_to_device_device_must_be_a_string(device):
    with pytest.raises(TypeError, match=r"^device\b"):
        sparkle.to_device(np.zeros(2, np.float32), device)


@pytest.mark.parametrize("device_id", DEVICES)
def test_device_array_reshape_must_keep_the_size(device_id):
    d = sparkle.to_device(np.arange(12, dtype=np.float32).reshape(3, 4), device_id)
    for shape in [(5, 2), (13,), (12, 2), (-1, 5), (-1, -1), (0, 12)]:
        with pytest.raises(ValueError, match=r"^shape\b"):
            d.reshape(shape)
    np.testing.assert_array_equal(d.get(), np.arange(12, dtype=np.float32).reshape(3, 4))
