/* write.cu: the GPU arena's layout (kvc_cu_layout_init, derived from the CPU
 * codec table) and compress-on-write (kvc_cu_write): a step's or a prefill
 * chunk's K/V rows go straight into their pages in the codec's format, so the
 * full-precision K/V never outlive the chunk.
 *
 * One warp encodes one (token, kv head, K or V) vector: lanes take dimensions
 * lane, lane + 32, ...; int8 needs max|x| over the vector first (a warp
 * reduction), then every lane quantizes its numbers. The arithmetic repeats
 * codec.c step by step (IEEE division, round-half-even, the scale rounded up
 * to the next half) so the bytes equal kvc_write's. */
#include <math.h>
#include <string.h>

#include "cache/cuda/common.cuh"

extern "C" {
#include "cache/pool_internal.h"
}

int kvc__cu_check_layout(const kvc_cu_layout *L, int layer, char *err, size_t errlen) {
    if (!L || !L->pool) KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: layout not initialised");
    if (layer < 0 || layer >= L->n_layer)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: layer %d: must be 0..%d", layer, L->n_layer - 1);
    return KVC_OK;
}

static int fmt_of(const kvc__codec *c) {
    if (c->shape != KVC__PLAIN || c->pre_rope) return 0;
    if (c->fmt == KVC__F16) return KVC_CU_F16;
    if (c->fmt == KVC__I8) return KVC_CU_I8;
    return 0;
}

extern "C" int kvc_cu_layout_init(kvc_cu_layout *L, const kvc_pool *pool, char *err, size_t errlen) {
    memset(L, 0, sizeof *L);
    if (pool->head_dim != 64 && pool->head_dim != 128)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: head_dim %d: the GPU kernels are compiled for 64 and 128",
                     pool->head_dim);
    if (pool->block_size != KVC__CU_B)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: block_size %d: the GPU kernels are compiled for %d",
                     pool->block_size, KVC__CU_B);
    const int kf = fmt_of(&pool->kc), vf = fmt_of(&pool->vc);
    if (!kf || !vf)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: %s \"%s\": the GPU kernels read f16 and int8 so far",
                     kf ? "v_codec" : "k_codec", kf ? pool->vc.name : pool->kc.name);
    /* the kernels assume these block sizes (decode.cu's block_bytes) */
    const size_t kb = kf == KVC_CU_F16 ? 32 * (size_t)pool->head_dim : 16 * (size_t)pool->head_dim + 32;
    const size_t vb = vf == KVC_CU_F16 ? 32 * (size_t)pool->head_dim : 16 * (size_t)pool->head_dim + 32;
    for (int l = 0; l < pool->n_layer; l++)
        if (pool->kc.dim[l] != pool->head_dim || pool->vc.dim[l] != pool->head_dim ||
            pool->kc.block_bytes[l] != kb || pool->vc.block_bytes[l] != vb)
            KVC__CU_FAIL(KVC_ERR_INVAL,
                         "kvc_cuda: layer %d: %d/%d numbers per token in blocks of %zu/%zu bytes, expected %d in "
                         "%zu/%zu", l, pool->kc.dim[l], pool->vc.dim[l], pool->kc.block_bytes[l],
                         pool->vc.block_bytes[l], pool->head_dim, kb, vb);
    L->pool = pool;
    L->n_layer = pool->n_layer;
    L->n_kv_head = pool->n_kv_head;
    L->head_dim = pool->head_dim;
    L->block_size = pool->block_size;
    L->k_fmt = kf;
    L->v_fmt = vf;
    L->page_bytes = pool->page_bytes;
    return KVC_OK;
}

kvc__cu_geom kvc__cu_geom_of(const kvc_cu_layout *L, int layer) {
    const kvc_pool *p = L->pool;
    kvc__cu_geom g;
    g.page_bytes = p->page_bytes;
    g.layer_off = p->layer_off[layer];
    g.k_region = p->k_region[layer];
    g.k_block_bytes = p->kc.block_bytes[layer];
    g.v_block_bytes = p->vc.block_bytes[layer];
    return g;
}

/* ---- compress-on-write ---------------------------------------------------- */

/* codec.c's kvc__i8_scale: the smallest half >= amax / 127, at most 65504. */
__device__ __forceinline__ uint16_t i8_scale_half(float amax) {
    float t = amax / 127.0f;
    uint16_t sh = __half_as_ushort(__float2half_rn(t));
    if (__half2float(__ushort_as_half(sh)) < t) sh++;
    if (sh >= 0x7c00u) sh = 0x7bffu;
    return sh;
}

/* codec.c's kvc__i8_round: clamp to +-127 (NaN to -127), round half to even. */
__device__ __forceinline__ int8_t i8_round(float v) {
    if (!(v >= -127.0f)) v = -127.0f;
    if (v > 127.0f) v = 127.0f;
    return (int8_t)__float2int_rn(v);
}

/* grid: ceil(n * n_kv_head * 2 / warps per block); one warp per (token, head, role). */
__global__ void __launch_bounds__(128) write_kernel(uint8_t *__restrict__ arena, kvc__cu_geom g, int n_kv_head,
                                                    int B, int D, int kf, int vf,
                                                    const int32_t *__restrict__ slots, int n,
                                                    const float *__restrict__ k,
                                                    const float *__restrict__ v, int64_t kv_stride) {
    const int lane = threadIdx.x & 31;
    const long unit = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long units = (long)n * n_kv_head * 2;
    if (unit >= units) return;
    const int role = (int)(unit & 1);                  /* 0: K, 1: V */
    const int head = (int)((unit >> 1) % n_kv_head);
    const int tok = (int)((unit >> 1) / n_kv_head);
    const int32_t slot = slots[tok];
    if (slot < 0) return;
    const int32_t page = slot / B, off = slot % B;
    const float *x = (role ? v : k) + (int64_t)tok * kv_stride + (int64_t)head * D;
    uint8_t *blk = const_cast<uint8_t *>(role ? kvc__cu_v_block(arena, g, page, head)
                                              : kvc__cu_k_block(arena, g, page, head));
    const int fmt = role ? vf : kf;
    /* K is (D, B) dimension-major: number d of token off at d * B + off.
     * V is (B, D) token-major: at off * D + d. */
    const int step = role ? 1 : B;
    const int base = role ? off * D : off;
    if (fmt == KVC_CU_F16) {
        uint16_t *h = reinterpret_cast<uint16_t *>(blk);
        for (int d = lane; d < D; d += 32) h[base + d * step] = __half_as_ushort(__float2half_rn(x[d]));
        return;
    }
    float amax = 0.0f;
    for (int d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(x[d]));
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(KVC__CU_FULL, amax, m));
    const uint16_t sh = i8_scale_half(amax);
    const float s = __half2float(__ushort_as_half(sh));
    int8_t *q = reinterpret_cast<int8_t *>(blk);
    for (int d = lane; d < D; d += 32) q[base + d * step] = i8_round(s > 0.0f ? x[d] / s : 0.0f);
    if (lane == 0)
        reinterpret_cast<uint16_t *>(blk + kvc__cu_i8_scale_offset(B, D))[off] = sh;
}

extern "C" int kvc_cu_write(const kvc_cu_layout *L, void *arena, int layer, const int32_t *slots, int n,
                            const float *k, const float *v, int64_t kv_stride, void *stream, char *err,
                            size_t errlen) {
    int rc = kvc__cu_check_layout(L, layer, err, errlen);
    if (rc) return rc;
    if (n < 0) KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: write of %d tokens", n);
    if (n == 0) return KVC_OK;
    if (!arena || !slots || !k || !v) KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: write: NULL pointer");
    if (kv_stride < (int64_t)L->n_kv_head * L->head_dim)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: write: kv_stride %lld < n_kv_head * head_dim %d",
                     (long long)kv_stride, L->n_kv_head * L->head_dim);
    const long warps = (long)n * L->n_kv_head * 2;
    const long blocks = (warps + 3) / 4;
    if (blocks > 0x7fffffffL) KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: write: %d tokens is too many", n);
    write_kernel<<<(unsigned)blocks, 128, 0, (cudaStream_t)stream>>>(
        (uint8_t *)arena, kvc__cu_geom_of(L, layer), L->n_kv_head, L->block_size, L->head_dim, L->k_fmt, L->v_fmt, slots,
        n, k, v, kv_stride);
    KVC__CU_TRY(cudaGetLastError());
    return KVC_OK;
}
