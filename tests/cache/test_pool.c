/* test_pool.c: the page pool against a shadow model. 100,000 random
 * new / append / fork / rewrite / free operations; after each one the pool's
 * free count, reference counts and tokens cached must equal what the shadow
 * block tables imply, tables must never hold a page twice, and every sequence
 * that shared a page with a written one must still read back its own
 * contents (copy-on-write). Also: config validation messages, accounting,
 * capacity, concurrent kvc_write copy-on-write, the copy-on-write of a
 * backend that keeps the bytes elsewhere (kvc_seq_prepare_write and the page
 * copier), and broken invariants (a corrupt free list, a double free) being
 * caught. */
#include <criterion/criterion.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cache/kvcache.h"
#include "cache/pool_internal.h"     /* to corrupt a pool on purpose */

/* ---- config validation and accounting ------------------------------------ */

static kvc_config base_config(void) {
    kvc_config c = {.n_layer = 30, .n_kv_head = 3, .head_dim = 64, .block_size = 16,
                    .memory_bytes = 64u << 20, .k_codec = "f16", .v_codec = "f16"};
    return c;
}

static void expect_error(kvc_config c, const char *needle) {
    kvc_pool *pool = (kvc_pool *)1;
    char err[256] = "";
    int rc = kvc_pool_create(&c, &pool, err, sizeof err);
    cr_expect_eq(rc, KVC_ERR_INVAL, "expected an error mentioning '%s', got %d", needle, rc);
    cr_expect_null(pool);
    cr_expect(strstr(err, needle) != NULL, "message '%s' lacks '%s'", err, needle);
}

Test(pool, config_errors_name_the_field) {
    kvc_config c = base_config();
    c.block_size = 0;
    expect_error(c, "kvc: block_size 0: must be 1..1024");
    c = base_config(), c.block_size = 2048, expect_error(c, "block_size 2048");
    c = base_config(), c.n_layer = 0, expect_error(c, "n_layer 0");
    c = base_config(), c.n_kv_head = -1, expect_error(c, "n_kv_head -1");
    c = base_config(), c.head_dim = 0, expect_error(c, "head_dim 0");
    c = base_config(), c.force_scalar = 3, expect_error(c, "force_scalar 3");
    c = base_config(), c.k_codec = "int3";
    expect_error(c, "k_codec \"int3\": unknown codec; valid: f32, f16, int8, int4, int4:token, int4:channel");
    c = base_config(), c.v_codec = "F16", expect_error(c, "v_codec \"F16\"");
    c = base_config(), c.v_codec = NULL, expect_error(c, "v_codec missing");
    c = base_config(), c.memory_bytes = 1000, expect_error(c, "memory_bytes 1000: less than one page");
    cr_expect(strstr(kvc_codec_specs(), "hybrid:latent:N") != NULL, "%s", kvc_codec_specs());
}

Test(pool, accounting) {
    kvc_config c = base_config();
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    /* SmolLM2-135M: 30 layers x 3 kv heads x 64 dims x (K, V) x 2 bytes */
    cr_expect_eq(kvc_bytes_per_token(pool), 23040u);
    cr_expect_eq(kvc_page_bytes(pool), 23040u * 16);
    cr_expect_eq(kvc_pages_total(pool), (int)((64u << 20) / (23040u * 16)));     /* 182 */
    cr_expect_eq(kvc_pages_free(pool), kvc_pages_total(pool));
    cr_expect_eq(kvc_block_size(pool), 16);
    cr_expect_eq(kvc_capacity_sequences(pool, 2048), 182 / 128);
    cr_expect_eq(kvc_capacity_sequences(pool, 17), 182 / 2);
    cr_expect_eq(kvc_capacity_sequences(pool, 16), 182);
    cr_expect_eq(kvc_capacity_sequences(pool, 0), 0);
    cr_expect_float_eq(kvc_compression_ratio(pool), 1.0, 1e-12);
    cr_expect_str_eq(kvc_k_codec(pool), "f16");
    kvc_seq a = {0}, b = {0};
    cr_expect_eq(kvc_seq_reserve(pool, &a, 20), KVC_OK);
    cr_expect_eq(kvc_pages_free(pool), kvc_pages_total(pool) - 2);
    cr_expect_eq(kvc_seq_fork(pool, &a, &b), KVC_OK);
    cr_expect_eq(kvc_tokens_cached(pool), 40);
    cr_expect_eq(kvc_page_refcount(pool, a.pages[1]), 2);
    cr_expect_eq(kvc_seq_fork(pool, &a, &b), KVC_ERR_INVAL, "dst not empty");
    cr_expect_eq(kvc_seq_reserve(pool, &a, 10000), KVC_ERR_FULL);
    cr_expect_eq(a.n_tokens, 20, "a failed reserve changes nothing");
    cr_expect_eq(kvc_pages_free(pool), kvc_pages_total(pool) - 2);
    kvc_seq_release(pool, &a);
    kvc_seq_release(pool, &b);
    cr_expect_eq(kvc_tokens_cached(pool), 0);
    cr_expect_eq(kvc_pages_free(pool), kvc_pages_total(pool));
    kvc_pool_destroy(pool);

    c.k_codec = "f32", c.v_codec = "int8";
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    /* f32 K: 256 B/token/head; int8 V: 16 x 64 + 16 x 2 = 1056 B per head block
     * (a multiple of 16: no padding) = 66 B/token/head. */
    cr_expect_eq(kvc_bytes_per_token(pool), 30u * 3 * (256 + 66));
    cr_expect_float_eq(kvc_compression_ratio(pool), 256.0 / (256 + 66), 1e-12);
    kvc_pool_destroy(pool);
}

/* ---- the shadow model ---------------------------------------------------- */

enum { L = 2, H = 2, D = 4, MAX_SEQ = 16, MAX_TOK = 400 };

typedef struct {
    bool live;
    kvc_seq seq;
    float stamp[MAX_TOK];     /* what each position holds; see value() */
} shadow_seq;

typedef struct {
    kvc_pool *pool;
    int B;
    shadow_seq s[MAX_SEQ];
    uint64_t rng;
    float next_stamp;
    int n_full, n_reserve_copies, n_write_copies;   /* paths taken, so the run is known to cover them */
} model;

static uint32_t rnd(model *m, uint32_t n) {
    m->rng ^= m->rng << 13, m->rng ^= m->rng >> 7, m->rng ^= m->rng << 17;
    return (uint32_t)(m->rng % n);
}

/* Exact in f32 for stamps < 2^17. */
static float value(float stamp, int layer, int head, int d) {
    return stamp + (float)layer * 0.5f + (float)head * 0.25f + (float)d * 0.0625f;
}

static int write_tokens(model *m, shadow_seq *s, int pos, int n) {
    float buf[64 * H * D];
    cr_assert(n <= 64);
    float stamps[64];
    for (int t = 0; t < n; t++) {
        stamps[t] = m->next_stamp;
        m->next_stamp = m->next_stamp >= 100000.0f ? 1.0f : m->next_stamp + 1.0f;
    }
    for (int layer = 0; layer < L; layer++) {
        for (int t = 0; t < n; t++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < D; d++) buf[(t * H + h) * D + d] = value(stamps[t], layer, h, d);
        /* V = -K so K and V regions are told apart */
        float vbuf[64 * H * D];
        for (int i = 0; i < n * H * D; i++) vbuf[i] = -buf[i];
        int rc = kvc_write(m->pool, &s->seq, layer, pos, n, buf, vbuf, H * D);
        if (rc != KVC_OK) return rc;
    }
    for (int t = 0; t < n; t++) s->stamp[pos + t] = stamps[t];
    return KVC_OK;
}

static void check_contents(model *m, const shadow_seq *s) {
    static float k[MAX_TOK * H * D], v[MAX_TOK * H * D];
    for (int layer = 0; layer < L; layer++) {
        kvc_read(m->pool, &s->seq, layer, 0, s->seq.n_tokens, k, v, H * D);
        for (int t = 0; t < s->seq.n_tokens; t++)
            for (int h = 0; h < H; h++)
                for (int d = 0; d < D; d++) {
                    float want = value(s->stamp[t], layer, h, d);
                    float gk = k[(t * H + h) * D + d], gv = v[(t * H + h) * D + d];
                    if (gk != want || gv != -want)
                        cr_assert_fail("layer %d pos %d head %d dim %d: K %g V %g, want %g", layer, t,
                                       h, d, gk, gv, want);
                }
    }
}

static bool shares_page(const shadow_seq *a, const shadow_seq *b) {
    for (int i = 0; i < a->seq.n_pages; i++)
        for (int j = 0; j < b->seq.n_pages; j++)
            if (a->seq.pages[i] == b->seq.pages[j]) return true;
    return false;
}

/* Pool state vs. the tables. */
static void check_invariants(model *m) {
    int total = kvc_pages_total(m->pool);
    int *count = calloc((size_t)total, sizeof *count);
    int64_t tokens = 0;
    int used = 0;
    for (int i = 0; i < MAX_SEQ; i++) {
        if (!m->s[i].live) continue;
        const kvc_seq *q = &m->s[i].seq;
        cr_assert_eq(q->n_pages, (q->n_tokens + m->B - 1) / m->B, "seq %d: %d pages for %d tokens", i,
                     q->n_pages, q->n_tokens);
        tokens += q->n_tokens;
        for (int p = 0; p < q->n_pages; p++) {
            cr_assert(q->pages[p] >= 0 && q->pages[p] < total);
            for (int p2 = 0; p2 < p; p2++) cr_assert_neq(q->pages[p], q->pages[p2], "page twice in a table");
            if (count[q->pages[p]]++ == 0) used++;
        }
    }
    for (int p = 0; p < total; p++)
        cr_assert_eq(kvc_page_refcount(m->pool, p), count[p], "page %d: refcount %d, held %d times", p,
                     kvc_page_refcount(m->pool, p), count[p]);
    cr_assert_eq(kvc_pages_free(m->pool), total - used, "free %d, used %d of %d", kvc_pages_free(m->pool),
                 used, total);
    cr_assert_eq(kvc_tokens_cached(m->pool), tokens);
    free(count);
}

static int free_slot(model *m) {
    int start = (int)rnd(m, MAX_SEQ);
    for (int i = 0; i < MAX_SEQ; i++)
        if (!m->s[(start + i) % MAX_SEQ].live) return (start + i) % MAX_SEQ;
    return -1;
}

static int live_slot(model *m) {
    int start = (int)rnd(m, MAX_SEQ);
    for (int i = 0; i < MAX_SEQ; i++)
        if (m->s[(start + i) % MAX_SEQ].live) return (start + i) % MAX_SEQ;
    return -1;
}

/* Pages a reserve to n needs: new pages, plus a copy when the first new
 * position falls in an existing shared page. */
static int pages_needed(model *m, const kvc_seq *q, int n) {
    if (n <= q->n_tokens) return 0;
    int need = (n + m->B - 1) / m->B - q->n_pages;
    int first = q->n_tokens / m->B;
    if (first < q->n_pages && kvc_page_refcount(m->pool, q->pages[first]) > 1) {
        need++;
        m->n_reserve_copies++;
    }
    return need;
}

/* Reserves and writes n more tokens; returns whether it fit. */
static bool append(model *m, shadow_seq *s, int n) {
    int old = s->seq.n_tokens;
    if (old + n > MAX_TOK) n = MAX_TOK - old;
    if (n <= 0) return false;
    int need = pages_needed(m, &s->seq, old + n), free_before = kvc_pages_free(m->pool);
    int rc = kvc_seq_reserve(m->pool, &s->seq, old + n);
    if (need > free_before) {
        cr_assert_eq(rc, KVC_ERR_FULL, "reserve of %d pages with %d free", need, free_before);
        cr_assert_eq(s->seq.n_tokens, old);
        cr_assert_eq(kvc_pages_free(m->pool), free_before);
        m->n_full++;
        return false;
    }
    cr_assert_eq(rc, KVC_OK, "reserve of %d pages with %d free: %d", need, free_before, rc);
    cr_assert_eq(kvc_pages_free(m->pool), free_before - need);
    for (int pos = old; pos < old + n; pos += 64)
        cr_assert_eq(write_tokens(m, s, pos, old + n - pos < 64 ? old + n - pos : 64), KVC_OK);
    return true;
}

static void run_model(int B, int n_ops, uint64_t seed) {
    model *m = calloc(1, sizeof *m);
    m->B = B;
    m->rng = seed;
    m->next_stamp = 1.0f;
    kvc_config c = {.n_layer = L, .n_kv_head = H, .head_dim = D, .block_size = B,
                    .k_codec = "f32", .v_codec = "f32"};
    c.memory_bytes = 48 * (size_t)L * H * 2 * ((B * D * 4 + 15) / 16 * 16);      /* 48 pages */
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &m->pool, err, sizeof err), KVC_OK, "%s", err);
    cr_assert_eq(kvc_pages_total(m->pool), 48);
    int counts[6] = {0};
    for (int op = 0; op < n_ops; op++) {
        int kind = (int)rnd(m, 100);
        bool wrote_to = false;
        int touched = -1;
        bool shared_before[MAX_SEQ] = {false};
        if (kind < 15) {                                   /* new sequence */
            int i = free_slot(m);
            if (i < 0) continue;
            shadow_seq *s = &m->s[i];
            memset(&s->seq, 0, sizeof s->seq);
            s->live = true;
            if (!append(m, s, 1 + (int)rnd(m, 3 * B))) {
                kvc_seq_release(m->pool, &s->seq);
                s->live = false;
            }
            touched = s->live ? i : -1;
            counts[0]++;
        } else if (kind < 55) {                            /* append (decode or a chunk) */
            int i = live_slot(m);
            if (i < 0) continue;
            for (int j = 0; j < MAX_SEQ; j++) shared_before[j] = m->s[j].live && shares_page(&m->s[i], &m->s[j]);
            append(m, &m->s[i], rnd(m, 4) ? 1 : 1 + (int)rnd(m, 2 * B));
            touched = i, wrote_to = true;
            counts[1]++;
        } else if (kind < 70) {                            /* fork */
            int src = live_slot(m), dst = free_slot(m);
            if (src < 0 || dst < 0) continue;
            memset(&m->s[dst].seq, 0, sizeof m->s[dst].seq);
            cr_assert_eq(kvc_seq_fork(m->pool, &m->s[src].seq, &m->s[dst].seq), KVC_OK);
            memcpy(m->s[dst].stamp, m->s[src].stamp, sizeof m->s[src].stamp);
            m->s[dst].live = true;
            touched = dst;
            counts[2]++;
        } else if (kind < 80) {                            /* rewrite a cached position */
            int i = live_slot(m);
            if (i < 0 || m->s[i].seq.n_tokens == 0) continue;
            shadow_seq *s = &m->s[i];
            int pos = (int)rnd(m, (uint32_t)s->seq.n_tokens);
            int32_t page = s->seq.pages[pos / B];
            bool needs_copy = kvc_page_refcount(m->pool, page) > 1;
            for (int j = 0; j < MAX_SEQ; j++) shared_before[j] = m->s[j].live && shares_page(s, &m->s[j]);
            int free_before = kvc_pages_free(m->pool);
            int rc = write_tokens(m, s, pos, 1);
            if (needs_copy && free_before == 0) {
                cr_assert_eq(rc, KVC_ERR_FULL);
            } else {
                cr_assert_eq(rc, KVC_OK);
                if (needs_copy) {
                    cr_assert_neq(s->seq.pages[pos / B], page, "shared page written in place");
                    m->n_write_copies++;
                }
            }
            touched = i, wrote_to = true;
            counts[3]++;
        } else {                                           /* free */
            int i = live_slot(m);
            if (i < 0) continue;
            kvc_seq_release(m->pool, &m->s[i].seq);
            cr_assert_null(m->s[i].seq.pages);
            m->s[i].live = false;
            counts[4]++;
        }
        check_invariants(m);
        if (touched >= 0) check_contents(m, &m->s[touched]);
        if (wrote_to)
            for (int j = 0; j < MAX_SEQ; j++)
                if (shared_before[j] && m->s[j].live) check_contents(m, &m->s[j]);
        if (op % 5000 == 0) {
            cr_assert_eq(kvc_pool_validate(m->pool, err, sizeof err), KVC_OK, "op %d: %s", op, err);
            for (int j = 0; j < MAX_SEQ; j++)
                if (m->s[j].live) check_contents(m, &m->s[j]);
        }
    }
    for (int i = 0; i < 5; i++) cr_expect_gt(counts[i], n_ops / 50, "operation %d ran %d times", i, counts[i]);
    cr_expect_gt(m->n_full, n_ops / 1000, "pool full %d times", m->n_full);
    if (B > 1)      /* with one token a page, no page is ever partial */
        cr_expect_gt(m->n_reserve_copies, n_ops / 1000, "%d copies on reserve", m->n_reserve_copies);
    cr_expect_gt(m->n_write_copies, n_ops / 1000, "%d copies on write", m->n_write_copies);
    for (int j = 0; j < MAX_SEQ; j++)
        if (m->s[j].live) {
            check_contents(m, &m->s[j]);
            kvc_seq_release(m->pool, &m->s[j].seq);
        }
    cr_assert_eq(kvc_pages_free(m->pool), 48, "pages leaked");
    cr_assert_eq(kvc_tokens_cached(m->pool), 0);
    cr_assert_eq(kvc_pool_validate(m->pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_pool_destroy(m->pool);
    free(m);
}

Test(pool, shadow_model_block4) { run_model(4, 100000, 0x1234567u); }
Test(pool, shadow_model_block1_and_16) {
    run_model(1, 20000, 0xabcdefu);
    run_model(16, 20000, 0x777u);
}

/* ---- layout: layers, heads, K and V are separate --------------------------- */

Test(pool, regions_do_not_overlap) {
    kvc_config c = {.n_layer = 3, .n_kv_head = 3, .head_dim = 5, .block_size = 3,
                    .memory_bytes = 1 << 20, .k_codec = "f16", .v_codec = "int8"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, 7), KVC_OK);
    float k[7 * 15], v[7 * 15], rk[7 * 15], rv[7 * 15];
    for (int layer = 0; layer < 3; layer++) {
        for (int i = 0; i < 7 * 15; i++) k[i] = (float)(layer * 1000 + i), v[i] = -(float)(layer * 1000 + i) / 8;
        cr_assert_eq(kvc_write(pool, &s, layer, 0, 7, k, v, 15), KVC_OK);
    }
    for (int layer = 0; layer < 3; layer++) {
        kvc_read(pool, &s, layer, 0, 7, rk, rv, 15);
        for (int i = 0; i < 7 * 15; i++) {
            float want = (float)(layer * 1000 + i);
            /* f16 keeps 11 significant bits; int8 a 1/127 step of the token-head max */
            cr_expect(fabsf(rk[i] - want) <= want / 1024.0f, "layer %d K[%d] = %g, want %g", layer, i, rk[i], want);
            cr_expect(fabsf(rv[i] + want / 8) <= (layer * 1000 + 105) / 8.0f / 127.0f, "layer %d V[%d] = %g",
                      layer, i, rv[i]);
        }
    }
    kvc_seq_release(pool, &s);
    kvc_pool_destroy(pool);
}

/* ---- kvc_write copy-on-write from several threads ------------------------- */

typedef struct {
    kvc_pool *pool;
    kvc_seq *seq;
    int layer;
    float base;
} writer;

static void *write_layer(void *arg) {
    writer *w = arg;
    float k[8 * 4], v[8 * 4];
    for (int i = 0; i < 8 * 4; i++) k[i] = w->base + (float)w->layer * 100 + (float)i, v[i] = -k[i];
    kvc_write(w->pool, w->seq, w->layer, 8, 8, k, v, 4);
    return NULL;
}

Test(pool, concurrent_write_copies_shared_page_once) {
    enum { NL = 8 };
    kvc_config c = {.n_layer = NL, .n_kv_head = 1, .head_dim = 4, .block_size = 32,
                    .memory_bytes = 1 << 20, .k_codec = "f32", .v_codec = "f32"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    for (int round = 0; round < 20; round++) {
        kvc_seq a = {0}, b = {0};
        cr_assert_eq(kvc_seq_reserve(pool, &a, 16), KVC_OK);    /* positions 8..15 not yet written */
        cr_assert_eq(kvc_seq_fork(pool, &a, &b), KVC_OK);
        int free_before = kvc_pages_free(pool);
        pthread_t th[2 * NL];
        writer w[2 * NL];
        for (int i = 0; i < 2 * NL; i++) {
            w[i] = (writer){pool, i < NL ? &a : &b, i % NL, i < NL ? 1000.0f : 5000.0f};
            pthread_create(&th[i], NULL, write_layer, &w[i]);
        }
        for (int i = 0; i < 2 * NL; i++) pthread_join(th[i], NULL);
        cr_assert_eq(kvc_pages_free(pool), free_before - 1, "exactly one copy");
        cr_assert_neq(a.pages[0], b.pages[0]);
        for (int layer = 0; layer < NL; layer++) {
            float k[8 * 4], v[8 * 4];
            kvc_read(pool, &a, layer, 8, 8, k, v, 4);
            for (int i = 0; i < 32; i++) cr_assert_eq(k[i], 1000.0f + (float)layer * 100 + (float)i);
            kvc_read(pool, &b, layer, 8, 8, k, v, 4);
            for (int i = 0; i < 32; i++) cr_assert_eq(v[i], -(5000.0f + (float)layer * 100 + (float)i));
        }
        kvc_seq_release(pool, &a);
        kvc_seq_release(pool, &b);
        cr_assert_eq(kvc_pages_free(pool), kvc_pages_total(pool));
    }
    kvc_pool_destroy(pool);
}

/* ---- pages kept elsewhere: prepare_write and the page copier ------------------ */

typedef struct {
    int n;
    int32_t dst[8], src[8];
} copies;

static void record_copy(void *ctx, int32_t dst, int32_t src) {
    copies *c = ctx;
    cr_assert_lt(c->n, 8);
    c->dst[c->n] = dst;
    c->src[c->n++] = src;
}

Test(pool, prepare_write_copies_shared_pages_through_the_copier) {
    kvc_config c = {.n_layer = 2, .n_kv_head = 1, .head_dim = 4, .block_size = 4,
                    .memory_bytes = 1 << 16, .k_codec = "f32", .v_codec = "f32"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    copies cp = {0};
    kvc_pool_set_page_copier(pool, record_copy, &cp);
    kvc_seq a = {0}, b = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &a, 10), KVC_OK);     /* pages 0..2, the last partial */
    float k[10 * 4], v[10 * 4];
    for (int i = 0; i < 40; i++) k[i] = (float)i, v[i] = -(float)i;
    cr_assert_eq(kvc_write(pool, &a, 0, 0, 10, k, v, 4), KVC_OK);
    cr_assert_eq(kvc_seq_fork(pool, &a, &b), KVC_OK);
    const int32_t shared = a.pages[2];
    /* b writes position 9 (in the shared partial page) itself: prepared, the
     * page is b's own copy, made by the copier and not by the pool */
    int free_before = kvc_pages_free(pool);
    cr_assert_eq(kvc_seq_prepare_write(pool, &b, 9, 1), KVC_OK);
    cr_assert_eq(cp.n, 1);
    cr_assert_eq(cp.src[0], shared);
    cr_assert_eq(cp.dst[0], b.pages[2]);
    cr_assert_neq(b.pages[2], shared);
    cr_assert_eq(a.pages[2], shared);
    cr_assert_eq(kvc_pages_free(pool), free_before - 1);
    cr_assert_eq(kvc_page_refcount(pool, shared), 1);
    /* the pool's own arena was not copied into: the copier is the copy */
    float kb[4], vb[4];
    kvc_read(pool, &b, 0, 8, 1, kb, vb, 4);
    cr_assert_eq(kb[0], 0.0f, "the arena's copy was left to the copier");
    /* again, and the pages before: nothing shared is left, nothing copied */
    cr_assert_eq(kvc_seq_prepare_write(pool, &b, 0, 10), KVC_OK);
    cr_assert_eq(cp.n, 3, "pages 0 and 1 were still shared with a");
    cr_assert_eq(kvc_seq_prepare_write(pool, &a, 0, 10), KVC_OK);
    cr_assert_eq(cp.n, 3, "a's pages are its own again");
    /* a copy that finds no free page fails, naming it by its code */
    kvc_seq d = {0};
    cr_assert_eq(kvc_seq_fork(pool, &a, &d), KVC_OK);
    kvc_seq fill = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &fill, 4 * kvc_pages_free(pool)), KVC_OK);
    cr_assert_eq(kvc_seq_prepare_write(pool, &d, 0, 1), KVC_ERR_FULL);
    cr_assert_eq(kvc_seq_prepare_write(pool, &d, 0, 0), KVC_OK, "no positions: nothing to do");
    kvc_pool_set_page_copier(pool, NULL, NULL);
    kvc_seq_release(pool, &fill);
    kvc_seq_release(pool, &d);
    kvc_seq_release(pool, &a);
    kvc_seq_release(pool, &b);
    cr_assert_eq(kvc_pool_validate(pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_pool_destroy(pool);
}

/* ---- broken invariants are caught ------------------------------------------ */

Test(pool, validate_catches_a_corrupt_free_list) {
    kvc_config c = {.n_layer = 1, .n_kv_head = 1, .head_dim = 8, .block_size = 4,
                    .memory_bytes = 1 << 16, .k_codec = "f32", .v_codec = "f32"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, 9), KVC_OK);
    cr_assert_eq(kvc_pool_validate(pool, err, sizeof err), KVC_OK, "%s", err);
    pool->free_stack[0] = pool->free_stack[1];                 /* one page listed twice */
    cr_assert_eq(kvc_pool_validate(pool, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "twice on the free list") != NULL, "%s", err);
    pool->free_stack[0] = s.pages[0];                          /* a used page listed free */
    cr_assert_eq(kvc_pool_validate(pool, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "refcount 1") != NULL, "%s", err);
    kvc_pool_destroy(pool);
    free(s.pages);
}

/* A page released more often than it was referenced aborts (a double free). */
Test(pool, double_free_aborts, .signal = SIGABRT) {
    kvc_config c = {.n_layer = 1, .n_kv_head = 1, .head_dim = 8, .block_size = 4,
                    .memory_bytes = 1 << 16, .k_codec = "f32", .v_codec = "f32"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq a = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &a, 4), KVC_OK);
    kvc_seq b = a;                                             /* a copy, not a fork */
    b.pages = malloc(sizeof(int32_t) * 4);
    b.pages[0] = a.pages[0];
    kvc_seq_release(pool, &a);
    kvc_seq_release(pool, &b);
}
