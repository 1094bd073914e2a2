"""CPU affinity of the calling OS thread, from nopython code (Linux; a no-op elsewhere).

The intrinsics call libc's ``gettid``, ``sched_getcpu``, ``sched_getaffinity`` and
``sched_setaffinity`` by symbol name, so compiled code holds no addresses and Numba's disk cache stays valid.
Two process-wide values (binding on or off, failures seen) live in ctypes memory and
reach compiled code through symbols registered with the JIT linker, for the same reason.
Which code gets generated is decided here, in Python: a host without these libc calls
compiles only the no-op variant.
"""

import ctypes
import sys

from llvmlite import binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# Masks are cpu_set_t-style bit arrays of this many 64-bit words: 4096 CPUs.
MASK_WORDS = 64
_MASK_BYTES = MASK_WORDS * 8


def _libc_has_affinity_calls():
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    return all(hasattr(libc, name) for name in ("gettid", "sched_getcpu", "sched_getaffinity", "sched_setaffinity"))


SUPPORTED = _libc_has_affinity_calls()

_ENABLED_SYMBOL = "sparkle_bind_threads_enabled"
_FAILURES_SYMBOL = "sparkle_bind_threads_failures"
_enabled_flag = ctypes.c_int64(0)
_failure_count = ctypes.c_int64(0)
llvm.add_symbol(_ENABLED_SYMBOL, ctypes.addressof(_enabled_flag))
llvm.add_symbol(_FAILURES_SYMBOL, ctypes.addressof(_failure_count))

_i32 = ir.IntType(32)
_i64 = ir.IntType(64)
_size_t = ir.IntType(64)
_void_ptr = ir.IntType(8).as_pointer()


def set_enabled(enabled):
    """Worker binding on or off for the whole process (compiled code reads it on every call)."""
    _enabled_flag.value = 1 if (enabled and SUPPORTED) else 0


def enabled():
    return bool(_enabled_flag.value)


def failure_count():
    """How many affinity calls failed inside parallel loops since the process started."""
    return _failure_count.value


def _external_counter(builder, name):
    module = builder.module
    try:
        return module.get_global(name)
    except KeyError:
        return cgutils.add_global_variable(module, _i64, name)


def _libc_function(builder, name, return_type, argument_types):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(return_type, argument_types), name)


def _mask_pointer(context, builder, array_type, array_value):
    data = context.make_array(array_type)(context, builder, array_value).data
    return builder.bitcast(data, _void_ptr)


def _is_mask(mask):
    return isinstance(mask, types.Array) and mask.ndim == 1 and mask.layout == "C" and mask.dtype == types.uint64


@intrinsic
def binding_enabled(typingctx):
    """Whether worker threads should be bound (``set_enabled``); constant False where unsupported."""
    def codegen(context, builder, signature, args):
        if not SUPPORTED:
            return cgutils.false_bit
        flag = builder.load(_external_counter(builder, _ENABLED_SYMBOL))
        return builder.icmp_signed("!=", flag, _i64(0))

    return types.boolean(), codegen


@intrinsic
def count_failure(typingctx):
    """Add one to the process's failure count (atomically: called from parallel slots)."""
    def codegen(context, builder, signature, args):
        if SUPPORTED:
            builder.atomic_rmw("add", _external_counter(builder, _FAILURES_SYMBOL), _i64(1), "monotonic")
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def current_thread_id(typingctx):
    """The kernel's id of the calling thread (what ``threading.get_native_id()`` gives); 0 where unsupported."""
    def codegen(context, builder, signature, args):
        if not SUPPORTED:
            return _i64(0)
        tid = builder.call(_libc_function(builder, "gettid", _i32, []), [])
        return builder.sext(tid, _i64)

    return types.int64(), codegen


@intrinsic
def current_cpu(typingctx):
    """The CPU the calling thread runs on now; -1 where unsupported."""
    def codegen(context, builder, signature, args):
        if not SUPPORTED:
            return _i64(-1)
        return builder.sext(builder.call(_libc_function(builder, "sched_getcpu", _i32, []), []), _i64)

    return types.int64(), codegen


@intrinsic
def get_thread_mask(typingctx, mask):
    """Write the calling thread's allowed CPUs into ``mask`` (MASK_WORDS uint64); 0 on success."""
    if not _is_mask(mask):
        return None

    def codegen(context, builder, signature, args):
        if not SUPPORTED:
            return _i64(-1)
        function = _libc_function(builder, "sched_getaffinity", _i32, [_i32, _size_t, _void_ptr])
        pointer = _mask_pointer(context, builder, signature.args[0], args[0])
        # The kernel writes only the bytes it knows; zero the rest first.
        cgutils.memset(builder, pointer, _size_t(_MASK_BYTES), 0)
        status = builder.call(function, [_i32(0), _size_t(_MASK_BYTES), pointer])
        return builder.sext(builder.select(builder.icmp_signed("<", status, _i32(0)), _i32(-1), _i32(0)), _i64)

    return types.int64(mask), codegen


@intrinsic
def bind_thread_to_cpu(typingctx, cpu):
    """Restrict the calling thread to CPU ``cpu`` alone (a mask on the stack); 0 on success."""
    if not isinstance(cpu, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        if not SUPPORTED:
            return _i64(-1)
        function = _libc_function(builder, "sched_setaffinity", _i32, [_i32, _size_t, _void_ptr])
        words = cgutils.alloca_once(builder, _i64, size=MASK_WORDS)
        pointer = builder.bitcast(words, _void_ptr)
        cgutils.memset(builder, pointer, _size_t(_MASK_BYTES), 0)
        index = context.cast(builder, args[0], signature.args[0], types.int64)
        word = builder.gep(words, [builder.lshr(index, _i64(6))])
        bit = builder.shl(_i64(1), builder.and_(index, _i64(63)))
        builder.store(bit, word)
        return builder.sext(builder.call(function, [_i32(0), _size_t(_MASK_BYTES), pointer]), _i64)

    return types.int64(cpu), codegen
