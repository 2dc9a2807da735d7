/* response.c: the JSON the daemon sends back: OpenAI error objects,
 * completion and chat replies (whole or as SSE chunks), the model list and
 * the tokenizer endpoints' replies (see openai.h). Built with jansson and
 * dumped compactly; every string goes through a UTF-8 check first, since a
 * token's bytes may hold half a character. */
#include "api/openai.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- UTF-8 --------------------------------------------------------------- */

/* At s[0, n): the length of a valid UTF-8 sequence (> 0), or minus the
 * length of its maximal invalid subpart (Unicode 15, section 3.9, Table 3-7:
 * the bytes that start a well-formed sequence but do not finish it), which
 * is replaced by one U+FFFD, as Python's decode(errors="replace") does. */
static long utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;  /* range of the second byte */
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    else return -1;
    for (size_t i = 1; i < len; i++) {
        if (i >= n)
            return -(long)i;
        unsigned b = s[i];
        if (i == 1 ? (b < lo || b > hi) : (b & 0xC0) != 0x80)
            return -(long)i;
    }
    return (long)len;
}

size_t api_utf8_sanitize(const char *s, size_t len, char *out, size_t cap) {
    size_t o = 0;
    if (cap == 0)
        return 0;
    for (size_t i = 0; i < len;) {
        long k = utf8_seq((const unsigned char *)s + i, len - i);
        const char *src = k > 0 ? s + i : "\xEF\xBF\xBD";
        size_t w = k > 0 ? (size_t)k : 3;
        if (o + w + 1 > cap)
            break;
        memcpy(out + o, src, w);
        o += w;
        i += k > 0 ? (size_t)k : (size_t)-k;
    }
    out[o] = 0;
    return o;
}

/* A JSON string of s[0, len), valid UTF-8 guaranteed (invalid bytes become
 * U+FFFD). NULL only when memory runs out. */
static json_t *jstr(const char *s, size_t len) {
    if (!s)
        return json_string("");
    json_t *v = json_stringn(s, len);
    if (v)
        return v;
    size_t cap = 3 * len + 1;  /* every byte may become U+FFFD */
    char *buf = malloc(cap);
    if (!buf)
        return NULL;
    size_t n = api_utf8_sanitize(s, len, buf, cap);
    v = json_stringn_nocheck(buf, n);
    free(buf);
    return v;
}

/* Dumps and releases v. */
static char *dump(json_t *v, size_t *len) {
    char *s = v ? json_dumps(v, JSON_COMPACT) : NULL;
    if (v)
        json_decref(v);
    if (len)
        *len = s ? strlen(s) : 0;
    return s;
}

/* "data: " + JSON + "\n\n"; releases v. */
static char *sse(json_t *v, size_t *len) {
    size_t n;
    char *body = dump(v, &n);
    if (!body)
        return NULL;
    char *out = malloc(n + 9);
    if (out) {
        memcpy(out, "data: ", 6);
        memcpy(out + 6, body, n);
        memcpy(out + 6 + n, "\n\n", 3);
        if (len)
            *len = n + 8;
    }
    free(body);
    return out;
}

/* ---- errors -------------------------------------------------------------- */

void api_error_set(api_error *e, int status, const char *code, const char *param, const char *fmt, ...) {
    e->status = status;
    e->type = status >= 500 ? "server_error" : "invalid_request_error";
    e->code = code;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

static json_t *error_object(const api_error *e) {
    json_t *o = json_object();
    json_object_set_new(o, "message", jstr(e->message, strlen(e->message)));
    json_object_set_new(o, "type", json_string(e->type ? e->type : "server_error"));
    json_object_set_new(o, "param", e->param[0] ? jstr(e->param, strlen(e->param)) : json_null());
    json_object_set_new(o, "code", e->code ? json_string(e->code) : json_null());
    return json_pack("{s:o}", "error", o);
}

char *api_error_json(const api_error *e, size_t *len) { return dump(error_object(e), len); }

char *api_render_error_chunk(const api_error *e, size_t *len) { return sse(error_object(e), len); }

/* ---- choices ------------------------------------------------------------- */

int api_choice_append(api_choice *c, const char *text, size_t len) {
    if (c->len + len + 1 > c->cap) {
        size_t cap = c->cap ? c->cap : 64;
        while (cap < c->len + len + 1)
            cap *= 2;
        char *t = realloc(c->text, cap);
        if (!t)
            return -1;
        c->text = t;
        c->cap = cap;
    }
    memcpy(c->text + c->len, text, len);
    c->len += len;
    c->text[c->len] = 0;
    return 0;
}

int api_choice_add_logprob(api_choice *c, const char *tok, size_t tok_len, float logprob) {
    if (c->n_lp == c->cap_lp) {
        int cap = c->cap_lp ? 2 * c->cap_lp : 16;
        char **t = realloc(c->lp_tokens, (size_t)cap * sizeof *t);
        if (t)
            c->lp_tokens = t;
        float *v = realloc(c->lp_values, (size_t)cap * sizeof *v);
        if (v)
            c->lp_values = v;
        int *o = realloc(c->lp_offsets, (size_t)cap * sizeof *o);
        if (o)
            c->lp_offsets = o;
        if (!t || !v || !o)
            return -1;
        c->cap_lp = cap;
    }
    char *s = malloc(3 * tok_len + 1);
    if (!s)
        return -1;
    api_utf8_sanitize(tok, tok_len, s, 3 * tok_len + 1);
    c->lp_tokens[c->n_lp] = s;
    c->lp_values[c->n_lp] = logprob;
    c->lp_offsets[c->n_lp] = (int)c->len;
    c->n_lp++;
    return 0;
}

void api_choice_free(api_choice *c) {
    for (int i = 0; i < c->n_lp; i++)
        free(c->lp_tokens[i]);
    free(c->lp_tokens);
    free(c->lp_values);
    free(c->lp_offsets);
    free(c->text);
    memset(c, 0, sizeof *c);
}

/* ---- completion replies -------------------------------------------------- */

static json_t *finish_json(eng_finish_reason f) {
    switch (f) {
    case ENG_FINISH_NONE: return json_null();
    case ENG_FINISH_STOP: return json_string("stop");
    case ENG_FINISH_LENGTH: return json_string("length");
    case ENG_FINISH_CANCELLED: return json_string("abort");
    case ENG_FINISH_ERROR: return json_string("error");
    }
    return json_null();
}

/* A logprob value as JSON: -inf (a token of probability 0) cannot be written
 * in JSON, so it is clamped, as vLLM does. */
static json_t *lp_json(float lp) { return json_real(lp < -9999.0f || lp != lp ? -9999.0 : (double)lp); }

/* Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": []} ...]} */
static json_t *chat_logprobs(const char *const *tokens, const float *values, int n) {
    json_t *content = json_array();
    for (int i = 0; i < n; i++) {
        json_t *bytes = json_array();
        for (const unsigned char *p = (const unsigned char *)tokens[i]; *p; p++)
            json_array_append_new(bytes, json_integer(*p));
        json_array_append_new(content, json_pack("{s:o,s:o,s:o,s:[]}", "token", jstr(tokens[i], strlen(tokens[i])),
                                                 "logprob", lp_json(values[i]), "bytes", bytes, "top_logprobs"));
    }
    return json_pack("{s:o}", "content", content);
}

/* Completions: {"tokens", "token_logprobs", "top_logprobs": null, "text_offset"} */
static json_t *completion_logprobs(const char *const *tokens, const float *values, const int *offsets, int n) {
    json_t *t = json_array(), *v = json_array(), *o = json_array();
    for (int i = 0; i < n; i++) {
        json_array_append_new(t, jstr(tokens[i], strlen(tokens[i])));
        json_array_append_new(v, lp_json(values[i]));
        json_array_append_new(o, json_integer(offsets[i]));
    }
    return json_pack("{s:o,s:o,s:n,s:o}", "tokens", t, "token_logprobs", v, "top_logprobs", "text_offset", o);
}

static json_t *usage_json(int prompt_tokens, int completion_tokens) {
    return json_pack("{s:i,s:i,s:i}", "prompt_tokens", prompt_tokens, "completion_tokens", completion_tokens,
                     "total_tokens", prompt_tokens + completion_tokens);
}

static json_t *reply_head(const api_reply_meta *m, bool chunk) {
    const char *object = m->ep == API_EP_CHAT ? (chunk ? "chat.completion.chunk" : "chat.completion")
                                              : "text_completion";
    return json_pack("{s:s,s:s,s:I,s:o}", "id", m->id, "object", object, "created", (json_int_t)m->created,
                     "model", jstr(m->model, strlen(m->model)));
}

char *api_render_reply(const api_reply_meta *m, const api_choice *choices, int n, int prompt_tokens,
                       int completion_tokens, size_t *len) {
    json_t *root = reply_head(m, false);
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        const api_choice *c = &choices[i];
        json_t *lp = json_null();
        if (m->logprobs)
            lp = m->ep == API_EP_CHAT ? chat_logprobs((const char *const *)c->lp_tokens, c->lp_values, c->n_lp)
                                      : completion_logprobs((const char *const *)c->lp_tokens, c->lp_values,
                                                            c->lp_offsets, c->n_lp);
        json_t *ch;
        if (m->ep == API_EP_CHAT)
            ch = json_pack("{s:i,s:{s:s,s:o},s:o,s:o}", "index", i, "message", "role", "assistant", "content",
                           jstr(c->text, c->len), "logprobs", lp, "finish_reason", finish_json(c->finish));
        else
            ch = json_pack("{s:i,s:o,s:o,s:o}", "index", i, "text", jstr(c->text, c->len), "logprobs", lp,
                           "finish_reason", finish_json(c->finish));
        json_array_append_new(arr, ch);
    }
    json_object_set_new(root, "choices", arr);
    json_object_set_new(root, "usage", usage_json(prompt_tokens, completion_tokens));
    return dump(root, len);
}

char *api_render_chunk(const api_reply_meta *m, int index, bool first, const char *text, size_t text_len,
                       const api_chunk_logprob *lp, eng_finish_reason finish, bool usage_null, size_t *len) {
    json_t *root = reply_head(m, true);
    json_t *lpj = json_null();
    if (lp && m->logprobs) {
        char *tok = malloc(3 * lp->token_len + 1);
        if (tok) {
            api_utf8_sanitize(lp->token, lp->token_len, tok, 3 * lp->token_len + 1);
            const char *toks[1] = {tok};
            lpj = m->ep == API_EP_CHAT ? chat_logprobs(toks, &lp->logprob, 1)
                                       : completion_logprobs(toks, &lp->logprob, &lp->text_offset, 1);
            free(tok);
        }
    }
    json_t *ch;
    if (m->ep == API_EP_CHAT) {
        json_t *delta = json_object();
        if (first)
            json_object_set_new(delta, "role", json_string("assistant"));
        if (text_len > 0 || (first && finish == ENG_FINISH_NONE))
            json_object_set_new(delta, "content", jstr(text, text_len));
        ch = json_pack("{s:i,s:o,s:o,s:o}", "index", index, "delta", delta, "logprobs", lpj, "finish_reason",
                       finish_json(finish));
    } else {
        ch = json_pack("{s:i,s:o,s:o,s:o}", "index", index, "text", jstr(text, text_len), "logprobs", lpj,
                       "finish_reason", finish_json(finish));
    }
    json_object_set_new(root, "choices", json_pack("[o]", ch));
    if (usage_null)
        json_object_set_new(root, "usage", json_null());
    return sse(root, len);
}

char *api_render_usage_chunk(const api_reply_meta *m, int prompt_tokens, int completion_tokens, size_t *len) {
    json_t *root = reply_head(m, true);
    json_object_set_new(root, "choices", json_array());
    json_object_set_new(root, "usage", usage_json(prompt_tokens, completion_tokens));
    return sse(root, len);
}

/* ---- other endpoints ----------------------------------------------------- */

static json_t *model_json(const char *model, long long created, int max_model_len) {
    return json_pack("{s:o,s:s,s:I,s:s,s:i}", "id", jstr(model, strlen(model)), "object", "model", "created",
                     (json_int_t)created, "owned_by", "kvserve", "max_model_len", max_model_len);
}

char *api_render_models(const char *model, long long created, int max_model_len, size_t *len) {
    return dump(json_pack("{s:s,s:[o]}", "object", "list", "data", model_json(model, created, max_model_len)), len);
}

char *api_render_model(const char *model, long long created, int max_model_len, size_t *len) {
    return dump(model_json(model, created, max_model_len), len);
}

char *api_render_tokenize(const int32_t *ids, int n, int max_model_len, size_t *len) {
    json_t *arr = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(arr, json_integer(ids[i]));
    return dump(json_pack("{s:i,s:i,s:o}", "count", n, "max_model_len", max_model_len, "tokens", arr), len);
}

char *api_render_detokenize(const char *text, size_t text_len, size_t *len) {
    return dump(json_pack("{s:o}", "prompt", jstr(text, text_len)), len);
}
