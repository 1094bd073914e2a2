"""Sparkle in a few lines: a conv2d with bias and ReLU, and a matmul, checked against the reference.

Run after installing Sparkle: ``python examples/quickstart.py``
"""

import numpy as np

import sparkle
from sparkle import reference

rng = np.random.default_rng(0)

# A 3x3 convolution, 64 -> 128 channels, stride 2, "same" padding, bias and ReLU fused.
x = rng.standard_normal((2, 64, 32, 32), dtype=np.float32)
w = rng.standard_normal((128, 64, 3, 3), dtype=np.float32) / (64 * 9) ** 0.5  # a Python float keeps float32
bias = rng.standard_normal(128, dtype=np.float32)
y = sparkle.conv2d(x, w, bias, stride=2, padding="same", activation="relu")
expected = reference.conv2d(x, w, bias, stride=2, padding="same", activation="relu")
conv_error = np.linalg.norm(y - expected) / np.linalg.norm(expected)
print(f"conv2d {x.shape} * {w.shape} -> {y.shape}, rel L2 error {conv_error:.1e}")
assert conv_error <= 1e-5, "conv2d disagrees with the float64 reference"

# A matrix product.
a = rng.standard_normal((300, 200), dtype=np.float32)
b = rng.standard_normal((200, 500), dtype=np.float32)
c = sparkle.matmul(a, b)
expected = reference.matmul(a, b)
matmul_error = np.linalg.norm(c - expected) / np.linalg.norm(expected)
print(f"matmul {a.shape} @ {b.shape} -> {c.shape}, rel L2 error {matmul_error:.1e}")
assert matmul_error <= 1e-5, "matmul disagrees with the float64 reference"

print("devices:", ", ".join(f"{d.id} ({d.name})" for d in sparkle.devices()))
