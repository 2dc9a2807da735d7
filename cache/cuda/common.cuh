/* common.cuh (internal to cache/cuda/): what the GPU kernels share: page
 * addressing of the kvcache.h layout, element formats as compile-time traits
 * (how 8 stored numbers are loaded and turned into floats in registers), and
 * the host-side error helpers. */
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

/* int8 blocks: the fp16 scales start here (16-byte aligned), as in codec.h. */
__host__ __device__ __forceinline__ int kvc__cu_i8_scale_offset(int B, int dim) {
    return (B * dim + 15) & ~15;
}

/* Element formats. A "vector" is 8 consecutive stored numbers: 16 bytes of
 * fp16 or 8 bytes of int8; to_float converts one in registers. */
template <int FMT> struct kvc__cu_fmt;

template <> struct kvc__cu_fmt<KVC_CU_F16> {
    typedef uint4 vec;
    static constexpr bool scaled = false;
    __device__ __forceinline__ static void to_float(const vec &v, float f[8]) {
        const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            __half2 h = *reinterpret_cast<const __half2 *>(&w[i]);
            float2 t = __half22float2(h);
            f[2 * i] = t.x;
            f[2 * i + 1] = t.y;
        }
    }
};

template <> struct kvc__cu_fmt<KVC_CU_I8> {
    typedef uint2 vec;
    static constexpr bool scaled = true;
    /* Exact int8 -> float without the slow integer converter: with the sign
     * bit flipped a byte u is x + 128, and the float with bits 0x4B0000uu is
     * 2^23 + u, so x = that - (2^23 + 128). */
    __device__ __forceinline__ static void to_float(const vec &v, float f[8]) {
        const uint32_t w[2] = {v.x ^ 0x80808080u, v.y ^ 0x80808080u};
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int b = 0; b < 4; b++)
                f[4 * i + b] = __int_as_float((int)__byte_perm(w[i], 0x4B000000u, 0x7540u | b)) - 8388736.0f;
    }
};

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
