"""Property tests: sparkle.conv2d (CPU backend) against the float64 reference on random problems.

Every problem is drawn so that its output is at least 1x1; the reference is always called with
explicit (top, bottom, left, right) padding computed by the test itself, so "same"/"valid" and
the pair forms are checked independently of sparkle's own padding resolution.
"""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparkle
from sparkle import reference

from _helpers import Unchanged, assert_close_to_reference, make_array, output_hw, resolve_padding
from _strategies import build_inputs, conv_problem


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_problem())
def test_conv2d_matches_reference(p):
    x, w, bias = build_inputs(p)
    unchanged = Unchanged(x, w, bias)
    tblr = resolve_padding(p["padding"], (p["height"], p["width"]), p["kernel"], p["stride"], p["dilation"])

    y = sparkle.conv2d(x, w, bias, stride=p["stride"], padding=p["padding"], dilation=p["dilation"],
                       groups=p["groups"], activation=p["activation"], device="cpu")
    ref = reference.conv2d(x, w, bias, stride=p["stride"], padding=tblr, dilation=p["dilation"],
                           groups=p["groups"], activation=p["activation"])

    unchanged.check()
    out_h, out_w = output_hw((p["height"], p["width"]), p["kernel"], p["stride"], tblr, p["dilation"])
    assert y.shape == (p["batch"], p["out_channels"], out_h, out_w)
    assert y.dtype == np.dtype(p["dtype"])
    assert y.flags.c_contiguous
    for array in (x, w, bias):
        assert not np.shares_memory(y, array)
    if p["activation"] == "relu":
        assert (y >= 0).all()
    assert_close_to_reference(y, ref, p["dtype"])


@st.composite
def same_problem(draw):
    """Small problems to pin down "same" against its definition: output = ceil(input / stride)."""
    return dict(size=(draw(st.integers(1, 20)), draw(st.integers(1, 20))),
                kernel=(draw(st.integers(1, 7)), draw(st.integers(1, 7))),
                stride=(draw(st.integers(1, 4)), draw(st.integers(1, 4))),
                dilation=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                dtype=draw(st.sampled_from([np.float32, np.float64])), seed=draw(st.integers(0, 2**32 - 1)))


@settings(max_examples=80, deadline=None)
@given(same_problem())
def test_same_padding_output_is_ceil_of_input_over_stride(p):
    rng = np.random.default_rng(p["seed"])
    x = make_array(rng, (1, 2, *p["size"]), p["dtype"])
    w = make_array(rng, (3, 2, *p["kernel"]), p["dtype"])
    y = sparkle.conv2d(x, w, padding="same", stride=p["stride"], dilation=p["dilation"], device="cpu")
    expected_hw = tuple(-(-s // t) for s, t in zip(p["size"], p["stride"]))
    assert y.shape == (1, 3, *expected_hw)
    tblr = resolve_padding("same", p["size"], p["kernel"], p["stride"], p["dilation"])
    ref = reference.conv2d(x, w, padding=tblr, stride=p["stride"], dilation=p["dilation"])
    assert_close_to_reference(y, ref, p["dtype"])
