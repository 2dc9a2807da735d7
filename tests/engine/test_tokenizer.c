/* test_tokenizer.c: engine/tokenizer.c and its helper engine/unicode.c.
 *
 * References, none computed by kvserve:
 *   - llama.cpp's tokenizer test vectors ($KVSERVE_SHARED/data/tokenizer/
 *     ggml-vocab-*.gguf with .inp/.out), made with Hugging Face tokenizers:
 *     byte-level BPE (gpt-2, starcoder, deepseek-coder) and SentencePiece
 *     (llama-spm, phi-3);
 *   - SmolLM2 (KVSERVE_MODEL): ids from `tokenizers` rebuilt from the GGUF's
 *     vocabulary (tests/fixtures/tokenizer/make_smollm2_ids.py), including a
 *     64 KB prefix of WikiText-2 and a checksum of the whole file's ids;
 *   - tokenizer.json / vocab.json+merges.txt directories trained with
 *     `tokenizers` (make_hf_fixtures.py) and their ids;
 *   - pre-tokenizer splits from tokenizers' Oniguruma-based Split
 *     (make_regex_fixture.py) for the regex engine;
 *   - Unicode categories and UTF-8 rules checked against values from Python.
 * Round trips, incremental detokenization and error paths complete it. */
#include <criterion/criterion.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/gguf.h"
#include "engine/tokenizer.h"
#include "engine/unicode.h"

#define FIXTURES "tests/fixtures/tokenizer/"

/* ---- helpers ---------------------------------------------------------------- */

static const char *shared_dir(void) {
    const char *s = getenv("KVSERVE_SHARED");
    return s && *s ? s : "../shared";
}

static void model_path(char *buf, size_t n) {
    const char *m = getenv("KVSERVE_MODEL");
    if (m && *m) {
        snprintf(buf, n, "%s", m);
    } else {
        snprintf(buf, n, "%s/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf",
                 getenv("HOME") ? getenv("HOME") : ".");
    }
}

static char *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t) n + 1);
    cr_assert_not_null(b);
    cr_assert_eq(fread(b, 1, (size_t) n, f), (size_t) n);
    b[n] = '\0';
    fclose(f);
    *len = (size_t) n;
    return b;
}

typedef struct {
    eng_gguf *g;
    eng_tokenizer *t;
} loaded;

static loaded load_gguf(const char *path) {
    char err[512] = "";
    loaded l;
    l.g = eng_gguf_open(path, err, sizeof(err));
    cr_assert_not_null(l.g, "open %s: %s", path, err);
    l.t = eng_tokenizer_from_gguf(l.g, err, sizeof(err));
    cr_assert_not_null(l.t, "tokenizer %s: %s", path, err);
    return l;
}

static loaded load_vocab(const char *name) {
    char path[1024];
    snprintf(path, sizeof(path), "%s/data/tokenizer/%s", shared_dir(), name);
    return load_gguf(path);
}

static loaded load_smollm2(void) {
    char path[1024];
    model_path(path, sizeof(path));
    return load_gguf(path);
}

static void unload(loaded l) {
    eng_tokenizer_free(l.t);
    eng_gguf_close(l.g);
}

/* Tokenizes into a malloc'd array, checking the two-call contract. */
static int32_t *encode(const eng_tokenizer *t, const char *s, size_t len, bool bos, bool special,
                       int *n_out) {
    char err[256] = "";
    int n = eng_tokenize(t, s, len, bos, special, NULL, 0, err, sizeof(err));
    cr_assert_geq(n, 0, "tokenize: %s", err);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t) (n + 1));
    cr_assert_not_null(ids);
    int n2 = eng_tokenize(t, s, len, bos, special, ids, n + 1, err, sizeof(err));
    cr_assert_eq(n2, n);
    *n_out = n;
    return ids;
}

/* Is s[0, n) well-formed UTF-8? */
static bool valid_utf8(const char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        size_t cl;
        uint32_t cp = eng_utf8_decode(s + i, n - i, &cl);
        if (cp >= 0x110000) return false;
        i += cl;
    }
    return true;
}

/* Decodes ids with the incremental detokenizer; every chunk must be whole
 * UTF-8 characters. Returns a malloc'd NUL-terminated string. */
static char *decode(const eng_tokenizer *t, const int32_t *ids, int n, size_t *len) {
    size_t cap = (size_t) n * 300 + 16;
    char *out = malloc(cap);
    cr_assert_not_null(out);
    eng_detok d;
    eng_detok_init(&d);
    size_t m = 0;
    for (int i = 0; i < n; i++) {
        int k = eng_detok_push(&d, t, ids[i], out + m, (int) (cap - m));
        cr_assert(k >= 0);
        cr_assert(valid_utf8(out + m, (size_t) k), "token %d gave a partial character", ids[i]);
        m += (size_t) k;
    }
    m += (size_t) eng_detok_flush(&d, out + m, (int) (cap - m));
    out[m] = '\0';
    *len = m;
    return out;
}

static char *fmt_ids(const int32_t *ids, int n) {
    size_t cap = (size_t) n * 12 + 2;
    char *s = malloc(cap);
    size_t m = 0;
    s[0] = '\0';
    for (int i = 0; i < n; i++) m += (size_t) snprintf(s + m, cap - m, " %d", ids[i]);
    return s;
}

static json_t *load_json_fixture(const char *name) {
    json_error_t je;
    char path[512];
    snprintf(path, sizeof(path), FIXTURES "%s", name);
    json_t *j = json_load_file(path, 0, &je);
    cr_assert_not_null(j, "%s: %s", path, je.text);
    return j;
}

static void assert_ids_json(const int32_t *ids, int n, json_t *expect, const char *what) {
    size_t ne = json_array_size(expect);
    bool same = (size_t) n == ne;
    for (size_t i = 0; same && i < ne; i++) {
        same = ids[i] == (int32_t) json_integer_value(json_array_get(expect, i));
    }
    if (!same) {
        char *got = fmt_ids(ids, n);
        cr_assert_fail("%s: got%s (expected %zu ids)", what, got, ne);
    }
}

/* ---- llama.cpp vocabulary vectors ---------------------------------------------- */

/* Every input of <vocab>.inp (inputs end with "\n__ggml_vocab_test__\n")
 * must give the ids on the matching line of <vocab>.out, tokenized without
 * BOS and without special-token parsing; each must also decode back. */
static void check_vocab_file(const char *name) {
    loaded l = load_vocab(name);
    char path[1024];
    size_t n_inp, n_out;
    snprintf(path, sizeof(path), "%s/data/tokenizer/%s.inp", shared_dir(), name);
    char *inp = read_all(path, &n_inp);
    snprintf(path, sizeof(path), "%s/data/tokenizer/%s.out", shared_dir(), name);
    char *out = read_all(path, &n_out);
    const char *sep = "\n__ggml_vocab_test__\n";
    char *s = inp, *o = out;
    int cases = 0;
    for (char *e; (e = strstr(s, sep)) != NULL; s = e + strlen(sep)) {
        char *eol = strchr(o, '\n');
        cr_assert_not_null(eol, "%s: fewer output lines than inputs", name);
        *eol = '\0';
        int n;
        int32_t *ids = encode(l.t, s, (size_t) (e - s), false, false, &n);
        char *got = fmt_ids(ids, n);
        cr_expect_str_eq(got, o, "%s case %d [%.*s]", name, cases, (int) (e - s), s);
        size_t dlen;
        char *back = decode(l.t, ids, n, &dlen);
        cr_expect(dlen == (size_t) (e - s) && memcmp(back, s, dlen) == 0,
                  "%s case %d: decode gave [%s] for [%.*s]", name, cases, back, (int) (e - s), s);
        free(back);
        free(got);
        free(ids);
        o = eol + 1;
        cases++;
    }
    cr_assert_eq(cases, 46, "%s: %d cases", name, cases);
    cr_assert_eq(*o, '\0', "%s: more output lines than inputs", name);
    free(inp);
    free(out);
    unload(l);
}

Test(vocab, gpt2) { check_vocab_file("ggml-vocab-gpt-2.gguf"); }
Test(vocab, starcoder) { check_vocab_file("ggml-vocab-starcoder.gguf"); }
Test(vocab, deepseek_coder) { check_vocab_file("ggml-vocab-deepseek-coder.gguf"); }
Test(vocab, llama_spm) { check_vocab_file("ggml-vocab-llama-spm.gguf"); }
Test(vocab, phi3) { check_vocab_file("ggml-vocab-phi-3.gguf"); }

Test(vocab, metadata) {
    loaded l = load_vocab("ggml-vocab-llama-spm.gguf");
    cr_assert_eq(eng_tokenizer_n_vocab(l.t), 32000);
    cr_assert_eq(eng_tokenizer_bos(l.t), 1);
    cr_assert_eq(eng_tokenizer_eos(l.t), 2);
    cr_assert(eng_tokenizer_add_bos(l.t));
    cr_assert(eng_tokenizer_is_eog(l.t, 2));
    cr_assert(!eng_tokenizer_is_eog(l.t, 1));
    cr_assert_eq(eng_tokenizer_find(l.t, "<0x0A>"), 13);
    cr_assert_null(eng_tokenizer_chat_template(l.t));
    /* BOS is prepended on request; SentencePiece's space prefix still applies */
    int n, n2;
    int32_t *a = encode(l.t, "Hello", 5, true, false, &n);
    int32_t *b = encode(l.t, "Hello", 5, false, false, &n2);
    cr_assert_eq(n, n2 + 1);
    cr_assert_eq(a[0], 1);
    cr_assert_arr_eq(a + 1, b, sizeof(int32_t) * (size_t) n2);
    /* decoding with the BOS in front still takes the prefix space back */
    size_t dlen;
    char *s = decode(l.t, a, n, &dlen);
    cr_assert_str_eq(s, "Hello");
    free(s);
    free(a);
    free(b);
    unload(l);

    l = load_vocab("ggml-vocab-phi-3.gguf");
    int32_t end = eng_tokenizer_find(l.t, "<|end|>");
    cr_assert_eq(end, 32007);
    cr_assert(eng_tokenizer_is_eog(l.t, end));
    cr_assert(eng_tokenizer_is_eog(l.t, eng_tokenizer_eos(l.t)));
    cr_assert(eng_tokenizer_chat_template(l.t) != NULL);
    /* Phi-3's added tokens swallow the whitespace after them (llama.cpp rule) */
    a = encode(l.t, "<|user|>\nHi<|end|>", 18, false, true, &n);
    b = encode(l.t, "Hi", 2, false, false, &n2);
    cr_assert_eq(n, n2 + 2);
    cr_assert_eq(a[0], 32010);
    cr_assert_arr_eq(a + 1, b, sizeof(int32_t) * (size_t) n2);
    cr_assert_eq(a[n - 1], end);
    free(a);
    free(b);
    unload(l);
}

/* ---- SmolLM2 ----------------------------------------------------------------------- */

Test(smollm2, metadata) {
    loaded l = load_smollm2();
    cr_assert_eq(eng_tokenizer_n_vocab(l.t), 49152);
    cr_assert_eq(eng_tokenizer_bos(l.t), 1);
    cr_assert_eq(eng_tokenizer_eos(l.t), 2);
    cr_assert(!eng_tokenizer_add_bos(l.t));
    cr_assert_eq(eng_tokenizer_find(l.t, "<|im_start|>"), 1);
    cr_assert_eq(eng_tokenizer_find(l.t, "<|im_end|>"), 2);
    cr_assert_eq(eng_tokenizer_find(l.t, "no such token text"), -1);
    cr_assert(eng_tokenizer_is_eog(l.t, 2));      /* <|im_end|> */
    cr_assert(eng_tokenizer_is_eog(l.t, 0));      /* <|endoftext|> */
    cr_assert(!eng_tokenizer_is_eog(l.t, 1));
    cr_assert(!eng_tokenizer_is_eog(l.t, 905));
    cr_assert(!eng_tokenizer_is_eog(l.t, -1));
    cr_assert(!eng_tokenizer_is_eog(l.t, 49152));
    const char *tmpl = eng_tokenizer_chat_template(l.t);
    cr_assert(tmpl && strstr(tmpl, "<|im_start|>"));
    char buf[32];
    cr_assert_eq(eng_token_to_bytes(l.t, 2, true, buf, sizeof(buf)), 10);
    cr_assert(memcmp(buf, "<|im_end|>", 10) == 0);
    cr_assert_eq(eng_token_to_bytes(l.t, 2, false, buf, sizeof(buf)), 0);
    cr_assert_eq(eng_token_to_bytes(l.t, 2, true, buf, 4), 10);   /* needed size */
    cr_assert_eq(eng_token_to_bytes(l.t, 905, false, buf, sizeof(buf)), 6);
    cr_assert(memcmp(buf, " world", 6) == 0);
    cr_assert_eq(eng_token_to_bytes(l.t, 99999, true, buf, sizeof(buf)), 0);
    unload(l);
}

Test(smollm2, reference_ids) {
    loaded l = load_smollm2();
    json_t *fx = load_json_fixture("smollm2_ids.json");
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(fx, "cases"), i, c) {
        const char *text = json_string_value(json_object_get(c, "text"));
        size_t len = json_string_length(json_object_get(c, "text"));
        int n;
        int32_t *ids = encode(l.t, text, len, false, false, &n);
        char what[200];
        snprintf(what, sizeof(what), "plain [%.60s]", text);
        assert_ids_json(ids, n, json_object_get(c, "ids"), what);
        size_t dlen;
        char *back = decode(l.t, ids, n, &dlen);
        cr_expect(dlen == len && memcmp(back, text, len) == 0, "round trip [%s] -> [%s]", text, back);
        free(back);
        free(ids);
        ids = encode(l.t, text, len, false, true, &n);
        snprintf(what, sizeof(what), "special [%.60s]", text);
        assert_ids_json(ids, n, json_object_get(c, "ids_special"), what);
        free(ids);
    }
    json_decref(fx);
    unload(l);
}

Test(smollm2, special_tokens) {
    loaded l = load_smollm2();
    const char *chat = "<|im_start|>user\nHi<|im_end|>";
    int n, nm;
    int32_t *ids = encode(l.t, chat, strlen(chat), false, true, &n);
    int32_t *mid = encode(l.t, "user\nHi", 7, false, false, &nm);
    cr_assert_eq(n, nm + 2);
    cr_assert_eq(ids[0], 1);
    cr_assert_eq(ids[n - 1], 2);
    cr_assert_arr_eq(ids + 1, mid, sizeof(int32_t) * (size_t) nm);
    free(ids);
    /* without parse_special the markers are ordinary text */
    ids = encode(l.t, chat, strlen(chat), false, false, &n);
    cr_assert_gt(n, nm + 2);
    for (int i = 0; i < n; i++) cr_assert(ids[i] != 1 && ids[i] != 2);
    free(ids);
    /* add_bos prepends <|im_start|> (SmolLM2's BOS) when asked */
    ids = encode(l.t, "Hi", 2, true, false, &n);
    cr_assert_eq(ids[0], 1);
    free(ids);
    free(mid);
    unload(l);
}

Test(smollm2, output_capacity) {
    loaded l = load_smollm2();
    const char *s = "The capital of France is Paris. 12345";
    char err[128];
    int32_t full[64], part[4] = {-7, -7, -7, -7};
    int n = eng_tokenize(l.t, s, strlen(s), false, false, full, 64, err, sizeof(err));
    cr_assert_gt(n, 4);
    int n2 = eng_tokenize(l.t, s, strlen(s), false, false, part, 3, err, sizeof(err));
    cr_assert_eq(n2, n);
    cr_assert_arr_eq(part, full, 3 * sizeof(int32_t));
    cr_assert_eq(part[3], -7, "wrote past cap");
    cr_assert_eq(eng_tokenize(l.t, NULL, 5, false, false, full, 64, err, sizeof(err)), -1);
    cr_assert(strlen(err) > 0);
    cr_assert_eq(eng_tokenize(l.t, "", 0, false, false, full, 64, err, sizeof(err)), 0);
    unload(l);
}

static uint64_t fnv1a_ids(const int32_t *ids, int n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int i = 0; i < n; i++) {
        uint32_t v = (uint32_t) ids[i];
        for (int k = 0; k < 4; k++) {
            h ^= (v >> (8 * k)) & 0xff;
            h *= 0x100000001b3ull;
        }
    }
    return h;
}

Test(smollm2, wikitext) {
    loaded l = load_smollm2();
    json_t *fx = load_json_fixture("smollm2_ids.json");
    json_t *w = json_object_get(fx, "wikitext2_test");
    char path[1024];
    snprintf(path, sizeof(path), "%s/data/text/wikitext2-test.txt", shared_dir());
    size_t len;
    char *text = read_all(path, &len);
    size_t prefix = (size_t) json_integer_value(json_object_get(w, "prefix_bytes"));
    cr_assert(prefix > 0 && prefix <= len);
    int n;
    int32_t *ids = encode(l.t, text, prefix, false, false, &n);
    assert_ids_json(ids, n, json_object_get(w, "prefix_ids"), "wikitext2 prefix");
    free(ids);
    ids = encode(l.t, text, len, false, false, &n);
    cr_assert_eq(n, json_integer_value(json_object_get(w, "n_ids")));
    char hex[32];
    snprintf(hex, sizeof(hex), "%016llx", (unsigned long long) fnv1a_ids(ids, n));
    cr_assert_str_eq(hex, json_string_value(json_object_get(w, "fnv1a64_ids_le32")));
    size_t dlen;
    char *back = decode(l.t, ids, n, &dlen);
    cr_assert(dlen == len && memcmp(back, text, len) == 0, "wikitext round trip differs");
    free(back);
    free(ids);
    free(text);
    json_decref(fx);
    unload(l);
}

/* ---- incremental detokenization --------------------------------------------------- */

/* GPT-2's stand-in character for byte b, as UTF-8. */
static void gpt2_byte_char(int b, char out[8]) {
    int n = 0, cp = b;
    bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    if (!printable) {
        for (int k = 0; k < b; k++) {
            bool pk = (k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || k >= 0xAE;
            if (!pk) n++;
        }
        cp = 256 + n;
    }
    int len = eng_utf8_encode((uint32_t) cp, out);
    out[len] = '\0';
}

static int32_t gpt2_byte_token(const eng_tokenizer *t, int b) {
    char s[8];
    gpt2_byte_char(b, s);
    int32_t id = eng_tokenizer_find(t, s);
    cr_assert_geq(id, 0, "no token for byte %02x", b);
    return id;
}

Test(detok, multibyte_split_across_tokens) {
    loaded l = load_vocab("ggml-vocab-gpt-2.gguf");
    char out[64];
    eng_detok d;
    eng_detok_init(&d);
    const unsigned char llama[4] = {0xF0, 0x9F, 0xA6, 0x99};   /* U+1F999 */
    for (int k = 0; k < 3; k++) {
        cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, llama[k]), out, sizeof(out)), 0);
    }
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, llama[3]), out, sizeof(out)), 4);
    cr_assert(memcmp(out, llama, 4) == 0);
    cr_assert_eq(eng_detok_flush(&d, out, sizeof(out)), 0);

    /* a stray continuation byte and an impossible byte: one U+FFFD each */
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 0x80), out, sizeof(out)), 3);
    cr_assert(memcmp(out, "\xEF\xBF\xBD", 3) == 0);
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 0xFF), out, sizeof(out)), 3);
    /* a lead byte followed by ASCII: U+FFFD, then the ASCII */
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 0xE2), out, sizeof(out)), 0);
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 'A'), out, sizeof(out)), 4);
    cr_assert(memcmp(out, "\xEF\xBF\xBD" "A", 4) == 0);
    /* a surrogate (ED A0..) is ill-formed at its second byte */
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 0xED), out, sizeof(out)), 0);
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 0xA0), out, sizeof(out)), 6);
    /* an unfinished character at the end flushes as U+FFFD */
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 0xF0), out, sizeof(out)), 0);
    cr_assert_eq(eng_detok_push(&d, l.t, gpt2_byte_token(l.t, 0x9F), out, sizeof(out)), 0);
    cr_assert_eq(eng_detok_flush(&d, out, sizeof(out)), 3);
    cr_assert(memcmp(out, "\xEF\xBF\xBD", 3) == 0);
    cr_assert_eq(eng_detok_flush(&d, out, sizeof(out)), 0);
    unload(l);
}

/* Real text whose tokens cut characters: each push yields whole characters
 * and at least one push had to hold bytes back. */
static void check_streaming(const char *vocab, const char *text) {
    loaded l = load_vocab(vocab);
    int n;
    int32_t *ids = encode(l.t, text, strlen(text), false, false, &n);
    eng_detok d;
    eng_detok_init(&d);
    char out[4096];
    size_t m = 0;
    int held = 0;
    for (int i = 0; i < n; i++) {
        char piece[256];
        int raw = eng_token_to_bytes(l.t, ids[i], false, piece, sizeof(piece));
        int k = eng_detok_push(&d, l.t, ids[i], out + m, (int) (sizeof(out) - m));
        cr_assert(valid_utf8(out + m, (size_t) k));
        /* SentencePiece drops the first piece's leading space */
        if (k < raw - (i == 0 && piece[0] == ' ' ? 1 : 0)) held++;
        m += (size_t) k;
    }
    m += (size_t) eng_detok_flush(&d, out + m, (int) (sizeof(out) - m));
    cr_assert_gt(held, 0, "%s: no token split a character", vocab);
    cr_assert(m == strlen(text) && memcmp(out, text, m) == 0, "%s: [%.*s]", vocab, (int) m, out);
    free(ids);
    unload(l);
}

Test(detok, streaming_gpt2) {
    check_streaming("ggml-vocab-gpt-2.gguf", "\xF0\x9F\xA6\x99 llamas \xE1\x9E\x80\xE1\x9E\xB6 and "
                    "\xE6\x97\xA5\xE6\x9C\xAC\xE8\xAA\x9E \xF0\x9F\x98\x81!");
}

Test(detok, streaming_spm) {
    /* emoji have no piece in Llama's vocabulary: they fall back to <0xXX> */
    check_streaming("ggml-vocab-llama-spm.gguf", "Hello \xF0\x9F\xA6\x99 world \xF0\x9F\x98\x81");
}

Test(detok, small_output_buffer) {
    loaded l = load_smollm2();
    eng_detok d;
    eng_detok_init(&d);
    char out[4];
    /* " world" does not fit in 4 bytes: nothing partial is written */
    int k = eng_detok_push(&d, l.t, 905, out, sizeof(out));
    cr_assert_leq(k, 4);
    cr_assert(valid_utf8(out, (size_t) k));
    unload(l);
}

/* ---- loaders: Hugging Face directories and bad files -------------------------------- */

static void check_hf_dir(const char *name, bool prefix_space) {
    char dir[256], err[512] = "";
    snprintf(dir, sizeof(dir), FIXTURES "%s", name);
    eng_tokenizer *t = eng_tokenizer_from_hf_dir(dir, err, sizeof(err));
    cr_assert_not_null(t, "%s: %s", dir, err);
    json_t *fx = load_json_fixture("hf_expected.json");
    json_t *cases = json_object_get(fx, name);
    cr_assert_gt(json_array_size(cases), 5);
    size_t i;
    json_t *c;
    json_array_foreach(cases, i, c) {
        const char *text = json_string_value(json_object_get(c, "text"));
        size_t len = json_string_length(json_object_get(c, "text"));
        int n;
        int32_t *ids = encode(t, text, len, false, true, &n);
        char what[200];
        snprintf(what, sizeof(what), "%s [%.60s]", name, text);
        assert_ids_json(ids, n, json_object_get(c, "ids"), what);
        if (!strstr(text, "<|")) {
            /* ByteLevel's add_prefix_space adds a space that decoding keeps */
            bool extra = prefix_space && len > 0 && text[0] != ' ';
            size_t dlen;
            char *back = decode(t, ids, n, &dlen);
            cr_expect(dlen == len + extra && memcmp(back + extra, text, len) == 0 &&
                      (!extra || back[0] == ' '), "%s: round trip [%s] -> [%s]", name, text, back);
            free(back);
        }
        free(ids);
    }
    json_decref(fx);
    eng_tokenizer_free(t);
}

Test(hf, bytelevel_tokenizer_json) {
    check_hf_dir("hf_bytelevel", false);
    char err[256];
    eng_tokenizer *t = eng_tokenizer_from_hf_dir(FIXTURES "hf_bytelevel", err, sizeof(err));
    cr_assert_not_null(t);
    /* tokenizer_config.json: BOS and EOS by text, add_bos_token, chat_template */
    cr_assert_eq(eng_tokenizer_bos(t), eng_tokenizer_find(t, "<|im_start|>"));
    cr_assert_eq(eng_tokenizer_eos(t), eng_tokenizer_find(t, "<|im_end|>"));
    cr_assert(!eng_tokenizer_add_bos(t));
    cr_assert(eng_tokenizer_is_eog(t, eng_tokenizer_find(t, "<|im_end|>")));
    cr_assert(eng_tokenizer_is_eog(t, eng_tokenizer_find(t, "<|endoftext|>")));
    cr_assert(eng_tokenizer_chat_template(t) && strstr(eng_tokenizer_chat_template(t), "m['role']"));
    eng_tokenizer_free(t);
}

Test(hf, gpt2_vocab_and_merges) { check_hf_dir("hf_gpt2files", false); }

Test(hf, bytelevel_without_regex) { check_hf_dir("hf_bytelevel_noregex", true); }

Test(hf, split_regex_string_merges) {
    check_hf_dir("hf_split_regex", false);
    char err[256];
    eng_tokenizer *t = eng_tokenizer_from_hf_dir(FIXTURES "hf_split_regex", err, sizeof(err));
    cr_assert_not_null(t);
    /* the TemplateProcessing post-processor names the BOS */
    cr_assert_eq(eng_tokenizer_bos(t), eng_tokenizer_find(t, "<|begin_of_text|>"));
    cr_assert(eng_tokenizer_add_bos(t));
    cr_assert(eng_tokenizer_is_eog(t, eng_tokenizer_find(t, "<|eot_id|>")));
    eng_tokenizer_free(t);
}

Test(hf, sentencepiece_style_bpe) {
    check_hf_dir("hf_spm_bpe", false);
    char err[256];
    eng_tokenizer *t = eng_tokenizer_from_hf_dir(FIXTURES "hf_spm_bpe", err, sizeof(err));
    cr_assert_not_null(t);
    cr_assert_eq(eng_tokenizer_bos(t), 1);
    cr_assert_eq(eng_tokenizer_eos(t), 2);
    cr_assert(eng_tokenizer_add_bos(t));
    eng_tokenizer_free(t);
}

Test(hf, missing_directory) {
    char err[256] = "";
    cr_assert_null(eng_tokenizer_from_hf_dir("/nonexistent/dir", err, sizeof(err)));
    cr_assert(strstr(err, "/nonexistent/dir") != NULL, "message: %s", err);
}

/* A GGUF vocabulary written by make_gguf_fixtures.py into $KVSERVE_FIXTURES
 * (make fixtures; make unit sets the variable). */
static const char *gen_fixture(const char *name, char *path, size_t len) {
    const char *dir = getenv("KVSERVE_FIXTURES");
    cr_assert_not_null(dir, "KVSERVE_FIXTURES is not set (make unit sets it; make fixtures writes %s)", name);
    snprintf(path, len, "%s/%s", dir, name);
    return path;
}

Test(gguf_loader, refuses_unknown_pre_tokenizer) {
    char err[512] = "", path[1024];
    eng_gguf *g = eng_gguf_open(gen_fixture("tiny_badpre.gguf", path, sizeof path), err, sizeof(err));
    cr_assert_not_null(g, "%s", err);
    cr_assert_null(eng_tokenizer_from_gguf(g, err, sizeof(err)));
    cr_assert(strstr(err, "no-such-pre") && strstr(err, "tokenizer.ggml.pre"), "message: %s", err);
    eng_gguf_close(g);
}

Test(gguf_loader, rejects_wrong_token_type) {
    char err[512] = "", path[1024];
    eng_gguf *g = eng_gguf_open(gen_fixture("tiny_badtokens.gguf", path, sizeof path), err, sizeof(err));
    cr_assert_not_null(g, "%s", err);
    cr_assert_null(eng_tokenizer_from_gguf(g, err, sizeof(err)));
    cr_assert(strstr(err, "tokenizer.ggml.tokens") && strstr(err, "string"), "message: %s", err);
    eng_gguf_close(g);
}

/* tokens a, b, c, ab, bc, abc with merges (b c), (a b): merging gives a|bc,
 * while llama-bpe (ignore_merges) takes the whole word "abc" */
Test(gguf_loader, ignore_merges_follows_pre_tokenizer) {
    char path[1024];
    loaded l = load_gguf(gen_fixture("tiny_gpt2.gguf", path, sizeof path));
    int n;
    int32_t *ids = encode(l.t, "abc", 3, false, false, &n);
    cr_assert_eq(n, 2);
    cr_assert_eq(ids[0], 0);
    cr_assert_eq(ids[1], 4);
    cr_assert(!eng_tokenizer_add_bos(l.t));
    cr_assert_eq(eng_tokenizer_eos(l.t), -1);   /* out-of-range id ignored */
    free(ids);
    unload(l);
    l = load_gguf(gen_fixture("tiny_llama_bpe.gguf", path, sizeof path));
    ids = encode(l.t, "abc", 3, false, false, &n);
    cr_assert_eq(n, 1);
    cr_assert_eq(ids[0], 5);
    cr_assert(eng_tokenizer_add_bos(l.t));
    cr_assert_eq(eng_tokenizer_bos(l.t), 6);
    free(ids);
    unload(l);
}

/* A GGUF v3 file with only tokenizer metadata: the 256 byte-level
 * characters as tokens (so any text round-trips), no merges, the given
 * tokenizer.ggml.pre. Written to a temporary file; returns its path. */
typedef struct {
    char *p;
    size_t n, cap;
} wbuf;

static void wput(wbuf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 256;
        b->p = realloc(b->p, b->cap);
        cr_assert_not_null(b->p);
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void wstr(wbuf *b, const char *s, size_t n) {
    uint64_t len = n;
    wput(b, &len, 8);
    wput(b, s, n);
}

static void wkey(wbuf *b, const char *key, uint32_t type) {
    wstr(b, key, strlen(key));
    wput(b, &type, 4);
}

static void write_byte_vocab_gguf(const char *path, const char *pre) {
    wbuf b = {0};
    uint32_t version = 3;
    uint64_t n_tensors = 0, n_kv = 4;
    wput(&b, "GGUF", 4);
    wput(&b, &version, 4);
    wput(&b, &n_tensors, 8);
    wput(&b, &n_kv, 8);
    wkey(&b, "tokenizer.ggml.model", 8);
    wstr(&b, "gpt2", 4);
    wkey(&b, "tokenizer.ggml.pre", 8);
    wstr(&b, pre, strlen(pre));
    wkey(&b, "tokenizer.ggml.tokens", 9);
    uint32_t elem = 8;
    uint64_t count = 256;
    wput(&b, &elem, 4);
    wput(&b, &count, 8);
    for (int c = 0; c < 256; c++) {
        char s[8];
        gpt2_byte_char(c, s);
        wstr(&b, s, strlen(s));
    }
    wkey(&b, "tokenizer.ggml.merges", 9);
    count = 0;
    wput(&b, &elem, 4);
    wput(&b, &count, 8);
    while (b.n % 32) wput(&b, "", 1);
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f);
    cr_assert_eq(fwrite(b.p, 1, b.n, f), b.n);
    fclose(f);
    free(b.p);
}

/* Every pre-tokenizer name kvserve accepts compiles its patterns and splits
 * awkward text into pieces that decode back to it. */
Test(gguf_loader, every_known_pre_tokenizer) {
    static const char *const names[] = {
        "default", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
        "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4", "deepseek-llm",
        "deepseek-coder", "deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4", "falcon", "gpt2",
        "gpt-2", "mpt", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
        "a.x-4.0", "mellum", "modern-bert", "olmo", "jais", "trillion", "granite-docling", "exaone4",
        "jina-v1-en", "jina-v2-code", "roberta-bpe", "starcoder", "refact", "command-r", "smollm",
        "codeshell", "exaone", "minerva-7b", "mellum2", "qwen2", "deepseek-r1-qwen", "kormo",
        "f2llmv2", "stablelm2", "hunyuan", "megrez", "solar-open", "grok-2", "qwen35", "poro-chat",
        "bloom", "gpt3-finnish", "viking", "tekken", "gpt-4o", "llama4", "kanana2", "talkie",
        "minimax-m2", "seed-coder", "bailingmoe", "bailingmoe2", "llada-moe", "exaone-moe",
        "minicpm5", "ufakzeka", "laguna",
    };
    const char *text = "Hello, World! It's 2024 -- I'M here.\n\n  \tcaf\xC3\xA9 \xE6\x97\xA5\xE6\x9C\xAC "
                       "\xF0\x9F\xA6\x99 x+=1; \xD9\xA1\xD9\xA2 end  ";
    char path[] = "/tmp/kvserve-test-tok-XXXXXX";
    int fd = mkstemp(path);
    cr_assert_geq(fd, 0);
    close(fd);
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        write_byte_vocab_gguf(path, names[i]);
        char err[512] = "";
        eng_gguf *g = eng_gguf_open(path, err, sizeof(err));
        cr_assert_not_null(g, "%s: %s", names[i], err);
        eng_tokenizer *t = eng_tokenizer_from_gguf(g, err, sizeof(err));
        cr_assert_not_null(t, "pre %s: %s", names[i], err);
        int n;
        int32_t *ids = encode(t, text, strlen(text), false, false, &n);
        cr_assert_eq(n, (int) strlen(text), "pre %s: one token per byte expected", names[i]);
        size_t dlen;
        char *back = decode(t, ids, n, &dlen);
        cr_assert_str_eq(back, text, "pre %s", names[i]);
        free(back);
        free(ids);
        eng_tokenizer_free(t);
        eng_gguf_close(g);
    }
    unlink(path);
}

/* ---- unicode.c ----------------------------------------------------------------------- */

Test(unicode, categories) {
    /* values from Python's unicodedata.category */
    static const struct { uint32_t cp; int cat; } known[] = {
        {'A', ENG_UCAT_LU}, {'z', ENG_UCAT_LL}, {'7', ENG_UCAT_ND}, {' ', ENG_UCAT_ZS},
        {'\n', ENG_UCAT_CC}, {'_', ENG_UCAT_PC}, {'$', ENG_UCAT_SC}, {'+', ENG_UCAT_SM},
        {0x01C5, ENG_UCAT_LT}, {0x02B0, ENG_UCAT_LM}, {0x4E00, ENG_UCAT_LO}, {0x0301, ENG_UCAT_MN},
        {0x0903, ENG_UCAT_MC}, {0x20DD, ENG_UCAT_ME}, {0x2160, ENG_UCAT_NL}, {0x00BD, ENG_UCAT_NO},
        {0x2014, ENG_UCAT_PD}, {0x00AB, ENG_UCAT_PI}, {0x00BB, ENG_UCAT_PF}, {0x3001, ENG_UCAT_PO},
        {0x1F916, ENG_UCAT_SO}, {0x02C2, ENG_UCAT_SK}, {0x2028, ENG_UCAT_ZL}, {0x2029, ENG_UCAT_ZP},
        {0x200D, ENG_UCAT_CF}, {0xD800, ENG_UCAT_CS}, {0xE000, ENG_UCAT_CO}, {0x0378, ENG_UCAT_CN},
        {0x10FFFF, ENG_UCAT_CN}, {0x1D400, ENG_UCAT_LU}, {0x20000, ENG_UCAT_LO},
    };
    for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++) {
        cr_assert_eq(eng_unicode_category(known[i].cp), known[i].cat, "U+%04X", known[i].cp);
    }
    cr_assert(eng_unicode_is_space(0x3000) && eng_unicode_is_space(0x85) && eng_unicode_is_space('\t'));
    cr_assert(!eng_unicode_is_space(0x200B) && !eng_unicode_is_space('x') && !eng_unicode_is_space(0x1C));
    cr_assert_str_eq(eng_unicode_version, "14.0.0");
}

Test(unicode, utf8_decode) {
    size_t n;
    cr_assert_eq(eng_utf8_decode("\xC3\xA9", 2, &n), 0xE9);
    cr_assert_eq(n, 2);
    cr_assert_eq(eng_utf8_decode("\xF0\x9F\xA6\x99", 4, &n), 0x1F999);
    cr_assert_eq(n, 4);
    /* overlong, surrogate, above U+10FFFF, truncated, lone continuation */
    static const char *const bad[] = {"\xC0\x80", "\xE0\x80\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80",
                                      "\xE2\x82", "\x80", "\xFF"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint32_t cp = eng_utf8_decode(bad[i], strlen(bad[i]), &n);
        cr_assert_eq(cp, ENG_UTF8_BAD_BASE + (unsigned char) bad[i][0], "case %zu", i);
        cr_assert_eq(n, 1);
    }
    char buf[4];
    cr_assert_eq(eng_utf8_encode(0x20AC, buf), 3);
    cr_assert(memcmp(buf, "\xE2\x82\xAC", 3) == 0);
}

Test(unicode, regex_splits_match_oniguruma) {
    json_t *fx = load_json_fixture("regex_splits.json");
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(fx, "cases"), i, c) {
        const char *name = json_string_value(json_object_get(c, "name"));
        const char *text = json_string_value(json_object_get(c, "text"));
        size_t len = strlen(text);
        uint32_t *cps = malloc((len + 1) * sizeof(uint32_t));
        uint32_t *off = malloc((len + 1) * sizeof(uint32_t));
        uint32_t n = 0;
        for (size_t k = 0; k < len;) {
            size_t cl;
            cps[n] = eng_utf8_decode(text + k, len - k, &cl);
            off[n++] = (uint32_t) k;
            k += cl;
        }
        off[n] = (uint32_t) len;
        eng_spans a = {0}, b = {0};
        eng_spans_push(&a, 0, n);
        size_t p;
        json_t *pat;
        json_array_foreach(json_object_get(c, "patterns"), p, pat) {
            char err[256];
            eng_uregex *re = eng_uregex_compile(json_string_value(pat), err, sizeof(err));
            cr_assert_not_null(re, "%s: %s", name, err);
            b.n = 0;
            cr_assert_eq(eng_uregex_split(re, cps, &a, &b, false), 0);
            eng_uregex_free(re);
            eng_spans t = a;
            a = b;
            b = t;
        }
        json_t *pieces = json_object_get(c, "pieces");
        bool same = a.n == json_array_size(pieces);
        for (size_t k = 0; same && k < a.n; k++) {
            json_t *e = json_array_get(pieces, k);
            size_t s0 = off[a.v[k].start], s1 = off[a.v[k].end];
            same = json_string_length(e) == s1 - s0 && memcmp(json_string_value(e), text + s0, s1 - s0) == 0;
        }
        if (!same) {
            char got[4096];
            size_t m = 0;
            for (size_t k = 0; k < a.n && m < sizeof(got) - 64; k++) {
                size_t s0 = off[a.v[k].start], s1 = off[a.v[k].end];
                m += (size_t) snprintf(got + m, sizeof(got) - m, "[%.*s]", (int) (s1 - s0), text + s0);
            }
            cr_assert_fail("%s on [%s]: got %s", name, text, got);
        }
        free(a.v);
        free(b.v);
        free(cps);
        free(off);
    }
    json_decref(fx);
}

Test(unicode, regex_errors_and_linear_time) {
    char err[256];
    static const char *const bad[] = {"(a", "a)", "[abc", "\\p{Nope}", "*a", "a{3,1}", "(?<x>a)",
                                      "[[:alpha:]]", "(?=a+)b"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        cr_assert_null(eng_uregex_compile(bad[i], err, sizeof(err)), "accepted %s", bad[i]);
        cr_assert(strlen(err) > 0);
    }
    /* \s+$ over a long run of spaces that does not reach the end: a naive
     * backtracker is quadratic here; the memo keeps it linear */
    eng_uregex *re = eng_uregex_compile("\\s+$", err, sizeof(err));
    cr_assert_not_null(re, "%s", err);
    const uint32_t n = 200000;
    uint32_t *cps = malloc((n + 1) * sizeof(uint32_t));
    for (uint32_t k = 0; k < n; k++) cps[k] = ' ';
    cps[n] = 'x';
    eng_spans in = {0}, out = {0};
    eng_spans_push(&in, 0, n + 1);
    cr_assert_eq(eng_uregex_split(re, cps, &in, &out, false), 0);
    cr_assert_eq(out.n, 1);   /* no match: the whole span is one gap */
    eng_uregex_free(re);
    free(in.v);
    free(out.v);
    free(cps);
}
