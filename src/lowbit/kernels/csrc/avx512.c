/* lowbit CPU kernel, AVX-512 VNNI: packed 2/4/8-bit weights x int16 activations, and W8A8.
 *
 *   y[m, n] = bias[n] + sum_b sx[m, b] * ( sw[g(b), n] * sum_{k in b} u[n, k] * qx[m, k]
 *                                        - sw[g(b), n] * z[g(b), n] * sumx[m, b] )
 *
 * Weights come in lowbit's "tiled" layout (packing.py: tile()): rows in blocks of 16; each
 * 32-byte chunk of a row block holds 16 rows x CK columns (CK = 2, 4, 8 for 8, 4, 2 bits). Byte p
 * of a chunk belongs to row p/2 and holds, in its sub-code i, column 2i + p%2 of the chunk. So a
 * zero-extension of the chunk to 32 int16 lanes, then one shift-and-mask per sub-code, gives
 * vectors whose 32-bit lane r holds row r's codes of two adjacent columns: exactly what
 * vpdpwssd multiplies against a broadcast pair of int16 activations, accumulating 16 rows'
 * dot products in 16 int32 lanes. No horizontal sums, and scales are applied to 16 rows at once.
 *
 *   u        unsigned codes; z the zero point (symmetric, or one zero for the whole tensor: the
 *            constant zconst; asymmetric per group: codes packed along rows, zeros[g, n]); the
 *            zero term uses sumx, the sum of the block's quantized activations, so the codes go
 *            into vpdpwssd as they are stored.
 *   sw       float16 scales (float32 when s32: weights beyond float16's range), row-block-major
 *            (common.h: wdesc), so 16 rows' scales are one load and a tile's scales one
 *            contiguous run; ldsw = 0: one scale for the whole tensor.
 *   qx, sx   activations quantized here per block of B (32..256, dividing G) columns: symmetric
 *            int16 with sx = absmax / 32767, so rounding is at most 1/65534 of the block's largest
 *            value: negligible next to any weight format's own error.
 *   g(b)     (b * B) / G: groups are multiples of B or span the row; the last may be short.
 *
 * Overflow: per block, each int32 lane adds B products of a code < 256 and |qx| <= 32767:
 * at most 256 * 255 * 32767 < 2^31.
 * Threads: OpenMP (torch's libgomp when torch is loaded first); the caller passes the count.
 * Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512dq -mf16c -mfma; the loader
 * checks the CPU flags before it opens the library. Entry points: driver.h.
 */
#include <immintrin.h>

#include "common.h"

#define LB_ISA_NAME "avx512"
#define TILE_M0 8

/* Quantize rows of x (M, K) to int16 qx (M, nb*B) zero-padded, sx and sumx (M, nb). */
static void quant_act(const float* x, int64_t M, int64_t K, int B, int16_t* qx, float* sx, int32_t* sumx,
                      int nthreads) {
    const int64_t nb = (K + B - 1) / B;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        int16_t* qr = qx + m * nb * B;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t c0 = b * B;
            const int n = (int)((K - c0) < B ? (K - c0) : B);
            const __mmask16 full = 0xFFFF;
            __m512 vmax = _mm512_setzero_ps();
            for (int c = 0; c < n; c += 16) {
                const __mmask16 mk = n - c >= 16 ? full : (__mmask16)((1u << (n - c)) - 1);
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xr + c0 + c)));
            }
            const float amax = _mm512_reduce_max_ps(vmax);
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
            __m512i vsum = _mm512_setzero_si512();
            for (int c = 0; c < B; c += 16) {
                const int left = n - c;
                const __mmask16 mk = left >= 16 ? full : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + c0 + c), inv));
                vsum = _mm512_add_epi32(vsum, q);
                _mm256_storeu_si256((__m256i*)(qr + b * B + c), _mm512_cvtsepi32_epi16(q));
            }
            sx[m * nb + b] = amax / 32767.0f;
            sumx[m * nb + b] = _mm512_reduce_add_epi32(vsum);
        }
    }
}

/* 16 rows' zero points of group g as floats. */
INLINE __m512 load_zeros(const wdesc* d, int64_t g, int64_t rb) {
    if (d->zf) { /* fractional (HQQ), float16, laid out like the scales */
        if (d->ldsw == 0) return _mm512_set1_ps(half_to_float(d->zf[0]));
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(d->zf + g * d->ldsw + rb * d->ldsrb)));
    }
    if (!d->zw) return _mm512_set1_ps((float)d->zconst);
    const uint8_t* p = d->zw + g * d->ldz + rb * d->ldzrb;
    if (d->bits == 8) return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)));
    if (d->bits == 4) {
        /* 8 bytes: row 2j in the low nibble of byte j, row 2j+1 in the high one */
        const __m128i v = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)p));
        const __m128i lo = _mm_and_si128(v, _mm_set1_epi16(15)), hi = _mm_srli_epi16(v, 4);
        const __m256i z16 = _mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi));
        return _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(z16));
    }
    /* bits == 2: 4 bytes, row 4j + i at bits 2i of byte j */
    uint32_t word;
    memcpy(&word, p, 4);
    float z[16];
    for (int r = 0; r < 16; r++) z[r] = (float)((word >> (2 * r)) & 3);
    return _mm512_loadu_ps(z);
}

INLINE __m512 load_scales(const wdesc* d, int64_t g, int64_t rb) {
    if (d->ldsw == 0) return _mm512_set1_ps(scale_at(d, 0));
    const int64_t i = g * d->ldsw + rb * d->ldsrb;
    if (d->s32) return _mm512_loadu_ps((const float*)d->sw + i);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)((const uint16_t*)d->sw + i)));
}

INLINE __m512i bcast_pair(const int16_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

/* Store the tile's rows m .. m+mt-1, output rows rb*16 .. +15 (masked at N), adding the bias;
 * rowscale != NULL: each row first scaled by rowscale[(m + i) * ld] (a per-token activation scale). */
INLINE void store_tile(const wdesc* d, int64_t rb, int64_t m, int mt, const __m512* out, const float* rowscale,
                       int64_t ld, float* y) {
    const int64_t n0 = rb * 16;
    const int nr = d->N - n0 < 16 ? (int)(d->N - n0) : 16;
    const __mmask16 mk = nr == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << nr) - 1);
    const __m512 bias = d->bias ? _mm512_maskz_loadu_ps(mk, d->bias + n0) : _mm512_setzero_ps();
    for (int i = 0; i < mt; i++) {
        const __m512 v = rowscale ? _mm512_fmadd_ps(out[i], _mm512_set1_ps(rowscale[(m + i) * ld]), bias)
                                  : _mm512_add_ps(out[i], bias);
        _mm512_mask_storeu_ps(y + (m + i) * d->N + n0, mk, v);
    }
}

/* Accumulate one chunk (16 rows x CK columns starting at activation column k) into acc[MT]. */
#define CHUNK_BODY(MT)                                                                          \
    do {                                                                                        \
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)wp));         \
        if (bits == 8) {                                                                        \
            for (int i = 0; i < MT; i++) acc[i] = _mm512_dpwssd_epi32(acc[i], v, bcast_pair(xr[i] + k)); \
        } else if (bits == 4) {                                                                 \
            const __m512i w0 = _mm512_and_si512(v, _mm512_set1_epi16(15));                       \
            const __m512i w1 = _mm512_srli_epi16(v, 4);                                         \
            for (int i = 0; i < MT; i++) {                                                      \
                acc[i] = _mm512_dpwssd_epi32(acc[i], w0, bcast_pair(xr[i] + k));                \
                acc[i] = _mm512_dpwssd_epi32(acc[i], w1, bcast_pair(xr[i] + k + 2));            \
            }                                                                                   \
        } else {                                                                                \
            const __m512i m3 = _mm512_set1_epi16(3);                                            \
            const __m512i w0 = _mm512_and_si512(v, m3), w1 = _mm512_and_si512(_mm512_srli_epi16(v, 2), m3); \
            const __m512i w2 = _mm512_and_si512(_mm512_srli_epi16(v, 4), m3), w3 = _mm512_srli_epi16(v, 6); \
            for (int i = 0; i < MT; i++) {                                                      \
                acc[i] = _mm512_dpwssd_epi32(acc[i], w0, bcast_pair(xr[i] + k));                \
                acc[i] = _mm512_dpwssd_epi32(acc[i], w1, bcast_pair(xr[i] + k + 2));            \
                acc[i] = _mm512_dpwssd_epi32(acc[i], w2, bcast_pair(xr[i] + k + 4));            \
                acc[i] = _mm512_dpwssd_epi32(acc[i], w3, bcast_pair(xr[i] + k + 6));            \
            }                                                                                   \
        }                                                                                       \
    } while (0)

/* Rows rb*16 .. +15 of the output for activation rows m .. m+MT-1. */
#define DEFINE_TILE(NAME, MT_, BITS_)                                                            \
    static void NAME(const wdesc* d, int64_t rb, int64_t m, const void* qx_, int64_t ldq,         \
                     const float* sx, const int32_t* sumx, int64_t nb, float* y) {                \
        enum { MT = MT_, bits = BITS_ };                                                        \
        const int16_t* qx = (const int16_t*)qx_;                                                \
        const int B = d->B;                                                                     \
        const int ck = 16 / bits;                  /* columns per 32-byte chunk */               \
        const int64_t nchunks = (d->K + ck - 1) / ck;                                            \
        const uint8_t* wrow = d->w + rb * nchunks * 32;                                         \
        const int16_t* xr[MT];                                                                  \
        __m512 out[MT];                                                                         \
        for (int i = 0; i < MT; i++) { xr[i] = qx + (m + i) * ldq; out[i] = _mm512_setzero_ps(); } \
        for (int64_t b = 0; b < nb; b++) {                                                      \
            const int64_t g = (b * B) / d->G;                                                   \
            const int64_t c_end = ((b + 1) * B) / ck < nchunks ? ((b + 1) * B) / ck : nchunks;  \
            __m512i acc[MT];                                                                    \
            for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_si512();                         \
            for (int64_t c = (b * B) / ck; c < c_end; c++) {                                    \
                const uint8_t* wp = wrow + c * 32;                                              \
                const int64_t k = c * ck;                                                       \
                CHUNK_BODY(MT);                                                                 \
            }                                                                                   \
            const __m512 s = load_scales(d, g, rb);                                             \
            const __m512 zs = _mm512_mul_ps(s, load_zeros(d, g, rb));                           \
            for (int i = 0; i < MT; i++) {                                                      \
                const float sxi = sx[(m + i) * nb + b];                                         \
                const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[i]), _mm512_set1_ps(sxi));  \
                out[i] = _mm512_fmadd_ps(t, s, out[i]);                                         \
                out[i] = _mm512_fnmadd_ps(zs, _mm512_set1_ps(sxi * (float)sumx[(m + i) * nb + b]), out[i]); \
            }                                                                                   \
        }                                                                                       \
        store_tile(d, rb, m, MT, out, NULL, 0, y);                                              \
    }

#define DEFINE_TILES(BITS)                                                                        \
    DEFINE_TILE(tile8_b##BITS, 8, BITS)                                                          \
    DEFINE_TILE(tile4_b##BITS, 4, BITS)                                                          \
    DEFINE_TILE(tile2_b##BITS, 2, BITS)                                                          \
    DEFINE_TILE(tile1_b##BITS, 1, BITS)
DEFINE_TILES(8)
DEFINE_TILES(4)
DEFINE_TILES(2)

static const tile_fn tiles_b8[4] = {tile8_b8, tile4_b8, tile2_b8, tile1_b8};
static const tile_fn tiles_b4[4] = {tile8_b4, tile4_b4, tile2_b4, tile1_b4};
static const tile_fn tiles_b2[4] = {tile8_b2, tile4_b2, tile2_b2, tile1_b2};

/* ==== W8A8: int8 weights x int8 dynamic activations (vpdpbusd) ===================================
 *
 *   y[m, n] = bias[n] + sum_b sx[m, b] * sw[g(b), n] * ( sum_{k in b} u[n, k] * qx[m, k] - z[g(b), n] * sumx[m, b] )
 *
 * Segments b of S = min(G, A) columns: G the weight group (K when per channel), A the activation
 * block (K when one scale per token); one of G, A divides the other, so every segment lies in one
 * weight group g(b) and one activation block. Activations: symmetric int8, sx = absmax / 127 of
 * the block ("dynamic" W8A8; with A < K, per token and per block of A columns), or a given
 * static scale. Weights: 8-bit codes in the "tiled4" layout (packing.py: tile4()): rows in blocks
 * of 16, each 64-byte chunk holding 16 rows x 4 columns, byte p = row p / 4, column p % 4, so that
 * 32-bit lane r of a chunk is row r's 4 codes: exactly vpdpbusd's operand (unsigned weight bytes
 * times a broadcast 4-byte group of signed activations). One instruction does 64 multiply-adds;
 * int32 lanes cannot overflow within a segment of up to 2^14 columns (4 * 255 * 127 per
 * instruction). With one activation scale per row, sx is applied once at the end.
 */

/* Quantize rows of x (M, K) to int8 qx (M, ldq) zero-padded; per (row, segment of S columns)
 * scales sx and sums sumx (M, ns); A: columns per scale (a multiple of S, or >= K).
 * static_scale > 0: use it instead of each block's absmax / 127. */
static void quant_rows_i8(const float* x, int64_t M, int64_t K, int64_t ldq, int64_t S, int64_t ns, int64_t A,
                          float static_scale, int8_t* qx, float* sx, int32_t* sumx, int nthreads) {
    if (A <= 0 || A > K) A = K;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        int8_t* qr = qx + m * ldq;
        for (int64_t a0 = 0; a0 < K; a0 += A) {
            const int64_t a1 = a0 + A < K ? a0 + A : K;
            const int64_t e1 = a1 < K ? a1 : ldq; /* the last block also writes the zero padding */
            float scale = static_scale;
            if (scale <= 0.0f) {
                __m512 vmax = _mm512_setzero_ps();
                for (int64_t c = a0; c < a1; c += 16) {
                    const int64_t left = a1 - c;
                    const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_maskz_loadu_ps(mk, xr + c)));
                }
                scale = _mm512_reduce_max_ps(vmax) / 127.0f;
            }
            const __m512 inv = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
            for (int64_t c = a0; c < e1; c += 16) {
                const int64_t left = a1 - c;
                const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
                __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + c), inv));
                q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                _mm_storeu_si128((__m128i*)(qr + c), _mm512_cvtepi32_epi8(q));
            }
            for (int64_t b = a0 / S; b * S < a1; b++) sx[m * ns + b] = scale;
        }
        for (int64_t b = 0; b < ns; b++) {
            const int64_t c1 = (b + 1) * S < K ? (b + 1) * S : K;
            int32_t sum = 0;
            for (int64_t c = b * S; c < c1; c++) sum += qr[c];
            sumx[m * ns + b] = sum;
        }
    }
}

INLINE __m512i bcast_quad(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

#define DEFINE_TILE_A8(NAME, MT_)                                                                \
    static void NAME(const wdesc* d, int64_t rb, int64_t m, const void* qx_, int64_t ldq,         \
                     const float* sx, const int32_t* sumx, int64_t ns, float* y) {               \
        enum { MT = MT_ };                                                                      \
        const int8_t* qx = (const int8_t*)qx_;                                                  \
        const int64_t nchunks = (d->K + 3) / 4;                                                 \
        const uint8_t* wrow = d->w + rb * nchunks * 64;                                         \
        const int64_t G = d->G < d->K ? d->G : d->K;                                            \
        const int per_row = d->A <= 0 || d->A >= d->K; /* one activation scale per row */       \
        const int64_t S = per_row ? G : (d->A < G ? d->A : G);                                  \
        const int64_t sch = S < d->K ? S / 4 : nchunks; /* chunks per segment */               \
        __m512 out[MT];                                                                         \
        for (int i = 0; i < MT; i++) out[i] = _mm512_setzero_ps();                               \
        for (int64_t b = 0; b < ns; b++) {                                                      \
            const int64_t g = (b * S) / G;                                                      \
            __m512i acc[MT];                                                                    \
            for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_si512();                        \
            const int64_t c1 = (b + 1) * sch < nchunks ? (b + 1) * sch : nchunks;                 \
            for (int64_t c = b * sch; c < c1; c++) {                                            \
                const __m512i w = _mm512_loadu_si512((const void*)(wrow + c * 64));             \
                for (int i = 0; i < MT; i++)                                                    \
                    acc[i] = _mm512_dpbusd_epi32(acc[i], w, bcast_quad(qx + (m + i) * ldq + c * 4)); \
            }                                                                                   \
            const __m512 s = load_scales(d, g, rb);                                             \
            const __m512 zs = _mm512_mul_ps(s, load_zeros(d, g, rb));                           \
            for (int i = 0; i < MT; i++) {                                                      \
                const __m512 t = _mm512_fnmadd_ps(zs, _mm512_set1_ps((float)sumx[(m + i) * ns + b]), \
                                                  _mm512_mul_ps(_mm512_cvtepi32_ps(acc[i]), s)); \
                out[i] = per_row ? _mm512_add_ps(out[i], t)                                     \
                                 : _mm512_fmadd_ps(t, _mm512_set1_ps(sx[(m + i) * ns + b]), out[i]); \
            }                                                                                   \
        }                                                                                       \
        store_tile(d, rb, m, MT, out, per_row ? sx : NULL, ns, y);                               \
    }

DEFINE_TILE_A8(tile8_a8, 8)
DEFINE_TILE_A8(tile4_a8, 4)
DEFINE_TILE_A8(tile2_a8, 2)
DEFINE_TILE_A8(tile1_a8, 1)

static const tile_fn tiles_a8[4] = {tile8_a8, tile4_a8, tile2_a8, tile1_a8};

#define QUANT_ACT quant_act
#define QUANT_I8 quant_rows_i8
#define LB_OWN_DWCONV

/* Depthwise convolution with static int8 activations: the arithmetic and arguments of driver.h's
 * portable lb_dwconv_a8, 16 channels per AVX-512 vector. */
int lb_dwconv_a8(const float* x, int64_t B, int64_t C, int64_t H, int64_t W, const int64_t* xs,
                 const int32_t* w, const float* ws, const float* bias, int32_t KH, int32_t KW,
                 int32_t sh, int32_t sw, int32_t ph, int32_t pw, float s, int32_t z,
                 float* y, int64_t OH, int64_t OW, int nthreads) {
    int16_t* q = (int16_t*)aligned_alloc(64, (size_t)((B * H * W * C * 2 + 63) / 64 * 64));
    float* f = (float*)malloc(sizeof(float) * (size_t)C);
    if (!q || !f) { free(q); free(f); return -2; }
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
                if (xs[1] == 1) {
                    for (int64_t c = 0; c < C; c += 16) {
                        const int64_t left = C - c;
                        const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xp + c), _mm512_set1_ps(inv)));
                        v = _mm512_add_epi32(v, _mm512_set1_epi32(z));
                        v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
                        v = _mm512_sub_epi32(v, _mm512_set1_epi32(z));
                        _mm256_mask_storeu_epi16(qp + c, mk, _mm512_cvtepi32_epi16(v));
                    }
                } else {
                    for (int64_t c = 0; c < C; c++) {
                        int32_t v = (int32_t)lrintf(xp[c * xs[1]] * inv) + z;
                        v = v > 127 ? 127 : (v < -127 ? -127 : v);
                        qp[c] = (int16_t)(v - z);
                    }
                }
            }
        }
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * OH; bi++) {
            const int64_t b = bi / OH, i = bi % OH;
            for (int64_t j = 0; j < OW; j++) {
                float* yp = y + (bi * OW + j) * C;
                for (int64_t c = 0; c < C; c += 16) {
                    const int64_t left = C - c;
                    const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
                    __m512i acc = _mm512_setzero_si512();
                    for (int32_t kh = 0; kh < KH; kh++) {
                        const int64_t r = i * sh - ph + kh;
                        if (r < 0 || r >= H) continue;
                        for (int32_t kw = 0; kw < KW; kw++) {
                            const int64_t col = j * sw - pw + kw;
                            if (col < 0 || col >= W) continue;
                            const __m512i qv = _mm512_cvtepi16_epi32(
                                _mm256_maskz_loadu_epi16(mk, q + ((b * H + r) * W + col) * C + c));
                            const __m512i wv = _mm512_maskz_loadu_epi32(mk, w + (kh * KW + kw) * C + c);
                            acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(qv, wv));
                        }
                    }
                    __m512 out = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_maskz_loadu_ps(mk, f + c));
                    if (bias) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(mk, bias + c));
                    _mm512_mask_storeu_ps(yp + c, mk, out);
                }
            }
        }
    }
    free(q); free(f);
    return 0;
}

#define LB_ROWS_AVX2
#include "driver.h"
