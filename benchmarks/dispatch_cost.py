"""Cost of one repeated CPU call (issue 9, "Dispatch in microseconds", CPU part).

Run from the repository root:

    python benchmarks/dispatch_cost.py [--loops 5] [--calls 2000] [--markdown PATH] [--json PATH]
        [--argument-kinds] [--breakdown] [--crossover]

Times, in microseconds per call (best of ``--loops`` loops of ``--calls`` calls; the ways take turns loop
by loop, so that a busy moment of a shared machine falls on all of them alike):

- prepared conv: ``sparkle.cpu.backend.prepare_conv2d(spec)`` made once, then called, for the tiny conv
  (x 1x4x8x8 float32, w 4x4x3x3, padding=1): what the scheduler runs for a repeated call signature;
- prepared matmul: ``prepare_matmul(spec)`` for an 8x8 @ 8x8 float32 product;
- backend.conv2d / backend.matmul: the unprepared backend calls, which plan and allocate every time;
- numpy ``a @ a`` for the same product, and ``torch.nn.functional.conv2d`` for the same conv (if torch is
  installed; its own thread count).

Every way's result is compared with the float64 reference once before it is timed (relative L2 error at
most 1e-5); a wrong result stops the run.

``--argument-kinds`` times Numba's dispatch of no-op functions by argument kind (arrays, int scalars,
bools, a tuple of 16 ints, an int64 array of 16): why the kernels take one parameter vector.
``--breakdown`` splits the prepared calls into their parts (the compiled kernel alone, the input views,
the output allocation). ``--crossover`` times prepared calls of growing size on one thread (the kernels
compiled without a parallel launch) and on two (the parallel ones): where the parallel launch starts to
pay, one of the figures behind ``plan.default_threads`` (``serial_threshold.py`` gives the others).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numba
import numpy as np

from sparkle import api, reference
from sparkle.cpu import backend
from sparkle.cpu.isa import active_isa
from sparkle.cpu.plan import serial_max_flops

try:
    import torch
except ImportError:
    torch = None

TOLERANCE = 1e-5


def rel_error(result, expected):
    result = np.asarray(result, dtype=np.float64)
    return float(np.linalg.norm(result - expected) / max(np.linalg.norm(expected), 1e-300))


def checked(way, call, expected):
    """Run ``call`` once and stop the run unless its result is the reference's."""
    error = rel_error(call(), expected)
    if not error <= TOLERANCE:  # `not <=` catches NaN
        raise SystemExit(f"WRONG RESULT from {way}: relative error {error:.2e} over {TOLERANCE:g}")
    return error


def best_per_call(ways, loops, calls):
    """{name: best seconds per call}: ``loops`` rounds, each timing ``calls`` calls of every way in turn."""
    best = dict.fromkeys(ways, float("inf"))
    for call in ways.values():
        call()  # warm: first-touch, thread pools
    for _ in range(loops):
        for name, call in ways.items():
            start = time.perf_counter()
            for _ in range(calls):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def tiny_conv(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(dtype)
    w = rng.standard_normal((4, 4, 3, 3)).astype(dtype)
    return x, w, api.conv2d_spec(x, w, padding=1)


def small_matmul(size=8, dtype=np.float32):
    a = np.random.default_rng(1).standard_normal((size, size)).astype(dtype)
    return a, api.matmul_spec(a, a)


def main_table(args):
    """The headline figures: {way: {"us": ..., "error": ..., "variant": ...}}."""
    x, w, conv_spec = tiny_conv()
    a, matmul_spec = small_matmul()
    conv_expected = reference.conv2d(x, w, padding=1)
    matmul_expected = reference.matmul(a, a)
    prepared_conv = backend.prepare_conv2d(conv_spec)
    prepared_matmul = backend.prepare_matmul(matmul_spec)
    ways = {
        "prepared conv (tiny)": (lambda: prepared_conv(x, w, None), conv_expected, prepared_conv.variant),
        "prepared matmul (8x8)": (lambda: prepared_matmul(a, a), matmul_expected, prepared_matmul.variant),
        "backend.conv2d (tiny)": (lambda: backend.conv2d(x, w, None, conv_spec), conv_expected, "plans per call"),
        "backend.matmul (8x8)": (lambda: backend.matmul(a, a, matmul_spec), matmul_expected, "plans per call"),
        "numpy a @ a (8x8)": (lambda: a @ a, matmul_expected, "numpy"),
    }
    if torch is not None:
        xt, wt = torch.from_numpy(x), torch.from_numpy(w)
        conv = torch.nn.functional.conv2d
        ways["torch conv2d (tiny)"] = (lambda: conv(xt, wt, padding=1), conv_expected,
                                       f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    errors = {name: checked(name, lambda call=call: np.asarray(call()), expected)
              for name, (call, expected, _) in ways.items()}
    seconds = best_per_call({name: call for name, (call, _, _) in ways.items()}, args.loops, args.calls)
    if torch is not None:  # again on one thread, as the prepared call runs this conv
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            name = "torch conv2d (tiny), 1 thread"
            ways[name] = (ways["torch conv2d (tiny)"][0], conv_expected, f"torch {torch.__version__}, 1 thread")
            errors[name] = checked(name, lambda: np.asarray(ways[name][0]()), conv_expected)
            seconds.update(best_per_call({name: ways[name][0]}, args.loops, args.calls))
        finally:
            torch.set_num_threads(threads)
    return {name: {"us": seconds[name] * 1e6, "error": errors[name], "variant": ways[name][2]} for name in ways}


def argument_kinds(args):
    """µs per Numba call of a no-op function, by argument kind."""
    from numba import njit

    @njit
    def nothing():
        return 0

    @njit
    def arrays5(a, b, c, d, e):
        return 0

    @njit
    def arrays10(a, b, c, d, e, f, g, h, i, j):
        return 0

    @njit
    def ints5(a, b, c, d, e):
        return 0

    @njit
    def bools5(a, b, c, d, e):
        return 0

    @njit
    def one(value):
        return 0

    array = np.zeros(16)
    read_only = array.view()
    read_only.flags.writeable = False
    params = np.arange(16, dtype=np.int64)
    sixteen = tuple(range(16))
    ways = {
        "no argument": lambda: nothing(),
        "1 array": lambda: one(array),
        "1 read-only array": lambda: one(read_only),
        "5 arrays": lambda: arrays5(array, array, array, array, array),
        "10 arrays": lambda: arrays10(*[array] * 10),
        "5 ints": lambda: ints5(1, 2, 3, 4, 5),
        "5 bools": lambda: bools5(True, False, True, False, True),
        "tuple of 16 ints": lambda: one(sixteen),
        "int64 array of 16": lambda: one(params),
    }
    seconds = best_per_call(ways, args.loops, args.calls)
    return {name: value * 1e6 for name, value in seconds.items()}


def breakdown(args):
    """The parts of the two prepared calls, µs per call."""
    from sparkle.cpu.operands import flat_input

    x, w, conv_spec = tiny_conv()
    a, matmul_spec = small_matmul()
    parts = {}
    for label, call, operands in (("conv", backend.prepare_conv2d(conv_spec), (x, w, None)),
                                  ("matmul", backend.prepare_matmul(matmul_spec), (a, a))):
        launch = call._run.__self__
        first, second = operands[0], operands[1]
        x_flat, w_flat = (flat_input(first), flat_input(second)) if label == "conv" else \
            (flat_input(second), flat_input(first))
        out = call._new_output().ravel()
        scratch = launch.scratch.take()
        kernel, params, zero_bias = launch.kernel, launch.params, launch.inputs.zero_bias
        new_output = call._new_output
        ways = {
            f"{label}: whole prepared call": lambda call=call, operands=operands: call(*operands),
            f"{label}: compiled kernel alone": lambda kernel=kernel, x_flat=x_flat, w_flat=w_flat, out=out,
            params=params, zero_bias=zero_bias, scratch=scratch: kernel(x_flat, w_flat, zero_bias, out, params,
                                                                         *scratch),
            f"{label}: flat read-only view of one input": lambda first=first: flat_input(first),
            f"{label}: output (pooled allocator) + ravel": lambda new_output=new_output: new_output().ravel(),
        }
        parts.update(best_per_call(ways, args.loops, args.calls))
    return {name: value * 1e6 for name, value in parts.items()}


def crossover(args):
    """Prepared calls of growing size on one thread and on two: rows of (problem, flops, µs one, µs two)."""
    rng = np.random.default_rng(2)
    problems = [((1, c, hw, hw), (c, c, 3, 3), 1) for c, hw in ((4, 8), (8, 8), (8, 12), (16, 8), (8, 16), (16, 12),
                                                                  (16, 16), (24, 16), (32, 16), (32, 28))]
    problems += [((1, n, 1, n), (n, n, 1, 1), 0) for n in (16, 32, 48, 64, 96, 128, 192)]
    rows = []
    for x_shape, w_shape, padding in problems:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        spec = api.conv2d_spec(x, w, padding=padding)
        expected = reference.conv2d(x, w, padding=padding)
        calls = {threads: backend.prepare_conv2d(spec, backend.plan_conv2d(spec, threads=threads))
                 for threads in (1, 2)}
        ways = {threads: lambda call=call, x=x, w=w: call(x, w, None) for threads, call in calls.items()}
        for threads, way in ways.items():
            checked(f"{calls[threads].variant} on {x_shape}", way, expected)
        start = time.perf_counter()
        ways[1]()
        once = max(time.perf_counter() - start, 1e-7)
        repeat = int(min(args.calls, max(5, 0.02 / once)))  # about 20 ms a loop
        seconds = best_per_call(ways, max(args.loops, 9), repeat)
        name = f"{'x'.join(map(str, x_shape))} * {'x'.join(map(str, w_shape))}"
        rows.append({"problem": name, "flops": spec.flops, "one_thread_us": seconds[1] * 1e6,
                     "two_threads_us": seconds[2] * 1e6})
        print(f"  {name:28} {spec.flops:>10} flops  one thread {seconds[1] * 1e6:9.1f} us  "
              f"two {seconds[2] * 1e6:9.1f} us  two/one {seconds[2] / seconds[1]:5.2f}", flush=True)
    return rows


def machine():
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "isa": active_isa().name,
            "numba_threads": numba.get_num_threads(), "numba": numba.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "serial_max_flops": serial_max_flops(numba.get_num_threads())}


def markdown(report):
    lines = ["| way | µs per call | what runs | rel. error vs float64 reference |", "|---|---|---|---|"]
    for name, row in report["table"].items():
        lines.append(f"| {name} | {row['us']:.2f} | {row['variant']} | {row['error']:.1e} |")
    for title, key in (("Numba dispatch by argument kind", "argument_kinds"), ("Parts of a prepared call", "breakdown")):
        if report.get(key):
            lines += ["", f"{title}:", "", "| | µs per call |", "|---|---|"]
            lines += [f"| {name} | {value:.2f} |" for name, value in report[key].items()]
    if report.get("crossover"):
        lines += ["", "One thread against two (prepared calls, float32):", "",
                  "| problem | flops | one thread µs | two threads µs | two / one |", "|---|---|---|---|---|"]
        lines += [f"| {row['problem']} | {row['flops']} | {row['one_thread_us']:.1f} | {row['two_threads_us']:.1f} "
                  f"| {row['two_threads_us'] / row['one_thread_us']:.2f} |" for row in report["crossover"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loops", type=int, default=5, help="timed loops per way; the best counts (default 5)")
    parser.add_argument("--calls", type=int, default=2000, help="calls per loop (default 2000)")
    parser.add_argument("--argument-kinds", action="store_true", help="also time Numba's dispatch by argument kind")
    parser.add_argument("--breakdown", action="store_true", help="also time the parts of the prepared calls")
    parser.add_argument("--crossover", action="store_true", help="also time one thread against two by size")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--markdown", help="write the tables to this file")
    args = parser.parse_args(argv)
    if args.loops < 1 or args.calls < 1:
        parser.error("--loops and --calls must be at least 1")
    report = {"machine": machine(), "loops": args.loops, "calls": args.calls, "table": main_table(args)}
    print(f"{report['machine']}\nµs per call, best of {args.loops} loops of {args.calls} calls:")
    for name, row in report["table"].items():
        print(f"  {name:26} {row['us']:8.2f} us   ({row['variant']}; rel. error {row['error']:.1e})")
    if args.argument_kinds:
        report["argument_kinds"] = argument_kinds(args)
        print("Numba dispatch by argument kind:")
        for name, value in report["argument_kinds"].items():
            print(f"  {name:26} {value:8.2f} us")
    if args.breakdown:
        report["breakdown"] = breakdown(args)
        print("Parts of the prepared calls:")
        for name, value in report["breakdown"].items():
            print(f"  {name:42} {value:8.2f} us")
    if args.crossover:
        print("One thread against two:")
        report["crossover"] = crossover(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
