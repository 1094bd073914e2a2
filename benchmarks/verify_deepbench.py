"""Full-size check of sparkle.conv2d on the DeepBench convolution shapes against the reference.

The test suite runs scaled-down DeepBench shapes; this script runs the real sizes (batch set to 1
by default, to keep the float64 reference affordable) and prints error and speed per shape. Exits
non-zero if any relative L2 error exceeds 1e-5 (float32).

    python benchmarks/verify_deepbench.py [--oracles tests/oracles] [--batch 1] [--limit N]
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

import sparkle
from sparkle import reference

TOLERANCE = 1e-5
DEFAULT_ORACLES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "oracles"  # the copy in the repository


def unique_problems(oracles):
    """DeepBench problems without repeats, in file order."""
    problems = json.loads((oracles / "deepbench_conv.json").read_text())["problems"]
    seen, unique = set(), []
    for problem in problems:
        key = (tuple(problem["x_shape_nchw"][1:]), tuple(problem["w_shape_kcrs"]),
               tuple(problem["torch"]["stride"]), tuple(problem["torch"]["padding_tblr"]))
        if key not in seen:
            seen.add(key)
            unique.append(problem)
    return unique


def check(problem, batch, rng):
    _, c, h, w = problem["x_shape_nchw"]
    x = rng.standard_normal((batch, c, h, w)).astype(np.float32)
    weights = (rng.standard_normal(problem["w_shape_kcrs"]) / np.sqrt(np.prod(problem["w_shape_kcrs"][1:])))
    weights = weights.astype(np.float32)
    kwargs = {"stride": tuple(problem["torch"]["stride"]), "padding": tuple(problem["torch"]["padding_tblr"])}
    start = time.perf_counter()
    result = sparkle.conv2d(x, weights, **kwargs)
    seconds = time.perf_counter() - start
    expected = reference.conv2d(x, weights, **kwargs)
    error = float(np.linalg.norm(result - expected) / np.linalg.norm(expected))
    flops = 2 * result.size * np.prod(problem["w_shape_kcrs"][1:])
    return error, seconds, flops / seconds / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--oracles", type=pathlib.Path, default=DEFAULT_ORACLES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="check only the first N unique shapes")
    args = parser.parse_args(argv)
    problems = unique_problems(args.oracles)[:args.limit]
    rng = np.random.default_rng(0)
    failures = 0
    print("| x (NCHW) | w (KCRS) | stride | padding | rel L2 error | ms | GFLOPS |\n|---|---|---|---|---|---|---|")
    for problem in problems:
        error, seconds, gflops = check(problem, args.batch, rng)
        failures += not error <= TOLERANCE
        shape = [args.batch, *problem["x_shape_nchw"][1:]]
        print(f"| {shape} | {problem['w_shape_kcrs']} | {problem['torch']['stride']} | "
              f"{problem['torch']['padding_tblr']} | {error:.1e}{'' if error <= TOLERANCE else ' FAIL'} | "
              f"{seconds * 1e3:.1f} | {gflops:.1f} |")
    print(f"\n{len(problems) - failures} of {len(problems)} shapes within rel L2 {TOLERANCE:g} of the reference "
          "(the first call of each shape includes any compile or cache load).")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
