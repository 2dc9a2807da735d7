/* matmul_act32.c: portable kernels for block-quantized weights times f32
 * activations (see matmul_act32.h), the fallback on CPUs without AVX2. Each
 * output keeps 8 running partial sums over the row, as the AVX2 kernel's lanes
 * do, so both are batch-invariant in the same way. */
#include "engine/matmul_act32.h"

#include <string.h>

void eng__act32_decode_block(eng_dtype type, const uint8_t *blk, float out[32]) {
    eng_fp16_t h[2];
    memcpy(h, blk, sizeof h);
    const float d = eng_fp16_to_f32(h[0]);
    switch (type) {
    case ENG_Q8_0:
        for (int j = 0; j < 32; j++)
            out[j] = (float)(int8_t)blk[2 + j] * d;
        break;
    case ENG_Q4_1: {
        const float mn = eng_fp16_to_f32(h[1]);
        for (int j = 0; j < 16; j++) {
            out[j] = (float)(blk[4 + j] & 0x0F) * d + mn;
            out[j + 16] = (float)(blk[4 + j] >> 4) * d + mn;
        }
        break;
    }
    default: /* ENG_Q4_0 */
        for (int j = 0; j < 16; j++) {
            out[j] = (float)((blk[2 + j] & 0x0F) - 8) * d;
            out[j + 16] = (float)((blk[2 + j] >> 4) - 8) * d;
        }
        break;
    }
}

void eng__act32_rows_scalar(const eng__act32 *m, int64_t r0, int64_t r1, float *panel) {
    const int64_t nb = m->n_in / 32;
    const size_t bs = eng_dtype_block_bytes(m->type);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = m->w + r * (int64_t)m->row_bytes;
        for (int64_t b = 0; b < nb; b++) /* one row is decoded once for all tokens */
            eng__act32_decode_block(m->type, row + b * bs, panel + b * 32);
        for (int t = 0; t < m->n_tok; t++) {
            const float *x = m->x + (int64_t)t * m->n_in;
            float lane[8] = {0};
            for (int64_t k = 0; k < m->n_in; k += 8)
                for (int l = 0; l < 8; l++)
                    lane[l] += panel[k + l] * x[k + l];
            m->y[(int64_t)t * m->y_stride + r] =
                ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
        }
    }
}
