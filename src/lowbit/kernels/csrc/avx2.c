/* lowbit CPU kernel, AVX2 (+FMA, F16C): packed 2/4/8-bit weights x int16 activations, and W8A8.
 *
 * Same math and the same weight layouts as avx512.c (read its header for the formulas); the
 * 256-bit registers hold 8 int32 lanes, so each 16-row tile is two halves of 8 rows.
 *
 * Weight-only (tiled layout): the 32-byte chunk's first 16 bytes are rows 0..7, the next 16 rows
 * 8..15 (byte p = row p/2). Zero-extending 16 bytes to 16 int16 lanes and one shift-and-mask per
 * sub-code gives, in 32-bit lane r, row r's codes of two adjacent columns: vpmaddwd against a
 * broadcast pair of int16 activations adds both products into lane r. Per block each lane adds
 * B <= 256 products of 255 * 32767: below 2^31.
 *
 * W8A8 (tiled4 layout): 32-bit lane r of a 32-byte half is row r's 4 codes. There is no
 * unsigned x signed dot product instruction in AVX2 (AVX-VNNI has one), and vpmaddubsw saturates
 * int16 sums of two products 255 * 127. So the codes become signed, w' = u - 128 (-128..127), and
 * vpmaddubsw multiplies |w'| (unsigned, <= 128) by sign(w') * q (|q| <= 127): each int16 sum of
 * two products is at most 2 * 128 * 127 = 32512, exact. vpmaddwd by ones adds the pairs into
 * int32 lanes. The zero term uses z - 128 to match: sum (u - z) q = sum w' q - (z - 128) sum q.
 *
 * Compiled with -mavx2 -mfma -mf16c; the loader checks the CPU flags first.
 */
#include <immintrin.h>

#include "common.h"

#define LB_ISA_NAME "avx2"
#define TILE_M0 4
#ifndef LB_PREFETCH
#define LB_PREFETCH 4096 /* bytes ahead of the weight stream to prefetch */
#endif

INLINE __m256i bcast32(const void* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* 8 rows' float32 scales (rows rb*16 + 8h ..) of group g. */
INLINE __m256 scales8(const wdesc* d, int64_t g, int64_t rb, int h) {
    if (d->ldsw == 0) return _mm256_set1_ps(scale_at(d, 0));
    const int64_t i = g * d->ldsw + rb * d->ldsrb + 8 * h;
    if (d->s32) return _mm256_loadu_ps((const float*)d->sw + i);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)d->sw + i)));
}

/* Store rows m .. m+mt-1 of a 16-row tile (two halves per activation row), masked at N, adding
 * the bias; rowscale != NULL: each activation row first scaled by rowscale[(m + i) * ld]. */
INLINE void store_tile2(const wdesc* d, int64_t rb, int64_t m, int mt, __m256 (*out)[2], const float* rowscale,
                        int64_t ld, float* y) {
    const int64_t n0 = rb * 16;
    const int nr = d->N - n0 < 16 ? (int)(d->N - n0) : 16;
    for (int i = 0; i < mt; i++) {
        float v[16];
        for (int h = 0; h < 2; h++) {
            __m256 o = out[i][h];
            if (rowscale) o = _mm256_mul_ps(o, _mm256_set1_ps(rowscale[(m + i) * ld]));
            _mm256_storeu_ps(v + 8 * h, o);
        }
        if (nr == 16 && d->bias) {
            float* yr = y + (m + i) * d->N + n0;
            for (int h = 0; h < 2; h++)
                _mm256_storeu_ps(yr + 8 * h, _mm256_add_ps(_mm256_loadu_ps(v + 8 * h), _mm256_loadu_ps(d->bias + n0 + 8 * h)));
        } else {
            store16(d, rb, y + (m + i) * d->N, v);
        }
    }
}

/* Accumulate one weight vector (8 rows x 2 columns of int16 codes) against columns k, k+1. */
#define MADD(MT, h, W, K)                                                                       \
    for (int i = 0; i < MT; i++) acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(W, bcast32(xr[i] + (K))))

/* Rows rb*16 .. +15 of the output for activation rows m .. m+MT-1 (int16 activations). */
#define DEFINE_TILE(NAME, MT_, BITS_)                                                            \
    static void NAME(const wdesc* d, int64_t rb, int64_t m, const void* qx_, int64_t ldq,         \
                     const float* sx, const int32_t* sumx, int64_t nb, float* y) {                \
        enum { MT = MT_, bits = BITS_ };                                                        \
        const int16_t* qx = (const int16_t*)qx_;                                                \
        const int B = d->B;                                                                     \
        const int ck = 16 / bits;                                                               \
        const int64_t nchunks = (d->K + ck - 1) / ck;                                            \
        const uint8_t* wrow = d->w + rb * nchunks * 32;                                         \
        const int16_t* xr[MT];                                                                  \
        __m256 out[MT][2];                                                                      \
        for (int i = 0; i < MT; i++) {                                                          \
            xr[i] = qx + (m + i) * ldq;                                                         \
            out[i][0] = out[i][1] = _mm256_setzero_ps();                                        \
        }                                                                                       \
        const int64_t bpg = blocks_per_group(d, B, nb);                                         \
        for (int64_t b = 0, g = 0, gl = bpg; b < nb; b++, g += (--gl == 0), gl = gl ? gl : bpg) { \
            const int64_t c_end = ((b + 1) * B) / ck < nchunks ? ((b + 1) * B) / ck : nchunks;  \
            __m256i acc[MT][2];                                                                 \
            for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();          \
            for (int64_t c = (b * B) / ck; c < c_end; c++) {                                    \
                const uint8_t* wp = wrow + c * 32;                                              \
                const int64_t k = c * ck;                                                       \
                _mm_prefetch((const char*)(wp + LB_PREFETCH), _MM_HINT_T0);                     \
                for (int h = 0; h < 2; h++) {                                                   \
                    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(wp + 16 * h))); \
                    if (bits == 8) {                                                            \
                        MADD(MT, h, v, k);                                                      \
                    } else if (bits == 4) {                                                     \
                        const __m256i w0 = _mm256_and_si256(v, _mm256_set1_epi16(15));           \
                        const __m256i w1 = _mm256_srli_epi16(v, 4);                             \
                        MADD(MT, h, w0, k);                                                     \
                        MADD(MT, h, w1, k + 2);                                                 \
                    } else {                                                                    \
                        const __m256i m3 = _mm256_set1_epi16(3);                                \
                        MADD(MT, h, _mm256_and_si256(v, m3), k);                                \
                        MADD(MT, h, _mm256_and_si256(_mm256_srli_epi16(v, 2), m3), k + 2);      \
                        MADD(MT, h, _mm256_and_si256(_mm256_srli_epi16(v, 4), m3), k + 4);      \
                        MADD(MT, h, _mm256_srli_epi16(v, 6), k + 6);                            \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            float z[16];                                                                        \
            zeros16(d, g, rb, z, bits);                                                               \
            for (int h = 0; h < 2; h++) {                                                       \
                const __m256 s = scales8(d, g, rb, h);                                          \
                const __m256 zs = _mm256_mul_ps(s, _mm256_loadu_ps(z + 8 * h));                 \
                for (int i = 0; i < MT; i++) {                                                  \
                    const float sxi = sx[(m + i) * nb + b];                                     \
                    const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][h]), _mm256_set1_ps(sxi)); \
                    out[i][h] = _mm256_fmadd_ps(t, s, out[i][h]);                               \
                    out[i][h] = _mm256_fnmadd_ps(zs, _mm256_set1_ps(sxi * (float)sumx[(m + i) * nb + b]), out[i][h]); \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        store_tile2(d, rb, m, MT, out, NULL, 0, y);                                             \
    }

#define DEFINE_TILES(BITS)                                                                        \
    DEFINE_TILE(tile4_b##BITS, 4, BITS)                                                          \
    DEFINE_TILE(tile2_b##BITS, 2, BITS)                                                          \
    DEFINE_TILE(tile1_b##BITS, 1, BITS)
DEFINE_TILES(8)
DEFINE_TILES(4)
DEFINE_TILES(2)
static const tile_fn tiles_b8[4] = {tile4_b8, tile2_b8, tile1_b8, tile1_b8};
static const tile_fn tiles_b4[4] = {tile4_b4, tile2_b4, tile1_b4, tile1_b4};
static const tile_fn tiles_b2[4] = {tile4_b2, tile2_b2, tile1_b2, tile1_b2};

/* W8A8 tile: rows rb*16 .. +15 for activation rows m .. m+MT-1 (int8 activations, tiled4). */
#define DEFINE_TILE_A8(NAME, MT_)                                                                \
    static void NAME(const wdesc* d, int64_t rb, int64_t m, const void* qx_, int64_t ldq,         \
                     const float* sx, const int32_t* sumx, int64_t ns, float* y) {               \
        enum { MT = MT_, bits = 8 };                                                                   \
        const int8_t* qx = (const int8_t*)qx_;                                                  \
        const int64_t nchunks = (d->K + 3) / 4;                                                 \
        const uint8_t* wrow = d->w + rb * nchunks * 64;                                         \
        const int64_t G = d->G < d->K ? d->G : d->K;                                            \
        const int per_row = d->A <= 0 || d->A >= d->K; /* one activation scale per row */       \
        const int64_t S = per_row ? G : (d->A < G ? d->A : G);                                  \
        const int64_t sch = S < d->K ? S / 4 : nchunks; /* chunks per segment */               \
        const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);          \
        __m256 out[MT][2];                                                                      \
        for (int i = 0; i < MT; i++) out[i][0] = out[i][1] = _mm256_setzero_ps();                 \
        const int64_t bpg = d->G >= d->K ? ns : G / S; /* segments per group (S divides G) */              \
        for (int64_t b = 0, g = 0, gl = bpg; b < ns; b++, g += (--gl == 0), gl = gl ? gl : bpg) { \
            __m256i acc[MT][2];                                                                 \
            for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_si256();          \
            const int64_t c1 = (b + 1) * sch < nchunks ? (b + 1) * sch : nchunks;                 \
            for (int64_t c = b * sch; c < c1; c++) {                                            \
                for (int h = 0; h < 2; h++) {                                                   \
                    const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(wrow + c * 64 + 32 * h)), flip); \
                    const __m256i wa = _mm256_abs_epi8(ws);                                     \
                    for (int i = 0; i < MT; i++) {                                              \
                        const __m256i q = _mm256_sign_epi8(bcast32(qx + (m + i) * ldq + c * 4), ws); \
                        acc[i][h] = _mm256_add_epi32(acc[i][h], _mm256_madd_epi16(_mm256_maddubs_epi16(wa, q), ones)); \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            float z[16];                                                                        \
            zeros16(d, g, rb, z, bits);                                                               \
            for (int h = 0; h < 2; h++) {                                                       \
                const __m256 s = scales8(d, g, rb, h);                                          \
                const __m256 zs = _mm256_mul_ps(s, _mm256_sub_ps(_mm256_loadu_ps(z + 8 * h), _mm256_set1_ps(128.0f))); \
                for (int i = 0; i < MT; i++) {                                                  \
                    const __m256 t = _mm256_fnmadd_ps(zs, _mm256_set1_ps((float)sumx[(m + i) * ns + b]), \
                                                      _mm256_mul_ps(_mm256_cvtepi32_ps(acc[i][h]), s)); \
                    out[i][h] = per_row ? _mm256_add_ps(out[i][h], t)                           \
                                        : _mm256_fmadd_ps(t, _mm256_set1_ps(sx[(m + i) * ns + b]), out[i][h]); \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        store_tile2(d, rb, m, MT, out, per_row ? sx : NULL, ns, y);                              \
    }

DEFINE_TILE_A8(tile4_a8, 4)
DEFINE_TILE_A8(tile2_a8, 2)
DEFINE_TILE_A8(tile1_a8, 1)
static const tile_fn tiles_a8[4] = {tile4_a8, tile2_a8, tile1_a8, tile1_a8};

#define QUANT_ACT quant_act_c
#define QUANT_I8 quant_rows_i8_c

#define LB_ROWS_AVX2
#include "driver.h"
