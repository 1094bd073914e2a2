"""Register-blocked GEMM micro-kernels emitted as explicit LLVM vector IR.

One call computes an ``mr x (nv * lanes)`` block of C:

    C[i, j] (+)= sum_p A[i * lda + p] * B[p, j]      for p < kc

A is read in place, ``mr`` rows of a row-major matrix (the weights as K x C*R*S, or
matmul's left operand): each row is a sequential stream, so packing it buys nothing.
Rows at or past ``a_rows`` repeat the last valid row (the caller discards them), so an
edge block never reads outside A.

Two ways to read B:
- ``microkernel``: B is an ``nr``-column micro-panel stored k-major (packed im2col).
- ``implicit_microkernel``: B is read straight from the (padded) input image: row p of B
  is the ``nr`` elements at ``x[x_off + offsets[p] + v0 ...]``. For a stride-1
  convolution every tap's row is a contiguous slice of the input when output pixels are
  numbered on the input's row pitch (``v = oh * pitch + ow``; columns ``ow >= out_w``
  of that grid are computed and never stored), so nothing is packed.

The accumulators are ``mr * nv`` vectors of ``lanes`` elements (one register each:
16 floats in a zmm register for AVX-512, 8 in a ymm register for AVX2, 4 for the
portable 128-bit family; see ``isa.py``); every step loads ``nv`` vectors of B,
broadcasts ``mr`` scalars of A and issues ``mr * nv`` multiply-adds. The IR is
target-neutral: LLVM lowers it to the widest registers the vector type asks for, and
fuses each multiply-add where the target has an FMA unit. LLVM keeps the
accumulators in registers because the loop body is straight-line vector code; plain
Numba loops with scalar accumulators vectorize poorly (mixed xmm/ymm/scalar FMAs).

The write-back is fused: optionally add C, optionally add a per-row bias, optionally
apply ReLU (NaN propagates, as in the reference), then store ``mr`` rows with row
stride ``ldc``.
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)

# Reduction steps ahead at which the implicit kernel prefetches B's rows.
PREFETCH_STEPS = 8


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


def _check_dtypes(*arrays):
    dtypes = {array.dtype for array in arrays}
    if len(dtypes) != 1 or arrays[0].dtype not in (types.float32, types.float64):
        raise TypeError(f"micro-kernel needs one float dtype for all arrays, got {dtypes}")
    return arrays[0].dtype


class _Block:
    """The accumulators of one ``rows x vectors`` block and the code that fills and drains them."""

    def __init__(self, context, builder, dtype, rows, vectors, lanes):
        self.builder = builder
        self.rows, self.vectors, self.lanes = rows, vectors, lanes
        self.elem_t = context.get_value_type(dtype)
        self.vec_t = ir.VectorType(self.elem_t, lanes)
        self.elem_align = dtype.bitwidth // 8
        suffix = "f32" if dtype.bitwidth == 32 else "f64"
        self.vector_suffix = f"v{lanes}{suffix}"
        # fmuladd, not fma: it fuses where the target has FMA and is a plain multiply and add
        # elsewhere (llvm.fma must be exact: a libm call per lane without the instruction).
        self.fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vec_t, [self.vec_t] * 3),
                                                  f"llvm.fmuladd.v{lanes}{suffix}")
        self.zero = ir.Constant(self.vec_t, [ir.Constant(self.elem_t, 0.0)] * lanes)
        # Accumulators live in allocas that SROA promotes to registers.
        self.acc = [[cgutils.alloca_once(builder, self.vec_t) for _ in range(vectors)] for _ in range(rows)]
        for row in self.acc:
            for slot in row:
                builder.store(self.zero, slot)

    def a_row_pointers(self, a_ptr, lda, a_rows):
        """Row i of the block is row min(i, a_rows - 1) of A (and of the bias): indices and pointers."""
        builder = self.builder
        last_row = builder.sub(a_rows, ir.Constant(_I64, 1))
        index = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, i), a_rows), ir.Constant(_I64, i),
                                last_row) for i in range(self.rows)]
        return index, [builder.gep(a_ptr, [builder.mul(index[i], lda)]) for i in range(self.rows)]

    def step(self, a_rows_ptr, p, b_vectors):
        """acc[i][j] += A[i, p] * b_vectors[j]."""
        builder = self.builder
        for i in range(self.rows):
            a_vector = _broadcast(builder, builder.load(builder.gep(a_rows_ptr[i], [p])), self.vec_t)
            for j in range(self.vectors):
                acc = builder.load(self.acc[i][j])
                builder.store(builder.call(self.fma, [a_vector, b_vectors[j], acc]), self.acc[i][j])

    def load_b(self, b_row, mask=None):
        """The ``vectors`` vectors of B starting at ``b_row``; lanes outside ``mask`` read as zero."""
        builder = self.builder
        pointers = [_vector_pointer(builder, builder.gep(b_row, [ir.Constant(_I64, j * self.lanes)]), self.vec_t)
                    for j in range(self.vectors)]
        if mask is None:
            return [builder.load(pointer, align=self.elem_align) for pointer in pointers]
        return [self.masked_load(pointer, mask[j], self.zero) for j, pointer in enumerate(pointers)]

    def masked_load(self, pointer, mask, passthrough):
        function = cgutils.get_or_insert_function(
            self.builder.module,
            ir.FunctionType(self.vec_t, [self.vec_t.as_pointer(), _I32, mask.type, self.vec_t]),
            f"llvm.masked.load.{self.vector_suffix}.p0{self.vector_suffix}")
        return self.builder.call(function, [pointer, ir.Constant(_I32, self.elem_align), mask, passthrough])

    def masked_store(self, value, pointer, mask):
        function = cgutils.get_or_insert_function(
            self.builder.module,
            ir.FunctionType(ir.VoidType(), [self.vec_t, self.vec_t.as_pointer(), _I32, mask.type]),
            f"llvm.masked.store.{self.vector_suffix}.p0{self.vector_suffix}")
        self.builder.call(function, [value, pointer, ir.Constant(_I32, self.elem_align), mask])

    def lane_masks(self, first, end):
        """Per vector j, the i1 mask of lanes l with first <= j * lanes + l < end."""
        builder = self.builder
        mask_t = ir.VectorType(_I64, self.lanes)
        low = _broadcast(builder, first, mask_t)
        high = _broadcast(builder, end, mask_t)
        masks = []
        for j in range(self.vectors):
            lane = ir.Constant(mask_t, [ir.Constant(_I64, j * self.lanes + l) for l in range(self.lanes)])
            masks.append(builder.and_(builder.icmp_signed(">=", lane, low), builder.icmp_signed("<", lane, high)))
        return masks

    def add(self, i, j, value):
        self.builder.store(self.builder.fadd(self.builder.load(self.acc[i][j]), value), self.acc[i][j])

    def finish(self, use_bias, bias_ptr, row_index, relu):
        """Add the bias and apply ReLU in registers."""
        builder = self.builder
        with builder.if_then(use_bias):
            for i in range(self.rows):
                bias_vector = _broadcast(builder, builder.load(builder.gep(bias_ptr, [row_index[i]])), self.vec_t)
                for j in range(self.vectors):
                    self.add(i, j, bias_vector)
        with builder.if_then(relu):
            for row in self.acc:
                for slot in row:
                    acc = builder.load(slot)
                    # select(acc < 0, 0, acc): an unordered NaN compares false and is kept.
                    builder.store(builder.select(builder.fcmp_ordered("<", acc, self.zero), self.zero, acc), slot)

    def prefetch_line_span(self, pointer):
        """Prefetch (for reading, into L1) the lines of ``vectors`` vectors starting at ``pointer``."""
        builder = self.builder
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
            "llvm.prefetch.p0i8")
        start = builder.bitcast(pointer, ir.IntType(8).as_pointer())
        span = self.vectors * self.lanes * self.elem_align
        for offset in range(0, span + 1, 64):  # one more line: the row need not start on a line
            line = builder.gep(start, [ir.Constant(_I64, min(offset, span - 1))])
            builder.call(prefetch, [line, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])

    def prefetch_rows(self, row_pointer, condition, extra_line=False):
        """Prefetch (for writing) the C lines of every row, when ``condition``: C is added after the
        loop, not loaded before it, so its rows' latency hides behind the loop. ``extra_line``: the
        row may start mid-line, so fetch one line more."""
        builder = self.builder
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
            "llvm.prefetch.p0i8")
        with builder.if_then(condition):
            for i in range(self.rows):
                for offset in range(0, self.vectors * self.lanes * self.elem_align + (64 if extra_line else 0), 64):
                    line = builder.gep(builder.bitcast(row_pointer(i), ir.IntType(8).as_pointer()),
                                       [ir.Constant(_I64, offset)])
                    builder.call(prefetch, [line, ir.Constant(_I32, 1), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


@intrinsic
def microkernel(typingctx, mr, nv, vector_lanes, kc, a, a_off, lda, a_rows, b, b_off, c, c_off, ldc,
                load_c, bias, bias_off, use_bias, relu):
    """Packed-B block (see the module docstring). ``mr``, ``nv`` and ``vector_lanes`` must be
    integer literals. Offsets are in elements from each array's data pointer; the caller
    guarantees they are in range (see ``conv2d._block_kernel``).
    """
    rows, vectors, lanes = _literal_int(mr), _literal_int(nv), _literal_int(vector_lanes)
    if rows is None or vectors is None or lanes is None:
        return None
    dtype = _check_dtypes(a, b, c, bias)
    nr = vectors * lanes
    sig = types.void(mr, nv, vector_lanes, types.intp, a, types.intp, types.intp, types.intp, b, types.intp, c,
                     types.intp, types.intp, types.boolean, bias, types.intp, types.boolean, types.boolean)

    def codegen(context, builder, signature, args):
        (_, _, _, kc_v, a_v, a_off_v, lda_v, a_rows_v, b_v, b_off_v, c_v, c_off_v, ldc_v,
         load_c_v, bias_v, bias_off_v, use_bias_v, relu_v) = args
        block = _Block(context, builder, dtype, rows, vectors, lanes)
        a_ptr = _data_pointer(context, builder, signature.args[4], a_v, a_off_v)
        b_ptr = _data_pointer(context, builder, signature.args[8], b_v, b_off_v)
        c_ptr = _data_pointer(context, builder, signature.args[10], c_v, c_off_v)
        bias_ptr = _data_pointer(context, builder, signature.args[14], bias_v, bias_off_v)
        row_index, a_rows_ptr = block.a_row_pointers(a_ptr, lda_v, a_rows_v)

        def c_vector_pointer(i, j):
            offset = builder.add(builder.mul(ir.Constant(_I64, i), ldc_v), ir.Constant(_I64, j * lanes))
            return _vector_pointer(builder, builder.gep(c_ptr, [offset]), block.vec_t)

        block.prefetch_rows(lambda i: c_vector_pointer(i, 0), load_c_v)
        with cgutils.for_range(builder, kc_v) as loop:
            b_row = builder.gep(b_ptr, [builder.mul(loop.index, ir.Constant(_I64, nr))])
            block.step(a_rows_ptr, loop.index, block.load_b(b_row))
        with builder.if_then(load_c_v):
            for i in range(rows):
                for j in range(vectors):
                    block.add(i, j, builder.load(c_vector_pointer(i, j), align=block.elem_align))
        block.finish(use_bias_v, bias_ptr, row_index, relu_v)
        for i in range(rows):
            for j in range(vectors):
                builder.store(builder.load(block.acc[i][j]), c_vector_pointer(i, j), align=block.elem_align)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def implicit_microkernel(typingctx, mr, nv, vector_lanes, kc, a, a_off, lda, a_rows, x, x_off, offsets, v0,
                         v_end, pitch, out_w, c, c_off, ldc, load_c, bias, bias_off, use_bias, relu):
    """Block of an implicit GEMM read straight from the input (see the module docstring).

    Covers the output pixels numbered ``v0 .. v0 + nr`` on a grid of ``pitch`` columns per
    output row, of which the first ``out_w`` are real; pixels at or past ``v_end`` (the end
    of the image's grid) are neither read nor stored. B row p (``p < kc``) is read at
    ``x[x_off + offsets[p] + v]``. Output pixel (oh, ow) is ``c[c_off + oh * out_w + ow]``
    (rows of C ``ldc`` apart): the stores are masked, one run of lanes per output row.
    """
    rows, vectors, lanes = _literal_int(mr), _literal_int(nv), _literal_int(vector_lanes)
    if rows is None or vectors is None or lanes is None:
        return None
    dtype = _check_dtypes(a, x, c, bias)
    if offsets.dtype != types.int64:
        raise TypeError(f"offsets must be int64, got {offsets.dtype}")
    nr = vectors * lanes
    sig = types.void(mr, nv, vector_lanes, types.intp, a, types.intp, types.intp, types.intp, x, types.intp,
                     offsets, types.intp, types.intp, types.intp, types.intp, c, types.intp, types.intp,
                     types.boolean, bias, types.intp, types.boolean, types.boolean)

    def codegen(context, builder, signature, args):
        (_, _, _, kc_v, a_v, a_off_v, lda_v, a_rows_v, x_v, x_off_v, offsets_v, v0_v, v_end_v, pitch_v,
         out_w_v, c_v, c_off_v, ldc_v, load_c_v, bias_v, bias_off_v, use_bias_v, relu_v) = args
        block = _Block(context, builder, dtype, rows, vectors, lanes)
        a_ptr = _data_pointer(context, builder, signature.args[4], a_v, a_off_v)
        x_ptr = _data_pointer(context, builder, signature.args[8], x_v, builder.add(x_off_v, v0_v))
        offsets_ptr = _data_pointer(context, builder, signature.args[10], offsets_v, ir.Constant(_I64, 0))
        c_ptr = _data_pointer(context, builder, signature.args[15], c_v, c_off_v)
        bias_ptr = _data_pointer(context, builder, signature.args[19], bias_v, bias_off_v)
        row_index, a_rows_ptr = block.a_row_pointers(a_ptr, lda_v, a_rows_v)
        one = ir.Constant(_I64, 1)
        # Rows past a_rows are edge padding: computed (from a repeated row), never stored.
        real_row = [builder.icmp_signed("<", ir.Constant(_I64, i), a_rows_v) for i in range(rows)]
        valid = builder.sub(v_end_v, v0_v)  # lanes [0, valid) exist in the grid
        full = builder.icmp_signed(">=", valid, ir.Constant(_I64, nr))

        last_step = builder.sub(kc_v, one)

        def accumulate(mask):
            with cgutils.for_range(builder, kc_v) as loop:
                b_row = builder.gep(x_ptr, [builder.load(builder.gep(offsets_ptr, [loop.index]))])
                if mask is None:
                    # B's rows jump around the input (the offset table), so no hardware prefetcher
                    # follows them: fetch the row PREFETCH_STEPS ahead (the last one near the end).
                    ahead = builder.add(loop.index, ir.Constant(_I64, PREFETCH_STEPS))
                    ahead = builder.select(builder.icmp_signed("<", ahead, kc_v), ahead, last_step)
                    block.prefetch_line_span(builder.gep(x_ptr, [builder.load(builder.gep(offsets_ptr, [ahead]))]))
                block.step(a_rows_ptr, loop.index, block.load_b(b_row, mask))

        # One run of lanes per output row the panel touches: lanes [first, end) hold pixels
        # v0 + l of row oh, stored at c_ptr + oh * out_w + (v0 + l - oh * pitch).
        first_row = builder.sdiv(v0_v, pitch_v)
        last_row = builder.sdiv(builder.sub(builder.add(v0_v, ir.Constant(_I64, nr)), one), pitch_v)
        row_count = builder.add(builder.sub(last_row, first_row), one)
        # Where lane 0 would go: the block's C lines start about there in every row. Fetching them
        # now (C is often not in cache: nothing else touches it) hides their latency behind the loop.
        lane0_target = builder.sub(builder.mul(first_row, out_w_v),
                                   builder.sub(builder.mul(first_row, pitch_v), v0_v))
        block.prefetch_rows(lambda i: builder.gep(c_ptr, [builder.add(builder.mul(ir.Constant(_I64, i), ldc_v),
                                                                      lane0_target)]),
                            ir.Constant(ir.IntType(1), 1), extra_line=True)

        # Two copies of the loop: plain loads for whole panels, masked ones for the grid's
        # last panel (its lanes past v_end would read past the image).
        with builder.if_else(full) as (whole, partial):
            with whole:
                accumulate(None)
            with partial:
                accumulate(block.lane_masks(ir.Constant(_I64, 0), valid))

        def for_each_run(body):
            with cgutils.for_range(builder, row_count) as loop:
                oh = builder.add(first_row, loop.index)
                row_start = builder.sub(builder.mul(oh, pitch_v), v0_v)  # lane of (oh, 0); may be < 0
                run_first = builder.select(builder.icmp_signed(">", row_start, ir.Constant(_I64, 0)), row_start,
                                           ir.Constant(_I64, 0))
                row_end = builder.add(row_start, out_w_v)
                run_end = builder.select(builder.icmp_signed("<", row_end, valid), row_end, valid)
                # Lane l of this run goes to c_ptr[oh * out_w - row_start + l].
                shift = builder.sub(builder.mul(oh, out_w_v), row_start)
                with builder.if_then(builder.icmp_signed("<", run_first, run_end)):
                    body(block.lane_masks(run_first, run_end), shift)

        def c_vector_pointer(i, j, shift):
            offset = builder.add(builder.add(builder.mul(ir.Constant(_I64, i), ldc_v), shift),
                                 ir.Constant(_I64, j * lanes))
            return _vector_pointer(builder, builder.gep(c_ptr, [offset]), block.vec_t)

        with builder.if_then(load_c_v):
            gathered = [[cgutils.alloca_once_value(builder, block.zero) for _ in range(vectors)] for _ in range(rows)]

            def load_run(masks, shift):
                for i in range(rows):
                    with builder.if_then(real_row[i]):
                        for j in range(vectors):
                            merged = block.masked_load(c_vector_pointer(i, j, shift), masks[j],
                                                       builder.load(gathered[i][j]))
                            builder.store(merged, gathered[i][j])

            for_each_run(load_run)
            for i in range(rows):
                for j in range(vectors):
                    block.add(i, j, builder.load(gathered[i][j]))
        block.finish(use_bias_v, bias_ptr, row_index, relu_v)

        def store_run(masks, shift):
            for i in range(rows):
                with builder.if_then(real_row[i]):
                    for j in range(vectors):
                        block.masked_store(builder.load(block.acc[i][j]), c_vector_pointer(i, j, shift), masks[j])

        for_each_run(store_run)
        return context.get_dummy_value()

    return sig, codegen
