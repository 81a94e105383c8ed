/* The any-format kernel's two inner steps (driver.h, lb_linear_rows) in AVX2 + FMA + F16C, for
 * avx2.c and avx512.c (which define LB_ROWS_AVX2); portable.c uses the plain C versions.
 *
 * row_dequant: 8 codes per step into 8 int32 lanes (one load, a variable shift per lane, a mask;
 * 3-bit codes: 8 per 3 bytes), then to their values v: integers by conversion, 16-entry tables
 * (NF4) by two vpermps over the table's halves and a blend on the code's bit 3, larger tables
 * (FP8 E4M3) arithmetically, other tables by vgatherdps; then (v - z) * s with the group's zero
 * point and scale broadcast. row_dot: an 8-lane FMA dot product of a dequantized row with one
 * input; row_dot1_vec: the same without storing the row (one input).
 */
#include <immintrin.h>

/* 8 codes from k (a multiple of 8) as int32 lanes; sh: each lane's shift. 3-bit codes are read
 * as one 4-byte word (a byte beyond the 3 is masked off) except in a row's last 8 columns, so no
 * read passes the end of the row. */
INLINE __m256i codes8(const uint8_t* p, int bits, int64_t k, int64_t K, __m256i sh, __m256i mask) {
    if (bits == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + k)));
    /* 8 codes of `bits` bits: `bits` bytes, assembled in a register (a narrower store then a
     * wider load would stall store forwarding) */
    const uint8_t* q = p + k * bits / 8;
    uint32_t w;
    if (bits == 4) memcpy(&w, q, 4);
    else if (bits == 3 && k + 8 < K) memcpy(&w, q, 4);
    else if (bits == 3) w = q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16;
    else { uint16_t h; memcpy(&h, q, 2); w = h; }
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int32_t)w), sh), mask);
}

/* Code values v as floats, from 8 codes in int32 lanes c. */
#define V_INT(c) _mm256_cvtepi32_ps(c)
/* 16-entry table (NF4): the table's halves lo, hi in registers, chosen by the code's bit 3. */
#define V_LUT16(c) _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, c), _mm256_permutevar8x32_ps(hi, c), \
                                    _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)))
#define V_GATHER(c) _mm256_i32gather_ps(lut, c, 4)
/* FP8 E4M3 (OCP; torch.float8_e4m3fn) by arithmetic: magnitude bits eeeemmm -> float bits
 * (eeee + 120) << 23 | mmm << 20 for e > 0, m * 2^-9 for e = 0, NaN for 0x7f; then the sign. */
INLINE __m256 v_e4m3(__m256i c) {
    const __m256i mag = _mm256_and_si256(c, _mm256_set1_epi32(0x7f));
    const __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(mag), _mm256_set1_ps(1.0f / 512.0f));
    __m256 v = _mm256_blendv_ps(normal, sub, _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag)));
    v = _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_set1_epi32(0x7f))));
    return _mm256_or_ps(v, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24)));
}
#define V_E4M3(c) v_e4m3(c)

/* Every group of the row: w = (v - z) * s, as the reference computes it (so w is exactly 0
 * where a code equals its zero point, whatever the scale's precision), 16 (then 8) codes at a
 * time, USE16 / USE8 of w0, w1 at column k; the last columns in scalar (TAIL of wv at k). */
#define ROW_GROUPS(BITS, VALUE, USE16, USE8, TAIL)                                              \
    for (int64_t g = 0, k = 0; k < K; g++) {                                                    \
        const int64_t k1 = k + G < K ? k + G : K;                                               \
        const __m256 vs = _mm256_broadcast_ss(sb + g), vz = _mm256_broadcast_ss(zb + g);        \
        for (; k + 16 <= k1; k += 16) {                                                         \
            const __m256i c0 = codes8(p, BITS, k, K, sh, mask), c1 = codes8(p, BITS, k + 8, K, sh, mask); \
            const __m256 w0 = _mm256_mul_ps(_mm256_sub_ps(VALUE(c0), vz), vs);                   \
            const __m256 w1 = _mm256_mul_ps(_mm256_sub_ps(VALUE(c1), vz), vs);                   \
            USE16;                                                                              \
        }                                                                                       \
        if (k + 8 <= k1) {                                                                      \
            const __m256i c0 = codes8(p, BITS, k, K, sh, mask);                                    \
            const __m256 w0 = _mm256_mul_ps(_mm256_sub_ps(VALUE(c0), vz), vs);                   \
            USE8;                                                                               \
            k += 8;                                                                             \
        }                                                                                       \
        for (; k < k1; k++) {                                                                   \
            const unsigned c = code_at(p, BITS, k);                                             \
            const float wv = ((lut ? lut[c] : (float)c) - zb[g]) * sb[g];                       \
            TAIL;                                                                               \
        }                                                                                       \
    }

/* ROW_GROUPS for the row's format. */
#define ROW_FORMATS(USE16, USE8, TAIL)                                                          \
    if (!lut) {                                                                                 \
        switch (bits) {                                                                         \
        case 8: ROW_GROUPS(8, V_INT, USE16, USE8, TAIL) break;                                  \
        case 4: ROW_GROUPS(4, V_INT, USE16, USE8, TAIL) break;                                  \
        case 3: ROW_GROUPS(3, V_INT, USE16, USE8, TAIL) break;                                  \
        default: ROW_GROUPS(2, V_INT, USE16, USE8, TAIL) break;                                 \
        }                                                                                       \
    } else if (bits == 4) {                                                                     \
        ROW_GROUPS(4, V_LUT16, USE16, USE8, TAIL)                                               \
    } else if (bits == 8 && d->e4m3) {                                                          \
        ROW_GROUPS(8, V_E4M3, USE16, USE8, TAIL)                                                \
    } else {                                                                                    \
        switch (bits) {                                                                         \
        case 8: ROW_GROUPS(8, V_GATHER, USE16, USE8, TAIL) break;                               \
        case 3: ROW_GROUPS(3, V_GATHER, USE16, USE8, TAIL) break;                               \
        default: ROW_GROUPS(2, V_GATHER, USE16, USE8, TAIL) break;                              \
        }                                                                                       \
    }

/* The row's per-group scales s and zero points z, float32, into sb, zb (ng each). */
static void row_params(const rdesc* d, int64_t n, int64_t ng, float* sb, float* zb) {
    int64_t g = 0;
    if (d->lds && !d->s32) {
        const uint16_t* h = (const uint16_t*)d->sw + n * d->lds;
        for (; g + 8 <= ng; g += 8) _mm256_storeu_ps(sb + g, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + g))));
        for (; g < ng; g++) sb[g] = _cvtsh_ss(h[g]);
    } else if (d->lds) {
        memcpy(sb, (const float*)d->sw + n * d->lds, sizeof(float) * (size_t)ng);
    } else {
        const float s = d->s32 ? ((const float*)d->sw)[0] : _cvtsh_ss(((const uint16_t*)d->sw)[0]);
        for (; g < ng; g++) sb[g] = s;
    }
    if (d->ztype == 0) {
        for (g = 0; g < ng; g++) zb[g] = (float)d->zconst;
    } else {
        for (g = 0; g < ng; g++) zb[g] = rzero(d, n, g);
    }
}

/* ROW_SETUP (driver.h) plus the shift, mask and 16-entry table registers. */
#define ROW_SETUP_AVX2                                                                          \
    ROW_SETUP(row_params)                                                                       \
    const __m256i sh = _mm256_setr_epi32(0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits); \
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);                                    \
    const __m256 lo = lut && bits == 4 ? _mm256_loadu_ps(lut) : _mm256_setzero_ps();            \
    const __m256 hi = lut && bits == 4 ? _mm256_loadu_ps(lut + 8) : _mm256_setzero_ps();        \
    (void)lo; (void)hi;

/* Row n of dequant(W), float32, into out[0 .. K); scratch: 2 * groups floats. */
static int row_dequant_vec(const rdesc* d, int64_t n, float* out, float* scratch) {
    ROW_SETUP_AVX2
    ROW_FORMATS((_mm256_storeu_ps(out + k, w0), _mm256_storeu_ps(out + k + 8, w1)), _mm256_storeu_ps(out + k, w0),
                out[k] = wv)
    return 1;
}

/* The sum of a vector's 8 lanes. */
INLINE float hsum8(__m256 t) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* sum_k a[k] b[k]: four 8-lane FMA accumulators, added once at the end. */
INLINE float row_dot(const float* a, const float* b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 16), _mm256_loadu_ps(b + k + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 24), _mm256_loadu_ps(b + k + 24), s3);
    }
    for (; k + 8 <= n; k += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s0);
    float r = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; k < n; k++) r += a[k] * b[k];
    return r;
}

/* One input (M = 1): x . dequant(W)[n] without storing the row; returns 0 where the plain C
 * path must run. */
static int row_dot1_vec(const rdesc* d, int64_t n, const float* x, float* scratch, float* y) {
    ROW_SETUP_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    float rest = 0.0f;
    ROW_FORMATS((a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0), a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + k + 8), a1)),
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + k), a0), rest += wv * x[k])
    *y = hsum8(_mm256_add_ps(a0, a1)) + rest;
    return 1;
}
