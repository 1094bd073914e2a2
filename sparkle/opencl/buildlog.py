"""Reading an OpenCL build failure: the build log's first error line, and the cause and remedy where known.

PyOpenCL puts the driver's build log into the error's message, after a first line that repeats the status
(``clBuildProgram failed: BUILD_PROGRAM_FAILURE - ...`` three times), so the reason is further down.
"""

from __future__ import annotations

import re

DEBIAN_POCL_REMEDY = "install Debian/Ubuntu's pocl-opencl-icd: apt-get install pocl-opencl-icd"


def first_error_line(text):
    """The first line of ``text`` with "error:" in it (stripped), or None if there is none."""
    for line in str(text).splitlines():
        if "error:" in line:
            return line.strip()
    return None


def status_line(text):
    """The first line of ``text`` with its " - "-separated repeats removed (PyOpenCL repeats the status)."""
    lines = str(text).strip().splitlines()
    if not lines:
        return ""
    parts = []
    for part in lines[0].split(" - "):
        if part not in parts:
            parts.append(part)
    return " - ".join(parts)


def driver_versions(device):
    """(PoCL version, LLVM major version) from the platform's and device's version strings; None where absent.

    PoCL's platform version reads e.g. "OpenCL 3.0 PoCL 3.0-rc2  Linux, Release, RELOC, LLVM 14.0.6, ...".
    """
    cl_device = device.cl_device
    text = " ".join(str(part) for part in (cl_device.platform.version, cl_device.version, cl_device.driver_version))
    pocl = re.search(r"PoCL (\d+(?:\.\d+)?)", text)
    llvm = re.search(r"LLVM (\d+)", text)
    return (pocl.group(1) if pocl else None), (llvm.group(1) if llvm else None)


def _compiler_name(device):
    pocl, llvm = driver_versions(device)
    llvm_text = f"LLVM {llvm}" if llvm else "its LLVM"
    if pocl or "Portable Computing Language" in device.cl_device.platform.name:
        return f"PoCL {pocl or '(version unknown)'} ({llvm_text})"
    return f"{device.cl_device.platform.name.strip()} ({llvm_text})"


def known_cause(device, error_line):
    """(cause, remedy) in words for a build error line we recognise, else None."""
    if error_line and "unknown target CPU" in error_line:
        # PyPI's PoCL 3.0 is built with LLVM 14, which has no name for newer CPUs (e.g. AMD Zen 5) and
        # then asks for 'generic', which it cannot build for either; Debian's PoCL 3.1 (LLVM 15) can.
        return f"{_compiler_name(device)} does not know this CPU", DEBIAN_POCL_REMEDY
    return None


def _message(error_line):
    """The error line without its "file:line:col: error: " prefix."""
    return error_line.split("error:", 1)[1].strip()


def unavailable_reason(device, error):
    """Why ``device`` cannot be used, from the build ``error``: the known cause and remedy, else the error line."""
    line = first_error_line(error)
    if line is None:
        return f"the test kernel does not build ({status_line(error)})"
    cause = known_cause(device, line)
    if cause is None:
        return f"the test kernel does not build: {line}"
    what, remedy = cause
    return f"{what}: {_message(line)}; {remedy}"


def fallback_cause(device, error):
    """The cause in a fallback warning for a build failure: the build log's first error line, and what it means."""
    line = first_error_line(error)
    if line is None:
        return f"the kernel failed to build ({status_line(error)})"
    cause = known_cause(device, line)
    return f"the kernel failed to build: {line}" + (f" ({cause[0]}; {cause[1]})" if cause else "")
