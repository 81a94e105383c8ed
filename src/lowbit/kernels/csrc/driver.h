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

/* Scales and zero points are group-major, (ng, ldsw): a tile reads one short run of each of
 * the ng rows, which the hardware prefetcher does not foresee (weights that are not in cache
 * then stall on every group). Prefetch the next tile's runs while this one computes. */
static void prefetch_params(const wdesc* d, int64_t rb) {
    if (d->ldsw == 0) return;
    const int64_t ng = d->G >= d->K ? 1 : (d->K + d->G - 1) / d->G;
    const int esz = d->s32 ? 4 : 2;
    for (int64_t g = 0; g < ng; g++) {
        const char* p = (const char*)d->sw + (g * d->ldsw + rb * 16) * esz;
        __builtin_prefetch(p);
        __builtin_prefetch(p + 16 * esz - 1);
        if (d->zw) __builtin_prefetch(d->zw + g * d->ldz + rb * 16 * d->bits / 8);
    }
}

/* y (M, N) by tiles: t[0..3] handle TILE_M0, TILE_M0/2, TILE_M0/4 and 1 activation rows; nb is
 * sx/sumx's row stride. Threads split the 16-row blocks of the output. */
static void run_tiles(const wdesc* d, int64_t M, const tile_fn t[4], const void* qx, int64_t ldq, const float* sx,
                      const int32_t* sumx, int64_t nb, float* y, int nthreads) {
    const int64_t nrb = (d->N + 15) / 16;
    const int m0s = TILE_M0, m1s = TILE_M0 / 2, m2s = TILE_M0 / 4 > 0 ? TILE_M0 / 4 : 1;
    /* Small products do not pay for waking a second thread (decode-size layers do). */
    if (M * d->N * d->K < (1 << 16)) nthreads = 1;
#pragma omp parallel num_threads(nthreads)
    for (int64_t mb = 0; mb < M; mb += MC) {
        const int64_t m1 = mb + MC < M ? mb + MC : M;
#pragma omp for schedule(static) nowait
        for (int64_t rb = 0; rb < nrb; rb++) {
            if (mb == 0 && rb + 1 < nrb) prefetch_params(d, rb + 1);
            int64_t m = mb;
            for (; m + m0s <= m1; m += m0s) t[0](d, rb, m, qx, ldq, sx, sumx, nb, y);
            if (m + m1s <= m1) { t[1](d, rb, m, qx, ldq, sx, sumx, nb, y); m += m1s; }
            if (m + m2s <= m1) { t[2](d, rb, m, qx, ldq, sx, sumx, nb, y); m += m2s; }
            for (; m < m1; m++) t[3](d, rb, m, qx, ldq, sx, sumx, nb, y);
        }
    }
}

/* y (M, N) float32 = x (M, K) float32 @ dequant(W)^T + bias, W in the tiled layout.
 * Returns 0; -1 for a descriptor the kernel cannot run; -2 when out of memory. */
int lb_linear(const wdesc* d, const float* x, int64_t M, float* y, int nthreads) {
    const int B = d->B, bits = d->bits;
    if (B < 32 || B > 256 || B % 32 || !(bits == 2 || bits == 4 || bits == 8)) return -1;
    if (d->G < d->K && d->G % B) return -1;
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

/* y (M, N) float32 = quant_i8(x) @ dequant(W)^T + bias, for 8-bit weights in the tiled4 layout.
 * static_scale > 0: the activations' calibrated scale (one per tensor); else dynamic scales per
 * row, or per row and block of d->A columns.
 * Returns 0, -1 for a descriptor the kernel cannot run, -2 when out of memory. */
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
        int thread = 0;
#ifdef _OPENMP
        thread = omp_get_thread_num();
#endif
        int32_t* acc = accs + (int64_t)thread * C;
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
