/* test_request.c: tests for api/request.c: what each request field means,
 * its default and its bounds, against OpenAI's API reference (defaults:
 * temperature 1, top_p 1, n 1, max_tokens 16 for completions and unlimited
 * for chat, penalties in [-2, 2], temperature in [0, 2], top_p in (0, 1]),
 * and that every rejection is a 400 naming the offending field. */
#include <criterion/criterion.h>

#include <string.h>

#include "api/openai.h"

static api_request r;
static api_error e;

static int parse_ep(api_endpoint ep, const char *body) {
    memset(&e, 0, sizeof e);
    return api_request_parse(ep, body, strlen(body), 1000, &r, &e);
}

static void expect_ok(api_endpoint ep, const char *body) {
    int rc = parse_ep(ep, body);
    cr_assert_eq(rc, 0, "%s rejected: %s", body, e.message);
}

/* A 400 with param `param` and a message holding `words`. */
static void expect_400(api_endpoint ep, const char *body, const char *param, const char *words) {
    int rc = parse_ep(ep, body);
    cr_assert_eq(rc, -1, "%s accepted", body);
    cr_assert_eq(e.status, 400, "%s: status %d", body, e.status);
    cr_assert_str_eq(e.type, "invalid_request_error");
    cr_assert_str_eq(e.param, param, "%s: param '%s', want '%s' (%s)", body, e.param, param, e.message);
    cr_assert(strstr(e.message, words), "%s: message '%s' lacks '%s'", body, e.message, words);
    cr_assert_null(r.root, "a failed parse releases the request");
}

static void done(void) { api_request_free(&r); }

TestSuite(request, .fini = done);

Test(request, completion_defaults) {
    expect_ok(API_EP_COMPLETIONS, "{\"model\": \"m\", \"prompt\": \"Hello\"}");
    cr_assert_str_eq(r.model, "m");
    cr_assert_eq(r.n_prompts, 1);
    cr_assert_eq(r.prompts[0].text_len, 5);
    cr_assert_eq(memcmp(r.prompts[0].text, "Hello", 5), 0);
    cr_assert_eq(r.max_tokens, 16);
    cr_assert_eq(r.n, 1);
    cr_assert_float_eq(r.sampling.temperature, 1.0f, 0);
    cr_assert_float_eq(r.sampling.top_p, 1.0f, 0);
    cr_assert_eq(r.sampling.top_k, 0);
    cr_assert_float_eq(r.sampling.presence_penalty, 0.0f, 0);
    cr_assert_float_eq(r.sampling.repetition_penalty, 1.0f, 0);
    cr_assert(!r.stream && !r.include_usage && !r.logprobs && !r.echo && !r.ignore_eos && !r.seed_given);
    cr_assert_eq(r.n_stop, 0);
    cr_assert_str_eq(r.unknown, "");
}

Test(request, chat_defaults_and_fields) {
    expect_ok(API_EP_CHAT,
              "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"},"
              " {\"role\": \"user\", \"content\": \"Hi\"}], \"temperature\": 0, \"top_p\": 0.9, \"top_k\": 40,"
              " \"min_p\": 0.05, \"seed\": -3, \"n\": 2, \"stream\": true, \"stream_options\": {\"include_usage\": true},"
              " \"presence_penalty\": -2, \"frequency_penalty\": 2, \"repetition_penalty\": 1.1,"
              " \"logprobs\": true, \"ignore_eos\": true, \"user\": \"u1\", \"stop\": [\"\\n\", \"\", \"END\"]}");
    cr_assert_eq(r.n_messages, 2);
    cr_assert_str_eq(r.messages[0].role, "system");
    cr_assert_str_eq(r.messages[1].content, "Hi");
    cr_assert_eq(r.max_tokens, 0, "chat: no max_tokens means up to the context");
    cr_assert_float_eq(r.sampling.temperature, 0.0f, 0);
    cr_assert_float_eq(r.sampling.top_p, 0.9f, 1e-7);
    cr_assert_eq(r.sampling.top_k, 40);
    cr_assert_float_eq(r.sampling.min_p, 0.05f, 1e-7);
    cr_assert(r.seed_given);
    cr_assert_eq(r.sampling.seed, (uint64_t)-3);
    cr_assert_eq(r.n, 2);
    cr_assert(r.stream && r.include_usage && r.logprobs && r.ignore_eos);
    cr_assert_float_eq(r.sampling.presence_penalty, -2.0f, 0);
    cr_assert_float_eq(r.sampling.frequency_penalty, 2.0f, 0);
    cr_assert_float_eq(r.sampling.repetition_penalty, 1.1f, 1e-6);
    cr_assert_str_eq(r.user, "u1");
    cr_assert_eq(r.n_stop, 2, "empty stop strings are dropped");
    cr_assert_str_eq(r.stop[1], "END");
}

Test(request, nulls_mean_defaults) {
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"temperature\": null, \"max_tokens\": null, \"stop\": null,"
                                  " \"n\": null, \"logprobs\": null, \"seed\": null, \"model\": null}");
    cr_assert_float_eq(r.sampling.temperature, 1.0f, 0);
    cr_assert_eq(r.max_tokens, 16);
    cr_assert_null(r.model);
    cr_assert(!r.logprobs && !r.seed_given);
}

Test(request, prompt_forms) {
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": [\"a\", \"bc\"]}");
    cr_assert_eq(r.n_prompts, 2);
    cr_assert_eq(r.prompts[1].text_len, 2);
    api_request_free(&r);
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": [1, 2, 999]}");
    cr_assert_eq(r.n_prompts, 1);
    cr_assert_null(r.prompts[0].text);
    cr_assert_eq(r.prompts[0].n_ids, 3);
    cr_assert_eq(r.prompts[0].ids[2], 999);
    api_request_free(&r);
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": [[5, 6], \"text\", [7]]}");
    cr_assert_eq(r.n_prompts, 3);
    cr_assert_eq(r.prompts[0].n_ids, 2);
    cr_assert_not_null(r.prompts[1].text);
    cr_assert_eq(r.prompts[2].ids[0], 7);
    api_request_free(&r);
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"a\\u0000b\"}");
    cr_assert_eq(r.prompts[0].text_len, 3, "NUL inside a prompt is kept");
}

Test(request, prompt_errors) {
    expect_400(API_EP_COMPLETIONS, "{}", "prompt", "required");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": []}", "prompt", "empty");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": 5}", "prompt", "found an integer");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": [1, 1000]}", "prompt", "token id 1000 is out of range [0, 999]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": [1, -1]}", "prompt", "out of range");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": [\"a\", {}]}", "prompt[1]", "found an object");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": [[1], [\"x\"]]}", "prompt[1]", "found a string");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": [[]]}", "prompt[0]", "empty");
}

Test(request, too_many_prompts) {
    char body[1024] = "{\"prompt\": [";
    for (int i = 0; i <= API_MAX_PROMPTS; i++)
        strcat(body, i ? ",\"a\"" : "\"a\"");
    strcat(body, "]}");
    expect_400(API_EP_COMPLETIONS, body, "prompt", "at most 64");
}

Test(request, wrong_types_name_the_field) {
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"temperature\": \"hot\"}", "temperature",
               "must be a number, found a string");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 16.5}", "max_tokens", "an integer");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"stream\": 1}", "stream", "a boolean");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"model\": 3}", "model", "a string");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"stop\": 3}", "stop", "a string or an array");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"stop\": [\"a\", 3]}", "stop[1]", "a string");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"stream\": true, \"stream_options\": 1}", "stream_options",
               "an object");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"stop_token_ids\": [\"a\"]}", "stop_token_ids",
               "token id");
}

Test(request, integral_reals_are_integers) {
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 32.0, \"n\": 2.0}");
    cr_assert_eq(r.max_tokens, 32);
    cr_assert_eq(r.n, 2);
}

Test(request, ranges) {
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"temperature\": 2.5}", "temperature", "[0, 2]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"temperature\": -0.1}", "temperature", "[0, 2]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"top_p\": 0}", "top_p", "(0, 1]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"top_p\": 1.01}", "top_p", "(0, 1]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 0}", "n", "[1, 16]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"n\": 17}", "n", "[1, 16]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"max_tokens\": 0}", "max_tokens", "found 0");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"presence_penalty\": -2.01}", "presence_penalty", "[-2, 2]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"frequency_penalty\": 3}", "frequency_penalty", "[-2, 2]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"repetition_penalty\": 0}", "repetition_penalty", "(0, 10]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"min_p\": 1.5}", "min_p", "[0, 1]");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"top_k\": -2}", "top_k", "found -2");
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"top_k\": -1, \"top_p\": 1, \"temperature\": 2}");
    cr_assert_eq(r.sampling.top_k, 0, "top_k -1 turns it off");
}

/* priority (vLLM's field): any 32-bit integer, lower first; 0 when absent or null */
Test(request, priority) {
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\"}");
    cr_assert_eq(r.priority, 0);
    api_request_free(&r);
    expect_ok(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"priority\": -5}");
    cr_assert_eq(r.priority, -5);
    cr_assert_str_eq(r.unknown, "", "priority is a known field");
    api_request_free(&r);
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"priority\": 2147483647}");
    cr_assert_eq(r.priority, 2147483647);
    api_request_free(&r);
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"priority\": null}");
    cr_assert_eq(r.priority, 0);
    api_request_free(&r);
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"priority\": \"high\"}", "priority", "integer");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"priority\": 1.5}", "priority", "integer");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"priority\": 2147483648}", "priority", "found 2147483648");
}

Test(request, stop_limits) {
    expect_400(API_EP_COMPLETIONS,
               "{\"prompt\": \"x\", \"stop\": [\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\",\"11\","
               "\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}",
               "stop", "at most 16");
    char body[600];
    snprintf(body, sizeof body, "{\"prompt\": \"x\", \"stop\": \"%0300d\"}", 0);
    expect_400(API_EP_COMPLETIONS, body, "stop", "at most 256 bytes");
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"stop\": \"###\", \"stop_token_ids\": [2, 3]}");
    cr_assert_eq(r.n_stop, 1);
    cr_assert_eq(r.n_stop_ids, 2);
    cr_assert_eq(r.stop_ids[1], 3);
}

Test(request, stream_options_need_stream) {
    expect_400(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream_options\": "
                            "{\"include_usage\": true}}",
               "stream_options", "only allowed when 'stream' is true");
    expect_400(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"stream\": true, "
                            "\"stream_options\": {\"include_usage\": 1}}",
               "stream_options.include_usage", "a boolean");
}

Test(request, logprobs) {
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"logprobs\": 0}");
    cr_assert(r.logprobs);
    api_request_free(&r);
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"logprobs\": 3}", "logprobs", "not supported");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"logprobs\": true}", "logprobs", "an integer");
    expect_400(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"top_logprobs\": 2}",
               "top_logprobs", "requires 'logprobs'");
    expect_400(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": 1}", "logprobs",
               "a boolean");
    expect_ok(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"logprobs\": true,"
                           " \"top_logprobs\": 0}");
    cr_assert(r.logprobs);
}

Test(request, unsupported_completion_options) {
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"suffix\": \"end\"}", "suffix", "not supported");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"best_of\": 3}", "best_of", "not supported");
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"best_of\": 1, \"suffix\": \"\", \"echo\": true}");
    cr_assert(r.echo);
}

Test(request, max_completion_tokens_alias) {
    expect_ok(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"max_completion_tokens\": 7}");
    cr_assert_eq(r.max_tokens, 7);
}

Test(request, unknown_fields_are_listed) {
    expect_ok(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [],"
                           " \"response_format\": {\"type\": \"text\"}, \"model\": \"m\"}");
    cr_assert(strstr(r.unknown, "tools"), "%s", r.unknown);
    cr_assert(strstr(r.unknown, "response_format"), "%s", r.unknown);
    cr_assert_null(strstr(r.unknown, "model"));
    cr_assert_null(strstr(r.unknown, "messages"));
    api_request_free(&r);
    expect_ok(API_EP_COMPLETIONS, "{\"prompt\": \"x\", \"echo\": false, \"best_of\": 1}");
    cr_assert_str_eq(r.unknown, "");
    api_request_free(&r);
    expect_ok(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"echo\": true}");
    cr_assert_str_eq(r.unknown, "echo", "echo belongs to completions only");
}

Test(request, bad_json) {
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": ", "", "could not parse the JSON");
    expect_400(API_EP_COMPLETIONS, "", "", "could not parse the JSON");
    expect_400(API_EP_COMPLETIONS, "[1, 2]", "", "must be a JSON object, found an array");
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"\xff\"}", "", "could not parse");  /* invalid UTF-8 */
    expect_400(API_EP_COMPLETIONS, "{\"prompt\": \"x\"} trailing", "", "could not parse");
}

Test(request, messages) {
    expect_400(API_EP_CHAT, "{}", "messages", "required");
    expect_400(API_EP_CHAT, "{\"messages\": []}", "messages", "1 to 4096");
    expect_400(API_EP_CHAT, "{\"messages\": {}}", "messages", "an array");
    expect_400(API_EP_CHAT, "{\"messages\": [\"hi\"]}", "messages[0]", "an object");
    expect_400(API_EP_CHAT, "{\"messages\": [{\"content\": \"x\"}]}", "messages[0].role", "required");
    expect_400(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}, {\"role\": \"wizard\"}]}",
               "messages[1].role", "\"wizard\"");
    expect_400(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": 5}]}", "messages[0].content",
               "found an integer");
    expect_400(API_EP_CHAT, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\\u0000b\"}]}",
               "messages[0].content", "NUL");
    expect_400(API_EP_CHAT,
               "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]}",
               "messages[0].content[0]", "only text content");
}

Test(request, message_contents) {
    expect_ok(API_EP_CHAT, "{\"messages\": [{\"role\": \"developer\", \"content\": \"rules\"},"
                           " {\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"Hello, \"},"
                           " {\"type\": \"text\", \"text\": \"world\"}]}, {\"role\": \"assistant\", \"content\": null}]}");
    cr_assert_str_eq(r.messages[0].role, "system", "developer is OpenAI's newer name of system");
    cr_assert_str_eq(r.messages[1].content, "Hello, world");
    cr_assert_str_eq(r.messages[2].content, "");
}

Test(request, tokenize_and_detokenize) {
    expect_ok(API_EP_TOKENIZE, "{\"prompt\": \"hi\", \"add_special_tokens\": false}");
    cr_assert_eq(r.n_prompts, 1);
    cr_assert(!r.add_special_tokens);
    api_request_free(&r);
    expect_ok(API_EP_TOKENIZE, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}],"
                               " \"add_generation_prompt\": false}");
    cr_assert_eq(r.n_messages, 1);
    cr_assert(!r.add_generation_prompt);
    api_request_free(&r);
    expect_400(API_EP_TOKENIZE, "{}", "prompt", "exactly one");
    expect_400(API_EP_TOKENIZE, "{\"prompt\": \"a\", \"messages\": []}", "prompt", "exactly one");
    expect_400(API_EP_TOKENIZE, "{\"prompt\": [1, 2]}", "prompt", "a string");
    expect_ok(API_EP_DETOKENIZE, "{\"tokens\": [4, 5]}");
    cr_assert_eq(r.prompts[0].n_ids, 2);
    api_request_free(&r);
    expect_ok(API_EP_DETOKENIZE, "{\"tokens\": []}");
    cr_assert_eq(r.prompts[0].n_ids, 0);
    api_request_free(&r);
    expect_400(API_EP_DETOKENIZE, "{}", "tokens", "required");
    expect_400(API_EP_DETOKENIZE, "{\"tokens\": \"4 5\"}", "tokens", "an array");
    expect_400(API_EP_DETOKENIZE, "{\"tokens\": [4, 5000]}", "tokens", "out of range");
}

Test(request, bodyless_endpoints_are_refused) {
    int rc = parse_ep(API_EP_HEALTH, "{}");
    cr_assert_eq(rc, -1);
    cr_assert_eq(e.status, 400);
}
