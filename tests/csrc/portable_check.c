/* Self-contained check of the portable kernel (src/lowbit/kernels/csrc/portable.c) against a
 * plain double-precision reference, for builds where Python cannot run the kernel (a cross
 * compiler and an emulator, e.g. aarch64 under qemu-user). Prints one line per case and exits
 * non-zero on any mismatch. Built by tests/test_kernels.py:
 *   cc -O2 -fopenmp -I src/lowbit/kernels/csrc tests/csrc/portable_check.c -lm
 */
#include "portable.c"

#include <stdio.h>

static uint32_t rng = 12345u;
static uint32_t next(void) { rng = rng * 1664525u + 1013904223u; return rng >> 8; }
static float uniform(void) { return (float)(next() % 20001) / 10000.0f - 1.0f; }

static uint16_t to_half(float f) { /* normal range only, round to nearest even */
    uint32_t b;
    memcpy(&b, &f, 4);
    const uint32_t sign = (b >> 16) & 0x8000u;
    int32_t e = (int32_t)((b >> 23) & 0xFF) - 127 + 15;
    uint32_t m = b & 0x7FFFFF;
    uint32_t h = sign | ((uint32_t)e << 10) | (m >> 13);
    const uint32_t rest = m & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return (uint16_t)h;
}

/* One weight-only case: N x K codes of `bits`, groups of G, symmetric or with packed zeros. */
static int check_linear(int bits, int64_t N, int64_t K, int64_t G, int asym, int64_t M) {
    const int ck = 16 / bits, per = 8 / bits;
    const int64_t nrb = (N + 15) / 16, npad = nrb * 16, nchunks = (K + ck - 1) / ck, ng = (K + G - 1) / G;
    uint8_t* codes = calloc((size_t)(N * K), 1);
    uint8_t* tiled = calloc((size_t)(nrb * nchunks * 32), 1);
    /* row-block-major parameters: group g of row n at (n / 16) * ng * 16 + g * 16 + n % 16 */
    uint16_t* sw = calloc((size_t)(ng * npad), 2);
    uint8_t* zw = calloc((size_t)(ng * npad), 1);
    const int64_t zb = 2 * bits; /* bytes of one group's 16 packed zero codes */
    float* x = malloc(sizeof(float) * M * K);
    float* y = malloc(sizeof(float) * M * N);
    const int levels = 1 << bits;
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            const uint8_t c = (uint8_t)(next() % levels);
            codes[n * K + k] = c;
            const int64_t rb = n / 16, rr = n % 16, ch = k / ck, j = k % ck;
            tiled[rb * nchunks * 32 + ch * 32 + 2 * rr + (j % 2)] |= (uint8_t)(c << (bits * (j / 2)));
        }
    for (int64_t g = 0; g < ng; g++)
        for (int64_t n = 0; n < N; n++) {
            sw[(n / 16) * ng * 16 + g * 16 + n % 16] = to_half(0.01f + 0.05f * (uniform() + 1.0f));
            const uint8_t z = (uint8_t)(next() % levels);
            if (asym) zw[(n / 16) * ng * zb + g * zb + (n % 16) / per] |= (uint8_t)(z << (bits * (n % per)));
        }
    for (int64_t i = 0; i < M * K; i++) x[i] = 3.0f * uniform();
    wdesc d = {0};
    d.w = tiled; d.sw = sw; d.ldsw = 16; d.ldsrb = ng * 16; d.zw = asym ? zw : NULL; d.ldz = zb; d.ldzrb = ng * zb;
    d.zconst = 1 << (bits - 1); d.bits = bits; d.N = N; d.K = K; d.G = G >= K ? K : G;
    d.B = (G >= K) ? (K > 128 ? 256 : 64) : (G % 256 == 0 ? 256 : G % 128 == 0 ? 128 : G % 64 == 0 ? 64 : 32);
    if (lb_linear(&d, x, M, y, 2) != 0) { printf("lb_linear refused bits=%d\n", bits); return 1; }
    double worst = 0.0, ymax = 0.0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double ref = 0.0;
            for (int64_t k = 0; k < K; k++) {
                const int64_t g = k / d.G;
                const int64_t zi = (n / 16) * ng * zb + g * zb + (n % 16) / per;
                const double z = asym ? (double)((zw[zi] >> (bits * (n % per))) & (levels - 1)) : (double)d.zconst;
                ref += ((double)codes[n * K + k] - z) * half_to_float(sw[(n / 16) * ng * 16 + g * 16 + n % 16]) * x[m * K + k];
            }
            const double err = fabs(ref - y[m * N + n]);
            worst = err > worst ? err : worst;
            ymax = fabs(ref) > ymax ? fabs(ref) : ymax;
        }
    const int ok = worst <= 2e-3 * ymax + 1e-5;
    printf("%s lb_linear bits=%d N=%ld K=%ld G=%ld asym=%d M=%ld: max err %.3g of %.3g\n", ok ? "ok  " : "FAIL", bits,
           (long)N, (long)K, (long)G, asym, (long)M, worst, ymax);
    free(codes); free(tiled); free(sw); free(zw); free(x); free(y);
    return !ok;
}

/* One any-format case (lb_linear_rows, lb_dequant_rows): row layout of `bits`-bit codes, a value
 * table or none, groups of G, packed integer zeros or none. */
static int check_rows(int bits, int table, int64_t N, int64_t K, int64_t G, int asym, int64_t M) {
    const int levels = 1 << bits;
    const int64_t ldw = (K * bits + 7) / 8 + (bits == 3 ? 2 : 0), ng = (K + G - 1) / G, ldz = (ng * bits + 7) / 8 + 2;
    uint8_t* w = calloc((size_t)(N * ldw), 1);
    uint8_t* zw = calloc((size_t)(N * ldz), 1);
    uint16_t* sw = calloc((size_t)(N * ng), 2);
    float* lut = malloc(sizeof(float) * levels);
    float* x = malloc(sizeof(float) * M * K);
    float* y = malloc(sizeof(float) * M * N);
    float* rows = malloc(sizeof(float) * N * K);
    uint8_t* codes = malloc((size_t)(N * K));
    for (int i = 0; i < levels; i++) lut[i] = (float)(i * i) / (float)(levels * levels) - 0.3f;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) { /* pack little-endian, bit k * bits onward */
            const unsigned c = next() % levels;
            codes[n * K + k] = (uint8_t)c;
            for (int b = 0; b < bits; b++)
                if (c >> b & 1) w[n * ldw + (k * bits + b) / 8] |= (uint8_t)(1u << ((k * bits + b) % 8));
        }
        for (int64_t g = 0; g < ng; g++) {
            sw[n * ng + g] = to_half(0.01f + 0.05f * (uniform() + 1.0f));
            const unsigned z = next() % levels;
            for (int b = 0; b < bits; b++)
                if (z >> b & 1) zw[n * ldz + (g * bits + b) / 8] |= (uint8_t)(1u << ((g * bits + b) % 8));
        }
    }
    for (int64_t i = 0; i < M * K; i++) x[i] = uniform();
    rdesc d = {w, ldw, bits, table ? lut : NULL, sw, ng, 0, asym ? 1 : 0, asym ? zw : NULL, ldz, 0, N, K, G, NULL, 0};
    if (lb_linear_rows(&d, x, M, y, 2) != 0 || lb_dequant_rows(&d, 0, N, rows, 2) != 0) {
        printf("rows refused bits=%d\n", bits);
        return 1;
    }
    double worst = 0, top = 0, worst_row = 0;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < K; k++) {
            const int64_t g = k / G;
            unsigned z = 0;
            if (asym)
                for (int b = 0; b < bits; b++) z |= (unsigned)(zw[n * ldz + (g * bits + b) / 8] >> ((g * bits + b) % 8) & 1) << b;
            const double v = table ? lut[codes[n * K + k]] : codes[n * K + k];
            const double want = (v - z) * half_to_float(sw[n * ng + g]);
            const double e = fabs(want - rows[n * K + k]);
            if (e > worst_row) worst_row = e;
        }
        for (int64_t m = 0; m < M; m++) {
            double ref = 0;
            for (int64_t k = 0; k < K; k++) ref += (double)rows[n * K + k] * x[m * K + k];
            const double e = fabs(ref - y[m * N + n]);
            if (e > worst) worst = e;
            if (fabs(ref) > top) top = fabs(ref);
        }
    }
    const int ok = worst <= 1e-4 * (top + 1) && worst_row <= 1e-6;
    printf("%s lb_linear_rows bits=%d table=%d N=%ld K=%ld G=%ld asym=%d M=%ld: max err %.3g of %.3g, rows %.3g\n",
           ok ? "ok  " : "FAIL", bits, table, (long)N, (long)K, (long)G, asym, (long)M, worst, top, worst_row);
    free(w); free(zw); free(sw); free(lut); free(x); free(y); free(rows); free(codes);
    return !ok;
}

int main(void) {
    int bad = 0;
    bad += check_linear(4, 37, 200, 64, 0, 1);
    bad += check_linear(4, 64, 256, 32, 1, 5);
    bad += check_linear(8, 21, 130, 1 << 30, 0, 3);
    bad += check_linear(8, 16, 96, 32, 1, 9);
    bad += check_linear(2, 40, 320, 64, 1, 2);
    bad += check_linear(2, 17, 64, 1 << 30, 0, 1);
    bad += check_rows(3, 0, 19, 200, 64, 1, 1);
    bad += check_rows(3, 0, 7, 131, 1 << 30, 0, 3);
    bad += check_rows(4, 1, 23, 96, 16, 0, 1);
    bad += check_rows(4, 1, 9, 100, 20, 1, 2);
    bad += check_rows(8, 1, 11, 72, 24, 0, 1);
    bad += check_rows(2, 0, 13, 64, 16, 1, 4);
    printf("%s (%s)\n", bad ? "FAILED" : "all passed", lb_isa());
    return bad != 0;
}
