/* test_chat.c: tests for engine/chat.c.
 *
 * The reference is Jinja2 itself: tests/fixtures/chat/gen.py renders the real
 * templates of SmolLM2 (taken from the default model's GGUF), Qwen2/2.5,
 * ChatML, Llama 3, Llama 2, four Mistral variants, Phi-3 and Gemma 2/3 the way
 * transformers' apply_chat_template does, for a set of conversations, into
 * tests/fixtures/chat/cases.json. Every case must detect the expected format
 * and render byte for byte the same text, or fail where the template raises. */
#include <criterion/criterion.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat.h"
#include "engine/gguf.h"

#define FIXTURES "tests/fixtures/chat/"

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s (tests run from the repository root)", path);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)size + 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)size, f), (size_t)size);
    buf[size] = '\0';
    fclose(f);
    return buf;
}

/* Prints s with C escapes, for readable failure messages. */
static void print_escaped(const char *label, const char *s)
{
    fprintf(stderr, "%s: \"", label);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '\n')
            fputs("\\n", stderr);
        else if (*p == '\t')
            fputs("\\t", stderr);
        else if (*p < 0x20 || *p == '"' || *p == '\\')
            fprintf(stderr, "\\x%02x", *p);
        else
            fputc(*p, stderr);
    }
    fputs("\"\n", stderr);
}

static char *apply_ok(eng_chat_format f, const char *src, const eng_chat_msg *m, int n, bool gen)
{
    char *out = NULL, err[256] = "";
    int rc = eng_chat_apply(f, src, m, n, gen, &out, err, sizeof err);
    cr_assert_eq(rc, 0, "%s: %s", eng_chat_format_name(f), err);
    cr_assert_not_null(out);
    return out;
}

/* Expects an error whose message contains `needle`. */
static void apply_fails(eng_chat_format f, const char *src, const eng_chat_msg *m, int n,
                        const char *needle)
{
    char *out = (char *)"untouched", err[256] = "";
    int rc = eng_chat_apply(f, src, m, n, true, &out, err, sizeof err);
    cr_assert_neq(rc, 0, "%s accepted the conversation", eng_chat_format_name(f));
    cr_assert_null(out);
    cr_assert(strstr(err, needle), "error '%s' does not mention '%s'", err, needle);
}

Test(chat, matches_jinja2_renders_of_real_templates)
{
    json_error_t jerr;
    json_t *root = json_load_file(FIXTURES "cases.json", 0, &jerr);
    cr_assert_not_null(root, "cases.json: %s (line %d)", jerr.text, jerr.line);
    json_t *cases = json_object_get(root, "cases");
    cr_assert(json_is_array(cases) && json_array_size(cases) > 200);
    size_t index;
    json_t *c;
    int rendered = 0, raised = 0;
    json_array_foreach(cases, index, c) {
        const char *tmpl_file = json_string_value(json_object_get(c, "template"));
        const char *format = json_string_value(json_object_get(c, "format"));
        const char *conv = json_string_value(json_object_get(c, "conversation"));
        bool gen = json_is_true(json_object_get(c, "add_generation_prompt"));
        json_t *jmsgs = json_object_get(c, "messages");
        json_t *expected = json_object_get(c, "expected");
        cr_assert(tmpl_file && format && conv && json_is_array(jmsgs));

        char path[256];
        snprintf(path, sizeof path, FIXTURES "%s", tmpl_file);
        char *src = read_file(path);
        eng_chat_format f = eng_chat_detect(src);
        cr_assert_eq(f, eng_chat_format_from_name(format), "%s: detected %s, want %s", tmpl_file,
                     eng_chat_format_name(f), format);

        int n = (int)json_array_size(jmsgs);
        eng_chat_msg msgs[8];
        cr_assert(n <= 8);
        for (int i = 0; i < n; i++) {
            json_t *m = json_array_get(jmsgs, (size_t)i);
            msgs[i].role = json_string_value(json_object_get(m, "role"));
            msgs[i].content = json_string_value(json_object_get(m, "content"));
        }
        char *out = NULL, err[256] = "";
        int rc = eng_chat_apply(f, src, msgs, n, gen, &out, err, sizeof err);
        if (expected) {
            const char *want = json_string_value(expected);
            cr_assert_eq(rc, 0, "%s / %s / gen=%d: error '%s'", tmpl_file, conv, gen, err);
            if (strcmp(out, want) != 0) {
                print_escaped("got ", out);
                print_escaped("want", want);
                cr_assert_fail("%s / %s / gen=%d: text differs from Jinja2", tmpl_file, conv,
                               gen);
            }
            rendered++;
        } else {
            cr_assert_neq(rc, 0, "%s / %s: the template raises '%s' but we rendered", tmpl_file,
                          conv, json_string_value(json_object_get(c, "error")));
            cr_assert_null(out);
            cr_assert(err[0], "%s / %s: no error message", tmpl_file, conv);
            raised++;
        }
        free(out);
        free(src);
    }
    /* The fixture must exercise both outcomes. */
    cr_assert(rendered > 150 && raised > 20, "rendered %d, raised %d", rendered, raised);
    json_decref(root);
}

Test(chat, smollm2_default_system_message)
{
    char *src = read_file(FIXTURES "smollm2.jinja");
    cr_assert_eq(eng_chat_detect(src), ENG_CHAT_CHATML);
    const eng_chat_msg user[1] = {{"user", "Hi"}};
    char *out = apply_ok(ENG_CHAT_CHATML, src, user, 1, true);
    cr_assert_str_eq(out, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                          "trained by Hugging Face<|im_end|>\n"
                          "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    free(out);
    /* A given system message replaces the default. */
    const eng_chat_msg sys[2] = {{"system", "Be brief."}, {"user", "Hi"}};
    out = apply_ok(ENG_CHAT_CHATML, src, sys, 2, false);
    cr_assert_str_eq(out, "<|im_start|>system\nBe brief.<|im_end|>\n"
                          "<|im_start|>user\nHi<|im_end|>\n");
    free(out);
    /* Without the template source, ChatML has no default. */
    out = apply_ok(ENG_CHAT_CHATML, NULL, user, 1, true);
    cr_assert_str_eq(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    free(out);
    free(src);
}

Test(chat, smollm2_fixture_is_the_model_template)
{
    const char *model = getenv("KVSERVE_MODEL");
    FILE *probe = model ? fopen(model, "rb") : NULL;
    if (!probe)
        cr_skip_test("KVSERVE_MODEL not set or not readable");
    fclose(probe);
    char err[256] = "";
    eng_gguf *g = eng_gguf_open(model, err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    char *from_model = NULL;
    cr_assert_eq(eng_gguf_get_str(g, "tokenizer.chat_template", &from_model, err, sizeof err), 0,
                 "%s", err);
    char *fixture = read_file(FIXTURES "smollm2.jinja");
    cr_assert_str_eq(fixture, from_model);
    free(fixture);
    free(from_model);
    eng_gguf_close(g);
}

Test(chat, plain_fallback)
{
    cr_assert_eq(eng_chat_detect(NULL), ENG_CHAT_PLAIN);
    cr_assert_eq(eng_chat_detect("{{ messages[0]['content'] }}"), ENG_CHAT_PLAIN);
    const eng_chat_msg m[3] = {{"system", "Be nice."}, {"user", "Hi"}, {"assistant", "Hello"}};
    char *out = apply_ok(ENG_CHAT_PLAIN, NULL, m, 3, true);
    cr_assert_str_eq(out, "system: Be nice.\nuser: Hi\nassistant: Hello\nassistant:");
    free(out);
    out = apply_ok(ENG_CHAT_PLAIN, NULL, m, 2, false);
    cr_assert_str_eq(out, "system: Be nice.\nuser: Hi\n");
    free(out);
}

Test(chat, roles_are_validated)
{
    const eng_chat_msg bad[2] = {{"user", "Hi"}, {"narrator", "Once upon a time"}};
    for (int f = 0; f < ENG_CHAT_FORMAT_COUNT; f++)
        apply_fails((eng_chat_format)f, NULL, bad, 2, "'narrator'");
    const eng_chat_msg none[1] = {{NULL, "x"}};
    apply_fails(ENG_CHAT_CHATML, NULL, none, 1, "no role");
    const eng_chat_msg upper[1] = {{"User", "x"}};
    apply_fails(ENG_CHAT_LLAMA3, NULL, upper, 1, "'User'");
    apply_fails(ENG_CHAT_CHATML, NULL, bad, 0, "no messages");
    apply_fails((eng_chat_format)ENG_CHAT_FORMAT_COUNT, NULL, bad, 1, "unknown chat format");
}

Test(chat, null_content_is_empty)
{
    const eng_chat_msg m[2] = {{"user", "Hi"}, {"assistant", NULL}};
    char *out = apply_ok(ENG_CHAT_LLAMA3, NULL, m, 2, false);
    cr_assert_str_eq(out, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi"
                          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>");
    free(out);
}

Test(chat, tool_and_late_system_turns_where_formats_have_no_place)
{
    const eng_chat_msg tool[3] = {{"user", "Hi"}, {"assistant", "calling"}, {"tool", "42"}};
    const eng_chat_format no_tool[] = {ENG_CHAT_LLAMA2,    ENG_CHAT_MISTRAL,
                                       ENG_CHAT_MISTRAL_V1, ENG_CHAT_MISTRAL_V3,
                                       ENG_CHAT_MISTRAL_V3_TEKKEN, ENG_CHAT_MISTRAL_V7,
                                       ENG_CHAT_PHI3,      ENG_CHAT_GEMMA};
    for (size_t i = 0; i < sizeof no_tool / sizeof no_tool[0]; i++)
        apply_fails(no_tool[i], NULL, tool, 3, "'tool'");
    /* ChatML, Llama 3 and plain write the role as given. */
    char *out = apply_ok(ENG_CHAT_CHATML, NULL, tool, 3, false);
    cr_assert(strstr(out, "<|im_start|>tool\n42<|im_end|>\n"));
    free(out);
    const eng_chat_msg late[3] = {{"user", "Hi"}, {"assistant", "Hello"}, {"system", "Now terse."}};
    apply_fails(ENG_CHAT_LLAMA2, NULL, late, 3, "first message");
    apply_fails(ENG_CHAT_GEMMA, NULL, late, 3, "first message");
}

Test(chat, template_details_read_from_the_source)
{
    /* Gemma: 2 rejects a system turn, 3 (and no template) prefixes the first
     * user turn with it. */
    const eng_chat_msg m[2] = {{"system", "S"}, {"user", "U"}};
    char *gemma2 = read_file(FIXTURES "gemma2.jinja");
    apply_fails(ENG_CHAT_GEMMA, gemma2, m, 2, "not supported");
    char *out = apply_ok(ENG_CHAT_GEMMA, NULL, m, 2, true);
    cr_assert_str_eq(out, "<bos><start_of_turn>user\nS\n\nU<end_of_turn>\n<start_of_turn>model\n");
    free(out);
    free(gemma2);
    /* Phi-3: an empty system turn is skipped by the current template, kept by
     * one without that clause. */
    const eng_chat_msg empty[2] = {{"system", ""}, {"user", "U"}};
    out = apply_ok(ENG_CHAT_PHI3, NULL, empty, 2, true);
    cr_assert_str_eq(out, "<|user|>\nU<|end|>\n<|assistant|>\n");
    free(out);
    const char *older = "{% for message in messages %}{{'<|' + message['role'] + '|>' + '\\n' + "
                        "message['content'] + '<|end|>\\n' }}{% endfor %}<|user|>";
    out = apply_ok(ENG_CHAT_PHI3, older, empty, 2, false);
    cr_assert_str_eq(out, "<|system|>\n<|end|>\n<|user|>\nU<|end|>\n<|endoftext|>");
    free(out);
}

Test(chat, llama2_lone_system_message_renders_empty)
{
    const eng_chat_msg m[1] = {{"system", "S"}};
    char *out = apply_ok(ENG_CHAT_LLAMA2, NULL, m, 1, true);
    cr_assert_str_eq(out, "");
    free(out);
}

Test(chat, format_names_round_trip)
{
    for (int f = 0; f < ENG_CHAT_FORMAT_COUNT; f++) {
        const char *name = eng_chat_format_name((eng_chat_format)f);
        cr_assert(name && strcmp(name, "unknown") != 0);
        cr_assert_eq(eng_chat_format_from_name(name), f, "%s", name);
    }
    cr_assert_eq(eng_chat_format_from_name("jinja"), -1);
    cr_assert_eq(eng_chat_format_from_name(NULL), -1);
    cr_assert_str_eq(eng_chat_format_name((eng_chat_format)99), "unknown");
}

Test(chat, error_message_is_truncated_safely)
{
    const eng_chat_msg bad[1] = {{"a-very-long-role-name-that-does-not-fit", "x"}};
    char *out = NULL, err[16];
    memset(err, 'z', sizeof err);
    cr_assert_neq(eng_chat_apply(ENG_CHAT_CHATML, NULL, bad, 1, true, &out, err, sizeof err), 0);
    cr_assert_eq(strnlen(err, sizeof err), sizeof err - 1);
    cr_assert_neq(eng_chat_apply(ENG_CHAT_CHATML, NULL, bad, 1, true, &out, NULL, 0), 0);
}
