/* matmul_avx512.c: the batched 16-bit kernels (panel16) for CPUs with
 * AVX-512 (F, BW, VL) and AVX512_VNNI, over panel-packed weights
 * (matmul_internal.h). matmul.c's "avx512" kernel set is the AVX2 set with
 * these in place of its panel16; everything else stays AVX2.
 *
 * Why: a batch step spends most of its time in panel16, which the AVX2
 * kernel runs at one _mm256_madd_epi16 and one _mm256_add_epi32 per 16
 * products. Here one _mm512_dpwssd_epi32 does 32 products and their sum into
 * the accumulator, its activation pair an embedded broadcast from memory.
 *
 * Layout: the 16 rows of a panel fill one vector. Pair k of a packed Q8_0
 * block is 32 signed bytes, rows 0..7 then rows 8..15, each row's two inputs
 * adjacent: sign-extended to 32 int16 they are lane r = row r of the
 * dot-product's 16 lanes. A Q4 pair is 16 bytes whose low nibbles are rows
 * 0..7 and high nibbles rows 8..15; two pairs are widened at once and their
 * halves regrouped with one shuffle each.
 *
 * Bits: the integer sum of a block is exact (no overflow: matmul_internal.h),
 * whatever instruction forms it, and the float work per block is the AVX2
 * kernels' operation for operation (acc = fma(isum, dx d, acc); acc =
 * fma(s, m, acc); restarted every ENG__KC blocks, the pieces added in order),
 * lane for lane, so results equal rows16's and the AVX2 panel16's bit for bit
 * and a token's output does not depend on the batch or the kernel set. */
#include <immintrin.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include "engine/matmul_internal.h"

#define INLINE static inline __attribute__((always_inline))

#define PR ENG__PANEL_ROWS  /* rows per panel: the 16 lanes of a vector */
#define PANEL_MAX_TOK 128   /* tokens whose float sums one call keeps */

enum { K_Q4, K_Q4_1, K_Q8_0 };  /* K_Q4: Q4_0 (its offset -8 d is stored as m) */

/* Pairs k and k + 1 of a packed block's codes as two vectors of 32 int16. */
INLINE void pair2(const uint8_t *pb, int k, const int kind, __m512i *w0, __m512i *w1) {
    if (kind == K_Q8_0) {
        *w0 = _mm512_cvtepi8_epi16(_mm256_load_si256((const __m256i *)(pb + 32 * k)));
        *w1 = _mm512_cvtepi8_epi16(_mm256_load_si256((const __m256i *)(pb + 32 * k + 32)));
        return;
    }
    /* lanes 0..15: pair k's bytes, 16..31: pair k + 1's */
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_load_si256((const __m256i *)(pb + 16 * k)));
    const __m512i lo = _mm512_and_si512(v, _mm512_set1_epi16(0x0f));  /* rows 0..7 */
    const __m512i hi = _mm512_srli_epi16(v, 4);                          /* rows 8..15 */
    *w0 = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(1, 0, 1, 0));
    *w1 = _mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(3, 2, 3, 2));
}

INLINE __m512i bcast_pair(const int16_t *qs) {
    int v;
    memcpy(&v, qs, sizeof v);
    return _mm512_set1_epi32(v);
}

/* Every block of one panel (packed at pk, nb blocks) for tokens [t, t + NT):
 * acc and total hold the tokens' float sums, PR floats each; pf: NULL, or
 * the next panel, prefetched meanwhile. */
INLINE void panel_tile(const eng__mm *m, const uint8_t *pk, const uint8_t *pf, int t, float *acc, float *total,
                       const int NT, const int kind) {
    const size_t pbb = eng__pack_block_bytes(kind == K_Q8_0 ? ENG_Q8_0 : ENG_Q4_1);
    const size_t codes = kind == K_Q8_0 ? ENG__PACK_Q8_CODES : ENG__PACK_Q4_CODES;
    const eng_block_q16 *xt[16];
#pragma GCC unroll 16
    for (int j = 0; j < NT; j++)
        xt[j] = m->xr16 + (int64_t)(t + j) * m->nb;
    for (int64_t b = 0; b < m->nb; b++) {
        const uint8_t *pb = pk + (size_t)b * pbb;
        if (pf)
            for (size_t off = 0; off < pbb; off += 64)
                _mm_prefetch((const char *)pf + (size_t)b * pbb + off, _MM_HINT_T0);
        __m512i s[16];
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++)
            s[j] = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int k = 0; k < ENG_QK / 2; k += 2) {
            __m512i w0, w1;
            pair2(pb, k, kind, &w0, &w1);
#pragma GCC unroll 16
            for (int j = 0; j < NT; j++) {
                s[j] = _mm512_dpwssd_epi32(s[j], w0, bcast_pair(xt[j][b].qs + 2 * k));
                s[j] = _mm512_dpwssd_epi32(s[j], w1, bcast_pair(xt[j][b].qs + 2 * k + 2));
            }
        }
        const float *bd = (const float *)(pb + codes), *bm = bd + PR;
        const bool chunk_end = (b + 1) % ENG__KC == 0 || b + 1 == m->nb;
#pragma GCC unroll 16
        for (int j = 0; j < NT; j++) {
            float *a = acc + j * PR, *tot = total + j * PR;
            __m512 av = _mm512_load_ps(a);
            av = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[j]), _mm512_mul_ps(_mm512_set1_ps(xt[j][b].d), _mm512_load_ps(bd)),
                                 av);
            if (kind != K_Q8_0)
                av = _mm512_fmadd_ps(_mm512_set1_ps(xt[j][b].s), _mm512_load_ps(bm), av);
            if (chunk_end) {
                _mm512_store_ps(tot, b < ENG__KC ? av : _mm512_add_ps(_mm512_load_ps(tot), av));
                av = _mm512_setzero_ps();
            }
            _mm512_store_ps(a, av);
        }
        __asm__ volatile("" ::: "memory");  /* the float sums stay in memory */
    }
}

INLINE void panel_run(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1, const int kind) {
    _Alignas(64) float acc[PANEL_MAX_TOK][PR], total[PANEL_MAX_TOK][PR];
    const size_t pbb = eng__pack_block_bytes(kind == K_Q8_0 ? ENG_Q8_0 : ENG_Q4_1);
    const size_t panel_bytes = (size_t)m->nb * pbb;
    for (int tb = t0; tb < t1; tb += PANEL_MAX_TOK) {
        const int te = t1 - tb < PANEL_MAX_TOK ? t1 : tb + PANEL_MAX_TOK;
        for (int64_t r = r0; r < r1; r += PR) {
            const int nr = r1 - r < PR ? (int)(r1 - r) : PR;
            const uint8_t *pk = m->wp + (size_t)(r / PR) * panel_bytes;
            const uint8_t *pf = r + PR < r1 ? pk + panel_bytes : NULL;
            memset(acc, 0, sizeof(float) * PR * (size_t)(te - tb));
            for (int t = tb; t < te;) {
                float *a = acc[t - tb], *tot = total[t - tb];
                const uint8_t *f = t == tb ? pf : NULL;  /* the first tile prefetches */
                const int n = te - t;
                if (n >= 16) {
                    panel_tile(m, pk, f, t, a, tot, 16, kind);
                    t += 16;
                } else if (n >= 8) {
                    panel_tile(m, pk, f, t, a, tot, 8, kind);
                    t += 8;
                } else if (n >= 4) {
                    panel_tile(m, pk, f, t, a, tot, 4, kind);
                    t += 4;
                } else if (n >= 2) {
                    panel_tile(m, pk, f, t, a, tot, 2, kind);
                    t += 2;
                } else {
                    panel_tile(m, pk, f, t, a, tot, 1, kind);
                    t += 1;
                }
            }
            for (int t = tb; t < te; t++) {
                float *y = m->y + (int64_t)t * m->y_stride + r;
                if (nr == PR)
                    _mm512_storeu_ps(y, _mm512_load_ps(total[t - tb]));
                else
                    _mm512_mask_storeu_ps(y, (__mmask16)((1u << nr) - 1), _mm512_load_ps(total[t - tb]));
            }
        }
    }
}

/* Unpacked weights (packing off) go to the AVX2 kernel: the same bits. */
INLINE void panel16(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1, const int kind, eng_dtype type) {
    if (m->wp)
        panel_run(m, r0, r1, t0, t1, kind);
    else
        eng__mm_kernels_avx2.panel16[type](m, r0, r1, t0, t1);
}

static void panel16_q4_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    panel16(m, r0, r1, t0, t1, K_Q4, ENG_Q4_0);
}

static void panel16_q4_1(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    panel16(m, r0, r1, t0, t1, K_Q4_1, ENG_Q4_1);
}

static void panel16_q8_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    panel16(m, r0, r1, t0, t1, K_Q8_0, ENG_Q8_0);
}

const eng__mm_rows_fn eng__panel16_avx512[ENG_DTYPE_COUNT] = {
    [ENG_Q4_0] = panel16_q4_0,
    [ENG_Q4_1] = panel16_q4_1,
    [ENG_Q8_0] = panel16_q8_0,
};
