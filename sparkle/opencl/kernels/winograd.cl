// Winograd F(2x2, 3x3) for 3x3, stride-1, undilated convolutions of one group (appended to conv2d.cl, whose
// types, shape macros and epilogue it uses). Each 2x2 output tile is A^T [ sum_c (G g G^T) . (B^T d B) ] A over
// the tile's 4x4 input patch d: 16 multiplications per tile and channel pair instead of 36.
//   winograd_filter: U[xi][c][k] = (G g[k][c] G^T)[xi], the 16 transformed taps of every filter (a workspace of
//                    16 K C values; the only intermediate in global memory).
//   conv2d:          per work-group, WBK output channels x WBT tiles; per step of WBC input channels the
//                    patches are transformed into local memory beside their U slice, each work-item
//                    accumulates its WRK x WRT (channel, tile) pairs in the 16 transformed positions, and the
//                    output transform and epilogue write the 2x2 pixels straight from registers.

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
#define TILES_H ((P_OUT + 1) / 2)
#define TILES_W ((Q_OUT + 1) / 2)
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
    real gg[4][3];  // G g: 4 x 3
    #pragma unroll
    for (int s = 0; s < 3; ++s) {
        const real g0 = g[s], g1 = g[3 + s], g2 = g[6 + s];
        gg[0][s] = g0;
        gg[1][s] = (real)0.5 * (g0 + g1 + g2);
        gg[2][s] = (real)0.5 * (g0 - g1 + g2);
        gg[3][s] = g2;
    }
    #pragma unroll
    for (int r = 0; r < 4; ++r) {  // (G g) G^T: 4 x 4
        const real a = gg[r][0], b = gg[r][1], d = gg[r][2];
        const real row[4] = {a, (real)0.5 * (a + b + d), (real)0.5 * (a - b + d), d};
        #pragma unroll
        for (int s = 0; s < 4; ++s)
            u[((INDEX)(r * 4 + s) * C_IN + c) * K_OUT + k] = row[s];
    }
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
    __local real v_tile[16 * WBC * WBT];  // transformed patches, [xi][c][t]
    __local real u_tile[16 * WBC * WBK];  // transformed filters, [xi][c][k]

    real acc[16][WRK][WRT];
    #pragma unroll
    for (int xi = 0; xi < 16; ++xi)
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
            real d[4][4];
            if (tile < TILES && c0 + c < C_IN) {
                const int n = tile / TILES_IMG;
                const int rest = tile - n * TILES_IMG;
                const int th = rest / TILES_W;
                const int h0 = 2 * th - PAD_T;
                const int w0 = 2 * (rest - th * TILES_W) - PAD_L;
                const __global real* plane = x + ((INDEX)n * C_IN + c0 + c) * HW_IN;
                #pragma unroll
                for (int i = 0; i < 4; ++i)
                    #pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const int h = h0 + i, v = w0 + j;
                        d[i][j] = (h >= 0 && h < H_IN && v >= 0 && v < W_IN) ? plane[h * W_IN + v] : (real)0;
                    }
            } else {
                #pragma unroll
                for (int i = 0; i < 4; ++i)
                    #pragma unroll
                    for (int j = 0; j < 4; ++j)
                        d[i][j] = (real)0;
            }
            real m[4][4];  // B^T d
            #pragma unroll
            for (int j = 0; j < 4; ++j) {
                m[0][j] = d[0][j] - d[2][j];
                m[1][j] = d[1][j] + d[2][j];
                m[2][j] = d[2][j] - d[1][j];
                m[3][j] = d[1][j] - d[3][j];
            }
            #pragma unroll
            for (int i = 0; i < 4; ++i) {  // (B^T d) B
                __local real* to = v_tile + (i * 4 * WBC + c) * WBT + t;
                to[0 * WBC * WBT] = m[i][0] - m[i][2];
                to[1 * WBC * WBT] = m[i][1] + m[i][2];
                to[2 * WBC * WBT] = m[i][2] - m[i][1];
                to[3 * WBC * WBT] = m[i][1] - m[i][3];
            }
        }
        // The step's slice of U, k fastest (coalesced); zeros past the channels.
        for (int e = tid; e < 16 * WBC * WBK; e += WTHREADS) {
            const int k = e % WBK;
            const int rest = e / WBK;
            const int c = rest % WBC;
            const int xi = rest / WBC;
            u_tile[e] = (k0 + k < K_OUT && c0 + c < C_IN) ? u[((INDEX)xi * C_IN + c0 + c) * K_OUT + k0 + k]
                                                          : (real)0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        #pragma unroll
        for (int xi = 0; xi < 16; ++xi)
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

    // Output transform A^T M A, epilogue, store the tile's pixels that exist (P or Q may be odd).
    #pragma unroll
    for (int i = 0; i < WRK; ++i)
        #pragma unroll
        for (int j = 0; j < WRT; ++j) {
            const int k = k0 + tk + i * WDK;
            const int tile = tile0 + tt + j * WDT;
            if (k >= K_OUT || tile >= TILES) continue;
            real t0[4], t1[4];  // A^T M: 2 x 4
            #pragma unroll
            for (int s = 0; s < 4; ++s) {
                t0[s] = acc[s][i][j] + acc[4 + s][i][j] + acc[8 + s][i][j];
                t1[s] = acc[4 + s][i][j] - acc[8 + s][i][j] - acc[12 + s][i][j];
            }
            const int n = tile / TILES_IMG;
            const int rest = tile - n * TILES_IMG;
            const int th = rest / TILES_W;
            const int oh = 2 * th;
            const int ow = 2 * (rest - th * TILES_W);
            __global real* o = out + ((INDEX)n * K_OUT + k) * PQ + oh * Q_OUT + ow;
            o[0] = epilogue(t0[0] + t0[1] + t0[2], bias, k);
            if (ow + 1 < Q_OUT) o[1] = epilogue(t0[1] - t0[2] - t0[3], bias, k);
            if (oh + 1 < P_OUT) {
                o[Q_OUT] = epilogue(t1[0] + t1[1] + t1[2], bias, k);
                if (ow + 1 < Q_OUT) o[Q_OUT + 1] = epilogue(t1[1] - t1[2] - t1[3], bias, k);
            }
        }
}
#endif  // ALGO == 1
