/* test_sampler.c: tests for engine/sampler.c.
 *
 * The reference for every filtered distribution is an independent, naive
 * implementation in this file written from vLLM's definitions (full sort in
 * double precision; top-k, then top-p removing the ascending-cumsum tail
 * <= 1 - p, then min-p relative to the max probability). Draw frequencies are
 * compared with it by a chi-square test at a 1e-4 false-alarm level (the
 * seeds are fixed, so a pass is reproducible); each such test also checks that
 * the same statistic rejects a nearby wrong distribution. */
#include <criterion/criterion.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampler.h"
#include "engine/sampler_internal.h"

/* ---- helpers ------------------------------------------------------------ */

static uint64_t test_rng = 0x1234567887654321ull;

static double test_uniform(void)
{
    test_rng ^= test_rng << 13;
    test_rng ^= test_rng >> 7;
    test_rng ^= test_rng << 17;
    return ((test_rng >> 11) + 0.5) * 0x1.0p-53;
}

static float test_gauss(void)
{
    double u = test_uniform(), v = test_uniform();
    return (float)(sqrt(-2.0 * log(u)) * cos(2.0 * M_PI * v));
}

static eng_sampling_params params_with(float temperature, int top_k, float top_p, float min_p,
                                       uint64_t seed)
{
    eng_sampling_params p;
    eng_sampling_params_default(&p);
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = seed;
    return p;
}

/* A copy of src[0, n) in *buf (grown; kept across calls: each Criterion test
 * runs in its own process). */
static float *copy_into(float **buf, int *cap, const float *src, int n)
{
    if (n > *cap) {
        free(*buf);
        *buf = malloc((size_t)n * sizeof **buf);
        cr_assert_not_null(*buf);
        *cap = n;
    }
    memcpy(*buf, src, (size_t)n * sizeof **buf);
    return *buf;
}

/* Samples once from a copy of logits (the sampler modifies its input). */
static int32_t sample_copy(eng_sampler *s, const float *logits, int n, float *logprob)
{
    static float *row;
    static int cap;
    return eng_sampler_sample(s, copy_into(&row, &cap, logits, n), logprob);
}

typedef struct {
    double v;
    int id;
} ref_entry;

static int ref_cmp(const void *a, const void *b)
{
    const ref_entry *x = a, *y = b;
    if (x->v != y->v)
        return x->v > y->v ? -1 : 1;
    return x->id - y->id;
}

/* The final distribution by the definitions: probs (n) receives p(token),
 * 0 for removed tokens. */
static void reference_probs(const float *logits, int n, float temperature, int top_k,
                            float top_p, float min_p, double *probs)
{
    ref_entry *e = malloc((size_t)n * sizeof *e);
    cr_assert_not_null(e);
    for (int i = 0; i < n; i++)
        e[i] = (ref_entry){(double)logits[i] / temperature, i};
    qsort(e, (size_t)n, sizeof *e, ref_cmp);
    int kept = (top_k > 0 && top_k < n) ? top_k : n;
    double z = 0.0;
    for (int i = 0; i < kept; i++)
        z += exp(e[i].v - e[0].v);
    double *p = malloc((size_t)kept * sizeof *p);
    cr_assert_not_null(p);
    for (int i = 0; i < kept; i++)
        p[i] = exp(e[i].v - e[0].v) / z;
    if (top_p < 1.0f) {
        /* Ascending cumulative sum; drop while it stays <= 1 - top_p; the best
         * token always stays. */
        double cum = 0.0;
        int drop = 0;
        for (int i = kept - 1; i > 0; i--) {
            cum += p[i];
            if (cum <= 1.0 - top_p)
                drop++;
            else
                break;
        }
        kept -= drop;
    }
    if (min_p > 0.0f) {
        int k = 0;
        while (k < kept && p[k] >= min_p * p[0])
            k++;
        kept = k;
    }
    double total = 0.0;
    for (int i = 0; i < kept; i++)
        total += p[i];
    for (int i = 0; i < n; i++)
        probs[i] = 0.0;
    for (int i = 0; i < kept; i++)
        probs[e[i].id] = p[i] / total;
    free(p);
    free(e);
}

/* Chi-square statistic of counts against probabilities; categories with an
 * expected count under 5 are pooled. *df receives the degrees of freedom. */
static double chi_square(const long *counts, const double *probs, int n, long draws, int *df)
{
    double stat = 0.0, pool_obs = 0.0, pool_exp = 0.0;
    int cats = 0;
    for (int i = 0; i < n; i++) {
        double expect = probs[i] * (double)draws;
        if (expect >= 5.0) {
            stat += (counts[i] - expect) * (counts[i] - expect) / expect;
            cats++;
        } else {
            pool_obs += counts[i];
            pool_exp += expect;
        }
    }
    if (pool_exp > 0.0) {
        stat += (pool_obs - pool_exp) * (pool_obs - pool_exp) / (pool_exp < 1.0 ? 1.0 : pool_exp);
        cats++;
    }
    *df = cats - 1;
    return stat;
}

/* Upper 1e-4 quantile of chi-square(df) (Wilson-Hilferty). */
static double chi_square_limit(int df)
{
    double z = 3.719, k = df < 1 ? 1 : df;
    double t = 1.0 - 2.0 / (9.0 * k) + z * sqrt(2.0 / (9.0 * k));
    return k * t * t * t;
}

/* Draws `draws` tokens and checks: every token has reference probability > 0,
 * its logprob matches the reference, and the frequencies pass chi-square. */
static void check_against_reference(const float *logits, int n, eng_sampling_params p,
                                    long draws)
{
    double *probs = malloc((size_t)n * sizeof *probs);
    long *counts = calloc((size_t)n, sizeof *counts);
    cr_assert(probs && counts);
    reference_probs(logits, n, p.temperature, p.top_k, p.top_p, p.min_p, probs);
    eng_sampler *s = eng_sampler_create(&p, n);
    cr_assert_not_null(s);
    for (long d = 0; d < draws; d++) {
        float lp;
        int32_t id = sample_copy(s, logits, n, &lp);
        cr_assert(id >= 0 && id < n);
        cr_assert(probs[id] > 0.0, "token %d is outside the reference's kept set", id);
        cr_assert_float_eq(lp, log(probs[id]), 2e-4, "logprob of %d: %f vs %f", id, lp,
                           log(probs[id]));
        counts[id]++;
    }
    int df;
    double stat = chi_square(counts, probs, n, draws, &df);
    cr_assert(stat < chi_square_limit(df), "chi-square %.1f >= %.1f (df %d)", stat,
              chi_square_limit(df), df);
    eng_sampler_free(s);
    free(counts);
    free(probs);
}

/* ---- greedy and top-k --------------------------------------------------- */

Test(sampler, greedy_picks_argmax_lowest_id_and_log_softmax)
{
    const float logits[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.5f, 0.0f};
    eng_sampling_params p = params_with(0.0f, 0, 1.0f, 0.0f, 7);
    eng_sampler *s = eng_sampler_create(&p, 6);
    cr_assert_not_null(s);
    float lp;
    cr_assert_eq(sample_copy(s, logits, 6, &lp), 1);
    double z = 0.0;
    for (int i = 0; i < 6; i++)
        z += exp(logits[i]);
    cr_assert_float_eq(lp, 2.0 - log(z), 1e-5);
    eng_sampler_free(s);
}

Test(sampler, top_k_1_equals_greedy)
{
    enum { N = 4096 };
    float *logits = malloc(N * sizeof *logits);
    eng_sampling_params pg = params_with(0.0f, 0, 1.0f, 0.0f, 1);
    eng_sampling_params pk = params_with(1.3f, 1, 0.95f, 0.0f, 99);
    eng_sampler *g = eng_sampler_create(&pg, N), *k = eng_sampler_create(&pk, N);
    cr_assert(logits && g && k);
    for (int row = 0; row < 50; row++) {
        for (int i = 0; i < N; i++)
            logits[i] = 3.0f * test_gauss();
        if (row % 5 == 0)
            logits[N - 7] = logits[13] = 100.0f; /* a tie: the lower id wins */
        float lp;
        int32_t want = sample_copy(g, logits, N, NULL);
        cr_assert_eq(sample_copy(k, logits, N, &lp), want, "row %d", row);
        cr_assert_float_eq(lp, 0.0f, 1e-7); /* a single kept token */
        if (row % 5 == 0)
            cr_assert_eq(want, 13);
    }
    eng_sampler_free(g);
    eng_sampler_free(k);
    free(logits);
}

Test(sampler, top_k_distribution_matches_reference)
{
    enum { N = 3000 };
    float logits[N];
    for (int i = 0; i < N; i++)
        logits[i] = 1.5f * test_gauss();
    check_against_reference(logits, N, params_with(0.8f, 20, 1.0f, 0.0f, 5), 10000);
    /* A large k goes through the same heap. */
    check_against_reference(logits, N, params_with(1.0f, 2500, 1.0f, 0.0f, 6), 1500);
}

/* ---- top-p -------------------------------------------------------------- */

Test(sampler, top_p_keeps_exactly_the_nucleus)
{
    /* p = .4 .25 .15 .1 .06 .04, cumulative .4 .65 .8 .9 .96 1: the nucleus
     * is the shortest prefix reaching top_p (no case sits on a boundary). */
    const double probs[6] = {0.40, 0.25, 0.15, 0.10, 0.06, 0.04};
    float logits[6];
    for (int i = 0; i < 6; i++)
        logits[i] = (float)log(probs[i]);
    struct {
        float top_p;
        int nucleus;
    } cases[] = {{0.75f, 3}, {0.5f, 2}, {0.35f, 1}, {0.92f, 5}, {0.99f, 6}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        eng_sampling_params p = params_with(1.0f, 0, cases[c].top_p, 0.0f, 11 + c);
        eng_sampler *s = eng_sampler_create(&p, 6);
        cr_assert_not_null(s);
        double mass = 0.0;
        for (int i = 0; i < cases[c].nucleus; i++)
            mass += probs[i];
        long counts[6] = {0};
        for (int d = 0; d < 6000; d++) {
            float lp;
            int32_t id = sample_copy(s, logits, 6, &lp);
            cr_assert(id >= 0 && id < cases[c].nucleus, "top_p %.2f drew %d", cases[c].top_p,
                      id);
            cr_assert_float_eq(lp, log(probs[id] / mass), 1e-5);
            counts[id]++;
        }
        for (int i = 0; i < cases[c].nucleus; i++)
            cr_assert(counts[i] > 0, "top_p %.2f never drew %d", cases[c].top_p, i);
        eng_sampler_free(s);
    }
}

Test(sampler, top_p_large_vocab_matches_reference)
{
    enum { N = 49152 };
    float *logits = malloc(N * sizeof *logits);
    cr_assert_not_null(logits);
    for (int i = 0; i < N; i++)
        logits[i] = 2.5f * test_gauss();
    check_against_reference(logits, N, params_with(1.0f, 0, 0.9f, 0.0f, 21), 1000);
    /* A peaked row: few tokens in the nucleus. */
    for (int i = 0; i < 40; i++)
        logits[i * 1000 + 3] = 14.0f + 0.1f * (float)i;
    check_against_reference(logits, N, params_with(0.7f, 0, 0.8f, 0.0f, 22), 2000);
    free(logits);
}

Test(sampler, top_p_boundary_inside_a_crowded_bucket)
{
    /* 300 near-equal logits (pairs exactly tied) scattered over the ids, the
     * rest far below: the nucleus ends among tokens that share one histogram
     * bucket and differ by 1e-4, and a tie there goes to the lower id. One
     * token more or less would move every logprob by ~0.7%. */
    enum { N = 1000 };
    float logits[N];
    int order[N];
    for (int i = 0; i < N; i++)
        order[i] = i;
    for (int i = N - 1; i > 0; i--) {
        int j = (int)(test_uniform() * (i + 1));
        int t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (int i = 0; i < N; i++)
        logits[order[i]] = i < 300 ? -(float)(i / 2) * 1e-4f : -20.0f;
    check_against_reference(logits, N, params_with(1.0f, 0, 0.503f, 0.0f, 23), 3000);
    check_against_reference(logits, N, params_with(1.0f, 200, 0.7f, 0.0f, 24), 3000);
}

/* ---- min-p -------------------------------------------------------------- */

Test(sampler, min_p_excludes_exactly_the_tokens_below_threshold)
{
    /* max p = .5; min_p .2 -> threshold .1: tokens of p .11 and .1002 stay,
     * .0998 and below go. */
    const double probs[7] = {0.50, 0.11, 0.1002, 0.0998, 0.08, 0.07, 0.05};
    float logits[7];
    for (int i = 0; i < 7; i++)
        logits[i] = (float)log(probs[i]);
    eng_sampling_params p = params_with(1.0f, 0, 1.0f, 0.2f, 31);
    eng_sampler *s = eng_sampler_create(&p, 7);
    cr_assert_not_null(s);
    long counts[7] = {0};
    for (int d = 0; d < 6000; d++) {
        float lp;
        int32_t id = sample_copy(s, logits, 7, &lp);
        cr_assert(id <= 2, "min_p drew %d (p %.2f < 0.1)", id, probs[id]);
        cr_assert_float_eq(lp, log(probs[id] / 0.7102), 1e-5);
        counts[id]++;
    }
    cr_assert(counts[0] > 0 && counts[1] > 0 && counts[2] > 0);
    eng_sampler_free(s);
}

Test(sampler, combined_filters_match_reference)
{
    enum { N = 2000 };
    float logits[N];
    for (int i = 0; i < N; i++)
        logits[i] = 2.0f * test_gauss();
    check_against_reference(logits, N, params_with(0.9f, 50, 0.85f, 0.05f, 41), 8000);
    check_against_reference(logits, N, params_with(1.2f, 0, 0.9f, 0.02f, 42), 8000);
    check_against_reference(logits, N, params_with(0.6f, 0, 1.0f, 0.1f, 43), 8000);
}

/* ---- temperature -------------------------------------------------------- */

Test(sampler, temperature_frequencies_match_softmax)
{
    const float logits[8] = {1.0f, 0.2f, -0.5f, 2.0f, 0.0f, 1.5f, -1.0f, 0.7f};
    const float temps[3] = {0.7f, 1.0f, 2.5f};
    enum { DRAWS = 40000 };
    for (int t = 0; t < 3; t++) {
        eng_sampling_params p = params_with(temps[t], 0, 1.0f, 0.0f, 51 + t);
        eng_sampler *s = eng_sampler_create(&p, 8);
        cr_assert_not_null(s);
        long counts[8] = {0};
        for (int d = 0; d < DRAWS; d++)
            counts[sample_copy(s, logits, 8, NULL)]++;
        double probs[8], wrong[8];
        reference_probs(logits, 8, temps[t], 0, 1.0f, 0.0f, probs);
        reference_probs(logits, 8, temps[t] * 1.15f, 0, 1.0f, 0.0f, wrong);
        int df;
        double stat = chi_square(counts, probs, 8, DRAWS, &df);
        cr_assert(stat < chi_square_limit(df), "T=%.1f: chi-square %.1f", temps[t], stat);
        /* The test has the power to see a 15% temperature error. */
        double off = chi_square(counts, wrong, 8, DRAWS, &df);
        cr_assert(off > chi_square_limit(df), "T=%.1f: wrong T not rejected (%.1f)", temps[t],
                  off);
        eng_sampler_free(s);
    }
}

/* ---- penalties ---------------------------------------------------------- */

/* Greedy sample with logprob after the given accepts; returns the token. */
static int32_t penalized_greedy(eng_sampling_params p, const float *logits, int n,
                                const int32_t *prompt, int n_prompt, const int32_t *gen,
                                int n_gen, float *lp)
{
    p.temperature = 0.0f;
    eng_sampler *s = eng_sampler_create(&p, n);
    cr_assert_not_null(s);
    for (int i = 0; i < n_prompt; i++)
        eng_sampler_accept(s, prompt[i], false);
    for (int i = 0; i < n_gen; i++)
        eng_sampler_accept(s, gen[i], true);
    int32_t id = sample_copy(s, logits, n, lp);
    eng_sampler_free(s);
    return id;
}

static double log_softmax_at(const double *l, int n, int i)
{
    double m = l[0], z = 0.0;
    for (int j = 1; j < n; j++)
        m = l[j] > m ? l[j] : m;
    for (int j = 0; j < n; j++)
        z += exp(l[j] - m);
    return l[i] - m - log(z);
}

Test(sampler, repetition_penalty_divides_positive_multiplies_negative)
{
    eng_sampling_params p = params_with(0.0f, 0, 1.0f, 0.0f, 0);
    p.repetition_penalty = 2.0f;
    float lp;
    /* Positive: token 0 (3.0, seen in the prompt) -> 1.5, so token 1 wins. */
    const float pos[4] = {3.0f, 2.0f, -1.0f, 1.9f};
    const int32_t prompt[3] = {0, 0, 0}; /* repeated: still penalized once */
    cr_assert_eq(penalized_greedy(p, pos, 4, prompt, 3, NULL, 0, &lp), 1);
    const double want_pos[4] = {1.5, 2.0, -1.0, 1.9};
    cr_assert_float_eq(lp, log_softmax_at(want_pos, 4, 1), 1e-5);
    /* Negative: token 0 (-0.5, generated) -> -1.0, token 2 (prompt) -> -6. */
    const float neg[4] = {-0.5f, -0.8f, -3.0f, -2.0f};
    const int32_t gen0[1] = {0}, prompt2[1] = {2};
    cr_assert_eq(penalized_greedy(p, neg, 4, prompt2, 1, gen0, 1, &lp), 1);
    const double want_neg[4] = {-1.0, -0.8, -6.0, -2.0};
    cr_assert_float_eq(lp, log_softmax_at(want_neg, 4, 1), 1e-5);
    /* Penalty < 1 rewards repetition the same way. */
    p.repetition_penalty = 0.5f;
    const float up[4] = {1.0f, 1.5f, 0.0f, 0.0f};
    cr_assert_eq(penalized_greedy(p, up, 4, gen0, 1, NULL, 0, &lp), 0);
    const double want_up[4] = {2.0, 1.5, 0.0, 0.0};
    cr_assert_float_eq(lp, log_softmax_at(want_up, 4, 0), 1e-5);
}

Test(sampler, frequency_and_presence_penalties)
{
    const float logits[4] = {1.0f, 0.9f, 0.0f, -0.2f};
    const int32_t gen[4] = {0, 3, 0, 0}; /* token 0 three times, token 3 once */
    const int32_t prompt[1] = {1};       /* prompt tokens: no frequency/presence */
    float lp;
    eng_sampling_params p = params_with(0.0f, 0, 1.0f, 0.0f, 0);

    p.frequency_penalty = 0.05f; /* 1.0 - 3 * .05 = .85 < .9 */
    cr_assert_eq(penalized_greedy(p, logits, 4, prompt, 1, gen, 4, &lp), 1);
    const double want_f[4] = {0.85, 0.9, 0.0, -0.25};
    cr_assert_float_eq(lp, log_softmax_at(want_f, 4, 1), 1e-5);

    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.05f; /* once, not per count: .95 > .9 */
    cr_assert_eq(penalized_greedy(p, logits, 4, prompt, 1, gen, 4, &lp), 0);
    const double want_p[4] = {0.95, 0.9, 0.0, -0.25};
    cr_assert_float_eq(lp, log_softmax_at(want_p, 4, 0), 1e-5);

    p.presence_penalty = -1.5f; /* negative values encourage */
    cr_assert_eq(penalized_greedy(p, logits, 4, prompt, 1, gen, 4, &lp), 0);
    const double want_n[4] = {2.5, 0.9, 0.0, 1.3};
    cr_assert_float_eq(lp, log_softmax_at(want_n, 4, 0), 1e-5);
}

Test(sampler, penalties_compose_repetition_first)
{
    /* 3.0 with repetition 2, count 2, frequency .1, presence .3:
     * 3/2 - 2*.1 - .3 = 1.0 (subtracting first would give 1.25). */
    const float logits[3] = {3.0f, 0.5f, 0.0f};
    const int32_t gen[2] = {0, 0};
    eng_sampling_params p = params_with(0.0f, 0, 1.0f, 0.0f, 0);
    p.repetition_penalty = 2.0f;
    p.frequency_penalty = 0.1f;
    p.presence_penalty = 0.3f;
    float lp;
    cr_assert_eq(penalized_greedy(p, logits, 3, NULL, 0, gen, 2, &lp), 0);
    const double want[3] = {1.0, 0.5, 0.0};
    cr_assert_float_eq(lp, log_softmax_at(want, 3, 0), 1e-5);
}

Test(sampler, penalties_feed_the_random_path)
{
    /* With temperature 1 the logprob of the drawn token is the softmax of the
     * penalized logits. */
    const float logits[3] = {2.0f, 1.0f, 0.0f};
    eng_sampling_params p = params_with(1.0f, 0, 1.0f, 0.0f, 3);
    p.frequency_penalty = 0.5f;
    eng_sampler *s = eng_sampler_create(&p, 3);
    cr_assert_not_null(s);
    eng_sampler_accept(s, 0, true);
    eng_sampler_accept(s, 0, true);
    eng_sampler_accept(s, -5, true);    /* ignored */
    eng_sampler_accept(s, 3, false);    /* ignored */
    const double pen[3] = {1.0, 1.0, 0.0};
    for (int d = 0; d < 50; d++) {
        float lp;
        int32_t id = sample_copy(s, logits, 3, &lp);
        cr_assert_float_eq(lp, log_softmax_at(pen, 3, id), 1e-5);
    }
    eng_sampler_free(s);
}

/* ---- seeds and streams -------------------------------------------------- */

static void draw_sequence(eng_sampler *s, const float *logits, int n, int32_t *out, int len)
{
    for (int i = 0; i < len; i++)
        out[i] = sample_copy(s, logits, n, NULL);
}

Test(sampler, same_seed_same_sequence_different_seed_different)
{
    enum { N = 1000, LEN = 64 };
    float logits[N];
    for (int i = 0; i < N; i++)
        logits[i] = test_gauss();
    eng_sampling_params p = params_with(1.0f, 0, 0.95f, 0.0f, 12345);
    int32_t a[LEN], b[LEN], c[LEN], s1[LEN], s2[LEN];
    eng_sampler *sa = eng_sampler_create(&p, N), *sb = eng_sampler_create(&p, N);
    eng_sampler *st0 = eng_sampler_create_stream(&p, N, 0);
    eng_sampler *st1 = eng_sampler_create_stream(&p, N, 1);
    eng_sampler *st2 = eng_sampler_create_stream(&p, N, 2);
    p.seed = 12346;
    eng_sampler *sc = eng_sampler_create(&p, N);
    cr_assert(sa && sb && sc && st0 && st1 && st2);
    draw_sequence(sa, logits, N, a, LEN);
    draw_sequence(sb, logits, N, b, LEN);
    draw_sequence(sc, logits, N, c, LEN);
    cr_assert_arr_eq(a, b, sizeof a);
    cr_assert_arr_neq(a, c, sizeof a);
    /* Stream 0 is the plain sampler; other streams differ from it and from
     * each other. */
    draw_sequence(st0, logits, N, s1, LEN);
    cr_assert_arr_eq(a, s1, sizeof a);
    draw_sequence(st1, logits, N, s1, LEN);
    draw_sequence(st2, logits, N, s2, LEN);
    cr_assert_arr_neq(a, s1, sizeof a);
    cr_assert_arr_neq(s1, s2, sizeof a);
    eng_sampler_free(sa);
    eng_sampler_free(sb);
    eng_sampler_free(sc);
    eng_sampler_free(st0);
    eng_sampler_free(st1);
    eng_sampler_free(st2);
}

/* ---- parameters and robustness ----------------------------------------- */

Test(sampler, defaults_are_valid_and_off)
{
    eng_sampling_params p;
    eng_sampling_params_default(&p);
    cr_assert_null(eng_sampling_params_check(&p));
    cr_assert_float_eq(p.temperature, 1.0f, 0.0f);
    cr_assert_float_eq(p.top_p, 1.0f, 0.0f);
    cr_assert_float_eq(p.repetition_penalty, 1.0f, 0.0f);
    cr_assert(p.top_k <= 0 && p.min_p == 0.0f && p.presence_penalty == 0.0f &&
              p.frequency_penalty == 0.0f);
}

Test(sampler, invalid_params_rejected_naming_the_field)
{
    eng_sampling_params base;
    eng_sampling_params_default(&base);
    struct bad {
        const char *field;
        eng_sampling_params p;
    } bad[32];
    int nb = 0;
#define BAD(field_name, member, value)                  \
    do {                                                \
        bad[nb].field = field_name;                     \
        bad[nb].p = base;                               \
        bad[nb].p.member = value;                       \
        nb++;                                           \
    } while (0)
    BAD("temperature", temperature, NAN);
    BAD("temperature", temperature, -0.1f);
    BAD("temperature", temperature, INFINITY);
    BAD("top_p", top_p, 0.0f);
    BAD("top_p", top_p, 1.0001f);
    BAD("top_p", top_p, NAN);
    BAD("top_p", top_p, -0.5f);
    BAD("min_p", min_p, -0.01f);
    BAD("min_p", min_p, 1.5f);
    BAD("min_p", min_p, NAN);
    BAD("repetition_penalty", repetition_penalty, 0.0f);
    BAD("repetition_penalty", repetition_penalty, -1.0f);
    BAD("repetition_penalty", repetition_penalty, NAN);
    BAD("repetition_penalty", repetition_penalty, INFINITY);
    BAD("presence_penalty", presence_penalty, 2.5f);
    BAD("presence_penalty", presence_penalty, NAN);
    BAD("frequency_penalty", frequency_penalty, -2.01f);
    BAD("frequency_penalty", frequency_penalty, NAN);
#undef BAD
    for (int i = 0; i < nb; i++) {
        const char *msg = eng_sampling_params_check(&bad[i].p);
        cr_assert_not_null(msg, "case %d (%s) accepted", i, bad[i].field);
        cr_assert(strstr(msg, bad[i].field), "case %d: '%s' does not name %s", i, msg,
                  bad[i].field);
        cr_assert_null(eng_sampler_create(&bad[i].p, 10));
    }
    /* Edges that are valid. */
    eng_sampling_params ok = base;
    ok.top_p = 1.0f;
    ok.min_p = 1.0f;
    ok.top_k = -1;
    ok.temperature = 0.0f;
    ok.presence_penalty = -2.0f;
    ok.frequency_penalty = 2.0f;
    cr_assert_null(eng_sampling_params_check(&ok));
    cr_assert_null(eng_sampler_create(&base, 0));
}

Test(sampler, nan_and_infinite_logits)
{
    float logits[5] = {NAN, 1.0f, NAN, 0.5f, -INFINITY};
    eng_sampling_params p = params_with(1.0f, 0, 0.9f, 0.0f, 61);
    eng_sampler *s = eng_sampler_create(&p, 5);
    cr_assert_not_null(s);
    for (int d = 0; d < 200; d++) {
        int32_t id = sample_copy(s, logits, 5, NULL);
        cr_assert(id == 1 || id == 3, "drew %d", id);
    }
    /* Nothing finite: uniform, never a crash or an out-of-range id. */
    float none[5] = {NAN, -INFINITY, NAN, -INFINITY, NAN};
    long counts[5] = {0};
    for (int d = 0; d < 500; d++) {
        int32_t id = sample_copy(s, none, 5, NULL);
        cr_assert(id >= 0 && id < 5);
        counts[id]++;
    }
    for (int i = 0; i < 5; i++)
        cr_assert(counts[i] > 0);
    eng_sampler_free(s);
    /* +inf counts as the largest finite logit: it wins greedy and sampling. */
    const float inf_row[3] = {0.0f, INFINITY, 5.0f};
    eng_sampling_params pg = params_with(0.0f, 0, 1.0f, 0.0f, 62);
    eng_sampler *g = eng_sampler_create(&pg, 3);
    cr_assert_not_null(g);
    cr_assert_eq(sample_copy(g, inf_row, 3, NULL), 1);
    eng_sampler_free(g);
    eng_sampler *t = eng_sampler_create(&p, 3);
    cr_assert_not_null(t);
    cr_assert_eq(sample_copy(t, inf_row, 3, NULL), 1);
    eng_sampler_free(t);
}

/* ---- the AVX2 kernels against the scalar loops ------------------------- */

Test(sampler, avx2_and_scalar_paths_agree)
{
    enum { N = 4099, DRAWS = 300 }; /* not a multiple of 8: the masked tail */
    float *logits = malloc(N * sizeof *logits);
    cr_assert_not_null(logits);
    for (int i = 0; i < N; i++)
        logits[i] = 2.5f * test_gauss();
    logits[N - 1] = 9.0f; /* the maximum in the tail */
    logits[7] = -INFINITY;
    const eng_sampling_params cfgs[3] = {params_with(0.0f, 0, 1.0f, 0.0f, 71),
                                         params_with(0.8f, 0, 0.9f, 0.0f, 72),
                                         params_with(1.3f, 500, 1.0f, 0.01f, 73)};
    for (int c = 0; c < 3; c++) {
        int32_t ids[2][DRAWS];
        float lps[2][DRAWS];
        for (int scalar = 0; scalar < 2; scalar++) {
            eng__sampler_force_scalar(scalar);
            eng_sampler *s = eng_sampler_create(&cfgs[c], N);
            cr_assert_not_null(s);
            for (int d = 0; d < DRAWS; d++)
                ids[scalar][d] = sample_copy(s, logits, N, &lps[scalar][d]);
            eng_sampler_free(s);
        }
        eng__sampler_force_scalar(false);
        for (int d = 0; d < DRAWS; d++) {
            cr_assert_eq(ids[0][d], ids[1][d], "config %d draw %d", c, d);
            cr_assert_float_eq(lps[0][d], lps[1][d], 1e-5, "config %d draw %d", c, d);
            cr_assert_neq(ids[0][d], 7);
        }
    }
    /* The scalar path also passes the distribution check. */
    eng__sampler_force_scalar(true);
    check_against_reference(logits, N, params_with(1.0f, 0, 0.95f, 0.0f, 74), 2000);
    eng__sampler_force_scalar(false);
    free(logits);
}

/* ---- records of a row (eng_cands) --------------------------------------- */

/* A row of n logits with ties (values on a 1/4 grid), and, by `kind`, NaN,
 * +-inf, or nothing finite at all. */
static void cands_row(float *row, int n, int kind)
{
    for (int i = 0; i < n; i++)
        row[i] = roundf(8.0f * test_gauss()) * 0.25f;
    if (kind == 1) {
        row[n / 3] = NAN;
        row[n / 2] = INFINITY;
        row[n - 1] = -INFINITY;
        row[1] = INFINITY;   /* two +inf: both FLT_MAX, the lower id first */
    } else if (kind == 2) {
        for (int i = 0; i < n; i++)
            row[i] = i % 2 ? NAN : -INFINITY;
    }
}

static float sane(float l)
{
    return isnan(l) ? -INFINITY : l > FLT_MAX ? FLT_MAX : l;
}

Test(sampler, cands_reduce_is_the_sorted_best_of_the_row)
{
    const int ns[3] = {130, 1000, 49152}, ks[5] = {1, 2, 7, 40, 128};
    for (int in = 0; in < 3; in++) {
        const int n = ns[in];
        float *row = malloc((size_t)n * sizeof *row);
        ref_entry *ref = malloc((size_t)n * sizeof *ref);
        cr_assert(row && ref);
        for (int kind = 0; kind < 3; kind++) {
            cands_row(row, n, kind);
            /* the reference: a full sort of the sanitized row in double */
            double max = -INFINITY;
            for (int i = 0; i < n; i++)
                max = fmax(max, sane(row[i]));
            const bool none = max == -INFINITY;
            double sum = 0.0;
            for (int i = 0; i < n; i++) {
                ref[i] = (ref_entry){.v = none ? 0.0 : sane(row[i]), .id = i};
                sum += none ? 1.0 : exp(ref[i].v - max);
            }
            qsort(ref, (size_t)n, sizeof *ref, ref_cmp);
            for (int ik = 0; ik < 5; ik++) {
                eng_cands c;
                memset(&c, 0xa5, sizeof c);
                cr_assert_eq(eng_cands_reduce(row, n, ks[ik], &c), 0);
                cr_assert_eq(c.n, ks[ik]);
                cr_assert_eq(c.max, none ? 0.0f : (float)max, "n %d kind %d", n, kind);
                cr_assert(fabs(c.sum_exp - sum) <= 1e-6 * sum, "n %d kind %d: sum %.9g, expected %.9g", n, kind,
                          c.sum_exp, sum);
                for (int i = 0; i < ks[ik]; i++) {
                    cr_assert_eq(c.c[i].id, ref[i].id, "n %d kind %d k %d entry %d", n, kind, ks[ik], i);
                    cr_assert_eq(c.c[i].logit, (float)ref[i].v);
                }
            }
        }
        eng_cands c;
        cr_assert_eq(eng_cands_reduce(row, n, 0, &c), -1);
        cr_assert_eq(eng_cands_reduce(row, n, ENG_CANDS_MAX + 1, &c), -1);
        free(row);
        free(ref);
    }
}

Test(sampler, cands_k_names_what_a_record_serves)
{
    const struct {
        eng_sampling_params p;
        int k;
    } cases[] = {
        {params_with(0.0f, 0, 1.0f, 0.0f, 1), 1},     {params_with(0.0f, 50, 0.5f, 0.1f, 1), 1},
        {params_with(0.7f, 40, 0.9f, 0.05f, 1), 40},  {params_with(1.0f, 128, 1.0f, 0.0f, 1), 128},
        {params_with(1.0f, 129, 1.0f, 0.0f, 1), 0},   {params_with(1.0f, 0, 0.9f, 0.0f, 1), ENG_CANDS_DRAW},
        {params_with(1.0f, 0, 1.0f, 0.05f, 1), ENG_CANDS_DRAW}, {params_with(1.0f, 1000, 1.0f, 0.0f, 1), ENG_CANDS_DRAW},
        {params_with(0.6f, 0, 1.0f, 0.0f, 1), ENG_CANDS_DRAW}, {params_with(1.0f, 1000, 0.9f, 0.1f, 1), ENG_CANDS_DRAW},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        eng_sampler *s = eng_sampler_create(&cases[i].p, 1000);
        cr_assert_not_null(s);
        cr_assert_eq(eng_sampler_cands_k(s), cases[i].k, "case %zu", i);
        eng_sampler_free(s);
    }
    /* top_k at or past the vocabulary is no top-k (a plain draw); penalties
     * leave the answer as it is (the record is of the penalized row) */
    eng_sampling_params p = params_with(1.0f, 100, 1.0f, 0.0f, 1);
    eng_sampler *s = eng_sampler_create(&p, 100);
    cr_assert_eq(eng_sampler_cands_k(s), ENG_CANDS_DRAW);
    eng_sampler_free(s);
    p = params_with(0.8f, 0, 1.0f, 0.0f, 1);
    p.repetition_penalty = 1.1f;
    s = eng_sampler_create(&p, 1000);
    cr_assert_eq(eng_sampler_cands_k(s), ENG_CANDS_DRAW);
    cr_assert(eng_sampler_has_penalties(s));
    eng_sampler_free(s);
    p = params_with(0.0f, 0, 1.0f, 0.0f, 1);
    cr_assert(!eng_sampler_has_penalties(s = eng_sampler_create(&p, 1000)));
    eng_sampler_free(s);
    p.presence_penalty = 0.5f;
    s = eng_sampler_create(&p, 1000);
    cr_assert_eq(eng_sampler_cands_k(s), 1);
    cr_assert(eng_sampler_has_penalties(s));
    eng_sampler_free(s);
}

/* One draw of a (from the whole row) and of b (from the row's record or
 * draw, as a backend makes it: b's penalties applied first) with the same
 * parameters and seed: the same token and logprob (within tol). Returns the
 * token; the record path's entries into ent (room for n). */
static int32_t draw_both(eng_sampler *a, eng_sampler *b, const float *row, int n, eng_pen_entry *ent, double tol,
                         const char *what, int d)
{
    static float *buf;
    static int cap;
    float *pen_row = copy_into(&buf, &cap, row, n);
    if (eng_sampler_has_penalties(b)) {
        eng_penalties pp;
        cr_assert_leq(eng_sampler_penalties(b, ent, n, &pp), n);
        eng_penalties_apply(pen_row, &pp);
    }
    const int k = eng_sampler_cands_k(b);
    eng_cands rec;
    if (k == ENG_CANDS_DRAW) {
        eng_draw dr;
        eng_sampler_take_draw(b, &dr);
        cr_assert_eq(eng_cands_draw(pen_row, n, &dr, &rec), 0);
        cr_assert_eq(rec.n, 1);
    } else {
        cr_assert_gt(k, 0);
        cr_assert_eq(eng_cands_reduce(pen_row, n, k, &rec), 0);
    }
    float lp_row, lp_rec;
    const int32_t t_row = sample_copy(a, row, n, &lp_row);
    const int32_t t_rec = eng_sampler_sample_cands(b, &rec, &lp_rec);
    cr_assert_eq(t_row, t_rec, "%s draw %d", what, d);
    cr_assert_float_eq(lp_row, lp_rec, tol, "%s draw %d", what, d);
    return t_row;
}

/* DRAWS rows of every kind through draw_both for each configuration: the
 * same tokens, the tokens varying with the rows (at least min_distinct
 * changes), and the streams in step afterwards. */
static void same_tokens(const eng_sampling_params *cfgs, size_t n_cfgs, int k_want, double tol, int min_distinct)
{
    enum { N = 49152, DRAWS = 120 };
    float *row = malloc((size_t)N * sizeof *row);
    cr_assert_not_null(row);
    for (size_t c = 0; c < n_cfgs; c++) {
        eng_sampler *a = eng_sampler_create(&cfgs[c], N), *b = eng_sampler_create(&cfgs[c], N);
        cr_assert(a && b);
        cr_assert(k_want ? eng_sampler_cands_k(b) == k_want : eng_sampler_cands_k(b) > 0, "config %zu", c);
        char what[32];
        snprintf(what, sizeof what, "config %zu", c);
        int distinct = 0, last = -1;
        for (int d = 0; d < DRAWS; d++) {
            cands_row(row, N, d % 17 == 5 ? 1 : d % 29 == 7 ? 2 : 0);
            const int32_t t_row = draw_both(a, b, row, N, NULL, tol, what, d);
            distinct += t_row != last;
            last = t_row;
        }
        cr_assert_gt(distinct, min_distinct, "config %zu: the rows change, so must the tokens", c);
        eng_draw da, db;
        eng_sampler_take_draw(a, &da);
        eng_sampler_take_draw(b, &db);
        cr_assert_eq(da.u, db.u, "config %zu: the streams are out of step", c);
        eng_sampler_free(a);
        eng_sampler_free(b);
    }
    free(row);
}

/* The same seed draws the same tokens from rows and from their records. */
Test(sampler, cands_draw_the_rows_tokens)
{
    const eng_sampling_params cfgs[] = {
        params_with(0.0f, 0, 1.0f, 0.0f, 81),    params_with(0.7f, 1, 1.0f, 0.0f, 82),
        params_with(1.0f, 5, 1.0f, 0.0f, 83),    params_with(1.3f, 40, 1.0f, 0.0f, 84),
        params_with(0.8f, 40, 0.8f, 0.0f, 85),   params_with(1.0f, 128, 0.95f, 0.02f, 86),
        params_with(2.0f, 100, 1.0f, 0.3f, 87),
    };
    same_tokens(cfgs, sizeof cfgs / sizeof cfgs[0], 0, 1e-5, 10);
}

/* Without top-k (temperature alone, top-p, min-p, both): the draw taken
 * before the forward and the row's draw by it (eng_cands_draw, as a backend
 * draws) give the row path's token and logprob, and leave the stream where
 * the row path leaves it. */
Test(sampler, draws_at_a_taken_uniform_are_the_rows_draws)
{
    const eng_sampling_params cfgs[] = {
        params_with(1.0f, 0, 1.0f, 0.0f, 90),  params_with(0.7f, 0, 1.0f, 0.0f, 91),
        params_with(1.6f, 0, 1.0f, 0.0f, 92),  params_with(1.0f, 0, 0.9f, 0.0f, 93),
        params_with(0.8f, 0, 0.5f, 0.0f, 94),  params_with(1.2f, 0, 1.0f, 0.05f, 95),
        params_with(1.0f, 0, 0.95f, 0.02f, 96),
    };
    same_tokens(cfgs, sizeof cfgs / sizeof cfgs[0], ENG_CANDS_DRAW, 1e-4, 40);
    enum { N = 49152 };
    float *row = calloc(N, sizeof *row);
    cr_assert_not_null(row);
    eng_cands rec;
    eng_draw bad = {.u = 1.0, .inv_temp = 1.0f, .top_p = 1.0f, .min_p = 0.0f};
    cr_assert_eq(eng_cands_draw(row, N, &bad, &rec), -1);
    bad.u = 0.5, bad.inv_temp = 0.0f;
    cr_assert_eq(eng_cands_draw(row, N, &bad, &rec), -1);
    bad.inv_temp = 1.0f, bad.top_p = 0.0f;
    cr_assert_eq(eng_cands_draw(row, N, &bad, &rec), -1);
    free(row);
}

/* With penalties: the row penalized as the sampler lists them
 * (eng_sampler_penalties, eng_penalties_apply), then its record or draw,
 * gives the row path's tokens, step after step as the counts grow. */
Test(sampler, penalized_records_and_draws_are_the_rows_tokens)
{
    enum { N = 4099, STEPS = 80 };
    eng_sampling_params cfgs[4] = {params_with(0.0f, 0, 1.0f, 0.0f, 101), params_with(0.9f, 40, 1.0f, 0.0f, 102),
                                   params_with(1.0f, 0, 1.0f, 0.0f, 103), params_with(0.8f, 0, 0.9f, 0.02f, 104)};
    cfgs[0].repetition_penalty = 1.3f;
    cfgs[1].presence_penalty = 0.8f, cfgs[1].frequency_penalty = 0.4f;
    cfgs[2].frequency_penalty = -0.5f, cfgs[2].repetition_penalty = 0.9f;   /* negative: seen tokens rise */
    cfgs[3].presence_penalty = -1.0f;
    float *row = malloc((size_t)N * sizeof *row);
    eng_pen_entry *ent = malloc((size_t)N * sizeof *ent);
    cr_assert(row && ent);
    for (int c = 0; c < 4; c++) {
        eng_sampler *a = eng_sampler_create(&cfgs[c], N), *b = eng_sampler_create(&cfgs[c], N);
        cr_assert(a && b && eng_sampler_has_penalties(b));
        for (int i = 0; i < 30; i++) { /* a prompt */
            eng_sampler_accept(a, 7 * i, false);
            eng_sampler_accept(b, 7 * i, false);
        }
        int hits = 0;
        char what[32];
        snprintf(what, sizeof what, "config %d", c);
        for (int d = 0; d < STEPS; d++) {
            cands_row(row, N, d % 17 == 5 ? 1 : 0);
            eng_penalties pp;
            const int n_seen = eng_sampler_penalties(b, ent, N, &pp);
            const int32_t t = draw_both(a, b, row, N, ent, 1e-4, what, d);
            for (int i = 0; i < n_seen; i++)
                hits += ent[i].id == t;
            eng_sampler_accept(a, t, true);
            eng_sampler_accept(b, t, true);
        }
        cr_assert_gt(hits, 0, "config %d: no token drawn twice: the penalties were never tested", c);
        eng_sampler_free(a);
        eng_sampler_free(b);
    }
    free(row);
    free(ent);
}

