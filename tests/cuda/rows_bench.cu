/* rows_bench.cu: a layer's four products by engine/cuda/rows.cu against
 * cuBLAS's GEMMs alone (without the norm, RoPE, SwiGLU and conversion
 * kernels the cuBLAS path also launches), on the H200.
 *
 *   rows_bench [--shape smollm2|qwen05b|llama1b|llama8b] [--rows T,T,...]
 *
 * Per model shape and T: microseconds a layer (QKV, O, gate/up, down), the
 * launches of one pass over enough copies of the weights that L2 holds none
 * of them (>= 400 MB), median of 20 passes, each timed between events. */
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "engine/cuda/rows.cuh"
#include "tests/cuda/check.cuh"

struct model {
    const char *name;
    int hidden, heads, kv_heads, head_dim, ffn;
};

static const model MODELS[] = {
    {"smollm2", 576, 9, 3, 64, 1536},
    {"qwen05b", 896, 14, 2, 64, 4864},
    {"llama1b", 2048, 32, 8, 64, 8192},
    {"llama8b", 4096, 32, 8, 128, 14336},
};

static void *dalloc(size_t bytes) {
    void *p = NULL;
    CK(cudaMalloc(&p, bytes));
    CK(cudaMemset(p, 0, bytes));
    return p;
}

static void bench(const model &m, int T, cublasHandle_t blas) {
    const int qkv = (m.heads + 2 * m.kv_heads) * m.head_dim, q_dim = m.heads * m.head_dim;
    const int rows[4] = {qkv, m.hidden, 2 * m.ffn, m.hidden}, cols[4] = {m.hidden, q_dim, m.hidden, m.ffn};
    size_t layer = 0;
    for (int i = 0; i < 4; i++) layer += (size_t)rows[i] * cols[i] * sizeof(__half);
    const int copies = (int)std::max<size_t>(2, ((size_t)400 << 20) / layer + 1);
    std::vector<__half *> w(4 * copies);
    for (int c = 0; c < copies; c++)
        for (int i = 0; i < 4; i++) {
            std::vector<__half> h((size_t)rows[i] * cols[i]);
            for (size_t k = 0; k < h.size(); k++)
                h[k] = __float2half_rn((float)((k * 2654435761u) % 1000) * 1e-5f - 5e-3f);
            w[4 * c + i] = (__half *)dalloc(h.size() * sizeof(__half));
            CK(cudaMemcpy(w[4 * c + i], h.data(), h.size() * sizeof(__half), cudaMemcpyHostToDevice));
        }
    const size_t wide = (size_t)std::max(std::max(m.hidden, q_dim), 2 * m.ffn);
    float *xf = (float *)dalloc((size_t)T * wide * sizeof(float));
    float *y = (float *)dalloc((size_t)T * wide * sizeof(float));
    __half *xh = (__half *)dalloc((size_t)T * wide * sizeof(__half));
    __half *yh = (__half *)dalloc((size_t)T * wide * sizeof(__half));
    float *nw = (float *)dalloc(wide * sizeof(float)), *inv = (float *)dalloc(m.head_dim * sizeof(float));
    int32_t *pos = (int32_t *)dalloc(T * sizeof(int32_t));
    eng_rows_args a[4];
    size_t ws_max = 0, cnt_max = 0;
    for (int i = 0; i < 4; i++) {
        eng_rows_args r = {};
        r.epi = i == 0 ? ENG_ROWS_QKV : i == 2 ? ENG_ROWS_SWIGLU : ENG_ROWS_ADD;
        r.rows = rows[i];
        r.cols = cols[i];
        r.x = i == 3 ? (const void *)xh : (const void *)xf;
        r.x_f32 = i != 3;
        r.x_stride = cols[i];
        r.T = T;
        r.norm = i == 0 || i == 2 ? nw : NULL;
        r.eps = 1e-5f;
        r.y = y;
        r.yh = yh;
        r.y_stride = i == 2 ? m.ffn : rows[i];
        r.pos = pos;
        r.inv_freq = i == 0 ? inv : NULL;
        r.n_rot_heads = m.heads + m.kv_heads;
        r.head_dim = m.head_dim;
        r.rope_dim = m.head_dim;
        size_t wf, nc;
        eng_rows_ws_size(&r, &wf, &nc);
        ws_max = std::max(ws_max, wf);
        cnt_max = std::max(cnt_max, nc);
        a[i] = r;
    }
    float *ws = ws_max ? (float *)dalloc(ws_max * sizeof(float)) : NULL;
    int *counters = cnt_max ? (int *)dalloc(cnt_max * sizeof(int)) : NULL;
    for (int i = 0; i < 4; i++) {
        a[i].ws = ws;
        a[i].counters = counters;
    }
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    if (cublasSetStream(blas, st) != CUBLAS_STATUS_SUCCESS) exit(1);
    auto pass = [&](bool fused) {
        for (int c = 0; c < copies; c++)
            for (int i = 0; i < 4; i++) {
                if (fused) {
                    eng_rows_args r = a[i];
                    r.w = w[4 * c + i];
                    CK(eng_rows_launch(&r, st));
                } else {
                    const float one = 1.0f, zero = 0.0f;
                    const cublasStatus_t bs =
                        cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, rows[i], T, cols[i], &one, w[4 * c + i],
                                     CUDA_R_16F, cols[i], xh, CUDA_R_16F, cols[i], i == 1 || i == 3 ? &one : &zero, y,
                                     CUDA_R_32F, rows[i], CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
                    if (bs != CUBLAS_STATUS_SUCCESS) {
                        fprintf(stderr, "rows_bench: cuBLAS failed\n");
                        exit(1);
                    }
                }
            }
    };
    double med[2];
    for (int f = 0; f < 2; f++) {   /* a pass to warm up, then the median of 20 */
        std::vector<double> ts = event_times_us(st, 21, 1, [&](int) { pass(f); });
        std::sort(ts.begin(), ts.end());
        med[f] = ts[ts.size() / 2] / copies;
    }
    int sl[4];
    for (int i = 0; i < 4; i++) {
        size_t wf, nc;
        eng_rows_ws_size(&a[i], &wf, &nc);
        sl[i] = wf ? (int)(wf / nc) : 0;
    }
    printf("%-8s T %2d: layer %7.1f MB, cuBLAS GEMMs %8.2f us (%5.0f GB/s), fused %8.2f us (%5.0f GB/s), x %.2f%s\n",
           m.name, T, layer / 1e6, med[0], layer / med[0] / 1e3, med[1], layer / med[1] / 1e3, med[1] / med[0],
           sl[0] || sl[1] || sl[2] || sl[3] ? " (column slices)" : "");
    for (void *p : w) cudaFree(p);
    void *bufs[] = {xf, y, xh, yh, nw, inv, pos, ws, counters};
    for (void *p : bufs) cudaFree(p);
    cudaStreamDestroy(st);
}

int main(int argc, char **argv) {
    const char *only = NULL;
    std::vector<int> Ts = {1, 8, 16};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--shape") && i + 1 < argc) {
            only = argv[++i];
        } else if (!strcmp(argv[i], "--rows") && i + 1 < argc) {
            Ts.clear();
            for (char *p = strtok(argv[++i], ","); p; p = strtok(NULL, ",")) Ts.push_back(atoi(p));
        } else {
            fprintf(stderr, "usage: rows_bench [--shape smollm2|qwen05b|llama1b|llama8b] [--rows T,T,...]\n");
            return 2;
        }
    }
    cublasHandle_t blas;
    if (cublasCreate(&blas) != CUBLAS_STATUS_SUCCESS) {
        fprintf(stderr, "rows_bench: cuBLAS did not start\n");
        return 1;
    }
    for (const model &m : MODELS)
        if (!only || !strcmp(only, m.name))
            for (int T : Ts) bench(m, T, blas);
    cublasDestroy(blas);
    return 0;
}
