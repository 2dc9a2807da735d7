/* decode.cu: paged decode attention on the GPU (kvc_cu_decode): one query
 * token per sequence, K/V read in place from compressed pages, the n_rep
 * query heads of a kv head together (each page is read once per step), on
 * tensor cores.
 *
 * Each warp streams its pages through its own ring of S shared memory
 * slots, S - 1 in flight while one computes: the f16 path by cp.async (16
 * bytes a lane, S = 3: deeper cp.async rings were measured slower), the
 * register path by the bulk copy engine (cp.async.bulk: lane 0 copies each
 * K and V block whole and the slot's mbarrier counts the bytes in; S = 2
 * at head_dim <= 64 with one head a warp (int8 and int4), else 3: with few
 * slots a warp per launch, a shallower ring gets every warp's first slot in
 * sooner and is faster, notes/gpu.md session 5).
 *
 * Per slot it computes the scores of its G query heads with mma.sync
 * m16n8k16 (fp16 in, fp32 accumulate), an online softmax (running max m, sum
 * l per head) and O += P V with a second mma. The 16 rows of the mma hold
 * only G <= 8 query heads, so rows 8..15 carry the rounding remainder: row g
 * holds fp16(x) and row g + 8 fp16(x - fp16(x)) of the scaled query (and of
 * the weights), and the two rows' results are added in fp32. The products
 * are then those of ~22-bit operands: fp32-like accuracy at no extra
 * tensor-core work (K/V numbers are exact in fp16: f16 pages as stored, int8
 * and int4 codes as integers, their scales and minima applied in fp32 or
 * folded into the hi + lo operands).
 *
 * Two paths (chosen by the K/V formats, reg_path):
 *   - f16 K or V, or int4 on one side only (f16/f16, f16/int8, int8/f16,
 *     f16 or int8 keys with int4 values, int4 keys with f16 or int8
 *     values): one page a slot. f16 blocks land in swizzled 16-byte units
 *     that the transposing ldmatrix reads without bank conflicts, the
 *     layout of the Hopper tensor copy's 128-byte swizzle (unit c of
 *     128-byte line L at c ^ (L & 7)):
 *       f16 K (D, 16): unit (dim, h) of line dim / 4, c = 2 (dim % 4) + h
 *       f16 V (16, D): unit (t, u) of line t of 64-number half u / 8 (D 32:
 *         the 64-byte swizzle of 64-byte rows)
 *     with an f16 side at head_dim >= 64 a page comes by the copy engine,
 *     one lane issuing it, an mbarrier a slot: f16 blocks as boxes of
 *     tensor maps (decode_params.tk, tv), the other side's as a bulk copy;
 *     otherwise (int4 beside int8, head_dim 32) by cp.async, a lane per 16
 *     bytes;
 *     an int8 block beside an f16 one is copied raw and its codes converted
 *     (exactly: small integers) into a per-warp f16 block of that layout;
 *     an int4 block is copied raw and read as the register path reads it
 *     (u4_scores, u4_values: its scores land on the same positions of a
 *     thread as ldmatrix's, 2t, 2t + 1, 2t + 8, 2t + 9).
 *   - both quantized (int8/int8, int4 keys per channel / values per token):
 *     two pages a slot (int8 at head_dim <= 64: four, two pairs, see
 *     ring::I8W), raw blocks; the codes go from shared memory into
 *     registers and are turned into mma operands there (byte permutes and
 *     the 0x6400 trick: the half 0x64XX is 1024 + XX), no f16 staging. The
 *     mma's reduction index is free to permute as long as the query uses the
 *     same order, so each thread reads whole 32-bit words:
 *       int8 K (D, 16): thread (g, t) reads word g & 3 (tokens 4 (g & 3) ..
 *         + 3) of page g >> 2 of the dimension rows t + 4 i (+ 16 kk); byte
 *         j of two rows makes a half2 of n-tile j = 0..3 (column g: token
 *         16 (g >> 2) + 4 (g & 3) + j), two pages' 32 tokens in one mma.
 *         Thread t then holds the scores of tokens 8 (t & 1) .. + 7 of page
 *         t >> 1, whose V rows it reads for the P V products.
 *       int4 K (D rows of 8 bytes, scale and minimum per channel): the
 *         page's query is q * scale_d (formed in halves without rounding
 *         loss: hi * s = p + e, p = fp16(hi s), e = fma(hi, s, -p), lo * s + e
 *         is the new lo), so an mma covers one page: thread g reads the
 *         byte (g >> 1) + 4 (g & 1) (tokens 2 of it) of the rows 4 t + i (+ 16
 *         kk); its low nibbles make the even-token n-tile, its high nibbles
 *         (16 c + 1024, scaled back exactly) the odd one; q . min comes from
 *         one more mma whose B columns are all the page's minima. Thread t
 *         then holds tokens 2 t, 2 t + 1, 2 t + 8, 2 t + 9 of each page.
 *       int8 V (16, D): thread g reads dims (D / 8) g .. + D / 8 of its
 *         tokens' rows; byte permutes pair two tokens per half2.
 *       int4 V (16 rows of D / 2 bytes, scale and minimum per token and
 *         group of 32 or 64 numbers): an n-tile stays inside one group
 *         (column g: dim GS gamma + (GS / 8) g + k); one weight operand per
 *         group (p_t scale_tg folded into p's hi + lo halves as for int4 K)
 *         and the minima's share p_t min_tg from one mma per group whose B
 *         columns are the minima, added to the group's numbers at the end.
 *   Positions past the context (only in a warp's last slot: the context's
 *   last page is always the last page of the warp that has it) and a slot's
 *   missing second page are masked: scores -inf, and weights, scales and
 *   minima selected to 0 (what lies there may be anything, inf included).
 *
 * Three ways to share the work (make_plan picks one):
 *   - a warp per (sequence, kv head): each warp takes one pair, all its
 *     pages, and writes the output itself;
 *   - two warps per pair, two pairs a block: each warp every other page, the
 *     two merged in shared memory;
 *   - split: a thread block takes one (sequence, kv head, split), a split
 *     being pages_per_split consecutive pages, its NW warps every NW-th
 *     page; warps merge in shared memory. When a pair has 2..8 splits and
 *     the grid fills the GPU in one wave they run as one thread block
 *     cluster and split 0 merges the others' partials from their shared
 *     memory (cluster_merge, cluster_mode); otherwise each
 *     writes (acc, m, l) to the workspace and the last block to end its
 *     page loops (elected by a counter per pair) merges them once the others
 *     have published theirs, in the same launch. Beyond FAN splits
 *     they merge in two levels: the last block of each group of FAN splits
 *     merges the group into its first slot, and the last group merger to
 *     arrive merges the groups (no block reads more than FAN).
 * Scores are kept in log2 units (q pre-multiplied by scale * log2 e). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <cooperative_groups.h>
#include <type_traits>

#include "cache/cuda/common.cuh"

/* Built with -DKVC_CU_TIMELINE (`make BUILD=build-gpu-tl NVCCFLAGS="-O3
 * -DKVC_CU_TIMELINE" gpu-bins`), every decode block records when it starts
 * (mark 0), its SM (1), when warp 0's first slot is in (2), when each warp's
 * page loop ends (3..6) and when it exits (7), and (split blocks merged
 * through the workspace) when its partial is stored (8) and, in the last
 * block of a group or of all, when it starts merging (9: a group, 10: all),
 * in globaltimer nanoseconds;
 * `gpu_bench --timeline` reads one launch's marks (notes/gpu.md session 7:
 * where a launch's time goes, SM by SM). Off, the marks compile to nothing. */
#ifdef KVC_CU_TIMELINE
constexpr int TL_BLOCKS = 16384;
constexpr int TL_MARKS = 12;
__device__ unsigned long long kvc__cu_tl[TL_MARKS * TL_BLOCKS];
extern "C" int kvc__cu_timeline_read(unsigned long long *dst, size_t n) {
    return (int)cudaMemcpyFromSymbol(dst, kvc__cu_tl, (n < TL_MARKS * TL_BLOCKS ? n : TL_MARKS * TL_BLOCKS) * sizeof *dst);
}
extern "C" int kvc__cu_timeline_clear(void) {
    void *p;
    if (cudaGetSymbolAddress(&p, kvc__cu_tl) != cudaSuccess) return -1;
    return (int)cudaMemset(p, 0, sizeof kvc__cu_tl);
}
__device__ __forceinline__ void tl_mark(int k, unsigned long long v) {
    const int b = blockIdx.x + gridDim.x * blockIdx.y;
    if (b < TL_BLOCKS) kvc__cu_tl[TL_MARKS * b + k] = v;
}
__device__ __forceinline__ unsigned long long tl_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
__device__ __forceinline__ unsigned tl_smid() {
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    return sm;
}
struct tl_exit {
    __device__ ~tl_exit() {
        if (threadIdx.x == 0) tl_mark(7, tl_now());
    }
};
#define TL(k, thread)                                          \
    do {                                                       \
        if (threadIdx.x == (thread)) tl_mark((k), tl_now());   \
    } while (0)
#define TL_START()                                             \
    tl_exit tl_exit_;                                          \
    if (threadIdx.x == 0) tl_mark(0, tl_now()), tl_mark(1, tl_smid())
#else
#define TL(k, thread) ((void)0)
#define TL_START() ((void)0)
#endif

namespace {

constexpr int NW = 4;            /* warps per block */
constexpr int NT = NW * 32;
constexpr int FAN = 64;          /* partials one block merges */
constexpr int MAX_SPLITS = FAN * FAN;
constexpr int MAX_CLUSTER = 8;   /* split blocks a cluster: the portable cluster size */

/* Floats a split's (m, l) takes in the workspace: 2 G rounded up to whole
 * 16-byte units, so that a merge copies them with cp.async like the rest. */
__host__ __device__ constexpr int ml_stride(int G) { return (2 * G + 3) & ~3; }

int g_pages_per_split = 0;       /* kvc_cu_set_decode_tuning */
int g_warp_per_seq = 0;
int g_wide = -2;                 /* kvc_cu_set_decode_wide; -2: not set, the environment's */

/* Whether the wide int8 instance (ring::I8W) is taken: -1 as planned
 * (make_plan), 0 never, 1 wherever it is compiled; KVC_CU_WIDE=0 / 1 in the
 * environment where kvc_cu_set_decode_wide was not called. */
int wide_mode() {
    if (g_wide == -2) {
        const int v = kvc__cu_env("KVC_CU_WIDE", -1);
        g_wide = v < 0 ? -1 : v > 0 ? 1 : 0;
    }
    return g_wide;
}

/* The register path: int8 K and V, or int4 keys per channel with int4
 * values per token; every other pairing (f16 on a side, or int8 beside
 * int4) takes the f16 path, a page a slot. */
__host__ __device__ constexpr bool reg_path(int kf, int vf) {
    return (kf == KVC_CU_I8 && vf == KVC_CU_I8) || (kf == KVC_CU_U4C && kvc__cu_is_u4t(vf));
}

/* The instances compiled twice, W 0 and 1 (ring::I8W): int8 / int8 at
 * head_dim <= 64, one head a warp. */
__host__ __device__ constexpr bool wide_ok(int D, int KF, int VF, int NH) {
    return KF == KVC_CU_I8 && VF == KVC_CU_I8 && D <= 64 && NH == 1;
}

/* A warp's shared memory: S slots of P pages (K block then V block, the
 * global block sizes), then (f16 path, one side int8) one f16 block that
 * int8 codes are converted into (K's, then V's), or (register path) the
 * slots' mbarriers. */
template <int D, int KF, int VF, int NH = 1, int W = 0> struct ring {
    static constexpr bool BULK = reg_path(KF, VF);
    static constexpr bool F16_SIDE = KF == KVC_CU_F16 || VF == KVC_CU_F16;
    /* the f16 path's pairs with an f16 side at head_dim >= 64: f16 blocks by
     * tensor copies (swizzled by the copy engine), the other side's by a
     * bulk copy; else cp.async (session 16: at head_dim 32, rank-32
     * coefficients, tensor copies took SmolLM2 1 x 32k 17.6 -> 19.8 us, and
     * bulk copies of int4 keys beside int8 values a page a slot 22.4 ->
     * 26.8 us at 64 x 2k) */
    static constexpr bool TMA = !BULK && F16_SIDE && D >= 64;
    static constexpr bool MB = BULK || TMA;           /* slots counted by mbarriers (else cp.async groups) */
    static constexpr int KB = kvc__cu_block_bytes(KF, D);
    static constexpr int VB = kvc__cu_block_bytes(VF, D);
    /* V block's offset in a page, and the page's bytes in a slot (an f16
     * block 1024-byte aligned: the 128-byte swizzle's period) */
    static constexpr int VOFF = TMA && VF == KVC_CU_F16 ? (KB + 1023) & ~1023 : KB;
    /* int8 / int8 at head_dim 128 (I8T): a page's K and V blocks each land
     * at their source's offset mod 128 in their half of the slot page (K in
     * [0, KA), V in [KA, 2 KA); decode_kernel's kb_off, vb_off), in slots
     * 128-byte aligned, so the bulk copy engine moves whole 128-byte lines:
     * Llama-8B int8 64 x 2k 79.3 -> 70.4 us, 256 x 512 84.8 -> 76.8 (session
     * 23, against packed pages: a page right after the other). At head_dim
     * 64 the same took SmolLM2's decode from 19.8 to 20.6 us in one build
     * (nothing in another), so there the pages stay packed (notes/gpu.md
     * "Session 23"). */
    static constexpr bool I8T = KF == KVC_CU_I8 && VF == KVC_CU_I8 && D > 64;
    static constexpr int KA = ((KB + 127) & ~127) + 128;
    static constexpr int PAGE = TMA ? (VOFF + VB + 1023) & ~1023 : I8T ? 2 * KA : KB + VB;
    /* pages a slot: the wide instance of int8 / int8 at head_dim <= 64 (W,
     * wide_ok) takes four, two pairs whose scores are independent until one
     * softmax step: half the slots a warp, each with its fixed chain (the
     * wait, the copies' issue, the softmax) once. It needs ~150 registers,
     * so 3 blocks a multiprocessor (min_blocks) instead of 4; the plan takes
     * it where its grid fits that and costs no more (make_plan): SmolLM2 int8
     * 64 x 2k 19.9 -> 18.0 us, 256 x 512 19.3 -> 17.8, hybrid:r32 (int8 at
     * head_dim 32) 20.3 -> 19.9 (notes/gpu.md "Session 24"). */
    static constexpr bool I8W = W && wide_ok(D, KF, VF, NH);
    static constexpr int P = BULK ? (I8W ? 4 : 2) : 1;
    static constexpr int SLOT = P * PAGE;
    static constexpr int S = !BULK ? 3 : D <= 64 && NH == 1 ? 2 : 3;
    static constexpr int CONV = !BULK && (KF == KVC_CU_I8 || VF == KVC_CU_I8) ? 32 * D : 0;
    /* bulk: a warp's mbarriers after its slots (keeping the next warp's
     * slots 16-byte aligned, 128 for I8T); tensor copies: every warp's after
     * all slots, the slots 1024-byte aligned (the 128-byte swizzle's period) */
    static constexpr int MBAR = BULK ? (I8T ? (8 * S + 127) & ~127 : (8 * S + 15) & ~15) : 0;
    static constexpr int WARP_BYTES = S * SLOT + CONV + MBAR;
    /* alignment slack (and the tensor copies' mbarriers) */
    static constexpr int TMA_EXTRA = TMA ? 1024 + ((NW * 8 * S + 15) & ~15) : I8T ? 128 : 0;
    static constexpr int BYTES = NW * WARP_BYTES + TMA_EXTRA;   /* per block */
    static_assert(SLOT % 16 == 0 && WARP_BYTES % 16 == 0, "bulk copies need 16-byte aligned slots");
    static_assert(!TMA || WARP_BYTES % 1024 == 0, "swizzled tensor copies need 1024-byte aligned blocks");
    static_assert(!I8T || (WARP_BYTES % 128 == 0 && PAGE % 128 == 0), "I8T slots are 128-byte aligned");
};

/* Instances that may run their splits as clusters (the ones that fit >= 3
 * blocks a multiprocessor, where clusters were measured faster). */
template <int D, int NH> __host__ __device__ constexpr bool cluster_ok() { return D <= 64 && NH == 1; }

/* A block's shared memory: the rings, reused after the page loops for the
 * warps' merge and the workspace merge; then (cluster_ok) MAX_CLUSTER
 * partials that a cluster's blocks store into rank 0's (cluster_merge). */
template <int D, int G, int KF, int VF, int NH, int W> __host__ __device__ constexpr size_t smem_base() {
    constexpr size_t GT = NH * G;
    constexpr size_t f1 = NW * GT * (D + 2) * sizeof(float);
    constexpr size_t f2 = (FAN * ml_stride(GT) + NW * GT * D) * sizeof(float);
    constexpr size_t r = ring<D, KF, VF, NH, W>::BYTES;
    constexpr size_t m = r > f1 ? (r > f2 ? r : f2) : (f1 > f2 ? f1 : f2);
    return (m + 15) & ~(size_t)15;
}
template <int D, int G, int KF, int VF, int NH, int W> __host__ __device__ constexpr size_t smem_bytes() {
    return smem_base<D, G, KF, VF, NH, W>() +
           (cluster_ok<D, NH>() ? (size_t)MAX_CLUSTER * NH * G * (D + 2) * sizeof(float) : 0);
}

struct decode_params {
    /* f16 sides of the f16 path (ring::TMA): the layer's K and V blocks as
     * tensors for the copy engine (kvc__cu_f16_maps): K (16 tokens, D) as 128-byte
     * lines (4 dimensions each) of (pages, heads), V (D, 16 tokens) of
     * (pages, heads); heads 1 where a latent block is every head's
     * (g.*_block_bytes 0) */
    CUtensorMap tk, tv;
    const uint8_t *arena;        /* (n_pages, page_bytes) */
    kvc__cu_geom g;
    const int32_t *bt;           /* (n_seqs, bt_stride) */
    int bt_stride;
    const int32_t *ctx_lens;     /* (n_seqs) or NULL: ctx0 + s */
    int ctx0;
    int n_kv_head;
    int ppb;                     /* pairs a block: 4 warp per pair, 2 two warps per pair, 1 split blocks */
    int64_t n_pairs;             /* n_seqs * n_kv_head */
    int pps;                     /* pages per split */
    int n_splits;                /* gridDim.y */
    uint32_t zero;               /* 0, unknown to the compiler: keeps the code conversions' constants in
                                  * registers (as immediates each conversion takes two instructions) */
    float qscale;                /* scale * log2(e) */
    int pdl_early;               /* let the next kernel launch at this one's start (else at its exit) */
    int fresh;                   /* >= 0: q and the pages but those of each sequence's last `fresh` positions
                                  * are complete (read before griddepcontrol.wait); -1: nothing before it */
    int cluster;                 /* > 1: the n_splits blocks of a pair are one cluster, merged in shared memory */
    const float *q;              /* (n_seqs, q_stride) */
    int64_t q_stride;
    float *out;
    int64_t out_stride;
    int *counters;               /* (n_pairs, 1 + FAN, 2): arrivals and partials published of the last level
                                  * (the only one up to FAN splits), then of each group; reset by the mergers */
    float *ws_ml;                /* (n_pairs, n_splits, ml_stride(G)): m (G) then l (G) */
    float *ws_acc;               /* (n_pairs, n_splits, G, D) */
};

__device__ __forceinline__ uint32_t smem_u32(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }

/* Waits for the kernel before this one in the stream (programmatic
 * dependent launch; at once without one); then, early, lets the next one
 * launch. */
__device__ __forceinline__ void grid_wait(int early) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (early) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

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

/* 2^x (flushing results below 2^-126 to 0: a weight that small is nothing
 * beside the largest, which is 1): one MUFU.EX2, where exp2f adds a range
 * fix of three instructions. */
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ uint32_t pack_half2(__half lo, __half hi) {
    return (uint32_t)__half_as_ushort(lo) | ((uint32_t)__half_as_ushort(hi) << 16);
}
__device__ __forceinline__ __half2 as_h2(uint32_t x) { return *reinterpret_cast<__half2 *>(&x); }
__device__ __forceinline__ uint32_t as_u32(__half2 h) { return *reinterpret_cast<uint32_t *>(&h); }

/* x as fp16 hi + fp16 lo. */
__device__ __forceinline__ void split_half(float x, __half &hi, __half &lo) {
    hi = __float2half_rn(x);
    lo = __float2half_rn(x - __half2float(hi));
}

/* The A operand (rows g: fp16 hi, g + 8: lo) of four weights w[0..3] at the
 * reduction slots 2t, 2t + 1, 2t + 8, 2t + 9. */
__device__ __forceinline__ void weights_operand(const float *w, uint32_t (&pa)[4]) {
    const __half2 h01 = __floats2half2_rn(w[0], w[1]), h23 = __floats2half2_rn(w[2], w[3]);
    const float2 f01 = __half22float2(h01), f23 = __half22float2(h23);
    pa[0] = as_u32(h01);
    pa[1] = as_u32(__floats2half2_rn(w[0] - f01.x, w[1] - f01.y));
    pa[2] = as_u32(h23);
    pa[3] = as_u32(__floats2half2_rn(w[2] - f23.x, w[3] - f23.y));
}

/* hi + lo operand pair (ahi, alo) times the half2 s, without rounding loss:
 * hi s = p + e exactly (p = fp16(hi s), e = fma(hi, s, -p)); lo s + e. */
__device__ __forceinline__ void scale_pair(uint32_t ahi, uint32_t alo, uint32_t s, uint32_t &rhi, uint32_t &rlo) {
    const __half2 hi = as_h2(ahi), sc = as_h2(s);
    const __half2 p = __hmul2(hi, sc);
    rhi = as_u32(p);
    rlo = as_u32(__hfma2(as_h2(alo), sc, __hfma2(hi, sc, __hneg2(p))));
}

/* Code conversions, exact (the half 0x64XX is 1024 + XX). The constants
 * come in registers (decode_params.zero): x & mask then ^ or | a register
 * constant is one LOP3. */
struct cvt_consts {
    uint32_t i8;                 /* 0x64806480: exponent of 1024 and the sign flip of two bytes */
    uint32_t u4;                 /* 0x64006400 */
};
/* int8: bytes 0 and 2 of x (two codes c, c') -> the half2 (c, c'): with the
 * sign flipped a byte is c + 128. */
__device__ __forceinline__ uint32_t i8_half2(uint32_t x, const cvt_consts &k) {
    const __half2 h = as_h2((x & 0x00ff00ffu) ^ k.i8);         /* 1024 + 128 + c */
    return as_u32(__hsub2(h, __floats2half2_rn(1152.0f, 1152.0f)));
}
/* int8: byte j of a and of b as a half2. */
template <int J> __device__ __forceinline__ uint32_t i8_pair(uint32_t a, uint32_t b, const cvt_consts &k) {
    return i8_half2(__byte_perm(a, b, J | ((4 + J) << 8)), k);
}
/* int4: the low nibbles of bytes 0 and 2 of x as a half2; the high nibbles
 * (16 c + 1024, scaled back). */
__device__ __forceinline__ uint32_t u4_lo(uint32_t x, const cvt_consts &k) {
    const __half2 h = as_h2((x & 0x000f000fu) | k.u4);
    return as_u32(__hsub2(h, __floats2half2_rn(1024.0f, 1024.0f)));
}
__device__ __forceinline__ uint32_t u4_hi(uint32_t x, const cvt_consts &k) {
    const __half2 h = as_h2((x & 0x00f000f0u) | k.u4);
    return as_u32(__hfma2(h, __floats2half2_rn(0.0625f, 0.0625f), __floats2half2_rn(-64.0f, -64.0f)));
}

/* A warp's page copies: the K and V blocks of its kv head in page 0 of the
 * layer, offset by the lane's 16 bytes (a page adds page * page_bytes). */
struct page_copier {
    const uint8_t *k, *v;
    uint32_t page_bytes;
};

/* Copies one page's K and V blocks into dst: f16 blocks to their swizzled
 * units (V positions >= valid as zeros), others raw. */
template <int D, int KF, int VF>
__device__ __forceinline__ void issue_page(const page_copier &pc, int32_t page, int valid, uint8_t *dst, int lane) {
    typedef ring<D, KF, VF> R;
    const uint64_t off = (uint64_t)(uint32_t)page * pc.page_bytes;
    const uint8_t *kb = pc.k + off, *vb = pc.v + off;
#pragma unroll
    for (int i = 0; i < (R::KB / 16 + 31) / 32; i++) {
        const int c = lane + 32 * i;
        if (R::KB % 512 == 0 || c < R::KB / 16) {
            const int u = KF == KVC_CU_F16 ? kvc__cu_k_unit<D>(c >> 1, c & 1) : c;
            cp_async16(dst + 16 * u, kb + 512 * i);
        }
    }
    uint8_t *vd = dst + R::KB;
#pragma unroll
    for (int i = 0; i < (R::VB / 16 + 31) / 32; i++) {
        const int c = lane + 32 * i;
        if (R::VB % 512 == 0 || c < R::VB / 16) {
            if (VF == KVC_CU_F16) {
                const int t = c / (D / 8), u = c % (D / 8);
                cp_async16(vd + 16 * kvc__cu_v_unit<D>(t, u), vb + 512 * i, t < valid);
            } else {
                cp_async16(vd + 16 * c, vb + 512 * i);
            }
        }
    }
}

/* 16 int8 codes -> 16 halves, exactly: with the sign flipped a byte is
 * x + 128, and the half 0x64uu is 1024 + u. */
__device__ __forceinline__ void i8x16_to_h(const uint4 &w, uint4 &lo, uint4 &hi, const cvt_consts &k) {
    const uint32_t in[4] = {w.x, w.y, w.z, w.w};
    uint32_t o[8];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        o[2 * i] = i8_half2(__byte_perm(in[i], 0, 0x0100), k);       /* bytes 0, 1 */
        o[2 * i + 1] = i8_half2(__byte_perm(in[i], 0, 0x0302), k);   /* bytes 2, 3 */
    }
    lo = make_uint4(o[0], o[1], o[2], o[3]);
    hi = make_uint4(o[4], o[5], o[6], o[7]);
}

/* int8 K (D, 16) raw -> f16 swizzled: lane takes dimensions lane + 32 i. */
template <int D>
__device__ __forceinline__ void convert_k(const uint8_t *raw, uint8_t *dst, int lane, const cvt_consts &k) {
#pragma unroll
    for (int i = 0; i < D / 32; i++) {
        const int d = lane + 32 * i;
        uint4 lo, hi;
        i8x16_to_h(reinterpret_cast<const uint4 *>(raw)[d], lo, hi, k);
        reinterpret_cast<uint4 *>(dst)[kvc__cu_k_unit<D>(d, 0)] = lo;
        reinterpret_cast<uint4 *>(dst)[kvc__cu_k_unit<D>(d, 1)] = hi;
    }
}

/* int8 V (16, D) raw -> f16 swizzled: lane takes 16-code units lane + 32 i. */
template <int D>
__device__ __forceinline__ void convert_v(const uint8_t *raw, uint8_t *dst, int lane, const cvt_consts &k) {
#pragma unroll
    for (int i = 0; i < D / 32; i++) {
        const int c = lane + 32 * i, t = c / (D / 16), u = 2 * (c % (D / 16));
        uint4 lo, hi;
        i8x16_to_h(reinterpret_cast<const uint4 *>(raw)[c], lo, hi, k);
        reinterpret_cast<uint4 *>(dst)[kvc__cu_v_unit<D>(t, u)] = lo;
        reinterpret_cast<uint4 *>(dst)[kvc__cu_v_unit<D>(t, u + 1)] = hi;
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

/* The query dimension at reduction slot (2t, 2t + 1, 2t + 8, 2t + 9)[i] of
 * k-chunk kk, in the order the K path reads its codes (file comment). */
template <int KF, int VF>
__device__ __forceinline__ int q_dim(int kk, int t, int i) {
    if constexpr (KF == KVC_CU_U4C) return 16 * kk + 4 * t + i;
    else if constexpr (reg_path(KF, VF)) return 16 * kk + t + 4 * i;
    else return 16 * kk + 2 * t + (i & 1) + 8 * (i >> 1);
}

/* The output dimension of accumulator n-tile jd, column col. */
template <int D, int KF, int VF>
__device__ __forceinline__ int o_dim(int jd, int col) {
    if constexpr (kvc__cu_is_u4t(VF)) {
        constexpr int GS = kvc__cu_u4_group(VF), NK = GS / 8;
        return GS * (jd / NK) + NK * col + jd % NK;
    } else if constexpr (reg_path(KF, VF)) {
        return (D / 8) * col + jd;
    } else {
        return 8 * jd + col;
    }
}

/* A thread's share of the warp's state: query head gid = lane / 4 (when <
 * G), its output dims o_dim(jd, 2 (lane % 4) + {0, 1}). o is summed in fp32
 * registers (a slot's mma starts from zero: the tensor cores' fp32 sums are
 * not IEEE-rounded and would drift over thousands of pages). */
template <int D, int NGV> struct warp_state {
    float m, l;                  /* m quad-uniform; l this thread's positions' share */
    float o[D / 8][2];
    float vmin[NGV];             /* int4 V: sum of weight * minimum per group (quad-uniform) */
};

/* Online softmax over this thread's N scores of a slot (quad = one head):
 * turns x into weights, returns alpha (the factor for the old sums). */
template <int N> __device__ __forceinline__ float softmax_step(float (&x)[N], float &m, float &l) {
    float mx = x[0];
#pragma unroll
    for (int i = 1; i < N; i++) mx = fmaxf(mx, x[i]);
    mx = fmaxf(mx, __shfl_xor_sync(KVC__CU_FULL, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(KVC__CU_FULL, mx, 2));
    const float m_new = fmaxf(m, mx);
    const float alpha = ex2(m - m_new);        /* 0 on the first slot */
    m = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < N; i++) {
        x[i] = ex2(x[i] - m_new);
        sum += x[i];
    }
    l = l * alpha + sum;
    return alpha;
}

/* ---- int4 sides, read from the raw blocks in shared memory ----------------- */

/* int4 keys per channel: the scores of P pages (page q at slot + q *
 * page_stride; valid_q its positions inside the context), tokens 2t, 2t + 1,
 * 2t + 8, 2t + 9 of page q in x[q][0..3], the positions the f16 path's
 * scores have too, so both paths use it. */
template <int D, int P, bool MASKED>
__device__ __forceinline__ void u4_scores(const uint8_t *slot, int page_stride, const int (&valid)[P],
                                          const uint32_t (&qa)[D / 16][4], int lane, const cvt_consts &kc,
                                          float (&x)[P][4]) {
    const int g = lane >> 2, t = lane & 3;
    const uint32_t sel = (uint32_t)(g >> 1) | ((uint32_t)(4 + (g >> 1)) << 8);
#pragma unroll
    for (int q = 0; q < P; q++) {
        const uint8_t *kp = slot + q * page_stride;
        const uint8_t *kr = kp + 32 * t + 4 * (g & 1);
        float se[4] = {0.0f, 0.0f, 0.0f, 0.0f}, so[4] = {0.0f, 0.0f, 0.0f, 0.0f}, sb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            /* scales (D) then minima (D), halves after the codes: dims 16 kk + 4t .. + 3 */
            const uint2 sc = *reinterpret_cast<const uint2 *>(kp + 8 * D + 2 * (16 * kk + 4 * t));
            const uint2 mn = *reinterpret_cast<const uint2 *>(kp + 10 * D + 2 * (16 * kk + 4 * t));
            uint32_t w[4];
#pragma unroll
            for (int i = 0; i < 4; i++)    /* dimension row 16 kk + 4t + i, word g & 1 */
                w[i] = *reinterpret_cast<const uint32_t *>(kr + 128 * kk + 8 * i);
            const uint32_t x01 = __byte_perm(w[0], w[1], sel), x23 = __byte_perm(w[2], w[3], sel);
            uint32_t qs[4];
            scale_pair(qa[kk][0], qa[kk][1], sc.x, qs[0], qs[1]);
            scale_pair(qa[kk][2], qa[kk][3], sc.y, qs[2], qs[3]);
            mma16816(se, qs, u4_lo(x01, kc), u4_lo(x23, kc));
            mma16816(so, qs, u4_hi(x01, kc), u4_hi(x23, kc));
            mma16816(sb, qa[kk], mn.x, mn.y);
        }
        const float base = sb[0] + sb[2];
        x[q][0] = se[0] + se[2] + base;    /* even n-tile, column 2t: token 2t */
        x[q][1] = so[0] + so[2] + base;    /* token 2t + 1 */
        x[q][2] = se[1] + se[3] + base;    /* column 2t + 1: token 2t + 8 */
        x[q][3] = so[1] + so[3] + base;    /* token 2t + 9 */
        if constexpr (MASKED) {
#pragma unroll
            for (int e = 0; e < 4; e++)
                if (2 * t + (e & 1) + 8 * (e >> 1) >= valid[q]) x[q][e] = -INFINITY;
        }
    }
}

/* int4 values per token in groups of GS: O += P V of P pages (V block of
 * page q at vslot + q * page_stride), pp[q] the weights operand of tokens
 * 2t, 2t + 1, 2t + 8, 2t + 9 of page q (weights_operand), alpha the factor
 * of the old sums. Both paths use it (the f16 path with P = 1). */
template <int D, int VF, int P, bool MASKED>
__device__ __forceinline__ void u4_values(const uint8_t *vslot, int page_stride, const int (&valid)[P],
                                          const uint32_t (&pp)[P][4], float alpha, int lane, const cvt_consts &kc,
                                          warp_state<D, v_groups<D, VF>::value> &st) {
    constexpr int GS = kvc__cu_u4_group(VF), NGV = D / GS, NK = GS / 8;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int gm = 0; gm < NGV; gm++) {
        /* per page: the group's weight operand and the raw codes of rows 2t,
         * 2t + 1 (h 0: b0) and 2t + 8, 2t + 9 (h 1: b1), this thread's GS / 8
         * numbers: dims GS gm + NK g .. + NK */
        uint32_t pw[P][4], ra[P][2], rb[P][2];
        float vm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int q = 0; q < P; q++) {
            const uint8_t *vp = vslot + q * page_stride;
            /* scales (NGV, 16), then minima (NGV, 16): tokens 2t, 2t + 1 and 2t + 8, 2t + 9 */
            const uint8_t *par = vp + 8 * D + 32 * gm + 4 * t;
            uint32_t s_lo = *reinterpret_cast<const uint32_t *>(par);
            uint32_t s_hi = *reinterpret_cast<const uint32_t *>(par + 16);
            uint32_t m_lo = *reinterpret_cast<const uint32_t *>(par + 32 * NGV);
            uint32_t m_hi = *reinterpret_cast<const uint32_t *>(par + 32 * NGV + 16);
            if constexpr (MASKED) {
                const int vq = valid[q];
                const uint32_t keep_lo = (2 * t < vq ? 0xffffu : 0u) | (2 * t + 1 < vq ? 0xffff0000u : 0u);
                const uint32_t keep_hi = (2 * t + 8 < vq ? 0xffffu : 0u) | (2 * t + 9 < vq ? 0xffff0000u : 0u);
                s_lo &= keep_lo, m_lo &= keep_lo, s_hi &= keep_hi, m_hi &= keep_hi;
            }
            scale_pair(pp[q][0], pp[q][1], s_lo, pw[q][0], pw[q][1]);
            scale_pair(pp[q][2], pp[q][3], s_hi, pw[q][2], pw[q][3]);
            mma16816(vm, pp[q], m_lo, m_hi);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint8_t *row = vp + (2 * t + 8 * h) * (D / 2) + (GS / 2) * gm + (NK / 2) * g;
                if constexpr (NK == 4) {
                    ra[q][h] = *reinterpret_cast<const uint16_t *>(row);
                    rb[q][h] = *reinterpret_cast<const uint16_t *>(row + D / 2);
                } else {
                    ra[q][h] = *reinterpret_cast<const uint32_t *>(row);
                    rb[q][h] = *reinterpret_cast<const uint32_t *>(row + D / 2);
                }
            }
        }
        st.vmin[gm] = fmaf(st.vmin[gm], alpha, vm[0] + vm[2]);
        /* four numbers (n-tiles) at a time: byte pairs of the two rows give
         * half2s of the low and high nibbles */
#pragma unroll
        for (int hw = 0; hw < NK / 4; hw++) {
            uint32_t bq[P][2][4];
#pragma unroll
            for (int q = 0; q < P; q++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const uint32_t xw = __byte_perm(ra[q][h], rb[q][h], hw ? 0x7632 : 0x5410), xw8 = xw >> 8;
                    bq[q][h][0] = u4_lo(xw, kc), bq[q][h][1] = u4_hi(xw, kc);
                    bq[q][h][2] = u4_lo(xw8, kc), bq[q][h][3] = u4_hi(xw8, kc);
                }
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int q = 0; q < P; q++) mma16816(o, pw[q], bq[q][0][k], bq[q][1][k]);
                const int jd = NK * gm + 4 * hw + k;
                st.o[jd][0] = fmaf(st.o[jd][0], alpha, o[0] + o[2]);
                st.o[jd][1] = fmaf(st.o[jd][1], alpha, o[1] + o[3]);
            }
        }
    }
}

/* ---- f16 path: one page a slot --------------------------------------------- */

/* One page from its ring slot: kslot, vslot the K and V blocks as copied
 * (f16 swizzled; others raw); conv the warp's conversion block (int8);
 * valid: positions of the page inside the context (1..16; MASKED when <
 * 16). int4 sides (keys per channel, values per token) are read as the
 * register path reads them, one page at a time. */
template <int D, int KF, int VF, bool MASKED>
__device__ __forceinline__ void process_page(const uint8_t *kslot, const uint8_t *vslot, uint8_t *conv, int valid,
                                             const uint32_t (&qa)[D / 16][4], int lane, const cvt_consts &kc,
                                             warp_state<D, v_groups<D, VF>::value> &st) {
    const int tig = lane & 3, mat = lane >> 3, row = lane & 7;
    const int valid1[1] = {valid};
    /* positions 2 tig, 2 tig + 1, 8 + 2 tig, 9 + 2 tig of query gid */
    float x[4];
    if constexpr (KF == KVC_CU_U4C) {
        float xq[1][4];
        u4_scores<D, 1, MASKED>(kslot, 0, valid1, qa, lane, kc, xq);
#pragma unroll
        for (int e = 0; e < 4; e++) x[e] = xq[0][e];
    } else {
        const uint8_t *kf = kslot;
        if constexpr (KF == KVC_CU_I8) {
            convert_k<D>(kslot, conv, lane, kc);
            __syncwarp();
            kf = conv;
        }
        float s0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, s1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t b[4];
            ldsm_x4_trans(b, kf + 16 * kvc__cu_k_unit<D>(kk * 16 + (mat & 1) * 8 + row, mat >> 1));
            mma16816(s0, qa[kk], b[0], b[1]);
            mma16816(s1, qa[kk], b[2], b[3]);
        }
        x[0] = s0[0] + s0[2], x[1] = s0[1] + s0[3], x[2] = s1[0] + s1[2], x[3] = s1[1] + s1[3];
    }
    if constexpr (KF == KVC_CU_I8) {
        const uint8_t *ks = kslot + 16 * D;
        const float2 a = __half22float2(reinterpret_cast<const __half2 *>(ks)[tig]);
        const float2 c = __half22float2(reinterpret_cast<const __half2 *>(ks)[4 + tig]);
        x[0] *= a.x, x[1] *= a.y, x[2] *= c.x, x[3] *= c.y;
    }
    if constexpr (MASKED && KF != KVC_CU_U4C) {   /* (u4_scores masks its own) */
#pragma unroll
        for (int e = 0; e < 4; e++)
            if ((e >> 1) * 8 + 2 * tig + (e & 1) >= valid) x[e] = -INFINITY;
    }
    const float alpha = softmax_step(x, st.m, st.l);

    if constexpr (kvc__cu_is_u4t(VF)) {
        uint32_t pp[1][4];
        weights_operand(x, pp[0]);
        u4_values<D, VF, 1, MASKED>(vslot, 0, valid1, pp, alpha, lane, kc, st);
    } else {
        const uint8_t *vf = vslot;
        if constexpr (VF == KVC_CU_I8) {
            __syncwarp();                          /* K's reads of conv are done */
            convert_v<D>(vslot, conv, lane, kc);
            __syncwarp();
            vf = conv;
            const uint8_t *vs = vslot + 16 * D;
            const float2 a = __half22float2(reinterpret_cast<const __half2 *>(vs)[tig]);
            const float2 c = __half22float2(reinterpret_cast<const __half2 *>(vs)[4 + tig]);
            x[0] *= a.x, x[1] *= a.y, x[2] *= c.x, x[3] *= c.y;
            if constexpr (MASKED) {                /* scales past the context may be anything */
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if ((e >> 1) * 8 + 2 * tig + (e & 1) >= valid) x[e] = 0.0f;
            }
        }
        uint32_t pa[4];
        weights_operand(x, pa);
#pragma unroll
        for (int dn2 = 0; dn2 < D / 16; dn2++) {
            uint32_t b[4];
            ldsm_x4_trans(b, vf + 16 * kvc__cu_v_unit<D>((mat & 1) * 8 + row, dn2 * 2 + (mat >> 1)));
            float o0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, o1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            mma16816(o0, pa, b[0], b[1]);
            mma16816(o1, pa, b[2], b[3]);
#pragma unroll
            for (int e = 0; e < 2; e++) {
                st.o[2 * dn2][e] = fmaf(st.o[2 * dn2][e], alpha, o0[e] + o0[e + 2]);
                st.o[2 * dn2 + 1][e] = fmaf(st.o[2 * dn2 + 1][e], alpha, o1[e] + o1[e + 2]);
            }
        }
    }
}

/* ---- register path: two or four pages a slot ------------------------------- */

/* int8 K and V, NP pairs of pages a slot. Page q of a slot: its K block at
 * ks_ + q * PS, its V block at vs_ + q * PS; valid[q] its positions inside
 * the context (0 when the slot does not have it). The pairs' scores are
 * independent until one softmax step takes them all. */
template <int D, int PS, bool MASKED, int NP>
__device__ __forceinline__ void step_i8(const uint8_t *ks_, const uint8_t *vs_, const int (&valid)[2 * NP],
                                        const uint32_t (&qa)[D / 16][4], int lane, const cvt_consts &kc,
                                        warp_state<D, 1> &st) {
    const int g = lane >> 2, t = lane & 3;
    /* this thread: tokens t0 + i (i < 8) of page pg of each pair; token t0 +
     * j from n-tile j column 2t, t0 + 4 + j from column 2t + 1 */
    const int pg = t >> 1, t0 = 8 * (t & 1);
    auto valid_mine = [&](int pp) { return pg ? valid[2 * pp + 1] : valid[2 * pp]; };   /* page pg of pair pp */
    float x[8 * NP];
#pragma unroll
    for (int pp = 0; pp < NP; pp++) {
        /* scores: n-tile j, column g = token 4 (g & 3) + j of page g >> 2 */
        float s[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        const uint8_t *kp = ks_ + (2 * pp + (g >> 2)) * PS + 16 * t + 4 * (g & 3);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            uint32_t r[4];
#pragma unroll
            for (int i = 0; i < 4; i++)    /* dimension row 16 kk + t + 4 i */
                r[i] = *reinterpret_cast<const uint32_t *>(kp + 256 * kk + 64 * i);
            mma16816(s[0], qa[kk], i8_pair<0>(r[0], r[1], kc), i8_pair<0>(r[2], r[3], kc));
            mma16816(s[1], qa[kk], i8_pair<1>(r[0], r[1], kc), i8_pair<1>(r[2], r[3], kc));
            mma16816(s[2], qa[kk], i8_pair<2>(r[0], r[1], kc), i8_pair<2>(r[2], r[3], kc));
            mma16816(s[3], qa[kk], i8_pair<3>(r[0], r[1], kc), i8_pair<3>(r[2], r[3], kc));
        }
        const uint8_t *kq = ks_ + (2 * pp + pg) * PS;
        const uint4 ks = *reinterpret_cast<const uint4 *>(kq + 16 * D + 2 * t0);
        const float2 k01 = __half22float2(as_h2(ks.x)), k23 = __half22float2(as_h2(ks.y));
        const float2 k45 = __half22float2(as_h2(ks.z)), k67 = __half22float2(as_h2(ks.w));
        float *xp = x + 8 * pp;
        xp[0] = (s[0][0] + s[0][2]) * k01.x, xp[1] = (s[1][0] + s[1][2]) * k01.y;
        xp[2] = (s[2][0] + s[2][2]) * k23.x, xp[3] = (s[3][0] + s[3][2]) * k23.y;
        xp[4] = (s[0][1] + s[0][3]) * k45.x, xp[5] = (s[1][1] + s[1][3]) * k45.y;
        xp[6] = (s[2][1] + s[2][3]) * k67.x, xp[7] = (s[3][1] + s[3][3]) * k67.y;
        if constexpr (MASKED) {
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (t0 + i >= valid_mine(pp)) xp[i] = -INFINITY;
        }
    }
    const float alpha = softmax_step(x, st.m, st.l);

    /* chunk c of pair pp's P V reduction: slots 2t, 2t + 1, 2t + 8, 2t + 9
     * are tokens t0 + 4c + 0..3 */
    uint32_t pa[NP][2][4];
#pragma unroll
    for (int pp = 0; pp < NP; pp++) {
        const uint8_t *vp = vs_ + (2 * pp + pg) * PS;
        const uint4 vs = *reinterpret_cast<const uint4 *>(vp + 16 * D + 2 * t0);
        const float2 v01 = __half22float2(as_h2(vs.x)), v23 = __half22float2(as_h2(vs.y));
        const float2 v45 = __half22float2(as_h2(vs.z)), v67 = __half22float2(as_h2(vs.w));
        float *xp = x + 8 * pp;
        xp[0] *= v01.x, xp[1] *= v01.y, xp[2] *= v23.x, xp[3] *= v23.y;
        xp[4] *= v45.x, xp[5] *= v45.y, xp[6] *= v67.x, xp[7] *= v67.y;
        if constexpr (MASKED) {
#pragma unroll
            for (int i = 0; i < 8; i++)
                if (t0 + i >= valid_mine(pp)) xp[i] = 0.0f;
        }
        weights_operand(xp, pa[pp][0]);
        weights_operand(xp + 4, pa[pp][1]);
    }
    /* V rows t0 + i of page pg, dims (D / 8) g .. + D / 8: D / 32 words,
     * read two at a time (fewer live registers at head_dim 128; one at 32) */
    constexpr int WW = D >= 64 ? 2 : 1;
#pragma unroll
    for (int wh = 0; wh < D / (32 * WW); wh++) {
        uint32_t rw[NP][8][WW];
#pragma unroll
        for (int pp = 0; pp < NP; pp++)
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const uint8_t *src = vs_ + (2 * pp + pg) * PS + (t0 + i) * D + (D / 8) * g + 8 * wh;
                if constexpr (WW == 2) {
                    const uint2 v = *reinterpret_cast<const uint2 *>(src);
                    rw[pp][i][0] = v.x, rw[pp][i][1] = v.y;
                } else {
                    rw[pp][i][0] = *reinterpret_cast<const uint32_t *>(src);
                }
            }
#pragma unroll
        for (int w = 0; w < WW; w++) {
            uint32_t b[NP][2][2][4];   /* [pair][chunk][b0/b1][dim 4 (2 wh + w) + k] */
#pragma unroll
            for (int pp = 0; pp < NP; pp++)
#pragma unroll
                for (int c = 0; c < 2; c++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const uint32_t ra = rw[pp][4 * c + 2 * h][w], rb = rw[pp][4 * c + 2 * h + 1][w];
                        b[pp][c][h][0] = i8_pair<0>(ra, rb, kc);
                        b[pp][c][h][1] = i8_pair<1>(ra, rb, kc);
                        b[pp][c][h][2] = i8_pair<2>(ra, rb, kc);
                        b[pp][c][h][3] = i8_pair<3>(ra, rb, kc);
                    }
#pragma unroll
            for (int k = 0; k < 4; k++) {
                float o[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int pp = 0; pp < NP; pp++) {
                    mma16816(o, pa[pp][0], b[pp][0][0][k], b[pp][0][1][k]);
                    mma16816(o, pa[pp][1], b[pp][1][0][k], b[pp][1][1][k]);
                }
                const int jd = 8 * wh + 4 * w + k;
                st.o[jd][0] = fmaf(st.o[jd][0], alpha, o[0] + o[2]);
                st.o[jd][1] = fmaf(st.o[jd][1], alpha, o[1] + o[3]);
            }
        }
    }
}

/* int4 keys per channel, values per token in groups of GS, two pages a
 * slot (layout as in step_i8). */
template <int D, int VF, bool MASKED>
__device__ __forceinline__ void step_u4(const uint8_t *slot, int valid0, int valid1, const uint32_t (&qa)[D / 16][4],
                                        int lane, const cvt_consts &kc, warp_state<D, v_groups<D, VF>::value> &st) {
    typedef ring<D, KVC_CU_U4C, VF> R;
    const int valid[2] = {valid0, valid1};
    float x[2][4];
    u4_scores<D, 2, MASKED>(slot, R::PAGE, valid, qa, lane, kc, x);
    float xs[8] = {x[0][0], x[0][1], x[0][2], x[0][3], x[1][0], x[1][1], x[1][2], x[1][3]};
    const float alpha = softmax_step(xs, st.m, st.l);
    uint32_t pp[2][4];
    weights_operand(xs, pp[0]);
    weights_operand(xs + 4, pp[1]);
    u4_values<D, VF, 2, MASKED>(slot + R::KB, R::PAGE, valid, pp, alpha, lane, kc, st);
}

/* One ring slot of either path (int8 / int8: the K and V blocks of a page
 * at kb, vb in its slot page). */
template <int D, int KF, int VF, int P, bool MASKED>
__device__ __forceinline__ void process_slot(const uint8_t *slot, int kb, int vb, uint8_t *conv, const int (&valid)[P],
                                             const uint32_t (&qa)[D / 16][4], int lane, const cvt_consts &kc,
                                             warp_state<D, v_groups<D, VF>::value> &st) {
    if constexpr (!reg_path(KF, VF))
        process_page<D, KF, VF, MASKED>(slot, slot + ring<D, KF, VF>::VOFF, conv, valid[0], qa, lane, kc, st);
    else if constexpr (KF == KVC_CU_I8)
        step_i8<D, ring<D, KF, VF>::PAGE, MASKED, P / 2>(slot + kb, slot + vb, valid, qa, lane, kc, st);
    else
        step_u4<D, VF, MASKED>(slot, valid[0], valid[1], qa, lane, kc, st);
}

/* The merge counters of a level (a group of split blocks, or the groups):
 * c[0] counts arrivals, which elect the last to arrive as the merger, and
 * c[1] the partials stored. A block arrives as soon as its page loops end,
 * so the election's round trip overlaps its warps' merge, and only then
 * publishes its partial (a barrier before orders every thread's stores
 * before thread 0's release, as in CUTLASS's semaphore); the merger waits
 * for the others' publications, which cannot deadlock: it waits only for
 * blocks that have arrived, past their page loops, with nothing left to
 * wait for. */
__device__ __forceinline__ void publish(int *c) {   /* after a barrier */
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(c + 1) : "memory");
}
/* (the merger) Waits until `others` partials are published, then resets the
 * level's counters for the next launch (every block of it has arrived). */
__device__ __forceinline__ void wait_published(int *c, int others) {
    if (threadIdx.x == 0) {
        int n;
        do asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(n) : "l"(c + 1) : "memory");
        while (n < others);
        c[0] = c[1] = 0;
    }
    __syncthreads();
}

/* Block-wide merge of `count` (<= FAN) partials (acc, m, l) of a (sequence,
 * head) in workspace slots unit + first + i * stride: into out (normalized)
 * when final, else into slot unit + first as one partial: the (m, l) by
 * cp.async, then each warp streams every NW-th acc from L2, its first PRE
 * loaded in the same round trip as the (m, l) (1 x 32k 1-3% faster,
 * notes/gpu.md session 10). (Staging every
 * acc in shared memory in the same round trip as the (m, l) was measured
 * no faster at 1 x 32k and 1.5% slower on SmolLM2 int8 64 x 2k, whose
 * kernel it made larger: notes/gpu.md session 9.) */
template <int D, int G>
__device__ void merge_partials(const decode_params &p, float *smem, int64_t unit, int first, int count, int stride,
                               bool final, float *out) {
    constexpr int ML = ml_stride(G), GD = G * D;
    constexpr int NE4 = GD / 4;                /* float4s of one partial's (G, D) */
    constexpr int PER = (NE4 + 31) / 32;       /* of them a lane */
    constexpr int PRE = PER >= 8 ? 2 : PER >= 4 ? 4 : 8;   /* partials a warp loads before the weights */
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    float *s_ml = smem;                        /* (count, ML): m (then the partial's weight), l */
    float *s_acc = smem + count * ML;          /* (NW, G, D), 16-byte aligned */
    auto slot = [&](int s) { return unit + first + (int64_t)s * stride; };
    for (int e = tid; e < count * (ML / 4); e += NT) {
        const int s = e / (ML / 4), r = e - s * (ML / 4);
        cp_async16(s_ml + 4 * e, p.ws_ml + slot(s) * ML + 4 * r);
    }
    cp_async_commit();
    /* the warp's first PRE accs come in the same round trip as the (m, l)
     * (up to 64 floats a lane: the page loop's registers are free by now) */
    float4 pre[PRE][PER];
#pragma unroll
    for (int i = 0; i < PRE; i++) {
        const int s = warp + i * NW;
        const float4 *src = reinterpret_cast<const float4 *>(p.ws_acc + slot(s < count ? s : 0) * GD);
#pragma unroll
        for (int j = 0; j < PER; j++)
            pre[i][j] = s < count && lane + 32 * j < NE4 ? __ldcg(src + lane + 32 * j)
                                                         : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    cp_async_wait<0>();
    __syncthreads();
    for (int g = warp; g < G; g += NW) {       /* warp w: weights of heads w, w + NW */
        float M = -INFINITY;
        for (int s = lane; s < count; s += 32) M = fmaxf(M, s_ml[s * ML + g]);
#pragma unroll
        for (int mk = 16; mk >= 1; mk >>= 1) M = fmaxf(M, __shfl_xor_sync(KVC__CU_FULL, M, mk));
        float Ls = 0.0f;
        for (int s = lane; s < count; s += 32) Ls += exp2f(s_ml[s * ML + g] - M) * s_ml[s * ML + G + g];
#pragma unroll
        for (int mk = 16; mk >= 1; mk >>= 1) Ls += __shfl_xor_sync(KVC__CU_FULL, Ls, mk);
        const float inv = final ? 1.0f / Ls : 1.0f;
        for (int s = lane; s < count; s += 32) s_ml[s * ML + g] = exp2f(s_ml[s * ML + g] - M) * inv;
        if (!final && lane == 0) {
            p.ws_ml[slot(0) * ML + g] = M;
            p.ws_ml[slot(0) * ML + G + g] = Ls;
        }
    }
    __syncthreads();
    float *dst = final ? out : p.ws_acc + slot(0) * GD;
    float4 a[PER];
#pragma unroll
    for (int j = 0; j < PER; j++) a[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    auto add = [&](int s, int j, float4 x) {   /* a[j] += partial s's weight * x */
        const float w = s_ml[s * ML + ((lane + 32 * j) * 4) / D];
        a[j].x = fmaf(w, x.x, a[j].x);
        a[j].y = fmaf(w, x.y, a[j].y);
        a[j].z = fmaf(w, x.z, a[j].z);
        a[j].w = fmaf(w, x.w, a[j].w);
    };
#pragma unroll
    for (int i = 0; i < PRE; i++)
#pragma unroll
        for (int j = 0; j < PER; j++)
            if (warp + i * NW < count && lane + 32 * j < NE4) add(warp + i * NW, j, pre[i][j]);
#pragma unroll 4
    for (int s = warp + PRE * NW; s < count; s += NW) {
        const float4 *src = reinterpret_cast<const float4 *>(p.ws_acc + slot(s) * GD);
#pragma unroll
        for (int j = 0; j < PER; j++)
            if (lane + 32 * j < NE4) add(s, j, __ldcg(src + lane + 32 * j));
    }
#pragma unroll
    for (int j = 0; j < PER; j++) {
        const int e4 = lane + 32 * j;
        if (e4 < NE4) reinterpret_cast<float4 *>(s_acc + warp * GD)[e4] = a[j];
    }
    __syncthreads();
    for (int e = tid; e < GD; e += NT) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; w++) o += s_acc[w * GD + e];
        dst[e] = o;
    }
}

/* Block-wide: merges the warps' (acc, m, l) in shared memory, WPP warps per
 * pair (the block's pairs in order): into the outputs when `final`, else
 * (one pair a block) into one partial: acc (G, D) at acc_dst, m (G) then l
 * (G) at ml_dst (a workspace slot or the block's shared memory). */
template <int D, int G, int WPP>
__device__ __forceinline__ void merge_warps(const decode_params &p, const float *s_acc, const float *s_m,
                                            const float *s_l, bool final, float *acc_dst, float *ml_dst) {
    constexpr int PAIRS = NW / WPP;
    for (int e = threadIdx.x; e < PAIRS * G * D; e += NT) {
        const int ps = e / (G * D), r = e - ps * G * D, g = r / D;
        const int64_t pr = (int64_t)blockIdx.x * PAIRS + ps;
        if (pr >= p.n_pairs) continue;
        float mw[WPP], M = -INFINITY;
#pragma unroll
        for (int w = 0; w < WPP; w++) M = fmaxf(M, mw[w] = s_m[(ps * WPP + w) * G + g]);
        float A = 0.0f, Ls = 0.0f;
        if (M > -INFINITY)
#pragma unroll
            for (int w = 0; w < WPP; w++) {
                const float f = ex2(mw[w] - M);
                A = fmaf(f, s_acc[((ps * WPP + w) * G + g) * D + (r - g * D)], A);
                Ls = fmaf(f, s_l[(ps * WPP + w) * G + g], Ls);
            }
        if (final) {
            const int64_t seq = pr / p.n_kv_head, head = pr % p.n_kv_head;
            p.out[seq * p.out_stride + head * G * D + r] = Ls > 0.0f ? A / Ls : 0.0f;
        } else {
            acc_dst[r] = A;
            if (r - g * D == 0) {
                ml_dst[g] = M;
                ml_dst[G + g] = Ls;
            }
        }
    }
}

/* The splits of a pair as one thread block cluster (n of them, the block
 * rank = split): each block merges its warps (s_acc, s_m, s_l) into one
 * partial (acc (G, D), m (G), l (G)) stored straight into slot `rank` of
 * rank 0's shared memory (`slots`, past its rings: a block may store there
 * while rank 0 still streams pages), and after one cluster barrier rank 0
 * merges the n slots into the output from its own shared memory (stores
 * into another block's shared memory wait for a first barrier phase that
 * every block arrives at when it starts: the blocks of a cluster are
 * launched together but may start at different times). No
 * workspace round trip, fence or counter, and no remote loads (a first
 * version read the partials through distributed shared memory, a chain of
 * dependent remote loads: ~2.5 us from the last page loop to the exit,
 * notes/gpu.md session 7). Every block of the cluster gets here (none
 * returns early): ranks without pages store m = -inf, l = 0 and add
 * nothing; a pair without positions gets zeros. */
template <int D, int G>
__device__ __forceinline__ void cluster_merge(const decode_params &p, const float *s_acc, const float *s_m,
                                              const float *s_l, float *slots, int n, float *out) {
    namespace cg = cooperative_groups;
    constexpr int PS = G * (D + 2);            /* floats a partial */
    cg::cluster_group cl = cg::this_cluster();
    const int rank = (int)cl.block_rank();
    asm volatile("barrier.cluster.wait.aligned;" ::: "memory");   /* every block has started (kernel start) */
    float *mine = cl.map_shared_rank(slots, 0) + rank * PS;
    merge_warps<D, G, NW>(p, s_acc, s_m, s_l, false, mine, mine + G * D);
    cl.sync();                                 /* every partial is in rank 0's slots */
    if (rank != 0) return;
    for (int e = threadIdx.x; e < G * D; e += NT) {
        const int g = e / D;
        float M = -INFINITY;
        for (int r = 0; r < n; r++) M = fmaxf(M, slots[r * PS + G * D + g]);
        float A = 0.0f, Ls = 0.0f;
        if (M > -INFINITY)
            for (int r = 0; r < n; r++) {
                const float f = ex2(slots[r * PS + G * D + g] - M);
                A = fmaf(f, slots[r * PS + e], A);
                Ls = fmaf(f, slots[r * PS + G * D + G + g], Ls);
            }
        out[e] = Ls > 0.0f ? A / Ls : 0.0f;
    }
}

/* Blocks per multiprocessor the register budget is set for: as many as the
 * shared memory of the S-slot rings lets run (f16 path: head_dim 64 4 at
 * 128 registers, head_dim 128 2 at 255; register path: int8 at head_dim
 * 128 2, int8 at head_dim <= 64 4 with 2 slots: 4 bytes of spills, SmolLM2
 * 64 x 2k 25.35 -> 24.39 us with 3 slots against 3 blocks of 4 slots,
 * 24.3 -> 21.5-22.0 us with 2 slots), 3 (168 registers)
 * for int4 at head_dim 64 (at 4 blocks of 3 slots it spills 36-56 bytes and
 * was no faster; 2 slots instead of 4 at 3 blocks: 22.48 / 21.16 -> 21.29 /
 * 19.64 us at 64 x 2k / 256 x 512) and 2 for int4 at head dim 128 (at 168
 * it spills ~150 bytes a thread). */
constexpr int min_blocks(int D, int KF, int VF, int NH, int W) {
    return D == 128 ? 2 : NH > 1 ? (NH > 2 || reg_path(KF, VF) ? 2 : 3)
                    : reg_path(KF, VF) ? (KF == KVC_CU_I8 && !W ? 4 : 3)
                    : KF == KVC_CU_U4C || kvc__cu_is_u4t(VF) ? 3 : 4;
}

/* NH > 1 (both sides latent: every head's blocks are the same): a warp
 * takes NH heads of G rows (GT = NH G consecutive rows of q and out) and
 * runs each slot of its ring through the NH heads' mmas, so a shared page
 * is copied once per NH heads; "heads" below are then those groups. */
template <int D, int G, int KF, int VF, int NH, int W>
__global__ void __launch_bounds__(NT, min_blocks(D, KF, VF, NH, W)) decode_kernel(const __grid_constant__ decode_params p) {
    typedef ring<D, KF, VF, NH, W> R;
    constexpr int B = KVC__CU_B;
    constexpr int NGV = v_groups<D, VF>::value;
    constexpr int GT = NH * G;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float *smem = reinterpret_cast<float *>(smem_raw);
    __shared__ int s_last[2];   /* elected to merge: its group, the groups */
    TL_START();
    /* (clusters) the first phase of the cluster barrier: every block has
     * started before any stores into another's shared memory (cluster_merge
     * waits for it) */
    if constexpr (cluster_ok<D, NH>())
        if (p.cluster > 1) asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    /* programmatic dependent launch (pdl_mode): wait for the kernel before
     * this one in the stream (its writes visible) before reading what it may
     * write; then, pdl_early, let the next one's blocks take the free slots.
     * p.fresh < 0: before any global access. p.fresh >= 0 (the caller's
     * prefetch promise, kvc_cu_decode_args): the query, the block tables,
     * the context lengths and every page but those holding a sequence's last
     * p.fresh positions are complete already, so the query and the ring's
     * first slots of such pages are loaded before the wait, the rest after */
    const bool pre = p.fresh >= 0;
    if (!pre) grid_wait(p.pdl_early);
    const int H = p.n_kv_head;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int wpp = NW / p.ppb;                /* warps per pair */
    const int64_t pair = (int64_t)blockIdx.x * p.ppb + warp / wpp;
    const int split = blockIdx.y, rank = warp % wpp;
    const bool has_pair = pair < p.n_pairs;
    const int seq = has_pair ? (int)(pair / H) : 0, head = has_pair ? (int)(pair % H) : 0;
    const int ctx = has_pair ? (p.ctx_lens ? p.ctx_lens[seq] : p.ctx0 + seq) : 0;
    float *out = p.out + (int64_t)seq * p.out_stride + (int64_t)head * GT * D;   /* (GT, D) */
    const int n_pages = (ctx + B - 1) / B;
    const int n_active = n_pages > 0 ? (n_pages + p.pps - 1) / p.pps : 0;     /* splits with pages */
    if (p.ppb == 1 && split >= n_active && p.cluster <= 1) {   /* one pair a block: the exit is block-uniform */
        if (ctx <= 0 && split == 0) {
            if (pre) grid_wait(p.pdl_early);
            for (int e = tid; e < GT * D; e += NT) out[e] = 0.0f;
        }
        return;
    }
    int first = 0, end = 0;
    if (ctx > 0 && split < n_active) {
        first = split * p.pps + rank;
        end = min(split * p.pps + p.pps, n_pages);
    }
    const int n_mine = first < end ? (end - first + wpp - 1) / wpp : 0;
    const int n_steps = (n_mine + R::P - 1) / R::P;
    const int32_t *bt = p.bt + (int64_t)seq * p.bt_stride;

    warp_state<D, NGV> sts[NH];
#pragma unroll
    for (int h = 0; h < NH; h++) {
        sts[h].m = -INFINITY;
        sts[h].l = 0.0f;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) sts[h].o[dn][0] = sts[h].o[dn][1] = 0.0f;
#pragma unroll
        for (int gi = 0; gi < NGV; gi++) sts[h].vmin[gi] = 0.0f;
    }

    /* A fragments of the scaled query: rows gid (fp16 hi) and gid + 8 (lo);
     * the query's loads are issued before the block table's and the first
     * pages', so their latencies overlap */
    float qv[NH][D / 16][4];
#pragma unroll
    for (int h = 0; h < NH; h++) {
        const float *q = p.q + (int64_t)seq * p.q_stride + (int64_t)(head * GT + h * G + min(gid, G - 1)) * D;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                qv[h][kk][i] = gid < G && n_steps > 0 ? q[q_dim<KF, VF>(kk, tig, i)] : 0.0f;
    }
    /* this warp's pages first, first + wpp, ... through its ring: S - 1
     * slots in flight while one computes (one commit group per slot, empty
     * groups past the end keep the count uniform); positions past the
     * context only in the last slot */
    uint8_t *rings = smem_raw;
    if constexpr (R::TMA)   /* (by pointer arithmetic: through an integer the compiler loses that it is shared) */
        rings = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
    else if constexpr (R::I8T)
        rings = smem_raw + ((128u - (smem_u32(smem_raw) & 127u)) & 127u);
    uint8_t *my = rings + warp * R::WARP_BYTES;
    uint8_t *conv = my + R::S * R::SLOT;
    /* slot i's mbarrier at mbar + 8 i */
    const uint32_t mbar = R::TMA ? smem_u32(rings + NW * R::WARP_BYTES + warp * 8 * R::S) : smem_u32(my + R::S * R::SLOT);
    const int k_head = p.g.k_block_bytes ? head : 0, v_head = p.g.v_block_bytes ? head : 0;   /* tensor copies */
    page_ids ids(bt, first, wpp, end, lane);
    page_copier pc;
    pc.k = p.arena + p.g.layer_off + (size_t)head * p.g.k_block_bytes + (R::MB ? 0 : 16 * lane);
    pc.v = p.arena + p.g.layer_off + p.g.k_region + (size_t)head * p.g.v_block_bytes + (R::MB ? 0 : 16 * lane);
    pc.page_bytes = (uint32_t)p.g.page_bytes;
    /* where a page's K and V blocks land in its slot page (ring::I8T): at
     * their sources' offsets mod 128, the same for every page when pages are
     * whole 128-byte lines */
    int kb_off = 0, vb_off = R::KB;
    if constexpr (R::I8T) {
        const bool lines = (p.g.page_bytes & 127) == 0;
        kb_off = lines ? (int)((uintptr_t)pc.k & 127) : 0;
        vb_off = R::KA + (lines ? (int)((uintptr_t)pc.v & 127) : 0);
    }
    auto page_valid = [&](int j) { return j < n_mine ? min(B, ctx - (first + j * wpp) * B) : 0; };
    auto issue_slot = [&](int s, int into) {
        if constexpr (R::BULK) {
            int32_t pg[R::P];
#pragma unroll
            for (int q = 0; q < R::P; q++) pg[q] = s * R::P + q < n_mine ? ids.next() : -1;
            if (lane == 0) {
                const uint32_t mb = mbar + 8 * into, dst = smem_u32(my + into * R::SLOT);
                int mid = 0;                   /* the slot's pages are a prefix of them */
#pragma unroll
                for (int q = 1; q < R::P - 1; q++) mid += pg[q] >= 0;
                kvc__cu_mbar_expect(mb, (pg[R::P - 1] >= 0 ? R::P : 1 + mid) * (R::KB + R::VB));
#pragma unroll
                for (int q = 0; q < R::P; q++)
                    if (pg[q] >= 0) {
                        const uint64_t off = (uint64_t)(uint32_t)pg[q] * pc.page_bytes;
                        kvc__cu_bulk_copy(dst + q * R::PAGE + kb_off, pc.k + off, R::KB, mb);
                        kvc__cu_bulk_copy(dst + q * R::PAGE + vb_off, pc.v + off, R::VB, mb);
                    }
            }
        } else if constexpr (R::TMA) {
            const int32_t pg = ids.next();     /* P = 1: s < n_steps = n_mine */
            if (lane == 0) {
                const uint32_t mb = mbar + 8 * into, dst = smem_u32(my + into * R::SLOT);
                const uint64_t off = (uint64_t)(uint32_t)pg * pc.page_bytes;
                kvc__cu_mbar_expect(mb, R::KB + R::VB);
                if constexpr (KF == KVC_CU_F16) kvc__cu_tensor_copy(dst, &p.tk, 0, 0, k_head, pg, mb);
                else kvc__cu_bulk_copy(dst, pc.k + off, R::KB, mb);
                if constexpr (VF == KVC_CU_F16) {
#pragma unroll
                    for (int h = 0; h < D / 64; h++)
                        kvc__cu_tensor_copy(dst + R::VOFF + 2048 * h, &p.tv, 64 * h, 0, v_head, pg, mb);
                } else {
                    kvc__cu_bulk_copy(dst + R::VOFF, pc.v + off, R::VB, mb);
                }
            }
        } else {
#pragma unroll
            for (int q = 0; q < R::P; q++) {
                const int j = s * R::P + q;
                if (j < n_mine)
                    issue_page<D, KF, VF>(pc, ids.next(), VF == KVC_CU_F16 ? page_valid(j) : B,
                                          my + into * R::SLOT + q * R::PAGE, lane);
            }
        }
    };
    if constexpr (R::MB) {
        if (lane == 0) {
#pragma unroll
            for (int i = 0; i < R::S; i++) kvc__cu_mbar_init(mbar + 8 * i, 1);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncwarp();
    }
    /* (pre) the leading slots whose pages are complete, before the wait */
    int n_pre = 0;
    if (pre) {
        const int clean = p.fresh > 0 ? (ctx - p.fresh) / B : n_pages;   /* pages [clean, n_pages) may be in writing */
        while (n_pre < R::S - 1 &&
               (n_pre >= n_steps || first + (min(n_pre * R::P + R::P, n_mine) - 1) * wpp < clean))
            n_pre++;
#pragma unroll
        for (int s = 0; s < R::S - 1; s++)
            if (s < n_pre) {
                if (s < n_steps) issue_slot(s, s);
                if constexpr (!R::MB) cp_async_commit();
            }
        grid_wait(p.pdl_early);
    }
#pragma unroll
    for (int s = 0; s < R::S - 1; s++)
        if (s >= n_pre) {
            if (s < n_steps) issue_slot(s, s);
            if constexpr (!R::MB) cp_async_commit();
        }
    uint32_t qa[NH][D / 16][4];
#pragma unroll
    for (int h = 0; h < NH; h++)
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++)
#pragma unroll
            for (int hc = 0; hc < 2; hc++) {
                __half h0, l0, h1, l1;
                split_half(qv[h][kk][2 * hc] * p.qscale, h0, l0);
                split_half(qv[h][kk][2 * hc + 1] * p.qscale, h1, l1);
                qa[h][kk][2 * hc] = pack_half2(h0, h1);
                qa[h][kk][2 * hc + 1] = pack_half2(l0, l1);
            }
    cvt_consts kc;
    kc.i8 = 0x64806480u ^ p.zero;
    kc.u4 = 0x64006400u ^ p.zero;
    int slot = 0, slot_next = R::S - 1;
    uint32_t parity = 0;                       /* of the slots' current phase (bulk path) */
    for (int s = 0; s < n_steps; s++) {
        const int sn = s + R::S - 1;
        if (sn < n_steps) issue_slot(sn, slot_next);
        if constexpr (R::MB) {
            kvc__cu_mbar_wait(mbar + 8 * slot, parity);
        } else {
            cp_async_commit();
            cp_async_wait<R::S - 1>();
            __syncwarp();
        }
        if (s == 0) TL(2, 0);
        const uint8_t *sl = my + slot * R::SLOT;
        int vq[R::P];
#pragma unroll
        for (int q = 0; q < R::P; q++) vq[q] = B;
        if (s + 1 == n_steps) {
#pragma unroll
            for (int q = 0; q < R::P; q++) vq[q] = page_valid(s * R::P + q);
            const int v0 = vq[0];
            if constexpr (R::TMA && VF == KVC_CU_F16) {   /* V rows past the context may hold anything: zeros for P V */
                uint8_t *vd = my + slot * R::SLOT + R::VOFF;
                for (int c = lane; c < (B - v0) * (D / 8); c += 32)
                    reinterpret_cast<uint4 *>(vd)[kvc__cu_v_unit<D>(v0 + c / (D / 8), c % (D / 8))] = make_uint4(0, 0, 0, 0);
                __syncwarp();
            }
        }
        bool full = true;
#pragma unroll
        for (int q = 0; q < R::P; q++) full = full && vq[q] == B;
#pragma unroll
        for (int h = 0; h < NH; h++) {
            if (h) __syncwarp();               /* conv is reused by the next head */
            if (full)
                process_slot<D, KF, VF, R::P, false>(sl, kb_off, vb_off, conv, vq, qa[h], lane, kc, sts[h]);
            else
                process_slot<D, KF, VF, R::P, true>(sl, kb_off, vb_off, conv, vq, qa[h], lane, kc, sts[h]);
        }
        __syncwarp();                          /* the slot and conv are refilled next iteration */
        if (++slot == R::S) slot = 0, parity ^= 1;
        slot_next = slot_next + 1 == R::S ? 0 : slot_next + 1;
    }
    TL(3 + warp, warp * 32);
    if constexpr (R::MB) {                     /* every slot filled was waited for: all copies are in */
        if (lane == 0)
#pragma unroll
            for (int i = 0; i < R::S; i++) kvc__cu_mbar_inval(mbar + 8 * i);
        __syncwarp();
    } else {
        cp_async_wait<0>();
    }

    /* finish the warp: l over the quad; the int4 minima's share (an mma
     * sum: every thread of the quad holds the whole) into its group's dims */
#pragma unroll
    for (int h = 0; h < NH; h++) {
        warp_state<D, NGV> &st = sts[h];
        st.l += __shfl_xor_sync(KVC__CU_FULL, st.l, 1);
        st.l += __shfl_xor_sync(KVC__CU_FULL, st.l, 2);
        if constexpr (kvc__cu_is_u4t(VF)) {
            constexpr int NK = kvc__cu_u4_group(VF) / 8;
#pragma unroll
            for (int jd = 0; jd < D / 8; jd++) {
                st.o[jd][0] += st.vmin[jd / NK];
                st.o[jd][1] += st.vmin[jd / NK];
            }
        }
    }
    if (wpp == 1) {                            /* a warp per pair: no block-wide steps */
        if (has_pair && gid < G) {
#pragma unroll
            for (int h = 0; h < NH; h++) {
                const float inv = sts[h].l > 0.0f ? 1.0f / sts[h].l : 0.0f;
#pragma unroll
                for (int jd = 0; jd < D / 8; jd++)
#pragma unroll
                    for (int e = 0; e < 2; e++)
                        out[(h * G + gid) * D + o_dim<D, KF, VF>(jd, 2 * tig + e)] = sts[h].o[jd][e] * inv;
            }
        }
        return;
    }
    __syncthreads();                           /* the rings are reused below */
    float *s_acc = smem;                       /* (NW, GT, D) */
    float *s_m = smem + NW * GT * D;           /* (NW, GT) */
    float *s_l = s_m + NW * GT;                /* (NW, GT) */
    if (gid < G) {
#pragma unroll
        for (int h = 0; h < NH; h++) {
            const int r = warp * GT + h * G + gid;
#pragma unroll
            for (int jd = 0; jd < D / 8; jd++)
#pragma unroll
                for (int e = 0; e < 2; e++) s_acc[r * D + o_dim<D, KF, VF>(jd, 2 * tig + e)] = sts[h].o[jd][e];
            if (tig == 0) {
                s_m[r] = sts[h].m;
                s_l[r] = sts[h].l;
            }
        }
    }
    __syncthreads();

    /* merge the warps of each pair of the block (a warp without pages has m
     * = -inf; a pair without positions writes zeros) */
    const int64_t unit = pair * p.n_splits;    /* ppb 1: this block's pair */
    if constexpr (cluster_ok<D, NH>()) {
        if (p.cluster > 1) {                   /* ppb 1, the pair's splits one cluster */
            cluster_merge<D, GT>(p, s_acc, s_m, s_l,
                                 reinterpret_cast<float *>(smem_raw + smem_base<D, G, KF, VF, NH, W>()), p.cluster, out);
            return;
        }
    }
    if (p.ppb > 1) {
        merge_warps<D, GT, 2>(p, s_acc, s_m, s_l, true, nullptr, nullptr);
        return;
    }
    if (n_active <= 1) {
        merge_warps<D, GT, NW>(p, s_acc, s_m, s_l, true, nullptr, nullptr);
        return;
    }

    /* the last split of a (sequence, head) to arrive merges them all; past
     * FAN splits, the last of each group of FAN merges the group into its
     * first slot and the last group merger to arrive merges the groups */
    int *cnt = p.counters + pair * 2 * (1 + FAN);
    const int n_groups = (n_active + FAN - 1) / FAN;
    const int grp = split / FAN, g_first = grp * FAN, g_count = min(FAN, n_active - g_first);
    int *gc = n_groups > 1 ? cnt + 2 * (1 + grp) : cnt;
    if (tid == 0) s_last[0] = atomicAdd(gc, 1) == g_count - 1;
    merge_warps<D, GT, NW>(p, s_acc, s_m, s_l, false, p.ws_acc + (unit + split) * GT * D,
                           p.ws_ml + (unit + split) * ml_stride(GT));
    TL(8, 0);
    __syncthreads();                           /* the partial stored; s_last[0] */
    if (!s_last[0]) {
        publish(gc);
        return;
    }
    if (n_groups > 1 && tid == 0) s_last[1] = atomicAdd(cnt, 1) == n_groups - 1;
    wait_published(gc, g_count - 1);
    if (n_groups == 1) {
        TL(10, 0);
        merge_partials<D, GT>(p, smem, unit, 0, g_count, 1, true, out);
        return;
    }
    TL(9, 0);
    merge_partials<D, GT>(p, smem, unit, g_first, g_count, 1, false, out);
    __syncthreads();                           /* the group's partial stored */
    if (!s_last[1]) {
        publish(cnt);
        return;
    }
    wait_published(cnt, n_groups - 1);
    TL(10, 0);
    merge_partials<D, GT>(p, smem, unit, 0, n_groups, FAN, true, out);
}

/* ---- host side ------------------------------------------------------------- */

struct plan {
    int ppb, pps, n_splits;
    int nh;                      /* latent_nh */
    int wide;                    /* the W 1 instance (ring::I8W) */
    bool fits;                   /* its blocks fit one wave */
    double cost;                 /* search_plan's */
};

/* Blocks of this instance resident on one multiprocessor (sets its shared
 * memory limit the first time). */
template <int D, int G, int KF, int VF, int NH, int W> int blocks_per_sm() {
    static int n = 0;
    if (!n) {
        const size_t smem = smem_bytes<D, G, KF, VF, NH, W>();
        if (cudaFuncSetAttribute(decode_kernel<D, G, KF, VF, NH, W>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)smem) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_kernel<D, G, KF, VF, NH, W>, NT, smem) != cudaSuccess ||
            n < 1)
            n = 1;
        (void)cudaGetLastError();              /* a failed query must not look like a failed launch */
    }
    return n;
}

/* The NH > 1 instances compiled (each costs build time): f16/f16 and
 * int8/int8 at head dim 64 with G 3 or 8 (NH 3; NH 2 at G 8), f16/f16 at
 * head dim 128 with G 5 or 8 (NH 2): SmolLM2 latent:64 (3 heads of 3 rows),
 * Llama-8B latent:128 (4 heads of 8) and the test shapes. Not int8 at head
 * dim 128: that instance spills (204 bytes a thread) and made
 * hybrid:latent:128 slower than NH 1 (notes/gpu.md, session 4 run 7). */
constexpr bool nh_compiled(int D, int G, int KF, int VF, int NH) {
    return KF == VF && (KF == KVC_CU_F16 || KF == KVC_CU_I8) &&
           ((D == 64 && ((NH == 3 && (G == 3 || G == 8)) || (NH == 2 && G == 8))) ||
            (D == 128 && KF == KVC_CU_F16 && NH == 2 && (G == 5 || G == 8)));
}

/* Heads a warp takes (NH, see decode_kernel): with both sides latent, the
 * largest compiled NH (3, 2) dividing the view's heads that leaves at least
 * LATENT_NH_UNITS (sequence, head group) units; else 1. With fewer units
 * NH > 1 leaves too few warps for the pages and the plan's splits do not make
 * up for it (session 5, default plans: SmolLM2 latent:64 1 x 32k 26.4 us at
 * NH 1, 29.5 at NH 3; 2 x 16k 25.5 / 28.0; 4 x 8k 25.9 / 25.9; 16 x 2k 24.8 /
 * 23.7; Llama-8B latent:128 1 x 32k 53.1 / 57.1 at NH 1 / 2, 2 x 16k 53.5 /
 * 50.2: the crossing is at about 4 units for both). KVC_CU_LATENT_NH=N in
 * the environment forces NH N where it is compiled (benchmarks' before and
 * after). */
constexpr int LATENT_NH_UNITS = 4;

int latent_nh(const kvc__cu_view &v, int n_seqs) {
    static const int env = kvc__cu_env("KVC_CU_LATENT_NH", -1);
    if (env == 1 || v.g.k_block_bytes != 0 || v.g.v_block_bytes != 0) return 1;
    for (int nh = 3; nh >= 2; nh--)
        if ((env < 0 ? (long)n_seqs * (v.n_heads / nh) >= LATENT_NH_UNITS : env == nh) && v.n_heads % nh == 0 &&
            nh_compiled(v.D, v.G, v.k_fmt, v.v_fmt, nh))
            return nh;
    return 1;
}

/* Calls f(D, G, KF, VF, NH, W) as integral constants for the view's instance
 * (nh from latent_nh; NH 1 where nh is not compiled; W 1 where w and
 * wide_ok, else 0); KVC_ERR_INVAL outside
 * the compiled set (D 32: f16/f16 and int8/int8). Built with
 * -DKVC_CU_EXPERIMENT, only G 3 and 4 (the benchmark's shapes; a build for
 * timing experiments in a quarter of the time, which gpu_test refuses). */
template <typename F> int with_instance(const kvc__cu_view &v, int nh, int w, F &&f) {
    typedef std::integral_constant<int, 1> N1;
    typedef std::integral_constant<int, 0> W0;
    auto by_g = [&](auto d, auto kf, auto vf) -> int {
        auto by_nh = [&](auto g) -> int {
            constexpr int D_ = decltype(d)::value, G_ = decltype(g)::value, KF_ = decltype(kf)::value,
                          VF_ = decltype(vf)::value;
            if constexpr (nh_compiled(D_, G_, KF_, VF_, 3))
                if (nh == 3) return f(d, g, kf, vf, std::integral_constant<int, 3>(), W0());
            if constexpr (nh_compiled(D_, G_, KF_, VF_, 2))
                if (nh == 2) return f(d, g, kf, vf, std::integral_constant<int, 2>(), W0());
            if constexpr (wide_ok(D_, KF_, VF_, 1))
                if (w) return f(d, g, kf, vf, N1(), std::integral_constant<int, 1>());
            return f(d, g, kf, vf, N1(), W0());
        };
        switch (v.G) {
#ifndef KVC_CU_EXPERIMENT
        case 1: return by_nh(std::integral_constant<int, 1>());
        case 2: return by_nh(std::integral_constant<int, 2>());
#endif
        case 3: return by_nh(std::integral_constant<int, 3>());
        case 4: return by_nh(std::integral_constant<int, 4>());
#ifndef KVC_CU_EXPERIMENT
        case 5: return by_nh(std::integral_constant<int, 5>());
        case 6: return by_nh(std::integral_constant<int, 6>());
        case 7: return by_nh(std::integral_constant<int, 7>());
        case 8: return by_nh(std::integral_constant<int, 8>());
#endif
        }
        return KVC_ERR_INVAL;
    };
    typedef std::integral_constant<int, KVC_CU_F16> F16;
    typedef std::integral_constant<int, KVC_CU_I8> I8;
    auto by_fmt = [&](auto d) -> int {
        int rc = KVC_ERR_INVAL;
        kvc__cu_with_formats(v.k_fmt, v.v_fmt, [&](auto kf, auto vf) { rc = by_g(d, kf, vf); });
        return rc;
    };
    if (v.D == 32) {
        typedef std::integral_constant<int, 32> D32;
        if (v.k_fmt == KVC_CU_F16 && v.v_fmt == KVC_CU_F16) return by_g(D32(), F16(), F16());
        if (v.k_fmt == KVC_CU_I8 && v.v_fmt == KVC_CU_I8) return by_g(D32(), I8(), I8());
        return KVC_ERR_INVAL;
    }
    if (v.D == 64) return by_fmt(std::integral_constant<int, 64>());
    if (v.D == 128) return by_fmt(std::integral_constant<int, 128>());
    return KVC_ERR_INVAL;
}

/* The plan. Work shares: ppb 4 (a warp per pair), ppb 2 (two warps per
 * pair), ppb 1 with n splits (blocks of NW warps per (pair, split)). Among
 * those whose blocks all fit in one wave of resident blocks, the one whose
 * busiest multiprocessor has the fewest pages per warp-slot wins: cost =
 * ceil(blocks / SMs) * pages per warp (a multiprocessor's throughput is
 * shared by its blocks), splits costing a merge (about as much as 8 pages
 * of a warp for every 32 partials) and, past FAN, a second merge level.
 * 4-bit pages (but int4 beside f16 at head_dim 128, which takes f16's
 * rules: Llama-8B f16 / int4 1 x 32k 35.0 -> 32.1 us, while at head_dim 64
 * the same rule made SmolLM2's 11.1 -> 12.1, session 15 run 7), and the
 * register path's 8-bit ones at head_dim 64 (half a slot's bytes), need two
 * warps a scheduler to keep up with their copies:
 * with fewer than 2 NW warps on a multiprocessor their cost grows in
 * proportion (one block a multiprocessor: Llama-8B int4 1 x 32k 30.4 us at
 * 16 splits against 25.9 at 32, while f16 takes 44.1 against 44.8 and
 * int8 28.1 against 30.4; SmolLM2 int8 1 x 32k 11.7 us at 64 splits, two
 * blocks on most multiprocessors, against 13.1 at 32; notes/gpu.md session
 * 10), and ties go to fewer splits (fewer partials to merge), then to more
 * blocks. Both for plain pages only: over a transform's coefficients (at
 * most half the bytes a page, a projection ahead) the same rules made
 * SmolLM2 latent:64 64 x 2k 10-13% and Llama-8B hybrid:r64 1 x 32k 14%
 * slower, so there ties go to more blocks, as before. If none fits, a warp
 * per pair (the fewest blocks). */
plan search_plan(const kvc__cu_view &v, int n_seqs, int max_ctx, int nh, bool transform, int w) {
    const int sms = kvc__cu_sm_count();
    int per_sm = with_instance(v, nh, w, [](auto d, auto g, auto kf, auto vf, auto h, auto wi) {
        return blocks_per_sm<decltype(d)::value, decltype(g)::value, decltype(kf)::value, decltype(vf)::value,
                             decltype(h)::value, decltype(wi)::value>();
    });
    if (per_sm < 1) per_sm = 1;
    const int pages = max_ctx > 0 ? (max_ctx + KVC__CU_B - 1) / KVC__CU_B : 1;
    const long pairs = (long)(n_seqs > 0 ? n_seqs : 1) * (v.n_heads / nh);
    const long resident = (long)sms * per_sm;
    plan pl = {4, pages, 1, nh, w, false, 0.0};
    auto u4 = [](int fmt) { return fmt == KVC_CU_U4C || kvc__cu_is_u4t(fmt); };
    const bool f16_side = v.k_fmt == KVC_CU_F16 || v.v_fmt == KVC_CU_F16;
    const bool wide = u4(v.k_fmt) || u4(v.v_fmt) ? !(f16_side && v.D > 64)
                                                 : reg_path(v.k_fmt, v.v_fmt) && v.D <= 64;
    const int warps_needed = !transform && wide ? 2 * NW : NW;
    long best_blocks = 0;
    double best = 0;
    /* a share's cost (its blocks beyond one wave as more blocks a multiprocessor) */
    auto price = [&](int ppb, int pps, long &blocks) {
        const int splits = (pages + pps - 1) / pps;
        blocks = (pairs + ppb - 1) / ppb * splits;
        const long per_warp = (pps + NW / ppb - 1) / (NW / ppb);
        const long on_sm = (blocks + sms - 1) / sms;
        double c = (double)on_sm * (double)per_warp;
        if (on_sm * NW < warps_needed) c *= (double)warps_needed / (double)(on_sm * NW);
        if (splits > 1) c += 8.0 * ((splits + 31) / 32 + (splits > FAN ? 1 : 0));
        return c;
    };
    auto consider = [&](int ppb, int pps) {
        const int splits = (pages + pps - 1) / pps;
        if (splits > MAX_SPLITS) return;
        long blocks;
        const double c = price(ppb, pps, blocks);
        if (blocks > resident) return;
        if (!best_blocks || c < best ||
            (c == best && (transform ? blocks > best_blocks
                                     : splits < pl.n_splits || (splits == pl.n_splits && blocks > best_blocks)))) {
            best = c, best_blocks = blocks;
            pl.ppb = ppb, pl.pps = pps, pl.n_splits = splits;
        }
    };
    if (g_warp_per_seq > 0) {
        pl.ppb = g_warp_per_seq >= 2 ? 2 : 4;
    } else if (g_pages_per_split > 0) {
        pl.ppb = 1;
        pl.pps = g_pages_per_split;
        if ((pages + pl.pps - 1) / pl.pps > MAX_SPLITS) pl.pps = (pages + MAX_SPLITS - 1) / MAX_SPLITS;
        pl.n_splits = (pages + pl.pps - 1) / pl.pps;
    } else {
        if (g_warp_per_seq == 0) {
            consider(4, pages);
            consider(2, pages);
        }
        for (int splits = 1; splits <= MAX_SPLITS && splits <= pages; splits++) {
            const int pps = (pages + splits - 1) / splits;
            if ((pages + pps - 1) / pps == splits) consider(1, pps);
        }
        if (!best_blocks && g_warp_per_seq < 0) pl.ppb = 1;   /* nothing fits one wave: the fewest split blocks */
    }
    long blocks;
    pl.cost = price(pl.ppb, pl.pps, blocks);
    pl.fits = blocks <= resident;
    return pl;
}

/* The search costs microseconds of host time (up to MAX_SPLITS candidates)
 * and a decode step asks once per layer with the same sizes: the last
 * answer of this host thread is kept. */
plan make_plan(const kvc__cu_view &v, int n_seqs, int max_ctx, bool transform) {
    struct key {
        int n_heads, G, D, k_fmt, v_fmt, n_seqs, max_ctx, pps, wps, nh, wide;
        bool transform;
        bool operator==(const key &o) const {
            return n_heads == o.n_heads && nh == o.nh && G == o.G && D == o.D && k_fmt == o.k_fmt && v_fmt == o.v_fmt &&
                   n_seqs == o.n_seqs && max_ctx == o.max_ctx && pps == o.pps && wps == o.wps && wide == o.wide &&
                   transform == o.transform;
        }
    };
    thread_local key last_key = {-1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, false};
    thread_local plan last = {4, 1, 1, 1, 0, false, 0.0};
    const int nh = latent_nh(v, n_seqs);
    const int wm = wide_mode();
    const key k = {v.n_heads, v.G, v.D, v.k_fmt, v.v_fmt, n_seqs, max_ctx, g_pages_per_split, g_warp_per_seq, nh, wm,
                   transform};
    if (!(k == last_key)) {
        /* the wide instance (ring::I8W) where it is compiled, its grid fits
         * one wave and it costs no more: the plain one fills 4 blocks a
         * multiprocessor, the wide one 3 (Llama-8B hybrid:r64 256 x 512,
         * 512 blocks: 71.7 us by the plain instance in one wave, 84.5 by the
         * wide one in two; SmolLM2 int8 88 x 2k: two splits, 528 blocks, 23.7
         * us plain; one split wide, 25.6 us, but its decode step 37.7 ->
         * 28.5, notes/gpu.md "Session 24") */
        const bool can = nh == 1 && wide_ok(v.D, v.k_fmt, v.v_fmt, 1);
        last = search_plan(v, n_seqs, max_ctx, nh, transform, can && wm == 1);
        if (can && wm < 0) {
            const plan pw = search_plan(v, n_seqs, max_ctx, nh, transform, 1);
            if (pw.fits && (!last.fits || pw.cost <= last.cost)) last = pw;
        }
        last_key = k;
    }
    return last;
}

size_t align256(size_t n) { return (n + 255) & ~(size_t)255; }

/* The workspace: merge counters, split partials, then (transforms) the
 * projected queries and the coefficient outputs. */
struct ws_parts {
    size_t counters, ml, acc, qp, cp, total;
};

ws_parts ws_layout(const kvc__cu_view &v, int n_seqs, const plan &pl, bool transform) {
    ws_parts w;
    const size_t units = (size_t)n_seqs * v.n_heads;
    const size_t splits = pl.ppb > 1 || pl.n_splits == 1 ? 0 : (size_t)pl.n_splits;
    w.counters = 0;
    w.ml = align256(units * 2 * (1 + FAN) * sizeof(int));
    /* NH ml_stride(G) >= ml_stride(NH G): a multiple of 4 floats >= 2 NH G */
    w.acc = w.ml + align256(units * splits * ml_stride(v.G) * sizeof(float));
    w.qp = w.acc + align256(units * splits * v.G * v.D * sizeof(float));
    const size_t rows = transform ? units * v.G * v.D * sizeof(float) : 0;
    w.cp = w.qp + align256(rows);
    w.total = w.cp + align256(rows);
    return w;
}

/* Programmatic dependent launch (Hopper): a decode launch may start while
 * the kernel before it in the stream finishes (its blocks wait in
 * griddepcontrol.wait before reading anything), which hides the launch and
 * block scheduling behind that kernel's tail. Where the next launch's blocks
 * are released matters (notes/gpu.md, session 6): released at the start,
 * they take the slots this grid leaves free at once and the rest as it
 * finishes, so a grid that leaves some slots free (SmolLM2 f16 and int8 at
 * 64 x 2k: 384 blocks of 528) lands unevenly and runs 10-20% slower; released
 * at the exit they wait for the whole grid. So: at the start when the next
 * grid fits beside this one (1 x 32k: -5%) or, on the register path, when
 * nearly every slot is taken (-1 to -3%) or, on the register path, the
 * caller gave the prefetch promise (kvc_cu_decode_args.prefetch: the next
 * decode's blocks then stream their first pages before their wait, useful
 * work while the rest land; SmolLM2 int8 256 x 512 19.9 -> 19.2 us, session
 * 12); else at the exit. KVC_CU_PDL in the
 * environment: 0 off (plain launches), 1 always at the start, 3 always at
 * the exit (benchmarks' before and after). */
int pdl_mode() {
    static const int mode = kvc__cu_env("KVC_CU_PDL", -1);
    return mode;
}

/* Whether a decode may read pages before the kernel before it completes
 * where its caller allows it (kvc_cu_decode_args.prefetch): KVC_CU_PREFETCH=0
 * in the environment never (benchmarks' before). */
bool prefetch_mode() {
    static const bool on = kvc__cu_env("KVC_CU_PREFETCH", 1) != 0;
    return on;
}

/* Split blocks as a thread block cluster (cluster_merge): when a pair has 2
 * to MAX_CLUSTER splits, the grid is one wave filling at least half the
 * resident slots and at least 3 blocks fit a multiprocessor. Measured
 * (session 7, graph, default plans unless named): SmolLM2 64 x 2k (384
 * blocks of 528, 2 splits) f16 34.9-35.1 -> 33.8-34.5 us, int8 21.9 ->
 * 20.9-21.1, int4 20.6-20.7 -> 19.8-20.1; but Llama-8B (2 blocks a
 * multiprocessor) pps128 at 4 x 8k (128 blocks, 4 splits) 44.9 -> 68.4 and
 * pps64 at 64 x 2k (four waves) 162.5 -> 168.9, and clusters of 8 with a
 * workspace merge above them for more splits made every 1 x 32k case slower
 * (SmolLM2 f16 14.0 -> 16.0, Llama f16 45.3 -> 62.4): cluster placement
 * needs the cluster's blocks free at once in one GPC. */

int g_cluster = -2;              /* kvc_cu_set_decode_cluster; -2: not set, the environment's */

int cluster_mode() {
    if (g_cluster == -2) {
        const int v = kvc__cu_env("KVC_CU_CLUSTER", -1);
        g_cluster = v == 0 ? 0 : v == 2 ? 1 : -1;
    }
    return g_cluster;
}

thread_local bool g_lands_early = false;   /* kvc__cu_decode_lands_early */

/* The decode kernel over a view: q and out as the view's rows (G rows of D
 * numbers per head, q_stride / out_stride floats per sequence). */
int launch_decode(const kvc__cu_view &v, const void *arena, int64_t n_pages, const kvc_cu_decode_args *a,
                  const float *q, int64_t q_stride, float *out, int64_t out_stride, const plan &pl, const ws_parts &w,
                  void *workspace, bool pdl, cudaStream_t stream, char *err, size_t errlen) {
    decode_params p;
    p.arena = (const uint8_t *)arena;
    p.g = v.g;
    p.bt = a->block_tables;
    p.bt_stride = a->bt_stride;
    p.ctx_lens = a->ctx_lens;
    p.ctx0 = a->ctx0;
    p.n_kv_head = v.n_heads / pl.nh;   /* heads of NH groups */
    p.ppb = pl.ppb;
    p.n_pairs = (int64_t)a->n_seqs * p.n_kv_head;
    p.pps = pl.pps;
    p.n_splits = pl.n_splits;
    p.zero = 0;
    p.qscale = a->scale * 1.4426950408889634f;
    const int pm = pdl ? pdl_mode() : 0;
    p.fresh = pm != 0 && a->prefetch && prefetch_mode() ? (a->fresh > 0 ? a->fresh : 0) : -1;
    p.q = q;
    p.q_stride = q_stride;
    p.out = out;
    p.out_stride = out_stride;
    uint8_t *ws = (uint8_t *)workspace;
    p.counters = (int *)(ws + w.counters);
    p.ws_ml = (float *)(ws + w.ml);
    p.ws_acc = (float *)(ws + w.acc);
    const dim3 grid((unsigned)((p.n_pairs + pl.ppb - 1) / pl.ppb), pl.n_splits);
    cudaError_t launch_err = cudaSuccess;
    int map_rc = KVC_OK;
    int rc = with_instance(v, pl.nh, pl.wide, [&](auto d, auto g, auto kf, auto vf, auto nh, auto wi) -> int {
        constexpr int D_ = decltype(d)::value, G_ = decltype(g)::value, KF_ = decltype(kf)::value,
                      VF_ = decltype(vf)::value, NH_ = decltype(nh)::value, W_ = decltype(wi)::value;
        /* (also sets the shared memory limit) */
        const int per_sm = blocks_per_sm<D_, G_, KF_, VF_, NH_, W_>();
        const long resident = (long)kvc__cu_sm_count() * per_sm;
        const long blocks = (long)grid.x * grid.y;
        const int cm = cluster_mode();
        p.cluster = cluster_ok<D_, NH_>() && pl.ppb == 1 && pl.n_splits > 1 && pl.n_splits <= MAX_CLUSTER &&
                            (cm == 1 || (cm < 0 && per_sm >= 3 && blocks <= resident && 2 * blocks >= resident))
                        ? pl.n_splits
                        : 1;
        const long free_slots = resident - blocks;
        const bool early = free_slots >= blocks || (reg_path(KF_, VF_) && free_slots * 16 <= blocks);
        /* a quantized grid whose blocks prefetch before their wait: at the
         * start regardless (they stream while the rest land) */
        p.pdl_early = pm == 1 || (pm < 0 && (early || (reg_path(KF_, VF_) && p.fresh >= 0)));
        g_lands_early = early;
        if constexpr (ring<D_, KF_, VF_, NH_, W_>::TMA)
            if ((map_rc = kvc__cu_f16_maps(v, arena, n_pages, &p.tk, &p.tv, err, errlen)) != KVC_OK) return KVC_OK;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = grid;
        cfg.blockDim = dim3(NT);
        cfg.dynamicSmemBytes = smem_bytes<D_, G_, KF_, VF_, NH_, W_>();
        cfg.stream = stream;
        cudaLaunchAttribute attr[2];
        unsigned n_attr = 0;
        if (pm != 0) {
            attr[n_attr].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            attr[n_attr++].val.programmaticStreamSerializationAllowed = 1;
        }
        if (p.cluster > 1) {
            attr[n_attr].id = cudaLaunchAttributeClusterDimension;
            attr[n_attr].val.clusterDim.x = 1;
            attr[n_attr].val.clusterDim.y = (unsigned)p.cluster;
            attr[n_attr++].val.clusterDim.z = 1;
        }
        cfg.attrs = attr;
        cfg.numAttrs = n_attr;
        launch_err = cudaLaunchKernelEx(&cfg, decode_kernel<D_, G_, KF_, VF_, NH_, W_>, p);
        if (launch_err != cudaSuccess && p.cluster > 1) {   /* no room for the clusters (a partitioned GPU):
                                                            * the workspace merge, which the workspace has */
            (void)cudaGetLastError();
            p.cluster = 1;
            cfg.numAttrs = pm != 0 ? 1 : 0;
            launch_err = cudaLaunchKernelEx(&cfg, decode_kernel<D_, G_, KF_, VF_, NH_, W_>, p);
        }
        return KVC_OK;
    });
    if (map_rc != KVC_OK) return map_rc;
    if (rc != KVC_OK)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: %d stored numbers per token, %d query rows per head, formats %d/%d: "
                     "not compiled", v.D, v.G, v.k_fmt, v.v_fmt);
    KVC__CU_TRY(launch_err);
    KVC__CU_TRY(cudaGetLastError());
    return KVC_OK;
}

bool has_transform(const kvc_cu_layout *L) { return L->k_shape != KVC_CU_PLAIN || L->v_shape != KVC_CU_PLAIN; }

} // namespace

bool kvc__cu_decode_lands_early(void) { return g_lands_early; }

/* The driver's tensor map encoder (the runtime hands it out, so nothing
 * links libcuda), or NULL. */
static PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
        void *f = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) !=
                cudaSuccess ||
            q != cudaDriverEntryPointSuccess)
            f = nullptr;
        (void)cudaGetLastError();
        return (PFN_cuTensorMapEncodeTiled_v12000)f;
    }();
    return fn;
}

int kvc__cu_f16_maps_encode(const kvc__cu_view &v, const void *arena, int64_t n_pages, CUtensorMap *tk,
                            CUtensorMap *tv, char *err, size_t errlen) {
    const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode) KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: the driver has no cuTensorMapEncodeTiled (needed for f16 pages)");
    const int D = v.D;
    const cuuint64_t hk = v.g.k_block_bytes ? (cuuint64_t)v.n_heads : 1, hv = v.g.v_block_bytes ? (cuuint64_t)v.n_heads : 1;
    const cuuint32_t ones[4] = {1, 1, 1, 1};
    uint8_t *base = (uint8_t *)arena + v.g.layer_off;
    memset(tk, 0, sizeof *tk);
    memset(tv, 0, sizeof *tv);
    CUresult r = CUDA_SUCCESS;
    if (v.k_fmt == KVC_CU_F16) {   /* K (D, 16): lines of 128 bytes (4 dimensions), 128-byte swizzle */
        const cuuint64_t dim[4] = {64, (cuuint64_t)D / 4, hk, (cuuint64_t)n_pages};
        const cuuint64_t str[3] = {128, v.g.k_block_bytes ? v.g.k_block_bytes : 128, v.g.page_bytes};
        const cuuint32_t box[4] = {64, (cuuint32_t)D / 4, 1, 1};
        r = encode(tk, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, base, dim, str, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
                   CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    }
    if (r == CUDA_SUCCESS && v.v_fmt == KVC_CU_F16) {   /* V (16, D): rows of D numbers, boxes of 64 */
        const cuuint64_t dim[4] = {(cuuint64_t)D, 16, hv, (cuuint64_t)n_pages};
        const cuuint64_t str[3] = {(cuuint64_t)D * 2, v.g.v_block_bytes ? v.g.v_block_bytes : 128, v.g.page_bytes};
        const cuuint32_t box[4] = {64, 16, 1, 1};
        r = encode(tv, CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, base + v.g.k_region, dim, str, box, ones,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    }
    if (r != CUDA_SUCCESS)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: tensor map of the f16 blocks (head_dim %d, %lld pages of %zu "
                     "bytes): driver error %d", D, (long long)n_pages, v.g.page_bytes, (int)r);
    return KVC_OK;
}

int kvc__cu_f16_maps(const kvc__cu_view &v, const void *arena, int64_t n_pages, CUtensorMap *tk, CUtensorMap *tv,
                     char *err, size_t errlen) {
    struct entry {
        CUtensorMap tk, tv;
        const void *arena;
        kvc__cu_geom g;
        int D, heads, k_fmt, v_fmt;
        int64_t n_pages;
    };
    static thread_local entry cache[64];
    static thread_local int n_cached = 0, next = 0;
    for (int i = 0; i < n_cached; i++) {
        const entry &e = cache[i];
        if (e.arena == arena && e.D == v.D && e.heads == v.n_heads && e.k_fmt == v.k_fmt && e.v_fmt == v.v_fmt &&
            e.n_pages == n_pages && !memcmp(&e.g, &v.g, sizeof v.g)) {
            *tk = e.tk;
            *tv = e.tv;
            return KVC_OK;
        }
    }
    const int rc = kvc__cu_f16_maps_encode(v, arena, n_pages, tk, tv, err, errlen);
    if (rc != KVC_OK) return rc;
    entry &e = cache[next];
    next = (next + 1) % 64;
    n_cached = n_cached < 64 ? n_cached + 1 : 64;
    e.tk = *tk;
    e.tv = *tv;
    e.arena = arena;
    e.g = v.g;
    e.D = v.D;
    e.heads = v.n_heads;
    e.k_fmt = v.k_fmt;
    e.v_fmt = v.v_fmt;
    e.n_pages = n_pages;
    return KVC_OK;
}

extern "C" void kvc_cu_set_decode_cluster(int mode) { g_cluster = mode < 0 ? -1 : mode > 0 ? 1 : 0; }

extern "C" void kvc_cu_set_decode_wide(int mode) { g_wide = mode < 0 ? -1 : mode > 0 ? 1 : 0; }

extern "C" void kvc_cu_set_decode_tuning(int pages_per_split, int warp_per_sequence) {
    g_pages_per_split = pages_per_split > 0 ? pages_per_split : 0;
    g_warp_per_seq = warp_per_sequence;
}

/* The largest workspace over the layers' views (ranks may differ by layer). */
extern "C" size_t kvc_cu_decode_workspace(const kvc_cu_layout *L, int n_seqs, int max_ctx, int n_rep) {
    if (!L || !L->pool || n_seqs <= 0 || n_rep < 1 || n_rep > 8) return 0;
    size_t most = 0;
    for (int l = 0; l < L->n_layer; l++) {
        const kvc__cu_view v = kvc__cu_view_of(L, l, n_rep);
        if (with_instance(v, 1, 0, [](auto, auto, auto, auto, auto, auto) { return KVC_OK; }) != KVC_OK) continue;
        const size_t t = ws_layout(v, n_seqs, make_plan(v, n_seqs, max_ctx, has_transform(L)), has_transform(L)).total;
        most = t > most ? t : most;
        if (!has_transform(L)) break;          /* every layer alike */
    }
    return most;
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
    const kvc__cu_view v = kvc__cu_view_of(L, layer, a->n_rep);
    const bool transform = has_transform(L);
    const plan pl = make_plan(v, a->n_seqs, a->max_ctx, transform);
    const ws_parts w = ws_layout(v, a->n_seqs, pl, transform);
    if (workspace_bytes < w.total)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: decode: workspace %zu bytes, need %zu", workspace_bytes, w.total);
    cudaStream_t st = (cudaStream_t)stream;
    const int64_t n_pages = kvc_pages_total(L->pool);
    if (!transform)
        return launch_decode(v, arena, n_pages, a, a->q, a->q_stride, a->out, a->out_stride, pl, w, workspace, true, st, err,
                             errlen);

    /* transforms: project (K), decode over coefficients, expand (V); a plain
     * side reads q or writes out directly (its rank is head_dim) */
    uint8_t *ws = (uint8_t *)workspace;
    float *qp = (float *)(ws + w.qp), *cp = (float *)(ws + w.cp);
    const int64_t row_stride = (int64_t)L->n_kv_head * a->n_rep * v.D;   /* = n_heads * G * D */
    const float *q_in = a->q;
    int64_t q_in_stride = a->q_stride;
    /* not after the projection launch: there programmatic launch measured
     * 1-3% slower (session 6: SmolLM2 hybrid:r32 20.7 -> 21.2 us) */
    const bool pdl = L->k_shape == KVC_CU_PLAIN;
    if (L->k_shape != KVC_CU_PLAIN) {
        rc = kvc__cu_project(L, layer, a->n_seqs, a->n_rep, a->q, a->q_stride, qp, st, err, errlen);
        if (rc) return rc;
        q_in = qp;
        q_in_stride = row_stride;
    }
    if (L->v_shape == KVC_CU_PLAIN)
        return launch_decode(v, arena, n_pages, a, q_in, q_in_stride, a->out, a->out_stride, pl, w, workspace, pdl, st, err,
                             errlen);
    rc = launch_decode(v, arena, n_pages, a, q_in, q_in_stride, cp, row_stride, pl, w, workspace, pdl, st, err, errlen);
    if (rc) return rc;
    return kvc__cu_expand(L, layer, a->n_seqs, a->n_rep, cp, a->ctx_lens, a->ctx0, a->out, a->out_stride, st, err,
                          errlen);
}
