"""Compilation contract: one compiled driver per dtype and micro-kernel (on each path: packed and
implicit), never per shape or layout; only the active family's drivers are ever compiled; and a
second process loads them from Numba's disk cache instead of compiling."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import sparkle
from sparkle.cpu import backend
from sparkle.cpu.conv2d import fused_conv2d_driver
from sparkle.cpu.implicit import implicit_conv2d_driver
from sparkle.cpu.isa import ISA_ENV, active_isa, supported_isas

PATHS = pytest.mark.parametrize("implicit", [False, True], ids=["packed", "implicit"])
DRIVER_FACTORIES = {False: fused_conv2d_driver, True: implicit_conv2d_driver}


def run_script(script, **env_overrides):
    """stdout of ``script`` in a new Python process (SPARKLE_CPU_ISA as in this one unless overridden)."""
    env = dict(os.environ, **env_overrides)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@PATHS
def test_new_shapes_and_layouts_do_not_compile(implicit):
    rng = np.random.default_rng(0)
    isa = active_isa()
    mr, nv = isa.default_microkernel
    drivers = set()  # the compiled variants that ran: one thread's (small work) or the parallel one
    # Padded and unpadded (the implicit path reads the input in place then, a padded copy otherwise),
    # grouped, odd sizes, three layouts of x.
    problems = [((1, 3, 9, 9), (6, 3, 3, 3), 1), ((2, 8, 17, 5), (12, 4, 2, 1), 1), ((1, 5, 30, 31), (7, 5, 5, 5), 1),
                ((1, 4, 9, 9), (12, 4, 3, 3), 0), ((2, 6, 5, 7), (8, 6, 1, 1), 0)]
    runs = 0
    for x_shape, w_shape, padding in problems:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        groups = x_shape[1] // w_shape[1]
        x_read_only = np.asfortranarray(x)
        x_read_only.flags.writeable = False
        for x_variant in (x, x_read_only, x[:, :, ::-1]):
            spec = sparkle.api.conv2d_spec(x_variant, w, groups=groups, padding=padding)
            plan = backend.plan_conv2d(spec, microkernel=isa.default_microkernel, implicit=implicit)
            assert plan.implicit is implicit and (plan.mr, plan.nv) == (mr, nv)
            y = backend.conv2d(x_variant, w, None, spec, plan)
            np.testing.assert_allclose(y, sparkle.reference.conv2d(x_variant, w, groups=groups, padding=padding),
                                       rtol=1e-4, atol=1e-4)
            drivers.add(backend.prepare_conv2d(spec, plan).kernel)
            runs += 1
    assert runs == 3 * len(problems)
    for driver in drivers:
        float32_signatures = [sig for sig in driver.signatures if str(sig[0].dtype) == "float32"]
        assert len(float32_signatures) == 1, \
            f"compiled {len(float32_signatures)} float32 versions: {differences(driver)}"


def differences(driver):
    """The argument positions and types in which a driver's compiled signatures differ."""
    signatures = driver.signatures
    return {index: [str(sig[index]) for sig in signatures] for index in range(len(signatures[0]))
            if len({str(sig[index]) for sig in signatures}) > 1}


# What the plan of sparkle.conv2d(x, w) runs, as a new process sees it (the driver the disk cache must hold).
PLANNED_DRIVER = """
    import json, numpy as np, sparkle
    from sparkle.cpu import backend
    x = np.ones((1, 8, 6, 6), np.float32); w = np.ones((16, 8, 3, 3), np.float32)
    spec = sparkle.api.conv2d_spec(x, w)
    assert not backend.uses_direct_kernel(spec)
    plan = backend.plan_conv2d(spec)
    np.testing.assert_allclose(sparkle.conv2d(x, w, device="cpu"), sparkle.reference.conv2d(x, w), rtol=1e-5)
    stats = backend.prepare_conv2d(spec, plan).kernel.stats  # the compiled variant that call ran
    print(json.dumps(dict(hits=sum(stats.cache_hits.values()), misses=sum(stats.cache_misses.values()),
                          implicit=plan.implicit, driver=[plan.mr, plan.nv, plan.nr])))
"""


def test_second_process_loads_kernels_from_disk_cache():
    for _ in range(2):  # the first run may have to compile and write the cache
        output = json.loads(run_script(PLANNED_DRIVER))
    assert output["hits"] >= 1 and output["misses"] == 0, output
    mr, nv, nr = output["driver"]
    assert (mr, nv) in active_isa().microkernels and nr == nv * active_isa().lanes(4), output


# Runs convolutions that take both paths and the planner's micro-kernel choices in both dtypes, then
# reports every driver the process built (the factories' dispatchers, found by their closures).
BUILT_DRIVERS = """
    import gc, json, numba, numpy as np, sparkle
    from sparkle.cpu import backend
    from sparkle.cpu.conv2d import fused_conv2d_driver
    from sparkle.cpu.implicit import implicit_conv2d_driver
    from sparkle.cpu.isa import active_isa
    rng = np.random.default_rng(0)
    problems = [((1, 16, 12, 12), (32, 16, 3, 3), dict(padding=1)),
                ((1, 16, 13, 13), (24, 16, 3, 3), dict(stride=2, padding=1)),
                ((2, 16, 8, 8), (40, 16, 1, 1), dict()),
                ((1, 16, 32, 32), (24, 16, 1, 1), dict()),  # 4 KiB planes, unpadded 1x1
                ((1, 8, 7, 9), (20, 4, 2, 2), dict(groups=2))]
    for dtype in (np.float32, np.float64):
        for x_shape, w_shape, kwargs in problems:
            x = rng.standard_normal(x_shape).astype(dtype); w = rng.standard_normal(w_shape).astype(dtype)
            expected = sparkle.reference.conv2d(x, w, **kwargs)
            assert np.allclose(sparkle.conv2d(x, w, device="cpu", **kwargs), expected, rtol=1e-4, atol=1e-4)
            # Both paths with the planner's micro-kernel and family, whatever path it prefers.
            spec = sparkle.api.conv2d_spec(x, w, **kwargs)
            for implicit in (False, True):
                y = backend.conv2d(x, w, None, spec, backend.plan_conv2d(spec, implicit=implicit))
                assert np.allclose(y, expected, rtol=1e-4, atol=1e-4)
        a = rng.standard_normal((70, 50)).astype(dtype); b = rng.standard_normal((50, 90)).astype(dtype)
        assert np.allclose(sparkle.matmul(a, b, device="cpu"), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
    built = []
    for obj in gc.get_objects():
        if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.py_func.__name__ in ("conv2d_fused",
                                                                                          "conv2d_implicit"):
            function = obj.py_func
            closure = dict(zip(function.__code__.co_freevars, (cell.cell_contents for cell in function.__closure__)))
            built.append(dict(path=function.__name__, mr=closure["mr"], nv=closure["nv"], nr=closure["nr"],
                              dtypes=sorted(str(sig[0].dtype) for sig in obj.signatures)))
    print(json.dumps(dict(isa=active_isa().name, built=built,
                          factory_sizes=[fused_conv2d_driver.cache_info().currsize,
                                         implicit_conv2d_driver.cache_info().currsize])))
"""


@pytest.mark.parametrize("family", [None] + [isa.name for isa in supported_isas()[1:]],
                         ids=lambda name: name or "default")
def test_only_the_active_familys_drivers_are_compiled(family):
    report = json.loads(run_script(BUILT_DRIVERS, **({ISA_ENV: family} if family else {})))
    expected = family or active_isa().name
    assert report["isa"] == expected
    isa = next(isa for isa in supported_isas() if isa.name == expected)
    built = report["built"]
    # Every dispatcher the factories made was found, and the run took both paths.
    assert len(built) == sum(report["factory_sizes"]), report
    assert {driver["path"] for driver in built} == {"conv2d_fused", "conv2d_implicit"}, report
    for driver in built:
        assert (driver["mr"], driver["nv"]) in isa.microkernels, (expected, driver)
        lanes = {isa.lanes(4): "float32", isa.lanes(8): "float64"}
        assert driver["nr"] % driver["nv"] == 0 and driver["nr"] // driver["nv"] in lanes, (expected, driver)
        # Built for the dtype whose lanes it has, and compiled once.
        assert driver["dtypes"] == [lanes[driver["nr"] // driver["nv"]]], (expected, driver)


def test_isa_environment_variable_in_a_new_process():
    script = "from sparkle.cpu.isa import active_isa; print(active_isa().name)"
    if "avx2" in [isa.name for isa in supported_isas()]:
        assert run_script(script, **{ISA_ENV: "avx2"}).strip() == "avx2"
    assert run_script(script, **{ISA_ENV: "portable"}).strip() == "portable"
    for value in ("avx1024", "nonsense"):
        env = dict(os.environ, **{ISA_ENV: value})
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        assert result.returncode != 0
        assert "ValueError" in result.stderr and ISA_ENV in result.stderr and value in result.stderr


def compiled_versions():
    """Compiled versions of every CPU kernel: both drivers of every family's micro-kernels for both
    dtypes' register widths, and the direct kernel, each in its parallel and its one-thread variant."""
    from sparkle.cpu.direct import direct_conv2d_kernel

    # One dispatcher can serve two families: (6, 2, 8) is AVX2's float64 driver and the portable
    # family's float32 one (4 lanes either way), so count each dispatcher once.
    drivers = {id(driver): driver for driver in (factory(mr, nv, nv * isa.lanes(itemsize), parallel=parallel)
                                                 for factory in DRIVER_FACTORIES.values()
                                                 for isa in supported_isas() for mr, nv in isa.microkernels
                                                 for itemsize in (4, 8) for parallel in (True, False))}
    direct = [direct_conv2d_kernel(parallel=parallel) for parallel in (True, False)]
    return sum(len(dispatcher.signatures) for dispatcher in [*drivers.values(), *direct])


def test_compiled_versions_counts_both_paths():
    x = np.ones((1, 4, 8, 8), np.float64)
    w = np.ones((12, 4, 3, 3), np.float64)
    spec = sparkle.api.conv2d_spec(x, w, padding=1)
    before = compiled_versions()
    mr, nv = active_isa().default_microkernel
    plans = [backend.plan_conv2d(spec, microkernel=(mr, nv), implicit=implicit) for implicit in (False, True)]
    drivers = [backend.prepare_conv2d(spec, plan).kernel for plan in plans]  # the variants these plans run
    counted = [len(driver.signatures) for driver in drivers]
    for plan in plans:
        backend.conv2d(x, w, None, spec, plan)
    new = sum(1 for driver, count in zip(drivers, counted) if len(driver.signatures) > count)
    assert compiled_versions() == before + new


@pytest.mark.parametrize("out_channels", [4, 12], ids=["direct", "gemm"])
def test_numpy_integer_arguments_do_not_compile_new_versions(out_channels):
    x = np.ones((1, 4, 8, 8), np.float32)
    w = np.ones((out_channels, 2, 3, 3), np.float32)
    sparkle.conv2d(x, w, groups=2, padding=1, device="cpu")
    before = compiled_versions()
    result = sparkle.conv2d(x, w, groups=np.int32(2), stride=np.int64(1), padding=(np.int16(1), np.int8(1)),
                            dilation=np.uint8(1), device="cpu")
    assert compiled_versions() == before
    np.testing.assert_allclose(result, sparkle.reference.conv2d(x, w, groups=2, padding=1), rtol=1e-5)


@PATHS
def test_misaligned_inputs_work_without_a_new_version(implicit):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    for padding in (0, 1):  # the implicit path reads x in place without padding
        spec = sparkle.api.conv2d_spec(x, w, padding=padding)
        plan = backend.plan_conv2d(spec, implicit=implicit)
        backend.conv2d(x, w, None, spec, plan)
        before = compiled_versions()
        raw = np.zeros(x.nbytes + 1, np.uint8)
        misaligned = np.frombuffer(raw.data, dtype=np.float32, count=x.size, offset=1).reshape(x.shape)
        misaligned[...] = x
        assert not misaligned.flags.aligned
        result = backend.conv2d(misaligned, w, None, spec, plan)
        assert compiled_versions() == before
        np.testing.assert_allclose(result, sparkle.reference.conv2d(x, w, padding=padding), rtol=1e-5, atol=1e-5)


# --- the disk cache key: kernel sources and CPU features (README, "Compilation") -------------------------

def compiled_modules(function):
    """Modules whose code a compiled function takes in: its own, and those of every jitted function and
    intrinsic it reaches through its globals and closure, transitively."""
    from numba.core.dispatcher import Dispatcher
    from numba.core.extending import _Intrinsic

    def names(code):
        yield from code.co_names
        for constant in code.co_consts:
            if hasattr(constant, "co_names"):
                yield from names(constant)

    modules, seen, pending = set(), set(), [function]
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _Intrinsic):
            modules.add(item._defn.__module__)
            continue
        py_func = item.py_func
        modules.add(py_func.__module__)
        values = [py_func.__globals__[name] for name in names(py_func.__code__) if name in py_func.__globals__]
        values += [cell.cell_contents for cell in py_func.__closure__ or ()]
        pending += [value for value in values if isinstance(value, (Dispatcher, _Intrinsic))]
    return modules


def source_files(modules):
    import importlib

    return sorted(Path(importlib.import_module(name).__file__).name for name in modules)


def drivers():
    isa = active_isa()
    mr, nv = isa.default_microkernel
    from sparkle.cpu.direct import direct_conv2d

    return {"packed": fused_conv2d_driver(mr, nv, nv * isa.lanes(4)),
            "implicit": implicit_conv2d_driver(mr, nv, nv * isa.lanes(4)),
            "direct": direct_conv2d}


# The modules each kernel must be seen to take code from (the check that compiled_modules finds them).
KERNEL_SOURCES = {"packed": {"microkernel.py", "threads.py", "affinity.py", "atomics.py", "conv2d.py"},
                  "implicit": {"microkernel.py", "threads.py", "affinity.py", "atomics.py", "conv2d.py"},
                  "direct": {"threads.py", "affinity.py", "atomics.py", "direct.py"}}


@pytest.mark.parametrize("path", ["packed", "implicit", "direct"])
def test_driver_cache_key_hashes_every_source_it_compiles(path, tmp_path, monkeypatch):
    """Numba keys a disk-cache entry by the function's own file and its closure; the drivers carry a
    fingerprint of the sources they compile in their closure. Editing any module the driver takes code
    from must change that fingerprint."""
    from sparkle.cpu import conv2d as conv2d_module

    driver = drivers()[path]
    fingerprint = conv2d_module.kernel_source_fingerprint()
    assert fingerprint in [cell.cell_contents for cell in driver.py_func.__closure__]
    files = source_files(compiled_modules(driver))
    assert KERNEL_SOURCES[path] <= set(files), files
    copy = tmp_path / "cpu"
    shutil.copytree(Path(conv2d_module.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(conv2d_module, "__file__", str(copy / "conv2d.py"))
    assert conv2d_module.kernel_source_fingerprint() == fingerprint  # same contents, same key
    for name in files:
        original = (copy / name).read_bytes()
        (copy / name).write_bytes(original + b"\n# edited\n")
        assert conv2d_module.kernel_source_fingerprint() != fingerprint, f"editing {name} keeps the cache key"
        (copy / name).write_bytes(original)


def test_cache_key_includes_the_cpu_features():
    """Numba's index key for each compiled version holds the target's name and feature string, so another
    CPU computes another key and never loads this one's machine code."""
    import llvmlite.binding as llvm
    from numba.core import config

    from sparkle.cpu import prepared

    x = np.ones((1, 4, 8, 8), np.float32)
    w = np.ones((8, 4, 3, 3), np.float32)
    depthwise = np.ones((4, 1, 3, 3), np.float32)
    spec = sparkle.api.conv2d_spec(x, w, padding=1)
    depthwise_spec = sparkle.api.conv2d_spec(x, depthwise, groups=4, padding=1)
    dispatchers = []
    for threads in (1, 2):  # the one-thread (small work) and the parallel variant of each kernel
        direct = prepared.DirectLaunch(depthwise_spec, threads)
        direct.run(x, depthwise, None, np.empty(depthwise_spec.output_shape, np.float32).reshape(-1))
        dispatchers.append(direct.kernel)
        for implicit in (False, True):
            plan = backend.plan_conv2d(spec, implicit=implicit, threads=threads)
            backend.conv2d(x, w, None, spec, plan)
            dispatchers.append(backend.prepare_conv2d(spec, plan).kernel)
    features = config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    name = config.CPU_NAME or llvm.get_host_cpu_name()
    for dispatcher in dispatchers:
        assert dispatcher.signatures
        for signature in dispatcher.signatures:
            key = dispatcher._cache._index_key(signature, dispatcher.targetctx.codegen())
            assert (name, features) == key[1][1:], key[1]
            assert features.count("+") > 10


# An edit to threads.py's bind_slot, which every kernel runs first in each slot: count a failure.
# A kernel that runs the edited code shows it in binding_failures(); one served from a stale cache does not.
EDIT_FILE = "threads.py"
EDIT_BEFORE = "    if cpus.size == 0 or current_thread_id() == caller:\n        return\n"
EDITED_KERNELS = """
    import json, numpy as np, sparkle
    from sparkle.cpu import backend, threads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    report = {"file": sparkle.__file__}
    # Each path forced, whatever this CPU's planner would pick: the direct kernel (no plan), the implicit
    # and the packed GEMM drivers.
    for name, w, groups in (("direct", rng.standard_normal((8, 1, 3, 3)), 8),
                            ("implicit", rng.standard_normal((16, 8, 3, 3)), 1),
                            ("packed", rng.standard_normal((16, 8, 3, 3)), 1)):
        w = w.astype(np.float32)
        spec = sparkle.api.conv2d_spec(x, w, padding=1, groups=groups)
        assert backend.uses_direct_kernel(spec) == (name == "direct")
        plan = None if name == "direct" else backend.plan_conv2d(spec, implicit=name == "implicit")
        kernel = backend.prepare_conv2d(spec, plan).kernel  # the compiled variant the call runs
        before = threads.binding_failures()
        y = backend.conv2d(x, w, None, spec, plan)
        assert np.allclose(y, sparkle.reference.conv2d(x, w, padding=1, groups=groups), rtol=1e-4, atol=1e-4)
        report[name] = dict(counted=threads.binding_failures() - before,
                            compiled=sum(kernel.stats.cache_misses.values()))
    print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def edited_kernel_runs(tmp_path_factory):
    """A copy of the package (with the Numba cache it has beside its sources, file times kept, so that the
    copy loads it) run in a new process before and after editing threads.py."""
    root = tmp_path_factory.mktemp("edited-package")
    package = Path(sparkle.__file__).parent
    shutil.copytree(package, root / "sparkle", ignore=shutil.ignore_patterns("*.pyc"))
    env = {key: value for key, value in os.environ.items() if key != "NUMBA_CACHE_DIR"}
    env["PYTHONPATH"] = str(root)

    def run():
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(EDITED_KERNELS)], capture_output=True,
                              text=True, env=env, cwd=root, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.splitlines()[-1])
        assert report["file"] == str(root / "sparkle" / "__init__.py")
        return report

    before = run()
    path = root / "sparkle" / "cpu" / EDIT_FILE
    text = path.read_text()
    assert text.count(EDIT_BEFORE) == 1
    path.write_text(text.replace(EDIT_BEFORE, "    count_failure()\n" + EDIT_BEFORE))
    return before, run()


@pytest.mark.parametrize("kernel", ["implicit", "packed", "direct"])
def test_a_new_process_runs_an_edited_kernel_not_the_cached_one(kernel, edited_kernel_runs):
    before, after = edited_kernel_runs
    assert before[kernel]["counted"] == 0
    assert after[kernel]["counted"] >= 1, after  # the edited code ran
    assert after[kernel]["compiled"] >= 1, after
