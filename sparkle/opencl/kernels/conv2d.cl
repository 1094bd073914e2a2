// Sparkle's OpenCL conv2d. ALGO 0: an implicit GEMM, out[k, pixel] = sum_j w[k, j] * im2col[j, pixel], with the
// im2col gather fused into the loads of B (no im2col buffer exists); matmul is a 1x1 conv of a (1, K, 1, N)
// image. ALGO 1: Winograd F(m x m, 3x3), fused (winograd.cl); ALGO 2: Winograd as transforms around this file's
// GEMM, batched over the transformed points (winograd_gemm.cl); both appended by the generator. The generator
// (codegen.py) #defines the workload's shape; every tunable below has a safe default, so the template also
// builds with no tuning at all.

#define CAT(a, b) a##b
#define XCAT(a, b) CAT(a, b)
#ifdef SPARKLE_FP64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#define REAL_NAME double
#else
#define REAL_NAME float
#endif
typedef REAL_NAME real;
typedef XCAT(REAL_NAME, 4) real4;

// ---- workload (always defined by the generator) ----
// N_IMG C_IN H_IN W_IN K_OUT R_K S_K STRIDE_H STRIDE_W PAD_T PAD_L DIL_H DIL_W GROUPS P_OUT Q_OUT
// HAS_BIAS RELU POINTWISE INDEX
#define CG (C_IN / GROUPS)
#define KG (K_OUT / GROUPS)
#define RS (R_K * S_K)
#define KR (CG * RS)
#define HW_IN (H_IN * W_IN)
#define PQ (P_OUT * Q_OUT)
#define NPIX (N_IMG * PQ)

// ---- tunables ----
#ifndef ALGO          // 0: implicit GEMM; 1: fused Winograd; 2: Winograd around a batched GEMM (3x3, stride 1)
#define ALGO 0
#endif
#ifndef TM            // output channels per work-group tile
#define TM 32
#endif
#ifndef TN            // output pixels per work-group tile
#define TN 32
#endif
#ifndef TK            // reduction step per tile
#define TK 8
#endif
#ifndef WM            // output channels per work-item (register block rows)
#define WM 4
#endif
#ifndef WN            // output pixels per work-item (register block columns)
#define WN 4
#endif
#ifndef VW            // a work-item's rows/columns come in contiguous runs of VW (1: strided over the tile)
#define VW 1
#endif
#ifndef USE_LOCAL     // 1: stage A and B tiles in local memory (GPU shape); 0: read global memory directly (CPU shape)
#define USE_LOCAL 1
#endif
#ifndef VEC_A         // 4: float4 loads of weight rows (needs KR % 4 == 0 and TK % 4 == 0)
#define VEC_A 1
#endif
#ifndef VEC_B         // 4: float4 loads of pixels (needs POINTWISE, PQ % 4 == 0, TN % 4 == 0)
#define VEC_B 1
#endif
#ifndef VN            // CPU shape only: a work-item's pixels as vectors of VN (explicit SIMD; 1: scalars)
#define VN 1
#endif
// Split-K: the reduction cut into KSPLIT slices, each its own work-groups (fills a device that too few output
// tiles leave idle); reduce_slices adds the slices' partial sums in slice order: every run gives the same bits.
#ifndef KSPLIT        // reduction slices (1: no split)
#define KSPLIT 1
#endif

#define DM (TM / WM)
#define DN (TN / WN)
#define THREADS (DM * DN)
#define KTILES ((KR + TK - 1) / TK)
#define SLICE_TILES ((KTILES + KSPLIT - 1) / KSPLIT)  // reduction tiles per split-K slice
#define OUT_SIZE ((INDEX)N_IMG * K_OUT * PQ)

// Row i / column j of a work-item's register block inside the tile.
#define ROW_OF(i, ty) (((i) / VW) * (DM * VW) + (ty) * VW + (i) % VW)
#if !USE_LOCAL && VN > 1
#define COL_OF(j, tx) ((tx) * WN + (j))  // contiguous pixels, loaded as vectors
#else
#define COL_OF(j, tx) (((j) / VW) * (DN * VW) + (tx) * VW + (j) % VW)
#endif

// Offset of image pixel (n, p, q)'s top-left tap inside x, split as the image base and its window corner.
typedef struct { INDEX base; int h0; int w0; int valid; } pixel_t;

inline pixel_t pixel_at(int pixel, int group)
{
    pixel_t px;
    px.valid = pixel < NPIX;
    int p = px.valid ? pixel : 0;
    int n = p / PQ;
    int pq = p - n * PQ;
    int oh = pq / Q_OUT;
    int ow = pq - oh * Q_OUT;
    px.base = ((INDEX)n * C_IN + (INDEX)group * CG) * HW_IN;
    px.h0 = oh * STRIDE_H - PAD_T;
    px.w0 = ow * STRIDE_W - PAD_L;
#if POINTWISE
    px.base += pq;
#endif
    return px;
}

// im2col[j, pixel] read straight from x (zero where the tap falls into padding or outside the problem).
inline real load_b(__global const real* restrict x, pixel_t px, int j)
{
    if (!px.valid || j >= KR) return (real)0;
#if POINTWISE
    return x[px.base + (INDEX)j * HW_IN];
#else
    int c = j / RS;
    int rs = j - c * RS;
    int r = rs / S_K;
    int s = rs - r * S_K;
    int h = px.h0 + r * DIL_H;
    int v = px.w0 + s * DIL_W;
    if (h < 0 || h >= H_IN || v < 0 || v >= W_IN) return (real)0;
    return x[px.base + (INDEX)c * HW_IN + h * W_IN + v];
#endif
}

// Bias and ReLU on the way out; has_bias and relu are compile-time constants (the branches fold away).
inline real epilogue_of(real acc, __global const real* restrict bias, int k, int has_bias, int relu)
{
    if (has_bias) acc += bias[k];
    if (relu) acc = (acc > (real)0 || isnan(acc)) ? acc : (real)0;  // NaN propagates, as in the reference
    return acc;
}

inline real epilogue(real acc, __global const real* restrict bias, int k)
{
    return epilogue_of(acc, bias, k, HAS_BIAS, RELU);
}

#if ALGO != 1  // the GEMM: the whole of ALGO 0, the middle step of ALGO 2
__kernel __attribute__((reqd_work_group_size(DN, DM, 1)))
void conv2d(__global const real* restrict x, __global const real* restrict w,
            __global const real* restrict bias, __global real* restrict out)
{
    const int tx = get_local_id(0);
    const int ty = get_local_id(1);
    const int col0 = get_group_id(0) * TN;  // first pixel of the tile
    const int row0 = get_group_id(1) * TM;  // first output channel of the tile, inside the group
    const int group = get_group_id(2) / KSPLIT;
    const int slice = get_group_id(2) % KSPLIT;
    const int kt_begin = slice * SLICE_TILES;  // this slice's reduction tiles: [kt_begin, kt_end)
    const int kt_end = min(KTILES, kt_begin + SLICE_TILES);
    const __global real* wg = w + (INDEX)group * KG * KR;

    real acc[WM][WN];
    #pragma unroll
    for (int i = 0; i < WM; ++i)
        #pragma unroll
        for (int j = 0; j < WN; ++j)
            acc[i][j] = (real)0;

#if USE_LOCAL
    // ---- GPU shape: tiles staged in local memory, the next tile prefetched into registers ----
    const int tid = ty * DN + tx;
#define A_PAD (VW == 4 ? 4 : 1)
#define TMP (TM + A_PAD)
#define TNP (TN + (VW == 4 ? 4 : 0))
    __local real a_tile[TK * TMP] __attribute__((aligned(16)));  // transposed: a_tile[k][m]
    __local real b_tile[TK * TNP] __attribute__((aligned(16)));

    // A: TM x TK weights, VEC_A consecutive j per load, consecutive work-items along j (coalesced).
#define A_VECS_PER_ROW (TK / VEC_A)
#define A_LOADS ((TM * A_VECS_PER_ROW + THREADS - 1) / THREADS)
    // B: TK x TN gathered pixels; each work-item keeps fixed pixel columns so their geometry is computed once.
#define B_VCOLS (TN / VEC_B)
#define B_COLS_PER_ITEM ((B_VCOLS + THREADS - 1) / THREADS)
#define B_ROW_STEP (THREADS >= B_VCOLS ? THREADS / B_VCOLS : 1)
#define B_ROWS_PER_ITEM ((TK + B_ROW_STEP - 1) / B_ROW_STEP)
    const int b_first_row = THREADS >= B_VCOLS ? tid / B_VCOLS : 0;
    const int b_vcol = THREADS >= B_VCOLS ? tid % B_VCOLS : tid;

    pixel_t px[B_COLS_PER_ITEM];
    #pragma unroll
    for (int c = 0; c < B_COLS_PER_ITEM; ++c)
        px[c] = pixel_at(col0 + (b_vcol + c * THREADS) * VEC_B, group);

#if VEC_A == 4
    real4 a_reg[A_LOADS];
#else
    real a_reg[A_LOADS];
#endif
#if VEC_B == 4
    real4 b_reg[B_COLS_PER_ITEM][B_ROWS_PER_ITEM];
#else
    real b_reg[B_COLS_PER_ITEM][B_ROWS_PER_ITEM];
#endif

#define LOAD_TILE(k0)                                                                                   \
    _Pragma("unroll")                                                                               \
    for (int e = 0; e < A_LOADS; ++e) {                                                                 \
        int l = tid + e * THREADS;                                                                      \
        int m = l / A_VECS_PER_ROW;                                                                     \
        int j = (k0) + (l - m * A_VECS_PER_ROW) * VEC_A;                                                \
        bool ok = l < TM * A_VECS_PER_ROW && row0 + m < KG && j < KR;                                   \
        INDEX at = (INDEX)(row0 + m) * KR + j;                                                          \
        A_LOAD(e, ok, at);                                                                              \
    }                                                                                                   \
    _Pragma("unroll")                                                                               \
    for (int c = 0; c < B_COLS_PER_ITEM; ++c)                                                           \
        _Pragma("unroll")                                                                           \
        for (int e = 0; e < B_ROWS_PER_ITEM; ++e) {                                                     \
            int row = b_first_row + e * B_ROW_STEP;                                                     \
            B_LOAD(c, e, (k0) + row);                                                                   \
        }

#if VEC_A == 4
#define A_LOAD(e, ok, at) a_reg[e] = (ok) ? vload4(0, wg + (at)) : (real4)0
#else
#define A_LOAD(e, ok, at) a_reg[e] = (ok) ? wg[at] : (real)0
#endif
#if VEC_B == 4
#define B_LOAD(c, e, j) b_reg[c][e] = (px[c].valid && (j) < KR) ? vload4(0, x + px[c].base + (INDEX)(j) * HW_IN) : (real4)0
#else
#define B_LOAD(c, e, j) b_reg[c][e] = load_b(x, px[c], j)
#endif

    LOAD_TILE(kt_begin * TK)
    for (int kt = kt_begin; kt < kt_end; ++kt) {
        barrier(CLK_LOCAL_MEM_FENCE);  // everyone is done reading the previous tile
        #pragma unroll
        for (int e = 0; e < A_LOADS; ++e) {
            int l = tid + e * THREADS;
            if (l < TM * A_VECS_PER_ROW) {
                int m = l / A_VECS_PER_ROW;
                int k = (l - m * A_VECS_PER_ROW) * VEC_A;
#if VEC_A == 4
                a_tile[(k + 0) * TMP + m] = a_reg[e].x;
                a_tile[(k + 1) * TMP + m] = a_reg[e].y;
                a_tile[(k + 2) * TMP + m] = a_reg[e].z;
                a_tile[(k + 3) * TMP + m] = a_reg[e].w;
#else
                a_tile[k * TMP + m] = a_reg[e];
#endif
            }
        }
        #pragma unroll
        for (int c = 0; c < B_COLS_PER_ITEM; ++c)
            #pragma unroll
            for (int e = 0; e < B_ROWS_PER_ITEM; ++e) {
                int row = b_first_row + e * B_ROW_STEP;
                int vcol = b_vcol + c * THREADS;
                if (row < TK && vcol < B_VCOLS) {
#if VEC_B == 4
                    vstore4(b_reg[c][e], 0, b_tile + row * TNP + vcol * 4);
#else
                    b_tile[row * TNP + vcol] = b_reg[c][e];
#endif
                }
            }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (kt + 1 < kt_end) {
            LOAD_TILE((kt + 1) * TK)
        }
        #pragma unroll
        for (int k = 0; k < TK; ++k) {
            real a[WM], b[WN];
#if VW == 4
            #pragma unroll
            for (int i = 0; i < WM; i += 4) {
                real4 v = *(__local const real4*)(a_tile + k * TMP + ROW_OF(i, ty));
                a[i] = v.x; a[i + 1] = v.y; a[i + 2] = v.z; a[i + 3] = v.w;
            }
            #pragma unroll
            for (int j = 0; j < WN; j += 4) {
                real4 v = *(__local const real4*)(b_tile + k * TNP + COL_OF(j, tx));
                b[j] = v.x; b[j + 1] = v.y; b[j + 2] = v.z; b[j + 3] = v.w;
            }
#else
            #pragma unroll
            for (int i = 0; i < WM; ++i) a[i] = a_tile[k * TMP + ROW_OF(i, ty)];
            #pragma unroll
            for (int j = 0; j < WN; ++j) b[j] = b_tile[k * TNP + COL_OF(j, tx)];
#endif
            #pragma unroll
            for (int i = 0; i < WM; ++i)
                #pragma unroll
                for (int j = 0; j < WN; ++j)
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
    }
#else
    // ---- CPU shape: no local memory and no barriers; each work-item streams its rows and pixels ----
    pixel_t px[WN];
    #pragma unroll
    for (int j = 0; j < WN; ++j)
        px[j] = pixel_at(col0 + COL_OF(j, tx), group);
#if VN > 1
    typedef XCAT(REAL_NAME, VN) realv;
    realv accv[WM][WN / VN];
    #pragma unroll
    for (int i = 0; i < WM; ++i)
        #pragma unroll
        for (int v = 0; v < WN / VN; ++v)
            accv[i][v] = (realv)0;
    for (int kk = kt_begin * TK; kk < min(KR, kt_end * TK); ++kk) {
        real a[WM];
        #pragma unroll
        for (int i = 0; i < WM; ++i) {
            int row = row0 + ROW_OF(i, ty);
            a[i] = row < KG ? wg[(INDEX)row * KR + kk] : (real)0;
        }
        #pragma unroll
        for (int v = 0; v < WN / VN; ++v) {
            realv b;
#if POINTWISE && PQ % VN == 0
            // VN consecutive pixels of one image (runs start at multiples of VN): one contiguous load
            b = px[v * VN].valid ? XCAT(vload, VN)(0, x + px[v * VN].base + (INDEX)kk * HW_IN) : (realv)0;
#else
            real lanes[VN];
            #pragma unroll
            for (int l = 0; l < VN; ++l) lanes[l] = load_b(x, px[v * VN + l], kk);
            b = XCAT(vload, VN)(0, lanes);
#endif
            #pragma unroll
            for (int i = 0; i < WM; ++i)
                accv[i][v] = fma((realv)a[i], b, accv[i][v]);
        }
    }
    #pragma unroll
    for (int i = 0; i < WM; ++i)
        #pragma unroll
        for (int v = 0; v < WN / VN; ++v)
            XCAT(vstore, VN)(accv[i][v], 0, &acc[i][v * VN]);
#else
    for (int kk = kt_begin * TK; kk < min(KR, kt_end * TK); ++kk) {
        real a[WM], b[WN];
        #pragma unroll
        for (int i = 0; i < WM; ++i) {
            int row = row0 + ROW_OF(i, ty);
            a[i] = row < KG ? wg[(INDEX)row * KR + kk] : (real)0;
        }
        #pragma unroll
        for (int j = 0; j < WN; ++j) b[j] = load_b(x, px[j], kk);
        #pragma unroll
        for (int i = 0; i < WM; ++i)
            #pragma unroll
            for (int j = 0; j < WN; ++j)
                acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
#endif
#endif

    // ---- epilogue: bias, ReLU, store (out is N x K x P x Q; with KSPLIT > 1, KSPLIT such arrays of raw sums) ----
    #pragma unroll
    for (int j = 0; j < WN; ++j) {
        int pixel = col0 + COL_OF(j, tx);
        if (pixel >= NPIX) continue;
        int n = pixel / PQ;
        int pq = pixel - n * PQ;
        #pragma unroll
        for (int i = 0; i < WM; ++i) {
            int row = row0 + ROW_OF(i, ty);
            if (row >= KG) continue;
            int k = group * KG + row;
#if KSPLIT > 1
            out[slice * OUT_SIZE + ((INDEX)n * K_OUT + k) * PQ + pq] = acc[i][j];  // a slice's partial sum
#else
            out[((INDEX)n * K_OUT + k) * PQ + pq] = epilogue(acc[i][j], bias, k);
#endif
        }
    }
}

#if KSPLIT > 1
// Split-K's second kernel: out = epilogue(partial[0] + partial[1] + ... + partial[KSPLIT - 1]), in that order.
__kernel void reduce_slices(__global const real* restrict partial, __global const real* restrict bias,
                            __global real* restrict out)
{
    const INDEX at = get_global_id(0);
    if (at >= OUT_SIZE) return;
    real sum = partial[at];
    #pragma unroll
    for (int s = 1; s < KSPLIT; ++s)
        sum += partial[s * OUT_SIZE + at];
    const int k = (int)((at / PQ) % K_OUT);
    out[at] = epilogue(sum, bias, k);
}
#endif
#endif  // ALGO != 1
