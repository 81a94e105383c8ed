/* lowbit CPU kernels: round-to-nearest quantization of float rows, fused (included by driver.h).
 *
 * lb_rtn_affine computes, bit for bit, what lowbit.primitives computes for an affine scheme with
 * min/max ranges and float16 scales: choose_qparams (a group's range; groups whose largest
 * magnitude is below 512 float32-tiny count as zero), round_scale (to float16, rounded to
 * nearest-even and then away from zero if that shrank it) and quantize_codes (clamp(round-half-
 * even(x / s + z), 0, qmax), s = 1 where the scale is 0), in one pass over each row instead of a
 * dozen tensor passes. Only float32 operations whose IEEE result is unique are used (no fused
 * multiply-adds, no reciprocals), so the result does not depend on the ISA or vector width.
 */

#if defined(__AVX2__) && !defined(LB_NO_INTRINSICS)
#include <immintrin.h>
#endif

#define LB_NONFINITE (-3)

/* float32 -> float16 bits, round to nearest even, for |f| in float16's normal range. */
INLINE uint16_t float_to_half_normal(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, m = x & 0x7FFFFFu;
    uint32_t h = ((((x >> 23) & 0xFFu) - 112u) << 10) | (m >> 13);
    const uint32_t rest = m & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* a carry moves into the exponent */
    return (uint16_t)(sign | h);
}

/* round_scale for float16 storage: 0 stays 0 (with its sign); else the nearest float16, moved one
 * step away from zero if it is smaller in magnitude than s. NaN marks a scale outside float16's
 * normal range (the caller stores float32 scales instead; -1.0 is a real scale). */
INLINE int half_normal(float a) { return a >= 6.103515625e-05f && a <= 65504.0f; } /* |a| in float16's normal range */

INLINE float round_scale_f16(float s) {
    const float a = fabsf(s);
    if (a == 0.0f) return s;
    if (!half_normal(a)) return NAN;
    uint16_t h = float_to_half_normal(s);
    if (fabsf(half_to_float(h)) < a) h++; /* magnitude bits + 1: away from zero */
    return half_to_float(h);
}

#define LB_TOO_SMALL 6.0185311e-36f /* float32's smallest normal * 512 (primitives._TOO_SMALL) */
#define LB_OUT_OF_RANGE 1

/* The row's values as float32: bf16 / f16 converted into buf, f32 read in place. */
INLINE const float* row_as_float(const void* w, int dtype, int64_t n, int64_t K, float* buf) {
    if (dtype == 0) return (const float*)w + n * K;
    if (dtype == 1) {
        const uint16_t* p = (const uint16_t*)w + n * K;
        for (int64_t k = 0; k < K; k++) {
            const uint32_t b = (uint32_t)p[k] << 16;
            memcpy(buf + k, &b, 4);
        }
    } else {
        const uint16_t* p = (const uint16_t*)w + n * K;
        for (int64_t k = 0; k < K; k++) buf[k] = half_to_float(p[k]);
    }
    return buf;
}

/* min(lo, x), max(hi, x) over v[0..len) and whether any value is NaN or infinite. */
INLINE int scan_group(const float* v, int64_t len, float* lo, float* hi) {
    float l = 0.0f, h = 0.0f;
    int64_t k = 0;
    uint32_t bad = 0;
#if defined(__AVX2__) && !defined(LB_NO_INTRINSICS)
    __m256 vl = _mm256_setzero_ps(), vh = _mm256_setzero_ps(), vz = _mm256_setzero_ps();
    for (; k + 8 <= len; k += 8) {
        const __m256 x = _mm256_loadu_ps(v + k);
        vl = _mm256_min_ps(vl, x);
        vh = _mm256_max_ps(vh, x);
        vz = _mm256_add_ps(vz, _mm256_sub_ps(x, x)); /* NaN for NaN or inf */
    }
    float tl[8], th[8], tz[8];
    _mm256_storeu_ps(tl, vl);
    _mm256_storeu_ps(th, vh);
    _mm256_storeu_ps(tz, vz);
    for (int i = 0; i < 8; i++) {
        l = tl[i] < l ? tl[i] : l;
        h = th[i] > h ? th[i] : h;
        bad |= tz[i] != 0.0f;
    }
#endif
    for (; k < len; k++) {
        uint32_t b;
        memcpy(&b, v + k, 4);
        bad |= ((b >> 23) & 0xFFu) == 0xFFu;
        l = v[k] < l ? v[k] : l;
        h = v[k] > h ? v[k] : h;
    }
    *lo = l;
    *hi = h;
    return bad != 0;
}

/* c[k] = clamp(round-half-even(v[k] / s + z), 0, top) for k < len. */
INLINE void round_group(const float* v, int64_t len, float s, float z, float top, uint8_t* c) {
    int64_t k = 0;
#if defined(__AVX2__) && !defined(LB_NO_INTRINSICS)
    const __m256 vs = _mm256_set1_ps(s), vzp = _mm256_set1_ps(z), vt = _mm256_set1_ps(top), v0 = _mm256_setzero_ps();
    for (; k + 8 <= len; k += 8) {
        __m256 q = _mm256_add_ps(_mm256_div_ps(_mm256_loadu_ps(v + k), vs), vzp);
        q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, v0), vt);
        const __m256i i = _mm256_cvtps_epi32(q);
        const __m128i w16 = _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64((__m128i*)(c + k), _mm_packus_epi16(w16, w16));
    }
#endif
    for (; k < len; k++) {
        float q = nearbyintf(v[k] / s + z);
        q = q < 0.0f ? 0.0f : (q > top ? top : q);
        c[k] = (uint8_t)q;
    }
}

/* One group's min/max parameters (v[0..len)), as choose_qparams + round_scale give them for mode
 * 0 / 1 / 2 (see lb_rtn_affine): 0, LB_NONFINITE for a NaN/inf value, LB_OUT_OF_RANGE for a
 * non-zero scale outside float16's normal range. */
INLINE int rtn_qparams(const float* v, int64_t len, int qmax, int mode, float zc, float sqmax, float* sp, float* zp) {
    float lo, hi, amax, m, s, z;
    if (scan_group(v, len, &lo, &hi)) return LB_NONFINITE;
    amax = hi > -lo ? hi : -lo;
    const int tiny = amax < LB_TOO_SMALL; /* the whole group counts as zero */
    if (mode == 0) {
        if (tiny) lo = hi = 0.0f;
        s = round_scale_f16((hi - lo) / (float)qmax);
        z = nearbyintf(-lo / (s == 0.0f ? 1.0f : s));
        z = z < 0.0f ? 0.0f : (z > (float)qmax ? (float)qmax : z);
    } else if (mode == 1) {
        m = 0.0f;
        if (!tiny)
            for (int64_t k = 0; k < len; k++)
                if (fabsf(v[k]) == amax) { m = v[k]; break; }
        s = round_scale_f16(m / -zc);
        z = zc;
    } else {
        s = round_scale_f16((tiny ? 0.0f : amax) / sqmax);
        z = zc;
    }
    if (s != s) return LB_OUT_OF_RANGE;
    *sp = s;
    *zp = z;
    return 0;
}

#include "hqq.h"

/* One group's final parameters when HQQ optimises them (h): the min/max ones of g = v * mult as
 * the start, the optimised scale rounded as round_scale does and divided by mult again, the zero
 * point rounded to float16. LB_OUT_OF_RANGE when either leaves float16's range. */
INLINE int hqq_qparams(const float* v, int64_t len, int qmax, int mode, float zc, float sqmax, const hqq_opts* h,
                       float mult, float* ws, float* sp, float* zp) {
    float* g = ws;
    for (int64_t k = 0; k < len; k++) g[k] = v[k] * mult;
    float s, z;
    const int bad = rtn_qparams(g, len, qmax, mode, zc, sqmax, &s, &z);
    if (bad) return bad;
    hqq_group(g, len, &s, &z, h, ws + len);
    s = round_scale_f16(s);
    if (s != s) return LB_OUT_OF_RANGE;
    s = s / mult; /* a power of two: exact while it stays a float16 normal */
    if (s != 0.0f && !half_normal(fabsf(s))) return LB_OUT_OF_RANGE;
    if (h->asym && round_half(z, &z)) return LB_OUT_OF_RANGE;
    *sp = s;
    *zp = h->asym ? z : zc;
    return 0;
}

/* Rows of w (N, K), dtype 0 float32 / 1 bfloat16 / 2 float16, in groups of G columns (the last one
 * may be shorter) -> out: codes (N, K) uint8, or with pack_bits 2 or 4 the rows packed as
 * packing.pack packs them (N, ceil(K / (8 / pack_bits))); scales (N, ng) and, for mode 0, zero
 * points (N, ng) float32.
 * mode 0: asymmetric (s = (max(hi, 0) - min(lo, 0)) / qmax, z = clamp(round(-lo / s), 0, qmax));
 * mode 1: symmetric, full range (s = the signed value of largest magnitude, first one on ties, over
 * -zc); mode 2: symmetric, restricted (s = max |x| / sqmax); symmetric codes use z = zc.
 * Returns 0; LB_NONFINITE (-3) for a NaN/inf input; -2 out of memory; LB_OUT_OF_RANGE when a non-zero scale lies outside
 * float16's normal range (then nothing is meaningful: the caller quantizes with float32 scales). */
static int affine_rows(const void* w, int dtype, int64_t N, int64_t K, int64_t G, int qmax, int mode, float zc,
                       float sqmax, int pack_bits, uint8_t* out, float* scales, float* zeros, int nthreads,
                       const hqq_opts* h, float mult) {
    const int64_t ng = (K + G - 1) / G;
    const int64_t per = pack_bits == 2 ? 4 : (pack_bits == 4 ? 2 : 1), ldo = (K + per - 1) / per;
    int status = 0;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
    {
        float* buf = dtype == 0 ? NULL : (float*)malloc(sizeof(float) * (size_t)(K > 0 ? K : 1));
        uint8_t* row = per == 1 ? NULL : (uint8_t*)malloc((size_t)(ldo * per));
        /* HQQ: one group scaled (hqq_qparams) and hqq_group's 3 arrays of a group */
        float* ws = h ? (float*)malloc(sizeof(float) * 4 * (size_t)(G < K ? G : (K > 0 ? K : 1))) : NULL;
        if ((dtype != 0 && !buf) || (per != 1 && !row) || (h && !ws)) {
#pragma omp atomic write
            status = -2;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (status) continue;
            const float* x = row_as_float(w, dtype, n, K, buf);
            uint8_t* codes = per == 1 ? out + n * K : row; /* this row's codes */
            for (int64_t g = 0; g < ng; g++) {
                const int64_t k0 = g * G, len = K - k0 < G ? K - k0 : G;
                const float* v = x + k0;
                float s, z;
                const int bad = h ? hqq_qparams(v, len, qmax, mode, zc, sqmax, h, mult, ws, &s, &z)
                                  : rtn_qparams(v, len, qmax, mode, zc, sqmax, &s, &z);
                if (bad) {
#pragma omp atomic write
                    status = bad;
                    break;
                }
                scales[n * ng + g] = s;
                if (zeros) zeros[n * ng + g] = z;
                round_group(v, len, s == 0.0f ? 1.0f : s, z, (float)qmax, codes + k0);
            }
            if (per != 1) { /* packing.pack: code i of a byte at bits i * pack_bits, the row zero-padded */
                uint8_t* o = out + n * ldo;
                for (int64_t k = K; k < ldo * per; k++) codes[k] = 0;
                if (per == 2)
                    for (int64_t j = 0; j < ldo; j++) o[j] = (uint8_t)(codes[2 * j] | (codes[2 * j + 1] << 4));
                else
                    for (int64_t j = 0; j < ldo; j++)
                        o[j] = (uint8_t)(codes[4 * j] | (codes[4 * j + 1] << 2) | (codes[4 * j + 2] << 4) |
                                         (codes[4 * j + 3] << 6));
            }
        }
        free(buf);
        free(row);
        free(ws);
    }
    return status;
}

int lb_rtn_affine(const void* w, int dtype, int64_t N, int64_t K, int64_t G, int qmax, int mode, float zc,
                  float sqmax, int pack_bits, uint8_t* out, float* scales, float* zeros, int nthreads) {
    return affine_rows(w, dtype, N, K, G, qmax, mode, zc, sqmax, pack_bits, out, scales, zeros, nthreads, NULL, 1.0f);
}

/* lb_rtn_affine's output (codes, packed as there; scales; zero points for asymmetric schemes) with
 * HQQ-optimised parameters (hqq.h): each group of w * mult (mult: a power of two, see
 * lowbit.algorithms.hqq._magnitude_shift) optimised for iters iterations of the l_p norm p with
 * coupling beta growing by kappa, errors weighted by |w|^importance; the zero point moves when
 * asym, the scale when opt_scale; a group stops after patience iterations without a lower error
 * (0: all iters). Scales are float16 values (as float32), zero points too.
 * Returns as lb_rtn_affine. */
int lb_hqq_affine(const void* w, int dtype, int64_t N, int64_t K, int64_t G, int qmax, int mode, float zc,
                  float sqmax, int pack_bits, uint8_t* out, float* scales, float* zeros, int nthreads, float p,
                  double beta, double kappa, int iters, float importance, int opt_scale, float mult, int patience) {
    const hqq_opts h = {p, beta, kappa, importance, (float)qmax, iters, zeros != NULL, opt_scale, patience};
    return affine_rows(w, dtype, N, K, G, qmax, mode, zc, sqmax, pack_bits, out, scales, zeros, nthreads, &h, mult);
}

/* How many of the n values at w (dtype 0 float32 / 1 bfloat16 / 2 float16) are NaN or infinite:
 * an all-ones exponent field, tested on the bits (no conversion), threads splitting the range. */
int64_t lb_count_nonfinite(const void* w, int dtype, int64_t n, int nthreads) {
    int64_t bad = 0;
    if (dtype == 0) {
        const uint32_t* p = (const uint32_t*)w;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) reduction(+ : bad) schedule(static)
        for (int64_t i = 0; i < n; i++) bad += (p[i] & 0x7F800000u) == 0x7F800000u;
    } else {
        const uint16_t* p = (const uint16_t*)w;
        const uint16_t m = dtype == 1 ? 0x7F80u : 0x7C00u;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) reduction(+ : bad) schedule(static)
        for (int64_t i = 0; i < n; i++) bad += (p[i] & m) == m;
    }
    return bad;
}
