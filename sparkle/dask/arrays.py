"""conv2d and matmul of dask arrays: the graph is built and every argument validated on the client, with the
messages of ``sparkle.conv2d``/``sparkle.matmul``; each chunk is one Sparkle call on a worker (worker.py).

The batch (conv2d's x) or the rows (matmul's a) are the only chunked dimension; the weights (and bias, and
matmul's b) are one block each: one key in the graph, so Dask sends them to a worker once, not once per
chunk.
"""

from __future__ import annotations

import functools
import math
import warnings

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import api
from . import worker


class RechunkWarning(UserWarning):
    """An operand was rechunked to the layout the calls need (the message says which and why)."""


def conv2d(x, w, bias=None, *, stride=1, padding=0, dilation=1, groups=1, activation=None, device="auto"):
    """``sparkle.conv2d`` of a dask array ``x`` (N, C, H, W), chunked along N; a lazy dask array of the
    output (N, K, OH, OW) with the same batch chunks. ``w`` (and ``bias``) are numpy or dask arrays.

    Arguments are those of :func:`sparkle.conv2d`, validated now with the same errors. ``device`` is
    resolved on each worker ("auto": the worker's scheduler, see :class:`SparklePlugin`). ``x`` chunked along
    C, H or W is rechunked to whole images, with a :class:`RechunkWarning`.
    """
    x = _chunked_operand(x, "x")
    w = _block_operand(w, "w")
    bias = None if bias is None else _block_operand(bias, "bias")
    keywords = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, activation=activation)
    spec = api.conv2d_spec(_shaped_like(x), _shaped_like(w), None if bias is None else _shaped_like(bias),
                           **keywords)
    _check_device(device)
    x = _whole_along(x, "x", "C, H and W", "a convolution needs whole images")
    blocks = [_one_block(w, "w")] + ([_one_block(bias, "bias")] if bias is not None else [])
    chunk = functools.partial(worker.conv2d_chunk, **keywords, device=device)
    output_chunks = (x.chunks[0], (spec.out_channels,), (spec.out_h,), (spec.out_w,))
    return _per_chunk("sparkle-conv2d", chunk, x, blocks, output_chunks, spec.dtype, (keywords, device))


def matmul(a, b, *, device="auto"):
    """``sparkle.matmul`` of a dask array ``a`` (M, K), chunked along M, and ``b`` (K, N), numpy or dask; a
    lazy dask array of the (M, N) product with ``a``'s row chunks. ``a`` chunked along K is rechunked, with
    a :class:`RechunkWarning`."""
    a = _chunked_operand(a, "a")
    b = _block_operand(b, "b")
    spec = api.matmul_spec(_shaped_like(a), _shaped_like(b))
    _check_device(device)
    a = _whole_along(a, "a", "K", "a product needs whole rows")
    chunk = functools.partial(worker.matmul_chunk, device=device)
    return _per_chunk("sparkle-matmul", chunk, a, [_one_block(b, "b")], (a.chunks[0], (spec.n,)), spec.dtype,
                      device)


def _per_chunk(prefix, chunk, chunked, blocks, output_chunks, dtype, arguments):
    """One task per chunk of ``chunked``: chunk(that chunk, *the single block of each of ``blocks``)."""
    name = f"{prefix}-{tokenize(chunked, *blocks, arguments)}"
    trailing = (0,) * (chunked.ndim - 1)
    block_keys = [(block.name,) + (0,) * block.ndim for block in blocks]
    layer = {(name, index) + trailing: (chunk, (chunked.name, index) + trailing, *block_keys)
             for index in range(chunked.numblocks[0])}
    graph = HighLevelGraph.from_collections(name, layer, dependencies=[chunked, *blocks])
    return da.Array(graph, name, output_chunks, dtype=dtype, meta=np.empty((0,) * len(output_chunks), dtype))


def _chunked_operand(value, name):
    if not isinstance(value, da.Array):
        raise TypeError(f"{name} must be a dask.array.Array (chunked along its first dimension) of float32 or "
                        f"float64, got {type(value).__name__}; for numpy arrays, use sparkle.{_op_of(name)}")
    return _known_shape(value, name)


def _op_of(name):
    return "conv2d" if name == "x" else "matmul"


def _block_operand(value, name):
    if not isinstance(value, (np.ndarray, da.Array)):
        raise TypeError(f"{name} must be a numpy.ndarray or dask.array.Array of float32 or float64, "
                        f"got {type(value).__name__}")
    return _known_shape(value, name)


def _known_shape(value, name):
    """``value``, unless it is a dask array whose chunk sizes are not known yet (NaN in its shape)."""
    if any(isinstance(size, float) and math.isnan(size) for size in value.shape):
        raise ValueError(f"{name} has unknown chunk sizes (shape {value.shape}); call {name}.compute_chunk_sizes() "
                         "first")
    return value


def _shaped_like(value):
    """A numpy array of ``value``'s shape and dtype that takes no memory: validation sees what the calls will."""
    if isinstance(value, np.ndarray):
        return value
    return np.broadcast_to(np.zeros((), value.dtype), value.shape)


def _check_device(device):
    if not isinstance(device, str):
        raise TypeError(f"device must be a str ('auto', 'cpu', 'opencl', 'opencl:N' or 'reference'; resolved on "
                        f"each worker), got {type(device).__name__}")


def _whole_along(array, name, dimensions, why):
    """``array`` with one chunk along every dimension but the first (rechunked with a warning if needed)."""
    if all(len(sizes) == 1 for sizes in array.chunks[1:]):
        return array
    warnings.warn(f"{name} is chunked along {dimensions} (chunks {array.chunks[1:]}); rechunked to one chunk "
                  f"in each, since {why}: chunk {name} along its first dimension only to avoid the copy",
                  RechunkWarning, stacklevel=3)
    return array.rechunk({axis: -1 for axis in range(1, array.ndim)})


def _one_block(value, name):
    """``value`` as a dask array of one block: one key, sent to each worker once."""
    if isinstance(value, np.ndarray):
        return da.from_array(value, chunks=value.shape or (), name=f"sparkle-{name}-{tokenize(value)}")
    if any(len(sizes) > 1 for sizes in value.chunks):
        value = value.rechunk(-1)
    return value
