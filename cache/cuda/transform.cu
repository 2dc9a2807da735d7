/* transform.cu: the two ends of attention over low-rank pages (lowrank,
 * latent, hybrid codecs): each query row projected once onto its kv head's
 * slice of the K basis (q' = P_h^T q) before the kernels score the stored
 * coefficients, and each output row expanded once through the V basis
 * (out = mean_h + P_h c) after they sum the weighted V coefficients. The
 * K mean is left out: it adds q . mean to every score of a row and cancels
 * in the softmax (codec.h).
 *
 * Both are small matrix products per kv head h, [rows x head_dim] by the
 * head's basis slice [head_dim x R] (and back), in fp32 on CUDA cores (the
 * decode path is fp32-exact; tensor cores would round the operands). A
 * thread block takes MT = 32 query rows of one kv head (n_rep heads of
 * consecutive sequences) and first copies the head's basis slice (up to 64
 * KB: a Llama latent of 128) and its rows into shared memory, every load
 * issued before any is used: one trip to L2, where the small bases stay.
 * With few rows (the slices' reads per (sequence, kv head) under 32 MB) a
 * block per (sequence, kv head) streams the slice from L2 instead: more,
 * shorter blocks (measured faster there, session 4). Thread
 * (column, part) keeps 32 sums over its part of the reduction, reading the
 * rows four numbers at a time (the same address across the warp: a
 * broadcast); the parts are added in shared memory. */
#include <type_traits>

#include "cache/cuda/common.cuh"

namespace {

constexpr int TT = 256;          /* threads a block */
constexpr int MT = 32;           /* query rows a block */

__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }

/* Dynamic shared memory of both kernels (floats): the basis slice (D x R),
 * the block's rows (MT x max(D, R)), the parts' sums (TT / n x MT x n, n
 * the output width): TT x MT either way. */
template <int D, int R> constexpr size_t smem_floats() { return (size_t)D * R + (size_t)MT * cmax(D, R) + (size_t)TT * MT; }

/* The block's products, MT rows by a staged matrix: s_sum[part][m][o] =
 * sum over the part's SPAN inputs k of s_p[k][o] s_x[m][k], thread (o, part)
 * = (tid % OUT, tid / OUT) (s_p (IN, OUT), s_x (MT, IN), s_sum (TT / OUT,
 * MT, OUT); the caller adds the parts). */
template <int IN, int OUT> __device__ __forceinline__ void tile_products(const float *s_p, const float *s_x, float *s_sum, int tid) {
    constexpr int PARTS = TT / OUT, SPAN = IN / PARTS;
    const int o = tid % OUT, part = tid / OUT;
    float acc[MT];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m] = 0.0f;
#pragma unroll 2
    for (int k = part * SPAN; k < part * SPAN + SPAN; k += 4) {
        const float p0 = s_p[k * OUT + o], p1 = s_p[(k + 1) * OUT + o], p2 = s_p[(k + 2) * OUT + o],
                    p3 = s_p[(k + 3) * OUT + o];
#pragma unroll
        for (int m = 0; m < MT; m++) {
            const float4 x = *reinterpret_cast<const float4 *>(s_x + m * IN + k);
            acc[m] = fmaf(p3, x.w, fmaf(p2, x.z, fmaf(p1, x.y, fmaf(p0, x.x, acc[m]))));
        }
    }
#pragma unroll
    for (int m = 0; m < MT; m++) s_sum[(part * MT + m) * OUT + o] = acc[m];
}

/* Block (tile, kv head h): rows i = tile * MT + m of head h (i = seq * n_rep + g):
 * qp[seq][h n_rep + g][r] = sum_d P_h[d][r] q[seq][h n_rep + g][d]. */
template <int D, int R>
__global__ void __launch_bounds__(TT) project_kernel(kvc__cu_basis b, int n_seqs, int n_rep, const float *__restrict__ q,
                                                     int64_t q_stride, float *__restrict__ qp) {
    constexpr int PARTS = TT / R;
    extern __shared__ __align__(16) float smem[];
    float *s_p = smem, *s_x = smem + D * R, *s_sum = s_x + MT * D;   /* (D, R), (MT, D), (PARTS, MT, R) */
    const int h = blockIdx.y, H = gridDim.y, tid = threadIdx.x;
    const int64_t i0 = (int64_t)blockIdx.x * MT, total = (int64_t)n_seqs * n_rep;
    /* the slice and the rows, every load issued before any is used */
    const float4 *P4 = reinterpret_cast<const float4 *>(b.P + (b.latent ? (size_t)h * D * R : (size_t)h * b.in_dim * R));
#pragma unroll 4
    for (int e = tid; e < D * R / 4; e += TT) reinterpret_cast<float4 *>(s_p)[e] = __ldg(P4 + e);
    for (int e = tid; e < MT * D / 2; e += TT) {   /* float2: q_stride is only even */
        const int m = e / (D / 2), d2 = e % (D / 2);
        const int64_t i = i0 + m;
        float2 x = make_float2(0.0f, 0.0f);
        if (i < total)
            x = *reinterpret_cast<const float2 *>(q + (i / n_rep) * q_stride + (int64_t)(h * n_rep + i % n_rep) * D + 2 * d2);
        reinterpret_cast<float2 *>(s_x)[e] = x;
    }
    __syncthreads();
    tile_products<D, R>(s_p, s_x, s_sum, tid);
    __syncthreads();
    for (int e = tid; e < MT * R; e += TT) {
        const int m = e / R, k = e % R;
        const int64_t i = i0 + m;
        if (i >= total) break;
        float x = 0.0f;
#pragma unroll
        for (int pp = 0; pp < PARTS; pp++) x += s_sum[(pp * MT + m) * R + k];
        qp[(((i / n_rep) * H + h) * n_rep + i % n_rep) * R + k] = x;
    }
}

/* Block (tile, kv head h), rows as in project_kernel:
 * out[seq][h n_rep + g][d] = mu_h[d] + sum_r P_h[d][r] c[seq][h n_rep + g][r]
 * (zeros when the sequence has no positions). */
template <int D, int R>
__global__ void __launch_bounds__(TT) expand_kernel(kvc__cu_basis b, int n_seqs, int n_rep, const float *__restrict__ c,
                                                    const int32_t *__restrict__ ctx_lens, int ctx0,
                                                    float *__restrict__ out, int64_t out_stride) {
    constexpr int PARTS = TT / D;
    extern __shared__ __align__(16) float smem[];
    float *s_p = smem, *s_x = smem + D * R, *s_sum = s_x + MT * R;   /* Pt (R, D), (MT, R), (PARTS, MT, D) */
    const int h = blockIdx.y, H = gridDim.y, tid = threadIdx.x;
    const int64_t i0 = (int64_t)blockIdx.x * MT, total = (int64_t)n_seqs * n_rep;
    const size_t row0 = b.latent ? (size_t)h * D : 0, grp = b.latent ? 0 : (size_t)h;
    /* Pt rows r, columns row0 .. row0 + D (16-byte aligned: D and in_dim are multiples of 64) */
    const float *Pt = b.Pt + grp * (size_t)R * b.in_dim + row0;
#pragma unroll 4
    for (int e = tid; e < R * D / 4; e += TT) {
        const int k = e / (D / 4), d4 = e % (D / 4);
        reinterpret_cast<float4 *>(s_p)[e] = __ldg(reinterpret_cast<const float4 *>(Pt + (size_t)k * b.in_dim) + d4);
    }
    for (int e = tid; e < MT * R / 4; e += TT) {
        const int m = e / (R / 4), k4 = e % (R / 4);
        const int64_t i = i0 + m;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (i < total)
            x = *reinterpret_cast<const float4 *>(c + (((i / n_rep) * H + h) * n_rep + i % n_rep) * R + 4 * k4);
        reinterpret_cast<float4 *>(s_x)[e] = x;
    }
    __syncthreads();
    tile_products<R, D>(s_p, s_x, s_sum, tid);
    __syncthreads();
    const float *mu = b.mu + grp * (size_t)b.in_dim + row0;
    for (int e = tid; e < MT * D; e += TT) {
        const int m = e / D, k = e % D;
        const int64_t i = i0 + m;
        if (i >= total) break;
        const int64_t seq = i / n_rep;
        const int ctx = ctx_lens ? ctx_lens[seq] : ctx0 + (int)seq;
        float x = mu[k];
#pragma unroll
        for (int pp = 0; pp < PARTS; pp++) x += s_sum[(pp * MT + m) * D + k];
        out[seq * out_stride + (int64_t)(h * n_rep + i % n_rep) * D + k] = ctx > 0 ? x : 0.0f;
    }
}

/* The per-sequence kernels' products: s_sum[part][g][o] = sum over the
 * part's SPAN inputs k of P[k][o] s_x[g][k] for the G8 rows, the matrix read
 * from L2 down column o (pcol: its first input of the part, pstride floats
 * between inputs); thread (o, part) = (tid % OUT, tid / OUT). */
constexpr int G8 = 8;            /* rows of a per-sequence block (n_rep <= 8) */
template <int IN, int OUT>
__device__ __forceinline__ void seq_products(const float *pcol, size_t pstride, const float (*s_x)[IN],
                                             float (*s_sum)[G8][OUT], int tid) {
    constexpr int PARTS = TT / OUT, SPAN = IN / PARTS;
    const int o = tid % OUT, part = tid / OUT;
    float acc[G8];
#pragma unroll
    for (int g = 0; g < G8; g++) acc[g] = 0.0f;
#pragma unroll 8
    for (int k = 0; k < SPAN; k++) {
        const float pv = __ldg(pcol + (size_t)k * pstride);
#pragma unroll
        for (int g = 0; g < G8; g++) acc[g] = fmaf(pv, s_x[g][part * SPAN + k], acc[g]);
    }
#pragma unroll
    for (int g = 0; g < G8; g++) s_sum[part][g][o] = acc[g];
}

/* Few rows: a block per (sequence, kv head h) for its n_rep query heads,
 * the slice read from L2 as the products go (no staging: more blocks, each
 * a shorter chain). Coefficient r (output d) is shared by TT / R (TT / D)
 * threads, each summing a part, added in shared memory. */
template <int D, int R>
__global__ void __launch_bounds__(TT) project_seq_kernel(kvc__cu_basis b, int n_rep, const float *__restrict__ q,
                                                         int64_t q_stride, float *__restrict__ qp) {
    constexpr int PARTS = TT / R, SPAN = D / PARTS;
    __shared__ float s_q[G8][D];
    __shared__ float s_sum[PARTS][G8][R];
    const int seq = blockIdx.x, h = blockIdx.y, H = gridDim.y, tid = threadIdx.x;
    const float *qs = q + (int64_t)seq * q_stride + (int64_t)h * n_rep * D;
    for (int e = tid; e < G8 * D; e += TT) s_q[e / D][e % D] = e < n_rep * D ? qs[e] : 0.0f;
    __syncthreads();
    const int r = tid % R, part = tid / R;
    const float *P = b.P + (b.latent ? (size_t)h * D * R : (size_t)h * b.in_dim * R) + (size_t)part * SPAN * R + r;
    seq_products<D, R>(P, R, s_q, s_sum, tid);
    __syncthreads();
    float *dst = qp + ((int64_t)seq * H + h) * n_rep * R;
    for (int e = tid; e < n_rep * R; e += TT) {
        float x = 0.0f;
#pragma unroll
        for (int pp = 0; pp < PARTS; pp++) x += s_sum[pp][e / R][e % R];
        dst[e] = x;
    }
}

template <int D, int R>
__global__ void __launch_bounds__(TT) expand_seq_kernel(kvc__cu_basis b, int n_rep, const float *__restrict__ c,
                                                        const int32_t *__restrict__ ctx_lens, int ctx0,
                                                        float *__restrict__ out, int64_t out_stride) {
    constexpr int PARTS = TT / D, SPAN = R / PARTS;
    __shared__ float s_c[G8][R];
    __shared__ float s_sum[PARTS][G8][D];
    const int seq = blockIdx.x, h = blockIdx.y, H = gridDim.y, tid = threadIdx.x;
    const float *src = c + ((int64_t)seq * H + h) * n_rep * R;
    for (int e = tid; e < G8 * R; e += TT) s_c[e / R][e % R] = e < n_rep * R ? src[e] : 0.0f;
    __syncthreads();
    const int d = tid % D, part = tid / D;
    const size_t row0 = b.latent ? (size_t)h * D : 0, grp = b.latent ? 0 : (size_t)h;
    const float *Pt = b.Pt + grp * (size_t)R * b.in_dim + (size_t)part * SPAN * b.in_dim + row0 + d;
    seq_products<R, D>(Pt, b.in_dim, s_c, s_sum, tid);
    __syncthreads();
    const int ctx = ctx_lens ? ctx_lens[seq] : ctx0 + seq;
    const float *mu = b.mu + grp * (size_t)b.in_dim + row0;
    float *o = out + (int64_t)seq * out_stride + (int64_t)h * n_rep * D;
    for (int e = tid; e < n_rep * D; e += TT) {
        float x = mu[e % D];
#pragma unroll
        for (int pp = 0; pp < PARTS; pp++) x += s_sum[pp][e / D][e % D];
        o[e] = ctx > 0 ? x : 0.0f;
    }
}

/* The per-sequence kernels while their L2 reads of the slices (a slice per
 * (sequence, kv head)) stay under 32 MB, the tiled ones past that (measured,
 * session 4: per sequence faster for SmolLM2 at every batch and Llama-8B at
 * 64 x 2k, tiles faster for Llama-8B at 256 x 512). */
bool per_sequence(int n_seqs, int H, int D, int R) { return (double)n_seqs * H * D * R * 4 <= 32e6; }

/* Raises the dynamic shared memory limit of the (D, R) instance of both
 * kernels once; false on failure. */
template <int D, int R> bool smem_limit() {
    static bool done = false;
    if (!done) {
        const int bytes = (int)(sizeof(float) * smem_floats<D, R>());
        done = cudaFuncSetAttribute(project_kernel<D, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) ==
                   cudaSuccess &&
               cudaFuncSetAttribute(expand_kernel<D, R>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) ==
                   cudaSuccess;
    }
    return done;
}

/* Calls f(D, R) as integral constants (head_dim 64 / 128, rank 32 / 64 / 128). */
template <typename F> int with_sizes(int D, int R, F &&f) {
    auto by_r = [&](auto d) -> int {
        if (R == 32) return f(d, std::integral_constant<int, 32>());
        if (R == 64) return f(d, std::integral_constant<int, 64>());
        if (R == 128) return f(d, std::integral_constant<int, 128>());
        return KVC_ERR_INVAL;
    };
    if (D == 64) return by_r(std::integral_constant<int, 64>());
    if (D == 128) return by_r(std::integral_constant<int, 128>());
    return KVC_ERR_INVAL;
}

} // namespace

int kvc__cu_project(const kvc_cu_layout *L, int layer, int n_rows, int n_rep, const float *q, int64_t q_stride,
                    float *qp, cudaStream_t stream, char *err, size_t errlen) {
    const kvc__cu_basis b = kvc__cu_basis_of(L, layer, 0);
    const dim3 grid((unsigned)(((int64_t)n_rows * n_rep + MT - 1) / MT), (unsigned)L->n_kv_head);
    const int rc = with_sizes(L->head_dim, b.R, [&](auto d, auto r) {
        constexpr int D_ = decltype(d)::value, R_ = decltype(r)::value;
        if (per_sequence(n_rows, L->n_kv_head, D_, R_)) {
            project_seq_kernel<D_, R_><<<dim3((unsigned)n_rows, (unsigned)L->n_kv_head), TT, 0, stream>>>(
                b, n_rep, q, q_stride, qp);
            return KVC_OK;
        }
        const size_t smem = sizeof(float) * smem_floats<D_, R_>();
        if (!smem_limit<D_, R_>()) return KVC_ERR_NOMEM;
        project_kernel<D_, R_><<<grid, TT, smem, stream>>>(b, n_rows, n_rep, q, q_stride, qp);
        return KVC_OK;
    });
    if (rc) KVC__CU_FAIL(rc, "kvc_cuda: project: head_dim %d, K rank %d: not compiled or no shared memory", L->head_dim, b.R);
    KVC__CU_TRY(cudaGetLastError());
    return KVC_OK;
}

int kvc__cu_expand(const kvc_cu_layout *L, int layer, int n_rows, int n_rep, const float *c,
                   const int32_t *ctx_lens, int ctx0, float *out, int64_t out_stride, cudaStream_t stream, char *err,
                   size_t errlen) {
    const kvc__cu_basis b = kvc__cu_basis_of(L, layer, 1);
    const dim3 grid((unsigned)(((int64_t)n_rows * n_rep + MT - 1) / MT), (unsigned)L->n_kv_head);
    const int rc = with_sizes(L->head_dim, b.R, [&](auto d, auto r) {
        constexpr int D_ = decltype(d)::value, R_ = decltype(r)::value;
        if (per_sequence(n_rows, L->n_kv_head, D_, R_)) {
            expand_seq_kernel<D_, R_><<<dim3((unsigned)n_rows, (unsigned)L->n_kv_head), TT, 0, stream>>>(
                b, n_rep, c, ctx_lens, ctx0, out, out_stride);
            return KVC_OK;
        }
        const size_t smem = sizeof(float) * smem_floats<D_, R_>();
        if (!smem_limit<D_, R_>()) return KVC_ERR_NOMEM;
        expand_kernel<D_, R_><<<grid, TT, smem, stream>>>(b, n_rows, n_rep, c, ctx_lens, ctx0, out, out_stride);
        return KVC_OK;
    });
    if (rc) KVC__CU_FAIL(rc, "kvc_cuda: expand: head_dim %d, V rank %d: not compiled or no shared memory", L->head_dim, b.R);
    KVC__CU_TRY(cudaGetLastError());
    return KVC_OK;
}
