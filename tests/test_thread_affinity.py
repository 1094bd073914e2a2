"""Thread placement: calls bind Numba's worker threads and leave the caller's threads, the
threads it starts later and its child processes exactly as they were (issue 7, part 3)."""

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest
from numba import njit, prange

import sparkle
from sparkle import api, reference
from sparkle.cpu import affinity, backend, threads

from _helpers import assert_close_to_reference

linux_only = pytest.mark.skipif(not affinity.SUPPORTED, reason="thread affinity calls are Linux-only")
needs_two_cpus = pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda _: ())(0)) < 2,
                                    reason="needs at least 2 allowed CPUs")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fused_call():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((48, 16, 3, 3)).astype(np.float32)
    assert not backend.uses_direct_kernel(api.conv2d_spec(x, w, padding=1))
    return sparkle.conv2d(x, w, padding=1, device="cpu"), reference.conv2d(x, w, padding=1)


def _direct_call():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 15, 13)).astype(np.float32)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    assert backend.uses_direct_kernel(api.conv2d_spec(x, w, padding=1, groups=8))
    return (sparkle.conv2d(x, w, padding=1, groups=8, device="cpu"),
            reference.conv2d(x, w, padding=1, groups=8))


def _matmul_call():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((70, 50)).astype(np.float32)
    b = rng.standard_normal((50, 90)).astype(np.float32)
    return sparkle.matmul(a, b, device="cpu"), reference.matmul(a, b)


CALLS = {"fused conv2d": _fused_call, "direct conv2d": _direct_call, "matmul": _matmul_call}


@pytest.fixture
def binding_on():
    was = threads.thread_binding_enabled()
    threads.set_thread_binding(True)
    yield
    threads.set_thread_binding(was)


@njit(parallel=True)
def _slot_report(slots):
    """Bound as the drivers bind: the CPUs slots go to and, per slot, the running thread's
    id and its mask while the slot runs."""
    cpus, caller = threads.capture_binding(slots)
    masks = np.zeros((slots, affinity.MASK_WORDS), dtype=np.uint64)
    thread_ids = np.zeros(slots, dtype=np.int64)
    for thread in prange(slots):
        threads.bind_slot(cpus, caller, thread)
        affinity.get_thread_mask(masks[thread])
        thread_ids[thread] = affinity.current_thread_id()
    return cpus, masks, thread_ids


def _cpu_set(mask):
    return {64 * word + bit for word in range(mask.size) for bit in range(64) if int(mask[word]) >> bit & 1}


def _child_mask():
    return sorted(os.sched_getaffinity(0))


@linux_only
@pytest.mark.parametrize("call", CALLS, ids=list(CALLS))
def test_calls_leave_the_callers_affinity_alone(call, binding_on):
    before = os.sched_getaffinity(0)
    for _ in range(3):
        y, expected = CALLS[call]()
        assert_close_to_reference(y, expected, np.float32)
        assert os.sched_getaffinity(0) == before
    seen = []
    started = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
    started.start()
    started.join()
    assert seen == [before]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert set(pool.apply(_child_mask)) == before
    child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                           capture_output=True, text=True, check=True)
    assert set(json.loads(child.stdout)) == before
    assert threads.binding_failures() == 0


def test_no_environment_variable_is_set():
    script = textwrap.dedent("""
        import json, os
        import numpy as np
        import sparkle
        x = np.ones((1, 4, 6, 6), np.float32); w = np.ones((8, 4, 3, 3), np.float32)
        sparkle.conv2d(x, w, device="cpu"); sparkle.conv2d(x, np.ones((4, 1, 3, 3), np.float32), groups=4, device="cpu")
        print(json.dumps({key: os.environ.get(key) for key in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")}))
    """)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "SPARKLE_BIND_THREADS")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {"OMP_PROC_BIND": None, "OMP_PLACES": None,
                                                        "GOMP_CPU_AFFINITY": None}


@linux_only
@needs_two_cpus
def test_worker_slots_are_bound_one_cpu_each(binding_on):
    before = os.sched_getaffinity(0)
    slots = numba.get_num_threads()
    if slots < 2:
        pytest.skip("Numba runs one thread")
    cpus, masks, thread_ids = _slot_report(slots)
    assert sorted(cpus) == sorted(before)
    caller = threading.get_native_id()
    workers = [slot for slot in range(slots) if thread_ids[slot] != caller]
    assert workers  # really ran on several threads
    for slot in range(slots):
        expected = before if thread_ids[slot] == caller else {cpus[slot % len(cpus)]}
        assert _cpu_set(masks[slot]) == expected, f"slot {slot}"
    assert os.sched_getaffinity(0) == before


@linux_only
def test_binding_off_binds_nothing():
    was = threads.thread_binding_enabled()
    threads.set_thread_binding(False)
    try:
        cpus, _ = threads.capture_binding(4)
        assert cpus.size == 0
    finally:
        threads.set_thread_binding(was)


def test_environment_opt_out_is_read_on_import():
    script = "from sparkle.cpu import threads; print(threads.thread_binding_enabled())"
    environment = dict(os.environ, SPARKLE_BIND_THREADS="0")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


RESTRICTED_CALLER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import sparkle
    from sparkle import reference
    from sparkle.cpu import threads

    def relative_error(y, expected):
        return float(np.linalg.norm(y - expected) / np.linalg.norm(expected))

    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 16, 14, 14)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    threads.set_thread_binding(True)
    sparkle.conv2d(x, w, padding=1, device="cpu")  # Numba's workers start with the full mask
    cpu = int(sys.argv[1])
    os.sched_setaffinity(0, {cpu})
    errors = [relative_error(sparkle.conv2d(x, w, padding=1, device="cpu"), reference.conv2d(x, w, padding=1)),
              relative_error(sparkle.conv2d(x, dw, padding=1, groups=16, device="cpu"),
                             reference.conv2d(x, dw, padding=1, groups=16))]
    masks = {}
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as status:
            allowed = [line.split(":")[1].strip() for line in status if line.startswith("Cpus_allowed_list")]
        masks[task] = allowed[0]
    print(json.dumps({"caller": sorted(os.sched_getaffinity(0)), "errors": errors, "masks": masks,
                      "failures": threads.binding_failures()}))
""")


@linux_only
@needs_two_cpus
def test_restricted_caller_keeps_its_mask_and_results():
    cpu = sorted(os.sched_getaffinity(0))[-1]
    done = subprocess.run([sys.executable, "-c", RESTRICTED_CALLER, str(cpu)], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["caller"] == [cpu]
    assert max(result["errors"]) <= 1e-5
    assert result["failures"] == 0
    # The caller and Numba's workers, bound during the restricted calls.
    assert list(result["masks"].values()).count(str(cpu)) >= 2


LAYER_CHECK = textwrap.dedent("""
    import json, os
    import numba
    import numpy as np
    import sparkle
    from sparkle import reference
    from sparkle.cpu import threads
    threads.set_thread_binding(True)
    before = os.sched_getaffinity(0)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 16, 20, 20)).astype(np.float32)  # 3.7 MFLOP: Numba's parallel launch
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    y = sparkle.conv2d(x, w, padding=1, device="cpu")
    error = float(np.linalg.norm(y - reference.conv2d(x, w, padding=1)) / np.linalg.norm(y))
    print(json.dumps({"layer": numba.threading_layer(), "same": os.sched_getaffinity(0) == before,
                      "error": error, "failures": threads.binding_failures()}))
""")


def _layers():
    layers = ["omp", "workqueue"]
    try:
        import numba.np.ufunc.tbbpool  # noqa: F401
        layers.append("tbb")
    except ImportError:
        pass
    return layers


@linux_only
@needs_two_cpus
@pytest.mark.parametrize("layer", _layers())
def test_every_threading_layer_leaves_the_caller_alone(layer):
    environment = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    done = subprocess.run([sys.executable, "-c", LAYER_CHECK], capture_output=True, text=True,
                          env=environment, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"layer": layer, "same": True, "error": result["error"], "failures": 0}
    assert result["error"] <= 1e-5


def test_calls_follow_numba_set_num_threads():
    was = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        y, expected = _fused_call()
        assert_close_to_reference(y, expected, np.float32)
        spec = api.conv2d_spec(np.ones((1, 16, 12, 12), np.float32), np.ones((24, 16, 3, 3), np.float32))
        assert backend.plan_conv2d(spec).threads == 1
        y, expected = _direct_call()
        assert_close_to_reference(y, expected, np.float32)
    finally:
        numba.set_num_threads(was)


# --- README "Threads": workers bound one CPU each, the opt-outs, the failure count -----------------------

WORKER_MASKS = textwrap.dedent("""
    import json, os, sys
    import numba
    import numpy as np
    import sparkle
    from sparkle import reference
    from sparkle.cpu import threads

    if sys.argv[1] == "runtime-off":
        threads.set_thread_binding(False)

    def masks():
        found = {}
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/status") as status:
                    found[task] = [line.split(":", 1)[1].strip() for line in status
                                   if line.startswith("Cpus_allowed_list")][0]
            except FileNotFoundError:  # a thread that ended meanwhile
                pass
        return found

    before = masks()  # the process's threads before Numba's pool exists
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 16, 24, 24)).astype(np.float32)
    w = rng.standard_normal((48, 16, 3, 3)).astype(np.float32)
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32)
    a = rng.standard_normal((40, 30)).astype(np.float32)
    errors = []
    for y, expected in ((sparkle.conv2d(x, w, padding=1, device="cpu"), reference.conv2d(x, w, padding=1)),
                        (sparkle.conv2d(x, dw, padding=1, groups=16, device="cpu"),
                         reference.conv2d(x, dw, padding=1, groups=16)),
                        (sparkle.matmul(a, a.T, device="cpu"), reference.matmul(a, a.T))):
        errors.append(float(np.linalg.norm(y - expected) / np.linalg.norm(expected)))
    after = masks()
    print(json.dumps({"enabled": threads.thread_binding_enabled(), "threads": numba.get_num_threads(),
                      "allowed": sorted(os.sched_getaffinity(0)), "main": str(os.getpid()),
                      "workers": {task: mask for task, mask in after.items() if task not in before},
                      "others": {task: mask for task, mask in after.items() if task in before},
                      "errors": errors, "failures": threads.binding_failures()}))
""")


def _cpu_list(text):
    """The CPUs of a /proc Cpus_allowed_list value such as "0-3,6"."""
    cpus = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


@linux_only
@needs_two_cpus
@pytest.mark.parametrize("mode", ["default", "environment-off", "runtime-off"])
def test_real_calls_bind_workers_one_cpu_each_unless_turned_off(mode):
    """Fused, direct and matmul calls in a new process: by default each of Numba's workers ends up bound to
    one CPU of the caller's allowed set; SPARKLE_BIND_THREADS=0 (read on import) or set_thread_binding(False)
    leave every thread with the process's mask. The caller's own mask never changes."""
    environment = {key: value for key, value in os.environ.items() if key != "SPARKLE_BIND_THREADS"}
    if mode == "environment-off":
        environment["SPARKLE_BIND_THREADS"] = "0"
    done = subprocess.run([sys.executable, "-c", WORKER_MASKS, mode], capture_output=True, text=True,
                          env=environment, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    if result["threads"] < 2:
        pytest.skip("Numba runs one thread in the child")
    allowed = set(result["allowed"])
    assert max(result["errors"]) <= 1e-5
    assert result["failures"] == 0
    assert result["workers"], "Numba's pool did not start"
    assert result["enabled"] is (mode == "default")
    assert all(_cpu_list(mask) == allowed for mask in result["others"].values()), result  # the caller included
    worker_cpus = [_cpu_list(mask) for mask in result["workers"].values()]
    if mode == "default":
        assert all(len(cpus) == 1 and cpus <= allowed for cpus in worker_cpus), result
    else:
        assert all(cpus == allowed for cpus in worker_cpus), result


@njit
def _bind_slot_to(cpu):
    """What a driver's slot does first, for a slot whose CPU is ``cpu`` (the caller id matches no thread)."""
    threads.bind_slot(np.array([cpu], dtype=np.int64), np.int64(-1), 0)


def _in_new_thread(function):
    """``function()``'s result, run on a thread started for it (affinity changes die with the thread)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(function()))
    thread.start()
    thread.join()
    assert result, "the thread failed"
    return result[0]


@linux_only
def test_binding_failures_counts_affinity_calls_that_fail():
    impossible = affinity.MASK_WORDS * 64 - 1  # the last CPU a mask can name
    if impossible in os.sched_getaffinity(0):
        pytest.skip(f"CPU {impossible} exists here")
    process_mask = os.sched_getaffinity(0)

    def failing_slots():
        _bind_slot_to(impossible)
        _bind_slot_to(impossible)
        return os.sched_getaffinity(0)

    before = threads.binding_failures()
    assert _in_new_thread(failing_slots) == process_mask  # the slot ran unbound
    assert threads.binding_failures() == before + 2
    cpu = min(process_mask)

    def good_slot():
        _bind_slot_to(cpu)
        return os.sched_getaffinity(0)

    assert _in_new_thread(good_slot) == {cpu}
    assert threads.binding_failures() == before + 2  # a bind that works is not counted
    assert os.sched_getaffinity(0) == process_mask


def test_binding_is_off_where_the_os_has_no_affinity_calls(monkeypatch):
    """README: "Linux only; elsewhere nothing is bound" (set_enabled honours affinity.SUPPORTED)."""
    was = threads.thread_binding_enabled()
    monkeypatch.setattr(affinity, "SUPPORTED", False)
    try:
        threads.set_thread_binding(True)
        assert threads.thread_binding_enabled() is False
    finally:
        monkeypatch.undo()
        threads.set_thread_binding(was)
