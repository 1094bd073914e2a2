// Winograd F(m x m, 3 x 3), m = WINO_M (2 or 4), for 3x3, stride-1, undilated convolutions of one group
// (appended to conv2d.cl, whose types, shape macros and epilogue it uses; its tile helpers serve ALGO 2 too).
// Each m x m output tile is
// A^T [ sum_c (G g G^T) . (B^T d B) ] A over the tile's alpha x alpha input patch d (alpha = m + 2): alpha^2
// multiplications per tile and channel pair instead of 9 m^2. The transforms are generated per tile size
// (winograd.py: FILTER_TRANSFORM, INPUT_TRANSFORM, OUTPUT_TRANSFORM, WINO_ALPHA).
//   winograd_filter: U[xi][c][k], the alpha^2 transformed taps of every filter (a workspace of alpha^2 K C
//                    values; the only intermediate in global memory).
//   conv2d:          per work-group, WBK output channels x WBT tiles; per step of WBC input channels the
//                    patches are transformed into local memory beside their U slice, each work-item
//                    accumulates its WRK x WRT (channel, tile) pairs in the alpha^2 transformed positions, and
//                    the output transform and epilogue write the m x m pixels straight from registers.

#ifndef WINO_M        // Winograd: output tile size m of F(m x m, 3 x 3)
#define WINO_M 2
#endif
#ifndef WBK           // Winograd: output channels per work-group
#define WBK 32
#endif
#ifndef WBT           // Winograd: 2x2 output tiles per work-group
#define WBT 32
#endif
#ifndef WBC           // Winograd: input channels transformed per step
#define WBC 8
#endif
#ifndef WRK           // Winograd: output channels per work-item
#define WRK 2
#endif
#ifndef WRT           // Winograd: tiles per work-item
#define WRT 2
#endif

#if ALGO == 1 || ALGO == 2
// ---- shared by both forms: the convolution's own shape is CONV_* (ALGO 2's generator defines it so, because
// there the plain names are its GEMM's; the fused kernel's is the plain one) ----
#if ALGO == 1
#define CONV_N_IMG N_IMG
#define CONV_C_IN C_IN
#define CONV_H_IN H_IN
#define CONV_W_IN W_IN
#define CONV_K_OUT K_OUT
#define CONV_PAD_T PAD_T
#define CONV_PAD_L PAD_L
#define CONV_P_OUT P_OUT
#define CONV_Q_OUT Q_OUT
#define CONV_HAS_BIAS HAS_BIAS
#define CONV_RELU RELU
#endif
#define POINTS (WINO_ALPHA * WINO_ALPHA)
#define TILES_H ((CONV_P_OUT + WINO_M - 1) / WINO_M)
#define TILES_W ((CONV_Q_OUT + WINO_M - 1) / WINO_M)
#define TILES_IMG (TILES_H * TILES_W)
#define TILES (CONV_N_IMG * TILES_IMG)

// Tile `tile`'s image and its first output pixel (row, column).
inline void tile_origin(int tile, int* n, int* oh, int* ow)
{
    *n = tile / TILES_IMG;
    const int rest = tile - *n * TILES_IMG;
    const int th = rest / TILES_W;
    *oh = WINO_M * th;
    *ow = WINO_M * (rest - th * TILES_W);
}

// The alpha x alpha input patch of `tile` in input channel c: zeros outside the image, and for tiles past TILES.
inline void load_patch(__global const real* restrict x, int tile, int c, real d[WINO_ALPHA][WINO_ALPHA])
{
    int n, oh, ow;
    tile_origin(tile < TILES ? tile : 0, &n, &oh, &ow);
    const int h0 = oh - CONV_PAD_T, w0 = ow - CONV_PAD_L;
    const __global real* plane = x + ((INDEX)n * CONV_C_IN + c) * (CONV_H_IN * CONV_W_IN);
    #pragma unroll
    for (int i = 0; i < WINO_ALPHA; ++i)
        #pragma unroll
        for (int j = 0; j < WINO_ALPHA; ++j) {
            const int h = h0 + i, q = w0 + j;
            d[i][j] = (tile < TILES && h >= 0 && h < CONV_H_IN && q >= 0 && q < CONV_W_IN)
                      ? plane[h * CONV_W_IN + q] : (real)0;
        }
}

// The m x m outputs y of `tile` in output channel k, with bias and ReLU; pixels past P or Q are not stored.
inline void store_tile(__global real* restrict out, __global const real* restrict bias, int tile, int k,
                       real y[WINO_M][WINO_M])
{
    int n, oh, ow;
    tile_origin(tile, &n, &oh, &ow);
    __global real* o = out + ((INDEX)n * CONV_K_OUT + k) * (CONV_P_OUT * CONV_Q_OUT) + oh * CONV_Q_OUT + ow;
    #pragma unroll
    for (int a = 0; a < WINO_M; ++a)
        #pragma unroll
        for (int b = 0; b < WINO_M; ++b)
            if (oh + a < CONV_P_OUT && ow + b < CONV_Q_OUT)
                o[a * CONV_Q_OUT + b] = epilogue_of(y[a][b], bias, k, CONV_HAS_BIAS, CONV_RELU);
}
// The transformed filters U, one work-item per (output channel, input channel) pair; the index last in U's
// layout varies fastest, so the writes coalesce. The fused kernel reads U[xi][c][k] (a step's slice of channels,
// k fastest); ALGO 2's GEMM reads U[xi][k][c] (its A matrices, rows of C).
__kernel void winograd_filter(__global const real* restrict w, __global real* restrict u)
{
    const int id = get_global_id(0);
    if (id >= CONV_K_OUT * CONV_C_IN) return;
#if ALGO == 1
    const int c = id / CONV_K_OUT;
    const int k = id - c * CONV_K_OUT;
#define out(xi, value) u[((INDEX)(xi) * CONV_C_IN + c) * CONV_K_OUT + k] = (value)
#else
    const int k = id / CONV_C_IN;
    const int c = id - k * CONV_C_IN;
#define out(xi, value) u[((INDEX)(xi) * CONV_K_OUT + k) * CONV_C_IN + c] = (value)
#endif
    const __global real* g = w + ((INDEX)k * CONV_C_IN + c) * 9;
    FILTER_TRANSFORM
#undef out
}
#endif

#if ALGO == 1
#define WDK (WBK / WRK)  // work-items along the output channels
#define WDT (WBT / WRT)  // work-items along the tiles
#define WTHREADS (WDK * WDT)


__kernel __attribute__((reqd_work_group_size(WDT, WDK, 1)))
void conv2d(__global const real* restrict x, __global const real* restrict u,
            __global const real* restrict bias, __global real* restrict out)
{
    const int tt = get_local_id(0);
    const int tk = get_local_id(1);
    const int tid = tk * WDT + tt;
    const int tile0 = get_group_id(0) * WBT;
    const int k0 = get_group_id(1) * WBK;
    __local real v_tile[POINTS * WBC * WBT];  // transformed patches, [xi][c][t]
    __local real u_tile[POINTS * WBC * WBK];  // transformed filters, [xi][c][k]

    real acc[POINTS][WRK][WRT];
    #pragma unroll
    for (int xi = 0; xi < POINTS; ++xi)
        #pragma unroll
        for (int i = 0; i < WRK; ++i)
            #pragma unroll
            for (int j = 0; j < WRT; ++j)
                acc[xi][i][j] = (real)0;

    for (int c0 = 0; c0 < C_IN; c0 += WBC) {
        // Input transform B^T d B of WBC x WBT patches; neighbouring work-items take neighbouring tiles.
        for (int e = tid; e < WBC * WBT; e += WTHREADS) {
            const int c = e / WBT;
            const int t = e - c * WBT;
            const int tile = tile0 + t;
            real d[WINO_ALPHA][WINO_ALPHA];
            load_patch(x, c0 + c < C_IN ? tile : TILES, c0 + c < C_IN ? c0 + c : 0, d);  // zeros past the channels
            real v[WINO_ALPHA][WINO_ALPHA];
            INPUT_TRANSFORM
            #pragma unroll
            for (int i = 0; i < WINO_ALPHA; ++i)
                #pragma unroll
                for (int j = 0; j < WINO_ALPHA; ++j)
                    v_tile[((i * WINO_ALPHA + j) * WBC + c) * WBT + t] = v[i][j];
        }
        // The step's slice of U, k fastest (coalesced); zeros past the channels.
        for (int e = tid; e < POINTS * WBC * WBK; e += WTHREADS) {
            const int k = e % WBK;
            const int rest = e / WBK;
            const int c = rest % WBC;
            const int xi = rest / WBC;
            u_tile[e] = (k0 + k < K_OUT && c0 + c < C_IN) ? u[((INDEX)xi * C_IN + c0 + c) * K_OUT + k0 + k]
                                                          : (real)0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        #pragma unroll
        for (int xi = 0; xi < POINTS; ++xi)
            for (int c = 0; c < WBC; ++c) {
                real a[WRK], b[WRT];
                #pragma unroll
                for (int i = 0; i < WRK; ++i) a[i] = u_tile[(xi * WBC + c) * WBK + tk + i * WDK];
                #pragma unroll
                for (int j = 0; j < WRT; ++j) b[j] = v_tile[(xi * WBC + c) * WBT + tt + j * WDT];
                #pragma unroll
                for (int i = 0; i < WRK; ++i)
                    #pragma unroll
                    for (int j = 0; j < WRT; ++j)
                        acc[xi][i][j] = fma(a[i], b[j], acc[xi][i][j]);
            }
        barrier(CLK_LOCAL_MEM_FENCE);  // everyone is done reading before the next step overwrites
    }

    // Output transform A^T M A, epilogue, store the tile's pixels that exist (P or Q need not divide by m).
    #pragma unroll
    for (int i = 0; i < WRK; ++i)
        #pragma unroll
        for (int j = 0; j < WRT; ++j) {
            const int k = k0 + tk + i * WDK;
            const int tile = tile0 + tt + j * WDT;
            if (k >= K_OUT || tile >= TILES) continue;
            real y[WINO_M][WINO_M];
#define M(xi) acc[xi][i][j]
            OUTPUT_TRANSFORM
#undef M
            store_tile(out, bias, tile, k, y);
        }
}
#endif  // ALGO == 1
