"""OpenCL device health: each device builds, runs and checks a small generated kernel once per identity.

The real check runs on every device here. Drivers that cannot build anything (PyPI's PoCL 3.0 on a CPU its
LLVM 14 does not know, e.g. AMD Zen 5: "error: unknown target CPU 'generic'") are simulated by injecting
that build log where the driver reports it (``runtime._build``), on the real device.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

pytest.importorskip("pyopencl")

import pyopencl as cl  # noqa: E402

import sparkle  # noqa: E402
from sparkle import api, demo, reference  # noqa: E402
from sparkle.cli import main as cli_main  # noqa: E402
from sparkle.devices import resolve_device  # noqa: E402
from sparkle.opencl import backend, buildlog, codegen, health, launch, runtime  # noqa: E402
from sparkle.opencl.backend import OpenCLFallbackWarning  # noqa: E402
from sparkle.opencl.codegen import Workload  # noqa: E402

import _opencl  # noqa: E402
from _helpers import assert_close_to_reference  # noqa: E402
from _opencl import opencl_params, runtime_device  # noqa: E402

UNKNOWN_CPU = "error: unknown target CPU 'generic'"
# What PyOpenCL raises when PoCL cannot build for the CPU: the status three times, then the build log.
POCL_UNKNOWN_CPU_LOG = (
    "clBuildProgram failed: BUILD_PROGRAM_FAILURE - clBuildProgram failed: BUILD_PROGRAM_FAILURE\n\n"
    "Build on <pyopencl.Device 'pthread-AMD EPYC 9B45' on 'Portable Computing Language'>:\n\n"
    f"{UNKNOWN_CPU}\nnote: valid target CPU values are: nocona, core2, penryn, skylake-avx512, znver3\n"
    "Device pthread-AMD EPYC 9B45 failed to build the program\n\n(options: -I /site-packages/pyopencl/cl)")
REMEDY = "install Debian/Ubuntu's pocl-opencl-icd: apt-get install pocl-opencl-icd"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A private cache, no verdicts or failed variants remembered from other tests."""
    monkeypatch.setenv("SPARKLE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(health, "_verdicts", {})
    monkeypatch.setattr(backend, "_failed", {})


@pytest.fixture(params=opencl_params())
def device(request, monkeypatch):
    device = runtime_device(request.param)
    # Built programs are kept per device in memory: drop them for this test, so every build reaches the driver.
    monkeypatch.setattr(device, "_programs", {})
    monkeypatch.setattr(device, "_kernels", {})
    return device


def unknown_cpu_error():
    return cl.RuntimeError(cl._cl._ErrorRecord("clBuildProgram", cl.status_code.BUILD_PROGRAM_FAILURE,
                                               POCL_UNKNOWN_CPU_LOG))


def inject_unknown_cpu(monkeypatch, device, only=lambda source: True):
    """Every build on ``device`` (of a source for which ``only`` is true) fails as PyPI's PoCL does on Zen 5."""
    real = runtime._build

    def build(d, source, options, key):
        if d is device and only(source):
            raise unknown_cpu_error()
        return real(d, source, options, key)

    monkeypatch.setattr(runtime, "_build", build)


def expected_unknown_cpu_reason(device):
    pocl, llvm = buildlog.driver_versions(device)
    return f"PoCL {pocl} (LLVM {llvm}) does not know this CPU: unknown target CPU 'generic'; {REMEDY}"


def no_probe(device):
    raise AssertionError(f"the health of {device.id} was checked again instead of read from the cache")


def twin(device, index):
    """Another runtime device on the same OpenCL device with an identity of its own (a second 'device')."""
    other = runtime.OpenCLDevice(index, device.cl_device)
    other.identity = device.identity + "|twin"
    return other


# --- the real check ---------------------------------------------------------------------------------------

def test_check_builds_runs_and_matches_the_reference(device, launched):
    verdict = health.check(device)
    assert verdict == health.Health(True, None)
    assert len(launched) == 1, "the check must launch the generated kernel once"
    stored = health.DOCUMENT.load()[device.identity]
    assert stored["available"] is True and stored["reason"] is None
    assert [d for d in sparkle.devices() if d.id == device.id][0].available is True


def test_check_problem_uses_every_epilogue_feature():
    x, w, bias, kwargs = health.check_problem()
    expected = reference.conv2d(x, w, bias, **kwargs)
    without_bias = reference.conv2d(x, w, None, **kwargs)
    assert kwargs["activation"] == "relu" and (expected == 0).any() and (expected > 0).any()
    assert np.abs(expected - without_bias).max() > 0.1  # a kernel that drops the bias is caught


def test_wrong_results_make_a_device_unavailable(device, monkeypatch):
    real = codegen.render

    def render(workload, params, **kwargs):  # the check's kernel forgets its bias
        return real(workload, params, **kwargs).replace("#define HAS_BIAS 1", "#define HAS_BIAS 0")

    monkeypatch.setattr(codegen, "render", render)
    verdict = health.probe(device)
    assert not verdict.available
    assert re.fullmatch(r"the test kernel computes wrong results \(relative error \d\.\de[-+]\d+ against the "
                        r"float64 reference, allowed 1e-05\)", verdict.reason), verdict.reason


def test_a_failed_launch_makes_a_device_unavailable(device, monkeypatch):
    def enqueue(*args, **kwargs):
        raise cl.RuntimeError(cl._cl._ErrorRecord("clEnqueueNDRangeKernel", cl.status_code.OUT_OF_RESOURCES,
                                                  "injected by the test"))

    monkeypatch.setattr(launch, "enqueue", enqueue)
    verdict = health.probe(device)
    assert verdict == health.Health(False, "the test kernel does not run (clEnqueueNDRangeKernel failed: "
                                           "OUT_OF_RESOURCES - injected by the test)")


def test_verdict_is_read_from_the_disk_cache_by_a_later_process(device, monkeypatch):
    assert health.check(device).available
    monkeypatch.setattr(health, "_verdicts", {})  # what a new process starts with
    monkeypatch.setattr(health, "probe", no_probe)
    assert health.check(device) == health.Health(True, None)


def test_an_unwritable_cache_does_not_fail_the_check(device, monkeypatch):
    def refuse(*args):
        raise PermissionError("read-only cache directory (injected by the test)")

    monkeypatch.setattr(health.DOCUMENT, "update", refuse)
    monkeypatch.setattr(health.DOCUMENT, "snapshot", refuse)
    assert health.check(device) == health.Health(True, None)


def test_a_damaged_stored_verdict_is_checked_again(device, monkeypatch, launched):
    health.DOCUMENT.update(lambda document: document.__setitem__(device.identity, {"available": "yes"}))
    assert health.check(device) == health.Health(True, None)
    assert len(launched) == 1
    assert health.DOCUMENT.load()[device.identity]["available"] is True


# --- a device whose driver cannot build (PyPI's PoCL on a CPU its LLVM does not know) ----------------------

def test_build_log_of_an_unknown_cpu_makes_the_device_unavailable_with_cause_and_remedy(device, monkeypatch):
    inject_unknown_cpu(monkeypatch, device)
    verdict = health.check(device)
    assert verdict == health.Health(False, expected_unknown_cpu_reason(device))
    if "PoCL 3.0-rc2" in device.cl_device.platform.version:  # PyPI's PoCL, the one that fails on Zen 5
        assert verdict.reason.startswith("PoCL 3.0 (LLVM 14) does not know this CPU: unknown target CPU 'generic'")
    listed = {d.id: d for d in sparkle.devices()}[device.id]
    assert (listed.available, listed.reason) == (False, verdict.reason)

    # Stored with the identity: a new process (no verdicts in memory, builds working) does not check again.
    stored = health.DOCUMENT.load()[device.identity]
    assert (stored["available"], stored["reason"]) == (False, verdict.reason)
    monkeypatch.setattr(runtime, "_build", lambda *args: no_probe(device))
    monkeypatch.setattr(health, "_verdicts", {})
    monkeypatch.setattr(health, "probe", no_probe)
    assert health.check(device) == verdict

    # Asked for by id: ValueError with the reason, for calls and for device arrays.
    x = np.ones((1, 2, 4, 4), np.float32)
    with pytest.raises(ValueError, match=re.escape(f"device {device.id!r} ({device.name}) is unavailable: "
                                                   f"{verdict.reason}")):
        sparkle.conv2d(x, x[:, :, :3, :3].copy(), device=device.id)
    with pytest.raises(ValueError, match="unknown target CPU 'generic'"):
        sparkle.to_device(x, device.id)
    # The CPU backend is untouched.
    assert_close_to_reference(sparkle.matmul(x[0, 0], x[0, 0], device="cpu"), reference.matmul(x[0, 0], x[0, 0]),
                              np.float32)


def test_opencl_skips_an_unavailable_device_for_the_next_available_one(device, monkeypatch):
    second = twin(device, 1)
    monkeypatch.setattr(runtime, "opencl_devices", lambda: [device, second])
    inject_unknown_cpu(monkeypatch, device)
    assert resolve_device("opencl") is second
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((2, 3, 3, 3)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OpenCLFallbackWarning)  # it really runs on the second device
        assert_close_to_reference(sparkle.conv2d(x, w, device="opencl"), reference.conv2d(x, w), np.float32)
    assert [(d.id, d.available) for d in sparkle.devices()[1:]] == [(device.id, False), (second.id, True)]


def test_opencl_raises_with_every_reason_when_no_device_is_available(device, monkeypatch):
    second = twin(device, 1)
    monkeypatch.setattr(runtime, "opencl_devices", lambda: [device, second])
    inject_unknown_cpu(monkeypatch, device)
    inject_unknown_cpu(monkeypatch, second)
    reason = expected_unknown_cpu_reason(device)
    expected = ("device='opencl' is not available: no OpenCL device can run Sparkle's kernels:"
                f"\n  {device.id} ({device.name}): {reason}\n  {second.id} ({second.name}): {reason}")
    with pytest.raises(ValueError) as info:
        sparkle.matmul(np.ones((2, 2)), np.ones((2, 2)), device="opencl")
    assert str(info.value) == expected
    with pytest.raises(ValueError, match=re.escape(expected)):
        sparkle.to_device(np.ones(3))  # to_device's default device is "opencl"


def test_test_helper_skips_an_unavailable_device_saying_why(device, monkeypatch):
    inject_unknown_cpu(monkeypatch, device)
    assert not health.check(device).available  # (the helper would read the verdict of the collection's check)
    params = {getattr(p, "values", (p,))[0]: p for p in _opencl.opencl_params()}
    skipped = params[device.id]
    reasons = [mark.kwargs["reason"] for mark in skipped.marks if mark.name == "skip"]
    assert reasons == [f"{device.id} ({device.name}) is unavailable: {expected_unknown_cpu_reason(device)}"]
    assert device.id not in _opencl.opencl_device_ids()


def test_cli_devices_shows_the_unavailable_device_and_why(device, monkeypatch, capsys):
    inject_unknown_cpu(monkeypatch, device)
    monkeypatch.setattr(runtime, "opencl_devices", lambda: [device])
    assert cli_main(["devices"]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith(device.id + "  ")]  # table rows: padded
    assert len(row) == 1 and row[0].endswith("  NO"), out
    assert f"{device.id} is unavailable: {expected_unknown_cpu_reason(device)}" in out
    assert "device='opencl' is not available: no OpenCL device can run Sparkle's kernels:" in out
    assert re.search(r"^cpu .*  yes$", out, re.MULTILINE)


def test_demo_refuses_an_unavailable_device_with_the_reason(device, monkeypatch, capsys):
    inject_unknown_cpu(monkeypatch, device)
    with pytest.raises(SystemExit) as info:
        demo.main(["--device", device.id])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and "unknown target CPU 'generic'" in err and REMEDY in err


# --- the fallback warning carries the build log's first error line ----------------------------------------

def is_check_source(source):
    return source.startswith(f"// sparkle kernel for {check_workload().key}\n")


def check_workload():
    x, w, bias, kwargs = health.check_problem()
    return Workload.from_spec(api.conv2d_spec(x, w, bias, **kwargs))


def test_fallback_warning_gives_the_unknown_cpu_line_and_its_meaning(device, monkeypatch):
    assert health.check(device).available
    inject_unknown_cpu(monkeypatch, device)
    a = np.random.default_rng(2).standard_normal((5, 7)).astype(np.float32)
    with pytest.warns(OpenCLFallbackWarning) as record:
        result = sparkle.matmul(a, a.T, device=device.id)
    assert_close_to_reference(result, reference.matmul(a, a.T), np.float32)
    message = str(record[0].message)
    assert message == (f"{device.id} ({device.name}): the kernel failed to build: {UNKNOWN_CPU} "
                       f"({expected_unknown_cpu_reason(device).split(': unknown')[0]}; {REMEDY}); "
                       "this call ran on the Numba CPU backend instead")


def test_fallback_warning_gives_the_real_compilers_first_error_line(device, monkeypatch):
    assert health.check(device).available
    real = codegen.render

    def render(workload, params, **kwargs):  # invalid source for every workload but the health check's
        source = real(workload, params, **kwargs)
        return source if workload == check_workload() else source + "\nthis is not OpenCL C;\n"

    monkeypatch.setattr(codegen, "render", render)
    a = np.ones((3, 4), np.float32)
    with pytest.warns(OpenCLFallbackWarning) as record:
        sparkle.matmul(a, a.T, device=device.id)
    message = str(record[0].message)
    # The driver's own first line with "error:" (PoCL: "error: <file>:<line>:<col>: unknown type name 'this'").
    line = re.search(r"the kernel failed to build: (.*error:.*); this call ran", message)
    assert line and "'this'" in line.group(1), message
    assert "BUILD_PROGRAM_FAILURE" not in message


def test_demo_says_where_layers_ran_when_opencl_calls_fall_back(device, monkeypatch, capsys):
    assert health.check(device).available
    inject_unknown_cpu(monkeypatch, device, only=lambda source: not is_check_source(source))
    assert demo.main(["--device", device.id, "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Device: the Numba CPU backend: every layer asked of {device.id} {device.name} (OpenCL" in out
    assert UNKNOWN_CPU in out
    layer_rows = [line for line in out.splitlines() if line.startswith(("conv1", "res"))]
    assert len(layer_rows) == 8 and all(line.endswith("yes   cpu (fallback)") for line in layer_rows), layer_rows
    assert f"Device: {device.id}" not in out


# --- reading build logs -----------------------------------------------------------------------------------

class FakeDevice:
    """Just the version strings buildlog reads."""

    def __init__(self, platform_name, platform_version, device_version="OpenCL 3.0", driver_version="1"):
        platform = type("Platform", (), {"name": platform_name, "version": platform_version})()
        self.cl_device = type("CLDevice", (), {"platform": platform, "version": device_version,
                                               "driver_version": driver_version})()


DEBIAN_POCL = FakeDevice("Portable Computing Language", "OpenCL 3.0 PoCL 3.1+debian  Linux, None+Asserts, RELOC, "
                                                        "SPIR, LLVM 15.0.6, SLEEF, DISTRO, POCL_DEBUG")


def test_build_log_reading():
    assert buildlog.first_error_line(POCL_UNKNOWN_CPU_LOG) == UNKNOWN_CPU
    assert buildlog.first_error_line("no problem here\nwarning: x") is None
    assert buildlog.status_line(POCL_UNKNOWN_CPU_LOG) == "clBuildProgram failed: BUILD_PROGRAM_FAILURE"
    assert buildlog.driver_versions(DEBIAN_POCL) == ("3.1", "15")
    assert buildlog.unavailable_reason(DEBIAN_POCL, POCL_UNKNOWN_CPU_LOG) == \
        f"PoCL 3.1 (LLVM 15) does not know this CPU: unknown target CPU 'generic'; {REMEDY}"
    other = FakeDevice("Some Vendor OpenCL", "OpenCL 3.0 Some Vendor")
    assert buildlog.unavailable_reason(other, POCL_UNKNOWN_CPU_LOG).startswith(
        "Some Vendor OpenCL (its LLVM) does not know this CPU: unknown target CPU 'generic';")
    unknown_cause = "x\nBuild on y:\n\ninput.cl:3:5: error: use of undeclared identifier 'q'\n"
    assert buildlog.unavailable_reason(other, unknown_cause) == \
        "the test kernel does not build: input.cl:3:5: error: use of undeclared identifier 'q'"
    assert buildlog.fallback_cause(other, unknown_cause) == \
        "the kernel failed to build: input.cl:3:5: error: use of undeclared identifier 'q'"
    assert buildlog.fallback_cause(other, "clBuildProgram failed: X - clBuildProgram failed: X - y") == \
        "the kernel failed to build (clBuildProgram failed: X - y)"
