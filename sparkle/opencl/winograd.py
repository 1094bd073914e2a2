"""Winograd F(m x m, 3 x 3) transforms as generated OpenCL C: straight-line sums with the matrices' zeros left out
and their ones written as plain additions (a compiler may not drop ``0 * x`` itself: x may be inf or NaN), so
the kernel does only the transform's real arithmetic.

Non-finite inputs: the transforms mix a patch's pixels, so an inf or NaN input makes non-finite (NaN, where a
direct sum would give inf) every output of the tiles whose patches hold it and whose transform reaches it, not
only the outputs whose 3x3 window holds it (one NaN pixel: 9 non-finite outputs directly, 9 with F(2x2), 25
with F(4x4), all within those tiles); finite outputs agree (tests/test_opencl_winograd.py).

Y = A^T [ (G g G^T) . (B^T d B) ] A for a 3x3 filter g and an (m+2) x (m+2) input patch d (Lavin and Gray's
matrices; checked in float64 against the direct sum by the tests).
"""

from __future__ import annotations

import functools
from fractions import Fraction as F

# m: (B^T, G, A^T)
MATRICES = {
    2: ((( 1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        ((1, 0, 0), (F(1, 2), F(1, 2), F(1, 2)), (F(1, 2), F(-1, 2), F(1, 2)), (0, 0, 1)),
        ((1, 1, 1, 0), (0, 1, -1, -1))),
    4: (((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
         (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
        ((F(1, 4), 0, 0), (F(-1, 6), F(-1, 6), F(-1, 6)), (F(-1, 6), F(1, 6), F(-1, 6)),
         (F(1, 24), F(1, 12), F(1, 6)), (F(1, 24), F(-1, 12), F(1, 6)), (0, 0, 1)),
        ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))),
}
TILE_SIZES = tuple(MATRICES)


def _constant(value):
    value = F(value)
    if value.denominator == 1:
        return f"(real){value.numerator}"
    return f"((real){value.numerator} / (real){value.denominator})"  # folded by the compiler, rounded once


def combination(row, term):
    """sum_t row[t] * term(t) as C, zero terms left out, +-1 as plain additions."""
    parts = []
    for index, coefficient in enumerate(row):
        if coefficient == 0:
            continue
        expression = term(index)
        if coefficient == 1:
            parts.append(("+", expression))
        elif coefficient == -1:
            parts.append(("-", expression))
        else:
            sign = "-" if coefficient < 0 else "+"
            parts.append((sign, f"{_constant(abs(F(coefficient)))} * {expression}"))
    if not parts:
        return "(real)0"
    first_sign, first = parts[0]
    text = first if first_sign == "+" else f"-{first}"
    return text + "".join(f" {sign} {expression}" for sign, expression in parts[1:])


def _macro(name, statements):
    return f"#define {name} \\\n" + " \\\n".join(f"    {statement}" for statement in statements) + "\n"


@functools.lru_cache(maxsize=None)  # ~1 ms of Fraction arithmetic each: once per tile size, not per launch
def defines(m):
    """#define lines of the transforms for F(m x m, 3 x 3), used by kernels/winograd.cl:

    FILTER_TRANSFORM: ``out(xi, value)`` for each of the alpha^2 transformed taps of ``g`` (g[r * 3 + s]);
    INPUT_TRANSFORM: ``v[i][j]`` (alpha x alpha) from ``d[i][j]``, through ``m_[i][j]``;
    OUTPUT_TRANSFORM: ``y[i][j]`` (m x m) from ``M(xi)``, through ``t_[i][s]``.
    """
    if m not in MATRICES:
        raise ValueError(f"Winograd tile size must be one of {TILE_SIZES}, got {m!r}")
    bt, g, at = MATRICES[m]
    alpha = m + 2
    filter_rows = [f"gg[{r}][{s}] = {combination(g[r], lambda t, s=s: f'g[{t * 3 + s}]')};"
                   for r in range(alpha) for s in range(3)]
    filter_taps = [f"out({r * alpha + s}, {combination(g[s], lambda t, r=r: f'gg[{r}][{t}]')});"
                   for r in range(alpha) for s in range(alpha)]
    input_rows = [f"m_[{i}][{j}] = {combination(bt[i], lambda t, j=j: f'd[{t}][{j}]')};"
                  for i in range(alpha) for j in range(alpha)]
    input_cols = [f"v[{i}][{j}] = {combination(bt[j], lambda t, i=i: f'm_[{i}][{t}]')};"
                  for i in range(alpha) for j in range(alpha)]
    output_rows = [f"t_[{i}][{s}] = {combination(at[i], lambda r, s=s: f'M({r * alpha + s})')};"
                   for i in range(m) for s in range(alpha)]
    output_cols = [f"y[{i}][{j}] = {combination(at[j], lambda s, i=i: f't_[{i}][{s}]')};"
                   for i in range(m) for j in range(m)]
    return (f"#define WINO_ALPHA {alpha}\n"
            + _macro("FILTER_TRANSFORM", [f"real gg[{alpha}][3];", *filter_rows, *filter_taps])
            + _macro("INPUT_TRANSFORM", [f"real m_[{alpha}][{alpha}];", *input_rows, *input_cols])
            + _macro("OUTPUT_TRANSFORM", [f"real t_[{m}][{alpha}];", *output_rows, *output_cols]))
