/* codec.c: the codec table (spec -> block layout and kernels), IEEE half
 * conversion, and the portable kernels of each element format.
 *
 * Layouts (kvcache.h): K blocks are dimension-major (dim, B) so a score loop
 * runs over contiguous tokens; V blocks are token-major (B, dim). int8 blocks
 * end with an fp16 scale per token, 16-byte aligned inside the block. The
 * portable kernels here are the reference the AVX2 ones (codec_avx2.c) are
 * tested against; both read pages in place. */
#include "cache/codec.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "cache/pool_internal.h"

/* ---- IEEE half ----------------------------------------------------------- */

uint16_t kvc__f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t a = x & 0x7fffffffu;
    if (a >= 0x7f800000u) {                       /* inf, NaN (quieted, payload kept) */
        if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
        return (uint16_t)(sign | 0x7c00u);
    }
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);   /* >= 65520: inf */
    if (a < 0x38800000u) {                        /* below 2^-14: subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;            /* <= 2^-25 rounds to 0 */
        uint32_t e = a >> 23;
        uint32_t m = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126 - e;                 /* 14..24 */
        uint32_t h = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = (a - (112u << 23)) >> 13;        /* rebias 127 -> 15 */
    uint32_t rem = a & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

float kvc__f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        float f = (float)m * 0x1p-24f;
        return sign ? -f : f;
    }
    if (e == 31) x = sign | 0x7f800000u | (m << 13);
    else x = sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

/* ---- portable kernels ---------------------------------------------------- */

/* Element loads and stores by format. Index is in elements of the block's
 * number array. */
static inline float load_f32(const void *blk, size_t i) { return ((const float *)blk)[i]; }
static inline float load_f16(const void *blk, size_t i) {
    return kvc__f16_to_f32(((const uint16_t *)blk)[i]);
}
static inline float load_i8(const void *blk, size_t i) { return (float)((const int8_t *)blk)[i]; }

static float i8_scale(const void *blk, int B, int dim, int j) {
    uint16_t h;
    memcpy(&h, (const uint8_t *)blk + kvc__i8_scale_offset(B, dim) + 2 * (size_t)j, sizeof h);
    return kvc__f16_to_f32(h);
}

/* Quantizes x (dim) symmetrically: q = round(x / scale), scale = the smallest
 * half >= amax / 127 (rounding up keeps |x / scale| <= 127, so no value
 * clips and the error stays under half a step even where the half is
 * subnormal), at most 65504. */
void kvc__i8_scale(float amax, uint16_t *scale_half, float *scale) {
    float t = amax / 127.0f;
    uint16_t sh = kvc__f32_to_f16(t);
    if (kvc__f16_to_f32(sh) < t) sh++;              /* next half up; positive, finite */
    if (sh >= 0x7c00u) sh = 0x7bffu;                /* inf or NaN amax: saturate */
    *scale_half = sh;
    *scale = kvc__f16_to_f32(sh);
}

int8_t kvc__i8_round(float v) {
    if (!(v >= -127.0f)) v = -127.0f;               /* NaN too */
    if (v > 127.0f) v = 127.0f;
    /* round to nearest even: adding 1.5 * 2^23 leaves no fraction bits */
    return (int8_t)(int)((v + 12582912.0f) - 12582912.0f);
}

static void i8_quantize(const float *x, int dim, int8_t *q, size_t q_step, uint16_t *scale_out) {
    float amax = 0.0f, s;
    for (int d = 0; d < dim; d++) {
        float a = fabsf(x[d]);
        amax = a > amax ? a : amax;
    }
    kvc__i8_scale(amax, scale_out, &s);
    for (int d = 0; d < dim; d++) q[(size_t)d * q_step] = kvc__i8_round(s > 0.0f ? x[d] / s : 0.0f);
}

/* K role: token `slot` is column `slot` of (dim, B). V role: row `slot` of (B, dim). */
static void enc_k_f32(void *blk, int B, int dim, int slot, const float *x) {
    for (int d = 0; d < dim; d++) ((float *)blk)[(size_t)d * B + slot] = x[d];
}
static void enc_v_f32(void *blk, int B, int dim, int slot, const float *x) {
    memcpy((float *)blk + (size_t)slot * dim, x, sizeof(float) * dim);
}
static void enc_k_f16(void *blk, int B, int dim, int slot, const float *x) {
    for (int d = 0; d < dim; d++) ((uint16_t *)blk)[(size_t)d * B + slot] = kvc__f32_to_f16(x[d]);
}
static void enc_v_f16(void *blk, int B, int dim, int slot, const float *x) {
    uint16_t *row = (uint16_t *)blk + (size_t)slot * dim;
    for (int d = 0; d < dim; d++) row[d] = kvc__f32_to_f16(x[d]);
}
static void enc_k_i8(void *blk, int B, int dim, int slot, const float *x) {
    uint16_t sh;
    i8_quantize(x, dim, (int8_t *)blk + slot, (size_t)B, &sh);
    memcpy((uint8_t *)blk + kvc__i8_scale_offset(B, dim) + 2 * (size_t)slot, &sh, sizeof sh);
}
static void enc_v_i8(void *blk, int B, int dim, int slot, const float *x) {
    uint16_t sh;
    i8_quantize(x, dim, (int8_t *)blk + (size_t)slot * dim, 1, &sh);
    memcpy((uint8_t *)blk + kvc__i8_scale_offset(B, dim) + 2 * (size_t)slot, &sh, sizeof sh);
}

#define KVC__DECODERS(FMT, LOAD, SCALE)                                            \
    static void dec_k_##FMT(const void *blk, int B, int dim, int slot, float *x) {   \
        float sc = SCALE(blk, B, dim, slot);                                         \
        for (int d = 0; d < dim; d++) x[d] = LOAD(blk, (size_t)d * B + slot) * sc;  \
    }                                                                                \
    static void dec_v_##FMT(const void *blk, int B, int dim, int slot, float *x) {   \
        float sc = SCALE(blk, B, dim, slot);                                         \
        for (int d = 0; d < dim; d++) x[d] = LOAD(blk, (size_t)slot * dim + d) * sc; \
    }

/* Scores over a (dim, B) block: accumulate dimension by dimension so the
 * inner loop runs over contiguous tokens; apply the token's scale at the end. */
#define KVC__SCORES(FMT, LOAD, SCALE)                                                      \
    static void scores_##FMT(const void *blk, int B, int dim, int n, const float *q, int nr, \
                             float *s, int s_stride) {                                     \
        for (int r = 0; r < nr; r++) {                                                     \
            float *sr = s + (size_t)r * s_stride;                                          \
            const float *qr = q + (size_t)r * dim;                                         \
            for (int j = 0; j < n; j++) sr[j] = 0.0f;                                      \
            for (int d = 0; d < dim; d++)                                                  \
                for (int j = 0; j < n; j++) sr[j] += qr[d] * LOAD(blk, (size_t)d * B + j); \
            for (int j = 0; j < n; j++) sr[j] *= SCALE(blk, B, dim, j);                    \
        }                                                                                  \
    }

/* Weighted sum of (B, dim) rows; the token's scale is folded into its weight. */
#define KVC__ACCUM(FMT, LOAD, SCALE)                                                       \
    static void accum_##FMT(const void *blk, int B, int dim, int n, const float *w,        \
                            int w_stride, int nr, float *acc) {                            \
        for (int j = 0; j < n; j++) {                                                      \
            float sc = SCALE(blk, B, dim, j);                                              \
            for (int r = 0; r < nr; r++) {                                                 \
                float wj = w[(size_t)r * w_stride + j] * sc;                               \
                float *ar = acc + (size_t)r * dim;                                         \
                for (int d = 0; d < dim; d++) ar[d] += wj * LOAD(blk, (size_t)j * dim + d); \
            }                                                                              \
        }                                                                                  \
    }

#define NO_SCALE(blk, B, dim, j) 1.0f

KVC__DECODERS(f32, load_f32, NO_SCALE)
KVC__DECODERS(f16, load_f16, NO_SCALE)
KVC__DECODERS(i8, load_i8, i8_scale)
KVC__SCORES(f32, load_f32, NO_SCALE)
KVC__SCORES(f16, load_f16, NO_SCALE)
KVC__SCORES(i8, load_i8, i8_scale)
KVC__ACCUM(f32, load_f32, NO_SCALE)
KVC__ACCUM(f16, load_f16, NO_SCALE)
KVC__ACCUM(i8, load_i8, i8_scale)

/* ---- the table ----------------------------------------------------------- */

static size_t bytes_f32(int B, int dim) { return (size_t)B * dim * 4; }
static size_t bytes_f16(int B, int dim) { return (size_t)B * dim * 2; }
static size_t bytes_i8(int B, int dim) { return kvc__i8_scale_offset(B, dim) + (size_t)B * 2; }

typedef struct {
    const char *name;
    size_t (*block_bytes)(int B, int dim);     /* before padding */
    kvc__kernels k, v;                         /* portable kernels per role */
} codec_entry;

static const codec_entry codec_table[] = {
    {"f32", bytes_f32, {enc_k_f32, dec_k_f32, scores_f32, NULL}, {enc_v_f32, dec_v_f32, NULL, accum_f32}},
    {"f16", bytes_f16, {enc_k_f16, dec_k_f16, scores_f16, NULL}, {enc_v_f16, dec_v_f16, NULL, accum_f16}},
    {"int8", bytes_i8, {enc_k_i8, dec_k_i8, scores_i8, NULL}, {enc_v_i8, dec_v_i8, NULL, accum_i8}},
};
#define N_CODECS (sizeof codec_table / sizeof codec_table[0])

const char *kvc__codec_specs(void) { return "f32, f16, int8"; }

int kvc__codec_init(kvc__codec *c, const char *spec, const char *field, kvc__role role,
                    int head_dim, int block_size, int force_scalar, char *err, size_t errlen) {
    const codec_entry *e = NULL;
    for (size_t i = 0; spec && i < N_CODECS; i++)
        if (strcmp(spec, codec_table[i].name) == 0) e = &codec_table[i];
    if (!e) {
        if (!spec) snprintf(err, errlen, "kvc: %s missing: must be one of %s", field, kvc__codec_specs());
        else snprintf(err, errlen, "kvc: %s \"%s\": unknown codec; valid: %s", field, spec,
                      kvc__codec_specs());
        return -1;
    }
    memset(c, 0, sizeof *c);
    c->name = e->name;
    c->dim = head_dim;
    c->block_size = block_size;
    c->block_bytes = (e->block_bytes(block_size, head_dim) + 63) & ~(size_t)63;
    c->role = role;
    c->kern = role == KVC__ROLE_K ? e->k : e->v;
    if (!force_scalar && kvc__have_avx2()) {
        kvc__kernels fast;
        if (kvc__codec_avx2_get(e->name, role, &fast) == 0) {
            if (fast.encode) c->kern.encode = fast.encode;
            if (fast.decode) c->kern.decode = fast.decode;
            if (fast.scores) c->kern.scores = fast.scores;
            if (fast.accum) c->kern.accum = fast.accum;
        }
    }
    return 0;
}

int kvc__have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
