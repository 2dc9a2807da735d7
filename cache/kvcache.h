/* kvcache.h: the paged KV cache: a page pool, per-sequence block tables, the
 * codecs pages are stored in, and attention that reads pages directly.
 *
 * One arena of `memory_bytes` (64-byte aligned, zero-filled) is cut into pages
 * of `block_size` tokens (B). A page holds every layer's K and V for its
 * tokens, so a page id indexes each layer's region directly:
 *
 *   page p, layer l:  arena + p * page_bytes + layer_offset[l]
 *     K region: n_k_groups blocks of k_block_bytes[l] (group g at g * k_block_bytes[l])
 *     V region: n_v_groups blocks of v_block_bytes[l], right after the K region
 *   a group is one kv head, or all of a layer's kv heads for a latent codec;
 *   block sizes depend on the layer only where a calibration file gives
 *   per-layer ranks.
 *
 * A block holds one group's B tokens in its codec's layout, padded to a
 * multiple of 16 bytes (D = head_dim, R = the stored rank):
 *   f32  K: float  (D, B)  dimension-major: one dimension's B tokens are contiguous,
 *                          so scores of 8 tokens come from vertical FMAs
 *        V: float  (B, D)  token-major: a weighted sum of rows
 *   f16  K: fp16   (D, B)       V: fp16 (B, D)        IEEE half, round to nearest even
 *   int8 K: int8   (D, B), then fp16 scale (B)        symmetric: x = q * scale, one scale
 *        V: int8   (B, D), then fp16 scale (B)        per (token, head), the smallest half
 *                          >= max|x| / 127; the scales start 16-byte aligned; |q| <= 127
 *   int4:token   K: 4-bit codes (D, B'), V: (B, D') (B', D' rounded up to even; two
 *                          codes a byte, the even index in the low nibble), then
 *                          fp16 scales (G, B) and fp16 minima (G, B): x = min + scale * code,
 *                          asymmetric per group of gs numbers of a token (G = ceil(D / gs);
 *                          gs = 32, or 64 with :g64)
 *   int4:channel           the same codes, then fp16 scales (D) and minima (D): per
 *                          number index over the block's tokens (KIVI's per-channel keys;
 *                          a run of tokens that widens a channel's range re-codes the
 *                          block's earlier tokens, an extra rounding for them)
 *   int4                   keys int4:channel, values int4:token (the measured better
 *                          choice for each: README, "KV codecs"); int4:g64 with 64-number
 *                          value groups
 *   lowrank:rR  K: fp16 (R, B), V: fp16 (B, R): coefficients c = P^T (x - mean) on
 *                          the head's orthonormal basis P (D, R); x ~ mean + P c
 *   latent:N    one block per layer: fp16 (N, B) / (B, N) coefficients of the
 *                          concatenated kv heads (n_kv_head * D) on one basis
 *   hybrid:rR, hybrid:latent:N   the same coefficients as int8 with an fp16 scale
 *                          per token (the int8 layout with D = R or N); with :int4, the
 *                          int4:token layout with D = R or N
 * Attention reads these in place: scales multiply the score (K) or fold into
 * the softmax weight (V); the query is projected once per row onto its head's
 * slice of the K basis (q' = P_h^T q) and the V coefficients are summed, then
 * expanded once per row (out = mean_h + P_h sum / l). Nothing is expanded to
 * f32 in memory, except pre-RoPE keys, which are rotated one block at a time
 * into a tile of scratch.
 *
 * Codec specs (one string, chosen separately for K and V):
 *   f32 | f16 | int8 | int4[:g32|:g64] | int4:token[:g32|:g64] | int4:channel
 *   lowrank:rR[:BASIS]          per-kv-head low rank R (1..head_dim), fp16 coefficients
 *   latent:N[:BASIS]            cross-head latent of N (1..n_kv_head*head_dim) per token
 *   hybrid:rR[:BASIS]           lowrank with int8 coefficients and scales
 *   hybrid:latent:N[:BASIS]     latent with int8 coefficients and scales
 *   BASIS: orthogonal (default: a seeded random orthonormal basis, no
 *   calibration) or pca (from the calibration file, `calib`). With pca the
 *   rank may be left out (lowrank:pca, latent:pca, hybrid:pca,
 *   hybrid:latent:pca): each layer then takes the rank the file chose for it;
 *   or given as eP in place of rR / N (lowrank:e95:pca, latent:e99:pca): each
 *   layer takes the smallest rank keeping P% of its variance by the file's
 *   eigenvalues (per head: the largest over the layer's kv heads).
 *   A low-rank spec may then end in :int4[:g64]: the coefficients stored as
 *   int4:token, or :int4:channel: as int4:channel, one scale and minimum
 *   per coefficient over a block's tokens, which suits pca coefficients of
 *   very different sizes (lowrank:r64:int4 is a random rotation before int4, which
 *   spreads outlier channels over all numbers of a group).
 *   A K spec may end in :prerope: keys are cached before RoPE (pca bases from
 *   the file's pre-RoPE key statistics) and attention rotates them; the caller
 *   then writes unrotated keys and passes RoPE tables to kvc_attend_rope.
 *
 * Sequences own block tables of int32 page ids; pages are reference-counted so
 * sequences can share a prefix (fork), and a shared page is copied before it is
 * written (copy-on-write).
 *
 * The cache knows nothing of models or scheduling: it is given dimensions and
 * codec specs. Threading: a pool is used by one thread at a time (the engine
 * thread), except kvc_write, kvc_read and kvc_attend, which may run concurrently
 * on different (sequence, layer, kv_head) units once pages are reserved (a
 * latent codec's unit for kvc_write is (sequence, layer)). */
#ifndef KVC_KVCACHE_H
#define KVC_KVCACHE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {   /* the CUDA sources (cache/cuda/) are C++ */
#endif

typedef struct kvc_pool kvc_pool;

typedef struct {
    int n_layer;             /* 1..4096 */
    int n_kv_head;           /* 1..4096 */
    int head_dim;            /* 1..1024 */
    int block_size;          /* tokens per page, 1..1024; default 16 (0 is an error) */
    size_t memory_bytes;     /* arena size; whole pages are cut from it */
    const char *k_codec;     /* codec spec for keys (see above) */
    const char *v_codec;     /* codec spec for values */
    const char *calib;       /* calibration file for pca bases (kvserve calibrate), or NULL */
    int force_scalar;        /* 1: portable kernels even where AVX2 is available,
                              * 2: AVX2 kernels even where AVX-512 is (tests,
                              * comparisons); 0: choose at run time */
    int prefault;            /* 1: back the arena's first GiB with memory at
                              * creation (at most half the memory available then;
                              * a daemon: no page faults while serving); 0: all
                              * on first use */
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

/* The codec specs kvc_config accepts, comma-separated, for messages. */
const char *kvc_codec_specs(void);

/* Creates a pool. Returns KVC_OK, or an error with a message naming the bad
 * field, codec spec or calibration file in err ("kvc: block_size 0: must be
 * 1..1024"). A calibration file that does not match the dimensions is refused. */
int kvc_pool_create(const kvc_config *cfg, kvc_pool **out, char *err, size_t errlen);

/* The kernels of pools whose config says force_scalar 0 (run-time choice):
 * 0 the best this CPU has, 1 portable, 2 AVX2 even where AVX-512 is. For
 * comparisons (KVSERVE_ISA); set it before creating pools. */
void kvc_set_default_kernels(int force_scalar);
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

/* For a backend that keeps the page bytes elsewhere (a GPU arena, see
 * cache/cuda/kvc_cuda.h) and writes them itself: makes the pages holding
 * positions [pos, pos + n) of seq its own, copying any still shared with
 * another sequence as kvc_write would (the table changes; the copy goes
 * through the page copier below). KVC_OK, or KVC_ERR_FULL when a copy finds
 * no free page (pages before it are done). */
int kvc_seq_prepare_write(kvc_pool *pool, kvc_seq *seq, int pos, int n);
/* Where copy-on-write copies a page: copy(ctx, dst, src) replaces the copy of
 * the pool's own arena (NULL: back to the arena). The copier runs on the
 * thread that reserves or writes. */
void kvc_pool_set_page_copier(kvc_pool *pool, void (*copy)(void *ctx, int32_t dst, int32_t src), void *ctx);

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
 * preferred; its size does not depend on n_ctx. Each K and V block is read
 * once per call for up to 16 query rows (query token, head) together: a
 * decode step reads the cache once per kv head. With a latent codec every kv
 * head reads the layer's one latent block, each through its own slice of the
 * basis. Keys cached before RoPE (kvc_keys_pre_rope) need kvc_attend_rope. */
void kvc_attend(const kvc_pool *pool, const kvc_seq *seq, int layer, int kv_head,
                const float *q, int64_t q_stride, int n_q, int n_rep, int pos0, float scale,
                float *out, int64_t out_stride, float *scratch);
size_t kvc_attend_scratch_floats(const kvc_pool *pool, int n_ctx, int n_rep);

/* RoPE as the caller applies it to queries, for keys cached before RoPE:
 * position p's pair i (i < rope_dim / 2) turns by the angle whose cosine and
 * sine are cos[p * (rope_dim / 2) + i], sin[...]; the pair is (2i, 2i + 1),
 * or (i, i + rope_dim / 2) when neox. Dimensions past rope_dim are not turned. */
typedef struct {
    int rope_dim;            /* even, <= head_dim */
    int neox;
    const float *cos, *sin;  /* (n_pos, rope_dim / 2) */
    int n_pos;               /* positions the tables cover (> every cached position) */
} kvc_rope;

/* 1 when the K codec caches keys before RoPE: the caller writes K unrotated
 * and attends with kvc_attend_rope. */
int kvc_keys_pre_rope(const kvc_pool *pool);

/* kvc_attend, rotating cached keys by their positions first when they are
 * cached before RoPE (rope must then be given; it is ignored otherwise). The
 * keys of one block are decoded, rotated and scored from an f32 tile in
 * scratch, shared by up to min(n_rep, 16) x 16 query rows: pre-RoPE low-rank
 * keys cost head_dim * R per cached token and kv head for each such group of
 * rows instead of R per query row, the price of their better rank (a decode
 * step pays it once per kv head). */
void kvc_attend_rope(const kvc_pool *pool, const kvc_seq *seq, int layer, int kv_head,
                     const float *q, int64_t q_stride, int n_q, int n_rep, int pos0, float scale,
                     float *out, int64_t out_stride, float *scratch, const kvc_rope *rope);

/* ---- absorbed projections -------------------------------------------------
 * A transform codec stores c = P^T (x - mean) per group. With x = W h + b
 * (the K or V projection of the layer input h), c = (P^T W) h + P^T (b - mean):
 * a caller may fold P into its projection weights once and compute c directly
 * (fewer rows than W), then hand c to kvc_write_ex. Pre-RoPE keys only: RoPE
 * does not commute with P. */
typedef struct {
    int n_groups;            /* blocks per layer: n_kv_head, or 1 for a latent */
    int in_dim;              /* head_dim, or n_kv_head * head_dim for a latent */
    int rank;                /* coefficients per token per group in this layer */
    const float *basis;      /* (in_dim, rank) row-major, orthonormal columns */
    const float *mean;       /* (in_dim), or NULL for zero */
} kvc_basis;

/* The basis of `group` in `layer` for keys (v == 0) or values (v == 1).
 * KVC_OK, or KVC_ERR_INVAL when that codec has no transform. The pointers
 * live as long as the pool. */
int kvc_get_basis(const kvc_pool *pool, int v, int layer, int group, kvc_basis *out);

/* kvc_write with separate strides, where k (k_coef = 1) or v (v_coef = 1)
 * may be given as coefficients: token t's n_groups * rank floats at
 * k + t * k_stride (group g's at g * rank). Coefficients of a codec without a
 * transform are an invariant error. */
int kvc_write_ex(kvc_pool *pool, kvc_seq *seq, int layer, int pos, int n,
                 const float *k, int64_t k_stride, int k_coef,
                 const float *v, int64_t v_stride, int v_coef);

/* ---- calibration (calib.c) -------------------------------------------------
 * `kvserve calibrate` collects K and V vectors of real text, fits PCA bases and
 * writes them to a calibration file that pca codecs read.
 *
 * File format, version 1, little-endian, no padding:
 *   char magic[8] = "KVCCALIB"; u32 version = 1;
 *   u32 n_layer, n_kv_head, head_dim;   the cache shape it fits (checked on load)
 *   u32 n_sets; u64 n_tokens;           sets that follow; tokens the statistics saw
 *   char model[64];                     NUL-padded model name (informational)
 *   n_sets times:
 *     u32 kind (0 keys after RoPE, 1 values, 2 keys before RoPE); u32 0;
 *     u32 rank_head[n_layer]            ranks chosen per layer (--rank, or --energy):
 *     u32 rank_latent[n_layer]          for lowrank:pca / hybrid:pca, and latent:pca
 *     per layer:
 *       per kv head h:  f32 mean[D]; f32 eigenvalue[D]; f32 component[D][D]
 *       cross-head:     f32 mean[HD]; f32 eigenvalue[HD]; f32 component[HD][HD]
 *       (HD = n_kv_head * D; components are unit rows, by decreasing eigenvalue:
 *       the covariance's eigenvectors, so the first R span the best R-dim subspace) */
enum { KVC_CALIB_K = 0, KVC_CALIB_V = 1, KVC_CALIB_K_PRE_ROPE = 2, KVC_CALIB_SETS = 3 };
#define KVC_CALIB_VERSION 1

typedef struct kvc_calib_fit kvc_calib_fit;

/* Statistics for a cache of this shape (NULL when out of memory, or when
 * n_kv_head * head_dim exceeds 8192). */
kvc_calib_fit *kvc_calib_fit_create(int n_layer, int n_kv_head, int head_dim);
void kvc_calib_fit_destroy(kvc_calib_fit *fit);
/* Adds n vectors of one set and layer: x (n, n_kv_head * head_dim), x_stride
 * floats between tokens. Vectors with a NaN or infinity are an invariant error. */
void kvc_calib_fit_add(kvc_calib_fit *fit, int set, int layer, const float *x, int n, int64_t x_stride);
/* kvc_calib_fit_add with every vector counted `weight` (> 0) times in the
 * means and covariances (kvserve calibrate weights the first token of each
 * window, the attention sink that most queries attend to: see cmd_calibrate.c). */
void kvc_calib_fit_add_weighted(kvc_calib_fit *fit, int set, int layer, const float *x, int n, int64_t x_stride,
                                double weight);

typedef struct {
    int rank;                /* > 0: every layer's per-head rank (latent: rank * n_kv_head) */
    double energy;           /* else: the smallest rank keeping this share of the variance, per layer */
    const char *model;       /* name written into the file */
    void (*progress)(void *ctx, int layer, int n_layer);   /* optional, per layer fitted */
    void *progress_ctx;
} kvc_calib_opts;

/* Fits PCA per layer for every set that received vectors (per kv head and
 * across heads) and writes the file. KVC_OK, or an error with a message. */
int kvc_calib_fit_write(kvc_calib_fit *fit, const kvc_calib_opts *opts, const char *path,
                        char *err, size_t errlen);

/* Symmetric eigen-decomposition (exposed for tests): a (n, n) row-major,
 * destroyed; eigenvalues descending into w (n), unit eigenvectors as the rows
 * of vecs (n, n). Returns 0, or -1 when the iteration does not converge. */
int kvc_sym_eigen(double *a, int n, double *w, double *vecs);

#ifdef __cplusplus
}
#endif

#endif
