/* matmul_act32.h: matrix products of block-quantized weights (Q4_0, Q4_1,
 * Q8_0) with f32 activations. Internal to engine/matmul*.c.
 *
 * Why: 8-bit activation blocks lose enough precision on real models to move
 * results away from the reference (on SmolLM2 the FFN down projection's input,
 * SiLU(gate) * up, has outliers that swamp its blocks; greedy output changed and
 * perplexity moved by 0.45%). Here weights are decoded exactly to f32 (d q + m)
 * in registers or into a per-thread panel, and multiplied with the f32
 * activations, as transformers computes after dequantizing a GGUF.
 *
 * Batch invariance: every output y[t][r] is computed by the same sequence of
 * operations whatever the number of tokens, the tile it falls in or the thread
 * that runs it: one 8-lane accumulator over the row, sliced by 8 in order, then
 * a fixed horizontal sum. Decoding into registers and into a panel give the
 * same f32 weights. So a token's logits do not depend on what else is batched. */
#ifndef ENG_MATMUL_ACT32_H
#define ENG_MATMUL_ACT32_H

#include <stdint.h>

#include "engine/tensor.h"

typedef struct {
    eng_dtype type;        /* ENG_Q4_0, ENG_Q4_1 or ENG_Q8_0 */
    const uint8_t *w;      /* (n_out, row_bytes) */
    size_t row_bytes;
    int64_t n_in;          /* a multiple of 32 */
    const float *x;        /* (n_tok, n_in) */
    int n_tok;
    float *y;              /* (n_tok, y_stride) */
    int64_t y_stride;
} eng__act32;

/* Output rows [r0, r1) for every token. `panel`: per-thread scratch of at least
 * ENG__ACT32_PANEL_ROWS * n_in floats (used when n_tok is large enough). */
#define ENG__ACT32_PANEL_ROWS 4
void eng__act32_rows_scalar(const eng__act32 *m, int64_t r0, int64_t r1, float *panel);
void eng__act32_rows_avx2(const eng__act32 *m, int64_t r0, int64_t r1, float *panel);

/* Decodes one block of 32 weights exactly: the reference for both kernels. */
void eng__act32_decode_block(eng_dtype type, const uint8_t *blk, float out[32]);

#endif
