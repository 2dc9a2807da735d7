/* openai.h: the OpenAI-compatible HTTP API without the sockets: the route
 * table, request validation (JSON -> api_request), and the replies (JSON
 * bodies, SSE chunks, errors) rendered from engine results.
 *
 * Nothing here knows about connections or threads: every function is pure
 * (input bytes in, owned bytes or a validated struct out), so the daemon calls
 * them from its worker threads and the fuzzer calls them on raw input.
 *
 * Field meanings and defaults follow OpenAI's API reference; the extensions
 * users of vLLM rely on (top_k, min_p, repetition_penalty, ignore_eos,
 * stop_token_ids) are accepted too. Unknown fields are accepted and listed in
 * api_request.unknown so the caller can log them. Every validation failure is
 * an api_error naming the field (param) and what was expected vs found. */
#ifndef API_OPENAI_H
#define API_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "engine/chat.h"
#include "engine/engine.h"
#include "engine/sampler.h"

/* ---- errors -------------------------------------------------------------- */

/* An error reply: HTTP status and OpenAI's {"error": {message, type, param,
 * code}}. type and code are static strings (code may be NULL); param "" is
 * rendered as null. */
typedef struct {
    int status;
    const char *type;
    const char *code;
    char param[64];
    char message[512];
} api_error;

/* Fills e; the type follows from the status (invalid_request_error below
 * 500, server_error from 500 on). */
void api_error_set(api_error *e, int status, const char *code, const char *param,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* The JSON body of e (malloc'd, NUL-terminated; *len its length). NULL only
 * when memory runs out. */
char *api_error_json(const api_error *e, size_t *len);

/* ---- routes -------------------------------------------------------------- */

typedef enum {
    API_EP_NONE = 0,
    API_EP_HEALTH,          /* GET  /health */
    API_EP_METRICS,         /* GET  /metrics */
    API_EP_MODELS,          /* GET  /v1/models */
    API_EP_MODEL,           /* GET  /v1/models/{id} */
    API_EP_COMPLETIONS,     /* POST /v1/completions */
    API_EP_CHAT,            /* POST /v1/chat/completions */
    API_EP_TOKENIZE,        /* POST /tokenize */
    API_EP_DETOKENIZE,      /* POST /detokenize */
    API_EP_COUNT
} api_endpoint;

/* The endpoint serving method + path (path without the query string, not
 * NUL-terminated). On no match returns API_EP_NONE with e set: 404 for an
 * unknown path, 405 for a known path with another method (then *allow, if
 * given, is the method it takes, for the Allow header). HEAD is served as
 * GET. */
api_endpoint api_route(const char *method, const char *path, size_t path_len,
                       const char **allow, api_error *e);
/* Whether the endpoint is protected by --api-key (everything but /health and
 * /metrics). */
bool api_endpoint_needs_auth(api_endpoint ep);
/* Whether requests to it carry a JSON body to validate (the POST ones). */
bool api_endpoint_has_body(api_endpoint ep);
const char *api_endpoint_name(api_endpoint ep);   /* "completions", ... */

/* ---- requests ------------------------------------------------------------ */

/* One prompt of /v1/completions (or /tokenize, /detokenize): text or ids. */
typedef struct {
    const char *text;         /* UTF-8 (may hold NUL bytes), or NULL for ids */
    size_t text_len;
    int32_t *ids;             /* (n_ids) token ids, owned; NULL for text */
    int n_ids;
} api_prompt;

#define API_MAX_PROMPTS 64    /* prompts in one /v1/completions request */
#define API_MAX_N 16          /* choices per prompt */
#define API_MAX_STOP 16       /* stop strings */
#define API_MAX_STOP_LEN 256  /* bytes per stop string */
#define API_MAX_MESSAGES 4096 /* chat messages */

/* A validated request. Strings point into `root` (the parsed body) or into
 * owned copies; everything is released by api_request_free. */
typedef struct {
    api_endpoint ep;
    json_t *root;
    const char *model;              /* NULL when absent */
    /* /v1/completions, /tokenize with "prompt", /detokenize ("tokens" as ids) */
    api_prompt *prompts;            /* (n_prompts) */
    int n_prompts;
    /* /v1/chat/completions, /tokenize with "messages" */
    eng_chat_msg *messages;         /* (n_messages) */
    int n_messages;
    char **owned;                   /* contents joined from parts, freed with the request */
    int n_owned;
    bool add_generation_prompt;     /* chat / tokenize: default true */
    bool add_special_tokens;        /* tokenize with a prompt: default true */
    /* generation */
    eng_sampling_params sampling;   /* defaults: temperature 1, top_p 1, off otherwise */
    bool seed_given;                /* else the caller picks a random seed */
    int max_tokens;                 /* completions: 16 unless given; chat: 0 = up to the context */
    int n;                          /* choices per prompt, 1..API_MAX_N */
    const char *stop[API_MAX_STOP];
    int n_stop;
    int32_t *stop_ids;              /* (n_stop_ids), owned */
    int n_stop_ids;
    bool stream;
    bool include_usage;             /* stream_options.include_usage */
    bool ignore_eos;
    int priority;                   /* scheduling: lower value first, FCFS within one (vLLM's field); 0 */
    bool echo;                      /* completions: prepend the prompt */
    bool logprobs;                  /* report each token's logprob */
    int top_logprobs;               /* completions: logprobs=N; chat: top_logprobs */
    const char *user;
    /* unknown top-level fields, comma-separated and truncated (for the log) */
    char unknown[256];
} api_request;

/* Parses and validates the body of a POST endpoint. Returns 0, or -1 with e
 * set (400 for bad JSON, wrong types and out-of-range values) and r released.
 * n_vocab > 0 bounds token ids (0: unchecked). */
int api_request_parse(api_endpoint ep, const char *body, size_t len, int n_vocab,
                      api_request *r, api_error *e);
void api_request_free(api_request *r);

/* ---- replies ------------------------------------------------------------- */

/* A choice accumulated for a non-streaming reply. Zero-init. */
typedef struct {
    char *text;                 /* (len) UTF-8, owned */
    size_t len, cap;
    eng_finish_reason finish;
    int completion_tokens;
    /* logprobs, one entry per token */
    char **lp_tokens;           /* (n_lp) token texts, owned */
    float *lp_values;           /* (n_lp) */
    int *lp_offsets;            /* (n_lp) byte offset of each token's text in `text` */
    int n_lp, cap_lp;
} api_choice;

/* Appends text; returns 0 or -1 when memory runs out. */
int api_choice_append(api_choice *c, const char *text, size_t len);
/* Records one token's logprob (tok: its raw bytes, made valid UTF-8). */
int api_choice_add_logprob(api_choice *c, const char *tok, size_t tok_len, float logprob);
void api_choice_free(api_choice *c);

/* What every reply of one request shares. */
typedef struct {
    api_endpoint ep;            /* API_EP_COMPLETIONS or API_EP_CHAT */
    const char *id;             /* "cmpl-..." / "chatcmpl-..." */
    long long created;          /* unix seconds */
    const char *model;
    bool logprobs;
} api_reply_meta;

/* The full non-streaming reply for choices[0, n) with usage. */
char *api_render_reply(const api_reply_meta *m, const api_choice *choices, int n,
                       int prompt_tokens, int completion_tokens, size_t *len);

/* One streamed token's logprob, for api_render_chunk. */
typedef struct {
    const char *token;          /* raw bytes */
    size_t token_len;
    float logprob;
    int text_offset;            /* completions: byte offset in the choice's text */
} api_chunk_logprob;

/* One SSE event "data: {...}\n\n" for choice `index`: a text delta and/or the
 * finish reason (ENG_FINISH_NONE: none yet). first: the choice's first chunk
 * (chat: carries the assistant role). lp: the token's logprob or NULL.
 * usage_null: add "usage": null (stream_options.include_usage). */
char *api_render_chunk(const api_reply_meta *m, int index, bool first, const char *text,
                       size_t text_len, const api_chunk_logprob *lp, eng_finish_reason finish,
                       bool usage_null, size_t *len);
/* The final usage event (choices: []) of stream_options.include_usage. */
char *api_render_usage_chunk(const api_reply_meta *m, int prompt_tokens, int completion_tokens,
                             size_t *len);
/* An SSE error event "data: {"error": ...}\n\n" (a failure after the stream began). */
char *api_render_error_chunk(const api_error *e, size_t *len);

/* GET /v1/models (one model) and GET /v1/models/{id}. */
char *api_render_models(const char *model, long long created, int max_model_len, size_t *len);
char *api_render_model(const char *model, long long created, int max_model_len, size_t *len);
/* POST /tokenize and /detokenize replies. */
char *api_render_tokenize(const int32_t *ids, int n, int max_model_len, size_t *len);
char *api_render_detokenize(const char *text, size_t text_len, size_t *len);

/* Copies s[0, len) into out (cap bytes, NUL-terminated) replacing each
 * maximal invalid UTF-8 subpart by U+FFFD (as Python's
 * bytes.decode("utf-8", "replace")); returns the bytes written (stopping
 * early when out is full: 3 * len + 1 always suffices). A token's raw bytes
 * may hold half a character, which JSON cannot carry. */
size_t api_utf8_sanitize(const char *s, size_t len, char *out, size_t cap);

#endif
