// Winograd F(m x m, 3 x 3) around a batched GEMM (ALGO 2), for 3x3, stride-1, undilated convolutions of one group.
// The fused kernel (winograd.cl) keeps all alpha^2 transformed points of a tile in one work-item's registers,
// which caps its register blocks at 1x2..2x2 (the F(4x4) accumulators alone are 36 per pair); here the points
// become alpha^2 independent GEMMs, run by conv2d.cl's tuned GEMM kernel with its full register blocks:
//   winograd_filter: U[xi][k][c] = (G g G^T)[xi] of every filter (winograd.cl);
//   winograd_input:  V[xi][c][t] = (B^T d B)[xi] of every tile's input patch (t padded to T_COLS with zeros);
//   conv2d:          M[xi] = U[xi] . V[xi], as a 1x1 conv of a (1, alpha^2 C, 1, T_COLS) image in alpha^2 groups
//                    (the generator #defines the GEMM's shape as that conv's; this file's own shape is CONV_*);
//   winograd_output: Y = A^T M A per tile and output channel, with bias and ReLU, into the m x m pixels.
// V and M are the only large intermediates (alpha^2 values per tile and channel each), written once, read once.

#if ALGO == 2
// POINTS, TILES, winograd_filter, load_patch and store_tile: winograd.cl. T_COLS (generator-defined): the GEMM's
// columns, TILES rounded up to 4 (float4 loads of V's rows).

// One work-item per (tile, input channel); t varies fastest, so the writes of V[xi][c][t] coalesce.
__kernel void winograd_input(__global const real* restrict x, __global real* restrict v_out)
{
    const int t = get_global_id(0);
    const int c = get_global_id(1);
    if (t >= T_COLS || c >= CONV_C_IN) return;
    real d[WINO_ALPHA][WINO_ALPHA];
    load_patch(x, t, c, d);  // zeros for the padding columns t >= TILES (never read back)
    real v[WINO_ALPHA][WINO_ALPHA];
    INPUT_TRANSFORM
    #pragma unroll
    for (int i = 0; i < WINO_ALPHA; ++i)
        #pragma unroll
        for (int j = 0; j < WINO_ALPHA; ++j)
            v_out[((INDEX)(i * WINO_ALPHA + j) * CONV_C_IN + c) * T_COLS + t] = v[i][j];
}

// One work-item per (tile, output channel); t varies fastest, so the reads of M[xi][k][t] coalesce.
__kernel void winograd_output(__global const real* restrict products, __global const real* restrict bias,
                              __global real* restrict out)
{
    const int t = get_global_id(0);
    const int k = get_global_id(1);
    if (t >= TILES || k >= CONV_K_OUT) return;
    real p[POINTS];  // each point is read by several rows of A^T: load it once
    #pragma unroll
    for (int xi = 0; xi < POINTS; ++xi)
        p[xi] = products[((INDEX)xi * CONV_K_OUT + k) * T_COLS + t];
    real y[WINO_M][WINO_M];
#define M(xi) p[xi]
    OUTPUT_TRANSFORM
#undef M
    store_tile(out, bias, t, k, y);
}
#endif  // ALGO == 2
