"""A call's signature key: what makes two calls one for every cache in front of a prepared call (the
scheduler's plans, the kept calls of a named device). Built on every call, so it is cheap: the operands'
class, shape, dtype and layout (or device), and the other arguments as given. It is only a key; a call
whose key is new is validated (api.py) before anything is kept under it. Keys of one op differ in length or in
their second element's type between the flat form (numpy operands) and the nested one, so they never meet."""

from __future__ import annotations

import numpy as np

from .device_array import DeviceArray


def layout(array):
    """What a signature records of an operand: type, shape, dtype and memory layout (or device)."""
    if array.__class__ is np.ndarray:  # the dtype itself, not its char: '>f4' and '<f4' share 'f'
        return array.shape, array.dtype, array.strides
    if array.__class__ is DeviceArray:
        return array.shape, array.dtype, array._device.id
    raise TypeError("not an array")  # the slow path validates and names the argument


def scalar_types(values):
    """The types of a call's scalar arguments, those inside tuples too: what keeps a call with ``stride=1.0``
    or ``padding=(True, 0)`` from sharing the key of the valid call it equals."""
    return tuple(tuple(map(type, value)) if value.__class__ is tuple else type(value) for value in values)


def conv2d_key(x, w, bias=None, stride=1, padding=0, dilation=1, groups=1, activation=None):
    """The key of a conv2d call; TypeError (or AttributeError) where an argument cannot be part of one. The hot
    paths pass the arguments by position (keywords cost ~0.5 us a call on the 2-core VM)."""
    nd = np.ndarray
    if x.__class__ is nd and w.__class__ is nd and bias is None:  # the common call, as one flat tuple (0.7 us less)
        key = ("conv2d", x.shape, x.dtype, x.strides, w.shape, w.dtype, w.strides, stride, padding, dilation,
               groups, activation)
    else:
        key = ("conv2d", layout(x), layout(w), None if bias is None else layout(bias), stride, padding, dilation,
               groups, activation)
    if stride.__class__ is not int or padding.__class__ is not int or dilation.__class__ is not int or \
            groups.__class__ is not int:
        # 1.0 and True equal 1 as keys, yet validation refuses them: their types make such a call its own key
        key += (scalar_types((stride, padding, dilation, groups)),)
    return key


def matmul_key(a, b):
    """The key of a matmul call."""
    if a.__class__ is np.ndarray and b.__class__ is np.ndarray:
        return ("matmul", a.shape, a.dtype, a.strides, b.shape, b.dtype, b.strides)
    return ("matmul", layout(a), layout(b))
