/* matmul_act32_avx2.c: AVX2+FMA kernels for block-quantized weights times f32
 * activations (contract and the batch-invariance argument: matmul_act32.h).
 *
 * A tile is 4 weight rows x NT tokens (NT = 1..3), 4 * NT accumulators of 8
 * lanes. Weights are decoded 8 at a time: in registers when the call has at
 * most 3 tokens (decode), else once per tile of rows into a panel that all
 * token tiles then read (prefill), so decoding is amortized over the batch. */
#include <immintrin.h>
#include <string.h>

#include "engine/matmul_act32.h"

#define NR ENG__ACT32_PANEL_ROWS

/* The 8 weights of slice s (0..3) of a block, exactly d q + m. */
static inline __attribute__((always_inline)) __m256 slice(eng_dtype type, const uint8_t *blk, int s,
                                                          __m256 d, __m256 mn) {
    __m128i b;
    switch (type) {
    case ENG_Q8_0:
        b = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * s));
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
    case ENG_Q4_1:
        b = _mm_loadl_epi64((const __m128i *)(blk + 4 + 8 * (s & 1)));
        break;
    default: /* ENG_Q4_0 */
        b = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * (s & 1)));
        break;
    }
    if (s >= 2)
        b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), d, mn);
}

/* Block scale and offset, broadcast: Q4_1 d, m; Q4_0 d, -8 d; Q8_0 d, 0. */
static inline __attribute__((always_inline)) void scales(eng_dtype type, const uint8_t *blk, __m256 *d,
                                                         __m256 *mn) {
    uint16_t h[2];
    memcpy(h, blk, sizeof h);
    float df = _cvtsh_ss(h[0]);
    *d = _mm256_set1_ps(df);
    *mn = type == ENG_Q4_1 ? _mm256_set1_ps(_cvtsh_ss(h[1]))
                           : _mm256_set1_ps(type == ENG_Q4_0 ? -8.0f * df : 0.0f);
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline size_t block_bytes(eng_dtype type) {
    return type == ENG_Q8_0 ? 34 : type == ENG_Q4_1 ? 20 : 18;
}

/* One tile: rows wr[0..3] (or their decoded panel rows), tokens xt[0..NT). */
static inline __attribute__((always_inline)) void tile(const eng__act32 *m, eng_dtype type,
                                                       const uint8_t *const wr[NR], const float *panel,
                                                       const float *const xt[3], int NT, float out[NR][3]) {
    const int64_t nb = m->n_in / 32;
    const size_t bs = block_bytes(type);
    __m256 acc[NR][3];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 3
        for (int t = 0; t < NT; t++)
            acc[i][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 d[NR], mn[NR];
        if (!panel)
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++)
                scales(type, wr[i] + b * bs, &d[i], &mn[i]);
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++) {
            __m256 w[NR];
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++)
                w[i] = panel ? _mm256_loadu_ps(panel + i * m->n_in + b * 32 + 8 * s)
                             : slice(type, wr[i] + b * bs, s, d[i], mn[i]);
#pragma GCC unroll 3
            for (int t = 0; t < NT; t++) {
                __m256 xv = _mm256_loadu_ps(xt[t] + b * 32 + 8 * s);
#pragma GCC unroll 4
                for (int i = 0; i < NR; i++)
                    acc[i][t] = _mm256_fmadd_ps(w[i], xv, acc[i][t]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 3
        for (int t = 0; t < NT; t++)
            out[i][t] = hsum(acc[i][t]);
}

static void fill_panel(const eng__act32 *m, const uint8_t *const wr[NR], float *panel) {
    const int64_t nb = m->n_in / 32;
    const size_t bs = block_bytes(m->type);
    for (int i = 0; i < NR; i++)
        for (int64_t b = 0; b < nb; b++) {
            __m256 d, mn;
            scales(m->type, wr[i] + b * bs, &d, &mn);
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++)
                _mm256_storeu_ps(panel + i * m->n_in + b * 32 + 8 * s, slice(m->type, wr[i] + b * bs, s, d, mn));
        }
}

/* Runs token tiles [t0, t1) against one tile of rows; NT is a constant in each
 * call so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void row_tile_t(const eng__act32 *m, eng_dtype type,
                                                             const uint8_t *const wr[NR], const float *panel,
                                                             int64_t r, int nr) {
    float out[NR][3];
    for (int t = 0; t < m->n_tok;) {
        const int nt = m->n_tok - t >= 3 ? 3 : m->n_tok - t;
        const float *xt[3];
        for (int k = 0; k < 3; k++)
            xt[k] = m->x + (int64_t)(t + (k < nt ? k : 0)) * m->n_in;
        if (nt == 3)
            tile(m, type, wr, panel, xt, 3, out);
        else if (nt == 2)
            tile(m, type, wr, panel, xt, 2, out);
        else
            tile(m, type, wr, panel, xt, 1, out);
        for (int k = 0; k < nt; k++)
            for (int i = 0; i < nr; i++)
                m->y[(int64_t)(t + k) * m->y_stride + r + i] = out[i][k];
        t += nt;
    }
}

/* One instance per (weight type, panel or registers): constants let the
 * compiler keep every accumulator in a register. */
static void row_tile_panel(const eng__act32 *m, const uint8_t *const wr[NR], const float *panel, int64_t r, int nr) {
    row_tile_t(m, ENG_F32, wr, panel, r, nr); /* the type is not read when decoding from a panel */
}
#define DIRECT(T, NAME)                                                                    \
    static void NAME(const eng__act32 *m, const uint8_t *const wr[NR], int64_t r, int nr) { \
        row_tile_t(m, T, wr, NULL, r, nr);                                                  \
    }
DIRECT(ENG_Q4_0, row_tile_q4_0)
DIRECT(ENG_Q4_1, row_tile_q4_1)
DIRECT(ENG_Q8_0, row_tile_q8_0)

static void row_tile(const eng__act32 *m, const uint8_t *const wr[NR], const float *panel, int64_t r, int nr) {
    if (panel)
        row_tile_panel(m, wr, panel, r, nr);
    else if (m->type == ENG_Q4_1)
        row_tile_q4_1(m, wr, r, nr);
    else if (m->type == ENG_Q8_0)
        row_tile_q8_0(m, wr, r, nr);
    else
        row_tile_q4_0(m, wr, r, nr);
}

void eng__act32_rows_avx2(const eng__act32 *m, int64_t r0, int64_t r1, float *panel) {
    const bool use_panel = m->n_tok > 3;
    for (int64_t r = r0; r < r1; r += NR) {
        const int nr = r1 - r < NR ? (int)(r1 - r) : NR;
        const uint8_t *wr[NR];
        for (int i = 0; i < NR; i++) /* rows past the end repeat the first: computed, not stored */
            wr[i] = m->w + (r + (i < nr ? i : 0)) * (int64_t)m->row_bytes;
        if (use_panel)
            fill_panel(m, wr, panel);
        row_tile(m, wr, use_panel ? panel : NULL, r, nr);
    }
}
