/* pool.c: the page pool: config validation, the arena, the free list, page
 * reference counts, block tables (reserve / release / fork with copy-on-write)
 * and accounting; kvc_write and kvc_read, which encode into / decode from the
 * pages through the codecs.
 *
 * Free pages sit on a stack of ids (O(1) alloc and free). A page's refcount is
 * the number of block-table entries holding it; 0 means it is on the stack.
 * The engine thread does all table changes, except the copy-on-write fallback
 * in kvc_write, which runs under cow_lock with atomic refcount and table
 * accesses so writes of different units may run concurrently. */
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cache/calib.h"
#include "cache/pool_internal.h"

#define PREFAULT_MAX ((size_t)1 << 30)

const char *kvc_strerror(int code) {
    switch (code) {
    case KVC_OK: return "ok";
    case KVC_ERR_NOMEM: return "out of memory";
    case KVC_ERR_INVAL: return "invalid argument";
    case KVC_ERR_FULL: return "KV cache full";
    default: return "unknown error";
    }
}

const char *kvc_codec_specs(void) { return kvc__codec_specs(); }

static int check_range(const char *field, int v, int lo, int hi, char *err, size_t errlen) {
    if (v >= lo && v <= hi) return 0;
    snprintf(err, errlen, "kvc: %s %d: must be %d..%d", field, v, lo, hi);
    return -1;
}

static _Atomic int default_kernels;   /* kvc_set_default_kernels */

void kvc_set_default_kernels(int force_scalar) {
    default_kernels = force_scalar >= 0 && force_scalar <= 2 ? force_scalar : 0;
}

int kvc_pool_create(const kvc_config *cfg, kvc_pool **out, char *err, size_t errlen) {
    *out = NULL;
    if (check_range("n_layer", cfg->n_layer, 1, 4096, err, errlen) ||
        check_range("n_kv_head", cfg->n_kv_head, 1, 4096, err, errlen) ||
        check_range("head_dim", cfg->head_dim, 1, 1024, err, errlen) ||
        check_range("block_size", cfg->block_size, 1, 1024, err, errlen))
        return KVC_ERR_INVAL;
    if (cfg->force_scalar < 0 || cfg->force_scalar > 2) {
        snprintf(err, errlen, "kvc: force_scalar %d: must be 0, 1 or 2", cfg->force_scalar);
        return KVC_ERR_INVAL;
    }
    const int kernels = cfg->force_scalar ? cfg->force_scalar : default_kernels;
    kvc_pool *p = calloc(1, sizeof *p);
    if (!p) {
        snprintf(err, errlen, "kvc: out of memory for the pool");
        return KVC_ERR_NOMEM;
    }
    p->n_layer = cfg->n_layer;
    p->n_kv_head = cfg->n_kv_head;
    p->head_dim = cfg->head_dim;
    p->block_size = cfg->block_size;
    /* A calibration file is read only when a codec asks for a pca basis. */
    kvc__calib *calib = NULL;
    int need_k = kvc__codec_needs_calib(cfg->k_codec), need_v = kvc__codec_needs_calib(cfg->v_codec);
    if ((need_k == 1 || need_v == 1) && cfg->calib) {
        int rc = kvc__calib_load(cfg->calib, cfg->n_layer, cfg->n_kv_head, cfg->head_dim, &calib, err, errlen);
        if (rc != KVC_OK) {
            free(p);
            return rc;
        }
    }
    int bad = kvc__codec_init(&p->kc, cfg->k_codec, "k_codec", KVC__ROLE_K, cfg->n_layer, cfg->n_kv_head,
                              cfg->head_dim, cfg->block_size, kernels, calib, cfg->calib, err, errlen) ||
              kvc__codec_init(&p->vc, cfg->v_codec, "v_codec", KVC__ROLE_V, cfg->n_layer, cfg->n_kv_head,
                              cfg->head_dim, cfg->block_size, kernels, calib, cfg->calib, err, errlen);
    kvc__calib_free(calib);
    p->layer_off = calloc((size_t)p->n_layer, sizeof *p->layer_off);
    p->k_region = calloc((size_t)p->n_layer, sizeof *p->k_region);
    if (bad || !p->layer_off || !p->k_region) {
        if (!bad) snprintf(err, errlen, "kvc: out of memory for the pool");
        kvc__codec_free(&p->kc);
        kvc__codec_free(&p->vc);
        free(p->layer_off), free(p->k_region), free(p);
        return bad ? KVC_ERR_INVAL : KVC_ERR_NOMEM;
    }
    /* Blocks are < 2^32 bytes and counts <= 4096, so these fit in size_t. */
    for (int l = 0; l < p->n_layer; l++) {
        p->layer_off[l] = p->page_bytes;
        p->k_region[l] = (size_t)p->kc.n_groups * p->kc.block_bytes[l];
        p->page_bytes += p->k_region[l] + (size_t)p->vc.n_groups * p->vc.block_bytes[l];
    }
    size_t n_pages = cfg->memory_bytes / p->page_bytes;
    if (n_pages == 0) {
        snprintf(err, errlen,
                 "kvc: memory_bytes %zu: less than one page (%zu bytes: block_size %d x %d layers, "
                 "%s K / %s V)", cfg->memory_bytes, p->page_bytes, p->block_size, p->n_layer,
                 p->kc.name, p->vc.name);
        kvc_pool_destroy(p);
        return KVC_ERR_INVAL;
    }
    if (n_pages > INT32_MAX - 1) n_pages = INT32_MAX - 1;
    p->n_pages = (int)n_pages;
    p->arena_bytes = n_pages * p->page_bytes;
    void *arena = mmap(NULL, p->arena_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    p->refcount = calloc(n_pages, sizeof *p->refcount);
    p->free_stack = malloc(n_pages * sizeof *p->free_stack);
    if (arena == MAP_FAILED || !p->refcount || !p->free_stack) {
        snprintf(err, errlen, "kvc: memory_bytes %zu: cannot allocate %d pages: %s", cfg->memory_bytes,
                 p->n_pages, arena == MAP_FAILED ? strerror(errno) : "out of memory");
        if (arena != MAP_FAILED) munmap(arena, p->arena_bytes);
        p->arena_bytes = 0;
        kvc_pool_destroy(p);
        return KVC_ERR_NOMEM;
    }
    p->arena = arena;
    /* Decode walks scattered pages of every layer: huge pages cut TLB misses. */
    madvise(arena, p->arena_bytes, MADV_HUGEPAGE);
    if (cfg->prefault) {
        /* a write per 4 KB (the zero-fill the kernel would do at first use,
         * now rather than inside a decode step) over the first pages handed
         * out (low ids go first), up to PREFAULT_MAX (about 0.5 s per GiB
         * here) and half the memory available: an arena larger than the
         * machine (a GPU profile's size on the CPU backend) keeps faulting
         * lazily instead of being killed at start-up */
        const long avail = sysconf(_SC_AVPHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
        size_t n = p->arena_bytes < PREFAULT_MAX ? p->arena_bytes : PREFAULT_MAX;
        if (avail > 0 && psize > 0 && n > (size_t)avail / 2 * (size_t)psize)
            n = (size_t)avail / 2 * (size_t)psize;
        for (size_t off = 0; off < n; off += 4096)
            ((volatile unsigned char *)arena)[off] = 0;
    }
    /* Hand out low ids first: pop from the end. */
    for (int i = 0; i < p->n_pages; i++) p->free_stack[i] = p->n_pages - 1 - i;
    p->n_free = p->n_pages;
    pthread_mutex_init(&p->cow_lock, NULL);
    p->softmax = kernels != 1 && kvc__have_avx2() ? kvc__softmax_avx2 : kvc__softmax_scalar;
    p->ready = 1;
    *out = p;
    return KVC_OK;
}

void kvc_pool_destroy(kvc_pool *pool) {
    if (!pool) return;
    if (pool->arena_bytes) munmap(pool->arena, pool->arena_bytes);
    free(pool->refcount);
    free(pool->free_stack);
    if (pool->ready) pthread_mutex_destroy(&pool->cow_lock);
    kvc__codec_free(&pool->kc);
    kvc__codec_free(&pool->vc);
    free(pool->layer_off);
    free(pool->k_region);
    free(pool);
}

/* ---- accounting ---------------------------------------------------------- */

int kvc_pages_total(const kvc_pool *pool) { return pool->n_pages; }
int kvc_pages_free(const kvc_pool *pool) { return pool->n_free; }
int kvc_block_size(const kvc_pool *pool) { return pool->block_size; }
size_t kvc_page_bytes(const kvc_pool *pool) { return pool->page_bytes; }
size_t kvc_bytes_per_token(const kvc_pool *pool) { return pool->page_bytes / (size_t)pool->block_size; }
int64_t kvc_tokens_cached(const kvc_pool *pool) { return pool->tokens_cached; }
const char *kvc_k_codec(const kvc_pool *pool) { return pool->kc.name; }
const char *kvc_v_codec(const kvc_pool *pool) { return pool->vc.name; }
int kvc_keys_pre_rope(const kvc_pool *pool) { return pool->kc.pre_rope; }

int kvc_get_basis(const kvc_pool *pool, int v, int layer, int group, kvc_basis *out) {
    const kvc__codec *c = v ? &pool->vc : &pool->kc;
    KVC__CHECK(layer >= 0 && layer < pool->n_layer && group >= 0 && group < c->n_groups, "layer %d group %d",
               layer, group);
    if (c->shape == KVC__PLAIN) return KVC_ERR_INVAL;
    size_t i = (size_t)layer * c->n_groups + group;
    *out = (kvc_basis){.n_groups = c->n_groups, .in_dim = c->in_dim, .rank = c->dim[layer],
                       .basis = c->basis[i], .mean = c->mean[i]};
    return KVC_OK;
}

int kvc_capacity_sequences(const kvc_pool *pool, int ctx_len) {
    if (ctx_len <= 0) return 0;
    int pages_per_seq = (ctx_len - 1) / pool->block_size + 1;
    return pool->n_pages / pages_per_seq;
}

double kvc_compression_ratio(const kvc_pool *pool) {
    double f16_bytes = 2.0 * 2.0 * pool->n_layer * pool->n_kv_head * pool->head_dim;
    return f16_bytes / (double)pool->page_bytes * pool->block_size;
}

int kvc_page_refcount(const kvc_pool *pool, int32_t page) {
    KVC__CHECK(page >= 0 && page < pool->n_pages, "page %d of %d", page, pool->n_pages);
    return __atomic_load_n(&pool->refcount[page], __ATOMIC_ACQUIRE);
}

int kvc_pool_validate(const kvc_pool *pool, char *err, size_t errlen) {
    int rc = KVC_ERR_INVAL;
    if (pool->n_free < 0 || pool->n_free > pool->n_pages) {
        snprintf(err, errlen, "kvc: n_free %d outside 0..%d", pool->n_free, pool->n_pages);
        return rc;
    }
    unsigned char *seen = calloc((size_t)pool->n_pages, 1);
    if (!seen) {
        snprintf(err, errlen, "kvc: out of memory");
        return KVC_ERR_NOMEM;
    }
    for (int i = 0; i < pool->n_free; i++) {
        int32_t id = pool->free_stack[i];
        if (id < 0 || id >= pool->n_pages) {
            snprintf(err, errlen, "kvc: free list entry %d: page %d out of range", i, id);
            goto out;
        }
        if (seen[id]++) {
            snprintf(err, errlen, "kvc: page %d twice on the free list", id);
            goto out;
        }
        if (pool->refcount[id] != 0) {
            snprintf(err, errlen, "kvc: free page %d has refcount %d", id, pool->refcount[id]);
            goto out;
        }
    }
    for (int id = 0; id < pool->n_pages; id++) {
        if (pool->refcount[id] < 0 || (pool->refcount[id] == 0 && !seen[id])) {
            snprintf(err, errlen, "kvc: page %d has refcount %d and is %son the free list", id,
                     pool->refcount[id], seen[id] ? "" : "not ");
            goto out;
        }
    }
    rc = KVC_OK;
out:
    free(seen);
    return rc;
}

/* ---- pages and block tables ---------------------------------------------- */

static int32_t page_alloc(kvc_pool *pool) {
    KVC__CHECK(pool->n_free > 0, "no free page");
    int32_t id = pool->free_stack[--pool->n_free];
    KVC__CHECK(pool->refcount[id] == 0, "free page %d has refcount %d", id, pool->refcount[id]);
    __atomic_store_n(&pool->refcount[id], 1, __ATOMIC_RELEASE);
    return id;
}

static void page_unref(kvc_pool *pool, int32_t id) {
    KVC__CHECK(id >= 0 && id < pool->n_pages, "page %d of %d", id, pool->n_pages);
    int32_t rc = __atomic_sub_fetch(&pool->refcount[id], 1, __ATOMIC_ACQ_REL);
    KVC__CHECK(rc >= 0, "page %d released more often than referenced", id);
    if (rc == 0) pool->free_stack[pool->n_free++] = id;
}

/* A private copy of shared page `old` (refcount > 1); the caller swaps it in. */
static int32_t page_copy(kvc_pool *pool, int32_t old) {
    int32_t id = page_alloc(pool);
    if (pool->copy_page) pool->copy_page(pool->copy_ctx, id, old);
    else memcpy(kvc__page(pool, id), kvc__page(pool, old), pool->page_bytes);
    page_unref(pool, old);
    return id;
}

static int table_grow(kvc_seq *seq, int n_pages) {
    if (n_pages <= seq->cap_pages) return 0;
    int cap = seq->cap_pages ? seq->cap_pages : 4;
    while (cap < n_pages) cap = cap > INT_MAX / 2 ? n_pages : cap * 2;
    int32_t *t = realloc(seq->pages, (size_t)cap * sizeof *t);
    if (!t) return -1;
    seq->pages = t;
    seq->cap_pages = cap;
    return 0;
}

int kvc_seq_reserve(kvc_pool *pool, kvc_seq *seq, int n_tokens) {
    if (n_tokens <= seq->n_tokens) return KVC_OK;
    int B = pool->block_size;
    int need = (int)(((int64_t)n_tokens + B - 1) / B);
    KVC__CHECK(seq->n_pages == (seq->n_tokens + B - 1) / B, "table of %d pages for %d tokens",
               seq->n_pages, seq->n_tokens);
    /* The first new position's page, if it exists already, may be shared. */
    int first = seq->n_tokens / B;
    bool cow = first < seq->n_pages && pool->refcount[seq->pages[first]] > 1;
    if (need - seq->n_pages + (cow ? 1 : 0) > pool->n_free) return KVC_ERR_FULL;
    if (table_grow(seq, need)) return KVC_ERR_NOMEM;
    if (cow) seq->pages[first] = page_copy(pool, seq->pages[first]);
    while (seq->n_pages < need) seq->pages[seq->n_pages++] = page_alloc(pool);
    pool->tokens_cached += n_tokens - seq->n_tokens;
    seq->n_tokens = n_tokens;
    return KVC_OK;
}

void kvc_seq_release(kvc_pool *pool, kvc_seq *seq) {
    for (int i = 0; i < seq->n_pages; i++) page_unref(pool, seq->pages[i]);
    pool->tokens_cached -= seq->n_tokens;
    free(seq->pages);
    memset(seq, 0, sizeof *seq);
}

int kvc_seq_fork(kvc_pool *pool, const kvc_seq *src, kvc_seq *dst) {
    if (dst->n_pages || dst->n_tokens || dst->pages || src == dst) return KVC_ERR_INVAL;
    if (table_grow(dst, src->n_pages)) return KVC_ERR_NOMEM;
    for (int i = 0; i < src->n_pages; i++) {
        int32_t id = src->pages[i];
        KVC__CHECK(id >= 0 && id < pool->n_pages && pool->refcount[id] > 0, "page %d", id);
        __atomic_add_fetch(&pool->refcount[id], 1, __ATOMIC_ACQ_REL);
        dst->pages[i] = id;
    }
    dst->n_pages = src->n_pages;
    dst->n_tokens = src->n_tokens;
    pool->tokens_cached += src->n_tokens;
    return KVC_OK;
}

/* ---- writing and reading ------------------------------------------------- */

/* The page holding table entry i, made private to seq first if shared.
 * Returns -1 when a copy is needed and no page is free. */
static int32_t page_for_write(kvc_pool *pool, kvc_seq *seq, int i) {
    int32_t id = __atomic_load_n(&seq->pages[i], __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&pool->refcount[id], __ATOMIC_ACQUIRE) == 1) return id;
    pthread_mutex_lock(&pool->cow_lock);
    id = __atomic_load_n(&seq->pages[i], __ATOMIC_ACQUIRE);
    if (__atomic_load_n(&pool->refcount[id], __ATOMIC_ACQUIRE) > 1) {
        if (pool->n_free == 0) {
            id = -1;
        } else {
            id = page_copy(pool, id);
            __atomic_store_n(&seq->pages[i], id, __ATOMIC_RELEASE);
        }
    }
    pthread_mutex_unlock(&pool->cow_lock);
    return id;
}

int kvc_seq_prepare_write(kvc_pool *pool, kvc_seq *seq, int pos, int n) {
    KVC__CHECK(pos >= 0 && n >= 0 && pos + n <= seq->n_tokens,
               "write [%d, %d) beyond the %d reserved positions", pos, pos + n, seq->n_tokens);
    const int B = pool->block_size;
    for (int i = n ? pos / B : 0, end = n ? (pos + n - 1) / B : -1; i <= end; i++)
        if (page_for_write(pool, seq, i) < 0) return KVC_ERR_FULL;
    return KVC_OK;
}

void kvc_pool_set_page_copier(kvc_pool *pool, void (*copy)(void *ctx, int32_t dst, int32_t src), void *ctx) {
    pool->copy_page = copy;
    pool->copy_ctx = ctx;
}

/* Encodes n tokens of one role into a page: x as kvc_write_ex takes it. */
static void encode_tokens(const kvc_pool *pool, const kvc__codec *c, int32_t page, int layer, int slot, int n,
                          const float *x, int64_t stride, int coef) {
    const int B = pool->block_size;
    for (int g = 0; g < c->n_groups; g++) {
        uint8_t *blk = c->role == KVC__ROLE_K ? kvc__k_block(pool, page, layer, g) : kvc__v_block(pool, page, layer, g);
        if (coef) c->kern.encode(blk, B, c->dim[layer], slot, n, x + (size_t)g * c->dim[layer], stride);
        else kvc__codec_encode(c, layer, g, blk, slot, n, x + (size_t)g * c->in_dim, stride);
    }
}

int kvc_write_ex(kvc_pool *pool, kvc_seq *seq, int layer, int pos, int n,
                 const float *k, int64_t k_stride, int k_coef,
                 const float *v, int64_t v_stride, int v_coef) {
    KVC__CHECK(layer >= 0 && layer < pool->n_layer, "layer %d of %d", layer, pool->n_layer);
    KVC__CHECK(pos >= 0 && n >= 0 && pos + n <= seq->n_tokens,
               "write [%d, %d) beyond the %d reserved positions", pos, pos + n, seq->n_tokens);
    KVC__CHECK((!k_coef || pool->kc.shape != KVC__PLAIN) && (!v_coef || pool->vc.shape != KVC__PLAIN),
               "coefficients for a codec without a transform (%s / %s)", pool->kc.name, pool->vc.name);
    const int B = pool->block_size;
    for (int t = 0; t < n;) {
        int idx = (pos + t) / B;
        int32_t id = page_for_write(pool, seq, idx);
        if (id < 0) return KVC_ERR_FULL;
        int end = (idx + 1) * B - pos;          /* tokens of this call in this page */
        if (end > n) end = n;
        int slot = (pos + t) % B;
        encode_tokens(pool, &pool->kc, id, layer, slot, end - t, k + t * k_stride, k_stride, k_coef);
        encode_tokens(pool, &pool->vc, id, layer, slot, end - t, v + t * v_stride, v_stride, v_coef);
        t = end;
    }
    return KVC_OK;
}

int kvc_write(kvc_pool *pool, kvc_seq *seq, int layer, int pos, int n,
              const float *k, const float *v, int64_t kv_stride) {
    return kvc_write_ex(pool, seq, layer, pos, n, k, kv_stride, 0, v, kv_stride, 0);
}

void kvc_read(const kvc_pool *pool, const kvc_seq *seq, int layer, int pos, int n,
              float *k, float *v, int64_t kv_stride) {
    KVC__CHECK(layer >= 0 && layer < pool->n_layer, "layer %d of %d", layer, pool->n_layer);
    KVC__CHECK(pos >= 0 && n >= 0 && pos + n <= seq->n_tokens,
               "read [%d, %d) beyond the %d reserved positions", pos, pos + n, seq->n_tokens);
    int B = pool->block_size, H = pool->n_kv_head, D = pool->head_dim;
    for (int t = 0; t < n; t++) {
        int32_t id = __atomic_load_n(&seq->pages[(pos + t) / B], __ATOMIC_ACQUIRE);
        int slot = (pos + t) % B;
        for (int h = 0; h < H; h++) {
            if (k) kvc__codec_decode_head(&pool->kc, layer, h, kvc__k_block(pool, id, layer, kvc__codec_group(&pool->kc, h)),
                                          slot, k + (int64_t)t * kv_stride + (size_t)h * D);
            if (v) kvc__codec_decode_head(&pool->vc, layer, h, kvc__v_block(pool, id, layer, kvc__codec_group(&pool->vc, h)),
                                          slot, v + (int64_t)t * kv_stride + (size_t)h * D);
        }
    }
}
