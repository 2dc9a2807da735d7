/* test_response.c: tests for api/response.c: the JSON of every reply, read
 * back with jansson and checked field by field against the shapes of
 * OpenAI's API reference (completion, chat.completion,
 * chat.completion.chunk, the error object, the model list), and the UTF-8
 * repair against Python's bytes.decode("utf-8", "replace") (vectors below
 * produced by CPython 3.11). */
#include <criterion/criterion.h>

#include <string.h>

#include "api/openai.h"

static json_t *parse(const char *s, size_t len) {
    cr_assert_not_null(s);
    cr_assert_eq(strlen(s), len, "length reported %zu, string %zu", len, strlen(s));
    json_error_t je;
    json_t *v = json_loads(s, 0, &je);
    cr_assert_not_null(v, "not JSON: %s (%s)", s, je.text);
    return v;
}

/* The JSON of one SSE event "data: {...}\n\n". */
static json_t *parse_sse(const char *s, size_t len) {
    cr_assert_not_null(s);
    cr_assert(len > 8 && !strncmp(s, "data: ", 6) && !strcmp(s + len - 2, "\n\n"), "not an SSE event: %s", s);
    char *body = strndup(s + 6, len - 8);
    json_t *v = parse(body, len - 8);
    free(body);
    return v;
}

static const char *str(const json_t *o, const char *path_key) {
    const json_t *v = json_object_get(o, path_key);
    cr_assert(json_is_string(v), "%s is not a string", path_key);
    return json_string_value(v);
}

Test(error, openai_shape) {
    api_error e;
    api_error_set(&e, 400, NULL, "temperature", "'temperature' must be in [0, 2], found %g", 3.5);
    size_t len;
    char *s = api_error_json(&e, &len);
    json_t *v = parse(s, len);
    json_t *err = json_object_get(v, "error");
    cr_assert(json_is_object(err));
    cr_assert_eq(json_object_size(err), 4);
    cr_assert_str_eq(str(err, "message"), "'temperature' must be in [0, 2], found 3.5");
    cr_assert_str_eq(str(err, "type"), "invalid_request_error");
    cr_assert_str_eq(str(err, "param"), "temperature");
    cr_assert(json_is_null(json_object_get(err, "code")));
    json_decref(v);
    free(s);

    api_error_set(&e, 503, "overloaded", "", "busy");
    s = api_error_json(&e, &len);
    v = parse(s, len);
    err = json_object_get(v, "error");
    cr_assert_str_eq(str(err, "type"), "server_error");
    cr_assert_str_eq(str(err, "code"), "overloaded");
    cr_assert(json_is_null(json_object_get(err, "param")));
    cr_assert_eq(e.status, 503);
    json_decref(v);
    free(s);
}

Test(error, sse_event) {
    api_error e;
    api_error_set(&e, 500, "internal_error", "", "boom");
    size_t len;
    char *s = api_render_error_chunk(&e, &len);
    json_t *v = parse_sse(s, len);
    cr_assert_str_eq(str(json_object_get(v, "error"), "message"), "boom");
    json_decref(v);
    free(s);
}

static void fill_choice(api_choice *c, const char *const *toks, const float *lps, int n, eng_finish_reason f) {
    memset(c, 0, sizeof *c);
    for (int i = 0; i < n; i++) {
        cr_assert_eq(api_choice_add_logprob(c, toks[i], strlen(toks[i]), lps[i]), 0);
        cr_assert_eq(api_choice_append(c, toks[i], strlen(toks[i])), 0);
    }
    c->finish = f;
}

Test(reply, completion) {
    static const char *toks[] = {" Paris", ".", " It"};
    static const float lps[] = {-0.25f, -1.5f, -3.0f};
    api_choice ch[2];
    fill_choice(&ch[0], toks, lps, 3, ENG_FINISH_LENGTH);
    fill_choice(&ch[1], toks, lps, 2, ENG_FINISH_STOP);
    api_reply_meta m = {API_EP_COMPLETIONS, "cmpl-1", 1700000000, "smol", true};
    size_t len;
    char *s = api_render_reply(&m, ch, 2, 5, 5, &len);
    json_t *v = parse(s, len);
    cr_assert_str_eq(str(v, "id"), "cmpl-1");
    cr_assert_str_eq(str(v, "object"), "text_completion");
    cr_assert_str_eq(str(v, "model"), "smol");
    cr_assert_eq(json_integer_value(json_object_get(v, "created")), 1700000000);
    json_t *choices = json_object_get(v, "choices");
    cr_assert_eq(json_array_size(choices), 2);
    json_t *c0 = json_array_get(choices, 0), *c1 = json_array_get(choices, 1);
    cr_assert_eq(json_integer_value(json_object_get(c1, "index")), 1);
    cr_assert_str_eq(str(c0, "text"), " Paris. It");
    cr_assert_str_eq(str(c0, "finish_reason"), "length");
    cr_assert_str_eq(str(c1, "text"), " Paris.");
    cr_assert_str_eq(str(c1, "finish_reason"), "stop");
    json_t *lp = json_object_get(c0, "logprobs");
    cr_assert_eq(json_array_size(json_object_get(lp, "tokens")), 3);
    cr_assert_str_eq(json_string_value(json_array_get(json_object_get(lp, "tokens"), 2)), " It");
    cr_assert_float_eq(json_real_value(json_array_get(json_object_get(lp, "token_logprobs"), 1)), -1.5, 1e-6);
    cr_assert_eq(json_integer_value(json_array_get(json_object_get(lp, "text_offset"), 2)), 7);
    cr_assert(json_is_null(json_object_get(lp, "top_logprobs")));
    json_t *u = json_object_get(v, "usage");
    cr_assert_eq(json_integer_value(json_object_get(u, "prompt_tokens")), 5);
    cr_assert_eq(json_integer_value(json_object_get(u, "completion_tokens")), 5);
    cr_assert_eq(json_integer_value(json_object_get(u, "total_tokens")), 10);
    json_decref(v);
    free(s);
    api_choice_free(&ch[0]);
    api_choice_free(&ch[1]);
}

Test(reply, chat_without_logprobs) {
    api_choice ch;
    memset(&ch, 0, sizeof ch);
    api_choice_append(&ch, "Hi \"there\"\n", 11);
    ch.finish = ENG_FINISH_STOP;
    api_reply_meta m = {API_EP_CHAT, "chatcmpl-9", 1, "smol", false};
    size_t len;
    char *s = api_render_reply(&m, &ch, 1, 30, 3, &len);
    json_t *v = parse(s, len);
    cr_assert_str_eq(str(v, "object"), "chat.completion");
    json_t *c0 = json_array_get(json_object_get(v, "choices"), 0);
    json_t *msg = json_object_get(c0, "message");
    cr_assert_str_eq(str(msg, "role"), "assistant");
    cr_assert_str_eq(str(msg, "content"), "Hi \"there\"\n");
    cr_assert(json_is_null(json_object_get(c0, "logprobs")));
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(v, "usage"), "total_tokens")), 33);
    json_decref(v);
    free(s);
    api_choice_free(&ch);
}

Test(reply, chat_logprobs_bytes) {
    api_choice ch;
    static const char *toks[] = {"\xc3\xa9"};
    static const float lps[] = {-0.5f};
    fill_choice(&ch, toks, lps, 1, ENG_FINISH_STOP);
    api_reply_meta m = {API_EP_CHAT, "c", 1, "smol", true};
    size_t len;
    char *s = api_render_reply(&m, &ch, 1, 1, 1, &len);
    json_t *v = parse(s, len);
    json_t *content = json_object_get(json_object_get(json_array_get(json_object_get(v, "choices"), 0), "logprobs"),
                                      "content");
    cr_assert_eq(json_array_size(content), 1);
    json_t *e = json_array_get(content, 0);
    cr_assert_str_eq(str(e, "token"), "\xc3\xa9");
    json_t *bytes = json_object_get(e, "bytes");
    cr_assert_eq(json_array_size(bytes), 2);
    cr_assert_eq(json_integer_value(json_array_get(bytes, 0)), 0xc3);
    cr_assert_eq(json_integer_value(json_array_get(bytes, 1)), 0xa9);
    cr_assert(json_is_array(json_object_get(e, "top_logprobs")));
    json_decref(v);
    free(s);
    api_choice_free(&ch);
}

Test(chunk, chat_role_then_content_then_finish) {
    api_reply_meta m = {API_EP_CHAT, "chatcmpl-1", 2, "smol", false};
    size_t len;
    char *s = api_render_chunk(&m, 0, true, "Hel", 3, NULL, ENG_FINISH_NONE, false, &len);
    json_t *v = parse_sse(s, len);
    cr_assert_str_eq(str(v, "object"), "chat.completion.chunk");
    cr_assert_null(json_object_get(v, "usage"));
    json_t *c = json_array_get(json_object_get(v, "choices"), 0);
    json_t *d = json_object_get(c, "delta");
    cr_assert_str_eq(str(d, "role"), "assistant");
    cr_assert_str_eq(str(d, "content"), "Hel");
    cr_assert(json_is_null(json_object_get(c, "finish_reason")));
    json_decref(v);
    free(s);

    s = api_render_chunk(&m, 1, false, "", 0, NULL, ENG_FINISH_LENGTH, true, &len);
    v = parse_sse(s, len);
    cr_assert(json_is_null(json_object_get(v, "usage")));
    c = json_array_get(json_object_get(v, "choices"), 0);
    cr_assert_eq(json_integer_value(json_object_get(c, "index")), 1);
    cr_assert_eq(json_object_size(json_object_get(c, "delta")), 0);
    cr_assert_str_eq(str(c, "finish_reason"), "length");
    json_decref(v);
    free(s);
}

Test(chunk, completion_with_logprob_and_usage) {
    api_reply_meta m = {API_EP_COMPLETIONS, "cmpl-2", 2, "smol", true};
    api_chunk_logprob lp = {"\xe2\x82", 2, -2.0f, 11};  /* half a character: shown as U+FFFD */
    size_t len;
    char *s = api_render_chunk(&m, 0, true, "x", 1, &lp, ENG_FINISH_STOP, false, &len);
    json_t *v = parse_sse(s, len);
    cr_assert_str_eq(str(v, "object"), "text_completion");
    json_t *c = json_array_get(json_object_get(v, "choices"), 0);
    cr_assert_str_eq(str(c, "text"), "x");
    cr_assert_str_eq(str(c, "finish_reason"), "stop");
    json_t *l = json_object_get(c, "logprobs");
    cr_assert_str_eq(json_string_value(json_array_get(json_object_get(l, "tokens"), 0)), "\xef\xbf\xbd");
    cr_assert_eq(json_integer_value(json_array_get(json_object_get(l, "text_offset"), 0)), 11);
    json_decref(v);
    free(s);

    s = api_render_usage_chunk(&m, 7, 9, &len);
    v = parse_sse(s, len);
    cr_assert_eq(json_array_size(json_object_get(v, "choices")), 0);
    cr_assert_eq(json_integer_value(json_object_get(json_object_get(v, "usage"), "total_tokens")), 16);
    json_decref(v);
    free(s);
}

Test(other, models_tokenize_detokenize) {
    size_t len;
    char *s = api_render_models("smol", 5, 2048, &len);
    json_t *v = parse(s, len);
    cr_assert_str_eq(str(v, "object"), "list");
    json_t *m = json_array_get(json_object_get(v, "data"), 0);
    cr_assert_str_eq(str(m, "id"), "smol");
    cr_assert_str_eq(str(m, "object"), "model");
    cr_assert_str_eq(str(m, "owned_by"), "kvserve");
    cr_assert_eq(json_integer_value(json_object_get(m, "max_model_len")), 2048);
    json_decref(v);
    free(s);

    s = api_render_model("smol", 5, 2048, &len);
    v = parse(s, len);
    cr_assert_str_eq(str(v, "id"), "smol");
    json_decref(v);
    free(s);

    static const int32_t ids[] = {1, 504, 3};
    s = api_render_tokenize(ids, 3, 8192, &len);
    v = parse(s, len);
    cr_assert_eq(json_integer_value(json_object_get(v, "count")), 3);
    cr_assert_eq(json_integer_value(json_object_get(v, "max_model_len")), 8192);
    cr_assert_eq(json_integer_value(json_array_get(json_object_get(v, "tokens"), 1)), 504);
    json_decref(v);
    free(s);

    s = api_render_detokenize("a\xff", 2, &len);
    v = parse(s, len);
    cr_assert_str_eq(str(v, "prompt"), "a\xef\xbf\xbd");
    json_decref(v);
    free(s);
}

/* Vectors: input bytes -> CPython 3.11 bytes.decode("utf-8", "replace").encode(). */
static const struct {
    const char *in;
    size_t in_len;
    const char *out;
    size_t out_len;
} utf8_cases[] = {
    {"\x61\x62\x63", 3, "\x61\x62\x63", 3},
    {"\xc3\xa9\x74\xc3\xa9", 5, "\xc3\xa9\x74\xc3\xa9", 5},
    {"\x80", 1, "\xef\xbf\xbd", 3},
    {"\xc0\xaf", 2, "\xef\xbf\xbd\xef\xbf\xbd", 6},
    {"\xed\xa0\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9},
    {"\xf4\x90\x80\x80", 4, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 12},
    {"\xe2\x82", 2, "\xef\xbf\xbd", 3},
    {"\xe2\x82\xac", 3, "\xe2\x82\xac", 3},
    {"\xf0\x9f\x98\x80\x78", 5, "\xf0\x9f\x98\x80\x78", 5},
    {"\xf0\x9f\x98", 3, "\xef\xbf\xbd", 3},
    {"\x61\xff\x62", 3, "\x61\xef\xbf\xbd\x62", 5},
    {"\xe0\x80\x80", 3, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 9},
    {"\xf0\x80\x80\x80", 4, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd", 12},
    {"\xc2", 1, "\xef\xbf\xbd", 3},
    {"\xe1\x80\x41", 3, "\xef\xbf\xbd\x41", 4},
    {"\x61\x00\x62", 3, "\x61\x00\x62", 3},
};

Test(utf8, matches_python_replace) {
    for (size_t i = 0; i < sizeof utf8_cases / sizeof utf8_cases[0]; i++) {
        char out[64];
        size_t n = api_utf8_sanitize(utf8_cases[i].in, utf8_cases[i].in_len, out, sizeof out);
        cr_assert_eq(n, utf8_cases[i].out_len, "case %zu: %zu bytes, want %zu", i, n, utf8_cases[i].out_len);
        cr_assert_eq(memcmp(out, utf8_cases[i].out, n), 0, "case %zu differs", i);
        cr_assert_eq(out[n], 0);
    }
}

Test(utf8, stops_at_capacity) {
    char out[5];
    size_t n = api_utf8_sanitize("\xff\xff\xff", 3, out, sizeof out);
    cr_assert_eq(n, 3);  /* one U+FFFD fits with the NUL, a second does not */
    cr_assert_eq(out[3], 0);
}
