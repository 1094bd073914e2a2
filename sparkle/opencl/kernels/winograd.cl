// Winograd F(m x m, 3 x 3), m = WINO_M (2 or 4), for 3x3, stride-1, undilated convolutions of one group
// (appended to conv2d.cl, whose types, shape macros and epilogue it uses). Each m x m output tile is
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

#if ALGO == 1
#define POINTS (WINO_ALPHA * WINO_ALPHA)
#define TILES_H ((P_OUT + WINO_M - 1) / WINO_M)
#define TILES_W ((Q_OUT + WINO_M - 1) / WINO_M)
#define TILES_IMG (TILES_H * TILES_W)
#define TILES (N_IMG * TILES_IMG)
#define WDK (WBK / WRK)  // work-items along the output channels
#define WDT (WBT / WRT)  // work-items along the tiles
#define WTHREADS (WDK * WDT)

// One work-item per (input channel, output channel); k varies fastest, so the writes of U[xi][c][k] coalesce.
__kernel void winograd_filter(__global const real* restrict w, __global real* restrict u)
{
    const int id = get_global_id(0);
    if (id >= K_OUT * C_IN) return;
    const int c = id / K_OUT;
    const int k = id - c * K_OUT;
    const __global real* g = w + ((INDEX)k * C_IN + c) * 9;
#define out(xi, value) u[((INDEX)(xi) * C_IN + c) * K_OUT + k] = (value)
    FILTER_TRANSFORM
#undef out
}

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
            if (tile < TILES && c0 + c < C_IN) {
                const int n = tile / TILES_IMG;
                const int rest = tile - n * TILES_IMG;
                const int th = rest / TILES_W;
                const int h0 = WINO_M * th - PAD_T;
                const int w0 = WINO_M * (rest - th * TILES_W) - PAD_L;
                const __global real* plane = x + ((INDEX)n * C_IN + c0 + c) * HW_IN;
                #pragma unroll
                for (int i = 0; i < WINO_ALPHA; ++i)
                    #pragma unroll
                    for (int j = 0; j < WINO_ALPHA; ++j) {
                        const int h = h0 + i, v = w0 + j;
                        d[i][j] = (h >= 0 && h < H_IN && v >= 0 && v < W_IN) ? plane[h * W_IN + v] : (real)0;
                    }
            } else {
                #pragma unroll
                for (int i = 0; i < WINO_ALPHA; ++i)
                    #pragma unroll
                    for (int j = 0; j < WINO_ALPHA; ++j)
                        d[i][j] = (real)0;
            }
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
            const int n = tile / TILES_IMG;
            const int rest = tile - n * TILES_IMG;
            const int th = rest / TILES_W;
            const int oh = WINO_M * th;
            const int ow = WINO_M * (rest - th * TILES_W);
            __global real* o = out + ((INDEX)n * K_OUT + k) * PQ + oh * Q_OUT + ow;
            #pragma unroll
            for (int a = 0; a < WINO_M; ++a)
                #pragma unroll
                for (int b = 0; b < WINO_M; ++b)
                    if (oh + a < P_OUT && ow + b < Q_OUT)
                        o[a * Q_OUT + b] = epilogue(y[a][b], bias, k);
        }
}
#endif  // ALGO == 1
