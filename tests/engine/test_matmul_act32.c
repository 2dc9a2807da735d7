/* test_matmul_act32.c: block-quantized weights x f32 activations (the exact
 * reference mode): results against a double-precision product over the
 * weights decoded by eng_dequantize_row (tensor.c, checked bit-exactly against
 * the gguf package), on both kernel sets; and batch invariance, for this mode
 * and for the default 16-bit one: a token's outputs are bit-identical
 * whatever else is in the batch and however many threads run it. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine/matmul.h"
#include "engine/matmul_internal.h"

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t next_u32(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 11);
}
static float uniform(void) { return (float)(next_u32() & 0xFFFFFF) / 16777216.0f * 2.0f - 1.0f; }

/* A random matrix of `type`: random quants, scales in a realistic range. */
static eng_tensor random_weights(eng_dtype type, int64_t n_in, int64_t n_out) {
    size_t rb = eng_row_bytes(type, n_in), bs = eng_dtype_block_bytes(type);
    uint8_t *w = malloc(rb * (size_t)n_out);
    for (size_t i = 0; i < rb * (size_t)n_out; i++)
        w[i] = (uint8_t)next_u32();
    for (size_t off = 0; off < rb * (size_t)n_out; off += bs) {
        eng_fp16_t d = eng_f32_to_fp16(0.01f + 0.02f * fabsf(uniform()));
        eng_fp16_t m = eng_f32_to_fp16(-0.1f * fabsf(uniform()));
        memcpy(w + off, &d, 2);
        if (type == ENG_Q4_1)
            memcpy(w + off + 2, &m, 2);
    }
    return (eng_tensor){.type = type, .ne = {n_in, n_out}, .data = w, .owned = true};
}

static void check_type(eng_dtype type, const char *isa) {
    cr_assert_eq(eng_matmul_force_isa(isa), 0);
    eng_matmul_set_activations(ENG_ACT_F32);
    const int64_t n_in = 576, n_out = 37;
    eng_tensor w = random_weights(type, n_in, n_out);
    eng_threadpool *tp = eng_threadpool_create(2);
    const int T = 11;
    float *x = malloc(sizeof(float) * (size_t)(n_in * T)), *y = malloc(sizeof(float) * (size_t)(n_out * T));
    float *row = malloc(sizeof(float) * (size_t)n_in);
    for (int64_t i = 0; i < n_in * T; i++)
        x[i] = uniform() * (i % 97 == 0 ? 30.0f : 1.0f); /* a few outliers, as real activations have */
    eng_matmul(tp, &w, x, T, y, n_out);
    double worst = 0;
    for (int64_t r = 0; r < n_out; r++) {
        cr_assert_eq(eng_dequantize_row(type, (const char *)w.data + eng_row_bytes(type, n_in) * (size_t)r, row, n_in), 0);
        for (int t = 0; t < T; t++) {
            double ref = 0, mag = 0;
            for (int64_t i = 0; i < n_in; i++) {
                ref += (double)row[i] * x[t * n_in + i];
                mag += fabs((double)row[i] * x[t * n_in + i]);
            }
            worst = fmax(worst, fabs(y[t * n_out + r] - ref) / mag);
        }
    }
    cr_expect_lt(worst, 1e-6, "%s %s: error %.3g relative to sum |w x|", eng_dtype_name(type), isa, worst);
    eng_threadpool_destroy(tp);
    eng_tensor_free(&w);
    free(x);
    free(y);
    free(row);
    eng_matmul_force_isa(NULL);
}

Test(matmul_act32, q4_0_avx2) { check_type(ENG_Q4_0, "avx2"); }
Test(matmul_act32, q4_1_avx2) { check_type(ENG_Q4_1, "avx2"); }
Test(matmul_act32, q8_0_avx2) { check_type(ENG_Q8_0, "avx2"); }
Test(matmul_act32, q4_0_scalar) { check_type(ENG_Q4_0, "scalar"); }
Test(matmul_act32, q4_1_scalar) { check_type(ENG_Q4_1, "scalar"); }
Test(matmul_act32, q8_0_scalar) { check_type(ENG_Q8_0, "scalar"); }

/* Token t's outputs computed alone and inside batches of several sizes, with
 * 1 and 2 threads, are bit-identical (in activation mode `mode`); `packed`:
 * with the batched kernels' packed copy of the weights (eng_weight_pack),
 * which batches of 4 or more tokens then read. 70 rows: the last 16-row
 * panel is partial. */
static void check_invariance_packed(const char *isa, eng_act_mode mode, eng_dtype type, int64_t n_in,
                                    bool packed) {
    cr_assert_eq(eng_matmul_force_isa(isa), 0);
    eng_matmul_set_activations(mode);
    const int64_t n_out = 70;
    eng_tensor w = random_weights(type, n_in, n_out);
    if (packed) {
        char err[128];
        cr_assert_eq(eng_weight_pack(&w, err, sizeof err), 0, "%s", err);
        cr_assert_not_null(w.packed, "%s: not packed", eng_dtype_name(type));
    }
    const int max_t = 130;
    float *x = malloc(sizeof(float) * (size_t)(n_in * max_t));
    float *alone = malloc(sizeof(float) * (size_t)(n_out * max_t)), *y = malloc(sizeof(float) * (size_t)(n_out * max_t));
    for (int64_t i = 0; i < n_in * max_t; i++)
        x[i] = uniform();
    eng_threadpool *tp1 = eng_threadpool_create(1), *tp2 = eng_threadpool_create(2);
    for (int t = 0; t < max_t; t++)
        eng_matmul(tp1, &w, x + (int64_t)t * n_in, 1, alone + (int64_t)t * n_out, n_out);
    const int sizes[] = {2, 3, 4, 5, 17, 64, 65, 130};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        eng_matmul(sizes[k] % 2 ? tp1 : tp2, &w, x, sizes[k], y, n_out);
        cr_expect_eq(memcmp(y, alone, sizeof(float) * (size_t)(n_out * sizes[k])), 0,
                     "%s %s mode %d n_in %lld: batch of %d differs from tokens alone", isa,
                     eng_dtype_name(type), (int)mode, (long long)n_in, sizes[k]);
    }
    eng_threadpool_destroy(tp1);
    eng_threadpool_destroy(tp2);
    eng_tensor_free(&w);
    free(x);
    free(alone);
    free(y);
    eng_matmul_set_activations(ENG_ACT_F32);
    eng_matmul_force_isa(NULL);
}

static void check_invariance(const char *isa, eng_act_mode mode, eng_dtype type, int64_t n_in) {
    check_invariance_packed(isa, mode, type, n_in, false);
}

Test(matmul_act32, batch_invariant_avx2) { check_invariance("avx2", ENG_ACT_F32, ENG_Q4_1, 1536); }
Test(matmul_act32, batch_invariant_scalar) { check_invariance("scalar", ENG_ACT_F32, ENG_Q4_1, 1536); }

/* 16-bit activations (the default): the row kernel (decode, batch tails)
 * and the 8-token group kernel must give the same bits; rows longer than
 * the group kernel's 64-block chunk too. */
Test(matmul_act32, batch_invariant_q16_avx2) {
    check_invariance("avx2", ENG_ACT_Q16, ENG_Q4_1, 1536);
    check_invariance("avx2", ENG_ACT_Q16, ENG_Q4_0, 576);
    check_invariance("avx2", ENG_ACT_Q16, ENG_Q8_0, 576);
    check_invariance("avx2", ENG_ACT_Q16, ENG_Q4_1, 4160);
}

/* The same with packed weights: the packed panel kernel gives the bits of
 * the row kernel that reads the original blocks. */
Test(matmul_act32, batch_invariant_q16_packed) {
    const eng_dtype types[] = {ENG_Q4_1, ENG_Q4_0, ENG_Q8_0};
    for (int i = 0; i < 3; i++) {
        check_invariance_packed("avx2", ENG_ACT_Q16, types[i], 576, true);
        check_invariance_packed("avx2", ENG_ACT_Q16, types[i], 4160, true);
    }
}
/* The avx512 set (where the CPU has AVX-512 VNNI): its packed panel kernel
 * gives the bits of the AVX2 row kernel, and with packing off it hands the
 * batch to the AVX2 panel kernel. */
Test(matmul_act32, batch_invariant_q16_avx512) {
    if (eng_matmul_force_isa("avx512") != 0)
        cr_skip_test("this CPU has no AVX-512 VNNI");
    eng_matmul_force_isa(NULL);
    const eng_dtype types[] = {ENG_Q4_1, ENG_Q4_0, ENG_Q8_0};
    for (int i = 0; i < 3; i++) {
        check_invariance_packed("avx512", ENG_ACT_Q16, types[i], 576, true);
        check_invariance_packed("avx512", ENG_ACT_Q16, types[i], 4160, true);
        check_invariance_packed("avx512", ENG_ACT_Q16, types[i], 576, false);
    }
}
Test(matmul_act32, batch_invariant_q16_scalar) { check_invariance("scalar", ENG_ACT_Q16, ENG_Q4_1, 1536); }
