/* codec.c: the codecs: spec parsing, block layouts, bases (seeded orthogonal
 * or PCA from a calibration file), the transform around the element formats
 * (project, encode, decode, expand), IEEE half conversion, and the portable
 * kernels of each element format.
 *
 * Layouts (kvcache.h): K blocks are dimension-major (dim, B) so a score loop
 * runs over contiguous tokens; V blocks are token-major (B, dim). int8 blocks
 * end with an fp16 scale per token, int4 blocks with fp16 scales and minima,
 * 16-byte aligned inside the block. The portable kernels here are the
 * reference the AVX2 ones (codec_avx2.c) are tested against; both read pages
 * in place. */
#include "cache/codec.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/calib.h"
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
uint16_t kvc__f16_down(float f) {
    uint16_t h = kvc__f32_to_f16(f);
    if (kvc__f16_to_f32(h) <= f) return h;
    if (h == 0) return 0x8001u;                   /* +0 above a tiny negative f */
    return (uint16_t)(h & 0x8000u ? h + 1 : h - 1);   /* one step towards -inf */
}

uint16_t kvc__f16_up(float f) { return (uint16_t)(kvc__f16_down(-f) ^ 0x8000u); }

/* ---- element formats: shared helpers -------------------------------------- */

static inline float load_f32(const void *blk, size_t i) { return ((const float *)blk)[i]; }
static inline float load_f16(const void *blk, size_t i) {
    return kvc__f16_to_f32(((const uint16_t *)blk)[i]);
}
static inline float load_i8(const void *blk, size_t i) { return (float)((const int8_t *)blk)[i]; }
static inline float load_u4(const void *blk, size_t i) {
    return (float)((((const uint8_t *)blk)[i >> 1] >> ((i & 1) * 4)) & 15);
}
static inline void store_u4(void *blk, size_t i, uint8_t code) {
    uint8_t *b = (uint8_t *)blk + (i >> 1);
    *b = (i & 1) ? (uint8_t)((*b & 0x0f) | (code << 4)) : (uint8_t)((*b & 0xf0) | code);
}

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

void kvc__u4_params(float lo, float hi, uint16_t *min_half, uint16_t *scale_half) {
    if (!(lo <= hi)) lo = hi = 0.0f;                /* no finite value */
    lo = lo < -65504.0f ? -65504.0f : lo > 65504.0f ? 65504.0f : lo;
    hi = hi < lo ? lo : hi > 65504.0f ? 65504.0f : hi;
    uint16_t mh = kvc__f16_down(lo);
    float t = (hi - kvc__f16_to_f32(mh)) / 15.0f;
    uint16_t sh = kvc__f16_up(t);
    if ((sh & 0x7fffu) >= 0x7c00u) sh = 0x7bffu;
    *min_half = mh;
    *scale_half = sh;
}

uint8_t kvc__u4_round(float v) {
    if (!(v >= 0.0f)) return 0;                      /* NaN too */
    if (v > 15.0f) v = 15.0f;
    return (uint8_t)(int)((v + 12582912.0f) - 12582912.0f);
}

/* Code of x for minimum m and scale s (s > 0), or 0. */
static inline uint8_t u4_code(float x, float m, float s) { return s > 0.0f ? kvc__u4_round((x - m) / s) : 0; }

static void i8_quantize(const float *x, int dim, int8_t *q, size_t q_step, uint16_t *scale_out) {
    float amax = 0.0f, s;
    for (int d = 0; d < dim; d++) {
        float a = fabsf(x[d]);
        amax = a > amax ? a : amax;
    }
    kvc__i8_scale(amax, scale_out, &s);
    for (int d = 0; d < dim; d++) q[(size_t)d * q_step] = kvc__i8_round(s > 0.0f ? x[d] / s : 0.0f);
}

/* Element index of (token j, number d) in a block, by role and format. */
static inline size_t idx_k(int B, int j, int d) { return (size_t)d * B + j; }
static inline size_t idx_v(int dim, int j, int d) { return (size_t)j * dim + d; }
static inline size_t u4_idx(kvc__role role, int B, int dim, int j, int d) {
    return role == KVC__ROLE_K ? (size_t)d * kvc__even(B) + j : (size_t)j * kvc__even(dim) + d;
}

/* ---- f32, f16, int8: encoders -------------------------------------------- */

static void enc_k_f32(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++)
        for (int d = 0; d < dim; d++) ((float *)blk)[idx_k(B, slot + t, d)] = x[t * xs + d];
}
static void enc_v_f32(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++) memcpy((float *)blk + idx_v(dim, slot + t, 0), x + t * xs, sizeof(float) * dim);
}
static void enc_k_f16(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++)
        for (int d = 0; d < dim; d++) ((uint16_t *)blk)[idx_k(B, slot + t, d)] = kvc__f32_to_f16(x[t * xs + d]);
}
static void enc_v_f16(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++)
        for (int d = 0; d < dim; d++) ((uint16_t *)blk)[idx_v(dim, slot + t, d)] = kvc__f32_to_f16(x[t * xs + d]);
}
static void enc_i8(kvc__role role, void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++) {
        int j = slot + t;
        uint16_t sh;
        if (role == KVC__ROLE_K) i8_quantize(x + t * xs, dim, (int8_t *)blk + j, (size_t)B, &sh);
        else i8_quantize(x + t * xs, dim, (int8_t *)blk + (size_t)j * dim, 1, &sh);
        memcpy((uint8_t *)blk + kvc__i8_scale_offset(B, dim) + 2 * (size_t)j, &sh, sizeof sh);
    }
}
static void enc_k_i8(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    enc_i8(KVC__ROLE_K, blk, B, dim, slot, n, x, xs);
}
static void enc_v_i8(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    enc_i8(KVC__ROLE_V, blk, B, dim, slot, n, x, xs);
}

/* ---- int4 per token: groups of gs numbers, fp16 minimum and scale each ---- */

static inline uint16_t *u4_scales(const void *blk, kvc__role role, int B, int dim) {
    return (uint16_t *)((uint8_t *)blk + kvc__u4_param_offset(role, B, dim));
}

static void enc_u4(kvc__role role, int gs, void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    const int G = kvc__u4_groups(dim, gs);
    uint16_t *sc = u4_scales(blk, role, B, dim), *mn = sc + (size_t)G * B;
    for (int t = 0; t < n; t++) {
        const float *xt = x + t * xs;
        int j = slot + t;
        for (int g = 0; g < G; g++) {
            int d0 = g * gs, d1 = d0 + gs < dim ? d0 + gs : dim;
            float lo = INFINITY, hi = -INFINITY;
            for (int d = d0; d < d1; d++) {
                lo = xt[d] < lo ? xt[d] : lo;
                hi = xt[d] > hi ? xt[d] : hi;
            }
            kvc__u4_params(lo, hi, &mn[(size_t)g * B + j], &sc[(size_t)g * B + j]);
            float m = kvc__f16_to_f32(mn[(size_t)g * B + j]), s = kvc__f16_to_f32(sc[(size_t)g * B + j]);
            for (int d = d0; d < d1; d++) store_u4(blk, u4_idx(role, B, dim, j, d), u4_code(xt[d], m, s));
        }
    }
}

static void dec_u4(kvc__role role, int gs, const void *blk, int B, int dim, int slot, float *x) {
    const int G = kvc__u4_groups(dim, gs);
    const uint16_t *sc = u4_scales(blk, role, B, dim), *mn = sc + (size_t)G * B;
    for (int d = 0; d < dim; d++) {
        size_t p = (size_t)(d / gs) * B + slot;
        x[d] = kvc__f16_to_f32(mn[p]) + kvc__f16_to_f32(sc[p]) * load_u4(blk, u4_idx(role, B, dim, slot, d));
    }
}

/* s_j = sum_g (scale_gj * sum_{d in g} q_d code_dj + min_gj * sum_{d in g} q_d) */
static void scores_u4(int gs, const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int s_stride) {
    const int G = kvc__u4_groups(dim, gs);
    const uint16_t *sc = u4_scales(blk, KVC__ROLE_K, B, dim), *mn = sc + (size_t)G * B;
    for (int r = 0; r < nr; r++) {
        const float *qr = q + (size_t)r * dim;
        for (int j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int g = 0; g < G; g++) {
                int d0 = g * gs, d1 = d0 + gs < dim ? d0 + gs : dim;
                float a = 0.0f, qs = 0.0f;
                for (int d = d0; d < d1; d++) {
                    a += qr[d] * load_u4(blk, u4_idx(KVC__ROLE_K, B, dim, j, d));
                    qs += qr[d];
                }
                acc += kvc__f16_to_f32(sc[(size_t)g * B + j]) * a + kvc__f16_to_f32(mn[(size_t)g * B + j]) * qs;
            }
            s[(size_t)r * s_stride + j] = acc;
        }
    }
}

static void accum_u4(int gs, const void *blk, int B, int dim, int n, const float *w, int w_stride, int nr, float *acc) {
    const int G = kvc__u4_groups(dim, gs);
    const uint16_t *sc = u4_scales(blk, KVC__ROLE_V, B, dim), *mn = sc + (size_t)G * B;
    for (int j = 0; j < n; j++)
        for (int g = 0; g < G; g++) {
            int d0 = g * gs, d1 = d0 + gs < dim ? d0 + gs : dim;
            float s = kvc__f16_to_f32(sc[(size_t)g * B + j]), m = kvc__f16_to_f32(mn[(size_t)g * B + j]);
            for (int r = 0; r < nr; r++) {
                float wj = w[(size_t)r * w_stride + j], *ar = acc + (size_t)r * dim;
                for (int d = d0; d < d1; d++)
                    ar[d] += wj * (m + s * load_u4(blk, u4_idx(KVC__ROLE_V, B, dim, j, d)));
            }
        }
}

/* The kernels of one group size. */
#define KVC__U4_KERNELS(GS)                                                                                 \
    static void enc_k_u4_##GS(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {      \
        enc_u4(KVC__ROLE_K, GS, blk, B, dim, slot, n, x, xs);                                               \
    }                                                                                                       \
    static void enc_v_u4_##GS(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {      \
        enc_u4(KVC__ROLE_V, GS, blk, B, dim, slot, n, x, xs);                                               \
    }                                                                                                       \
    static void dec_k_u4_##GS(const void *blk, int B, int dim, int slot, float *x) {                       \
        dec_u4(KVC__ROLE_K, GS, blk, B, dim, slot, x);                                                      \
    }                                                                                                       \
    static void dec_v_u4_##GS(const void *blk, int B, int dim, int slot, float *x) {                       \
        dec_u4(KVC__ROLE_V, GS, blk, B, dim, slot, x);                                                      \
    }                                                                                                       \
    static void scores_u4_##GS(const void *blk, int B, int dim, int n, const float *q, int nr, float *s,    \
                               int ss) {                                                                    \
        scores_u4(GS, blk, B, dim, n, q, nr, s, ss);                                                        \
    }                                                                                                       \
    static void accum_u4_##GS(const void *blk, int B, int dim, int n, const float *w, int ws, int nr,       \
                              float *acc) {                                                                 \
        accum_u4(GS, blk, B, dim, n, w, ws, nr, acc);                                                       \
    }                                                                                                       \
    static size_t bytes_u4_##GS(kvc__role role, int B, int dim) {                                           \
        return kvc__u4_param_offset(role, B, dim) + (size_t)kvc__u4_groups(dim, GS) * B * 4;                \
    }

KVC__U4_KERNELS(32)
KVC__U4_KERNELS(64)

/* ---- int4 per channel: fp16 minimum and scale per number index ------------
 * The parameters cover the block's tokens written so far. A run of tokens
 * that stays inside the current range is coded with it; one that widens it
 * re-codes the block's earlier tokens under the wider range (from their
 * decoded values: an extra rounding for them, at most half a new step). A
 * prefill writes a page's tokens in one run, so each page is coded once from
 * its own range as KIVI does; decode appends widen it now and then. Earlier
 * slots must hold this block's tokens (kvc_write writes positions in order). */
/* The smallest and largest of number d's codes in slots [0, slot): its
 * decoded range is m + s * those two (m + s * code only grows with the code,
 * s >= 0), without decoding every slot. */
static void u4_code_range(kvc__role role, const void *blk, int B, int dim, int slot, int d, int *cmin, int *cmax) {
    int lo = 15, hi = 0;
    for (int j = 0; j < slot; j++) {
        const size_t i = u4_idx(role, B, dim, j, d);
        const int c = (((const uint8_t *)blk)[i >> 1] >> ((i & 1) * 4)) & 15;
        lo = c < lo ? c : lo;
        hi = c > hi ? c : hi;
    }
    *cmin = lo;
    *cmax = hi;
}

static void enc_u4c(kvc__role role, void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    uint16_t *sc = u4_scales(blk, role, B, dim), *mn = sc + dim;
    for (int d = 0; d < dim; d++) {
        float lo = INFINITY, hi = -INFINITY;
        for (int t = 0; t < n; t++) {
            float v = x[t * xs + d];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        float m_old = kvc__f16_to_f32(mn[d]), s_old = kvc__f16_to_f32(sc[d]);
        if (slot > 0) {
            int cmin, cmax;
            u4_code_range(role, blk, B, dim, slot, d, &cmin, &cmax);
            const float olo = m_old + s_old * (float)cmin, ohi = m_old + s_old * (float)cmax;
            if (!(lo < olo) && !(hi > ohi)) {     /* inside the range: code with it */
                for (int t = 0; t < n; t++)
                    store_u4(blk, u4_idx(role, B, dim, slot + t, d), u4_code(x[t * xs + d], m_old, s_old));
                continue;
            }
            lo = olo < lo ? olo : lo;
            hi = ohi > hi ? ohi : hi;
        }
        uint16_t mh, sh;
        kvc__u4_params(lo, hi, &mh, &sh);
        float m = kvc__f16_to_f32(mh), s = kvc__f16_to_f32(sh);
        for (int j = 0; j < slot; j++) {
            size_t i = u4_idx(role, B, dim, j, d);
            store_u4(blk, i, u4_code(m_old + s_old * load_u4(blk, i), m, s));
        }
        for (int t = 0; t < n; t++) store_u4(blk, u4_idx(role, B, dim, slot + t, d), u4_code(x[t * xs + d], m, s));
        mn[d] = mh;
        sc[d] = sh;
    }
}
static void enc_k_u4c(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    enc_u4c(KVC__ROLE_K, blk, B, dim, slot, n, x, xs);
}
static void enc_v_u4c(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    enc_u4c(KVC__ROLE_V, blk, B, dim, slot, n, x, xs);
}

static void dec_u4c(kvc__role role, const void *blk, int B, int dim, int slot, float *x) {
    const uint16_t *sc = u4_scales(blk, role, B, dim), *mn = sc + dim;
    for (int d = 0; d < dim; d++)
        x[d] = kvc__f16_to_f32(mn[d]) + kvc__f16_to_f32(sc[d]) * load_u4(blk, u4_idx(role, B, dim, slot, d));
}
static void dec_k_u4c(const void *blk, int B, int dim, int slot, float *x) { dec_u4c(KVC__ROLE_K, blk, B, dim, slot, x); }
static void dec_v_u4c(const void *blk, int B, int dim, int slot, float *x) { dec_u4c(KVC__ROLE_V, blk, B, dim, slot, x); }

/* s_j = sum_d (q_d scale_d) code_dj + sum_d q_d min_d */
static void scores_u4c(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int s_stride) {
    const uint16_t *sc = u4_scales(blk, KVC__ROLE_K, B, dim), *mn = sc + dim;
    for (int r = 0; r < nr; r++) {
        const float *qr = q + (size_t)r * dim;
        float *sr = s + (size_t)r * s_stride, base = 0.0f;
        for (int d = 0; d < dim; d++) base += qr[d] * kvc__f16_to_f32(mn[d]);
        for (int j = 0; j < n; j++) sr[j] = base;
        for (int d = 0; d < dim; d++) {
            float qs = qr[d] * kvc__f16_to_f32(sc[d]);
            for (int j = 0; j < n; j++) sr[j] += qs * load_u4(blk, u4_idx(KVC__ROLE_K, B, dim, j, d));
        }
    }
}

static void accum_u4c(const void *blk, int B, int dim, int n, const float *w, int w_stride, int nr, float *acc) {
    const uint16_t *sc = u4_scales(blk, KVC__ROLE_V, B, dim), *mn = sc + dim;
    for (int r = 0; r < nr; r++) {
        float *ar = acc + (size_t)r * dim, wsum = 0.0f;
        for (int j = 0; j < n; j++) {
            float wj = w[(size_t)r * w_stride + j];
            wsum += wj;
            for (int d = 0; d < dim; d++)
                ar[d] += wj * kvc__f16_to_f32(sc[d]) * load_u4(blk, u4_idx(KVC__ROLE_V, B, dim, j, d));
        }
        for (int d = 0; d < dim; d++) ar[d] += wsum * kvc__f16_to_f32(mn[d]);
    }
}

/* ---- f32, f16, int8: decoders, scores, weighted sums ---------------------- */

#define KVC__DECODERS(FMT, LOAD, SCALE)                                                   \
    static void dec_k_##FMT(const void *blk, int B, int dim, int slot, float *x) {          \
        float sc = SCALE(blk, B, dim, slot);                                                \
        for (int d = 0; d < dim; d++) x[d] = LOAD(blk, idx_k(B, slot, d)) * sc;            \
    }                                                                                       \
    static void dec_v_##FMT(const void *blk, int B, int dim, int slot, float *x) {          \
        float sc = SCALE(blk, B, dim, slot);                                                \
        for (int d = 0; d < dim; d++) x[d] = LOAD(blk, idx_v(dim, slot, d)) * sc;          \
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
                for (int j = 0; j < n; j++) sr[j] += qr[d] * LOAD(blk, idx_k(B, j, d));    \
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
                for (int d = 0; d < dim; d++) ar[d] += wj * LOAD(blk, idx_v(dim, j, d));  \
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

/* ---- the format table ------------------------------------------------------ */

static size_t bytes_f32(kvc__role role, int B, int dim) { return (size_t)B * dim * 4; }
static size_t bytes_f16(kvc__role role, int B, int dim) { return (size_t)B * dim * 2; }
static size_t bytes_i8(kvc__role role, int B, int dim) { return kvc__i8_scale_offset(B, dim) + (size_t)B * 2; }
static size_t bytes_u4c(kvc__role role, int B, int dim) { return kvc__u4_param_offset(role, B, dim) + (size_t)dim * 4; }

typedef struct {
    size_t (*block_bytes)(kvc__role role, int B, int dim);     /* before padding */
    kvc__kernels k, v;                                         /* portable kernels per role */
} format_entry;

static const format_entry formats[] = {
    [KVC__F32] = {bytes_f32, {enc_k_f32, dec_k_f32, scores_f32, NULL}, {enc_v_f32, dec_v_f32, NULL, accum_f32}},
    [KVC__F16] = {bytes_f16, {enc_k_f16, dec_k_f16, scores_f16, NULL}, {enc_v_f16, dec_v_f16, NULL, accum_f16}},
    [KVC__I8] = {bytes_i8, {enc_k_i8, dec_k_i8, scores_i8, NULL}, {enc_v_i8, dec_v_i8, NULL, accum_i8}},
    [KVC__U4] = {bytes_u4_32, {enc_k_u4_32, dec_k_u4_32, scores_u4_32, NULL}, {enc_v_u4_32, dec_v_u4_32, NULL, accum_u4_32}},
    [KVC__U4G64] = {bytes_u4_64, {enc_k_u4_64, dec_k_u4_64, scores_u4_64, NULL}, {enc_v_u4_64, dec_v_u4_64, NULL, accum_u4_64}},
    [KVC__U4C] = {bytes_u4c, {enc_k_u4c, dec_k_u4c, scores_u4c, NULL}, {enc_v_u4c, dec_v_u4c, NULL, accum_u4c}},
};

/* ---- spec parsing ------------------------------------------------------------ */

const char *kvc__codec_specs(void) {
    return "f32, f16, int8, int4, int4:token, int4:channel (int4 and int4:token take :g32 or :g64), lowrank:rR, "
           "latent:N, hybrid:rR, hybrid:latent:N "
           "(low-rank specs take :orthogonal (default) or :pca, and with :pca the rank may be left out "
           "for the calibration file's per-layer ranks, or be eP for the per-layer ranks keeping P% of the "
           "variance (lowrank:e95:pca); then :int4[:g64|:channel] stores the coefficients as int4; "
           "key specs may end in :prerope)";
}

typedef struct {
    kvc__fmt fmt;
    kvc__shape shape;
    int rank;          /* 0: the calibration file's per layer */
    double energy;     /* > 0 (with rank 0): per-layer ranks keeping this share of the variance */
    int pca;
    int pre_rope;
} parsed_spec;

/* Parses a rank token: "rN" for lowrank/hybrid (r_prefix), "N" for latents. */
static int parse_rank(const char *tok, int r_prefix, int *rank) {
    if (r_prefix) {
        if (tok[0] != 'r') return -1;
        tok++;
    }
    if (*tok < '1' || *tok > '9') return -1;
    long v = 0;
    for (; *tok; tok++) {
        if (*tok < '0' || *tok > '9' || v > KVC__DIM_MAX) return -1;
        v = v * 10 + (*tok - '0');
    }
    *rank = (int)v;
    return 0;
}

/* Returns 0, or -1 when the spec is not in the grammar. */
static int parse_spec(const char *spec, kvc__role role, parsed_spec *p) {
    memset(p, 0, sizeof *p);
    char buf[64], *tok[8];
    int nt = 0;
    if (!spec || strlen(spec) >= sizeof buf) return -1;
    strcpy(buf, spec);
    for (char *s = buf;;) {
        if (nt == 8) return -1;
        tok[nt++] = s;
        char *c = strchr(s, ':');
        if (!c) break;
        *c = 0;
        s = c + 1;
    }
    if (nt > 1 && !strcmp(tok[nt - 1], "prerope")) p->pre_rope = 1, nt--;
    int i = 1;
    if (!strcmp(tok[0], "f32") || !strcmp(tok[0], "f16") || !strcmp(tok[0], "int8") || !strcmp(tok[0], "int4")) {
        p->fmt = tok[0][0] == 'f' ? (tok[0][1] == '3' ? KVC__F32 : KVC__F16) : tok[0][3] == '8' ? KVC__I8 : KVC__U4;
        if (p->fmt != KVC__U4) return nt == 1 ? 0 : -1;
        /* int4[:token|:channel][:g32|:g64]: by default keys per channel and
         * values per token (what measured best); gN sizes the per-token groups */
        int chan = role == KVC__ROLE_K, g64 = 0;
        if (i < nt && !strcmp(tok[i], "channel")) chan = 1, i++;
        else if (i < nt && !strcmp(tok[i], "token")) chan = 0, i++;
        if (i < nt && (!strcmp(tok[i], "g32") || !strcmp(tok[i], "g64"))) {
            if (i == 2 && !strcmp(tok[1], "channel")) return -1;
            g64 = tok[i][1] == '6';
            i++;
        }
        p->fmt = chan ? KVC__U4C : g64 ? KVC__U4G64 : KVC__U4;
        return i == nt ? 0 : -1;
    }
    int r_prefix;
    if (!strcmp(tok[0], "lowrank") || !strcmp(tok[0], "hybrid")) {
        p->fmt = tok[0][0] == 'l' ? KVC__F16 : KVC__I8;
        p->shape = KVC__LOWRANK;
        r_prefix = 1;
        if (p->fmt == KVC__I8 && nt > 1 && !strcmp(tok[1], "latent")) p->shape = KVC__LATENT, r_prefix = 0, i = 2;
    } else if (!strcmp(tok[0], "latent")) {
        p->fmt = KVC__F16;
        p->shape = KVC__LATENT;
        r_prefix = 0;
    } else {
        return -1;
    }
    if (i < nt && tok[i][0] == 'e') {      /* eP: P% of the variance, per layer */
        char *end;
        double pct = strtod(tok[i] + 1, &end);
        if (end == tok[i] + 1 || *end || !(pct > 0.0 && pct <= 100.0)) return -1;
        p->energy = pct / 100.0;
        i++;
    } else if (i < nt && parse_rank(tok[i], r_prefix, &p->rank) == 0) {
        i++;
    }
    if (i < nt && !strcmp(tok[i], "pca")) p->pca = 1, i++;
    else if (i < nt && !strcmp(tok[i], "orthogonal")) i++;
    /* :int4[:g32|:g64|:channel]: the coefficients as int4 per token (groups
     * of 32 or 64) or per coefficient over the block's tokens */
    if (i < nt && !strcmp(tok[i], "int4")) {
        p->fmt = KVC__U4, i++;
        if (i < nt && !strcmp(tok[i], "g64")) p->fmt = KVC__U4G64, i++;
        else if (i < nt && !strcmp(tok[i], "channel")) p->fmt = KVC__U4C, i++;
        else if (i < nt && !strcmp(tok[i], "g32")) i++;
    }
    if (i != nt || (p->rank == 0 && !p->pca)) return -1;   /* energies need pca too */
    return 0;
}

int kvc__codec_needs_calib(const char *spec) {
    parsed_spec p;
    return parse_spec(spec, KVC__ROLE_K, &p) ? -1 : p.pca;
}

/* ---- bases ----------------------------------------------------------------- */

static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A seeded random orthonormal basis: basis (n, r) row-major with orthonormal
 * columns, from Gaussian columns by modified Gram-Schmidt, twice, in double.
 * Returns -1 when out of memory. */
static int orthogonal_basis(float *basis, int n, int r, uint64_t seed) {
    double *a = malloc(sizeof(double) * (size_t)n * r);    /* (r, n): column c as row c */
    if (!a) return -1;
    for (size_t i = 0; i < (size_t)n * r; i += 2) {          /* Box-Muller */
        double u1 = ((double)(splitmix(&seed) >> 11) + 1.0) / 9007199254740993.0;
        double u2 = (double)(splitmix(&seed) >> 11) / 9007199254740992.0;
        double rad = sqrt(-2.0 * log(u1));
        a[i] = rad * cos(2.0 * M_PI * u2);
        if (i + 1 < (size_t)n * r) a[i + 1] = rad * sin(2.0 * M_PI * u2);
    }
    for (int c = 0; c < r; c++) {
        double *v = a + (size_t)c * n;
        for (int pass = 0; pass < 2; pass++)
            for (int p = 0; p < c; p++) {
                const double *u = a + (size_t)p * n;
                double dot = 0.0;
                for (int i = 0; i < n; i++) dot += u[i] * v[i];
                for (int i = 0; i < n; i++) v[i] -= dot * u[i];
            }
        double norm = 0.0;
        for (int i = 0; i < n; i++) norm += v[i] * v[i];
        norm = sqrt(norm);
        KVC__CHECK(norm > 1e-6, "degenerate random column %d of %d", c, r);
        for (int i = 0; i < n; i++) v[i] /= norm;
    }
    for (int i = 0; i < n; i++)
        for (int c = 0; c < r; c++) basis[(size_t)i * r + c] = (float)a[(size_t)c * n + i];
    free(a);
    return 0;
}

/* The transform's loops, portable (the AVX2 ones are in codec_avx2.c). */
static void project_scalar(const float *P, int R, int n, const float *x, const float *mu, float *coef) {
    for (int r = 0; r < R; r++) coef[r] = 0.0f;
    for (int d = 0; d < n; d++) {
        float xd = x[d] - (mu ? mu[d] : 0.0f);
        const float *row = P + (size_t)d * R;
        for (int r = 0; r < R; r++) coef[r] += row[r] * xd;
    }
}

static void expand_scalar(const float *P, int R, int n, const float *coef, const float *mu, float *out) {
    for (int d = 0; d < n; d++) {
        const float *row = P + (size_t)d * R;
        float a = mu ? mu[d] : 0.0f;
        for (int r = 0; r < R; r++) a += row[r] * coef[r];
        out[d] = a;
    }
}

static void expand_tile_scalar(const float *P, int R, int n, const float *c, int c_stride, int m,
                               const float *mu, float *out, int out_stride) {
    for (int d = 0; d < n; d++) {
        const float *row = P + (size_t)d * R;
        float *o = out + (size_t)d * out_stride;
        for (int t = 0; t < m; t++) o[t] = mu ? mu[d] : 0.0f;
        for (int r = 0; r < R; r++)
            for (int t = 0; t < m; t++) o[t] += row[r] * c[(size_t)r * c_stride + t];
    }
}

static void rotate_scalar(float *x, int x_stride, int n, int rope_dim, int neox, const float *cos, const float *sin,
                          int c_stride) {
    const int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        float *xa = x + (size_t)(neox ? i : 2 * i) * x_stride, *xb = x + (size_t)(neox ? i + half : 2 * i + 1) * x_stride;
        const float *cs = cos + (size_t)i * c_stride, *sn = sin + (size_t)i * c_stride;
        for (int t = 0; t < n; t++) {
            float a = xa[t], b = xb[t];
            xa[t] = a * cs[t] - b * sn[t];
            xb[t] = a * sn[t] + b * cs[t];
        }
    }
}

/* ---- init -------------------------------------------------------------------- */

void kvc__codec_free(kvc__codec *c) {
    if (c->basis)
        for (int i = 0; i < c->n_layer * c->n_groups; i++) free(c->basis[i]);
    if (c->mean)
        for (int i = 0; i < c->n_layer * c->n_groups; i++) free(c->mean[i]);
    free(c->basis);
    free(c->mean);
    free(c->dim);
    free(c->block_bytes);
    memset(c, 0, sizeof *c);
}

int kvc__codec_init(kvc__codec *c, const char *spec, const char *field, kvc__role role,
                    int n_layer, int n_kv_head, int head_dim, int block_size, int force_scalar,
                    const kvc__calib *calib, const char *calib_path, char *err, size_t errlen) {
    memset(c, 0, sizeof *c);
    parsed_spec p;
    if (!spec) {
        snprintf(err, errlen, "kvc: %s missing: must be one of %s", field, kvc__codec_specs());
        return -1;
    }
    if (parse_spec(spec, role, &p)) {
        snprintf(err, errlen, "kvc: %s \"%s\": unknown codec; valid: %s", field, spec, kvc__codec_specs());
        return -1;
    }
    if (p.pre_rope && role != KVC__ROLE_K) {
        snprintf(err, errlen, "kvc: %s \"%s\": :prerope is for keys only", field, spec);
        return -1;
    }
    snprintf(c->name, sizeof c->name, "%s", spec);
    c->role = role;
    c->fmt = p.fmt;
    c->shape = p.shape;
    c->pre_rope = p.pre_rope;
    c->pca = p.pca;
    c->n_layer = n_layer;
    c->n_kv_head = n_kv_head;
    c->head_dim = head_dim;
    c->block_size = block_size;
    c->n_groups = p.shape == KVC__LATENT ? 1 : n_kv_head;
    c->in_dim = p.shape == KVC__LATENT ? n_kv_head * head_dim : head_dim;
    int set = p.pre_rope ? KVC_CALIB_K_PRE_ROPE : role == KVC__ROLE_K ? KVC_CALIB_K : KVC_CALIB_V;
    if (p.pca && !calib) {
        snprintf(err, errlen, "kvc: %s \"%s\": a pca basis needs a calibration file (kvserve calibrate; "
                 "--calib FILE)", field, spec);
        return -1;
    }
    if (p.pca && !kvc__calib_has(calib, set)) {
        snprintf(err, errlen, "kvc: %s \"%s\": calibration file %s has no %s statistics%s", field, spec,
                 calib_path ? calib_path : "", set == KVC_CALIB_K_PRE_ROPE ? "pre-RoPE key" : "",
                 set == KVC_CALIB_K_PRE_ROPE ? " (kvserve calibrate --pre-rope)" : "");
        return -1;
    }
    if (p.shape != KVC__PLAIN && c->in_dim > KVC__DIM_MAX) {
        snprintf(err, errlen, "kvc: %s \"%s\": a transform of %d numbers per token; at most %d", field, spec,
                 c->in_dim, KVC__DIM_MAX);
        return -1;
    }
    c->dim = calloc((size_t)n_layer, sizeof *c->dim);
    c->block_bytes = calloc((size_t)n_layer, sizeof *c->block_bytes);
    if (!c->dim || !c->block_bytes) goto nomem;
    for (int l = 0; l < n_layer; l++) {
        int r = p.shape == KVC__PLAIN ? head_dim
                : p.rank ? p.rank
                : p.energy > 0 ? kvc__calib_rank_energy(calib, set, l, p.shape == KVC__LATENT, p.energy)
                : kvc__calib_rank(calib, set, l, p.shape == KVC__LATENT);
        if (r < 1 || r > c->in_dim || r > KVC__DIM_MAX) {
            snprintf(err, errlen, "kvc: %s \"%s\": rank %d in layer %d: must be 1..%d (%s)", field, spec, r, l,
                     c->in_dim < KVC__DIM_MAX ? c->in_dim : KVC__DIM_MAX,
                     p.shape == KVC__LATENT ? "n_kv_head x head_dim" : "head_dim");
            kvc__codec_free(c);
            return -1;
        }
        c->dim[l] = r;
        c->max_dim = r > c->max_dim ? r : c->max_dim;
        c->block_bytes[l] = (formats[p.fmt].block_bytes(role, block_size, r) + 15) & ~(size_t)15;
    }
    if (p.shape != KVC__PLAIN) {
        size_t nb = (size_t)n_layer * c->n_groups;
        c->basis = calloc(nb, sizeof *c->basis);
        c->mean = calloc(nb, sizeof *c->mean);
        if (!c->basis || !c->mean) goto nomem;
        for (int l = 0; l < n_layer; l++)
            for (int g = 0; g < c->n_groups; g++) {
                size_t i = (size_t)l * c->n_groups + g;
                c->basis[i] = malloc(sizeof(float) * (size_t)c->in_dim * c->dim[l]);
                if (!c->basis[i]) goto nomem;
                if (p.pca) {
                    c->mean[i] = malloc(sizeof(float) * (size_t)c->in_dim);
                    if (!c->mean[i]) goto nomem;
                    kvc__calib_basis(calib, set, l, p.shape == KVC__LATENT ? -1 : g, c->dim[l], c->basis[i],
                                     c->mean[i]);
                } else {
                    uint64_t seed = 0x6b7663u ^ ((uint64_t)role << 40) ^ ((uint64_t)l << 20) ^ (uint64_t)g;
                    if (orthogonal_basis(c->basis[i], c->in_dim, c->dim[l], seed)) goto nomem;
                }
            }
    }
    c->kern = role == KVC__ROLE_K ? formats[p.fmt].k : formats[p.fmt].v;
    c->project = project_scalar;
    c->expand = expand_scalar;
    c->expand_tile = expand_tile_scalar;
    c->scores_f32 = formats[KVC__F32].k.scores;
    c->rotate = rotate_scalar;
    if (force_scalar != 1 && kvc__have_avx2()) {
        c->project = kvc__project_avx2;
        c->expand = kvc__expand_avx2;
        c->expand_tile = kvc__expand_tile_avx2;
        c->rotate = kvc__rotate_avx2;
        kvc__kernels fast;
        kvc__codec_avx2_get(KVC__F32, KVC__ROLE_K, &fast);
        c->scores_f32 = fast.scores;
        kvc__codec_avx2_get(p.fmt, role, &fast);
        if (fast.encode) c->kern.encode = fast.encode;
        if (fast.decode) c->kern.decode = fast.decode;
        if (fast.scores) c->kern.scores = fast.scores;
        if (fast.accum) c->kern.accum = fast.accum;
        if (fast.unpack) c->kern.unpack = fast.unpack;
        /* the 512-bit tiles: scores over whole 16-token rows, sums over
         * 16-number pieces of every layer's width */
        if (force_scalar != 2 && kvc__have_avx512()) {
            int dims16 = 1;
            for (int l = 0; l < n_layer; l++) dims16 &= c->dim[l] % 16 == 0;
            kvc__codec_avx512_get(p.fmt, role, &fast);
            if (fast.scores && block_size % 16 == 0) c->kern.scores = fast.scores;
            if (fast.accum && dims16) c->kern.accum = fast.accum;
        }
    }
    return 0;
nomem:
    snprintf(err, errlen, "kvc: %s \"%s\": out of memory for the bases", field, spec);
    kvc__codec_free(c);
    return -1;
}

/* ---- the transform -------------------------------------------------------- */

/* Rows [row0, row0 + n) of (layer, group)'s basis: a head's slice of a latent. */
static const float *basis_rows(const kvc__codec *c, int layer, int head, int *row0) {
    int g = kvc__codec_group(c, head);
    *row0 = c->shape == KVC__LATENT ? head * c->head_dim : 0;
    return c->basis[(size_t)layer * c->n_groups + g];
}

void kvc__codec_encode(const kvc__codec *c, int layer, int group, void *blk, int slot, int n,
                       const float *x, int64_t x_stride) {
    const int R = c->dim[layer];
    if (c->shape == KVC__PLAIN) {
        c->kern.encode(blk, c->block_size, R, slot, n, x, x_stride);
        return;
    }
    const size_t i = (size_t)layer * c->n_groups + group;
    /* project as many tokens as fit, then encode them together (per-channel
     * int4 codes a run of tokens at once, as for coefficients written directly) */
    float coef[KVC__DIM_MAX];
    const int run = KVC__DIM_MAX / R;
    for (int t0 = 0; t0 < n; t0 += run) {
        int m = n - t0 < run ? n - t0 : run;
        for (int t = 0; t < m; t++)
            c->project(c->basis[i], R, c->in_dim, x + (t0 + t) * x_stride, c->mean[i], coef + (size_t)t * R);
        c->kern.encode(blk, c->block_size, R, slot + t0, m, coef, R);
    }
}

void kvc__codec_project(const kvc__codec *c, int layer, int head, const float *q, float *qp) {
    const int R = c->dim[layer], D = c->head_dim;
    if (c->shape == KVC__PLAIN) {
        memcpy(qp, q, sizeof(float) * (size_t)D);
        return;
    }
    int row0;
    const float *P = basis_rows(c, layer, head, &row0);
    c->project(P + (size_t)row0 * R, R, D, q, NULL, qp);
}

void kvc__codec_expand(const kvc__codec *c, int layer, int head, const float *coef, float *out) {
    const int R = c->dim[layer], D = c->head_dim;
    if (c->shape == KVC__PLAIN) {
        memcpy(out, coef, sizeof(float) * (size_t)D);
        return;
    }
    int row0;
    const float *P = basis_rows(c, layer, head, &row0);
    const float *mu = c->mean[(size_t)layer * c->n_groups + kvc__codec_group(c, head)];
    c->expand(P + (size_t)row0 * R, R, D, coef, mu ? mu + row0 : NULL, out);
}

void kvc__codec_decode_tile(const kvc__codec *c, int layer, int head, const void *blk, int j0, int n,
                            float *x, int x_stride, float *work) {
    KVC__CHECK(n >= 0 && n <= KVC__TILE_TOKENS && j0 % 2 == 0, "tile of %d tokens from %d", n, j0);
    const int R = c->dim[layer], plain = c->shape == KVC__PLAIN;
    float *dst = plain ? x : work;                    /* (R, n) numbers as stored */
    const int ds = plain ? x_stride : KVC__TILE_TOKENS;
    if (c->kern.unpack) {
        c->kern.unpack(blk, c->block_size, R, j0, n, dst, ds);
    } else {
        float v[KVC__DIM_MAX];
        for (int t = 0; t < n; t++) {
            c->kern.decode(blk, c->block_size, R, j0 + t, v);
            for (int r = 0; r < R; r++) dst[(size_t)r * ds + t] = v[r];
        }
    }
    if (plain) return;
    int row0;
    const float *P = basis_rows(c, layer, head, &row0);
    const float *mu = c->mean[(size_t)layer * c->n_groups + kvc__codec_group(c, head)];
    c->expand_tile(P + (size_t)row0 * R, R, c->head_dim, work, KVC__TILE_TOKENS, n, mu ? mu + row0 : NULL, x,
                   x_stride);
}

void kvc__codec_decode_head(const kvc__codec *c, int layer, int head, const void *blk, int slot, float *x) {
    if (c->shape == KVC__PLAIN) {
        c->kern.decode(blk, c->block_size, c->head_dim, slot, x);
        return;
    }
    float coef[KVC__DIM_MAX];
    c->kern.decode(blk, c->block_size, c->dim[layer], slot, coef);
    kvc__codec_expand(c, layer, head, coef, x);
}

int kvc__have_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

int kvc__have_avx512(void) {
    return kvc__have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
}
