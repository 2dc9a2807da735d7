/* test_safetensors.c: tests engine/safetensors.c.
 *
 * Two kinds of input: files written here by a small writer of our own (for
 * round trips and for every kind of corruption), and fixtures written by the
 * reference implementation (the `safetensors` Python package and
 * huggingface_hub's shard splitter, tests/fixtures/hf/gen_fixtures.py), whose
 * expected values are restated below: IEEE half / bfloat16 bit patterns of the
 * values the script stores. Runs under ASan + UBSan. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/safetensors.h"

#define FIX "tests/fixtures/hf"

/* ---- helpers ------------------------------------------------------------ */

static char tmpdir[64];

static void make_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/kvserve-st-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(p);
}

static void remove_tmpdir(void)
{
    nftw(tmpdir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}

static char *tmp_path(const char *name)
{
    static char buf[4][256];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 256, "%s/%s", tmpdir, name);
    return p;
}

static void write_bytes(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "cannot write %s", path);
    cr_assert_eq(fwrite(data, 1, n, f), n);
    fclose(f);
}

/* A file from a header text and a data section; the header is padded with
 * spaces to a multiple of 8 (as the reference writer does) unless raw_len is
 * given, in which case exactly raw_len header bytes are declared. */
static size_t build_file(unsigned char *out, size_t cap, const char *header, const void *data, size_t data_len)
{
    size_t h = strlen(header), padded = (h + 7) / 8 * 8;
    cr_assert(8 + padded + data_len <= cap);
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(out + 8, header, h);
    memset(out + 8 + h, ' ', padded - h);
    if (data_len)
        memcpy(out + 8 + padded, data, data_len);
    return 8 + padded + data_len;
}

static void write_raw(const char *path, const char *header, const void *data, size_t data_len)
{
    static unsigned char buf[1 << 16];
    size_t n = build_file(buf, sizeof buf, header, data, data_len);
    write_bytes(path, buf, n);
}

typedef struct {
    const char *name;
    const char *dtype;
    int n_dims;
    int64_t shape[4];
    const void *data;
    size_t nbytes;
} wtensor;

/* Our writer: tensors laid out back to back in the order given. */
static size_t build_st(unsigned char *out, size_t cap, const wtensor *ts, int n, const char *metadata)
{
    char header[8192];
    size_t hl = 0, off = 0;
    hl += (size_t)snprintf(header + hl, sizeof header - hl, "{");
    if (metadata)
        hl += (size_t)snprintf(header + hl, sizeof header - hl, "\"__metadata__\":%s%s", metadata, n ? "," : "");
    for (int i = 0; i < n; i++) {
        hl += (size_t)snprintf(header + hl, sizeof header - hl, "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[",
                               i ? "," : "", ts[i].name, ts[i].dtype);
        for (int d = 0; d < ts[i].n_dims; d++)
            hl += (size_t)snprintf(header + hl, sizeof header - hl, "%s%lld", d ? "," : "",
                                   (long long)ts[i].shape[d]);
        hl += (size_t)snprintf(header + hl, sizeof header - hl, "],\"data_offsets\":[%zu,%zu]}", off,
                               off + ts[i].nbytes);
        off += ts[i].nbytes;
    }
    snprintf(header + hl, sizeof header - hl, "}");
    unsigned char data[8192];
    cr_assert(off <= sizeof data);
    off = 0;
    for (int i = 0; i < n; i++) {
        memcpy(data + off, ts[i].data, ts[i].nbytes);
        off += ts[i].nbytes;
    }
    return build_file(out, cap, header, data, off);
}

static void write_st(const char *path, const wtensor *ts, int n, const char *metadata)
{
    static unsigned char buf[1 << 16];
    write_bytes(path, buf, build_st(buf, sizeof buf, ts, n, metadata));
}

/* Opening must fail with a message containing every given fragment. */
static void expect_open_error(const char *path, const char *frag1, const char *frag2)
{
    char err[512] = "";
    eng_st *st = eng_st_open(path, err, sizeof err);
    cr_assert_null(st, "opened %s, expected an error with '%s'", path, frag1);
    cr_assert(strstr(err, path), "message '%s' does not name the file", err);
    cr_assert(strstr(err, frag1), "message '%s' lacks '%s'", err, frag1);
    if (frag2)
        cr_assert(strstr(err, frag2), "message '%s' lacks '%s'", err, frag2);
}

static void expect_header_error(const char *header, const void *data, size_t data_len, const char *frag1,
                                const char *frag2)
{
    const char *p = tmp_path("bad.safetensors");
    write_raw(p, header, data, data_len);
    expect_open_error(p, frag1, frag2);
}

static uint16_t rd16(const void *p, size_t i)
{
    uint16_t v;
    memcpy(&v, (const char *)p + 2 * i, 2);
    return v;
}

static float rdf32(const void *p, size_t i)
{
    float v;
    memcpy(&v, (const char *)p + 4 * i, 4);
    return v;
}

TestSuite(safetensors, .init = make_tmpdir, .fini = remove_tmpdir);

/* ---- reading what the reference implementation wrote -------------------- */

Test(safetensors, reads_reference_file)
{
    char err[256] = "";
    eng_st *st = eng_st_open(FIX "/ref.safetensors", err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    cr_assert_eq(eng_st_n_tensors(st), 6, "the __metadata__ entry is not a tensor");
    /* name order */
    const char *names[] = {"a.f32", "b.f16", "c.bf16", "d.i64", "empty", "scalar"};
    for (size_t i = 0; i < 6; i++)
        cr_assert_str_eq(eng_st_tensor_at(st, i)->name, names[i]);
    cr_assert_null(eng_st_tensor_at(st, 6));

    const eng_st_tensor *a = eng_st_find(st, "a.f32");
    cr_assert_not_null(a);
    cr_assert_eq(a->type, ENG_F32);
    cr_assert_str_eq(a->dtype, "F32");
    cr_assert_eq(a->n_dims, 2);
    cr_assert_eq(a->shape[0], 2);
    cr_assert_eq(a->shape[1], 3);
    cr_assert_eq(a->n_elems, 6);
    cr_assert_eq(a->nbytes, 24);
    cr_assert_str_eq(a->file, FIX "/ref.safetensors");
    for (int i = 0; i < 6; i++)
        cr_assert_eq(rdf32(a->data, i), i * 0.5f - 1.0f);

    const eng_st_tensor *b = eng_st_find(st, "b.f16");
    cr_assert_eq(b->type, ENG_F16);
    cr_assert_eq(b->n_dims, 1);
    cr_assert_eq(b->shape[0], 4);
    const uint16_t b_bits[] = {0x3E00, 0xC000, 0x3400, 0x7BFF};  /* 1.5 -2 0.25 65504 */
    for (int i = 0; i < 4; i++)
        cr_assert_eq(rd16(b->data, i), b_bits[i], "b.f16[%d] = %#x", i, rd16(b->data, i));

    const eng_st_tensor *c = eng_st_find(st, "c.bf16");
    cr_assert_eq(c->type, ENG_BF16);
    cr_assert_eq(c->shape[0], 3);
    cr_assert_eq(c->shape[1], 2);
    const uint16_t c_bits[] = {0x3F80, 0xC040, 0x3F00, 0x4380, 0xBE00, 0x4049};
    for (int i = 0; i < 6; i++)
        cr_assert_eq(rd16(c->data, i), c_bits[i], "c.bf16[%d] = %#x", i, rd16(c->data, i));

    const eng_st_tensor *d = eng_st_find(st, "d.i64");
    cr_assert_eq(d->type, ENG_DTYPE_COUNT, "I64 is not a compute type");
    cr_assert_str_eq(d->dtype, "I64");
    cr_assert_eq(d->nbytes, 24);
    cr_assert_eq(eng_st_check_float(d, err, sizeof err), -1);
    cr_assert(strstr(err, "d.i64") && strstr(err, "I64") && strstr(err, "ref.safetensors"), "%s", err);
    cr_assert_eq(eng_st_check_float(c, err, sizeof err), 0);

    const eng_st_tensor *s = eng_st_find(st, "scalar");
    cr_assert_eq(s->n_dims, 0);
    cr_assert_eq(s->n_elems, 1);
    cr_assert_eq(rdf32(s->data, 0), 7.25f);
    const eng_st_tensor *e = eng_st_find(st, "empty");
    cr_assert_eq(e->n_elems, 0);
    cr_assert_eq(e->nbytes, 0);
    char sb[64];
    cr_assert_str_eq(eng_st_shape_str(e, sb, sizeof sb), "[0, 4]");

    cr_assert_null(eng_st_find(st, "__metadata__"));
    cr_assert_null(eng_st_find(st, "a"));
    cr_assert_null(eng_st_find(st, "zzz"));
    cr_assert_str_eq(eng_st_path(st), FIX "/ref.safetensors");
    eng_st_close(st);
}

Test(safetensors, reads_reference_shards)
{
    char err[256] = "";
    eng_st *st = eng_st_open_dir(FIX "/sharded", err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    cr_assert_str_eq(eng_st_path(st), FIX "/sharded/model.safetensors.index.json");
    cr_assert_eq(eng_st_n_tensors(st), 5);
    /* the index written by the generator: layers 0,1 -> shard 1; 2,3 -> 2; embed -> 3 */
    const char *shard[] = {"model-00001-of-00003", "model-00001-of-00003", "model-00002-of-00003",
                           "model-00002-of-00003"};
    for (int l = 0; l < 4; l++) {
        char name[64];
        snprintf(name, sizeof name, "model.layers.%d.w", l);
        const eng_st_tensor *t = eng_st_find(st, name);
        cr_assert_not_null(t, "%s", name);
        cr_assert(strstr(t->file, shard[l]), "%s is in %s", name, t->file);
        cr_assert_eq(t->shape[0], 4);
        cr_assert_eq(t->shape[1], 4);
        for (int i = 0; i < 16; i++)
            cr_assert_eq(rdf32(t->data, i), (float)(l * 100 + i));
    }
    const eng_st_tensor *e = eng_st_find(st, "model.embed");
    cr_assert_not_null(e);
    cr_assert(strstr(e->file, "model-00003-of-00003"));
    cr_assert_eq(e->type, ENG_F16);
    cr_assert_eq(rd16(e->data, 0), 0x0000);   /* 0 / 4 */
    cr_assert_eq(rd16(e->data, 1), 0x3400);   /* 0.25 */
    cr_assert_eq(rd16(e->data, 31), 0x47C0);  /* 7.75 */
    eng_st_close(st);
}

/* ---- our writer, round trip ---------------------------------------------- */

static const float rt_f32[6] = {1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, 1e6f};
static const uint16_t rt_f16[4] = {0x3C00, 0xBC00, 0x7BFF, 0x0001};
static const uint16_t rt_bf16[6] = {0x3F80, 0x4000, 0xC2C8, 0x0000, 0x7F80, 0x3E80};

static const wtensor rt_tensors[] = {
    {"model.layers.0.w", "F32", 2, {2, 3}, rt_f32, sizeof rt_f32},
    {"model.norm", "F16", 1, {4}, rt_f16, sizeof rt_f16},
    {"lm_head.weight", "BF16", 2, {3, 2}, rt_bf16, sizeof rt_bf16},
};

Test(safetensors, round_trip)
{
    const char *p = tmp_path("rt.safetensors");
    write_st(p, rt_tensors, 3, "{\"format\":\"pt\"}");
    char err[256] = "";
    eng_st *st = eng_st_open(p, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    cr_assert_eq(eng_st_n_tensors(st), 3);
    for (int i = 0; i < 3; i++) {
        const eng_st_tensor *t = eng_st_find(st, rt_tensors[i].name);
        cr_assert_not_null(t);
        cr_assert_eq(t->n_dims, rt_tensors[i].n_dims);
        for (int d = 0; d < t->n_dims; d++)
            cr_assert_eq(t->shape[d], rt_tensors[i].shape[d]);
        cr_assert_eq(t->nbytes, rt_tensors[i].nbytes);
        cr_assert_eq(memcmp(t->data, rt_tensors[i].data, t->nbytes), 0);
        cr_assert_str_eq(t->dtype, rt_tensors[i].dtype);
    }
    cr_assert_eq(eng_st_find(st, "model.layers.0.w")->type, ENG_F32);
    cr_assert_eq(eng_st_find(st, "model.norm")->type, ENG_F16);
    cr_assert_eq(eng_st_find(st, "lm_head.weight")->type, ENG_BF16);
    eng_st_close(st);
    eng_st_close(NULL);
}

Test(safetensors, open_dir_prefers_single_file)
{
    write_st(tmp_path("model.safetensors"), rt_tensors, 1, NULL);
    write_bytes(tmp_path("model.safetensors.index.json"), "not json", 8);
    char err[256] = "";
    eng_st *st = eng_st_open_dir(tmpdir, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    cr_assert_eq(eng_st_n_tensors(st), 1);
    eng_st_close(st);
}

Test(safetensors, open_dir_without_weights)
{
    char err[256] = "";
    cr_assert_null(eng_st_open_dir(tmpdir, err, sizeof err));
    cr_assert(strstr(err, tmpdir) && strstr(err, "no model.safetensors"), "%s", err);
    write_bytes(tmp_path("pytorch_model.bin"), "PK", 2);
    cr_assert_null(eng_st_open_dir(tmpdir, err, sizeof err));
    cr_assert(strstr(err, "pytorch_model.bin"), "%s", err);
    cr_assert_null(eng_st_open(tmp_path("absent.safetensors"), err, sizeof err));
    cr_assert(strstr(err, "absent.safetensors") && strstr(err, "cannot open"), "%s", err);
    cr_assert_null(eng_st_open(tmpdir, err, sizeof err));
    cr_assert(strstr(err, "not a regular file"), "%s", err);
}

/* ---- robustness ----------------------------------------------------------- */

/* Every proper prefix of a valid file is invalid: the header or the last
 * tensor's bytes are cut. None may open, none may crash. */
Test(safetensors, truncation_at_every_offset)
{
    static unsigned char full[1 << 16];
    size_t n = build_st(full, sizeof full, rt_tensors, 3, "{\"k\":\"v\"}");
    size_t hlen = full[0] | (size_t)full[1] << 8;
    const char *p = tmp_path("trunc.safetensors");
    for (size_t len = 0; len < n; len++) {
        write_bytes(p, full, len);
        char err[512] = "";
        eng_st *st = eng_st_open(p, err, sizeof err);
        cr_assert_null(st, "a file cut to %zu of %zu bytes opened", len, n);
        cr_assert(strstr(err, p), "len %zu: %s", len, err);
        if (len < 8 + hlen)
            cr_assert(strstr(err, "truncated"), "len %zu: %s", len, err);
        else
            cr_assert(strstr(err, "past the data section"), "len %zu: %s", len, err);
    }
    write_bytes(p, full, n);
    char err[256];
    eng_st *st = eng_st_open(p, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    eng_st_close(st);
}

Test(safetensors, header_length_bounds)
{
    unsigned char buf[64] = {0};
    const char *p = tmp_path("len.safetensors");
    /* declared length beyond the format's limit */
    uint64_t big = ENG_ST_MAX_HEADER + 1;
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)(big >> (8 * i));
    memcpy(buf + 8, "{}      ", 8);
    write_bytes(p, buf, 16);
    expect_open_error(p, "header length 100000001", "limit");
    /* all-ones length: must not overflow the bounds check */
    memset(buf, 0xFF, 8);
    write_bytes(p, buf, 16);
    expect_open_error(p, "exceeds", NULL);
    /* length just past the file */
    memset(buf, 0, 8);
    buf[0] = 9;
    write_bytes(p, buf, 16);
    expect_open_error(p, "truncated", "header length 9");
    /* zero length */
    buf[0] = 0;
    write_bytes(p, buf, 16);
    expect_open_error(p, "header does not start with '{'", NULL);
    /* an empty header object: a valid file with no tensors */
    write_raw(p, "{}", NULL, 0);
    char err[256];
    eng_st *st = eng_st_open(p, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    cr_assert_eq(eng_st_n_tensors(st), 0);
    cr_assert_null(eng_st_find(st, "x"));
    eng_st_close(st);
}

Test(safetensors, corrupt_header_json)
{
    float four[4] = {0};
    expect_header_error("{", four, 16, "header JSON", NULL);
    expect_header_error("{\"a\":", four, 16, "header JSON", NULL);
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} trailing", four, 16,
                        "header JSON", NULL);
    expect_header_error("[1,2]", four, 16, "header does not start with '{'", NULL);
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                        "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
                        four, 16, "header JSON", "duplicate");
    expect_header_error("{\"a\":[1]}", four, 16, "tensor 'a'", "expected an object");
    expect_header_error("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", four, 16, "tensor 'a'", "dtype");
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", four, 16, "tensor 'a'", "shape");
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[1]}}", four, 16, "tensor 'a'", "data_offsets");
    expect_header_error("{\"\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", four, 16,
                        "empty name", NULL);
    /* a NUL byte and invalid UTF-8 inside the header */
    char nul[] = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    const char *p = tmp_path("nul.safetensors");
    static unsigned char buf[256];
    size_t n = build_file(buf, sizeof buf, nul, four, 16);
    buf[8 + 3] = '\0';
    write_bytes(p, buf, n);
    expect_open_error(p, "header JSON", NULL);
    buf[8 + 3] = 0xFF;
    write_bytes(p, buf, n);
    expect_open_error(p, "header JSON", NULL);
}

Test(safetensors, bad_dtypes)
{
    float four[4] = {0};
    expect_header_error("{\"w\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,4]}}", four, 16,
                        "tensor 'w'", "unknown dtype 'Q4'");
    expect_header_error("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", four, 16,
                        "tensor 'w'", "unknown dtype 'f32'");
    expect_header_error("{\"w\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", four, 16,
                        "tensor 'w'", "dtype: expected a string");
    /* a defined but unsupported dtype opens; using it is refused */
    const char *p = tmp_path("u8.safetensors");
    write_raw(p, "{\"mask\":{\"dtype\":\"BOOL\",\"shape\":[2,2],\"data_offsets\":[0,4]},"
                 "\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", four, 12);
    char err[256];
    eng_st *st = eng_st_open(p, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    const eng_st_tensor *m = eng_st_find(st, "mask");
    cr_assert_eq(m->type, ENG_DTYPE_COUNT);
    cr_assert_eq(m->nbytes, 4);
    cr_assert_eq(eng_st_check_float(m, err, sizeof err), -1);
    cr_assert(strstr(err, "mask") && strstr(err, "BOOL") && strstr(err, "u8.safetensors"), "%s", err);
    eng_st_close(st);
    /* sub-byte types: 3 F4 values are 1.5 bytes */
    expect_header_error("{\"w\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", four, 16,
                        "tensor 'w'", "whole bytes");
}

Test(safetensors, bad_shapes)
{
    float four[4] = {0};
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", four, 16,
                        "tensor 'w'", "shape[0]");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,\"2\"],\"data_offsets\":[0,8]}}", four, 16,
                        "tensor 'w'", "shape[1]");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", four, 16,
                        "tensor 'w'", "shape[0]");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":4,\"data_offsets\":[0,16]}}", four, 16,
                        "tensor 'w'", "shape: expected an array");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", four,
                        16, "tensor 'w'", "9 dimensions");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,4]}}",
                        four, 16, "tensor 'w'", "overflows");
    /* element count that overflows only when multiplied by the element size */
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,4]}}",
                        four, 16, "tensor 'w'", "overflows");
}

Test(safetensors, bad_offsets)
{
    float four[4] = {0};
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", four, 16,
                        "tensor 'w'", "begin is after end");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[16,20]}}", four, 16,
                        "tensor 'w'", "past the data section (16 bytes)");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", four, 16,
                        "tensor 'w'", "hold 16 bytes, but dtype F32 and shape [2, 3] need 24");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]}}", four, 16,
                        "tensor 'w'", "data_offsets");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", four, 16,
                        "tensor 'w'", "data_offsets");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4.0]}}", four, 16,
                        "tensor 'w'", "data_offsets");
    expect_header_error("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,18446744073709551615]}}",
                        four, 16, "header JSON", NULL);
}

Test(safetensors, overlapping_ranges)
{
    float data[8] = {0};
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                        "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
                        data, 32, "'a' [0, 8] and 'b' [4, 12] overlap", NULL);
    expect_header_error("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                        "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}",
                        data, 32, "overlap", NULL);
    /* one range inside an earlier, longer one */
    expect_header_error("{\"big\":{\"dtype\":\"F32\",\"shape\":[6],\"data_offsets\":[0,24]},"
                        "\"c\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
                        "\"d\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[28,32]}}",
                        data, 32, "'big' [0, 24] and 'c' [8, 12] overlap", NULL);
    /* adjacent ranges, gaps, and empty tensors anywhere are fine */
    const char *p = tmp_path("ok.safetensors");
    write_raw(p, "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                 "\"a\":{\"dtype\":\"F16\",\"shape\":[4],\"data_offsets\":[0,8]},"
                 "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                 "\"g\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[24,28]}}", data, 32);
    char err[256];
    eng_st *st = eng_st_open(p, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    cr_assert_eq(eng_st_n_tensors(st), 4);
    eng_st_close(st);
}

/* Random byte changes in the header of a valid file: each variant either
 * fails with a message or opens with every tensor inside the file. */
Test(safetensors, mutated_headers_never_crash)
{
    static unsigned char full[1 << 16], mut[1 << 16];
    size_t n = build_st(full, sizeof full, rt_tensors, 3, NULL);
    size_t hlen = full[0] | (size_t)full[1] << 8;
    const char *p = tmp_path("mut.safetensors");
    uint64_t rng = 0x9E3779B97F4A7C15ull;
    const char alphabet[] = "{}[],:\"0123456789-.eEFBI \\u";
    int opened = 0;
    for (int iter = 0; iter < 1500; iter++) {
        memcpy(mut, full, n);
        int edits = 1 + iter % 3;
        for (int e = 0; e < edits; e++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            size_t at = 8 + (size_t)(rng % hlen);
            mut[at] = (unsigned char)alphabet[(rng >> 32) % (sizeof alphabet - 1)];
        }
        write_bytes(p, mut, n);
        char err[512] = "";
        eng_st *st = eng_st_open(p, err, sizeof err);
        if (!st) {
            cr_assert(err[0] != '\0', "iteration %d: no message", iter);
            continue;
        }
        opened++;
        for (size_t i = 0; i < eng_st_n_tensors(st); i++) {
            const eng_st_tensor *t = eng_st_tensor_at(st, i);
            const unsigned char *d = t->data;
            unsigned sum = 0;
            for (size_t b = 0; b < t->nbytes; b++)
                sum += d[b];  /* reads every byte: faults if outside the mapping */
            cr_assert(t->nbytes <= n);
            (void)sum;
        }
        eng_st_close(st);
    }
    cr_assert(opened > 0, "some mutations (inside names, padding) keep the file valid");
}

/* ---- sharded checkpoints ------------------------------------------------- */

static void write_index(const char *json)
{
    write_bytes(tmp_path("model.safetensors.index.json"), json, strlen(json));
}

static void write_two_shards(void)
{
    write_st(tmp_path("s1.safetensors"), &rt_tensors[0], 1, NULL);
    write_st(tmp_path("s2.safetensors"), &rt_tensors[1], 2, NULL);
}

Test(safetensors, index_ok)
{
    write_two_shards();
    write_index("{\"metadata\":{\"total_size\":44},\"weight_map\":{\"model.layers.0.w\":\"s1.safetensors\","
                "\"model.norm\":\"s2.safetensors\",\"lm_head.weight\":\"s2.safetensors\"}}");
    char err[256] = "";
    eng_st *st = eng_st_open_dir(tmpdir, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    cr_assert_eq(eng_st_n_tensors(st), 3);
    const eng_st_tensor *t = eng_st_find(st, "lm_head.weight");
    cr_assert(strstr(t->file, "s2.safetensors"));
    cr_assert_eq(memcmp(t->data, rt_bf16, sizeof rt_bf16), 0);
    cr_assert(strstr(eng_st_find(st, "model.layers.0.w")->file, "s1.safetensors"));
    eng_st_close(st);
}

static void expect_index_error(const char *frag1, const char *frag2)
{
    char err[512] = "";
    eng_st *st = eng_st_open_index(tmp_path("model.safetensors.index.json"), err, sizeof err);
    cr_assert_null(st, "opened; expected '%s'", frag1);
    cr_assert(strstr(err, frag1), "message '%s' lacks '%s'", err, frag1);
    if (frag2)
        cr_assert(strstr(err, frag2), "message '%s' lacks '%s'", err, frag2);
}

Test(safetensors, index_errors)
{
    write_two_shards();
    write_index("{\"weight_map\":");
    expect_index_error("model.safetensors.index.json", "line");
    write_index("{\"metadata\":{}}");
    expect_index_error("weight_map: expected a non-empty object", NULL);
    write_index("{\"weight_map\":{}}");
    expect_index_error("weight_map: expected a non-empty object", NULL);
    write_index("{\"weight_map\":{\"model.norm\":\"../s2.safetensors\"}}");
    expect_index_error("weight_map['model.norm']", "../s2.safetensors");
    write_index("{\"weight_map\":{\"model.norm\":7}}");
    expect_index_error("weight_map['model.norm']", "an integer");
    write_index("{\"weight_map\":{\"model.norm\":\"s3.safetensors\"}}");
    expect_index_error("s3.safetensors", "cannot open");
    write_index("{\"weight_map\":{\"model.norm\":\"s1.safetensors\",\"lm_head.weight\":\"s2.safetensors\"}}");
    expect_index_error("puts tensor 'model.norm' in s1.safetensors, but it is in", "s2.safetensors");
    write_index("{\"weight_map\":{\"nothere\":\"s1.safetensors\"}}");
    expect_index_error("tensor 'nothere'", "no such tensor");
    /* the same tensor in two shards */
    write_st(tmp_path("s3.safetensors"), &rt_tensors[1], 1, NULL);
    write_index("{\"weight_map\":{\"model.norm\":\"s2.safetensors\",\"x\":\"s3.safetensors\"}}");
    expect_index_error("tensor 'model.norm' is in both", "s3.safetensors");
    /* a corrupt shard names the shard */
    write_bytes(tmp_path("s1.safetensors"), "\x02\0\0\0\0\0\0\0{", 9);
    write_index("{\"weight_map\":{\"model.layers.0.w\":\"s1.safetensors\"}}");
    expect_index_error("s1.safetensors", "truncated");
}
