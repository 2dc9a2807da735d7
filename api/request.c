/* request.c: validation of the JSON bodies of the POST endpoints into
 * api_request (see openai.h). Types and ranges follow OpenAI's API reference
 * (vLLM's for its extensions); a JSON null means "use the default", as in
 * OpenAI's API. Each failure names the field, what it must be and what was
 * found. */
#include "api/openai.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- typed getters ------------------------------------------------------- */

static const char *json_kind(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

static void bad_type(api_error *e, const char *param, const char *want, const json_t *v) {
    api_error_set(e, 400, NULL, param, "'%s' must be %s, found %s", param, want, json_kind(v));
}

/* Returns 1 when present (not null) and valid, 0 when absent or null, -1 on error. */
static int get_number(const json_t *o, const char *key, double lo, double hi, bool lo_open, double *out,
                      api_error *e) {
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_number(v)) {
        bad_type(e, key, "a number", v);
        return -1;
    }
    double x = json_number_value(v);
    if (!(lo_open ? x > lo : x >= lo) || !(x <= hi)) {
        api_error_set(e, 400, NULL, key, "'%s' must be in %c%g, %g], found %g", key, lo_open ? '(' : '[',
                      lo, hi, x);
        return -1;
    }
    *out = x;
    return 1;
}

/* An integer (or a number with an integral value, as some clients send). */
static int int_value(const json_t *v, long long *out) {
    if (json_is_integer(v)) {
        *out = json_integer_value(v);
        return 0;
    }
    if (json_is_real(v)) {
        double x = json_real_value(v);
        if (x == floor(x) && fabs(x) < 9e15) {
            *out = (long long)x;
            return 0;
        }
    }
    return -1;
}

static int get_int(const json_t *o, const char *key, long long lo, long long hi, long long *out, api_error *e) {
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    long long x;
    if (int_value(v, &x)) {
        bad_type(e, key, "an integer", v);
        return -1;
    }
    if (x < lo || x > hi) {
        api_error_set(e, 400, NULL, key, "'%s' must be in [%lld, %lld], found %lld", key, lo, hi, x);
        return -1;
    }
    *out = x;
    return 1;
}

static int get_bool(const json_t *o, const char *key, bool *out, api_error *e) {
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_boolean(v)) {
        bad_type(e, key, "a boolean", v);
        return -1;
    }
    *out = json_is_true(v);
    return 1;
}

static int get_string(const json_t *o, const char *key, const char **out, api_error *e) {
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v))
        return 0;
    if (!json_is_string(v)) {
        bad_type(e, key, "a string", v);
        return -1;
    }
    *out = json_string_value(v);
    return 1;
}

/* An array of token ids into *ids (malloc'd). */
static int parse_ids(const json_t *arr, const char *param, int n_vocab, int32_t **ids, int *n, api_error *e) {
    size_t len = json_array_size(arr);
    if (len == 0) {
        api_error_set(e, 400, NULL, param, "'%s' must not be empty", param);
        return -1;
    }
    if (len > (1u << 22)) {
        api_error_set(e, 400, NULL, param, "'%s' has %zu token ids, more than 4194304", param, len);
        return -1;
    }
    int32_t *out = malloc(len * sizeof *out);
    if (!out) {
        api_error_set(e, 500, "internal_error", param, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < len; i++) {
        const json_t *v = json_array_get(arr, i);
        long long x;
        if (int_value(v, &x)) {
            api_error_set(e, 400, NULL, param, "'%s[%zu]' must be a token id (integer), found %s", param, i,
                          json_kind(v));
            free(out);
            return -1;
        }
        long long hi = n_vocab > 0 ? n_vocab - 1 : INT32_MAX;
        if (x < 0 || x > hi) {
            api_error_set(e, 400, NULL, param, "'%s[%zu]': token id %lld is out of range [0, %lld]", param, i,
                          x, hi);
            free(out);
            return -1;
        }
        out[i] = (int32_t)x;
    }
    *ids = out;
    *n = (int)len;
    return 0;
}

/* ---- field groups -------------------------------------------------------- */

static int parse_prompt(const json_t *o, int n_vocab, bool allow_lists, api_request *r, api_error *e) {
    const json_t *p = json_object_get(o, "prompt");
    if (!p || json_is_null(p)) {
        api_error_set(e, 400, NULL, "prompt", "'prompt' is required");
        return -1;
    }
    if (json_is_string(p)) {
        r->prompts = calloc(1, sizeof *r->prompts);
        if (!r->prompts)
            goto nomem;
        r->prompts[0].text = json_string_value(p);
        r->prompts[0].text_len = json_string_length(p);
        r->n_prompts = 1;
        return 0;
    }
    if (!allow_lists || !json_is_array(p)) {
        bad_type(e, "prompt", allow_lists ? "a string, an array of strings or of token ids" : "a string", p);
        return -1;
    }
    size_t len = json_array_size(p);
    if (len == 0) {
        api_error_set(e, 400, NULL, "prompt", "'prompt' must not be empty");
        return -1;
    }
    const json_t *first = json_array_get(p, 0);
    if (json_is_integer(first)) {  /* one prompt of token ids */
        r->prompts = calloc(1, sizeof *r->prompts);
        if (!r->prompts)
            goto nomem;
        r->n_prompts = 1;
        return parse_ids(p, "prompt", n_vocab, &r->prompts[0].ids, &r->prompts[0].n_ids, e);
    }
    if (len > API_MAX_PROMPTS) {
        api_error_set(e, 400, NULL, "prompt", "'prompt' holds %zu prompts, at most %d are allowed", len,
                      API_MAX_PROMPTS);
        return -1;
    }
    r->prompts = calloc(len, sizeof *r->prompts);
    if (!r->prompts)
        goto nomem;
    r->n_prompts = (int)len;
    for (size_t i = 0; i < len; i++) {
        const json_t *v = json_array_get(p, i);
        char param[32];
        snprintf(param, sizeof param, "prompt[%zu]", i);
        if (json_is_string(v)) {
            r->prompts[i].text = json_string_value(v);
            r->prompts[i].text_len = json_string_length(v);
        } else if (json_is_array(v)) {
            if (parse_ids(v, param, n_vocab, &r->prompts[i].ids, &r->prompts[i].n_ids, e))
                return -1;
        } else {
            bad_type(e, param, "a string or an array of token ids", v);
            return -1;
        }
    }
    return 0;
nomem:
    api_error_set(e, 500, "internal_error", "prompt", "out of memory");
    return -1;
}

static const char *const roles[] = {"system", "user", "assistant", "tool", "developer"};

/* A message's content: a string, null, or an array of text parts (joined). */
static int parse_content(const json_t *c, int i, api_request *r, const char **out, api_error *e) {
    char param[64];
    snprintf(param, sizeof param, "messages[%d].content", i);
    if (!c || json_is_null(c)) {
        *out = "";
        return 0;
    }
    if (json_is_string(c)) {
        if (strlen(json_string_value(c)) != json_string_length(c)) {
            api_error_set(e, 400, NULL, param, "'%s' contains a NUL character", param);
            return -1;
        }
        *out = json_string_value(c);
        return 0;
    }
    if (!json_is_array(c)) {
        bad_type(e, param, "a string or an array of content parts", c);
        return -1;
    }
    size_t total = 0, n = json_array_size(c);
    for (size_t k = 0; k < n; k++) {
        const json_t *part = json_array_get(c, k);
        const json_t *type = json_object_get(part, "type");
        const json_t *text = json_object_get(part, "text");
        snprintf(param, sizeof param, "messages[%d].content[%zu]", i, k);
        if (!json_is_object(part)) {
            bad_type(e, param, "an object", part);
            return -1;
        }
        if (!json_is_string(type) || strcmp(json_string_value(type), "text")) {
            api_error_set(e, 400, NULL, param, "'%s.type' must be \"text\" (only text content is supported)%s%s",
                          param, json_is_string(type) ? ", found " : "",
                          json_is_string(type) ? json_string_value(type) : "");
            return -1;
        }
        if (!json_is_string(text) || strlen(json_string_value(text)) != json_string_length(text)) {
            api_error_set(e, 400, NULL, param, "'%s.text' must be a string without NUL characters", param);
            return -1;
        }
        total += json_string_length(text);
    }
    char *joined = malloc(total + 1);
    char **owned = realloc(r->owned, (size_t)(r->n_owned + 1) * sizeof *owned);
    if (!joined || !owned) {
        free(joined);
        if (owned)
            r->owned = owned;
        api_error_set(e, 500, "internal_error", param, "out of memory");
        return -1;
    }
    r->owned = owned;
    r->owned[r->n_owned++] = joined;
    size_t at = 0;
    for (size_t k = 0; k < n; k++) {
        const json_t *text = json_object_get(json_array_get(c, k), "text");
        memcpy(joined + at, json_string_value(text), json_string_length(text));
        at += json_string_length(text);
    }
    joined[at] = 0;
    *out = joined;
    return 0;
}

static int parse_messages(const json_t *o, api_request *r, api_error *e) {
    const json_t *m = json_object_get(o, "messages");
    if (!m || json_is_null(m)) {
        api_error_set(e, 400, NULL, "messages", "'messages' is required");
        return -1;
    }
    if (!json_is_array(m)) {
        bad_type(e, "messages", "an array of messages", m);
        return -1;
    }
    size_t n = json_array_size(m);
    if (n == 0 || n > API_MAX_MESSAGES) {
        api_error_set(e, 400, NULL, "messages", "'messages' must hold 1 to %d messages, found %zu",
                      API_MAX_MESSAGES, n);
        return -1;
    }
    r->messages = calloc(n, sizeof *r->messages);
    if (!r->messages) {
        api_error_set(e, 500, "internal_error", "messages", "out of memory");
        return -1;
    }
    r->n_messages = (int)n;
    for (size_t i = 0; i < n; i++) {
        const json_t *msg = json_array_get(m, i);
        char param[64];
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(msg)) {
            bad_type(e, param, "an object", msg);
            return -1;
        }
        const json_t *role = json_object_get(msg, "role");
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!json_is_string(role)) {
            if (role)
                bad_type(e, param, "a string", role);
            else
                api_error_set(e, 400, NULL, param, "'%s' is required", param);
            return -1;
        }
        const char *rs = json_string_value(role);
        size_t k = 0;
        while (k < sizeof roles / sizeof roles[0] && strcmp(rs, roles[k]))
            k++;
        if (k == sizeof roles / sizeof roles[0]) {
            api_error_set(e, 400, NULL, param, "'%s' must be one of system, user, assistant, tool, developer; found \"%.64s\"",
                          param, rs);
            return -1;
        }
        r->messages[i].role = strcmp(rs, "developer") ? roles[k] : "system";
        if (parse_content(json_object_get(msg, "content"), (int)i, r, &r->messages[i].content, e))
            return -1;
    }
    return 0;
}

static int parse_stop(const json_t *o, int n_vocab, api_request *r, api_error *e) {
    const json_t *s = json_object_get(o, "stop");
    if (s && !json_is_null(s)) {
        if (json_is_string(s)) {
            if (json_string_length(s) > 0) {
                r->stop[0] = json_string_value(s);
                r->n_stop = 1;
            }
        } else if (json_is_array(s)) {
            if (json_array_size(s) > API_MAX_STOP) {
                api_error_set(e, 400, NULL, "stop", "'stop' holds %zu strings, at most %d are allowed",
                              json_array_size(s), API_MAX_STOP);
                return -1;
            }
            for (size_t i = 0; i < json_array_size(s); i++) {
                const json_t *v = json_array_get(s, i);
                char param[32];
                snprintf(param, sizeof param, "stop[%zu]", i);
                if (!json_is_string(v)) {
                    bad_type(e, param, "a string", v);
                    return -1;
                }
                if (json_string_length(v) > 0)
                    r->stop[r->n_stop++] = json_string_value(v);
            }
        } else {
            bad_type(e, "stop", "a string or an array of strings", s);
            return -1;
        }
        for (int i = 0; i < r->n_stop; i++) {
            size_t len = strlen(r->stop[i]);
            if (len > API_MAX_STOP_LEN) {
                api_error_set(e, 400, NULL, "stop", "'stop' strings must be at most %d bytes, found %zu",
                              API_MAX_STOP_LEN, len);
                return -1;
            }
        }
    }
    const json_t *ids = json_object_get(o, "stop_token_ids");
    if (ids && !json_is_null(ids)) {
        if (!json_is_array(ids)) {
            bad_type(e, "stop_token_ids", "an array of token ids", ids);
            return -1;
        }
        if (json_array_size(ids) > 0 &&
            parse_ids(ids, "stop_token_ids", n_vocab, &r->stop_ids, &r->n_stop_ids, e))
            return -1;
    }
    return 0;
}

/* Sampling, limits and output options shared by completions and chat. */
static int parse_generation(const json_t *o, bool chat, int n_vocab, api_request *r, api_error *e) {
    double x;
    long long i;
    int got;
    eng_sampling_params *s = &r->sampling;
    if ((got = get_number(o, "temperature", 0, 2, false, &x, e)) < 0) return -1;
    if (got) s->temperature = (float)x;
    if ((got = get_number(o, "top_p", 0, 1, true, &x, e)) < 0) return -1;
    if (got) s->top_p = (float)x;
    if ((got = get_int(o, "top_k", -1, 1 << 30, &i, e)) < 0) return -1;
    if (got) s->top_k = i > 0 ? (int)i : 0;
    if ((got = get_number(o, "min_p", 0, 1, false, &x, e)) < 0) return -1;
    if (got) s->min_p = (float)x;
    if ((got = get_number(o, "presence_penalty", -2, 2, false, &x, e)) < 0) return -1;
    if (got) s->presence_penalty = (float)x;
    if ((got = get_number(o, "frequency_penalty", -2, 2, false, &x, e)) < 0) return -1;
    if (got) s->frequency_penalty = (float)x;
    if ((got = get_number(o, "repetition_penalty", 0, 10, true, &x, e)) < 0) return -1;
    if (got) s->repetition_penalty = (float)x;
    if ((got = get_int(o, "seed", INT64_MIN, INT64_MAX, &i, e)) < 0) return -1;
    if (got) {
        s->seed = (uint64_t)i;
        r->seed_given = true;
    }
    if ((got = get_int(o, "n", 1, API_MAX_N, &i, e)) < 0) return -1;
    if (got) r->n = (int)i;
    /* max_completion_tokens is the newer name of max_tokens in chat */
    const char *mt = chat && json_object_get(o, "max_completion_tokens") &&
                     !json_is_null(json_object_get(o, "max_completion_tokens"))
                         ? "max_completion_tokens" : "max_tokens";
    if ((got = get_int(o, mt, 1, 1 << 24, &i, e)) < 0) return -1;
    if (got) r->max_tokens = (int)i;
    if (get_bool(o, "stream", &r->stream, e) < 0) return -1;
    const json_t *so = json_object_get(o, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so)) {
            bad_type(e, "stream_options", "an object", so);
            return -1;
        }
        if (!r->stream) {
            api_error_set(e, 400, NULL, "stream_options", "'stream_options' is only allowed when 'stream' is true");
            return -1;
        }
        const json_t *iu = json_object_get(so, "include_usage");
        if (iu && !json_is_null(iu) && !json_is_boolean(iu)) {
            bad_type(e, "stream_options.include_usage", "a boolean", iu);
            return -1;
        }
        r->include_usage = json_is_true(iu);
    }
    if (get_bool(o, "ignore_eos", &r->ignore_eos, e) < 0) return -1;
    if ((got = get_int(o, "priority", INT_MIN, INT_MAX, &i, e)) < 0) return -1;
    if (got) r->priority = (int)i;
    if (get_string(o, "user", &r->user, e) < 0) return -1;
    if (chat) {
        if (get_bool(o, "logprobs", &r->logprobs, e) < 0) return -1;
        if ((got = get_int(o, "top_logprobs", 0, 20, &i, e)) < 0) return -1;
        if (got) {
            if (!r->logprobs) {
                api_error_set(e, 400, NULL, "top_logprobs", "'top_logprobs' requires 'logprobs' to be true");
                return -1;
            }
            r->top_logprobs = (int)i;
        }
        if (get_bool(o, "add_generation_prompt", &r->add_generation_prompt, e) < 0) return -1;
    } else {
        if ((got = get_int(o, "logprobs", 0, 20, &i, e)) < 0) return -1;
        if (got) {
            r->logprobs = true;
            r->top_logprobs = (int)i;
        }
        if (get_bool(o, "echo", &r->echo, e) < 0) return -1;
        const char *suffix = NULL;
        if (get_string(o, "suffix", &suffix, e) < 0) return -1;
        if (suffix && *suffix) {
            api_error_set(e, 400, NULL, "suffix", "'suffix' is not supported");
            return -1;
        }
        if ((got = get_int(o, "best_of", 1, API_MAX_N, &i, e)) < 0) return -1;
        if (got && i != r->n) {
            api_error_set(e, 400, NULL, "best_of", "'best_of' other than n is not supported (best_of %lld, n %d)",
                          i, r->n);
            return -1;
        }
    }
    if (r->top_logprobs > 0) {
        api_error_set(e, 400, NULL, chat ? "top_logprobs" : "logprobs",
                      "alternative tokens (%s > 0) are not supported: only the chosen token's logprob is reported",
                      chat ? "top_logprobs" : "logprobs");
        return -1;
    }
    return parse_stop(o, n_vocab, r, e);
}

/* ---- unknown fields ------------------------------------------------------ */

static const char *const known_common[] = {"model", "user", NULL};
static const char *const known_gen[] = {
    "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "seed", "n", "max_tokens", "stream", "stream_options", "ignore_eos", "stop", "stop_token_ids",
    "logprobs", "priority", NULL};
static const char *const known_completions[] = {"prompt", "echo", "suffix", "best_of", NULL};
static const char *const known_chat[] = {"messages", "top_logprobs", "max_completion_tokens",
                                         "add_generation_prompt", NULL};
static const char *const known_tokenize[] = {"prompt", "messages", "add_special_tokens",
                                             "add_generation_prompt", NULL};
static const char *const known_detokenize[] = {"tokens", NULL};

static bool in_list(const char *const *list, const char *key) {
    for (; list && *list; list++)
        if (!strcmp(*list, key))
            return true;
    return false;
}

static void note_unknown(const json_t *o, api_endpoint ep, api_request *r) {
    const char *const *lists[3] = {known_common, NULL, NULL};
    switch (ep) {
    case API_EP_COMPLETIONS: lists[1] = known_gen, lists[2] = known_completions; break;
    case API_EP_CHAT: lists[1] = known_gen, lists[2] = known_chat; break;
    case API_EP_TOKENIZE: lists[1] = known_tokenize; break;
    default: lists[1] = known_detokenize; break;
    }
    const char *key;
    const json_t *v;
    size_t at = 0;
    json_object_foreach((json_t *)o, key, v) {
        if (in_list(lists[0], key) || in_list(lists[1], key) || in_list(lists[2], key))
            continue;
        int w = snprintf(r->unknown + at, sizeof r->unknown - at, "%s%.40s", at ? "," : "", key);
        if (w < 0 || (size_t)w >= sizeof r->unknown - at) {
            r->unknown[sizeof r->unknown - 1] = 0;
            break;
        }
        at += (size_t)w;
    }
}

/* ---- entry points -------------------------------------------------------- */

int api_request_parse(api_endpoint ep, const char *body, size_t len, int n_vocab, api_request *r,
                      api_error *e) {
    memset(r, 0, sizeof *r);
    r->ep = ep;
    r->n = 1;
    r->add_generation_prompt = true;
    r->add_special_tokens = true;
    eng_sampling_params_default(&r->sampling);
    if (!api_endpoint_has_body(ep)) {
        api_error_set(e, 400, NULL, "", "%s takes no request body", api_endpoint_name(ep));
        return -1;
    }
    json_error_t je;
    r->root = json_loadb(body ? body : "", len, JSON_ALLOW_NUL, &je);
    if (!r->root) {
        api_error_set(e, 400, NULL, "", "We could not parse the JSON body of your request: %s (line %d, column %d)",
                      je.text, je.line, je.column);
        return -1;
    }
    const json_t *o = r->root;
    if (!json_is_object(o)) {
        api_error_set(e, 400, NULL, "", "The request body must be a JSON object, found %s", json_kind(o));
        goto fail;
    }
    if (get_string(o, "model", &r->model, e) < 0)
        goto fail;
    switch (ep) {
    case API_EP_COMPLETIONS:
        r->max_tokens = 16;
        if (parse_prompt(o, n_vocab, true, r, e) || parse_generation(o, false, n_vocab, r, e))
            goto fail;
        break;
    case API_EP_CHAT:
        if (parse_messages(o, r, e) || parse_generation(o, true, n_vocab, r, e))
            goto fail;
        break;
    case API_EP_TOKENIZE: {
        const json_t *p = json_object_get(o, "prompt"), *m = json_object_get(o, "messages");
        bool has_p = p && !json_is_null(p), has_m = m && !json_is_null(m);
        if (has_p == has_m) {
            api_error_set(e, 400, NULL, "prompt", "give exactly one of 'prompt' and 'messages'");
            goto fail;
        }
        if (has_p ? parse_prompt(o, n_vocab, false, r, e) : parse_messages(o, r, e))
            goto fail;
        if (get_bool(o, "add_special_tokens", &r->add_special_tokens, e) < 0 ||
            get_bool(o, "add_generation_prompt", &r->add_generation_prompt, e) < 0)
            goto fail;
        break;
    }
    case API_EP_DETOKENIZE: {
        const json_t *t = json_object_get(o, "tokens");
        if (!t || json_is_null(t)) {
            api_error_set(e, 400, NULL, "tokens", "'tokens' is required");
            goto fail;
        }
        if (!json_is_array(t)) {
            bad_type(e, "tokens", "an array of token ids", t);
            goto fail;
        }
        r->prompts = calloc(1, sizeof *r->prompts);
        if (!r->prompts) {
            api_error_set(e, 500, "internal_error", "tokens", "out of memory");
            goto fail;
        }
        r->n_prompts = 1;
        if (json_array_size(t) > 0 && parse_ids(t, "tokens", n_vocab, &r->prompts[0].ids, &r->prompts[0].n_ids, e))
            goto fail;
        break;
    }
    default:
        abort();  /* api_endpoint_has_body admitted only the four above */
    }
    note_unknown(o, ep, r);
    return 0;
fail:
    api_request_free(r);
    return -1;
}

void api_request_free(api_request *r) {
    for (int i = 0; i < r->n_prompts; i++)
        free(r->prompts[i].ids);
    free(r->prompts);
    free(r->messages);
    for (int i = 0; i < r->n_owned; i++)
        free(r->owned[i]);
    free(r->owned);
    free(r->stop_ids);
    if (r->root)
        json_decref(r->root);
    memset(r, 0, sizeof *r);
}
