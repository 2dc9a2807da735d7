/* codec_avx2.c: AVX2 + FMA + F16C kernels of the element formats (f32, f16,
 * int8, int4 per token, int4 per channel for keys): half conversion with
 * F16C, scores over dimension-major K blocks and weighted sums over
 * token-major V blocks. Compiled with -mavx2 -mfma -mf16c; reached only
 * through kvc__codec_avx2_get after kvc__have_avx2().
 *
 * Scores: for 16 (or 8) tokens at once, each dimension's K numbers are loaded
 * once and multiplied into up to 4 query rows (broadcast q[r][d]), so there is
 * no horizontal sum and a K row is read once for all query heads of a kv head.
 * Weighted sums: for 16 (or 8) dimensions at once, each V number is loaded once
 * and added into up to 4 rows' accumulators kept in registers. The element
 * format is a compile-time constant of an always-inline body, so each format
 * gets its own unrolled loops from one source. Scales fold in after the loops:
 * int8 multiplies a token's score (K) or weight (V) by its scale; int4 runs the
 * loops per group of 32 numbers and adds scale * dot + min * sum(q) (K), or
 * sums weight * scale over codes and weight * min once per group (V); int4
 * per channel multiplies q by the channel's scale as it is broadcast.
 * 4-bit codes are widened 16 at a time without byte shuffles (even and odd
 * codes into separate registers) and summed in that order; a tile puts its
 * sums back in order once at its end: that made the int4 kernels as cheap
 * per number as int8 (they had cost 1.6x as much: README, "KV cache"). */
#include <immintrin.h>
#include <string.h>

#include "cache/codec_simd.h"

/* 8 numbers from element index i (for 4-bit codes, i is even: 4 bytes). */
KVC__INLINE __m256 load8(elem e, const void *base, size_t i) {
    switch (e) {
    case E_F32: return _mm256_loadu_ps((const float *)base + i);
    case E_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
    case E_I8:
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)base + i))));
    default: {
        uint32_t w;
        memcpy(&w, (const uint8_t *)base + i / 2, 4);
        __m128i b = _mm_cvtsi32_si128((int)w), m = _mm_set1_epi8(0x0f);
        __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    }
    }
}

/* 16 numbers from element index i into lo and hi. Other formats come in
 * order (lo the first 8); 4-bit codes come split: lo the 8 even-indexed
 * numbers (low nibbles), hi the 8 odd-indexed (high nibbles), from one
 * zero-extension of 8 bytes to 32-bit lanes, a mask and a shift, with no
 * byte shuffles. Tiles accumulate in that order and put it back once at
 * the end (unsplit). */
KVC__INLINE void load16(elem e, const void *base, size_t i, __m256 *lo, __m256 *hi) {
    if (is_u4(e)) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)base + i / 2)));
        *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0x0f)));
        *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
        return;
    }
    *lo = load8(e, base, i);
    *hi = load8(e, base, i + 8);
}

/* Even-indexed numbers ev (0, 2, .., 14) and odd-indexed od (1, .., 15) of
 * 16 back in order: *ev = numbers 0..7, *od = 8..15. */
KVC__INLINE void unsplit(__m256 *ev, __m256 *od) {
    __m256 a = _mm256_unpacklo_ps(*ev, *od);      /* 0 1 2 3 | 8 9 10 11 */
    __m256 b = _mm256_unpackhi_ps(*ev, *od);      /* 4 5 6 7 | 12 13 14 15 */
    *ev = _mm256_permute2f128_ps(a, b, 0x20);
    *od = _mm256_permute2f128_ps(a, b, 0x31);
}

KVC__INLINE float load1(elem e, const void *base, size_t i) {
    switch (e) {
    case E_F32: return ((const float *)base)[i];
    case E_F16: return kvc__f16_to_f32(((const uint16_t *)base)[i]);
    case E_I8: return (float)((const int8_t *)base)[i];
    default: return (float)((((const uint8_t *)base)[i >> 1] >> ((i & 1) * 4)) & 15);
    }
}



/* ---- scores: s[r][j] = q_r . k_j over a (dim, B) block -------------------- */


/* R rows x 8W tokens (W = 1 or 2) starting at token j, dimensions
 * [d0, d1): raw dot products of codes, in token order. */
KVC__INLINE void dot_tile(elem e, int R, int W, const void *blk, int ks, int qs, int d0, int d1, int j,
                          const float *q, __m256 out[4][2]) {
    __m256 acc[4][2];          /* local, so they stay in registers */
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int d = d0; d < d1; d++) {
        size_t base = (size_t)d * ks + j;
        __m256 k0, k1 = _mm256_setzero_ps();
        if (W > 1) load16(e, blk, base, &k0, &k1);
        else k0 = load8(e, blk, base);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256 qb = _mm256_broadcast_ss(q + (size_t)r * qs + d);
            acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
            if (W > 1) acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        if (is_u4(e) && W > 1) unsplit(&acc[r][0], &acc[r][1]);
        out[r][0] = acc[r][0];
        out[r][1] = acc[r][1];
    }
}

/* R rows x 8W tokens from token j: finished scores into out. */
KVC__INLINE void scores_tile(elem e, int R, int W, const void *blk, int B, int dim, int j, const float *q,
                             const fold_aux *aux, __m256 out[4][2]) {
    if (u4_gs(e)) {
        const int GS = u4_gs(e), G = kvc__u4_groups(dim, GS);
        const uint16_t *sc = u4_params(blk, KVC__ROLE_K, B, dim), *mn = sc + (size_t)G * B;
        __m256 tot[4][2];
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) tot[r][0] = tot[r][1] = _mm256_setzero_ps();
        for (int g = 0; g < G; g++) {
            int d0 = g * GS, d1 = d0 + GS < dim ? d0 + GS : dim;
            __m256 a[4][2];
            dot_tile(e, R, W, blk, kvc__even(B), dim, d0, d1, j, q, a);
            for (int w = 0; w < W; w++) {
                __m256 s8 = load8(E_F16, sc, (size_t)g * B + j + 8 * w), m8 = load8(E_F16, mn, (size_t)g * B + j + 8 * w);
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
                    tot[r][w] = _mm256_fmadd_ps(s8, a[r][w], tot[r][w]);
                    tot[r][w] = _mm256_fmadd_ps(m8, _mm256_set1_ps(aux->qsum[r][g]), tot[r][w]);
                }
            }
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) out[r][0] = tot[r][0], out[r][1] = tot[r][1];
        return;
    }
    dot_tile(e, R, W, blk, k_stride(e, B), dim, 0, dim, j, q, out);
    if (e == E_I8) {
        const uint16_t *sc = i8_scales(blk, B, dim);
        for (int w = 0; w < W; w++) {
            __m256 s8 = load8(E_F16, sc, (size_t)j + 8 * w);
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) out[r][w] = _mm256_mul_ps(out[r][w], s8);
        }
    } else if (e == E_U4C) {
        for (int w = 0; w < W; w++)
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
                out[r][w] = _mm256_add_ps(out[r][w], _mm256_set1_ps(aux->base[r]));
    }
}

/* One token's score for row r (block sizes not a multiple of 8). */
KVC__INLINE float score1(elem e, const void *blk, int B, int dim, int j, const float *qr, int r,
                         const fold_aux *aux) {
    if (u4_gs(e)) {
        const int GS = u4_gs(e), G = kvc__u4_groups(dim, GS);
        const uint16_t *sc = u4_params(blk, KVC__ROLE_K, B, dim), *mn = sc + (size_t)G * B;
        float s = 0.0f;
        for (int g = 0; g < G; g++) {
            int d0 = g * GS, d1 = d0 + GS < dim ? d0 + GS : dim;
            float a = 0.0f;
            for (int d = d0; d < d1; d++) a += qr[d] * load1(e, blk, (size_t)d * kvc__even(B) + j);
            s += kvc__f16_to_f32(sc[(size_t)g * B + j]) * a + kvc__f16_to_f32(mn[(size_t)g * B + j]) * aux->qsum[r][g];
        }
        return s;
    }
    float a = 0.0f;
    for (int d = 0; d < dim; d++) a += qr[d] * load1(e, blk, (size_t)d * k_stride(e, B) + j);
    if (e == E_I8) a *= kvc__f16_to_f32(i8_scales(blk, B, dim)[j]);
    if (e == E_U4C) a += aux->base[r];
    return a;
}

KVC__INLINE void scores_rows(elem e, int R, const void *blk, int B, int dim, int n,
                             const float *q, float *s, int s_stride, const fold_aux *aux) {
    __m256 t[4][2];
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        scores_tile(e, R, 2, blk, B, dim, j, q, aux, t);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(s + (size_t)r * s_stride + j, t[r][0]);
            _mm256_storeu_ps(s + (size_t)r * s_stride + j + 8, t[r][1]);
        }
    }
    for (; j + 8 <= n; j += 8) {
        scores_tile(e, R, 1, blk, B, dim, j, q, aux, t);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _mm256_storeu_ps(s + (size_t)r * s_stride + j, t[r][0]);
    }
    if (j == n) return;
    if (j + 8 <= B) {            /* a partial last group inside the block: keep n - j */
        float tmp[8];
        scores_tile(e, R, 1, blk, B, dim, j, q, aux, t);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(tmp, t[r][0]);
            memcpy(s + (size_t)r * s_stride + j, tmp, sizeof(float) * (size_t)(n - j));
        }
        return;
    }
    for (; j < n; j++)           /* block sizes not a multiple of 8 */
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
            s[(size_t)r * s_stride + j] = score1(e, blk, B, dim, j, q + (size_t)r * dim, r, aux);
}



/* ---- weighted sums: acc[r] += sum_j w[r][j] v_j over a (B, dim) block ----- */

/* R rows x 8W dimensions (W = 1 or 2) starting at d0, accumulators in
 * registers; vs: elements between tokens; acc rows are adim floats apart.
 * 4-bit codes are summed in their split order from zero and added to acc in
 * order at the end. */
KVC__INLINE void accum_tile(elem e, int R, int W, const void *blk, int vs, int adim, int n,
                            const float *w, int w_stride, int d0, float *acc) {
    const int split = is_u4(e) && W > 1;
    __m256 a[4][2];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        a[r][0] = split ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + (size_t)r * adim + d0);
        a[r][1] = W > 1 && !split ? _mm256_loadu_ps(acc + (size_t)r * adim + d0 + 8) : _mm256_setzero_ps();
    }
    for (int j = 0; j < n; j++) {
        size_t base = (size_t)j * vs + d0;
        __m256 v0, v1 = _mm256_setzero_ps();
        if (W > 1) load16(e, blk, base, &v0, &v1);
        else v0 = load8(e, blk, base);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256 wb = _mm256_broadcast_ss(w + (size_t)r * w_stride + j);
            a[r][0] = _mm256_fmadd_ps(wb, v0, a[r][0]);
            if (W > 1) a[r][1] = _mm256_fmadd_ps(wb, v1, a[r][1]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        float *ar = acc + (size_t)r * adim + d0;
        if (split) {
            unsplit(&a[r][0], &a[r][1]);
            a[r][0] = _mm256_add_ps(a[r][0], _mm256_loadu_ps(ar));
            a[r][1] = _mm256_add_ps(a[r][1], _mm256_loadu_ps(ar + 8));
        }
        _mm256_storeu_ps(ar, a[r][0]);
        if (W > 1) _mm256_storeu_ps(ar + 8, a[r][1]);
    }
}

/* Dimensions [dlo, dhi) of R rows. */
KVC__INLINE void accum_rows(elem e, int R, const void *blk, int vs, int adim, int dlo, int dhi, int n,
                            const float *w, int w_stride, float *acc) {
    int d0 = dlo;
    for (; d0 + 16 <= dhi; d0 += 16) accum_tile(e, R, 2, blk, vs, adim, n, w, w_stride, d0, acc);
    for (; d0 + 8 <= dhi; d0 += 8) accum_tile(e, R, 1, blk, vs, adim, n, w, w_stride, d0, acc);
    for (; d0 < dhi; d0++)
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            float a = acc[(size_t)r * adim + d0];
            for (int j = 0; j < n; j++) a += w[(size_t)r * w_stride + j] * load1(e, blk, (size_t)j * vs + d0);
            acc[(size_t)r * adim + d0] = a;
        }
}

KVC__INLINE void accum_dispatch(elem e, int R, const void *blk, int vs, int adim, int dlo, int dhi, int n,
                                const float *w, int w_stride, float *acc) {
    switch (R) {
    case 1: accum_rows(e, 1, blk, vs, adim, dlo, dhi, n, w, w_stride, acc); break;
    case 2: accum_rows(e, 2, blk, vs, adim, dlo, dhi, n, w, w_stride, acc); break;
    case 3: accum_rows(e, 3, blk, vs, adim, dlo, dhi, n, w, w_stride, acc); break;
    default: accum_rows(e, 4, blk, vs, adim, dlo, dhi, n, w, w_stride, acc); break;
    }
}


/* ---- unpack: a K block's tokens widened to f32, (dim, n) ------------------ */

/* 8 tokens from j of number d, scales and minima applied. */
KVC__INLINE __m256 unpack8(elem e, const void *blk, int B, int dim, int d, int j, const float *cs, const float *cm) {
    __m256 v = load8(e, blk, (size_t)d * k_stride(e, B) + j);
    if (e == E_I8) return _mm256_mul_ps(v, load8(E_F16, i8_scales(blk, B, dim), (size_t)j));
    if (e == E_U4C) return _mm256_fmadd_ps(_mm256_set1_ps(cs[d]), v, _mm256_set1_ps(cm[d]));
    if (u4_gs(e)) {
        const int G = kvc__u4_groups(dim, u4_gs(e));
        const uint16_t *sc = u4_params(blk, KVC__ROLE_K, B, dim), *mn = sc + (size_t)G * B;
        size_t p = (size_t)(d / u4_gs(e)) * B + j;
        return _mm256_fmadd_ps(load8(E_F16, sc, p), v, load8(E_F16, mn, p));
    }
    return v;
}

/* One number as unpack8 gives it (block sizes not a multiple of 8). */
KVC__INLINE float unpack1(elem e, const void *blk, int B, int dim, int d, int j, const float *cs, const float *cm) {
    float v = load1(e, blk, (size_t)d * k_stride(e, B) + j);
    if (e == E_I8) return v * kvc__f16_to_f32(i8_scales(blk, B, dim)[j]);
    if (e == E_U4C) return cs[d] * v + cm[d];
    if (u4_gs(e)) {
        const int G = kvc__u4_groups(dim, u4_gs(e));
        const uint16_t *sc = u4_params(blk, KVC__ROLE_K, B, dim), *mn = sc + (size_t)G * B;
        size_t p = (size_t)(d / u4_gs(e)) * B + j;
        return kvc__f16_to_f32(sc[p]) * v + kvc__f16_to_f32(mn[p]);
    }
    return v;
}

KVC__INLINE void unpack_impl(elem e, const void *blk, int B, int dim, int j0, int n, float *x, int x_stride) {
    float cs[KVC__DIM_MAX], cm[KVC__DIM_MAX];     /* int4 per channel: scales, minima */
    if (e == E_U4C) {
        const uint16_t *p = u4_params(blk, KVC__ROLE_K, B, dim);
        f16_row(p, dim, cs);
        f16_row(p + dim, dim, cm);
    }
    for (int d = 0; d < dim; d++) {
        float *xd = x + (size_t)d * x_stride;
        int t = 0;
        for (; t + 8 <= n; t += 8) _mm256_storeu_ps(xd + t, unpack8(e, blk, B, dim, d, j0 + t, cs, cm));
        for (; t < n; t++) xd[t] = unpack1(e, blk, B, dim, d, j0 + t, cs, cm);
    }
}

static void unpack_f32(const void *blk, int B, int dim, int j0, int n, float *x, int xs) {
    unpack_impl(E_F32, blk, B, dim, j0, n, x, xs);
}
static void unpack_f16(const void *blk, int B, int dim, int j0, int n, float *x, int xs) {
    unpack_impl(E_F16, blk, B, dim, j0, n, x, xs);
}
static void unpack_i8(const void *blk, int B, int dim, int j0, int n, float *x, int xs) {
    unpack_impl(E_I8, blk, B, dim, j0, n, x, xs);
}
static void unpack_u4(const void *blk, int B, int dim, int j0, int n, float *x, int xs) {
    unpack_impl(E_U4, blk, B, dim, j0, n, x, xs);
}
static void unpack_u4g64(const void *blk, int B, int dim, int j0, int n, float *x, int xs) {
    unpack_impl(E_U4G64, blk, B, dim, j0, n, x, xs);
}
static void unpack_u4c(const void *blk, int B, int dim, int j0, int n, float *x, int xs) {
    unpack_impl(E_U4C, blk, B, dim, j0, n, x, xs);
}

#include "cache/codec_entries.h"

/* ---- f16 with F16C ------------------------------------------------------- */

/* dst[i * step] = half(src[i]) for i < n, round to nearest even. */
static void f32_to_f16_strided(const float *src, int n, uint16_t *dst, size_t step) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16_t h[8];
        _mm_storeu_si128((__m128i *)h, _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
        for (int t = 0; t < 8; t++) dst[(size_t)(i + t) * step] = h[t];
    }
    for (; i < n; i++) dst[(size_t)i * step] = kvc__f32_to_f16(src[i]);
}

static void enc_k_f16(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++) f32_to_f16_strided(x + t * xs, dim, (uint16_t *)blk + slot + t, (size_t)B);
}

static void enc_v_f16(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++) {
        uint16_t *row = (uint16_t *)blk + (size_t)(slot + t) * dim;
        const float *xt = x + t * xs;
        int d = 0;
        for (; d + 8 <= dim; d += 8)
            _mm_storeu_si128((__m128i *)(row + d), _mm256_cvtps_ph(_mm256_loadu_ps(xt + d), _MM_FROUND_TO_NEAREST_INT));
        for (; d < dim; d++) row[d] = kvc__f32_to_f16(xt[d]);
    }
}

static void dec_v_f16(const void *blk, int B, int dim, int slot, float *x) {
    const uint16_t *row = (const uint16_t *)blk + (size_t)slot * dim;
    int d = 0;
    for (; d + 8 <= dim; d += 8) _mm256_storeu_ps(x + d, load8(E_F16, row, (size_t)d));
    for (; d < dim; d++) x[d] = kvc__f16_to_f32(row[d]);
}

/* ---- int8 encode ---------------------------------------------------------- */

/* Same numbers as codec.c's i8_quantize: q[d * q_step] = round(x[d] / scale). */
static void i8_quantize(const float *x, int dim, int8_t *q, size_t q_step, uint16_t *scale_out) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    int d = 0;
    for (; d + 8 <= dim; d += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + d), abs_mask));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    float amax = _mm_cvtss_f32(m4);
    for (; d < dim; d++) {
        float a = x[d] < 0.0f ? -x[d] : x[d];
        amax = a > amax ? a : amax;
    }
    float s;
    kvc__i8_scale(amax, scale_out, &s);
    if (!(s > 0.0f)) {
        for (d = 0; d < dim; d++) q[(size_t)d * q_step] = 0;
        return;
    }
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (d = 0; d + 8 <= dim; d += 8) {
        __m256 v = _mm256_min_ps(_mm256_max_ps(_mm256_div_ps(_mm256_loadu_ps(x + d), vs), lo), hi);
        __m256i i32 = _mm256_cvtps_epi32(v);                  /* nearest even (MXCSR default) */
        __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
        __m128i i8 = _mm_packs_epi16(i16, i16);
        if (q_step == 1) {
            _mm_storel_epi64((__m128i *)(q + d), i8);
        } else {
            int8_t b[16];
            _mm_storeu_si128((__m128i *)b, i8);
            for (int t = 0; t < 8; t++) q[(size_t)(d + t) * q_step] = b[t];
        }
    }
    for (; d < dim; d++) q[(size_t)d * q_step] = kvc__i8_round(x[d] / s);
}

static void enc_k_i8(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++) {
        uint16_t sh;
        i8_quantize(x + t * xs, dim, (int8_t *)blk + slot + t, (size_t)B, &sh);
        memcpy((uint8_t *)blk + kvc__i8_scale_offset(B, dim) + 2 * (size_t)(slot + t), &sh, sizeof sh);
    }
}

static void enc_v_i8(void *blk, int B, int dim, int slot, int n, const float *x, int64_t xs) {
    for (int t = 0; t < n; t++) {
        uint16_t sh;
        i8_quantize(x + t * xs, dim, (int8_t *)blk + (size_t)(slot + t) * dim, 1, &sh);
        memcpy((uint8_t *)blk + kvc__i8_scale_offset(B, dim) + 2 * (size_t)(slot + t), &sh, sizeof sh);
    }
}

/* ---- the transform's loops ------------------------------------------------ */

/* coef = P^T (x - mu): 32 (then 8) coefficients at a time kept in registers
 * over all rows. */
void kvc__project_avx2(const float *P, int R, int n, const float *x, const float *mu, float *coef) {
    float xc[KVC__DIM_MAX];
    for (int d = 0; d < n; d++) xc[d] = x[d] - (mu ? mu[d] : 0.0f);
    int r0 = 0;
    for (; r0 + 32 <= R; r0 += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int d = 0; d < n; d++) {
            const float *row = P + (size_t)d * R + r0;
            __m256 xb = _mm256_broadcast_ss(xc + d);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(row), xb, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8), xb, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + 16), xb, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + 24), xb, a3);
        }
        _mm256_storeu_ps(coef + r0, a0);
        _mm256_storeu_ps(coef + r0 + 8, a1);
        _mm256_storeu_ps(coef + r0 + 16, a2);
        _mm256_storeu_ps(coef + r0 + 24, a3);
    }
    for (; r0 + 8 <= R; r0 += 8) {
        __m256 a0 = _mm256_setzero_ps();
        for (int d = 0; d < n; d++) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(P + (size_t)d * R + r0), _mm256_broadcast_ss(xc + d), a0);
        _mm256_storeu_ps(coef + r0, a0);
    }
    for (; r0 < R; r0++) {
        float a = 0.0f;
        for (int d = 0; d < n; d++) a += P[(size_t)d * R + r0] * xc[d];
        coef[r0] = a;
    }
}

/* out[d] = mu[d] + P[d] . coef: one dot product per row. */
void kvc__expand_avx2(const float *P, int R, int n, const float *coef, const float *mu, float *out) {
    for (int d = 0; d < n; d++) {
        const float *row = P + (size_t)d * R;
        out[d] = (mu ? mu[d] : 0.0f) + dot_row(row, coef, R);
    }
}

/* NR rows of out from row d: 16 (then 8) tokens at a time, NR x 2
 * accumulators over r; each product added in the order of r from mu. */
KVC__INLINE void expand_rows(int NR, const float *P, int R, int d, const float *c, int cs, int m,
                             const float *mu, float *out, int os) {
    int t = 0;
    for (; t + 16 <= m; t += 16) {
        __m256 a[4][2];
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) a[i][0] = a[i][1] = _mm256_set1_ps(mu ? mu[d + i] : 0.0f);
        for (int r = 0; r < R; r++) {
            __m256 c0 = _mm256_loadu_ps(c + (size_t)r * cs + t), c1 = _mm256_loadu_ps(c + (size_t)r * cs + t + 8);
            _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) {
                __m256 p = _mm256_broadcast_ss(P + (size_t)(d + i) * R + r);
                a[i][0] = _mm256_fmadd_ps(p, c0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(p, c1, a[i][1]);
            }
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) {
            _mm256_storeu_ps(out + (size_t)(d + i) * os + t, a[i][0]);
            _mm256_storeu_ps(out + (size_t)(d + i) * os + t + 8, a[i][1]);
        }
    }
    for (; t + 8 <= m; t += 8) {
        __m256 a[4];
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) a[i] = _mm256_set1_ps(mu ? mu[d + i] : 0.0f);
        for (int r = 0; r < R; r++) {
            __m256 c0 = _mm256_loadu_ps(c + (size_t)r * cs + t);
            _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++)
                a[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(P + (size_t)(d + i) * R + r), c0, a[i]);
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) _mm256_storeu_ps(out + (size_t)(d + i) * os + t, a[i]);
    }
    for (; t < m; t++)
        _Pragma("GCC unroll 4") for (int i = 0; i < NR; i++) {
            float a = mu ? mu[d + i] : 0.0f;
            for (int r = 0; r < R; r++) a = __builtin_fmaf(P[(size_t)(d + i) * R + r], c[(size_t)r * cs + t], a);
            out[(size_t)(d + i) * os + t] = a;
        }
}

/* out (n, m) = mu + P (n, R) c (R, m): 4 rows of P at a time share each
 * load of c. */
void kvc__expand_tile_avx2(const float *P, int R, int n, const float *c, int c_stride, int m,
                           const float *mu, float *out, int out_stride) {
    int d = 0;
    for (; d + 4 <= n; d += 4) expand_rows(4, P, R, d, c, c_stride, m, mu, out, out_stride);
    for (; d < n; d++) expand_rows(1, P, R, d, c, c_stride, m, mu, out, out_stride);
}

void kvc__rotate_avx2(float *x, int x_stride, int n, int rope_dim, int neox, const float *cos, const float *sin,
                      int c_stride) {
    const int half = rope_dim / 2;
    for (int i = 0; i < half; i++) {
        float *xa = x + (size_t)(neox ? i : 2 * i) * x_stride, *xb = x + (size_t)(neox ? i + half : 2 * i + 1) * x_stride;
        const float *cs = cos + (size_t)i * c_stride, *sn = sin + (size_t)i * c_stride;
        int t = 0;
        for (; t + 8 <= n; t += 8) {
            __m256 c = _mm256_loadu_ps(cs + t), s = _mm256_loadu_ps(sn + t);
            __m256 a = _mm256_loadu_ps(xa + t), b = _mm256_loadu_ps(xb + t);
            _mm256_storeu_ps(xa + t, _mm256_fmsub_ps(a, c, _mm256_mul_ps(b, s)));
            _mm256_storeu_ps(xb + t, _mm256_fmadd_ps(a, s, _mm256_mul_ps(b, c)));
        }
        for (; t < n; t++) {
            float a = xa[t], b = xb[t];
            xa[t] = a * cs[t] - b * sn[t];
            xb[t] = a * sn[t] + b * cs[t];
        }
    }
}

void kvc__codec_avx2_get(kvc__fmt fmt, kvc__role role, kvc__kernels *out) {
    memset(out, 0, sizeof *out);
    const int k = role == KVC__ROLE_K;
    switch (fmt) {
    case KVC__F32:
        if (k) out->scores = scores_f32, out->unpack = unpack_f32;
        else out->accum = accum_f32;
        break;
    case KVC__F16:
        out->encode = k ? enc_k_f16 : enc_v_f16;
        if (k) out->scores = scores_f16, out->unpack = unpack_f16;
        else out->decode = dec_v_f16, out->accum = accum_f16;
        break;
    case KVC__I8:
        out->encode = k ? enc_k_i8 : enc_v_i8;
        if (k) out->scores = scores_i8, out->unpack = unpack_i8;
        else out->accum = accum_i8;
        break;
    case KVC__U4:
        if (k) out->scores = scores_u4, out->unpack = unpack_u4;
        else out->accum = accum_u4;
        break;
    case KVC__U4G64:
        if (k) out->scores = scores_u4g64, out->unpack = unpack_u4g64;
        else out->accum = accum_u4g64;
        break;
    case KVC__U4C:
        if (k) out->scores = scores_u4c, out->unpack = unpack_u4c;
        break;
    }
}
