/* matmul_avx2.c: the AVX2 + FMA + F16C kernels of eng_matmul (selected at
 * run time by matmul.c; layouts in matmul_internal.h).
 *
 * Quantized weights use integer dot products per block of 32:
 * _mm256_maddubs_epi16 multiplies unsigned by signed bytes, so Q4 nibbles are
 * used as unsigned 0..15 with the offset carried by the activation sum s, and
 * Q8_0 x Q8 uses the sign trick (|w| times x with w's sign). Two tilings:
 *   rows:   4 weight rows x 1 token (decode) or up to 3 rows x 4 tokens,
 *           activations in row layout; serves decode, small batches and the
 *           last few tokens of a batch. Decode streams the weights from
 *           memory, so these kernels prefetch ahead of the hardware.
 *   groups: up to 4 weight rows x 8 tokens, activations in group layout; the
 *           row tile is first unpacked to bytes and float scales on the stack
 *           (once for all the task's tokens), then a broadcast group of 4
 *           weights meets the same 4 values of 8 tokens, int16 sums run over
 *           the whole block, and one FMA scales 8 tokens.
 * F32 and F16 weights: the row tiling with FMA, F16 widened with F16C once
 * per row and reused for every token of the tile. */
#include <immintrin.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include "engine/matmul_internal.h"

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float load_f16(const void *p) {
    unsigned short h;
    memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}

/* Four bytes at p in every 32-bit lane. vbroadcastss is a pure load on
 * AMD Zen, where vpbroadcastd from memory also takes a vector ALU slot. */
INLINE __m256i bcast4(const void *p) {
    return _mm256_castps_si256(_mm256_broadcast_ss((const float *)p));
}

/* Rows are short (a few cache lines), so the hardware prefetcher sees many
 * brief streams. A row tile of `tile_bytes` asks, at each step of its loop,
 * for the bytes `done` (the part of a tile consumed so far) into the tile
 * PF_TILES ahead. */
#define PF_TILES 2
INLINE void prefetch_ahead(const void *tile, size_t tile_bytes, size_t done) {
    const char *p = (const char *)tile + PF_TILES * tile_bytes + done;
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + 64, _MM_HINT_T0);
}

/* ---- activation quantization --------------------------------------------- */

/* The shared part of both activation quantizers: block p's 32 values as
 * integers q[4] (nearest even, in element order 8 per vector), its scale
 * d = max|x| / qmax and the sum of the integers. */
INLINE void quantize_block(const float *p, float qmax, __m256i q[4], float *d, int *sum) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4];
    for (int k = 0; k < 4; k++)
        v[k] = _mm256_loadu_ps(p + 8 * k);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                              _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    *d = _mm_cvtss_f32(m4) / qmax;
    const __m256 id = _mm256_set1_ps(*d != 0.0f ? 1.0f / *d : 0.0f);
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id));  /* nearest even */
    __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *sum = _mm_cvtsi128_si32(s4);
}

static void quantize_avx2(const float *x, eng_block_q8_1 *out, int64_t n) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < n / ENG_QK; b++) {
        __m256i q[4];
        float d;
        int sum;
        quantize_block(x + b * ENG_QK, 127.0f, q, &d, &sum);
        /* packs work per 128-bit lane: restore element order afterwards */
        const __m256i q16 = _mm256_packs_epi32(q[0], q[1]);
        const __m256i q16b = _mm256_packs_epi32(q[2], q[3]);
        const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, q16b), order);
        _mm256_storeu_si256((__m256i *)out[b].qs, q8);
        out[b].d = d;
        out[b].s = d * (float)sum;
    }
}

/* ---- Q4_0 / Q4_1 ---------------------------------------------------------- */

/* The 32 nibbles of a Q4 block in element order, as bytes 0..15. */
INLINE __m256i unpack_nibbles(const uint8_t *qs) {
    /* both halves loaded by one broadcast, the upper one shifted by 4 */
    const __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    return _mm256_and_si256(_mm256_srlv_epi64(q, _mm256_setr_epi64x(0, 0, 4, 4)), _mm256_set1_epi8(0x0f));
}

/* Block scale d and offset m of a Q4 block (m = -8 d for Q4_0). */
INLINE void q4_scales(const uint8_t *blk, bool has_min, float *d, float *mn) {
    *d = load_f16(blk);
    *mn = has_min ? load_f16(blk + 2) : -8.0f * *d;
}

INLINE size_t q4_block_bytes(bool has_min) {
    return has_min ? sizeof(eng_block_q4_1) : sizeof(eng_block_q4_0);
}

INLINE size_t q4_qs_offset(bool has_min) {
    return has_min ? offsetof(eng_block_q4_1, qs) : offsetof(eng_block_q4_0, qs);
}

/* [d, m] of a Q4 block as floats in lanes 0 and 1 (for Q4_0: [d, d]; its
 * offset -8 d is applied to the sum at the end). */
INLINE __m128 q4_dm(const uint8_t *blk, bool has_min) {
    int v;
    memcpy(&v, blk, sizeof v);
    const __m128 dm = _mm_cvtph_ps(_mm_cvtsi32_si128(v));
    return has_min ? dm : _mm_moveldup_ps(dm);
}

/* Rows [r, r + NR) x tokens [t, t + NT), row layout. Per block, one multiply
 * [d, m] * [dx, s] gives both the scale of the integer dot product and the
 * offset term m * s, which is summed in lane 1 of `off`. */
INLINE void q4_rows_tile(const eng__mm *m, int64_t r, int t, const int NR, const int NT,
                         const bool has_min) {
    const size_t bb = q4_block_bytes(has_min), qo = q4_qs_offset(has_min);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    __m128 off[4][4];
    const uint8_t *row[4];
    const eng_block_q8_1 *xt[4];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++) {
        row[i] = m->w + (r + i) * m->row_bytes;
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            acc[i][j] = _mm256_setzero_ps();
            off[i][j] = _mm_setzero_ps();
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++)
        xt[j] = m->xr + (int64_t)(t + j) * m->nb;
    for (int64_t b = 0; b < m->nb; b++) {
        __m256i w[4];
        __m128 dm[4];
        prefetch_ahead(row[0], NR * m->row_bytes, (size_t)b * NR * bb);
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++) {
            const uint8_t *blk = row[i] + b * bb;
            dm[i] = q4_dm(blk, has_min);
            w[i] = unpack_nibbles(blk + qo);
        }
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const eng_block_q8_1 *xb = xt[j] + b;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)xb->qs);
            const __m128 ds = _mm_castpd_ps(_mm_load_sd((const double *)&xb->d));  /* [dx, s] */
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++) {
                const __m128 prod = _mm_mul_ps(dm[i], ds);  /* [d dx, m s] */
                const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[i], xv), ones);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcastss_ps(prod), acc[i][j]);
                off[i][j] = _mm_add_ps(off[i][j], prod);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const float o = _mm_cvtss_f32(_mm_movehdup_ps(off[i][j]));
            m->y[(int64_t)(t + j) * m->y_stride + r + i] = hsum_ps(acc[i][j]) + (has_min ? o : -8.0f * o);
        }
}

/* Calls TILE(m, r, t, nr, nt, ...) over rows [r0, r1) x tokens [t0, t1) with
 * nr and nt compile-time constants: single tokens (decode) in tiles of up to
 * 4 rows, more tokens in tiles of up to 3 rows x 4 tokens. */
#define FOR_ROW_TILES(TILE, m, r0, r1, t0, t1, ...)                                     \
    for (int t_ = (t0); t_ < (t1); t_ += 4) {                                          \
        const int nt_ = (t1) - t_ < 4 ? (t1) - t_ : 4;                                 \
        const int64_t tile_ = nt_ == 1 ? 4 : 3;                                        \
        for (int64_t r_ = (r0); r_ < (r1); r_ += tile_) {                              \
            const int nr_ = (int)((r1) - r_ < tile_ ? (r1) - r_ : tile_);              \
            switch (nr_ * 8 + nt_) {                                                   \
            case 1 * 8 + 1: TILE(m, r_, t_, 1, 1, __VA_ARGS__); break;                 \
            case 2 * 8 + 1: TILE(m, r_, t_, 2, 1, __VA_ARGS__); break;                 \
            case 3 * 8 + 1: TILE(m, r_, t_, 3, 1, __VA_ARGS__); break;                 \
            case 4 * 8 + 1: TILE(m, r_, t_, 4, 1, __VA_ARGS__); break;                 \
            case 1 * 8 + 2: TILE(m, r_, t_, 1, 2, __VA_ARGS__); break;                 \
            case 1 * 8 + 3: TILE(m, r_, t_, 1, 3, __VA_ARGS__); break;                 \
            case 1 * 8 + 4: TILE(m, r_, t_, 1, 4, __VA_ARGS__); break;                 \
            case 2 * 8 + 2: TILE(m, r_, t_, 2, 2, __VA_ARGS__); break;                 \
            case 2 * 8 + 3: TILE(m, r_, t_, 2, 3, __VA_ARGS__); break;                 \
            case 2 * 8 + 4: TILE(m, r_, t_, 2, 4, __VA_ARGS__); break;                 \
            case 3 * 8 + 2: TILE(m, r_, t_, 3, 2, __VA_ARGS__); break;                 \
            case 3 * 8 + 3: TILE(m, r_, t_, 3, 3, __VA_ARGS__); break;                 \
            default: TILE(m, r_, t_, 3, 4, __VA_ARGS__); break;                        \
            }                                                                          \
        }                                                                              \
    }

static void rows_q4_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(q4_rows_tile, m, r0, r1, t0, t1, false)
}

static void rows_q4_1(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(q4_rows_tile, m, r0, r1, t0, t1, true)
}

/* ---- group kernels (8 tokens per group) ----------------------------------- */

/* Group kernels first unpack a tile of up to 4 weight rows, KC blocks at a
 * time, into bytes and float scales on the stack, then run every group of
 * the task's token range (up to 16 groups) over it: unpacking costs ~2% of
 * the time, and each group of 4 weights is then one broadcast load. A last
 * partial group is zero-padded; only its real tokens are stored. */
#define KC ENG__KC
typedef struct {
    _Alignas(32) uint8_t q[4][KC][ENG_QK];  /* Q4: nibbles 0..15; Q8_0: |w| */
    _Alignas(32) int8_t w[4][KC][ENG_QK];   /* Q8_0: w (for its sign) */
    float d[4][KC];
    float m[4][KC];                          /* Q4: offset (m, or -8 d) */
} unpacked;

INLINE void unpack_q4_tile(const eng__mm *m, int64_t r, int nr, int64_t kc, int nk, bool has_min,
                           unpacked *u) {
    const size_t bb = q4_block_bytes(has_min), qo = q4_qs_offset(has_min);
    for (int i = 0; i < nr; i++) {
        const uint8_t *blk = m->w + (r + i) * m->row_bytes + kc * bb;
        for (int b = 0; b < nk; b++, blk += bb) {
            q4_scales(blk, has_min, &u->d[i][b], &u->m[i][b]);
            _mm256_store_si256((__m256i *)u->q[i][b], unpack_nibbles(blk + qo));
        }
    }
}

/* Adds the tile's partial sums (blocks [kc, kc + nk)) for rows [r, r + NR)
 * and the 8 tokens of group g into y, or stores them when `first`. */
INLINE void store_group(const eng__mm *m, int64_t r, int g, const int NR, const __m256 *acc,
                        bool first) {
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++) {
        _Alignas(32) float out[ENG__GROUP];
        _mm256_store_ps(out, acc[i]);
        float *y = m->y + (int64_t)g * ENG__GROUP * m->y_stride + r + i;
        const int n = m->n_tok - g * ENG__GROUP < ENG__GROUP ? m->n_tok - g * ENG__GROUP : ENG__GROUP;
        for (int t = 0; t < n; t++)
            y[t * m->y_stride] = first ? out[t] : y[t * m->y_stride] + out[t];
    }
}

INLINE void q4_groups_tile(const eng__mm *m, const unpacked *u, int64_t r, int g, int64_t kc,
                           int nk, const int NR) {
    const __m256i ones = _mm256_set1_epi16(1);
    const eng__q8x8 *xb = m->xg + (int64_t)g * m->nb + kc;
    __m256 acc[4];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
        acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < nk; b++, xb++) {
        const __m256 dx = _mm256_load_ps(xb->d), sx = _mm256_load_ps(xb->s);
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++) {
            const uint8_t *wq = u->q[i][b];
            __m256i s16 = _mm256_maddubs_epi16(bcast4(wq), _mm256_load_si256((const __m256i *)xb->qs));
#pragma GCC unroll 8
            for (int k = 1; k < ENG_QK / 4; k++)
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(
                    bcast4(wq + 4 * k), _mm256_load_si256((const __m256i *)(xb->qs + 32 * k))));
            /* |s16| <= 8 * 2 * 15 * 127 = 30480: no saturation */
            const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
            acc[i] = _mm256_fmadd_ps(p, _mm256_mul_ps(dx, _mm256_broadcast_ss(&u->d[i][b])), acc[i]);
            acc[i] = _mm256_fmadd_ps(sx, _mm256_broadcast_ss(&u->m[i][b]), acc[i]);
        }
    }
    store_group(m, r, g, NR, acc, kc == 0);
}

/* Runs TILE(m, &u, r, g, kc, nk, nr) over rows [r0, r1) x groups [g0, g1):
 * row tiles of up to 4 (nr a compile-time constant), UNPACK(m, r, nr, kc, nk,
 * ..., &u) once per row tile and chunk of KC blocks. */
#define FOR_GROUP_TILES(UNPACK, TILE, m, r0, r1, g0, g1, ...)                           \
    do {                                                                               \
        unpacked u_;                                                                   \
        for (int64_t r_ = (r0); r_ < (r1); r_ += 4) {                                  \
            const int nr_ = (r1) - r_ < 4 ? (int)((r1) - r_) : 4;                      \
            for (int64_t kc_ = 0; kc_ < (m)->nb; kc_ += KC) {                          \
                const int nk_ = (m)->nb - kc_ < KC ? (int)((m)->nb - kc_) : KC;        \
                UNPACK(m, r_, nr_, kc_, nk_, __VA_ARGS__, &u_);                        \
                for (int g_ = (g0); g_ < (g1); g_++) {                                 \
                    switch (nr_) {                                                     \
                    case 1: TILE(m, &u_, r_, g_, kc_, nk_, 1); break;                  \
                    case 2: TILE(m, &u_, r_, g_, kc_, nk_, 2); break;                  \
                    case 3: TILE(m, &u_, r_, g_, kc_, nk_, 3); break;                  \
                    default: TILE(m, &u_, r_, g_, kc_, nk_, 4); break;                 \
                    }                                                                  \
                }                                                                      \
            }                                                                          \
        }                                                                              \
    } while (0)

static void groups_q4_0(const eng__mm *m, int64_t r0, int64_t r1, int g0, int g1) {
    FOR_GROUP_TILES(unpack_q4_tile, q4_groups_tile, m, r0, r1, g0, g1, false);
}

static void groups_q4_1(const eng__mm *m, int64_t r0, int64_t r1, int g0, int g1) {
    FOR_GROUP_TILES(unpack_q4_tile, q4_groups_tile, m, r0, r1, g0, g1, true);
}

/* ---- Q8_0 ----------------------------------------------------------------- */

INLINE void q8_rows_tile(const eng__mm *m, int64_t r, int t, const int NR, const int NT,
                         const int unused) {
    (void)unused;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4][4];
    const eng_block_q8_0 *row[4];
    const eng_block_q8_1 *xt[4];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++) {
        row[i] = (const eng_block_q8_0 *)(m->w + (r + i) * m->row_bytes);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++)
            acc[i][j] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++)
        xt[j] = m->xr + (int64_t)(t + j) * m->nb;
    for (int64_t b = 0; b < m->nb; b++) {
        __m256i w[4], aw[4];
        float d[4];
        prefetch_ahead(row[0], NR * m->row_bytes, (size_t)b * NR * sizeof(eng_block_q8_0));
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++) {
            d[i] = load_f16(&row[i][b].d);
            w[i] = _mm256_loadu_si256((const __m256i *)row[i][b].qs);
            aw[i] = _mm256_abs_epi8(w[i]);
        }
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const eng_block_q8_1 *xb = xt[j] + b;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)xb->qs);
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++) {
                const __m256i p = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(aw[i], _mm256_sign_epi8(xv, w[i])), ones);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[i] * xb->d), acc[i][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++)
            m->y[(int64_t)(t + j) * m->y_stride + r + i] = hsum_ps(acc[i][j]);
}

static void rows_q8_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(q8_rows_tile, m, r0, r1, t0, t1, 0)
}

INLINE void unpack_q8_tile(const eng__mm *m, int64_t r, int nr, int64_t kc, int nk, int unused,
                           unpacked *u) {
    (void)unused;
    for (int i = 0; i < nr; i++) {
        const eng_block_q8_0 *blk = (const eng_block_q8_0 *)(m->w + (r + i) * m->row_bytes) + kc;
        for (int b = 0; b < nk; b++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)blk[b].qs);
            _mm256_store_si256((__m256i *)u->q[i][b], _mm256_abs_epi8(w));
            _mm256_store_si256((__m256i *)u->w[i][b], w);
            u->d[i][b] = load_f16(&blk[b].d);
        }
    }
}

INLINE void q8_groups_tile(const eng__mm *m, const unpacked *u, int64_t r, int g, int64_t kc,
                           int nk, const int NR) {
    const __m256i ones = _mm256_set1_epi16(1);
    const eng__q8x8 *xb = m->xg + (int64_t)g * m->nb + kc;
    __m256 acc[4];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
        acc[i] = _mm256_setzero_ps();
    for (int b = 0; b < nk; b++, xb++) {
        const __m256 dx = _mm256_load_ps(xb->d);
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++) {
            __m256i s32 = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int k = 0; k < ENG_QK / 4; k++) {
                const __m256i xv = _mm256_load_si256((const __m256i *)(xb->qs + 32 * k));
                const __m256i sx = _mm256_sign_epi8(xv, bcast4(u->w[i][b] + 4 * k));
                s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(
                    _mm256_maddubs_epi16(bcast4(u->q[i][b] + 4 * k), sx), ones));
            }
            const __m256 scale = _mm256_mul_ps(dx, _mm256_broadcast_ss(&u->d[i][b]));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, acc[i]);
        }
    }
    store_group(m, r, g, NR, acc, kc == 0);
}

static void groups_q8_0(const eng__mm *m, int64_t r0, int64_t r1, int g0, int g1) {
    FOR_GROUP_TILES(unpack_q8_tile, q8_groups_tile, m, r0, r1, g0, g1, 0);
}

/* ---- 16-bit activations --------------------------------------------------- */

static void quantize16_avx2(const float *x, eng_block_q16 *out, int64_t n) {
    for (int64_t b = 0; b < n / ENG_QK; b++) {
        __m256i q[4];
        float d;
        int sum;
        quantize_block(x + b * ENG_QK, 32767.0f, q, &d, &sum);
        /* packs works per 128-bit lane: put the quarters back in order */
        const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xd8);
        const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xd8);
        _mm256_storeu_si256((__m256i *)out[b].qs, lo);
        _mm256_storeu_si256((__m256i *)(out[b].qs + 16), hi);
        out[b].d = d;
        out[b].s = d * (float)sum;
    }
}

/* Weight kinds of the 16-bit kernels (compile-time constants). */
enum { K16_Q4_0, K16_Q4_1, K16_Q8_0 };

INLINE size_t k16_block_bytes(const int kind) {
    return kind == K16_Q8_0 ? sizeof(eng_block_q8_0) : q4_block_bytes(kind == K16_Q4_1);
}

/* A block's 32 weights as two vectors of 16 int16 (elements 0..15 and
 * 16..31): Q4 nibbles unsigned 0..15, Q8_0 signed. */
INLINE void k16_weights(const uint8_t *blk, const int kind, __m256i *lo, __m256i *hi) {
    if (kind == K16_Q8_0) {
        const int8_t *qs = ((const eng_block_q8_0 *)blk)->qs;
        *lo = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)qs));
        *hi = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(qs + 16)));
        return;
    }
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(blk + q4_qs_offset(kind == K16_Q4_1))));
    *lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0f));
    *hi = _mm256_srli_epi16(v, 4);
}

/* [d, m] in lanes 0 and 1: Q4_1 as stored, Q4_0 [d, d] (its -8 d applied at
 * the end), Q8_0 [d, 0]. */
INLINE __m128 k16_dm(const uint8_t *blk, const int kind) {
    if (kind == K16_Q8_0) {
        unsigned short h;
        memcpy(&h, blk, sizeof h);
        return _mm_cvtph_ps(_mm_cvtsi32_si128(h));
    }
    return q4_dm(blk, kind == K16_Q4_1);
}

/* Lane i of the result: the sum of the 8 lanes of v[i]. */
INLINE __m128i hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

INLINE int load_i32(const void *p) {
    int v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Block scales d and offsets m of 4 rows' blocks as 4-lane vectors (built in
 * registers: 4 small stores and a wide reload would stall store forwarding). */
INLINE void k16_scales4(const uint8_t *const blk[4], const int kind, __m128 *d4, __m128 *m4) {
    __m128i v = _mm_cvtsi32_si128(load_i32(blk[0]));
    if (kind == K16_Q4_1) {
        v = _mm_insert_epi32(v, load_i32(blk[1]), 1);
        v = _mm_insert_epi32(v, load_i32(blk[2]), 2);
        v = _mm_insert_epi32(v, load_i32(blk[3]), 3);
        const __m256 dm = _mm256_cvtph_ps(v);  /* d0 m0 d1 m1 ... */
        const __m256 sep = _mm256_permutevar8x32_ps(dm, _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
        *d4 = _mm256_castps256_ps128(sep);
        *m4 = _mm256_extractf128_ps(sep, 1);
        return;
    }
    v = _mm_insert_epi16(v, load_i32(blk[1]), 1);
    v = _mm_insert_epi16(v, load_i32(blk[2]), 2);
    v = _mm_insert_epi16(v, load_i32(blk[3]), 3);
    *d4 = _mm_cvtph_ps(v);  /* lanes 0..3; the upper halves of v are ignored */
    *m4 = kind == K16_Q4_0 ? _mm_mul_ps(*d4, _mm_set1_ps(-8.0f)) : _mm_setzero_ps();
}

/* Rows [r, r + NR) x tokens [t, t + NT), row layout.
 *
 * Batch invariance: the result must be bit-identical to the group kernel's,
 * which reduces each block to its exact integer sum and then, per block,
 * acc = fma(isum, dx d, acc); acc = fma(s, m, acc), restarting acc at every
 * KC blocks and adding the pieces into y. This kernel does the same with the
 * 4 rows in the lanes of one vector (integer sums reduced across lanes, which
 * is exact), so a token's outputs do not depend on whether it was batched. */
INLINE void rows16_tile(const eng__mm *m, int64_t r, int t, const int NR, const int NT, const int kind) {
    const size_t bb = k16_block_bytes(kind);
    const uint8_t *row[4];
    const eng_block_q16 *xt[4];
    __m128 acc[4], total[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        row[i] = m->w + (r + (i < NR ? i : 0)) * m->row_bytes;
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) {
        xt[j] = m->xr16 + (int64_t)(t + j) * m->nb;
        acc[j] = _mm_setzero_ps();
        total[j] = _mm_setzero_ps();
    }
    for (int64_t b = 0; b < m->nb; b++) {
        __m256i wl[4], wh[4];
        const uint8_t *blk[4];
        prefetch_ahead(row[0], NR * m->row_bytes, (size_t)b * NR * bb);
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            blk[i] = row[i] + b * bb;
            if (i < NR)
                k16_weights(blk[i], kind, &wl[i], &wh[i]);
        }
        __m128 d4, m4;
        k16_scales4(blk, kind, &d4, &m4);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const eng_block_q16 *xb = xt[j] + b;
            const __m256i xl = _mm256_loadu_si256((const __m256i *)xb->qs);
            const __m256i xh = _mm256_loadu_si256((const __m256i *)(xb->qs + 16));
            __m256i p[4];
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
                p[i] = i < NR ? _mm256_add_epi32(_mm256_madd_epi16(wl[i], xl), _mm256_madd_epi16(wh[i], xh))
                              : _mm256_setzero_si256();
            const __m128 isum = _mm_cvtepi32_ps(hsum4_epi32(p[0], p[1], p[2], p[3]));
            acc[j] = _mm_fmadd_ps(isum, _mm_mul_ps(_mm_set1_ps(xb->d), d4), acc[j]);
            if (kind != K16_Q8_0)
                acc[j] = _mm_fmadd_ps(_mm_set1_ps(xb->s), m4, acc[j]);
        }
        if ((b + 1) % KC == 0 || b + 1 == m->nb) {
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++) {
                total[j] = b < KC ? acc[j] : _mm_add_ps(total[j], acc[j]);
                acc[j] = _mm_setzero_ps();
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++) {
        _Alignas(16) float out[4];
        _mm_store_ps(out, total[j]);
        for (int i = 0; i < NR; i++)
            m->y[(int64_t)(t + j) * m->y_stride + r + i] = out[i];
    }
}

static void rows16_q4_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(rows16_tile, m, r0, r1, t0, t1, K16_Q4_0)
}

static void rows16_q4_1(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(rows16_tile, m, r0, r1, t0, t1, K16_Q4_1)
}

static void rows16_q8_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(rows16_tile, m, r0, r1, t0, t1, K16_Q8_0)
}

/* Panel kernels for 16-bit activations (batches of 4 or more tokens).
 *
 * 16 weight rows sit in the lanes of two vectors: a row tile is unpacked,
 * PKB blocks at a time, into pairs of int16 weights transposed so that pair k
 * of the 16 rows is two aligned loads. A token's pair k of activations is one
 * 4-byte broadcast from its row-layout block, and one _mm256_madd_epi16 then
 * multiplies it with 8 rows. 4 tokens x 16 rows keep 8 integer sums in
 * registers, and each pair of weight loads feeds 8 products: loads per
 * product are 0.75 where a broadcast weight x 8 tokens needs 1.25, and on
 * this loop loads, not multiplies, were the limit.
 *
 * Float work per block, in the order of the row kernel (batch invariance):
 * acc = fma(isum, dx d, acc); acc = fma(s, m, acc), restarting acc every KC
 * blocks and adding the pieces. The float accumulators of the task's tokens
 * live in memory (a barrier keeps GCC from holding them in registers, where
 * they would crowd out the integer sums). */
#define PR 16   /* rows per panel */
#define PKB 16  /* blocks unpacked at once: 16 x 16 pairs x 16 rows x 4 B = 16 KB */
#define PANEL_MAX_TOK 128

typedef struct {
    _Alignas(32) int32_t w[PKB][ENG_QK / 2][PR];  /* pair k of row r: 2 int16 */
    _Alignas(32) float d[PKB][PR];
    _Alignas(32) float m[PKB][PR];                 /* offset (m, -8 d, or 0) */
} panel16;

/* Transposes an 8 x 8 matrix of 32-bit elements held in 8 vectors. */
INLINE void transpose8_epi32(__m256i v[8]) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
        v[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
    }
}

/* Asks for the weights the panel after (r, kc) will unpack: the next PKB
 * blocks of the same rows, or the first ones of the next 16 rows (up to r1).
 * Sixteen short row segments are more streams than the hardware prefetcher
 * follows, and small batches leave little compute to hide the misses behind. */
INLINE void prefetch_panel(const eng__mm *m, int64_t r, int64_t r1, int64_t kc, const int kind) {
    const size_t bb = k16_block_bytes(kind);
    int64_t nkc = kc + PKB;
    if (nkc >= m->nb) {
        nkc = 0;
        r += PR;
    }
    const int64_t nr = r1 - r < PR ? r1 - r : PR;
    const int64_t nk = m->nb - nkc < PKB ? m->nb - nkc : PKB;
    for (int64_t i = 0; i < nr; i++) {
        const char *p = (const char *)m->w + (r + i) * m->row_bytes + nkc * bb;
        for (size_t off = 0; off < (size_t)nk * bb; off += 64)
            _mm_prefetch(p + off, _MM_HINT_T0);
    }
}

/* Unpacks blocks [kc, kc + nk) of rows [r, r + nr) (nr <= 16; missing rows
 * repeat the last one, their results are not stored). */
INLINE void unpack_panel(const eng__mm *m, int64_t r, int nr, int64_t kc, int nk, const int kind, panel16 *u) {
    const size_t bb = k16_block_bytes(kind);
    for (int v = 0; v < PR / 8; v++) {
        const uint8_t *row[8];
        for (int i = 0; i < 8; i++)
            row[i] = m->w + (r + (8 * v + i < nr ? 8 * v + i : nr - 1)) * m->row_bytes + kc * bb;
        for (int b = 0; b < nk; b++) {
            for (int i = 0; i < 8; i++) {
                const uint8_t *blk = row[i] + b * bb;
                if (kind == K16_Q8_0) {
                    u->d[b][8 * v + i] = load_f16(blk);
                    u->m[b][8 * v + i] = 0.0f;
                } else {
                    q4_scales(blk, kind == K16_Q4_1, &u->d[b][8 * v + i], &u->m[b][8 * v + i]);
                }
            }
            /* the halves one at a time (decoding a row twice is cheaper than
             * the spills of 16 live vectors during a transpose) */
            for (int h = 0; h < 2; h++) {
                __m256i q[8];
                for (int i = 0; i < 8; i++) {
                    __m256i lo, hi;
                    k16_weights(row[i] + b * bb, kind, &lo, &hi);
                    q[i] = h ? hi : lo;
                }
                transpose8_epi32(q);
                for (int k = 0; k < 8; k++)
                    _mm256_store_si256((__m256i *)(u->w[b][8 * h + k] + 8 * v), q[k]);
            }
        }
    }
}

/* Pair k of block b's weights for the 16 rows, as two vectors of int16
 * pairs (rows 0..7, rows 8..15): from the unpacked panel u, or (packed) from
 * the packed block at pb (matmul_internal.h), widened in registers. */
INLINE void panel_pair(const panel16 *u, const uint8_t *pb, int b, int k, const int kind, const bool packed,
                       __m256i *w0, __m256i *w1) {
    if (!packed) {
        *w0 = _mm256_load_si256((const __m256i *)u->w[b][k]);
        *w1 = _mm256_load_si256((const __m256i *)(u->w[b][k] + 8));
    } else if (kind == K16_Q8_0) {
        *w0 = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(pb + 32 * k)));
        *w1 = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(pb + 32 * k + 16)));
    } else {
        const __m256i v = _mm256_cvtepu8_epi16(_mm_load_si128((const __m128i *)(pb + 16 * k)));
        *w0 = _mm256_and_si256(v, _mm256_set1_epi16(0x0f));
        *w1 = _mm256_srli_epi16(v, 4);
    }
}

/* Blocks [kc, kc + nk) of the panel for tokens [t, t + NT); acc and total:
 * the tokens' float accumulators, 16 floats each. The weights come from u,
 * or (packed) from the packed blocks starting at pk, block kc's; pf: NULL,
 * or the packed blocks to prefetch meanwhile (the next panel's). */
INLINE void panel16_tile(const eng__mm *m, const panel16 *u, const uint8_t *pk, const uint8_t *pf, int t,
                         int64_t kc, int nk, float *acc, float *total, const int NT, const int kind,
                         const bool packed) {
    const size_t pbb = kind == K16_Q8_0 ? eng__pack_block_bytes(ENG_Q8_0) : eng__pack_block_bytes(ENG_Q4_1);
    const size_t codes = kind == K16_Q8_0 ? ENG__PACK_Q8_CODES : ENG__PACK_Q4_CODES;
    const eng_block_q16 *xt[4];
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++)
        xt[j] = m->xr16 + (int64_t)(t + j) * m->nb + kc;
    for (int b = 0; b < nk; b++) {
        const uint8_t *pb = packed ? pk + (size_t)b * pbb : NULL;
        if (packed && pf)
            for (size_t off = 0; off < pbb; off += 64)
                _mm_prefetch((const char *)pf + (size_t)b * pbb + off, _MM_HINT_T0);
        const float *bd = packed ? (const float *)(pb + codes) : u->d[b];
        const float *bm = packed ? bd + PR : u->m[b];
        __m256i s[4][2];
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++)
            s[j][0] = s[j][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int k = 0; k < ENG_QK / 2; k++) {
            __m256i w0, w1;
            panel_pair(u, pb, b, k, kind, packed, &w0, &w1);
#pragma GCC unroll 4
            for (int j = 0; j < NT; j++) {
                const __m256i xv = bcast4(xt[j][b].qs + 2 * k);
                s[j][0] = _mm256_add_epi32(s[j][0], _mm256_madd_epi16(w0, xv));
                s[j][1] = _mm256_add_epi32(s[j][1], _mm256_madd_epi16(w1, xv));
            }
        }
        const int64_t gb = kc + b;  /* the block's index in the row */
        const bool chunk_end = (gb + 1) % KC == 0 || gb + 1 == m->nb;
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const __m256 dx = _mm256_set1_ps(xt[j][b].d), sx = _mm256_set1_ps(xt[j][b].s);
#pragma GCC unroll 2
            for (int v = 0; v < 2; v++) {
                float *a = acc + j * PR + 8 * v, *tot = total + j * PR + 8 * v;
                __m256 av = _mm256_load_ps(a);
                av = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[j][v]), _mm256_mul_ps(dx, _mm256_load_ps(bd + 8 * v)), av);
                if (kind != K16_Q8_0)
                    av = _mm256_fmadd_ps(sx, _mm256_load_ps(bm + 8 * v), av);
                if (chunk_end) {
                    _mm256_store_ps(tot, gb < KC ? av : _mm256_add_ps(_mm256_load_ps(tot), av));
                    av = _mm256_setzero_ps();
                }
                _mm256_store_ps(a, av);
            }
        }
        __asm__ volatile("" ::: "memory");
    }
}

/* Tokens [t, te) (up to PANEL_MAX_TOK) over blocks [kc, kc + nk), 4 at a time. */
INLINE void panel16_tokens(const eng__mm *m, const panel16 *u, const uint8_t *pk, const uint8_t *pf, int t,
                           int te, int64_t kc, int nk, float (*acc)[PR], float (*total)[PR], const int kind,
                           const bool packed) {
    for (int t0 = t; t0 < te; t0 += 4) {
        float *a = acc[t0 - t], *tot = total[t0 - t];
        const uint8_t *f = t0 == t ? pf : NULL;  /* the first tile prefetches */
        switch (te - t0 < 4 ? te - t0 : 4) {
        case 1: panel16_tile(m, u, pk, f, t0, kc, nk, a, tot, 1, kind, packed); break;
        case 2: panel16_tile(m, u, pk, f, t0, kc, nk, a, tot, 2, kind, packed); break;
        case 3: panel16_tile(m, u, pk, f, t0, kc, nk, a, tot, 3, kind, packed); break;
        default: panel16_tile(m, u, pk, f, t0, kc, nk, a, tot, 4, kind, packed); break;
        }
    }
}

/* With packed weights (m->wp) a panel's blocks are read in place, every
 * block for 4 tokens before the next 4; else they are unpacked PKB blocks at
 * a time and every token runs over them. */
INLINE void panel16_run(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1, const int kind) {
    panel16 u;
    _Alignas(32) float acc[PANEL_MAX_TOK][PR], total[PANEL_MAX_TOK][PR];
    const size_t pbb = kind == K16_Q8_0 ? eng__pack_block_bytes(ENG_Q8_0) : eng__pack_block_bytes(ENG_Q4_1);
    for (int tb = t0; tb < t1; tb += PANEL_MAX_TOK) {
        const int te = t1 - tb < PANEL_MAX_TOK ? t1 : tb + PANEL_MAX_TOK;
        for (int64_t r = r0; r < r1; r += PR) {
            const int nr = r1 - r < PR ? (int)(r1 - r) : PR;
            memset(acc, 0, sizeof(float) * PR * (size_t)(te - tb));
            if (m->wp) {
                const size_t panel_bytes = (size_t)m->nb * pbb;
                const uint8_t *pk = m->wp + (size_t)(r / PR) * panel_bytes;
                panel16_tokens(m, NULL, pk, r + PR < r1 ? pk + panel_bytes : NULL, tb, te, 0, (int)m->nb, acc,
                               total, kind, true);
            } else {
                for (int64_t kc = 0; kc < m->nb; kc += PKB) {
                    const int nk = m->nb - kc < PKB ? (int)(m->nb - kc) : PKB;
                    unpack_panel(m, r, nr, kc, nk, kind, &u);
                    prefetch_panel(m, r, r1, kc, kind);
                    panel16_tokens(m, &u, NULL, NULL, tb, te, kc, nk, acc, total, kind, false);
                }
            }
            for (int t = tb; t < te; t++) {
                float *y = m->y + (int64_t)t * m->y_stride + r;
                if (nr == PR) {  /* (GCC makes the loop a call to memcpy) */
                    _mm256_storeu_ps(y, _mm256_load_ps(total[t - tb]));
                    _mm256_storeu_ps(y + 8, _mm256_load_ps(total[t - tb] + 8));
                } else {
                    for (int i = 0; i < nr; i++)
                        y[i] = total[t - tb][i];
                }
            }
        }
    }
}

static void panel16_q4_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    panel16_run(m, r0, r1, t0, t1, K16_Q4_0);
}

static void panel16_q4_1(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    panel16_run(m, r0, r1, t0, t1, K16_Q4_1);
}

static void panel16_q8_0(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    panel16_run(m, r0, r1, t0, t1, K16_Q8_0);
}

/* ---- F32 / F16 ------------------------------------------------------------ */

INLINE __m256 load_w8(const void *row, int64_t i, bool f16) {
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const unsigned short *)row + i)));
    return _mm256_loadu_ps((const float *)row + i);
}

INLINE float load_w1(const void *row, int64_t i, bool f16) {
    return f16 ? load_f16((const unsigned short *)row + i) : ((const float *)row)[i];
}

INLINE void float_rows_tile(const eng__mm *m, int64_t r, int t, const int NR, const int NT,
                            const bool f16) {
    __m256 acc[4][4];
    const void *row[4];
    const float *xt[4];
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++) {
        row[i] = m->w + (r + i) * m->row_bytes;
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++)
            acc[i][j] = _mm256_setzero_ps();
    }
#pragma GCC unroll 4
    for (int j = 0; j < NT; j++)
        xt[j] = m->x + (int64_t)(t + j) * m->n_in;
    int64_t k = 0;
    for (; k + 8 <= m->n_in; k += 8) {
        __m256 w[4];
        prefetch_ahead(row[0], NR * m->row_bytes, (size_t)k * NR * (f16 ? 2 : 4));
#pragma GCC unroll 4
        for (int i = 0; i < NR; i++)
            w[i] = load_w8(row[i], k, f16);
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            const __m256 xv = _mm256_loadu_ps(xt[j] + k);
#pragma GCC unroll 4
            for (int i = 0; i < NR; i++)
                acc[i][j] = _mm256_fmadd_ps(w[i], xv, acc[i][j]);
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; i++)
#pragma GCC unroll 4
        for (int j = 0; j < NT; j++) {
            float s = hsum_ps(acc[i][j]);
            for (int64_t kk = k; kk < m->n_in; kk++)
                s += load_w1(row[i], kk, f16) * xt[j][kk];
            m->y[(int64_t)(t + j) * m->y_stride + r + i] = s;
        }
}

static void rows_f32(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(float_rows_tile, m, r0, r1, t0, t1, false)
}

static void rows_f16(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    FOR_ROW_TILES(float_rows_tile, m, r0, r1, t0, t1, true)
}

const eng__mm_kernels eng__mm_kernels_avx2 = {
    .name = "avx2",
    .quantize = quantize_avx2,
    .rows = {
        [ENG_F32] = rows_f32,
        [ENG_F16] = rows_f16,
        [ENG_Q4_0] = rows_q4_0,
        [ENG_Q4_1] = rows_q4_1,
        [ENG_Q8_0] = rows_q8_0,
    },
    .groups = {
        [ENG_Q4_0] = groups_q4_0,
        [ENG_Q4_1] = groups_q4_1,
        [ENG_Q8_0] = groups_q8_0,
    },
    .quantize16 = quantize16_avx2,
    .rows16 = {
        [ENG_Q4_0] = rows16_q4_0,
        [ENG_Q4_1] = rows16_q4_1,
        [ENG_Q8_0] = rows16_q8_0,
    },
    .panel16 = {
        [ENG_Q4_0] = panel16_q4_0,
        [ENG_Q4_1] = panel16_q4_1,
        [ENG_Q8_0] = panel16_q8_0,
    },
};
