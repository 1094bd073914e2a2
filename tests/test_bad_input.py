"""Every malformed call raises ValueError or TypeError whose message names the bad argument,
and a failing call leaves its inputs untouched."""

import re

import numpy as np
import pytest

import sparkle
from sparkle import reference

from _helpers import Unchanged

F32 = np.float32


def good_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(F32)
    w = rng.standard_normal((6, 4, 3, 3)).astype(F32)
    bias = rng.standard_normal(6).astype(F32)
    return x, w, bias


def call_conv(entry=sparkle.conv2d, x=None, w=None, bias=None, warm=None, **kwargs):
    """Call conv2d with good inputs except those given; check inputs are unchanged afterwards.

    ``warm`` ("auto" or a device): first make the valid call that the bad one most resembles (same array
    shapes and layouts, each scalar argument as the int it equals) a warm signature on that device, so that
    the bad call is refused by the kept signature's key, not only by the first call's validation."""
    gx, gw, gb = good_inputs()
    x = gx if x is None else x
    w = gw if w is None else w
    bias = gb if bias is None else bias
    if warm is not None:
        kwargs["device"] = warm
        _warm_valid_twin(entry, x, w, bias, kwargs)
    unchanged = Unchanged(x, w, bias)
    try:
        entry(x, w, bias, **kwargs)
    finally:
        unchanged.check()


def _int_twin(value):
    if isinstance(value, tuple):
        return tuple(_int_twin(v) for v in value)
    if isinstance(value, (bool, float, np.floating, np.bool_)) and float(value).is_integer():
        return int(value)
    return value


def _native_twin(array):
    if isinstance(array, np.ndarray) and array.dtype.kind == "f" and not array.dtype.isnative:
        return array.astype(array.dtype.newbyteorder("="))
    return array


def _warm_valid_twin(entry, x, w, bias, kwargs):
    twin = {name: _int_twin(value) for name, value in kwargs.items()}
    arrays = [_native_twin(a) for a in (x, w, bias)]
    try:
        for _ in range(5):  # past the first call's verification: the plan's fast path is armed
            entry(*arrays, **twin)
    except (TypeError, ValueError):
        pass  # no valid call equals this one


def zeros(shape, dtype=F32):
    return np.zeros(shape, dtype)



ARRAY_CASES = [
    # (arguments, exception, regex on the message)
    (dict(x=zeros((4, 8, 8))), ValueError, r"^x\b.*4-D"),
    (dict(x=zeros((1, 1, 4, 8, 8))), ValueError, r"^x\b.*4-D"),
    (dict(w=zeros((6, 4, 3))), ValueError, r"^w\b.*4-D"),
    (dict(w=zeros((1, 6, 4, 3, 3))), ValueError, r"^w\b.*4-D"),
    (dict(w=zeros((6, 3, 3, 3))), ValueError, r"^w\.shape\[1\]"),
    (dict(w=zeros((6, 8, 3, 3))), ValueError, r"^w\.shape\[1\]"),
    (dict(x=zeros((1, 0, 8, 8)), w=zeros((6, 0, 3, 3))), ValueError, r"x channels"),
    (dict(x=zeros((1, 4, 0, 8))), ValueError, r"x height"),
    (dict(x=zeros((1, 4, 8, 0))), ValueError, r"x width"),
    (dict(w=zeros((0, 4, 3, 3)), bias=zeros(0)), ValueError, r"w output channels"),
    (dict(w=zeros((6, 4, 0, 3))), ValueError, r"w kernel height"),
    (dict(w=zeros((6, 4, 3, 0))), ValueError, r"w kernel width"),
    (dict(x=zeros((1, 4, 8, 8), np.int32)), TypeError, r"^x\b.*dtype"),
    (dict(x=zeros((1, 4, 8, 8), np.float16)), TypeError, r"^x\b.*dtype"),
    (dict(x=zeros((1, 4, 8, 8), np.complex64)), TypeError, r"^x\b.*dtype"),
    (dict(x=zeros((1, 4, 8, 8), bool)), TypeError, r"^x\b.*dtype"),
    (dict(x=zeros((1, 4, 8, 8), ">f4" if np.little_endian else "<f4")), TypeError, r"^x\b.*byte order"),
    (dict(w=zeros((6, 4, 3, 3), ">f4" if np.little_endian else "<f4")), TypeError, r"^w\b.*byte order"),
    (dict(bias=zeros(6, ">f4" if np.little_endian else "<f4")), TypeError, r"^bias\b.*byte order"),
    (dict(w=zeros((6, 4, 3, 3), np.int64)), TypeError, r"^w\b.*dtype"),
    (dict(w=zeros((6, 4, 3, 3), np.float64)), TypeError, r"\bx\b.*\bw\b.*dtype"),
    (dict(x=zeros((1, 4, 8, 8), np.float64)), TypeError, r"\bx\b.*\bw\b.*dtype"),
    (dict(bias=zeros(5)), ValueError, r"^bias\b.*shape"),
    (dict(bias=zeros((6, 1))), ValueError, r"^bias\b.*shape"),
    (dict(bias=zeros(())), ValueError, r"^bias\b.*shape"),
    (dict(bias=zeros(6, np.float64)), TypeError, r"^bias\b.*dtype"),
    (dict(bias=zeros(6, np.int32)), TypeError, r"^bias\b.*dtype"),
    (dict(bias=[0.0] * 6), TypeError, r"^bias\b"),
    (dict(bias=1.0), TypeError, r"^bias\b"),
    (dict(x=np.zeros((1, 4, 8, 8)).tolist()), TypeError, r"^x\b"),
    (dict(x=1.0), TypeError, r"^x\b"),
    (dict(x=F32(1.0)), TypeError, r"^x\b"),
    (dict(x="x"), TypeError, r"^x\b"),
    (dict(w=np.zeros((6, 4, 3, 3)).tolist()), TypeError, r"^w\b"),
    (dict(w=3), TypeError, r"^w\b"),
]


@pytest.mark.parametrize("entry", [sparkle.conv2d, reference.conv2d], ids=["conv2d", "reference"])
@pytest.mark.parametrize("arguments, error, match", ARRAY_CASES)
def test_bad_arrays(entry, arguments, error, match):
    with pytest.raises(error, match=match):
        call_conv(entry, **arguments)


@pytest.mark.parametrize("device", ["auto", "cpu"])
@pytest.mark.parametrize("arguments, error, match", ARRAY_CASES)
def test_bad_arrays_refused_after_the_valid_call_they_resemble_is_warm(arguments, error, match, device):
    with pytest.raises(error, match=match):
        call_conv(warm=device, **arguments)


@pytest.mark.parametrize("position", ["x", "w"])
def test_none_array(position):
    x, w, bias = good_inputs()
    args = {"x": x, "w": w}
    args[position] = None
    with pytest.raises(TypeError, match=rf"^{position}\b"):
        sparkle.conv2d(args["x"], args["w"], bias)


def test_groups_must_divide_channels():
    # C = 4 is not divisible by 3; K = 6 is divisible by 3.
    with pytest.raises(ValueError, match=r"^groups\b"):
        call_conv(w=zeros((6, 1, 3, 3)), groups=3)
    # C = 6 divisible by 2, K = 5 is not.
    with pytest.raises(ValueError, match=r"^groups\b"):
        call_conv(x=zeros((1, 6, 8, 8)), w=zeros((5, 3, 3, 3)), bias=zeros(5), groups=2)


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError), ("2", TypeError),
    (None, TypeError), ((2,), TypeError), (np.float32(2), TypeError),
])
@pytest.mark.parametrize("warm", [None, "auto", "cpu"], ids=["cold", "warm auto", "warm cpu"])
def test_bad_groups(value, error, warm):
    with pytest.raises(error, match=r"^groups\b"):
        call_conv(groups=value, warm=warm)


BAD_PAIRS = [
    (0, ValueError), (-2, ValueError), ((1, 0), ValueError), ((-1, 1), ValueError),
    (1.5, TypeError), (1.0, TypeError), (True, TypeError), (False, TypeError), ((True, 1), TypeError),
    ("1", TypeError), (None, TypeError), ((1,), TypeError), ((1, 1, 1), TypeError), ((1.0, 1), TypeError),
    ((1, "1"), TypeError), ([], TypeError), ({1, 2}, TypeError),
]


@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value, error", BAD_PAIRS, ids=[repr(v) for v, _ in BAD_PAIRS])
@pytest.mark.parametrize("warm", [None, "auto", "cpu"], ids=["cold", "warm auto", "warm cpu"])
def test_bad_stride_and_dilation(name, value, error, warm):
    with pytest.raises(error, match=rf"^{name}\b"):
        call_conv(warm=warm, **{name: value})


BAD_PADDINGS = [
    (-1, ValueError), ((1, -1), ValueError), ((0, 0, 0, -1), ValueError), ((1, 1, 1), TypeError),
    ((1, 1, 1, 1, 1), TypeError), ((1,), TypeError), (1.5, TypeError), (1.0, TypeError), ((1.0, 1), TypeError),
    ((0, 0, 0, 0.5), TypeError), (True, TypeError), ((True, 0), TypeError), (None, TypeError),
    ("full", ValueError), ("SAME", ValueError), ("", ValueError), ("same_lower", ValueError),
]


@pytest.mark.parametrize("value, error", BAD_PADDINGS, ids=[repr(v) for v, _ in BAD_PADDINGS])
@pytest.mark.parametrize("warm", [None, "auto", "cpu"], ids=["cold", "warm auto", "warm cpu"])
def test_bad_padding(value, error, warm):
    with pytest.raises(error, match=r"^padding\b"):
        call_conv(padding=value, warm=warm)


@pytest.mark.parametrize("x_hw, kernel, kwargs", [
    ((2, 2), (3, 3), {}),
    ((8, 8), (3, 3), {"dilation": 4}),
    ((8, 2), (3, 3), {"padding": (1, 0)}),
    ((5, 5), (7, 7), {"padding": (1, 0, 1, 1)}),
])
def test_output_smaller_than_one_pixel(x_hw, kernel, kwargs):
    with pytest.raises(ValueError, match=r"^output size"):
        call_conv(x=zeros((1, 4, *x_hw)), w=zeros((6, 4, *kernel)), **kwargs)


@pytest.mark.parametrize("value", ["sigmoid", "RELU", "Relu", "", 1, True, "none"])
def test_bad_activation(value):
    with pytest.raises(ValueError, match=r"^activation\b"):
        call_conv(activation=value)


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda", "", "cpu:0", "opencl:99", "OpenCL"])
def test_unknown_device_lists_available_ones(device):
    with pytest.raises(ValueError, match=r"^device\b") as info:
        call_conv(device=device)
    message = str(info.value)
    for available in ["auto", "reference", *(d.id for d in sparkle.devices())]:
        assert repr(available) in message, f"{available!r} missing from: {message}"


@pytest.mark.parametrize("device", [None, 0, ["cpu"]])
def test_device_must_be_a_string(device):
    with pytest.raises(TypeError, match=r"^device\b"):
        call_conv(device=device)


def test_unknown_keyword_rejected():
    with pytest.raises(TypeError, match=r"^conv2d\(\) got an unexpected keyword argument 'padd'"):
        call_conv(padd=1)


@pytest.mark.parametrize("name, call", [
    ("conv2d", lambda x, w: sparkle.conv2d(x, w, budget=5)),
    ("matmul", lambda x, w: sparkle.matmul(x[0, 0], w[0, 0], devic="cpu")),
    ("to_device", lambda x, w: sparkle.to_device(x, devce="cpu")),
    ("sparkle.tune", lambda x, w: sparkle.tune("conv2d", x, w, budget=5)),
])
def test_unknown_keyword_names_the_public_function(name, call):
    # Explicit signatures: Python's own message names the function; tune's **kwargs say it themselves.
    x, w, _ = good_inputs()
    with pytest.raises(TypeError, match=rf"^{re.escape(name)}\(\) got an unexpected keyword argument") as info:
        call(x, w)
    assert "_spec" not in str(info.value)


def test_arguments_after_bias_are_keyword_only():
    x, w, bias = good_inputs()
    with pytest.raises(TypeError):
        sparkle.conv2d(x, w, bias, 1)


def test_failing_call_on_views_leaves_buffers_untouched():
    # Invalid padding with non-contiguous views: nothing behind the views may change.
    rng = np.random.default_rng(1)
    big = rng.standard_normal((2, 8, 16, 16)).astype(F32)
    x = big[:, ::2, ::-2, 1::2]
    w = np.asfortranarray(rng.standard_normal((6, 4, 3, 3)).astype(F32))
    snapshot = big.copy(), w.copy()
    with pytest.raises(ValueError, match="padding"):
        sparkle.conv2d(x, w, padding=-1)
    np.testing.assert_array_equal(big, snapshot[0])
    np.testing.assert_array_equal(w, snapshot[1])
