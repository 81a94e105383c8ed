/* lowbit CPU kernels: packed 2/4/8-bit weights x int16 activations on AVX-512 VNNI.
 *
 * out[m, n] = sum_b  sw[n, g(b)] * sx[m, b] * dot(u[n, b] - z[n, g(b)], qx[m, b])  + bias[n]
 *
 *   u      unsigned weight codes of row n, read straight from lowbit's packed storage
 *          (packing.py: 4-bit = two per byte, code 2j in the low nibble; 2-bit = four per byte;
 *          8-bit = one per byte), row stride ldw bytes.
 *   z      integer zero point: a constant (symmetric: 2^(bits-1)) or packed codes like u.
 *          It is subtracted from the codes in 16-bit lanes, so (u - z) is exact.
 *   sw     float16 scales (N or 1 rows, ng per row, row stride ldsw elements: 0 = per tensor).
 *   g(b)   group of activation block b: (b * B) / G. G is a multiple of B or >= K; the last group
 *          may be short (K % G columns), as lowbit's grouping defines.
 *   qx,sx  the activations quantized here, per block of B in {32, 64} columns, symmetric int16:
 *          sx = absmax / 32767, so the activation error is at most 1/65534 of the block's
 *          largest value: the kernel adds no accuracy loss worth measuring to the weight's own.
 *          Within each block, columns are permuted so that vector loads of qx line up with the
 *          in-register unpacking of the packed weight bytes (see permute_index()).
 *
 * Why this shape: VNNI's vpdpwssd multiplies 32 pairs of int16 and accumulates into 16 int32
 * lanes in one instruction, so an unpacked weight block meets its activations without being
 * widened to float; a 64-column block costs two vpdpwssd, one int->float conversion and two
 * float ops per (activation row, weight row). Per-block int32 sums cannot overflow: 4 products
 * of |u - z| <= 255 and |qx| <= 32767 per lane.
 *
 * Threads: OpenMP, sharing torch's libgomp when torch is loaded first; the caller passes the
 * thread count it wants (torch.get_num_threads()).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mavx512dq -mf16c -mfma; the
 * loader checks the CPU flags before it opens the library. */
#define INLINE static inline __attribute__((always_inline))

enum { ZCONST = 0, ZPACKED = 1 };

int lb_abi_version(void) { return 3; }

/* Position, within a block of B activation columns, where column c of the block goes: the
 * weight unpacking below lays out a block's codes as [all sub-codes 0 of each byte, all
 * sub-codes 1, ...], so column j*per + i (byte j, sub-code i) lands at i*(B/per) + j. */
INLINE int permute_index(int c, int B, int per) {
    int j = c / per, i = c % per;
    return i * (B / per) + j;
}

/* Quantize rows of x (M, K) into qx (M, nb*B) int16 (zero-padded) and sx (M, nb). */
static void quant_act(const float* x, int64_t M, int64_t K, int B, int bits, int16_t* qx, float* sx,
                      int nthreads) {
    const int64_t nb = (K + B - 1) / B;
    const int per = 8 / bits;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        int16_t* qr = qx + m * nb * B;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t c0 = b * B;
            const int n = (int)((K - c0) < B ? (K - c0) : B);
            __m512 vmax = _mm512_setzero_ps();
            int c = 0;
            for (; c + 16 <= n; c += 16)
                vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + c0 + c)));
            float amax = _mm512_reduce_max_ps(vmax);
            for (; c < n; c++) amax = fmaxf(amax, fabsf(xr[c0 + c]));
            const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            int16_t* qb = qr + b * B;
            if (per == 1) {
                for (c = 0; c < n; c++) qb[c] = (int16_t)lrintf(xr[c0 + c] * inv);
                for (; c < B; c++) qb[c] = 0;
            } else {
                memset(qb, 0, sizeof(int16_t) * (size_t)B);
                for (c = 0; c < n; c++) qb[permute_index(c, B, per)] = (int16_t)lrintf(xr[c0 + c] * inv);
            }
            sx[m * nb + b] = amax / 32767.0f;
        }
    }
}

/* ---- weight block unpacking: B columns of one row -> (u - z) in B/32 vectors of 32 int16 ----
 * 4-bit: one zero-extension of the packed bytes to 16-bit lanes, then low nibble = AND 15 and
 * high nibble = shift right 4 (the byte is < 256, so no mask is needed), giving [codes of even
 * columns | codes of odd columns] as permute_index() expects. 8-bit: zero-extend. 2-bit: four
 * 2-bit fields of 16 bytes, combined as [sub-code 0 | 1 | 2 | 3]. */
INLINE void unpack_b64(const uint8_t* p, int bits, uint64_t mask, __m512i zv, __m512i out[2]) {
    if (bits == 4) {
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8((__mmask32)mask, p));
        out[0] = _mm512_sub_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x0F)), zv);
        out[1] = _mm512_sub_epi16(_mm512_srli_epi16(v, 4), zv);
    } else if (bits == 8) {
        out[0] = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8((__mmask32)mask, p)), zv);
        out[1] = _mm512_sub_epi16(
            _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8((__mmask32)(mask >> 32), p + 32)), zv);
    } else { /* bits == 2 */
        const __m256i v = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8((__mmask16)mask, p));
        const __m256i m2 = _mm256_set1_epi16(0x03);
        const __m256i c0 = _mm256_and_si256(v, m2), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), m2);
        const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m2), c3 = _mm256_srli_epi16(v, 6);
        out[0] = _mm512_sub_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(c0), c1, 1), zv);
        out[1] = _mm512_sub_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(c2), c3, 1), zv);
    }
}

INLINE void unpack_b32(const uint8_t* p, int bits, uint64_t mask, __m512i zv, __m512i out[1]) {
    if (bits == 8) {
        out[0] = _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8((__mmask32)mask, p)), zv);
    } else { /* bits == 4 */
        const __m256i v = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8((__mmask16)mask, p));
        const __m256i lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F)), hi = _mm256_srli_epi16(v, 4);
        out[0] = _mm512_sub_epi16(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), zv);
    }
}

/* One quantized weight as the kernel reads it; built once per layer by the Python wrapper
 * (kernels/cpu.py, class _Weights: keep the two in the same field order). */
typedef struct {
    const uint8_t* w; int64_t ldw;       /* packed codes, row stride in bytes */
    const uint16_t* sw; int64_t ldsw;    /* fp16 scales, row stride in elements (0: per tensor) */
    int32_t zmode; int32_t zconst;       /* zero point mode (ZCONST/ZPACKED), constant zero */
    const uint8_t* zw; int64_t ldz;      /* packed zero codes, row stride in bytes (0: per tensor) */
    int64_t N, K, G;                     /* rows, columns, group size (>= K: one group) */
    int32_t bits, B;                     /* code width; activation block (32 or 64) */
    const float* bias;                   /* (N,) float32 or NULL */
} wdesc;

INLINE float load_scale(const wdesc* d, int64_t n, int64_t g) { return _cvtsh_ss(d->sw[n * d->ldsw + g]); }

INLINE int load_zero(const wdesc* d, int64_t n, int64_t g) {
    if (d->zmode == ZCONST) return d->zconst;
    const uint8_t* zr = d->zw + n * d->ldz;
    const int per = 8 / d->bits;
    const int sh = (int)(g % per) * d->bits;
    return (zr[g / per] >> sh) & ((1 << d->bits) - 1);
}

/* One tile: NT weight rows from n, MT activation rows from m; B-column blocks. */
#define DEFINE_TILE(NAME, NT_, MT_, B_)                                                        \
    static void NAME(const wdesc* d, int64_t n, int64_t m, const int16_t* qx, int64_t ldq,      \
                     const float* sx, int64_t nb, float* out) {                                 \
        enum { NT = NT_, MT = MT_, B = B_, NV = B_ / 32 };                                      \
        __m512 acc[MT][NT];                                                                     \
        for (int i = 0; i < MT; i++)                                                            \
            for (int j = 0; j < NT; j++) acc[i][j] = _mm512_setzero_ps();                        \
        const int per = 8 / d->bits;                                                            \
        const int bbytes = B / per;                                                             \
        for (int64_t b = 0; b < nb; b++) {                                                      \
            const int64_t g = (b * B) / d->G;                                                   \
            const int64_t rem = d->K - b * B;                                                   \
            const int64_t cols = rem < B ? rem : B;                                             \
            const int nbytes = (int)((cols * d->bits + 7) / 8);                                 \
            const uint64_t mask = nbytes >= 64 ? ~0ull : ((1ull << nbytes) - 1);                 \
            __m512i wv[NT][NV];                                                                 \
            float swj[NT];                                                                      \
            for (int j = 0; j < NT; j++) {                                                      \
                const uint8_t* p = d->w + (n + j) * d->ldw + b * bbytes;                        \
                const __m512i zv = _mm512_set1_epi16((short)load_zero(d, n + j, g));            \
                if (B == 64) unpack_b64(p, d->bits, mask, zv, wv[j]);                           \
                else unpack_b32(p, d->bits, mask, zv, wv[j]);                                   \
                swj[j] = load_scale(d, n + j, g);                                               \
            }                                                                                   \
            for (int i = 0; i < MT; i++) {                                                      \
                const int16_t* xp = qx + (m + i) * ldq + b * B;                                 \
                __m512i xv[NV];                                                                 \
                for (int v = 0; v < NV; v++) xv[v] = _mm512_loadu_si512((const void*)(xp + 32 * v)); \
                const float sxi = sx[(m + i) * nb + b];                                         \
                for (int j = 0; j < NT; j++) {                                                  \
                    __m512i t = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wv[j][0], xv[0]);    \
                    for (int v = 1; v < NV; v++) t = _mm512_dpwssd_epi32(t, wv[j][v], xv[v]);   \
                    acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(sxi * swj[j]), acc[i][j]); \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < MT; i++)                                                            \
            for (int j = 0; j < NT; j++) {                                                      \
                float v = _mm512_reduce_add_ps(acc[i][j]);                                      \
                if (d->bias) v += d->bias[n + j];                                               \
                out[(m + i) * d->N + n + j] = v;                                                \
            }                                                                                   \
    }

DEFINE_TILE(tile64_4x4, 4, 4, 64)
DEFINE_TILE(tile64_4x1, 4, 1, 64)
DEFINE_TILE(tile64_1x4, 1, 4, 64)
DEFINE_TILE(tile64_1x1, 1, 1, 64)
DEFINE_TILE(tile32_4x4, 4, 4, 32)
DEFINE_TILE(tile32_4x1, 4, 1, 32)
DEFINE_TILE(tile32_1x4, 1, 4, 32)
DEFINE_TILE(tile32_1x1, 1, 1, 32)

typedef void (*tile_fn)(const wdesc*, int64_t, int64_t, const int16_t*, int64_t, const float*, int64_t,
                        float*);

/* Rows of activations handled per pass over the weights (qx of MC rows stays in L2). */
#define MC 64

/* y (M, N) float32 = x (M, K) float32 @ dequant(W)^T + bias.  Returns 0, -1 on a bad
 * descriptor, -2 when out of memory. B must be 32 or 64 (64 takes bits 2, 4 or 8; 32 takes 4 or
 * 8); G % B == 0 or G >= K. */
int lb_linear(const wdesc* W, const float* x, int64_t M, float* out, int nthreads) {
    const int B = W->B, bits = W->bits;
    const int64_t K = W->K, N = W->N, G = W->G;
    if (!(B == 32 || B == 64) || !(bits == 2 || bits == 4 || bits == 8)) return -1;
    if (B == 32 && bits == 2) return -1;
    if (G < K && G % B) return -1;
    if (W->zmode != ZCONST && W->zmode != ZPACKED) return -1;
    const int64_t nb = (K + B - 1) / B;
    const int64_t ldq = nb * B;
    int16_t* qx = (int16_t*)aligned_alloc(64, (size_t)((M * ldq * 2 + 63) / 64 * 64));
    float* sx = (float*)malloc(sizeof(float) * (size_t)(M * nb));
    if (!qx || !sx) { free(qx); free(sx); return -2; }
    quant_act(x, M, K, B, bits, qx, sx, nthreads);
    const wdesc* d = W;
    tile_fn t44 = B == 64 ? tile64_4x4 : tile32_4x4, t41 = B == 64 ? tile64_4x1 : tile32_4x1;
    tile_fn t14 = B == 64 ? tile64_1x4 : tile32_1x4, t11 = B == 64 ? tile64_1x1 : tile32_1x1;
    const int64_t ntile = (N + 3) / 4;
#pragma omp parallel num_threads(nthreads)
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t m1 = m0 + MC < M ? m0 + MC : M;
#pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < ntile; t++) {
            const int64_t n = t * 4;
            const int full = n + 4 <= N;
            for (int64_t m = m0; m < m1;) {
                if (m + 4 <= m1) {
                    if (full) t44(d, n, m, qx, ldq, sx, nb, out);
                    else for (int64_t j = n; j < N; j++) t14(d, j, m, qx, ldq, sx, nb, out);
                    m += 4;
                } else {
                    if (full) t41(d, n, m, qx, ldq, sx, nb, out);
                    else for (int64_t j = n; j < N; j++) t11(d, j, m, qx, ldq, sx, nb, out);
                    m += 1;
                }
            }
        }
    }
    free(qx); free(sx);
    return 0;
}
