/* attention.c: kvc_attend, causal attention that reads K and V straight from
 * a sequence's pages through the codecs, and the portable softmax step.
 *
 * Query rows (query token i, head r of the n_rep sharing the kv head) are
 * processed in tiles of up to KVC__ROWS_MAX. Each row is scaled and projected
 * once onto its head's slice of the K basis (a copy for codecs without one).
 * The context is walked in chunks of about 256 positions (whole pages): the
 * tile computes scores against each page's K block, updates an online softmax
 * over the chunk (running max m, running sum l, rescaling the accumulators
 * when the max grows), and adds each page's weighted V rows in the V codec's
 * stored space: one pass over the cache per tile, f32 accumulation, scratch
 * that does not grow with the context, and software prefetch of the next
 * scattered page. At the end each row is expanded once through its head's
 * slice of the V basis. Rows of later query tokens of a prefill chunk see
 * more positions (causal inside the chunk): a row's positions past its own
 * are masked to weight 0. Keys cached before RoPE are decoded a block at a
 * time into an f32 tile (low-rank ones expanded as one (head_dim, R) x (R, 64)
 * product per 64 tokens), rotated and scored from it; that decoding costs
 * more than the scores, so up to n_rep tiles (a 16-token query block's rows)
 * walk the context together and share each decoded block. The rotation is
 * split in two: each key by its slot in the page (tables built once per
 * call, read contiguously) and the query rows back by the page's first
 * position. */
#include <math.h>
#include <string.h>

#include "cache/pool_internal.h"

/* A tile's buffers, each 64-byte aligned, in scratch. */
typedef struct {
    float *q;       /* (ROWS_MAX, qdim) scaled (and projected) query rows */
    float *acc;     /* (ROWS_MAX, vc.max_dim) weighted sums of stored V numbers */
    float *s;       /* (ROWS_MAX, chunk_pages * block_size) a chunk's scores, then weights */
    float *m, *l;   /* (ROWS_MAX) running max and sum of exp */
    int r0, nr;     /* its rows of the call: [r0, r0 + nr) */
    int limit[KVC__ROWS_MAX];   /* the last position each row may see */
} tile_bufs;

static size_t align16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Pages scored per softmax step: about 256 positions, so the softmax and the
 * per-call costs are paid per chunk rather than per page. */
static int chunk_pages(int block_size) { return block_size >= 256 ? 1 : 256 / block_size; }

/* Floats per query row: the projected rank, or head_dim when keys are
 * rotated in place (pre-RoPE) or not transformed. */
static size_t q_dim(const kvc_pool *pool) {
    return pool->kc.pre_rope || pool->kc.shape == KVC__PLAIN ? (size_t)pool->head_dim : (size_t)pool->kc.max_dim;
}

/* Tiles that walk the context together: n_rep (at most ROWS_MAX) with keys
 * cached before RoPE, so that they share each decoded key block; else one. */
static int group_tiles(const kvc_pool *pool, int n_rep) {
    return !pool->kc.pre_rope ? 1 : n_rep < KVC__ROWS_MAX ? n_rep : KVC__ROWS_MAX;
}

static size_t tile_floats(const kvc_pool *pool) {
    size_t R = KVC__ROWS_MAX;
    size_t vdim = (size_t)(pool->vc.max_dim > pool->head_dim ? pool->vc.max_dim : pool->head_dim);
    return align16(R * q_dim(pool)) + align16(R * vdim) +
           align16(R * (size_t)(chunk_pages(pool->block_size) * pool->block_size)) + 2 * align16(R);
}

/* Pre-RoPE keys: the decoded key tile (head_dim, block_size); the RoPE
 * cosines and sines of the slots of a page, by pair (head_dim / 2,
 * block_size) each; a tile's query rows turned back by a page's first
 * position (ROWS_MAX, head_dim); then the coefficients of up to
 * KVC__TILE_TOKENS tokens (max_dim, KVC__TILE_TOKENS). */
static size_t key_tile_floats(const kvc_pool *pool) {
    if (!pool->kc.pre_rope) return 0;
    size_t DB = (size_t)pool->head_dim * pool->block_size;
    return align16(DB) + 2 * align16(DB / 2 + 1) + align16((size_t)KVC__ROWS_MAX * pool->head_dim) +
           (pool->kc.shape == KVC__PLAIN ? 0 : align16((size_t)pool->kc.max_dim * KVC__TILE_TOKENS));
}

typedef struct {
    float *tile;          /* (head_dim, B) a block's keys, decoded and rotated by their slots */
    float *slot_cos;      /* (rope_dim / 2, B) RoPE of slot j (position j) of a page, by pair */
    float *slot_sin;
    float *q;             /* (ROWS_MAX, head_dim) a tile's rows turned back by the page's first position */
    float *work;          /* (max_dim, KVC__TILE_TOKENS) coefficients */
} key_bufs;

size_t kvc_attend_scratch_floats(const kvc_pool *pool, int n_ctx, int n_rep) {
    return 16 + (size_t)group_tiles(pool, n_rep) * tile_floats(pool) + key_tile_floats(pool);
}

/* Carves n_tiles tiles' buffers, then (pre-RoPE keys) the key buffers, from
 * scratch. */
static void carve(const kvc_pool *pool, float *scratch, tile_bufs *t, int n_tiles, key_bufs *kb) {
    size_t R = KVC__ROWS_MAX;
    size_t vdim = (size_t)(pool->vc.max_dim > pool->head_dim ? pool->vc.max_dim : pool->head_dim);
    float *p = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    for (int i = 0; i < n_tiles; i++) {
        t[i].q = p;   p += align16(R * q_dim(pool));
        t[i].acc = p; p += align16(R * vdim);
        t[i].s = p;   p += align16(R * (size_t)(chunk_pages(pool->block_size) * pool->block_size));
        t[i].m = p;   p += align16(R);
        t[i].l = p;   p += align16(R);
    }
    memset(kb, 0, sizeof *kb);
    if (!pool->kc.pre_rope) return;
    size_t DB = (size_t)pool->head_dim * pool->block_size;
    kb->tile = p;     p += align16(DB);
    kb->slot_cos = p; p += align16(DB / 2 + 1);
    kb->slot_sin = p; p += align16(DB / 2 + 1);
    kb->q = p;        p += align16((size_t)KVC__ROWS_MAX * pool->head_dim);
    kb->work = p;
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

/* Pre-RoPE keys are rotated in two turns whose product is their position's:
 * a key by its slot j in the page (the same tables for every page), and the
 * query rows back by the page's first position p0, since
 * q . R(p0 + j) k = (R(p0)^T q) . (R(j) k). */

/* The slot tables of a page: RoPE of positions [0, n) by pair. */
static void slot_tables(const kvc_rope *rope, int B, int n, key_bufs *kb) {
    const int half = rope->rope_dim / 2;
    for (int i = 0; i < half; i++)
        for (int j = 0; j < n; j++) {
            kb->slot_cos[(size_t)i * B + j] = rope->cos[(size_t)j * half + i];
            kb->slot_sin[(size_t)i * B + j] = rope->sin[(size_t)j * half + i];
        }
}

/* Decodes nb keys of a pre-RoPE K block into kb->tile (head_dim, B), up to
 * KVC__TILE_TOKENS tokens at a time, and rotates each by its slot. */
static void decode_rotated(const kvc_pool *pool, const uint8_t *kblk, int layer, int kv_head, int nb,
                           const key_bufs *kb, const kvc_rope *rope) {
    const int B = pool->block_size;
    for (int j0 = 0; j0 < nb; j0 += KVC__TILE_TOKENS) {
        int n = nb - j0 < KVC__TILE_TOKENS ? nb - j0 : KVC__TILE_TOKENS;
        kvc__codec_decode_tile(&pool->kc, layer, kv_head, kblk, j0, n, kb->tile + j0, B, kb->work);
    }
    pool->kc.rotate(kb->tile, B, nb, rope->rope_dim, rope->neox, kb->slot_cos, kb->slot_sin, B);
}

/* out (nr, D) = the rows q (nr, D) turned back by position p0 (R(p0)^T q). */
static void turn_back(const float *q, int nr, int D, int p0, const kvc_rope *rope, float *out) {
    const int half = rope->rope_dim / 2;
    const float *cs = rope->cos + (size_t)p0 * half, *sn = rope->sin + (size_t)p0 * half;
    memcpy(out, q, sizeof(float) * (size_t)nr * D);
    for (int r = 0; r < nr; r++) {
        const float *qr = q + (size_t)r * D;
        float *o = out + (size_t)r * D;
        for (int i = 0; i < half; i++) {
            int ia = rope->neox ? i : 2 * i, ib = rope->neox ? i + half : 2 * i + 1;
            o[ia] = qr[ia] * cs[i] + qr[ib] * sn[i];
            o[ib] = qr[ib] * cs[i] - qr[ia] * sn[i];
        }
    }
}

void kvc_attend(const kvc_pool *pool, const kvc_seq *seq, int layer, int kv_head,
                const float *q, int64_t q_stride, int n_q, int n_rep, int pos0, float scale,
                float *out, int64_t out_stride, float *scratch) {
    kvc_attend_rope(pool, seq, layer, kv_head, q, q_stride, n_q, n_rep, pos0, scale, out, out_stride, scratch, NULL);
}

void kvc_attend_rope(const kvc_pool *pool, const kvc_seq *seq, int layer, int kv_head,
                     const float *q, int64_t q_stride, int n_q, int n_rep, int pos0, float scale,
                     float *out, int64_t out_stride, float *scratch, const kvc_rope *rope) {
    KVC__CHECK(layer >= 0 && layer < pool->n_layer, "layer %d of %d", layer, pool->n_layer);
    KVC__CHECK(kv_head >= 0 && kv_head < pool->n_kv_head, "kv_head %d of %d", kv_head, pool->n_kv_head);
    KVC__CHECK(n_q >= 0 && n_rep >= 1 && pos0 >= 0 && pos0 + n_q <= seq->n_tokens,
               "%d queries from position %d, n_rep %d, %d positions reserved", n_q, pos0, n_rep,
               seq->n_tokens);
    if (pool->kc.pre_rope)
        KVC__CHECK(rope && rope->rope_dim >= 0 && rope->rope_dim % 2 == 0 && rope->rope_dim <= pool->head_dim &&
                       (rope->rope_dim == 0 || (rope->n_pos >= pos0 + n_q && rope->cos && rope->sin)),
                   "keys cached before RoPE need RoPE tables covering position %d", pos0 + n_q - 1);
    const int D = pool->head_dim, VD = pool->vc.dim[layer], B = pool->block_size;
    const int kg = kvc__codec_group(&pool->kc, kv_head), vg = kvc__codec_group(&pool->vc, kv_head);
    const kvc__kernels *vk = &pool->vc.kern;
    const int CP = chunk_pages(B), G = group_tiles(pool, n_rep);
    tile_bufs tiles[KVC__ROWS_MAX];                      /* G <= ROWS_MAX */
    key_bufs kb;
    carve(pool, scratch, tiles, G, &kb);
    const float *ktile = kb.tile;                        /* pre-RoPE keys only */
    if (ktile) slot_tables(rope, B, B < pos0 + n_q ? B : pos0 + n_q, &kb);
    const int qd = pool->kc.pre_rope ? D : pool->kc.dim[layer];   /* floats per query row in t.q */
    int rows = n_q * n_rep;
    for (int g0 = 0; g0 < rows; g0 += G * KVC__ROWS_MAX) {
        /* a group of up to G tiles of up to ROWS_MAX rows each */
        int nt = 0;
        for (int r0 = g0; r0 < rows && nt < G; r0 += KVC__ROWS_MAX, nt++) {
            tile_bufs *t = &tiles[nt];
            t->r0 = r0;
            t->nr = rows - r0 < KVC__ROWS_MAX ? rows - r0 : KVC__ROWS_MAX;
            for (int i = 0; i < t->nr; i++) {
                int tok = (r0 + i) / n_rep, rep = (r0 + i) % n_rep;
                const float *qs = q + tok * q_stride + (int64_t)rep * D;
                float qsc[1024];
                for (int d = 0; d < D; d++) qsc[d] = qs[d] * scale;
                if (pool->kc.pre_rope) memcpy(t->q + (size_t)i * qd, qsc, sizeof(float) * (size_t)D);
                else kvc__codec_project(&pool->kc, layer, kv_head, qsc, t->q + (size_t)i * qd);
                memset(t->acc + (size_t)i * VD, 0, sizeof(float) * (size_t)VD);
                t->m[i] = -INFINITY;
                t->l[i] = 0.0f;
                t->limit[i] = pos0 + tok;
            }
        }
        int ctx_end = tiles[nt - 1].limit[tiles[nt - 1].nr - 1] + 1;    /* rows come in token order */
        int n_pages = (ctx_end - 1) / B + 1;
        for (int pa = 0; pa < n_pages; pa += CP) {
            int pb = pa + CP < n_pages ? pa + CP : n_pages;
            int c0 = pa * B;                              /* the chunk's first position */
            int nc = (pb * B < ctx_end ? pb * B : ctx_end) - c0;
            for (int pi = pa; pi < pb; pi++) {
                int nb = ctx_end - pi * B < B ? ctx_end - pi * B : B;
                int32_t id = page_id(seq, pi);
                const uint8_t *kblk = kvc__k_block(pool, id, layer, kg);
                /* Pages are scattered: fetch the next K block and this V block
                 * while this K block computes. */
                if (pi + 1 < n_pages) prefetch_block(kvc__k_block(pool, page_id(seq, pi + 1), layer, kg),
                                                     pool->kc.block_bytes[layer]);
                prefetch_block(kvc__v_block(pool, id, layer, vg), pool->vc.block_bytes[layer]);
                if (ktile) decode_rotated(pool, kblk, layer, kv_head, nb, &kb, rope);
                for (int ti = 0; ti < nt; ti++) {
                    tile_bufs *t = &tiles[ti];
                    float *sp = t->s + (pi - pa) * B;
                    if (ktile) {
                        turn_back(t->q, t->nr, D, pi * B, rope, kb.q);
                        pool->kc.scores_f32(ktile, B, D, nb, kb.q, t->nr, sp, CP * B);
                    }
                    else pool->kc.kern.scores(kblk, B, pool->kc.dim[layer], nb, t->q, t->nr, sp, CP * B);
                }
            }
            for (int ti = 0; ti < nt; ti++) {
                tile_bufs *t = &tiles[ti];
                int valid[KVC__ROWS_MAX];
                for (int i = 0; i < t->nr; i++) {
                    int v = t->limit[i] - c0 + 1;
                    valid[i] = v < 0 ? 0 : v > nc ? nc : v;
                }
                pool->softmax(t->s, CP * B, nc, t->nr, valid, t->m, t->l, t->acc, VD);
                for (int pi = pa; pi < pb; pi++) {
                    int nb = ctx_end - pi * B < B ? ctx_end - pi * B : B;
                    vk->accum(kvc__v_block(pool, page_id(seq, pi), layer, vg), B, VD, nb,
                              t->s + (pi - pa) * B, CP * B, t->nr, t->acc);
                }
            }
        }
        for (int ti = 0; ti < nt; ti++) {
            tile_bufs *t = &tiles[ti];
            for (int i = 0; i < t->nr; i++) {
                int tok = (t->r0 + i) / n_rep, rep = (t->r0 + i) % n_rep;
                float *o = out + tok * out_stride + (int64_t)rep * D;
                float inv = 1.0f / t->l[i], *a = t->acc + (size_t)i * VD;
                for (int d = 0; d < VD; d++) a[d] *= inv;
                kvc__codec_expand(&pool->vc, layer, kv_head, a, o);
            }
        }
    }
}
