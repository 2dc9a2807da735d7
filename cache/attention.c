/* attention.c: kvc_attend, causal attention that reads K and V straight from
 * a sequence's pages through the codecs, and the portable softmax step.
 *
 * Query rows (query token i, head r of the n_rep sharing the kv head) are
 * processed in tiles of up to KVC__ROWS_MAX. The context is walked in chunks
 * of about 256 positions (whole pages): the tile computes scores against each
 * page's K block, updates an online softmax over the chunk (running max m,
 * running sum l, rescaling the accumulators when the max grows), and adds each
 * page's weighted V rows: one pass over the cache per tile, f32 accumulation,
 * scratch that does not grow with the context, and software prefetch of the
 * next scattered page. Rows of later query tokens of a
 * prefill chunk see more positions (causal inside the chunk): a row's
 * positions past its own are masked to weight 0. */
#include <math.h>
#include <string.h>

#include "cache/pool_internal.h"

/* The tile's buffers, each 64-byte aligned, in scratch. */
typedef struct {
    float *q;       /* (ROWS_MAX, kdim) scaled query rows */
    float *acc;     /* (ROWS_MAX, vdim) weighted sums of V */
    float *s;       /* (ROWS_MAX, chunk_pages * block_size) a chunk's scores, then weights */
    float *m, *l;   /* (ROWS_MAX) running max and sum of exp */
} tile_bufs;

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Pages scored per softmax step: about 256 positions, so the softmax and the
 * per-call costs are paid per chunk rather than per page. */
static int chunk_pages(int block_size) { return block_size >= 256 ? 1 : 256 / block_size; }

size_t kvc_attend_scratch_floats(const kvc_pool *pool, int n_ctx, int n_rep) {
    size_t R = KVC__ROWS_MAX;
    return 16 + align16(R * (size_t)pool->kc.dim) + align16(R * (size_t)pool->vc.dim) +
           align16(R * (size_t)(chunk_pages(pool->block_size) * pool->block_size)) + 2 * align16(R);
}

static tile_bufs carve(const kvc_pool *pool, float *scratch) {
    size_t R = KVC__ROWS_MAX;
    float *p = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    tile_bufs t;
    t.q = p;   p += align16(R * (size_t)pool->kc.dim);
    t.acc = p; p += align16(R * (size_t)pool->vc.dim);
    t.s = p;   p += align16(R * (size_t)(chunk_pages(pool->block_size) * pool->block_size));
    t.m = p;   p += align16(R);
    t.l = p;
    return t;
}

static int32_t page_id(const kvc_seq *seq, int i) {
    return __atomic_load_n(&seq->pages[i], __ATOMIC_ACQUIRE);
}

static void prefetch_block(const uint8_t *p, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

void kvc__softmax_scalar(float *s, int s_stride, int nb, int nr, const int *valid,
                         float *m, float *l, float *acc, int acc_dim) {
    for (int r = 0; r < nr; r++) {
        float *sr = s + (size_t)r * s_stride;
        int nv = valid[r];
        if (nv == 0) {
            memset(sr, 0, sizeof(float) * (size_t)nb);
            continue;
        }
        float mx = sr[0];
        for (int j = 1; j < nv; j++) mx = sr[j] > mx ? sr[j] : mx;
        float m_new = m[r] > mx ? m[r] : mx;
        float alpha = expf(m[r] - m_new);       /* 0 on the first page (m = -inf) */
        float sum = 0.0f;
        for (int j = 0; j < nv; j++) {
            sr[j] = expf(sr[j] - m_new);
            sum += sr[j];
        }
        for (int j = nv; j < nb; j++) sr[j] = 0.0f;
        l[r] = l[r] * alpha + sum;
        if (alpha != 1.0f)
            for (int d = 0; d < acc_dim; d++) acc[(size_t)r * acc_dim + d] *= alpha;
        m[r] = m_new;
    }
}

void kvc_attend(const kvc_pool *pool, const kvc_seq *seq, int layer, int kv_head,
                const float *q, int64_t q_stride, int n_q, int n_rep, int pos0, float scale,
                float *out, int64_t out_stride, float *scratch) {
    KVC__CHECK(layer >= 0 && layer < pool->n_layer, "layer %d of %d", layer, pool->n_layer);
    KVC__CHECK(kv_head >= 0 && kv_head < pool->n_kv_head, "kv_head %d of %d", kv_head, pool->n_kv_head);
    KVC__CHECK(n_q >= 0 && n_rep >= 1 && pos0 >= 0 && pos0 + n_q <= seq->n_tokens,
               "%d queries from position %d, n_rep %d, %d positions reserved", n_q, pos0, n_rep,
               seq->n_tokens);
    const int D = pool->head_dim, KD = pool->kc.dim, VD = pool->vc.dim, B = pool->block_size;
    const kvc__kernels *kk = &pool->kc.kern, *vk = &pool->vc.kern;
    const int CP = chunk_pages(B);
    tile_bufs t = carve(pool, scratch);
    int rows = n_q * n_rep;
    for (int r0 = 0; r0 < rows; r0 += KVC__ROWS_MAX) {
        int nr = rows - r0 < KVC__ROWS_MAX ? rows - r0 : KVC__ROWS_MAX;
        int limit[KVC__ROWS_MAX];     /* last position row i may see */
        for (int i = 0; i < nr; i++) {
            int tok = (r0 + i) / n_rep, rep = (r0 + i) % n_rep;
            const float *qs = q + tok * q_stride + (int64_t)rep * D;
            for (int d = 0; d < KD; d++) t.q[(size_t)i * KD + d] = qs[d] * scale;
            memset(t.acc + (size_t)i * VD, 0, sizeof(float) * (size_t)VD);
            t.m[i] = -INFINITY;
            t.l[i] = 0.0f;
            limit[i] = pos0 + tok;
        }
        int ctx_end = limit[nr - 1] + 1;    /* rows come in token order */
        int n_pages = (ctx_end - 1) / B + 1;
        for (int pa = 0; pa < n_pages; pa += CP) {
            int pb = pa + CP < n_pages ? pa + CP : n_pages;
            int c0 = pa * B;                              /* the chunk's first position */
            int nc = (pb * B < ctx_end ? pb * B : ctx_end) - c0;
            for (int pi = pa; pi < pb; pi++) {
                int nb = ctx_end - pi * B < B ? ctx_end - pi * B : B;
                int32_t id = page_id(seq, pi);
                /* Pages are scattered: fetch the next K block and this V block
                 * while this K block computes. */
                if (pi + 1 < n_pages) prefetch_block(kvc__k_block(pool, page_id(seq, pi + 1), layer, kv_head),
                                                     pool->kc.block_bytes);
                prefetch_block(kvc__v_block(pool, id, layer, kv_head), pool->vc.block_bytes);
                kk->scores(kvc__k_block(pool, id, layer, kv_head), B, KD, nb, t.q, nr,
                           t.s + (pi - pa) * B, CP * B);
            }
            int valid[KVC__ROWS_MAX];
            for (int i = 0; i < nr; i++) {
                int v = limit[i] - c0 + 1;
                valid[i] = v < 0 ? 0 : v > nc ? nc : v;
            }
            pool->softmax(t.s, CP * B, nc, nr, valid, t.m, t.l, t.acc, VD);
            for (int pi = pa; pi < pb; pi++) {
                int nb = ctx_end - pi * B < B ? ctx_end - pi * B : B;
                vk->accum(kvc__v_block(pool, page_id(seq, pi), layer, kv_head), B, VD, nb,
                          t.s + (pi - pa) * B, CP * B, nr, t.acc);
            }
        }
        for (int i = 0; i < nr; i++) {
            int tok = (r0 + i) / n_rep, rep = (r0 + i) % n_rep;
            float *o = out + tok * out_stride + (int64_t)rep * D;
            float inv = 1.0f / t.l[i];
            for (int d = 0; d < VD; d++) o[d] = t.acc[(size_t)i * VD + d] * inv;
        }
    }
}
