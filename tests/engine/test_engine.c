/* test_engine.c: the continuous-batching engine (engine/engine.c) end to end on
 * the tiny fixture model (tests/fixtures/models/llama: 2 layers, vocab 320),
 * and on SmolLM2 ($KVSERVE_MODEL) where real text matters.
 *
 * The references are independent runs of the same engine under conditions
 * that make the property obvious: a request alone in the engine (no batching,
 * no preemption) is the reference for the same request inside a batch of 16 or
 * under a pool small enough to force preemptions; the unstopped output is the
 * reference for stop strings (the expected text is computed here with strstr);
 * the events the callbacks saw are the reference for the metrics. */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "engine/engine.h"
#include "engine/metrics.h"
#include "engine/tokenizer.h"

#define FIXTURE "tests/fixtures/models/llama"
#define MAX_TOK 256
#define MAX_CHOICES 4
#define TEXT_CAP 4096

/* ---- collecting events ------------------------------------------------------ */

typedef struct {
    uint64_t id;
    int32_t tokens[MAX_CHOICES][MAX_TOK];
    float logprobs[MAX_CHOICES][MAX_TOK];
    int n_tokens[MAX_CHOICES];
    char text[MAX_CHOICES][TEXT_CAP];
    int n_text[MAX_CHOICES];
    int delta_end[MAX_CHOICES][MAX_TOK];   /* n_text after each token event */
    eng_finish_reason finish[MAX_CHOICES];
    int completion[MAX_CHOICES];
    int prompt_tokens;
    int n_final;
    int n_events;
    int after_final;          /* events that came after the choice's final event */
    int bad_usage;
    int final_seq;            /* when the last final event came, from final_counter */
    char error[256];
} result;

static atomic_int final_counter; /* final events seen, all requests */

static void on_event(const eng_event *ev, void *user) {
    result *r = user;
    int c = ev->index;
    r->n_events++;
    if (c < 0 || c >= MAX_CHOICES) {
        r->after_final++;
        return;
    }
    if (r->finish[c] != ENG_FINISH_NONE) {
        r->after_final++;
        return;
    }
    if (ev->token >= 0 && r->n_tokens[c] < MAX_TOK) {
        r->logprobs[c][r->n_tokens[c]] = ev->logprob;
        r->tokens[c][r->n_tokens[c]++] = ev->token;
    }
    if (ev->text_len > 0 && r->n_text[c] + ev->text_len < TEXT_CAP) {
        memcpy(r->text[c] + r->n_text[c], ev->text, (size_t)ev->text_len);
        r->n_text[c] += ev->text_len;
        r->text[c][r->n_text[c]] = 0;
    }
    if (ev->token >= 0 && r->n_tokens[c] <= MAX_TOK)
        r->delta_end[c][r->n_tokens[c] - 1] = r->n_text[c];
    if (ev->finish != ENG_FINISH_NONE) {
        r->finish[c] = ev->finish;
        r->completion[c] = ev->completion_tokens;
        r->prompt_tokens = ev->prompt_tokens;
        r->n_final++;
        r->final_seq = atomic_fetch_add(&final_counter, 1);
        if (ev->error)
            snprintf(r->error, sizeof r->error, "%s", ev->error);
    }
}

/* ---- helpers ------------------------------------------------------------------ */

static eng_engine *make_engine(const char *model, size_t kv_memory, int n_ctx, int max_seqs, int max_batched,
                               int chunk) {
    eng_engine_config c;
    eng_engine_config_default(&c);
    c.model_path = model;
    c.threads = 2;
    c.kv_memory = kv_memory;
    c.kv_k = c.kv_v = "f32";
    c.n_ctx = n_ctx;
    c.max_seqs = max_seqs;
    c.max_batched_tokens = max_batched;
    c.prefill_chunk = chunk;
    c.max_waiting = 4096;
    char err[512];
    eng_engine *e = eng_engine_create(&c, err, sizeof err);
    cr_assert_not_null(e, "eng_engine_create: %s", err);
    return e;
}

/* Bytes of one page of the fixture model's f32 cache: 2 layers x 2 kv heads x
 * (K + V) x 16 tokens x 16 dims x 4 bytes. */
#define FIXTURE_PAGE_BYTES (2 * 2 * 2 * 16 * 16 * 4)

static uint64_t rng_next(uint64_t *x) {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

typedef struct {
    int32_t prompt[200];
    int n_prompt;
    eng_request req;
} test_req;

/* A request of random prompt tokens in [3, 320) (no special tokens). */
static void make_req(test_req *t, uint64_t *rng, int n_prompt, int max_tokens, float temperature, uint64_t seed) {
    memset(t, 0, sizeof *t);
    t->n_prompt = n_prompt;
    for (int i = 0; i < n_prompt; i++)
        t->prompt[i] = 3 + (int32_t)(rng_next(rng) % 317);
    eng_request *q = &t->req;
    q->prompt = t->prompt;
    q->n_prompt = n_prompt;
    eng_sampling_params_default(&q->sampling);
    q->sampling.temperature = temperature;
    q->sampling.seed = seed;
    q->max_tokens = max_tokens;
    q->n = 1;
    q->on_event = on_event;
}

static void submit_ok(eng_engine *e, eng_request *q, result *r) {
    char err[512];
    q->user = r;
    int rc = eng_engine_submit(e, q, &r->id, err, sizeof err);
    cr_assert_eq(rc, ENG_OK, "submit: %d %s", rc, err);
}

static void wait_idle(eng_engine *e) { cr_assert(eng_engine_wait_idle(e, 120.0), "engine did not go idle"); }

static void assert_no_pages_used(eng_engine *e) {
    eng_engine_stats st;
    eng_engine_stats_get(e, &st);
    cr_assert_eq(st.pages_used, 0, "%d pages still used", st.pages_used);
    cr_assert_eq(st.running, 0);
    cr_assert_eq(st.waiting, 0);
}

static void assert_same_output(const result *a, const result *b, int k) {
    cr_assert_eq(a->finish[0], b->finish[0], "request %d: finish %s vs %s", k, eng_finish_reason_name(a->finish[0]),
                 eng_finish_reason_name(b->finish[0]));
    cr_assert_eq(a->n_tokens[0], b->n_tokens[0], "request %d: %d vs %d tokens", k, a->n_tokens[0], b->n_tokens[0]);
    for (int i = 0; i < a->n_tokens[0]; i++)
        cr_assert_eq(a->tokens[0][i], b->tokens[0][i], "request %d: token %d differs: %d vs %d", k, i,
                     a->tokens[0][i], b->tokens[0][i]);
    cr_assert_str_eq(a->text[0], b->text[0], "request %d: text differs", k);
    for (int i = 0; i < a->n_tokens[0]; i++)
        cr_assert_eq(a->logprobs[0][i], b->logprobs[0][i], "request %d: logprob %d differs", k, i);
}

/* Value of the metric line starting with `series` followed by a space. */
static double metric_value(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (!strncmp(p, series, n) && p[n] == ' ')
            return strtod(p + n + 1, NULL);
    cr_assert_fail("metric %s not found", series);
    return -1;
}

static double metric(eng_engine *e, const char *series) {
    char *text = eng_metrics_render(eng_engine_metrics(e));
    cr_assert_not_null(text);
    double v = metric_value(text, series);
    free(text);
    return v;
}

/* ---- batch invariance ------------------------------------------------------------- */

#define N_BATCH 16

/* 16 mixed requests (prompts of 1..150 tokens, 4..40 generated) run alone one
 * after the other, then together: the second half is submitted while the first
 * half decodes, so prefill chunks and decode tokens share steps. */
static void batch_invariance(float temperature) {
    eng_engine *e = make_engine(FIXTURE, (size_t)256 * FIXTURE_PAGE_BYTES, 0, 32, 96, 32);
    static test_req reqs[N_BATCH];
    static result alone[N_BATCH], batched[N_BATCH];
    memset(alone, 0, sizeof alone);
    memset(batched, 0, sizeof batched);
    uint64_t rng = 12345;
    for (int k = 0; k < N_BATCH; k++) {
        int n_prompt = 1 + (int)(rng_next(&rng) % 150);
        make_req(&reqs[k], &rng, n_prompt, 4 + (int)(rng_next(&rng) % 37), temperature, 1000 + (uint64_t)k);
        reqs[k].req.ignore_eos = k % 2;
        if (k % 4 == 3) {
            reqs[k].req.sampling.repetition_penalty = 1.3f;
            reqs[k].req.sampling.frequency_penalty = 0.5f;
        }
        reqs[k].req.logprobs = k % 2 == 0;
        if (temperature > 0 && k % 3 == 1) {
            reqs[k].req.sampling.top_k = 40;
            reqs[k].req.sampling.top_p = 0.9f;
        }
    }
    for (int k = 0; k < N_BATCH; k++) {
        submit_ok(e, &reqs[k].req, &alone[k]);
        wait_idle(e);
        cr_assert_eq(alone[k].n_final, 1);
        cr_assert_gt(alone[k].n_tokens[0], 0);
        for (int i = 0; i < alone[k].n_tokens[0]; i++)
            if (reqs[k].req.logprobs)
                cr_assert(alone[k].logprobs[0][i] <= 0.0f && alone[k].logprobs[0][i] > -100.0f);
            else
                cr_assert_eq(alone[k].logprobs[0][i], 0.0f);
    }
    eng_engine_stats before, after;
    eng_engine_stats_get(e, &before);
    for (int k = 0; k < N_BATCH / 2; k++)
        submit_ok(e, &reqs[k].req, &batched[k]);
    for (int spin = 0; spin < 20000 && batched[0].n_events < 3; spin++)
        usleep(100);
    for (int k = N_BATCH / 2; k < N_BATCH; k++)
        submit_ok(e, &reqs[k].req, &batched[k]);
    wait_idle(e);
    eng_engine_stats_get(e, &after);
    /* the batched run really batched: fewer steps than tokens, and mixed ones */
    cr_assert_gt(after.mixed_steps, before.mixed_steps, "no step mixed prefill and decode");
    for (int k = 0; k < N_BATCH; k++) {
        cr_assert_eq(batched[k].n_final, 1, "request %d: %d final events", k, batched[k].n_final);
        cr_assert_eq(batched[k].after_final, 0);
        assert_same_output(&alone[k], &batched[k], k);
    }
    assert_no_pages_used(e);
    eng_engine_destroy(e);
}

Test(engine, batch_invariance_greedy) { batch_invariance(0.0f); }
Test(engine, batch_invariance_seeded_sampling) { batch_invariance(0.9f); }

/* ---- preemption ----------------------------------------------------------------- */

/* Eight requests needing up to 80 positions each (40 pages in all) through a
 * pool of 12 pages: sequences are preempted and recomputed. Their outputs must
 * be those of a pool where everything fits, with greedy and with seeded
 * sampling plus penalties (the sampler's state survives the preemption). */
Test(engine, preemption_keeps_outputs) {
    enum { N = 8 };
    static test_req reqs[N];
    static result big[N], small[N];
    memset(big, 0, sizeof big);
    memset(small, 0, sizeof small);
    uint64_t rng = 777;
    for (int k = 0; k < N; k++) {
        make_req(&reqs[k], &rng, 10 + (int)(rng_next(&rng) % 30), 40, k % 2 ? 0.8f : 0.0f, 50 + (uint64_t)k);
        reqs[k].req.ignore_eos = true;
        reqs[k].req.sampling.repetition_penalty = 1.2f;
        reqs[k].req.sampling.presence_penalty = 0.3f;
    }
    eng_engine *e = make_engine(FIXTURE, (size_t)256 * FIXTURE_PAGE_BYTES, 128, 16, 64, 16);
    for (int k = 0; k < N; k++)
        submit_ok(e, &reqs[k].req, &big[k]);
    wait_idle(e);
    cr_assert_eq(metric(e, "kvserve_num_preemptions_total"), 0);
    eng_engine_destroy(e);

    e = make_engine(FIXTURE, (size_t)12 * FIXTURE_PAGE_BYTES, 128, 16, 64, 16);
    for (int k = 0; k < N; k++)
        submit_ok(e, &reqs[k].req, &small[k]);
    wait_idle(e);
    for (int k = 0; k < N; k++) {
        cr_assert_eq(small[k].n_final, 1);
        cr_assert_eq(small[k].n_tokens[0], 40);
        assert_same_output(&big[k], &small[k], k);
    }
    cr_assert_gt(metric(e, "kvserve_num_preemptions_total"), 0, "the small pool caused no preemption");
    eng_engine_stats st;
    eng_engine_stats_get(e, &st);
    cr_assert_eq(st.pages_total, 12);
    cr_assert_leq(st.pages_peak, 12);
    assert_no_pages_used(e);
    eng_engine_destroy(e);
}

/* ---- cancellation storm -------------------------------------------------------- */

enum { STORM = 1000 };

typedef struct {
    eng_engine *e;
    result res[STORM];
    atomic_int cancel_returned[STORM];   /* eng_engine_cancel(id) returned */
    atomic_int late_events;              /* events after a cancel returned */
    atomic_int cancel_in_callback[STORM];
    uint64_t id_base;
} storm_t;

static storm_t *storm;

static void storm_event(const eng_event *ev, void *user) {
    int k = (int)(intptr_t)user;
    if (atomic_load(&storm->cancel_returned[k]))
        atomic_fetch_add(&storm->late_events, 1);
    on_event(ev, &storm->res[k]);
    /* some requests cancel themselves from inside their callback */
    if (k % 7 == 3 && ev->finish == ENG_FINISH_NONE && storm->res[k].n_tokens[0] == 2) {
        eng_engine_cancel(storm->e, ev->request_id);
        atomic_store(&storm->cancel_returned[k], 1);
        atomic_store(&storm->cancel_in_callback[k], 1);
    }
}

Test(engine, cancellation_storm) {
    storm = calloc(1, sizeof *storm);
    /* 40 pages: small enough that preemption happens in the storm too */
    eng_engine *e = make_engine(FIXTURE, (size_t)40 * FIXTURE_PAGE_BYTES, 128, 16, 64, 16);
    storm->e = e;
    uint64_t rng = 99;
    static test_req reqs[STORM];
    uint64_t ids[STORM];
    int pending[STORM], n_pending = 0, n_cancels = 0;
    for (int k = 0; k < STORM; k++) {
        make_req(&reqs[k], &rng, 1 + (int)(rng_next(&rng) % 40), 1 + (int)(rng_next(&rng) % 24),
                 k % 3 ? 0.7f : 0.0f, (uint64_t)k);
        reqs[k].req.on_event = storm_event;
        reqs[k].req.user = (void *)(intptr_t)k;
        reqs[k].req.n = 1 + (k % 5 == 0) * 2;
        char err[256];
        cr_assert_eq(eng_engine_submit(e, &reqs[k].req, &ids[k], err, sizeof err), ENG_OK, "%s", err);
        if (rng_next(&rng) % 2)
            pending[n_pending++] = k;
        /* cancel a random earlier request now and then, at random moments */
        while (n_pending > 0 && rng_next(&rng) % 3 == 0) {
            int j = (int)(rng_next(&rng) % (uint64_t)n_pending);
            int victim = pending[j];
            pending[j] = pending[--n_pending];
            eng_engine_cancel(e, ids[victim]);
            atomic_store(&storm->cancel_returned[victim], 1);
            n_cancels++;
        }
        if (rng_next(&rng) % 8 == 0)
            usleep((useconds_t)(rng_next(&rng) % 2000));
    }
    while (n_pending > 0) {
        int victim = pending[--n_pending];
        eng_engine_cancel(e, ids[victim]);
        atomic_store(&storm->cancel_returned[victim], 1);
        n_cancels++;
    }
    wait_idle(e);
    cr_assert_eq(atomic_load(&storm->late_events), 0, "%d events after a cancel returned",
                 atomic_load(&storm->late_events));
    int finished = 0;
    for (int k = 0; k < STORM; k++) {
        const result *r = &storm->res[k];
        cr_assert_eq(r->after_final, 0, "request %d: events after its final event", k);
        if (!atomic_load(&storm->cancel_returned[k])) {
            cr_assert_eq(r->n_final, reqs[k].req.n, "request %d (not cancelled): %d final events", k, r->n_final);
            finished++;
        }
        cr_assert_leq(r->n_final, reqs[k].req.n);
    }
    cr_assert_gt(n_cancels, 100);
    cr_assert_gt(finished, 100);
    assert_no_pages_used(e);
    /* every request is counted once, whichever way it ended */
    double total = metric(e, "kvserve_request_success_total{finish_reason=\"stop\"}") +
                   metric(e, "kvserve_request_success_total{finish_reason=\"length\"}") +
                   metric(e, "kvserve_request_success_total{finish_reason=\"cancelled\"}") +
                   metric(e, "kvserve_request_success_total{finish_reason=\"error\"}");
    cr_assert_eq(total, STORM);
    /* many cancels hit live requests (not only finished ones) */
    cr_assert_gt(metric(e, "kvserve_request_success_total{finish_reason=\"cancelled\"}"), 100);
    cr_assert_eq(metric(e, "kvserve_request_success_total{finish_reason=\"error\"}"), 0);
    eng_engine_destroy(e);
    free(storm);
}

/* ---- stop conditions --------------------------------------------------------------- */

static bool is_ascii(char ch) { return (unsigned char)ch < 0x80; }

/* A stop string made of the end of one token's text and the start of the
 * next one's, taken from the unstopped greedy output: the text must end right
 * before its first occurrence, which is computed here independently. */
Test(engine, stop_string_across_tokens) {
    eng_engine *e = make_engine(FIXTURE, (size_t)64 * FIXTURE_PAGE_BYTES, 0, 8, 64, 32);
    uint64_t rng = 4242;
    test_req t;
    static result free_run, stopped, stopped_id;
    memset(&free_run, 0, sizeof free_run);
    make_req(&t, &rng, 12, 60, 0.0f, 0);
    t.req.ignore_eos = true;
    submit_ok(e, &t.req, &free_run);
    wait_idle(e);
    cr_assert_eq(free_run.n_tokens[0], 60);

    /* a boundary after token k-1 with ASCII text on both sides */
    const char *T = free_run.text[0];
    int k = -1;
    for (int i = 4; i < 60 && k < 0; i++) {
        int a0 = free_run.delta_end[0][i - 2], a1 = free_run.delta_end[0][i - 1], b1 = free_run.delta_end[0][i];
        if (a1 - a0 >= 1 && b1 - a1 >= 1 && is_ascii(T[a1 - 1]) && is_ascii(T[a1]) && (a1 - a0 < 2 || is_ascii(T[a1 - 2])) &&
            (b1 - a1 < 2 || is_ascii(T[a1 + 1])))
            k = i;
    }
    cr_assert_geq(k, 0, "no ASCII token boundary in the fixture's output");
    int a0 = free_run.delta_end[0][k - 2], a1 = free_run.delta_end[0][k - 1], b1 = free_run.delta_end[0][k];
    int from = a1 - a0 >= 2 ? a1 - 2 : a1 - 1, to = b1 - a1 >= 2 ? a1 + 2 : a1 + 1;
    char stop[8] = {0};
    memcpy(stop, T + from, (size_t)(to - from));
    int expect_len = (int)(strstr(T, stop) - T);

    const char *stops[] = {"never-in-the-output\x01", stop};
    t.req.stop = stops;
    t.req.n_stop = 2;
    memset(&stopped, 0, sizeof stopped);
    submit_ok(e, &t.req, &stopped);
    wait_idle(e);
    cr_assert_eq(stopped.finish[0], ENG_FINISH_STOP);
    cr_assert_eq(stopped.n_text[0], expect_len, "stop '%s': %d bytes emitted, expected %d", stop, stopped.n_text[0],
                 expect_len);
    cr_assert_eq(memcmp(stopped.text[0], T, (size_t)expect_len), 0);
    cr_assert_null(strstr(stopped.text[0], stop));
    cr_assert_leq(stopped.n_tokens[0], k + 1, "generation went on past the stop string");
    cr_assert_eq(stopped.completion[0], stopped.n_tokens[0]);

    /* a stop token id: generation ends at its first occurrence, its text not emitted */
    int32_t stop_id = free_run.tokens[0][20];
    int first = 0;
    while (free_run.tokens[0][first] != stop_id)
        first++;
    t.req.stop = NULL;
    t.req.n_stop = 0;
    t.req.stop_ids = &stop_id;
    t.req.n_stop_ids = 1;
    memset(&stopped_id, 0, sizeof stopped_id);
    submit_ok(e, &t.req, &stopped_id);
    wait_idle(e);
    cr_assert_eq(stopped_id.finish[0], ENG_FINISH_STOP);
    cr_assert_eq(stopped_id.n_tokens[0], first + 1);
    cr_assert_eq(stopped_id.tokens[0][first], stop_id);
    int before = first > 0 ? free_run.delta_end[0][first - 1] : 0;
    cr_assert_geq(stopped_id.n_text[0], before);
    cr_assert_eq(memcmp(stopped_id.text[0], T, (size_t)before), 0);
    cr_assert_leq(stopped_id.n_text[0], before + 3, "the stop token's text was emitted");
    assert_no_pages_used(e);
    eng_engine_destroy(e);
}

/* ---- n > 1 ------------------------------------------------------------------------- */

static int peak_pages(eng_request *q, int n_requests, result *res) {
    eng_engine *e = make_engine(FIXTURE, (size_t)128 * FIXTURE_PAGE_BYTES, 0, 8, 256, 256);
    for (int i = 0; i < n_requests; i++)
        submit_ok(e, q, &res[i]);
    wait_idle(e);
    eng_engine_stats st;
    eng_engine_stats_get(e, &st);
    assert_no_pages_used(e);
    eng_engine_destroy(e);
    return st.pages_peak;
}

/* n = 3 shares the prompt's pages: fewer pages than three separate requests,
 * and with greedy decoding every choice equals the single request's output
 * (the shared last page was copied, not overwritten). */
Test(engine, n3_shares_prompt_pages) {
    uint64_t rng = 31337;
    test_req t;
    make_req(&t, &rng, 100, 8, 0.0f, 0);
    t.req.ignore_eos = true;
    static result single[3], choices;
    memset(single, 0, sizeof single);
    memset(&choices, 0, sizeof choices);
    int separate = peak_pages(&t.req, 3, single);
    t.req.n = 3;
    int shared = peak_pages(&t.req, 1, &choices);
    cr_assert_lt(shared, separate, "n = 3 used %d pages, 3 requests %d", shared, separate);
    cr_assert_eq(separate, 3 * 7);  /* 108 positions: 7 pages each */
    cr_assert_eq(choices.n_final, 3);
    for (int c = 0; c < 3; c++) {
        cr_assert_eq(choices.n_tokens[c], 8);
        cr_assert_eq(memcmp(choices.tokens[c], single[0].tokens[0], 8 * sizeof(int32_t)), 0, "choice %d", c);
        cr_assert_str_eq(choices.text[c], single[0].text[0]);
    }

    /* sampled: choice 0 is the single request with the same seed; the others
     * draw from their own streams */
    static result s1[1], s3;
    memset(s1, 0, sizeof s1);
    memset(&s3, 0, sizeof s3);
    t.req.sampling.temperature = 1.0f;
    t.req.sampling.seed = 77;
    t.req.max_tokens = 16;
    t.req.n = 1;
    peak_pages(&t.req, 1, s1);
    t.req.n = 3;
    peak_pages(&t.req, 1, &s3);
    cr_assert_eq(memcmp(s3.tokens[0], s1[0].tokens[0], 16 * sizeof(int32_t)), 0);
    cr_assert(memcmp(s3.tokens[1], s3.tokens[0], 16 * sizeof(int32_t)) ||
              memcmp(s3.tokens[2], s3.tokens[0], 16 * sizeof(int32_t)), "all choices drew the same tokens");
    cr_assert(memcmp(s3.tokens[1], s3.tokens[2], 16 * sizeof(int32_t)), "choices 1 and 2 drew the same tokens");
}

/* ---- metrics agree with the events --------------------------------------------------- */

Test(engine, metrics_match_events) {
    enum { N = 10 };
    eng_engine *e = make_engine(FIXTURE, (size_t)64 * FIXTURE_PAGE_BYTES, 0, 8, 64, 16);
    static test_req reqs[N];
    static result res[N];
    memset(res, 0, sizeof res);
    uint64_t rng = 5;
    for (int k = 0; k < N; k++) {
        make_req(&reqs[k], &rng, 5 + (int)(rng_next(&rng) % 60), 3 + (int)(rng_next(&rng) % 20), 0.8f, (uint64_t)k);
        reqs[k].req.n = k == 4 ? 2 : 1;
        submit_ok(e, &reqs[k].req, &res[k]);
    }
    wait_idle(e);
    int prompt = 0, generated = 0, gaps = 0, stop = 0, length = 0;
    for (int k = 0; k < N; k++) {
        prompt += res[k].prompt_tokens;
        cr_assert_eq(res[k].prompt_tokens, reqs[k].n_prompt);
        for (int c = 0; c < reqs[k].req.n; c++) {
            generated += res[k].n_tokens[c];
            cr_assert_eq(res[k].completion[c], res[k].n_tokens[c]);
            gaps += res[k].n_tokens[c] - 1;
        }
        stop += res[k].finish[0] == ENG_FINISH_STOP;
        length += res[k].finish[0] == ENG_FINISH_LENGTH;
    }
    cr_assert_eq(metric(e, "kvserve_prompt_tokens_total"), prompt);
    cr_assert_eq(metric(e, "kvserve_generation_tokens_total"), generated);
    static const char *per_request[] = {"kvserve_time_to_first_token_seconds_count",
                                        "kvserve_e2e_request_latency_seconds_count",
                                        "kvserve_request_queue_time_seconds_count",
                                        "kvserve_request_prefill_time_seconds_count",
                                        "kvserve_request_decode_time_seconds_count",
                                        "kvserve_time_to_first_token_seconds_bucket{le=\"+Inf\"}"};
    for (size_t i = 0; i < sizeof per_request / sizeof per_request[0]; i++)
        cr_assert_eq(metric(e, per_request[i]), N, "%s", per_request[i]);
    cr_assert_eq(metric(e, "kvserve_inter_token_latency_seconds_count"), gaps);
    cr_assert_eq(metric(e, "kvserve_request_success_total{finish_reason=\"stop\"}"), stop);
    cr_assert_eq(metric(e, "kvserve_request_success_total{finish_reason=\"length\"}"), length);
    cr_assert_eq(metric(e, "kvserve_num_requests_running"), 0);
    cr_assert_eq(metric(e, "kvserve_num_requests_waiting"), 0);
    cr_assert_eq(metric(e, "kvserve_kv_pages_used"), 0);
    cr_assert_eq(metric(e, "kvserve_kv_pages_total"), 64);
    cr_assert_eq(metric(e, "kvserve_kv_bytes_per_token"), FIXTURE_PAGE_BYTES / 16);
    cr_assert_eq(metric(e, "kvserve_kv_compression_ratio"), 0.5);
    eng_engine_stats st;
    eng_engine_stats_get(e, &st);
    cr_assert_eq(st.n_ctx, 256);
    cr_assert_eq(st.capacity_seqs, 4); /* 64 pages / 16 pages per 256-token sequence */
    cr_assert_eq(metric(e, "kvserve_kv_capacity_sequences{context=\"256\"}"), 4);
    cr_assert_gt(metric(e, "kvserve_generation_tokens_per_second"), 0);
    eng_engine_destroy(e);
}

/* ---- errors ------------------------------------------------------------------------ */

Test(engine, errors_too_long_invalid_overloaded) {
    eng_engine_config c;
    eng_engine_config_default(&c);
    c.model_path = FIXTURE;
    c.threads = 2;
    c.kv_memory = (size_t)64 * FIXTURE_PAGE_BYTES;
    c.n_ctx = 64;
    c.max_seqs = 1;
    c.max_waiting = 2;
    char err[512];
    eng_engine *e = eng_engine_create(&c, err, sizeof err);
    cr_assert_not_null(e, "%s", err);
    uint64_t rng = 1;
    test_req t;
    static result r;
    uint64_t id;

    make_req(&t, &rng, 70, 4, 0.0f, 0);
    t.req.user = &r;
    cr_assert_eq(eng_engine_submit(e, &t.req, &id, err, sizeof err), ENG_ERR_TOO_LONG);
    cr_assert(strstr(err, "70") && strstr(err, "64"), "message without both lengths: %s", err);
    make_req(&t, &rng, 40, 30, 0.0f, 0);
    t.req.user = &r;
    cr_assert_eq(eng_engine_submit(e, &t.req, &id, err, sizeof err), ENG_ERR_TOO_LONG);
    cr_assert(strstr(err, "40") && strstr(err, "30") && strstr(err, "64"), "message: %s", err);

    make_req(&t, &rng, 10, 4, 0.0f, 0);
    t.req.user = &r;
    t.req.n = 0;
    cr_assert_eq(eng_engine_submit(e, &t.req, &id, err, sizeof err), ENG_ERR_INVALID);
    cr_assert(strstr(err, "n = 0"), "%s", err);
    t.req.n = 1;
    t.prompt[3] = 320;
    cr_assert_eq(eng_engine_submit(e, &t.req, &id, err, sizeof err), ENG_ERR_INVALID);
    cr_assert(strstr(err, "320"), "%s", err);
    t.prompt[3] = 5;
    t.req.sampling.temperature = -1.0f;
    cr_assert_eq(eng_engine_submit(e, &t.req, &id, err, sizeof err), ENG_ERR_INVALID);
    cr_assert(strstr(err, "temperature"), "%s", err);

    /* one running sequence, two waiting: the rest is refused */
    static test_req many[10];
    static result mres[10];
    memset(mres, 0, sizeof mres);
    int accepted = 0, overloaded = 0;
    for (int k = 0; k < 10; k++) {
        make_req(&many[k], &rng, 8, 40, 0.0f, 0);
        many[k].req.ignore_eos = true;
        many[k].req.user = &mres[k];
        int rc = eng_engine_submit(e, &many[k].req, &id, err, sizeof err);
        if (rc == ENG_OK)
            accepted++;
        else {
            cr_assert_eq(rc, ENG_ERR_OVERLOADED);
            cr_assert(strstr(err, "overloaded"), "%s", err);
            overloaded++;
        }
    }
    cr_assert_geq(overloaded, 7, "%d accepted", accepted);
    wait_idle(e);
    for (int k = 0, seen = 0; k < 10 && seen < accepted; k++)
        if (mres[k].n_final) {
            cr_assert_eq(mres[k].n_tokens[0], 40);
            seen++;
        }
    assert_no_pages_used(e);
    eng_engine_destroy(e);
}

/* Destroying a busy engine ends every request with a final CANCELLED event
 * (or its normal end), and a cancel from any thread frees pages at once. */
Test(engine, destroy_and_cancel_free_pages) {
    eng_engine *e = make_engine(FIXTURE, (size_t)64 * FIXTURE_PAGE_BYTES, 0, 8, 64, 16);
    uint64_t rng = 8;
    static test_req reqs[4];
    static result res[4];
    memset(res, 0, sizeof res);
    for (int k = 0; k < 4; k++) {
        make_req(&reqs[k], &rng, 30, 200, 0.0f, 0);
        reqs[k].req.ignore_eos = true;
        reqs[k].req.n = 1 + k % 2;
        submit_ok(e, &reqs[k].req, &res[k]);
    }
    for (int spin = 0; spin < 20000 && res[0].n_tokens[0] < 2; spin++)
        usleep(100);
    eng_engine_cancel(e, res[0].id);
    int seen = res[0].n_events;
    eng_engine_cancel(e, res[0].id); /* twice: a no-op */
    eng_engine_destroy(e);
    cr_assert_eq(res[0].n_events, seen, "events after the cancel returned");
    cr_assert_eq(res[0].n_final, 0);
    for (int k = 1; k < 4; k++) {
        cr_assert_eq(res[k].n_final, reqs[k].req.n, "request %d", k);
        for (int c = 0; c < reqs[k].req.n; c++)
            cr_assert(res[k].finish[c] == ENG_FINISH_CANCELLED || res[k].finish[c] == ENG_FINISH_LENGTH);
    }
}

/* ---- SmolLM2: real text ----------------------------------------------------------------- */

static const char *smollm2_path(void) {
    const char *p = getenv("KVSERVE_MODEL");
    return p && access(p, R_OK) == 0 ? p : NULL;
}

/* Three prompts of real text, greedy, alone and then batched together
 * (chunked prefills of one mixed with the decodes of others); then a stop
 * string made of the end of one word and the start of the next. */
Test(engine, smollm2_batch_and_stop_string) {
    const char *path = smollm2_path();
    if (!path)
        cr_skip_test("KVSERVE_MODEL not set or unreadable");
    /* steps of up to 16 tokens: full groups of 8 take the quantized matmul's
     * group kernel, the rest its row kernel, and both must agree bit for bit */
    eng_engine *e = make_engine(path, (size_t)32 << 20, 512, 8, 16, 8);
    const eng_tokenizer *tok = eng_engine_model(e)->tok;
    static const char *texts[] = {
        "The capital of France is",
        "Once upon a time, there lived an old fisherman who",
        "Water boils at",
    };
    enum { N = 3, GEN = 6 };
    static test_req reqs[N];
    static result alone[N], batched[N];
    memset(alone, 0, sizeof alone);
    memset(batched, 0, sizeof batched);
    char err[256];
    for (int k = 0; k < N; k++) {
        memset(&reqs[k], 0, sizeof reqs[k]);
        reqs[k].n_prompt = eng_tokenize(tok, texts[k], strlen(texts[k]), false, false, reqs[k].prompt, 200, err,
                                        sizeof err);
        cr_assert_gt(reqs[k].n_prompt, 0, "%s", err);
        eng_request *q = &reqs[k].req;
        q->prompt = reqs[k].prompt;
        q->n_prompt = reqs[k].n_prompt;
        eng_sampling_params_default(&q->sampling);
        q->sampling.temperature = 0.0f;
        q->max_tokens = GEN;
        q->n = 1;
        q->ignore_eos = true;
        q->on_event = on_event;
        submit_ok(e, q, &alone[k]);
        wait_idle(e);
    }
    cr_assert(strstr(alone[0].text[0], "Paris"), "'%s'", alone[0].text[0]);
    eng_engine_stats before, after;
    eng_engine_stats_get(e, &before);
    for (int k = 0; k < N; k++)
        submit_ok(e, &reqs[k].req, &batched[k]);
    wait_idle(e);
    eng_engine_stats_get(e, &after);
    cr_assert_gt(after.mixed_steps, before.mixed_steps, "no step mixed prefill and decode");
    for (int k = 0; k < N; k++)
        assert_same_output(&alone[k], &batched[k], k);

    /* stop string across a token boundary on real words */
    const result *f = &alone[1];
    const char *T = f->text[0];
    int k = -1;
    for (int i = 2; i < GEN && k < 0; i++) {
        int a0 = f->delta_end[0][i - 2], a1 = f->delta_end[0][i - 1], b1 = f->delta_end[0][i];
        if (a1 - a0 >= 2 && b1 - a1 >= 2 && T[a1] == ' ')
            k = i;
    }
    cr_assert_geq(k, 0, "no word boundary in '%s'", T);
    int a1 = f->delta_end[0][k - 1];
    char stop[8] = {0};
    memcpy(stop, T + a1 - 2, 4); /* last two letters of a word, the space, the next letter */
    const char *stops[] = {stop};
    reqs[1].req.stop = stops;
    reqs[1].req.n_stop = 1;
    static result stopped;
    memset(&stopped, 0, sizeof stopped);
    submit_ok(e, &reqs[1].req, &stopped);
    wait_idle(e);
    int expect = (int)(strstr(T, stop) - T);
    cr_assert_eq(stopped.finish[0], ENG_FINISH_STOP);
    cr_assert_eq(stopped.n_text[0], expect, "stop '%s' in '%s': got '%s'", stop, T, stopped.text[0]);
    cr_assert_eq(strncmp(stopped.text[0], T, (size_t)expect), 0);
    assert_no_pages_used(e);
    eng_engine_destroy(e);
}

/* ---- priority ------------------------------------------------------------------------ */

enum { N_ORDER = 16 };
static atomic_int order_counter;
static atomic_int first_token_order[N_ORDER]; /* 1-based rank of each request's first token */
static atomic_int order_finals[N_ORDER];
static atomic_int hold_request0; /* request 0's events take 1 ms each while set */

static void order_event(const eng_event *ev, void *user) {
    int k = (int)(intptr_t)user;
    if (k == 0 && atomic_load(&hold_request0))
        usleep(1000); /* slows the engine thread: the queue is built while request 0 runs */
    if (ev->token >= 0 && atomic_load(&first_token_order[k]) == 0)
        atomic_store(&first_token_order[k], atomic_fetch_add(&order_counter, 1) + 1);
    if (ev->finish != ENG_FINISH_NONE)
        atomic_fetch_add(&order_finals[k], 1);
}

/* One sequence at a time (max_seqs 1) while request 0 runs (its events are
 * slowed down meanwhile): requests of priority 3 queue up, then one of priority
 * -2 and one of 0 arrive behind them. Admission follows (priority, arrival):
 * lower value first, FCFS within one. */
Test(engine, priority_admission_order) {
    eng_engine *e = make_engine(FIXTURE, (size_t)64 * FIXTURE_PAGE_BYTES, 0, 1, 64, 16);
    static const int priority[N_ORDER] = {0, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, -2, 3, 0, 3, 3};
    /* request 0 first (it was running), then -2, then 0, then the 3s by arrival */
    static const int expect[N_ORDER] = {0, 11, 13, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 15};
    uint64_t rng = 3;
    static test_req reqs[N_ORDER];
    for (int k = 0; k < N_ORDER; k++) {
        atomic_store(&first_token_order[k], 0);
        atomic_store(&order_finals[k], 0);
    }
    atomic_store(&order_counter, 0);
    atomic_store(&hold_request0, 1);
    char err[256];
    for (int k = 0; k < N_ORDER; k++) {
        make_req(&reqs[k], &rng, 10, k == 0 ? 240 : 3, 0.0f, 0);
        reqs[k].req.ignore_eos = true;
        reqs[k].req.on_event = order_event;
        reqs[k].req.user = (void *)(intptr_t)k;
        reqs[k].req.priority = priority[k];
        cr_assert_eq(eng_engine_submit(e, &reqs[k].req, NULL, err, sizeof err), ENG_OK, "%s", err);
        for (int spin = 0; k == 0 && spin < 20000 && atomic_load(&first_token_order[0]) == 0; spin++)
            usleep(100); /* request 0 runs before the others arrive */
    }
    /* the premise: everything queued while request 0 still held the only slot */
    cr_assert_eq(atomic_load(&order_finals[0]), 0, "request 0 finished before the queue was built");
    atomic_store(&hold_request0, 0);
    wait_idle(e);
    for (int rank = 0; rank < N_ORDER; rank++)
        cr_assert_eq(atomic_load(&first_token_order[expect[rank]]), rank + 1,
                     "request %d (priority %d): admitted %d-th, expected %d-th", expect[rank],
                     priority[expect[rank]], atomic_load(&first_token_order[expect[rank]]), rank + 1);
    assert_no_pages_used(e);
    eng_engine_destroy(e);
}

/* Two long requests of priority 1 (170 positions, 11 pages each), then one of
 * priority 0 (120 positions, 8 pages), submitted last: it is the newest. The
 * pool (14 pages) cannot hold it beside a long one to the end, so decode runs
 * out of pages more than once. The victim is always a priority-1 sequence, never
 * the newest one of priority 0: it runs without a break and finishes first
 * (preempted at about half way, as a newest-first rule would do, it could only
 * come back when a long one had finished). The outputs (greedy, and seeded
 * sampling with penalties) are those of a pool where everything fits, and every
 * page comes back. */
Test(engine, priority_preemption_victim) {
    enum { N = 3, HIGH = 2 };
    static test_req reqs[N];
    static result big[N], small[N];
    memset(big, 0, sizeof big);
    memset(small, 0, sizeof small);
    uint64_t rng = 4711;
    for (int k = 0; k < N; k++) {
        make_req(&reqs[k], &rng, 20, k == HIGH ? 100 : 150, k == 1 ? 0.8f : 0.0f, 90 + (uint64_t)k);
        reqs[k].req.ignore_eos = true;
        reqs[k].req.sampling.repetition_penalty = 1.2f;
        reqs[k].req.priority = k == HIGH ? 0 : 1;
    }
    for (int pass = 0; pass < 2; pass++) {
        result *res = pass ? small : big;
        eng_engine *e = make_engine(FIXTURE, (size_t)(pass ? 14 : 256) * FIXTURE_PAGE_BYTES, 256, 8, 64, 16);
        for (int k = 0; k < N; k++)
            submit_ok(e, &reqs[k].req, &res[k]);
        wait_idle(e);
        double preemptions = metric(e, "kvserve_num_preemptions_total");
        if (pass == 0) {
            cr_assert_eq(preemptions, 0);
        } else {
            cr_assert_geq(preemptions, 2, "the 14-page pool caused %g preemptions", preemptions);
            cr_assert(small[HIGH].final_seq < small[0].final_seq && small[HIGH].final_seq < small[1].final_seq,
                      "the priority-0 request finished after a priority-1 one: it was preempted");
            eng_engine_stats st;
            eng_engine_stats_get(e, &st);
            cr_assert_leq(st.pages_peak, 14);
        }
        for (int k = 0; k < N; k++) {
            cr_assert_eq(res[k].n_final, 1);
            cr_assert_eq(res[k].after_final, 0);
            cr_assert_eq(res[k].n_tokens[0], k == HIGH ? 100 : 150);
        }
        assert_no_pages_used(e);
        eng_engine_destroy(e);
    }
    for (int k = 0; k < N; k++)
        assert_same_output(&big[k], &small[k], k);
}

/* ---- rows as records (eng_cands), as the cuda backend returns them ---------------------- */

/* The same requests with whole rows and with records (the CPU backend
 * reduces its rows, and draws, when KVSERVE_CPU_CANDS=1): the same tokens
 * and texts, greedy, seeded top-k (with top-p and min-p), temperature alone
 * and top-p alone (drawn by the backend), a presence penalty (applied to the
 * row first), n = 2, and a top-k of 200 that needs its whole row beside
 * them in the same steps. */
Test(engine, records_draw_the_rows_tokens) {
    enum { N = 12 };
    static test_req reqs[N];
    static result out[2][N];
    memset(out, 0, sizeof out);
    uint64_t rng = 4242;
    for (int k = 0; k < N; k++) {
        make_req(&reqs[k], &rng, 5 + (int)(rng_next(&rng) % 60), 12 + k, k % 3 ? 0.8f : 0.0f, 500 + (uint64_t)k);
        eng_sampling_params *p = &reqs[k].req.sampling;
        reqs[k].req.ignore_eos = true;
        reqs[k].req.logprobs = k % 2 == 0;
        if (k % 3 == 1)
            p->top_k = 1 + k * 10, p->top_p = 0.9f;
        if (k % 3 == 2)
            p->top_k = 5, p->min_p = 0.05f;
        if (k == 5)
            p->top_k = 0;           /* top-p over the whole row: a draw */
        if (k == 7)
            p->presence_penalty = 0.7f;   /* a penalty: applied to the row before its record */
        if (k == 11)
            p->top_k = 200;               /* top-k above 128: the whole row */
        if (k == 9)
            reqs[k].req.n = 2;
        if (k == 8 || k == 10)
            p->top_k = 0, p->min_p = 0.0f, p->top_p = 1.0f;   /* temperature alone: the backend draws */
        if (k == 10)
            reqs[k].req.n = 2;   /* (its first token from the whole row) */
    }
    uint64_t records[2];
    for (int pass = 0; pass < 2; pass++) {
        setenv("KVSERVE_CPU_CANDS", pass ? "1" : "0", 1);
        eng_engine *e = make_engine(FIXTURE, (size_t)256 * FIXTURE_PAGE_BYTES, 0, 32, 96, 32);
        for (int k = 0; k < N; k++)
            submit_ok(e, &reqs[k].req, &out[pass][k]);
        wait_idle(e);
        eng_engine_stats st;
        eng_engine_stats_get(e, &st);
        records[pass] = st.record_rows;
        cr_assert_gt(st.logit_rows, st.record_rows);
        assert_no_pages_used(e);
        eng_engine_destroy(e);
    }
    cr_assert_eq(records[0], 0);
    cr_assert_gt(records[1], 100, "%llu rows came as records", (unsigned long long)records[1]);
    for (int k = 0; k < N; k++)
        for (int c = 0; c < reqs[k].req.n; c++) {
            const result *a = &out[0][k], *b = &out[1][k];
            cr_assert_eq(a->n_tokens[c], b->n_tokens[c], "request %d choice %d", k, c);
            cr_assert_eq(memcmp(a->tokens[c], b->tokens[c], sizeof(int32_t) * (size_t)a->n_tokens[c]), 0,
                         "request %d choice %d: tokens differ", k, c);
            cr_assert_str_eq(a->text[c], b->text[c]);
            for (int i = 0; i < a->n_tokens[c]; i++)
                cr_assert_float_eq(a->logprobs[c][i], b->logprobs[c][i], 1e-5, "request %d choice %d logprob %d", k,
                                   c, i);
        }
}

/* A bad KVSERVE_CPU_CANDS is refused by name, not taken as off. */
Test(engine, records_switch_refuses_a_bad_value) {
    setenv("KVSERVE_CPU_CANDS", "yes", 1);
    eng_engine_config c;
    eng_engine_config_default(&c);
    c.model_path = FIXTURE;
    c.threads = 1;
    c.kv_memory = (size_t)16 * FIXTURE_PAGE_BYTES;
    c.kv_k = c.kv_v = "f32";
    char err[512] = "";
    eng_engine *e = eng_engine_create(&c, err, sizeof err);
    cr_assert_null(e);
    cr_assert(strstr(err, "KVSERVE_CPU_CANDS=yes"), "message: %s", err);
}

