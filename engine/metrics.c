/* metrics.c: the metrics registry (see metrics.h): plain numbers under one
 * mutex that the engine thread takes once per step, rendered as Prometheus
 * text exposition format 0.0.4. */
#include "engine/metrics.h"

#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- histogram definitions ------------------------------------------------ */

#define MAX_BUCKETS 32

/* Bucket bounds in seconds: vLLM's, with finer low ends for a CPU server's
 * small models and longer tails for its slow ones. */
static const double ttft_bounds[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                     1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
static const double itl_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                                    0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
static const double request_bounds[] = {0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0,
                                        15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
                                        1920.0, 7680.0};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))

static const struct {
    const char *name, *help;
    const double *bounds;
    int n_bounds;
} hist_def[ENG_HIST_COUNT] = {
    [ENG_HIST_TTFT] = {"kvserve_time_to_first_token_seconds",
                       "Time from a request's arrival to its first generated token.", ttft_bounds,
                       N_OF(ttft_bounds)},
    [ENG_HIST_ITL] = {"kvserve_inter_token_latency_seconds",
                      "Time between consecutive generated tokens of one choice.", itl_bounds, N_OF(itl_bounds)},
    [ENG_HIST_E2E] = {"kvserve_e2e_request_latency_seconds",
                      "Time from a request's arrival to its last token.", request_bounds, N_OF(request_bounds)},
    [ENG_HIST_QUEUE] = {"kvserve_request_queue_time_seconds",
                        "Time a request waited before it was first scheduled.", request_bounds,
                        N_OF(request_bounds)},
    [ENG_HIST_PREFILL] = {"kvserve_request_prefill_time_seconds",
                          "Time from a request's first scheduling to its first token (prompt processing).",
                          request_bounds, N_OF(request_bounds)},
    [ENG_HIST_DECODE] = {"kvserve_request_decode_time_seconds",
                         "Time from a request's first token to its last token.", request_bounds,
                         N_OF(request_bounds)},
};

/* The finish reasons counted by kvserve_request_success_total. */
static const eng_finish_reason reasons[] = {ENG_FINISH_STOP, ENG_FINISH_LENGTH, ENG_FINISH_CANCELLED,
                                            ENG_FINISH_ERROR};
#define N_REASONS 4

#define WINDOW_S 10 /* rolling window of the tokens/s gauges: one slot per second */

typedef struct {
    uint64_t counts[MAX_BUCKETS + 1]; /* (n_bounds + 1) per bucket, not cumulative; last: +Inf */
    double sum;
    uint64_t count;
} histogram;

/* Everything that changes; copied whole by render. */
typedef struct {
    histogram hist[ENG_HIST_COUNT];
    uint64_t prompt_tokens, generation_tokens, preemptions;
    uint64_t requests[N_REASONS];
    int running, waiting, pages_used;
    int64_t slot_second[WINDOW_S];    /* which second each slot holds */
    uint64_t slot_prompt[WINDOW_S], slot_generation[WINDOW_S];
} registry;

struct eng_metrics {
    pthread_mutex_t lock;
    registry r;
    eng_metrics_info info;     /* strings below are owned copies */
    char *profile, *k_codec, *v_codec;
    double t_created;
};

double eng_metrics_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static char *dup_or_empty(const char *s) { return strdup(s ? s : ""); }

eng_metrics *eng_metrics_create(const eng_metrics_info *info) {
    eng_metrics *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->info = *info;
    if (m->info.n_capacity < 0)
        m->info.n_capacity = 0;
    if (m->info.n_capacity > ENG_METRICS_MAX_CTX)
        m->info.n_capacity = ENG_METRICS_MAX_CTX;
    m->profile = dup_or_empty(info->profile);
    m->k_codec = dup_or_empty(info->k_codec);
    m->v_codec = dup_or_empty(info->v_codec);
    if (!m->profile || !m->k_codec || !m->v_codec || pthread_mutex_init(&m->lock, NULL)) {
        free(m->profile);
        free(m->k_codec);
        free(m->v_codec);
        free(m);
        return NULL;
    }
    for (int i = 0; i < WINDOW_S; i++)
        m->r.slot_second[i] = -1;
    m->t_created = eng_metrics_now();
    return m;
}

void eng_metrics_destroy(eng_metrics *m) {
    if (!m)
        return;
    pthread_mutex_destroy(&m->lock);
    free(m->profile);
    free(m->k_codec);
    free(m->v_codec);
    free(m);
}

void eng_metrics_begin(eng_metrics *m) { pthread_mutex_lock(&m->lock); }
void eng_metrics_end(eng_metrics *m) { pthread_mutex_unlock(&m->lock); }

void eng_metrics_observe(eng_metrics *m, eng_hist h, double seconds) {
    if (h < 0 || h >= ENG_HIST_COUNT || !(seconds >= 0))
        return;
    histogram *hg = &m->r.hist[h];
    int b = 0;
    while (b < hist_def[h].n_bounds && seconds > hist_def[h].bounds[b])
        b++;
    hg->counts[b]++;
    hg->sum += seconds;
    hg->count++;
}

void eng_metrics_add_tokens(eng_metrics *m, int64_t prompt, int64_t generated, double now) {
    registry *r = &m->r;
    r->prompt_tokens += (uint64_t)prompt;
    r->generation_tokens += (uint64_t)generated;
    int64_t sec = (int64_t)floor(now);
    int slot = (int)(sec % WINDOW_S);
    if (r->slot_second[slot] != sec) {
        r->slot_second[slot] = sec;
        r->slot_prompt[slot] = r->slot_generation[slot] = 0;
    }
    r->slot_prompt[slot] += (uint64_t)prompt;
    r->slot_generation[slot] += (uint64_t)generated;
}

void eng_metrics_add_request(eng_metrics *m, eng_finish_reason reason) {
    for (int i = 0; i < N_REASONS; i++)
        if (reasons[i] == reason)
            m->r.requests[i]++;
}

void eng_metrics_add_preemptions(eng_metrics *m, int64_t n) { m->r.preemptions += (uint64_t)n; }

void eng_metrics_set_load(eng_metrics *m, int running, int waiting, int pages_used) {
    m->r.running = running;
    m->r.waiting = waiting;
    m->r.pages_used = pages_used;
}

/* ---- rendering ---------------------------------------------------------- */

typedef struct {
    char *buf;
    size_t len, cap;
    int failed;
} strbuf;

__attribute__((format(printf, 2, 3))) static void sb_printf(strbuf *sb, const char *fmt, ...) {
    if (sb->failed)
        return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(sb->buf + sb->len, sb->cap - sb->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            sb->failed = 1;
            return;
        }
        if ((size_t)n < sb->cap - sb->len) {
            sb->len += (size_t)n;
            return;
        }
        size_t cap = sb->cap * 2 > sb->len + (size_t)n + 1 ? sb->cap * 2 : sb->len + (size_t)n + 1;
        char *nb = realloc(sb->buf, cap);
        if (!nb) {
            sb->failed = 1;
            return;
        }
        sb->buf = nb;
        sb->cap = cap;
    }
}

static void header(strbuf *sb, const char *name, const char *type, const char *help) {
    sb_printf(sb, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* A label value with \, " and newline escaped (exposition format rules). */
static void label_value(strbuf *sb, const char *s) {
    for (; *s; s++) {
        if (*s == '\\')
            sb_printf(sb, "\\\\");
        else if (*s == '"')
            sb_printf(sb, "\\\"");
        else if (*s == '\n')
            sb_printf(sb, "\\n");
        else
            sb_printf(sb, "%c", *s);
    }
}

static void gauge(strbuf *sb, const char *name, const char *help, double v) {
    header(sb, name, "gauge", help);
    sb_printf(sb, "%s %.9g\n", name, v);
}

static void counter(strbuf *sb, const char *name, const char *help, uint64_t v) {
    header(sb, name, "counter", help);
    sb_printf(sb, "%s %" PRIu64 "\n", name, v);
}

/* Tokens per second over the last WINDOW_S seconds (fewer right after start). */
static double window_rate(const registry *r, const uint64_t *slots, double now, double t_created) {
    int64_t sec = (int64_t)floor(now);
    uint64_t sum = 0;
    for (int i = 0; i < WINDOW_S; i++)
        if (r->slot_second[i] > sec - WINDOW_S && r->slot_second[i] <= sec)
            sum += slots[i];
    double span = now - (double)(sec - WINDOW_S + 1); /* WINDOW_S - 1 whole seconds + this one so far */
    if (span > now - t_created)
        span = now - t_created;
    if (span < 1.0)
        span = 1.0;
    return (double)sum / span;
}

char *eng_metrics_render_at(eng_metrics *m, double now) {
    registry r;
    pthread_mutex_lock(&m->lock);
    r = m->r;
    pthread_mutex_unlock(&m->lock);
    const eng_metrics_info *in = &m->info;

    strbuf sb = {.buf = malloc(8192), .cap = 8192};
    if (!sb.buf)
        return NULL;
    sb.buf[0] = 0;

    for (int h = 0; h < ENG_HIST_COUNT; h++) {
        const char *name = hist_def[h].name;
        header(&sb, name, "histogram", hist_def[h].help);
        uint64_t cum = 0;
        for (int b = 0; b < hist_def[h].n_bounds; b++) {
            cum += r.hist[h].counts[b];
            sb_printf(&sb, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, hist_def[h].bounds[b], cum);
        }
        cum += r.hist[h].counts[hist_def[h].n_bounds];
        sb_printf(&sb, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, cum);
        sb_printf(&sb, "%s_sum %.9g\n%s_count %" PRIu64 "\n", name, r.hist[h].sum, name, r.hist[h].count);
    }

    counter(&sb, "kvserve_prompt_tokens_total", "Prompt tokens processed (each request's prompt once).",
            r.prompt_tokens);
    counter(&sb, "kvserve_generation_tokens_total", "Tokens generated, over all choices.", r.generation_tokens);
    header(&sb, "kvserve_request_success_total", "counter", "Requests finished, by finish reason.");
    for (int i = 0; i < N_REASONS; i++)
        sb_printf(&sb, "kvserve_request_success_total{finish_reason=\"%s\"} %" PRIu64 "\n",
                  eng_finish_reason_name(reasons[i]), r.requests[i]);
    counter(&sb, "kvserve_num_preemptions_total",
            "Sequences preempted (pages freed, recomputed later) because the KV cache was full.", r.preemptions);

    gauge(&sb, "kvserve_num_requests_running", "Sequences (choices) being prefilled or decoded.", r.running);
    gauge(&sb, "kvserve_num_requests_waiting", "Sequences (choices) waiting to be scheduled.", r.waiting);
    gauge(&sb, "kvserve_kv_cache_usage_ratio", "Fraction of KV cache pages in use (1 = full).",
          in->pages_total > 0 ? (double)r.pages_used / in->pages_total : 0.0);
    header(&sb, "kvserve_kv_pages_total", "untyped", "KV cache pages in the pool (constant).");
    sb_printf(&sb, "kvserve_kv_pages_total %d\n", in->pages_total);
    gauge(&sb, "kvserve_kv_pages_used", "KV cache pages in use.", r.pages_used);
    gauge(&sb, "kvserve_kv_bytes_per_token", "KV cache bytes per token (all layers, K and V).",
          (double)in->bytes_per_token);
    gauge(&sb, "kvserve_kv_compression_ratio", "Bytes per token of an f16 KV cache divided by ours.",
          in->compression_ratio);
    header(&sb, "kvserve_kv_capacity_sequences", "gauge",
           "Sequences of `context` tokens that fit in the empty KV cache.");
    for (int i = 0; i < in->n_capacity; i++)
        sb_printf(&sb, "kvserve_kv_capacity_sequences{context=\"%d\"} %d\n", in->capacity_ctx[i],
                  in->capacity_seqs[i]);
    gauge(&sb, "kvserve_generation_tokens_per_second", "Generated tokens per second over the last 10 s.",
          window_rate(&r, r.slot_generation, now, m->t_created));
    gauge(&sb, "kvserve_prompt_tokens_per_second", "Prompt tokens per second over the last 10 s.",
          window_rate(&r, r.slot_prompt, now, m->t_created));
    header(&sb, "kvserve_cache_config_info", "gauge", "KV cache configuration (the value is always 1).");
    sb_printf(&sb, "kvserve_cache_config_info{profile=\"");
    label_value(&sb, m->profile);
    sb_printf(&sb, "\",block_size=\"%d\",k_codec=\"", in->block_size);
    label_value(&sb, m->k_codec);
    sb_printf(&sb, "\",v_codec=\"");
    label_value(&sb, m->v_codec);
    sb_printf(&sb, "\"} 1\n");

    if (sb.failed) {
        free(sb.buf);
        return NULL;
    }
    return sb.buf;
}

char *eng_metrics_render(eng_metrics *m) { return eng_metrics_render_at(m, eng_metrics_now()); }
