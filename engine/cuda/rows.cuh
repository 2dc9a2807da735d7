/* rows.cuh: the cuda backend's matrix products for few activation rows (a
 * decode step, a short prompt): y = W x for T <= ENG_ROWS_MAX_T rows, one kernel
 * a product with what follows it fused in (rows.cu). cuBLAS takes larger T. */
#ifndef KVSERVE_ENGINE_CUDA_ROWS_CUH
#define KVSERVE_ENGINE_CUDA_ROWS_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define ENG_ROWS_MAX_T 64

/* What a product does with its outputs. */
typedef enum {
    ENG_ROWS_QKV,      /* y[t][o] = (W x_t)[o] + bias[o], then RoPE on the first n_rot_heads heads at pos[t] */
    ENG_ROWS_ADD,      /* y[t][o] += (W x_t)[o] + bias[o] (into the residual stream) */
    ENG_ROWS_SWIGLU,   /* yh[t][o] = half(silu(g) * u): g = (W x_t)[o], u = (W x_t)[rows / 2 + o] */
} eng_rows_epilogue;

typedef struct {
    eng_rows_epilogue epi;
    const __half *w;               /* (rows, cols) row-major; SWIGLU: gate rows, then up rows */
    int rows, cols;
    const void *x;                 /* (T, x_stride): __half, or float when x_f32 (rounded to fp16) */
    int x_stride, x_f32, T;
    /* RMSNorm of the float rows first (x_f32; NULL: none): x_t / rms(x_t) *
     * norm, rms over the cols numbers, as forward.cu's rmsnorm_kernel
     * (column slices round x_t * norm to fp16 and scale the sums by 1 / rms) */
    const float *norm;
    float eps;
    float *y;                      /* (T, y_stride) */
    __half *yh;                    /* SWIGLU's output instead, (T, y_stride) */
    int y_stride;
    const float *bias;             /* (rows) or NULL; SWIGLU: none */
    /* QKV: RoPE as forward.cu's qkv_post_kernel, over every dim of a head */
    const int32_t *pos;            /* (T) */
    const float *inv_freq;         /* (head_dim / 2); NULL: no RoPE */
    int n_rot_heads, head_dim, rope_dim, neox;
    /* rows longer than one block's share are split in column slices (grid
     * z), whose sums meet here (eng_rows_ws_size) and in counters (one an
     * output tile and token group, zeroed once: the kernel leaves them 0) */
    float *ws;
    int *counters;
} eng_rows_args;

/* Whether this product runs here: 1 <= T <= ENG_ROWS_MAX_T, cols and the input's
 * stride multiples of 32 and 8, rows a multiple of 16 (SWIGLU: 32; QKV: whole
 * heads, RoPE over all of head_dim), a norm only over float rows, and a
 * workspace where the rows need column slices (eng_rows_ws_size). */
bool eng_rows_fits(const eng_rows_args *a);

/* The workspace a product needs: floats of ws and ints of counters (both
 * 0 where one block takes a row's every column). */
void eng_rows_ws_size(const eng_rows_args *a, size_t *ws_floats, size_t *counters);

/* Launches the product on stream (cudaErrorInvalidValue where it does not
 * fit), as a programmatic dependent launch: its blocks may start while the
 * kernel before it runs, read their first weights (which nothing writes)
 * and wait for it before reading x; the next kernel may start at once. */
cudaError_t eng_rows_launch(const eng_rows_args *a, cudaStream_t stream);

#endif
