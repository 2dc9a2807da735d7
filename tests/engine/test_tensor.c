/* test_tensor.c: engine/tensor.c against references made by other code.
 *
 * The expected values come from tests/fixtures/gguf/gen_quant_vectors.py:
 * numpy's float16 conversions and gguf-py's quants module (llama.cpp's Python
 * port of ggml-quants.c). Every comparison is on bits: decoders must be
 * bit-exact with ggml. */
#include <criterion/criterion.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tensor.h"

#define FIXTURES "tests/fixtures/gguf/"

static void *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open fixture %s (tests run from the repository root)", path);
    cr_assert_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    cr_assert_gt(n, 0, "%s is empty", path);
    rewind(f);
    void *buf = malloc((size_t)n);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n, "short read of %s", path);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

Test(tensor, dtype_tables_match_ggml) {
    /* ggml's type_traits (block size, type size) as published in ggml.c and
     * gguf-py's GGML_QUANT_SIZES */
    struct { eng_dtype t; const char *name; int64_t elems; size_t bytes; } want[] = {
        {ENG_F32, "f32", 1, 4},        {ENG_F16, "f16", 1, 2},
        {ENG_BF16, "bf16", 1, 2},      {ENG_Q4_0, "q4_0", 32, 18},
        {ENG_Q4_1, "q4_1", 32, 20},    {ENG_Q8_0, "q8_0", 32, 34},
        {ENG_Q4_K, "q4_K", 256, 144},  {ENG_Q6_K, "q6_K", 256, 210},
        {ENG_Q8_1, "q8_1", 32, 40},    /* kvserve's own activation layout */
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        cr_assert_str_eq(eng_dtype_name(want[i].t), want[i].name);
        cr_assert_eq(eng_dtype_block_elems(want[i].t), want[i].elems, "%s", want[i].name);
        cr_assert_eq(eng_dtype_block_bytes(want[i].t), want[i].bytes, "%s", want[i].name);
        cr_assert_eq(eng_row_bytes(want[i].t, want[i].elems * 7), want[i].bytes * 7, "%s", want[i].name);
    }
    /* codes ggml has but kvserve does not read, and out-of-range codes */
    int unknown[] = {4, 5, 6, 7, 10, 11, 13, 15, 16, 29, 31, -1, 1000};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        cr_assert_null(eng_dtype_name((eng_dtype)unknown[i]), "code %d", unknown[i]);
        cr_assert_eq(eng_dtype_block_elems((eng_dtype)unknown[i]), 0);
        cr_assert_eq(eng_dtype_block_bytes((eng_dtype)unknown[i]), 0);
        cr_assert_eq(eng_row_bytes((eng_dtype)unknown[i], 256), 0);
    }
    cr_assert_eq(eng_row_bytes(ENG_Q4_K, 576), 0, "576 is not a multiple of 256");
    cr_assert_eq(eng_row_bytes(ENG_Q4_0, 33), 0);
    cr_assert_eq(eng_row_bytes(ENG_Q4_0, -32), 0);
    cr_assert_eq(eng_row_bytes(ENG_F32, 0), 0);
    cr_assert_eq(eng_row_bytes(ENG_Q8_0, 576), 18 * 34);
    cr_assert_eq(eng_row_bytes(ENG_F32, INT64_MAX), 0, "overflow must not wrap");
    eng_tensor t = {.type = ENG_Q4_1, .ne = {576, 3}};
    cr_assert_eq(eng_tensor_bytes(&t), 18 * 20 * 3);
}

Test(tensor, fp16_to_f32_all_65536_against_numpy) {
    size_t len;
    uint8_t *ref = read_all(FIXTURES "fp16_to_f32.bin", &len);
    cr_assert_eq(len, 65536 * 4);
    int bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        uint32_t want = rd32(ref + 4 * h);
        uint32_t got = bits_of(eng_fp16_to_f32((eng_fp16_t)h));
        if (got != want && bad++ < 10)
            cr_log_error("fp16 0x%04x: got 0x%08x, numpy 0x%08x", h, got, want);
    }
    free(ref);
    cr_assert_eq(bad, 0, "%d fp16 values decoded differently from numpy", bad);
}

Test(tensor, f32_to_fp16_against_numpy) {
    size_t len;
    uint8_t *ref = read_all(FIXTURES "f32_to_fp16.bin", &len);
    uint32_t n = rd32(ref);
    cr_assert_eq(len, 4 + (size_t)n * 6);
    cr_assert_gt(n, 40000);
    int bad = 0;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p = ref + 4 + (size_t)i * 6;
        uint32_t in = rd32(p);
        uint16_t want = (uint16_t)(p[4] | p[5] << 8);
        uint16_t got = eng_f32_to_fp16(float_of(in));
        if (got != want && bad++ < 10)
            cr_log_error("f32 0x%08x: got 0x%04x, numpy 0x%04x", in, got, want);
    }
    free(ref);
    cr_assert_eq(bad, 0, "%d values rounded differently from numpy", bad);
}

Test(tensor, fp16_round_trip_is_identity) {
    for (uint32_t h = 0; h < 65536; h++) {
        eng_fp16_t back = eng_f32_to_fp16(eng_fp16_to_f32((eng_fp16_t)h));
        cr_assert_eq(back, h, "0x%04x -> 0x%04x", h, back);
    }
    /* a few hand-checked values */
    cr_assert_eq(eng_f32_to_fp16(1.0f), 0x3c00);
    cr_assert_eq(eng_f32_to_fp16(-2.0f), 0xc000);
    cr_assert_eq(eng_f32_to_fp16(65504.0f), 0x7bff);
    cr_assert_eq(eng_f32_to_fp16(65520.0f), 0x7c00, "tie above max half rounds to inf");
    cr_assert_eq(eng_f32_to_fp16(5.9604645e-08f), 0x0001, "2^-24: smallest subnormal");
    cr_assert_eq(eng_f32_to_fp16(2.9802322e-08f), 0x0000, "2^-25 ties to even zero");
    cr_assert_eq(eng_fp16_to_f32(0x0001), 5.9604645e-08f);
    cr_assert_eq(eng_fp16_to_f32(0x3555), 0.33325195f);
}

Test(tensor, bf16_to_f32) {
    cr_assert_eq(eng_bf16_to_f32(0x3f80), 1.0f);
    cr_assert_eq(eng_bf16_to_f32(0xc040), -3.0f);
    cr_assert_eq(bits_of(eng_bf16_to_f32(0x7fc1)), 0x7fc10000u);
    for (uint32_t h = 0; h < 65536; h += 97)
        cr_assert_eq(bits_of(eng_bf16_to_f32((eng_bf16_t)h)), h << 16);
}

/* Decodes every row of quant_<name>.bin and compares bits with gguf-py. */
static void check_quant_fixture(const char *name, eng_dtype type) {
    char path[256];
    snprintf(path, sizeof path, FIXTURES "quant_%s.bin", name);
    size_t len;
    uint8_t *buf = read_all(path, &len);
    cr_assert(len >= 20 && memcmp(buf, "KVQV", 4) == 0, "%s: bad header", path);
    uint32_t code = rd32(buf + 4), n_rows = rd32(buf + 8), n = rd32(buf + 12), row_bytes = rd32(buf + 16);
    cr_assert_eq(code, (uint32_t)type, "%s: type code", path);
    cr_assert_eq(row_bytes, eng_row_bytes(type, n), "%s: row bytes", path);
    cr_assert_eq(len, 20 + (size_t)n_rows * row_bytes + (size_t)n_rows * n * 4, "%s: size", path);
    const uint8_t *raw = buf + 20;
    const uint8_t *expect = raw + (size_t)n_rows * row_bytes;
    float *row = malloc(n * sizeof *row);
    void *src = malloc(row_bytes);  /* aligned copy: the fixture packs rows tightly */
    int bad = 0;
    for (uint32_t r = 0; r < n_rows; r++) {
        memcpy(src, raw + (size_t)r * row_bytes, row_bytes);
        cr_assert_eq(eng_dequantize_row(type, src, row, n), 0);
        for (uint32_t i = 0; i < n; i++) {
            uint32_t want = rd32(expect + ((size_t)r * n + i) * 4);
            if (bits_of(row[i]) != want && bad++ < 10)
                cr_log_error("%s row %u elem %u: got %a (0x%08x), gguf-py %a (0x%08x)", name, r, i,
                             (double)row[i], bits_of(row[i]), (double)float_of(want), want);
        }
    }
    cr_assert_eq(bad, 0, "%s: %d values differ from gguf-py", name, bad);
    free(src);
    free(row);
    free(buf);
}

Test(tensor, dequant_f32) { check_quant_fixture("f32", ENG_F32); }
Test(tensor, dequant_f16) { check_quant_fixture("f16", ENG_F16); }
Test(tensor, dequant_bf16) { check_quant_fixture("bf16", ENG_BF16); }
Test(tensor, dequant_q4_0) { check_quant_fixture("q4_0", ENG_Q4_0); }
Test(tensor, dequant_q4_1) { check_quant_fixture("q4_1", ENG_Q4_1); }
Test(tensor, dequant_q8_0) { check_quant_fixture("q8_0", ENG_Q8_0); }
Test(tensor, dequant_q4_K) { check_quant_fixture("q4_K", ENG_Q4_K); }
Test(tensor, dequant_q6_K) { check_quant_fixture("q6_K", ENG_Q6_K); }

Test(tensor, dequant_q8_1_uses_float_scale) {
    eng_block_q8_1 b = {.d = 0.5f, .s = 0};
    for (int i = 0; i < ENG_QK; i++)
        b.qs[i] = (int8_t)(i - 16);
    float y[ENG_QK];
    cr_assert_eq(eng_dequantize_row(ENG_Q8_1, &b, y, ENG_QK), 0);
    for (int i = 0; i < ENG_QK; i++)
        cr_assert_eq(y[i], 0.5f * (float)(i - 16));
}

Test(tensor, dequant_rejects_bad_arguments) {
    uint8_t blk[256] = {0};
    float y[256];
    cr_assert_eq(eng_dequantize_row((eng_dtype)13, blk, y, 256), -1, "q5_K is not supported");
    cr_assert_eq(eng_dequantize_row((eng_dtype)99, blk, y, 32), -1);
    cr_assert_eq(eng_dequantize_row(ENG_Q4_0, blk, y, 48), -1, "48 is not a block multiple");
    cr_assert_eq(eng_dequantize_row(ENG_Q4_K, blk, y, 32), -1);
}

Test(tensor, free_owned_and_borrowed) {
    eng_tensor t = {.type = ENG_F32, .ne = {4, 2}, .data = malloc(32), .owned = true};
    eng_tensor_free(&t);  /* ASan reports a leak if not freed */
    cr_assert_null(t.data);
    cr_assert_eq(t.ne[0], 0);
    cr_assert_eq(t.owned, false);
    float borrowed[8];
    eng_tensor u = {.type = ENG_F32, .ne = {4, 2}, .data = borrowed, .owned = false};
    eng_tensor_free(&u);  /* must not free a stack buffer */
    cr_assert_null(u.data);
    eng_tensor_free(NULL);
}
