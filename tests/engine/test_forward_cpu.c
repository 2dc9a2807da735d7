/* test_forward_cpu.c: logits parity of the CPU forward pass with transformers.
 *
 * tests/fixtures/models/<name>/ hold tiny random-weight models built and saved
 * by transformers itself (tools/device/gen_fixtures.py) with the logits of every
 * position computed in float64 from the saved weights. kvserve must match them
 * to a relative error (max |ours - ref| / max |ref| per sequence) of 1e-4, when
 * a sequence runs as one chunk, as several chunks through the paged cache, one
 * token at a time, and batched together with another sequence; with keys
 * cached before RoPE too. Absorbed projections are checked against the same
 * forward without them (same codec, tight tolerance) and, with full-rank
 * bases, against transformers. */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache/kvcache.h"
#include "engine/backend.h"
#include "engine/model.h"

#define FIX "tests/fixtures/models/"

/* The Llama fixture as GGUF, converted into $KVSERVE_FIXTURES by make fixtures
 * (tools/hf_to_gguf_fixture.py; make unit sets the variable). */
static const char *llama_gguf(const char *type, char *path, size_t len) {
    const char *dir = getenv("KVSERVE_FIXTURES");
    cr_assert_not_null(dir, "KVSERVE_FIXTURES is not set (make unit sets it; make fixtures writes model-%s.gguf)", type);
    snprintf(path, len, "%s/llama/model-%s.gguf", dir, type);
    return path;
}

typedef struct {
    int n_seq;
    int len[4];
    int32_t *ids[4];
    float *logits[4]; /* (len, n_vocab) */
    int n_vocab;
} reference;

static void load_reference(const char *dir, reference *r) {
    char path[512];
    snprintf(path, sizeof path, "%s/reference.json", dir);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    cr_assert_not_null(root, "%s: %s", path, je.text);
    json_t *inputs = json_object_get(root, "inputs");
    r->n_seq = (int)json_array_size(inputs);
    r->n_vocab = (int)json_integer_value(json_object_get(root, "n_vocab"));
    snprintf(path, sizeof path, "%s/logits.f32", dir);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s", path);
    for (int s = 0; s < r->n_seq; s++) {
        json_t *a = json_array_get(inputs, (size_t)s);
        r->len[s] = (int)json_array_size(a);
        r->ids[s] = malloc(sizeof(int32_t) * (size_t)r->len[s]);
        for (int i = 0; i < r->len[s]; i++)
            r->ids[s][i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
        size_t n = (size_t)r->len[s] * (size_t)r->n_vocab;
        r->logits[s] = malloc(n * sizeof(float));
        cr_assert_eq(fread(r->logits[s], sizeof(float), n, f), n, "%s: short logits file", path);
    }
    fclose(f);
    json_decref(root);
}

static void free_reference(reference *r) {
    for (int s = 0; s < r->n_seq; s++) {
        free(r->ids[s]);
        free(r->logits[s]);
    }
}

static double rel_err(const float *got, const float *want, size_t n) {
    double diff = 0, mag = 0;
    for (size_t i = 0; i < n; i++) {
        diff = fmax(diff, fabs((double)got[i] - want[i]));
        mag = fmax(mag, fabs((double)want[i]));
    }
    return diff / mag;
}

typedef struct {
    eng_model *m;
    kvc_pool *pool;
    eng_backend *be;
} rig;

/* The cache's settings for a rig. */
typedef struct {
    const char *k, *v;      /* codec specs */
    const char *calib;      /* calibration file for pca codecs, or NULL */
    bool absorb;
} kv_opts;

static void rig_open_kv(rig *g, const char *path, int threads, const kv_opts *o) {
    char err[512];
    g->m = eng_model_load(path, err, sizeof err);
    cr_assert_not_null(g->m, "load %s: %s", path, err);
    kvc_config kc = {.n_layer = g->m->cfg.n_layer, .n_kv_head = g->m->cfg.n_kv_head,
                     .head_dim = g->m->cfg.head_dim, .block_size = 16, .memory_bytes = 8 << 20,
                     .k_codec = o->k, .v_codec = o->v, .calib = o->calib};
    cr_assert_eq(kvc_pool_create(&kc, &g->pool, err, sizeof err), KVC_OK, "%s", err);
    eng_backend_options bo = {.n_threads = threads, .absorb = o->absorb};
    g->be = eng_backend_cpu_create(g->m, g->pool, &bo, err, sizeof err);
    cr_assert_not_null(g->be, "%s", err);
}

static void rig_open(rig *g, const char *path, int threads, const char *codec) {
    rig_open_kv(g, path, threads, &(kv_opts){.k = codec, .v = codec});
}

static void rig_close(rig *g) {
    eng_backend_destroy(g->be);
    kvc_pool_destroy(g->pool);
    eng_model_free(g->m);
}

/* Runs sequence s of r in chunks of `chunk` tokens; checks every position's logits. */
static double run_chunked(rig *g, const reference *r, int s, int chunk) {
    char err[512];
    kvc_seq seq = {0};
    cr_assert_eq(kvc_seq_reserve(g->pool, &seq, r->len[s]), KVC_OK);
    float *logits = malloc(sizeof(float) * (size_t)r->len[s] * (size_t)r->n_vocab);
    for (int p = 0; p < r->len[s]; p += chunk) {
        int n = r->len[s] - p < chunk ? r->len[s] - p : chunk;
        eng_segment seg = {.seq = &seq, .pos0 = p, .n_tokens = n, .tokens = r->ids[s] + p, .all_logits = true};
        eng_batch b = {.n_segs = 1, .segs = &seg};
        cr_assert_eq(eng_forward(g->be, &b, logits + (size_t)p * r->n_vocab, err, sizeof err), 0, "%s", err);
    }
    double e = rel_err(logits, r->logits[s], (size_t)r->len[s] * (size_t)r->n_vocab);
    free(logits);
    kvc_seq_release(g->pool, &seq);
    return e;
}

static void check_model_kv(const char *path, const char *refdir, double tol, const kv_opts *o) {
    reference r;
    load_reference(refdir, &r);
    for (int threads = 1; threads <= 2; threads++) {
        rig g;
        rig_open_kv(&g, path, threads, o);
        cr_assert_eq(g.m->cfg.n_vocab, r.n_vocab);
        for (int s = 0; s < r.n_seq; s++) {
            int chunks[] = {r.len[s], 5, 1};
            for (int c = 0; c < 3; c++) {
                double e = run_chunked(&g, &r, s, chunks[c]);
                cr_expect_leq(e, tol, "%s seq %d chunk %d threads %d: rel err %.3g > %.1g", path, s, chunks[c],
                              threads, e, tol);
            }
        }
        cr_assert_eq(kvc_pages_free(g.pool), kvc_pages_total(g.pool), "pages leaked");
        rig_close(&g);
    }
    free_reference(&r);
}

static void check_model(const char *path, const char *refdir, double tol) {
    check_model_kv(path, refdir, tol, &(kv_opts){.k = "f32", .v = "f32"});
}

Test(forward_cpu, llama_f32) { check_model(FIX "llama", FIX "llama", 1e-4); }
Test(forward_cpu, llama_bf16) { check_model(FIX "llama-bf16", FIX "llama-bf16", 1e-4); }
Test(forward_cpu, llama3_scaling_tied) { check_model(FIX "llama3-tied", FIX "llama3-tied", 1e-4); }
Test(forward_cpu, qwen2_bias_f16) { check_model(FIX "qwen2", FIX "qwen2", 1e-4); }
Test(forward_cpu, mistral_sharded) { check_model(FIX "mistral-sharded", FIX "mistral-sharded", 1e-4); }
Test(forward_cpu, gpt2) { check_model(FIX "gpt2", FIX "gpt2", 1e-4); }
/* The same Llama written as GGUF (tools/hf_to_gguf_fixture.py): f32 exactly,
 * Q8_0 within the error of 8-bit weights and activations. */
Test(forward_cpu, llama_gguf_f32) {
    char path[1024];
    check_model(llama_gguf("f32", path, sizeof path), FIX "llama", 1e-4);
}
Test(forward_cpu, llama_gguf_q8_0) {
    char path[1024];
    check_model(llama_gguf("q8_0", path, sizeof path), FIX "llama", 6e-2);
}

/* Two sequences in one batch (a prefill chunk of one beside a decode token of
 * the other) give the same logits as each alone. */
Test(forward_cpu, mixed_batch) {
    reference r;
    load_reference(FIX "llama", &r);
    rig g;
    rig_open(&g, FIX "llama", 2, "f32");
    char err[512];
    kvc_seq a = {0}, b = {0};
    cr_assert_eq(kvc_seq_reserve(g.pool, &a, r.len[0]), KVC_OK);
    cr_assert_eq(kvc_seq_reserve(g.pool, &b, r.len[1]), KVC_OK);
    size_t V = (size_t)r.n_vocab;
    float *out = malloc(sizeof(float) * V * (size_t)(r.len[0] + r.len[1]));
    /* step 1: b's first token alone (decode-like), a's first 20 tokens */
    eng_segment segs[2] = {
        {.seq = &a, .pos0 = 0, .n_tokens = 20, .tokens = r.ids[0], .all_logits = true},
        {.seq = &b, .pos0 = 0, .n_tokens = 1, .tokens = r.ids[1], .want_logits = true},
    };
    eng_batch batch = {.n_segs = 2, .segs = segs};
    cr_assert_eq(eng_batch_logit_rows(&batch), 21);
    cr_assert_eq(eng_forward(g.be, &batch, out, err, sizeof err), 0, "%s", err);
    cr_expect_leq(rel_err(out, r.logits[0], 20 * V), 1e-4);
    cr_expect_leq(rel_err(out + 20 * V, r.logits[1], V), 1e-4);
    /* step 2: the rest of a, and b's remaining tokens one per step */
    for (int t = 1; t < r.len[1]; t++) {
        int a0 = 20 + (t - 1), na = t == 1 ? r.len[0] - 20 : 0;
        eng_segment s2[2] = {
            {.seq = &b, .pos0 = t, .n_tokens = 1, .tokens = r.ids[1] + t, .want_logits = true},
            {.seq = &a, .pos0 = a0, .n_tokens = na, .tokens = r.ids[0] + a0, .all_logits = true},
        };
        eng_batch b2 = {.n_segs = na ? 2 : 1, .segs = s2};
        cr_assert_eq(eng_forward(g.be, &b2, out, err, sizeof err), 0, "%s", err);
        cr_expect_leq(rel_err(out, r.logits[1] + (size_t)t * V, V), 1e-4, "b token %d", t);
        if (na)
            cr_expect_leq(rel_err(out + V, r.logits[0] + (size_t)a0 * V, (size_t)na * V), 1e-4);
    }
    free(out);
    kvc_seq_release(g.pool, &a);
    kvc_seq_release(g.pool, &b);
    rig_close(&g);
    free_reference(&r);
}

Test(forward_cpu, rejects_bad_tokens_and_unreserved_positions) {
    rig g;
    rig_open(&g, FIX "llama", 1, "f32");
    char err[512] = "";
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(g.pool, &s, 4), KVC_OK);
    float *out = malloc(sizeof(float) * (size_t)g.m->cfg.n_vocab);
    int32_t bad[] = {1, 2, 99999};
    eng_segment seg = {.seq = &s, .pos0 = 0, .n_tokens = 3, .tokens = bad, .want_logits = true};
    eng_batch b = {.n_segs = 1, .segs = &seg};
    cr_expect_eq(eng_forward(g.be, &b, out, err, sizeof err), -1);
    cr_expect(strstr(err, "99999") != NULL, "%s", err);
    int32_t ok[] = {1, 2, 3, 4, 5};
    seg = (eng_segment){.seq = &s, .pos0 = 0, .n_tokens = 5, .tokens = ok, .want_logits = true};
    cr_expect_eq(eng_forward(g.be, &b, out, err, sizeof err), -1);
    cr_expect(strstr(err, "reserved") != NULL, "%s", err);
    free(out);
    kvc_seq_release(g.pool, &s);
    rig_close(&g);
}

/* ---- keys cached before RoPE ---------------------------------------------------
 * The cache stores unrotated keys and attention rotates them with the tables
 * the queries were rotated with: transformers' logits within 1e-4 for
 * half-split pairs (Hugging Face), adjacent pairs (GGUF), llama3 scaling, QKV
 * biases and a model without RoPE. */

static const kv_opts pre_rope_f32 = {.k = "f32:prerope", .v = "f32"};
Test(forward_cpu, pre_rope_keys_llama) { check_model_kv(FIX "llama", FIX "llama", 1e-4, &pre_rope_f32); }
Test(forward_cpu, pre_rope_keys_gguf_pairs) {
    char path[1024];
    check_model_kv(llama_gguf("f32", path, sizeof path), FIX "llama", 1e-4, &pre_rope_f32);
}
Test(forward_cpu, pre_rope_keys_llama3_scaling) {
    check_model_kv(FIX "llama3-tied", FIX "llama3-tied", 1e-4, &pre_rope_f32);
}
Test(forward_cpu, pre_rope_keys_qwen2) { check_model_kv(FIX "qwen2", FIX "qwen2", 1e-4, &pre_rope_f32); }
Test(forward_cpu, pre_rope_keys_gpt2) { check_model_kv(FIX "gpt2", FIX "gpt2", 1e-4, &pre_rope_f32); }

/* An f32:prerope cache really holds unrotated keys: position 0's key is the
 * same in a post-RoPE cache (RoPE at position 0 is the identity), later ones
 * differ, and each has the same norm (RoPE is a rotation). */
Test(forward_cpu, pre_rope_cache_holds_unrotated_keys) {
    reference r;
    load_reference(FIX "llama", &r);
    rig post, pre;
    rig_open_kv(&post, FIX "llama", 1, &(kv_opts){.k = "f32", .v = "f32"});
    rig_open_kv(&pre, FIX "llama", 1, &pre_rope_f32);
    const int n = r.len[0], hd = post.m->cfg.n_kv_head * post.m->cfg.head_dim, D = post.m->cfg.head_dim;
    float *ka = malloc(sizeof(float) * (size_t)n * hd), *kb = malloc(sizeof(float) * (size_t)n * hd);
    float *logits = malloc(sizeof(float) * (size_t)r.n_vocab);
    rig *rigs[2] = {&post, &pre};
    float *ks[2] = {ka, kb};
    char err[512];
    for (int i = 0; i < 2; i++) {
        kvc_seq seq = {0};
        cr_assert_eq(kvc_seq_reserve(rigs[i]->pool, &seq, n), KVC_OK);
        eng_segment seg = {.seq = &seq, .pos0 = 0, .n_tokens = n, .tokens = r.ids[0], .want_logits = true};
        eng_batch b = {.n_segs = 1, .segs = &seg};
        cr_assert_eq(eng_forward(rigs[i]->be, &b, logits, err, sizeof err), 0, "%s", err);
        kvc_read(rigs[i]->pool, &seq, 1, 0, n, ks[i], NULL, hd);
        kvc_seq_release(rigs[i]->pool, &seq);
    }
    double max_diff0 = 0, max_diff_later = 0;
    for (int t = 0; t < n; t++)
        for (int h = 0; h * D < hd; h++) {
            double na = 0, nb = 0, diff = 0;
            for (int d = 0; d < D; d++) {
                float a = ka[(size_t)t * hd + h * D + d], b2 = kb[(size_t)t * hd + h * D + d];
                na += (double)a * a, nb += (double)b2 * b2, diff = fmax(diff, fabs(a - b2));
            }
            cr_expect(fabs(sqrt(na) - sqrt(nb)) <= 1e-5 * sqrt(na), "token %d head %d: norms %g vs %g", t, h,
                      sqrt(na), sqrt(nb));
            if (t == 0)
                max_diff0 = fmax(max_diff0, diff);
            else
                max_diff_later = fmax(max_diff_later, diff);
        }
    cr_expect_leq(max_diff0, 1e-6, "position 0 differs by %g", max_diff0);
    cr_expect_gt(max_diff_later, 1e-2, "later keys look rotated in the pre-RoPE cache");
    free(ka), free(kb), free(logits);
    rig_close(&post);
    rig_close(&pre);
    free_reference(&r);
}

/* ---- absorbed projections -------------------------------------------------------- */

/* Logits of every position of every reference sequence, in chunks of 7;
 * *absorbed: what the backend absorbed. */
static float *all_logits(const char *path, const reference *r, const kv_opts *o, int threads, unsigned *absorbed) {
    rig g;
    rig_open_kv(&g, path, threads, o);
    *absorbed = g.be->absorbed;
    size_t total = 0;
    for (int s = 0; s < r->n_seq; s++)
        total += (size_t)r->len[s] * (size_t)r->n_vocab;
    float *out = malloc(sizeof(float) * total), *p = out;
    char err[512];
    for (int s = 0; s < r->n_seq; s++) {
        kvc_seq seq = {0};
        cr_assert_eq(kvc_seq_reserve(g.pool, &seq, r->len[s]), KVC_OK);
        for (int t = 0; t < r->len[s]; t += 7) {
            int n = r->len[s] - t < 7 ? r->len[s] - t : 7;
            eng_segment seg = {.seq = &seq, .pos0 = t, .n_tokens = n, .tokens = r->ids[s] + t, .all_logits = true};
            eng_batch b = {.n_segs = 1, .segs = &seg};
            cr_assert_eq(eng_forward(g.be, &b, p, err, sizeof err), 0, "%s", err);
            p += (size_t)n * r->n_vocab;
        }
        kvc_seq_release(g.pool, &seq);
    }
    rig_close(&g);
    return out;
}

/* A calibration file of rank `rank` fitted on the reference sequences' own
 * K, V and pre-RoPE K (so pca bases have real means; the biases of qwen2 and
 * gpt2 meet them in the folded bias). */
static void make_calib(const char *path, const reference *r, int rank, const char *out) {
    kvc_calib_fit *fit = NULL;
    for (int pass = 0; pass < 2; pass++) {
        rig g;
        rig_open_kv(&g, path, 1, &(kv_opts){.k = pass ? "f32:prerope" : "f32", .v = "f32"});
        const eng_model_config *c = &g.m->cfg;
        const int hd = c->n_kv_head * c->head_dim;
        if (!fit)
            fit = kvc_calib_fit_create(c->n_layer, c->n_kv_head, c->head_dim);
        cr_assert_not_null(fit);
        float *logits = malloc(sizeof(float) * (size_t)r->n_vocab);
        for (int s = 0; s < r->n_seq; s++) {
            kvc_seq seq = {0};
            cr_assert_eq(kvc_seq_reserve(g.pool, &seq, r->len[s]), KVC_OK);
            eng_segment seg = {.seq = &seq, .pos0 = 0, .n_tokens = r->len[s], .tokens = r->ids[s], .want_logits = true};
            eng_batch b = {.n_segs = 1, .segs = &seg};
            char err[512];
            cr_assert_eq(eng_forward(g.be, &b, logits, err, sizeof err), 0, "%s", err);
            float *k = malloc(sizeof(float) * (size_t)r->len[s] * hd), *v = malloc(sizeof(float) * (size_t)r->len[s] * hd);
            for (int l = 0; l < c->n_layer; l++) {
                kvc_read(g.pool, &seq, l, 0, r->len[s], k, v, hd);
                kvc_calib_fit_add(fit, pass ? KVC_CALIB_K_PRE_ROPE : KVC_CALIB_K, l, k, r->len[s], hd);
                if (!pass)
                    kvc_calib_fit_add(fit, KVC_CALIB_V, l, v, r->len[s], hd);
            }
            free(k), free(v);
            kvc_seq_release(g.pool, &seq);
        }
        free(logits);
        rig_close(&g);
    }
    char err[512];
    kvc_calib_opts co = {.rank = rank, .model = "fixture"};
    cr_assert_eq(kvc_calib_fit_write(fit, &co, out, err, sizeof err), KVC_OK, "%s", err);
    kvc_calib_fit_destroy(fit);
}

/* The same codecs with and without absorbed projections: the same logits
 * within tol, with the roles `expect` absorbed. */
static void check_absorbed(const char *path, const char *k, const char *v, int calib_rank, unsigned expect,
                           double tol) {
    reference r;
    load_reference(path, &r);
    char calib[64] = "";
    if (calib_rank) {
        snprintf(calib, sizeof calib, "/tmp/kvserve-test-calib-%d.bin", (int)getpid());
        make_calib(path, &r, calib_rank, calib);
    }
    kv_opts o = {.k = k, .v = v, .calib = calib_rank ? calib : NULL};
    size_t total = 0;
    for (int s = 0; s < r.n_seq; s++)
        total += (size_t)r.len[s] * (size_t)r.n_vocab;
    unsigned absorbed;
    float *plain = all_logits(path, &r, &o, 2, &absorbed);
    cr_expect_eq(absorbed, 0u, "absorbed without being asked");
    o.absorb = true;
    for (int threads = 1; threads <= 2; threads++) {
        float *abs = all_logits(path, &r, &o, threads, &absorbed);
        cr_expect_eq(absorbed, expect, "%s K %s V %s: absorbed %u, expected %u", path, k, v, absorbed, expect);
        double e = rel_err(abs, plain, total);
        cr_expect_leq(e, tol, "%s K %s V %s: absorbed vs not: rel err %.3g > %.1g", path, k, v, e, tol);
        free(abs);
    }
    free(plain);
    if (calib_rank)
        remove(calib);
    free_reference(&r);
}

enum { K = ENG_ABSORBED_K, V = ENG_ABSORBED_V };
Test(forward_cpu, absorbed_values_lowrank) { check_absorbed(FIX "llama", "f32", "lowrank:r8", 0, V, 1e-4); }
Test(forward_cpu, absorbed_pre_rope_keys_and_values) {
    check_absorbed(FIX "llama", "lowrank:r8:prerope", "lowrank:r8", 0, K | V, 1e-4);
}
Test(forward_cpu, absorbed_pre_rope_keys_only) {
    check_absorbed(FIX "llama", "lowrank:r8:prerope", "int8", 0, K, 1e-4);
}
/* keys after RoPE cannot be absorbed (RoPE does not commute with P) */
Test(forward_cpu, absorbed_values_not_post_rope_keys) {
    check_absorbed(FIX "llama", "lowrank:r8", "hybrid:r8", 0, V, 1e-4);
}
Test(forward_cpu, absorbed_latents_hybrid) {
    check_absorbed(FIX "llama3-tied", "latent:24:prerope", "hybrid:latent:20", 0, K | V, 1e-4);
}
Test(forward_cpu, absorbed_pca_with_biases) {
    check_absorbed(FIX "qwen2", "lowrank:pca:prerope", "lowrank:pca", 6, K | V, 1e-4);
}
Test(forward_cpu, absorbed_gpt2_keys_without_rope) {
    check_absorbed(FIX "gpt2", "latent:40:pca", "lowrank:pca", 6, K | V, 1e-4);
}

/* Full-rank orthogonal bases lose nothing but the fp16 coefficients:
 * absorbed keys and values still give transformers' logits. */
Test(forward_cpu, absorbed_full_rank_matches_transformers) {
    check_model_kv(FIX "llama", FIX "llama", 2e-3,
                   &(kv_opts){.k = "lowrank:r16:prerope", .v = "lowrank:r16", .absorb = true});
    check_model_kv(FIX "qwen2", FIX "qwen2", 2e-3,
                   &(kv_opts){.k = "latent:32:prerope", .v = "latent:32", .absorb = true});
}
