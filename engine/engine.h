/* engine.h: the engine thread and its API for the HTTP layer.
 *
 * Threads and ownership (DESIGN.md §2):
 *   - eng_engine_create() starts the engine thread. That thread alone owns the
 *     model's compute state, the KV pool, the backend and the scheduler. It
 *     sleeps on a condition variable while idle.
 *   - Any thread may call eng_engine_submit() and eng_engine_cancel(); neither
 *     blocks on compute (a short mutex around the waiting queue only).
 *   - Events are delivered by calling the request's on_event callback ON THE
 *     ENGINE THREAD. The callback must be cheap and must not call back into the
 *     engine except eng_engine_cancel; the HTTP layer copies the event into its
 *     own queue and wakes its loop with uv_async_send.
 *   - After eng_engine_cancel(id) returns, no further event of that request is
 *     delivered (not even a final one); its pages are freed at the engine's next
 *     step.
 *   - The model (tokenizer, chat template, config) is immutable after load and
 *     may be read from any thread (eng_engine_model).
 *
 * Scheduling (iteration-level, continuous batching): each step mixes the decode
 * tokens of running sequences with prefill chunks of waiting ones, under
 * max_batched_tokens and max_seqs. Requests are ordered by (priority, arrival):
 * a lower priority value first, FCFS within one. The waiting queue is admitted
 * in that order, and only while the pool has pages for the head's prompt plus a
 * watermark kept for decode (the head is never overtaken). When decode runs out
 * of pages the last sequence in that order (the largest priority value, then the
 * newest) is preempted: pages freed, recomputed later from its place in the
 * waiting queue, its output unchanged.
 *
 * Events: every generated token of a choice is one event (token, logprob,
 * text delta); the last one carries the finish reason and the usage. When a
 * choice ends on EOS or a stop token id, its final event carries that token
 * (counted in completion_tokens) but not its text; on a stop string, the text
 * before it (the stop string and what follows are never emitted). Final-only
 * events (token -1) end a choice that errors or is cancelled by shutdown. A
 * choice's text is held back while it could be the start of a stop string.
 * The stop string that completes first wins. */
#ifndef ENG_ENGINE_H
#define ENG_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/model.h"
#include "engine/sampler.h"

typedef struct eng_engine eng_engine;
typedef struct eng_metrics eng_metrics;

typedef struct {
    /* model and backend */
    const char *model_path;
    int threads;                /* compute threads; <= 0: all cores */
    const char *backend;        /* "cpu" (NULL: cpu) or "cuda" (eng_backend_create) */
    int device;                 /* cuda: the GPU's index */
    /* KV cache */
    size_t kv_memory;           /* bytes of KV arena */
    int block_size;             /* tokens per page (16) */
    const char *kv_k, *kv_v;    /* codec specs ("f16", "int8", ...) */
    const char *calib_path;     /* calibration file for pca bases, or NULL */
    /* scheduler */
    int max_batched_tokens;     /* tokens per step, all sequences together (2048) */
    int max_seqs;               /* running sequences at most (64) */
    int prefill_chunk;          /* prompt tokens of one sequence per step at most (512) */
    int max_waiting;            /* waiting queue bound; beyond it submit says overloaded (256) */
    float watermark;            /* fraction of pages kept free at admission for decode (0.01) */
    int n_ctx;                  /* context per sequence (prompt + output); <= 0: the model's;
                                 * lowered to what the KV arena holds when smaller */
    const char *profile_name;   /* for metrics labels and logs */
} eng_engine_config;

void eng_engine_config_default(eng_engine_config *c);

typedef enum {
    ENG_FINISH_NONE = 0,        /* not the last event of the choice */
    ENG_FINISH_STOP,            /* EOS, stop string or stop token */
    ENG_FINISH_LENGTH,          /* max_tokens or the context limit */
    ENG_FINISH_CANCELLED,
    ENG_FINISH_ERROR,
} eng_finish_reason;
const char *eng_finish_reason_name(eng_finish_reason r); /* "stop", "length", ... */

typedef struct {
    uint64_t request_id;
    int index;                  /* choice index in [0, n) */
    int32_t token;              /* the token of this event, or -1 (final-only events) */
    float logprob;              /* when the request asked for logprobs */
    const char *text;           /* text delta (complete UTF-8; stop strings held back), valid during the call */
    int text_len;
    eng_finish_reason finish;   /* != NONE on the last event of a choice */
    const char *error;          /* with ENG_FINISH_ERROR */
    /* usage, on final events: */
    int prompt_tokens;
    int completion_tokens;      /* of this choice */
} eng_event;

typedef void (*eng_event_cb)(const eng_event *ev, void *user);

typedef struct {
    const int32_t *prompt;      /* copied by submit */
    int n_prompt;
    eng_sampling_params sampling;
    int max_tokens;             /* <= 0: up to the context limit */
    int n;                      /* choices (>= 1); they share the prompt's pages */
    const char *const *stop;    /* stop strings, copied; matched across token boundaries, not emitted */
    int n_stop;
    const int32_t *stop_ids;    /* stop token ids, copied */
    int n_stop_ids;
    bool ignore_eos;
    bool logprobs;              /* report each token's logprob */
    int priority;               /* lower value served first (vLLM's convention), 0 by default;
                                 * FCFS within a priority. Decides admission order and, when
                                 * decode runs out of pages, the victim (largest value, newest) */
    eng_event_cb on_event;
    void *user;
} eng_request;

enum {
    ENG_OK = 0,
    ENG_ERR_INVALID = -1,       /* bad parameters: message says which */
    ENG_ERR_TOO_LONG = -2,      /* prompt (+ max_tokens) longer than the context: message has both lengths */
    ENG_ERR_OVERLOADED = -3,    /* waiting queue full */
    ENG_ERR_SHUTDOWN = -4,      /* engine stopping */
    ENG_ERR_NOMEM = -5,
};

/* Loads the model, builds the pool and backend, starts the engine thread.
 * NULL with a message on failure. */
eng_engine *eng_engine_create(const eng_engine_config *cfg, char *err, size_t errlen);
/* Stops accepting, cancels what is left, joins the thread, frees everything. */
void eng_engine_destroy(eng_engine *e);

/* Queues a request; returns ENG_OK and its id in *id, or an error code with a
 * message. Never blocks on compute. Its events may begin, and even end, on the
 * engine thread before this returns. */
int eng_engine_submit(eng_engine *e, const eng_request *req, uint64_t *id, char *err, size_t errlen);
/* Cancels a request (no-op when it already finished). See the contract above. */
void eng_engine_cancel(eng_engine *e, uint64_t id);
/* Waits until no request is running or waiting, or timeout_s passes; returns
 * true when idle. For graceful shutdown and tests. */
bool eng_engine_wait_idle(eng_engine *e, double timeout_s);

const eng_model *eng_engine_model(const eng_engine *e);
eng_metrics *eng_engine_metrics(eng_engine *e);

/* A snapshot of the pool for tests and /metrics. */
typedef struct {
    int pages_total, pages_used;
    int pages_peak;             /* most pages used at once since start */
    size_t bytes_per_token;
    double compression_ratio;   /* f16 bytes per token / ours */
    int running, waiting;
    int capacity_seqs;          /* sequences of n_ctx tokens that fit */
    int n_ctx;
    uint64_t steps;             /* forward passes run */
    uint64_t mixed_steps;       /* of which mixed prefill chunks with decode tokens */
    uint64_t logit_rows;        /* rows of logits sampled from */
    uint64_t record_rows;       /* of which came back as records or draws (eng_cands: the cuda backend) */
} eng_engine_stats;
void eng_engine_stats_get(eng_engine *e, eng_engine_stats *s);

#endif
