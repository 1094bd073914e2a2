"""Register-blocked GEMM micro-kernel emitted as explicit LLVM vector IR.

One call computes an ``mr x (nv * lanes)`` block of C:

    C[i, j] (+)= sum_p A[i * lda + p] * B[p * nr + j]      for p < kc

A is read in place, ``mr`` rows of a row-major matrix (the weights as K x C*R*S, or
matmul's left operand): each row is a sequential stream, so packing it buys nothing.
Rows at or past ``a_rows`` repeat the last valid row (the caller discards them), so an
edge block never reads outside A. B is an ``nr``-column micro-panel stored k-major.
The accumulators are ``mr * nv`` vectors of ``lanes`` elements (8 floats or
4 doubles: one ymm register each); every step loads ``nv`` vectors of B, broadcasts
``mr`` scalars of A and issues ``mr * nv`` fused multiply-adds. LLVM keeps the
accumulators in registers because the loop body is straight-line vector code; plain
Numba loops with scalar accumulators vectorize poorly (mixed xmm/ymm/scalar FMAs).

The write-back is fused: optionally add a per-row bias, optionally apply ReLU (NaN
propagates, as in the reference), then store ``mr`` rows with row stride ``ldc``.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

VECTOR_BYTES = 32  # AVX2 ymm registers

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


def lanes_for(dtype_bitwidth):
    """Elements of one vector register for a float type of the given width in bits."""
    return VECTOR_BYTES * 8 // dtype_bitwidth


def _literal_int(ty):
    """The value of an integer-literal type, or None (Numba then retries with literals)."""
    return ty.literal_value if isinstance(ty, types.IntegerLiteral) else None


def _data_pointer(context, builder, array_type, array_value, offset):
    array = context.make_array(array_type)(context, builder, array_value)
    return builder.gep(array.data, [offset])


def _broadcast(builder, scalar, vector_type):
    undef = ir.Constant(vector_type, ir.Undefined)
    first = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vector_type.count), [0] * vector_type.count)
    return builder.shuffle_vector(first, undef, mask)


def _vector_pointer(builder, scalar_pointer, vector_type):
    return builder.bitcast(scalar_pointer, vector_type.as_pointer())


@intrinsic
def microkernel(typingctx, mr, nv, kc, a, a_off, lda, a_rows, b, b_off, c, c_off, ldc,
                load_c, bias, bias_off, use_bias, relu):
    """See the module docstring. ``mr`` and ``nv`` must be integer literals.

    Offsets are in elements from each array's data pointer; the caller guarantees
    they are in range (see ``checked_microkernel``).
    """
    rows, vectors = _literal_int(mr), _literal_int(nv)
    if rows is None or vectors is None:
        return None
    dtypes = {a.dtype, b.dtype, c.dtype, bias.dtype}
    if len(dtypes) != 1 or a.dtype not in (types.float32, types.float64):
        raise TypeError(f"micro-kernel needs one float dtype for all arrays, got {dtypes}")
    dtype = a.dtype
    lanes = lanes_for(dtype.bitwidth)
    nr = vectors * lanes
    sig = types.void(mr, nv, types.intp, a, types.intp, types.intp, types.intp, b, types.intp, c, types.intp,
                     types.intp, types.boolean, bias, types.intp, types.boolean, types.boolean)

    def codegen(context, builder, signature, args):
        (_, _, kc_v, a_v, a_off_v, lda_v, a_rows_v, b_v, b_off_v, c_v, c_off_v, ldc_v,
         load_c_v, bias_v, bias_off_v, use_bias_v, relu_v) = args
        elem_t = context.get_value_type(dtype)
        vec_t = ir.VectorType(elem_t, lanes)
        fma_name = f"llvm.fma.v{lanes}{'f32' if dtype.bitwidth == 32 else 'f64'}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec_t, [vec_t] * 3), fma_name)
        a_ptr = _data_pointer(context, builder, signature.args[3], a_v, a_off_v)
        b_ptr = _data_pointer(context, builder, signature.args[7], b_v, b_off_v)
        c_ptr = _data_pointer(context, builder, signature.args[9], c_v, c_off_v)
        bias_ptr = _data_pointer(context, builder, signature.args[13], bias_v, bias_off_v)
        last_row = builder.sub(a_rows_v, ir.Constant(_I64, 1))
        # Row i of the block is row min(i, a_rows - 1) of A (and of the bias).
        row_index = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, i), a_rows_v),
                                    ir.Constant(_I64, i), last_row) for i in range(rows)]
        a_rows_ptr = [builder.gep(a_ptr, [builder.mul(row_index[i], lda_v)]) for i in range(rows)]
        elem_align = dtype.bitwidth // 8

        def c_vector_pointer(i, j):
            row = builder.mul(ir.Constant(_I64, i), ldc_v)
            offset = builder.add(row, ir.Constant(_I64, j * lanes))
            return _vector_pointer(builder, builder.gep(c_ptr, [offset]), vec_t)

        # Accumulators live in allocas that SROA promotes to registers.
        accumulators = [[cgutils.alloca_once(builder, vec_t) for _ in range(vectors)]
                        for _ in range(rows)]
        zero = ir.Constant(vec_t, [ir.Constant(elem_t, 0.0)] * lanes)
        for i in range(rows):
            for j in range(vectors):
                builder.store(zero, accumulators[i][j])
        # C is added after the loop, not loaded before it: its rows may be far away in
        # memory, and a prefetch now lets the loop hide their latency.
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
            "llvm.prefetch.p0i8")
        with builder.if_then(load_c_v):
            for i in range(rows):
                for j in range(0, vectors * lanes * elem_align, 64):
                    line = builder.bitcast(c_vector_pointer(i, 0), ir.IntType(8).as_pointer())
                    line = builder.gep(line, [ir.Constant(_I64, j)])
                    builder.call(prefetch, [line, ir.Constant(_I32, 1), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])

        with cgutils.for_range(builder, kc_v) as loop:
            p = loop.index
            b_row = builder.gep(b_ptr, [builder.mul(p, ir.Constant(_I64, nr))])
            b_vectors = [
                builder.load(_vector_pointer(builder, builder.gep(b_row, [ir.Constant(_I64, j * lanes)]), vec_t),
                             align=elem_align)
                for j in range(vectors)
            ]
            for i in range(rows):
                a_scalar = builder.load(builder.gep(a_rows_ptr[i], [p]))
                a_vector = _broadcast(builder, a_scalar, vec_t)
                for j in range(vectors):
                    acc = builder.load(accumulators[i][j])
                    builder.store(builder.call(fma, [a_vector, b_vectors[j], acc]), accumulators[i][j])

        with builder.if_then(load_c_v):
            for i in range(rows):
                for j in range(vectors):
                    value = builder.load(c_vector_pointer(i, j), align=elem_align)
                    builder.store(builder.fadd(builder.load(accumulators[i][j]), value), accumulators[i][j])
        with builder.if_then(use_bias_v):
            for i in range(rows):
                bias_vector = _broadcast(builder, builder.load(builder.gep(bias_ptr, [row_index[i]])), vec_t)
                for j in range(vectors):
                    builder.store(builder.fadd(builder.load(accumulators[i][j]), bias_vector), accumulators[i][j])
        with builder.if_then(relu_v):
            for i in range(rows):
                for j in range(vectors):
                    acc = builder.load(accumulators[i][j])
                    # select(acc < 0, 0, acc): an unordered NaN compares false and is kept.
                    negative = builder.fcmp_ordered("<", acc, zero)
                    builder.store(builder.select(negative, zero, acc), accumulators[i][j])
        for i in range(rows):
            for j in range(vectors):
                builder.store(builder.load(accumulators[i][j]), c_vector_pointer(i, j), align=elem_align)
        return context.get_dummy_value()

    return sig, codegen
