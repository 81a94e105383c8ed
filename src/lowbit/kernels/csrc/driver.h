/* lowbit CPU kernels: the entry points, shared by every ISA file (included last).
 *
 * The including file defines:
 *   LB_ISA_NAME              its name ("avx512", "avx2", "portable")
 *   TILE_M0                  activation rows of its widest tile (slots: TILE_M0, /2, /4, 1)
 *   QUANT_ACT, QUANT_I8      its activation quantizers (signatures of quant_act_c, quant_rows_i8_c)
 *   tiles_b8/b4/b2, tiles_a8 static const tile_fn[4], one per slot
 *   LB_OWN_DWCONV            if it defines lb_dwconv_a8 itself
 */

int lb_abi_version(void) { return LB_ABI; }
const char* lb_isa(void) { return LB_ISA_NAME; }

/* Activation rows per pass over the weights: their quantized copy (MC x K x 2 bytes at most)
 * stays in L2. */
#define MC 64

/* A tile's scales and zero points are one contiguous run each (row-block-major): prefetch the
 * next tile's while this one computes, so weights that are not in cache do not stall on them. */
static void prefetch_params(const wdesc* d, int64_t rb) {
    if (d->ldsw == 0) return;
    const int esz = d->s32 ? 4 : 2;
    const char* s = (const char*)d->sw + rb * d->ldsrb * esz;
    for (int64_t i = 0; i < d->ldsrb * esz; i += 64) __builtin_prefetch(s + i);
    if (d->zf)
        for (int64_t i = 0; i < d->ldsrb * 2; i += 64) __builtin_prefetch((const char*)(d->zf + rb * d->ldsrb) + i);
    if (d->zw)
        for (int64_t i = 0; i < d->ldzrb; i += 64) __builtin_prefetch(d->zw + rb * d->ldzrb + i);
}

/* Activation rows m .. m1-1 of output row block rb, widest tiles first: t[0..3] take TILE_M0,
 * TILE_M0/2, TILE_M0/4 and 1 rows. */
INLINE void tile_rows(const wdesc* d, int64_t rb, int64_t m, int64_t m1, const tile_fn* t, const void* qx,
                      int64_t ldq, const float* sx, const int32_t* sumx, int64_t nb, float* y) {
    const int m0s = TILE_M0, m1s = TILE_M0 / 2, m2s = TILE_M0 / 4 > 0 ? TILE_M0 / 4 : 1;
    for (; m + m0s <= m1; m += m0s) t[0](d, rb, m, qx, ldq, sx, sumx, nb, y);
    if (m + m1s <= m1) { t[1](d, rb, m, qx, ldq, sx, sumx, nb, y); m += m1s; }
    if (m + m2s <= m1) { t[2](d, rb, m, qx, ldq, sx, sumx, nb, y); m += m2s; }
    for (; m < m1; m++) t[3](d, rb, m, qx, ldq, sx, sumx, nb, y);
}

/* y (M, N) by tiles: t[0..3] handle TILE_M0, TILE_M0/2, TILE_M0/4 and 1 activation rows; nb is
 * sx/sumx's row stride. Threads split the 16-row blocks of the output. */
static void run_tiles(const wdesc* d, int64_t M, const tile_fn t[4], const void* qx, int64_t ldq, const float* sx,
                      const int32_t* sumx, int64_t nb, float* y, int nthreads) {
    const int64_t nrb = (d->N + 15) / 16;
    /* Small products do not pay for waking a second thread (decode-size layers do). */
    if (M * d->N * d->K < (1 << 16)) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    for (int64_t mb = 0; mb < M; mb += MC) {
        const int64_t m1 = mb + MC < M ? mb + MC : M;
#pragma omp for schedule(static) nowait
        for (int64_t rb = 0; rb < nrb; rb++) {
            if (mb == 0 && rb + 1 < nrb) prefetch_params(d, rb + 1);
            tile_rows(d, rb, mb, m1, t, qx, ldq, sx, sumx, nb, y);
        }
    }
}

/* y (M, N) float32 = x (M, K) float32 @ dequant(W)^T + bias, W in the tiled layout.
 * Returns 0; -1 for a descriptor the kernel cannot run; -2 when out of memory; -3 when x holds
 * NaN or inf (the caller runs the float reference, which propagates them). */
int lb_linear(const wdesc* d, const float* x, int64_t M, float* y, int nthreads) {
    const int B = d->B, bits = d->bits;
    if (B < 32 || B > 256 || B % 32 || !(bits == 2 || bits == 4 || bits == 8)) return -1;
    if (d->G < d->K && d->G % B) return -1;
    if (!all_finite(x, M * d->K)) return -3;
    const int64_t nb = (d->K + B - 1) / B, ldq = nb * B;
    int16_t* qx = (int16_t*)aligned_alloc(64, (size_t)((M * ldq * 2 + 63) / 64 * 64));
    float* sx = (float*)malloc(sizeof(float) * (size_t)(M * nb));
    int32_t* sumx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M * nb));
    if (!qx || !sx || !sumx) { free(qx); free(sx); free(sumx); return -2; }
    QUANT_ACT(x, M, d->K, B, qx, sx, sumx, nthreads);
    run_tiles(d, M, bits == 8 ? tiles_b8 : bits == 4 ? tiles_b4 : tiles_b2, qx, ldq, sx, sumx, nb, y, nthreads);
    free(qx); free(sx); free(sumx);
    return 0;
}

/* Several weights on one input (a decoder's q/k/v or gate/up projections): ys[i] (M, N_i) =
 * x (M, K) @ dequant(W_i)^T + bias_i, in one call: the activations are quantized once and one
 * thread team splits the 16-row blocks of all the outputs. Every W_i has the same K, bits-agnostic
 * but the same activation block B. Returns 0, -1 for descriptors it cannot run, -2 out of memory,
 * -3 for a NaN or inf in x. */
int lb_linear_many(const wdesc* const* ds, int nd, const float* x, int64_t M, float* const* ys, int nthreads) {
    if (nd <= 0) return 0;
    const int B = ds[0]->B;
    const int64_t K = ds[0]->K;
    int64_t total = 0;
    for (int i = 0; i < nd; i++) {
        const wdesc* d = ds[i];
        if (d->K != K || d->B != B || B < 32 || B > 256 || B % 32) return -1;
        if (!(d->bits == 2 || d->bits == 4 || d->bits == 8) || (d->G < d->K && d->G % B)) return -1;
        total += (d->N + 15) / 16;
    }
    if (!all_finite(x, M * K)) return -3;
    const int64_t nb = (K + B - 1) / B, ldq = nb * B;
    int16_t* qx = (int16_t*)aligned_alloc(64, (size_t)((M * ldq * 2 + 63) / 64 * 64));
    float* sx = (float*)malloc(sizeof(float) * (size_t)(M * nb));
    int32_t* sumx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M * nb));
    if (!qx || !sx || !sumx) { free(qx); free(sx); free(sumx); return -2; }
    QUANT_ACT(x, M, K, B, qx, sx, sumx, nthreads);
    if (M * total * 16 * K < (1 << 16)) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < total; j++) {
        int i = 0;
        int64_t rb = j;
        while (rb >= (ds[i]->N + 15) / 16) rb -= (ds[i++]->N + 15) / 16;
        const wdesc* d = ds[i];
        const tile_fn* t = d->bits == 8 ? tiles_b8 : d->bits == 4 ? tiles_b4 : tiles_b2;
        if (rb + 1 < (d->N + 15) / 16) prefetch_params(d, rb + 1);
        tile_rows(d, rb, 0, M, t, qx, ldq, sx, sumx, nb, ys[i]);
    }
    free(qx); free(sx); free(sumx);
    return 0;
}

/* y (M, N) float32 = quant_i8(x) @ dequant(W)^T + bias, for 8-bit weights in the tiled4 layout.
 * static_scale > 0: the activations' calibrated scale (one per tensor); else dynamic scales per
 * row, or per row and block of d->A columns.
 * Returns 0, -1 for a descriptor the kernel cannot run, -2 when out of memory, -3 for a NaN or
 * inf in x. */
int lb_linear_a8(const wdesc* d, const float* x, int64_t M, float* y, float static_scale, int nthreads) {
    if (d->bits != 8) return -1;
    const int64_t K = d->K;
    const int64_t G = d->G < K ? d->G : K;
    const int64_t A = (static_scale > 0.0f || d->A <= 0 || d->A >= K) ? K : d->A;
    const int64_t S = A < G ? A : G;
    if (S < K && (S % 4 || (A < K && G < K && (A > G ? A % G : G % A)))) return -1;
    if (S > (1 << 14)) return -1; /* int32 lanes: keep segments below 2^14 columns */
    if (A < K && static_scale > 0.0f) return -1;
    const int64_t ns = (K + S - 1) / S;
    const int64_t ldq = (K + 63) / 64 * 64;
    if (!all_finite(x, M * K)) return -3;
    int8_t* qx = (int8_t*)aligned_alloc(64, (size_t)(M * ldq));
    float* sx = (float*)malloc(sizeof(float) * (size_t)(M * ns));
    int32_t* sumx = (int32_t*)malloc(sizeof(int32_t) * (size_t)(M * ns));
    if (!qx || !sx || !sumx) { free(qx); free(sx); free(sumx); return -2; }
    QUANT_I8(x, M, K, ldq, S, ns, A, static_scale, qx, sx, sumx, nthreads);
    run_tiles(d, M, tiles_a8, qx, ldq, sx, sumx, ns, y, nthreads);
    free(qx); free(sx); free(sumx);
    return 0;
}

#ifndef LB_OWN_DWCONV
/* Depthwise convolution (one filter per channel) with static int8 activations:
 *
 *   q[b, h, w, c]  = clamp(rint(x[b, c, h, w] / s) + z, -127, 127) - z      (int16, NHWC)
 *   y[b, i, j, c]  = bias[c] + s * ws[c] * sum_{kh, kw} q[b, i*sh - ph + kh, j*sw - pw + kw, c] * w[kh, kw, c]
 *
 * x is read through element strides (xs: batch, channel, row, column), so NCHW and channels-last
 * inputs both work; padding positions hold 0.0, whose code is z, so they add nothing. w: the
 * weight codes minus their zero point, int32 (KH*KW, C); ws: per-channel weight scales (C,).
 * Products |q * w| <= 254 * 255 and at most KH*KW of them per output: exact in int32.
 * y: (B, OH, OW, C) float32. Plain loops over channels (contiguous), which the compiler
 * vectorises. Threads: OpenMP over (batch, row). Returns 0, or -2 out of memory. */
int lb_dwconv_a8(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, const int64_t* xs,
                 const int32_t* w, const float* ws, const float* bias, int32_t KH, int32_t KW,
                 int32_t sh, int32_t sw, int32_t ph, int32_t pw, float s, int32_t z,
                 float* y, int64_t OH, int64_t OW, int nthreads) {
    int16_t* q = (int16_t*)malloc(sizeof(int16_t) * (size_t)(B * H * W * C) + 64);
    float* f = (float*)malloc(sizeof(float) * (size_t)C);
    int32_t* accs = (int32_t*)malloc(sizeof(int32_t) * (size_t)(C * (nthreads > 0 ? nthreads : 1)));
    if (!q || !f || !accs) { free(q); free(f); free(accs); return -2; }
    const float inv = 1.0f / s;
    for (int64_t c = 0; c < C; c++) f[c] = s * ws[c];
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            const float* xr = x + b * xs[0] + h * xs[2];
            int16_t* qr = q + bh * W * C;
            for (int64_t j = 0; j < W; j++) {
                int16_t* qp = qr + j * C;
                const float* xp = xr + j * xs[3];
                const int64_t cs = xs[1];
                for (int64_t c = 0; c < C; c++) {
                    float v = rintf(xp[c * cs] * inv) + (float)z;
                    v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                    qp[c] = (int16_t)((int32_t)v - z);
                }
            }
        }
        int32_t* acc = accs + (int64_t)thread_num() * C;
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * OH; bi++) {
            const int64_t b = bi / OH, i = bi % OH;
            for (int64_t j = 0; j < OW; j++) {
                float* yp = y + (bi * OW + j) * C;
                for (int64_t c = 0; c < C; c++) acc[c] = 0;
                for (int32_t kh = 0; kh < KH; kh++) {
                    const int64_t r = i * sh - ph + kh;
                    if (r < 0 || r >= H) continue;
                    for (int32_t kw = 0; kw < KW; kw++) {
                        const int64_t col = j * sw - pw + kw;
                        if (col < 0 || col >= W) continue;
                        const int16_t* qp = q + ((b * H + r) * W + col) * C;
                        const int32_t* wp = w + (kh * KW + kw) * C;
                        for (int64_t c = 0; c < C; c++) acc[c] += (int32_t)qp[c] * wp[c];
                    }
                }
                for (int64_t c = 0; c < C; c++) yp[c] = (float)acc[c] * f[c] + (bias ? bias[c] : 0.0f);
            }
        }
    }
    free(q); free(f); free(accs);
    return 0;
}
#endif

/* ==== Any stored format, row layout: the fallback that is not a trap ============================
 *
 * Weights exactly as lowbit stores them (packing.py row layout; 2, 3, 4 or 8-bit codes) for every
 * format the fast tiles do not take: int3, NF4 and other codebooks, FP8, fractional (HQQ) zero
 * points, any group size, float16 or float32 scales:
 *
 *   w[n, k] = s[n, g] * (v[code[n, k]] - z[n, g]),   g = k / G,    y = x @ w^T + bias
 *
 * v: the format's value table (codes themselves for integers: lut NULL), z: zero point (integer
 * codes, float16 fractional values, or the constant zconst). One output row at a time: it is
 * dequantized once into a float buffer (in L1), then each of the M inputs takes a float dot
 * product with it (16 partial sums, which the compiler vectorises). Float arithmetic
 * throughout: no activation rounding.
 */
typedef struct {
    const uint8_t* w;     /* (N, ldw) packed rows */
    int64_t ldw;
    int32_t bits;         /* 2, 3, 4, 8 */
    const float* lut;     /* (2^bits,) values of the codes, or NULL: the codes themselves */
    const void* sw;       /* scales (N, lds) float16 or float32 (s32); lds = 0: one for the tensor */
    int64_t lds;
    int32_t s32;
    int32_t ztype;        /* 0: the constant zconst; 1: packed integer codes; 2: float16 values */
    const void* zw;       /* zero points (N, ldz): bytes for ztype 1, float16 for 2 */
    int64_t ldz;
    int32_t zconst;
    int64_t N, K, G;      /* rows, columns, group size (>= K: one group per row) */
    const float* bias;    /* (N,) or NULL */
    int32_t e4m3;         /* the table is FP8 E4M3 (torch.float8_e4m3fn): kernels may decode arithmetically */
} rdesc;

/* Row n's codes, decoded to their values v (not scaled), into out[0 .. K). Integer formats
 * (lut NULL) convert codes directly, which the compiler vectorises; tables are looked up. */
#define DECODE_LOOPS(VAL)                                                                         \
    if (d->bits == 8) {                                                                           \
        for (int64_t k = 0; k < K; k++) { const unsigned c = p[k]; out[k] = VAL; }                \
    } else if (d->bits == 4) {                                                                    \
        for (int64_t j = 0; j < K / 2; j++) {                                                     \
            unsigned c = p[j] & 15u; out[2 * j] = VAL;                                            \
            c = p[j] >> 4; out[2 * j + 1] = VAL;                                                  \
        }                                                                                         \
        if (K % 2) { const unsigned c = p[K / 2] & 15u; out[K - 1] = VAL; }                       \
    } else if (d->bits == 2) {                                                                    \
        for (int64_t j = 0; j < K / 4; j++)                                                       \
            for (int i = 0; i < 4; i++) { const unsigned c = (p[j] >> (2 * i)) & 3u; out[4 * j + i] = VAL; } \
        for (int64_t k = K / 4 * 4; k < K; k++) { const unsigned c = (p[k / 4] >> (2 * (k % 4))) & 3u; out[k] = VAL; } \
    } else { /* 3 bits: 8 codes per 3-byte little-endian word */                                 \
        for (int64_t j = 0; j * 8 < K; j++) {                                                     \
            const uint32_t word = p[3 * j] | (uint32_t)p[3 * j + 1] << 8 | (uint32_t)p[3 * j + 2] << 16; \
            const int64_t e = K - j * 8 < 8 ? K - j * 8 : 8;                                      \
            for (int64_t i = 0; i < e; i++) { const unsigned c = (word >> (3 * i)) & 7u; out[j * 8 + i] = VAL; } \
        }                                                                                         \
    }

/* 4-bit tables: every byte's two values, pairs[2 b] and pairs[2 b + 1] (one lookup per byte). */
static void make_pairs(const rdesc* d, float* pairs) {
    for (int b = 0; b < 256; b++) {
        pairs[2 * b] = d->lut[b & 15];
        pairs[2 * b + 1] = d->lut[b >> 4];
    }
}

static void decode_row(const rdesc* d, int64_t n, float* out, const float* pairs) {
    const uint8_t* p = d->w + n * d->ldw;
    const int64_t K = d->K;
    const float* lut = d->lut;
    if (pairs) { /* a 4-bit table */
        for (int64_t j = 0; j < K / 2; j++) memcpy(out + 2 * j, pairs + 2 * p[j], 2 * sizeof(float));
        if (K % 2) out[K - 1] = lut[p[K / 2] & 15];
    } else if (lut) {
        DECODE_LOOPS(lut[c])
    } else {
        DECODE_LOOPS((float)c)
    }
}

INLINE float rscale(const rdesc* d, int64_t n, int64_t g) {
    if (d->lds == 0) return d->s32 ? ((const float*)d->sw)[0] : half_to_float(((const uint16_t*)d->sw)[0]);
    const int64_t i = n * d->lds + g;
    return d->s32 ? ((const float*)d->sw)[i] : half_to_float(((const uint16_t*)d->sw)[i]);
}

INLINE float rzero(const rdesc* d, int64_t n, int64_t g) {
    if (d->ztype == 0) return (float)d->zconst;
    const int64_t row = d->lds == 0 ? 0 : n, gi = d->lds == 0 ? 0 : g;
    if (d->ztype == 2) return half_to_float(((const uint16_t*)d->zw)[row * d->ldz + gi]);
    const uint8_t* p = (const uint8_t*)d->zw + row * d->ldz;
    const int per = 8 / d->bits; /* integer zeros: 2, 4 or 8 bits (3-bit zeros: 8 per 3 bytes) */
    if (d->bits == 3) {
        const int64_t j = gi / 8;
        const uint32_t word = p[3 * j] | (uint32_t)p[3 * j + 1] << 8 | (uint32_t)p[3 * j + 2] << 16;
        return (float)((word >> (3 * (gi % 8))) & 7);
    }
    return (float)((p[gi / per] >> (d->bits * (gi % per))) & ((1 << d->bits) - 1));
}

/* sum_k a[k] b[k] with 16 partial sums (a fixed order, so results do not depend on threads). */
INLINE float dot16(const float* a, const float* b, int64_t n) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[k + j] * b[k + j];
    float s = 0.0f;
    for (; k < n; k++) s += a[k] * b[k];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

/* Row n of dequant(W), float32, into out[0 .. K): decode, then (v - z) * s per group. */
static void dequant_row(const rdesc* d, int64_t n, float* out, const float* pairs) {
    const int64_t K = d->K, G = d->G < d->K ? d->G : d->K;
    decode_row(d, n, out, pairs);
    for (int64_t g = 0; g * G < K; g++) {
        const float s = rscale(d, n, g), z = rzero(d, n, g);
        const int64_t k1 = (g + 1) * G < K ? (g + 1) * G : K;
        for (int64_t k = g * G; k < k1; k++) out[k] = (out[k] - z) * s;
    }
}

/* Code k of a packed row (tails and plain C). */
INLINE unsigned code_at(const uint8_t* p, int bits, int64_t k) {
    if (bits == 8) return p[k];
    if (bits == 4) return (p[k / 2] >> (4 * (k & 1))) & 15u;
    if (bits == 2) return (p[k / 4] >> (2 * (k & 3))) & 3u;
    const uint8_t* q = p + 3 * (k / 8);
    return ((q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16) >> (3 * (k % 8))) & 7u;
}

/* Row setup shared by the vector row kernels (rows_avx2.h, and the plain C ones below): the row's
 * scales and zero points through PARAMS into scratch; groups not a multiple of 8 wide return 0
 * (the caller runs dequant_row). */
#define ROW_SETUP(PARAMS)                                                                       \
    const int64_t K = d->K, G = d->G < d->K ? d->G : d->K, ng = (K + G - 1) / G;                \
    if (G % 8 && G < K) return 0;                                                               \
    float* sb = scratch;                                                                        \
    float* zb = sb + ng;                                                                        \
    PARAMS(d, n, ng, sb, zb);                                                                   \
    const uint8_t* p = d->w + n * d->ldw;                                                       \
    const int bits = d->bits;                                                                   \
    const float* lut = d->lut;

#ifdef LB_ROWS_AVX2
#include "rows_avx2.h" /* row_dequant_vec, row_dot1_vec, row_dot: AVX2 versions */
#else
/* Plain C (portable.c), the same steps as rows_avx2.h in GCC/Clang vector extensions, which
 * the compiler lowers to the target's SIMD (NEON, SSE, AVX ...): per group, 8 codes at a time
 * from one little-endian word (2, 3, 4 bits) or 8 bytes, w = (v - z) * s with the row's s and z
 * read first. */
#define row_dot dot16
#pragma GCC diagnostic ignored "-Wpsabi" /* vectors passed between inlined helpers only */
typedef float lb_v8f __attribute__((vector_size(32)));
typedef uint32_t lb_v8u __attribute__((vector_size(32)));
typedef uint8_t lb_v8b __attribute__((vector_size(8)));

static void row_params_c(const rdesc* d, int64_t n, int64_t ng, float* sb, float* zb) {
#ifdef __FLT16_MAX__ /* the compiler has a half type (x86 SSE2+, ARM): a loop it vectorises */
    if (d->lds && !d->s32) {
        const _Float16* h = (const _Float16*)d->sw + n * d->lds;
        for (int64_t g = 0; g < ng; g++) sb[g] = (float)h[g];
    } else
#endif
        for (int64_t g = 0; g < ng; g++) sb[g] = rscale(d, n, g);
    if (d->ztype == 0)
        for (int64_t g = 0; g < ng; g++) zb[g] = (float)d->zconst;
    else
        for (int64_t g = 0; g < ng; g++) zb[g] = rzero(d, n, g);
}

INLINE lb_v8u codes8_c(const uint8_t* p, int bits, int64_t k) {
    if (bits == 8) {
        lb_v8b b;
        memcpy(&b, p + k, 8);
        return __builtin_convertvector(b, lb_v8u);
    }
    const uint8_t* q = p + k * bits / 8;
    uint32_t w;
    if (bits == 4) memcpy(&w, q, 4);
    else if (bits == 3) w = q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16;
    else { uint16_t h; memcpy(&h, q, 2); w = h; }
    const uint32_t b = (uint32_t)bits, m = (1u << bits) - 1;
    const lb_v8u sh = {0, b, 2 * b, 3 * b, 4 * b, 5 * b, 6 * b, 7 * b};
    return ((lb_v8u){w, w, w, w, w, w, w, w} >> sh) & m;
}

INLINE lb_v8f values8_c(lb_v8u c, const float* lut, int bits) {
    if (!lut) return __builtin_convertvector(c, lb_v8f);
#if defined(__GNUC__) && !defined(__clang__)
    if (bits == 4) { /* a 16-entry table: one two-register shuffle (vpermps + blend, NEON tbl) */
        lb_v8f lo, hi;
        memcpy(&lo, lut, sizeof lo);
        memcpy(&hi, lut + 8, sizeof hi);
        return __builtin_shuffle(lo, hi, c);
    }
#else
    (void)bits;
#endif
    return (lb_v8f){lut[c[0]], lut[c[1]], lut[c[2]], lut[c[3]], lut[c[4]], lut[c[5]], lut[c[6]], lut[c[7]]};
}

/* USE8(k, w): the 8 values w (lb_v8f) of columns k ..; USE1(k, wv): one value (the tail). */
#define ROWC_GROUPS(BITS, USE8, USE1)                                                           \
    for (int64_t g = 0, k = 0; k < K; g++) {                                                    \
        const int64_t k1 = k + G < K ? k + G : K;                                               \
        const float s = sb[g], z = zb[g];                                                       \
        for (; k + 8 <= k1; k += 8) {                                                           \
            const lb_v8f w = (values8_c(codes8_c(p, BITS, k), lut, BITS) - z) * s;                   \
            USE8(k, w);                                                                         \
        }                                                                                       \
        for (; k < k1; k++) {                                                                   \
            const unsigned c = code_at(p, BITS, k);                                             \
            USE1(k, ((lut ? lut[c] : (float)c) - z) * s);                                       \
        }                                                                                       \
    }

#define ROWC_FORMATS(USE8, USE1)                                                                \
    switch (bits) {                                                                             \
    case 8: ROWC_GROUPS(8, USE8, USE1) break;                                                   \
    case 4: ROWC_GROUPS(4, USE8, USE1) break;                                                   \
    case 3: ROWC_GROUPS(3, USE8, USE1) break;                                                   \
    default: ROWC_GROUPS(2, USE8, USE1) break;                                                  \
    }

static int row_dequant_vec(const rdesc* d, int64_t n, float* out, float* scratch) {
    ROW_SETUP(row_params_c)
#define ROWC_STORE8(k, w) memcpy(out + (k), &(w), sizeof(lb_v8f))
#define ROWC_STORE1(k, wv) out[k] = (wv)
    ROWC_FORMATS(ROWC_STORE8, ROWC_STORE1)
    return 1;
}

static int row_dot1_vec(const rdesc* d, int64_t n, const float* x, float* scratch, float* y) {
    ROW_SETUP(row_params_c)
    lb_v8f acc = {0, 0, 0, 0, 0, 0, 0, 0}, xv;
    float rest = 0.0f;
#define ROWC_DOT8(k, w) (memcpy(&xv, x + (k), sizeof xv), acc += (w) * xv)
#define ROWC_DOT1(k, wv) rest += (wv) * x[k]
    ROWC_FORMATS(ROWC_DOT8, ROWC_DOT1)
    for (int i = 0; i < 8; i++) rest += acc[i];
    *y = rest;
    return 1;
}

#endif

/* The row kernels' entry points: the vector versions, or the plain path for odd groups. */
static void row_dequant(const rdesc* d, int64_t n, float* out, float* scratch, const float* pairs) {
    if (!row_dequant_vec(d, n, out, scratch)) dequant_row(d, n, out, pairs);
}

static float row_dot1(const rdesc* d, int64_t n, const float* x, const float* pairs, float* buf, float* scratch) {
    float y;
    if (row_dot1_vec(d, n, x, scratch, &y)) return y;
    dequant_row(d, n, buf, pairs);
    return row_dot(buf, x, d->K);
}

/* y (M, N) = x (M, K) @ dequant(W)^T + bias for any format (above): each weight row is
 * dequantized once into a per-thread buffer (in L1), then dotted with each of the M inputs.
 * Returns 0, -1 for a bad descriptor, -2 out of memory. */
int lb_linear_rows(const rdesc* d, const float* x, int64_t M, float* y, int nthreads) {
    if (!(d->bits == 2 || d->bits == 3 || d->bits == 4 || d->bits == 8) || d->G <= 0) return -1;
    const int64_t K = d->K, N = d->N, G = d->G < K ? d->G : K, per = K + 2 * ((K + G - 1) / G) + 16;
    if (M * N * K < (1 << 16)) nthreads = 1;
    float* bufs = (float*)malloc(sizeof(float) * (size_t)(per * (nthreads > 0 ? nthreads : 1)));
    float pairs[512];
    const float* pp = d->lut && d->bits == 4 ? pairs : NULL;
    if (pp) make_pairs(d, pairs);
    if (!bufs) return -2;
#pragma omp parallel num_threads(nthreads)
    {
        float* w = bufs + (int64_t)thread_num() * per;
        float* scratch = w + K;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const float b = d->bias ? d->bias[n] : 0.0f;
            if (M == 1) {
                y[n] = b + row_dot1(d, n, x, pp, w, scratch);
                continue;
            }
            row_dequant(d, n, w, scratch, pp);
            for (int64_t m = 0; m < M; m++) y[m * N + n] = b + row_dot(w, x + m * K, K);
        }
    }
    free(bufs);
    return 0;
}

/* Rows n0 .. n1-1 of dequant(W), float32, into out (n1 - n0, K): for large batches, whose
 * float GEMM (torch) then amortises the decoding over the batch, a tile of rows at a time.
 * Returns 0, -1 for a bad descriptor, -2 out of memory. */
int lb_dequant_rows(const rdesc* d, int64_t n0, int64_t n1, float* out, int nthreads) {
    if (!(d->bits == 2 || d->bits == 3 || d->bits == 4 || d->bits == 8) || d->G <= 0) return -1;
    const int64_t K = d->K, G = d->G < K ? d->G : K, per = 2 * ((K + G - 1) / G) + 16;
    float* scratch = (float*)malloc(sizeof(float) * (size_t)(per * (nthreads > 0 ? nthreads : 1)));
    float pairs[512];
    const float* pp = d->lut && d->bits == 4 ? pairs : NULL;
    if (pp) make_pairs(d, pairs);
    if (!scratch) return -2;
#pragma omp parallel num_threads(nthreads)
    {
        float* mine = scratch + thread_num() * per;
#pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) row_dequant(d, n, out + (n - n0) * K, mine, pp);
    }
    free(scratch);
    return 0;
}

/* ==== One Llama-family decoder layer, one new token (batch-1 decode) ==============================
 *
 * x (hidden,) is updated in place, as transformers' LlamaDecoderLayer does for one position p:
 *   h = rmsnorm(x) * w1;  [q k v] = h @ [Wq Wk Wv]^T;  q, k rotated (RoFormer, half-rotation form)
 *   K[:, p] = k;  V[:, p] = v;  a_j = softmax(q_j . K_g[:, :p+1] * scale) V_g   (g = j / (H / Hkv))
 *   x += a @ Wo^T;  h = rmsnorm(x) * w2;  [g u] = h @ [Wg Wu]^T;  x += (silu(g) * u) @ Wd^T
 * rmsnorm(v) = v / sqrt(mean(v^2) + eps). The projections run on the tiled kernels (one call for
 * q/k/v and one for gate/up, as lb_linear_many); everything between them is plain C here, so a
 * layer costs one call from Python. Caches: float32 (Hkv, length, hd) per layer.
 */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, length;
    const float* norm1;
    const float* norm2;
    float eps, scale;
    const wdesc* qkv[3];
    const wdesc* o;
    const wdesc* gate_up[2];
    const wdesc* down;
    float* kcache;
    float* vcache;
    const float* cos;     /* (length, hd) */
    const float* sin;
} layer_desc;

static void rmsnorm(const float* x, const float* w, float eps, int64_t n, float* out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

static void rope(float* v, const float* cos, const float* sin, int64_t hd) {
    const int64_t h = hd / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* scratch: at least hidden + (H + 2 Hkv) hd + H hd + 2 inter + inter + length + hidden floats.
 * Returns 0, -1 for a bad position, -2 out of memory, -3 (x unchanged) when a projection's input
 * holds NaN or inf: the caller runs the layer in float. */
int lb_decode_layer(const layer_desc* L, float* x, int64_t pos, float* scratch, int nthreads) {
    const int64_t D = L->hidden, H = L->heads, Hk = L->kv_heads, hd = L->head_dim, I = L->inter, T = pos + 1;
    if (pos < 0 || pos >= L->length || H % Hk) return -1;
    float* h = scratch;
    float* qkv = h + D;
    float* att = qkv + (H + 2 * Hk) * hd;
    float* gu = att + H * hd;
    float* mid = gu + 2 * I;
    float* sc = mid + I;
    float* x0 = sc + L->length; /* x as it came, put back if a projection refuses */
    float* ys[3];
    int rc;
    memcpy(x0, x, sizeof(float) * D);
    rmsnorm(x, L->norm1, L->eps, D, h);
    ys[0] = qkv; ys[1] = qkv + H * hd; ys[2] = qkv + (H + Hk) * hd;
    if ((rc = lb_linear_many(L->qkv, 3, h, 1, ys, nthreads))) goto refused;
    const float* c = L->cos + pos * hd;
    const float* s = L->sin + pos * hd;
    for (int64_t j = 0; j < H + Hk; j++) rope(qkv + j * hd, c, s, hd);
    for (int64_t g = 0; g < Hk; g++) {
        memcpy(L->kcache + (g * L->length + pos) * hd, qkv + (H + g) * hd, sizeof(float) * hd);
        memcpy(L->vcache + (g * L->length + pos) * hd, qkv + (H + Hk + g) * hd, sizeof(float) * hd);
    }
    for (int64_t j = 0; j < H; j++) {
        const int64_t g = j / (H / Hk);
        const float* q = qkv + j * hd;
        const float* K = L->kcache + g * L->length * hd;
        const float* V = L->vcache + g * L->length * hd;
        float mx = -INFINITY;
        for (int64_t t = 0; t < T; t++) {
            sc[t] = dot16(q, K + t * hd, hd) * L->scale;
            mx = sc[t] > mx ? sc[t] : mx;
        }
        float sum = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            sc[t] = expf(sc[t] - mx);
            sum += sc[t];
        }
        float* a = att + j * hd;
        for (int64_t i = 0; i < hd; i++) a[i] = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            const float p = sc[t] / sum;
            for (int64_t i = 0; i < hd; i++) a[i] += p * V[t * hd + i];
        }
    }
    float* y = h; /* h is free again: reuse it for the projections' outputs */
    ys[0] = y;
    if ((rc = lb_linear_many(&L->o, 1, att, 1, ys, nthreads))) goto refused;
    for (int64_t i = 0; i < D; i++) x[i] += y[i];
    rmsnorm(x, L->norm2, L->eps, D, h);
    ys[0] = gu; ys[1] = gu + I;
    if ((rc = lb_linear_many(L->gate_up, 2, h, 1, ys, nthreads))) goto refused;
    for (int64_t i = 0; i < I; i++) {
        const float g = gu[i];
        mid[i] = g / (1.0f + expf(-g)) * gu[I + i];
    }
    ys[0] = y;
    if ((rc = lb_linear_many(&L->down, 1, mid, 1, ys, nthreads))) goto refused;
    for (int64_t i = 0; i < D; i++) x[i] += y[i];
    return 0;
refused: /* -3: a NaN or inf reached a projection's input; x is left as it came */
    memcpy(x, x0, sizeof(float) * D);
    return rc;
}

#include "quantize.h" /* lb_rtn_affine */
