"""Resource report (registers, spills, local memory) of one generated kernel from NVIDIA's OpenCL compiler.

    python benchmarks/opencl_resources.py res3_3x3 --batch 32 --params '{"TM": 64, "TN": 128, "TK": 8, "WM": 8, "WN": 4}'

Builds with ``-cl-nv-verbose`` (NVIDIA only; other drivers ignore or reject the option) and prints the
build log's ptxas lines.
"""

import argparse
import json
import sys


def main(argv=None):
    import pyopencl as cl

    from sparkle import api
    from sparkle.opencl import codegen, runtime
    from sparkle.workloads import RESNET50_LAYERS, layer_inputs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layer", choices=[layer.name for layer in RESNET50_LAYERS])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--params", default="{}", help="JSON dict of tunables")
    args = parser.parse_args(argv)
    device = next(d for d in runtime.opencl_devices() if d.kind == "gpu")
    layer = next(layer for layer in RESNET50_LAYERS if layer.name == args.layer)
    x, w = layer_inputs(layer, args.batch)
    workload = codegen.Workload.from_spec(api.conv2d_spec(x, w, **layer.conv_kwargs()))
    source = codegen.render(workload, json.loads(args.params))
    program = cl.Program(device.context, source).build(options=["-cl-nv-verbose"])
    log = program.get_build_info(device.cl_device, cl.program_build_info.LOG)
    print("\n".join(line for line in log.splitlines() if "ptxas" in line) or log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
