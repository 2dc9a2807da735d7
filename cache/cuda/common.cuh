/* common.cuh (internal to cache/cuda/): what the GPU kernels share: page
 * addressing of the kvcache.h layout and the host-side error helpers. */
#ifndef KVC_CUDA_COMMON_CUH
#define KVC_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

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
