"""Hypothesis strategies for conv2d problems, shared by the property tests."""

import numpy as np
from hypothesis import strategies as st

from _helpers import LAYOUTS, as_pair, make_array, resolve_padding

MAX_CHANNELS = 40
MAX_SIZE = 40


def int_or_pair(low, high):
    """A value given as an int or as an (h, w) pair (both forms are public API)."""
    return st.one_of(st.integers(low, high), st.tuples(st.integers(low, high), st.integers(low, high)))


@st.composite
def channel_layout(draw, max_channels=MAX_CHANNELS):
    """(C, K, groups) consistent with groups: plain, grouped, depthwise and depthwise with multiplier 2."""
    kind = draw(st.sampled_from(["plain", "grouped", "depthwise", "depthwise_x2"]))
    if kind == "plain":
        return draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels)), 1
    if kind == "grouped":
        groups = draw(st.integers(2, min(8, max_channels)))
        c_group = draw(st.integers(1, max_channels // groups))
        k_group = draw(st.integers(1, max_channels // groups))
        return groups * c_group, groups * k_group, groups
    if kind == "depthwise":
        channels = draw(st.integers(1, max_channels))
        return channels, channels, channels
    channels = draw(st.integers(1, max(1, max_channels // 2)))
    return channels, 2 * channels, channels


@st.composite
def padding_form(draw):
    kind = draw(st.sampled_from(["int", "pair", "tblr", "valid", "same"]))
    if kind == "int":
        return draw(st.integers(0, 3))
    if kind == "pair":
        return (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    if kind == "tblr":
        return tuple(draw(st.integers(0, 3)) for _ in range(4))
    return kind


@st.composite
def conv_problem(draw, max_channels=MAX_CHANNELS, max_size=MAX_SIZE):
    """Keyword arguments and sizes of a conv2d problem, every parameter drawn independently."""
    channels, out_channels, groups = draw(channel_layout(max_channels))
    kernel = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    stride = draw(int_or_pair(1, 4))
    dilation = draw(int_or_pair(1, 3))
    padding = draw(padding_form())
    # Smallest input per axis whose padded extent still holds the dilated kernel. "same" pads
    # depend on the input size but always give ceil(size / stride) >= 1 outputs.
    explicit = resolve_padding(padding, (1, 1), kernel, stride, dilation) if padding != "same" else (0,) * 4
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, as_pair(dilation))]
    low_h = 1 if padding == "same" else max(1, spans[0] - explicit[0] - explicit[1])
    low_w = 1 if padding == "same" else max(1, spans[1] - explicit[2] - explicit[3])
    height = draw(st.integers(low_h, max(low_h, max_size)))
    width = draw(st.integers(low_w, max(low_w, max_size)))
    return dict(
        batch=draw(st.integers(1, 3)), channels=channels, out_channels=out_channels, groups=groups,
        height=height, width=width, kernel=kernel, stride=stride, dilation=dilation, padding=padding,
        dtype=draw(st.sampled_from([np.float32, np.float64])),
        bias=draw(st.booleans()), activation=draw(st.sampled_from([None, "relu"])),
        layouts=[draw(st.sampled_from(LAYOUTS)) for _ in range(3)],
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build_inputs(p):
    rng = np.random.default_rng(p["seed"])
    x = make_array(rng, (p["batch"], p["channels"], p["height"], p["width"]), p["dtype"], p["layouts"][0])
    w = make_array(rng, (p["out_channels"], p["channels"] // p["groups"], *p["kernel"]), p["dtype"],
                   p["layouts"][1])
    bias = make_array(rng, (p["out_channels"],), p["dtype"], p["layouts"][2]) if p["bias"] else None
    return x, w, bias
