/* cands.cuh: a step's logit rows reduced on the GPU to the records the
 * sampler draws from (eng_cands, engine/sampler.h): each row's k best logits,
 * best first, its maximum and its sum of exp(l - max). The cuda backend
 * copies a record (at most ~1 KB) instead of the row (4 x n_vocab bytes) for
 * the rows whose sampler needs no more (greedy, top-k <= ENG_CANDS_MAX, no
 * penalty). The same numbers as eng_cands_reduce: the same entries, in the
 * same order, bit for bit; sum_exp to float rounding. */
#ifndef KVSERVE_ENGINE_CUDA_CANDS_CUH
#define KVSERVE_ENGINE_CUDA_CANDS_CUH

#include <cuda_runtime.h>
#include <stddef.h>

extern "C" {
#include "engine/sampler.h"
}

/* Records of rows [0, n_rows) of logits (row r at logits + r * n_vocab) into
 * out (record r at (char *)out + r * sizeof(eng_cands)), each with its k
 * best (1 <= k <= ENG_CANDS_MAX, k <= n_vocab). One block a row.
 * cudaErrorInvalidValue for arguments out of range. */
cudaError_t eng_cands_launch(const float *logits, int n_rows, int n_vocab, int k, eng_cands *out,
                             cudaStream_t stream);

#endif
