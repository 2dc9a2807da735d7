/* tensor.h: element types, quantized block layouts and the 2-D tensor view used
 * for model weights.
 *
 * The type codes are GGUF's (ggml_type), so a GGUF tensor type maps onto them
 * unchanged. Layouts follow ggml: a row of ne[0] elements is stored as
 * ne[0] / block_elems blocks; a matrix W with ne = {n_in, n_out} computes
 * y[o] = sum_i W[o][i] x[i] (row o holds the weights of output o). */
#ifndef ENG_TENSOR_H
#define ENG_TENSOR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
    ENG_F32  = 0,
    ENG_F16  = 1,
    ENG_Q4_0 = 2,
    ENG_Q4_1 = 3,
    ENG_Q8_0 = 8,
    ENG_Q8_1 = 9,  /* activations only (x side of Q4_1 dots) */
    ENG_Q4_K = 12,
    ENG_Q6_K = 14,
    ENG_BF16 = 30,
    ENG_DTYPE_COUNT = 31
} eng_dtype;

typedef uint16_t eng_fp16_t;  /* IEEE half, raw bits */
typedef uint16_t eng_bf16_t;  /* bfloat16, raw bits */

#define ENG_QK  32   /* elements per Q4_0 / Q4_1 / Q8_0 / Q8_1 block */
#define ENG_QKK 256  /* elements per K-quant super-block */

typedef struct { eng_fp16_t d; uint8_t qs[ENG_QK / 2]; } eng_block_q4_0;          /* 18 B */
typedef struct { eng_fp16_t d, m; uint8_t qs[ENG_QK / 2]; } eng_block_q4_1;       /* 20 B */
typedef struct { eng_fp16_t d; int8_t qs[ENG_QK]; } eng_block_q8_0;               /* 34 B */
typedef struct { float d, s; int8_t qs[ENG_QK]; } eng_block_q8_1;                 /* 40 B: s = d * sum(qs) */
typedef struct {                                                                  /* 144 B */
    eng_fp16_t d, dmin;
    uint8_t scales[12];        /* 8 x (6-bit scale, 6-bit min), packed */
    uint8_t qs[ENG_QKK / 2];
} eng_block_q4_k;
typedef struct {                                                                  /* 210 B */
    uint8_t ql[ENG_QKK / 2];   /* low 4 bits */
    uint8_t qh[ENG_QKK / 4];   /* high 2 bits */
    int8_t scales[ENG_QKK / 16];
    eng_fp16_t d;
} eng_block_q6_k;

/* A 2-D view: ne[0] elements per row (contiguous), ne[1] rows. `owned` says
 * whether `data` was malloc'd for this tensor (freed with it) or points into a
 * mapping or buffer owned by someone else. */
typedef struct {
    eng_dtype type;
    int64_t ne[2];
    void *data;
    bool owned;
    void *packed;  /* NULL, or the same weights in the batched kernels' layout
                      (eng_weight_pack): always owned, freed with the tensor */
} eng_tensor;

/* Name of a type ("q4_1"), or NULL when the code is not one kvserve knows. */
const char *eng_dtype_name(eng_dtype type);
/* Elements per block (1 for float types) and bytes per block; 0 for unknown. */
int64_t eng_dtype_block_elems(eng_dtype type);
size_t eng_dtype_block_bytes(eng_dtype type);
/* Bytes of one row of n elements; 0 when n is not a multiple of the block size
 * or the type is unknown. */
size_t eng_row_bytes(eng_dtype type, int64_t n);
static inline size_t eng_tensor_bytes(const eng_tensor *t) {
    return eng_row_bytes(t->type, t->ne[0]) * (size_t)t->ne[1];
}

float eng_fp16_to_f32(eng_fp16_t h);
eng_fp16_t eng_f32_to_fp16(float f);  /* round to nearest even */
float eng_bf16_to_f32(eng_bf16_t h);

/* Decodes n elements (n a multiple of the type's block size) of row data
 * src of `type` into dst, exactly as ggml defines each format. Returns 0, or
 * -1 for a type it cannot decode. */
int eng_dequantize_row(eng_dtype type, const void *src, float *dst, int64_t n);

/* Frees owned data and the packed copy, and zeroes the view. */
void eng_tensor_free(eng_tensor *t);

#endif
