/* decode.cu: paged decode attention on the GPU (kvc_cu_decode): one query
 * token per sequence, K/V read in place from compressed pages, the n_rep
 * query heads of a kv head together (each page is read once per step).
 *
 * Work: a thread block takes one (sequence, kv head, split), a split being
 * pages_per_split consecutive pages of the block table; its NW warps take
 * every NW-th page. A warp reads a page's K block and V block with 16- or
 * 8-byte loads (the next page's loads are issued before this page's math),
 * converts the numbers in registers and keeps an online softmax (running
 * max m, sum l, accumulator acc) per query head. Warps merge in shared
 * memory; when a sequence has several splits, each writes (acc, m, l) to the
 * workspace and the last block to finish (a counter per (sequence, kv head))
 * merges them, in the same launch.
 *
 * Lane layout for a page of B = 16 tokens, one "vector" = 8 stored numbers
 * (kvc__cu_fmt):
 *   K block (D, 16): vector v holds dimension v / 2, tokens (v % 2) * 8 .. +7;
 *     lane takes v = lane + 32 i, i < D / 16: token half lane & 1, dimensions
 *     (lane >> 1) + 16 i. Each lane has partial scores of 8 tokens; a
 *     reduce-scatter over lane bits 1..3 and a sum over bit 4 leave lane with
 *     the full score of token my_tok (lanes l and l ^ 16 hold the same token).
 *   V block (16, D): vector v holds token v / (D / 8), dimensions
 *     (v % (D / 8)) * 8 .. +7; lane takes v = lane + 32 i; its weights come
 *     by shuffle from the lane holding that token.
 * Scores are kept in log2 units (q pre-multiplied by scale * log2 e) so the
 * softmax uses exp2. int8 scales multiply the token's score (K) and fold into
 * its weight (V). */
#include <math.h>

#include "cache/cuda/common.cuh"

namespace {

constexpr int NW = 8;            /* warps per block */
constexpr int NT = NW * 32;
constexpr int MAX_SPLITS = 256;  /* bounds the merge's shared memory */

int g_pages_per_split = 0;       /* kvc_cu_set_decode_pages_per_split */

struct decode_params {
    const uint8_t *arena;        /* (n_pages, page_bytes) */
    kvc__cu_geom g;
    const int32_t *bt;           /* (n_seqs, bt_stride) */
    int bt_stride;
    const int32_t *ctx_lens;     /* (n_seqs) or NULL: ctx0 + s */
    int ctx0;
    int pps;                     /* pages per split */
    int n_splits;                /* gridDim.x */
    float qscale;                /* scale * log2(e) */
    const float *q;              /* (n_seqs, q_stride) */
    int64_t q_stride;
    float *out;
    int64_t out_stride;
    int *counters;               /* (n_seqs, n_kv_head) splits finished, reset by the merger */
    float *ws_ml;                /* (n_seqs, n_kv_head, n_splits, 2, G) m then l */
    float *ws_acc;               /* (n_seqs, n_kv_head, n_splits, G, D) */
};

/* Streaming loads: read once, no L1 allocation, 256-byte L2 prefetch (the
 * blocks are contiguous 1-8 KB runs). */
__device__ __forceinline__ uint4 ld_stream(const uint4 *p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}
__device__ __forceinline__ uint2 ld_stream(const uint2 *p) {
    uint2 r;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];"
                 : "=r"(r.x), "=r"(r.y)
                 : "l"(p));
    return r;
}

template <int FMT> __device__ __forceinline__ void zero_vec(typename kvc__cu_fmt<FMT>::vec &v);
template <> __device__ __forceinline__ void zero_vec<KVC_CU_F16>(uint4 &v) { v = make_uint4(0, 0, 0, 0); }
template <> __device__ __forceinline__ void zero_vec<KVC_CU_I8>(uint2 &v) { v = make_uint2(0, 0); }

/* One page's blocks in registers. */
template <int D, int KF, int VF> struct page_regs {
    static constexpr int NI = D / 16;
    typename kvc__cu_fmt<KF>::vec k[NI];
    typename kvc__cu_fmt<VF>::vec v[NI];
    float ksc, vsc;              /* int8 scales of token my_tok */
};

template <int D, int KF, int VF>
__device__ __forceinline__ void load_page(const decode_params &p, int32_t page, int head, int lane,
                                          int my_tok, page_regs<D, KF, VF> &r) {
    constexpr int NI = D / 16;
    const uint8_t *kb = kvc__cu_k_block(p.arena, p.g, page, head);
    const uint8_t *vb = kvc__cu_v_block(p.arena, p.g, page, head);
    typedef typename kvc__cu_fmt<KF>::vec KV;
    typedef typename kvc__cu_fmt<VF>::vec VV;
#pragma unroll
    for (int i = 0; i < NI; i++) r.k[i] = ld_stream(reinterpret_cast<const KV *>(kb) + lane + 32 * i);
#pragma unroll
    for (int i = 0; i < NI; i++) r.v[i] = ld_stream(reinterpret_cast<const VV *>(vb) + lane + 32 * i);
    const int so = kvc__cu_i8_scale_offset(KVC__CU_B, D);
    r.ksc = kvc__cu_fmt<KF>::scaled ? __half2float(__ldg(reinterpret_cast<const __half *>(kb + so) + my_tok)) : 1.0f;
    r.vsc = kvc__cu_fmt<VF>::scaled ? __half2float(__ldg(reinterpret_cast<const __half *>(vb + so) + my_tok)) : 1.0f;
}

/* A warp's page ids (every NW-th table entry from `first`), read 32 at a
 * time by the lanes and handed out in order by shuffle. */
struct page_ids {
    const int32_t *bt;
    int first, end, lane, j, held;
    __device__ __forceinline__ page_ids(const int32_t *bt_, int first_, int end_, int lane_)
        : bt(bt_), first(first_), end(end_), lane(lane_), j(0), held(0) {}
    __device__ __forceinline__ int32_t next() {
        if ((j & 31) == 0) {
            const int pg = first + NW * (j + lane);
            held = pg < end ? __ldg(bt + pg) : 0;
        }
        return __shfl_sync(KVC__CU_FULL, held, j++ & 31);
    }
};

/* The per-warp online-softmax state. */
template <int D, int G> struct warp_state {
    float m[G], l[G];            /* m warp-uniform; l: this lane's token's share */
    float acc[G][8];             /* dims of this lane's V vectors, partial over its tokens */
};

template <int D, int G, int KF, int VF>
__device__ __forceinline__ void process_page(page_regs<D, KF, VF> &r, int valid, const float (&qr)[G][D / 16],
                                             int lane, int my_tok, const int (&v_tok)[D / 16],
                                             const int (&v_src)[D / 16], warp_state<D, G> &st) {
    constexpr int NI = D / 16;
    /* partial scores of the lane's 8 tokens over its D/16 dimensions */
    float s[G][8];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int t = 0; t < 8; t++) s[g][t] = 0.0f;
#pragma unroll
    for (int i = 0; i < NI; i++) {
        float kf[8];
        kvc__cu_fmt<KF>::to_float(r.k[i], kf);
#pragma unroll
        for (int g = 0; g < G; g++)
#pragma unroll
            for (int t = 0; t < 8; t++) s[g][t] = fmaf(qr[g][i], kf[t], s[g][t]);
    }
    /* reduce-scatter over lane bits 1, 2, 3, then sum over bit 4 */
    const bool b0 = (lane >> 1) & 1, b1 = (lane >> 2) & 1, b2 = (lane >> 3) & 1;
    float sc[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        float r4[4], r2[2];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float keep = b0 ? s[g][4 + j] : s[g][j], send = b0 ? s[g][j] : s[g][4 + j];
            r4[j] = keep + __shfl_xor_sync(KVC__CU_FULL, send, 2);
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float keep = b1 ? r4[2 + j] : r4[j], send = b1 ? r4[j] : r4[2 + j];
            r2[j] = keep + __shfl_xor_sync(KVC__CU_FULL, send, 4);
        }
        float keep = b2 ? r2[1] : r2[0], send = b2 ? r2[0] : r2[1];
        float r1 = keep + __shfl_xor_sync(KVC__CU_FULL, send, 8);
        sc[g] = r1 + __shfl_xor_sync(KVC__CU_FULL, r1, 16);
    }
    const bool ok = my_tok < valid;
    float pw[G];
#pragma unroll
    for (int g = 0; g < G; g++) {
        float x = ok ? sc[g] * r.ksc : -INFINITY;
        float pm = x;
#pragma unroll
        for (int mk = 1; mk <= 8; mk <<= 1) pm = fmaxf(pm, __shfl_xor_sync(KVC__CU_FULL, pm, mk));
        const float m_new = fmaxf(st.m[g], pm);
        const float alpha = exp2f(st.m[g] - m_new);   /* 0 on the first page */
        const float pr = exp2f(x - m_new);            /* 0 for masked tokens */
        st.l[g] = st.l[g] * alpha + pr;
#pragma unroll
        for (int e = 0; e < 8; e++) st.acc[g][e] *= alpha;
        st.m[g] = m_new;
        pw[g] = pr * r.vsc;
    }
    /* slots past the context may hold anything, inf/NaN included: zero them */
    if (valid < KVC__CU_B) {
#pragma unroll
        for (int i = 0; i < NI; i++)
            if (v_tok[i] >= valid) zero_vec<VF>(r.v[i]);
    }
#pragma unroll
    for (int i = 0; i < NI; i++) {
        float vf[8];
        kvc__cu_fmt<VF>::to_float(r.v[i], vf);
#pragma unroll
        for (int g = 0; g < G; g++) {
            const float w = __shfl_sync(KVC__CU_FULL, pw[g], v_src[i]);
#pragma unroll
            for (int e = 0; e < 8; e++) st.acc[g][e] = fmaf(w, vf[e], st.acc[g][e]);
        }
    }
}

template <int D, int G, int KF, int VF>
__global__ void __launch_bounds__(NT) decode_kernel(const decode_params p) {
    constexpr int NI = D / 16;
    constexpr int B = KVC__CU_B;
    extern __shared__ float smem[];
    __shared__ int s_last;
    const int split = blockIdx.x, head = blockIdx.y, seq = blockIdx.z;
    const int H = gridDim.y;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int ctx = p.ctx_lens ? p.ctx_lens[seq] : p.ctx0 + seq;
    float *out = p.out + (int64_t)seq * p.out_stride + (int64_t)head * G * D;   /* (G, D) */
    if (ctx <= 0) {
        if (split == 0)
            for (int e = tid; e < G * D; e += NT) out[e] = 0.0f;
        return;
    }
    const int n_pages = (ctx + B - 1) / B;
    const int n_active = (n_pages + p.pps - 1) / p.pps;
    if (split >= n_active) return;
    const int pg0 = split * p.pps;
    const int pg1 = min(pg0 + p.pps, n_pages);
    const int32_t *bt = p.bt + (int64_t)seq * p.bt_stride;

    /* this lane's query numbers: dims (lane >> 1) + 16 i of each head */
    const float *q = p.q + (int64_t)seq * p.q_stride + (int64_t)head * G * D;
    float qr[G][NI];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int i = 0; i < NI; i++) qr[g][i] = q[g * D + (lane >> 1) + 16 * i] * p.qscale;

    const int my_tok = (lane & 1) * 8 + ((lane >> 1) & 1) * 4 + ((lane >> 2) & 1) * 2 + ((lane >> 3) & 1);
    int v_tok[NI], v_src[NI];
#pragma unroll
    for (int i = 0; i < NI; i++) {
        const int t = (lane + 32 * i) / (D / 8);
        v_tok[i] = t;
        v_src[i] = (t >> 3) | (((t >> 2) & 1) << 1) | (((t >> 1) & 1) << 2) | ((t & 1) << 3);
    }
    warp_state<D, G> st;
#pragma unroll
    for (int g = 0; g < G; g++) {
        st.m[g] = -INFINITY;
        st.l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; e++) st.acc[g][e] = 0.0f;
    }

    /* pages pg0 + warp, + NW, ...: two register sets, the next page's loads
     * in flight while this page computes; page ids fetched 32 at a time */
    int pa = pg0 + warp;
    if (pa < pg1) {
        page_ids ids(bt, pa, pg1, lane);
        page_regs<D, KF, VF> ra, rb;
        load_page<D, KF, VF>(p, ids.next(), head, lane, my_tok, ra);
        for (;;) {
            const int pb = pa + NW;
            if (pb < pg1) load_page<D, KF, VF>(p, ids.next(), head, lane, my_tok, rb);
            process_page<D, G, KF, VF>(ra, ctx - pa * B, qr, lane, my_tok, v_tok, v_src, st);
            if (pb >= pg1) break;
            pa = pb + NW;
            if (pa < pg1) load_page<D, KF, VF>(p, ids.next(), head, lane, my_tok, ra);
            process_page<D, G, KF, VF>(rb, ctx - pb * B, qr, lane, my_tok, v_tok, v_src, st);
            if (pa >= pg1) break;
        }
    }

    /* finish the warp: l over the 16 tokens, acc over lanes holding the same dims */
#pragma unroll
    for (int g = 0; g < G; g++) {
#pragma unroll
        for (int mk = 1; mk <= 8; mk <<= 1) st.l[g] += __shfl_xor_sync(KVC__CU_FULL, st.l[g], mk);
#pragma unroll
        for (int e = 0; e < 8; e++) {
#pragma unroll
            for (int mk = D / 8; mk < 32; mk <<= 1)
                st.acc[g][e] += __shfl_xor_sync(KVC__CU_FULL, st.acc[g][e], mk);
        }
    }
    float *s_acc = smem;                       /* (NW, G, D) */
    float *s_m = smem + NW * G * D;            /* (NW, G) */
    float *s_l = s_m + NW * G;                 /* (NW, G) */
    if (lane < D / 8) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            float4 *dst = reinterpret_cast<float4 *>(s_acc + (warp * G + g) * D + lane * 8);
            dst[0] = make_float4(st.acc[g][0], st.acc[g][1], st.acc[g][2], st.acc[g][3]);
            dst[1] = make_float4(st.acc[g][4], st.acc[g][5], st.acc[g][6], st.acc[g][7]);
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            s_m[warp * G + g] = st.m[g];
            s_l[warp * G + g] = st.l[g];
        }
    }
    __syncthreads();

    /* merge the warps: warp 0 always had a page, so each max is finite */
    const int64_t unit = ((int64_t)seq * H + head) * p.n_splits;
    for (int e = tid; e < G * D; e += NT) {
        const int g = e / D;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, s_m[w * G + g]);
        float A = 0.0f, Ls = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) {
            const float f = exp2f(s_m[w * G + g] - M);
            A = fmaf(f, s_acc[(w * G + g) * D + (e - g * D)], A);
            Ls = fmaf(f, s_l[w * G + g], Ls);
        }
        if (n_active == 1) {
            out[e] = A / Ls;
        } else {
            p.ws_acc[(unit + split) * G * D + e] = A;
            if (e - g * D == 0) {
                p.ws_ml[(unit + split) * 2 * G + g] = M;
                p.ws_ml[(unit + split) * 2 * G + G + g] = Ls;
            }
        }
    }
    if (n_active == 1) return;

    /* the last split of this (sequence, head) to finish merges them all */
    __threadfence();
    __syncthreads();
    if (tid == 0) {
        int *counter = p.counters + (int64_t)seq * H + head;
        const int prev = atomicAdd(counter, 1);
        s_last = prev == n_active - 1;
        if (s_last) *counter = 0;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();

    float *s_w = smem;                         /* (n_active, G): m, then the split's weight */
    float *s_ls = smem + n_active * G;         /* (n_active, G) */
    float *s_part = smem + ((2 * n_active * G + 3) & ~3);   /* (NW, G * D), 16-byte aligned */
    for (int e = tid; e < n_active * G; e += NT) {
        const int s = e / G, g = e - s * G;
        s_w[e] = __ldcg(p.ws_ml + (unit + s) * 2 * G + g);
        s_ls[e] = __ldcg(p.ws_ml + (unit + s) * 2 * G + G + g);
    }
    __syncthreads();
    if (warp < G) {                            /* warp g: weights of head g (G <= NW) */
        const int g = warp;
        float M = -INFINITY;
        for (int s = lane; s < n_active; s += 32) M = fmaxf(M, s_w[s * G + g]);
#pragma unroll
        for (int mk = 16; mk >= 1; mk >>= 1) M = fmaxf(M, __shfl_xor_sync(KVC__CU_FULL, M, mk));
        float Ls = 0.0f;
        for (int s = lane; s < n_active; s += 32) Ls += exp2f(s_w[s * G + g] - M) * s_ls[s * G + g];
#pragma unroll
        for (int mk = 16; mk >= 1; mk >>= 1) Ls += __shfl_xor_sync(KVC__CU_FULL, Ls, mk);
        const float inv = 1.0f / Ls;
        for (int s = lane; s < n_active; s += 32) s_w[s * G + g] = exp2f(s_w[s * G + g] - M) * inv;
    }
    __syncthreads();
    constexpr int NE4 = G * D / 4;             /* float4s of one split's (G, D) */
    constexpr int PER = (NE4 + 31) / 32;
    float4 a[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) a[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int s = warp; s < n_active; s += NW) {
        const float4 *src = reinterpret_cast<const float4 *>(p.ws_acc + (unit + s) * G * D);
#pragma unroll
        for (int j = 0; j < PER; j++) {
            const int e4 = lane + 32 * j;
            if (e4 < NE4) {
                const float w = s_w[s * G + (e4 * 4) / D];
                const float4 x = __ldcg(src + e4);
                a[j].x = fmaf(w, x.x, a[j].x);
                a[j].y = fmaf(w, x.y, a[j].y);
                a[j].z = fmaf(w, x.z, a[j].z);
                a[j].w = fmaf(w, x.w, a[j].w);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int e4 = lane + 32 * j;
        if (e4 < NE4) reinterpret_cast<float4 *>(s_part + warp * G * D)[e4] = a[j];
    }
    __syncthreads();
    for (int e = tid; e < G * D; e += NT) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) o += s_part[w * G * D + e];
        out[e] = o;
    }
}

/* ---- host side ------------------------------------------------------------- */

struct plan {
    int pps, n_splits;
};

int sm_count() {
    static int n = 0;
    if (!n) {
        int dev = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0)
            n = 132;
    }
    return n;
}

/* Splits: enough blocks for about four waves of two blocks per
 * multiprocessor, each warp at least one page, at most MAX_SPLITS. */
plan make_plan(const kvc_cu_layout *L, int n_seqs, int max_ctx) {
    plan pl;
    const int pages = max_ctx > 0 ? (max_ctx + L->block_size - 1) / L->block_size : 1;
    int pps = g_pages_per_split;
    if (pps <= 0) {
        const long pairs = (long)(n_seqs > 0 ? n_seqs : 1) * L->n_kv_head;
        const long target = (long)sm_count() * 2 * 4;
        long want = (target + pairs - 1) / pairs;
        if (want < 1) want = 1;
        pps = (int)((pages + want - 1) / want);
        if (pps < NW) pps = NW;
    }
    if ((pages + pps - 1) / pps > MAX_SPLITS) pps = (pages + MAX_SPLITS - 1) / MAX_SPLITS;
    pl.pps = pps;
    pl.n_splits = (pages + pps - 1) / pps;
    return pl;
}

size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

struct ws_parts {
    size_t counters, ml, acc, total;
};

ws_parts ws_layout(const kvc_cu_layout *L, int n_seqs, int n_rep, const plan &pl) {
    ws_parts w;
    const size_t units = (size_t)n_seqs * L->n_kv_head;
    w.counters = 0;
    w.ml = align256(units * sizeof(int));
    w.acc = w.ml + align256(units * pl.n_splits * 2 * n_rep * sizeof(float));
    w.total = w.acc + align256(units * pl.n_splits * n_rep * L->head_dim * sizeof(float));
    return w;
}

template <int D, int G, int KF, int VF>
int launch(const decode_params &p, dim3 grid, cudaStream_t stream, char *err, size_t errlen) {
    const size_t f1 = (size_t)NW * G * (D + 2);
    const size_t f2 = (size_t)2 * p.n_splits * G + 4 + (size_t)NW * G * D;
    const size_t smem = (f1 > f2 ? f1 : f2) * sizeof(float);
    if (smem > 48 * 1024)
        KVC__CU_TRY(cudaFuncSetAttribute(decode_kernel<D, G, KF, VF>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    decode_kernel<D, G, KF, VF><<<grid, NT, smem, stream>>>(p);
    KVC__CU_TRY(cudaGetLastError());
    return KVC_OK;
}

template <int D, int KF, int VF>
int dispatch_g(int G, const decode_params &p, dim3 grid, cudaStream_t s, char *err, size_t errlen) {
    switch (G) {
    case 1: return launch<D, 1, KF, VF>(p, grid, s, err, errlen);
    case 2: return launch<D, 2, KF, VF>(p, grid, s, err, errlen);
    case 3: return launch<D, 3, KF, VF>(p, grid, s, err, errlen);
    case 4: return launch<D, 4, KF, VF>(p, grid, s, err, errlen);
    case 5: return launch<D, 5, KF, VF>(p, grid, s, err, errlen);
    case 6: return launch<D, 6, KF, VF>(p, grid, s, err, errlen);
    case 7: return launch<D, 7, KF, VF>(p, grid, s, err, errlen);
    case 8: return launch<D, 8, KF, VF>(p, grid, s, err, errlen);
    }
    KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: n_rep %d: the GPU kernels are compiled for 1..8", G);
}

template <int D>
int dispatch_fmt(const kvc_cu_layout *L, int G, const decode_params &p, dim3 grid, cudaStream_t s,
                 char *err, size_t errlen) {
    if (L->k_fmt == KVC_CU_F16 && L->v_fmt == KVC_CU_F16)
        return dispatch_g<D, KVC_CU_F16, KVC_CU_F16>(G, p, grid, s, err, errlen);
    if (L->k_fmt == KVC_CU_I8 && L->v_fmt == KVC_CU_I8)
        return dispatch_g<D, KVC_CU_I8, KVC_CU_I8>(G, p, grid, s, err, errlen);
    if (L->k_fmt == KVC_CU_F16 && L->v_fmt == KVC_CU_I8)
        return dispatch_g<D, KVC_CU_F16, KVC_CU_I8>(G, p, grid, s, err, errlen);
    if (L->k_fmt == KVC_CU_I8 && L->v_fmt == KVC_CU_F16)
        return dispatch_g<D, KVC_CU_I8, KVC_CU_F16>(G, p, grid, s, err, errlen);
    KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: formats %d/%d not compiled", L->k_fmt, L->v_fmt);
}

} // namespace

extern "C" void kvc_cu_set_decode_pages_per_split(int pages) { g_pages_per_split = pages > 0 ? pages : 0; }

extern "C" size_t kvc_cu_decode_workspace(const kvc_cu_layout *L, int n_seqs, int max_ctx, int n_rep) {
    if (!L || n_seqs <= 0 || n_rep <= 0) return 0;
    return ws_layout(L, n_seqs, n_rep, make_plan(L, n_seqs, max_ctx)).total;
}

extern "C" int kvc_cu_decode(const kvc_cu_layout *L, const void *arena, int layer, const kvc_cu_decode_args *a,
                             void *workspace, size_t workspace_bytes, void *stream, char *err, size_t errlen) {
    int rc = kvc__cu_check_layout(L, layer, err, errlen);
    if (rc) return rc;
    if (a->n_seqs <= 0) return KVC_OK;
    if (a->n_seqs > 65535)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: decode of %d sequences: at most 65535 per call", a->n_seqs);
    if (a->n_rep < 1 || a->n_rep > 8)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: n_rep %d: the GPU kernels are compiled for 1..8", a->n_rep);
    if (a->max_ctx < 0 || (!a->ctx_lens && a->ctx0 + a->n_seqs - 1 > a->max_ctx))
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: decode: max_ctx %d too small", a->max_ctx);
    if (!arena || !a->block_tables || !a->q || !a->out || !workspace)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: decode: NULL pointer");
    const int64_t heads = (int64_t)L->n_kv_head * a->n_rep * L->head_dim;
    if (a->q_stride < heads || a->out_stride < heads)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: decode: q_stride %lld / out_stride %lld < %lld",
                     (long long)a->q_stride, (long long)a->out_stride, (long long)heads);
    const plan pl = make_plan(L, a->n_seqs, a->max_ctx);
    const ws_parts w = ws_layout(L, a->n_seqs, a->n_rep, pl);
    if (workspace_bytes < w.total)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: decode: workspace %zu bytes, need %zu", workspace_bytes, w.total);
    decode_params p;
    p.arena = (const uint8_t *)arena;
    p.g = kvc__cu_geom_of(L, layer);
    p.bt = a->block_tables;
    p.bt_stride = a->bt_stride;
    p.ctx_lens = a->ctx_lens;
    p.ctx0 = a->ctx0;
    p.pps = pl.pps;
    p.n_splits = pl.n_splits;
    p.qscale = a->scale * 1.4426950408889634f;
    p.q = a->q;
    p.q_stride = a->q_stride;
    p.out = a->out;
    p.out_stride = a->out_stride;
    uint8_t *ws = (uint8_t *)workspace;
    p.counters = (int *)(ws + w.counters);
    p.ws_ml = (float *)(ws + w.ml);
    p.ws_acc = (float *)(ws + w.acc);
    const dim3 grid(pl.n_splits, L->n_kv_head, a->n_seqs);
    cudaStream_t s = (cudaStream_t)stream;
    if (L->head_dim == 64) return dispatch_fmt<64>(L, a->n_rep, p, grid, s, err, errlen);
    if (L->head_dim == 128) return dispatch_fmt<128>(L, a->n_rep, p, grid, s, err, errlen);
    KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: head_dim %d: the GPU kernels are compiled for 64 and 128",
                 L->head_dim);
}
