/* codec_avx2.c: AVX2 + FMA + F16C kernels of the element formats (f32, f16,
 * int8): half conversion with F16C, scores over dimension-major K blocks and
 * weighted sums over token-major V blocks. Compiled with -mavx2 -mfma -mf16c;
 * reached only through kvc__codec_avx2_get after kvc__have_avx2().
 *
 * Scores: for 16 (or 8) tokens at once, each dimension's K numbers are loaded
 * once and multiplied into up to 4 query rows (broadcast q[r][d]), so there is
 * no horizontal sum and a K row is read once for all query heads of a kv head.
 * Weighted sums: for 16 (or 8) dimensions at once, each V number is loaded once
 * and added into up to 4 rows' accumulators kept in registers. The element
 * format is a compile-time constant of an always-inline body, so each format
 * gets its own unrolled loops from one source. */
#include <immintrin.h>
#include <string.h>

#include "cache/codec.h"

#define KVC__INLINE static inline __attribute__((always_inline))

typedef enum { E_F32, E_F16, E_I8 } elem;

KVC__INLINE __m256 load8(elem e, const void *base, size_t i) {
    switch (e) {
    case E_F32: return _mm256_loadu_ps((const float *)base + i);
    case E_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)base + i)));
    default:
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)base + i))));
    }
}

KVC__INLINE float load1(elem e, const void *base, size_t i) {
    switch (e) {
    case E_F32: return ((const float *)base)[i];
    case E_F16: return kvc__f16_to_f32(((const uint16_t *)base)[i]);
    default: return (float)((const int8_t *)base)[i];
    }
}

KVC__INLINE const uint16_t *i8_scales(const void *blk, int B, int dim) {
    return (const uint16_t *)((const uint8_t *)blk + kvc__i8_scale_offset(B, dim));
}

/* ---- scores: s[r][j] = q_r . k_j over a (dim, B) block -------------------- */

/* R rows x 8W tokens starting at token j; results (scaled for int8) to out. */
KVC__INLINE void scores_tile(elem e, int R, int W, const void *blk, int B, int dim, int j,
                             const float *q, __m256 out[4][2]) {
    __m256 acc[4][2];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int d = 0; d < dim; d++) {
        size_t base = (size_t)d * B + j;
        __m256 k0 = load8(e, blk, base);
        __m256 k1 = W > 1 ? load8(e, blk, base + 8) : _mm256_setzero_ps();
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256 qb = _mm256_broadcast_ss(q + (size_t)r * dim + d);
            acc[r][0] = _mm256_fmadd_ps(qb, k0, acc[r][0]);
            if (W > 1) acc[r][1] = _mm256_fmadd_ps(qb, k1, acc[r][1]);
        }
    }
    if (e == E_I8) {
        const uint16_t *sc = i8_scales(blk, B, dim);
        __m256 s0 = load8(E_F16, sc, (size_t)j);
        __m256 s1 = W > 1 ? load8(E_F16, sc, (size_t)j + 8) : _mm256_setzero_ps();
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            acc[r][0] = _mm256_mul_ps(acc[r][0], s0);
            if (W > 1) acc[r][1] = _mm256_mul_ps(acc[r][1], s1);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        out[r][0] = acc[r][0];
        out[r][1] = acc[r][1];
    }
}

KVC__INLINE void scores_rows(elem e, int R, const void *blk, int B, int dim, int n,
                             const float *q, float *s, int s_stride) {
    __m256 t[4][2];
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        scores_tile(e, R, 2, blk, B, dim, j, q, t);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(s + (size_t)r * s_stride + j, t[r][0]);
            _mm256_storeu_ps(s + (size_t)r * s_stride + j + 8, t[r][1]);
        }
    }
    for (; j + 8 <= n; j += 8) {
        scores_tile(e, R, 1, blk, B, dim, j, q, t);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) _mm256_storeu_ps(s + (size_t)r * s_stride + j, t[r][0]);
    }
    if (j == n) return;
    if (j + 8 <= B) {            /* a partial last group inside the block: keep n - j */
        float tmp[8];
        scores_tile(e, R, 1, blk, B, dim, j, q, t);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            _mm256_storeu_ps(tmp, t[r][0]);
            memcpy(s + (size_t)r * s_stride + j, tmp, sizeof(float) * (size_t)(n - j));
        }
        return;
    }
    for (; j < n; j++) {         /* block sizes not a multiple of 8 */
        float sc = e == E_I8 ? kvc__f16_to_f32(i8_scales(blk, B, dim)[j]) : 1.0f;
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            float a = 0.0f;
            for (int d = 0; d < dim; d++) a += q[(size_t)r * dim + d] * load1(e, blk, (size_t)d * B + j);
            s[(size_t)r * s_stride + j] = a * sc;
        }
    }
}

KVC__INLINE void scores_impl(elem e, const void *blk, int B, int dim, int n, const float *q,
                             int nr, float *s, int s_stride) {
    for (int r0 = 0; r0 < nr; r0 += 4) {
        const float *qr = q + (size_t)r0 * dim;
        float *sr = s + (size_t)r0 * s_stride;
        switch (nr - r0) {
        case 1: scores_rows(e, 1, blk, B, dim, n, qr, sr, s_stride); break;
        case 2: scores_rows(e, 2, blk, B, dim, n, qr, sr, s_stride); break;
        case 3: scores_rows(e, 3, blk, B, dim, n, qr, sr, s_stride); break;
        default: scores_rows(e, 4, blk, B, dim, n, qr, sr, s_stride); break;
        }
    }
}

/* ---- weighted sums: acc[r] += sum_j w[r][j] v_j over a (B, dim) block ----- */

/* R rows x 8W dimensions starting at d0, accumulators in registers. */
KVC__INLINE void accum_tile(elem e, int R, int W, const void *blk, int dim, int n,
                            const float *w, int w_stride, int d0, float *acc) {
    __m256 a[4][2];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        a[r][0] = _mm256_loadu_ps(acc + (size_t)r * dim + d0);
        a[r][1] = W > 1 ? _mm256_loadu_ps(acc + (size_t)r * dim + d0 + 8) : _mm256_setzero_ps();
    }
    for (int j = 0; j < n; j++) {
        size_t base = (size_t)j * dim + d0;
        __m256 v0 = load8(e, blk, base);
        __m256 v1 = W > 1 ? load8(e, blk, base + 8) : _mm256_setzero_ps();
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            __m256 wb = _mm256_broadcast_ss(w + (size_t)r * w_stride + j);
            a[r][0] = _mm256_fmadd_ps(wb, v0, a[r][0]);
            if (W > 1) a[r][1] = _mm256_fmadd_ps(wb, v1, a[r][1]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(acc + (size_t)r * dim + d0, a[r][0]);
        if (W > 1) _mm256_storeu_ps(acc + (size_t)r * dim + d0 + 8, a[r][1]);
    }
}

KVC__INLINE void accum_rows(elem e, int R, const void *blk, int dim, int n, const float *w,
                            int w_stride, float *acc) {
    int d0 = 0;
    for (; d0 + 16 <= dim; d0 += 16) accum_tile(e, R, 2, blk, dim, n, w, w_stride, d0, acc);
    for (; d0 + 8 <= dim; d0 += 8) accum_tile(e, R, 1, blk, dim, n, w, w_stride, d0, acc);
    for (; d0 < dim; d0++)
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
            float a = acc[(size_t)r * dim + d0];
            for (int j = 0; j < n; j++) a += w[(size_t)r * w_stride + j] * load1(e, blk, (size_t)j * dim + d0);
            acc[(size_t)r * dim + d0] = a;
        }
}

KVC__INLINE void accum_impl(elem e, const void *blk, int B, int dim, int n, const float *w,
                            int w_stride, int nr, float *acc) {
    float wsc[4 * 1024];          /* int8: weights times the tokens' scales; B <= 1024 */
    for (int r0 = 0; r0 < nr; r0 += 4) {
        int R = nr - r0 < 4 ? nr - r0 : 4;
        const float *wr = w + (size_t)r0 * w_stride;
        int ws = w_stride;
        if (e == E_I8) {
            const uint16_t *sc = i8_scales(blk, B, dim);
            for (int j = 0; j < n; j++) {
                float s = kvc__f16_to_f32(sc[j]);
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) wsc[r * n + j] = wr[(size_t)r * w_stride + j] * s;
            }
            wr = wsc;
            ws = n;
        }
        float *ar = acc + (size_t)r0 * dim;
        switch (R) {
        case 1: accum_rows(e, 1, blk, dim, n, wr, ws, ar); break;
        case 2: accum_rows(e, 2, blk, dim, n, wr, ws, ar); break;
        case 3: accum_rows(e, 3, blk, dim, n, wr, ws, ar); break;
        default: accum_rows(e, 4, blk, dim, n, wr, ws, ar); break;
        }
    }
}

static void scores_f32(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_F32, blk, B, dim, n, q, nr, s, ss);
}
static void scores_f16(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_F16, blk, B, dim, n, q, nr, s, ss);
}
static void scores_i8(const void *blk, int B, int dim, int n, const float *q, int nr, float *s, int ss) {
    scores_impl(E_I8, blk, B, dim, n, q, nr, s, ss);
}
static void accum_f32(const void *blk, int B, int dim, int n, const float *w, int ws, int nr, float *acc) {
    accum_impl(E_F32, blk, B, dim, n, w, ws, nr, acc);
}
static void accum_f16(const void *blk, int B, int dim, int n, const float *w, int ws, int nr, float *acc) {
    accum_impl(E_F16, blk, B, dim, n, w, ws, nr, acc);
}
static void accum_i8(const void *blk, int B, int dim, int n, const float *w, int ws, int nr, float *acc) {
    accum_impl(E_I8, blk, B, dim, n, w, ws, nr, acc);
}

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

static void enc_k_f16(void *blk, int B, int dim, int slot, const float *x) {
    f32_to_f16_strided(x, dim, (uint16_t *)blk + slot, (size_t)B);
}

static void enc_v_f16(void *blk, int B, int dim, int slot, const float *x) {
    uint16_t *row = (uint16_t *)blk + (size_t)slot * dim;
    int d = 0;
    for (; d + 8 <= dim; d += 8)
        _mm_storeu_si128((__m128i *)(row + d), _mm256_cvtps_ph(_mm256_loadu_ps(x + d), _MM_FROUND_TO_NEAREST_INT));
    for (; d < dim; d++) row[d] = kvc__f32_to_f16(x[d]);
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

int kvc__codec_avx2_get(const char *name, kvc__role role, kvc__kernels *out) {
    memset(out, 0, sizeof *out);
    if (strcmp(name, "f32") == 0) {
        if (role == KVC__ROLE_K) out->scores = scores_f32;
        else out->accum = accum_f32;
    } else if (strcmp(name, "f16") == 0) {
        if (role == KVC__ROLE_K) {
            out->encode = enc_k_f16;
            out->scores = scores_f16;
        } else {
            out->encode = enc_v_f16;
            out->decode = dec_v_f16;
            out->accum = accum_f16;
        }
    } else if (strcmp(name, "int8") == 0) {
        if (role == KVC__ROLE_K) {
            out->encode = enc_k_i8;
            out->scores = scores_i8;
        } else {
            out->encode = enc_v_i8;
            out->accum = accum_i8;
        }
    } else {
        return -1;
    }
    return 0;
}
