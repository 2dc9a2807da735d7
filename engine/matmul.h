/* matmul.h: the CPU compute kernels of the forward pass: matrix products of a
 * batch of activations with a weight matrix in any runtime format, and the
 * conversion of file formats into runtime formats.
 *
 * Runtime weight formats (what eng_weight_prepare produces):
 *   F32          f32 activations, FMA
 *   F16          f32 activations, weights widened with F16C in the kernel
 *   Q8_0, Q4_0   activations quantized per 32 to Q8_0, integer dot products
 *   Q4_1         activations quantized per 32 to Q8_1, integer dot products
 * BF16 becomes F32; Q4_K and Q6_K become Q8_0 (decoded exactly, then
 * re-quantized to 8 bits per 32: see README for the measured effect).
 * The kernels are chosen at run time (AVX2+FMA when present, else scalar). */
#ifndef ENG_MATMUL_H
#define ENG_MATMUL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tensor.h"
#include "engine/threadpool.h"

/* Converts t in place into a runtime format (see above). Data that needs no
 * conversion is left where it is (e.g. inside a mapping). Returns 0, or -1 with
 * a message naming the type when it cannot be used. */
int eng_weight_prepare(eng_tensor *t, char *err, size_t errlen);

/* Adds to a runtime-format matrix a second copy of its weights laid out for
 * the batched kernels (t->packed, matmul_internal.h), when its type has one
 * (Q4_0, Q4_1, Q8_0 with the AVX2 kernels) and packing is on: steps of 4 or
 * more tokens then read it with no unpacking (the single-token kernels keep
 * reading t->data). Costs 0.75 bytes per weight for Q4, 1.125 for Q8_0.
 * Returns 0 (also when nothing was packed), or -1 with a message when memory
 * is exhausted. Results are bit-identical with and without it. */
int eng_weight_pack(eng_tensor *t, char *err, size_t errlen);

/* Packing on (default) or off for later eng_weight_pack calls (KVSERVE_PACKED=0
 * turns it off in the daemon: less memory, slower batches). */
void eng_matmul_set_packing(bool on);

/* Is `type` a runtime format? */
int eng_weight_is_runtime(eng_dtype type);

/* y (n_tok, w->ne[1]) = x (n_tok, w->ne[0]) . w^T, row-major, f32.
 * y_stride: floats between rows of y (>= w->ne[1]). Work is split across the
 * pool's threads by output rows. Scratch for quantized activations is
 * allocated and kept by the pool-independent cache inside; not reentrant for
 * concurrent callers of the same thread pool. */
void eng_matmul(eng_threadpool *tp, const eng_tensor *w, const float *x, int n_tok,
                float *y, int64_t y_stride);

/* Decodes row `row` of a runtime-format (or any decodable) matrix into out. */
void eng_weight_get_row(const eng_tensor *w, int64_t row, float *out);

/* How activations meet block-quantized weights (Q4_0, Q4_1, Q8_0):
 *   ENG_ACT_Q16 (default): activations quantized per token and 32 values to
 *     16 bits, int16 integer dot products: each value within 2^-16 of its
 *     block's largest, so outliers keep their neighbours (SmolLM2 perplexity
 *     within 0.001% of the f32 path) at about 1.5x the exact path's speed.
 *   ENG_ACT_F32: weights decoded exactly to f32 inside the kernel and
 *     multiplied with f32 activations: the numbers of a dequantized reference.
 *   ENG_ACT_Q8: activations quantized to 8 bits, as llama.cpp does: fastest,
 *     least exact (+0.45% perplexity on SmolLM2 and a different greedy answer;
 *     README), and NOT batch-invariant: its row and group kernels round
 *     differently.
 * Process-wide; set once before the first forward pass. Q16 and F32 are
 * batch-invariant: a token's outputs are bit-identical whatever else is in
 * the batch and however many threads run it. */
typedef enum { ENG_ACT_F32 = 0, ENG_ACT_Q8 = 1, ENG_ACT_Q16 = 2 } eng_act_mode;
void eng_matmul_set_activations(eng_act_mode mode);
eng_act_mode eng_matmul_activations(void);

/* Name of the kernel set chosen at run time ("avx512", "avx2", "scalar"). */
const char *eng_matmul_isa(void);

/* Forces a kernel set by name ("scalar", "avx2", "avx512"), or NULL for the
 * run-time choice (the best the CPU has). Returns 0, or -1 when the name is
 * unknown or the CPU lacks it. Call it before any model is loaded (packing
 * depends on the set) and while no matmul runs (KVSERVE_ISA in the daemon). */
int eng_matmul_force_isa(const char *name);

#endif
