"""Atomic counter for dynamic job scheduling inside ``prange`` loops.

Threads take the next job from a shared counter instead of a fixed round-robin share,
so a thread that the OS preempts (a busy machine) delays one job, not half the call.
"""

from numba import types
from numba.extending import intrinsic


@intrinsic
def fetch_add(typingctx, counters, index, increment):
    """Atomically add ``increment`` to ``counters[index]`` (int64 array); return the old value."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64):
        return None
    sig = types.int64(counters, types.intp, types.int64)

    def codegen(context, builder, signature, args):
        array_value, index_value, increment_value = args
        array = context.make_array(signature.args[0])(context, builder, array_value)
        pointer = builder.gep(array.data, [index_value])
        return builder.atomic_rmw("add", pointer, increment_value, "monotonic")

    return sig, codegen
