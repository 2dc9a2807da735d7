/* test_forward_cpu.c: logits parity of the CPU forward pass with transformers.
 *
 * tests/fixtures/models/<name>/ hold tiny random-weight models built and saved
 * by transformers itself (tools/device/gen_fixtures.py) with the logits of every
 * position computed in float64 from the saved weights. kvserve must match them
 * to a relative error (max |ours - ref| / max |ref| per sequence) of 1e-4, when
 * a sequence runs as one chunk, as several chunks through the paged cache, one
 * token at a time, and batched together with another sequence. */
#include <criterion/criterion.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/kvcache.h"
#include "engine/backend.h"
#include "engine/model.h"

#define FIX "tests/fixtures/models/"

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

static void rig_open(rig *g, const char *path, int threads, const char *codec) {
    char err[512];
    g->m = eng_model_load(path, err, sizeof err);
    cr_assert_not_null(g->m, "load %s: %s", path, err);
    kvc_config kc = {.n_layer = g->m->cfg.n_layer, .n_kv_head = g->m->cfg.n_kv_head,
                     .head_dim = g->m->cfg.head_dim, .block_size = 16, .memory_bytes = 8 << 20,
                     .k_codec = codec, .v_codec = codec};
    cr_assert_eq(kvc_pool_create(&kc, &g->pool, err, sizeof err), KVC_OK, "%s", err);
    eng_backend_options bo = {.n_threads = threads};
    g->be = eng_backend_cpu_create(g->m, g->pool, &bo, err, sizeof err);
    cr_assert_not_null(g->be, "%s", err);
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

static void check_model(const char *path, const char *refdir, double tol) {
    reference r;
    load_reference(refdir, &r);
    for (int threads = 1; threads <= 2; threads++) {
        rig g;
        rig_open(&g, path, threads, "f32");
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

Test(forward_cpu, llama_f32) { check_model(FIX "llama", FIX "llama", 1e-4); }
Test(forward_cpu, llama_bf16) { check_model(FIX "llama-bf16", FIX "llama-bf16", 1e-4); }
Test(forward_cpu, llama3_scaling_tied) { check_model(FIX "llama3-tied", FIX "llama3-tied", 1e-4); }
Test(forward_cpu, qwen2_bias_f16) { check_model(FIX "qwen2", FIX "qwen2", 1e-4); }
Test(forward_cpu, mistral_sharded) { check_model(FIX "mistral-sharded", FIX "mistral-sharded", 1e-4); }
Test(forward_cpu, gpt2) { check_model(FIX "gpt2", FIX "gpt2", 1e-4); }
/* The same Llama written as GGUF (tools/hf_to_gguf_fixture.py): f32 exactly,
 * Q8_0 within the error of 8-bit weights and activations. */
Test(forward_cpu, llama_gguf_f32) { check_model(FIX "llama/model-f32.gguf", FIX "llama", 1e-4); }
Test(forward_cpu, llama_gguf_q8_0) { check_model(FIX "llama/model-q8_0.gguf", FIX "llama", 6e-2); }

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
