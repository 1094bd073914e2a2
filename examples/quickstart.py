"""Sparkle in a few lines: a conv2d with bias and ReLU, and a matmul, checked against the reference;
then the same on an OpenCL device (a GPU, or the CPU through PoCL): device arrays and a short tuning.

Run after installing Sparkle: ``python examples/quickstart.py``
(the OpenCL part needs ``pip install ".[opencl]"``; without it, it is skipped with the reason).
"""

import os
import tempfile

import numpy as np

import sparkle
from sparkle import reference
from sparkle.devices import opencl_unavailable_reason


def check(what, result, expected):
    """Print the relative L2 error of ``result`` against the float64 ``expected``; fail above 1e-5."""
    error = np.linalg.norm(result - expected) / np.linalg.norm(expected)
    print(f"{what}, rel L2 error {error:.1e}")
    assert error <= 1e-5, f"{what} disagrees with the float64 reference"


rng = np.random.default_rng(0)

# A 3x3 convolution, 64 -> 128 channels, stride 2, "same" padding, bias and ReLU fused.
x = rng.standard_normal((2, 64, 32, 32), dtype=np.float32)
w = rng.standard_normal((128, 64, 3, 3), dtype=np.float32) / (64 * 9) ** 0.5  # a Python float keeps float32
bias = rng.standard_normal(128, dtype=np.float32)
y = sparkle.conv2d(x, w, bias, stride=2, padding="same", activation="relu")
y_expected = reference.conv2d(x, w, bias, stride=2, padding="same", activation="relu")
check(f"conv2d {x.shape} * {w.shape} -> {y.shape}", y, y_expected)

# A matrix product.
a = rng.standard_normal((300, 200), dtype=np.float32)
b = rng.standard_normal((200, 500), dtype=np.float32)
c = sparkle.matmul(a, b)
c_expected = reference.matmul(a, b)
check(f"matmul {a.shape} @ {b.shape} -> {c.shape}", c, c_expected)

print("devices:", ", ".join(f"{d.id} ({d.name})" for d in sparkle.devices()))

# --- OpenCL -------------------------------------------------------------------------------------------
reason = opencl_unavailable_reason()
if reason is not None:
    print(f"skipping the OpenCL part: {reason}")
else:
    # device="opencl" is the first OpenCL GPU, else the first OpenCL device ("opencl:N" picks one).
    # The first call of a shape builds its kernel (a second or two; cached on disk for later runs).
    y_cl = sparkle.conv2d(x, w, bias, stride=2, padding="same", activation="relu", device="opencl")
    check("conv2d on OpenCL (numpy in, numpy out)", y_cl, y_expected)

    # Device arrays: copy the inputs once; calls on them run on their device and return device arrays,
    # so a chain of calls moves no data through the host until .get().
    x_dev, w_dev, bias_dev = (sparkle.to_device(array, "opencl") for array in (x, w, bias))
    w2 = rng.standard_normal((32, 128, 1, 1), dtype=np.float32) / 128 ** 0.5
    hidden = sparkle.conv2d(x_dev, w_dev, bias_dev, stride=2, padding="same", activation="relu")
    out = sparkle.conv2d(hidden, sparkle.to_device(w2, "opencl"))  # a 1x1 conv of the result, on the device
    print(f"chained on {out.device}: {hidden!r} -> {out!r}")
    check("conv2d -> conv2d on device arrays", out.get(), reference.conv2d(y_expected, w2.astype(np.float64)))

    # Tuning: search the kernel's parameters for this matmul shape on the device, for at most 5 seconds
    # or 3 candidates; each is checked against the reference before it is timed. The winner is stored in
    # the tuning database, which later calls of this shape use. This example tunes into a scratch cache
    # directory (SPARKLE_CACHE_DIR) so that it leaves your own tuning database as it was.
    with tempfile.TemporaryDirectory(prefix="sparkle-example-") as scratch:
        os.environ["SPARKLE_CACHE_DIR"] = scratch
        result = sparkle.tune("matmul", a, b, device="opencl", time_budget=5, max_candidates=3)
        print(result)
        c_tuned = sparkle.matmul(a, b, device="opencl")  # runs the tuned kernel
        check("matmul on OpenCL with the tuned kernel", c_tuned, c_expected)
        del os.environ["SPARKLE_CACHE_DIR"]
