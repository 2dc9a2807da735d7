/* common.cuh (internal to cache/cuda/): what the GPU kernels share: page
 * addressing of the kvcache.h layout and the host-side error helpers. */
#ifndef KVC_CUDA_COMMON_CUH
#define KVC_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>
#include <stdio.h>

#include <type_traits>

#include "cache/cuda/kvc_cuda.h"

#define KVC__CU_FULL 0xffffffffu

/* The one block size the kernels are compiled for. */
#define KVC__CU_B 16

/* Layout numbers of one layer a kernel needs, passed by value. */
struct kvc__cu_geom {
    size_t page_bytes;
    size_t layer_off;            /* the layer's region in a page */
    size_t k_region;             /* V blocks start here, after the K blocks */
    size_t k_block_bytes, v_block_bytes;
};

/* Fills g for `layer` (cuda/write.cu; reads the pool's layout). */
kvc__cu_geom kvc__cu_geom_of(const kvc_cu_layout *L, int layer);

/* How the attention kernels see one layer: heads of G query rows, each
 * reading plain K and V blocks of D numbers per token. Without transforms
 * that is the layout itself (kv heads, n_rep, head_dim); with them D is the
 * layer's rank, the query rows are the projected ones and a latent side's
 * blocks are the same for every head (block stride 0 in g). When both sides
 * are latent the n_kv_head * n_rep rows of a sequence are regrouped into
 * heads of up to 8 rows (fewer reads of each shared page). */
struct kvc__cu_view {
    int n_heads, G, D;
    int k_fmt, v_fmt;
    kvc__cu_geom g;
};

/* The view of `layer` for n_rep query heads per kv head (cuda/write.cu). */
kvc__cu_view kvc__cu_view_of(const kvc_cu_layout *L, int layer, int n_rep);

/* Side r's (0 K, 1 V) basis of `layer` in device memory: P (n_groups,
 * in_dim, R), Pt (n_groups, R, in_dim), mu (n_groups, in_dim). */
struct kvc__cu_basis {
    const float *P, *Pt, *mu;
    int R, in_dim;
    int latent;                  /* a group for all kv heads: head h's rows start at h * head_dim */
};
kvc__cu_basis kvc__cu_basis_of(const kvc_cu_layout *L, int layer, int side);

/* Transforms (cuda/transform.cu), n_rows rows of n_kv_head * n_rep query
 * heads each: qp (n_rows, n_kv_head * n_rep, R) = each head's q projected on
 * its kv head's slice of the K basis (q: row i at q + i * q_stride); out
 * (row i at out + i * out_stride) = mean + P_h c for c (n_rows, n_kv_head *
 * n_rep, R) of the V basis, zeros for rows without positions (ctx_lens[i],
 * or ctx0 + i when ctx_lens is NULL, is 0). */
int kvc__cu_project(const kvc_cu_layout *L, int layer, int n_rows, int n_rep, const float *q, int64_t q_stride,
                    float *qp, cudaStream_t stream, char *err, size_t errlen);
int kvc__cu_expand(const kvc_cu_layout *L, int layer, int n_rows, int n_rep, const float *c,
                   const int32_t *ctx_lens, int ctx0, float *out, int64_t out_stride, cudaStream_t stream, char *err,
                   size_t errlen);

/* The integer value of environment variable `name` (the benchmarks' and
 * tests' switches), or `unset` where it is absent, empty or not a number. */
int kvc__cu_env(const char *name, int unset);

/* Multiprocessors of the current device (132 where it cannot be asked),
 * read once. */
int kvc__cu_sm_count(void);

/* Whether the last decode launched by this host thread had a grid whose
 * blocks may land while the kernel before it still runs without landing
 * unevenly (decode.cu, launch_decode: it fits beside, or fills nearly every
 * slot); false before any. A decode step's write (write.cu) lets the decode
 * after it launch at its start only then: an engine's steps repeat their
 * sizes layer after layer, so the last decode stands for the next one. */
bool kvc__cu_decode_lands_early(void);

/* Blocks of (page, kv head) in the layer: K blocks of all heads, then V blocks. */
__device__ __forceinline__ const uint8_t *kvc__cu_k_block(const uint8_t *arena, const kvc__cu_geom &g,
                                                          int32_t page, int head) {
    return arena + (size_t)page * g.page_bytes + g.layer_off + (size_t)head * g.k_block_bytes;
}
__device__ __forceinline__ const uint8_t *kvc__cu_v_block(const uint8_t *arena, const kvc__cu_geom &g,
                                                          int32_t page, int head) {
    return arena + (size_t)page * g.page_bytes + g.layer_off + g.k_region + (size_t)head * g.v_block_bytes;
}

/* int4 per token: numbers per group. */
__host__ __device__ constexpr int kvc__cu_u4_group(int fmt) { return fmt == KVC_CU_U4T64 ? 64 : 32; }
__host__ __device__ constexpr bool kvc__cu_is_u4t(int fmt) { return fmt == KVC_CU_U4T32 || fmt == KVC_CU_U4T64; }

/* The K/V format pairs the decode and prefill kernels are compiled for at
 * head_dim 64 and 128 (kvc_cu_layout_init's pair_compiled): keys f16, int8
 * or int4 per channel with values f16, int8 or int4 per token. Calls
 * f(KF, VF) with the formats as integral constants and returns true, or
 * returns false for any other pair. */
template <typename F> bool kvc__cu_with_formats(int kf, int vf, F &&f) {
    auto by_v = [&](auto k) {
        switch (vf) {
        case KVC_CU_F16: f(k, std::integral_constant<int, KVC_CU_F16>()); return true;
        case KVC_CU_I8: f(k, std::integral_constant<int, KVC_CU_I8>()); return true;
        case KVC_CU_U4T32: f(k, std::integral_constant<int, KVC_CU_U4T32>()); return true;
        case KVC_CU_U4T64: f(k, std::integral_constant<int, KVC_CU_U4T64>()); return true;
        }
        return false;
    };
    switch (kf) {
    case KVC_CU_F16: return by_v(std::integral_constant<int, KVC_CU_F16>());
    case KVC_CU_I8: return by_v(std::integral_constant<int, KVC_CU_I8>());
    case KVC_CU_U4C: return by_v(std::integral_constant<int, KVC_CU_U4C>());
    }
    return false;
}

/* Bytes of one (page, kv head) block of 16 tokens, padding included, as the
 * pool lays it out (codec.h): f16 (D, 16) or (16, D); int8 codes then 16
 * scales; int4 codes (8 D bytes) then fp16 scales and minima, per (group,
 * token) or per channel. */
__host__ __device__ constexpr int kvc__cu_block_bytes(int fmt, int D) {
    return fmt == KVC_CU_F16 ? 32 * D
           : fmt == KVC_CU_I8 ? 16 * D + 32
           : fmt == KVC_CU_U4C ? 12 * D
                               : 8 * D + 64 * (D / kvc__cu_u4_group(fmt));
}

/* int8 blocks: the fp16 scales start here (16-byte aligned), as in codec.h. */
__host__ __device__ __forceinline__ int kvc__cu_i8_scale_offset(int B, int dim) {
    return (B * dim + 15) & ~15;
}

/* The copy engine (bulk and tensor copies) and its mbarriers (shared
 * addresses as u32). */
__device__ __forceinline__ void kvc__cu_mbar_init(uint32_t mb, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(mb), "r"(count) : "memory");
}
__device__ __forceinline__ void kvc__cu_mbar_inval(uint32_t mb) {
    asm volatile("mbarrier.inval.shared::cta.b64 [%0];" ::"r"(mb) : "memory");
}
/* One arrival that also expects `bytes` of copies to complete the phase. */
__device__ __forceinline__ void kvc__cu_mbar_expect(uint32_t mb, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mb), "r"(bytes) : "memory");
}
/* A plain arrival (no bytes expected). */
__device__ __forceinline__ void kvc__cu_mbar_arrive(uint32_t mb) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(mb) : "memory");
}
__device__ __forceinline__ void kvc__cu_mbar_wait(uint32_t mb, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n"
        "}\n" ::"r"(mb),
        "r"(parity)
        : "memory");
}
/* bytes (a multiple of 16, 16-byte aligned) global -> shared, counted on mb. */
__device__ __forceinline__ void kvc__cu_bulk_copy(uint32_t dst, const void *src, uint32_t bytes, uint32_t mb) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(mb)
                 : "memory");
}

/* One box of a 4-d tensor map (coordinates innermost first) -> shared, counted on mb. */
__device__ __forceinline__ void kvc__cu_tensor_copy(uint32_t dst, const CUtensorMap *map, int c0, int c1, int c2,
                                                    int c3, uint32_t mb) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, "
                 "%4, %5}], [%6];" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(mb)
                 : "memory");
}

/* Swizzled 16-byte unit offsets of f16 blocks in shared memory, as the
 * tensor copy's 128-byte swizzle lays them (the 16-byte unit c of 128-byte
 * line L at c ^ (L & 7); the block 1024-byte aligned) and the transposing
 * ldmatrix reads them without bank conflicts (decode.cu, prefill.cu):
 *   K (D, 16): unit (dim, h) of line dim / 4, c = 2 (dim % 4) + h
 *   V (16, D): unit (t, u) of line t of 64-number half u / 8 (D 32: the
 *     64-byte swizzle of 64-byte rows) */
template <int D> __device__ __forceinline__ int kvc__cu_k_unit(int dim, int h) {
    return (dim >> 2) * 8 + ((((dim & 3) << 1) | h) ^ ((dim >> 2) & 7));
}
template <int D> __device__ __forceinline__ int kvc__cu_v_unit(int t, int u) {
    if constexpr (D >= 64) return (u >> 3) * 128 + t * 8 + ((u & 7) ^ (t & 7));   /* 64-number halves, 16 rows each */
    else return t * (D / 8) + (u ^ ((t >> 1) & 3));   /* D 32: 4 units a row, two rows per 128 bytes */
}

/* Tensor maps of a layer's f16 blocks for the tensor copies (decode.cu):
 * K (D, 16) as 128-byte lines (4 dimensions) of (pages, heads), boxes of
 * a whole block; V (16, D) as rows of (pages, heads), boxes of 64 numbers
 * by 16 rows; 128-byte swizzle; a side that is not f16 gets a zeroed map;
 * heads 1 where a latent block is every head's. n_pages: the arena's
 * (kvc_pages_total). Encoded once per (arena, layer geometry) and host
 * thread. Needs head_dim (v.D) 64 or 128. */
int kvc__cu_f16_maps(const kvc__cu_view &v, const void *arena, int64_t n_pages, CUtensorMap *tk, CUtensorMap *tv,
                     char *err, size_t errlen);
/* The same maps encoded for this call only (not cached): for arenas that
 * live for one call (prefill.cu's scratch of expanded pages). */
int kvc__cu_f16_maps_encode(const kvc__cu_view &v, const void *arena, int64_t n_pages, CUtensorMap *tk,
                            CUtensorMap *tv, char *err, size_t errlen);

/* Host side: error messages and CUDA error mapping. */
#define KVC__CU_FAIL(code, ...)                                                  \
    do {                                                                         \
        if (err && errlen) snprintf(err, errlen, __VA_ARGS__);                   \
        return (code);                                                           \
    } while (0)

#define KVC__CU_TRY(call)                                                        \
    do {                                                                         \
        cudaError_t e_ = (call);                                                 \
        if (e_ != cudaSuccess)                                                   \
            KVC__CU_FAIL(KVC_ERR_NOMEM, "kvc_cuda: %s: %s (%s:%d)", #call,       \
                         cudaGetErrorString(e_), __FILE__, __LINE__);            \
    } while (0)

/* Shared checks of a layout handed to an entry point. */
int kvc__cu_check_layout(const kvc_cu_layout *L, int layer, char *err, size_t errlen);

#endif
