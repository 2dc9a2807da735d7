/* forward.cu: the CUDA backend (backend.h's contract on one NVIDIA GPU,
 * sm_90): the whole forward pass of a llama-family model runs on the device,
 * with the KV cache in a device arena of the pool's exact page layout.
 *
 * Weights are decoded once at creation (eng_weight_get_row, the same numbers
 * the CPU backend multiplies) and kept as fp16 matrices; the matrix products
 * are cuBLAS GEMMs with fp16 operands and fp32 accumulation and output. The
 * residual stream and everything between the GEMMs stay fp32; the GEMMs'
 * inputs are rounded to fp16 by the kernel before them (the norm, the
 * attention output's conversion, SwiGLU). The output projection and the
 * down projection add into the residual stream in the GEMM itself (beta 1).
 *
 * Per layer: RMSNorm -> QKV GEMM -> bias and RoPE -> kvc_cu_write (the new
 * K/V compressed into their pages) -> attention: the batch's one-token
 * segments in one kvc_cu_decode launch (their rows first in the batch),
 * each longer segment (a prefill chunk) with kvc_cu_prefill -> O GEMM ->
 * RMSNorm -> gate/up GEMM -> SwiGLU -> down GEMM; a batch of few rows of a
 * small model instead takes rows.cu's products, each with the kernels around
 * it fused in (enqueue_step). Logits are computed for
 * the rows asked only and copied back (into page-locked memory where the
 * caller took it from alloc_host); a forward ends with the stream
 * synchronized, so its errors are its own. Decode-only steps are replayed
 * from CUDA graphs (forward_graph: ~400 launches a step cost more host time
 * than the GPU needs for a small model).
 *
 * The CPU pool keeps the page bookkeeping (block tables, reference counts);
 * its host arena is never touched. Copy-on-write copies of shared pages are
 * device copies (kvc_pool_set_page_copier), issued in stream order. */
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

extern "C" {
#include "engine/backend.h"
#include "engine/matmul.h"
}
#include "cache/cuda/kvc_cuda.h"
#include "engine/cuda/cands.cuh"
#include "engine/cuda/rows.cuh"

/* a fp16 matrix (rows, cols), row-major: row o holds output o's weights */
typedef struct {
    __half *w;
    int rows, cols;
} dmat;

typedef struct {
    dmat wqkv, wo, w_gate_up, w_down;
    float *bqkv, *bo, *b_down;      /* biases (NULL when absent) */
    float *attn_norm, *ffn_norm;
} dlayer;

/* a decode step's graph, by padded shape (forward_graph) */
#define GRAPHS 16
#define BLAS_WS ((size_t)32 << 20)
typedef struct {
    int n_pad, bt_pad;              /* the key; n_pad 0: a free entry */
    int seen;                       /* times the key came before its capture */
    cudaGraphExec_t exec;
    int32_t *meta_d;                /* the graph's tables (device), fixed for its key */
    unsigned long last_use;
} step_graph;

typedef struct {
    eng_backend base;
    char desc[320];
    const eng_model *m;
    kvc_pool *pool;
    kvc_cu_layout L;
    bool layout_ready;
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;                  /* BLAS_WS bytes */
    void *arena;
    size_t page_bytes;
    int q_dim, kv_dim, qkv_dim, n_rep;
    dlayer *layers;
    dmat tok_embd, output;          /* output.w == tok_embd.w when tied */
    float *out_norm;
    float *inv_freq;                /* device (rope_dim / 2) */
    /* activations, sized for cap_tokens rows */
    int cap_tokens;
    float *x;                       /* (T, n_embd) residual stream */
    float *qkv;                     /* (T, qkv_dim) */
    float *att;                     /* (T, q_dim) attention output */
    float *hb;                      /* (T, 2 n_ff) gate, up */
    __half *xh;                     /* (T, max(n_embd, q_dim, n_ff)) GEMM input */
    int cap_out;
    float *logits;                  /* (cap_out, n_vocab) */
    eng_cands *cands;               /* (cap_out) the rows' records (cands.cuh), where cands_max */
    eng_cands_req *req_h, *req_d;   /* (cap_out) what each row asks: host pinned, device */
    eng_cands_pen *pen_h, *pen_d;   /* (cap_pen) the rows' penalty entries: host pinned, device */
    int cap_pen;
    /* per-batch integers: host pinned staging and its device copy */
    size_t cap_meta;
    int32_t *meta_h, *meta_d;
    void *ws;                       /* decode workspace */
    size_t ws_bytes;
    /* batches of at most rows_t rows take rows.cu's fused products (0: never);
     * the workspace of their column slices (rows_setup) */
    int rows_t;
    float *rows_ws;
    int *rows_counters;
    /* decode steps as CUDA graphs (forward_graph) */
    bool graphs_on;
    step_graph graphs[GRAPHS];
    unsigned long graph_clock;
    /* KVSERVE_CUDA_STATS=1: where forward's time goes, printed at destroy */
    bool stats;
    cudaEvent_t ev[3];              /* start, before the logits' copy, end */
    long n_fwd, n_tok, n_rows;
    double t_host, t_gpu, t_copy, t_wall;   /* seconds */
} cuda_backend;

#define CU_TRY(call, what)                                                                             \
    do {                                                                                               \
        cudaError_t e_ = (call);                                                                       \
        if (e_ != cudaSuccess) {                                                                       \
            (void)cudaGetLastError(); /* reported here, not again by the next forward */               \
            snprintf(err, errlen, "cuda backend: %s: %s", what, cudaGetErrorString(e_));               \
            return -1;                                                                                 \
        }                                                                                              \
    } while (0)

#define BLAS_TRY(call, what)                                                                           \
    do {                                                                                               \
        cublasStatus_t s_ = (call);                                                                    \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                             \
            snprintf(err, errlen, "cuda backend: %s: cuBLAS status %d", what, (int)s_);                \
            return -1;                                                                                 \
        }                                                                                              \
    } while (0)

/* ---- kernels ------------------------------------------------------------------ */

/* x[r] = embedding row tokens[r] (the fp16 table) */
static __global__ void embed_kernel(const int32_t *tokens, const __half *table, float *x, int n_embd) {
    const int r = blockIdx.x;
    const __half *src = table + (size_t)tokens[r] * n_embd;
    for (int i = threadIdx.x; i < n_embd; i += blockDim.x)
        x[(size_t)r * n_embd + i] = __half2float(src[i]);
}

/* Block-wide sum over blockDim.x (a multiple of 32, <= 1024) threads. */
static __device__ float block_sum(float v, float *red) {
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nw = blockDim.x / 32;
    __syncthreads();
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.0f;
    for (int o = 16; o; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* out[i] = half(x[rows[i]] / rms * w): RMSNorm of row rows[i] (rows NULL:
 * row i), as norm_row in forward_cpu.c, rounded to fp16 for the GEMM. */
static __global__ void rmsnorm_kernel(const float *x, const int32_t *rows, const float *w, __half *out, int n,
                                      float eps) {
    __shared__ float red[32];
    const int r = rows ? rows[blockIdx.x] : blockIdx.x;
    const float *xr = x + (size_t)r * n;
    float ss = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        ss += xr[i] * xr[i];
    ss = block_sum(ss, red);
    const float s = 1.0f / sqrtf(ss / n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        out[(size_t)blockIdx.x * n + i] = __float2half_rn(xr[i] * s * w[i]);
}

/* The QKV rows' bias, then RoPE on the query heads and the key heads at the
 * row's position: the angles in double from the f32 inverse frequencies,
 * rounded to f32 cos / sin as forward_cpu.c's tables are. One block a row. */
static __global__ void qkv_post_kernel(float *qkv, int qkv_dim, const float *bias, const int32_t *pos,
                                       const float *inv_freq, int n_rot_heads, int head_dim, int rope_dim, int neox) {
    const int r = blockIdx.x;
    float *q = qkv + (size_t)r * qkv_dim;
    if (bias) {
        for (int i = threadIdx.x; i < qkv_dim; i += blockDim.x)
            q[i] += bias[i];
        __syncthreads();
    }
    if (!inv_freq)
        return;
    const int half = rope_dim / 2;
    const double p = (double)pos[r];
    for (int t = threadIdx.x; t < n_rot_heads * half; t += blockDim.x) {
        const int h = t / half, i = t % half;
        double sd, cd;
        sincos(p * (double)inv_freq[i], &sd, &cd);
        const float c = (float)cd, s = (float)sd;
        float *v = q + (size_t)h * head_dim;
        const int ia = neox ? i : 2 * i, ib = neox ? i + half : 2 * i + 1;
        const float a = v[ia], b = v[ib];
        v[ia] = a * c - b * s;
        v[ib] = a * s + b * c;
    }
}

/* out = half(in), n elements */
static __global__ void to_half_kernel(const float *in, __half *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2half_rn(in[i]);
}

/* out[r][i] = half(silu(gate) * up), gate and up the halves of hb's row r */
static __global__ void swiglu_kernel(const float *hb, __half *out, int n_ff, size_t n) {
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < n; k += (size_t)gridDim.x * blockDim.x) {
        const size_t r = k / n_ff, i = k % n_ff;
        const float g = hb[r * 2 * n_ff + i], u = hb[r * 2 * n_ff + n_ff + i];
        out[k] = __float2half_rn(g / (1.0f + expf(-g)) * u);
    }
}

/* x[r][i] += b[i] */
static __global__ void add_bias_kernel(float *x, const float *b, int n, size_t total) {
    for (size_t k = blockIdx.x * (size_t)blockDim.x + threadIdx.x; k < total; k += (size_t)gridDim.x * blockDim.x)
        x[k] += b[k % n];
}

static int grid_for(size_t n) {
    size_t g = (n + 255) / 256;
    return (int)(g < 4096 ? (g ? g : 1) : 4096);
}

/* ---- weights ------------------------------------------------------------------ */

/* Decodes rows [0, rows) of w into a device fp16 matrix. F16 weights (most
 * Hugging Face checkpoints) are copied as they are: an 8B model's 15 GB would
 * otherwise take a minute of per-number conversion on one core. */
static int upload_matrix(const eng_tensor *w, int64_t rows, dmat *out, char *err, size_t errlen) {
    const int64_t cols = w->ne[0];
    out->rows = (int)rows;
    out->cols = (int)cols;
    if (w->type == ENG_F16) {
        cudaError_t e = cudaMalloc(&out->w, sizeof(__half) * (size_t)rows * (size_t)cols);
        if (e == cudaSuccess)
            e = cudaMemcpy(out->w, w->data, sizeof(__half) * (size_t)rows * (size_t)cols, cudaMemcpyHostToDevice);
        CU_TRY(e, "uploading a weight matrix");
        return 0;
    }
    float *row = (float *)malloc(sizeof(float) * (size_t)cols);
    __half *h = (__half *)malloc(sizeof(__half) * (size_t)cols * (size_t)rows);
    if (!row || !h) {
        free(row);
        free(h);
        snprintf(err, errlen, "cuda backend: out of host memory decoding a (%lld, %lld) matrix", (long long)rows,
                 (long long)cols);
        return -1;
    }
    for (int64_t r = 0; r < rows; r++) {
        eng_weight_get_row(w, r, row);
        for (int64_t i = 0; i < cols; i++)
            h[r * cols + i] = __float2half_rn(row[i]);
    }
    free(row);
    cudaError_t e = cudaMalloc(&out->w, sizeof(__half) * (size_t)rows * (size_t)cols);
    if (e == cudaSuccess)
        e = cudaMemcpy(out->w, h, sizeof(__half) * (size_t)rows * (size_t)cols, cudaMemcpyHostToDevice);
    free(h);
    CU_TRY(e, "uploading a weight matrix");
    return 0;
}

/* A f32 vector (norm weight, bias) to the device; NULL stays NULL. */
static int upload_vector(const eng_tensor *t, float **out, char *err, size_t errlen) {
    *out = NULL;
    if (!t->data)
        return 0;
    const size_t n = (size_t)t->ne[0] * (size_t)t->ne[1];
    if (t->type != ENG_F32) {
        snprintf(err, errlen, "cuda backend: a norm or bias tensor of type %s (f32 expected)",
                 eng_dtype_name(t->type) ? eng_dtype_name(t->type) : "?");
        return -1;
    }
    CU_TRY(cudaMalloc(out, n * sizeof(float)), "uploading a vector");
    CU_TRY(cudaMemcpy(*out, t->data, n * sizeof(float), cudaMemcpyHostToDevice), "uploading a vector");
    return 0;
}

/* y (T, W.rows) = beta y + x (T, W.cols) . W^T; x fp16, y f32, row-major. */
static int gemm(cuda_backend *cb, const dmat *W, const __half *x, int T, float *y, float beta, char *err,
                size_t errlen) {
    const float alpha = 1.0f;
    BLAS_TRY(cublasGemmEx(cb->blas, CUBLAS_OP_T, CUBLAS_OP_N, W->rows, T, W->cols, &alpha, W->w, CUDA_R_16F, W->cols,
                          x, CUDA_R_16F, W->cols, &beta, y, CUDA_R_32F, W->rows, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT),
             "GEMM");
    return 0;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- scratch -------------------------------------------------------------------- */

static void free_activations(cuda_backend *cb) {
    void *bufs[] = {cb->x, cb->qkv, cb->att, cb->hb, cb->xh};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        cudaFree(bufs[i]);
    cb->x = cb->qkv = cb->att = cb->hb = NULL;
    cb->xh = NULL;
    cb->cap_tokens = 0;
}

static void drop_graphs(cuda_backend *cb);

static int grow(cuda_backend *cb, int T, int n_out, size_t n_meta, size_t ws_bytes, char *err, size_t errlen) {
    const eng_model_config *c = &cb->m->cfg;
    if (T > cb->cap_tokens || n_out > cb->cap_out || ws_bytes > cb->ws_bytes)
        drop_graphs(cb);   /* they hold the buffers about to move */
    if (T > cb->cap_tokens) {
        free_activations(cb);
        size_t wide = (size_t)c->n_embd;
        if ((size_t)cb->q_dim > wide)
            wide = (size_t)cb->q_dim;
        if ((size_t)c->n_ff > wide)
            wide = (size_t)c->n_ff;
        CU_TRY(cudaMalloc(&cb->x, sizeof(float) * (size_t)T * c->n_embd), "activations");
        CU_TRY(cudaMalloc(&cb->qkv, sizeof(float) * (size_t)T * cb->qkv_dim), "activations");
        CU_TRY(cudaMalloc(&cb->att, sizeof(float) * (size_t)T * cb->q_dim), "activations");
        CU_TRY(cudaMalloc(&cb->hb, sizeof(float) * (size_t)T * 2 * c->n_ff), "activations");
        CU_TRY(cudaMalloc(&cb->xh, sizeof(__half) * (size_t)T * wide), "activations");
        cb->cap_tokens = T;
    }
    if (n_out > cb->cap_out) {
        cudaFree(cb->logits);
        cudaFree(cb->cands);
        cudaFreeHost(cb->req_h);
        cudaFree(cb->req_d);
        cb->logits = NULL;
        cb->cands = NULL;
        cb->req_h = cb->req_d = NULL;
        cb->cap_out = 0;
        CU_TRY(cudaMalloc(&cb->logits, sizeof(float) * (size_t)n_out * c->n_vocab), "logits");
        if (cb->base.cands_max) {
            CU_TRY(cudaMalloc(&cb->cands, sizeof(eng_cands) * (size_t)n_out), "logits");
            CU_TRY(cudaMallocHost(&cb->req_h, sizeof(eng_cands_req) * (size_t)n_out), "logits");
            CU_TRY(cudaMalloc(&cb->req_d, sizeof(eng_cands_req) * (size_t)n_out), "logits");
        }
        cb->cap_out = n_out;
    }
    if (n_meta > cb->cap_meta) {
        cudaFreeHost(cb->meta_h);
        cudaFree(cb->meta_d);
        cb->meta_h = cb->meta_d = NULL;
        cb->cap_meta = 0;
        size_t cap = n_meta < 4096 ? 4096 : n_meta * 2;
        CU_TRY(cudaMallocHost(&cb->meta_h, cap * sizeof(int32_t)), "batch tables");
        CU_TRY(cudaMalloc(&cb->meta_d, cap * sizeof(int32_t)), "batch tables");
        cb->cap_meta = cap;
    }
    if (ws_bytes > cb->ws_bytes) {
        cudaFree(cb->ws);
        cb->ws = NULL;
        cb->ws_bytes = 0;
        CU_TRY(cudaMalloc(&cb->ws, ws_bytes), "decode workspace");
        CU_TRY(cudaMemset(cb->ws, 0, ws_bytes), "decode workspace");
        cb->ws_bytes = ws_bytes;
    }
    return 0;
}

/* ---- the forward pass ------------------------------------------------------------ */

/* A batch's integers, as device pointers into one table copied per forward. */
typedef struct {
    int T, n_dec, dec_max_ctx, bt_stride, n_out;
    const int32_t *tokens, *pos, *slots, *ctx, *dec_bt, *pre_bt;
    const int32_t *out_rows;        /* NULL: rows 0..n_out-1 */
    const eng_batch *b;             /* the prefill segments (n_tokens > 1), or NULL */
    const int *seg_row, *pre_bt_off;
} step_args;

/* A product's shape for rows.cu: W, its input rows' stride and type, the
 * norm before it (NULL: none; x then the residual stream), and for QKV the
 * model's RoPE; the column slices' workspace. */
static eng_rows_args rows_shape(const cuda_backend *cb, eng_rows_epilogue epi, const dmat *W, int x_stride, bool x_f32,
                                const float *norm) {
    const eng_model_config *c = &cb->m->cfg;
    eng_rows_args r = {};
    r.epi = epi;
    r.w = W->w;
    r.rows = W->rows;
    r.cols = W->cols;
    r.x_stride = x_stride;
    r.x_f32 = x_f32;
    r.norm = norm;
    r.eps = c->norm_eps;
    r.ws = cb->rows_ws;
    r.counters = cb->rows_counters;
    if (epi == ENG_ROWS_QKV) {
        r.inv_freq = cb->inv_freq;
        r.n_rot_heads = c->n_head + c->n_kv_head;
        r.head_dim = c->head_dim;
        r.rope_dim = c->rope_dim;
        r.neox = c->rope_style == ENG_ROPE_NEOX;
    }
    return r;
}

/* One of rows.cu's products over T rows of x (y: float, or the fp16 output
 * of SWIGLU). */
static int rows_product(cuda_backend *cb, eng_rows_epilogue epi, const dmat *W, const void *x, int x_stride, bool x_f32,
                        const float *norm, int T, void *y, int y_stride, const float *bias, const int32_t *pos,
                        char *err, size_t errlen) {
    eng_rows_args r = rows_shape(cb, epi, W, x_stride, x_f32, norm);
    r.x = x;
    r.T = T;
    if (epi == ENG_ROWS_SWIGLU)
        r.yh = (__half *)y;
    else
        r.y = (float *)y;
    r.y_stride = y_stride;
    r.bias = bias;
    r.pos = pos;
    CU_TRY(eng_rows_launch(&r, cb->stream), "a fused product");
    return 0;
}

/* The fused products' setup at creation: whether the model's products fit
 * rows.cu at every T up to ENG_ROWS_MAX_T (their shapes), the workspace for the
 * column slices of long rows (allocated here, counters zeroed), and the
 * default row limit. Measured (notes/gpu.md, session 21; the four products
 * of a layer against cuBLAS's GEMMs alone, rows_bench): SmolLM2's (7 MB a
 * layer) at 0.49 / 0.55 / 0.72x cuBLAS's time at 1 / 8 / 16 rows, a
 * Qwen-0.5B shape's (30 MB, its down product in column slices) 0.55 /
 * 0.56 / 1.12x, Llama-1B's (122 MB) 1.30x and Llama-8B's (436 MB) 1.45x at
 * one row: cuBLAS streams large matrices faster. So by default: layers of
 * at most ROWS_LAYER_BYTES, up to 16 rows, or 8 where a product is sliced.
 * KVSERVE_CUDA_ROWS=N (0 to 64) sets the limit (0: cuBLAS always). */
#define ROWS_LAYER_BYTES ((size_t)32 << 20)

static int rows_setup(cuda_backend *cb, char *err, size_t errlen) {
    const eng_model_config *c = &cb->m->cfg;
    const dlayer *L = &cb->layers[0];
    const struct {
        eng_rows_epilogue epi;
        const dmat *W;
        int x_stride, x_f32;
        const float *norm;
    } p[] = {{ENG_ROWS_QKV, &L->wqkv, c->n_embd, 1, L->attn_norm},
             {ENG_ROWS_ADD, &L->wo, cb->q_dim, 1, NULL},
             {ENG_ROWS_SWIGLU, &L->w_gate_up, c->n_embd, 1, L->ffn_norm},
             {ENG_ROWS_ADD, &L->w_down, c->n_ff, 0, NULL}};
    size_t ws = 0, counters = 0, layer = 0;
    bool fits = true, sliced = false;
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) {
        eng_rows_args r = rows_shape(cb, p[i].epi, p[i].W, p[i].x_stride, p[i].x_f32, p[i].norm);
        r.yh = (__half *)cb;   /* any non-NULL: what eng_rows_fits asks of SWIGLU */
        layer += sizeof(__half) * (size_t)r.rows * (size_t)r.cols;
        size_t w, n;
        r.T = 16;
        eng_rows_ws_size(&r, &w, &n);
        sliced |= w > 0;
        r.T = ENG_ROWS_MAX_T;   /* the most workspace */
        eng_rows_ws_size(&r, &w, &n);
        ws = w > ws ? w : ws;
        counters = n > counters ? n : counters;
        r.ws = (float *)cb;   /* any non-NULL */
        r.counters = (int *)cb;
        fits &= eng_rows_fits(&r);
    }
    cb->rows_t = layer <= ROWS_LAYER_BYTES ? (sliced ? 8 : 16) : 0;
    const char *rt = getenv("KVSERVE_CUDA_ROWS");
    if (rt && *rt) {
        char *end = NULL;
        const long v = strtol(rt, &end, 10);
        if (*end || v < 0 || v > ENG_ROWS_MAX_T) {
            snprintf(err, errlen, "cuda backend: KVSERVE_CUDA_ROWS=%s: not a number of rows from 0 to %d", rt,
                     ENG_ROWS_MAX_T);
            return -1;
        }
        cb->rows_t = (int)v;
    }
    if (!fits)
        cb->rows_t = 0;
    if (cb->rows_t && ws &&
        (cudaMalloc(&cb->rows_ws, ws * sizeof(float)) != cudaSuccess ||
         cudaMalloc(&cb->rows_counters, counters * sizeof(int)) != cudaSuccess ||
         cudaMemset(cb->rows_counters, 0, counters * sizeof(int)) != cudaSuccess)) {
        (void)cudaGetLastError();   /* no room for the slices' workspace: cuBLAS it is */
        cudaFree(cb->rows_ws);
        cudaFree(cb->rows_counters);
        cb->rows_ws = NULL;
        cb->rows_counters = NULL;
        cb->rows_t = 0;
    }
    if (cb->rows_t) {
        const size_t n = strlen(cb->desc);
        snprintf(cb->desc + n, sizeof cb->desc - n, ", fused products up to %d rows", cb->rows_t);
    }
    return 0;
}

/* Layer l's attention: the new K/V into their pages, then the decode rows
 * (one kvc_cu_decode) and each prefill chunk, into cb->att. */
static int attend(cuda_backend *cb, const step_args *a, int l, char *err, size_t errlen) {
    const eng_model_config *c = &cb->m->cfg;
    const float scale = 1.0f / sqrtf((float)c->head_dim);
    if (kvc_cu_write(&cb->L, cb->arena, l, a->slots, a->T, cb->qkv + cb->q_dim, cb->qkv + cb->q_dim + cb->kv_dim,
                     cb->qkv_dim, cb->stream, err, errlen) != KVC_OK)
        return -1;
    if (a->n_dec) {
        kvc_cu_decode_args d = {};
        d.block_tables = a->dec_bt;
        d.bt_stride = a->bt_stride;
        d.ctx_lens = a->ctx;
        d.n_seqs = a->n_dec;
        d.max_ctx = a->dec_max_ctx;
        d.n_rep = cb->n_rep;
        d.scale = scale;
        d.q = cb->qkv;
        d.q_stride = cb->qkv_dim;
        d.out = cb->att;
        d.out_stride = cb->q_dim;
        if (kvc_cu_decode(&cb->L, cb->arena, l, &d, cb->ws, cb->ws_bytes, cb->stream, err, errlen) != KVC_OK)
            return -1;
    }
    for (int i = 0; a->b && i < a->b->n_segs; i++) {
        const eng_segment *s = &a->b->segs[i];
        if (s->n_tokens == 1)
            continue;
        const size_t r = (size_t)a->seg_row[i];
        if (kvc_cu_prefill(&cb->L, cb->arena, l, a->pre_bt + a->pre_bt_off[i], s->pos0, s->n_tokens, cb->n_rep, scale,
                           cb->qkv + r * cb->qkv_dim, cb->qkv_dim, cb->att + r * cb->q_dim, cb->q_dim, cb->stream, err,
                           errlen) != KVC_OK)
            return -1;
    }
    return 0;
}

/* Launches a forward's work on the stream, up to the logits in cb->logits:
 * the n_dec decode rows first (attended by one kvc_cu_decode), then each
 * prefill segment's rows. Launches only, so a CUDA graph can capture it.
 * Up to cb->rows_t rows the products are rows.cu's (a layer: norm and QKV
 * with bias and RoPE, write, attention, O into the residual, norm and
 * gate/up with SwiGLU, down into the residual: six launches); beyond,
 * cuBLAS GEMMs with the steps between them as kernels of their own. The
 * logits are cuBLAS's either way (a wide product rows.cu is slower at). */
static int enqueue_step(cuda_backend *cb, const step_args *a, char *err, size_t errlen) {
    const eng_model_config *c = &cb->m->cfg;
    const int n_embd = c->n_embd, T = a->T;
    const float eps = c->norm_eps;
    const size_t wide_ff = (size_t)T * c->n_ff;
    const bool small = T <= cb->rows_t;
    __half *ffh = (__half *)cb->hb;   /* small: SwiGLU's output (hb holds no gate/up sums then) */
    embed_kernel<<<T, 128, 0, cb->stream>>>(a->tokens, cb->tok_embd.w, cb->x, n_embd);
    for (int l = 0; l < c->n_layer; l++) {
        const dlayer *L = &cb->layers[l];
        if (small) {
            if (rows_product(cb, ENG_ROWS_QKV, &L->wqkv, cb->x, n_embd, true, L->attn_norm, T, cb->qkv, cb->qkv_dim,
                             L->bqkv, a->pos, err, errlen))
                return -1;
        } else {
            rmsnorm_kernel<<<T, 256, 0, cb->stream>>>(cb->x, NULL, L->attn_norm, cb->xh, n_embd, eps);
            if (gemm(cb, &L->wqkv, cb->xh, T, cb->qkv, 0.0f, err, errlen))
                return -1;
            qkv_post_kernel<<<T, 256, 0, cb->stream>>>(cb->qkv, cb->qkv_dim, L->bqkv, a->pos, cb->inv_freq,
                                                        c->n_head + c->n_kv_head, c->head_dim, c->rope_dim,
                                                        c->rope_style == ENG_ROPE_NEOX);
        }
        if (attend(cb, a, l, err, errlen))
            return -1;
        if (small) {
            if (rows_product(cb, ENG_ROWS_ADD, &L->wo, cb->att, cb->q_dim, true, NULL, T, cb->x, n_embd, L->bo, NULL,
                             err, errlen))
                return -1;
        } else {
            to_half_kernel<<<grid_for((size_t)T * cb->q_dim), 256, 0, cb->stream>>>(cb->att, cb->xh,
                                                                                  (size_t)T * cb->q_dim);
            if (gemm(cb, &L->wo, cb->xh, T, cb->x, 1.0f, err, errlen))
                return -1;
            if (L->bo)
                add_bias_kernel<<<grid_for((size_t)T * n_embd), 256, 0, cb->stream>>>(cb->x, L->bo, n_embd,
                                                                                    (size_t)T * n_embd);
        }
        if (small) {
            if (rows_product(cb, ENG_ROWS_SWIGLU, &L->w_gate_up, cb->x, n_embd, true, L->ffn_norm, T, ffh, c->n_ff,
                             NULL, NULL, err, errlen) ||
                rows_product(cb, ENG_ROWS_ADD, &L->w_down, ffh, c->n_ff, false, NULL, T, cb->x, n_embd, L->b_down,
                             NULL, err, errlen))
                return -1;
        } else {
            rmsnorm_kernel<<<T, 256, 0, cb->stream>>>(cb->x, NULL, L->ffn_norm, cb->xh, n_embd, eps);
            if (gemm(cb, &L->w_gate_up, cb->xh, T, cb->hb, 0.0f, err, errlen))
                return -1;
            swiglu_kernel<<<grid_for(wide_ff), 256, 0, cb->stream>>>(cb->hb, cb->xh, c->n_ff, wide_ff);
            if (gemm(cb, &L->w_down, cb->xh, T, cb->x, 1.0f, err, errlen))
                return -1;
            if (L->b_down)
                add_bias_kernel<<<grid_for((size_t)T * n_embd), 256, 0, cb->stream>>>(cb->x, L->b_down, n_embd,
                                                                                    (size_t)T * n_embd);
        }
    }
    if (a->n_out) {
        rmsnorm_kernel<<<a->n_out, 256, 0, cb->stream>>>(cb->x, a->out_rows, cb->out_norm, cb->xh, n_embd, eps);
        if (gemm(cb, &cb->output, cb->xh, a->n_out, cb->logits, 0.0f, err, errlen))
            return -1;
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cuda backend: a launch of the forward pass: %s", cudaGetErrorString(e));
        return -1;
    }
    return 0;
}

/* The logits' copy to the caller: rows whose segment asked a record or a
 * draw (cands_k) as records, made here (cands.cu), the others whole. */
static cudaError_t copy_logits(cuda_backend *cb, const eng_batch *b, float *logits, int n_out) {
    const int n_vocab = cb->m->cfg.n_vocab;
    const size_t row_bytes = sizeof(float) * (size_t)n_vocab;
    int kmax = 0, row = 0, n_pen = 0;
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        const int rows = s->all_logits ? s->n_tokens : s->want_logits ? 1 : 0;
        for (int r = 0; r < rows && cb->base.cands_max; r++, row++)
            cb->req_h[row] = eng_cands_req{r == rows - 1 ? s->cands_k : 0, s->draw};
        const int k = s->cands_k == ENG_CANDS_DRAW ? 1 : s->cands_k;
        kmax = k > kmax ? k : kmax;
        n_pen += s->pen ? s->pen->n : 0;
    }
    if (!kmax)
        return cudaMemcpyAsync(logits, cb->logits, row_bytes * (size_t)n_out, cudaMemcpyDeviceToHost, cb->stream);
    if (n_pen > cb->cap_pen) {   /* (the last step's copies are done: finish_step synchronized) */
        cudaFreeHost(cb->pen_h);
        cudaFree(cb->pen_d);
        cb->pen_h = cb->pen_d = NULL;
        cb->cap_pen = 0;
        const int cap = n_pen < 4096 ? 4096 : 2 * n_pen;
        cudaError_t e = cudaMallocHost(&cb->pen_h, sizeof(eng_cands_pen) * (size_t)cap);
        if (e == cudaSuccess)
            e = cudaMalloc(&cb->pen_d, sizeof(eng_cands_pen) * (size_t)cap);
        if (e != cudaSuccess)
            return e;
        cb->cap_pen = cap;
    }
    /* penalties on the rows they belong to, before their records and draws */
    int np = 0;
    row = 0;
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        row += s->all_logits ? s->n_tokens : s->want_logits ? 1 : 0;
        for (int j = 0; s->pen && j < s->pen->n; j++)
            cb->pen_h[np++] = eng_cands_pen{row - 1, s->pen->e[j].id, s->pen->e[j].count, s->pen->repetition,
                                            s->pen->presence, s->pen->frequency};
    }
    if (np) {
        cudaError_t e = cudaMemcpyAsync(cb->pen_d, cb->pen_h, sizeof(eng_cands_pen) * (size_t)np,
                                        cudaMemcpyHostToDevice, cb->stream);
        if (e == cudaSuccess)
            e = eng_cands_penalize(cb->logits, n_vocab, cb->pen_d, np, cb->stream);
        if (e != cudaSuccess)
            return e;
    }
    /* every asked row's record, then the whole rows over the records of
     * theirs (left as they were), a run of neighbours at a time */
    cudaError_t e = cudaMemcpyAsync(cb->req_d, cb->req_h, sizeof(eng_cands_req) * (size_t)n_out,
                                    cudaMemcpyHostToDevice, cb->stream);
    if (e == cudaSuccess)
        e = eng_cands_launch(cb->logits, n_out, n_vocab, cb->req_d, cb->cands, cb->stream);
    if (e == cudaSuccess)
        e = cudaMemcpy2DAsync(logits, row_bytes, cb->cands, sizeof(eng_cands), ENG_CANDS_BYTES(kmax), (size_t)n_out,
                              cudaMemcpyDeviceToHost, cb->stream);
    int run = -1;
    for (int r = 0; r < n_out && e == cudaSuccess; r++) {
        const bool whole = !cb->req_h[r].k;
        if (whole && run < 0)
            run = r;
        if ((!whole || r == n_out - 1) && run >= 0) {
            const int end = whole ? r + 1 : r;
            e = cudaMemcpyAsync(logits + (size_t)run * n_vocab, cb->logits + (size_t)run * n_vocab,
                                row_bytes * (size_t)(end - run), cudaMemcpyDeviceToHost, cb->stream);
            run = -1;
        }
    }
    return e;
}

/* The logits' copy to the caller and the end of the forward: synchronizes,
 * so the forward's errors are its own, and keeps the statistics. */
static int finish_step(cuda_backend *cb, const eng_batch *b, float *logits, int n_out, int T, double t0, char *err,
                       size_t errlen) {
    const double t1 = cb->stats ? now_s() : 0;
    if (cb->stats)
        cudaEventRecord(cb->ev[1], cb->stream);
    cudaError_t e = n_out ? copy_logits(cb, b, logits, n_out) : cudaSuccess;
    if (cb->stats)
        cudaEventRecord(cb->ev[2], cb->stream);
    const cudaError_t s = cudaStreamSynchronize(cb->stream);
    if (e == cudaSuccess)
        e = s;
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cuda backend: forward of %d tokens: %s", T, cudaGetErrorString(e));
        return -1;
    }
    if (cb->stats) {
        float gpu = 0, copy = 0;
        cudaEventElapsedTime(&gpu, cb->ev[0], cb->ev[1]);
        cudaEventElapsedTime(&copy, cb->ev[1], cb->ev[2]);
        cb->n_fwd++;
        cb->n_tok += T;
        cb->n_rows += n_out;
        cb->t_host += t1 - t0;
        cb->t_gpu += gpu * 1e-3;
        cb->t_copy += copy * 1e-3;
        cb->t_wall += now_s() - t0;
    }
    return 0;
}

/* ---- decode steps as CUDA graphs ---------------------------------------------------- */

/* Decode-only batches launch ~13 kernels a layer whose host cost outweighs
 * the GPU's at small models (session 18: 3.0 ms a step of 64 sequences
 * enqueueing, SmolLM2). Such a step is replayed from a graph instead, keyed
 * by its padded shape: sequences rounded up (1, 2, 4, 8, then multiples of
 * 16, then of 64; the padding rows write nothing (slot -1) and attend to no
 * position (context 0)) and the block tables' width rounded up to 32 pages
 * (the decode's split is planned for that width). A key is captured the
 * second time it comes (the first runs plainly, which also sets the
 * kernels' one-time attributes); the least recently used of GRAPHS is
 * dropped for a new one. Reallocated activations drop them all.
 * KVSERVE_CUDA_GRAPHS=0 turns graphs off. */
static int pad_seqs(int n) {
    if (n <= 8) {
        int p = 1;
        while (p < n)
            p *= 2;
        return p;
    }
    return n <= 256 ? (n + 15) & ~15 : (n + 63) & ~63;
}

static void drop_graph(step_graph *g) {
    if (g->exec)
        cudaGraphExecDestroy(g->exec);
    cudaFree(g->meta_d);
    memset(g, 0, sizeof *g);
}

static void drop_graphs(cuda_backend *cb) {
    for (int i = 0; i < GRAPHS; i++)
        if (cb->graphs[i].n_pad)
            drop_graph(&cb->graphs[i]);
}

/* The graph entry of a key, made (least recently used dropped) when new. */
static step_graph *graph_for(cuda_backend *cb, int n_pad, int bt_pad) {
    step_graph *lru = &cb->graphs[0];
    for (int i = 0; i < GRAPHS; i++) {
        step_graph *g = &cb->graphs[i];
        if (g->n_pad == n_pad && g->bt_pad == bt_pad)
            return g;
        if (!g->n_pad || (lru->n_pad && g->last_use < lru->last_use))
            lru = g;
    }
    if (lru->n_pad)
        drop_graph(lru);
    lru->n_pad = n_pad;
    lru->bt_pad = bt_pad;
    return lru;
}

/* A decode-only batch through a graph: 0 done, -1 error, 1 not taken (run
 * it plainly). */
static int forward_graph(cuda_backend *cb, const eng_batch *b, float *logits, int bt_stride, char *err,
                         size_t errlen) {
    const int n = b->n_segs, n_pad = pad_seqs(n), bt_pad = (bt_stride + 31) & ~31, B = kvc_block_size(cb->pool);
    const size_t total = (size_t)n_pad * (4 + (size_t)bt_pad);
    const size_t ws = kvc_cu_decode_workspace(&cb->L, n_pad, bt_pad * B, cb->n_rep);
    if (grow(cb, n_pad, n_pad, total, ws, err, errlen))
        return -1;
    step_graph *g = graph_for(cb, n_pad, bt_pad);
    g->last_use = ++cb->graph_clock;
    if (!g->exec && ++g->seen < 2)
        return 1;
    if (!g->meta_d && cudaMalloc(&g->meta_d, total * sizeof(int32_t)) != cudaSuccess) {
        (void)cudaGetLastError();
        return 1;
    }
    /* tokens, positions, slots, contexts (n_pad each), then the tables */
    int32_t *H = cb->meta_h, *tok = H, *pos = H + n_pad, *slot = pos + n_pad, *ctx = slot + n_pad,
            *bt = ctx + n_pad;
    memset(H, 0, total * sizeof(int32_t));
    for (int i = 0; i < n_pad; i++) {
        if (i >= n) {
            slot[i] = -1;
            continue;
        }
        const eng_segment *s = &b->segs[i];
        const int p = s->pos0, pages = (p + B) / B;
        tok[i] = s->tokens[0];
        pos[i] = p;
        slot[i] = s->seq->pages[p / B] * B + p % B;
        ctx[i] = p + 1;
        memcpy(bt + (size_t)i * bt_pad, s->seq->pages, sizeof(int32_t) * (size_t)pages);
    }
    const double t0 = cb->stats ? now_s() : 0;
    cudaError_t e = cudaMemcpyAsync(g->meta_d, H, total * sizeof(int32_t), cudaMemcpyHostToDevice, cb->stream);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cuda backend: copying the batch's tables: %s", cudaGetErrorString(e));
        return -1;
    }
    if (!g->exec) {
        const int32_t *D = g->meta_d;
        step_args a = {.T = n_pad, .n_dec = n_pad, .dec_max_ctx = bt_pad * B, .bt_stride = bt_pad, .n_out = n_pad,
                       .tokens = D, .pos = D + n_pad, .slots = D + 2 * n_pad, .ctx = D + 3 * n_pad,
                       .dec_bt = D + 4 * n_pad, .pre_bt = NULL, .out_rows = NULL, .b = NULL, .seg_row = NULL,
                       .pre_bt_off = NULL};
        cudaGraph_t graph = NULL;
        char cap_err[256] = "";
        int rc = -1;
        if (cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeThreadLocal) == cudaSuccess) {
            rc = enqueue_step(cb, &a, cap_err, sizeof cap_err);
            e = cudaStreamEndCapture(cb->stream, &graph);
            if (rc == 0 && (e != cudaSuccess || cudaGraphInstantiate(&g->exec, graph, 0) != cudaSuccess))
                rc = -1;
        }
        if (graph)
            cudaGraphDestroy(graph);
        if (rc) {   /* graphs do not work here: plainly from now on */
            (void)cudaGetLastError();
            cudaStreamSynchronize(cb->stream);   /* the table's copy, before the table is rewritten */
            fprintf(stderr, "cuda backend: decode steps not captured as a graph (%s): launching them one by one\n",
                    cap_err[0] ? cap_err : cudaGetErrorString(e));
            g->exec = NULL;
            drop_graphs(cb);
            cb->graphs_on = false;
            return 1;
        }
    }
    if (cb->stats)
        cudaEventRecord(cb->ev[0], cb->stream);
    e = cudaGraphLaunch(g->exec, cb->stream);
    if (e != cudaSuccess) {
        snprintf(err, errlen, "cuda backend: launching a decode step's graph: %s", cudaGetErrorString(e));
        return -1;
    }
    return finish_step(cb, b, logits, n, n, t0, err, errlen);
}

static int cuda_forward_impl(cuda_backend *cb, const eng_batch *b, float *logits, char *err, size_t errlen) {
    const eng_model_config *c = &cb->m->cfg;
    const int B = kvc_block_size(cb->pool);

    /* validate; count decode (one-token) and prefill segments */
    if (eng_batch_check(&cb->base, b, c, err, errlen))
        return -1;
    int T = 0, n_dec = 0, dec_max_ctx = 0, bt_stride = 1, n_out = 0;
    size_t pre_pages = 0;
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        /* pages about to be written must be this sequence's own (a device
         * copy, through the page copier, where one is still shared) */
        if (kvc_seq_prepare_write(cb->pool, s->seq, s->pos0, s->n_tokens) != KVC_OK) {
            snprintf(err, errlen, "forward: segment %d: no free KV page to copy a shared page into", i);
            return -1;
        }
        T += s->n_tokens;
        const int ctx = s->pos0 + s->n_tokens, pages = (ctx + B - 1) / B;
        if (s->n_tokens == 1) {
            n_dec++;
            if (ctx > dec_max_ctx)
                dec_max_ctx = ctx;
            if (pages > bt_stride)
                bt_stride = pages;
        } else {
            pre_pages += (size_t)pages;
        }
        n_out += s->all_logits ? s->n_tokens : s->want_logits ? 1 : 0;
    }
    if (T == 0)
        return 0;
    if (cb->graphs_on && n_dec == b->n_segs && n_out == n_dec) {
        const int rc = forward_graph(cb, b, logits, bt_stride, err, errlen);
        if (rc <= 0)
            return rc;
    }

    /* the table: tokens, positions, slots (T each), decode contexts and block
     * tables, prefill block tables, the rows that want logits */
    const size_t o_pos = (size_t)T, o_slots = 2 * (size_t)T, o_ctx = 3 * (size_t)T, o_dec_bt = o_ctx + n_dec,
                 o_pre_bt = o_dec_bt + (size_t)n_dec * bt_stride, o_out = o_pre_bt + pre_pages,
                 total = o_out + (size_t)n_out;
    const size_t ws = n_dec ? kvc_cu_decode_workspace(&cb->L, n_dec, dec_max_ctx, cb->n_rep) : 0;
    if (grow(cb, T, n_out, total, ws, err, errlen))
        return -1;

    /* rows: the one-token segments first (decode reads them as one block of
     * n_dec query rows), then the others in batch order */
    int32_t *H = cb->meta_h;
    int *seg_row = (int *)malloc(sizeof(int) * (size_t)b->n_segs * 2);
    if (!seg_row) {
        snprintf(err, errlen, "forward: out of memory");
        return -1;
    }
    int *pre_bt_off = seg_row + b->n_segs;
    int row = 0, d = 0;
    size_t pb = 0;
    for (int pass = 0; pass < 2; pass++)
        for (int i = 0; i < b->n_segs; i++) {
            const eng_segment *s = &b->segs[i];
            if ((s->n_tokens == 1) != (pass == 0))
                continue;
            seg_row[i] = row;
            const int ctx = s->pos0 + s->n_tokens, pages = (ctx + B - 1) / B;
            if (pass == 0) {
                H[o_ctx + d] = ctx;
                memcpy(H + o_dec_bt + (size_t)d * bt_stride, s->seq->pages, sizeof(int32_t) * (size_t)pages);
                for (int p = pages; p < bt_stride; p++)
                    H[o_dec_bt + (size_t)d * bt_stride + p] = s->seq->pages[0];
                d++;
            } else {
                pre_bt_off[i] = (int)pb;
                memcpy(H + o_pre_bt + pb, s->seq->pages, sizeof(int32_t) * (size_t)pages);
                pb += (size_t)pages;
            }
            for (int t = 0; t < s->n_tokens; t++, row++) {
                const int p = s->pos0 + t;
                H[row] = s->tokens[t];
                H[o_pos + row] = p;
                H[o_slots + row] = s->seq->pages[p / B] * B + p % B;
            }
        }
    int o = 0;
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        const int first = s->all_logits ? 0 : s->want_logits ? s->n_tokens - 1 : s->n_tokens;
        for (int t = first; t < s->n_tokens; t++)
            H[o_out + o++] = seg_row[i] + t;
    }
    const int32_t *D = cb->meta_d;
    const step_args a = {.T = T, .n_dec = n_dec, .dec_max_ctx = dec_max_ctx, .bt_stride = bt_stride, .n_out = n_out,
                         .tokens = D, .pos = D + o_pos, .slots = D + o_slots, .ctx = D + o_ctx, .dec_bt = D + o_dec_bt,
                         .pre_bt = D + o_pre_bt, .out_rows = D + o_out, .b = b, .seg_row = seg_row,
                         .pre_bt_off = pre_bt_off};
    const double t0 = cb->stats ? now_s() : 0;
    if (cb->stats)
        cudaEventRecord(cb->ev[0], cb->stream);
    int rc = -1;
    cudaError_t e = cudaMemcpyAsync(cb->meta_d, H, total * sizeof(int32_t), cudaMemcpyHostToDevice, cb->stream);
    if (e != cudaSuccess)
        snprintf(err, errlen, "cuda backend: copying the batch's tables: %s", cudaGetErrorString(e));
    else if (enqueue_step(cb, &a, err, errlen) == 0)
        rc = finish_step(cb, b, logits, n_out, T, t0, err, errlen);
    if (rc)
        cudaStreamSynchronize(cb->stream);  /* the pinned table is free again */
    free(seg_row);
    return rc;
}

static int cuda_forward(eng_backend *be, const eng_batch *b, float *logits, char *err, size_t errlen) {
    cuda_backend *cb = (cuda_backend *)be;
    cudaSetDevice(cb->device);
    (void)cudaGetLastError();   /* an earlier call's error was reported by that call */
    return cuda_forward_impl(cb, b, logits, err, errlen);
}

/* Page-locked logits: the copy at full speed. */
static void *cuda_alloc_host(eng_backend *be, size_t bytes) {
    cudaSetDevice(((cuda_backend *)be)->device);
    void *p = NULL;
    return cudaMallocHost(&p, bytes) == cudaSuccess ? p : NULL;
}

static void cuda_free_host(eng_backend *be, void *p) {
    if (p)
        cudaFreeHost(p);
}

/* ---- creation ------------------------------------------------------------------- */

/* The pool's copy-on-write on the device arena, in stream order. */
static void copy_page(void *ctx, int32_t dst, int32_t src) {
    cuda_backend *cb = (cuda_backend *)ctx;
    cudaSetDevice(cb->device);
    cudaMemcpyAsync((char *)cb->arena + (size_t)dst * cb->page_bytes, (char *)cb->arena + (size_t)src * cb->page_bytes,
                    cb->page_bytes, cudaMemcpyDeviceToDevice, cb->stream);
}

static void cuda_destroy(eng_backend *be) {
    cuda_backend *cb = (cuda_backend *)be;
    cudaSetDevice(cb->device);
    if (cb->stream)
        cudaStreamSynchronize(cb->stream);
    kvc_pool_set_page_copier(cb->pool, NULL, NULL);
    if (cb->stats && cb->n_fwd)
        fprintf(stderr,
                "cuda backend: %ld forwards, %ld tokens, %ld logit rows: %.3f s in forward (%.3f s enqueueing), "
                "GPU %.3f s computing and %.3f s copying logits (%.1f MB/s)\n",
                cb->n_fwd, cb->n_tok, cb->n_rows, cb->t_wall, cb->t_host, cb->t_gpu, cb->t_copy,
                cb->t_copy > 0 ? 4e-6 * (double)cb->n_rows * cb->m->cfg.n_vocab / cb->t_copy : 0.0);
    for (int i = 0; i < 3; i++)
        if (cb->ev[i])
            cudaEventDestroy(cb->ev[i]);
    drop_graphs(cb);
    if (cb->layers) {
        for (int l = 0; l < cb->m->cfg.n_layer; l++) {
            dlayer *L = &cb->layers[l];
            void *p[] = {L->wqkv.w, L->wo.w, L->w_gate_up.w, L->w_down.w, L->bqkv,
                         L->bo, L->b_down, L->attn_norm, L->ffn_norm};
            for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
                cudaFree(p[i]);
        }
        free(cb->layers);
    }
    if (cb->output.w != cb->tok_embd.w)
        cudaFree(cb->output.w);
    cudaFree(cb->tok_embd.w);
    cudaFree(cb->out_norm);
    cudaFree(cb->inv_freq);
    free_activations(cb);
    cudaFree(cb->logits);
    cudaFree(cb->cands);
    cudaFreeHost(cb->req_h);
    cudaFree(cb->req_d);
    cudaFreeHost(cb->pen_h);
    cudaFree(cb->pen_d);
    cudaFreeHost(cb->meta_h);
    cudaFree(cb->meta_d);
    cudaFree(cb->ws);
    cudaFree(cb->rows_ws);
    cudaFree(cb->rows_counters);
    cudaFree(cb->arena);
    if (cb->layout_ready)
        kvc_cu_layout_dispose(&cb->L);
    if (cb->blas)
        cublasDestroy(cb->blas);
    cudaFree(cb->blas_ws);
    if (cb->stream)
        cudaStreamDestroy(cb->stream);
    free(cb);
}

static int create_impl(cuda_backend *cb, const eng_backend_options *opt, char *err, size_t errlen) {
    const eng_model *m = cb->m;
    const eng_model_config *c = &m->cfg;
    if (c->arch != ENG_ARCH_LLAMA) {
        snprintf(err, errlen,
                 "cuda backend: the %s architecture is not on the GPU (llama family only): use --backend cpu",
                 c->arch == ENG_ARCH_GPT2 ? "gpt2" : "model's");
        return -1;
    }
    if (c->n_head % c->n_kv_head) {
        snprintf(err, errlen, "cuda backend: %d query heads over %d kv heads", c->n_head, c->n_kv_head);
        return -1;
    }
    cb->device = opt ? opt->device : 0;
    int n_dev = 0;
    CU_TRY(cudaGetDeviceCount(&n_dev), "looking for a GPU");
    if (cb->device < 0 || cb->device >= n_dev) {
        snprintf(err, errlen, "cuda backend: device %d: this machine has %d CUDA device%s", cb->device, n_dev,
                 n_dev == 1 ? "" : "s");
        return -1;
    }
    CU_TRY(cudaSetDevice(cb->device), "selecting the device");
    cudaDeviceProp prop;
    CU_TRY(cudaGetDeviceProperties(&prop, cb->device), "reading the device's properties");
    snprintf(cb->desc, sizeof cb->desc, "cuda, device %d (%s, %.0f GiB)", cb->device, prop.name,
             (double)prop.totalGlobalMem / (1 << 30));
    cb->base.desc = cb->desc;
    if (kvc_cu_layout_init(&cb->L, cb->pool, err, errlen) != KVC_OK)
        return -1;
    cb->layout_ready = true;
    cb->q_dim = c->n_head * c->head_dim;
    cb->kv_dim = c->n_kv_head * c->head_dim;
    cb->qkv_dim = cb->q_dim + 2 * cb->kv_dim;
    cb->n_rep = c->n_head / c->n_kv_head;
    CU_TRY(cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking), "creating a stream");
    if (cublasCreate(&cb->blas) != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, errlen, "cuda backend: cuBLAS did not start");
        return -1;
    }
    BLAS_TRY(cublasSetStream(cb->blas, cb->stream), "cublasSetStream");
    /* cuBLAS's own workspace, so that graph capture never allocates */
    CU_TRY(cudaMalloc(&cb->blas_ws, BLAS_WS), "cuBLAS workspace");
    BLAS_TRY(cublasSetWorkspace(cb->blas, cb->blas_ws, BLAS_WS), "cublasSetWorkspace");
    const char *gr = getenv("KVSERVE_CUDA_GRAPHS");
    cb->graphs_on = !gr || strcmp(gr, "0");
    /* rows as records where the sampler needs no more (cands.cuh);
     * KVSERVE_CUDA_CANDS=0: whole rows always */
    const char *ca = getenv("KVSERVE_CUDA_CANDS");
    if (ca && *ca && strcmp(ca, "0") && strcmp(ca, "1")) {
        snprintf(err, errlen, "cuda backend: KVSERVE_CUDA_CANDS=%s: not 0 or 1", ca);
        return -1;
    }
    cb->base.cands_max = ca && !strcmp(ca, "0") ? 0 : eng_cands_fit(c->n_vocab);
    cb->base.cands_draw = cb->base.cands_max > 0;
    cb->base.cands_penalties = cb->base.cands_max > 0;
    if (cb->base.cands_max) {
        const size_t n = strlen(cb->desc);
        snprintf(cb->desc + n, sizeof cb->desc - n, ", sampling on the GPU");
    }
    const char *st = getenv("KVSERVE_CUDA_STATS");
    cb->stats = st && *st && strcmp(st, "0");
    for (int i = 0; cb->stats && i < 3; i++)
        CU_TRY(cudaEventCreate(&cb->ev[i]), "creating an event");

    /* the KV arena: the pool's pages, zero-filled (kvc_cuda.h) */
    cb->page_bytes = kvc_page_bytes(cb->pool);
    const size_t arena = cb->page_bytes * (size_t)kvc_pages_total(cb->pool);
    cudaError_t e = cudaMalloc(&cb->arena, arena);
    if (e != cudaSuccess) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        snprintf(err, errlen, "cuda backend: KV arena of %zu MiB: %s (%zu MiB free of %zu): lower kv_memory",
                 arena >> 20,
                 cudaGetErrorString(e), free_b >> 20, total_b >> 20);
        return -1;
    }
    CU_TRY(cudaMemset(cb->arena, 0, arena), "zeroing the KV arena");
    kvc_pool_set_page_copier(cb->pool, copy_page, cb);

    /* weights */
    cb->layers = (dlayer *)calloc((size_t)c->n_layer, sizeof(dlayer));
    if (!cb->layers) {
        snprintf(err, errlen, "cuda backend: out of memory");
        return -1;
    }
    for (int l = 0; l < c->n_layer; l++) {
        const eng_layer *s = &m->layers[l];
        dlayer *L = &cb->layers[l];
        if (upload_matrix(&s->wqkv, s->wqkv.ne[1], &L->wqkv, err, errlen) ||
            upload_matrix(&s->wo, s->wo.ne[1], &L->wo, err, errlen) ||
            upload_matrix(&s->w_gate_up, s->w_gate_up.ne[1], &L->w_gate_up, err, errlen) ||
            upload_matrix(&s->w_down, s->w_down.ne[1], &L->w_down, err, errlen) ||
            upload_vector(&s->bqkv, &L->bqkv, err, errlen) || upload_vector(&s->bo, &L->bo, err, errlen) ||
            upload_vector(&s->b_down, &L->b_down, err, errlen) ||
            upload_vector(&s->attn_norm, &L->attn_norm, err, errlen) ||
            upload_vector(&s->ffn_norm, &L->ffn_norm, err, errlen))
            return -1;
    }
    if (upload_matrix(&m->tok_embd, c->n_vocab, &cb->tok_embd, err, errlen) ||
        upload_vector(&m->out_norm, &cb->out_norm, err, errlen))
        return -1;
    if (m->output.data == m->tok_embd.data)
        cb->output = cb->tok_embd;
    else if (upload_matrix(&m->output, c->n_vocab, &cb->output, err, errlen))
        return -1;
    if (c->rope_dim > 0) {
        float *f = (float *)malloc(sizeof(float) * (size_t)(c->rope_dim / 2 + 1));
        if (!f) {
            snprintf(err, errlen, "cuda backend: out of memory");
            return -1;
        }
        eng_rope_inv_freq(c, f);
        e = cudaMalloc(&cb->inv_freq, sizeof(float) * (size_t)(c->rope_dim / 2 + 1));
        if (e == cudaSuccess)
            e = cudaMemcpy(cb->inv_freq, f, sizeof(float) * (size_t)(c->rope_dim / 2), cudaMemcpyHostToDevice);
        free(f);
        CU_TRY(e, "uploading the RoPE frequencies");
    }
    if (rows_setup(cb, err, errlen))
        return -1;
    return 0;
}

extern "C" eng_backend *eng_backend_cuda_create(const eng_model *m, kvc_pool *pool, const eng_backend_options *opt,
                                                char *err, size_t errlen) {
    cuda_backend *cb = (cuda_backend *)calloc(1, sizeof *cb);
    if (!cb) {
        snprintf(err, errlen, "cuda backend: out of memory");
        return NULL;
    }
    cb->base.name = "cuda";
    cb->base.forward = cuda_forward;
    cb->base.destroy = cuda_destroy;
    cb->base.alloc_host = cuda_alloc_host;
    cb->base.free_host = cuda_free_host;
    cb->m = m;
    cb->pool = pool;
    if (create_impl(cb, opt, err, errlen)) {
        cuda_destroy(&cb->base);
        return NULL;
    }
    return &cb->base;
}
