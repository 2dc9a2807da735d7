/* prefill.cu: paged prefill attention on the GPU (kvc_cu_prefill): a chunk
 * of query tokens of one sequence against every cached position up to each
 * token's own (causal), K and V read from the pages.
 *
 * f16 K and V run on tensor cores (mma.sync m16n8k16, fp16 inputs, fp32
 * accumulation), flash-attention style: a thread block takes 128 query rows
 * (row = token * n_rep + rep, so the query heads sharing a kv head share each
 * K/V tile) of one kv head; its 8 warps take 16 rows each (64-row blocks of 4
 * warps read every tile for half as many rows: 5-30% slower, session 13). K/V tiles of 64
 * positions (4 pages) land in shared memory 4 stages deep for head_dim 64
 * and 2 for 128 (tile_layout: the tensor copy's swizzled blocks, or padded
 * rows), which the transposing ldmatrix reads without bank conflicts. f16
 * pages at head_dim >= 64 come by tensor copies (a box a warp, an mbarrier
 * a stage; session 16: chunks 16-25% faster than by cp.async), head_dim 32
 * by cp.async into padded rows.
 * Scores S = Q K^T (16 x 64 per warp) stay in registers, go through the
 * online softmax and become the A operand of O += P V directly. Queries are
 * rounded to fp16 after scaling (scale * log2 e); P is rounded to fp16 for
 * the second product; sums stay fp32.
 *
 * Quantized pages (int8, int4; K and V in any pairing the layout accepts)
 * take the same path: each tile's raw blocks are copied (cp.async, NQ
 * stages deep) and dequantized by the block into one f16 tile (padded
 * rows) (x = code * scale, or min + scale * code, rounded to fp16: a
 * relative 2^-12 per number, the same order as the query's and the
 * weights' rounding); the full-size K/V never reach device memory.
 * That dequantizes every tile once per block of 128 query rows: a chunk of
 * 2048 tokens of Llama-8B (4 query heads a kv head) is 64 blocks a kv head,
 * and its int8 chunk took 1.7x the f16 one. So by default quantized pages
 * take the expanded path instead (kvc_cu_set_prefill_expand): one kernel
 * dequantizes the chunk's context once into f16 pages of a scratch arena
 * (stream-ordered, given back to a pool after the call; the same halves
 * the tiles would hold, so the same results), and the f16 kernel reads
 * those by tensor copies. The scratch is the one place full-size K/V reach
 * device memory, for the length of one prefill call: (pos0 + n) * 4 *
 * head_dim bytes a kv head (Llama-8B at 8k positions: 34 MB); where the
 * device has no room for it the chunk is read in registers. Session 19
 * (gpu_bench, chunks after 2048 positions): Llama-8B int8 2048 tokens 674
 * -> 402 us (f16 390), 512 tokens 142 -> 95; SmolLM2 155 -> 106 (f16 99);
 * even a 32-token chunk (one block) 77 -> 67 us. Since the context split
 * below, a chunk of one block after a long context is read in registers
 * again: each split dequantizes its run once (expand_pays).
 *
 * A chunk of few query rows after a long context makes a grid of few
 * blocks, each walking the whole context alone while most multiprocessors
 * idle (a 128-token Llama-8B chunk after 16k positions: 32 blocks, ~510 us).
 * So the context is split (plan_splits): grid z runs of it, each block's
 * rows leave an unnormalised partial (sums, max, sum of weights) in
 * scratch, and merge_kernel combines a row's partials as decode's merge
 * does. Every split starts at or before the chunk's first position, so
 * every row has a position in every split.
 *
 * Small chunks whose tokens' context L2 holds go to the decode kernel
 * instead (prefill_by_decode, small_by_decode), which splits the context
 * across the GPU too and reads it once per token.
 *
 * Transform codecs run the same kernel over their coefficients
 * (cuda/common.cuh's view: D = the rank, 32, 64 or 128; a latent's pages
 * shared by all heads), the chunk's query rows projected before it
 * (transform.cu) and its coefficient outputs expanded after it. */
#include <math.h>
#include <string.h>

#include <mutex>

#include "cache/cuda/common.cuh"

namespace {

constexpr int ROWS = 128;        /* query rows per block */
constexpr int TK = 64;           /* positions per K/V tile */
constexpr int PT = TK / KVC__CU_B;   /* pages per tile */
constexpr int PNT = 256;         /* threads: a warp per 16 rows */
int g_expand = -2;               /* kvc_cu_set_prefill_expand; -2: not yet read from the environment */
int g_small = -2;                /* kvc_cu_set_prefill_small; -2: not yet read from the environment */
int g_split = -2;                /* kvc_cu_set_prefill_split; -2: not yet read from the environment */
constexpr int MAX_SPLITS = 64;   /* context splits of a chunk (merge_kernel holds 2 a lane) */
constexpr int MIN_SPLIT_TILES = 4;   /* the planner's shortest split: 256 positions */
constexpr int SPLIT_MERGE = 2;   /* the planner's cost of the merge launch, in tiles */
constexpr int EXPAND_MIN_BLOCKS = 2;   /* expand_pays */

struct prefill_params {
    CUtensorMap tk, tv;          /* f16 at head_dim >= 64: kvc__cu_f16_maps */
    const uint8_t *arena;
    kvc__cu_geom g;
    const int32_t *bt;           /* (>= ceil((pos0 + n) / 16)) */
    int pos0, n, G;
    float qscale;                /* scale * log2(e) */
    const float *q;              /* (n, q_stride) */
    int64_t q_stride;
    float *out;
    int64_t out_stride;
    /* a split context (grid z > 1): block z attends to tiles [z * split_tiles,
     * (z + 1) * split_tiles), the last split to the block's end, and stores
     * its rows' unnormalised sums, max and sum of weights to part (see
     * part_row); merge_kernel makes out of them */
    int split_tiles;
    int hq;                      /* query heads (n_kv_head * G): part's rows a token */
    float *part;
};

/* Split z's record of query head qh of token tok: D sums, then m and l. */
__host__ __device__ __forceinline__ size_t part_row(int D, int n, int hq, int z, int tok, int qh) {
    return (((size_t)z * n + tok) * hq + qh) * (size_t)(D + 2);
}

/* An f16 tile's layout in shared memory, either (SW) the tensor copy's:
 * the 4 pages' K blocks then their V blocks, each swizzled (common.cuh's
 * kvc__cu_k_unit, kvc__cu_v_unit), or padded rows:
 *   K: (4 pages, D dims) rows of 48 bytes (16 halves + 8 of padding)
 *   V: (64 positions) rows of D + 8 halves
 * both read by the transposing ldmatrix without bank conflicts. The
 * dequantized tiles keep the padded rows: written into the swizzled units
 * they made quantized chunks 3-11% slower (session 16 run 5). Offsets in
 * bytes of 16-byte units: K (page j, dim, half h of 8 positions), V
 * (position, unit u of 8 dimensions). */
template <int D, bool SW> struct tile_layout {
    static constexpr int BLOCK = 32 * D;                 /* bytes of a page's f16 K or V block */
    static constexpr int K_ROW = 48, V_ROW = 2 * D + 16;
    static constexpr int K_BYTES = SW ? PT * BLOCK : PT * D * K_ROW;
    static constexpr int STAGE = SW ? 2 * K_BYTES : K_BYTES + TK * V_ROW;   /* bytes */
    static __device__ __forceinline__ int k_off(int j, int dim, int h) {
        return SW ? j * BLOCK + 16 * kvc__cu_k_unit<D>(dim, h) : (j * D + dim) * K_ROW + 16 * h;
    }
    static __device__ __forceinline__ int v_off(int pos, int u) {   /* from the tile's V part */
        return SW ? (pos / KVC__CU_B) * BLOCK + 16 * kvc__cu_v_unit<D>(pos % KVC__CU_B, u) : pos * V_ROW + 16 * u;
    }
};

/* f16 pages: NS stages of a tile; tensor copies (SW) from head_dim 64 */
template <int D> struct smem_shape {
    typedef tile_layout<D, D >= 64> L;
    static constexpr int STAGE = L::STAGE;
    static constexpr int NS = D <= 64 ? 4 : 2;           /* pipeline stages (64 KB at 64 and 128) */
    /* 1024-byte alignment slack (the swizzle's period; tensor copies only), stages, mbarriers */
    static constexpr size_t BYTES = (D >= 64 ? 1024 : 0) + NS * (size_t)STAGE + 8 * NS;
};

/* Quantized pages: one f16 tile (padded rows), then NQ stages of raw
 * blocks (PT pages, K block then V block each). */
template <int D, int KF, int VF> struct raw_shape {
    static constexpr int KB = kvc__cu_block_bytes(KF, D);
    static constexpr int VB = kvc__cu_block_bytes(VF, D);
    static constexpr int PAGE = KB + VB;
    static constexpr int STAGE = PT * PAGE;              /* bytes */
    static constexpr int NQ = D <= 64 ? 4 : 3;
    static constexpr size_t BYTES = tile_layout<D, false>::STAGE + (size_t)NQ * STAGE;
};

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

/* Copies K/V tile t (positions t*64 .. +63) into one stage by cp.async
 * (head_dim 32). Positions at or past ctx_end read as zeros (V) or are
 * masked later (K). */
template <int D>
__device__ __forceinline__ void load_tile(const prefill_params &p, int head, int t, int ctx_end, uint8_t *stage) {
    typedef typename smem_shape<D>::L TL;
    uint8_t *Ks = stage, *Vs = stage + TL::K_BYTES;
    const int n_pages = (ctx_end + KVC__CU_B - 1) / KVC__CU_B;
#pragma unroll
    for (int it = 0; it < 8 * D / PNT; it++) {
        const int c = threadIdx.x + it * PNT;            /* K: (page j, dim, half) 16-byte chunks */
        const int j = c / (2 * D), dim = (c / 2) % D, hf = c & 1;
        const int pi = t * PT + j;
        const bool ok = pi < n_pages;
        const uint8_t *src = ok ? kvc__cu_k_block(p.arena, p.g, p.bt[pi], head) + dim * 32 + hf * 16
                                : p.arena;
        cp_async16(Ks + TL::k_off(j, dim, hf), src, ok);
    }
#pragma unroll
    for (int it = 0; it < 8 * D / PNT; it++) {
        const int c = threadIdx.x + it * PNT;            /* V: (position, 8-dim group) chunks */
        const int tok = c / (D / 8), dc = c % (D / 8);
        const int pos = t * TK + tok;
        const bool ok = pos < ctx_end;
        const uint8_t *src = ok ? kvc__cu_v_block(p.arena, p.g, p.bt[pos / KVC__CU_B], head) +
                                      (pos % KVC__CU_B) * D * 2 + dc * 16
                                : p.arena;
        cp_async16(Vs + TL::v_off(tok, dc), src, ok);
    }
}

/* Issues K/V tile t's tensor copies into one stage (f16, head_dim >= 64):
 * warp w's lane 0 copies page w % 4's K block (w < 4) or V block, then
 * arrives on the stage's mbarrier (expecting the bytes; plainly for a page
 * past the context, which is not copied). */
template <int D>
__device__ __forceinline__ void issue_tile(const prefill_params &p, int head, int t, int ctx_end, uint8_t *stage,
                                           uint32_t mb) {
    typedef tile_layout<D, true> TL;
    const int warp = threadIdx.x >> 5, j = warp & 3, pi = t * PT + j;
    if ((threadIdx.x & 31) != 0) return;
    if (pi * KVC__CU_B >= ctx_end) {
        kvc__cu_mbar_arrive(mb);
        return;
    }
    const int pg = p.bt[pi];
    const uint32_t dst = smem_addr(stage + (warp >> 2) * TL::K_BYTES + j * TL::BLOCK);
    kvc__cu_mbar_expect(mb, TL::BLOCK);
    if (warp < 4) {
        kvc__cu_tensor_copy(dst, &p.tk, 0, 0, p.g.k_block_bytes ? head : 0, pg, mb);
    } else {
#pragma unroll
        for (int h = 0; h < D / 64; h++)
            kvc__cu_tensor_copy(dst + 2048 * h, &p.tv, 64 * h, 0, p.g.v_block_bytes ? head : 0, pg, mb);
    }
}

/* Copies the raw K and V blocks of tile t's pages into a raw stage (pages
 * past the context are left out: dequant_tile writes zeros for them). */
template <int D, int KF, int VF>
__device__ __forceinline__ void load_raw(const prefill_params &p, int head, int t, int ctx_end, uint8_t *stage) {
    typedef raw_shape<D, KF, VF> R;
    const int n_pages = (ctx_end + KVC__CU_B - 1) / KVC__CU_B;
    for (int c = threadIdx.x; c < R::STAGE / 16; c += PNT) {
        const int j = c / (R::PAGE / 16), u = c % (R::PAGE / 16);
        const int pi = t * PT + j;
        if (pi >= n_pages) continue;
        const uint8_t *src = u < R::KB / 16 ? kvc__cu_k_block(p.arena, p.g, p.bt[pi], head) + 16 * u
                                            : kvc__cu_v_block(p.arena, p.g, p.bt[pi], head) + 16 * u - R::KB;
        cp_async16(stage + 16 * c, src, true);
    }
}

/* 16 numbers of a block as halves: x_i = codes_i * scale_i (int8; scale
 * per number), min + scale * code_i (int4), or the stored halves (f16).
 * raw points at the first code (f16: the first half). */
template <int FMT>
__device__ __forceinline__ void dequant16(const uint8_t *raw, const float (&scale)[16], const float (&mn)[16],
                                          uint4 (&out)[2]) {
    if constexpr (FMT == KVC_CU_F16) {
        out[0] = reinterpret_cast<const uint4 *>(raw)[0];
        out[1] = reinterpret_cast<const uint4 *>(raw)[1];
    } else {
        uint32_t h[8];
        if constexpr (FMT == KVC_CU_I8) {
            const uint4 w = *reinterpret_cast<const uint4 *>(raw);
            const int8_t *c = reinterpret_cast<const int8_t *>(&w);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                __half2 v = __floats2half2_rn((float)c[2 * i] * scale[2 * i], (float)c[2 * i + 1] * scale[2 * i + 1]);
                h[i] = *reinterpret_cast<uint32_t *>(&v);
            }
        } else {
            const uint2 w = *reinterpret_cast<const uint2 *>(raw);
            const uint64_t bits = (uint64_t)w.x | ((uint64_t)w.y << 32);
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const float c0 = (float)((bits >> (8 * i)) & 15u), c1 = (float)((bits >> (8 * i + 4)) & 15u);
                __half2 v = __floats2half2_rn(fmaf(scale[2 * i], c0, mn[2 * i]), fmaf(scale[2 * i + 1], c1, mn[2 * i + 1]));
                h[i] = *reinterpret_cast<uint32_t *>(&v);
            }
        }
        out[0] = make_uint4(h[0], h[1], h[2], h[3]);
        out[1] = make_uint4(h[4], h[5], h[6], h[7]);
    }
}

__device__ __forceinline__ float half_at(const uint8_t *p, int i) {
    return __half2float(reinterpret_cast<const __half *>(p)[i]);
}

/* Row `dim` of a K block (16 positions) as halves (raw: the block's first byte). */
template <int D, int KF> __device__ __forceinline__ void k_row16(const uint8_t *raw, int dim, uint4 (&o)[2]) {
    float sc[16], mn[16];
#pragma unroll
    for (int i = 0; i < 16; i++) {
        sc[i] = KF == KVC_CU_I8 ? half_at(raw + 16 * D, i) : KF == KVC_CU_U4C ? half_at(raw + 8 * D, dim) : 1.0f;
        mn[i] = KF == KVC_CU_U4C ? half_at(raw + 10 * D, dim) : 0.0f;
    }
    dequant16<KF>(raw + dim * (KF == KVC_CU_F16 ? 32 : KF == KVC_CU_I8 ? 16 : 8), sc, mn, o);
}

/* Dimensions 16 piece .. 16 piece + 15 of position tk of a V block as halves. */
template <int D, int VF>
__device__ __forceinline__ void v_piece16(const uint8_t *raw, int tk, int piece, uint4 (&o)[2]) {
    float sc[16], mn[16];
    const int g = kvc__cu_is_u4t(VF) ? piece * 16 / kvc__cu_u4_group(VF) : 0;
    constexpr int NG = kvc__cu_is_u4t(VF) ? D / kvc__cu_u4_group(VF) : 1;
#pragma unroll
    for (int i = 0; i < 16; i++) {
        sc[i] = VF == KVC_CU_I8 ? half_at(raw + 16 * D, tk)
                : kvc__cu_is_u4t(VF) ? half_at(raw + 8 * D, g * KVC__CU_B + tk) : 1.0f;
        mn[i] = kvc__cu_is_u4t(VF) ? half_at(raw + 8 * D, (NG + g) * KVC__CU_B + tk) : 0.0f;
    }
    const int bpn = VF == KVC_CU_F16 ? 2 : VF == KVC_CU_I8 ? 1 : 0;   /* bytes per number (int4: half) */
    dequant16<VF>(raw + (bpn ? tk * D * bpn + piece * 16 * bpn : tk * D / 2 + piece * 8), sc, mn, o);
}

/* Raw stage of tile t -> the f16 tile (Ks, Vs as load_tile fills them):
 * K rows (page, dim) of 16 positions; V (position, 16 dims) pieces;
 * positions at or past ctx_end (and pages past it) become zeros. */
template <int D, int KF, int VF>
__device__ __forceinline__ void dequant_tile(const uint8_t *stage, int t, int ctx_end, uint8_t *tile) {
    typedef tile_layout<D, false> TL;
    typedef raw_shape<D, KF, VF> R;
    uint8_t *Ks = tile, *Vs = tile + TL::K_BYTES;
    const int n_pages = (ctx_end + KVC__CU_B - 1) / KVC__CU_B;
    for (int r = threadIdx.x; r < PT * D; r += PNT) {
        const int j = r / D, dim = r % D;
        uint4 o[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (t * PT + j < n_pages) k_row16<D, KF>(stage + j * R::PAGE, dim, o);
        *reinterpret_cast<uint4 *>(Ks + TL::k_off(j, dim, 0)) = o[0];
        *reinterpret_cast<uint4 *>(Ks + TL::k_off(j, dim, 1)) = o[1];
    }
    for (int c = threadIdx.x; c < TK * D / 16; c += PNT) {
        const int pos = c / (D / 16), piece = c % (D / 16), j = pos / KVC__CU_B, tk = pos % KVC__CU_B;
        uint4 o[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (t * TK + pos < ctx_end) v_piece16<D, VF>(stage + j * R::PAGE + R::KB, tk, piece, o);
        *reinterpret_cast<uint4 *>(Vs + TL::v_off(pos, 2 * piece)) = o[0];
        *reinterpret_cast<uint4 *>(Vs + TL::v_off(pos, 2 * piece + 1)) = o[1];
    }
}

/* The expanded path's first kernel: block (i, head) writes page i of the
 * chunk's context (bt[i] in the arena) as the f16 blocks of page i of a
 * scratch arena laid out by dg (K (D, 16), V (16, D), as codec.h's f16),
 * positions at or past ctx_end as zeros, and ident[i] = i (the scratch's
 * block table). Threads: D, one K row and D / 16 V pieces each. */
template <int D, int KF, int VF>
__global__ void __launch_bounds__(D) expand_kernel(const uint8_t *arena, kvc__cu_geom g, const int32_t *bt,
                                                   int ctx_end, uint8_t *scratch, kvc__cu_geom dg, int32_t *ident) {
    const int i = blockIdx.x, head = blockIdx.y, valid = min(KVC__CU_B, ctx_end - i * KVC__CU_B);
    if (head == 0 && threadIdx.x == 0) ident[i] = i;
    const int32_t pg = bt[i];
    uint8_t *kd = scratch + (size_t)i * dg.page_bytes + (size_t)head * dg.k_block_bytes;
    uint8_t *vd = scratch + (size_t)i * dg.page_bytes + dg.k_region + (size_t)head * dg.v_block_bytes;
    {
        const int dim = threadIdx.x;
        uint4 o[2];
        k_row16<D, KF>(kvc__cu_k_block(arena, g, pg, head), dim, o);
        if (valid < KVC__CU_B) {
            __half *h = reinterpret_cast<__half *>(o);
            for (int t = valid; t < KVC__CU_B; t++) h[t] = __float2half(0.0f);
        }
        reinterpret_cast<uint4 *>(kd + dim * 32)[0] = o[0];
        reinterpret_cast<uint4 *>(kd + dim * 32)[1] = o[1];
    }
    {   /* 16 positions x D / 16 pieces: one a thread */
        const int tk = threadIdx.x / (D / 16), piece = threadIdx.x % (D / 16);
        uint4 o[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
        if (tk < valid) v_piece16<D, VF>(kvc__cu_v_block(arena, g, pg, head), tk, piece, o);
        reinterpret_cast<uint4 *>(vd + (tk * D + piece * 16) * 2)[0] = o[0];
        reinterpret_cast<uint4 *>(vd + (tk * D + piece * 16) * 2)[1] = o[1];
    }
}

/* (PNT, 1): one block a multiprocessor is enough, so head_dim 64 takes
 * ~155 registers instead of being held to 128 with spills (SmolLM2 int8 and
 * int4 chunks 11-13% faster, session 13 run 5). SPLIT: grid z splits the
 * context (plan_splits) and blocks store partials; the unsplit instance is
 * the loop without split offsets (one kernel for both cost unsplit chunks
 * 0-3%, session 20 run 10). */
template <int D, int KF, int VF, bool SPLIT>
__global__ void __launch_bounds__(PNT, 1) prefill_kernel(const __grid_constant__ prefill_params p) {
    typedef smem_shape<D> S;
    typedef raw_shape<D, KF, VF> R;
    constexpr bool F16 = KF == KVC_CU_F16 && VF == KVC_CU_F16;
    constexpr bool TMA = F16 && D >= 64;                  /* tensor copies */
    typedef tile_layout<D, TMA> TL;                       /* the tiles the warps read */
    constexpr int KS = D / 16;           /* k-steps over dims */
    extern __shared__ __align__(16) unsigned char smem_raw[];
    /* stages (f16) or the f16 tile then the raw stages; 1024-byte aligned for
     * the tensor copies' swizzle (by pointer arithmetic, so it stays a shared
     * pointer). The other kernels keep the unaligned base: with the
     * alignment the quantized chunks were 1.5-4% slower (session 17 run 1). */
    uint8_t *smem = smem_raw;
    if constexpr (TMA) smem += (1024u - (smem_addr(smem_raw) & 1023u)) & 1023u;
    const uint32_t mbar = smem_addr(smem + S::NS * S::STAGE);   /* TMA: stage s's at mbar + 8 s */
    const int head = blockIdx.y, split = SPLIT ? blockIdx.z : 0;
    const int tile = gridDim.x - 1 - blockIdx.x;          /* longest rows first */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int gid = lane >> 2, tig = lane & 3;
    const int n_rows = p.n * p.G;
    const int r0 = tile * ROWS;
    const int r_last = min(r0 + ROWS, n_rows) - 1;
    const int ctx_end = p.pos0 + r_last / p.G + 1;

    /* this thread's two rows (gid, gid + 8 of the warp's 16) */
    const int wr = r0 + warp * 16;
    int lim[2];
    const float *qrow[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = min(wr + gid + 8 * h, r_last);
        const int tok = r / p.G, rep = r % p.G;
        lim[h] = p.pos0 + tok;
        qrow[h] = p.q + (int64_t)tok * p.q_stride + (int64_t)(head * p.G + rep) * D;
    }
    const int warp_min_lim = p.pos0 + min(wr, r_last) / p.G;
    uint32_t qa[KS][4];
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
#pragma unroll
        for (int hc = 0; hc < 2; hc++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const float2 x = *reinterpret_cast<const float2 *>(qrow[h] + kk * 16 + hc * 8 + 2 * tig);
                qa[kk][hc * 2 + h] = pack_half2(x.x * p.qscale, x.y * p.qscale);
            }
    }

    float o[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    /* NS-stage pipeline (quantized: NQ raw stages): tiles t + 1 .. t + NS - 1
     * load while t computes; one commit group per tile (empty past the end),
     * or (tensor copies) one mbarrier phase per tile, every warp arriving.
     * This block's tiles: t0 .. t0 + n_tiles - 1 (its split's; the planner
     * starts every split at or before position pos0, so each row has a
     * position inside every split and m is finite after the first tile) */
    const int t_end = (ctx_end + TK - 1) / TK;
    const int t0 = SPLIT ? split * p.split_tiles : 0;
    const int n_tiles = SPLIT && split < (int)gridDim.z - 1 ? min(t_end, t0 + p.split_tiles) - t0 : t_end - t0;
    constexpr int NST = F16 ? S::NS : R::NQ;
    uint8_t *raw = smem + TL::STAGE;                      /* quantized: after the f16 tile */
    if constexpr (TMA) {
        if (threadIdx.x == 0) {
#pragma unroll
            for (int i = 0; i < S::NS; i++) kvc__cu_mbar_init(mbar + 8 * i, PNT / 32);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < NST - 1; i++) {
        if (i < n_tiles) {
            if constexpr (TMA) issue_tile<D>(p, head, t0 + i, ctx_end, smem + i * S::STAGE, mbar + 8 * i);
            else if constexpr (F16) load_tile<D>(p, head, t0 + i, ctx_end, smem + i * S::STAGE);
            else load_raw<D, KF, VF>(p, head, t0 + i, ctx_end, raw + i * R::STAGE);
        }
        if constexpr (!TMA) cp_async_commit();
    }
    for (int i = 0; i < n_tiles; i++) {
        const int t = t0 + i;                             /* the tile; i its stage's count */
        if constexpr (TMA) {
            kvc__cu_mbar_wait(mbar + 8 * (i % NST), (uint32_t)(i / NST) & 1u);
            if (t * TK + TK > ctx_end) {       /* V rows past the context (stale, or pages not copied): zeros */
                uint8_t *Vs = smem + (i % NST) * S::STAGE + TL::K_BYTES;
                const int p0 = ctx_end - t * TK;
                for (int c = threadIdx.x; c < (TK - p0) * (D / 8); c += PNT)
                    *reinterpret_cast<uint4 *>(Vs + TL::v_off(p0 + c / (D / 8), c % (D / 8))) = make_uint4(0, 0, 0, 0);
            }
        } else {
            cp_async_wait<NST - 2>();
        }
        __syncthreads();   /* tile t visible to all; every warp is done with tile t - 1 */
        if (i + NST - 1 < n_tiles) {
            const int in = i + NST - 1, tn = t0 + in, st = in % NST;
            if constexpr (TMA) issue_tile<D>(p, head, tn, ctx_end, smem + st * S::STAGE, mbar + 8 * st);
            else if constexpr (F16) load_tile<D>(p, head, tn, ctx_end, smem + st * S::STAGE);
            else load_raw<D, KF, VF>(p, head, tn, ctx_end, raw + st * R::STAGE);
        }
        if constexpr (!TMA) cp_async_commit();
        if constexpr (!F16) {
            dequant_tile<D, KF, VF>(raw + (i % NST) * R::STAGE, t, ctx_end, smem);
            __syncthreads();
        }
        const uint8_t *Ks = F16 ? smem + (i % S::NS) * S::STAGE : smem, *Vs = Ks + TL::K_BYTES;

        /* S = Q K^T: 8 n-tiles of 8 positions */
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
#pragma unroll
            for (int j = 0; j < PT; j++) {
                /* matrices: dims 0-7 / 8-15 of this k-step, positions 0-7 / 8-15 of page j */
                const int mat = lane >> 3, row = lane & 7;
                const uint8_t *a = Ks + TL::k_off(j, kk * 16 + (mat & 1) * 8 + row, mat >> 1);
                uint32_t b[4];
                ldmatrix_x4_trans(b, a);
                mma16816(s[2 * j], qa[kk], b[0], b[1]);
                mma16816(s[2 * j + 1], qa[kk], b[2], b[3]);
            }
        }
        if (t * TK + TK - 1 > warp_min_lim) {
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int pos = t * TK + nt * 8 + 2 * tig + (e & 1);
                    if (pos > lim[e >> 1]) s[nt][e] = -INFINITY;
                }
        }
        /* online softmax per row; quad lanes (same gid) share a row */
        uint32_t pa[4][4];
#pragma unroll
        for (int h = 0; h < 2; h++) {
            float mx = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < 8; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * h], s[nt][2 * h + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(KVC__CU_FULL, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(KVC__CU_FULL, mx, 2));
            const float m_new = fmaxf(m[h], mx);
            const float alpha = exp2f(m[h] - m_new);
            m[h] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                s[nt][2 * h] = exp2f(s[nt][2 * h] - m_new);
                s[nt][2 * h + 1] = exp2f(s[nt][2 * h + 1] - m_new);
                sum += s[nt][2 * h] + s[nt][2 * h + 1];
            }
            l[h] = l[h] * alpha + sum;
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++) {
                o[dn][2 * h] *= alpha;
                o[dn][2 * h + 1] *= alpha;
            }
        }
#pragma unroll
        for (int kp = 0; kp < 4; kp++) {
            pa[kp][0] = pack_half2(s[2 * kp][0], s[2 * kp][1]);
            pa[kp][1] = pack_half2(s[2 * kp][2], s[2 * kp][3]);
            pa[kp][2] = pack_half2(s[2 * kp + 1][0], s[2 * kp + 1][1]);
            pa[kp][3] = pack_half2(s[2 * kp + 1][2], s[2 * kp + 1][3]);
        }
        /* O += P V */
#pragma unroll
        for (int kp = 0; kp < 4; kp++) {
#pragma unroll
            for (int dn2 = 0; dn2 < D / 16; dn2++) {
                /* matrices: positions 0-7 / 8-15 of this k-step, dims 0-7 / 8-15 of the pair */
                const int mat = lane >> 3, row = lane & 7;
                const uint8_t *a = Vs + TL::v_off(kp * 16 + (mat & 1) * 8 + row, dn2 * 2 + (mat >> 1));
                uint32_t b[4];
                ldmatrix_x4_trans(b, a);
                mma16816(o[2 * dn2], pa[kp], b[0], b[1]);
                mma16816(o[2 * dn2 + 1], pa[kp], b[2], b[3]);
            }
        }
    }

#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(KVC__CU_FULL, l[h], 1);
        l[h] += __shfl_xor_sync(KVC__CU_FULL, l[h], 2);
        const int r = wr + gid + 8 * h;
        if (r > r_last) continue;
        const int tok = r / p.G, rep = r % p.G;
        if constexpr (SPLIT) {   /* a split's partial: the sums as they are, then m and l */
            float *dst = p.part + part_row(D, p.n, p.hq, split, tok, head * p.G + rep);
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++)
                *reinterpret_cast<float2 *>(dst + dn * 8 + 2 * tig) = make_float2(o[dn][2 * h], o[dn][2 * h + 1]);
            if (tig == 0) *reinterpret_cast<float2 *>(dst + D) = make_float2(m[h], l[h]);
            continue;
        }
        float *dst = p.out + (int64_t)tok * p.out_stride + (int64_t)(head * p.G + rep) * D;
        const float inv = 1.0f / l[h];
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++)
            *reinterpret_cast<float2 *>(dst + dn * 8 + 2 * tig) =
                make_float2(o[dn][2 * h] * inv, o[dn][2 * h + 1] * inv);
    }
}

/* Scratch of a prefill call (the expanded pages, the transforms' rows),
 * stream-ordered from a pool of the current device that keeps what it has
 * reserved: the default pool hands memory back to the driver at every
 * synchronisation, and mapping it again cost ~45 us a call (session 19). It
 * holds the largest scratch a call has needed until the process ends. */
cudaError_t scratch_alloc(void **p, size_t bytes, cudaStream_t s) {
    static std::mutex mu;
    static cudaMemPool_t pools[64];
    int dev;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    if (dev < 0 || dev >= 64) return cudaMallocAsync(p, bytes, s);
    cudaMemPool_t pool;
    {
        std::lock_guard<std::mutex> lock(mu);
        if (!pools[dev]) {
            cudaMemPoolProps props = {};
            props.allocType = cudaMemAllocationTypePinned;
            props.location.type = cudaMemLocationTypeDevice;
            props.location.id = dev;
            if ((e = cudaMemPoolCreate(&pools[dev], &props)) != cudaSuccess) return e;
            uint64_t keep = UINT64_MAX;
            if ((e = cudaMemPoolSetAttribute(pools[dev], cudaMemPoolAttrReleaseThreshold, &keep)) != cudaSuccess)
                return e;
        }
        pool = pools[dev];
    }
    return cudaMallocFromPoolAsync(p, bytes, pool, s);
}

/* The splits' partials of each (token, query head) row into its output:
 * o = sum_z 2^(m_z - M) acc_z / sum_z 2^(m_z - M) l_z, M the largest m_z
 * (every m_z is finite: each split holds a position of every row). A warp a
 * row; lane z % 32 holds split z's weight. */
__global__ void __launch_bounds__(128) merge_kernel(const float *part, int D, int n, int hq, int ns, float *out,
                                                    int64_t out_stride) {
    const int row = blockIdx.x * 4 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= n * hq) return;
    const int tok = row / hq, qh = row % hq;
    float mz[MAX_SPLITS / 32], M = -INFINITY;
#pragma unroll
    for (int k = 0; k < MAX_SPLITS / 32; k++) {
        const int z = lane + 32 * k;
        mz[k] = z < ns ? part[part_row(D, n, hq, z, tok, qh) + D] : -INFINITY;
        M = fmaxf(M, mz[k]);
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) M = fmaxf(M, __shfl_xor_sync(KVC__CU_FULL, M, o));
    float w[MAX_SPLITS / 32], L = 0.0f;
#pragma unroll
    for (int k = 0; k < MAX_SPLITS / 32; k++) {
        const int z = lane + 32 * k;
        w[k] = z < ns ? exp2f(mz[k] - M) : 0.0f;
        if (z < ns) L += w[k] * part[part_row(D, n, hq, z, tok, qh) + D + 1];
    }
#pragma unroll
    for (int o = 16; o; o >>= 1) L += __shfl_xor_sync(KVC__CU_FULL, L, o);
    const float inv = 1.0f / L;
    float *dst = out + (int64_t)tok * out_stride + (int64_t)qh * D;
    for (int d = lane; d < D; d += 32) {
        float acc = 0.0f;
        for (int z = 0; z < ns; z++) {
            const float wz = __shfl_sync(KVC__CU_FULL, w[z >> 5], z & 31);
            acc = fmaf(wz, part[part_row(D, n, hq, z, tok, qh) + d], acc);
        }
        dst[d] = acc * inv;
    }
}

/* How many splits the context of a chunk takes, and the tiles a split
 * (*spt): grid blocks of `blocks` (row blocks x kv heads), `bps` of which
 * fit a multiprocessor; the shortest row block reads Tf tiles. Every split
 * starts at or before position pos0 (a tile that starts there holds a
 * position every row attends to). By default, where the row blocks read
 * about the same tiles (a chunk short beside its context), the count with
 * the least estimated time, in tiles: the grid's waves times a block's
 * tiles plus one (its start; a partial's store), plus SPLIT_MERGE for the
 * merge launch, in splits of at least MIN_SPLIT_TILES tiles of equal size
 * (session 20: SmolLM2 int8 2048 tokens after 16384 positions 652 -> 464
 * us in 9 splits, its 144 blocks being two waves of one). Where they differ (the
 * chunk's own causal triangle dominates) the block scheduler balances
 * blocks of unequal lengths by itself, so only a grid that leaves
 * multiprocessors idle splits, to fill one wave (two splits for SmolLM2's
 * 2048 tokens after 2048 were 4% slower than one). kvc_cu_set_prefill_split
 * forces a count (the tests: the last split may then be longer). */
int plan_splits(int pos0, int n, int blocks, int bps, int Tf, int *spt) {
    if (g_split == -2) g_split = max(kvc__cu_env("KVC_CU_PREFILL_SPLIT", -1), -1);
    const int T = (pos0 + n + TK - 1) / TK;   /* the last row block's tiles */
    const int Tp = pos0 / TK + 1;             /* tiles starting at or before pos0 */
    const int64_t slots = (int64_t)kvc__cu_sm_count() * bps;
    /* k equal splits of at least MIN_SPLIT_TILES tiles, the last starting at or before pos0 */
    auto fits = [&](int k) { return k * MIN_SPLIT_TILES <= T && (k - 1) * ((T + k - 1) / k) < Tp; };
    int ns = 1;
    if (g_split >= 0) {
        ns = max(1, min(min(g_split, MAX_SPLITS), Tp));
    } else if (4 * Tf >= 3 * T) {
        int64_t best = ((int64_t)blocks + slots - 1) / slots * (T + 1);
        for (int k = 2; k <= MAX_SPLITS && fits(k); k++) {
            const int64_t cost = ((int64_t)blocks * k + slots - 1) / slots * ((T + k - 1) / k + 1) + SPLIT_MERGE;
            if (cost < best) best = cost, ns = k;
        }
    } else if (blocks < slots) {
        for (ns = (int)(slots / blocks < MAX_SPLITS ? slots / blocks : MAX_SPLITS); ns > 1 && !fits(ns);) ns--;
    }
    *spt = ns > 1 ? min((T + ns - 1) / ns, (Tp - 1) / (ns - 1)) : T;
    return ns;
}

/* The chunk on prefill_kernel: its context split (plan_splits) into
 * partials that merge_kernel combines, from scratch (none: one split). */
template <int D, int KF, int VF>
int launch(prefill_params p, int n_kv_head, cudaStream_t stream, char *err, size_t errlen) {
    const size_t smem = KF == KVC_CU_F16 && VF == KVC_CU_F16 ? smem_shape<D>::BYTES : raw_shape<D, KF, VF>::BYTES;
    const cudaFuncAttribute max_smem = cudaFuncAttributeMaxDynamicSharedMemorySize;
    static int bps = 0;                   /* blocks a multiprocessor (the split instance's, as launched) */
    if (!bps) {
        KVC__CU_TRY(cudaFuncSetAttribute(prefill_kernel<D, KF, VF, true>, max_smem, (int)smem));
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, prefill_kernel<D, KF, VF, true>, PNT, smem) !=
                cudaSuccess || bps < 1) {
            (void)cudaGetLastError();
            bps = 1;
        }
    }
    const int tiles = (p.n * p.G + ROWS - 1) / ROWS;
    const int first_tiles = (p.pos0 + (min(ROWS, p.n * p.G) - 1) / p.G + TK) / TK;   /* row block 0's */
    int ns = plan_splits(p.pos0, p.n, tiles * n_kv_head, bps, first_tiles, &p.split_tiles);
    p.hq = n_kv_head * p.G;
    p.part = NULL;
    if (ns > 1 && scratch_alloc((void **)&p.part, sizeof(float) * part_row(D, p.n, p.hq, ns, 0, 0), stream) !=
                      cudaSuccess) {
        (void)cudaGetLastError();         /* no room for partials: one split */
        ns = 1;
        p.part = NULL;
    }
    if (ns == 1) p.split_tiles = 0;
    void (*kernel)(prefill_params) = ns > 1 ? prefill_kernel<D, KF, VF, true> : prefill_kernel<D, KF, VF, false>;
    cudaError_t e = cudaFuncSetAttribute(kernel, max_smem, (int)smem);
    if (e == cudaSuccess) {
        kernel<<<dim3(tiles, n_kv_head, ns), PNT, smem, stream>>>(p);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess && ns > 1) {
        merge_kernel<<<(p.n * p.hq + 3) / 4, 128, 0, stream>>>(p.part, D, p.n, p.hq, ns, p.out, p.out_stride);
        e = cudaGetLastError();
    }
    if (p.part) {
        const cudaError_t f = cudaFreeAsync(p.part, stream);
        if (e == cudaSuccess) e = f;
    }
    if (e != cudaSuccess)
        KVC__CU_FAIL(KVC_ERR_NOMEM, "kvc_cuda: prefill of %d tokens at %d (%d splits): %s", p.n, p.pos0, ns,
                     cudaGetErrorString(e));
    return KVC_OK;
}

/* The instance for the view's formats (kvc_cu_layout_init admits only
 * these), H heads of p.G rows. */
template <int D> int launch_fmt(int kf, int vf, int H, const prefill_params &p, cudaStream_t s, char *err,
                                size_t errlen) {
    int rc = KVC_OK;
    if (kvc__cu_with_formats(kf, vf, [&](auto k, auto v) {
            rc = launch<D, decltype(k)::value, decltype(v)::value>(p, H, s, err, errlen);
        }))
        return rc;
    KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: prefill: formats %d/%d not compiled", kf, vf);
}

/* The expanded path (quantized plain pages, head_dim >= 64): the context's
 * pages dequantized once into a stream-ordered scratch arena of f16 pages,
 * then the f16 kernel over those. p's arena, geometry, block table and maps
 * are replaced; v is the layer's view. */
template <int D>
int launch_expanded(const kvc__cu_view &v, prefill_params p, cudaStream_t s, char *err, size_t errlen) {
    const int np = (p.pos0 + p.n + KVC__CU_B - 1) / KVC__CU_B;
    kvc__cu_view fv = v;
    fv.k_fmt = fv.v_fmt = KVC_CU_F16;
    fv.g.k_block_bytes = fv.g.v_block_bytes = kvc__cu_block_bytes(KVC_CU_F16, D);
    fv.g.layer_off = 0;
    fv.g.k_region = (size_t)v.n_heads * fv.g.k_block_bytes;
    fv.g.page_bytes = 2 * fv.g.k_region;
    uint8_t *scratch = NULL;
    const size_t pages_bytes = (size_t)np * fv.g.page_bytes;
    if (scratch_alloc((void **)&scratch, pages_bytes + sizeof(int32_t) * (size_t)np, s) != cudaSuccess) {
        (void)cudaGetLastError();   /* no room: dequantize in registers instead */
        return launch_fmt<D>(v.k_fmt, v.v_fmt, v.n_heads, p, s, err, errlen);
    }
    int32_t *ident = (int32_t *)(scratch + pages_bytes);
    int rc = kvc__cu_f16_maps_encode(fv, scratch, np, &p.tk, &p.tv, err, errlen);
    if (rc == KVC_OK) {
        kvc__cu_with_formats(v.k_fmt, v.v_fmt, [&](auto k, auto vf) {
            expand_kernel<D, decltype(k)::value, decltype(vf)::value>
                <<<dim3(np, v.n_heads), D, 0, s>>>(p.arena, p.g, p.bt, p.pos0 + p.n, scratch, fv.g, ident);
        });
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) {
            snprintf(err, errlen, "kvc_cuda: prefill: expanding %d pages: %s", np, cudaGetErrorString(e));
            rc = KVC_ERR_NOMEM;
        }
    }
    if (rc == KVC_OK) {
        p.arena = scratch;
        p.g = fv.g;
        p.bt = ident;
        rc = launch<D, KVC_CU_F16, KVC_CU_F16>(p, v.n_heads, s, err, errlen);
    }
    KVC__CU_TRY(cudaFreeAsync(scratch, s));
    return rc;
}

} // namespace

extern "C" void kvc_cu_set_prefill_expand(int on) { g_expand = on < 0 ? -1 : on != 0; }
extern "C" void kvc_cu_set_prefill_small(int max_n) { g_small = max_n < 0 ? -1 : max_n; }
extern "C" void kvc_cu_set_prefill_split(int n) { g_split = n < 0 ? -1 : n; }

/* A small chunk through the decode kernel: row i is a sequence of pos0 + 1 + i
 * positions, all sharing the block table, the context split across blocks
 * as a decode's is. Its workspace comes from the scratch pool, zeroed.
 * Decode reads every page once per token (from L2 after the first where
 * the context fits), so it wins only for few tokens over a context L2
 * holds (small_by_decode). */
static int prefill_by_decode(const kvc_cu_layout *L, const void *arena, int layer, const int32_t *block_table,
                             int pos0, int n, int n_rep, float scale, const float *q, int64_t q_stride, float *out,
                             int64_t out_stride, cudaStream_t s, char *err, size_t errlen) {
    const size_t wsb = kvc_cu_decode_workspace(L, n, pos0 + n, n_rep);
    void *ws = NULL;
    if (wsb) {
        KVC__CU_TRY(scratch_alloc(&ws, wsb, s));
        KVC__CU_TRY(cudaMemsetAsync(ws, 0, wsb, s));
    }
    kvc_cu_decode_args a;
    memset(&a, 0, sizeof a);
    a.block_tables = block_table;
    a.bt_stride = 0;
    a.ctx_lens = NULL;
    a.ctx0 = pos0 + 1;
    a.n_seqs = n;
    a.max_ctx = pos0 + n;
    a.n_rep = n_rep;
    a.scale = scale;
    a.q = q;
    a.q_stride = q_stride;
    a.out = out;
    a.out_stride = out_stride;
    const int rc = kvc_cu_decode(L, arena, layer, &a, ws, wsb, s, err, errlen);
    if (ws) KVC__CU_TRY(cudaFreeAsync(ws, s));
    return rc;
}

/* The default route of small chunks (kvc_cu_set_prefill_small -1): the
 * decode kernel where the chunk is at most one block of query rows a kv
 * head and its tokens' reads of the context (decode reads every page once
 * per token) come to at most 64 MB, which L2 mostly serves; else the
 * prefill kernel with its context split, which reads it once per block of
 * rows. Session 20 (gpu_bench): SmolLM2 int8 8 tokens after 16384
 * positions (6.5 MB a token) 30.1 us by decode against 36.4 split, 32
 * tokens 79.7 against 39.0; Llama-8B f16 8 tokens after 16384 (67 MB a
 * token) 104.6 against 52.6, int8 after 2048 (4.3 MB) 26.8 against 35.6. */
static bool small_by_decode(const kvc__cu_view &v, int pos0, int n, int n_rep) {
    const int64_t ctx_bytes = (int64_t)(pos0 + n + KVC__CU_B - 1) / KVC__CU_B * v.n_heads *
                              (kvc__cu_block_bytes(v.k_fmt, v.D) + kvc__cu_block_bytes(v.v_fmt, v.D));
    return (int64_t)n * n_rep <= ROWS && n * ctx_bytes <= ((int64_t)64 << 20);
}

/* The default of kvc_cu_set_prefill_expand: quantized pages are expanded
 * unless the chunk is one block of query rows a kv head over a context long
 * enough to split (>= 1024 positions): split, each block dequantizes only
 * its run of the context, once, which costs less than writing it out as
 * f16 and reading it back. Session 20 run 5 (split, in registers against
 * expanded): Llama-8B int8 after 16384 positions 8 tokens 75.2 against 93.9
 * us, 32 tokens 80.7 against 98.5; after 2048 37.8 against 38.5. From two
 * blocks it is even or worse: 64 tokens (2 blocks) after 16384 131.9
 * against 125.3; SmolLM2 int8 128 tokens (3 blocks) 59.1 against 54.6. */
static bool expand_pays(int pos0, int n, int n_rep) {
    return pos0 < 1024 || ((int64_t)n * n_rep + ROWS - 1) / ROWS >= EXPAND_MIN_BLOCKS;
}

extern "C" int kvc_cu_prefill(const kvc_cu_layout *L, const void *arena, int layer, const int32_t *block_table,
                              int pos0, int n, int n_rep, float scale, const float *q, int64_t q_stride,
                              float *out, int64_t out_stride, void *stream, char *err, size_t errlen) {
    int rc = kvc__cu_check_layout(L, layer, err, errlen);
    if (rc) return rc;
    if (n < 0 || pos0 < 0 || (int64_t)pos0 + n > 0x7fffffff - 64)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: prefill of %d tokens at %d", n, pos0);
    if (n == 0) return KVC_OK;
    if (n_rep < 1 || n_rep > 8)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: n_rep %d: the GPU kernels are compiled for 1..8", n_rep);
    if (!arena || !block_table || !q || !out) KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: prefill: NULL pointer");
    const int64_t heads = (int64_t)L->n_kv_head * n_rep * L->head_dim;
    if (q_stride < heads || out_stride < heads)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: prefill: q_stride %lld / out_stride %lld < %lld",
                     (long long)q_stride, (long long)out_stride, (long long)heads);
    if ((q_stride | out_stride) & 1)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: prefill: q_stride %lld / out_stride %lld must be even",
                     (long long)q_stride, (long long)out_stride);
    if ((int64_t)n * n_rep / ROWS + 1 > 0x7fffffff)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: prefill of %d tokens is too many", n);
    const bool transform = L->k_shape != KVC_CU_PLAIN || L->v_shape != KVC_CU_PLAIN;
    const kvc__cu_view v = kvc__cu_view_of(L, layer, n_rep);
    cudaStream_t s = (cudaStream_t)stream;
    if (g_small == -2) g_small = max(kvc__cu_env("KVC_CU_PREFILL_SMALL", -1), -1);
    if (!transform && (g_small < 0 ? small_by_decode(v, pos0, n, n_rep) : n <= g_small))
        return prefill_by_decode(L, arena, layer, block_table, pos0, n, n_rep, scale, q, q_stride, out, out_stride, s,
                                 err, errlen);
    prefill_params p;
    p.arena = (const uint8_t *)arena;
    p.g = v.g;
    p.bt = block_table;
    p.pos0 = pos0;
    p.n = n;
    p.G = v.G;
    p.qscale = scale * 1.4426950408889634f;
    p.q = q;
    p.q_stride = q_stride;
    p.out = out;
    p.out_stride = out_stride;
    memset(&p.tk, 0, sizeof p.tk);
    memset(&p.tv, 0, sizeof p.tv);
    if (v.k_fmt == KVC_CU_F16 && v.v_fmt == KVC_CU_F16 && v.D >= 64) {   /* prefill_kernel's tensor copies */
        rc = kvc__cu_f16_maps(v, arena, kvc_pages_total(L->pool), &p.tk, &p.tv, err, errlen);
        if (rc) return rc;
    }
    /* transforms: the tensor-core kernel over coefficients,
     * between the queries' projection and the outputs' expansion; the
     * projected rows and the coefficient outputs live stream-ordered for
     * the call */
    float *tmp = NULL;
    const int64_t row_stride = (int64_t)L->n_kv_head * n_rep * v.D;
    if (transform) {
        KVC__CU_TRY(scratch_alloc((void **)&tmp, sizeof(float) * 2 * (size_t)n * row_stride, s));
        float *qp = tmp, *cp = tmp + (size_t)n * row_stride;
        if (L->k_shape != KVC_CU_PLAIN) {
            rc = kvc__cu_project(L, layer, n, n_rep, q, q_stride, qp, s, err, errlen);
            p.q = qp;
            p.q_stride = row_stride;
        }
        if (L->v_shape != KVC_CU_PLAIN) {
            p.out = cp;
            p.out_stride = row_stride;
        }
    }
    if (g_expand == -2) g_expand = max(kvc__cu_env("KVC_CU_PREFILL_EXPAND", -1), -1);
    const bool expand = (g_expand < 0 ? expand_pays(pos0, n, n_rep) : g_expand) && !transform && v.D >= 64 &&
                        !(v.k_fmt == KVC_CU_F16 && v.v_fmt == KVC_CU_F16);
    if (!rc && expand)
        rc = v.D == 64 ? launch_expanded<64>(v, p, s, err, errlen) : launch_expanded<128>(v, p, s, err, errlen);
    else if (!rc) { /* v.D is 32 (ranks; f16/f16 or int8/int8), 64 or 128 here (kvc_cu_layout_init) */
        if (v.D == 32 && v.k_fmt == KVC_CU_F16) rc = launch<32, KVC_CU_F16, KVC_CU_F16>(p, v.n_heads, s, err, errlen);
        else if (v.D == 32) rc = launch<32, KVC_CU_I8, KVC_CU_I8>(p, v.n_heads, s, err, errlen);
        else if (v.D == 64) rc = launch_fmt<64>(v.k_fmt, v.v_fmt, v.n_heads, p, s, err, errlen);
        else rc = launch_fmt<128>(v.k_fmt, v.v_fmt, v.n_heads, p, s, err, errlen);
    }
    if (!rc && transform && L->v_shape != KVC_CU_PLAIN)
        rc = kvc__cu_expand(L, layer, n, n_rep, p.out, NULL, pos0 + 1, out, out_stride, s, err, errlen);
    if (tmp) KVC__CU_TRY(cudaFreeAsync(tmp, s));
    return rc;
}
