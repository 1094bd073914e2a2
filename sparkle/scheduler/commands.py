"""The scheduler's commands of the ``sparkle`` command line: ``explain`` and ``profile``."""

from __future__ import annotations

import numpy as np


def add_commands(commands, types):
    """Add ``explain`` and ``profile`` to the ``sparkle`` parser's subcommands; ``types`` holds the CLI's
    argument types (shape_type, pair_type, padding_type, positive_int)."""
    explain = commands.add_parser(
        "explain", help="where device='auto' would run a call, and why",
        description="Show the scheduler's decision for one call without running it: the chosen device or split, "
                    "each device's predicted time broken down (transfer, compute, overhead, compile), the "
                    "confidence, whether the kernel variant is verified, and the reason. The options are the "
                    "arguments of sparkle.conv2d / sparkle.matmul.")
    ops = explain.add_subparsers(dest="op", required=True, metavar="OP")
    conv = ops.add_parser("conv2d", help="one convolution")
    conv.add_argument("--x", required=True, type=types["shape_type"]("NCHW"), metavar="N,C,H,W")
    conv.add_argument("--w", required=True, type=types["shape_type"](("K", "C/groups", "R", "S")),
                      metavar="K,C/g,R,S")
    conv.add_argument("--stride", type=types["pair_type"], default=1, metavar="S|SH,SW", help="(default: 1)")
    conv.add_argument("--padding", type=types["padding_type"], default=0, metavar="P|PH,PW|T,B,L,R|same|valid",
                      help="(default: 0)")
    conv.add_argument("--dilation", type=types["pair_type"], default=1, metavar="D|DH,DW", help="(default: 1)")
    conv.add_argument("--groups", type=types["positive_int"], default=1, help="(default: 1)")
    conv.add_argument("--bias", action="store_true", help="with a bias")
    conv.add_argument("--activation", choices=("relu",), default=None)
    matmul = ops.add_parser("matmul", help="one matrix product (M, K) @ (K, N)")
    for name in ("m", "k", "n"):
        matmul.add_argument(f"--{name}", required=True, type=types["positive_int"], metavar=name.upper())
    for parser in (conv, matmul):
        parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                            help="(default: %(default)s)")
        parser.add_argument("--on", default=None, metavar="DEVICE",
                            help="the operands already live on this OpenCL device ('opencl:N'), as DeviceArrays "
                                 "(default: numpy arrays on the host)")
        parser.set_defaults(run=cmd_explain, parser=parser)

    profile = commands.add_parser(
        "profile", help="measure every device once (GEMM speed, overhead, transfers, compile cost)",
        description="Profile every device the scheduler uses, as device='auto' does on its first call, and show "
                    "the profiles kept in the cache directory. Profiles are measured again when the device, "
                    "its driver or Sparkle's kernels change.")
    profile.add_argument("--force", action="store_true", help="measure again even if a profile is stored")
    profile.set_defaults(run=cmd_profile, parser=profile)


def _operands(args):
    dtype = np.dtype(args.dtype)
    if args.op == "conv2d":
        operands = [np.zeros(args.x, dtype), np.zeros(args.w, dtype), np.zeros(args.w[0], dtype) if args.bias else None]
        kwargs = dict(stride=args.stride, padding=args.padding, dilation=args.dilation, groups=args.groups,
                      activation=args.activation)
    else:
        operands, kwargs = [np.zeros((args.m, args.k), dtype), np.zeros((args.k, args.n), dtype)], {}
    if args.on is not None:
        from ..ops import to_device

        operands = [None if o is None else to_device(o, args.on) for o in operands]
    return operands, kwargs


def cmd_explain(args):
    from .scheduler import default_scheduler

    try:
        operands, kwargs = _operands(args)
        decision = default_scheduler().explain(args.op, *operands, **kwargs)
    except (ValueError, TypeError) as error:
        args.parser.error(str(error))
    print(decision)
    return 0


def cmd_profile(args):
    from .scheduler import default_scheduler

    profiles = default_scheduler().profile(force=args.force)
    print(f"{'device':<12} {'GFLOPS':>9} {'overhead':>10} {'upload GB/s':>12} {'download GB/s':>14} "
          f"{'latency up/down':>16} {'compile':>9} {'measured in':>12}")
    for device, profile in profiles.items():
        if profile is None:
            print(f"{device:<12} (could not be profiled)")
            continue
        up, down = (f"{rate / 1e9:.1f}" if rate != float("inf") else "host"
                    for rate in (profile.upload_bytes_per_second, profile.download_bytes_per_second))
        latency = f"{profile.upload_latency_seconds * 1e6:.0f}/{profile.download_latency_seconds * 1e6:.0f} us"
        print(f"{device:<12} {profile.gflops:>9.1f} {profile.overhead_seconds * 1e6:>8.0f} us {up:>12} {down:>14} "
              f"{latency:>16} {profile.compile_seconds:>7.2f} s {profile.seconds_to_measure:>10.2f} s")
    return 0
