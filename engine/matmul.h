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

#include <stddef.h>
#include <stdint.h>

#include "engine/tensor.h"
#include "engine/threadpool.h"

/* Converts t in place into a runtime format (see above). Data that needs no
 * conversion is left where it is (e.g. inside a mapping). Returns 0, or -1 with
 * a message naming the type when it cannot be used. */
int eng_weight_prepare(eng_tensor *t, char *err, size_t errlen);

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
 *   ENG_ACT_F32 (default): weights decoded exactly to f32 inside the kernel and
 *     multiplied with f32 activations: the numbers of a dequantized reference.
 *   ENG_ACT_Q8: activations quantized per 32 to 8 bits and integer dot
 *     products (as llama.cpp does): faster, less exact (measured in README).
 * Process-wide; set once before the first forward pass. Both are
 * batch-invariant: a token's outputs do not depend on the rest of the batch. */
typedef enum { ENG_ACT_F32 = 0, ENG_ACT_Q8 = 1 } eng_act_mode;
void eng_matmul_set_activations(eng_act_mode mode);
eng_act_mode eng_matmul_activations(void);

/* Name of the kernel set chosen at run time ("avx2", "scalar"). */
const char *eng_matmul_isa(void);

#endif
