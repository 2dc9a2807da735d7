/* write.cu: the GPU arena's layout (kvc_cu_layout_init, derived from the CPU
 * codec table) and compress-on-write (kvc_cu_write): a step's or a prefill
 * chunk's K/V rows go straight into their pages in the codec's format, so the
 * full-precision K/V never outlive the chunk.
 *
 * One warp encodes one (token, kv head, K or V) vector: for f16 and int8
 * lanes take dimensions lane, lane + 32, ...; int8 needs max|x| over the
 * vector first (a warp reduction), then every lane quantizes its numbers.
 * int4 per token: a lane takes D / 32 adjacent numbers (whole bytes of
 * codes), the lanes of a group reduce its minimum and maximum. int4 per
 * channel (keys): in the same launch, blocks after the warps', one thread
 * per (run of a page's slots, kv head, channel), which owns that channel's
 * 8-byte code row and its parameters and repeats codec.c's enc_u4c
 * (including the re-coding of the page's earlier tokens when the run widens
 * the range). The arithmetic repeats codec.c step by step (IEEE division,
 * no fused multiply-adds, round-half-even, scales rounded outwards to
 * halves) so the bytes equal kvc_write's. */
#include <math.h>
#include <stdlib.h>
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

/* The element format of a side's stored numbers (0: none the GPU reads). */
static int fmt_of(const kvc__codec *c) {
    switch (c->fmt) {
    case KVC__F16: return KVC_CU_F16;
    case KVC__I8: return KVC_CU_I8;
    case KVC__U4: return c->shape == KVC__PLAIN ? KVC_CU_U4T32 : 0;
    case KVC__U4G64: return c->shape == KVC__PLAIN ? KVC_CU_U4T64 : 0;
    case KVC__U4C: return c->shape == KVC__PLAIN ? KVC_CU_U4C : 0;
    default: return 0;
    }
}

/* The K/V format pairs decode.cu is compiled for, at D stored numbers:
 * keys f16, int8 or int4 per channel with values f16, int8 or int4 per
 * token. */
static bool pair_compiled(int kf, int vf, int D) {
    const bool k8 = kf == KVC_CU_F16 || kf == KVC_CU_I8, v8 = vf == KVC_CU_F16 || vf == KVC_CU_I8;
    if (D == 32) return k8 && v8 && kf == vf;
    return (D == 64 || D == 128) && (k8 || kf == KVC_CU_U4C) && (v8 || kvc__cu_is_u4t(vf));
}

static int shape_of(const kvc__codec *c) {
    return c->shape == KVC__LATENT ? KVC_CU_LATENT : c->shape == KVC__LOWRANK ? KVC_CU_LOWRANK : KVC_CU_PLAIN;
}

/* Copies the bases of the transform sides to the device (layout in kvc_cuda.h). */
static int upload_bases(kvc_cu_layout *L, const kvc_pool *pool, char *err, size_t errlen) {
    const kvc__codec *cs[2] = {&pool->kc, &pool->vc};
    L->basis_off = (size_t *)calloc((size_t)pool->n_layer * 2, sizeof(size_t));
    if (!L->basis_off) KVC__CU_FAIL(KVC_ERR_NOMEM, "kvc_cuda: out of host memory for the bases' offsets");
    size_t total = 0;
    for (int l = 0; l < pool->n_layer; l++)
        for (int r = 0; r < 2; r++) {
            const kvc__codec *c = cs[r];
            if (c->shape == KVC__PLAIN) continue;
            L->basis_off[2 * l + r] = total;
            total += sizeof(float) * (size_t)c->n_groups * c->in_dim * (2 * (size_t)c->dim[l] + 1);
        }
    float *host = (float *)malloc(total);
    if (!host) KVC__CU_FAIL(KVC_ERR_NOMEM, "kvc_cuda: out of host memory for the bases (%zu bytes)", total);
    for (int l = 0; l < pool->n_layer; l++)
        for (int r = 0; r < 2; r++) {
            const kvc__codec *c = cs[r];
            if (c->shape == KVC__PLAIN) continue;
            const size_t R = (size_t)c->dim[l], n = (size_t)c->in_dim, G = (size_t)c->n_groups;
            float *P = host + L->basis_off[2 * l + r] / sizeof(float), *Pt = P + G * n * R, *mu = Pt + G * n * R;
            for (size_t g = 0; g < G; g++) {
                const float *src = c->basis[(size_t)l * G + g], *m = c->mean[(size_t)l * G + g];
                memcpy(P + g * n * R, src, sizeof(float) * n * R);
                for (size_t d = 0; d < n; d++)
                    for (size_t k = 0; k < R; k++) Pt[g * n * R + k * n + d] = src[d * R + k];
                for (size_t d = 0; d < n; d++) mu[g * n + d] = m ? m[d] : 0.0f;
            }
        }
    cudaError_t e = cudaMalloc(&L->bases, total);
    if (e == cudaSuccess) e = cudaMemcpy(L->bases, host, total, cudaMemcpyHostToDevice);
    free(host);
    if (e != cudaSuccess)
        KVC__CU_FAIL(KVC_ERR_NOMEM, "kvc_cuda: the bases (%zu bytes) to the device: %s", total, cudaGetErrorString(e));
    return KVC_OK;
}

extern "C" void kvc_cu_layout_dispose(kvc_cu_layout *L) {
    if (!L) return;
    if (L->bases) cudaFree(L->bases);
    free(L->basis_off);
    memset(L, 0, sizeof *L);
}

extern "C" int kvc_cu_layout_init(kvc_cu_layout *L, const kvc_pool *pool, char *err, size_t errlen) {
    memset(L, 0, sizeof *L);
    if (pool->head_dim != 64 && pool->head_dim != 128)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: head_dim %d: the GPU kernels are compiled for 64 and 128",
                     pool->head_dim);
    if (pool->block_size != KVC__CU_B)
        KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: block_size %d: the GPU kernels are compiled for %d",
                     pool->block_size, KVC__CU_B);
    if (pool->kc.pre_rope)
        KVC__CU_FAIL(KVC_ERR_INVAL,
                     "kvc_cuda: k_codec \"%s\": keys cached before RoPE (:prerope) are not on the GPU; cache them "
                     "after RoPE", pool->kc.name);
    const int kf = fmt_of(&pool->kc), vf = fmt_of(&pool->vc);
    const bool transform = pool->kc.shape != KVC__PLAIN || pool->vc.shape != KVC__PLAIN;
    if (!kf || !vf || (transform && (kvc__cu_is_u4t(kf) || kf == KVC_CU_U4C || kvc__cu_is_u4t(vf) || vf == KVC_CU_U4C)))
        KVC__CU_FAIL(KVC_ERR_INVAL,
                     "kvc_cuda: k_codec \"%s\" with v_codec \"%s\": the GPU kernels read f16 and int8 (any "
                     "pairing), int4 keys per channel with f16, int8 or int4 values per token (\"int4\", "
                     "\"int4:g64\") and the "
                     "low-rank codecs with f16 or int8 coefficients (lowrank, latent, hybrid; not :int4) so far",
                     pool->kc.name, pool->vc.name);
    for (int l = 0; l < pool->n_layer; l++) {
        /* the kernels assume these block sizes (decode.cu's block_bytes) */
        const int D = pool->kc.dim[l];
        const size_t kb = (size_t)kvc__cu_block_bytes(kf, D), vb = (size_t)kvc__cu_block_bytes(vf, D);
        if (pool->vc.dim[l] != D)
            KVC__CU_FAIL(KVC_ERR_INVAL,
                         "kvc_cuda: k_codec \"%s\" with v_codec \"%s\": layer %d stores %d K and %d V numbers per "
                         "token; the GPU kernels need the same number on both sides", pool->kc.name, pool->vc.name,
                         l, D, pool->vc.dim[l]);
        if (!pair_compiled(kf, vf, D))
            KVC__CU_FAIL(KVC_ERR_INVAL,
                         "kvc_cuda: k_codec \"%s\" with v_codec \"%s\": %d numbers per token (layer %d) in these "
                         "formats are not compiled: 64 and 128 take keys f16, int8 or int4 per channel with values f16, "
                         "int8 or int4 per token; 32 (ranks) takes f16/f16 or int8/int8",
                         pool->kc.name, pool->vc.name, D, l);
        if (pool->kc.block_bytes[l] != kb || pool->vc.block_bytes[l] != vb)
            KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: layer %d: blocks of %zu/%zu bytes, expected %zu/%zu", l,
                         pool->kc.block_bytes[l], pool->vc.block_bytes[l], kb, vb);
    }
    L->pool = pool;
    L->n_layer = pool->n_layer;
    L->n_kv_head = pool->n_kv_head;
    L->head_dim = pool->head_dim;
    L->block_size = pool->block_size;
    L->k_fmt = kf;
    L->v_fmt = vf;
    L->k_shape = shape_of(&pool->kc);
    L->v_shape = shape_of(&pool->vc);
    L->page_bytes = pool->page_bytes;
    if (transform) {
        int rc = upload_bases(L, pool, err, errlen);
        if (rc) {
            kvc_cu_layout_dispose(L);
            return rc;
        }
    }
    return KVC_OK;
}

int kvc__cu_env(const char *name, int unset) {
    const char *e = getenv(name);
    char *end;
    const long v = e && *e ? strtol(e, &end, 10) : 0;
    return e && *e && *end == '\0' ? (int)v : unset;
}

int kvc__cu_sm_count(void) {
    static int n = 0;
    if (!n) {
        int dev = 0, v = 0;
        n = cudaGetDevice(&dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess && v > 0
                ? v
                : 132;
    }
    return n;
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

kvc__cu_view kvc__cu_view_of(const kvc_cu_layout *L, int layer, int n_rep) {
    kvc__cu_view v;
    v.g = kvc__cu_geom_of(L, layer);
    v.D = L->pool->kc.dim[layer];
    v.k_fmt = L->k_fmt;
    v.v_fmt = L->v_fmt;
    v.n_heads = L->n_kv_head;
    v.G = n_rep;
    if (L->k_shape == KVC_CU_LATENT) v.g.k_block_bytes = 0;
    if (L->v_shape == KVC_CU_LATENT) v.g.v_block_bytes = 0;
    if (L->k_shape == KVC_CU_LATENT && L->v_shape == KVC_CU_LATENT) {
        const int rows = L->n_kv_head * n_rep;
        int G = 8;
        while (rows % G) G--;
        v.G = G;
        v.n_heads = rows / G;
    }
    return v;
}

kvc__cu_basis kvc__cu_basis_of(const kvc_cu_layout *L, int layer, int side) {
    const kvc__codec *c = side ? &L->pool->vc : &L->pool->kc;
    kvc__cu_basis b;
    b.R = c->dim[layer];
    b.in_dim = c->in_dim;
    b.latent = c->shape == KVC__LATENT;
    const size_t n = (size_t)c->n_groups * c->in_dim * b.R;
    b.P = c->shape == KVC__PLAIN ? NULL : (const float *)((const uint8_t *)L->bases + L->basis_off[2 * layer + side]);
    b.Pt = b.P ? b.P + n : NULL;
    b.mu = b.P ? b.P + 2 * n : NULL;
    return b;
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

/* codec.c's kvc__f16_down / kvc__f16_up: the largest half <= f, the
 * smallest half >= f. */
__device__ __forceinline__ uint16_t f16_down(float f) {
    const uint16_t h = __half_as_ushort(__float2half_rn(f));
    if (__half2float(__ushort_as_half(h)) <= f) return h;
    if (h == 0) return 0x8001u;
    return (uint16_t)(h & 0x8000u ? h + 1 : h - 1);
}
__device__ __forceinline__ uint16_t f16_up(float f) { return (uint16_t)(f16_down(-f) ^ 0x8000u); }

/* codec.c's kvc__u4_params: minimum and scale halves of a range [lo, hi]. */
__device__ __forceinline__ void u4_params(float lo, float hi, uint16_t &mh, uint16_t &sh) {
    if (!(lo <= hi)) lo = hi = 0.0f;
    lo = lo < -65504.0f ? -65504.0f : lo > 65504.0f ? 65504.0f : lo;
    hi = hi < lo ? lo : hi > 65504.0f ? 65504.0f : hi;
    mh = f16_down(lo);
    sh = f16_up(__fdiv_rn(__fsub_rn(hi, __half2float(__ushort_as_half(mh))), 15.0f));
    if ((sh & 0x7fffu) >= 0x7c00u) sh = 0x7bffu;
}

/* codec.c's u4_code: round-half-even of (x - m) / s clamped to [0, 15]
 * (NaN: 0), or 0 when s <= 0. */
__device__ __forceinline__ uint32_t u4_code(float x, float m, float s) {
    if (!(s > 0.0f)) return 0;
    float v = __fdiv_rn(__fsub_rn(x, m), s);
    if (!(v >= 0.0f)) return 0;
    if (v > 15.0f) v = 15.0f;
    return (uint32_t)__float2int_rn(v);
}

__device__ __forceinline__ float half_bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }

/* int4 per token, one (token, head) vector of D numbers into its block
 * (codes (16, D) nibbles, then scales (G, 16) and minima (G, 16)): lane
 * takes numbers lane * NPL .. + NPL - 1; a group's W lanes reduce its range. */
template <int D, int GS>
__device__ __forceinline__ void encode_u4_token(uint8_t *blk, int off, const float *x, int lane) {
    constexpr int NPL = D / 32, W = GS / NPL, G = D / GS;
    float v[NPL], lo = INFINITY, hi = -INFINITY;
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        v[i] = x[lane * NPL + i];
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
    }
#pragma unroll
    for (int m = W / 2; m >= 1; m >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(KVC__CU_FULL, lo, m));
        hi = fmaxf(hi, __shfl_xor_sync(KVC__CU_FULL, hi, m));
    }
    uint16_t mh, sh;
    u4_params(lo, hi, mh, sh);
    const float m = half_bits(mh), s = half_bits(sh);
    uint32_t codes = 0;
#pragma unroll
    for (int i = 0; i < NPL; i++) codes |= u4_code(v[i], m, s) << (4 * i);
    uint8_t *row = blk + off * (D / 2) + lane * (NPL / 2);
    if (NPL == 2) *row = (uint8_t)codes;
    else *reinterpret_cast<uint16_t *>(row) = (uint16_t)codes;
    if (lane % W == 0) {
        uint16_t *sc = reinterpret_cast<uint16_t *>(blk + 8 * D);
        const int g = lane / W;
        sc[g * KVC__CU_B + off] = sh;
        sc[G * KVC__CU_B + g * KVC__CU_B + off] = mh;
    }
}

/* int4 per channel (keys): channel d of (token, kv head). A token that
 * starts a run (its slot follows no slot of the previous token in the same
 * page) encodes the run; others return. The thread owns code row d (8
 * bytes: 16 tokens) and the channel's scale and minimum. */
__device__ __forceinline__ void encode_u4c(uint8_t *__restrict__ arena, const kvc__cu_geom &g, int D,
                                           const int32_t *__restrict__ slots, int n,
                                           const float *__restrict__ k, int64_t kv_stride, int tok, int head,
                                           int d) {
    constexpr int B = KVC__CU_B;
    const int32_t slot = slots[tok];
    if (slot < 0) return;
    const int off = slot % B;
    if (off != 0 && tok > 0 && slots[tok - 1] == slot - 1) return;   /* inside a run */
    int n_run = 1;
    while (tok + n_run < n && off + n_run < B && slots[tok + n_run] == slot + n_run) n_run++;
    uint8_t *blk = const_cast<uint8_t *>(kvc__cu_k_block(arena, g, slot / B, head));
    uint2 *rowp = reinterpret_cast<uint2 *>(blk + 8 * d);
    const uint2 rw = *rowp;
    uint64_t row = (uint64_t)rw.x | ((uint64_t)rw.y << 32);
    uint16_t *sc = reinterpret_cast<uint16_t *>(blk + 8 * D), *mn = sc + D;
    const float *x = k + (int64_t)tok * kv_stride + (int64_t)head * D + d;
    float lo = INFINITY, hi = -INFINITY;
    for (int t = 0; t < n_run; t++) {
        const float v = x[t * kv_stride];
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    const float m_old = half_bits(mn[d]), s_old = half_bits(sc[d]);
    auto old_value = [&](int j) {
        return __fadd_rn(m_old, __fmul_rn(s_old, (float)((row >> (4 * j)) & 15u)));
    };
    auto put = [&](int j, uint32_t c) { row = (row & ~((uint64_t)15 << (4 * j))) | ((uint64_t)c << (4 * j)); };
    bool recode = true;
    if (off > 0) {
        float olo = INFINITY, ohi = -INFINITY;
        for (int j = 0; j < off; j++) {
            const float v = old_value(j);
            olo = v < olo ? v : olo;
            ohi = v > ohi ? v : ohi;
        }
        if (!(lo < olo) && !(hi > ohi)) {
            recode = false;                            /* inside the range: code with it */
            for (int t = 0; t < n_run; t++) put(off + t, u4_code(x[t * kv_stride], m_old, s_old));
        } else {
            lo = olo < lo ? olo : lo;
            hi = ohi > hi ? ohi : hi;
        }
    }
    if (recode) {
        uint16_t mh, sh;
        u4_params(lo, hi, mh, sh);
        const float m = half_bits(mh), s = half_bits(sh);
        for (int j = 0; j < off; j++) put(j, u4_code(old_value(j), m, s));
        for (int t = 0; t < n_run; t++) put(off + t, u4_code(x[t * kv_stride], m, s));
        mn[d] = mh;
        sc[d] = sh;
    }
    *rowp = make_uint2((uint32_t)row, (uint32_t)(row >> 32));
}

/* Blocks [0, wblocks): one warp per (token, head, role), wblocks =
 * ceil(n * n_kv_head * 2 / 4); then (keys int4 per channel) one thread per
 * (token, head, channel), ceil(n * n_kv_head * D / 128) blocks. One launch
 * for both (a second kernel for the keys cost its launch: SmolLM2 int4 64
 * tokens of a decode step 6.9 -> 5.5 us in a graph, notes/gpu.md session 8);
 * no blocks beyond those (a 2D grid's idle blocks cost Llama-8B's 2048-token
 * chunk 26 -> 32 us). The instance without int4 keys (U4C false) has no such
 * blocks and none of their code, which cost the other formats 2-3%. */
template <bool U4C>
__global__ void __launch_bounds__(128) write_kernel(uint8_t *__restrict__ arena, kvc__cu_geom g, int n_kv_head,
                                                    int B, int D, int kf, int vf, bool k_plain, bool v_plain,
                                                    const int32_t *__restrict__ slots, int n,
                                                    const float *__restrict__ k,
                                                    const float *__restrict__ v, int64_t kv_stride, unsigned wblocks,
                                                    int pdl) {
    /* (write_wait) launched as a programmatic dependent launch, this grid
     * may start during the kernel before it: wait for it (at once for a
     * plain launch) before any global access. Then (write_pdl) the next
     * kernel in the stream, a decode launched as a programmatic dependent
     * launch, may start: its blocks wait in griddepcontrol.wait until this
     * grid is done and its writes visible (with the prefetch promise they
     * read the complete pages first; everything before this grid has
     * completed by now) */
    asm volatile("griddepcontrol.wait;" ::: "memory");
    if (pdl) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if constexpr (U4C) {
        if (blockIdx.x >= wblocks) {
            const long u = ((long)(blockIdx.x - wblocks) * blockDim.x + threadIdx.x) / D;
            if (u < (long)n * n_kv_head)
                encode_u4c(arena, g, D, slots, n, k, kv_stride, (int)(u / n_kv_head), (int)(u % n_kv_head),
                           (int)(threadIdx.x % D));
            return;
        }
    }
    const int lane = threadIdx.x & 31;
    const long unit = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long units = (long)n * n_kv_head * 2;
    if (unit >= units) return;
    const int role = (int)(unit & 1);                  /* 0: K, 1: V */
    const int head = (int)((unit >> 1) % n_kv_head);
    const int tok = (int)((unit >> 1) / n_kv_head);
    const int32_t slot = slots[tok];
    if (slot < 0 || !(role ? v_plain : k_plain)) return;   /* transforms: write_coef_kernel */
    const int32_t page = slot / B, off = slot % B;
    const float *x = (role ? v : k) + (int64_t)tok * kv_stride + (int64_t)head * D;
    uint8_t *blk = const_cast<uint8_t *>(role ? kvc__cu_v_block(arena, g, page, head)
                                              : kvc__cu_k_block(arena, g, page, head));
    const int fmt = role ? vf : kf;
    if (fmt == KVC_CU_U4C) return;                     /* the blocks past wblocks */
    if (kvc__cu_is_u4t(fmt)) {                         /* values only (layout_init) */
        if (D == 64 && fmt == KVC_CU_U4T32) encode_u4_token<64, 32>(blk, off, x, lane);
        if (D == 64 && fmt == KVC_CU_U4T64) encode_u4_token<64, 64>(blk, off, x, lane);
        if (D == 128 && fmt == KVC_CU_U4T32) encode_u4_token<128, 32>(blk, off, x, lane);
        if (D == 128 && fmt == KVC_CU_U4T64) encode_u4_token<128, 64>(blk, off, x, lane);
        return;
    }
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

/* One side of a transform codec for write_coef_kernel. */
struct coef_side {
    const float *P, *mu;         /* (n_groups, in_dim, R), (n_groups, in_dim); P NULL: a plain side */
    int R, in_dim, n_groups, fmt;
    size_t base, block_bytes;    /* the side's group 0 block in a page's layer region, and the stride */
};

/* Transform codecs: block (token, group, side); thread r computes
 * coefficient r = sum_d P[d][r] (x[d] - mu[d]) in the order of codec.c's
 * portable project (one rounded product and one rounded sum per d, from d =
 * 0), then the block encodes the coefficients as f16 or int8 (the int8
 * layout of R numbers: codes, then one fp16 scale per token). Dynamic shared
 * memory: in_dim + R floats of the larger side. */
__global__ void __launch_bounds__(128) write_coef_kernel(uint8_t *__restrict__ arena, size_t page_bytes,
                                                         size_t layer_off, int D, coef_side ks, coef_side vs,
                                                         const int32_t *__restrict__ slots,
                                                         const float *__restrict__ k, const float *__restrict__ v,
                                                         int64_t kv_stride) {
    extern __shared__ float sh[];
    __shared__ float s_max[4];
    const int tok = blockIdx.x, grp = blockIdx.y, side = blockIdx.z, tid = threadIdx.x;
    const coef_side &c = side ? vs : ks;
    const int32_t slot = slots[tok];
    if (!c.P || grp >= c.n_groups || slot < 0) return;
    constexpr int B = KVC__CU_B;
    const int page = slot / B, off = slot % B, R = c.R, n = c.in_dim;
    const float *x = (side ? v : k) + (int64_t)tok * kv_stride + (int64_t)(c.n_groups > 1 ? grp * D : 0);
    const float *mu = c.mu + (size_t)grp * n, *P = c.P + (size_t)grp * n * R;
    float *xd = sh, *coef = sh + n;
    for (int d = tid; d < n; d += blockDim.x) xd[d] = __fsub_rn(x[d], mu[d]);
    __syncthreads();
    float amax = 0.0f;
    for (int r = tid; r < R; r += blockDim.x) {
        /* the sum runs in order; the basis numbers of 8 steps are loaded
         * before they are used (n is a multiple of 64: head_dim or a latent's
         * n_kv_head * head_dim) */
        float a = 0.0f;
#pragma unroll 2
        for (int d = 0; d < n; d += 8) {
            float pv[8];
#pragma unroll
            for (int j = 0; j < 8; j++) pv[j] = __ldg(P + (size_t)(d + j) * R + r);
#pragma unroll
            for (int j = 0; j < 8; j++) a = __fadd_rn(a, __fmul_rn(pv[j], xd[d + j]));
        }
        coef[r] = a;
        amax = fmaxf(amax, fabsf(a));
    }
    uint8_t *blk = arena + (size_t)page * page_bytes + layer_off + c.base + (size_t)grp * c.block_bytes;
    if (c.fmt == KVC_CU_F16) {
        uint16_t *h = reinterpret_cast<uint16_t *>(blk);
        for (int r = tid; r < R; r += blockDim.x)
            h[side ? off * R + r : r * B + off] = __half_as_ushort(__float2half_rn(coef[r]));
        return;
    }
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) amax = fmaxf(amax, __shfl_xor_sync(KVC__CU_FULL, amax, m));
    if ((tid & 31) == 0) s_max[tid >> 5] = amax;
    __syncthreads();
    amax = fmaxf(fmaxf(s_max[0], s_max[1]), fmaxf(s_max[2], s_max[3]));
    const uint16_t sh16 = i8_scale_half(amax);
    const float s = half_bits(sh16);
    int8_t *q = reinterpret_cast<int8_t *>(blk);
    for (int r = tid; r < R; r += blockDim.x) q[side ? off * R + r : r * B + off] = i8_round(s > 0.0f ? coef[r] / s : 0.0f);
    if (tid == 0) reinterpret_cast<uint16_t *>(blk + kvc__cu_i8_scale_offset(B, R))[off] = sh16;
}

static coef_side coef_side_of(const kvc_cu_layout *L, int layer, int side) {
    const kvc__cu_basis b = kvc__cu_basis_of(L, layer, side);
    const kvc__codec *c = side ? &L->pool->vc : &L->pool->kc;
    coef_side cs;
    cs.P = b.P;
    cs.mu = b.mu;
    cs.R = b.R;
    cs.in_dim = b.in_dim;
    cs.n_groups = c->n_groups;
    cs.fmt = side ? L->v_fmt : L->k_fmt;
    cs.base = side ? L->pool->k_region[layer] : 0;
    cs.block_bytes = c->block_bytes[layer];
    return cs;
}

/* Whether the write kernel lets the kernel after it launch at its start
 * (griddepcontrol.launch_dependents): a decode of the same layer then
 * launches and schedules its blocks while the write runs, instead of after
 * it. Only where the last decode's grid lands well beside a running kernel
 * (kvc__cu_decode_lands_early): a grid that leaves some slots free and
 * takes the rest as they free lands unevenly (write + decode of a layer,
 * notes/gpu.md session 11: SmolLM2 f16 64 x 2k 36.5 -> 41.3 us when
 * released regardless; 1 x 32k 16.4 -> 15.5). KVC_CU_WRITE_PDL=0 in the
 * environment turns it off, =1 on regardless (benchmarks' before and
 * after). */
static int write_pdl() {
    static const int mode = kvc__cu_env("KVC_CU_WRITE_PDL", -1);
    return mode == 1 || (mode != 0 && kvc__cu_decode_lands_early());
}

/* Whether the write kernel is a programmatic dependent launch itself: its
 * blocks start during the kernel before it and wait for it in
 * griddepcontrol.wait, which hides its launch (a decode step's write is a
 * few microseconds, most of it launch). KVC_CU_WRITE_WAIT=0 in the
 * environment launches it plainly (benchmarks' before). */
static bool write_wait() {
    static const bool on = kvc__cu_env("KVC_CU_WRITE_WAIT", 1) != 0;
    return on;
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
    /* int4 keys per channel: their blocks after the warps' */
    const long kblocks = L->k_fmt == KVC_CU_U4C ? ((long)n * L->n_kv_head * L->head_dim + 127) / 128 : 0;
    if (blocks + kblocks > 0x7fffffffL) KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: write: %d tokens is too many", n);
    const kvc__cu_geom g = kvc__cu_geom_of(L, layer);
    const bool k_plain = L->k_shape == KVC_CU_PLAIN, v_plain = L->v_shape == KVC_CU_PLAIN;
    if (k_plain || v_plain) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3((unsigned)(blocks + kblocks));
        cfg.blockDim = dim3(128);
        cfg.stream = (cudaStream_t)stream;
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr.val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = &attr;
        cfg.numAttrs = write_wait() ? 1 : 0;
        KVC__CU_TRY(cudaLaunchKernelEx(&cfg, kblocks ? write_kernel<true> : write_kernel<false>, (uint8_t *)arena, g,
                                       L->n_kv_head, L->block_size, L->head_dim, L->k_fmt, L->v_fmt, k_plain, v_plain,
                                       slots, n, k, v, kv_stride, (unsigned)blocks, write_pdl()));
        KVC__CU_TRY(cudaGetLastError());
    }
    if (!k_plain || !v_plain) {
        const coef_side ks = coef_side_of(L, layer, 0), vs = coef_side_of(L, layer, 1);
        const int groups = ks.n_groups > vs.n_groups ? ks.n_groups : vs.n_groups;
        const int fk = ks.P ? ks.in_dim + ks.R : 0, fv = vs.P ? vs.in_dim + vs.R : 0;
        const size_t smem = sizeof(float) * (size_t)(fk > fv ? fk : fv);
        if (n > 0x7fffffff || smem > 48 * 1024)
            KVC__CU_FAIL(KVC_ERR_INVAL, "kvc_cuda: write: %d tokens, %zu bytes of shared memory: too many", n, smem);
        write_coef_kernel<<<dim3((unsigned)n, (unsigned)groups, 2), 128, smem, (cudaStream_t)stream>>>(
            (uint8_t *)arena, g.page_bytes, g.layer_off, L->head_dim, ks, vs, slots, k, v, kv_stride);
        KVC__CU_TRY(cudaGetLastError());
    }
    return KVC_OK;
}
