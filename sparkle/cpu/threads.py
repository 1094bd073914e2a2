"""Thread placement for the CPU backend's parallel loops.

Some schedulers (VMs that pack vCPUs, for one) leave unbound worker threads on one
core for a whole process, which makes every parallel call several times slower at
random. Binding OpenMP threads to places avoids it. OpenMP reads OMP_PROC_BIND once,
when its runtime loads (Numba's on the first parallel call), so it is set on import.

A setting of the user's wins; ``SPARKLE_BIND_THREADS=0`` leaves the environment alone
(for example when many processes share a machine: binding places each process's
first thread on the first core).
"""

import os


def bind_threads_by_default():
    """Set OMP_PROC_BIND=true unless the user set it or opted out. Returns the value in force."""
    if os.environ.get("SPARKLE_BIND_THREADS", "1") != "0":
        os.environ.setdefault("OMP_PROC_BIND", "true")
    return os.environ.get("OMP_PROC_BIND")
