"""The ``sparkle`` command: list devices, tune OpenCL kernels, inspect the cache.

    sparkle devices
    sparkle tune conv2d --input 1,64,56,56 --weight 64,64,3,3 --padding 1 --device opencl:0 --time-budget 60
    sparkle tune matmul --m 1024 --k 1024 --n 1024 --device opencl:0 --time-budget 60
    sparkle tune resnet50 --batch 1 --device opencl:0 --time-budget-per-layer 30
    sparkle cache [--clear]
    sparkle explain conv2d --x 1,64,56,56 --w 64,64,3,3 --padding 1
    sparkle profile [--force]
    sparkle --version

``python -m sparkle ...`` is the same command. Exit status: 0 on success, 1 when tuning found no
correct kernel, 2 for bad arguments (argparse's convention).

Options are the API's keyword names in kebab case (``--time-budget`` is ``time_budget=``, ``--activation
relu`` is ``activation="relu"``, ``--no-progress`` is ``progress=False``). The spellings of earlier
releases (``--budget``, ``--budget-per-layer``, ``--relu``, ``--quiet``) still work for one release, with a
note on stderr, and are not listed by ``--help``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

import numpy as np

TUNING_GLOB = "opencl-tuning-v*.json"  # every layout version of the tuning database
PROGRAMS_GLOB = "opencl-programs-v*"  # directories of cached OpenCL program binaries
HEALTH_GLOB = "opencl-health-v*.json*"  # stored device health verdicts (and their lock files)
SCHEDULER_GLOB = "scheduler-*-v*.json*"  # the scheduler's profiles, model and quarantine (and lock files)


# ---------------------------------------------------------------------------------------------------------
# Argument types: each turns one command-line string into a value or raises ArgumentTypeError, which
# argparse reports as "argument --name: <message>" with exit status 2.

def _ints(text, what):
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    return values


def shape_type(names):
    """A comma-separated shape of len(names) positive ints, e.g. ``1,64,56,56`` for N,C,H,W."""
    what = f"{len(names)} comma-separated positive ints {','.join(names)}"

    def parse(text):
        values = _ints(text, what)
        if len(values) != len(names) or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    parse.__name__ = "shape"  # argparse names the type in some messages
    return parse


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def pair_type(text):
    """``stride`` / ``dilation``: ``2`` or ``2,1`` (height, width), positive."""
    values = _ints(text, "a positive int or a pair H,W of them")
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or a pair H,W of them, got {text!r}")
    return values[0] if len(values) == 1 else values


def padding_type(text):
    """``1``, ``1,2`` (h, w), ``0,1,0,1`` (top, bottom, left, right), ``same`` or ``valid``."""
    if text in ("same", "valid"):
        return text
    what = "'same', 'valid', an int, H,W or TOP,BOTTOM,LEFT,RIGHT of non-negative ints"
    values = _ints(text, what)
    if len(values) not in (1, 2, 4) or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------------------------------------
# sparkle devices

def _gib(nbytes):
    return f"{nbytes / 2**30:.1f} GiB" if nbytes else "?"


def _table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (header, *rows)]
    return "\n".join(lines)


def cmd_devices(args):
    # (``sparkle.devices`` is the function; the module's other names are imported from it directly.)
    from .devices import devices, opencl_backend_device, opencl_unavailable_reason

    found = devices()
    print(_table(("id", "kind", "name", "vendor", "compute units", "memory", "available"),
                 [(d.id, d.kind, d.name, d.vendor, d.compute_units, _gib(d.memory), "yes" if d.available else "NO")
                  for d in found]))
    print()
    from .cpu.isa import ISA_ENV, active_isa

    print(f"cpu runs the {found[0].isa} micro-kernels ({active_isa().description}); {ISA_ENV}=avx2 or portable "
          "forces a narrower family.")
    for device in found:
        if not device.available:
            print(f"{device.id} is unavailable: {device.reason}")
    reason = opencl_unavailable_reason()
    if reason is not None:
        print(f"OpenCL is unavailable: {reason}")
    else:
        try:
            default = opencl_backend_device("opencl")
            print(f'device="opencl" means {default.id} (the first available GPU, else the first available '
                  'OpenCL device).')
        except ValueError as error:
            print(error)
    print('device="auto" lets the scheduler place each call (sparkle explain shows where and why; sparkle profile '
          'shows what it measured); device="reference" is the float64 oracle.')
    return 0


# ---------------------------------------------------------------------------------------------------------
# sparkle tune

def _random(shape, dtype, rng):
    """Random values in [0.5, 1.5): no zeros (the tuner only reads shapes and dtype from them)."""
    return rng.uniform(0.5, 1.5, size=shape).astype(dtype)


def _opencl_target(parser, device):
    """The OpenCL device to tune on; a usage error listing only the devices tuning accepts otherwise."""
    from .devices import resolve_tuning_device

    try:
        return resolve_tuning_device(device)
    except (ValueError, TypeError) as error:
        parser.error(f"argument --device: {error}")


def _database_path():
    from .opencl.tuning import database

    return database.DOCUMENT.path


def _report(result, verbose):
    print(result)
    shown = result.rejected if verbose else result.rejected[:5]
    for rejected in shown:
        print(f"  rejected {rejected['params']}: {rejected['reason']}")
    if len(shown) < len(result.rejected):
        print(f"  ... and {len(result.rejected) - len(shown)} more rejected (--verbose lists all)")


def _tune(args, op, operands, kwargs):
    import sparkle

    return sparkle.tune(op, *operands, device=args.device, time_budget=args.time_budget,
                        max_candidates=args.max_candidates, progress=args.progress, seed=args.seed, **kwargs)


def cmd_tune_conv2d(args):
    from . import api

    parser = args.parser
    rng = np.random.default_rng(args.seed)
    x = _random(args.input, args.dtype, rng)
    w = _random(args.weight, args.dtype, rng)
    operands = (x, w, _random((args.weight[0],), args.dtype, rng)) if args.bias else (x, w)
    kwargs = {"stride": args.stride, "padding": args.padding, "dilation": args.dilation, "groups": args.groups,
              "activation": args.activation}
    try:
        api.conv2d_spec(*operands, **kwargs)
    except (ValueError, TypeError) as error:
        parser.error(f"--input {','.join(map(str, args.input))} --weight {','.join(map(str, args.weight))} "
                     f"is not a valid conv2d: {error}")
    _opencl_target(parser, args.device)
    result = _tune(args, "conv2d", operands, kwargs)
    _report(result, args.verbose)
    print(f"tuning database: {_database_path()}")
    return 0 if result.best is not None else 1


def cmd_tune_matmul(args):
    _opencl_target(args.parser, args.device)
    rng = np.random.default_rng(args.seed)
    a = _random((args.m, args.k), args.dtype, rng)
    b = _random((args.k, args.n), args.dtype, rng)
    result = _tune(args, "matmul", (a, b), {})
    _report(result, args.verbose)
    print(f"tuning database: {_database_path()}")
    return 0 if result.best is not None else 1


def cmd_tune_resnet50(args):
    from .workloads import RESNET50_LAYERS, layer_inputs

    target = _opencl_target(args.parser, args.device)
    args.time_budget = args.time_budget_per_layer
    layers = [layer for layer in RESNET50_LAYERS if not args.layers or layer.name in args.layers]
    rows, failed = [], 0
    for layer in layers:
        x, w = layer_inputs(layer, args.batch, np.dtype(args.dtype), seed=args.seed)
        result = _tune(args, "conv2d", (x, w), layer.conv_kwargs())
        _report(result, args.verbose)
        if result.best is None:
            failed += 1
            rows.append((layer.name, "-", "-", "-", result.tried))
        else:
            gain = f"{result.default_seconds / result.best_seconds:.2f}x" if result.default_seconds else "-"
            rows.append((layer.name, f"{result.best_seconds * 1e3:.3f}", f"{result.gflops:.1f}", gain,
                         result.tried))
    print()
    print(f"ResNet-50, batch {args.batch}, {args.dtype}, on {target.id}:")
    print(_table(("layer", "ms", "GFLOPS", "vs defaults", "tried"), rows))
    print(f"tuning database: {_database_path()}")
    return 0 if not failed else 1


# ---------------------------------------------------------------------------------------------------------
# sparkle cache

def _size_text(nbytes):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024


def _cache_contents(directory):
    """(tuning database files, program binary directories) under ``directory``."""
    return sorted(directory.glob(TUNING_GLOB)), sorted(p for p in directory.glob(PROGRAMS_GLOB) if p.is_dir())


def _print_tuning(path, verbose):
    import json

    from .opencl import runtime

    try:
        document = json.loads(path.read_text())
        devices = document.get("devices", {})
    except (OSError, ValueError, AttributeError) as error:
        print(f"tuning database: {path} (unreadable: {error})")
        return
    present = {device.identity: device for device in runtime.opencl_devices()}
    print(f"tuning database: {path}")
    if not devices:
        print("  no tuned workloads")
    for identity, entry in sorted(devices.items()):
        workloads = entry.get("workloads", {})
        tuned = {key: value for key, value in workloads.items() if "best" in value}
        device = present.get(identity)
        name = f"{device.id} ({device.name})" if device else f"{identity} (not present now)"
        print(f"  {name}: {len(tuned)} tuned workload{'s' if len(tuned) != 1 else ''}"
              + (f", {len(workloads) - len(tuned)} with no correct candidate" if len(workloads) > len(tuned)
                 else ""))
        if verbose:
            for key, value in sorted(tuned.items()):
                best = value["best"]
                print(f"    {key}: {best.get('gflops') or 0:.1f} GFLOPS with {best.get('params')}")


def _binaries_text(folder):
    files = list(folder.glob("*.bin"))
    return f"{len(files)} ({_size_text(sum(path.stat().st_size for path in files))}) in {folder}"


def cmd_cache(args):
    from .cache import cache_dir
    from .opencl import runtime
    from .opencl.tuning import database
    from .opencl.tuning.relatives import DeviceTraits

    directory = cache_dir()
    tuning_files, program_dirs = _cache_contents(directory)
    if args.clear:
        removed = []
        if args.clear in ("all", "tuning"):
            for path in tuning_files:
                path.unlink(missing_ok=True)
                path.with_name(path.name + ".lock").unlink(missing_ok=True)
                removed.append(str(path))
        if args.clear in ("all", "programs"):
            for path in program_dirs:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(str(path))
            for path in sorted(directory.glob(HEALTH_GLOB)):  # verdicts of building: checked again
                path.unlink(missing_ok=True)
                if path.suffix == ".json":
                    removed.append(str(path))
        if args.clear in ("all", "scheduler"):
            for path in sorted(directory.glob(SCHEDULER_GLOB)):
                path.unlink(missing_ok=True)
                if path.suffix == ".json":
                    removed.append(str(path))
        print(f"cache directory: {directory}")
        print("removed: " + (", ".join(removed) if removed else "nothing (already empty)"))
        return 0
    print(f"cache directory: {directory}")
    current = database.DOCUMENT.path
    if current not in tuning_files:
        print(f"tuning database: {current} (none yet: run 'sparkle tune ...')")
    for path in tuning_files:
        if path == current:
            _print_tuning(path, args.verbose)
        else:
            print(f"tuning database of an older kernel template (not used): {path}")
    for device in runtime.opencl_devices():
        print(f"{device.id} ({device.name}): {database.provenance(device.identity, DeviceTraits.of(device))}")
    scheduler_files = [path for path in sorted(directory.glob(SCHEDULER_GLOB)) if path.suffix == ".json"]
    print("scheduler (device profiles, learned model, quarantined kernel variants): "
          + (", ".join(path.name for path in scheduler_files) if scheduler_files else "nothing learned yet"))
    in_use = directory / runtime.PROGRAM_CACHE
    print("program binaries: " + (_binaries_text(in_use) if in_use.is_dir() else "0 (0 B)"))
    for folder in program_dirs:
        if folder != in_use:
            print(f"program binaries of an older cache layout (not used): {_binaries_text(folder)}")
    return 0


# ---------------------------------------------------------------------------------------------------------

class _Renamed(argparse.Action):
    """The old spelling of a renamed option: hidden from --help, still works for one release, and says so
    on stderr. ``nargs=0`` with ``const`` for a flag, else it takes the value of the new option."""

    def __init__(self, option_strings, dest, renamed_to, **kwargs):
        self.renamed_to = renamed_to
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is now {self.renamed_to}; the old name will be removed in "
              "the next release", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def _version():
    from . import __version__

    return f"sparkle {__version__}"


def build_parser():
    from .workloads import RESNET50_LAYERS

    parser = argparse.ArgumentParser(
        prog="sparkle", description="Sparkle: conv2d and GEMM on the CPU and on OpenCL devices, checked against "
                                    "a float64 reference.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    devices = commands.add_parser("devices", help="list the devices Sparkle can run on",
                                  description="List the devices Sparkle can run on (the ids device= accepts) and, "
                                              "when OpenCL is unavailable, why.")
    devices.set_defaults(run=cmd_devices, parser=devices)

    tune = commands.add_parser("tune", help="tune the OpenCL kernel for a workload on one device",
                               description="Search the OpenCL kernel's parameters for a workload on one device: "
                                           "every candidate is checked against the float64 reference before it "
                                           "is timed, and the fastest is stored in the tuning database, which "
                                           "later calls of that shape (and the nearest untuned shapes) use. "
                                           "The options are the keyword arguments of sparkle.tune.")
    ops = tune.add_subparsers(dest="op", required=True, metavar="OP")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="opencl", help="'opencl' (first available GPU, else first available "
                                                           "OpenCL device) or an available 'opencl:N' as listed "
                                                           "by 'sparkle devices' (default: %(default)s)")
    common.add_argument("--max-candidates", type=positive_int, default=None, metavar="COUNT",
                        help="stop after this many candidates (default: until the time budget is spent)")
    common.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="(default: %(default)s)")
    common.add_argument("--seed", type=int, default=0, help="order of the search and the random data "
                                                            "(default: %(default)s)")
    common.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    common.add_argument("--quiet", action=_Renamed, renamed_to="--no-progress", dest="progress", nargs=0,
                        const=False)
    common.add_argument("-v", "--verbose", action="store_true", help="list every rejected candidate")
    budget = argparse.ArgumentParser(add_help=False)
    budget.add_argument("--time-budget", type=positive_seconds, default=30.0, metavar="SECONDS",
                        help="time budget of the search (default: %(default)s)")
    budget.add_argument("--budget", action=_Renamed, renamed_to="--time-budget", dest="time_budget",
                        type=positive_seconds, metavar="SECONDS")

    conv = ops.add_parser("conv2d", parents=[common, budget], help="one convolution",
                          description="Tune one convolution (NCHW input, KCRS weights, as sparkle.conv2d).")
    conv.add_argument("--input", required=True, type=shape_type("NCHW"), metavar="N,C,H,W",
                      help="the shape of x")
    conv.add_argument("--weight", required=True, type=shape_type(("K", "C/groups", "R", "S")),
                      metavar="K,C/g,R,S", help="the shape of w")
    conv.add_argument("--stride", type=pair_type, default=1, metavar="S|SH,SW", help="(default: 1)")
    conv.add_argument("--padding", type=padding_type, default=0, metavar="P|PH,PW|T,B,L,R|same|valid",
                      help="(default: 0)")
    conv.add_argument("--dilation", type=pair_type, default=1, metavar="D|DH,DW", help="(default: 1)")
    conv.add_argument("--groups", type=positive_int, default=1, help="(default: 1)")
    conv.add_argument("--bias", action="store_true", help="with a bias (fused into the write-back)")
    conv.add_argument("--activation", choices=("relu",), default=None,
                      help="fused into the write-back after the bias (default: none)")
    conv.add_argument("--relu", action=_Renamed, renamed_to="--activation relu", dest="activation", nargs=0,
                      const="relu")
    conv.set_defaults(run=cmd_tune_conv2d, parser=conv)

    matmul = ops.add_parser("matmul", parents=[common, budget], help="one matrix product (M, K) @ (K, N)",
                            description="Tune one matrix product (M, K) @ (K, N), as sparkle.matmul.")
    for name in ("m", "k", "n"):
        matmul.add_argument(f"--{name}", required=True, type=positive_int, metavar=name.upper())
    matmul.set_defaults(run=cmd_tune_matmul, parser=matmul)

    names = [layer.name for layer in RESNET50_LAYERS]
    resnet = ops.add_parser("resnet50", parents=[common], help="every ResNet-50 layer of sparkle.workloads",
                            description="Tune every ResNet-50 layer of sparkle.workloads.RESNET50_LAYERS, "
                                        "one after the other.")
    resnet.add_argument("--batch", type=positive_int, default=1, help="(default: %(default)s)")
    resnet.add_argument("--time-budget-per-layer", type=positive_seconds, default=30.0, metavar="SECONDS",
                        help="time budget of each layer's search (default: %(default)s)")
    resnet.add_argument("--budget-per-layer", action=_Renamed, renamed_to="--time-budget-per-layer",
                        dest="time_budget_per_layer", type=positive_seconds, metavar="SECONDS")
    resnet.add_argument("--layers", nargs="+", choices=names, metavar="LAYER",
                        help=f"only these layers (default: all of {', '.join(names)})")
    resnet.set_defaults(run=cmd_tune_resnet50, parser=resnet)

    cache = commands.add_parser("cache", help="show or clear the cache (tuning database, program binaries)",
                                description="Show Sparkle's cache directory (SPARKLE_CACHE_DIR, else the user "
                                            "cache directory) and what it holds: the tuning database per "
                                            "device and the cached OpenCL program binaries.")
    cache.add_argument("--clear", nargs="?", const="all", choices=("all", "tuning", "programs", "scheduler"),
                       help="remove the tuning database, the program binaries with the device health checks, "
                            "and/or what the scheduler learned (default: all)")
    cache.add_argument("-v", "--verbose", action="store_true", help="list the tuned workloads")
    cache.set_defaults(run=cmd_cache, parser=cache)

    from .scheduler.commands import add_commands

    add_commands(commands, dict(shape_type=shape_type, pair_type=pair_type, padding_type=padding_type,
                                positive_int=positive_int))
    return parser


def main(argv=None):
    """Run the command line ``argv`` (default: sys.argv[1:]); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:
        # The reader went away (``sparkle devices | head``): stop quietly, as Unix tools do; point
        # stdout at /dev/null so that Python's flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
