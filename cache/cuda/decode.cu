/* decode.cu: paged decode attention on the GPU (kvc_cu_decode): one query
 * token per sequence, K/V read in place from compressed pages, the n_rep
 * query heads of a kv head together (each page is read once per step), on
 * tensor cores.
 *
 * Each warp streams pages through its own ring of S page slots in shared
 * memory (cp.async 16 bytes a lane; S - 1 pages in flight while one
 * computes). Per page of 16 positions it computes the scores of its G query
 * heads with mma.sync m16n8k16 (fp16 in, fp32 accumulate), an online softmax
 * (running max m, sum l per head) and O += P V with a second mma. The 16
 * rows of the mma hold only G <= 8 query heads, so rows 8..15 carry the
 * rounding remainder: row g holds fp16(x) and row g + 8 fp16(x - fp16(x)) of
 * the scaled query (and of the weights), and the two rows' results are added
 * in fp32. The products are then those of ~22-bit operands: fp32-like
 * accuracy at no extra tensor-core work (K/V numbers are exact in fp16: f16
 * pages as stored, int8 and int4 codes as integers, their scales and minima
 * applied in fp32 or folded into the hi + lo operands).
 *
 * Layouts in a ring slot (16-byte units, swizzled so the transposing
 * ldmatrix reads of 8 rows hit 8 distinct bank groups):
 *   f16 K (D, 16): unit (dim, h) at dim * 2 + (h ^ ((dim >> 2) & 1))
 *   f16 V (16, D): unit (t, u) at t * D / 8 + (u ^ (t & 7))
 *   int8 and int4 blocks are copied raw, then their codes converted
 *   (exactly: small integers) into a per-warp f16 block of the same swizzled
 *   layout, K's first and, once the scores are taken, V's; scales and minima
 *   stay in the raw slot. Positions past the context are zero-filled in f16
 *   and int8 V (garbage there could be inf), their int4 weights are selected
 *   to 0, and they are masked in the scores.
 * Codecs in the scores and sums:
 *   int8: the per-token scale multiplies the score (K) or the weight (V);
 *   int4 keys per channel (x = min_d + scale_d code): the page's query is
 *     q * scale_d, formed in halves without rounding loss (the product of
 *     the hi half by a half scale is exact as hi * s = p + e, p = fp16(hi s),
 *     e = fma(hi, s, -p); lo * s + e is the new lo), and q . min comes from
 *     one more mma whose B columns are all the page's minima;
 *   int4 values per token (x = min_tg + scale_tg code, groups of 32 or 64
 *     numbers): one weight operand per group (p_t scale_tg as hi + lo) and
 *     a running sum of p_t min_tg per group, added to its numbers at the end.
 *
 * Two ways to share the work (make_plan picks one):
 *   - warp per sequence: with many (sequence, kv head) pairs, each warp takes
 *     one pair, all its pages, and writes the output itself;
 *   - split: otherwise a thread block takes one (sequence, kv head, split),
 *     a split being pages_per_split consecutive pages, its NW warps every
 *     NW-th page; warps merge in shared memory, and when a sequence has
 *     several splits each writes (acc, m, l) to the workspace and the last
 *     block to finish (a counter per pair) merges them, in the same launch.
 *     Beyond FAN splits they merge in two levels: the last block of each
 *     group of FAN splits merges the group into its first slot, and the last
 *     group to finish merges the groups (no block reads more than FAN).
 * Scores are kept in log2 units (q pre-multiplied by scale * log2 e). */
#include <math.h>

#include <type_traits>

#include "cache/cuda/common.cuh"

namespace {

constexpr int NW = 4;            /* warps per block */
constexpr int NT = NW * 32;
constexpr int FAN = 32;          /* partials one block merges */
constexpr int MAX_SPLITS = FAN * FAN;
/* Shared memory a warp aims at (ring plus conversion buffers; at least 3
 * pages): small enough for 4-5 blocks per multiprocessor at head_dim 64. */
constexpr int RING_BUDGET = 12288;

int g_pages_per_split = 0;       /* kvc_cu_set_decode_tuning */
int g_warp_per_seq = 0;

/* A warp's shared memory: a ring of S page slots (K block then V block, the
 * global block sizes), then one f16 block that quantized codes are converted
 * into (K's, then V's). */
template <int D, int KF, int VF> struct ring {
    static constexpr int KB = kvc__cu_block_bytes(KF, D);
    static constexpr int VB = kvc__cu_block_bytes(VF, D);
    static constexpr int PAGE = KB + VB;
    static constexpr int CONV = KF != KVC_CU_F16 || VF != KVC_CU_F16 ? 32 * D : 0;
    static constexpr int S0 = (RING_BUDGET - CONV) / PAGE;
    static constexpr int S = S0 < 3 ? 3 : S0 > 8 ? 8 : S0;
    static constexpr int WARP_BYTES = S * PAGE + CONV;
    static constexpr int BYTES = NW * WARP_BYTES;     /* per block */
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
    int *counters;               /* (n_seqs, n_kv_head, 1 + FAN) splits / groups finished, reset by the merger */
    float *ws_ml;                /* (n_seqs, n_kv_head, n_splits, 2, G) m then l */
    float *ws_acc;               /* (n_seqs, n_kv_head, n_splits, G, D) */
};

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* 16 bytes global -> shared; valid false writes zeros. */
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid = true) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_half2(__half lo, __half hi) {
    return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
}

/* x as fp16 hi + fp16 lo. */
__device__ __forceinline__ void split_half(float x, __half &hi, __half &lo) {
    hi = __float2half_rn(x);
    lo = __float2half_rn(x - __half2float(hi));
}

/* Swizzled 16-byte unit offsets of the f16 blocks (see the file comment). */
template <int D> __device__ __forceinline__ int k_unit(int dim, int h) { return dim * 2 + (h ^ ((dim >> 2) & 1)); }
template <int D> __device__ __forceinline__ int v_unit(int t, int u) { return t * (D / 8) + (u ^ (t & 7)); }

/* Copies a page's K and V blocks of `head` into a ring slot: f16 blocks to
 * their swizzled units, int8 blocks raw. V positions >= valid are zeros. */
template <int D, int KF, int VF>
__device__ __forceinline__ void issue_page(const decode_params &p, int32_t page, int head, int valid, uint8_t *dst,
                                           int lane) {
    typedef ring<D, KF, VF> R;
    const uint8_t *kb = kvc__cu_k_block(p.arena, p.g, page, head);
    const uint8_t *vb = kvc__cu_v_block(p.arena, p.g, page, head);
#pragma unroll
    for (int i = 0; i < (R::KB / 16 + 31) / 32; i++) {
        const int c = lane + 32 * i;
        if (R::KB % 512 == 0 || c < R::KB / 16) {
            const int u = KF == KVC_CU_F16 ? k_unit<D>(c >> 1, c & 1) : c;
            cp_async16(dst + 16 * u, kb + 16 * c);
        }
    }
    uint8_t *vd = dst + R::KB;
#pragma unroll
    for (int i = 0; i < (R::VB / 16 + 31) / 32; i++) {
        const int c = lane + 32 * i;
        if (R::VB % 512 == 0 || c < R::VB / 16) {
            if (VF == KVC_CU_F16) {
                const int t = c / (D / 8), u = c % (D / 8);
                cp_async16(vd + 16 * v_unit<D>(t, u), vb + 16 * c, t < valid);
            } else if (VF == KVC_CU_I8) {
                /* codes: D / 16 units per position; the scales after them */
                const int t = c / (D / 16);
                cp_async16(vd + 16 * c, vb + 16 * c, c >= D || t < valid);
            } else {
                cp_async16(vd + 16 * c, vb + 16 * c);      /* int4 codes are finite */
            }
        }
    }
}

/* 16 int8 codes -> 16 halves, exactly: with the sign flipped a byte is
 * x + 128, and the half 0x64uu is 1024 + u. */
__device__ __forceinline__ void i8x16_to_h(const uint4 &w, uint4 &lo, uint4 &hi) {
    const uint32_t in[4] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u, w.z ^ 0x80808080u, w.w ^ 0x80808080u};
    uint32_t o[8];
    const __half2 off = __floats2half2_rn(1152.0f, 1152.0f);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        uint32_t a = __byte_perm(in[i], 0x64646464u, 0x4140), b = __byte_perm(in[i], 0x64646464u, 0x4342);
        __half2 ha = __hsub2(*reinterpret_cast<__half2 *>(&a), off);
        __half2 hb = __hsub2(*reinterpret_cast<__half2 *>(&b), off);
        o[2 * i] = *reinterpret_cast<uint32_t *>(&ha);
        o[2 * i + 1] = *reinterpret_cast<uint32_t *>(&hb);
    }
    lo = make_uint4(o[0], o[1], o[2], o[3]);
    hi = make_uint4(o[4], o[5], o[6], o[7]);
}

/* 8 int4 codes (nibble i = code i) -> 8 halves in order, exactly. */
__device__ __forceinline__ uint4 u4x8_to_h(uint32_t w) {
    const uint32_t even = w & 0x0f0f0f0fu, odd = (w >> 4) & 0x0f0f0f0fu;
    const uint32_t a = __byte_perm(even, odd, 0x5140), b = __byte_perm(even, odd, 0x7362);   /* bytes x0..x3, x4..x7 */
    uint32_t o[4] = {__byte_perm(a, 0x64646464u, 0x4140), __byte_perm(a, 0x64646464u, 0x4342),
                     __byte_perm(b, 0x64646464u, 0x4140), __byte_perm(b, 0x64646464u, 0x4342)};
    const __half2 off = __floats2half2_rn(1024.0f, 1024.0f);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __half2 h = __hsub2(*reinterpret_cast<__half2 *>(&o[i]), off);
        o[i] = *reinterpret_cast<uint32_t *>(&h);
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
}

/* int4 K (D rows of 8 bytes: 16 tokens) -> f16 swizzled: lane takes rows
 * 2 c and 2 c + 1, c = lane + 32 i. */
template <int D> __device__ __forceinline__ void convert_k_u4(const uint8_t *raw, uint8_t *dst, int lane) {
#pragma unroll
    for (int i = 0; i < D / 64; i++) {
        const int c = lane + 32 * i;
        const uint4 w = reinterpret_cast<const uint4 *>(raw)[c];
        reinterpret_cast<uint4 *>(dst)[k_unit<D>(2 * c, 0)] = u4x8_to_h(w.x);
        reinterpret_cast<uint4 *>(dst)[k_unit<D>(2 * c, 1)] = u4x8_to_h(w.y);
        reinterpret_cast<uint4 *>(dst)[k_unit<D>(2 * c + 1, 0)] = u4x8_to_h(w.z);
        reinterpret_cast<uint4 *>(dst)[k_unit<D>(2 * c + 1, 1)] = u4x8_to_h(w.w);
    }
}

/* int4 V (16 rows of D / 2 bytes) -> f16 swizzled: lane takes 32-number
 * units c = lane + 32 i (token c / (D / 32)). */
template <int D> __device__ __forceinline__ void convert_v_u4(const uint8_t *raw, uint8_t *dst, int lane) {
#pragma unroll
    for (int i = 0; i < D / 64; i++) {
        const int c = lane + 32 * i, t = c / (D / 32), u = 4 * (c % (D / 32));
        const uint4 w = reinterpret_cast<const uint4 *>(raw)[c];
        reinterpret_cast<uint4 *>(dst)[v_unit<D>(t, u)] = u4x8_to_h(w.x);
        reinterpret_cast<uint4 *>(dst)[v_unit<D>(t, u + 1)] = u4x8_to_h(w.y);
        reinterpret_cast<uint4 *>(dst)[v_unit<D>(t, u + 2)] = u4x8_to_h(w.z);
        reinterpret_cast<uint4 *>(dst)[v_unit<D>(t, u + 3)] = u4x8_to_h(w.w);
    }
}

/* int8 K (D, 16) raw -> f16 swizzled: lane takes dimensions lane + 32 i. */
template <int D> __device__ __forceinline__ void convert_k(const uint8_t *raw, uint8_t *dst, int lane) {
#pragma unroll
    for (int i = 0; i < D / 32; i++) {
        const int d = lane + 32 * i;
        uint4 lo, hi;
        i8x16_to_h(reinterpret_cast<const uint4 *>(raw)[d], lo, hi);
        reinterpret_cast<uint4 *>(dst)[k_unit<D>(d, 0)] = lo;
        reinterpret_cast<uint4 *>(dst)[k_unit<D>(d, 1)] = hi;
    }
}

/* int8 V (16, D) raw -> f16 swizzled: lane takes 16-code units lane + 32 i. */
template <int D> __device__ __forceinline__ void convert_v(const uint8_t *raw, uint8_t *dst, int lane) {
#pragma unroll
    for (int i = 0; i < D / 32; i++) {
        const int c = lane + 32 * i, t = c / (D / 16), u = 2 * (c % (D / 16));
        uint4 lo, hi;
        i8x16_to_h(reinterpret_cast<const uint4 *>(raw)[c], lo, hi);
        reinterpret_cast<uint4 *>(dst)[v_unit<D>(t, u)] = lo;
        reinterpret_cast<uint4 *>(dst)[v_unit<D>(t, u + 1)] = hi;
    }
}

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

/* Groups of an int4-per-token V block's numbers (1 for the other formats). */
template <int D, int VF> struct v_groups {
    static constexpr int value = kvc__cu_is_u4t(VF) ? D / kvc__cu_u4_group(VF) : 1;
};

/* A thread's share of the warp's state: query head gid = lane / 4 (when <
 * G), its dims 8 dn + 2 (lane % 4) + {0, 1}. o is summed in fp32 registers
 * (a page's mma starts from zero: the tensor cores' fp32 sums are not
 * IEEE-rounded and would drift over thousands of pages). */
template <int D, int NGV> struct warp_state {
    float m, l;                  /* m quad-uniform; l this thread's positions' share */
    float o[D / 8][2];
    float vmin[NGV];             /* int4 V: sum of weight * minimum per group, this thread's share */
};

__device__ __forceinline__ __half2 as_h2(uint32_t x) { return *reinterpret_cast<__half2 *>(&x); }
__device__ __forceinline__ uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t *>(&h); }

/* The A operand of O += P V from this thread's weights of positions 2 tig,
 * 2 tig + 1, 8 + 2 tig, 9 + 2 tig: fp16 hi in row gid, lo in row gid + 8. */
__device__ __forceinline__ void weights_operand(const float (&w)[4], uint32_t (&pa)[4]) {
    __half hi[4], lo[4];
#pragma unroll
    for (int e = 0; e < 4; e++) split_half(w[e], hi[e], lo[e]);
    pa[0] = pack_half2(hi[0], hi[1]);
    pa[1] = pack_half2(lo[0], lo[1]);
    pa[2] = pack_half2(hi[2], hi[3]);
    pa[3] = pack_half2(lo[2], lo[3]);
}

/* One page from its ring slot: kslot, vslot the K and V blocks as copied
 * (f16 swizzled; others raw); conv the warp's conversion block; valid:
 * positions of the page inside the context (>= 1). */
template <int D, int KF, int VF>
__device__ __forceinline__ void process_page(const uint8_t *kslot, const uint8_t *vslot, uint8_t *conv, int valid,
                                             const uint32_t (&qa)[D / 16][4], int lane,
                                             warp_state<D, v_groups<D, VF>::value> &st) {
    constexpr int NGV = v_groups<D, VF>::value;
    const int tig = lane & 3, mat = lane >> 3, row = lane & 7;
    const uint8_t *kf = kslot;
    if (KF != KVC_CU_F16) {
        if (KF == KVC_CU_I8) convert_k<D>(kslot, conv, lane);
        else convert_k_u4<D>(kslot, conv, lane);
        __syncwarp();
        kf = conv;
    }
    float s0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float sb[4] = {0.0f, 0.0f, 0.0f, 0.0f};   /* int4 K: q . min, in every column */
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t b[4];
        ldsm_x4_trans(b, kf + 16 * k_unit<D>(kk * 16 + (mat & 1) * 8 + row, mat >> 1));
        if constexpr (KF == KVC_CU_U4C) {
            /* scales (D) then minima (D), halves after the codes; this
             * thread's dims kk * 16 + 8 hc + 2 tig + {0, 1} */
            const __half2 *sc = reinterpret_cast<const __half2 *>(kslot + 8 * D);
            const uint32_t *mn = reinterpret_cast<const uint32_t *>(kslot + 10 * D);
            uint32_t qs[4];
#pragma unroll
            for (int hc = 0; hc < 2; hc++) {
                const __half2 s2 = sc[kk * 8 + hc * 4 + tig];
                const __half2 hi = as_h2(qa[kk][2 * hc]), lo = as_h2(qa[kk][2 * hc + 1]);
                const __half2 p = __hmul2(hi, s2);
                const __half2 e = __hfma2(hi, s2, __hneg2(p));
                qs[2 * hc] = as_u32(p);
                qs[2 * hc + 1] = as_u32(__hfma2(lo, s2, e));
            }
            mma16816(s0, qs, b[0], b[1]);
            mma16816(s1, qs, b[2], b[3]);
            mma16816(sb, qa[kk], mn[kk * 8 + tig], mn[kk * 8 + 4 + tig]);
        } else {
            mma16816(s0, qa[kk], b[0], b[1]);
            mma16816(s1, qa[kk], b[2], b[3]);
        }
    }
    /* positions 2 tig, 2 tig + 1, 8 + 2 tig, 9 + 2 tig of query gid */
    float x[4] = {s0[0] + s0[2], s0[1] + s0[3], s1[0] + s1[2], s1[1] + s1[3]};
    if constexpr (KF == KVC_CU_U4C) {
        const float base = sb[0] + sb[2];
#pragma unroll
        for (int e = 0; e < 4; e++) x[e] += base;
    }
    if constexpr (KF == KVC_CU_I8) {
        const uint8_t *ks = kslot + 16 * D;
        const float2 a = __half22float2(reinterpret_cast<const __half2 *>(ks)[tig]);
        const float2 c = __half22float2(reinterpret_cast<const __half2 *>(ks)[4 + tig]);
        x[0] *= a.x, x[1] *= a.y, x[2] *= c.x, x[3] *= c.y;
    }
#pragma unroll
    for (int e = 0; e < 4; e++) {
        const int t = (e >> 1) * 8 + 2 * tig + (e & 1);
        if (t >= valid) x[e] = -INFINITY;
    }
    float mx = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
    mx = fmaxf(mx, __shfl_xor_sync(KVC__CU_FULL, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(KVC__CU_FULL, mx, 2));
    const float m_new = fmaxf(st.m, mx);
    const float alpha = exp2f(st.m - m_new);   /* 0 on the first page */
    st.m = m_new;
    float pr[4];
#pragma unroll
    for (int e = 0; e < 4; e++) pr[e] = exp2f(x[e] - m_new);
    st.l = st.l * alpha + ((pr[0] + pr[1]) + (pr[2] + pr[3]));

    const uint8_t *vf = vslot;
    if (VF != KVC_CU_F16) {
        __syncwarp();                          /* K's reads of conv are done */
        if (VF == KVC_CU_I8) convert_v<D>(vslot, conv, lane);
        else convert_v_u4<D>(vslot, conv, lane);
        __syncwarp();
        vf = conv;
    }
    uint32_t pa[NGV][4];
    if constexpr (kvc__cu_is_u4t(VF)) {
        /* scales (NGV, 16) then minima (NGV, 16), halves after the codes */
        const __half2 *vsc = reinterpret_cast<const __half2 *>(vslot + 8 * D), *vmn = vsc + NGV * 8;
#pragma unroll
        for (int gi = 0; gi < NGV; gi++) {
            const float2 sa = __half22float2(vsc[gi * 8 + tig]), sc = __half22float2(vsc[gi * 8 + 4 + tig]);
            const float2 ma = __half22float2(vmn[gi * 8 + tig]), mc = __half22float2(vmn[gi * 8 + 4 + tig]);
            const float sv[4] = {sa.x, sa.y, sc.x, sc.y}, mv[4] = {ma.x, ma.y, mc.x, mc.y};
            float w[4], msum = 0.0f;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const bool in = (e >> 1) * 8 + 2 * tig + (e & 1) < valid;   /* past it: parameters may be anything */
                w[e] = in ? pr[e] * sv[e] : 0.0f;
                msum += in ? pr[e] * mv[e] : 0.0f;
            }
            st.vmin[gi] = fmaf(st.vmin[gi], alpha, msum);
            weights_operand(w, pa[gi]);
        }
    } else {
        if constexpr (VF == KVC_CU_I8) {
            const uint8_t *vs = vslot + 16 * D;
            const float2 a = __half22float2(reinterpret_cast<const __half2 *>(vs)[tig]);
            const float2 c = __half22float2(reinterpret_cast<const __half2 *>(vs)[4 + tig]);
            pr[0] *= a.x, pr[1] *= a.y, pr[2] *= c.x, pr[3] *= c.y;
        }
        weights_operand(pr, pa[0]);
    }
#pragma unroll
    for (int dn2 = 0; dn2 < D / 16; dn2++) {
        const int gi = kvc__cu_is_u4t(VF) ? dn2 * 16 / kvc__cu_u4_group(VF) : 0;
        uint32_t b[4];
        ldsm_x4_trans(b, vf + 16 * v_unit<D>((mat & 1) * 8 + row, dn2 * 2 + (mat >> 1)));
        float o0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, o1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma16816(o0, pa[gi], b[0], b[1]);
        mma16816(o1, pa[gi], b[2], b[3]);
#pragma unroll
        for (int e = 0; e < 2; e++) {
            st.o[2 * dn2][e] = fmaf(st.o[2 * dn2][e], alpha, o0[e] + o0[e + 2]);
            st.o[2 * dn2 + 1][e] = fmaf(st.o[2 * dn2 + 1][e], alpha, o1[e] + o1[e + 2]);
        }
    }
}

/* Block-wide: counts this block's arrival at *counter; true in the block
 * that arrives last of `expected` (which resets the counter for the next
 * launch). Orders this block's earlier workspace writes before the count and
 * the last block's later reads after it. */
__device__ __forceinline__ bool last_arrival(int *counter, int expected, int &s_last) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int prev = atomicAdd(counter, 1);
        s_last = prev == expected - 1;
        if (s_last) *counter = 0;
    }
    __syncthreads();
    const bool last = s_last;
    if (last) __threadfence();
    return last;
}

/* Block-wide merge of `count` partials (acc, m, l) of a (sequence, head) in
 * workspace slots unit + first + i * stride: into out (normalized) when
 * final, else into slot unit + first as one partial. */
template <int D, int G>
__device__ void merge_partials(const decode_params &p, float *smem, int64_t unit, int first, int count, int stride,
                               bool final, float *out) {
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    float *s_w = smem;                         /* (count, G): m, then the partial's weight */
    float *s_ls = smem + count * G;            /* (count, G) */
    float *s_part = smem + ((2 * count * G + 3) & ~3);   /* (NW, G * D), 16-byte aligned */
    for (int e = tid; e < count * G; e += NT) {
        const int s = e / G, g = e - s * G;
        const int64_t slot = unit + first + (int64_t)s * stride;
        s_w[e] = __ldcg(p.ws_ml + slot * 2 * G + g);
        s_ls[e] = __ldcg(p.ws_ml + slot * 2 * G + G + g);
    }
    __syncthreads();
    for (int g = warp; g < G; g += NW) {       /* warp w: weights of heads w, w + NW */
        float M = -INFINITY;
        for (int s = lane; s < count; s += 32) M = fmaxf(M, s_w[s * G + g]);
#pragma unroll
        for (int mk = 16; mk >= 1; mk >>= 1) M = fmaxf(M, __shfl_xor_sync(KVC__CU_FULL, M, mk));
        float Ls = 0.0f;
        for (int s = lane; s < count; s += 32) Ls += exp2f(s_w[s * G + g] - M) * s_ls[s * G + g];
#pragma unroll
        for (int mk = 16; mk >= 1; mk >>= 1) Ls += __shfl_xor_sync(KVC__CU_FULL, Ls, mk);
        const float inv = final ? 1.0f / Ls : 1.0f;
        for (int s = lane; s < count; s += 32) s_w[s * G + g] = exp2f(s_w[s * G + g] - M) * inv;
        if (!final && lane == 0) {
            p.ws_ml[(unit + first) * 2 * G + g] = M;
            p.ws_ml[(unit + first) * 2 * G + G + g] = Ls;
        }
    }
    __syncthreads();
    constexpr int NE4 = G * D / 4;             /* float4s of one partial's (G, D) */
    constexpr int PER = (NE4 + 31) / 32;
    float4 a[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) a[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 4
    for (int s = warp; s < count; s += NW) {
        const float4 *src = reinterpret_cast<const float4 *>(p.ws_acc + (unit + first + (int64_t)s * stride) * G * D);
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
    float *dst = final ? out : p.ws_acc + (unit + first) * G * D;
    for (int e = tid; e < G * D; e += NT) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) o += s_part[w * G * D + e];
        dst[e] = o;
    }
}

/* Blocks per multiprocessor the register budget is set for: head_dim 128
 * at 168 registers (3; int4 would take ~180 and fit 2), head_dim 64 at 102
 * (5; int4 at 128, 4). */
constexpr int min_blocks(int D, int KF) { return D == 128 ? 3 : KF == KVC_CU_U4C ? 4 : 5; }

template <int D, int G, int KF, int VF>
__global__ void __launch_bounds__(NT, min_blocks(D, KF)) decode_kernel(const decode_params p) {
    typedef ring<D, KF, VF> R;
    constexpr int B = KVC__CU_B;
    constexpr int NGV = v_groups<D, VF>::value;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *smem = reinterpret_cast<float *>(smem_raw);
    __shared__ int s_last;
    const int H = p.n_kv_head;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
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

    warp_state<D, NGV> st;
    st.m = -INFINITY;
    st.l = 0.0f;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) st.o[dn][0] = st.o[dn][1] = 0.0f;
#pragma unroll
    for (int gi = 0; gi < NGV; gi++) st.vmin[gi] = 0.0f;

    /* A fragments of the scaled query: rows gid (fp16 hi) and gid + 8 (lo);
     * the query's loads are issued before the block table's and the first
     * pages', so their latencies overlap */
    float2 qv[D / 16][2];
    {
        const float *q = p.q + (int64_t)seq * p.q_stride + (int64_t)(head * G + min(gid, G - 1)) * D;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int hc = 0; hc < 2; hc++)
                qv[kk][hc] = gid < G ? *reinterpret_cast<const float2 *>(q + kk * 16 + hc * 8 + 2 * tig)
                                     : make_float2(0.0f, 0.0f);
    }
    /* this warp's pages first, first + stride, ... through its ring: S - 1
     * pages in flight while one computes (one commit group per page, empty
     * groups past the end keep the count uniform) */
    uint8_t *my = smem_raw + warp * R::WARP_BYTES;
    uint8_t *conv = my + R::S * R::PAGE;
    page_ids ids(bt, first, stride, end, lane);
#pragma unroll
    for (int j = 0; j < R::S - 1; j++) {
        if (j < n_mine)
            issue_page<D, KF, VF>(p, ids.next(), head, ctx - (first + j * stride) * B, my + j * R::PAGE, lane);
        cp_async_commit();
    }
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
        for (int hc = 0; hc < 2; hc++) {
            __half h0, l0, h1, l1;
            split_half(qv[kk][hc].x * p.qscale, h0, l0);
            split_half(qv[kk][hc].y * p.qscale, h1, l1);
            qa[kk][2 * hc] = pack_half2(h0, h1);
            qa[kk][2 * hc + 1] = pack_half2(l0, l1);
        }
    int slot = 0, slot_next = R::S - 1;
    for (int j = 0; j < n_mine; j++) {
        const int jn = j + R::S - 1;
        if (jn < n_mine)
            issue_page<D, KF, VF>(p, ids.next(), head, ctx - (first + jn * stride) * B, my + slot_next * R::PAGE,
                                  lane);
        cp_async_commit();
        cp_async_wait<R::S - 1>();
        __syncwarp();
        const uint8_t *kb = my + slot * R::PAGE;
        process_page<D, KF, VF>(kb, kb + R::KB, conv, ctx - (first + j * stride) * B, qa, lane, st);
        __syncwarp();                          /* the slot and conv are refilled next iteration */
        slot = slot + 1 == R::S ? 0 : slot + 1;
        slot_next = slot_next + 1 == R::S ? 0 : slot_next + 1;
    }

    /* finish the warp: l (and the int4 minima sums) over the quad, hi + lo rows */
    st.l += __shfl_xor_sync(KVC__CU_FULL, st.l, 1);
    st.l += __shfl_xor_sync(KVC__CU_FULL, st.l, 2);
    if constexpr (kvc__cu_is_u4t(VF)) {
#pragma unroll
        for (int gi = 0; gi < NGV; gi++) {
            st.vmin[gi] += __shfl_xor_sync(KVC__CU_FULL, st.vmin[gi], 1);
            st.vmin[gi] += __shfl_xor_sync(KVC__CU_FULL, st.vmin[gi], 2);
        }
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
            const float mv = st.vmin[dn * 8 / kvc__cu_u4_group(VF)];
            st.o[dn][0] += mv;
            st.o[dn][1] += mv;
        }
    }
    if (p.per_warp) {
        if (gid < G) {
            const float inv = 1.0f / st.l;
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++)
                *reinterpret_cast<float2 *>(out + gid * D + dn * 8 + 2 * tig) =
                    make_float2(st.o[dn][0] * inv, st.o[dn][1] * inv);
        }
        return;
    }
    __syncthreads();                           /* the rings are reused below */
    float *s_acc = smem;                       /* (NW, G, D) */
    float *s_m = smem + NW * G * D;            /* (NW, G) */
    float *s_l = s_m + NW * G;                 /* (NW, G) */
    if (gid < G) {
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
            s_acc[(warp * G + gid) * D + dn * 8 + 2 * tig] = st.o[dn][0];
            s_acc[(warp * G + gid) * D + dn * 8 + 2 * tig + 1] = st.o[dn][1];
        }
        if (tig == 0) {
            s_m[warp * G + gid] = st.m;
            s_l[warp * G + gid] = st.l;
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

    /* the last split of a (sequence, head) to finish merges them all; past
     * FAN splits, the last of each group of FAN merges the group into its
     * first slot and the last group to finish merges the groups */
    int *counters = p.counters + ((int64_t)seq * H + head) * (1 + FAN);
    const int n_groups = (n_active + FAN - 1) / FAN;
    int count = n_active, step = 1;
    if (n_groups > 1) {
        const int grp = split / FAN, g_first = grp * FAN, g_count = min(FAN, n_active - g_first);
        if (!last_arrival(counters + 1 + grp, g_count, s_last)) return;
        merge_partials<D, G>(p, smem, unit, g_first, g_count, 1, false, out);
        count = n_groups;
        step = FAN;
    }
    if (!last_arrival(counters, count, s_last)) return;
    merge_partials<D, G>(p, smem, unit, 0, count, step, true, out);
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
    const size_t f2 = ((size_t)2 * FAN * G + 4 + (size_t)NW * G * D) * sizeof(float);
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
        typedef std::integral_constant<int, KVC_CU_U4C> U4C;
        if (L->k_fmt == KVC_CU_U4C && L->v_fmt == KVC_CU_U4T32)
            return by_g(d, U4C(), std::integral_constant<int, KVC_CU_U4T32>());
        if (L->k_fmt == KVC_CU_U4C && L->v_fmt == KVC_CU_U4T64)
            return by_g(d, U4C(), std::integral_constant<int, KVC_CU_U4T64>());
        return KVC_ERR_INVAL;
    };
    if (L->head_dim == 64) return by_fmt(std::integral_constant<int, 64>());
    if (L->head_dim == 128) return by_fmt(std::integral_constant<int, 128>());
    return KVC_ERR_INVAL;
}

/* The plan (from the sweeps in notes/gpu.md): a warp per (sequence, kv
 * head) when there are pairs for at least a quarter of the resident warps (f16;
 * quantized K and V, whose warps do more work per byte: twice the resident
 * warps); otherwise about two blocks per multiprocessor (quantized: four),
 * but at least 16 pages per warp (a ring fill and a merge cost about as much
 * as a dozen pages); with fewer pairs than multiprocessors (long single
 * sequences), as many splits as fit in one wave of resident blocks (a
 * second, partial wave costs a whole block's time; f16 at most FAN, one
 * merge level), at least 4 pages a warp. */
plan make_plan(const kvc_cu_layout *L, int n_seqs, int max_ctx, int n_rep) {
    plan pl;
    const int pages = max_ctx > 0 ? (max_ctx + L->block_size - 1) / L->block_size : 1;
    const long pairs = (long)(n_seqs > 0 ? n_seqs : 1) * L->n_kv_head;
    int per_sm = with_instance(L, n_rep, [](auto d, auto g, auto kf, auto vf) {
        return blocks_per_sm<decltype(d)::value, decltype(g)::value, decltype(kf)::value, decltype(vf)::value>();
    });
    if (per_sm < 1) per_sm = 1;
    const long resident = (long)sm_count() * per_sm;
    const bool quantized = L->k_fmt != KVC_CU_F16 && L->v_fmt != KVC_CU_F16;
    int pps = g_pages_per_split;
    pl.per_warp = 0;
    const bool many = quantized ? pairs >= 2 * resident * NW : pairs * 4 >= resident * NW;
    if (g_warp_per_seq > 0 || (g_warp_per_seq == 0 && pps == 0 && many)) {
        pl.per_warp = 1;
        pl.pps = pages;
        pl.n_splits = 1;
        return pl;
    }
    if (pps <= 0 && pairs < sm_count()) {
        long splits = resident / pairs > 1 ? resident / pairs : 1;
        if (!quantized && splits > FAN) splits = FAN;    /* f16: one merge level beats more blocks */
        pps = (int)((pages + splits - 1) / splits);
        if (pps < 4 * NW) pps = 4 * NW < pages ? 4 * NW : pages;
    } else if (pps <= 0) {
        const long splits = ((quantized ? 4L : 2L) * sm_count() + pairs - 1) / pairs;
        pps = (int)((pages + splits - 1) / splits);
        if (pps < 16 * NW) pps = 16 * NW < pages ? 16 * NW : pages;
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
    w.ml = align256(units * (1 + FAN) * sizeof(int));
    w.acc = w.ml + align256(units * splits * 2 * n_rep * sizeof(float));
    w.total = w.acc + align256(units * splits * n_rep * L->head_dim * sizeof(float));
    return w;
}

} // namespace

extern "C" void kvc_cu_set_decode_tuning(int pages_per_split, int warp_per_sequence) {
    g_pages_per_split = pages_per_split > 0 ? pages_per_split : 0;
    g_warp_per_seq = warp_per_sequence;
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
    if ((a->q_stride | a->out_stride) & 1)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: decode: q_stride %lld / out_stride %lld must be even",
                     (long long)a->q_stride, (long long)a->out_stride);
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
