/* server.c: the daemon: routes, handlers, the engine hand-off, model
 * loading, signals and drain (see server.h).
 *
 * A generation request lives in a srv_task, owned by the loop thread:
 *   handler (loop)      route, API key, take the body, queue the prepare work
 *   prepare (worker)    validate the JSON, apply the chat template, tokenize,
 *                       check the context length
 *   submit (loop)       one engine request per prompt (srv_gen), each with
 *                       on_event = gen_on_event
 *   gen_on_event        (engine thread) copies the event into the server's
 *                       queue, uv_async_send
 *   drain_events (loop) SSE chunk per event, or accumulate; the last choice's
 *                       final event ends the response and frees the task
 * A client that hangs up (on_abort GONE) cancels the engine requests, drops
 * their queued events and frees the task at once; a task whose prepare work
 * is still running is freed when the work returns. */
#include "server/server.h"

#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <uv.h>

#include "api/openai.h"
#include "engine/chat.h"
#include "engine/engine.h"
#include "engine/metrics.h"
#include "engine/tokenizer.h"
#include "server/http.h"

typedef enum { SRV_LOADING, SRV_READY, SRV_FAILED } srv_state;

typedef struct srv_event srv_event;
typedef struct srv_task srv_task;

typedef struct {
    srv_task *task;
    int prompt_index;
    uint64_t engine_id;
    bool submitted;
    int live;                   /* choices without their final event */
    int prompt_tokens;
} srv_gen;

typedef struct {
    uv_loop_t loop;
    const api_config *cfg;
    const char *profile;
    srv_http *http;
    srv_state state;
    bool stopping;
    int exit_code;
    /* the model, once loaded */
    eng_engine *engine;
    const eng_model *model;
    const eng_tokenizer *tok;
    eng_chat_format chat_format;
    int n_ctx, n_vocab;
    char *model_name;           /* the id in the API */
    long long created;
    uv_work_t load_work;
    bool load_pending;
    char load_err[768];
    /* engine -> loop events */
    uv_async_t async;
    pthread_mutex_t ev_lock;
    srv_event *ev_head, *ev_tail;
    /* shutdown */
    uv_signal_t sig_term, sig_int;
    uv_timer_t grace;
    int n_signals;
    bool drained, handles_closed;
    uint64_t id_counter, seed_base;
} srv_server;

struct srv_event {
    srv_event *next;
    srv_gen *gen;
    int index;
    int32_t token;
    float logprob;
    eng_finish_reason finish;
    int prompt_tokens, completion_tokens;
    int text_len;
    char *error;                /* with ENG_FINISH_ERROR */
    char text[];                /* (text_len) + NUL */
};

struct srv_task {
    srv_server *s;
    srv_http_req *req;          /* NULL once the response is finished or the client gone */
    api_endpoint ep;
    char *body;
    size_t body_len;
    uv_work_t work;
    bool work_pending;
    /* prepared by the worker */
    api_request r;
    bool parsed;
    api_error err;
    bool failed;
    int n_prompts;
    int32_t **ids;              /* (n_prompts) prompt token ids */
    int *n_ids;                 /* (n_prompts) */
    char **echo;                /* (n_prompts) prompt texts for echo, or NULL */
    size_t *echo_len;
    char *reply;                /* tokenize / detokenize reply */
    size_t reply_len;
    /* generation */
    srv_gen *gens;              /* (n_prompts) */
    api_choice *choices;        /* (n_prompts * n) */
    int *text_offset;           /* (n_prompts * n) bytes sent per choice (streaming logprobs) */
    bool *started;              /* (n_prompts * n) first chunk sent */
    int n_choices, n_done;
    int prompt_tokens, completion_tokens;
    bool stream;
    char id[48];
    api_reply_meta meta;
    char first_error[256];
};

static double now_s(void) { return (double)uv_hrtime() * 1e-9; }

static uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* ---- small replies --------------------------------------------------------- */

/* Sends body (owned; len read after the call's arguments are evaluated, so
 * the renderer filling it may be an argument) as JSON. */
static void reply_json(srv_http_req *req, int status, char *body, const size_t *len, const char *extra) {
    if (!body) {
        api_error e;
        api_error_set(&e, 500, "internal_error", "", "out of memory rendering the reply");
        srv_http_respond_error(req, &e, NULL);
        return;
    }
    srv_http_respond(req, status, "application/json", body, *len, extra);
    free(body);
}

static void reply_error(srv_http_req *req, const api_error *e) {
    const char *extra = e->status == 503 ? "Retry-After: 1\r\n" : NULL;
    srv_http_respond_error(req, e, extra);
}

static void reply_loading(srv_server *s, srv_http_req *req) {
    api_error e;
    if (s->state == SRV_FAILED)
        api_error_set(&e, 503, "model_load_failed", "", "the model failed to load: %s", s->load_err);
    else
        api_error_set(&e, 503, "model_loading", "", "the model is still loading; retry shortly");
    srv_http_respond_error(req, &e, "Retry-After: 5\r\n");
}

/* ---- tasks ------------------------------------------------------------------ */

static void purge_events(srv_server *s, const srv_task *t) {
    pthread_mutex_lock(&s->ev_lock);
    srv_event **pp = &s->ev_head, *last = NULL;
    while (*pp) {
        srv_event *ev = *pp;
        if (ev->gen->task == t) {
            *pp = ev->next;
            free(ev->error);
            free(ev);
        } else {
            last = ev;
            pp = &ev->next;
        }
    }
    s->ev_tail = last;
    pthread_mutex_unlock(&s->ev_lock);
}

static void task_free(srv_task *t) {
    for (int i = 0; i < t->n_prompts; i++) {
        free(t->ids ? t->ids[i] : NULL);
        free(t->echo ? t->echo[i] : NULL);
    }
    free(t->ids);
    free(t->n_ids);
    free(t->echo);
    free(t->echo_len);
    for (int i = 0; t->choices && i < t->n_choices; i++)
        api_choice_free(&t->choices[i]);
    free(t->choices);
    free(t->text_offset);
    free(t->started);
    free(t->gens);
    free(t->reply);
    free(t->body);
    if (t->parsed)
        api_request_free(&t->r);
    free(t);
}

/* Cancels the engine requests still running and drops their queued events. */
static void task_cancel(srv_task *t) {
    srv_server *s = t->s;
    for (int i = 0; t->gens && i < t->n_prompts; i++)
        if (t->gens[i].submitted && t->gens[i].live > 0)
            eng_engine_cancel(s->engine, t->gens[i].engine_id);
    purge_events(s, t);
}

/* After the task's response is finished (the http layer has freed the
 * request): frees the task unless its prepare work still runs (then
 * after_prepare does). */
static void task_release(srv_task *t) {
    t->req = NULL;
    if (!t->work_pending)
        task_free(t);
}

/* The error a request aborted by its timeout or by shutdown gets. */
static void abort_error(const srv_task *t, srv_abort_reason why, api_error *e) {
    if (why == SRV_ABORT_TIMEOUT)
        api_error_set(e, 504, "timeout", "", "the request took longer than %.0f s (request_timeout)",
                      t->s->cfg->request_timeout);
    else
        api_error_set(e, 503, "shutting_down", "", "the server is shutting down");
}

static void task_abort(srv_http_req *req, srv_abort_reason why) {
    srv_task *t = req->user;
    task_cancel(t);
    if (why != SRV_ABORT_GONE) {
        api_error e;
        abort_error(t, why, &e);
        req->prompt_tokens = t->prompt_tokens;
        req->completion_tokens = t->completion_tokens;
        if (req->streaming) {
            size_t len;
            char *chunk = api_render_error_chunk(&e, &len);
            if (chunk)
                srv_http_stream_write(req, chunk, len);
            free(chunk);
            srv_http_stream_write(req, "data: [DONE]\n\n", 14);
            srv_http_stream_end(req);
        } else {
            reply_error(req, &e);
        }
    } else {
        req->prompt_tokens = t->prompt_tokens;
        req->completion_tokens = t->completion_tokens;
    }
    task_release(t);  /* the http layer finished the request or frees it */
}

/* ---- prepare (worker thread) ----------------------------------------------- */

static bool model_matches(const srv_server *s, const char *name) {
    if (!name || !strcmp(name, s->model_name) || !strcmp(name, s->cfg->model))
        return true;
    const char *base = strrchr(s->cfg->model, '/');
    return base && !strcmp(name, base + 1);
}

/* Tokenizes text into *ids (malloc'd); returns the count or -1 with t->err. */
static int tokenize(srv_task *t, const char *text, size_t len, bool add_bos, const char *param, int32_t **ids) {
    char err[256];
    int cap = (int)(len < 1024 ? 1024 : len + 16);
    if (len > (size_t)1 << 28) {
        api_error_set(&t->err, 400, NULL, param, "'%s' is too long (%zu bytes)", param, len);
        return -1;
    }
    for (;;) {
        int32_t *buf = malloc((size_t)cap * sizeof *buf);
        if (!buf) {
            api_error_set(&t->err, 500, "internal_error", param, "out of memory tokenizing '%s'", param);
            return -1;
        }
        int n = eng_tokenize(t->s->tok, text, len, add_bos, true, buf, cap, err, sizeof err);
        if (n < 0) {
            free(buf);
            api_error_set(&t->err, 400, NULL, param, "'%s' cannot be tokenized: %s", param, err);
            return -1;
        }
        if (n <= cap) {
            *ids = buf;
            return n;
        }
        free(buf);
        cap = n;
    }
}

/* The context check with OpenAI's wording: both lengths named. */
static int check_length(srv_task *t, int n_prompt, const char *param) {
    srv_server *s = t->s;
    int max_tokens = t->r.max_tokens;
    if (n_prompt == 0) {
        api_error_set(&t->err, 400, NULL, param, "'%s' is empty (0 tokens)", param);
        return -1;
    }
    if (n_prompt >= s->n_ctx || (max_tokens > 0 && (long long)n_prompt + max_tokens > s->n_ctx)) {
        api_error_set(&t->err, 400, "context_length_exceeded", param,
                      "This model's maximum context length is %d tokens. However, you requested %lld tokens "
                      "(%d in the prompt, %d for the completion). Please reduce the length of the prompt or "
                      "max_tokens.",
                      s->n_ctx, (long long)n_prompt + (max_tokens > 0 ? max_tokens : 1), n_prompt,
                      max_tokens > 0 ? max_tokens : 1);
        return -1;
    }
    return 0;
}

/* A prompt rendered from token ids (detokenize, echo of id prompts). */
static char *ids_to_text(const eng_tokenizer *tok, const int32_t *ids, int n, size_t *len) {
    size_t cap = (size_t)n * 16 + 64, at = 0;
    char *out = malloc(cap);
    eng_detok d;
    eng_detok_init(&d);
    for (int i = 0; out && i <= n; i++) {
        if (at + 300 > cap) {
            cap = 2 * cap + 300;
            char *o = realloc(out, cap);
            if (!o) {
                free(out);
                return NULL;
            }
            out = o;
        }
        at += (size_t)(i < n ? eng_detok_push(&d, tok, ids[i], out + at, 290) : eng_detok_flush(&d, out + at, 290));
    }
    if (out) {
        out[at] = 0;
        *len = at;
    }
    return out;
}

static int render_chat(srv_task *t, char **text) {
    char err[256];
    const char *tmpl = t->s->model->chat_template;
    if (eng_chat_apply(t->s->chat_format, tmpl, t->r.messages, t->r.n_messages, t->r.add_generation_prompt, text,
                       err, sizeof err)) {
        api_error_set(&t->err, 400, NULL, "messages", "%s", err);
        return -1;
    }
    return 0;
}

static int alloc_prompts(srv_task *t, int n) {
    t->n_prompts = n;
    t->ids = calloc((size_t)n, sizeof *t->ids);
    t->n_ids = calloc((size_t)n, sizeof *t->n_ids);
    t->echo = calloc((size_t)n, sizeof *t->echo);
    t->echo_len = calloc((size_t)n, sizeof *t->echo_len);
    if (!t->ids || !t->n_ids || !t->echo || !t->echo_len) {
        api_error_set(&t->err, 500, "internal_error", "", "out of memory");
        return -1;
    }
    return 0;
}

static int prepare(srv_task *t) {
    srv_server *s = t->s;
    if (api_request_parse(t->ep, t->body, t->body_len, s->n_vocab, &t->r, &t->err))
        return -1;
    t->parsed = true;
    free(t->body);
    t->body = NULL;
    if (!model_matches(s, t->r.model)) {
        api_error_set(&t->err, 404, "model_not_found", "model", "The model `%.200s` does not exist (this server has `%s`)",
                      t->r.model, s->model_name);
        return -1;
    }
    bool add_bos = eng_tokenizer_add_bos(s->tok);
    switch (t->ep) {
    case API_EP_COMPLETIONS:
        if (alloc_prompts(t, t->r.n_prompts))
            return -1;
        for (int i = 0; i < t->n_prompts; i++) {
            const api_prompt *p = &t->r.prompts[i];
            char param[32];
            snprintf(param, sizeof param, t->n_prompts > 1 ? "prompt[%d]" : "prompt", i);
            if (p->text) {
                if ((t->n_ids[i] = tokenize(t, p->text, p->text_len, add_bos, param, &t->ids[i])) < 0)
                    return -1;
            } else {
                t->ids[i] = malloc((size_t)p->n_ids * sizeof(int32_t));
                if (!t->ids[i]) {
                    api_error_set(&t->err, 500, "internal_error", "", "out of memory");
                    return -1;
                }
                memcpy(t->ids[i], p->ids, (size_t)p->n_ids * sizeof(int32_t));
                t->n_ids[i] = p->n_ids;
            }
            if (check_length(t, t->n_ids[i], param))
                return -1;
            if (t->r.echo) {
                if (p->text) {
                    t->echo[i] = malloc(p->text_len + 1);
                    if (t->echo[i]) {
                        memcpy(t->echo[i], p->text, p->text_len);
                        t->echo_len[i] = p->text_len;
                    }
                } else {
                    t->echo[i] = ids_to_text(s->tok, p->ids, p->n_ids, &t->echo_len[i]);
                }
                if (!t->echo[i]) {
                    api_error_set(&t->err, 500, "internal_error", "", "out of memory");
                    return -1;
                }
            }
        }
        return 0;
    case API_EP_CHAT: {
        char *text = NULL;
        if (alloc_prompts(t, 1) || render_chat(t, &text))
            return -1;
        t->n_ids[0] = tokenize(t, text, strlen(text), false, "messages", &t->ids[0]);
        free(text);
        if (t->n_ids[0] < 0)
            return -1;
        return check_length(t, t->n_ids[0], "messages");
    }
    case API_EP_TOKENIZE: {
        int32_t *ids = NULL;
        int n;
        if (t->r.n_messages > 0) {
            char *text = NULL;
            if (render_chat(t, &text))
                return -1;
            n = tokenize(t, text, strlen(text), false, "messages", &ids);
            free(text);
        } else {
            n = tokenize(t, t->r.prompts[0].text, t->r.prompts[0].text_len, add_bos && t->r.add_special_tokens,
                         "prompt", &ids);
        }
        if (n < 0)
            return -1;
        t->reply = api_render_tokenize(ids, n, s->n_ctx, &t->reply_len);
        free(ids);
        return 0;
    }
    case API_EP_DETOKENIZE: {
        size_t len = 0;
        char *text = ids_to_text(s->tok, t->r.prompts[0].ids, t->r.prompts[0].n_ids, &len);
        if (text)
            t->reply = api_render_detokenize(text, len, &t->reply_len);
        free(text);
        return 0;
    }
    default:
        abort();  /* only POST endpoints reach prepare */
    }
}

static void prepare_work(uv_work_t *w) {
    srv_task *t = w->data;
    t->failed = prepare(t) != 0;
}

/* ---- generation (loop thread) ------------------------------------------------ */

static void gen_on_event(const eng_event *ev, void *user);

static int submit_err_status(int rc) {
    switch (rc) {
    case ENG_ERR_OVERLOADED:
    case ENG_ERR_SHUTDOWN: return 503;
    case ENG_ERR_NOMEM: return 500;
    default: return 400;
    }
}

/* Writes chunk (owned; *len read after the arguments are evaluated). */
static void stream_write_owned(srv_task *t, char *chunk, const size_t *len) {
    if (chunk && t->req)
        srv_http_stream_write(t->req, chunk, *len);
    free(chunk);
}

static void start_generation(srv_task *t) {
    srv_server *s = t->s;
    srv_http_req *req = t->req;
    int n = t->r.n;
    t->stream = t->r.stream;
    t->n_choices = t->n_prompts * n;
    t->gens = calloc((size_t)t->n_prompts, sizeof *t->gens);
    t->choices = calloc((size_t)t->n_choices, sizeof *t->choices);
    t->text_offset = calloc((size_t)t->n_choices, sizeof *t->text_offset);
    t->started = calloc((size_t)t->n_choices, sizeof *t->started);
    if (!t->gens || !t->choices || !t->text_offset || !t->started) {
        api_error_set(&t->err, 500, "internal_error", "", "out of memory");
        reply_error(req, &t->err);
        task_release(t);
        return;
    }
    snprintf(t->id, sizeof t->id, "%s-%016" PRIx64, t->ep == API_EP_CHAT ? "chatcmpl" : "cmpl",
             mix64(s->seed_base ^ ++s->id_counter));
    t->meta = (api_reply_meta){.ep = t->ep, .id = t->id, .created = (long long)time(NULL), .model = s->model_name,
                               .logprobs = t->r.logprobs};
    uint64_t seed = t->r.seed_given ? t->r.sampling.seed : mix64(s->seed_base + ++s->id_counter);
    for (int i = 0; i < t->n_prompts; i++) {
        srv_gen *g = &t->gens[i];
        g->task = t;
        g->prompt_index = i;
        g->live = n;
        g->prompt_tokens = t->n_ids[i];
        eng_request q = {
            .prompt = t->ids[i], .n_prompt = t->n_ids[i], .sampling = t->r.sampling,
            .max_tokens = t->r.max_tokens, .n = n, .stop = t->r.stop, .n_stop = t->r.n_stop,
            .stop_ids = t->r.stop_ids, .n_stop_ids = t->r.n_stop_ids, .ignore_eos = t->r.ignore_eos,
            .logprobs = t->r.logprobs, .priority = t->r.priority, .on_event = gen_on_event, .user = g,
        };
        q.sampling.seed = seed;
        char err[512];
        int rc = eng_engine_submit(s->engine, &q, &g->engine_id, err, sizeof err);
        if (rc != ENG_OK) {
            task_cancel(t);
            api_error e;
            const char *msg = strncmp(err, "request: ", 9) ? err : err + 9;
            api_error_set(&e, submit_err_status(rc),
                          rc == ENG_ERR_OVERLOADED ? "overloaded" : rc == ENG_ERR_TOO_LONG ? "context_length_exceeded" : NULL,
                          rc == ENG_ERR_TOO_LONG ? (t->ep == API_EP_CHAT ? "messages" : "prompt") : "", "%s", msg);
            reply_error(req, &e);
            task_release(t);
            return;
        }
        g->submitted = true;
        t->prompt_tokens += t->n_ids[i];
    }
    req->prompt_tokens = t->prompt_tokens;
    req->completion_tokens = 0;
    req->on_abort = task_abort;
    req->user = t;
    if (!t->stream) {
        for (int i = 0; i < t->n_prompts; i++)
            for (int k = 0; t->echo[i] && k < n; k++)
                if (api_choice_append(&t->choices[i * n + k], t->echo[i], t->echo_len[i])) {
                    task_cancel(t);
                    api_error_set(&t->err, 500, "internal_error", "", "out of memory");
                    reply_error(req, &t->err);
                    task_release(t);
                    return;
                }
        return;
    }
    srv_http_stream_begin(req, 200, "text/event-stream", NULL);
    for (int i = 0; i < t->n_prompts; i++)
        for (int k = 0; t->echo[i] && k < n; k++) {
            size_t len;
            int c = i * n + k;
            stream_write_owned(t, api_render_chunk(&t->meta, c, true, t->echo[i], t->echo_len[i], NULL,
                                                   ENG_FINISH_NONE, t->r.include_usage, &len), &len);
            t->started[c] = true;
            t->text_offset[c] = (int)t->echo_len[i];
        }
}

static void finish_task(srv_task *t) {
    srv_http_req *req = t->req;
    req->prompt_tokens = t->prompt_tokens;
    req->completion_tokens = t->completion_tokens;
    if (t->stream) {
        size_t len;
        if (t->r.include_usage)
            stream_write_owned(t, api_render_usage_chunk(&t->meta, t->prompt_tokens, t->completion_tokens, &len), &len);
        srv_http_stream_write(req, "data: [DONE]\n\n", 14);
        srv_http_stream_end(req);
    } else if (t->first_error[0]) {
        api_error e;
        api_error_set(&e, 500, "internal_error", "", "generation failed: %s", t->first_error);
        reply_error(req, &e);
    } else {
        size_t len;
        reply_json(req, 200,
                   api_render_reply(&t->meta, t->choices, t->n_choices, t->prompt_tokens, t->completion_tokens, &len),
                   &len, NULL);
    }
    task_release(t);
}

static void handle_event(srv_task *t, const srv_event *ev) {
    srv_server *s = t->s;
    srv_gen *g = ev->gen;
    if (ev->index < 0 || ev->index >= t->r.n)
        return;
    int c = g->prompt_index * t->r.n + ev->index;
    srv_http_req *req = t->req;
    if (req->ttft < 0 && ev->token >= 0)
        req->ttft = now_s() - req->t_start;
    /* the end token that stopped a choice has no text and no logprob entry */
    bool end_token = ev->finish == ENG_FINISH_STOP && ev->token >= 0 && eng_tokenizer_is_eog(s->tok, ev->token);
    for (int i = 0; !end_token && ev->finish == ENG_FINISH_STOP && i < t->r.n_stop_ids; i++)
        end_token = ev->token == t->r.stop_ids[i];
    bool has_lp = t->r.logprobs && ev->token >= 0 && !end_token;
    char piece[512];
    int piece_len = 0;
    if (has_lp) {
        piece_len = eng_token_to_bytes(s->tok, ev->token, true, piece, sizeof piece);
        if (piece_len > (int)sizeof piece)
            piece_len = (int)sizeof piece;
    }
    if (ev->finish == ENG_FINISH_ERROR && !t->first_error[0])
        snprintf(t->first_error, sizeof t->first_error, "%s", ev->error ? ev->error : "engine error");
    if (t->stream) {
        size_t len;
        if (ev->finish == ENG_FINISH_ERROR) {
            api_error e;
            api_error_set(&e, 500, "internal_error", "", "generation failed: %s", t->first_error);
            stream_write_owned(t, api_render_error_chunk(&e, &len), &len);
        } else if (ev->text_len > 0 || has_lp || ev->finish != ENG_FINISH_NONE) {
            api_chunk_logprob lp = {piece, (size_t)piece_len, ev->logprob, t->text_offset[c]};
            stream_write_owned(t, api_render_chunk(&t->meta, c, !t->started[c], ev->text, (size_t)ev->text_len,
                                                   has_lp ? &lp : NULL, ev->finish, t->r.include_usage, &len),
                               &len);
            t->started[c] = true;
        }
        t->text_offset[c] += ev->text_len;
    } else {
        api_choice *ch = &t->choices[c];
        if ((has_lp && api_choice_add_logprob(ch, piece, (size_t)piece_len, ev->logprob)) ||
            api_choice_append(ch, ev->text, (size_t)ev->text_len)) {
            if (!t->first_error[0])
                snprintf(t->first_error, sizeof t->first_error, "out of memory");
        }
        if (ev->finish != ENG_FINISH_NONE)
            ch->finish = ev->finish;
    }
    if (ev->finish != ENG_FINISH_NONE) {
        t->completion_tokens += ev->completion_tokens;
        g->live--;
        if (++t->n_done == t->n_choices)
            finish_task(t);
    }
}

/* Engine thread: copy the event, queue it, wake the loop. */
static void gen_on_event(const eng_event *ev, void *user) {
    srv_gen *g = user;
    srv_server *s = g->task->s;
    srv_event *e = malloc(sizeof *e + (size_t)ev->text_len + 1);
    if (!e) {
        fprintf(stderr, "kvserve: out of memory queueing a token event\n");
        abort();  /* losing a final event would leave a request hanging forever */
    }
    e->next = NULL;
    e->gen = g;
    e->index = ev->index;
    e->token = ev->token;
    e->logprob = ev->logprob;
    e->finish = ev->finish;
    e->prompt_tokens = ev->prompt_tokens;
    e->completion_tokens = ev->completion_tokens;
    e->text_len = ev->text_len;
    if (ev->text_len > 0)
        memcpy(e->text, ev->text, (size_t)ev->text_len);
    e->text[ev->text_len] = 0;
    e->error = ev->error ? strdup(ev->error) : NULL;
    pthread_mutex_lock(&s->ev_lock);
    if (s->ev_tail)
        s->ev_tail->next = e;
    else
        s->ev_head = e;
    s->ev_tail = e;
    pthread_mutex_unlock(&s->ev_lock);
    uv_async_send(&s->async);
}

/* Loop thread: one event at a time, so that a task freed by one event (or
 * by an abort it causes) has its remaining events purged before they are
 * looked at. */
static void drain_events(uv_async_t *a) {
    srv_server *s = a->data;
    for (;;) {
        pthread_mutex_lock(&s->ev_lock);
        srv_event *ev = s->ev_head;
        if (ev) {
            s->ev_head = ev->next;
            if (!s->ev_head)
                s->ev_tail = NULL;
        }
        pthread_mutex_unlock(&s->ev_lock);
        if (!ev)
            return;
        srv_task *t = ev->gen->task;
        if (t->req)
            handle_event(t, ev);
        free(ev->error);
        free(ev);
    }
}

static void after_prepare(uv_work_t *w, int status) {
    srv_task *t = w->data;
    t->work_pending = false;
    if (!t->req) {  /* the client left meanwhile */
        task_free(t);
        return;
    }
    srv_http_req *req = t->req;
    if (t->failed) {
        reply_error(req, &t->err);
        task_release(t);
        return;
    }
    if (t->ep == API_EP_TOKENIZE || t->ep == API_EP_DETOKENIZE) {
        reply_json(req, 200, t->reply, &t->reply_len, NULL);
        t->reply = NULL;
        task_release(t);
        return;
    }
    if (t->r.unknown[0])
        fprintf(stderr, "kvserve: request %s: ignoring unknown fields: %s\n", req->request_id, t->r.unknown);
    start_generation(t);
}

/* Abort while the prepare work runs: the task waits for the work. */
static void prepare_abort(srv_http_req *req, srv_abort_reason why) {
    srv_task *t = req->user;
    if (why != SRV_ABORT_GONE) {
        api_error e;
        abort_error(t, why, &e);
        reply_error(req, &e);
    }
    t->req = NULL;
}

/* ---- handlers ---------------------------------------------------------------- */

static bool key_ok(const char *want, const char *auth) {
    if (!auth || strncasecmp(auth, "Bearer ", 7))
        return false;
    const char *got = auth + 7;
    size_t n = strlen(want), m = strlen(got);
    unsigned diff = (unsigned)(n ^ m);
    for (size_t i = 0; i < n; i++)
        diff |= (unsigned char)want[i] ^ (unsigned char)(i < m ? got[i] : 0);
    return diff == 0;
}

static void handle_health(srv_server *s, srv_http_req *req) {
    static const char ok[] = "{\"status\":\"ok\"}", loading[] = "{\"status\":\"loading\"}",
                      failed[] = "{\"status\":\"error\"}", stopping[] = "{\"status\":\"stopping\"}";
    if (s->stopping)
        srv_http_respond(req, 503, "application/json", stopping, sizeof stopping - 1, NULL);
    else if (s->state == SRV_READY)
        srv_http_respond(req, 200, "application/json", ok, sizeof ok - 1, NULL);
    else if (s->state == SRV_LOADING)
        srv_http_respond(req, 503, "application/json", loading, sizeof loading - 1, "Retry-After: 5\r\n");
    else
        srv_http_respond(req, 503, "application/json", failed, sizeof failed - 1, NULL);
}

static int buf_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int buf_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...) {
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(*buf ? *buf + *len : NULL, *buf ? *cap - *len : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return -1;
        if (*buf && *len + (size_t)n < *cap) {
            *len += (size_t)n;
            return 0;
        }
        size_t c = *cap ? *cap : 4096;
        while (c <= *len + (size_t)n)
            c *= 2;
        char *b = realloc(*buf, c);
        if (!b)
            return -1;
        *buf = b;
        *cap = c;
    }
}

/* The server's own metrics, then the engine's registry. */
static void handle_metrics(srv_server *s, srv_http_req *req) {
    srv_http_stats st;
    srv_http_stats_get(s->http, &st);
    char *buf = NULL;
    size_t len = 0, cap = 0;
    static const char *classes[6] = {"aborted", "1xx", "2xx", "3xx", "4xx", "5xx"};
    int rc = buf_printf(&buf, &len, &cap,
                        "# HELP kvserve_server_ready Whether the model is loaded and requests are served (1) or not (0).\n"
                        "# TYPE kvserve_server_ready gauge\nkvserve_server_ready %d\n"
                        "# HELP kvserve_http_requests_total HTTP requests received.\n"
                        "# TYPE kvserve_http_requests_total counter\nkvserve_http_requests_total %" PRIu64 "\n"
                        "# HELP kvserve_http_responses_total HTTP responses by status class (aborted: the client left first).\n"
                        "# TYPE kvserve_http_responses_total counter\n",
                        s->state == SRV_READY && !s->stopping, st.requests_total);
    for (int i = 0; i < 6 && !rc; i++)
        rc = buf_printf(&buf, &len, &cap, "kvserve_http_responses_total{code=\"%s\"} %" PRIu64 "\n", classes[i],
                        st.responses[i]);
    if (!rc)
        rc = buf_printf(&buf, &len, &cap,
                        "# HELP kvserve_http_connections Open HTTP connections.\n"
                        "# TYPE kvserve_http_connections gauge\nkvserve_http_connections %d\n"
                        "# HELP kvserve_http_connections_accepted_total HTTP connections accepted.\n"
                        "# TYPE kvserve_http_connections_accepted_total counter\n"
                        "kvserve_http_connections_accepted_total %" PRIu64 "\n"
                        "# HELP kvserve_http_connections_rejected_total Connections refused at max_connections.\n"
                        "# TYPE kvserve_http_connections_rejected_total counter\n"
                        "kvserve_http_connections_rejected_total %" PRIu64 "\n",
                        st.connections_open, st.connections_total, st.rejected_connections);
    if (!rc && s->engine) {
        char *m = eng_metrics_render(eng_engine_metrics(s->engine));
        rc = m ? buf_printf(&buf, &len, &cap, "%s", m) : -1;
        free(m);
    }
    if (rc) {
        free(buf);
        api_error e;
        api_error_set(&e, 500, "internal_error", "", "out of memory rendering metrics");
        reply_error(req, &e);
        return;
    }
    srv_http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", buf, len, NULL);
    free(buf);
}

static void handle_models(srv_server *s, srv_http_req *req, api_endpoint ep) {
    size_t len;
    if (ep == API_EP_MODELS) {
        reply_json(req, 200, api_render_models(s->model_name, s->created, s->n_ctx, &len), &len, NULL);
        return;
    }
    const char *id = req->url + strlen("/v1/models/");
    size_t id_len = req->path_len - strlen("/v1/models/");
    char name[256];
    snprintf(name, sizeof name, "%.*s", (int)(id_len < 255 ? id_len : 255), id);
    if (!model_matches(s, name)) {
        api_error e;
        api_error_set(&e, 404, "model_not_found", "model", "The model `%s` does not exist", name);
        reply_error(req, &e);
        return;
    }
    reply_json(req, 200, api_render_model(s->model_name, s->created, s->n_ctx, &len), &len, NULL);
}

static void handle_post(srv_server *s, srv_http_req *req, api_endpoint ep) {
    srv_task *t = calloc(1, sizeof *t);
    if (!t) {
        api_error e;
        api_error_set(&e, 500, "internal_error", "", "out of memory");
        reply_error(req, &e);
        return;
    }
    t->s = s;
    t->req = req;
    t->ep = ep;
    t->body = req->body;
    t->body_len = req->body_len;
    req->body = NULL;
    req->body_len = 0;
    req->user = t;
    req->on_abort = prepare_abort;
    t->work.data = t;
    t->work_pending = true;
    int rc = uv_queue_work(&s->loop, &t->work, prepare_work, after_prepare);
    if (rc) {
        t->work_pending = false;
        api_error e;
        api_error_set(&e, 500, "internal_error", "", "cannot queue the request: %s", uv_strerror(rc));
        reply_error(req, &e);
        task_release(t);
    }
}

static void handle(srv_http_req *req, void *ctx) {
    srv_server *s = ctx;
    api_error e;
    const char *allow = NULL;
    api_endpoint ep = api_route(req->method, req->url, req->path_len, &allow, &e);
    if (ep == API_EP_NONE) {
        char extra[64] = "";
        if (allow)
            snprintf(extra, sizeof extra, "Allow: %s\r\n", allow);
        srv_http_respond_error(req, &e, allow ? extra : NULL);
        return;
    }
    if (s->cfg->api_key && api_endpoint_needs_auth(ep) &&
        !key_ok(s->cfg->api_key, srv_http_req_header(req, "authorization"))) {
        api_error_set(&e, 401, "invalid_api_key", "",
                      "Incorrect or missing API key: send 'Authorization: Bearer <key>'");
        srv_http_respond_error(req, &e, "WWW-Authenticate: Bearer\r\n");
        return;
    }
    switch (ep) {
    case API_EP_HEALTH:
        handle_health(s, req);
        return;
    case API_EP_METRICS:
        handle_metrics(s, req);
        return;
    default:
        break;
    }
    if (s->state != SRV_READY) {
        reply_loading(s, req);
        return;
    }
    if (ep == API_EP_MODELS || ep == API_EP_MODEL)
        handle_models(s, req, ep);
    else
        handle_post(s, req, ep);
}

/* ---- loading, signals, drain ----------------------------------------------------- */

static void load_work(uv_work_t *w) {
    srv_server *s = w->data;
    const api_config *c = s->cfg;
    eng_engine_config ec;
    eng_engine_config_default(&ec);
    ec.model_path = c->model;
    ec.threads = c->threads;
    ec.backend = c->backend;
    ec.device = c->devices ? atoi(c->devices) : 0;
    ec.kv_memory = c->kv_memory;
    ec.block_size = c->block_size;
    ec.kv_k = c->kv_k;
    ec.kv_v = c->kv_v;
    ec.calib_path = c->calib;
    ec.max_batched_tokens = c->max_batched_tokens;
    ec.max_seqs = c->max_seqs;
    ec.prefill_chunk = c->prefill_chunk;
    ec.max_waiting = c->max_waiting;
    ec.watermark = (float)c->watermark;
    ec.n_ctx = c->n_ctx;
    ec.profile_name = s->profile;
    s->engine = eng_engine_create(&ec, s->load_err, sizeof s->load_err);
}

static void on_drained(srv_http *h, void *ctx);

static void stop_loop_handles(srv_server *s) {
    uv_close((uv_handle_t *)&s->sig_term, NULL);
    uv_close((uv_handle_t *)&s->sig_int, NULL);
    uv_close((uv_handle_t *)&s->grace, NULL);
    uv_close((uv_handle_t *)&s->async, NULL);
}

static void on_grace(uv_timer_t *t) {
    srv_server *s = t->data;
    fprintf(stderr, "kvserve: grace period over: aborting the requests still running\n");
    srv_http_abort_all(s->http);
}

static void begin_shutdown(srv_server *s, double grace) {
    if (s->stopping) {
        uv_timer_start(&s->grace, on_grace, 0, 0);  /* a second signal: no more waiting */
        return;
    }
    s->stopping = true;
    uv_timer_start(&s->grace, on_grace, (uint64_t)(grace * 1e3), 0);
    srv_http_drain(s->http, on_drained);
}

/* The loop ends once the connections are drained and the model load (which
 * cannot be interrupted) has returned. */
static void maybe_stop(srv_server *s) {
    if (s->drained && !s->load_pending && !s->handles_closed) {
        s->handles_closed = true;
        stop_loop_handles(s);
    }
}

static void on_drained(srv_http *h, void *ctx) {
    srv_server *s = ctx;
    s->drained = true;
    maybe_stop(s);
}

static void after_load(uv_work_t *w, int status) {
    srv_server *s = w->data;
    s->load_pending = false;
    if (!s->engine) {
        fprintf(stderr, "kvserve serve: cannot start the engine%s%s: %s\n", s->profile ? " for profile " : "",
                s->profile ? s->profile : "", s->load_err);
        s->state = SRV_FAILED;
        s->exit_code = 1;
        begin_shutdown(s, 0);
    } else {
        s->model = eng_engine_model(s->engine);
        s->tok = s->model->tok;
        s->n_vocab = s->model->cfg.n_vocab;
        eng_engine_stats st;
        eng_engine_stats_get(s->engine, &st);
        s->n_ctx = st.n_ctx;
        s->chat_format = eng_chat_detect(s->model->chat_template);
        s->created = (long long)time(NULL);
        s->state = SRV_READY;
        fprintf(stderr, "kvserve: ready: model %s (chat format %s, context %d), serving http://%s:%d\n",
                s->model_name, eng_chat_format_name(s->chat_format), s->n_ctx, s->cfg->host, srv_http_port(s->http));
    }
    maybe_stop(s);
}

static void on_signal(uv_signal_t *sig, int signum) {
    srv_server *s = sig->data;
    s->n_signals++;
    fprintf(stderr, "kvserve: %s: %s\n", signum == SIGTERM ? "SIGTERM" : "SIGINT",
            s->n_signals == 1 ? "draining (stop accepting, let requests finish)" : "aborting what is left");
    begin_shutdown(s, s->cfg->shutdown_grace);
}

static char *served_name(const api_config *c) {
    if (c->served_model_name)
        return strdup(c->served_model_name);
    const char *base = strrchr(c->model, '/');
    base = base && base[1] ? base + 1 : c->model;
    char *name = strdup(base);
    if (!name)
        return NULL;
    size_t n = strlen(name);
    if (n > 5 && !strcmp(name + n - 5, ".gguf"))
        name[n - 5] = 0;
    while ((n = strlen(name)) > 1 && name[n - 1] == '/')
        name[n - 1] = 0;
    return name;
}

int srv_serve(const api_config *cfg, const char *profile) {
    srv_server *s = calloc(1, sizeof *s);
    if (!s)
        return 1;
    s->cfg = cfg;
    s->profile = profile;
    s->model_name = served_name(cfg);
    s->seed_base = mix64(uv_hrtime() ^ (uint64_t)time(NULL));
    pthread_mutex_init(&s->ev_lock, NULL);
    uv_loop_init(&s->loop);
    uv_async_init(&s->loop, &s->async, drain_events);
    s->async.data = s;
    uv_signal_init(&s->loop, &s->sig_term);
    uv_signal_init(&s->loop, &s->sig_int);
    s->sig_term.data = s->sig_int.data = s;
    uv_signal_start(&s->sig_term, on_signal, SIGTERM);
    uv_signal_start(&s->sig_int, on_signal, SIGINT);
    uv_timer_init(&s->loop, &s->grace);
    s->grace.data = s;
    signal(SIGPIPE, SIG_IGN);

    srv_http_limits lim = {
        .max_header_bytes = cfg->max_header_bytes, .max_body_bytes = cfg->max_body_bytes,
        .max_connections = cfg->max_connections, .idle_timeout = cfg->idle_timeout,
        .request_timeout = cfg->request_timeout,
    };
    s->http = srv_http_create(&s->loop, &lim, handle, s);
    char err[512];
    if (!s->model_name || !s->http || srv_http_listen(s->http, cfg->host, cfg->port, err, sizeof err)) {
        fprintf(stderr, "kvserve serve: %s\n", s->http && s->model_name ? err : "out of memory");
        s->exit_code = 1;
        s->handles_closed = true;
        stop_loop_handles(s);
        if (s->http)
            srv_http_drain(s->http, NULL);
    } else {
        fprintf(stderr, "kvserve: listening on http://%s:%d (profile %s); loading %s\n", cfg->host,
                srv_http_port(s->http), profile ? profile : "none", cfg->model);
        s->load_work.data = s;
        s->load_pending = true;
        uv_queue_work(&s->loop, &s->load_work, load_work, after_load);
    }
    uv_run(&s->loop, UV_RUN_DEFAULT);
    if (s->engine)
        eng_engine_destroy(s->engine);
    srv_http_destroy(s->http);
    uv_loop_close(&s->loop);
    pthread_mutex_destroy(&s->ev_lock);
    int code = s->exit_code;
    if (!code)
        fprintf(stderr, "kvserve: stopped\n");
    free(s->model_name);
    free(s);
    return code;
}
