/* lowbit CPU kernel, portable: plain C over the same packed layouts as avx512.c (read its header
 * for the formulas), for any CPU with a C compiler (ARM/NEON, POWER, RISC-V, x86 without AVX2).
 * Built with -O3 -march=native (or -mcpu=native), so the compiler vectorises the 16-row loops
 * for the machine it is built on; no intrinsics. Integer sums are exact, as in the vector files.
 */
#include "common.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the portable kernel reads byte pairs as little-endian 16-bit words"
#endif

#define LB_ISA_NAME "portable"
#define LB_NO_INTRINSICS /* quantize.h: its plain C loops, as on any CPU */
#define TILE_M0 4

/* Rows rb*16 .. +15 of the output for activation rows m .. m+MT-1 (int16 activations). */
#define DEFINE_TILE(NAME, MT_, BITS_)                                                            \
    static void NAME(const wdesc* d, int64_t rb, int64_t m, const void* qx_, int64_t ldq,         \
                     const float* sx, const int32_t* sumx, int64_t nb, float* y) {                \
        enum { MT = MT_, bits = BITS_, ck = 16 / BITS_, per = 8 / BITS_, mask = (1 << BITS_) - 1 }; \
        const int16_t* qx = (const int16_t*)qx_;                                                \
        const int B = d->B;                                                                     \
        const int64_t nchunks = (d->K + ck - 1) / ck;                                            \
        const uint8_t* wrow = d->w + rb * nchunks * 32;                                         \
        float out[MT][16];                                                                      \
        memset(out, 0, sizeof(out));                                                            \
        const int64_t bpg = blocks_per_group(d, B, nb);                                         \
        for (int64_t b = 0, g = 0, gl = bpg; b < nb; b++, g += (--gl == 0), gl = gl ? gl : bpg) { \
            const int64_t c_end = ((b + 1) * B) / ck < nchunks ? ((b + 1) * B) / ck : nchunks;  \
            int32_t acc[MT][16];                                                                \
            memset(acc, 0, sizeof(acc));                                                        \
            for (int64_t c = (b * B) / ck; c < c_end; c++) {                                    \
                const uint8_t* wp = wrow + c * 32;                                              \
                const int64_t k = c * ck;                                                       \
                uint16_t u[16]; /* row r's two bytes: even columns low, odd columns high */    \
                memcpy(u, wp, 32);                                                              \
                for (int s = 0; s < per; s++) {                                                 \
                    for (int i = 0; i < MT; i++) {                                              \
                        const int32_t x0 = qx[(m + i) * ldq + k + 2 * s];                       \
                        const int32_t x1 = qx[(m + i) * ldq + k + 2 * s + 1];                   \
                        for (int r = 0; r < 16; r++)                                            \
                            acc[i][r] += (int32_t)((u[r] >> (s * bits)) & mask) * x0            \
                                       + (int32_t)((u[r] >> (8 + s * bits)) & mask) * x1;       \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
            float sc[16], z[16];                                                                \
            scales16(d, g, rb, sc);                                                             \
            zeros16(d, g, rb, z, bits);                                                               \
            for (int i = 0; i < MT; i++) {                                                      \
                const float sxi = sx[(m + i) * nb + b], zx = sxi * (float)sumx[(m + i) * nb + b]; \
                for (int r = 0; r < 16; r++)                                                    \
                    out[i][r] += (float)acc[i][r] * sxi * sc[r] - sc[r] * z[r] * zx;            \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < MT; i++) store16(d, rb, y + (m + i) * d->N, out[i]);                 \
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

/* W8A8 tile (tiled4: byte p of a 64-byte chunk = row p/4, column p%4; unsigned codes). */
#define DEFINE_TILE_A8(NAME, MT_)                                                                \
    static void NAME(const wdesc* d, int64_t rb, int64_t m, const void* qx_, int64_t ldq,         \
                     const float* sx, const int32_t* sumx, int64_t ns, float* y) {               \
        enum { MT = MT_, bits = 8 };                                                                   \
        const int8_t* qx = (const int8_t*)qx_;                                                  \
        const int64_t nchunks = (d->K + 3) / 4;                                                 \
        const uint8_t* wrow = d->w + rb * nchunks * 64;                                         \
        const int64_t G = d->G < d->K ? d->G : d->K;                                            \
        const int per_row = d->A <= 0 || d->A >= d->K;                                          \
        const int64_t S = per_row ? G : (d->A < G ? d->A : G);                                  \
        const int64_t sch = S < d->K ? S / 4 : nchunks;                                         \
        float out[MT][16];                                                                      \
        memset(out, 0, sizeof(out));                                                            \
        const int64_t bpg = d->G >= d->K ? ns : G / S; /* segments per group (S divides G) */              \
        for (int64_t b = 0, g = 0, gl = bpg; b < ns; b++, g += (--gl == 0), gl = gl ? gl : bpg) { \
            int32_t acc[MT][16];                                                                \
            memset(acc, 0, sizeof(acc));                                                        \
            const int64_t c1 = (b + 1) * sch < nchunks ? (b + 1) * sch : nchunks;                 \
            for (int64_t c = b * sch; c < c1; c++) {                                            \
                const uint8_t* wp = wrow + c * 64;                                              \
                uint32_t u[16]; /* row r's four codes, column j in byte j */                   \
                memcpy(u, wp, 64);                                                              \
                for (int i = 0; i < MT; i++) {                                                  \
                    const int8_t* xq = qx + (m + i) * ldq + c * 4;                              \
                    const int32_t x0 = xq[0], x1 = xq[1], x2 = xq[2], x3 = xq[3];                \
                    for (int r = 0; r < 16; r++)                                                \
                        acc[i][r] += (int32_t)(u[r] & 255) * x0 + (int32_t)((u[r] >> 8) & 255) * x1 \
                                   + (int32_t)((u[r] >> 16) & 255) * x2 + (int32_t)(u[r] >> 24) * x3; \
                }                                                                               \
            }                                                                                   \
            float sc[16], z[16];                                                                \
            scales16(d, g, rb, sc);                                                             \
            zeros16(d, g, rb, z, bits);                                                               \
            for (int i = 0; i < MT; i++) {                                                      \
                const float sm = (float)sumx[(m + i) * ns + b], sxi = sx[(m + i) * ns + b];      \
                for (int r = 0; r < 16; r++) {                                                  \
                    const float t = (float)acc[i][r] * sc[r] - sc[r] * z[r] * sm;               \
                    out[i][r] += per_row ? t : t * sxi;                                         \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < MT; i++) {                                                          \
            if (per_row)                                                                        \
                for (int r = 0; r < 16; r++) out[i][r] *= sx[(m + i) * ns];                     \
            store16(d, rb, y + (m + i) * d->N, out[i]);                                         \
        }                                                                                       \
    }

DEFINE_TILE_A8(tile4_a8, 4)
DEFINE_TILE_A8(tile2_a8, 2)
DEFINE_TILE_A8(tile1_a8, 1)
static const tile_fn tiles_a8[4] = {tile4_a8, tile2_a8, tile1_a8, tile1_a8};

#define QUANT_ACT quant_act_c
#define QUANT_I8 quant_rows_i8_c

#include "driver.h"
