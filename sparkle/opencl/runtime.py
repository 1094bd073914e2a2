"""OpenCL runtime: device discovery, one context and in-order queue per device (and a profiling queue for the
launches that are timed), the program cache
(in memory per context, on disk by source + options + device and driver identity) and a buffer pool.

Nothing here knows about tuning or scheduling.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from functools import lru_cache

from .. import cache

OPENCL_ENV = "SPARKLE_OPENCL"
# Oclgrind is a simulator for checking kernels, not a device to run on: listed only on request.
SIMULATORS_ENV = "SPARKLE_OPENCL_SIMULATORS"
SIMULATOR_PLATFORMS = ("Oclgrind",)
# "separate": ordinary commands go on a queue without profiling, timed launches on a profiling queue spliced into
# its order; "shared": one profiling queue. NVIDIA's driver spends ~16 us of host time per kernel enqueue on a
# profiling queue against ~10 us without (H200, driver 580); PoCL the same either way. Default: separate on GPUs.
TIMING_QUEUE_ENV = "SPARKLE_TIMING_QUEUE"
TIMING_QUEUE_MODES = ("separate", "shared")


def _import_pyopencl():
    import pyopencl

    return pyopencl


def unavailable_reason():
    """None if OpenCL can be used, else a sentence saying why not."""
    if os.environ.get(OPENCL_ENV, "1").strip() == "0":
        return f"OpenCL is disabled by {OPENCL_ENV}=0"
    try:
        _import_pyopencl()
    except ImportError as error:
        return (f"pyopencl is not installed ({error}); install it with: pip install 'sparkle[opencl]' "
                "(this brings PoCL, a CPU OpenCL driver)")
    return None


@dataclass(eq=False)
class BufferPool:
    """Device buffers kept by size for reuse: repeated shapes allocate nothing after the first call."""

    context: object
    free: dict = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)
    max_kept_per_size: int = 8

    # list.pop and list.append are atomic: a warm take or give needs no lock (two of them cost 0.9 us of the
    # 2.8 us a take and a give took on the 2-core VM); only making a size's list takes it.

    def take(self, nbytes):
        nbytes = max(int(nbytes), 1)
        kept = self.free.get(nbytes)
        if kept:
            try:
                return kept.pop()
            except IndexError:  # another thread took the last one meanwhile
                pass
        cl = _import_pyopencl()  # only on a miss: a prepared call's warm path takes kept buffers
        return cl.Buffer(self.context, cl.mem_flags.READ_WRITE, nbytes)

    def give(self, buffer):
        size = buffer.size
        kept = self.free.get(size)
        if kept is None:
            with self.lock:
                kept = self.free[size]
        if len(kept) < self.max_kept_per_size:  # (two threads may both pass: a list may hold one or two more)
            kept.append(buffer)

    def clear(self):
        with self.lock:
            self.free.clear()


def _pci_location(cl_device):
    """"pci <domain>:<bus>:<slot>" where the driver tells it (NVIDIA's attribute query), else None."""
    cl = _import_pyopencl()
    if "cl_nv_device_attribute_query" not in cl_device.extensions:
        return None
    try:
        domain = cl_device.get_info(cl.device_info.PCI_DOMAIN_ID_NV)
        return f"pci {domain:04x}:{cl_device.pci_bus_id_nv:02x}:{cl_device.pci_slot_id_nv:02x}"
    except (cl.Error, AttributeError, TypeError):  # an older driver: no PCI attributes
        return None


def _architecture(cl_device, kind):
    """What decides which tiles win on a device: NVIDIA's compute capability ("sm_90"), AMD's gfx IP, the
    CPU target PoCL compiles for (the last word of its "HSTR: pthread-x86_64-...-znver3" version), else the
    device's name."""
    cl = _import_pyopencl()
    extensions = cl_device.extensions
    try:
        if "cl_nv_device_attribute_query" in extensions:
            return f"sm_{cl_device.compute_capability_major_nv}{cl_device.compute_capability_minor_nv}"
        if "cl_amd_device_attribute_query" in extensions and kind == "gpu":
            return f"gfx{cl_device.gfxip_major_amd}{cl_device.gfxip_minor_amd}"
    except (cl.Error, AttributeError):  # the driver lists the extension but does not answer: use the name
        pass
    version = cl_device.version
    if "HSTR:" in version:
        return version.split("HSTR:", 1)[1].split()[0].rsplit("-", 1)[-1]
    return cl_device.name.strip()


class OpenCLDevice:
    """One OpenCL device with its context, in-order queue, programs and buffers.

    ``queue`` takes every ordinary command. Launches whose device time is read (the tuner's, sampled calls of
    the scheduler) go through ``timed``, which runs them on ``timing_queue`` (profiling enabled) in ``queue``'s
    order. With ``separate_timing_queue`` False the two are one profiling queue.
    """

    def __init__(self, index, cl_device):
        cl = _import_pyopencl()
        self.index = index
        self.id = f"opencl:{index}"
        self.cl_device = cl_device
        platform = cl_device.platform
        self.name = cl_device.name.strip()
        self.vendor = cl_device.vendor.strip()
        self.kind = "gpu" if cl_device.type & cl.device_type.GPU else "cpu"
        # A simulator (Oclgrind) checks kernels; it is never the device "opencl" picks.
        self.simulator = any(name in platform.name for name in SIMULATOR_PLATFORMS)
        self.compute_units = cl_device.max_compute_units
        self.memory = cl_device.global_mem_size
        self.max_work_group_size = cl_device.max_work_group_size
        self.local_memory = cl_device.local_mem_size
        self.max_alloc = cl_device.max_mem_alloc_size
        self.has_fp64 = "cl_khr_fp64" in cl_device.extensions or cl_device.double_fp_config != 0
        self.architecture = _architecture(cl_device, self.kind)
        # Which physical unit this is among identical devices (same identity): the PCI location where the
        # driver says it, else the order of discovery. Identity keys programs (shared by identical devices);
        # unit keeps apart what is measured of each (one may be shared or throttled).
        self.pci_location = _pci_location(cl_device)
        self.unit = self.pci_location or "#0"
        # Everything that can change the compiled code or its speed.
        self.identity = "|".join(str(part).strip() for part in (
            platform.name, platform.version, cl_device.vendor, cl_device.name, cl_device.version,
            cl_device.driver_version))
        self._context = None
        self._queue = self._timing_queue = None
        self.separate_timing_queue = _timing_queue_mode(self.kind) == "separate"
        self._programs = {}
        self._kernels = {}
        self.launch_kernels = {}  # launch.enqueue's steps and kernel objects per variant (see launch._steps)
        self._lock = threading.Lock()
        # clSetKernelArg + enqueue on a shared kernel object is not thread-safe (OpenCL spec, appendix A.2)
        self.launch_lock = threading.Lock()
        self.pool = None
        # Results come back into pinned host memory on a GPU (see opencl/pinned.py); a CPU driver's copies are
        # memcpys either way.
        self.pinned_results = self.kind == "gpu" and os.environ.get("SPARKLE_PINNED_RESULTS", "1").strip() != "0"
        self._result_pool = None
        # Large uploads of ordinary memory go through a ring of pinned memory on a GPU (see opencl/staging.py).
        self.staged_uploads = self.kind == "gpu" and os.environ.get("SPARKLE_STAGED_UPLOADS", "1").strip() != "0"
        self._staging = None

    @property
    def context(self):
        self._ensure_context()
        return self._context

    @property
    def queue(self):
        self._ensure_context()
        return self._queue

    @property
    def timing_queue(self):
        """The profiling queue (``queue`` itself unless ``separate_timing_queue``); enqueue on it through
        ``timed``, which keeps ``queue``'s order."""
        self._ensure_context()
        return self._timing_queue

    def _ensure_context(self):
        if self._context is None:
            cl = _import_pyopencl()
            with self._lock:
                if self._context is None:
                    context = cl.Context([self.cl_device])
                    profiling = cl.command_queue_properties.PROFILING_ENABLE
                    self._timing_queue = cl.CommandQueue(context, self.cl_device, properties=profiling)
                    self._queue = cl.CommandQueue(context, self.cl_device) if self.separate_timing_queue \
                        else self._timing_queue
                    self.pool = BufferPool(context)
                    self._context = context

    def timed(self, enqueue):
        """``enqueue(queue, wait_for)`` -> (first, last) events, run on the profiling queue as if on ``queue``:
        after every command enqueued on ``queue`` before, and before every command enqueued there after
        (a marker, and a barrier on the launch's last event; each queue flushed, as the OpenCL specification
        asks of events waited for across queues). Returns the (first, last) events, which carry device times."""
        self._ensure_context()
        main, timing = self._queue, self._timing_queue
        if main is timing:
            return enqueue(timing, None)
        cl = _import_pyopencl()
        before = cl.enqueue_marker(main)
        main.flush()
        try:
            first, last = enqueue(timing, [before])
        except BaseException:
            # what of the launch was enqueued (split-K's first kernel, say) must still end before the queue's
            # next command: it may write a workspace the next call is given
            try:
                _join(cl, main, timing, cl.enqueue_marker(timing))
            except cl.Error:  # a lost device: the error raised below says so
                pass
            raise
        _join(cl, main, timing, last)
        return first, last

    def pool_buffer(self, nbytes):
        """A device buffer of at least one byte from the pool (it goes back when its owner is collected)."""
        self._ensure_context()
        return self.pool.take(nbytes)

    def program_key(self, source, options=()):
        """The key of ``source`` built with ``options`` on this device, in memory and in the disk cache."""
        return cache.digest(source, " ".join(options), self.identity)

    def has_program(self, key):
        """Whether the program with ``key`` (see ``program_key``) is built in this process already."""
        return key in self._programs

    def has_cached_binary(self, key):
        """Whether the disk cache holds a binary for ``key``: building then loads it instead of compiling."""
        try:
            return _binary_path(key).is_file()
        except OSError:  # an unusable cache directory
            return False

    def program(self, source, options=(), key=None):
        """The built program for ``source``: from memory, else from the disk cache, else compiled now.

        ``key`` is ``program_key(source, options)`` when the caller has it already (hashing a source is not free).
        """
        key = key or self.program_key(source, options)
        program = self._programs.get(key)
        if program is None:
            program = _build(self, source, list(options), key)
            self._programs[key] = program
        return program

    def kernel(self, source, name, options=()):
        """A kernel object of the built program, created once (creating one is not free)."""
        key = (source, name, tuple(options))
        kernel = self._kernels.get(key)
        if kernel is None:
            kernel = _import_pyopencl().Kernel(self.program(source, options), name)
            self._kernels[key] = kernel
        return kernel

    def __repr__(self):
        return f"OpenCLDevice({self.id!r}, {self.name!r}, {self.kind})"


def _join(cl, main, timing, event):
    """Commands enqueued on ``main`` from now on run after ``event`` of the ``timing`` queue."""
    timing.flush()
    cl.enqueue_barrier(main, wait_for=[event])


def _timing_queue_mode(kind):
    mode = os.environ.get(TIMING_QUEUE_ENV, "").strip().lower()
    if not mode:
        return "separate" if kind == "gpu" else "shared"
    if mode not in TIMING_QUEUE_MODES:
        raise ValueError(f"{TIMING_QUEUE_ENV} must be one of {TIMING_QUEUE_MODES}, got {mode!r}")
    return mode


# Cached binaries are stored as BINARY_MAGIC + sha256(binary) + binary. Drivers trust what they are given
# (PoCL crashes the process on a truncated binary), so a file whose checksum does not match is never loaded.
PROGRAM_CACHE = "opencl-programs-v2"
BINARY_MAGIC = b"sparkle-cl-binary\0"


def _binary_path(key):
    return cache.cache_dir() / PROGRAM_CACHE / f"{key}.bin"


def _pack_binary(binary):
    return BINARY_MAGIC + hashlib.sha256(binary).digest() + binary


def _unpack_binary(data):
    """The driver binary inside a cache file, or None if the file is not one intact cache entry."""
    head = len(BINARY_MAGIC) + 32
    if not data or len(data) <= head or not data.startswith(BINARY_MAGIC):
        return None
    binary = data[head:]
    return binary if hashlib.sha256(binary).digest() == data[len(BINARY_MAGIC):head] else None


def _build(device, source, options, key):
    cl = _import_pyopencl()
    with warnings.catch_warnings():
        # Successful builds may still print notes (PoCL: the ABI of 16-wide vectors without AVX-512); the
        # result of every variant is checked against the reference, so they are noise to the user.
        warnings.simplefilter("ignore", cl.CompilerWarning)
        return _build_quietly(cl, device, source, options, key)


def _build_quietly(cl, device, source, options, key):
    path = _binary_path(key)
    binary = _unpack_binary(cache.read_bytes(path))
    if binary:
        try:
            return cl.Program(device.context, [device.cl_device], [binary]).build(options=options)
        except cl.Error:
            pass  # stale or foreign binary: rebuild from source below
    program = cl.Program(device.context, source).build(options=options, devices=[device.cl_device])
    try:
        binaries = program.get_info(cl.program_info.BINARIES)
        if binaries and binaries[0]:
            cache.atomic_write_bytes(path, _pack_binary(bytes(binaries[0])))
    except (cl.Error, OSError):
        pass  # the disk cache is an optimization; a failure to write it must not fail the call
    return program


def _platform_wanted(platform):
    if any(name in platform.name for name in SIMULATOR_PLATFORMS):
        return os.environ.get(SIMULATORS_ENV, "0").strip() == "1"
    return True


@lru_cache(maxsize=1)
def _discover(environment):
    """OpenCL devices of every platform, numbered in platform order (``environment`` keys the cache)."""
    if unavailable_reason() is not None:
        return ()
    cl = _import_pyopencl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:  # e.g. no ICD installed at all
        return ()
    found = []
    for platform in platforms:
        if not _platform_wanted(platform):
            continue
        try:
            platform_devices = platform.get_devices()
        except cl.Error:
            continue
        for cl_device in platform_devices:
            found.append(OpenCLDevice(len(found), cl_device))
    assign_units(found)
    return tuple(found)


def assign_units(devices):
    """Give identical devices (the same identity: two H200s) units of their own: the PCI location where known,
    else their order among their twins ("#0", "#1", ...; a lone device is "#0" wherever it is listed)."""
    for device in devices:
        twins = [other for other in devices if other.identity == device.identity]
        device.unit = device.pci_location or f"#{twins.index(device)}"


def opencl_devices():
    """Every usable OpenCL device (empty when OpenCL is disabled or missing)."""
    return list(_discover((os.environ.get(OPENCL_ENV, "1"), os.environ.get(SIMULATORS_ENV, "0"),
                           os.environ.get(TIMING_QUEUE_ENV, ""))))


def opencl_device(device_id):
    for device in opencl_devices():
        if device.id == device_id:
            return device
    return None
