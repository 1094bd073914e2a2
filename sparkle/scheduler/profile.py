"""Device profiles: sustained GFLOPS on a GEMM probe, per-call overhead, host <-> device bandwidth and the
cost of compiling a kernel for a new shape, measured once per device identity and kept on disk.

A profile is the cost model's starting point; the model then learns from every real call.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from .. import api, cache
from ..timing import best_time
from . import verify

logger = logging.getLogger("sparkle.scheduler")

PROFILE_VERSION = 4  # 3: downloads measured into the memory results land in (pinned on a GPU); 4: uploads staged
TRANSFER_PROBE_BYTES = 16 * 2**20
LATENCY_PROBE_BYTES = 64  # a transfer this small costs only the round trip
# The GEMM probe's size per device kind: large enough to reach sustained speed, small enough to take
# well under a second (a 2-core CPU: 512^3 in ~5 ms; PoCL there: ~50 ms; a GPU: 2048^3 in < 1 ms; a
# simulated device: 128^3, as slow as the tests make them).
PROBE_SIZES = {"gpu": 2048, "cpu": 512, "simulated": 128}


@dataclass(frozen=True)
class DeviceProfile:
    device: str
    identity: str
    gflops: float  # sustained, float32 GEMM probe
    overhead_seconds: float  # a warm 8x8 matmul, data on the host
    upload_bytes_per_second: float  # inf where memory is the host's
    download_bytes_per_second: float
    upload_latency_seconds: float  # a tiny copy's time: what every move of an operand costs at least
    download_latency_seconds: float
    compile_seconds: float  # building a kernel for a shape seen for the first time
    seconds_to_measure: float

    def transfer_seconds(self, upload_bytes, download_bytes):
        return upload_bytes / self.upload_bytes_per_second + download_bytes / self.download_bytes_per_second

    def to_json(self):
        return {key: (value if value != float("inf") else "inf") for key, value in asdict(self).items()}

    @classmethod
    def from_json(cls, data):
        return cls(**{key: (float("inf") if value == "inf" else value) for key, value in data.items()})


def _checked_call(executor, a, b):
    """A prepared matmul on ``executor``, checked once against float64 values at sampled outputs (the full
    float64 reference of the 2048^3 GPU probe would take seconds)."""
    spec = api.matmul_spec(a, b)
    prepared = executor.prepare("matmul", spec)
    result = np.asarray(prepared(a, b))
    passed, _ = verify.check("matmul", spec, (a, b), result, np.random.default_rng(0))
    if not passed:
        raise ValueError(f"{executor.id}: the profile's GEMM probe gave a wrong result")
    return prepared


def measure(executor, progress=None):
    """Profile one executor (a few seconds at most); ``progress(text)`` is told each step."""
    started = time.perf_counter()
    say = progress or (lambda text: None)
    rng = np.random.default_rng(0)
    say(f"{executor.id}: per-call overhead")
    tiny = rng.standard_normal((8, 8)).astype(np.float32)
    prepared = _checked_call(executor, tiny, tiny)
    overhead = best_time(lambda: prepared(tiny, tiny), 50)
    say(f"{executor.id}: GEMM probe")
    size = PROBE_SIZES.get(executor.kind, 512)
    a = rng.standard_normal((size, size)).astype(np.float32)
    b = rng.standard_normal((size, size)).astype(np.float32)
    gemm = _checked_call(executor, a, b)
    seconds = best_time(lambda: gemm(a, b), 3)
    say(f"{executor.id}: transfers")
    up_latency, down_latency = executor.transfer_seconds(LATENCY_PROBE_BYTES)
    up, down = executor.transfer_seconds(TRANSFER_PROBE_BYTES)
    say(f"{executor.id}: compile cost")
    compile_seconds = executor.compile_seconds()
    # The GEMM and transfer probes once more, after the compile probe's pause: a profile is kept for good, and
    # one taken while the host stalled (an H100 machine once: uploads at 1.6 GB/s against 21-24, 28 % fewer
    # GFLOPS) misled every later decision. A stall must now last through both looks to be believed.
    seconds = min(seconds, best_time(lambda: gemm(a, b), 2))
    again_up, again_down = executor.transfer_seconds(TRANSFER_PROBE_BYTES)
    up, down = min(up, again_up), min(down, again_down)
    probe_up, probe_down = executor.transfer_seconds(2 * size * size * 4)  # what the GEMM probe's data moved
    compute = max(seconds - probe_up / 2 - probe_down - overhead, seconds * 0.1)
    gflops = 2 * size ** 3 / compute / 1e9
    # The overhead probe moved its two operands in and its result out: those moves are charged per operand
    # (latency + bytes / bandwidth), not again as overhead.
    overhead = max(overhead - 2 * up_latency - down_latency, 0.2 * overhead)
    return DeviceProfile(executor.id, executor.identity, gflops, overhead,
                         TRANSFER_PROBE_BYTES / up if up > 0 else float("inf"),
                         TRANSFER_PROBE_BYTES / down if down > 0 else float("inf"),
                         up_latency, down_latency, compile_seconds, time.perf_counter() - started)


class ProfileStore:
    """Profiles on disk, one per device identity: a new driver, device or kernel source profiles anew."""

    def __init__(self, directory=None):
        self.document = cache.JsonDocument("scheduler-profiles", PROFILE_VERSION, directory)

    def get(self, identity):
        data = self.document.load().get(identity)
        try:
            return DeviceProfile.from_json(data) if data else None
        except TypeError:  # written by another layout: measure again
            return None

    def put(self, profile):
        self.document.update(lambda document: document.__setitem__(profile.identity, profile.to_json()))

    def clear(self):
        self.document.update(lambda document: document.clear())


def ensure_profiles(scheduler, force=False):
    """Give every device of ``scheduler`` a profile: the stored one for its identity, else measured now
    (with a progress bar); a device that cannot be profiled is not used (nor measured again in this process)."""
    missing = [state for state in scheduler._states if force or (state.profile is None and not state.unprofilable)]
    if not missing:
        return
    for state in missing:
        stored = None if force or scheduler._profiles is None else scheduler._profiles.get(state.executor.identity)
        if stored is not None:
            state.profile = stored
    missing = [state for state in missing if force or (state.profile is None and not state.unprofilable)]
    if not missing:
        return
    from tqdm.auto import tqdm

    with tqdm(total=len(missing), desc="sparkle: profiling devices", unit="device", delay=1.0,
              disable=not scheduler.progress, leave=False) as bar:
        for state in missing:
            try:
                state.profile = measure(state.executor, progress=bar.set_postfix_str)
            except Exception as error:  # noqa: BLE001 - a device that cannot be profiled is not used
                logger.warning("sparkle scheduler: profiling %s failed (%s); it is not used", state.id, error)
                state.faults += 1
                state.avoid_until = math.inf
                state.unprofilable = True  # not measured again in this process (profile(force=True) does)
                bar.update()
                continue
            if scheduler._profiles is not None:
                scheduler._profiles.put(state.profile)
            bar.update()
