/* rows.cu: matrix products for few activation rows (rows.cuh).
 *
 * cuBLAS makes a decode step of a small model a chain of launches that each
 * move little: per layer the QKV GEMM, bias and RoPE, the attention
 * output's conversion to fp16, the O GEMM (and its bias), the gate/up GEMM,
 * SwiGLU, the down GEMM. Here each product is one launch with what follows
 * it done on its outputs in registers (and the RMSNorm before it on its
 * inputs), so a layer is four products and the cache's write and decode.
 *
 * A block takes 16 output rows (SWIGLU: 16 gate rows and their 16 up rows)
 * and its ONE_KW warps split the columns, 32 at a time, reading W once; the
 * partial sums meet in shared memory and warp 0 finishes them. Products on
 * tensor cores (mma.sync m16n8k16, fp16 operands, fp32 sums, as cuBLAS's):
 * W's rows are the A operand, the activation rows the B operand in n-tiles
 * of 8 (NT of them: T rounded up). Each lane reads 16 bytes of a W row and
 * 16 of an activation row at the same columns; the mma's reduction order is
 * a permutation of the columns, the same for both operands:
 *   lane (g, t), chunk columns 8t .. 8t + 7 -> k-step 0 k = 2t, 2t+1, 2t+8,
 *   2t+9 (columns 8t .. 8t+3), k-step 1 the same (columns 8t+4 .. 8t+7).
 * RoPE (QKV) rotates pairs of rows: a block of a rotated head takes 8 pairs,
 * rows i and i + head_dim / 2 in one lane's two rows (neox) or rows 2i and
 * 2i + 1 in lanes g and g ^ 1 (interleaved).
 *
 * Each warp loads its whole share of W at once, before waiting for the
 * kernel before it, so a block is one round trip of loads: what a small
 * matrix's time is. Rows longer than a block's share are split into column
 * slices (grid z, blocks of SLICE_KW warps), whose sums meet in a
 * workspace (merge_slices). Large matrices still stream faster through
 * cuBLAS (forward.cu's rows_setup; notes/gpu.md, session 21). */
#include <math.h>

#include "engine/cuda/rows.cuh"

namespace {

/* Activation rows a block takes: 8 NT (NT n-tiles of 8; grid y: groups of
 * them, each reading W again, from L2 after the first). Warps a block split
 * the columns: ONE_KW, so a product of <= ONE_KW U chunks of 32 columns is
 * one round trip of loads (U chunks in flight a warp: as many as 128
 * registers hold without spilling). */
constexpr int ONE_KW = 16;
constexpr int SLICE_KW = 8;      /* warps a block of a sliced product (more blocks a multiprocessor) */
template <int NT, int NA, bool F32> __host__ __device__ constexpr int chunks_in_flight() {
    return NA == 2 || (NT == 2 && F32) ? 2 : 4;
}

/* (NT n-tiles) */
template <int NT> __device__ __forceinline__ void zero(float (&c)[NT][4]) {
#pragma unroll
    for (int j = 0; j < NT; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.0f;
}

__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&h);
}

/* 8 float activations (x * s * nw with a norm) as fp16 pairs */
__device__ __forceinline__ uint4 to_b(const float4 (&x)[2], const float *nw, int col, float s) {
    float4 u = x[0], v = x[1];
    if (nw) {
        const float4 a = __ldg(reinterpret_cast<const float4 *>(nw + col)),
                     b = __ldg(reinterpret_cast<const float4 *>(nw + col) + 1);
        u = make_float4(u.x * s * a.x, u.y * s * a.y, u.z * s * a.z, u.w * s * a.w);
        v = make_float4(v.x * s * b.x, v.y * s * b.y, v.z * s * b.z, v.w * s * b.w);
    }
    return make_uint4(half2_bits(u.x, u.y), half2_bits(u.z, u.w), half2_bits(v.x, v.y), half2_bits(v.z, v.w));
}

__device__ __forceinline__ void load8(const float *p, float4 (&x)[2]) {
    x[0] = __ldg(reinterpret_cast<const float4 *>(p));
    x[1] = __ldg(reinterpret_cast<const float4 *>(p) + 1);
}

__device__ __forceinline__ float sumsq(const float4 (&x)[2]) {
    return x[0].x * x[0].x + x[0].y * x[0].y + x[0].z * x[0].z + x[0].w * x[0].w + x[1].x * x[1].x +
           x[1].y * x[1].y + x[1].z * x[1].z + x[1].w * x[1].w;
}

/* Output row of this block's tile row r (0..15). */
__device__ __forceinline__ int tile_row(const eng_rows_args &a, int r) {
    const int base = 16 * blockIdx.x;
    if (a.epi == ENG_ROWS_QKV && a.inv_freq && a.neox) {
        const int D = a.head_dim, h = base / D, q = base % D / 16;
        if (h < a.n_rot_heads) return h * D + 8 * q + (r & 7) + (r >= 8 ? D / 2 : 0);
    }
    return base + r;
}

/* The RoPE angle's cos and sin at position p, pair i (as qkv_post_kernel). */
__device__ __forceinline__ void rope_cs(const eng_rows_args &a, int p, int i, float &c, float &s) {
    double sd, cd;
    sincos((double)p * (double)a.inv_freq[i], &sd, &cd);
    c = (float)cd;
    s = (float)sd;
}

/* Column slices (grid z > 1): each block's warp 0 stores its sums (and with
 * a norm its slice's sums of squares of its tokens, ss) as a record of
 * ws, the tile's counter elects the last to arrive, and that block adds the
 * records in slice order (the same sums whichever arrives last), scales
 * them by the norm's 1 / rms and goes on to the epilogue; the others stop
 * (false). The winner resets the counter for the next launch. */
constexpr int REC = 2 * 2 * 4 * 32 + 16;   /* floats a record: NA NT 4 32 sums, 16 sums of squares */

template <int NT, int NA>
__device__ __forceinline__ bool merge_slices(const eng_rows_args &a, float (&c)[NA][NT][4], const float *ss) {
    const int lane = threadIdx.x & 31, t = lane & 3;
    const int S = gridDim.z, unit = blockIdx.y * gridDim.x + blockIdx.x;
    float *rec = a.ws + ((size_t)unit * S + blockIdx.z) * REC;
#pragma unroll
    for (int m = 0; m < NA; m++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) rec[((m * NT + j) * 4 + e) * 32 + lane] = c[m][j][e];
    if (ss && lane < 8 * NT) rec[4 * NA * NT * 32 + lane] = ss[lane];
    __threadfence();
    __syncwarp();
    int last = 0;
    if (lane == 0) last = atomicAdd(a.counters + unit, 1) == S - 1;
    if (!__shfl_sync(0xffffffffu, last, 0)) return false;
    __threadfence();
    if (lane == 0) a.counters[unit] = 0;
    float sq[NT];
#pragma unroll
    for (int j = 0; j < NT; j++) sq[j] = 0.0f;
#pragma unroll
    for (int m = 0; m < NA; m++) zero(c[m]);
    for (int z = 0; z < S; z++) {
        const float *r = a.ws + ((size_t)unit * S + z) * REC;
#pragma unroll
        for (int m = 0; m < NA; m++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) c[m][j][e] += __ldcg(r + ((m * NT + j) * 4 + e) * 32 + lane);
        if (ss)
#pragma unroll
            for (int j = 0; j < NT; j++) sq[j] += __ldcg(r + 4 * NA * NT * 32 + 8 * j + 2 * t);   /* tokens 8j + 2t */
    }
    if (ss) {   /* c's tokens 8j + 2t + (e & 1): their 1 / rms */
#pragma unroll
        for (int j = 0; j < NT; j++) {
            float sq1 = 0.0f;
            for (int z = 0; z < S; z++)
                sq1 += __ldcg(a.ws + ((size_t)unit * S + z) * REC + 4 * NA * NT * 32 + 8 * j + 2 * t + 1);
            const float i0 = 1.0f / sqrtf(sq[j] / a.cols + a.eps), i1 = 1.0f / sqrtf(sq1 / a.cols + a.eps);
#pragma unroll
            for (int m = 0; m < NA; m++) {
                c[m][j][0] *= i0, c[m][j][2] *= i0;
                c[m][j][1] *= i1, c[m][j][3] *= i1;
            }
        }
    }
    return true;
}

/* The end of a product: the KW warps' partial sums c (this block's tile
 * rows, tokens tb .. tb + n_tok - 1) meet in red ((KW - 1) NA NT 4 32
 * floats of shared memory) and warp 0 applies the epilogue and stores. */
template <int KW, int NT, int NA>
__device__ __forceinline__ void finish(const eng_rows_args &a, float (&c)[NA][NT][4], float *red_, const float *ss,
                                       int tb, int n_tok) {
    typedef float red_t[NA][NT][4][32];
    red_t *red = reinterpret_cast<red_t *>(red_);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int r_lo = tile_row(a, g), r_hi = tile_row(a, g + 8);
    /* the warps' partial sums into warp 0 */
    if (warp) {
#pragma unroll
        for (int m = 0; m < NA; m++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) red[warp - 1][m][j][e][lane] = c[m][j][e];
    }
    __syncthreads();
    if (warp) return;
#pragma unroll
    for (int k = 0; k < KW - 1; k++)
#pragma unroll
        for (int m = 0; m < NA; m++)
#pragma unroll
            for (int j = 0; j < NT; j++)
#pragma unroll
                for (int e = 0; e < 4; e++) c[m][j][e] += red[k][m][j][e][lane];

    if (gridDim.z > 1 && !merge_slices<NT, NA>(a, c, ss)) return;

    /* c[m][j][e]: row (e < 2 ? r_lo : r_hi), token tb + 8j + 2t + (e & 1) */
    const bool rot = a.epi == ENG_ROWS_QKV && a.inv_freq && 16 * (int)blockIdx.x / a.head_dim < a.n_rot_heads;
#pragma unroll
    for (int j = 0; j < NT; j++) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; e++) v[e] = c[0][j][e] + (a.bias ? a.bias[e < 2 ? r_lo : r_hi] : 0.0f);
        if (rot) {
            const int D = a.head_dim;
            if (a.neox) {                      /* rows r_lo = pair i, r_hi = i + D / 2 */
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int tok = tb + min(8 * j + 2 * t + e, n_tok - 1);
                    float cs, sn;
                    rope_cs(a, a.pos[tok], r_lo % D, cs, sn);
                    const float x0 = v[e], x1 = v[e + 2];
                    v[e] = x0 * cs - x1 * sn;
                    v[e + 2] = x0 * sn + x1 * cs;
                }
            } else {                           /* rows 2i (even g), 2i + 1 (lane g ^ 1) */
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float o = __shfl_xor_sync(0xffffffffu, v[e], 4);
                    const int r = e < 2 ? r_lo : r_hi, tok = tb + min(8 * j + 2 * t + (e & 1), n_tok - 1);
                    float cs, sn;
                    rope_cs(a, a.pos[tok], r % D / 2, cs, sn);
                    v[e] = (g & 1) ? o * sn + v[e] * cs : v[e] * cs - o * sn;
                }
            }
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int tok = 8 * j + 2 * t + (e & 1), r = e < 2 ? r_lo : r_hi;
            if (tok >= n_tok) continue;
            const size_t o = (size_t)(tb + tok) * a.y_stride + r;
            if constexpr (NA == 2) {
                const float gt = c[0][j][e], up = c[1][j][e];
                a.yh[o] = __float2half_rn(gt / (1.0f + expf(-gt)) * up);
            } else if (a.epi == ENG_ROWS_ADD) {
                a.y[o] += v[e];
            } else {
                a.y[o] = v[e];
            }
        }
    }
}

/* Small matrices (a warp's share of W at most U chunks: launch_one): each
 * warp loads its whole share before griddepcontrol.wait, then its columns
 * of the activations, so the product is one round trip; with a norm the
 * block's warps hold every column, so its sums of squares come in the same
 * pass. */
template <int NT, int NA, bool F32, int KW>
__global__ void __launch_bounds__(32 * KW, 16 / KW) rows_kernel(const eng_rows_args a) {
    constexpr int U = chunks_in_flight<NT, NA, F32>();
    __shared__ float red[KW - 1][NA][NT][4][32];
    __shared__ float s_ss[KW][8 * NT], s_blk[8 * NT];   /* sums of squares: a warp's, the block's */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int tb = 8 * NT * blockIdx.y, n_tok = min(a.T - tb, 8 * NT);   /* this block's tokens */
    const int r_lo = tile_row(a, g), r_hi = tile_row(a, g + 8);
    const __half *w[NA][2];
#pragma unroll
    for (int m = 0; m < NA; m++) {
        const size_t off = (size_t)m * (a.rows / 2);       /* SWIGLU: the up rows */
        w[m][0] = a.w + (r_lo + off) * (size_t)a.cols + 8 * t;
        w[m][1] = a.w + (r_hi + off) * (size_t)a.cols + 8 * t;
    }
    const int n_chunks = a.cols / 32, c0 = KW * U * blockIdx.z + warp;   /* grid z: the column slice */
    auto mine = [&](int u) { return c0 + KW * u < n_chunks; };         /* chunk c0 + KW u */
    /* the weights (nothing writes them) before waiting for the kernel before */
    uint4 wa[U][NA][2];
#pragma unroll
    for (int u = 0; u < U; u++)
        if (mine(u))
#pragma unroll
            for (int m = 0; m < NA; m++) {
                wa[u][m][0] = __ldg(reinterpret_cast<const uint4 *>(w[m][0] + 32 * (c0 + KW * u)));
                wa[u][m][1] = __ldg(reinterpret_cast<const uint4 *>(w[m][1] + 32 * (c0 + KW * u)));
            }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");

    size_t xo[NT];                                         /* token tb + 8j + g (the last one past T) */
#pragma unroll
    for (int j = 0; j < NT; j++) xo[j] = (size_t)(tb + min(8 * j + g, n_tok - 1)) * a.x_stride + 8 * t;
    uint4 xb[U][NT];
    if constexpr (F32) {
        const float *xf = static_cast<const float *>(a.x);
        float4 xr[U][NT][2];
#pragma unroll
        for (int u = 0; u < U; u++)
            if (mine(u))
#pragma unroll
                for (int j = 0; j < NT; j++) load8(xf + xo[j] + 32 * (c0 + KW * u), xr[u][j]);
        float inv[NT];
        if (a.norm) {
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float ss = 0.0f;
#pragma unroll
                for (int u = 0; u < U; u++)
                    if (mine(u)) ss += sumsq(xr[u][j]);
                ss += __shfl_xor_sync(0xffffffffu, ss, 1);
                ss += __shfl_xor_sync(0xffffffffu, ss, 2);
                if (t == 0) s_ss[warp][8 * j + g] = ss;
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < NT; j++) {
                float sum = 0.0f;
#pragma unroll
                for (int k = 0; k < KW; k++) sum += s_ss[k][8 * j + g];
                /* one slice: the whole row's; several: this slice's share,
                 * and the norm is applied to the sums (finish) */
                inv[j] = gridDim.z == 1 ? 1.0f / sqrtf(sum / a.cols + a.eps) : 1.0f;
                if (gridDim.z > 1 && warp == 0 && t == 0) s_blk[8 * j + g] = sum;
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++)
            if (mine(u))
#pragma unroll
                for (int j = 0; j < NT; j++)
                    xb[u][j] = to_b(xr[u][j], a.norm, 32 * (c0 + KW * u) + 8 * t, a.norm ? inv[j] : 1.0f);
    } else {
        const __half *xh = static_cast<const __half *>(a.x);
#pragma unroll
        for (int u = 0; u < U; u++)
            if (mine(u))
#pragma unroll
                for (int j = 0; j < NT; j++)
                    xb[u][j] = __ldg(reinterpret_cast<const uint4 *>(xh + xo[j] + 32 * (c0 + KW * u)));
    }

    float c[NA][NT][4];
#pragma unroll
    for (int m = 0; m < NA; m++) zero(c[m]);
#pragma unroll
    for (int u = 0; u < U; u++) {
        if (!mine(u)) break;
#pragma unroll
        for (int m = 0; m < NA; m++)
#pragma unroll
            for (int j = 0; j < NT; j++) {
                const uint4 lo = wa[u][m][0], hi = wa[u][m][1], x = xb[u][j];
                mma16816(c[m][j], lo.x, hi.x, lo.y, hi.y, x.x, x.y);
                mma16816(c[m][j], lo.z, hi.z, lo.w, hi.w, x.z, x.w);
            }
    }
    finish<KW, NT, NA>(a, c, &red[0][0][0][0][0], F32 && a.norm ? s_blk : nullptr, tb, n_tok);
}

/* The kernel's NT for T rows: one n-tile up to 8, else two (groups of 16
 * in grid y). */
int nt_for(int T) { return T <= 8 ? 1 : 2; }

/* Column slices of a product (launch_one's grid z). */
int slices_for(const eng_rows_args *a) {
    const bool nt1 = nt_for(a->T) == 1;
    const int U = a->epi == ENG_ROWS_SWIGLU ? (nt1 ? chunks_in_flight<1, 2, true>() : chunks_in_flight<2, 2, true>())
                  : a->x_f32 ? (nt1 ? chunks_in_flight<1, 1, true>() : chunks_in_flight<2, 1, true>())
                             : (nt1 ? chunks_in_flight<1, 1, false>() : chunks_in_flight<2, 1, false>());
    if (a->cols / 32 <= ONE_KW * U) return 1;
    return (a->cols / 32 + SLICE_KW * U - 1) / (SLICE_KW * U);
}

template <int NT, int NA, bool F32> cudaError_t launch_one(const eng_rows_args *a, int tiles, cudaStream_t stream) {
    cudaLaunchConfig_t cfg = {};
    const int slices = slices_for(a);
    const bool sliced = slices > 1;
    cfg.gridDim = dim3((unsigned)tiles, (unsigned)((a->T + 8 * NT - 1) / (8 * NT)), (unsigned)slices);
    cfg.blockDim = dim3(32 * (sliced ? SLICE_KW : ONE_KW));
    cfg.stream = stream;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    return sliced ? cudaLaunchKernelEx(&cfg, rows_kernel<NT, NA, F32, SLICE_KW>, *a)
                  : cudaLaunchKernelEx(&cfg, rows_kernel<NT, NA, F32, ONE_KW>, *a);
}

template <int NT> cudaError_t launch_nt(const eng_rows_args *a, cudaStream_t stream) {
    if (a->epi == ENG_ROWS_SWIGLU)
        return launch_one<NT, 2, true>(a, a->rows / 32, stream);
    if (a->x_f32)
        return launch_one<NT, 1, true>(a, a->rows / 16, stream);
    return launch_one<NT, 1, false>(a, a->rows / 16, stream);
}

} // namespace

bool eng_rows_fits(const eng_rows_args *a) {
    if (slices_for(a) > 1 && (!a->ws || !a->counters))   /* one block's columns, else slices */
        return false;
    if (a->T < 1 || a->T > ENG_ROWS_MAX_T || a->cols % 32 || a->x_stride % 8 ||
        a->rows % (a->epi == ENG_ROWS_SWIGLU ? 32 : 16))
        return false;
    if ((a->epi == ENG_ROWS_SWIGLU && (a->bias || !a->yh || !a->x_f32)) || (a->norm && !a->x_f32))
        return false;
    if (a->epi == ENG_ROWS_QKV && a->inv_freq &&
        (a->head_dim % 16 || a->rows % a->head_dim || a->rope_dim != a->head_dim ||
         a->n_rot_heads * a->head_dim > a->rows))
        return false;
    return true;
}

void eng_rows_ws_size(const eng_rows_args *a, size_t *ws_floats, size_t *counters) {
    const int NT = nt_for(a->T), NA = a->epi == ENG_ROWS_SWIGLU ? 2 : 1;
    const size_t slices = (size_t)slices_for(a);
    const size_t units = (size_t)(a->rows / (16 * NA)) * (size_t)((a->T + 8 * NT - 1) / (8 * NT));
    *ws_floats = slices > 1 ? units * slices * REC : 0;
    *counters = slices > 1 ? units : 0;
}

cudaError_t eng_rows_launch(const eng_rows_args *a, cudaStream_t stream) {
    if (!eng_rows_fits(a))
        return cudaErrorInvalidValue;
    return nt_for(a->T) == 1 ? launch_nt<1>(a, stream) : launch_nt<2>(a, stream);
}
