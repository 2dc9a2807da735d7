/* engine.c: the engine thread and its continuous-batching scheduler (see
 * engine.h for the API and the thread contract).
 *
 * Data and who touches it:
 *   q_lock    the incoming queue (submitted, not yet seen by the engine), the
 *             stopping and idle flags, the engine's published waiting count;
 *             the engine sleeps on `wake` under it.
 *   ev_lock   (recursive) the registry of live requests (id -> request), each
 *             request's `cancelled` flag, the list of cancelled ids, and the
 *             delivery of events: callbacks run with it held, so once
 *             eng_engine_cancel (which takes it) returns, no event of that
 *             request can follow. Recursive because a callback may cancel.
 *   stats_lock  the snapshot eng_engine_stats_get reads.
 *   Everything else (sequences, queues, the pool, the backend) belongs to the
 *   engine thread. Lock order: ev_lock before q_lock.
 *
 * One step: drain submissions and cancellations; schedule (decode tokens of
 * running sequences first, then prefill chunks of running sequences that are
 * still prefilling, then admissions from the waiting queue), all within
 * max_batched_tokens and max_seqs; one forward pass; sample, detokenize, check
 * stop conditions; deliver the step's events under ev_lock.
 *
 * A sequence is one choice of a request: tokens[0, n_tokens) are the prompt
 * and what it generated so far; the K/V of tokens[0, n_computed) are in its
 * pages. A decode step computes the one pending token; a prefill chunk several.
 * Preemption releases the pages and sets n_computed = 0: the whole of tokens
 * is recomputed when it is admitted again, and since the sampler, detokenizer
 * and stop matcher are kept, its output is what it would have been. */
#include "engine/engine.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache/kvcache.h"
#include "engine/backend.h"
#include "engine/metrics.h"
#include "engine/stop.h"
#include "engine/threadpool.h"
#include "engine/tokenizer.h"

#define REG_BUCKETS 1024
#define MAX_CHOICES 128

#define ENG__CHECK(cond, ...)                                                       \
    do {                                                                            \
        if (!(cond)) {                                                              \
            fprintf(stderr, "%s:%d: engine invariant broken: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                                           \
            fputc('\n', stderr);                                                    \
            abort();                                                                \
        }                                                                           \
    } while (0)

typedef enum { SEQ_WAITING = 0, SEQ_RUNNING, SEQ_DONE } seq_state;

typedef struct eng_req eng_req;

typedef struct {
    eng_req *req;
    int index;                  /* choice index */
    seq_state state;
    kvc_seq kv;
    int32_t *tokens;            /* (cap_tokens) prompt, then generated */
    int n_tokens, cap_tokens;
    int n_computed;             /* tokens whose K/V are in kv */
    int n_generated;
    eng_sampler *sampler;
    int32_t drawn;              /* >= 0: this step's token, drawn ahead (draw_ahead) */
    float drawn_lp;
    eng_detok detok;
    eng_stop stop;
    double t_last_token;
} eng_seq;

struct eng_req {
    uint64_t id;                /* also the FCFS order */
    eng_req *hnext;             /* registry chain (ev_lock) */
    eng_req *qnext;             /* incoming queue (q_lock) */
    bool cancelled;             /* ev_lock */
    int n_prompt;
    int max_gen;                /* generated tokens at most per choice */
    int n;
    eng_sampling_params sampling;
    char **stops;               /* (n_stop) copies */
    int n_stop;
    int32_t *stop_ids;          /* (n_stop_ids) */
    int n_stop_ids;
    bool ignore_eos, logprobs;
    int priority;
    eng_event_cb cb;
    void *user;
    eng_seq *seqs[MAX_CHOICES]; /* [0] from submit; the others at the fork */
    bool forked;                /* the prompt is prefilled and every choice exists */
    int n_live;                 /* choices not finished */
    eng_finish_reason outcome;  /* for the request counter */
    bool admitted;
    double t_submit, t_admit, t_first_token;
};

/* An event waiting for delivery at the end of the step; text lives in the arena. */
typedef struct {
    eng_req *req;
    eng_event ev;
    size_t text_off;
    long err_off;               /* -1: no error text */
} pending_event;

struct eng_engine {
    eng_engine_config cfg;      /* strings point at the copies below */
    char *model_path, *kv_k, *kv_v, *calib_path, *profile_name;
    eng_model *model;
    kvc_pool *pool;
    eng_backend *backend;
    eng_threadpool *draw_tp;    /* draws a step's tokens in parallel (GPU backends) */
    eng_metrics *metrics;
    int n_ctx, n_vocab, block_size, pages_total, watermark_pages;
    pthread_t thread;
    bool thread_started;

    pthread_mutex_t q_lock;
    pthread_cond_t wake, idle_cv;
    eng_req *in_head, *in_tail;
    int n_incoming;
    int n_waiting_pub;          /* the engine's waiting sequences, for the overload check */
    bool stopping, idle;

    pthread_mutex_t ev_lock;
    eng_req *registry[REG_BUCKETS];
    uint64_t next_id;
    uint64_t *cancel_ids;
    int n_cancel, cap_cancel;

    pthread_mutex_t stats_lock;
    eng_engine_stats stats;

    /* engine thread only */
    eng_seq **running;          /* (cap_running) */
    int n_running, cap_running;
    eng_seq **waiting;          /* (cap_waiting) sorted by seq_before */
    int n_waiting, cap_waiting;
    eng_segment *segs;          /* (cap_segs) this step's batch */
    eng_seq **seg_seq;          /* (cap_segs) the sequence of each segment */
    eng_penalties *seg_pen;     /* (cap_segs) a segment's penalties (eng_segment.pen), entries at */
    int *seg_pen_at;            /* (cap_segs) this offset of pen (-1: none) */
    eng_pen_entry *pen;         /* (cap_pen) the step's penalty entries */
    int cap_segs, n_pen, cap_pen;
    float *logits;              /* (cap_logit_rows, n_vocab) */
    int cap_logit_rows;
    float *pristine, *work;     /* (n_vocab) logits of a forked prompt, and a copy to sample from */
    pending_event *events;      /* (cap_events) */
    int n_events, cap_events;
    char *arena;                /* (cap_arena) event texts */
    size_t n_arena, cap_arena;
    eng_req **finished;         /* (cap_finished) requests to free after delivery */
    int n_finished, cap_finished;
    int pages_peak;
    uint64_t n_steps, n_mixed_steps, n_logit_rows, n_record_rows;
    int64_t step_generated, step_prompt, step_preempted;
};

/* ---- small helpers ---------------------------------------------------------- */

static double now_s(void) { return eng_metrics_now(); }

/* Grows *arr (elements of `size` bytes) to hold `need`; aborts when memory runs
 * out (engine bookkeeping of a few KB cannot be recovered from sensibly). */
static void grow(void **arr, int *cap, int need, size_t size) {
    if (need <= *cap)
        return;
    int c = *cap ? *cap : 16;
    while (c < need)
        c *= 2;
    void *p = realloc(*arr, (size_t)c * size);
    ENG__CHECK(p, "out of memory growing an array to %d entries", c);
    *arr = p;
    *cap = c;
}

static char *dup_str(const char *s) { return s ? strdup(s) : NULL; }

void eng_engine_config_default(eng_engine_config *c) {
    memset(c, 0, sizeof *c);
    c->threads = 0;
    c->kv_memory = (size_t)256 << 20;
    c->block_size = 16;
    c->kv_k = "f16";
    c->kv_v = "f16";
    c->max_batched_tokens = 2048;
    c->max_seqs = 64;
    c->prefill_chunk = 512;
    c->max_waiting = 256;
    c->watermark = 0.01f;
    c->n_ctx = 0;
}

const char *eng_finish_reason_name(eng_finish_reason r) {
    switch (r) {
    case ENG_FINISH_NONE: return "none";
    case ENG_FINISH_STOP: return "stop";
    case ENG_FINISH_LENGTH: return "length";
    case ENG_FINISH_CANCELLED: return "cancelled";
    case ENG_FINISH_ERROR: return "error";
    }
    return "unknown";
}

/* ---- sequences and requests ------------------------------------------------ */

static void seq_free(eng_engine *e, eng_seq *s) {
    if (!s)
        return;
    if (s->kv.pages || s->kv.n_tokens)
        kvc_seq_release(e->pool, &s->kv);
    free(s->tokens);
    eng_sampler_free(s->sampler);
    eng_stop_dispose(&s->stop);
    free(s);
}

static void req_free(eng_engine *e, eng_req *r) {
    if (!r)
        return;
    for (int i = 0; i < r->n; i++)
        seq_free(e, r->seqs[i]);
    if (r->stops)
        for (int i = 0; i < r->n_stop; i++)
            free(r->stops[i]);
    free(r->stops);
    free(r->stop_ids);
    free(r);
}

/* A sequence for choice `index` of r, its tokens copied from prompt. NULL when
 * memory runs out. */
static eng_seq *seq_new(eng_engine *e, eng_req *r, int index, const int32_t *prompt) {
    eng_seq *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->req = r;
    s->index = index;
    s->cap_tokens = r->n_prompt + r->max_gen;
    s->tokens = malloc((size_t)s->cap_tokens * sizeof *s->tokens);
    s->sampler = eng_sampler_create_stream(&r->sampling, e->n_vocab, (uint32_t)index);
    s->drawn = -1;
    if (!s->tokens || !s->sampler || eng_stop_init(&s->stop, (const char *const *)r->stops, r->n_stop)) {
        seq_free(e, s);
        return NULL;
    }
    memcpy(s->tokens, prompt, (size_t)r->n_prompt * sizeof *prompt);
    s->n_tokens = r->n_prompt;
    for (int i = 0; i < r->n_prompt; i++)
        eng_sampler_accept(s->sampler, prompt[i], false);
    eng_detok_init(&s->detok);
    return s;
}

/* Scheduling order: lower priority value first (vLLM's convention), then
 * earlier arrival (ids grow with submission), then choice index. Admission
 * takes the waiting queue from the front; preemption takes its victims from
 * the back of the running list. */
static int seq_before(const eng_seq *a, const eng_seq *b) {
    if (a->req->priority != b->req->priority)
        return a->req->priority < b->req->priority;
    if (a->req->id != b->req->id)
        return a->req->id < b->req->id;
    return a->index < b->index;
}

static int cmp_seq(const void *pa, const void *pb) {
    const eng_seq *a = *(eng_seq *const *)pa, *b = *(eng_seq *const *)pb;
    return seq_before(a, b) ? -1 : seq_before(b, a) ? 1 : 0;
}

static void waiting_insert(eng_engine *e, eng_seq *s) {
    grow((void **)&e->waiting, &e->cap_waiting, e->n_waiting + 1, sizeof *e->waiting);
    int i = e->n_waiting;
    while (i > 0 && seq_before(s, e->waiting[i - 1]))
        i--;
    memmove(e->waiting + i + 1, e->waiting + i, (size_t)(e->n_waiting - i) * sizeof *e->waiting);
    e->waiting[i] = s;
    e->n_waiting++;
    s->state = SEQ_WAITING;
}

static void list_remove(eng_seq **list, int *n, eng_seq *s) {
    for (int i = 0; i < *n; i++)
        if (list[i] == s) {
            memmove(list + i, list + i + 1, (size_t)(*n - i - 1) * sizeof *list);
            (*n)--;
            return;
        }
    ENG__CHECK(0, "sequence %d of request %llu is not in its queue", s->index, (unsigned long long)s->req->id);
}

static void running_append(eng_engine *e, eng_seq *s) {
    grow((void **)&e->running, &e->cap_running, e->n_running + 1, sizeof *e->running);
    e->running[e->n_running++] = s;
    s->state = SEQ_RUNNING;
}

/* ---- registry (ev_lock held) ------------------------------------------------ */

static void registry_add(eng_engine *e, eng_req *r) {
    eng_req **b = &e->registry[r->id % REG_BUCKETS];
    r->hnext = *b;
    *b = r;
}

static eng_req *registry_take(eng_engine *e, uint64_t id) {
    for (eng_req **p = &e->registry[id % REG_BUCKETS]; *p; p = &(*p)->hnext)
        if ((*p)->id == id) {
            eng_req *r = *p;
            *p = r->hnext;
            r->hnext = NULL;
            return r;
        }
    return NULL;
}

static eng_req *registry_find(eng_engine *e, uint64_t id) {
    for (eng_req *r = e->registry[id % REG_BUCKETS]; r; r = r->hnext)
        if (r->id == id)
            return r;
    return NULL;
}

/* ---- events ----------------------------------------------------------------- */

static size_t arena_put(eng_engine *e, const char *text, int len) {
    size_t need = e->n_arena + (size_t)len + 1;
    if (need > e->cap_arena) {
        size_t c = e->cap_arena ? e->cap_arena : 4096;
        while (c < need)
            c *= 2;
        char *p = realloc(e->arena, c);
        ENG__CHECK(p, "out of memory for %zu bytes of event text", c);
        e->arena = p;
        e->cap_arena = c;
    }
    size_t off = e->n_arena;
    if (len)
        memcpy(e->arena + off, text, (size_t)len);
    e->arena[off + (size_t)len] = 0;
    e->n_arena = need;
    return off;
}

static void push_event(eng_engine *e, eng_req *r, int index, int32_t token, float logprob, const char *text,
                       int len, eng_finish_reason finish, const char *error, int completion_tokens) {
    grow((void **)&e->events, &e->cap_events, e->n_events + 1, sizeof *e->events);
    pending_event *p = &e->events[e->n_events++];
    memset(p, 0, sizeof *p);
    p->req = r;
    p->ev.request_id = r->id;
    p->ev.index = index;
    p->ev.token = token;
    p->ev.logprob = r->logprobs ? logprob : 0.0f;
    p->ev.text_len = len;
    p->ev.finish = finish;
    if (finish != ENG_FINISH_NONE) {
        p->ev.prompt_tokens = r->n_prompt;
        p->ev.completion_tokens = completion_tokens;
    }
    p->text_off = arena_put(e, text, len);
    p->err_off = error ? (long)arena_put(e, error, (int)strlen(error)) : -1;
}

/* Delivers the step's events (skipping cancelled requests), then retires the
 * requests that finished: out of the registry under the same lock, freed after. */
static void deliver(eng_engine *e) {
    if (!e->n_events && !e->n_finished)
        return;
    pthread_mutex_lock(&e->ev_lock);
    for (int i = 0; i < e->n_events; i++) {
        pending_event *p = &e->events[i];
        if (p->req->cancelled)
            continue;
        p->ev.text = e->arena + p->text_off;
        p->ev.error = p->err_off >= 0 ? e->arena + p->err_off : NULL;
        p->req->cb(&p->ev, p->req->user);
    }
    for (int i = 0; i < e->n_finished; i++)
        registry_take(e, e->finished[i]->id);
    pthread_mutex_unlock(&e->ev_lock);
    for (int i = 0; i < e->n_finished; i++)
        req_free(e, e->finished[i]);
    e->n_events = e->n_finished = 0;
    e->n_arena = 0;
}

/* ---- finishing ---------------------------------------------------------------- */

static void request_done(eng_engine *e, eng_req *r, double now) {
    eng_metrics_observe(e->metrics, ENG_HIST_E2E, now - r->t_submit);
    if (r->t_first_token > 0)
        eng_metrics_observe(e->metrics, ENG_HIST_DECODE, now - r->t_first_token);
    eng_metrics_add_request(e->metrics, r->outcome);
    grow((void **)&e->finished, &e->cap_finished, e->n_finished + 1, sizeof *e->finished);
    e->finished[e->n_finished++] = r;
}

/* Ends choice s (its final event is already queued): pages back to the pool. */
static void seq_finish(eng_engine *e, eng_seq *s, eng_finish_reason reason, double now) {
    eng_req *r = s->req;
    if (s->state == SEQ_RUNNING)
        list_remove(e->running, &e->n_running, s);
    else if (s->state == SEQ_WAITING)
        list_remove(e->waiting, &e->n_waiting, s);
    s->state = SEQ_DONE;
    kvc_seq_release(e->pool, &s->kv);
    if (reason == ENG_FINISH_ERROR || (s->index == 0 && r->outcome != ENG_FINISH_ERROR))
        r->outcome = reason;
    if (--r->n_live == 0)
        request_done(e, r, now);
}

/* Fails choice s with a message. Before the fork the other choices do not exist
 * yet: they fail too (each gets its final event). */
static void seq_fail(eng_engine *e, eng_seq *s, const char *msg, double now) {
    eng_req *r = s->req;
    push_event(e, r, s->index, -1, 0.0f, "", 0, ENG_FINISH_ERROR, msg, s->n_generated);
    if (!r->forked) {
        for (int i = 1; i < r->n; i++)
            push_event(e, r, i, -1, 0.0f, "", 0, ENG_FINISH_ERROR, msg, 0);
        r->n_live = 1;
    }
    seq_finish(e, s, ENG_FINISH_ERROR, now);
}

/* Takes every sequence of r out of the queues and gives its pages back. A
 * user cancel (final false) delivers nothing and frees r at once (it is out of
 * the registry already); at shutdown (final true) each live choice gets a
 * CANCELLED final event and r is retired after delivery. */
static void request_abort(eng_engine *e, eng_req *r, bool final) {
    for (int i = 0; i < r->n; i++) {
        eng_seq *s = r->seqs[i];
        if (s && s->state == SEQ_DONE)
            continue;
        if (final)
            push_event(e, r, i, -1, 0.0f, "", 0, ENG_FINISH_CANCELLED, NULL, s ? s->n_generated : 0);
        if (!s)
            continue;
        if (s->state == SEQ_RUNNING)
            list_remove(e->running, &e->n_running, s);
        else
            list_remove(e->waiting, &e->n_waiting, s);
        s->state = SEQ_DONE;
        kvc_seq_release(e->pool, &s->kv);
    }
    eng_metrics_begin(e->metrics);
    eng_metrics_add_request(e->metrics, ENG_FINISH_CANCELLED);
    eng_metrics_end(e->metrics);
    if (final) {
        grow((void **)&e->finished, &e->cap_finished, e->n_finished + 1, sizeof *e->finished);
        e->finished[e->n_finished++] = r;
    } else {
        req_free(e, r);
    }
}

/* ---- one generated token ----------------------------------------------------- */

static bool is_stop_id(const eng_req *r, int32_t tok) {
    for (int i = 0; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] == tok)
            return true;
    return false;
}

/* Entries of a record s's next draw takes, where the backend returns records
 * (eng_segment.cands_k); 0: the whole row. */
static int seq_cands_k(const eng_engine *e, const eng_seq *s) {
    if (eng_sampler_has_penalties(s->sampler) && !e->backend->cands_penalties)
        return 0;
    const int k = eng_sampler_cands_k(s->sampler);
    if (k == ENG_CANDS_DRAW) /* not for choices still to fork: each draws from the row itself */
        return e->backend->cands_draw && (s->req->forked || s->req->n == 1) ? k : 0;
    return k <= e->backend->cands_max ? k : 0;
}

/* Segment k's record request for s (want_logits): a record, a draw (its
 * uniform taken from the stream now), or the whole row; with a record or a
 * draw, the sampler's penalties into the step's entries (seg_pen_at[k]; the
 * pointers are set once the batch is built: the entries may move). */
static void seg_ask(eng_engine *e, int k, eng_seq *s) {
    eng_segment *g = &e->segs[k];
    g->cands_k = seq_cands_k(e, s);
    if (g->cands_k == ENG_CANDS_DRAW)
        eng_sampler_take_draw(s->sampler, &g->draw);
    e->seg_pen_at[k] = -1;
    if (!g->cands_k || !eng_sampler_has_penalties(s->sampler))
        return;
    const int n = eng_sampler_penalties(s->sampler, NULL, 0, &e->seg_pen[k]);
    if (n == 0) /* nothing seen yet: nothing to apply */
        return;
    grow((void **)&e->pen, &e->cap_pen, e->n_pen + n, sizeof *e->pen);
    eng_sampler_penalties(s->sampler, e->pen + e->n_pen, n, &e->seg_pen[k]);
    e->seg_pen_at[k] = e->n_pen;
    e->n_pen += n;
}

/* Draws s's next token from its row of logits (modified), or from the row's
 * record when its segment asked cands_k > 0. */
static int32_t draw_token(eng_seq *s, float *row, int cands_k, float *logprob) {
    return cands_k ? eng_sampler_sample_cands(s->sampler, (const eng_cands *)row, logprob)
                   : eng_sampler_sample(s->sampler, row, logprob);
}

/* Samples choice s's next token from logits (modified; a record when
 * cands_k > 0), queues its event and finishes the choice when a stop
 * condition holds. */
static void sample_token(eng_engine *e, eng_seq *s, float *logits, int cands_k, double now) {
    eng_req *r = s->req;
    float lp = s->drawn_lp;
    int32_t tok = s->drawn >= 0 ? s->drawn : draw_token(s, logits, cands_k, r->logprobs ? &lp : NULL);
    s->drawn = -1;
    eng_sampler_accept(s->sampler, tok, true);
    ENG__CHECK(s->n_tokens < s->cap_tokens, "request %llu choice %d: %d tokens, room for %d",
               (unsigned long long)r->id, s->index, s->n_tokens + 1, s->cap_tokens);
    s->tokens[s->n_tokens++] = tok;
    s->n_generated++;
    e->step_generated++;
    if (s->n_generated > 1)
        eng_metrics_observe(e->metrics, ENG_HIST_ITL, now - s->t_last_token);
    s->t_last_token = now;

    eng_finish_reason reason = ENG_FINISH_NONE;
    char text[1024];
    int n = 0;
    if (is_stop_id(r, tok) || (!r->ignore_eos && eng_tokenizer_is_eog(e->model->tok, tok)))
        reason = ENG_FINISH_STOP; /* the stop token's own text is not emitted */
    else
        n = eng_detok_push(&s->detok, e->model->tok, tok, text, (int)sizeof text / 2);
    if (reason == ENG_FINISH_NONE && s->n_generated >= r->max_gen)
        reason = ENG_FINISH_LENGTH;
    if (reason != ENG_FINISH_NONE)
        n += eng_detok_flush(&s->detok, text + n, (int)sizeof text - n);
    const char *out;
    int out_len;
    int m = eng_stop_push(&s->stop, text, n, reason != ENG_FINISH_NONE, &out, &out_len);
    if (m < 0) {
        seq_fail(e, s, "out of memory matching stop strings", now);
        return;
    }
    if (m == 1)
        reason = ENG_FINISH_STOP;
    push_event(e, r, s->index, tok, lp, out, out_len, reason, NULL, s->n_generated);
    if (reason != ENG_FINISH_NONE)
        seq_finish(e, s, reason, now);
}

/* Draws the step's tokens in parallel where that changes nothing: rows
 * whose sequence samples straight from its own row (not the first token of a
 * request with n > 1, whose choices share the row). The sampler of each
 * sequence is its own; the tokens are accepted, detokenized and published
 * in row order afterwards, as before. With a GPU backend a step's decode
 * takes less time than drawing 64 tokens from 49152 logits one after the
 * other (session 18: 0.5 against ~1.7 ms on the H200 machine's CPU). */
typedef struct {
    eng_seq **seqs;
    float **rows;
    int *cands_k;
} draw_job;

static void draw_task(void *ctx, int task, int worker) {
    draw_job *j = ctx;
    eng_seq *s = j->seqs[task];
    s->drawn_lp = 0.0f;
    s->drawn = draw_token(s, j->rows[task], j->cands_k[task], s->req->logprobs ? &s->drawn_lp : NULL);
}

static void draw_ahead(eng_engine *e, int n_segs) {
    if (!e->draw_tp || n_segs < 8)
        return;
    eng_seq *seqs[n_segs];
    float *rows[n_segs];
    int cands_k[n_segs];
    int n = 0, row = 0;
    for (int k = 0; k < n_segs; k++) {
        if (!e->segs[k].want_logits)
            continue;
        eng_seq *s = e->seg_seq[k];
        const eng_req *r = s->req;
        if (r->forked || r->n == 1) {
            seqs[n] = s;
            cands_k[n] = e->segs[k].cands_k;
            rows[n++] = e->logits + (size_t)row * e->n_vocab;
        }
        row++;
    }
    draw_job j = {.seqs = seqs, .rows = rows, .cands_k = cands_k};
    eng_threadpool_run(e->draw_tp, draw_task, &j, n);
}

/* The logits of the last pending token of s (a record when cands_k > 0): its
 * next token. The first time a request gets here its prompt is prefilled: the
 * other choices are forked off the prompt's pages and sample from the same
 * logits with their own streams (the same parameters: the same record). */
static void on_logits(eng_engine *e, eng_seq *s, float *logits, int cands_k, double now) {
    eng_req *r = s->req;
    if (r->t_first_token == 0) {
        r->t_first_token = now;
        eng_metrics_observe(e->metrics, ENG_HIST_TTFT, now - r->t_submit);
        eng_metrics_observe(e->metrics, ENG_HIST_PREFILL, now - r->t_admit);
        e->step_prompt += r->n_prompt;
    }
    if (r->forked) {
        sample_token(e, s, logits, cands_k, now);
        return;
    }
    r->forked = true;
    int n_children = 0;
    for (int i = 1; i < r->n; i++) {
        eng_seq *c = seq_new(e, r, i, s->tokens);
        if (c && kvc_seq_fork(e->pool, &s->kv, &c->kv) != KVC_OK) {
            seq_free(e, c);
            c = NULL;
        }
        if (!c) {
            /* the choices without a sequence fail; those made go on */
            for (int j = i; j < r->n; j++)
                push_event(e, r, j, -1, 0.0f, "", 0, ENG_FINISH_ERROR, "out of memory forking choices", 0);
            r->n_live -= r->n - i;
            r->outcome = ENG_FINISH_ERROR;
            break;
        }
        c->n_computed = s->n_computed;
        r->seqs[i] = c;
        running_append(e, c);
        n_children++;
    }
    if (n_children)
        memcpy(e->pristine, logits, (size_t)e->n_vocab * sizeof(float));
    sample_token(e, s, logits, cands_k, now);
    for (int i = 1; i <= n_children; i++) {
        memcpy(e->work, e->pristine, (size_t)e->n_vocab * sizeof(float));
        sample_token(e, r->seqs[i], e->work, cands_k, now);
    }
}

/* ---- scheduling ------------------------------------------------------------------ */

static void preempt(eng_engine *e, eng_seq *s) {
    list_remove(e->running, &e->n_running, s);
    kvc_seq_release(e->pool, &s->kv);
    s->n_computed = 0;
    waiting_insert(e, s);
    e->step_preempted++;
}

static int min3(int a, int b, int c) { return a < b ? (a < c ? a : c) : (b < c ? b : c); }

static void publish_stats(eng_engine *e) {
    int used = e->pages_total - kvc_pages_free(e->pool);
    if (used > e->pages_peak)
        e->pages_peak = used;
    pthread_mutex_lock(&e->stats_lock);
    e->stats.pages_used = used;
    e->stats.pages_peak = e->pages_peak;
    e->stats.running = e->n_running;
    e->stats.waiting = e->n_waiting;
    e->stats.steps = e->n_steps;
    e->stats.mixed_steps = e->n_mixed_steps;
    e->stats.logit_rows = e->n_logit_rows;
    e->stats.record_rows = e->n_record_rows;
    pthread_mutex_unlock(&e->stats_lock);
    pthread_mutex_lock(&e->q_lock);
    e->n_waiting_pub = e->n_waiting;
    int incoming = e->n_incoming;
    pthread_mutex_unlock(&e->q_lock);
    eng_metrics_begin(e->metrics);
    eng_metrics_set_load(e->metrics, e->n_running, e->n_waiting + incoming, used);
    eng_metrics_end(e->metrics);
}

/* Builds one batch, runs it, handles its logits. */
static void step(eng_engine *e) {
    const eng_engine_config *c = &e->cfg;
    int budget = c->max_batched_tokens, n_segs = 0;
    e->step_generated = e->step_prompt = e->step_preempted = 0;
    int max_segs = e->n_running + e->n_waiting + 1;
    if (max_segs > e->cap_segs) {
        int cap = e->cap_segs;
        grow((void **)&e->segs, &cap, max_segs, sizeof *e->segs);
        cap = e->cap_segs;
        grow((void **)&e->seg_pen, &cap, max_segs, sizeof *e->seg_pen);
        cap = e->cap_segs;
        grow((void **)&e->seg_pen_at, &cap, max_segs, sizeof *e->seg_pen_at);
        grow((void **)&e->seg_seq, &e->cap_segs, max_segs, sizeof *e->seg_seq);
    }
    e->n_pen = 0;
    if (e->n_running > 1)
        qsort(e->running, (size_t)e->n_running, sizeof *e->running, cmp_seq);
    double t0 = now_s();

#define ADD_SEG(S, N)                                                                               \
    do {                                                                                            \
        e->segs[n_segs] = (eng_segment){.seq = &(S)->kv, .pos0 = (S)->n_computed, .n_tokens = (N),     \
                                        .tokens = (S)->tokens + (S)->n_computed,                    \
                                        .want_logits = (S)->n_computed + (N) == (S)->n_tokens};     \
        if (e->segs[n_segs].want_logits)                                                            \
            seg_ask(e, n_segs, (S));                                                                \
        e->seg_seq[n_segs++] = (S);                                                                 \
        budget -= (N);                                                                              \
    } while (0)

    /* 1. decode: one token per running sequence in scheduling order; when the
     * pool is out of pages the last running sequence in that order (the largest
     * priority value, then the newest) gives its pages back. Victims are never
     * sequences already in this batch: those all come before s. */
    for (int i = 0; i < e->n_running && budget > 0; i++) {
        eng_seq *s = e->running[i];
        if (s->n_tokens - s->n_computed != 1)
            continue;
        int rc;
        bool self = false;
        while ((rc = kvc_seq_reserve(e->pool, &s->kv, s->n_tokens)) == KVC_ERR_FULL) {
            eng_seq *victim = e->running[e->n_running - 1];
            self = victim == s;
            preempt(e, victim);
            if (self)
                break;
        }
        if (self)
            break;
        if (rc != KVC_OK) {
            eng_metrics_begin(e->metrics);
            seq_fail(e, s, "out of memory growing a block table", t0);
            eng_metrics_end(e->metrics);
            i--;
            continue;
        }
        ADD_SEG(s, 1);
    }
    /* 2. prefill chunks of running sequences still prefilling */
    for (int i = 0; i < e->n_running && budget > 0; i++) {
        eng_seq *s = e->running[i];
        int pending = s->n_tokens - s->n_computed;
        if (pending <= 1)
            continue;
        ADD_SEG(s, min3(pending, c->prefill_chunk, budget));
    }
    /* 3. admissions, in priority and arrival order, while the pool has pages for
     * the whole prompt plus the watermark (not needed when nothing runs). No
     * admission in a step that preempted: the pool is short already. */
    while (!e->step_preempted && e->n_waiting > 0 && budget > 0) {
        eng_seq *s = e->waiting[0];
        int slots = s->req->forked ? 1 : s->req->n;
        if (e->n_running + slots > c->max_seqs)
            break;
        int need = (s->n_tokens + e->block_size - 1) / e->block_size;
        int free_pages = kvc_pages_free(e->pool);
        if (need > free_pages || (e->n_running > 0 && free_pages - need < e->watermark_pages))
            break;
        memmove(e->waiting, e->waiting + 1, (size_t)(e->n_waiting - 1) * sizeof *e->waiting);
        e->n_waiting--;
        running_append(e, s);
        if (kvc_seq_reserve(e->pool, &s->kv, s->n_tokens) != KVC_OK) {
            eng_metrics_begin(e->metrics);
            seq_fail(e, s, "out of memory reserving KV pages", t0);
            eng_metrics_end(e->metrics);
            continue;
        }
        if (!s->req->admitted) {
            s->req->admitted = true;
            s->req->t_admit = t0;
            eng_metrics_begin(e->metrics);
            eng_metrics_observe(e->metrics, ENG_HIST_QUEUE, t0 - s->req->t_submit);
            eng_metrics_end(e->metrics);
        }
        ADD_SEG(s, min3(s->n_tokens - s->n_computed, c->prefill_chunk, budget));
    }
#undef ADD_SEG
    for (int k = 0; k < n_segs; k++)
        if (e->segs[k].want_logits && e->seg_pen_at[k] >= 0) {
            e->seg_pen[k].e = e->pen + e->seg_pen_at[k];
            e->segs[k].pen = &e->seg_pen[k];
        }

    if (n_segs > 0) {
        bool has_decode = false, has_prefill = false;
        for (int k = 0; k < n_segs; k++) {
            const eng_seq *s = e->seg_seq[k];
            if (e->segs[k].n_tokens == 1 && s->n_computed + 1 == s->n_tokens && s->n_generated > 0)
                has_decode = true;
            else
                has_prefill = true;
        }
        e->n_steps++;
        e->n_mixed_steps += has_decode && has_prefill;
        eng_batch b = {.n_segs = n_segs, .segs = e->segs};
        int rows = eng_batch_logit_rows(&b);
        if (rows > e->cap_logit_rows) {
            eng_backend_free_host(e->backend, e->logits);
            e->logits = eng_backend_alloc_host(e->backend, (size_t)rows * (size_t)e->n_vocab * sizeof(float));
            ENG__CHECK(e->logits, "out of memory for %d rows of logits", rows);
            e->cap_logit_rows = rows;
        }
        char err[512];
        int rc = eng_forward(e->backend, &b, e->logits, err, sizeof err);
        if (!rc)
            draw_ahead(e, n_segs);
        double t1 = now_s();
        eng_metrics_begin(e->metrics);
        int row = 0;
        for (int k = 0; k < n_segs; k++) {
            eng_seq *s = e->seg_seq[k];
            if (rc) {
                seq_fail(e, s, err, t1);
                continue;
            }
            s->n_computed += e->segs[k].n_tokens;
            if (e->segs[k].want_logits) {
                e->n_logit_rows++;
                e->n_record_rows += e->segs[k].cands_k != 0;
                on_logits(e, s, e->logits + (size_t)row++ * e->n_vocab, e->segs[k].cands_k, t1);
            }
        }
        eng_metrics_add_tokens(e->metrics, e->step_prompt, e->step_generated, t1);
        eng_metrics_add_preemptions(e->metrics, e->step_preempted);
        eng_metrics_end(e->metrics);
    } else if (e->step_preempted) {
        eng_metrics_begin(e->metrics);
        eng_metrics_add_preemptions(e->metrics, e->step_preempted);
        eng_metrics_end(e->metrics);
    }
    deliver(e);
}

/* ---- the engine thread -------------------------------------------------------- */

/* Moves submissions into the waiting queue and handles cancellations. Both are
 * taken in one critical section so a request cancelled right after submit is
 * already in the waiting queue when its cancellation is handled. */
static void drain(eng_engine *e) {
    pthread_mutex_lock(&e->ev_lock);
    pthread_mutex_lock(&e->q_lock);
    eng_req *in = e->in_head;
    e->in_head = e->in_tail = NULL;
    e->n_waiting_pub += e->n_incoming; /* they wait in the engine now */
    e->n_incoming = 0;
    pthread_mutex_unlock(&e->q_lock);
    for (eng_req *r = in, *next; r; r = next) {
        next = r->qnext;
        r->qnext = NULL;
        waiting_insert(e, r->seqs[0]);
    }
    /* take the cancelled requests out of the registry: later cancels are no-ops */
    eng_req *cancelled = NULL;
    for (int i = 0; i < e->n_cancel; i++) {
        eng_req *r = registry_take(e, e->cancel_ids[i]);
        if (r) {
            r->qnext = cancelled;
            cancelled = r;
        }
    }
    e->n_cancel = 0;
    pthread_mutex_unlock(&e->ev_lock);
    for (eng_req *r = cancelled, *next; r; r = next) {
        next = r->qnext;
        request_abort(e, r, false);
    }
}

static void *engine_main(void *arg) {
    eng_engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->q_lock);
        while (!e->stopping && !e->in_head && e->n_running == 0 && e->n_waiting == 0) {
            e->idle = true;
            pthread_cond_broadcast(&e->idle_cv);
            pthread_cond_wait(&e->wake, &e->q_lock);
        }
        bool stopping = e->stopping;
        pthread_mutex_unlock(&e->q_lock);
        drain(e);
        if (stopping)
            break;
        step(e);
        publish_stats(e);
    }
    /* shutdown: whatever is left ends as cancelled */
    while (e->n_running > 0)
        request_abort(e, e->running[0]->req, true);
    while (e->n_waiting > 0)
        request_abort(e, e->waiting[0]->req, true);
    deliver(e);
    publish_stats(e);
    pthread_mutex_lock(&e->q_lock);
    e->idle = true;
    pthread_cond_broadcast(&e->idle_cv);
    pthread_mutex_unlock(&e->q_lock);
    return NULL;
}

/* ---- public API ---------------------------------------------------------------- */

static void engine_free(eng_engine *e) {
    if (e->backend)
        eng_backend_free_host(e->backend, e->logits);  /* (none without a backend) */
    eng_backend_destroy(e->backend);
    eng_threadpool_destroy(e->draw_tp);
    if (e->pool)
        kvc_pool_destroy(e->pool);
    eng_model_free(e->model);
    eng_metrics_destroy(e->metrics);
    free(e->model_path);
    free(e->kv_k);
    free(e->kv_v);
    free(e->calib_path);
    free(e->profile_name);
    free(e->cancel_ids);
    free(e->running);
    free(e->waiting);
    free(e->segs);
    free(e->seg_seq);
    free(e->seg_pen);
    free(e->seg_pen_at);
    free(e->pen);
    free(e->pristine);
    free(e->work);
    free(e->events);
    free(e->arena);
    free(e->finished);
    pthread_mutex_destroy(&e->q_lock);
    pthread_mutex_destroy(&e->ev_lock);
    pthread_mutex_destroy(&e->stats_lock);
    pthread_cond_destroy(&e->wake);
    pthread_cond_destroy(&e->idle_cv);
    free(e);
}

static int check_config(const eng_engine_config *c, char *err, size_t errlen) {
    struct {
        const char *name;
        int v, lo, hi;
    } ints[] = {
        {"block_size", c->block_size, 1, 1024},
        {"max_batched_tokens", c->max_batched_tokens, 1, 1 << 20},
        {"max_seqs", c->max_seqs, 1, 1 << 16},
        {"prefill_chunk", c->prefill_chunk, 1, 1 << 20},
        {"max_waiting", c->max_waiting, 1, 1 << 24},
    };
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (ints[i].v < ints[i].lo || ints[i].v > ints[i].hi) {
            snprintf(err, errlen, "engine: %s %d: must be %d..%d", ints[i].name, ints[i].v, ints[i].lo,
                     ints[i].hi);
            return -1;
        }
    if (!(c->watermark >= 0.0f && c->watermark < 0.5f)) {
        snprintf(err, errlen, "engine: watermark %g: must be in [0, 0.5)", (double)c->watermark);
        return -1;
    }
    if (c->kv_memory == 0) {
        snprintf(err, errlen, "engine: kv_memory 0: the KV cache needs memory");
        return -1;
    }
    if (!c->model_path) {
        snprintf(err, errlen, "engine: no model path");
        return -1;
    }
    if (c->backend && strcmp(c->backend, "cpu") && strcmp(c->backend, "cuda")) {
        snprintf(err, errlen, "engine: backend \"%s\": must be cpu or cuda", c->backend);
        return -1;
    }
    return 0;
}

/* The log line users know from other servers, and the capacity gauges. */
static void describe_cache(eng_engine *e) {
    const int B = e->block_size;
    size_t bpt = kvc_bytes_per_token(e->pool);
    double ratio = kvc_compression_ratio(e->pool);
    int cap = kvc_capacity_sequences(e->pool, e->n_ctx);
    fprintf(stderr,
            "KV cache: %d pages x %d tokens = %lld tokens, %zu bytes/token (%.2fx vs f16); "
            "max concurrency %d at %d tokens per sequence; backend %s\n",
            e->pages_total, B, (long long)e->pages_total * B, bpt, ratio, cap, e->n_ctx,
            e->backend->desc ? e->backend->desc : e->backend->name);
    eng_metrics_info info = {
        .profile = e->profile_name, .block_size = B,
        .k_codec = kvc_k_codec(e->pool), .v_codec = kvc_v_codec(e->pool),
        .pages_total = e->pages_total, .bytes_per_token = bpt, .compression_ratio = ratio,
    };
    static const int contexts[] = {1024, 2048, 4096, 8192, 32768};
    info.capacity_ctx[info.n_capacity] = e->n_ctx;
    info.capacity_seqs[info.n_capacity++] = cap;
    for (size_t i = 0; i < sizeof contexts / sizeof contexts[0]; i++)
        if (contexts[i] != e->n_ctx && info.n_capacity < ENG_METRICS_MAX_CTX) {
            info.capacity_ctx[info.n_capacity] = contexts[i];
            info.capacity_seqs[info.n_capacity++] = kvc_capacity_sequences(e->pool, contexts[i]);
        }
    e->metrics = eng_metrics_create(&info);
}

eng_engine *eng_engine_create(const eng_engine_config *cfg, char *err, size_t errlen) {
    if (check_config(cfg, err, errlen))
        return NULL;
    eng_engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "engine: out of memory");
        return NULL;
    }
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&e->ev_lock, &ma);
    pthread_mutexattr_destroy(&ma);
    pthread_mutex_init(&e->q_lock, NULL);
    pthread_mutex_init(&e->stats_lock, NULL);
    pthread_cond_init(&e->wake, NULL);
    pthread_cond_init(&e->idle_cv, NULL);
    e->next_id = 1;
    e->idle = true;

    e->cfg = *cfg;
    e->model_path = dup_str(cfg->model_path);
    e->kv_k = dup_str(cfg->kv_k ? cfg->kv_k : "f16");
    e->kv_v = dup_str(cfg->kv_v ? cfg->kv_v : "f16");
    e->calib_path = dup_str(cfg->calib_path);
    e->profile_name = dup_str(cfg->profile_name ? cfg->profile_name : "");
    if (!e->model_path || !e->kv_k || !e->kv_v || (cfg->calib_path && !e->calib_path) || !e->profile_name) {
        snprintf(err, errlen, "engine: out of memory");
        goto fail;
    }
    e->cfg.model_path = e->model_path;
    e->cfg.kv_k = e->kv_k;
    e->cfg.kv_v = e->kv_v;
    e->cfg.calib_path = e->calib_path;
    e->cfg.profile_name = e->profile_name;
    e->cfg.backend = cfg->backend && !strcmp(cfg->backend, "cuda") ? "cuda" : "cpu";

    e->model = eng_model_load(cfg->model_path, err, errlen);
    if (!e->model)
        goto fail;
    const eng_model_config *mc = &e->model->cfg;
    e->n_vocab = mc->n_vocab;
    e->n_ctx = cfg->n_ctx > 0 ? cfg->n_ctx : mc->n_ctx_train;
    if (e->n_ctx > mc->n_ctx_train) {
        snprintf(err, errlen, "engine: n_ctx %d exceeds the model's context of %d tokens (%s)", e->n_ctx,
                 mc->n_ctx_train, cfg->model_path);
        goto fail;
    }
    kvc_config kc = {
        .n_layer = mc->n_layer, .n_kv_head = mc->n_kv_head, .head_dim = mc->head_dim,
        .block_size = cfg->block_size, .memory_bytes = cfg->kv_memory,
        .k_codec = e->kv_k, .v_codec = e->kv_v, .calib = e->calib_path,
        /* a serving engine: page faults belong at start-up, not in steps (the
         * cuda backend's pages live on the device: the host arena stays unused) */
        .prefault = strcmp(e->cfg.backend, "cuda") != 0,
    };
    if (kvc_pool_create(&kc, &e->pool, err, errlen) != KVC_OK)
        goto fail;
    e->block_size = kvc_block_size(e->pool);
    e->pages_total = kvc_pages_total(e->pool);
    if (e->pages_total < 1) {
        snprintf(err, errlen, "engine: kv_memory %zu bytes holds no page of %zu bytes", cfg->kv_memory,
                 kvc_page_bytes(e->pool));
        goto fail;
    }
    /* A sequence alone must always fit, or preemption could not make progress. */
    if ((int64_t)e->pages_total * e->block_size < e->n_ctx) {
        fprintf(stderr, "kvserve: the KV cache holds %lld tokens: context limited to that (was %d)\n",
                (long long)e->pages_total * e->block_size, e->n_ctx);
        e->n_ctx = e->pages_total * e->block_size;
    }
    e->watermark_pages = (int)ceil((double)cfg->watermark * e->pages_total);
    eng_backend_options bo = {.n_threads = cfg->threads, .device = cfg->device};
    e->backend = eng_backend_create(e->cfg.backend, e->model, e->pool, &bo, err, errlen);
    if (!e->backend)
        goto fail;
    /* the CPU backend's workers are busy in the forward pass; a GPU's leave
     * the cores free for drawing tokens */
    if (strcmp(e->backend->name, "cpu") && !(e->draw_tp = eng_threadpool_create(cfg->threads > 0 ? cfg->threads : 0))) {
        snprintf(err, errlen, "engine: cannot start sampling threads");
        goto fail;
    }
    e->pristine = malloc((size_t)e->n_vocab * sizeof(float));
    e->work = malloc((size_t)e->n_vocab * sizeof(float));
    describe_cache(e);
    if (!e->pristine || !e->work || !e->metrics) {
        snprintf(err, errlen, "engine: out of memory");
        goto fail;
    }
    e->stats.pages_total = e->pages_total;
    e->stats.bytes_per_token = kvc_bytes_per_token(e->pool);
    e->stats.compression_ratio = kvc_compression_ratio(e->pool);
    e->stats.capacity_seqs = kvc_capacity_sequences(e->pool, e->n_ctx);
    e->stats.n_ctx = e->n_ctx;
    int rc = pthread_create(&e->thread, NULL, engine_main, e);
    if (rc) {
        snprintf(err, errlen, "engine: cannot start the engine thread: %s", strerror(rc));
        goto fail;
    }
    e->thread_started = true;
    return e;
fail:
    engine_free(e);
    return NULL;
}

void eng_engine_destroy(eng_engine *e) {
    if (!e)
        return;
    if (e->thread_started) {
        pthread_mutex_lock(&e->q_lock);
        e->stopping = true;
        pthread_cond_signal(&e->wake);
        pthread_mutex_unlock(&e->q_lock);
        pthread_join(e->thread, NULL);
    }
    engine_free(e);
}

/* Validates req against the engine; 0 or an error code with a message. */
static int check_request(const eng_engine *e, const eng_request *q, char *err, size_t errlen) {
    if (!q || !q->on_event) {
        snprintf(err, errlen, "request: no event callback");
        return ENG_ERR_INVALID;
    }
    if (!q->prompt || q->n_prompt < 1) {
        snprintf(err, errlen, "request: the prompt is empty");
        return ENG_ERR_INVALID;
    }
    for (int i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= e->n_vocab) {
            snprintf(err, errlen, "request: prompt token %d (id %d) is outside the vocabulary [0, %d)", i,
                     q->prompt[i], e->n_vocab);
            return ENG_ERR_INVALID;
        }
    if (q->n < 1 || q->n > MAX_CHOICES || q->n > e->cfg.max_seqs) {
        snprintf(err, errlen, "request: n = %d: must be 1..%d", q->n,
                 e->cfg.max_seqs < MAX_CHOICES ? e->cfg.max_seqs : MAX_CHOICES);
        return ENG_ERR_INVALID;
    }
    const char *bad = eng_sampling_params_check(&q->sampling);
    if (bad) {
        snprintf(err, errlen, "request: %s", bad);
        return ENG_ERR_INVALID;
    }
    if (q->n_stop < 0 || (q->n_stop > 0 && !q->stop) || q->n_stop_ids < 0 || (q->n_stop_ids > 0 && !q->stop_ids)) {
        snprintf(err, errlen, "request: stop list without entries");
        return ENG_ERR_INVALID;
    }
    for (int i = 0; i < q->n_stop; i++)
        if (!q->stop[i]) {
            snprintf(err, errlen, "request: stop string %d is NULL", i);
            return ENG_ERR_INVALID;
        }
    for (int i = 0; i < q->n_stop_ids; i++)
        if (q->stop_ids[i] < 0 || q->stop_ids[i] >= e->n_vocab) {
            snprintf(err, errlen, "request: stop token id %d is outside the vocabulary [0, %d)", q->stop_ids[i],
                     e->n_vocab);
            return ENG_ERR_INVALID;
        }
    if (q->n_prompt >= e->n_ctx) {
        snprintf(err, errlen,
                 "request: the prompt is %d tokens and the context is %d tokens: no room to generate", q->n_prompt,
                 e->n_ctx);
        return ENG_ERR_TOO_LONG;
    }
    if (q->max_tokens > 0 && (int64_t)q->n_prompt + q->max_tokens > e->n_ctx) {
        snprintf(err, errlen,
                 "request: the prompt (%d tokens) plus max_tokens (%d) is %lld tokens, longer than the context "
                 "of %d tokens",
                 q->n_prompt, q->max_tokens, (long long)q->n_prompt + q->max_tokens, e->n_ctx);
        return ENG_ERR_TOO_LONG;
    }
    return ENG_OK;
}

int eng_engine_submit(eng_engine *e, const eng_request *q, uint64_t *id, char *err, size_t errlen) {
    int rc = check_request(e, q, err, errlen);
    if (rc)
        return rc;
    eng_req *r = calloc(1, sizeof *r);
    if (!r)
        goto oom;
    r->n_prompt = q->n_prompt;
    r->max_gen = q->max_tokens > 0 ? q->max_tokens : e->n_ctx - q->n_prompt;
    r->n = q->n;
    r->n_live = q->n;
    r->sampling = q->sampling;
    r->ignore_eos = q->ignore_eos;
    r->logprobs = q->logprobs;
    r->priority = q->priority;
    r->cb = q->on_event;
    r->user = q->user;
    r->outcome = ENG_FINISH_STOP;
    if (q->n_stop > 0) {
        r->stops = calloc((size_t)q->n_stop, sizeof *r->stops);
        if (!r->stops)
            goto oom;
        for (; r->n_stop < q->n_stop; r->n_stop++)
            if (!(r->stops[r->n_stop] = strdup(q->stop[r->n_stop])))
                goto oom;
    }
    if (q->n_stop_ids > 0) {
        r->stop_ids = malloc((size_t)q->n_stop_ids * sizeof *r->stop_ids);
        if (!r->stop_ids)
            goto oom;
        memcpy(r->stop_ids, q->stop_ids, (size_t)q->n_stop_ids * sizeof *r->stop_ids);
        r->n_stop_ids = q->n_stop_ids;
    }
    r->seqs[0] = seq_new(e, r, 0, q->prompt);
    if (!r->seqs[0])
        goto oom;
    r->t_submit = now_s();

    /* once r is queued the engine may finish and free it at any moment: only
     * what was read under the lock may be used after it */
    uint64_t new_id = 0;
    pthread_mutex_lock(&e->ev_lock);
    pthread_mutex_lock(&e->q_lock);
    if (e->stopping) {
        rc = ENG_ERR_SHUTDOWN;
        snprintf(err, errlen, "engine: shutting down");
    } else if (e->n_incoming + e->n_waiting_pub >= e->cfg.max_waiting) {
        rc = ENG_ERR_OVERLOADED;
        snprintf(err, errlen, "engine: overloaded: %d requests are waiting already (max_waiting %d)",
                 e->n_incoming + e->n_waiting_pub, e->cfg.max_waiting);
    } else {
        r->id = new_id = e->next_id++;
        registry_add(e, r);
        if (e->in_tail)
            e->in_tail->qnext = r;
        else
            e->in_head = r;
        e->in_tail = r;
        e->n_incoming++;
        e->idle = false;
        pthread_cond_signal(&e->wake);
    }
    pthread_mutex_unlock(&e->q_lock);
    pthread_mutex_unlock(&e->ev_lock);
    if (rc) {
        req_free(e, r);
        return rc;
    }
    if (id)
        *id = new_id;
    return ENG_OK;
oom:
    req_free(e, r);
    snprintf(err, errlen, "engine: out of memory for a request");
    return ENG_ERR_NOMEM;
}

void eng_engine_cancel(eng_engine *e, uint64_t id) {
    pthread_mutex_lock(&e->ev_lock);
    eng_req *r = registry_find(e, id);
    if (r && !r->cancelled) {
        r->cancelled = true;
        int cap = e->cap_cancel;
        if (e->n_cancel + 1 > cap) {
            int c = cap ? cap * 2 : 64;
            uint64_t *p = realloc(e->cancel_ids, (size_t)c * sizeof *p);
            ENG__CHECK(p, "out of memory queueing a cancellation");
            e->cancel_ids = p;
            e->cap_cancel = c;
        }
        e->cancel_ids[e->n_cancel++] = id;
    }
    pthread_mutex_unlock(&e->ev_lock);
}

bool eng_engine_wait_idle(eng_engine *e, double timeout_s) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    double whole = floor(timeout_s);
    ts.tv_sec += (time_t)whole;
    ts.tv_nsec += (long)((timeout_s - whole) * 1e9);
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&e->q_lock);
    int rc = 0;
    while (!(e->idle && !e->in_head) && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&e->idle_cv, &e->q_lock, &ts);
    bool idle = e->idle && !e->in_head;
    pthread_mutex_unlock(&e->q_lock);
    return idle;
}

const eng_model *eng_engine_model(const eng_engine *e) { return e->model; }
eng_metrics *eng_engine_metrics(eng_engine *e) { return e->metrics; }

void eng_engine_stats_get(eng_engine *e, eng_engine_stats *s) {
    pthread_mutex_lock(&e->stats_lock);
    *s = e->stats;
    pthread_mutex_unlock(&e->stats_lock);
    pthread_mutex_lock(&e->q_lock);
    s->waiting += e->n_incoming;
    pthread_mutex_unlock(&e->q_lock);
}
