"""The on-disk cache: where it lives, atomic writes, locked JSON documents shared by processes, and the
OpenCL program binary cache (another process loads the binary instead of compiling; a damaged file is
never handed to the driver and is rebuilt)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import platformdirs
import pytest
from filelock import FileLock, Timeout

from sparkle import cache, reference

from _helpers import assert_close_to_reference
from _opencl import opencl_params, runtime_device


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(path))
    return path


# ---- cache_dir ----

def test_cache_dir_env_override_is_created(tmp_path, monkeypatch):
    target = tmp_path / "nested" / "sparkle-cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(target))
    assert cache.cache_dir() == target
    assert target.is_dir()


@pytest.mark.parametrize("unset", ["missing", "empty"])
def test_cache_dir_default_is_platformdirs_user_cache_dir(tmp_path, monkeypatch, unset):
    if unset == "missing":
        monkeypatch.delenv(cache.CACHE_ENV)
    else:
        monkeypatch.setenv(cache.CACHE_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # keeps the test out of the real home on Linux
    expected = Path(platformdirs.user_cache_dir("sparkle", appauthor=False))
    if sys.platform.startswith("linux"):
        assert expected == tmp_path / "xdg" / "sparkle"
    assert cache.cache_dir() == expected
    assert expected.is_dir()


def test_a_cache_dir_removed_after_first_use_is_made_again_by_the_next_write(tmp_path, monkeypatch):
    target = tmp_path / "gone"
    monkeypatch.setenv(cache.CACHE_ENV, str(target))
    document = cache.JsonDocument("probe", 1)
    document.update(lambda d: d.update(a=1))
    shutil.rmtree(target)
    assert cache.cache_dir() == target  # resolved once, not made again on every call
    assert document.load() == {} and document.snapshot() == {}
    document.update(lambda d: d.update(b=2))
    assert document.load() == {"b": 2} and target.is_dir()
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "other"))  # a changed setting is seen at once
    assert cache.cache_dir() == tmp_path / "other" and (tmp_path / "other").is_dir()


def test_digest_is_stable_and_separates_parts():
    assert cache.digest("a", "b") == cache.digest("a", "b")
    assert cache.digest("ab", "") != cache.digest("a", "b")  # parts are delimited, not concatenated
    assert len(cache.digest("x")) == 64


# ---- atomic writes ----

def leftovers(directory, name):
    return [p.name for p in Path(directory).iterdir() if p.name != name]


def test_atomic_write_creates_parents_and_replaces(private_cache):
    path = private_cache / "deep" / "dir" / "file.bin"
    cache.atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    cache.atomic_write_bytes(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    assert leftovers(path.parent, path.name) == []


@pytest.mark.parametrize("crash_in", ["write", "fsync", "replace"])
@pytest.mark.parametrize("error", [OSError("disk full (injected)"), KeyboardInterrupt()])
def test_crash_mid_write_keeps_the_old_file_and_leaves_no_temp_file(private_cache, monkeypatch, crash_in, error):
    path = private_cache / "doc.json"
    cache.atomic_write_bytes(path, b"old contents")
    new = b"x" * (1 << 16)

    if crash_in == "write":  # half of the data is written, then the process is interrupted
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise error

        monkeypatch.setattr(cache.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    else:
        def crash(*args, **kwargs):
            raise error

        monkeypatch.setattr(cache.os, crash_in, crash)
    with pytest.raises(type(error)):
        cache.atomic_write_bytes(path, new)
    monkeypatch.undo()
    assert path.read_bytes() == b"old contents"
    assert leftovers(private_cache, path.name) == []


def test_read_bytes_of_missing_file_or_directory_is_none(private_cache):
    assert cache.read_bytes(private_cache / "absent") is None
    (private_cache / "a-dir").mkdir(parents=True)
    assert cache.read_bytes(private_cache / "a-dir") is None


# ---- JSON documents ----

def test_json_document_round_trip_and_versioned_name(private_cache):
    doc = cache.JsonDocument("things", version=3)
    assert doc.path == private_cache / "things-v3.json"
    assert doc.load() == {}
    returned = doc.update(lambda d: d.setdefault("a", []).append(1))
    assert returned == {"a": [1]}
    doc.update(lambda d: d["a"].append(2))
    assert doc.load() == {"a": [1, 2]}
    assert json.loads(doc.path.read_text()) == {"a": [1, 2]}
    assert cache.JsonDocument("things", version=4).load() == {}  # another layout version: another file
    explicit = cache.JsonDocument("things", version=3, directory=private_cache / "elsewhere")
    assert explicit.load() == {} and explicit.path.parent == private_cache / "elsewhere"


@pytest.mark.parametrize("contents", [b"{\"a\": 1", b"\xff\xfe garbage", b"[1, 2, 3]", b"", b"null"])
def test_corrupt_json_document_warns_and_reads_as_empty(private_cache, contents):
    doc = cache.JsonDocument("corrupt", version=1)
    cache.atomic_write_bytes(doc.path, contents)
    with pytest.warns(RuntimeWarning, match="unreadable Sparkle cache file") as record:
        assert doc.load() == {}
    assert str(doc.path) in str(record[0].message)
    # an update starts over from an empty document and leaves a valid file behind
    with pytest.warns(RuntimeWarning):
        doc.update(lambda d: d.update(n=1))
    assert json.loads(doc.path.read_bytes()) == {"n": 1}


def test_update_holds_the_file_lock(private_cache):
    doc = cache.JsonDocument("locked", version=1)
    seen = []

    def change(document):
        other = FileLock(str(doc.path) + ".lock", timeout=0)  # a second opener, as another process would be
        with pytest.raises(Timeout):
            other.acquire()
        seen.append(True)
        document["ok"] = True

    doc.update(change)
    assert seen == [True]
    with FileLock(str(doc.path) + ".lock", timeout=0):  # released afterwards
        pass


def _increment_many(directory, worker, count):
    """Run in a child process: ``count`` read-modify-write updates with a pause inside each."""
    os.environ[cache.CACHE_ENV] = directory
    doc = cache.JsonDocument("counter", version=1)

    for i in range(count):
        def change(document, i=i):
            value = document.get("count", 0)
            time.sleep(0.001)  # widen the window in which an unlocked update would lose another's write
            document["count"] = value + 1
            document.setdefault("log", []).append(f"{worker}:{i}")

        doc.update(change)


def test_concurrent_updates_from_processes_lose_nothing(private_cache):
    workers, count = 4, 20
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_increment_many, args=(str(private_cache), w, count))
                 for w in range(workers)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0] * workers
    document = cache.JsonDocument("counter", version=1).load()
    assert document["count"] == workers * count
    assert sorted(document["log"]) == sorted(f"{w}:{i}" for w in range(workers) for i in range(count))
    assert leftovers(private_cache, "counter-v1.json") == ["counter-v1.json.lock"]


# ---- OpenCL program binaries ----

# Runs a small conv2d in a fresh process and reports which way each program was created.
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import pyopencl as cl
    import sparkle
    from sparkle import reference

    builds = []
    real = cl.Program

    def spy(*args):
        builds.append("binary" if len(args) == 3 else "source")
        return real(*args)

    cl.Program = spy
    data = np.load(sys.argv[2])
    y = sparkle.conv2d(data["x"], data["w"], padding=1, device=sys.argv[1])
    error = float(np.linalg.norm(y - reference.conv2d(data["x"], data["w"], padding=1))
                  / np.linalg.norm(reference.conv2d(data["x"], data["w"], padding=1)))
    print(json.dumps({"builds": builds, "error": error}))
""")


def run_child(device_id, inputs):
    done = subprocess.run([sys.executable, "-c", CHILD, device_id, str(inputs)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ), check=False)
    assert done.returncode == 0, f"child exited with {done.returncode}: {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def program_spy(monkeypatch):
    import pyopencl as cl

    builds = []
    real = cl.Program

    def spy(*args):
        builds.append("binary" if len(args) == 3 else "source")
        return real(*args)

    monkeypatch.setattr(cl, "Program", spy)
    return builds


@pytest.mark.parametrize("device_id", opencl_params())
def test_program_binary_cache_across_processes_and_damaged_files(device_id, private_cache, tmp_path, program_spy):
    from sparkle import api
    from sparkle.opencl import backend, runtime

    listed = runtime_device(device_id)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 6, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x, w=w)
    spec = api.conv2d_spec(x, w, None, padding=1)
    expected = reference.conv2d(x, w, padding=1)

    def run_here():
        # a new device object has no programs in memory: only the disk cache can spare the compile
        fresh = runtime.OpenCLDevice(listed.index, listed.cl_device)
        return backend.conv2d(x, w, None, spec, fresh)

    programs = private_cache / runtime.PROGRAM_CACHE
    assert not programs.exists()
    assert_close_to_reference(run_here(), expected, np.float32)
    assert program_spy == ["source"]
    files = list(programs.glob("*.bin"))
    assert len(files) == 1 and leftovers(programs, files[0].name) == []
    path = files[0]
    binary = runtime._unpack_binary(path.read_bytes())
    assert binary, "the cache file is not an intact entry"

    # Another process building the same source loads the binary. (It finds the device's health verdict in
    # the cache too, as any process after the first does, so the health check builds nothing there.)
    from sparkle.opencl import health

    health._store(listed.identity, health.check(listed))
    child = run_child(device_id, tmp_path / "inputs.npz")
    assert child["builds"] == ["binary"]
    assert child["error"] <= 1e-5

    # A truncated file (PoCL crashes the process when handed a truncated binary) is not even given to the
    # driver: the child rebuilds from source, gets the right result and writes an intact file again.
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])
    child = run_child(device_id, tmp_path / "inputs.npz")
    assert child["builds"] == ["source"]
    assert child["error"] <= 1e-5
    assert runtime._unpack_binary(path.read_bytes())

    # An entry whose checksum is right but whose contents the driver rejects: rebuilt from source.
    program_spy.clear()
    path.write_bytes(runtime._pack_binary(b"not a program binary" * 10))
    assert_close_to_reference(run_here(), expected, np.float32)
    assert program_spy == ["binary", "source"]
    assert runtime._unpack_binary(path.read_bytes()) not in (None, b"not a program binary" * 10)

    # A bit flip anywhere in the payload fails the checksum: the file is never loaded.
    program_spy.clear()
    damaged = bytearray(path.read_bytes())
    damaged[-7] ^= 0x10
    path.write_bytes(bytes(damaged))
    assert runtime._unpack_binary(bytes(damaged)) is None
    assert_close_to_reference(run_here(), expected, np.float32)
    assert program_spy == ["source"]


def test_binary_cache_entries_carry_a_checksum():
    pytest.importorskip("pyopencl")
    from sparkle.opencl import runtime

    packed = runtime._pack_binary(b"payload")
    assert runtime._unpack_binary(packed) == b"payload"
    assert runtime._unpack_binary(packed[:-1]) is None  # truncated
    assert runtime._unpack_binary(packed[:-1] + b"X") is None  # changed
    assert runtime._unpack_binary(b"payload") is None  # an old entry without the header
    assert runtime._unpack_binary(runtime._pack_binary(b"")) is None  # nothing to load
    assert runtime._unpack_binary(None) is None  # no file


# ---- an edited kernel or a new driver never gets a stale program ----

class _OtherDriver:
    """An OpenCL device as a new driver version reports it (everything else is the real device's)."""

    def __init__(self, cl_device):
        self._cl_device = cl_device
        self.driver_version = cl_device.driver_version + " (updated)"

    def __getattr__(self, name):
        return getattr(self._cl_device, name)


@pytest.mark.parametrize("device_id", opencl_params())
def test_an_edited_kernel_or_a_new_driver_never_gets_a_stale_program(device_id, private_cache, program_spy,
                                                                     monkeypatch):
    """README, "Program cache": binaries are keyed by a hash of the source, the build options and the
    device's identity (platform, device and driver versions), so a new driver or an edited kernel never
    loads a stale binary. The edit here doubles every output, so a stale program would be seen in the result."""
    from sparkle import api
    from sparkle.opencl import backend, codegen, runtime

    listed = runtime_device(device_id)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 7, 5)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    spec = api.conv2d_spec(x, w, None, padding=1)
    expected = reference.conv2d(x, w, padding=1)
    programs = private_cache / runtime.PROGRAM_CACHE

    def fresh():  # no programs in memory, as in a new process
        return runtime.OpenCLDevice(listed.index, listed.cl_device)

    def files():
        return {p.name for p in programs.glob("*.bin")}

    device = fresh()
    assert_close_to_reference(backend.conv2d(x, w, None, spec, device), expected, np.float32)
    original = files()
    assert len(original) == 1
    program_spy.clear()
    assert_close_to_reference(backend.conv2d(x, w, None, spec, fresh()), expected, np.float32)
    assert program_spy == ["binary"]  # the cache is live: an unchanged kernel is loaded, not rebuilt

    # Edit the template's epilogue: the kernel now writes twice the sum.
    text = codegen.template()
    assert text.count("    return acc;\n}") == 1
    edited = text.replace("    return acc;\n}", "    return acc * (real)2;\n}")
    monkeypatch.setattr(codegen, "template", lambda: edited)
    for runner in (device, fresh()):  # the device holding the old program in memory, and a new process's
        program_spy.clear()
        assert_close_to_reference(backend.conv2d(x, w, None, spec, runner), 2 * expected, np.float32)
        assert program_spy == (["source"] if runner is device else ["binary"])
    edited_files = files()
    assert len(edited_files) == 2 and original < edited_files  # the edited kernel has a binary of its own

    # The original kernel is still served correctly (by its own binary, not the edited one's).
    monkeypatch.setattr(codegen, "template", lambda: text)
    program_spy.clear()
    assert_close_to_reference(backend.conv2d(x, w, None, spec, fresh()), expected, np.float32)
    assert program_spy == ["binary"]

    # A new driver version is another identity: nothing built by the old driver is loaded.
    identity = runtime.OpenCLDevice(listed.index, _OtherDriver(listed.cl_device)).identity
    assert identity != listed.identity and identity.split("|")[:-1] == listed.identity.split("|")[:-1]
    updated = fresh()
    updated.identity = identity
    program_spy.clear()
    assert_close_to_reference(backend.conv2d(x, w, None, spec, updated), expected, np.float32)
    assert program_spy == ["source"]
    assert len(files()) == 3 and edited_files < files()


@pytest.mark.parametrize("device_id", opencl_params())
def test_health_verdict_is_kept_per_driver_identity(device_id, private_cache, monkeypatch):
    """README, "Device health": the verdict is stored keyed by the device's identity, so later processes do
    not check again, and a new driver is checked anew."""
    from sparkle.opencl import health, runtime

    listed = runtime_device(device_id)
    probed = []

    def probe(device):
        probed.append(device.identity)
        return health.Health(True, None)

    monkeypatch.setattr(health, "probe", probe)
    monkeypatch.setattr(health, "_verdicts", {})
    assert health.check(listed) == health.Health(True, None)
    assert probed == [listed.identity]
    monkeypatch.setattr(health, "_verdicts", {})  # a later process: only the stored verdict
    assert health.check(listed) == health.Health(True, None)
    assert probed == [listed.identity]
    updated = runtime.OpenCLDevice(listed.index, _OtherDriver(listed.cl_device))
    assert health.check(updated) == health.Health(True, None)
    assert probed == [listed.identity, updated.identity]
    assert set(health.DOCUMENT.load()) == {listed.identity, updated.identity}


@pytest.mark.parametrize("what", ["all", "programs"])
def test_cache_clear_forgets_the_health_verdicts(what, private_cache, monkeypatch, capsys):
    """README, "Device health": `sparkle cache --clear` forgets the verdicts (so devices are checked again)."""
    pytest.importorskip("pyopencl")
    from sparkle.cli import main
    from sparkle.opencl import health

    identity = "Some Platform|1.0|Vendor|Some Device|OpenCL 3.0|driver 1"
    health._store(identity, health.Health(False, "does not build (stored by the test)"))
    assert health._stored(identity) == health.Health(False, "does not build (stored by the test)")
    assert main(["cache", "--clear"] + ([] if what == "all" else [what])) == 0
    capsys.readouterr()
    assert health._stored(identity) is None
    assert not list(private_cache.glob("opencl-health-*"))


@pytest.mark.parametrize("device_id", opencl_params())
def test_calls_never_tune_unless_asked(device_id, private_cache):
    """README, "Tuning": "Nothing is tuned unless asked" -- calls on a device write no tuning database."""
    import sparkle

    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 3, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    for _ in range(2):
        assert_close_to_reference(sparkle.conv2d(x, w, padding=1, device=device_id),
                                  reference.conv2d(x, w, padding=1), np.float32)
    assert not list(private_cache.glob("opencl-tuning-*"))
