import sys, numpy as np, pyopencl as cl
from sparkle import api
from sparkle.opencl import runtime, codegen, launch
from sparkle.workloads import RESNET50_LAYERS, layer_inputs
dev = next(d for d in runtime.opencl_devices() if d.kind == "gpu")
layer = next(l for l in RESNET50_LAYERS if l.name == sys.argv[1])
x, w = layer_inputs(layer, 32)
spec = api.conv2d_spec(x, w, **layer.conv_kwargs())
wl = codegen.Workload.from_spec(spec)
params = dict(TM=64, TN=128, TK=8, WM=8, WN=4, VW=1)
src = codegen.render(wl, params)
if len(sys.argv) > 2:
    prg = cl.Program(dev.context, src).build(options=["-cl-nv-verbose"])
    print(prg.get_build_info(dev.cl_device, cl.program_build_info.LOG))
    sys.exit()
mf = cl.mem_flags
bufs = [cl.Buffer(dev.context, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=a) for a in (x, w, np.zeros(1, np.float32))]
out = cl.Buffer(dev.context, mf.READ_WRITE, int(np.prod(spec.output_shape)) * 4)
for _ in range(3):
    ev = launch.enqueue(dev, wl, params, *bufs, out, has_bias=False, relu=False)
print(launch.event_seconds(ev) * 1e3, "ms")
