/* test_gguf.c: engine/gguf.c (the GGUF reader) and engine/model_gguf.c (the
 * GGUF model loader).
 *
 * A small GGUF writer lives here: it builds files with every metadata type
 * (nested arrays included), several tensors of several types and alignments,
 * which the reader must give back value for value. A file written by gguf-py
 * (pywriter.gguf in $KVSERVE_FIXTURES, from gen_gguf_fixture.py) checks the
 * reader against the reference writer. Robustness: every truncation of a
 * valid file, targeted corruption of each header field, and random byte
 * flips must fail with a message and never crash (the suite runs under ASan
 * and UBSan). The real SmolLM2 file (KVSERVE_MODEL) is checked against facts
 * read with gguf-py's GGUFReader. */
#include <criterion/criterion.h>

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tensor.h"
#include "engine/tokenizer.h"

#define FIXTURES "tests/fixtures/gguf/"

/* ---- a growing byte buffer and a GGUF writer ------------------------------ */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        cr_assert_not_null(b->p);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, src, n);
    b->n += n;
}

static void put_u8(buf *b, uint8_t v) { put(b, &v, 1); }
static void put_u16(buf *b, uint16_t v) { put(b, &v, 2); }
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_f32(buf *b, float v) { put(b, &v, 4); }
static void put_f64(buf *b, double v) { put(b, &v, 8); }
static void put_strn(buf *b, const char *s, size_t n) { put_u64(b, n); put(b, s, n); }
static void put_str(buf *b, const char *s) { put_strn(b, s, strlen(s)); }
static void put_zeros(buf *b, size_t n) {
    static const uint8_t z[64];
    while (n) {
        size_t k = n < sizeof z ? n : sizeof z;
        put(b, z, k);
        n -= k;
    }
}

typedef struct {
    buf kv, info, data;
    uint64_t n_kv, n_tensors;
    uint32_t alignment;  /* used to place tensor data; the key is written separately */
} gw;

/* Starts a key-value; the caller writes the value into w->kv. Returns the
 * offset of the value type field inside w->kv. */
static size_t gw_key(gw *w, const char *key, eng_gguf_vtype type) {
    put_str(&w->kv, key);
    size_t at = w->kv.n;
    put_u32(&w->kv, (uint32_t)type);
    w->n_kv++;
    return at;
}

/* Starts an array key-value: returns the offset of its element type field. */
static size_t gw_arr(gw *w, const char *key, eng_gguf_vtype et, uint64_t n) {
    gw_key(w, key, ENG_GGUF_ARRAY);
    size_t at = w->kv.n;
    put_u32(&w->kv, (uint32_t)et);
    put_u64(&w->kv, n);
    return at;
}

/* Adds a tensor; returns the offset of its n_dims field inside w->info. */
static size_t gw_tensor(gw *w, const char *name, uint32_t n_dims, const int64_t *ne, uint32_t type,
                        const void *data, size_t nbytes) {
    uint32_t a = w->alignment ? w->alignment : 32;
    put_zeros(&w->data, (a - w->data.n % a) % a);
    put_str(&w->info, name);
    size_t at = w->info.n;
    put_u32(&w->info, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        put_u64(&w->info, (uint64_t)ne[d]);
    put_u32(&w->info, type);
    put_u64(&w->info, w->data.n);
    put(&w->data, data, nbytes);
    w->n_tensors++;
    return at;
}

/* File offsets of fields recorded in w->kv / w->info. */
static size_t kv_pos(const gw *w, size_t at) { (void)w; return 24 + at; }
static size_t info_pos(const gw *w, size_t at) { return 24 + w->kv.n + at; }

/* Assembles the file. */
static buf gw_finish(const gw *w, uint32_t version) {
    buf out = {0};
    put(&out, "GGUF", 4);
    put_u32(&out, version);
    put_u64(&out, w->n_tensors);
    put_u64(&out, w->n_kv);
    put(&out, w->kv.p, w->kv.n);
    put(&out, w->info.p, w->info.n);
    if (w->n_tensors) {
        uint32_t a = w->alignment ? w->alignment : 32;
        put_zeros(&out, (a - out.n % a) % a);
        put(&out, w->data.p, w->data.n);
    }
    return out;
}

static void gw_free(gw *w) {
    free(w->kv.p);
    free(w->info.p);
    free(w->data.p);
    memset(w, 0, sizeof *w);
}

/* A temporary file per test (tests run in parallel). */
typedef struct {
    char path[64];
    FILE *f;
} tmpfile_t;

static void tmp_open(tmpfile_t *t) {
    snprintf(t->path, sizeof t->path, "/tmp/kvserve_test_gguf_XXXXXX");
    int fd = mkstemp(t->path);
    cr_assert_geq(fd, 0, "mkstemp");
    t->f = fdopen(fd, "w+b");
    cr_assert_not_null(t->f);
}

static void tmp_write(tmpfile_t *t, const void *p, size_t n) {
    cr_assert_eq(ftruncate(fileno(t->f), 0), 0);
    cr_assert_eq(pwrite(fileno(t->f), p, n, 0), (ssize_t)n);
}

static void tmp_close(tmpfile_t *t) {
    fclose(t->f);
    unlink(t->path);
}

/* Deterministic bytes for tensor payloads. */
static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void fill_random(uint8_t *p, size_t n, uint64_t seed) {
    rng_state = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++)
        p[i] = (uint8_t)rnd();
}

/* ---- the "every type" file ------------------------------------------------ */

#define N_STR 1000

/* Positions of fields the corruption tests overwrite (file offsets). */
typedef struct {
    size_t first_key_len, u32_type, bool_value, alignment_value;
    size_t str_arr_elem_type, str_arr_count, str_arr_elem3_len;
    size_t q4k_n_dims, q4k_ne0, q4k_type, q4k_offset;
    size_t last_offset;
    size_t info_end;
} positions;

typedef struct {
    const char *name;
    uint32_t n_dims;
    int64_t ne[4];
    uint32_t type;
} tensor_spec;

static const tensor_spec specs[] = {
    {"t.f32", 2, {8, 3, 1, 1}, ENG_F32},
    {"t.f16", 2, {64, 2, 1, 1}, ENG_F16},
    {"t.bf16", 3, {32, 2, 2, 1}, ENG_BF16},
    {"t.q4_0", 2, {64, 2, 1, 1}, ENG_Q4_0},
    {"t.q4_1", 2, {32, 3, 1, 1}, ENG_Q4_1},
    {"t.q8_0", 2, {64, 1, 1, 1}, ENG_Q8_0},
    {"t.q4_k", 2, {256, 2, 1, 1}, ENG_Q4_K},
    {"t.q6_k", 4, {256, 1, 1, 2}, ENG_Q6_K},
    {"t.vec", 1, {5, 1, 1, 1}, ENG_F32},
};
#define N_SPECS (sizeof specs / sizeof specs[0])

static size_t spec_bytes(const tensor_spec *s) {
    return eng_row_bytes((eng_dtype)s->type, s->ne[0]) * (size_t)(s->ne[1] * s->ne[2] * s->ne[3]);
}

static void str_elem(char *out, size_t cap, int i) {
    if (i % 10 == 0)
        out[0] = '\0';  /* empty strings too */
    else
        snprintf(out, cap, "tok%d_\xc4\xa0", i);
}

/* Writes every metadata type; align_key: write general.alignment = alignment. */
static buf build_full(uint32_t version, uint32_t alignment, bool align_key, int n_str, positions *pos) {
    gw w = {.alignment = alignment};
    positions p = {0};
    p.first_key_len = 24;
    gw_key(&w, "general.architecture", ENG_GGUF_STRING);
    put_str(&w.kv, "llama");
    if (align_key) {
        gw_key(&w, "general.alignment", ENG_GGUF_UINT32);
        p.alignment_value = w.kv.n;
        put_u32(&w.kv, alignment);
    }
    gw_key(&w, "v.u8", ENG_GGUF_UINT8);    put_u8(&w.kv, 200);
    gw_key(&w, "v.i8", ENG_GGUF_INT8);     put_u8(&w.kv, (uint8_t)-100);
    gw_key(&w, "v.u16", ENG_GGUF_UINT16);  put_u16(&w.kv, 60000);
    gw_key(&w, "v.i16", ENG_GGUF_INT16);   put_u16(&w.kv, (uint16_t)-30000);
    p.u32_type = gw_key(&w, "v.u32", ENG_GGUF_UINT32);
    put_u32(&w.kv, 4000000000u);
    gw_key(&w, "v.i32", ENG_GGUF_INT32);   put_u32(&w.kv, (uint32_t)-2000000000);
    gw_key(&w, "v.f32", ENG_GGUF_FLOAT32); put_f32(&w.kv, 3.25f);
    gw_key(&w, "v.bool_t", ENG_GGUF_BOOL);
    p.bool_value = w.kv.n;
    put_u8(&w.kv, 1);
    gw_key(&w, "v.bool_f", ENG_GGUF_BOOL); put_u8(&w.kv, 0);
    gw_key(&w, "v.str", ENG_GGUF_STRING);  put_str(&w.kv, "h\xc3\xa9llo");
    gw_key(&w, "v.empty_str", ENG_GGUF_STRING); put_str(&w.kv, "");
    gw_key(&w, "v.u64", ENG_GGUF_UINT64);  put_u64(&w.kv, 0x8000000000000005ull);
    gw_key(&w, "v.i64", ENG_GGUF_INT64);   put_u64(&w.kv, (uint64_t)-(INT64_C(1) << 62));
    gw_key(&w, "v.f64", ENG_GGUF_FLOAT64); put_f64(&w.kv, 3.141592653589793);
    gw_key(&w, "v.small_u64", ENG_GGUF_UINT64); put_u64(&w.kv, 77);
    gw_key(&w, "v.neg_i32", ENG_GGUF_INT32); put_u32(&w.kv, (uint32_t)-5);

    gw_arr(&w, "a.u8", ENG_GGUF_UINT8, 3);   put_u8(&w.kv, 1); put_u8(&w.kv, 2); put_u8(&w.kv, 255);
    gw_arr(&w, "a.i8", ENG_GGUF_INT8, 3);    put_u8(&w.kv, 0x80); put_u8(&w.kv, 0); put_u8(&w.kv, 127);
    gw_arr(&w, "a.u16", ENG_GGUF_UINT16, 2); put_u16(&w.kv, 0); put_u16(&w.kv, 65535);
    gw_arr(&w, "a.i16", ENG_GGUF_INT16, 2);  put_u16(&w.kv, 0x8000); put_u16(&w.kv, 32767);
    gw_arr(&w, "a.u32", ENG_GGUF_UINT32, 2); put_u32(&w.kv, 0); put_u32(&w.kv, 4294967295u);
    gw_arr(&w, "a.i32", ENG_GGUF_INT32, 3);
    put_u32(&w.kv, (uint32_t)-5); put_u32(&w.kv, 6); put_u32(&w.kv, (uint32_t)-7);
    gw_arr(&w, "a.f32", ENG_GGUF_FLOAT32, 2); put_f32(&w.kv, 0.5f); put_f32(&w.kv, -1.25f);
    gw_arr(&w, "a.bool", ENG_GGUF_BOOL, 3);  put_u8(&w.kv, 1); put_u8(&w.kv, 0); put_u8(&w.kv, 1);
    gw_arr(&w, "a.u64", ENG_GGUF_UINT64, 2); put_u64(&w.kv, UINT64_MAX); put_u64(&w.kv, 7);
    gw_arr(&w, "a.i64", ENG_GGUF_INT64, 2);  put_u64(&w.kv, (uint64_t)INT64_MIN); put_u64(&w.kv, 9);
    gw_arr(&w, "a.f64", ENG_GGUF_FLOAT64, 2); put_f64(&w.kv, 1e300); put_f64(&w.kv, -0.0);
    p.str_arr_elem_type = gw_arr(&w, "a.str", ENG_GGUF_STRING, (uint64_t)n_str);
    p.str_arr_count = p.str_arr_elem_type + 4;
    for (int i = 0; i < n_str; i++) {
        char s[32];
        str_elem(s, sizeof s, i);
        if (i == 3)
            p.str_arr_elem3_len = w.kv.n;
        put_str(&w.kv, s);
    }
    gw_arr(&w, "a.empty", ENG_GGUF_INT32, 0);
    /* arrays of arrays: {{1, 2}, {3}, {}} of int32 */
    gw_arr(&w, "n.i32", ENG_GGUF_ARRAY, 3);
    put_u32(&w.kv, ENG_GGUF_INT32); put_u64(&w.kv, 2); put_u32(&w.kv, 1); put_u32(&w.kv, 2);
    put_u32(&w.kv, ENG_GGUF_INT32); put_u64(&w.kv, 1); put_u32(&w.kv, 3);
    put_u32(&w.kv, ENG_GGUF_INT32); put_u64(&w.kv, 0);
    /* {{"a", "bc"}, {"def"}} */
    gw_arr(&w, "n.str", ENG_GGUF_ARRAY, 2);
    put_u32(&w.kv, ENG_GGUF_STRING); put_u64(&w.kv, 2); put_str(&w.kv, "a"); put_str(&w.kv, "bc");
    put_u32(&w.kv, ENG_GGUF_STRING); put_u64(&w.kv, 1); put_str(&w.kv, "def");
    /* {{{7}}} of uint16, three levels */
    gw_arr(&w, "n.deep", ENG_GGUF_ARRAY, 1);
    put_u32(&w.kv, ENG_GGUF_ARRAY); put_u64(&w.kv, 1);
    put_u32(&w.kv, ENG_GGUF_UINT16); put_u64(&w.kv, 1); put_u16(&w.kv, 7);
    /* inner arrays of different element types: {{u8 9}, {f64 2.5, -1}, {bool 1}} */
    gw_arr(&w, "n.mixed", ENG_GGUF_ARRAY, 3);
    put_u32(&w.kv, ENG_GGUF_UINT8); put_u64(&w.kv, 1); put_u8(&w.kv, 9);
    put_u32(&w.kv, ENG_GGUF_FLOAT64); put_u64(&w.kv, 2); put_f64(&w.kv, 2.5); put_f64(&w.kv, -1.0);
    put_u32(&w.kv, ENG_GGUF_BOOL); put_u64(&w.kv, 1); put_u8(&w.kv, 1);

    for (size_t i = 0; i < N_SPECS; i++) {
        size_t nb = spec_bytes(&specs[i]);
        uint8_t *d = malloc(nb);
        fill_random(d, nb, i + 1);
        if (specs[i].type == ENG_F32)  /* finite floats, so values can be compared */
            for (size_t k = 0; k < nb / 4; k++) {
                float f = (float)k * 0.25f - (float)i;
                memcpy(d + 4 * k, &f, 4);
            }
        size_t at = gw_tensor(&w, specs[i].name, specs[i].n_dims, specs[i].ne, specs[i].type, d, nb);
        if (specs[i].type == ENG_Q4_K) {
            p.q4k_n_dims = at;
            p.q4k_ne0 = at + 4;
            p.q4k_type = at + 4 + 8 * specs[i].n_dims;
            p.q4k_offset = p.q4k_type + 4;
        }
        p.last_offset = at + 4 + 8 * specs[i].n_dims + 4;
        free(d);
    }
    p.first_key_len = 24;
    p.u32_type = kv_pos(&w, p.u32_type);
    p.bool_value = kv_pos(&w, p.bool_value);
    p.alignment_value = align_key ? kv_pos(&w, p.alignment_value) : 0;
    p.str_arr_elem_type = kv_pos(&w, p.str_arr_elem_type);
    p.str_arr_count = kv_pos(&w, p.str_arr_count);
    p.str_arr_elem3_len = kv_pos(&w, p.str_arr_elem3_len);
    p.q4k_n_dims = info_pos(&w, p.q4k_n_dims);
    p.q4k_ne0 = info_pos(&w, p.q4k_ne0);
    p.q4k_type = info_pos(&w, p.q4k_type);
    p.q4k_offset = info_pos(&w, p.q4k_offset);
    p.last_offset = info_pos(&w, p.last_offset);
    p.info_end = info_pos(&w, w.info.n);
    if (pos)
        *pos = p;
    buf out = gw_finish(&w, version);
    gw_free(&w);
    return out;
}

/* Reads the nested-array layout in the test, independently of the reader. */
static const uint8_t *nested_header(const uint8_t *p, uint32_t *et, uint64_t *n) {
    memcpy(et, p, 4);
    memcpy(n, p + 4, 8);
    return p + 12;
}

static void check_full(const eng_gguf *g, uint32_t version, uint32_t alignment, int n_str) {
    char err[256] = "";
    cr_assert_eq(eng_gguf_version(g), version);
    cr_assert_eq(eng_gguf_n_tensors(g), N_SPECS);
    const eng_gguf_kv *kv;

    /* order is preserved */
    kv = eng_gguf_kv_at(g, 0);
    cr_assert_eq(kv->key.len, strlen("general.architecture"));
    cr_assert_eq(memcmp(kv->key.ptr, "general.architecture", kv->key.len), 0);
    cr_assert_null(eng_gguf_kv_at(g, eng_gguf_n_kv(g)));
    cr_assert_null(eng_gguf_find(g, "v.missing"));
    cr_assert_null(eng_gguf_find(g, "v.u"), "prefix of a key is not a match");
    cr_assert_null(eng_gguf_find(g, "v.u88"));

#define SCALAR(key, vt, field, want) do { \
        kv = eng_gguf_find(g, key); \
        cr_assert_not_null(kv, "%s", key); \
        cr_assert_eq(kv->type, vt, "%s type", key); \
        cr_assert_eq(kv->v.field, want, "%s value", key); \
    } while (0)
    SCALAR("v.u8", ENG_GGUF_UINT8, u64, 200);
    SCALAR("v.i8", ENG_GGUF_INT8, i64, -100);
    SCALAR("v.u16", ENG_GGUF_UINT16, u64, 60000);
    SCALAR("v.i16", ENG_GGUF_INT16, i64, -30000);
    SCALAR("v.u32", ENG_GGUF_UINT32, u64, 4000000000u);
    SCALAR("v.i32", ENG_GGUF_INT32, i64, -2000000000);
    SCALAR("v.f32", ENG_GGUF_FLOAT32, f64, 3.25);
    SCALAR("v.bool_t", ENG_GGUF_BOOL, boolean, 1);
    SCALAR("v.bool_f", ENG_GGUF_BOOL, boolean, 0);
    SCALAR("v.u64", ENG_GGUF_UINT64, u64, 0x8000000000000005ull);
    SCALAR("v.i64", ENG_GGUF_INT64, i64, -(INT64_C(1) << 62));
    SCALAR("v.f64", ENG_GGUF_FLOAT64, f64, 3.141592653589793);
#undef SCALAR
    kv = eng_gguf_find(g, "v.str");
    cr_assert_eq(kv->type, ENG_GGUF_STRING);
    cr_assert_eq(kv->v.str.len, 6);
    cr_assert_eq(memcmp(kv->v.str.ptr, "h\xc3\xa9llo", 6), 0);
    cr_assert_eq(eng_gguf_find(g, "v.empty_str")->v.str.len, 0);

    /* typed getters */
    uint32_t u = 12345;
    cr_assert_eq(eng_gguf_get_u32(g, "v.u8", &u, err, sizeof err), 0);
    cr_assert_eq(u, 200);
    cr_assert_eq(eng_gguf_get_u32(g, "v.u32", &u, err, sizeof err), 0);
    cr_assert_eq(u, 4000000000u);
    cr_assert_eq(eng_gguf_get_u32(g, "v.small_u64", &u, err, sizeof err), 0);
    cr_assert_eq(u, 77);
    u = 12345;
    cr_assert_eq(eng_gguf_get_u32(g, "v.absent", &u, err, sizeof err), 1);
    cr_assert_eq(u, 12345, "absent key leaves the default");
    err[0] = '\0';
    cr_assert_eq(eng_gguf_get_u32(g, "v.neg_i32", &u, err, sizeof err), -1);
    cr_assert(strstr(err, "v.neg_i32") && strstr(err, "int32") && strstr(err, "-5"), "%s", err);
    err[0] = '\0';
    cr_assert_eq(eng_gguf_get_u32(g, "v.u64", &u, err, sizeof err), -1, "does not fit");
    cr_assert(strstr(err, "v.u64") && strstr(err, "uint64"), "%s", err);
    err[0] = '\0';
    cr_assert_eq(eng_gguf_get_u32(g, "v.str", &u, err, sizeof err), -1);
    cr_assert(strstr(err, "'v.str'") && strstr(err, "string"), "%s", err);
    cr_assert_eq(eng_gguf_get_u32(g, "a.u32", &u, err, sizeof err), -1);
    cr_assert(strstr(err, "array of uint32"), "%s", err);
    cr_assert_eq(u, 12345, "failed getters leave out unchanged");

    float f = 0;
    cr_assert_eq(eng_gguf_get_f32(g, "v.f32", &f, err, sizeof err), 0);
    cr_assert_eq(f, 3.25f);
    cr_assert_eq(eng_gguf_get_f32(g, "v.f64", &f, err, sizeof err), 0);
    cr_assert_eq(f, (float)3.141592653589793);
    cr_assert_eq(eng_gguf_get_f32(g, "v.i16", &f, err, sizeof err), 0);
    cr_assert_eq(f, -30000.0f);
    cr_assert_eq(eng_gguf_get_f32(g, "v.bool_t", &f, err, sizeof err), -1);
    cr_assert(strstr(err, "v.bool_t") && strstr(err, "bool"), "%s", err);
    int b = -1;
    cr_assert_eq(eng_gguf_get_bool(g, "v.bool_t", &b, err, sizeof err), 0);
    cr_assert_eq(b, 1);
    cr_assert_eq(eng_gguf_get_bool(g, "v.bool_f", &b, err, sizeof err), 0);
    cr_assert_eq(b, 0);
    cr_assert_eq(eng_gguf_get_bool(g, "v.u8", &b, err, sizeof err), -1);
    cr_assert_eq(eng_gguf_get_bool(g, "v.nope", &b, err, sizeof err), 1);
    char *s = NULL;
    cr_assert_eq(eng_gguf_get_str(g, "v.str", &s, err, sizeof err), 0);
    cr_assert_str_eq(s, "h\xc3\xa9llo");
    free(s);
    cr_assert_eq(eng_gguf_get_str(g, "v.empty_str", &s, err, sizeof err), 0);
    cr_assert_str_eq(s, "");
    free(s);
    s = NULL;
    cr_assert_eq(eng_gguf_get_str(g, "v.u8", &s, err, sizeof err), -1);
    cr_assert(strstr(err, "expected string") && strstr(err, "uint8"), "%s", err);
    cr_assert_null(s);

    /* arrays of every element type */
#define ARR(key, et, n) do { \
        kv = eng_gguf_find(g, key); \
        cr_assert_not_null(kv, "%s", key); \
        cr_assert_eq(kv->type, ENG_GGUF_ARRAY, "%s", key); \
        cr_assert_eq(kv->arr_type, et, "%s element type", key); \
        cr_assert_eq(kv->arr_len, n, "%s length", key); \
    } while (0)
    ARR("a.u8", ENG_GGUF_UINT8, 3);
    cr_assert_eq(eng_gguf_arr_int(kv, 0), 1);
    cr_assert_eq(eng_gguf_arr_int(kv, 2), 255);
    cr_assert_eq(eng_gguf_arr_float(kv, 2), 255.0);
    ARR("a.i8", ENG_GGUF_INT8, 3);
    cr_assert_eq(eng_gguf_arr_int(kv, 0), -128);
    cr_assert_eq(eng_gguf_arr_int(kv, 2), 127);
    ARR("a.u16", ENG_GGUF_UINT16, 2);
    cr_assert_eq(eng_gguf_arr_int(kv, 1), 65535);
    ARR("a.i16", ENG_GGUF_INT16, 2);
    cr_assert_eq(eng_gguf_arr_int(kv, 0), -32768);
    cr_assert_eq(eng_gguf_arr_int(kv, 1), 32767);
    ARR("a.u32", ENG_GGUF_UINT32, 2);
    cr_assert_eq(eng_gguf_arr_int(kv, 1), 4294967295ll);
    ARR("a.i32", ENG_GGUF_INT32, 3);
    cr_assert_eq(eng_gguf_arr_int(kv, 0), -5);
    cr_assert_eq(eng_gguf_arr_int(kv, 1), 6);
    cr_assert_eq(eng_gguf_arr_int(kv, 2), -7);
    cr_assert_eq(eng_gguf_arr_float(kv, 2), -7.0);
    cr_assert_eq(eng_gguf_arr_int(kv, 3), 0, "out of range reads as 0");
    ARR("a.f32", ENG_GGUF_FLOAT32, 2);
    cr_assert_eq(eng_gguf_arr_float(kv, 0), 0.5);
    cr_assert_eq(eng_gguf_arr_float(kv, 1), -1.25);
    ARR("a.bool", ENG_GGUF_BOOL, 3);
    cr_assert_eq(eng_gguf_arr_int(kv, 0), 1);
    cr_assert_eq(eng_gguf_arr_int(kv, 1), 0);
    ARR("a.u64", ENG_GGUF_UINT64, 2);
    cr_assert_eq((uint64_t)eng_gguf_arr_int(kv, 0), UINT64_MAX);
    cr_assert_eq(eng_gguf_arr_float(kv, 0), 18446744073709551615.0);
    cr_assert_eq(eng_gguf_arr_int(kv, 1), 7);
    ARR("a.i64", ENG_GGUF_INT64, 2);
    cr_assert_eq(eng_gguf_arr_int(kv, 0), INT64_MIN);
    ARR("a.f64", ENG_GGUF_FLOAT64, 2);
    cr_assert_eq(eng_gguf_arr_float(kv, 0), 1e300);
    cr_assert(signbit(eng_gguf_arr_float(kv, 1)));
    ARR("a.empty", ENG_GGUF_INT32, 0);
    ARR("a.str", ENG_GGUF_STRING, (uint64_t)n_str);
    for (int i = 0; i < n_str; i++) {
        char want[32];
        str_elem(want, sizeof want, i);
        eng_gguf_str e = eng_gguf_arr_str(kv, (uint64_t)i);
        cr_assert_eq(e.len, strlen(want), "a.str[%d]", i);
        cr_assert_eq(memcmp(e.ptr, want, e.len), 0, "a.str[%d]", i);
    }
    cr_assert_null(eng_gguf_arr_str(kv, (uint64_t)n_str).ptr, "out of range");
    cr_assert_null(eng_gguf_arr_str(eng_gguf_find(g, "a.i32"), 0).ptr, "not a string array");
    cr_assert_null(eng_gguf_arr_str(eng_gguf_find(g, "v.str"), 0).ptr, "not an array");

    /* nested arrays, walked by hand from arr_data */
    uint32_t et;
    uint64_t n;
    const uint8_t *p;
    ARR("n.i32", ENG_GGUF_ARRAY, 3);
    p = kv->arr_data;
    int32_t iv;
    p = nested_header(p, &et, &n);
    cr_assert(et == ENG_GGUF_INT32 && n == 2);
    memcpy(&iv, p + 4, 4);
    cr_assert_eq(iv, 2);
    p = nested_header(p + 8, &et, &n);
    cr_assert(et == ENG_GGUF_INT32 && n == 1);
    p = nested_header(p + 4, &et, &n);
    cr_assert(et == ENG_GGUF_INT32 && n == 0);
    ARR("n.str", ENG_GGUF_ARRAY, 2);
    p = nested_header(kv->arr_data, &et, &n);
    cr_assert(et == ENG_GGUF_STRING && n == 2);
    cr_assert_eq(memcmp(p + 8, "a", 1), 0);
    cr_assert_eq(memcmp(p + 9 + 8, "bc", 2), 0);
    p = nested_header(p + 9 + 10, &et, &n);
    cr_assert(et == ENG_GGUF_STRING && n == 1);
    cr_assert_eq(memcmp(p + 8, "def", 3), 0);
    ARR("n.deep", ENG_GGUF_ARRAY, 1);
    p = nested_header(kv->arr_data, &et, &n);
    cr_assert(et == ENG_GGUF_ARRAY && n == 1);
    p = nested_header(p, &et, &n);
    cr_assert(et == ENG_GGUF_UINT16 && n == 1);
    cr_assert_eq(p[0], 7);
    ARR("n.mixed", ENG_GGUF_ARRAY, 3);
    p = nested_header(kv->arr_data, &et, &n);
    cr_assert(et == ENG_GGUF_UINT8 && n == 1 && p[0] == 9);
    p = nested_header(p + 1, &et, &n);
    double dv;
    memcpy(&dv, p, 8);
    cr_assert(et == ENG_GGUF_FLOAT64 && n == 2 && dv == 2.5);
    p = nested_header(p + 16, &et, &n);
    cr_assert(et == ENG_GGUF_BOOL && n == 1 && p[0] == 1);
#undef ARR

    /* tensors: infos, placement, payload bytes */
    const uint8_t *prev_end = NULL;
    for (size_t i = 0; i < N_SPECS; i++) {
        const eng_gguf_tensor *t = eng_gguf_tensor_at(g, i);
        cr_assert_not_null(t);
        cr_assert_eq(eng_gguf_find_tensor(g, specs[i].name), t, "%s", specs[i].name);
        cr_assert_eq(t->name.len, strlen(specs[i].name));
        cr_assert_eq(t->n_dims, specs[i].n_dims, "%s", specs[i].name);
        for (int d = 0; d < 4; d++)
            cr_assert_eq(t->ne[d], specs[i].ne[d], "%s ne[%d]", specs[i].name, d);
        cr_assert_eq((uint32_t)t->type, specs[i].type);
        cr_assert_eq(t->nbytes, spec_bytes(&specs[i]), "%s", specs[i].name);
        cr_assert_eq(t->offset % alignment, 0, "%s offset %" PRIu64, specs[i].name, t->offset);
        cr_assert_eq((uintptr_t)t->data % alignment, 0, "mapping is page aligned");
        cr_assert(prev_end == NULL || (const uint8_t *)t->data >= prev_end);
        prev_end = (const uint8_t *)t->data + t->nbytes;
        uint8_t *want = malloc(t->nbytes);
        fill_random(want, t->nbytes, i + 1);
        if (specs[i].type == ENG_F32) {
            const float *fv = t->data;
            for (size_t k = 0; k < t->nbytes / 4; k++)
                cr_assert_eq(fv[k], (float)k * 0.25f - (float)i);
        } else {
            cr_assert_eq(memcmp(t->data, want, t->nbytes), 0, "%s payload", specs[i].name);
        }
        free(want);
    }
    cr_assert_null(eng_gguf_tensor_at(g, N_SPECS));
    cr_assert_null(eng_gguf_find_tensor(g, "t.nope"));
    cr_assert_null(eng_gguf_find_tensor(g, "v.u8"), "keys and tensor names are separate");
}

static void roundtrip(uint32_t version, uint32_t alignment, bool align_key) {
    buf file = build_full(version, alignment, align_key, N_STR, NULL);
    tmpfile_t tf;
    tmp_open(&tf);
    tmp_write(&tf, file.p, file.n);
    char err[512] = "";
    eng_gguf *g = eng_gguf_open(tf.path, err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    cr_assert_str_eq(eng_gguf_path(g), tf.path);
    check_full(g, version, alignment, N_STR);
    eng_gguf_close(g);
    tmp_close(&tf);
    free(file.p);
}

Test(gguf, every_type_v3_alignment_64) { roundtrip(3, 64, true); }
Test(gguf, every_type_v2_default_alignment) { roundtrip(2, 32, false); }
Test(gguf, every_type_alignment_1) { roundtrip(3, 1, true); }
Test(gguf, every_type_alignment_4096) { roundtrip(3, 4096, true); }

Test(gguf, no_tensors_no_padding) {
    gw w = {0};
    gw_key(&w, "general.architecture", ENG_GGUF_STRING);
    put_str(&w.kv, "x");
    buf file = gw_finish(&w, 3);  /* ends right after the last key-value */
    tmpfile_t tf;
    tmp_open(&tf);
    tmp_write(&tf, file.p, file.n);
    char err[256];
    eng_gguf *g = eng_gguf_open(tf.path, err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    cr_assert_eq(eng_gguf_n_kv(g), 1);
    cr_assert_eq(eng_gguf_n_tensors(g), 0);
    cr_assert_null(eng_gguf_tensor_at(g, 0));
    cr_assert_null(eng_gguf_find_tensor(g, "x"));
    eng_gguf_close(g);
    /* and a header-only file: no key-values, no tensors */
    gw_free(&w);
    buf empty = gw_finish(&w, 3);
    tmp_write(&tf, empty.p, empty.n);
    g = eng_gguf_open(tf.path, err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    cr_assert_eq(eng_gguf_n_kv(g), 0);
    cr_assert_null(eng_gguf_find(g, "general.architecture"));
    eng_gguf_close(g);
    tmp_close(&tf);
    free(file.p);
    free(empty.p);
    gw_free(&w);
}

/* ---- a file written by gguf-py ------------------------------------------- */

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

Test(gguf, reads_gguf_py_writer_output) {
    char err[512] = "", path[1024];
    const char *dir = getenv("KVSERVE_FIXTURES");
    cr_assert_not_null(dir, "KVSERVE_FIXTURES is not set (make unit sets it: make fixtures writes pywriter.gguf)");
    snprintf(path, sizeof path, "%s/pywriter.gguf", dir);
    eng_gguf *g = eng_gguf_open(path, err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    cr_assert_eq(eng_gguf_version(g), 3);
    char *s = NULL;
    cr_assert_eq(eng_gguf_get_str(g, "general.architecture", &s, err, sizeof err), 0);
    cr_assert_str_eq(s, "llama");
    free(s);
    cr_assert_eq(eng_gguf_get_str(g, "general.name", &s, err, sizeof err), 0);
    cr_assert_str_eq(s, "pywriter fixture");
    free(s);
    uint32_t u = 0;
    cr_assert_eq(eng_gguf_get_u32(g, "general.alignment", &u, err, sizeof err), 0);
    cr_assert_eq(u, 64);
    cr_assert_eq(eng_gguf_find(g, "t.u8")->v.u64, 250);
    cr_assert_eq(eng_gguf_find(g, "t.i8")->v.i64, -7);
    cr_assert_eq(eng_gguf_find(g, "t.u16")->v.u64, 65000);
    cr_assert_eq(eng_gguf_find(g, "t.i16")->v.i64, -32000);
    cr_assert_eq(eng_gguf_find(g, "t.u32")->v.u64, 4000000000u);
    cr_assert_eq(eng_gguf_find(g, "t.i32")->v.i64, -2000000000);
    cr_assert_eq(eng_gguf_find(g, "t.f32")->v.f64, 0.15625);
    cr_assert_eq(eng_gguf_find(g, "t.u64")->v.u64, 18000000000000000000ull);
    cr_assert_eq(eng_gguf_find(g, "t.i64")->v.i64, -9000000000000000000ll);
    cr_assert_eq(eng_gguf_find(g, "t.f64")->v.f64, 2.718281828459045);
    cr_assert_eq(eng_gguf_find(g, "t.bool")->v.boolean, 1);
    cr_assert_eq(eng_gguf_get_str(g, "t.str", &s, err, sizeof err), 0);
    cr_assert_str_eq(s, "h\xc3\xa9llo \xe4\xb8\x96\xe7\x95\x8c");
    free(s);
    const eng_gguf_kv *kv = eng_gguf_find(g, "t.arr_i32");
    cr_assert_eq(kv->arr_type, ENG_GGUF_INT32);
    cr_assert_eq(kv->arr_len, 5);
    int64_t want_i[] = {3, -1, 4, -1, 5};
    for (int i = 0; i < 5; i++)
        cr_assert_eq(eng_gguf_arr_int(kv, (uint64_t)i), want_i[i]);
    kv = eng_gguf_find(g, "t.arr_f32");
    cr_assert_eq(kv->arr_type, ENG_GGUF_FLOAT32);
    cr_assert_eq(eng_gguf_arr_float(kv, 1), -2.25);
    cr_assert_eq((float)eng_gguf_arr_float(kv, 2), 1e-3f);
    kv = eng_gguf_find(g, "t.arr_str");
    cr_assert_eq(kv->arr_len, 4);
    cr_assert_eq(eng_gguf_arr_str(kv, 1).len, 0);
    eng_gguf_str e = eng_gguf_arr_str(kv, 2);
    cr_assert(e.len == 7 && memcmp(e.ptr, "\xc4\xa0gamma", 7) == 0);
    cr_assert_eq(eng_gguf_arr_str(kv, 3).len, 100);
    kv = eng_gguf_find(g, "t.arr_bool");
    cr_assert_eq(kv->arr_type, ENG_GGUF_BOOL);
    cr_assert(eng_gguf_arr_int(kv, 0) == 1 && eng_gguf_arr_int(kv, 1) == 0);
    kv = eng_gguf_find(g, "t.arr_u8");
    cr_assert(kv->arr_type == ENG_GGUF_UINT8 && eng_gguf_arr_int(kv, 2) == 254);
    kv = eng_gguf_find(g, "t.arr_u64");
    cr_assert_eq((uint64_t)eng_gguf_arr_int(kv, 1), 1ull << 63);
    cr_assert_eq((uint64_t)eng_gguf_arr_int(kv, 2), UINT64_MAX);
    kv = eng_gguf_find(g, "t.arr_f64");
    cr_assert_eq(eng_gguf_arr_float(kv, 1), -1e300);
    kv = eng_gguf_find(g, "t.nested");
    cr_assert(kv->arr_type == ENG_GGUF_ARRAY && kv->arr_len == 3);
    uint32_t et;
    uint64_t n;
    const uint8_t *p = nested_header(kv->arr_data, &et, &n);
    cr_assert(et == ENG_GGUF_INT32 && n == 2);
    p = nested_header(p + 8, &et, &n);
    p = nested_header(p + 4, &et, &n);
    int32_t last;
    memcpy(&last, p + 8, 4);
    cr_assert(et == ENG_GGUF_INT32 && n == 3 && last == 6);
    kv = eng_gguf_find(g, "t.nested_str");
    cr_assert(kv->arr_type == ENG_GGUF_ARRAY && kv->arr_len == 2);

    /* tensors: shapes and payloads as gguf-py's GGUFReader reports them */
    struct { const char *name; eng_dtype type; int64_t ne0, ne1; uint64_t offset; size_t nbytes; } want[] = {
        {"a.f32", ENG_F32, 8, 3, 0, 96},      {"b.f16", ENG_F16, 64, 2, 128, 256},
        {"c.q8_0", ENG_Q8_0, 64, 2, 384, 136}, {"d.q4_1", ENG_Q4_1, 32, 4, 576, 80},
        {"e.vec", ENG_F32, 5, 1, 704, 20},
    };
    cr_assert_eq(eng_gguf_n_tensors(g), 5);
    const uint8_t *base = eng_gguf_tensor_at(g, 0)->data;  /* file offset 1280 */
    for (int i = 0; i < 5; i++) {
        const eng_gguf_tensor *t = eng_gguf_find_tensor(g, want[i].name);
        cr_assert_not_null(t, "%s", want[i].name);
        cr_assert_eq(t->type, want[i].type);
        cr_assert(t->ne[0] == want[i].ne0 && t->ne[1] == want[i].ne1, "%s", want[i].name);
        cr_assert_eq(t->offset, want[i].offset, "%s", want[i].name);
        cr_assert_eq(t->nbytes, want[i].nbytes, "%s", want[i].name);
        cr_assert_eq((const uint8_t *)t->data - base, (ptrdiff_t)want[i].offset);
    }
    cr_assert_eq(eng_gguf_find_tensor(g, "e.vec")->n_dims, 1);
    const float *a = eng_gguf_find_tensor(g, "a.f32")->data;
    cr_assert_eq(f32_bits(a[0]), 0x3aa13d19u);
    cr_assert_eq(f32_bits(a[2]), 0xbe8c5bccu);
    cr_assert_eq(*(const uint16_t *)eng_gguf_find_tensor(g, "b.f16")->data, 0x3104);
    float row[64];
    cr_assert_eq(eng_dequantize_row(ENG_Q8_0, eng_gguf_find_tensor(g, "c.q8_0")->data, row, 64), 0);
    cr_assert_eq(row[0], -0.55450439453125f);
    cr_assert_eq(row[1], 0.01386260986328125f);
    cr_assert_eq(row[2], -0.37429046630859375f);
    const float *v = eng_gguf_find_tensor(g, "e.vec")->data;
    cr_assert(v[0] == 0 && v[4] == 4);
    eng_gguf_close(g);
}

/* ---- robustness ---------------------------------------------------------- */

/* Opens `path`, which must fail with a message containing each of the
 * non-NULL `needles`. */
static void expect_fail(const char *path, const char *what, const char *n1, const char *n2) {
    char err[512];
    memset(err, 0, sizeof err);
    eng_gguf *g = eng_gguf_open(path, err, sizeof err);
    if (g)
        eng_gguf_close(g);
    cr_assert_null(g, "%s: opened a corrupt file", what);
    cr_assert_neq(err[0], '\0', "%s: empty message", what);
    cr_assert(strstr(err, path) != NULL, "%s: message does not name the file: %s", what, err);
    if (n1)
        cr_assert(strstr(err, n1) != NULL, "%s: message lacks \"%s\": %s", what, n1, err);
    if (n2)
        cr_assert(strstr(err, n2) != NULL, "%s: message lacks \"%s\": %s", what, n2, err);
}

/* Opening any prefix of a valid file fails cleanly. */
Test(gguf, every_truncation_fails) {
    buf file = build_full(3, 32, true, 40, NULL);
    tmpfile_t tf;
    tmp_open(&tf);
    tmp_write(&tf, file.p, file.n);
    char err[512];
    eng_gguf *g = eng_gguf_open(tf.path, err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    eng_gguf_close(g);
    for (size_t len = file.n; len-- > 0;) {
        cr_assert_eq(ftruncate(fileno(tf.f), (off_t)len), 0);
        err[0] = '\0';
        g = eng_gguf_open(tf.path, err, sizeof err);
        if (g)
            eng_gguf_close(g);
        cr_assert_null(g, "truncated at %zu of %zu bytes opened", len, file.n);
        cr_assert(err[0] != '\0' && strstr(err, tf.path), "truncated at %zu: message '%s'", len, err);
    }
    tmp_close(&tf);
    free(file.p);
}

typedef struct {
    const char *what;
    size_t pos;
    int width;        /* 1, 4 or 8 bytes */
    uint64_t value;
    const char *n1, *n2;
} corruption;

Test(gguf, corrupt_header_fields) {
    positions P;
    buf file = build_full(3, 32, true, 40, &P);
    size_t size = file.n;
    char sizebuf[32];
    snprintf(sizebuf, sizeof sizebuf, "(%zu bytes)", size);
    corruption cases[] = {
        {"magic", 0, 4, 0x46554746, "not a GGUF file", NULL},
        {"magic zero", 0, 4, 0, "not a GGUF file", NULL},
        {"version 1", 4, 4, 1, "version 1", NULL},
        {"version 0", 4, 4, 0, "version 0", NULL},
        {"version 4", 4, 4, 4, "version 4", NULL},
        {"big-endian", 4, 4, 0x03000000, "big-endian", NULL},
        {"n_tensors huge", 8, 8, UINT64_MAX, "tensor count", NULL},
        {"n_tensors 2^40", 8, 8, 1ull << 40, "tensor count", NULL},
        {"n_tensors +1", 8, 8, N_SPECS + 1, NULL, NULL},
        {"n_kv huge", 16, 8, UINT64_MAX / 2, "key-value count", NULL},
        {"n_kv +1", 16, 8, 0, NULL, NULL},  /* set below */
        {"n_kv -1", 16, 8, 0, NULL, NULL},  /* set below */
        {"first key length", P.first_key_len, 8, UINT64_MAX, "string length", NULL},
        {"first key length +8", P.first_key_len, 8, 20 + 8, NULL, NULL},
        {"value type 13", P.u32_type, 4, 13, "key 'v.u32'", "value type 13"},
        {"value type ~0", P.u32_type, 4, 0xffffffff, "key 'v.u32'", "4294967295"},
        {"value type string", P.u32_type, 4, ENG_GGUF_STRING, NULL, NULL},
        {"bool 2", P.bool_value, 1, 2, "key 'v.bool_t'", "expected 0 or 1"},
        {"alignment 0", P.alignment_value, 4, 0, "general.alignment", "power of two"},
        {"alignment 48", P.alignment_value, 4, 48, "general.alignment", "power of two"},
        {"alignment 2^31 (data start past end)", P.alignment_value, 4, 1u << 31, "past end of file", NULL},
        {"array element type 13", P.str_arr_elem_type, 4, 13, "key 'a.str'", "element type 13"},
        {"array element type array", P.str_arr_elem_type, 4, ENG_GGUF_ARRAY, "key 'a.str'", NULL},
        {"array count huge", P.str_arr_count, 8, UINT64_MAX, "key 'a.str'", "array of"},
        {"array count 2^60", P.str_arr_count, 8, 1ull << 60, "key 'a.str'", NULL},
        {"array count +1", P.str_arr_count, 8, 41, NULL, NULL},
        {"string element length", P.str_arr_elem3_len, 8, UINT64_MAX - 3, "key 'a.str'", "string length"},
        {"string element length +100k", P.str_arr_elem3_len, 8, 100000, "key 'a.str'", "string length"},
        {"n_dims 5", P.q4k_n_dims, 4, 5, "tensor 't.q4_k'", "n_dims is 5"},
        {"n_dims ~0", P.q4k_n_dims, 4, 0xffffffff, "tensor 't.q4_k'", "n_dims"},
        {"ne0 overflow", P.q4k_ne0, 8, 1ull << 62, "tensor 't.q4_k'", "overflow"},
        {"ne0 negative", P.q4k_ne0, 8, UINT64_MAX, "tensor 't.q4_k'", "out of range"},
        {"ne0 huge", P.q4k_ne0, 8, 1ull << 40, "tensor 't.q4_k'", "extends past end of file"},
        {"ne0 not block multiple", P.q4k_ne0, 8, 100, "tensor 't.q4_k'", "block size 256"},
        {"type q5_K", P.q4k_type, 4, 13, "tensor 't.q4_k'", "type 13 (q5_K)"},
        {"type q8_1", P.q4k_type, 4, 9, "tensor 't.q4_k'", "type 9 (q8_1)"},
        {"type 1000", P.q4k_type, 4, 1000, "tensor 't.q4_k'", "type 1000"},
        {"type removed q4_2", P.q4k_type, 4, 4, "tensor 't.q4_k'", "type 4"},
        {"offset misaligned", P.q4k_offset, 8, 33, "tensor 't.q4_k'", "alignment 32"},
        {"offset past end", P.q4k_offset, 8, 1ull << 50, "tensor 't.q4_k'", sizebuf},
        {"offset just past end", P.q4k_offset, 8, 0, "tensor 't.q4_k'", "extends past end of file"},  /* set below */
        {"offset wraps", P.q4k_offset, 8, UINT64_MAX - 31, "tensor 't.q4_k'", "lies past end of file"},
        {"last offset +32", P.last_offset, 8, 0, "tensor 't.vec'", "past end of file"},  /* set below */
    };
    uint64_t n_kv;
    memcpy(&n_kv, file.p + 16, 8);
    uint64_t last_off;
    memcpy(&last_off, file.p + P.last_offset, 8);
    tmpfile_t tf;
    tmp_open(&tf);
    uint8_t *copy = malloc(size);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        corruption *c = &cases[i];
        if (strcmp(c->what, "n_kv +1") == 0)
            c->value = n_kv + 1;
        if (strcmp(c->what, "n_kv -1") == 0)
            c->value = n_kv - 1;
        if (strcmp(c->what, "offset just past end") == 0)
            c->value = (size - P.info_end) / 32 * 32 - 32;  /* inside the file, data runs past the end */
        if (strcmp(c->what, "last offset +32") == 0)
            c->value = last_off + 32;
        memcpy(copy, file.p, size);
        memcpy(copy + c->pos, &c->value, (size_t)c->width);
        tmp_write(&tf, copy, size);
        expect_fail(tf.path, c->what, c->n1, c->n2);
    }
    tmp_close(&tf);
    free(copy);
    free(file.p);
}

Test(gguf, duplicates_and_deep_nesting) {
    tmpfile_t tf;
    tmp_open(&tf);
    /* duplicate key */
    gw w = {0};
    gw_key(&w, "dup.key", ENG_GGUF_UINT32); put_u32(&w.kv, 1);
    gw_key(&w, "other", ENG_GGUF_UINT32);   put_u32(&w.kv, 2);
    gw_key(&w, "dup.key", ENG_GGUF_STRING); put_str(&w.kv, "x");
    buf f1 = gw_finish(&w, 3);
    tmp_write(&tf, f1.p, f1.n);
    expect_fail(tf.path, "duplicate key", "key 'dup.key'", "twice");
    gw_free(&w);
    /* duplicate tensor name */
    float data[4] = {1, 2, 3, 4};
    int64_t ne[1] = {4};
    gw_tensor(&w, "w.same", 1, ne, ENG_F32, data, sizeof data);
    gw_tensor(&w, "w.other", 1, ne, ENG_F32, data, sizeof data);
    gw_tensor(&w, "w.same", 1, ne, ENG_F32, data, sizeof data);
    buf f2 = gw_finish(&w, 3);
    tmp_write(&tf, f2.p, f2.n);
    expect_fail(tf.path, "duplicate tensor", "tensor 'w.same'", "twice");
    gw_free(&w);
    /* arrays nested 40 deep */
    gw_arr(&w, "deep", ENG_GGUF_ARRAY, 1);
    for (int d = 0; d < 40; d++) {
        put_u32(&w.kv, ENG_GGUF_ARRAY);
        put_u64(&w.kv, 1);
    }
    put_u32(&w.kv, ENG_GGUF_UINT8);
    put_u64(&w.kv, 0);
    buf f3 = gw_finish(&w, 3);
    tmp_write(&tf, f3.p, f3.n);
    expect_fail(tf.path, "deep nesting", "key 'deep'", "nested deeper");
    gw_free(&w);
    /* general.alignment with the wrong type */
    gw_key(&w, "general.alignment", ENG_GGUF_UINT64); put_u64(&w.kv, 32);
    buf f4 = gw_finish(&w, 3);
    tmp_write(&tf, f4.p, f4.n);
    expect_fail(tf.path, "alignment type", "general.alignment", "expected uint32, found uint64");
    gw_free(&w);
    /* a bool inside an array that is not 0/1 */
    gw_arr(&w, "bools", ENG_GGUF_BOOL, 2); put_u8(&w.kv, 1); put_u8(&w.kv, 7);
    buf f5 = gw_finish(&w, 3);
    tmp_write(&tf, f5.p, f5.n);
    expect_fail(tf.path, "array bool", "key 'bools'", "expected 0 or 1");
    gw_free(&w);
    free(f1.p); free(f2.p); free(f3.p); free(f4.p); free(f5.p);
    /* not a file, missing, empty, tiny */
    expect_fail("/tmp", "a directory", "not a regular file", NULL);
    expect_fail("/nonexistent/model.gguf", "missing", "cannot open", NULL);
    tmp_write(&tf, "", 0);
    expect_fail(tf.path, "empty", "0 bytes", NULL);
    tmp_write(&tf, "GGUF\3\0\0\0", 8);
    expect_fail(tf.path, "tiny", "too small", NULL);
    tmp_close(&tf);
}

Test(gguf, small_error_buffers) {
    char tiny[8];
    memset(tiny, 'x', sizeof tiny);
    cr_assert_null(eng_gguf_open("/nonexistent/a/b/c.gguf", tiny, sizeof tiny));
    cr_assert_eq(tiny[7], '\0', "truncated message is terminated");
    cr_assert_null(eng_gguf_open("/nonexistent/x.gguf", NULL, 0));
    char one[1] = {'x'};
    cr_assert_null(eng_gguf_open("/nonexistent/x.gguf", one, 1));
    cr_assert_eq(one[0], '\0');
}

/* Touches everything an opened file exposes (ASan checks the reads). */
static uint64_t walk_all(const eng_gguf *g) {
    uint64_t sum = 0;
    for (uint64_t i = 0; i < eng_gguf_n_kv(g); i++) {
        const eng_gguf_kv *kv = eng_gguf_kv_at(g, i);
        for (uint64_t k = 0; k < kv->key.len; k++)
            sum += (unsigned char)kv->key.ptr[k];
        if (kv->type == ENG_GGUF_STRING)
            for (uint64_t k = 0; k < kv->v.str.len; k++)
                sum += (unsigned char)kv->v.str.ptr[k];
        if (kv->type != ENG_GGUF_ARRAY)
            continue;
        for (uint64_t j = 0; j < kv->arr_len; j++) {
            if (kv->arr_type == ENG_GGUF_STRING) {
                eng_gguf_str s = eng_gguf_arr_str(kv, j);
                for (uint64_t k = 0; k < s.len; k++)
                    sum += (unsigned char)s.ptr[k];
            } else {
                sum += (uint64_t)eng_gguf_arr_int(kv, j);
                double d = eng_gguf_arr_float(kv, j);
                sum += d == d ? 1 : 0;
            }
        }
        char name[128];
        snprintf(name, sizeof name, "%.*s", (int)(kv->key.len < 100 ? kv->key.len : 100), kv->key.ptr);
        (void)eng_gguf_find(g, name);
    }
    for (uint64_t i = 0; i < eng_gguf_n_tensors(g); i++) {
        const eng_gguf_tensor *t = eng_gguf_tensor_at(g, i);
        for (size_t k = 0; k < t->nbytes; k++)
            sum += ((const uint8_t *)t->data)[k];
    }
    return sum;
}

/* Random byte flips in the metadata: open either fails with a message or
 * yields a file whose every accessor stays inside the mapping. */
Test(gguf, random_corruption_never_crashes) {
    positions P;
    buf file = build_full(3, 32, true, 40, &P);
    tmpfile_t tf;
    tmp_open(&tf);
    uint8_t *copy = malloc(file.n);
    int failed = 0, opened = 0;
    rng_state = 12345;
    for (int it = 0; it < 3000; it++) {
        memcpy(copy, file.p, file.n);
        int flips = 1 + (int)(rnd() % 4);
        for (int k = 0; k < flips; k++) {
            size_t at = (size_t)(rnd() % P.info_end);
            uint64_t r = rnd();
            if (r % 3 == 0)
                copy[at] ^= (uint8_t)(1u << (r >> 8) % 8);    /* one bit */
            else if (r % 3 == 1)
                copy[at] = (uint8_t)(r >> 16);                /* one byte */
            else
                copy[at] = (r >> 16) & 1 ? 0xff : 0x00;      /* extremes */
        }
        uint64_t saved = rng_state;
        tmp_write(&tf, copy, file.n);
        char err[512] = "";
        eng_gguf *g = eng_gguf_open(tf.path, err, sizeof err);
        if (g) {
            walk_all(g);
            eng_gguf_close(g);
            opened++;
        } else {
            cr_assert(err[0] != '\0', "iteration %d: failed without a message", it);
            failed++;
        }
        rng_state = saved;
    }
    cr_log_info("random corruption: %d rejected, %d opened", failed, opened);
    cr_assert_gt(failed, 1000, "most corruptions must be detected");
    tmp_close(&tf);
    free(copy);
    free(file.p);
}

/* ---- the real model ------------------------------------------------------ */

static const char *model_path(void) {
    const char *p = getenv("KVSERVE_MODEL");
    struct stat st;
    cr_assert(p && stat(p, &st) == 0, "KVSERVE_MODEL must name the SmolLM2 GGUF (make model): %s",
              p ? p : "(unset)");
    return p;
}

static bool str_is(eng_gguf_str s, const char *want) {
    return s.len == strlen(want) && memcmp(s.ptr, want, s.len) == 0;
}

/* Facts as gguf-py's GGUFReader reports them for SmolLM2-135M-Instruct.Q4_1.gguf. */
Test(gguf, smollm2_file) {
    char err[512] = "";
    eng_gguf *g = eng_gguf_open(model_path(), err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    cr_assert_eq(eng_gguf_version(g), 3);
    cr_assert_eq(eng_gguf_n_tensors(g), 272);
    cr_assert_eq(eng_gguf_n_kv(g), 33);
    char *s = NULL;
    cr_assert_eq(eng_gguf_get_str(g, "general.architecture", &s, err, sizeof err), 0);
    cr_assert_str_eq(s, "llama");
    free(s);
    cr_assert_eq(eng_gguf_get_str(g, "general.name", &s, err, sizeof err), 0);
    cr_assert_str_eq(s, "Smollm2 135M 8k Lc100K Mix1 Ep2");
    free(s);
    uint32_t u = 0;
    cr_assert_eq(eng_gguf_get_u32(g, "llama.block_count", &u, err, sizeof err), 0);
    cr_assert_eq(u, 30);
    cr_assert_eq(eng_gguf_get_u32(g, "llama.context_length", &u, err, sizeof err), 0);
    cr_assert_eq(u, 8192);
    float f = 0;
    cr_assert_eq(eng_gguf_get_f32(g, "llama.rope.freq_base", &f, err, sizeof err), 0);
    cr_assert_eq(f, 100000.0f);
    cr_assert_eq(eng_gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f, err, sizeof err), 0);
    cr_assert_eq(f, 1e-5f);
    int b = 1;
    cr_assert_eq(eng_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b, err, sizeof err), 0);
    cr_assert_eq(b, 0);

    const eng_gguf_kv *tok = eng_gguf_find(g, "tokenizer.ggml.tokens");
    cr_assert(tok && tok->arr_type == ENG_GGUF_STRING);
    cr_assert_eq(tok->arr_len, 49152);
    cr_assert(str_is(eng_gguf_arr_str(tok, 0), "<|endoftext|>"));
    cr_assert(str_is(eng_gguf_arr_str(tok, 1), "<|im_start|>"));
    cr_assert(str_is(eng_gguf_arr_str(tok, 300), "om"));
    cr_assert(str_is(eng_gguf_arr_str(tok, 49151), "ectable"));
    const eng_gguf_kv *merges = eng_gguf_find(g, "tokenizer.ggml.merges");
    cr_assert(merges && merges->arr_type == ENG_GGUF_STRING);
    cr_assert_eq(merges->arr_len, 48900);
    cr_assert(str_is(eng_gguf_arr_str(merges, 0), "\xc4\xa0 t"));
    cr_assert(str_is(eng_gguf_arr_str(merges, 48899), "ect able"));
    const eng_gguf_kv *types = eng_gguf_find(g, "tokenizer.ggml.token_type");
    cr_assert(types && types->arr_type == ENG_GGUF_INT32 && types->arr_len == 49152);
    cr_assert(eng_gguf_arr_int(types, 0) == 3 && eng_gguf_arr_int(types, 17) == 1 &&
              eng_gguf_arr_int(types, 49151) == 1);

    const eng_gguf_tensor *t = eng_gguf_find_tensor(g, "token_embd.weight");
    cr_assert_not_null(t);
    cr_assert_eq(t->type, ENG_Q8_0);
    cr_assert(t->n_dims == 2 && t->ne[0] == 576 && t->ne[1] == 49152);
    cr_assert_eq(t->nbytes, (size_t)49152 * 18 * 34);
    /* decoded rows equal gguf-py's quants.dequantize of the same tensor */
    float row[1536];
    cr_assert_eq(eng_dequantize_row(t->type, t->data, row, 576), 0);
    uint32_t want0[] = {0xbdda3400, 0x3d071400, 0x3d456c00, 0xbcbb0800};
    for (int i = 0; i < 4; i++)
        cr_assert_eq(f32_bits(row[i]), want0[i], "token_embd[0][%d]", i);
    cr_assert_eq(eng_dequantize_row(t->type, (const uint8_t *)t->data + (size_t)49151 * 18 * 34, row, 576), 0);
    cr_assert_eq(f32_bits(row[575]), 0xbd2ad000u);
    cr_assert_eq(f32_bits(row[574]), 0xbdf58b00u);
    t = eng_gguf_find_tensor(g, "blk.0.attn_q.weight");
    cr_assert(t && t->type == ENG_Q4_1 && t->ne[0] == 576 && t->ne[1] == 576);
    cr_assert_eq(eng_dequantize_row(t->type, (const uint8_t *)t->data + 5 * 18 * 20, row, 576), 0);
    uint32_t want5[] = {0x3d9c0000, 0xbe8ca000, 0xbd270000, 0x3f651000};
    for (int i = 0; i < 4; i++)
        cr_assert_eq(f32_bits(row[i]), want5[i], "attn_q[5][%d]", i);
    t = eng_gguf_find_tensor(g, "blk.29.ffn_down.weight");
    cr_assert(t && t->ne[0] == 1536 && t->ne[1] == 576 && t->nbytes == 552960);
    t = eng_gguf_find_tensor(g, "output_norm.weight");
    cr_assert(t && t->type == ENG_F32 && t->n_dims == 1 && t->ne[0] == 576);
    cr_assert_eq(f32_bits(((const float *)t->data)[0]), 0x3fe10000u);
    cr_assert_null(eng_gguf_find_tensor(g, "output.weight"), "SmolLM2 ties its embeddings");
    eng_gguf_close(g);
}

/* ---- the model loader ---------------------------------------------------- */

/* Weight values are a function of the tensor name and the element index, so
 * checks can recompute what any row of a fused matrix must hold. */
static float synth_value(const char *name, int64_t i) {
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++)
        h = (h ^ (unsigned char)*p) * 1099511628211ull;
    return (float)((h + (uint64_t)i * 2654435761u) % 1000) / 1000.0f - 0.5f;
}

typedef struct {
    const char *arch;
    int n_layer, n_embd, n_head, n_kv_head, n_ff, n_ctx;
    int key_length;            /* 0: key absent */
    bool untied, qkv_bias, q_bias_only, omit_theta, omit_tokens;
    const char *omit;          /* a tensor left out */
    const char *reshape;       /* a tensor written with 16 more rows (or elements) */
    const char *extra;         /* an extra tensor no loader uses */
    const char *rope_scaling;  /* {arch}.rope.scaling.type */
    const float *rope_freqs;   /* rope_freqs.weight, rope_dim / 2 values */
} synth;

/* GPT-2's byte -> printable code point map (bytes_to_unicode). */
static int byte_char(int b) {
    bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    if (printable)
        return b;
    int n = 0;
    for (int x = 0; x < b; x++)
        n += !((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255));
    return 256 + n;
}

static void put_cp_str(buf *b, int cp) {
    char s[4];
    size_t n;
    if (cp < 0x80) {
        s[0] = (char)cp;
        n = 1;
    } else {
        s[0] = (char)(0xc0 | (cp >> 6));
        s[1] = (char)(0x80 | (cp & 0x3f));
        n = 2;
    }
    put_strn(b, s, n);
}

#define SYNTH_VOCAB 258  /* 256 byte tokens, "Ġt", "<|endoftext|>" */

static void add_synth_tensor(gw *w, const synth *s, const char *name, int64_t ne0, int64_t ne1) {
    if (s->omit && strcmp(s->omit, name) == 0)
        return;
    if (s->reshape && strcmp(s->reshape, name) == 0) {
        if (ne1)
            ne1 += 16;
        else
            ne0 += 16;
    }
    int64_t ne[2] = {ne0, ne1 ? ne1 : 1};
    size_t n = (size_t)(ne[0] * ne[1]);
    float *d = malloc(n * sizeof *d);
    for (size_t i = 0; i < n; i++)
        d[i] = synth_value(name, (int64_t)i);
    gw_tensor(w, name, ne1 ? 2 : 1, ne, ENG_F32, d, n * sizeof *d);
    free(d);
}

static void add_layer_tensor(gw *w, const synth *s, int layer, const char *what, int64_t ne0, int64_t ne1) {
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s", layer, what);
    add_synth_tensor(w, s, name, ne0, ne1);
}

static void synth_key_u32(gw *w, const synth *s, const char *suffix, uint32_t v) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", s->arch, suffix);
    gw_key(w, key, ENG_GGUF_UINT32);
    put_u32(&w->kv, v);
}

static void synth_key_f32(gw *w, const synth *s, const char *suffix, float v) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", s->arch, suffix);
    gw_key(w, key, ENG_GGUF_FLOAT32);
    put_f32(&w->kv, v);
}

/* Writes a small model of spec s into tf. */
static void write_synth(tmpfile_t *tf, const synth *s) {
    gw w = {.alignment = 32};
    bool gpt2 = strcmp(s->arch, "gpt2") == 0;
    const int hd = s->key_length ? s->key_length : s->n_embd / s->n_head;
    const int nkv = s->n_kv_head ? s->n_kv_head : s->n_head;
    const int64_t e = s->n_embd, q = (int64_t)s->n_head * hd, kv = (int64_t)nkv * hd;
    gw_key(&w, "general.architecture", ENG_GGUF_STRING);
    put_str(&w.kv, s->arch);
    gw_key(&w, "general.name", ENG_GGUF_STRING);
    put_str(&w.kv, "synthetic");
    synth_key_u32(&w, s, "block_count", (uint32_t)s->n_layer);
    synth_key_u32(&w, s, "embedding_length", (uint32_t)s->n_embd);
    synth_key_u32(&w, s, "feed_forward_length", (uint32_t)s->n_ff);
    synth_key_u32(&w, s, "context_length", (uint32_t)s->n_ctx);
    synth_key_u32(&w, s, "attention.head_count", (uint32_t)s->n_head);
    if (s->n_kv_head)
        synth_key_u32(&w, s, "attention.head_count_kv", (uint32_t)s->n_kv_head);
    if (s->key_length) {
        synth_key_u32(&w, s, "attention.key_length", (uint32_t)s->key_length);
        synth_key_u32(&w, s, "attention.value_length", (uint32_t)s->key_length);
    }
    if (gpt2) {
        synth_key_f32(&w, s, "attention.layer_norm_epsilon", 1e-5f);
    } else {
        synth_key_f32(&w, s, "attention.layer_norm_rms_epsilon", 1e-6f);
        if (!s->omit_theta)
            synth_key_f32(&w, s, "rope.freq_base", 500000.0f);
        synth_key_u32(&w, s, "rope.dimension_count", (uint32_t)hd);
    }
    if (s->rope_scaling) {
        char key[128];
        snprintf(key, sizeof key, "%s.rope.scaling.type", s->arch);
        gw_key(&w, key, ENG_GGUF_STRING);
        put_str(&w.kv, s->rope_scaling);
        synth_key_f32(&w, s, "rope.scaling.factor", 4.0f);
    }
    gw_key(&w, "tokenizer.ggml.model", ENG_GGUF_STRING);
    put_str(&w.kv, "gpt2");
    gw_key(&w, "tokenizer.ggml.pre", ENG_GGUF_STRING);
    put_str(&w.kv, "gpt2");
    if (!s->omit_tokens) {
        gw_arr(&w, "tokenizer.ggml.tokens", ENG_GGUF_STRING, SYNTH_VOCAB);
        for (int b = 0; b < 256; b++)
            put_cp_str(&w.kv, byte_char(b));
        put_str(&w.kv, "\xc4\xa0t");
        put_str(&w.kv, "<|endoftext|>");
        gw_arr(&w, "tokenizer.ggml.token_type", ENG_GGUF_INT32, SYNTH_VOCAB);
        for (int i = 0; i < SYNTH_VOCAB; i++)
            put_u32(&w.kv, i == SYNTH_VOCAB - 1 ? 3 : 1);
        gw_arr(&w, "tokenizer.ggml.merges", ENG_GGUF_STRING, 1);
        put_str(&w.kv, "\xc4\xa0 t");
        gw_key(&w, "tokenizer.ggml.eos_token_id", ENG_GGUF_UINT32);
        put_u32(&w.kv, SYNTH_VOCAB - 1);
    }
    gw_key(&w, "tokenizer.chat_template", ENG_GGUF_STRING);
    put_str(&w.kv, "{{ messages }}");

    add_synth_tensor(&w, s, "token_embd.weight", e, SYNTH_VOCAB);
    if (s->untied)
        add_synth_tensor(&w, s, "output.weight", e, SYNTH_VOCAB);
    add_synth_tensor(&w, s, "output_norm.weight", e, 0);
    if (gpt2) {
        add_synth_tensor(&w, s, "output_norm.bias", e, 0);
        add_synth_tensor(&w, s, "position_embd.weight", e, s->n_ctx);
    }
    if (s->rope_freqs) {
        int64_t ne[1] = {hd / 2};
        gw_tensor(&w, "rope_freqs.weight", 1, ne, ENG_F32, s->rope_freqs, (size_t)(hd / 2) * sizeof(float));
    }
    for (int i = 0; i < s->n_layer; i++) {
        add_layer_tensor(&w, s, i, "attn_norm.weight", e, 0);
        if (gpt2) {
            add_layer_tensor(&w, s, i, "attn_norm.bias", e, 0);
            add_layer_tensor(&w, s, i, "attn_qkv.weight", e, q + 2 * kv);
            add_layer_tensor(&w, s, i, "attn_qkv.bias", q + 2 * kv, 0);
            add_layer_tensor(&w, s, i, "attn_output.weight", q, e);
            add_layer_tensor(&w, s, i, "attn_output.bias", e, 0);
            add_layer_tensor(&w, s, i, "ffn_norm.weight", e, 0);
            add_layer_tensor(&w, s, i, "ffn_norm.bias", e, 0);
            add_layer_tensor(&w, s, i, "ffn_up.weight", e, s->n_ff);
            add_layer_tensor(&w, s, i, "ffn_up.bias", s->n_ff, 0);
            add_layer_tensor(&w, s, i, "ffn_down.weight", s->n_ff, e);
            add_layer_tensor(&w, s, i, "ffn_down.bias", e, 0);
            continue;
        }
        add_layer_tensor(&w, s, i, "attn_q.weight", e, q);
        add_layer_tensor(&w, s, i, "attn_k.weight", e, kv);
        add_layer_tensor(&w, s, i, "attn_v.weight", e, kv);
        if (s->qkv_bias || s->q_bias_only)
            add_layer_tensor(&w, s, i, "attn_q.bias", q, 0);
        if (s->qkv_bias) {
            add_layer_tensor(&w, s, i, "attn_k.bias", kv, 0);
            add_layer_tensor(&w, s, i, "attn_v.bias", kv, 0);
        }
        add_layer_tensor(&w, s, i, "attn_output.weight", q, e);
        add_layer_tensor(&w, s, i, "ffn_norm.weight", e, 0);
        add_layer_tensor(&w, s, i, "ffn_gate.weight", e, s->n_ff);
        add_layer_tensor(&w, s, i, "ffn_up.weight", e, s->n_ff);
        add_layer_tensor(&w, s, i, "ffn_down.weight", s->n_ff, e);
    }
    if (s->extra)
        add_synth_tensor(&w, s, s->extra, e, 0);
    buf file = gw_finish(&w, 3);
    tmp_write(tf, file.p, file.n);
    free(file.p);
    gw_free(&w);
}

static const synth base_llama = {
    .arch = "llama", .n_layer = 2, .n_embd = 64, .n_head = 4, .n_kv_head = 2, .n_ff = 96, .n_ctx = 256,
};

static eng_model *load_synth(tmpfile_t *tf, const synth *s, char *err, size_t errlen) {
    write_synth(tf, s);
    err[0] = '\0';
    return eng_model_load_gguf(tf->path, err, errlen);
}

/* Row r of a fused F32 matrix equals row `src_row` of tensor `name`. */
static void check_row(const eng_tensor *t, int64_t r, const char *name, int64_t src_row) {
    cr_assert_eq(t->type, ENG_F32);
    const float *row = (const float *)t->data + r * t->ne[0];
    for (int64_t i = 0; i < t->ne[0]; i++)
        cr_assert_eq(row[i], synth_value(name, src_row * t->ne[0] + i), "%s row %lld elem %lld",
                     name, (long long)src_row, (long long)i);
}

static void check_vec(const eng_tensor *t, int64_t at, const char *name, int64_t n) {
    cr_assert_eq(t->type, ENG_F32);
    for (int64_t i = 0; i < n; i++)
        cr_assert_eq(((const float *)t->data)[at + i], synth_value(name, i), "%s[%lld]", name, (long long)i);
}

Test(model_gguf, smollm2) {
    char err[512] = "";
    eng_model *m = eng_model_load_gguf(model_path(), err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    const eng_model_config *c = &m->cfg;
    cr_assert_eq(c->arch, ENG_ARCH_LLAMA);
    cr_assert_eq(c->n_layer, 30);
    cr_assert_eq(c->n_embd, 576);
    cr_assert_eq(c->n_head, 9);
    cr_assert_eq(c->n_kv_head, 3);
    cr_assert_eq(c->head_dim, 64);
    cr_assert_eq(c->n_ff, 1536);
    cr_assert_eq(c->n_vocab, 49152);
    cr_assert_eq(c->n_ctx_train, 8192);
    cr_assert_eq(c->rope_theta, 100000.0f);
    cr_assert_eq(c->rope_dim, 64);
    cr_assert_eq(c->rope_style, ENG_ROPE_NORM);
    cr_assert_eq(c->rope_scaling, ENG_ROPE_SCALING_NONE);
    cr_assert_eq(c->norm_eps, 1e-5f);
    cr_assert(c->tied_embeddings);
    cr_assert_eq(m->output.data, m->tok_embd.data);
    cr_assert(m->tok_embd.type == ENG_Q8_0 && m->tok_embd.ne[0] == 576 && m->tok_embd.ne[1] == 49152);
    cr_assert_str_eq(m->name, "Smollm2 135M 8k Lc100K Mix1 Ep2");
    cr_assert_str_eq(m->path, model_path());
    cr_assert(m->chat_template && strstr(m->chat_template, "<|im_start|>"));
    cr_assert_not_null(m->tok);
    cr_assert_eq(eng_tokenizer_n_vocab(m->tok), 49152);
    cr_assert_not_null(m->layers);

    /* fused matrices hold Q, K, V (gate, up) rows in order, bit for bit */
    eng_gguf *g = eng_gguf_open(model_path(), err, sizeof err);
    cr_assert_not_null(g, "%s", err);
    const size_t rb = eng_row_bytes(ENG_Q4_1, 576);
    for (int layer = 0; layer < 30; layer += 29) {
        const eng_layer *l = &m->layers[layer];
        cr_assert(l->wqkv.type == ENG_Q4_1 && l->wqkv.ne[0] == 576 && l->wqkv.ne[1] == 960);
        cr_assert(l->w_gate_up.type == ENG_Q4_1 && l->w_gate_up.ne[0] == 576 && l->w_gate_up.ne[1] == 3072);
        cr_assert_null(l->bqkv.data);
        cr_assert_null(l->w_up.data);
        cr_assert(l->wo.ne[0] == 576 && l->wo.ne[1] == 576);
        cr_assert(l->w_down.ne[0] == 1536 && l->w_down.ne[1] == 576);
        cr_assert(l->attn_norm.type == ENG_F32 && l->attn_norm.ne[0] == 576);
        char name[64];
        const char *qkv_names[] = {"attn_q", "attn_k", "attn_v"};
        const int64_t qkv_first[] = {0, 576, 768}, qkv_rows[] = {576, 192, 192};
        for (int p = 0; p < 3; p++) {
            snprintf(name, sizeof name, "blk.%d.%s.weight", layer, qkv_names[p]);
            const eng_gguf_tensor *t = eng_gguf_find_tensor(g, name);
            cr_assert_eq(memcmp((const uint8_t *)l->wqkv.data + qkv_first[p] * rb, t->data, t->nbytes), 0, "%s", name);
            cr_assert_eq(t->nbytes, (size_t)qkv_rows[p] * rb);
        }
        snprintf(name, sizeof name, "blk.%d.ffn_gate.weight", layer);
        cr_assert_eq(memcmp(l->w_gate_up.data, eng_gguf_find_tensor(g, name)->data, 1536 * rb), 0);
        snprintf(name, sizeof name, "blk.%d.ffn_up.weight", layer);
        cr_assert_eq(memcmp((const uint8_t *)l->w_gate_up.data + 1536 * rb,
                            eng_gguf_find_tensor(g, name)->data, 1536 * rb), 0);
    }
    eng_gguf_close(g);
    eng_model_free(m);
}

Test(model_gguf, llama_fuses_and_ties) {
    tmpfile_t tf;
    tmp_open(&tf);
    char err[512];
    eng_model *m = load_synth(&tf, &base_llama, err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    const eng_model_config *c = &m->cfg;
    cr_assert(c->arch == ENG_ARCH_LLAMA && c->n_layer == 2 && c->n_embd == 64 && c->n_head == 4 &&
              c->n_kv_head == 2 && c->head_dim == 16 && c->n_ff == 96 && c->n_vocab == SYNTH_VOCAB &&
              c->n_ctx_train == 256);
    cr_assert_eq(c->rope_theta, 500000.0f);
    cr_assert_eq(c->norm_eps, 1e-6f);
    cr_assert_eq(c->rope_style, ENG_ROPE_NORM);
    cr_assert(c->tied_embeddings && m->output.data == m->tok_embd.data);
    cr_assert_str_eq(m->name, "synthetic");
    cr_assert_str_eq(m->chat_template, "{{ messages }}");
    const eng_layer *l = &m->layers[1];
    cr_assert(l->wqkv.ne[0] == 64 && l->wqkv.ne[1] == 64 + 2 * 32);
    check_row(&l->wqkv, 0, "blk.1.attn_q.weight", 0);
    check_row(&l->wqkv, 63, "blk.1.attn_q.weight", 63);
    check_row(&l->wqkv, 64, "blk.1.attn_k.weight", 0);
    check_row(&l->wqkv, 96, "blk.1.attn_v.weight", 0);
    check_row(&l->wqkv, 127, "blk.1.attn_v.weight", 31);
    cr_assert(l->w_gate_up.ne[0] == 64 && l->w_gate_up.ne[1] == 192);
    check_row(&l->w_gate_up, 95, "blk.1.ffn_gate.weight", 95);
    check_row(&l->w_gate_up, 96, "blk.1.ffn_up.weight", 0);
    check_vec(&l->attn_norm, 0, "blk.1.attn_norm.weight", 64);
    check_vec(&m->out_norm, 0, "output_norm.weight", 64);
    check_row(&l->w_down, 3, "blk.1.ffn_down.weight", 3);
    cr_assert_null(l->bqkv.data);
    eng_model_free(m);
    tmp_close(&tf);
}

Test(model_gguf, qwen2_biases_neox_untied) {
    tmpfile_t tf;
    tmp_open(&tf);
    char err[512];
    synth s = base_llama;
    s.arch = "qwen2";
    s.qkv_bias = true;
    s.untied = true;
    eng_model *m = load_synth(&tf, &s, err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    cr_assert_eq(m->cfg.rope_style, ENG_ROPE_NEOX);
    cr_assert(!m->cfg.tied_embeddings);
    cr_assert_neq(m->output.data, m->tok_embd.data);
    check_row(&m->output, 5, "output.weight", 5);
    const eng_tensor *b = &m->layers[0].bqkv;
    cr_assert_not_null(b->data);
    cr_assert_eq(b->ne[0] * b->ne[1], 128);
    check_vec(b, 0, "blk.0.attn_q.bias", 64);
    check_vec(b, 64, "blk.0.attn_k.bias", 32);
    check_vec(b, 96, "blk.0.attn_v.bias", 32);
    eng_model_free(m);
    tmp_close(&tf);
}

Test(model_gguf, gpt2) {
    tmpfile_t tf;
    tmp_open(&tf);
    char err[512];
    synth s = {.arch = "gpt2", .n_layer = 2, .n_embd = 64, .n_head = 4, .n_ff = 256, .n_ctx = 128};
    eng_model *m = load_synth(&tf, &s, err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    const eng_model_config *c = &m->cfg;
    cr_assert(c->arch == ENG_ARCH_GPT2 && c->n_kv_head == 4 && c->head_dim == 16 && c->n_ctx_train == 128);
    cr_assert_eq(c->norm_eps, 1e-5f);
    cr_assert(c->tied_embeddings);
    cr_assert(m->pos_embd.ne[0] == 64 && m->pos_embd.ne[1] == 128);
    check_row(&m->pos_embd, 7, "position_embd.weight", 7);
    check_vec(&m->out_norm_b, 0, "output_norm.bias", 64);
    const eng_layer *l = &m->layers[1];
    cr_assert(l->wqkv.ne[0] == 64 && l->wqkv.ne[1] == 192);
    check_row(&l->wqkv, 100, "blk.1.attn_qkv.weight", 100);
    check_vec(&l->bqkv, 0, "blk.1.attn_qkv.bias", 192);
    check_vec(&l->attn_norm_b, 0, "blk.1.attn_norm.bias", 64);
    check_vec(&l->ffn_norm_b, 0, "blk.1.ffn_norm.bias", 64);
    check_row(&l->w_up, 255, "blk.1.ffn_up.weight", 255);
    check_vec(&l->b_up, 0, "blk.1.ffn_up.bias", 256);
    check_vec(&l->b_down, 0, "blk.1.ffn_down.bias", 64);
    check_vec(&l->bo, 0, "blk.1.attn_output.bias", 64);
    cr_assert_null(l->w_gate_up.data);
    eng_model_free(m);
    tmp_close(&tf);
}

Test(model_gguf, mistral_defaults_and_key_length) {
    tmpfile_t tf;
    tmp_open(&tf);
    char err[512];
    synth s = base_llama;
    s.arch = "mistral";
    s.n_kv_head = 0;      /* head_count_kv absent: = head_count */
    s.omit_theta = true;  /* freq_base absent: 10000 */
    s.key_length = 32;    /* head_dim != n_embd / n_head */
    eng_model *m = load_synth(&tf, &s, err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    cr_assert_eq(m->cfg.n_kv_head, 4);
    cr_assert_eq(m->cfg.head_dim, 32);
    cr_assert_eq(m->cfg.rope_dim, 32);
    cr_assert_eq(m->cfg.rope_theta, 10000.0f);
    cr_assert(m->layers[0].wqkv.ne[1] == 3 * 128 && m->layers[0].wo.ne[0] == 128);
    eng_model_free(m);
    tmp_close(&tf);
}

/* Factors written by convert_hf_to_gguf.py's Llama 3 rule for rope_theta
 * 500000, head_dim 16, factor 32, low 1, high 4, original context 8192, as
 * printed by tests/fixtures/gguf/gen_gguf_fixture.py (llama3_factors). */
static const float llama3_freqs[8] = {1.0f, 1.0f, 1.0f, 1.0f, 3.2922627925872803f, 32.0f, 32.0f, 32.0f};

Test(model_gguf, llama3_rope_freqs) {
    tmpfile_t tf;
    tmp_open(&tf);
    char err[512];
    synth s = base_llama;
    s.rope_freqs = llama3_freqs;
    eng_model *m = load_synth(&tf, &s, err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    cr_assert_eq(m->cfg.rope_scaling, ENG_ROPE_SCALING_LLAMA3);
    cr_assert_eq(m->cfg.rope_factor, 32.0f);
    cr_assert_eq(m->cfg.rope_low_freq_factor, 1.0f);
    cr_assert_eq(m->cfg.rope_high_freq_factor, 4.0f);
    cr_assert_eq(m->cfg.rope_orig_ctx, 8192);
    eng_model_free(m);
    /* factors that follow no Llama 3 parameter set are refused */
    float odd[8];
    memcpy(odd, llama3_freqs, sizeof odd);
    odd[4] = 5.0f;
    s.rope_freqs = odd;
    cr_assert_null(load_synth(&tf, &s, err, sizeof err));
    cr_assert(strstr(err, tf.path) && strstr(err, "rope_freqs.weight"), "%s", err);
    /* linear scaling by key */
    s.rope_freqs = NULL;
    s.rope_scaling = "linear";
    m = load_synth(&tf, &s, err, sizeof err);
    cr_assert_not_null(m, "%s", err);
    cr_assert_eq(m->cfg.rope_scaling, ENG_ROPE_SCALING_LINEAR);
    cr_assert_eq(m->cfg.rope_factor, 4.0f);
    eng_model_free(m);
    tmp_close(&tf);
}

/* Loading fails with a message naming the file and the culprit. */
static void expect_load_fail(tmpfile_t *tf, const synth *s, const char *n1, const char *n2) {
    char err[512];
    eng_model *m = load_synth(tf, s, err, sizeof err);
    if (m)
        eng_model_free(m);
    cr_assert_null(m, "loaded a bad model (expected \"%s\")", n1);
    cr_assert(strstr(err, tf->path), "message does not name the file: %s", err);
    cr_assert(strstr(err, n1), "message lacks \"%s\": %s", n1, err);
    if (n2)
        cr_assert(strstr(err, n2), "message lacks \"%s\": %s", n2, err);
}

Test(model_gguf, errors_name_file_and_tensor) {
    tmpfile_t tf;
    tmp_open(&tf);
    synth s = base_llama;
    s.omit = "blk.1.ffn_up.weight";
    expect_load_fail(&tf, &s, "tensor 'blk.1.ffn_up.weight' is missing", NULL);
    s = base_llama;
    s.reshape = "blk.0.attn_k.weight";
    expect_load_fail(&tf, &s, "tensor 'blk.0.attn_k.weight': shape {64, 48, 1, 1}", "expected {64, 32}");
    s = base_llama;
    s.reshape = "output_norm.weight";
    expect_load_fail(&tf, &s, "tensor 'output_norm.weight': shape {80, 1, 1, 1}", "expected {64}");
    s = base_llama;
    s.omit = "token_embd.weight";
    expect_load_fail(&tf, &s, "tensor 'token_embd.weight' is missing", NULL);
    s = base_llama;
    s.extra = "blk.0.attn_q_norm.weight";
    expect_load_fail(&tf, &s, "tensor 'blk.0.attn_q_norm.weight' is not used", NULL);
    s = base_llama;
    s.q_bias_only = true;
    expect_load_fail(&tf, &s, "blk.0", "biases");
    s = base_llama;
    s.arch = "phi3";
    expect_load_fail(&tf, &s, "architecture 'phi3' is not supported", NULL);
    s = base_llama;
    s.n_kv_head = 3;
    expect_load_fail(&tf, &s, "4 attention heads", "3 kv heads");
    s = base_llama;
    s.n_head = 5;  /* 64 / 5 */
    s.n_kv_head = 5;
    expect_load_fail(&tf, &s, "not a multiple of 5 heads", NULL);
    s = base_llama;
    s.rope_scaling = "yarn";
    expect_load_fail(&tf, &s, "llama.rope.scaling.type", "'yarn'");
    s = base_llama;
    s.omit_tokens = true;
    expect_load_fail(&tf, &s, "tokenizer.ggml.tokens", NULL);
    s = (synth){.arch = "gpt2", .n_layer = 1, .n_embd = 64, .n_head = 4, .n_ff = 256, .n_ctx = 128};
    s.omit = "blk.0.attn_qkv.bias";
    expect_load_fail(&tf, &s, "tensor 'blk.0.attn_qkv.bias' is missing", NULL);
    s.omit = NULL;
    s.reshape = "position_embd.weight";
    expect_load_fail(&tf, &s, "tensor 'position_embd.weight'", "expected {64, 128}");
    /* a key of the wrong type */
    gw w = {0};
    gw_key(&w, "general.architecture", ENG_GGUF_STRING);
    put_str(&w.kv, "llama");
    gw_key(&w, "llama.block_count", ENG_GGUF_STRING);
    put_str(&w.kv, "thirty");
    buf f = gw_finish(&w, 3);
    tmp_write(&tf, f.p, f.n);
    char err[512] = "";
    cr_assert_null(eng_model_load_gguf(tf.path, err, sizeof err));
    cr_assert(strstr(err, tf.path) && strstr(err, "llama.block_count") && strstr(err, "string"), "%s", err);
    free(f.p);
    gw_free(&w);
    /* and a file that is not GGUF at all */
    tmp_write(&tf, "not a model file at all, just some text", 40);
    cr_assert_null(eng_model_load_gguf(tf.path, err, sizeof err));
    cr_assert(strstr(err, "not a GGUF file"), "%s", err);
    tmp_close(&tf);
}
