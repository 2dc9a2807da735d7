/* cands.cuh: a step's logit rows reduced on the GPU to the records the
 * sampler draws from (eng_cands, engine/sampler.h): each row's k best logits,
 * best first, its maximum and its sum of exp(l - max); or, for plain
 * temperature sampling, the row's draw at a uniform the sampler took. The
 * cuda backend copies a record (at most ~1 KB) instead of the row (4 x
 * n_vocab bytes) for the rows whose sampler needs no more (greedy, top-k <=
 * ENG_CANDS_MAX, temperature alone; no penalty). The same numbers as
 * eng_cands_reduce: the same entries, in the same order, bit for bit;
 * sum_exp to float rounding. Draws as eng_cands_draw's, but for a uniform
 * within float rounding of a boundary between two tokens (other exp and
 * summation order), which may take the neighbour. */
#ifndef KVSERVE_ENGINE_CUDA_CANDS_CUH
#define KVSERVE_ENGINE_CUDA_CANDS_CUH

#include <cuda_runtime.h>
#include <stddef.h>

extern "C" {
#include "engine/sampler.h"
}

/* What a row asks (its segment's cands_k): k > 0 its k best (k <=
 * ENG_CANDS_MAX, k <= n_vocab), ENG_CANDS_DRAW the draw d (eng_cands_draw),
 * 0 nothing (its whole row travels instead). */
typedef struct {
    int k;
    eng_draw d;
} eng_cands_req;

/* A penalty entry of a row (eng_pen_entry with its row and parameters). */
typedef struct {
    int32_t row, id;
    uint32_t count;
    float repetition, presence, frequency;
} eng_cands_pen;

/* Applies n entries (device memory; one token at most once a row) to rows
 * of logits (row r at logits + r * n_vocab) with eng_penalties_apply's
 * arithmetic, bit for bit; before eng_cands_launch. */
cudaError_t eng_cands_penalize(float *logits, int n_vocab, const eng_cands_pen *e, int n, cudaStream_t stream);

/* Records of rows [0, n_rows) of logits (row r at logits + r * n_vocab) into
 * out (record r at out + r), as req[r] (device memory) asks. One block a
 * row; a request out of range leaves its record untouched.
 * cudaErrorInvalidValue for arguments out of range. */
cudaError_t eng_cands_launch(const float *logits, int n_rows, int n_vocab, const eng_cands_req *req,
                             eng_cands *out, cudaStream_t stream);

#endif
