/* lowbit CPU kernels: HQQ's half-quadratic optimisation of one group's scale and zero point, fused
 * (included by quantize.h's user, driver.h, after quantize.h).
 *
 * The same iteration as lowbit.algorithms.hqq.optimize_qparams (Badri and Shaji, "Half-Quadratic
 * Quantization of Large Machine Learning Models", 2023, with lowbit's |w|^importance weighting and
 * least-squares scale), run on one group at a time while it sits in L1: for a group of G weights
 * g (already multiplied by the power of two that brings the tensor into HQQ's magnitude band),
 *   e = g - (q - z) s,  W_e = sign(e) relu(|e| - omega |e|^(p-1) / beta),  t = g - W_e,
 *   z = sum(omega (q - t / s)) / sum(omega)                       (asymmetric schemes)
 *   s = sum(omega t (q - z)) / sum(omega (q - z)^2)               (when the scale is optimised)
 *   beta *= kappa,  q = clamp(round(g / s + z), 0, qmax),  keep (s, z) of the lowest
 *   sum(omega |e|^p); a group stops after `patience` iterations without a lower error.
 * Differences from the torch version, all at float32 rounding level: |x|^p is a polynomial
 * (log2 / exp2, relative error below 5e-7) instead of torch's pow; |e|^(p-1) is |e|^p / |e|;
 * g / s is g * (1 / s); sums run in 16 fixed lanes (the same order on every ISA) instead of
 * torch's; one pass per iteration measures the error and forms the next targets and zero point.
 * Which codes a tie picks can therefore differ from the torch version; the quality does not.
 */

#define LB_LANES 16

/* log2(x) for a positive normal float32 x (0 and subnormals give about -127: callers treat such
 * values as zero): the exponent, and log2(1 + u) = u P6(u) for the mantissa 1 + u brought into
 * [sqrt(1/2), sqrt(2)) by integer operations. P6 fitted here (Lawson's iteratively weighted least
 * squares, near-minimax): absolute error 3e-7. Plain C that compilers vectorise. */
INLINE float log2_pos(float x) {
    int32_t i;
    memcpy(&i, &x, 4);
    const int32_t r = i - 0x3F3504F3; /* the bits of sqrt(1/2): mantissa offset into [sqrt(1/2), sqrt(2)) */
    const int32_t e = r >> 23;        /* arithmetic shift: the exponent of x / sqrt(1/2), floored */
    const int32_t mi = (r & 0x7FFFFF) + 0x3F3504F3;
    float m;
    memcpy(&m, &mi, 4);
    const float u = m - 1.0f;
    return (float)e + u * (1.4426996708f + u * (-0.7213758826f + u * (0.4804650247f + u * (-0.3589618504f +
                          u * (0.2972626090f + u * (-0.2726979256f + u * 0.1706343740f))))));
}

/* 2^y for y in [-126, 127]: the integer part into the exponent bits, 2^f = P5(f) for |f| <= 1/2
 * (fitted as log2_pos's polynomial; relative error 2e-7). */
INLINE float exp2_in_range(float y) {
    const float n = nearbyintf(y), f = y - n;
    const float r = 1.0000001192f + f * (0.6931469440f + f * (0.2402212024f + f * (0.0555071309f +
                    f * (0.0096755419f + f * 0.0013276478f))));
    const uint32_t sb = (uint32_t)((int32_t)n + 127) << 23;
    float sc;
    memcpy(&sc, &sb, 4);
    return r * sc;
}

/* x^p for x >= 0 and any p (0 and float32 subnormals give 0); relative error below 5e-7 for
 * |p| <= 2. */
INLINE float pow_pos(float x, float p) {
    float y = p * log2_pos(x);
    y = y < -126.0f ? -126.0f : (y > 127.0f ? 127.0f : y);
    return x >= 1.17549435e-38f ? exp2_in_range(y) : 0.0f;
}

/* acc[0..16) summed in one fixed order. */
INLINE float lanes_sum(const float* a) {
    float t[8];
    for (int i = 0; i < 8; i++) t[i] = a[i] + a[i + 8];
    for (int i = 0; i < 4; i++) t[i] += t[i + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
}

typedef struct {
    float p;               /* the l_p norm */
    double beta, kappa;    /* its coupling and growth per iteration (in double, as Python's floats) */
    float importance, top; /* |w| weighting exponent, qmax */
    int iters, asym, scale; /* iterations; whether the zero point / the scale are optimised */
    int patience;           /* a group stops after this many iterations without a lower error (0: never) */
} hqq_opts;

/* One element of hqq_error: its code c, |e|^p (returned in AD) and the next iteration's target
 * t = g - sign(e) relu(|e| - w |e|^(p-1) / beta). |e|^p and |e|^(p-1) share one log2 (|e| below
 * 1e-12 counts as 1e-12 in |e|^(p-1), as in the torch version; in |e|^p it gives 2^(-127p) or
 * less instead of 0, nothing beside any real error). For 0 < p < 1 both exponents stay within
 * float32's range, no clamping needed. */
#define HQQ_ELEMENT(G, W, C, T, AD)                                                      \
    do {                                                                                 \
        float c_ = nearbyintf((G) * inv + z);                                            \
        c_ = c_ < 0.0f ? 0.0f : (c_ > top ? top : c_);                                   \
        const float e_ = (G) - (c_ - z) * s, ae_ = fabsf(e_), l_ = log2_pos(ae_);          \
        const float a_ = exp2_in_range(p * l_);                                          \
        const float thr_ = (W) * exp2_in_range(pm1 * (l_ > lfloor ? l_ : lfloor)) * ib;  \
        const float sh_ = ae_ - thr_ > 0.0f ? ae_ - thr_ : 0.0f;                         \
        (C) = c_;                                                                        \
        (T) = (G) - (e_ < 0.0f ? -sh_ : sh_);                                            \
        (AD) = a_;                                                                       \
    } while (0)

/* The l_p error sum(om |e|^p) of (s, z) over g[0..len), e = g - (q - z) s; with it the codes q and,
 * for the next iteration (coupling 1 / ib), the targets t = g - shrink(e) and *zsum =
 * sum(om (q - t / s)), the zero point's numerator. */
static float hqq_error(const float* g, const float* om, int64_t len, float s, float z, float ib,
                       const hqq_opts* h, float* q, float* t, float* zsum) {
    float acc[LB_LANES] = {0}, accz[LB_LANES] = {0};
    const float inv = 1.0f / (s == 0.0f ? 1.0f : s), top = h->top, p = h->p, pm1 = h->p - 1.0f;
    const float lfloor = -39.863137f; /* log2(1e-12) */
    int64_t k = 0;
    for (; k + LB_LANES <= len; k += LB_LANES) {
#pragma omp simd
        for (int j = 0; j < LB_LANES; j++) {
            float c, tt, a;
            HQQ_ELEMENT(g[k + j], om[k + j], c, tt, a);
            q[k + j] = c;
            t[k + j] = tt;
            acc[j] += a * om[k + j];
            accz[j] += (c - tt * inv) * om[k + j];
        }
    }
    for (; k < len; k++) {
        float c, tt, a;
        HQQ_ELEMENT(g[k], om[k], c, tt, a);
        q[k] = c;
        t[k] = tt;
        acc[k % LB_LANES] += a * om[k];
        accz[k % LB_LANES] += (c - tt * inv) * om[k];
    }
    *zsum = lanes_sum(accz);
    return lanes_sum(acc);
}

/* Optimise (*s, *z), min/max parameters on entry, for group g[0..len); ws holds 3 * len floats. */
static void hqq_group(const float* g, int64_t len, float* sp, float* zp, const hqq_opts* h, float* ws) {
    float *om = ws, *q = ws + len, *t = ws + 2 * len;
    float acc[LB_LANES] = {0}, acc2[LB_LANES];
    const float imp = h->importance;
    int64_t k;
    for (k = 0; k < len; k++) om[k] = 1.0f;
    if (imp != 0.0f) {
#pragma omp simd
        for (k = 0; k < len; k++) om[k] = pow_pos(fabsf(g[k]), imp);
    }
    for (k = 0; k < len; k++) acc[k % LB_LANES] += om[k];
    float mean = lanes_sum(acc) / (float)len;
    mean = mean < 1e-12f ? 1e-12f : mean;
    for (k = 0; k < LB_LANES; k++) acc[k] = 0.0f;
#pragma omp simd
    for (k = 0; k < len; k++) om[k] = om[k] / mean;
    for (k = 0; k < len; k++) acc[k % LB_LANES] += om[k];
    float som = lanes_sum(acc);
    som = som < 1e-12f ? 1e-12f : som;
    float s = *sp, z = *zp, zsum;
    double beta = h->beta;
    float best = hqq_error(g, om, len, s, z, (float)(1.0 / beta), h, q, t, &zsum), bs = s, bz = z;
    for (int it = 0, stale = 0; it < h->iters; it++) {
        if (h->asym) z = zsum / som;
        if (h->scale) {
            for (k = 0; k < LB_LANES; k++) acc[k] = acc2[k] = 0.0f;
            for (k = 0; k + LB_LANES <= len; k += LB_LANES) {
#pragma omp simd
                for (int j = 0; j < LB_LANES; j++) {
                    const float d = q[k + j] - z, wd = om[k + j] * d;
                    acc[j] += wd * d;
                    acc2[j] += wd * t[k + j];
                }
            }
            for (; k < len; k++) {
                const float d = q[k] - z, wd = om[k] * d;
                acc[k % LB_LANES] += wd * d;
                acc2[k % LB_LANES] += wd * t[k];
            }
            const float den = lanes_sum(acc);
            if (den != 0.0f) s = lanes_sum(acc2) / den;
        }
        beta *= h->kappa;
        const float err = hqq_error(g, om, len, s, z, (float)(1.0 / beta), h, q, t, &zsum);
        if (err < best) {
            best = err;
            bs = s;
            bz = z;
            stale = 0;
        } else if (++stale == h->patience) {
            break;
        }
    }
    *sp = bs;
    *zp = bz;
}

/* *out = the float16 value nearest f (round to nearest even, float16 subnormals included), as
 * float32; returns 1 (and leaves *out) when |f| lies beyond float16's largest finite value. */
INLINE int round_half(float f, float* out) {
    const float a = fabsf(f);
    if (a > 65504.0f) return 1;
    *out = a < 6.103515625e-05f ? nearbyintf(f * 16777216.0f) / 16777216.0f /* steps of 2^-24 */
                                : half_to_float(float_to_half_normal(f));
    return 0;
}
