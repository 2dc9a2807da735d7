/* matmul_internal.h: what engine/matmul.c and the per-ISA kernel files
 * (matmul_avx2.c) share: the layouts of quantized activations, the argument
 * block every kernel reads, the kernel tables, and switches for the tests.
 * Not part of the engine's public API.
 *
 * Activations of a quantized matmul are quantized once per call, per token and
 * per 32 values, to 8 bits with a float scale d and s = d * sum(qs)
 * (eng_block_q8_1, "row layout"). Kernels that tile several tokens read a
 * second copy in which 8 tokens are interleaved 4 bytes at a time
 * (eng__q8x8, "group layout"): then one broadcast group of 4 weights meets 8
 * tokens in one instruction and the 8 lanes of a float accumulator are the 8
 * tokens, so the per-block scale work is done once for 8 tokens. */
#ifndef ENG_MATMUL_INTERNAL_H
#define ENG_MATMUL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/tensor.h"

#define ENG__GROUP 8  /* tokens per group-layout block */
#define ENG__PANEL_MIN 4  /* tokens from which panel16 serves a batch */
#define ENG__PANEL_MIN_PACKED 2  /* the same with packed weights (one token: rows16 is as fast) */
#define ENG__PANEL_ROWS 16
/* The 16-bit kernels' float sum of a row restarts every ENG__KC blocks and
 * the pieces are added in order: every kernel set keeps this order (their
 * bits must agree). */
#define ENG__KC 64

/* One block of 32 values of 8 tokens. qs[(j / 4) * 32 + t * 4 + j % 4] is
 * value j (0..31) of token t (0..7); d[t], s[t] as in eng_block_q8_1. */
typedef struct {
    float d[ENG__GROUP];
    float s[ENG__GROUP];
    int8_t qs[ENG_QK * ENG__GROUP];
} eng__q8x8;  /* 320 B */

/* 16-bit activations (ENG_ACT_Q16 and the outlier matmuls of ENG_ACT_MIXED):
 * per token and 32 values, d = max|x| / 32767, qs = x / d rounded to nearest
 * even, s = d * sum(qs). The relative error of a value is at most 2^-16 of
 * its block's largest, 256 times finer than 8 bits, so outliers no longer
 * swamp their blocks. Integer products of int16 pairs (_mm256_madd_epi16)
 * cannot overflow: 32 * 32767 * 128 < 2^31. */
typedef struct { float d, s; int16_t qs[ENG_QK]; } eng_block_q16;  /* 72 B */


/* Panel-packed weights (eng_weight_pack): the batched 16-bit kernel's view
 * of a Q4_0 / Q4_1 / Q8_0 matrix laid out in advance, so that a batch step
 * reads its weights with plain loads and no transposes. Rows are cut into
 * panels of ENG__PANEL_ROWS (the last one padded by repeating its last row);
 * a panel is nb consecutive blocks, one per 32 inputs, each:
 *   codes: 16 pairs k (inputs 2k, 2k+1); the pair's lane j (0..15) is
 *     row j / 2, input 2k + j % 2 of rows 0..7, and the same of rows 8..15:
 *     Q4: 16 bytes, low nibble rows 0..7, high nibble rows 8..15 (codes
 *     0..15, unsigned); Q8_0: 32 bytes, rows 0..7 then rows 8..15 (signed).
 *     Widened to int16, a pair's lanes are exactly the operand of
 *     _mm256_madd_epi16 against a broadcast pair of activations.
 *   d[16] (f32): the rows' block scales; Q4 also m[16] (f32): the offsets
 *     (Q4_1's m, Q4_0's -8 d), the values the unpacking kernel computes. */
#define ENG__PACK_Q4_CODES (ENG_QK / 2 * ENG__PANEL_ROWS)      /* 256 B */
#define ENG__PACK_Q8_CODES (ENG_QK * ENG__PANEL_ROWS)          /* 512 B */

/* Bytes of one packed block (16 rows x 32 inputs) of a block type, 0 for
 * types that are not packed. */
static inline size_t eng__pack_block_bytes(eng_dtype type) {
    switch (type) {
    case ENG_Q4_0:
    case ENG_Q4_1: return ENG__PACK_Q4_CODES + 2 * ENG__PANEL_ROWS * sizeof(float);
    case ENG_Q8_0: return ENG__PACK_Q8_CODES + ENG__PANEL_ROWS * sizeof(float);
    default: return 0;
    }
}

/* Everything a kernel needs for y = x . w^T. */
typedef struct {
    eng_dtype type;             /* w's type (a runtime type) */
    const uint8_t *w;           /* (n_out, row_bytes) */
    const uint8_t *wp;          /* NULL, or w panel-packed (panel16 reads it) */
    size_t row_bytes;
    int64_t n_in;               /* w->ne[0] */
    int64_t nb;                 /* n_in / 32 for quantized types */
    int n_tok;                  /* tokens; a last group may hold fewer than 8 */
    const float *x;             /* (n_tok, n_in): f32 activations (F32 / F16 weights) */
    const eng_block_q8_1 *xr;   /* (n_tok, nb): quantized activations, row layout */
    const eng__q8x8 *xg;        /* (groups, nb): the same, group layout, zero-padded */
    const eng_block_q16 *xr16;  /* (n_tok, nb): 16-bit activations (rows16, panel16) */
    float *y;                   /* (n_tok, y_stride) */
    int64_t y_stride;
} eng__mm;

/* Output rows [r0, r1) for tokens [t0, t1), reading x or xr. */
typedef void (*eng__mm_rows_fn)(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1);
/* Output rows [r0, r1) for the tokens of groups [g0, g1), reading xg. */
typedef void (*eng__mm_groups_fn)(const eng__mm *m, int64_t r0, int64_t r1, int g0, int g1);

typedef struct {
    const char *name;
    /* Quantizes n (a multiple of 32) floats of one token to n / 32 blocks.
     * d = max|x| / 127, qs = x * (1 / d) rounded to nearest even (0 when
     * d == 0), s = d * sum(qs): every kernel set gives bit-identical blocks. */
    void (*quantize)(const float *x, eng_block_q8_1 *out, int64_t n);
    eng__mm_rows_fn rows[ENG_DTYPE_COUNT];      /* per runtime type */
    eng__mm_groups_fn groups[ENG_DTYPE_COUNT];  /* NULL: rows serves every token */
    /* The same for 16-bit activations (eng_block_q16, bit-identical blocks in
     * every kernel set), for the block-quantized types only: rows16 for any
     * tokens, panel16 (NULL: rows16 serves) for batches of ENG__PANEL_MIN
     * tokens or more, tiled by 16 rows. Both read xr16 and give the same bits. */
    void (*quantize16)(const float *x, eng_block_q16 *out, int64_t n);
    eng__mm_rows_fn rows16[ENG_DTYPE_COUNT];
    eng__mm_rows_fn panel16[ENG_DTYPE_COUNT];
} eng__mm_kernels;

extern const eng__mm_kernels eng__mm_kernels_avx2;
/* matmul_avx512.c: panel16 over packed weights with AVX-512 VNNI (the
 * "avx512" set is the AVX2 set with these). */
extern const eng__mm_rows_fn eng__panel16_avx512[ENG_DTYPE_COUNT];

/* Tests: the activation quantizer of the current kernel set. */
void eng__quantize_q8_1(const float *x, eng_block_q8_1 *out, int64_t n);
void eng__quantize_q16(const float *x, eng_block_q16 *out, int64_t n);

#endif
