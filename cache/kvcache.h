/* kvcache.h: the paged KV cache: a page pool, per-sequence block tables, the
 * codecs pages are stored in, and attention that reads pages directly.
 *
 * One arena of `memory_bytes` (64-byte aligned, zero-filled) is cut into pages
 * of `block_size` tokens (B). A page holds every layer's K and V for its
 * tokens, so a page id indexes each layer's region directly:
 *
 *   page p, layer l:  arena + p * page_bytes + l * layer_bytes
 *     K region: n_kv_head head blocks of k_block_bytes (head h at h * k_block_bytes)
 *     V region: n_kv_head head blocks of v_block_bytes, right after the K region
 *   layer_bytes = n_kv_head * (k_block_bytes + v_block_bytes); page_bytes = n_layer * layer_bytes
 *
 * A head block holds one kv head's B tokens in its codec's layout, padded to a
 * multiple of 64 bytes (D = head_dim):
 *   f32  K: float  (D, B)  dimension-major: one dimension's B tokens are contiguous,
 *                          so scores of 8 tokens come from vertical FMAs
 *        V: float  (B, D)  token-major: a weighted sum of rows
 *   f16  K: fp16   (D, B)       V: fp16 (B, D)        IEEE half, round to nearest even
 *   int8 K: int8   (D, B), then fp16 scale (B)        symmetric: x = q * scale, one scale
 *        V: int8   (B, D), then fp16 scale (B)        per (token, head), the smallest half
 *                          >= max|x| / 127; the scales start 16-byte aligned; |q| <= 127
 * Attention reads these in place: int8 scales multiply the score (K) or fold
 * into the softmax weight (V); nothing is expanded to f32 in memory.
 *
 * Sequences own block tables of int32 page ids; pages are reference-counted so
 * sequences can share a prefix (fork), and a shared page is copied before it is
 * written (copy-on-write).
 *
 * The cache knows nothing of models or scheduling: it is given dimensions and
 * codec specs. Threading: a pool is used by one thread at a time (the engine
 * thread), except kvc_write, kvc_read and kvc_attend, which may run concurrently
 * on different (sequence, layer, kv_head) units once pages are reserved. */
#ifndef KVC_KVCACHE_H
#define KVC_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct kvc_pool kvc_pool;

typedef struct {
    int n_layer;             /* 1..4096 */
    int n_kv_head;           /* 1..4096 */
    int head_dim;            /* 1..1024 */
    int block_size;          /* tokens per page, 1..1024; default 16 (0 is an error) */
    size_t memory_bytes;     /* arena size; whole pages are cut from it */
    const char *k_codec;     /* codec spec for keys: "f32", "f16", "int8" */
    const char *v_codec;     /* codec spec for values */
    int force_scalar;        /* 1: portable kernels even where AVX2 is available
                              * (tests, comparisons); 0: choose at run time */
} kvc_config;

/* A sequence's block table. Open struct owned by the caller (zero-init it);
 * the pool manages `pages`. n_tokens counts the positions reserved. */
typedef struct {
    int32_t *pages;      /* (cap_pages) page ids */
    int n_pages;
    int cap_pages;
    int n_tokens;        /* positions [0, n_tokens) have pages */
} kvc_seq;

enum { KVC_OK = 0, KVC_ERR_NOMEM = -1, KVC_ERR_INVAL = -2, KVC_ERR_FULL = -3 };
const char *kvc_strerror(int code);

/* The codec specs kvc_config accepts, comma-separated ("f32, f16, int8"). */
const char *kvc_codec_specs(void);

/* Creates a pool. Returns KVC_OK, or an error with a message naming the bad
 * field or codec spec in err ("kvc: block_size 0: must be 1..1024"). */
int kvc_pool_create(const kvc_config *cfg, kvc_pool **out, char *err, size_t errlen);
void kvc_pool_destroy(kvc_pool *pool);

/* Accounting. */
int kvc_pages_total(const kvc_pool *pool);
int kvc_pages_free(const kvc_pool *pool);
int kvc_block_size(const kvc_pool *pool);
size_t kvc_bytes_per_token(const kvc_pool *pool);   /* all layers, K and V, with padding */
size_t kvc_page_bytes(const kvc_pool *pool);
/* Positions reserved over all live sequences (a shared prefix counts once per
 * sequence that holds it). */
int64_t kvc_tokens_cached(const kvc_pool *pool);
/* Sequences of ctx_len tokens that fit in an empty pool (no sharing). */
int kvc_capacity_sequences(const kvc_pool *pool, int ctx_len);
/* bytes per token of an f16 cache of the same shape / kvc_bytes_per_token. */
double kvc_compression_ratio(const kvc_pool *pool);
const char *kvc_k_codec(const kvc_pool *pool);      /* the specs the pool was made with */
const char *kvc_v_codec(const kvc_pool *pool);

/* Introspection for tests and debugging. kvc_page_refcount: references held
 * on page `page` (0 when free). kvc_pool_validate: checks the free list and
 * the reference counts against each other; KVC_OK or KVC_ERR_INVAL with what
 * is wrong in err. */
int kvc_page_refcount(const kvc_pool *pool, int32_t page);
int kvc_pool_validate(const kvc_pool *pool, char *err, size_t errlen);

/* Ensures seq has pages for positions [0, n_tokens). A shared page that the
 * newly reserved positions fall in (the last partial page after a fork) is
 * copied here, so a reserve-then-write caller never makes kvc_write change a
 * block table. Returns KVC_OK, KVC_ERR_FULL (nothing changed) when the pool has
 * too few free pages, or KVC_ERR_NOMEM (nothing changed). A smaller n_tokens
 * than seq->n_tokens changes nothing. */
int kvc_seq_reserve(kvc_pool *pool, kvc_seq *seq, int n_tokens);
/* Drops the sequence's references and frees its table; seq is zeroed. */
void kvc_seq_release(kvc_pool *pool, kvc_seq *seq);
/* dst (empty: zeroed or released) shares src's pages; the shared last partial
 * page is copied when either sequence next reserves or writes into it.
 * KVC_OK, KVC_ERR_INVAL (dst not empty) or KVC_ERR_NOMEM. */
int kvc_seq_fork(kvc_pool *pool, const kvc_seq *src, kvc_seq *dst);

/* Encodes K and V of n tokens at positions [pos, pos + n) of one layer into
 * seq's pages (reserved beforehand). k, v: (n, n_kv_head, head_dim) f32 rows
 * with kv_stride floats between tokens. A page still shared with another
 * sequence (positions reserved before a fork but written after it) is copied
 * first, under the pool's lock. Returns KVC_OK, or KVC_ERR_FULL when such a
 * copy finds no free page (the tokens from that page on are not written). */
int kvc_write(kvc_pool *pool, kvc_seq *seq, int layer, int pos, int n,
               const float *k, const float *v, int64_t kv_stride);

/* Decodes positions [pos, pos + n) of one layer back to f32: k, v as in
 * kvc_write (either may be NULL). What attention sees, for tests and tools. */
void kvc_read(const kvc_pool *pool, const kvc_seq *seq, int layer, int pos, int n,
              float *k, float *v, int64_t kv_stride);

/* Causal attention for the n_rep query heads that share kv head `kv_head`:
 * query token i (position pos0 + i) attends to cached positions
 * [0, pos0 + i], which must all be written. q: query i's heads at q + i * q_stride, n_rep * head_dim
 * floats (already rotated, unscaled); out likewise with out_stride. scale is
 * applied to the scores (1/sqrt(head_dim) normally). scratch: at least
 * kvc_attend_scratch_floats(pool, n_ctx, n_rep) floats, 64-byte aligned
 * preferred. Each K and V row is read once per call for up to 16 query rows
 * (query token, head) together: a decode step reads the cache once per kv head. */
void kvc_attend(const kvc_pool *pool, const kvc_seq *seq, int layer, int kv_head,
                const float *q, int64_t q_stride, int n_q, int n_rep, int pos0, float scale,
                float *out, int64_t out_stride, float *scratch);
size_t kvc_attend_scratch_floats(const kvc_pool *pool, int n_ctx, int n_rep);

#endif
