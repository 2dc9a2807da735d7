/* codec_avx512.c: the attention kernels of the element formats (scores over
 * dimension-major K blocks, weighted sums over token-major V blocks) with
 * 512-bit vectors, for CPUs with AVX-512 F/BW/VL. Reached only through
 * kvc__codec_avx512_get after kvc__have_avx512(), and only where they apply
 * (kvc__codec_init: scores for block sizes that are multiples of 16 tokens,
 * weighted sums for widths that are multiples of 16); the rest (other
 * shapes, the encoders) stays with codec_avx2.c.
 *
 * Why: on a core whose vector units take 512-bit operations, the AVX2
 * kernels spend as many instructions per number widening codes and issuing
 * 8-lane FMAs as the cache saves in bytes (int4 attention ran no faster than
 * f16 on the session-13 Xeon). Here 16 tokens (scores) or 16 dimensions
 * (weighted sums) fill one vector: one code widening and one FMA a row per 16
 * numbers, 4-bit codes widened in order with one byte interleave.
 *
 * Bits: every lane runs the AVX2 kernels' chain of float operations in the
 * same order (a token's score: FMAs over the dimensions in order, then the
 * same scale folds; a dimension's sum: FMAs over the tokens in order, int4
 * from zero then added to the accumulator), and the per-row folds (sums of
 * q, q . min, weights times scales) are computed by the same 8-lane code, so
 * the results equal codec_avx2.c's bit for bit (tests/cache/test_attention.c). */
#include <immintrin.h>
#include <string.h>

#include "cache/codec_simd.h"

/* 16 numbers from element index i, in order (4-bit codes: i even, 8 bytes,
 * low nibble first). */
KVC__INLINE __m512 load16(elem e, const void *base, size_t i) {
    switch (e) {
    case E_F32: return _mm512_loadu_ps((const float *)base + i);
    case E_F16: return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)));
    case E_I8:
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)base + i))));
    default: {
        const __m128i b = _mm_loadl_epi64((const __m128i *)((const uint8_t *)base + i / 2)), m = _mm_set1_epi8(0x0f);
        const __m128i lo = _mm_and_si128(b, m), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m);
        return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    }
    }
}

/* 16 halves from p as floats. */
KVC__INLINE __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* ---- scores: s[r][j] = q_r . k_j over a (dim, B) block -------------------- */


/* R rows x 16 tokens from j over dimensions [d0, d1): raw dot products. */
KVC__INLINE void dot_tile(elem e, int R, const void *blk, int ks, int qs, int d0, int d1, int j, const float *q,
                          __m512 out[4]) {
    __m512 acc[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int d = d0; d < d1; d++) {
        const __m512 k = load16(e, blk, (size_t)d * ks + j);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[(size_t)r * qs + d]), k, acc[r]);
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) out[r] = acc[r];
}

KVC__INLINE void scores_rows(elem e, int R, const void *blk, int B, int dim, int n, const float *q, float *s,
                             int s_stride, const fold_aux *aux) {
    const int ks = k_stride(e, B);
    for (int j = 0; j < n; j += 16) {
        __m512 out[4];
        if (u4_gs(e)) {
            const int GS = u4_gs(e), G = kvc__u4_groups(dim, GS);
            const uint16_t *sc = u4_params(blk, KVC__ROLE_K, B, dim), *mn = sc + (size_t)G * B;
            __m512 tot[4];
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) tot[r] = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                const int d0 = g * GS, d1 = d0 + GS < dim ? d0 + GS : dim;
                __m512 a[4];
                dot_tile(e, R, blk, ks, dim, d0, d1, j, q, a);
                const __m512 s16 = load16_f16(sc + (size_t)g * B + j), m16 = load16_f16(mn + (size_t)g * B + j);
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
                    tot[r] = _mm512_fmadd_ps(s16, a[r], tot[r]);
                    tot[r] = _mm512_fmadd_ps(m16, _mm512_set1_ps(aux->qsum[r][g]), tot[r]);
                }
            }
            _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) out[r] = tot[r];
        } else {
            dot_tile(e, R, blk, ks, dim, 0, dim, j, q, out);
            if (e == E_I8) {
                const __m512 s16 = load16_f16(i8_scales(blk, B, dim) + j);
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) out[r] = _mm512_mul_ps(out[r], s16);
            } else if (e == E_U4C) {
                _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
                    out[r] = _mm512_add_ps(out[r], _mm512_set1_ps(aux->base[r]));
            }
        }
        /* a last partial tile: its lanes past n read the block's own bytes
         * (B is a multiple of 16) and are not stored */
        const __mmask16 keep = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
            _mm512_mask_storeu_ps(s + (size_t)r * s_stride + j, keep, out[r]);
    }
}


/* ---- weighted sums: acc[r] += sum_j w[r][j] v_j over a (B, dim) block ----- */

/* R rows x 16 dimensions from d0. int4 sums from zero and adds acc at the
 * end (the AVX2 kernel's order for 4-bit codes), the others start at acc. */
KVC__INLINE void accum_tile(elem e, int R, const void *blk, int vs, int adim, int n, const float *w, int w_stride,
                            int d0, float *acc) {
    __m512 a[4];
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
        a[r] = is_u4(e) ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (size_t)r * adim + d0);
    for (int j = 0; j < n; j++) {
        const __m512 v = load16(e, blk, (size_t)j * vs + d0);
        _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
            a[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[(size_t)r * w_stride + j]), v, a[r]);
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < R; r++) {
        float *ar = acc + (size_t)r * adim + d0;
        if (is_u4(e)) a[r] = _mm512_add_ps(a[r], _mm512_loadu_ps(ar));
        _mm512_storeu_ps(ar, a[r]);
    }
}

KVC__INLINE void accum_dispatch(elem e, int R, const void *blk, int vs, int adim, int dlo, int dhi, int n,
                                const float *w, int w_stride, float *acc) {
    for (int d0 = dlo; d0 < dhi; d0 += 16) switch (R) {
        case 1: accum_tile(e, 1, blk, vs, adim, n, w, w_stride, d0, acc); break;
        case 2: accum_tile(e, 2, blk, vs, adim, n, w, w_stride, d0, acc); break;
        case 3: accum_tile(e, 3, blk, vs, adim, n, w, w_stride, d0, acc); break;
        default: accum_tile(e, 4, blk, vs, adim, n, w, w_stride, d0, acc); break;
        }
}


#include "cache/codec_entries.h"

void kvc__codec_avx512_get(kvc__fmt fmt, kvc__role role, kvc__kernels *out) {
    memset(out, 0, sizeof *out);
    const int k = role == KVC__ROLE_K;
    switch (fmt) {
    case KVC__F32:
        if (k) out->scores = scores_f32;
        else out->accum = accum_f32;
        break;
    case KVC__F16:
        if (k) out->scores = scores_f16;
        else out->accum = accum_f16;
        break;
    case KVC__I8:
        if (k) out->scores = scores_i8;
        else out->accum = accum_i8;
        break;
    case KVC__U4:
        if (k) out->scores = scores_u4;
        else out->accum = accum_u4;
        break;
    case KVC__U4G64:
        if (k) out->scores = scores_u4g64;
        else out->accum = accum_u4g64;
        break;
    case KVC__U4C:
        if (k) out->scores = scores_u4c;
        break;
    }
}
