/* codec_simd.h: what the x86 kernels of the element formats (codec_avx2.c,
 * codec_avx512.c) share: the element kinds, the block layouts' parameter
 * addresses, and the per-row folds whose results enter every lane (so both
 * files must compute them with the same operations, in the same order). Only
 * for files compiled with AVX2 + FMA + F16C at least. */
#ifndef KVC_CODEC_SIMD_H
#define KVC_CODEC_SIMD_H

#include <immintrin.h>

#include "cache/codec.h"

#define KVC__INLINE static inline __attribute__((always_inline))

typedef enum { E_F32, E_F16, E_I8, E_U4, E_U4G64, E_U4C } elem;

/* int4 per token: the group size; 0 for the other formats. */
KVC__INLINE int u4_gs(elem e) { return e == E_U4 ? 32 : e == E_U4G64 ? 64 : 0; }
KVC__INLINE int is_u4(elem e) { return e == E_U4 || e == E_U4G64 || e == E_U4C; }

/* Elements between two dimensions of a K block / two tokens of a V block. */
KVC__INLINE int k_stride(elem e, int B) { return is_u4(e) ? kvc__even(B) : B; }
KVC__INLINE int v_stride(elem e, int dim) { return is_u4(e) ? kvc__even(dim) : dim; }

KVC__INLINE const uint16_t *i8_scales(const void *blk, int B, int dim) {
    return (const uint16_t *)((const uint8_t *)blk + kvc__i8_scale_offset(B, dim));
}
KVC__INLINE const uint16_t *u4_params(const void *blk, kvc__role role, int B, int dim) {
    return (const uint16_t *)((const uint8_t *)blk + kvc__u4_param_offset(role, B, dim));
}

/* dst[i] = half src[i] for i < n, with F16C. */
KVC__INLINE void f16_row(const uint16_t *src, int n, float *dst) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = kvc__f16_to_f32(src[i]);
}

/* sum_i a[i] * b[i] (b NULL: sum_i a[i]) with 8-wide partial sums. */
KVC__INLINE float dot_row(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(a + i);
        acc = b ? _mm256_fmadd_ps(x, _mm256_loadu_ps(b + i), acc) : _mm256_add_ps(acc, x);
    }
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    float s = _mm_cvtss_f32(h);
    for (; i < n; i++) s += b ? a[i] * b[i] : a[i];
    return s;
}

/* dst[i] = a[i] * b[i] for i < n, 8 lanes at a time. */
KVC__INLINE void mul_row(const float *a, const float *b, int n, float *dst) {
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
    for (; i < n; i++) dst[i] = a[i] * b[i];
}

/* What the format-specific folds need, per scores call. */
typedef struct {
    float qsum[4][KVC__DIM_MAX / 32];             /* int4: per row and group, sum of q */
    float base[4];                                 /* int4 per channel: per row, sum_d q_d min_d */
} fold_aux;

/* The folds of R query rows (qr, dim floats apart) for one scores call: the
 * sums of q per int4 group, and for int4 per channel q times the channel
 * scales cs (into qbuf) and q . mn. */
KVC__INLINE void scores_folds(elem e, const float *qr, int R, int dim, const float *cs, const float *mn, float *qbuf,
                              fold_aux *aux) {
    for (int r = 0; r < R; r++) {
        const float *qrow = qr + (size_t)r * dim;
        if (u4_gs(e))
            for (int g = 0; g < kvc__u4_groups(dim, u4_gs(e)); g++) {
                const int d0 = g * u4_gs(e), d1 = d0 + u4_gs(e) < dim ? d0 + u4_gs(e) : dim;
                aux->qsum[r][g] = dot_row(qrow + d0, NULL, d1 - d0);
            }
        if (e == E_U4C) {
            mul_row(qrow, cs, dim, qbuf + (size_t)r * dim);
            aux->base[r] = dot_row(qrow, mn, dim);
        }
    }
}

#endif
