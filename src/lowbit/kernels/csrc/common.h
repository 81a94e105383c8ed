/* lowbit CPU kernels: what every instruction-set file shares (included first).
 *
 * One source per ISA family: avx512.c (AVX-512 VNNI), avx2.c (AVX2 + FMA + F16C), portable.c
 * (plain C the compiler vectorises for the machine it is built on). Each is built into its own
 * library with the same entry points (driver.h); kernels/cpu.py picks one at run time. All read
 * the same weight layouts (packing.py: tile(), tile4()), so switching ISA needs no conversion.
 */
#ifdef _OPENMP
#include <omp.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define LB_ABI 17

/* This thread's number in the current OpenMP team (0 without OpenMP). */
INLINE int thread_num(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* One quantized weight in tiled layout; kernels/cpu.py builds it (same field order). */
typedef struct {
    const uint8_t* w;     /* (ceil(N/16), nchunks * 32) tiled codes (tiled4: nchunks * 64) */
    const void* sw;       /* scales, float16 (float32 when s32): scale of group g, row rb*16 + r at
                             g * ldsw + rb * ldsrb + r (row-block-major: ldsw 16, ldsrb ng * 16);
                             ldsw = 0: one scale for the tensor */
    int64_t ldsw;
    const uint8_t* zw;    /* packed zero codes: group g of row block rb at byte g * ldz + rb * ldzrb,
                             its 16 rows packed like codes; NULL: the constant zconst */
    int64_t ldz;
    int32_t zconst, bits;
    int64_t N, K, G;      /* rows, columns, group size (>= K: one group) */
    int32_t B;            /* int16 path: activation block, 32 or 64 */
    int32_t A;            /* W8A8 path: columns per activation scale (0 or >= K: one per row) */
    const float* bias;    /* (N,) or NULL */
    int32_t s32;          /* scales are float32 (weights beyond float16's normal range) */
    const uint16_t* zf;   /* fractional zero points, float16, laid out like the scales, or NULL */
    int64_t ldsrb, ldzrb; /* row-block strides of the scales (elements) and packed zeros (bytes) */
} wdesc;

/* Scale i (a flat index into sw) as a float. */
INLINE float scale_at(const wdesc* d, int64_t i);

/* One output tile: rows rb*16 .. +15 for activation rows m .. m+TILE_M(slot)-1; qx is the
 * kernel's quantized activations (int16 for lb_linear, int8 for lb_linear_a8). */
typedef void (*tile_fn)(const wdesc*, int64_t, int64_t, const void*, int64_t, const float*, const int32_t*,
                        int64_t, float*);

/* IEEE binary16 -> binary32 without F16C (exact for every input). */
INLINE float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) { man <<= 1; exp--; }
        bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

INLINE float scale_at(const wdesc* d, int64_t i) {
    return d->s32 ? ((const float*)d->sw)[i] : half_to_float(((const uint16_t*)d->sw)[i]);
}

/* 16 rows' scales (rows rb*16 ..) of group g as floats. */
INLINE void scales16(const wdesc* d, int64_t g, int64_t rb, float* s) {
    if (d->ldsw == 0) {
        const float v = scale_at(d, 0);
        for (int r = 0; r < 16; r++) s[r] = v;
        return;
    }
    for (int r = 0; r < 16; r++) s[r] = scale_at(d, g * d->ldsw + rb * d->ldsrb + r);
}

/* 16 rows' zero points of group g as floats (zeros packed along rows like the codes, ``bits``
 * each: a compile-time constant at every call, so the divisions below are shifts). */
INLINE void zeros16(const wdesc* d, int64_t g, int64_t rb, float* z, int bits) {
    if (d->zf) {
        const uint16_t* p = d->zf + (d->ldsw ? g * d->ldsw + rb * d->ldsrb : 0);
        for (int r = 0; r < 16; r++) z[r] = half_to_float(p[d->ldsw ? r : 0]);
        return;
    }
    if (!d->zw) {
        for (int r = 0; r < 16; r++) z[r] = (float)d->zconst;
        return;
    }
    const int per = 8 / bits, mask = (1 << bits) - 1;
    const uint8_t* p = d->zw + g * d->ldz + rb * d->ldzrb;
    for (int r = 0; r < 16; r++) z[r] = (float)((p[r / per] >> (bits * (r % per))) & mask);
}

/* Blocks of B columns per weight group (nb when one group spans the row): the group index
 * advances every this many blocks. */
INLINE int64_t blocks_per_group(const wdesc* d, int64_t B, int64_t nb) { return d->G >= d->K ? nb : d->G / B; }

/* Scalar store of a 16-row output tile row: y[row, n0 .. n0+nr) = v[0 .. nr) + bias. */
INLINE void store16(const wdesc* d, int64_t rb, float* yrow, const float* v) {
    const int64_t n0 = rb * 16;
    const int nr = d->N - n0 < 16 ? (int)(d->N - n0) : 16;
    for (int r = 0; r < nr; r++) yrow[n0 + r] = v[r] + (d->bias ? d->bias[n0 + r] : 0.0f);
}

/* 1 when every x[0 .. n) is finite: integer activations cannot carry NaN or inf, so the entry
 * points that round their inputs refuse them (-3) and the caller runs the float reference. */
INLINE int all_finite(const float* x, int64_t n) {
    uint32_t bad = 0;
    for (int64_t k = 0; k < n; k++) {
        uint32_t u;
        memcpy(&u, x + k, 4);
        bad |= (u & 0x7f800000u) == 0x7f800000u; /* exponent all ones: inf or NaN */
    }
    return !bad;
}

/* Portable activation quantizers (the AVX-512 file has its own). Same arithmetic as the
 * vector versions: round half to even of x * inv, inv the reciprocal of the step. */

/* Rows of x (M, K) to int16 qx (M, nb*B) zero-padded; per block of B columns the step
 * sx = absmax / 32767 and sumx = the sum of the block's codes (nb = ceil(K / B)). */
__attribute__((unused)) static void quant_act_c(const float* x, int64_t M, int64_t K, int B, int16_t* qx, float* sx, int32_t* sumx,
                        int nthreads) {
    const int64_t nb = (K + B - 1) / B;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        int16_t* qr = qx + m * nb * B;
        for (int64_t b = 0; b < nb; b++) {
            const int64_t c0 = b * B;
            const int n = (int)((K - c0) < B ? (K - c0) : B);
            float amax = 0.0f;
            for (int c = 0; c < n; c++) amax = fmaxf(amax, fabsf(xr[c0 + c]));
            const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            int32_t sum = 0;
            for (int c = 0; c < B; c++) {
                float v = c < n ? rintf(xr[c0 + c] * inv) : 0.0f;
                v = v > 32767.0f ? 32767.0f : (v < -32768.0f ? -32768.0f : v);
                const int32_t q = (int32_t)v;
                qr[c0 + c] = (int16_t)q;
                sum += q;
            }
            sx[m * nb + b] = amax / 32767.0f;
            sumx[m * nb + b] = sum;
        }
    }
}

/* Rows of x (M, K) to int8 qx (M, ldq) zero-padded; per (row, segment of S columns) scales sx
 * and sums sumx (M, ns); A: columns per scale (a multiple of S, or >= K). static_scale > 0: use
 * it instead of each block's absmax / 127. Codes clamp to -127..127. */
__attribute__((unused)) static void quant_rows_i8_c(const float* x, int64_t M, int64_t K, int64_t ldq, int64_t S, int64_t ns, int64_t A,
                            float static_scale, int8_t* qx, float* sx, int32_t* sumx, int nthreads) {
    if (A <= 0 || A > K) A = K;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        const float* xr = x + m * K;
        int8_t* qr = qx + m * ldq;
        for (int64_t a0 = 0; a0 < K; a0 += A) {
            const int64_t a1 = a0 + A < K ? a0 + A : K;
            float scale = static_scale;
            if (scale <= 0.0f) {
                float amax = 0.0f;
                for (int64_t c = a0; c < a1; c++) amax = fmaxf(amax, fabsf(xr[c]));
                scale = amax / 127.0f;
            }
            const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            for (int64_t c = a0; c < a1; c++) {
                float v = rintf(xr[c] * inv);
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                qr[c] = (int8_t)v;
            }
            for (int64_t b = a0 / S; b * S < a1; b++) sx[m * ns + b] = scale;
        }
        for (int64_t c = K; c < ldq; c++) qr[c] = 0;
        for (int64_t b = 0; b < ns; b++) {
            const int64_t c1 = (b + 1) * S < K ? (b + 1) * S : K;
            int32_t sum = 0;
            for (int64_t c = b * S; c < c1; c++) sum += qr[c];
            sumx[m * ns + b] = sum;
        }
    }
}
