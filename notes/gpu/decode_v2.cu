/* decode.cu: paged decode attention on the GPU (kvc_cu_decode): one query
 * token per sequence, K/V read in place from compressed pages, the n_rep
 * query heads of a kv head together (each page is read once per step).
 *
 * Each warp streams pages through its own ring of S page buffers in shared
 * memory (cp.async, 16 bytes a lane, S - 1 pages in flight while one
 * computes; S chosen so a ring is about 24 KB), converts the numbers in
 * registers and keeps an online softmax (running max m, sum l, accumulator
 * acc) per query head. Two ways to share the work (the plan picks one):
 *   - warp per sequence: with many (sequence, kv head) pairs, each warp takes
 *     one pair, all its pages, and writes the output itself;
 *   - split: otherwise a thread block takes one (sequence, kv head, split),
 *     a split being pages_per_split consecutive pages, its NW warps every
 *     NW-th page; warps merge in shared memory, and when a sequence has
 *     several splits each writes (acc, m, l) to the workspace and the last
 *     block to finish (a counter per pair) merges them, in the same launch.
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

#include <type_traits>

#include "cache/cuda/common.cuh"

namespace {

constexpr int NW = 4;            /* warps per block */
constexpr int NT = NW * 32;
constexpr int MAX_SPLITS = 256;  /* bounds the merge's shared memory */

int g_pages_per_split = 0;       /* kvc_cu_set_decode_pages_per_split */

/* Bytes of one head's block of 16 tokens (the pool's padding to 16 bytes). */
template <int D, int FMT> struct block_bytes {
    static constexpr int value = FMT == KVC_CU_F16 ? 32 * D : 16 * D + 32;
};

/* A warp's ring of S pages (K block then V block each) in shared memory. */
template <int D, int KF, int VF> struct ring {
    static constexpr int KB = block_bytes<D, KF>::value;
    static constexpr int VB = block_bytes<D, VF>::value;
    static constexpr int PAGE = KB + VB;
    static constexpr int S0 = 24576 / PAGE;
    static constexpr int S = S0 < 2 ? 2 : S0 > 8 ? 8 : S0;
    static constexpr int BYTES = NW * S * PAGE;     /* per block */
};

struct decode_params {
    const uint8_t *arena;        /* (n_pages, page_bytes) */
    kvc__cu_geom g;
    const int32_t *bt;           /* (n_seqs, bt_stride) */
    int bt_stride;
    const int32_t *ctx_lens;     /* (n_seqs) or NULL: ctx0 + s */
    int ctx0;
    int n_kv_head;
    int per_warp;                /* 1: warp per (sequence, kv head); 0: split blocks */
    int64_t n_pairs;             /* n_seqs * n_kv_head */
    int pps;                     /* pages per split */
    int n_splits;                /* gridDim.x when splitting */
    float qscale;                /* scale * log2(e) */
    const float *q;              /* (n_seqs, q_stride) */
    int64_t q_stride;
    float *out;
    int64_t out_stride;
    int *counters;               /* (n_seqs, n_kv_head) splits finished, reset by the merger */
    float *ws_ml;                /* (n_seqs, n_kv_head, n_splits, 2, G) m then l */
    float *ws_acc;               /* (n_seqs, n_kv_head, n_splits, G, D) */
};

__device__ __forceinline__ void cp_async16(void *dst, const void *src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(
                     (uint32_t)__cvta_generic_to_shared(dst)),
                 "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

/* Copies one page's K and V blocks of `head` into a ring slot, 16 bytes a
 * lane (the lanes then read each other's bytes: __syncwarp after the wait). */
template <int D, int KF, int VF>
__device__ __forceinline__ void issue_page(const decode_params &p, int32_t page, int head, uint8_t *dst, int lane) {
    typedef ring<D, KF, VF> R;
    const uint8_t *kb = kvc__cu_k_block(p.arena, p.g, page, head);
    const uint8_t *vb = kvc__cu_v_block(p.arena, p.g, page, head);
#pragma unroll
    for (int i = 0; i < (R::KB / 16 + 31) / 32; i++) {
        const int c = lane + 32 * i;
        if (R::KB % 512 == 0 || c < R::KB / 16) cp_async16(dst + 16 * c, kb + 16 * c);
    }
#pragma unroll
    for (int i = 0; i < (R::VB / 16 + 31) / 32; i++) {
        const int c = lane + 32 * i;
        if (R::VB % 512 == 0 || c < R::VB / 16) cp_async16(dst + R::KB + 16 * c, vb + 16 * c);
    }
}

template <int FMT> __device__ __forceinline__ void zero_vec(typename kvc__cu_fmt<FMT>::vec &v);
template <> __device__ __forceinline__ void zero_vec<KVC_CU_F16>(uint4 &v) { v = make_uint4(0, 0, 0, 0); }
template <> __device__ __forceinline__ void zero_vec<KVC_CU_I8>(uint2 &v) { v = make_uint2(0, 0); }

/* A warp's page ids (table entries first, first + stride, ... below end),
 * read 32 at a time by the lanes and handed out in order by shuffle. */
struct page_ids {
    const int32_t *bt;
    int first, stride, end, lane, j, held;
    __device__ __forceinline__ page_ids(const int32_t *bt_, int first_, int stride_, int end_, int lane_)
        : bt(bt_), first(first_), stride(stride_), end(end_), lane(lane_), j(0), held(0) {}
    __device__ __forceinline__ int32_t next() {
        if ((j & 31) == 0) {
            const int pg = first + stride * (j + lane);
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

/* One page from its ring slot: kb, vb the K and V blocks in shared memory;
 * valid: positions of the page inside the context (>= 1). */
template <int D, int G, int KF, int VF>
__device__ __forceinline__ void process_page(const uint8_t *kb, const uint8_t *vb, int valid,
                                             const float (&qr)[G][D / 16], int lane, int my_tok,
                                             const int (&v_tok)[D / 16], const int (&v_src)[D / 16],
                                             warp_state<D, G> &st) {
    constexpr int NI = D / 16;
    typedef typename kvc__cu_fmt<KF>::vec KV;
    typedef typename kvc__cu_fmt<VF>::vec VV;
    const int so = kvc__cu_i8_scale_offset(KVC__CU_B, D);
    const float ksc = kvc__cu_fmt<KF>::scaled ? __half2float(reinterpret_cast<const __half *>(kb + so)[my_tok]) : 1.0f;
    const float vsc = kvc__cu_fmt<VF>::scaled ? __half2float(reinterpret_cast<const __half *>(vb + so)[my_tok]) : 1.0f;
    /* partial scores of the lane's 8 tokens over its D/16 dimensions */
    float s[G][8];
#pragma unroll
    for (int g = 0; g < G; g++)
#pragma unroll
        for (int t = 0; t < 8; t++) s[g][t] = 0.0f;
#pragma unroll
    for (int i = 0; i < NI; i++) {
        float kf[8];
        kvc__cu_fmt<KF>::to_float(reinterpret_cast<const KV *>(kb)[lane + 32 * i], kf);
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
        float x = ok ? sc[g] * ksc : -INFINITY;
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
        pw[g] = pr * vsc;
    }
#pragma unroll
    for (int i = 0; i < NI; i++) {
        VV vv = reinterpret_cast<const VV *>(vb)[lane + 32 * i];
        /* slots past the context may hold anything, inf/NaN included */
        if (v_tok[i] >= valid) zero_vec<VF>(vv);
        float vf[8];
        kvc__cu_fmt<VF>::to_float(vv, vf);
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
    typedef ring<D, KF, VF> R;
    constexpr int NI = D / 16;
    constexpr int B = KVC__CU_B;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *smem = reinterpret_cast<float *>(smem_raw);
    __shared__ int s_last;
    const int H = p.n_kv_head;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    int seq, head, split;
    if (p.per_warp) {                          /* no block-wide barriers on this path */
        const int64_t pair = (int64_t)blockIdx.x * NW + warp;
        if (pair >= p.n_pairs) return;
        seq = (int)(pair / H);
        head = (int)(pair % H);
        split = 0;
    } else {
        split = blockIdx.x;
        head = blockIdx.y;
        seq = blockIdx.z;
    }
    const int ctx = p.ctx_lens ? p.ctx_lens[seq] : p.ctx0 + seq;
    float *out = p.out + (int64_t)seq * p.out_stride + (int64_t)head * G * D;   /* (G, D) */
    if (ctx <= 0) {
        if (split == 0) {
            const int t0 = p.per_warp ? lane : tid, nt = p.per_warp ? 32 : NT;
            for (int e = t0; e < G * D; e += nt) out[e] = 0.0f;
        }
        return;
    }
    const int n_pages = (ctx + B - 1) / B;
    int n_active = 1, first = 0, stride = 1, end = n_pages;
    if (!p.per_warp) {
        n_active = (n_pages + p.pps - 1) / p.pps;
        if (split >= n_active) return;
        first = split * p.pps + warp;
        stride = NW;
        end = min(split * p.pps + p.pps, n_pages);
    }
    const int n_mine = first < end ? (end - first + stride - 1) / stride : 0;
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

    /* this warp's pages first, first + stride, ... through its ring: S - 1
     * pages in flight while one computes (one commit group per page, empty
     * groups past the end keep the count uniform) */
    uint8_t *my_ring = smem_raw + warp * (R::S * R::PAGE);
    page_ids ids(bt, first, stride, end, lane);
#pragma unroll
    for (int j = 0; j < R::S - 1; j++) {
        if (j < n_mine) issue_page<D, KF, VF>(p, ids.next(), head, my_ring + j * R::PAGE, lane);
        cp_async_commit();
    }
    int slot = 0, slot_next = R::S - 1;
    for (int j = 0; j < n_mine; j++) {
        if (j + R::S - 1 < n_mine) issue_page<D, KF, VF>(p, ids.next(), head, my_ring + slot_next * R::PAGE, lane);
        cp_async_commit();
        cp_async_wait<R::S - 1>();
        __syncwarp();
        const uint8_t *kb = my_ring + slot * R::PAGE;
        process_page<D, G, KF, VF>(kb, kb + R::KB, ctx - (first + j * stride) * B, qr, lane, my_tok, v_tok, v_src,
                                   st);
        __syncwarp();                          /* the slot is refilled next iteration */
        slot = slot + 1 == R::S ? 0 : slot + 1;
        slot_next = slot_next + 1 == R::S ? 0 : slot_next + 1;
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
    if (p.per_warp) {
        if (lane < D / 8) {
#pragma unroll
            for (int g = 0; g < G; g++) {
                const float inv = 1.0f / st.l[g];
#pragma unroll
                for (int e = 0; e < 8; e++) out[g * D + lane * 8 + e] = st.acc[g][e] * inv;
            }
        }
        return;
    }
    __syncthreads();                           /* the rings are reused below */
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
    int per_warp, pps, n_splits;
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

template <int D, int G, int KF, int VF> size_t smem_bytes() {
    const size_t f1 = (size_t)NW * G * (D + 2) * sizeof(float);
    const size_t f2 = ((size_t)2 * MAX_SPLITS * G + 4 + (size_t)NW * G * D) * sizeof(float);
    const size_t r = ring<D, KF, VF>::BYTES;
    return r > f1 ? (r > f2 ? r : f2) : (f1 > f2 ? f1 : f2);
}

/* Blocks of this instance resident on one multiprocessor (sets its shared
 * memory limit the first time). */
template <int D, int G, int KF, int VF> int blocks_per_sm() {
    static int n = 0;
    if (!n) {
        const size_t smem = smem_bytes<D, G, KF, VF>();
        if (cudaFuncSetAttribute(decode_kernel<D, G, KF, VF>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel<D, G, KF, VF>, NT, smem) != cudaSuccess ||
            n < 1)
            n = 1;
    }
    return n;
}

/* Calls f(D, G, KF, VF) as integral constants for the layout's instance;
 * KVC_ERR_INVAL outside the compiled set. */
template <typename F> int with_instance(const kvc_cu_layout *L, int G, F &&f) {
    auto by_g = [&](auto d, auto kf, auto vf) -> int {
        switch (G) {
        case 1: return f(d, std::integral_constant<int, 1>(), kf, vf);
        case 2: return f(d, std::integral_constant<int, 2>(), kf, vf);
        case 3: return f(d, std::integral_constant<int, 3>(), kf, vf);
        case 4: return f(d, std::integral_constant<int, 4>(), kf, vf);
        case 5: return f(d, std::integral_constant<int, 5>(), kf, vf);
        case 6: return f(d, std::integral_constant<int, 6>(), kf, vf);
        case 7: return f(d, std::integral_constant<int, 7>(), kf, vf);
        case 8: return f(d, std::integral_constant<int, 8>(), kf, vf);
        }
        return KVC_ERR_INVAL;
    };
    auto by_fmt = [&](auto d) -> int {
        typedef std::integral_constant<int, KVC_CU_F16> F16;
        typedef std::integral_constant<int, KVC_CU_I8> I8;
        if (L->k_fmt == KVC_CU_F16 && L->v_fmt == KVC_CU_F16) return by_g(d, F16(), F16());
        if (L->k_fmt == KVC_CU_I8 && L->v_fmt == KVC_CU_I8) return by_g(d, I8(), I8());
        if (L->k_fmt == KVC_CU_F16 && L->v_fmt == KVC_CU_I8) return by_g(d, F16(), I8());
        if (L->k_fmt == KVC_CU_I8 && L->v_fmt == KVC_CU_F16) return by_g(d, I8(), F16());
        return KVC_ERR_INVAL;
    };
    if (L->head_dim == 64) return by_fmt(std::integral_constant<int, 64>());
    if (L->head_dim == 128) return by_fmt(std::integral_constant<int, 128>());
    return KVC_ERR_INVAL;
}

/* The plan: a warp per (sequence, kv head) when there are pairs for at
 * least half the resident warps; otherwise splits that fill the resident
 * blocks once (more splits only add merges and ring fills). */
plan make_plan(const kvc_cu_layout *L, int n_seqs, int max_ctx, int n_rep) {
    plan pl;
    const int pages = max_ctx > 0 ? (max_ctx + L->block_size - 1) / L->block_size : 1;
    const long pairs = (long)(n_seqs > 0 ? n_seqs : 1) * L->n_kv_head;
    int per_sm = with_instance(L, n_rep, [](auto d, auto g, auto kf, auto vf) {
        return blocks_per_sm<decltype(d)::value, decltype(g)::value, decltype(kf)::value, decltype(vf)::value>();
    });
    if (per_sm < 1) per_sm = 1;
    const long resident = (long)sm_count() * per_sm;
    int pps = g_pages_per_split;
    pl.per_warp = 0;
    if (pps == KVC_CU_WARP_PER_SEQ || (pps == 0 && pairs * 2 >= resident * NW)) {
        pl.per_warp = 1;
        pl.pps = pages;
        pl.n_splits = 1;
        return pl;
    }
    if (pps <= 0) {
        long splits = resident / pairs;
        if (splits < 1) splits = 1;
        pps = (int)((pages + splits - 1) / splits);
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
    const size_t splits = pl.per_warp || pl.n_splits == 1 ? 0 : (size_t)pl.n_splits;
    w.counters = 0;
    w.ml = align256(units * sizeof(int));
    w.acc = w.ml + align256(units * splits * 2 * n_rep * sizeof(float));
    w.total = w.acc + align256(units * splits * n_rep * L->head_dim * sizeof(float));
    return w;
}

} // namespace

extern "C" void kvc_cu_set_decode_pages_per_split(int pages) {
    g_pages_per_split = pages > 0 || pages == KVC_CU_WARP_PER_SEQ ? pages : 0;
}

extern "C" size_t kvc_cu_decode_workspace(const kvc_cu_layout *L, int n_seqs, int max_ctx, int n_rep) {
    if (!L || !L->pool || n_seqs <= 0 || n_rep < 1 || n_rep > 8) return 0;
    return ws_layout(L, n_seqs, n_rep, make_plan(L, n_seqs, max_ctx, n_rep)).total;
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
    const plan pl = make_plan(L, a->n_seqs, a->max_ctx, a->n_rep);
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
    p.n_kv_head = L->n_kv_head;
    p.per_warp = pl.per_warp;
    p.n_pairs = (int64_t)a->n_seqs * L->n_kv_head;
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
    const dim3 grid = pl.per_warp ? dim3((unsigned)((p.n_pairs + NW - 1) / NW))
                                  : dim3(pl.n_splits, L->n_kv_head, a->n_seqs);
    cudaStream_t stream_ = (cudaStream_t)stream;
    int rc2 = with_instance(L, a->n_rep, [&](auto d, auto g, auto kf, auto vf) -> int {
        constexpr int D_ = decltype(d)::value, G_ = decltype(g)::value, KF_ = decltype(kf)::value,
                      VF_ = decltype(vf)::value;
        blocks_per_sm<D_, G_, KF_, VF_>();     /* sets the shared memory limit */
        decode_kernel<D_, G_, KF_, VF_><<<grid, NT, smem_bytes<D_, G_, KF_, VF_>(), stream_>>>(p);
        return KVC_OK;
    });
    if (rc2 != KVC_OK)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: head_dim %d, n_rep %d, formats %d/%d: not compiled", L->head_dim,
                     a->n_rep, L->k_fmt, L->v_fmt);
    KVC__CU_TRY(cudaGetLastError());
    return KVC_OK;
}
