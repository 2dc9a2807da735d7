/* metrics.h: the engine's metrics registry and its Prometheus text rendering.
 *
 * The engine thread records what happens (latencies, token counts, finish
 * reasons, preemptions, load) and any thread renders the registry as the
 * Prometheus text exposition format 0.0.4 for GET /metrics. Names follow vLLM's
 * where one exists (prefix kvserve_ instead of vllm:), in base units.
 *
 * Cost on the hot path: the engine takes the registry's one mutex once per
 * step (eng_metrics_begin ... eng_metrics_end) and records everything of that
 * step inside; a record is a few additions. Rendering copies the registry under
 * the same mutex and formats outside it.
 *
 * Metrics (HELP text in metrics.c):
 *   histograms  kvserve_time_to_first_token_seconds, kvserve_inter_token_latency_seconds,
 *               kvserve_e2e_request_latency_seconds, kvserve_request_queue_time_seconds,
 *               kvserve_request_prefill_time_seconds, kvserve_request_decode_time_seconds
 *   counters    kvserve_prompt_tokens_total, kvserve_generation_tokens_total,
 *               kvserve_request_success_total{finish_reason}, kvserve_num_preemptions_total
 *   gauges      kvserve_num_requests_running, kvserve_num_requests_waiting,
 *               kvserve_kv_cache_usage_ratio, kvserve_kv_pages_used,
 *               kvserve_kv_bytes_per_token, kvserve_kv_compression_ratio,
 *               kvserve_kv_capacity_sequences{context}, kvserve_generation_tokens_per_second,
 *               kvserve_prompt_tokens_per_second (10 s rolling window),
 *               kvserve_cache_config_info{profile,block_size,k_codec,v_codec} (always 1)
 *   untyped     kvserve_kv_pages_total: a constant gauge; typed untyped because
 *               Prometheus' linter (promtool check metrics) rejects a gauge whose
 *               name ends in _total, and this is the name dashboards are given. */
#ifndef ENG_METRICS_H
#define ENG_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "engine/engine.h"

typedef enum {
    ENG_HIST_TTFT = 0,   /* submit -> first token of the request */
    ENG_HIST_ITL,        /* between consecutive tokens of a choice */
    ENG_HIST_E2E,        /* submit -> last event */
    ENG_HIST_QUEUE,      /* submit -> first scheduled */
    ENG_HIST_PREFILL,    /* first scheduled -> first token */
    ENG_HIST_DECODE,     /* first token -> last token */
    ENG_HIST_COUNT
} eng_hist;

#define ENG_METRICS_MAX_CTX 8

/* What does not change after start-up. Strings are copied. */
typedef struct {
    const char *profile;      /* NULL: "" */
    int block_size;
    const char *k_codec, *v_codec;
    int pages_total;
    size_t bytes_per_token;
    double compression_ratio;
    int n_capacity;                           /* entries below (<= ENG_METRICS_MAX_CTX) */
    int capacity_ctx[ENG_METRICS_MAX_CTX];    /* context lengths in tokens */
    int capacity_seqs[ENG_METRICS_MAX_CTX];   /* sequences of that length that fit */
} eng_metrics_info;

/* NULL when memory runs out. */
eng_metrics *eng_metrics_create(const eng_metrics_info *info);
void eng_metrics_destroy(eng_metrics *m);

/* Recording: call the functions below only between begin and end (begin takes
 * the registry's mutex, end releases it). `now` is CLOCK_MONOTONIC seconds. */
void eng_metrics_begin(eng_metrics *m);
void eng_metrics_end(eng_metrics *m);
void eng_metrics_observe(eng_metrics *m, eng_hist h, double seconds);
void eng_metrics_add_tokens(eng_metrics *m, int64_t prompt, int64_t generated, double now);
void eng_metrics_add_request(eng_metrics *m, eng_finish_reason reason);
void eng_metrics_add_preemptions(eng_metrics *m, int64_t n);
void eng_metrics_set_load(eng_metrics *m, int running, int waiting, int pages_used);

/* The registry as Prometheus text (malloc'd, NUL-terminated; the caller frees
 * it), or NULL when memory runs out. _at renders as if the clock read `now`
 * (the rolling-window rates depend on it); for tests. */
char *eng_metrics_render(eng_metrics *m);
char *eng_metrics_render_at(eng_metrics *m, double now);

/* CLOCK_MONOTONIC in seconds: the clock every `now` above is read from. */
double eng_metrics_now(void);

#endif
