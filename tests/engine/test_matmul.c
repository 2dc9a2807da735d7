/* test_matmul.c: engine/matmul.c, engine/matmul_avx2.c and
 * engine/matmul_avx512.c against references computed here.
 *
 * Products: for every runtime type, random weights (raw random blocks for the
 * quantized types, so every nibble and -128 occur) times random activations,
 * over shapes that hit every tile remainder (n_tok 1, 3, 13, 17, 64; odd row
 * counts), with no pool and with 2- and 3-thread pools, on every kernel set
 * this CPU has (the avx512 set's batched kernels read packed weights, so its
 * tests pack them).
 * The reference is a double-precision dot product of the weights decoded by
 * eng_dequantize_row (tensor.c, itself checked bit-exact against gguf-py) and,
 * for quantized weights, of the activations quantized by this file's own copy
 * of the documented rule (d = max|x| / qmax, q = nearest-even(x * (1/d)),
 * qmax 127 or 32767).
 * Kernels differ from it only by float rounding, so the tolerance is 2e-6 of
 * the sum of |terms|: a wrong block, nibble, scale or tile gives O(1) errors.
 *
 * These tests cover the 8-bit activation path (ENG_ACT_Q8, set for the whole
 * suite) and the 16-bit one (ENG_ACT_Q16, the *_q16_* tests); the
 * f32-activation path and batch invariance have their own tests
 * (test_matmul_act32.c).
 *
 * Weight conversion: Q4_K / Q6_K -> Q8_0 must equal gguf-py's
 * quantize(dequantize(row), Q8_0) byte for byte (fixtures in
 * tests/fixtures/matmul/, see gen_kquant_q8_0.py). */
#include <criterion/criterion.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/matmul.h"
#include "engine/matmul_internal.h"
#include "engine/tensor.h"
#include "engine/threadpool.h"

#define FIXTURES "tests/fixtures/matmul/"

/* ---- helpers ------------------------------------------------------------- */

static void use_q8_activations(void) {
    eng_matmul_set_activations(ENG_ACT_Q8);
}

TestSuite(matmul, .init = use_q8_activations);

static uint64_t rng_state;

static uint64_t rnd(void) {  /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float rnd_uniform(float lo, float hi) {
    return lo + (hi - lo) * (float)((rnd() >> 40) * (1.0 / 16777216.0));
}

/* A finite fp16 scale of either sign with magnitude in [2^lo, 2^hi). */
static eng_fp16_t rnd_scale(float lo, float hi) {
    float v = exp2f(rnd_uniform(lo, hi));
    return eng_f32_to_fp16(rnd() & 1 ? v : -v);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    cr_assert_not_null(p);
    return p;
}

/* Random weights of `type`, n_out rows of n_in. */
static eng_tensor random_weights(eng_dtype type, int64_t n_in, int64_t n_out) {
    const size_t rb = eng_row_bytes(type, n_in);
    cr_assert_gt(rb, 0);
    uint8_t *data = xmalloc(rb * (size_t)n_out);
    for (size_t i = 0; i < rb * (size_t)n_out; i++)
        data[i] = (uint8_t)rnd();
    /* blocks of a quantized row, elements of a float row */
    const int64_t units = n_in / eng_dtype_block_elems(type);
    for (int64_t r = 0; r < n_out; r++) {
        uint8_t *row = data + r * rb;
        for (int64_t b = 0; b < units; b++) {
            switch (type) {
            case ENG_Q4_0: ((eng_block_q4_0 *)row)[b].d = rnd_scale(-8, -2); break;
            case ENG_Q4_1:
                ((eng_block_q4_1 *)row)[b].d = rnd_scale(-8, -2);
                ((eng_block_q4_1 *)row)[b].m = rnd_scale(-6, 0);
                break;
            case ENG_Q8_0: ((eng_block_q8_0 *)row)[b].d = rnd_scale(-10, -4); break;
            case ENG_F32: ((float *)row)[b] = rnd_uniform(-1, 1); break;
            case ENG_F16: ((eng_fp16_t *)row)[b] = eng_f32_to_fp16(rnd_uniform(-1, 1)); break;
            default: cr_assert_fail("no generator for type %d", type);
            }
        }
    }
    return (eng_tensor){.type = type, .ne = {n_in, n_out}, .data = data, .owned = true};
}

/* Activations with a different magnitude per block and a few zero blocks. */
static float *random_activations(int n_tok, int64_t n_in) {
    float *x = xmalloc((size_t)n_tok * (size_t)n_in * sizeof *x);
    for (int t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < n_in; i += 32) {
            const float scale = exp2f(rnd_uniform(-4, 4));
            const bool zero = rnd() % 13 == 0;
            for (int64_t j = i; j < i + 32 && j < n_in; j++)
                x[t * n_in + j] = zero ? 0.0f : scale * rnd_uniform(-1, 1);
        }
    return x;
}

/* The activation mode under test: ENG_ACT_Q8 (the suite's default) or
 * ENG_ACT_Q16; its largest quantized magnitude. */
static eng_act_mode act_mode = ENG_ACT_Q8;

static int act_qmax(void) {
    return act_mode == ENG_ACT_Q16 ? 32767 : 127;
}

/* The documented activation quantization, written independently:
 * d = max|x| / qmax, q = x * (1 / d) rounded to nearest even. */
static void ref_quantize(const float *x, int64_t n, int32_t *q, float *d_out) {
    for (int64_t b = 0; b < n / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++)
            if (fabsf(x[b * 32 + j]) > amax)
                amax = fabsf(x[b * 32 + j]);
        const float d = amax / (float)act_qmax();
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        for (int j = 0; j < 32; j++)
            q[b * 32 + j] = (int32_t)nearbyintf(x[b * 32 + j] * id);
        d_out[b] = d;
    }
}

/* Offset magnitude of block b of a quantized row (enters through s). */
static double block_offset(const eng_tensor *w, int64_t r, int64_t b) {
    const uint8_t *row = (const uint8_t *)w->data + r * eng_row_bytes(w->type, w->ne[0]);
    if (w->type == ENG_Q4_1)
        return fabs(eng_fp16_to_f32(((const eng_block_q4_1 *)row)[b].m));
    if (w->type == ENG_Q4_0)
        return 8.0 * fabs(eng_fp16_to_f32(((const eng_block_q4_0 *)row)[b].d));
    return 0.0;
}

/* Checks eng_matmul(w, x) against the double reference; returns the worst
 * error relative to the tolerance. */
static double check_matmul(eng_threadpool *tp, const eng_tensor *w, int n_tok, const char *what) {
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    const bool quantized = eng_dtype_block_elems(w->type) == 32;
    float *x = random_activations(n_tok, n_in);
    /* the activations the kernels see */
    double *xa = xmalloc((size_t)n_tok * (size_t)n_in * sizeof *xa);
    if (quantized) {
        int32_t *q = xmalloc((size_t)n_in * sizeof *q);
        float *d = xmalloc((size_t)(n_in / 32) * sizeof *d);
        for (int t = 0; t < n_tok; t++) {
            ref_quantize(x + t * n_in, n_in, q, d);
            for (int64_t i = 0; i < n_in; i++)
                xa[t * n_in + i] = (double)q[i] * d[i / 32];
        }
        free(q);
        free(d);
    } else {
        for (int64_t i = 0; i < n_tok * n_in; i++)
            xa[i] = x[i];
    }
    float *wrow = xmalloc((size_t)n_in * sizeof *wrow);
    double *ref = xmalloc((size_t)n_tok * (size_t)n_out * sizeof *ref);
    double *mag = xmalloc((size_t)n_tok * (size_t)n_out * sizeof *mag);
    for (int64_t r = 0; r < n_out; r++) {
        cr_assert_eq(eng_dequantize_row(w->type, (const uint8_t *)w->data + r * eng_row_bytes(w->type, n_in),
                                        wrow, n_in), 0);
        for (int t = 0; t < n_tok; t++) {
            double s = 0, a = 0, off = 0;
            for (int64_t i = 0; i < n_in; i++) {
                s += (double)wrow[i] * xa[t * n_in + i];
                if (quantized && i % 32 == 0)
                    off = block_offset(w, r, i / 32);
                a += (fabs((double)wrow[i]) + off) * fabs(xa[t * n_in + i]);
            }
            ref[t * n_out + r] = s;
            mag[t * n_out + r] = a;
        }
    }
    /* y has padding columns that must stay untouched */
    const int64_t stride = n_out + 3;
    float *y = xmalloc((size_t)n_tok * (size_t)stride * sizeof *y);
    for (int64_t i = 0; i < n_tok * stride; i++)
        y[i] = 12345.0f;
    eng_matmul(tp, w, x, n_tok, y, stride);
    double worst = 0;
    for (int t = 0; t < n_tok; t++) {
        for (int64_t r = 0; r < n_out; r++) {
            const double tol = 2e-6 * mag[t * n_out + r] + 1e-30;
            const double err = fabs((double)y[t * stride + r] - ref[t * n_out + r]);
            cr_assert(err <= tol, "%s: y[tok %d][row %lld] = %.9g, reference %.9g (err %.3g > tol %.3g)",
                      what, t, (long long)r, y[t * stride + r], ref[t * n_out + r], err, tol);
            if (err / tol > worst)
                worst = err / tol;
        }
        for (int64_t r = n_out; r < stride; r++)
            cr_assert_eq(y[t * stride + r], 12345.0f, "%s: padding column %lld of token %d written",
                         what, (long long)r, t);
    }
    free(x);
    free(xa);
    free(wrow);
    free(ref);
    free(mag);
    free(y);
    return worst;
}

/* packed: the weights also get the batched kernels' packed copy
 * (eng_weight_pack), which batches of 2 or more tokens then read. */
static void run_type_ex(eng_dtype type, const char *isa, bool packed) {
    rng_state = 0x1234 + (uint64_t)type;
    cr_assert_eq(eng_matmul_force_isa(isa), 0, "kernel set %s unavailable", isa);
    cr_assert_str_eq(eng_matmul_isa(), isa);
    const bool quantized = eng_dtype_block_elems(type) == 32;
    const int64_t ins_q[] = {32, 96, 576};
    const int64_t ins_f[] = {13, 40, 576};
    const int64_t outs[] = {1, 7, 34, 67};
    const int toks[] = {1, 3, 13, 17, 64};
    eng_threadpool *pools[3] = {NULL, eng_threadpool_create(2), eng_threadpool_create(3)};
    cr_assert_not_null(pools[1]);
    cr_assert_not_null(pools[2]);
    double worst = 0;
    int combo = 0;
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 4; b++)
            for (int c = 0; c < 5; c++, combo++) {
                const int64_t n_in = quantized ? ins_q[a] : ins_f[a];
                eng_tensor w = random_weights(type, n_in, outs[b]);
                if (packed) {
                    char err[128];
                    cr_assert_eq(eng_weight_pack(&w, err, sizeof err), 0, "%s", err);
                    cr_assert_not_null(w.packed, "%s: not packed", eng_dtype_name(type));
                }
                char what[128];
                snprintf(what, sizeof what, "%s%s %s [%lld x %lld] n_tok %d pool %d", isa, packed ? " packed" : "",
                         eng_dtype_name(type), (long long)n_in, (long long)outs[b], toks[c],
                         eng_threadpool_size(pools[combo % 3]));
                double e = check_matmul(pools[combo % 3], &w, toks[c], what);
                if (e > worst)
                    worst = e;
                eng_tensor_free(&w);
            }
    cr_log_info("%s %s q%d: worst error %.3f of tolerance", isa, eng_dtype_name(type),
                act_mode == ENG_ACT_Q16 ? 16 : 8, worst);
    eng_threadpool_destroy(pools[1]);
    eng_threadpool_destroy(pools[2]);
    eng_matmul_force_isa(NULL);
}

static void run_type(eng_dtype type, const char *isa) {
    run_type_ex(type, isa, false);
}

static bool have_avx2(void) {
    return eng_matmul_force_isa("avx2") == 0 && eng_matmul_force_isa(NULL) == 0;
}

static bool have_avx512(void) {
    return eng_matmul_force_isa("avx512") == 0 && eng_matmul_force_isa(NULL) == 0;
}

/* ---- products ------------------------------------------------------------ */

Test(matmul, q4_1_scalar) { run_type(ENG_Q4_1, "scalar"); }
Test(matmul, q4_0_scalar) { run_type(ENG_Q4_0, "scalar"); }
Test(matmul, q8_0_scalar) { run_type(ENG_Q8_0, "scalar"); }
Test(matmul, f32_scalar) { run_type(ENG_F32, "scalar"); }
Test(matmul, f16_scalar) { run_type(ENG_F16, "scalar"); }

#define AVX2_TEST(name, type)                                                \
    Test(matmul, name) {                                                     \
        if (!have_avx2())                                                    \
            cr_skip_test("this CPU has no AVX2+FMA+F16C");                   \
        run_type(type, "avx2");                                              \
    }
AVX2_TEST(q4_1_avx2, ENG_Q4_1)
AVX2_TEST(q4_0_avx2, ENG_Q4_0)
AVX2_TEST(q8_0_avx2, ENG_Q8_0)
AVX2_TEST(f32_avx2, ENG_F32)
AVX2_TEST(f16_avx2, ENG_F16)

/* 16-bit activations: the same products against the same double reference,
 * with the activations quantized to 16 bits. */
static void run_type16(eng_dtype type, const char *isa) {
    act_mode = ENG_ACT_Q16;
    eng_matmul_set_activations(ENG_ACT_Q16);
    run_type(type, isa);
    act_mode = ENG_ACT_Q8;
    eng_matmul_set_activations(ENG_ACT_Q8);
}

Test(matmul, q4_1_q16_scalar) { run_type16(ENG_Q4_1, "scalar"); }
Test(matmul, q4_0_q16_scalar) { run_type16(ENG_Q4_0, "scalar"); }
Test(matmul, q8_0_q16_scalar) { run_type16(ENG_Q8_0, "scalar"); }

#define AVX2_TEST16(name, type)                                              \
    Test(matmul, name) {                                                     \
        if (!have_avx2())                                                    \
            cr_skip_test("this CPU has no AVX2+FMA+F16C");                   \
        run_type16(type, "avx2");                                            \
    }
AVX2_TEST16(q4_1_q16_avx2, ENG_Q4_1)
AVX2_TEST16(q4_0_q16_avx2, ENG_Q4_0)
AVX2_TEST16(q8_0_q16_avx2, ENG_Q8_0)

/* The batched kernels read packed weights: AVX2's and, where the CPU has
 * AVX-512 VNNI, the avx512 set's (its only kernels of its own), with every
 * partial panel (1, 7, 34, 67 rows) and token tile (1, 3, 13, 17, 64). */
static void run_type16_packed(eng_dtype type, const char *isa) {
    act_mode = ENG_ACT_Q16;
    eng_matmul_set_activations(ENG_ACT_Q16);
    run_type_ex(type, isa, true);
    act_mode = ENG_ACT_Q8;
    eng_matmul_set_activations(ENG_ACT_Q8);
}

#define PACKED_TEST16(name, type, isa, have)                                 \
    Test(matmul, name) {                                                     \
        if (!have())                                                         \
            cr_skip_test("this CPU has no " isa " kernel set");              \
        run_type16_packed(type, isa);                                        \
    }
PACKED_TEST16(q4_1_q16_avx2_packed, ENG_Q4_1, "avx2", have_avx2)
PACKED_TEST16(q4_0_q16_avx2_packed, ENG_Q4_0, "avx2", have_avx2)
PACKED_TEST16(q8_0_q16_avx2_packed, ENG_Q8_0, "avx2", have_avx2)
PACKED_TEST16(q4_1_q16_avx512_packed, ENG_Q4_1, "avx512", have_avx512)
PACKED_TEST16(q4_0_q16_avx512_packed, ENG_Q4_0, "avx512", have_avx512)
PACKED_TEST16(q8_0_q16_avx512_packed, ENG_Q8_0, "avx512", have_avx512)

/* 16-bit activations keep what 8 bits lose: a block with one outlier 100
 * times its other values. With 8 bits those values keep about one bit; with
 * 16 bits the error of their part of the product stays within 2e-3 and far
 * below the 8-bit one. */
Test(matmul, q16_keeps_values_beside_an_outlier) {
    rng_state = 777;
    eng_tensor w = random_weights(ENG_Q8_0, 64, 9);
    float x[64], wrow[64];
    for (int j = 0; j < 64; j++)
        x[j] = rnd_uniform(-0.01f, 0.01f);
    x[3] = 1.0f;
    float y8[9], y16[9];
    eng_matmul_set_activations(ENG_ACT_Q8);
    eng_matmul(NULL, &w, x, 1, y8, 9);
    eng_matmul_set_activations(ENG_ACT_Q16);
    eng_matmul(NULL, &w, x, 1, y16, 9);
    eng_matmul_set_activations(ENG_ACT_Q8);
    double worst8 = 0, worst16 = 0;
    for (int r = 0; r < 9; r++) {
        eng_weight_get_row(&w, r, wrow);
        double exact = 0, rest = 0;
        for (int j = 0; j < 64; j++) {
            exact += (double)wrow[j] * x[j];
            if (j != 3)
                rest += fabs((double)wrow[j] * x[j]);
        }
        /* errors relative to the part of the sum the small values make */
        worst8 = fmax(worst8, fabs(y8[r] - exact) / rest);
        worst16 = fmax(worst16, fabs(y16[r] - exact) / rest);
    }
    cr_assert(worst16 < 2e-3, "16-bit error %.3g of the small values' sum", worst16);
    cr_assert(worst8 > 20 * worst16, "8-bit error %.3g vs 16-bit %.3g: the outlier should hurt 8 bits "
              "far more", worst8, worst16);
    cr_log_info("error of the small values' part: 8-bit %.3g, 16-bit %.3g", worst8, worst16);
    eng_tensor_free(&w);
}

/* A long batch (several 64-token blocks plus a tail) and long rows (more
 * blocks than the group kernels unpack at once), on the run-time kernels
 * with a 2-thread pool. */
Test(matmul, long_batches_and_rows) {
    rng_state = 99;
    eng_threadpool *tp = eng_threadpool_create(2);
    const struct { eng_dtype type; int64_t n_in, n_out; int n_tok; } cases[] = {
        {ENG_Q4_1, 64, 10, 141}, {ENG_Q4_1, 2112, 5, 16}, {ENG_Q4_0, 4160, 3, 9},
        {ENG_Q8_0, 2112, 6, 17}, {ENG_F16, 2111, 5, 6},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        eng_tensor w = random_weights(cases[i].type, cases[i].n_in, cases[i].n_out);
        char what[96];
        snprintf(what, sizeof what, "%s [%lld x %lld] n_tok %d", eng_dtype_name(cases[i].type),
                 (long long)cases[i].n_in, (long long)cases[i].n_out, cases[i].n_tok);
        check_matmul(tp, &w, cases[i].n_tok, what);
        if (cases[i].type != ENG_F16) {
            act_mode = ENG_ACT_Q16;
            eng_matmul_set_activations(ENG_ACT_Q16);
            check_matmul(tp, &w, cases[i].n_tok, what);
            act_mode = ENG_ACT_Q8;
            eng_matmul_set_activations(ENG_ACT_Q8);
        }
        eng_tensor_free(&w);
    }
    eng_threadpool_destroy(tp);
}

/* Both kernel sets agree with each other to float rounding on the same data,
 * and the same call twice gives the same bits (no state leaks between calls). */
Test(matmul, scalar_and_avx2_agree) {
    if (!have_avx2())
        cr_skip_test("this CPU has no AVX2+FMA+F16C");
    const eng_dtype types[] = {ENG_Q4_1, ENG_Q4_0, ENG_Q8_0, ENG_F32, ENG_F16,
                               ENG_Q4_1, ENG_Q4_0, ENG_Q8_0};
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        eng_matmul_set_activations(k >= 5 ? ENG_ACT_Q16 : ENG_ACT_Q8);
        rng_state = 555 + k;
        const int n_tok = 19;
        eng_tensor w = random_weights(types[k], 160, 21);
        float *x = random_activations(n_tok, 160);
        float y[3][19 * 21];
        const char *isa[3] = {"scalar", "avx2", "avx2"};
        for (int i = 0; i < 3; i++) {
            cr_assert_eq(eng_matmul_force_isa(isa[i]), 0);
            eng_matmul(NULL, &w, x, n_tok, y[i], 21);
        }
        eng_matmul_force_isa(NULL);
        cr_assert_eq(memcmp(y[1], y[2], sizeof y[1]), 0, "%s: repeated call differs",
                     eng_dtype_name(types[k]));
        for (int i = 0; i < n_tok * 21; i++)
            cr_assert(fabsf(y[0][i] - y[1][i]) <= 1e-4f * (fabsf(y[0][i]) + 1.0f),
                      "%s: scalar %.9g vs avx2 %.9g at %d", eng_dtype_name(types[k]), y[0][i], y[1][i], i);
        free(x);
        eng_tensor_free(&w);
    }
    eng_matmul_set_activations(ENG_ACT_Q8);
}

/* ---- activation quantization --------------------------------------------- */

/* Quantized blocks of either width as (d, s, qs as int). */
static void quantize_blocks(const float *x, int64_t n, float *d, float *s, int32_t *qs) {
    if (act_mode == ENG_ACT_Q16) {
        eng_block_q16 *q = xmalloc((size_t)(n / 32) * sizeof *q);
        eng__quantize_q16(x, q, n);
        for (int64_t b = 0; b < n / 32; b++) {
            d[b] = q[b].d, s[b] = q[b].s;
            for (int j = 0; j < 32; j++)
                qs[b * 32 + j] = q[b].qs[j];
        }
        free(q);
    } else {
        eng_block_q8_1 *q = xmalloc((size_t)(n / 32) * sizeof *q);
        eng__quantize_q8_1(x, q, n);
        for (int64_t b = 0; b < n / 32; b++) {
            d[b] = q[b].d, s[b] = q[b].s;
            for (int j = 0; j < 32; j++)
                qs[b * 32 + j] = q[b].qs[j];
        }
        free(q);
    }
}

static void check_quantizer(const char *isa, eng_act_mode mode) {
    cr_assert_eq(eng_matmul_force_isa(isa), 0);
    act_mode = mode;
    const int qmax = act_qmax();
    rng_state = 4242;
    const int64_t n = 32 * 40;
    float *x = random_activations(1, n);
    x[5] = -x[5] * 1e6f;   /* an outlier */
    for (int j = 64; j < 96; j++)  /* a block of ties at 0.5 steps of d */
        x[j] = (float)(j - 80) * 0.5f;
    x[95] = (float)qmax;
    float *d = xmalloc((size_t)(n / 32) * sizeof *d), *s = xmalloc((size_t)(n / 32) * sizeof *s);
    int32_t *q = xmalloc((size_t)n * sizeof *q), *rq = xmalloc((size_t)n * sizeof *rq);
    float *rd = xmalloc((size_t)(n / 32) * sizeof *rd);
    quantize_blocks(x, n, d, s, q);
    ref_quantize(x, n, rq, rd);
    for (int64_t b = 0; b < n / 32; b++) {
        cr_assert_eq(d[b], rd[b], "%s block %lld: d %.9g, expected %.9g", isa, (long long)b, d[b], rd[b]);
        int sum = 0, amax = 0;
        for (int j = 0; j < 32; j++) {
            cr_assert_eq(q[b * 32 + j], rq[b * 32 + j], "%s block %lld value %d: %d, expected %d", isa,
                         (long long)b, j, q[b * 32 + j], rq[b * 32 + j]);
            /* the rule itself: within half a step, the largest value at +-qmax */
            cr_assert(fabsf(q[b * 32 + j] * d[b] - x[b * 32 + j]) <= 0.5001f * d[b]);
            sum += q[b * 32 + j];
            amax = abs(q[b * 32 + j]) > amax ? abs(q[b * 32 + j]) : amax;
        }
        cr_assert(amax == qmax || d[b] == 0.0f);
        cr_assert_eq(s[b], d[b] * (float)sum);
    }
    /* ties round to even: x = k/2 with d = 1 */
    cr_assert_eq(d[2], 1.0f);
    cr_assert_eq(q[2 * 32 + 80 - 64 + 1], 0);   /* 0.5 -> 0 */
    cr_assert_eq(q[2 * 32 + 80 - 64 + 3], 2);   /* 1.5 -> 2 */
    cr_assert_eq(q[2 * 32 + 80 - 64 - 1], 0);   /* -0.5 -> 0 */
    free(x);
    free(d);
    free(s);
    free(q);
    free(rq);
    free(rd);
    act_mode = ENG_ACT_Q8;
    eng_matmul_force_isa(NULL);
}

Test(matmul, quantize_scalar) { check_quantizer("scalar", ENG_ACT_Q8); }
Test(matmul, quantize_avx2) {
    if (!have_avx2())
        cr_skip_test("this CPU has no AVX2+FMA+F16C");
    check_quantizer("avx2", ENG_ACT_Q8);
}
Test(matmul, quantize16_scalar) { check_quantizer("scalar", ENG_ACT_Q16); }
Test(matmul, quantize16_avx2) {
    if (!have_avx2())
        cr_skip_test("this CPU has no AVX2+FMA+F16C");
    check_quantizer("avx2", ENG_ACT_Q16);
}

/* ---- weight preparation -------------------------------------------------- */

static void *read_all(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open fixture %s (tests run from the repository root)", path);
    cr_assert_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    cr_assert_gt(n, 0);
    rewind(f);
    void *buf = xmalloc((size_t)n);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

static void check_kquant_fixture(const char *file, eng_dtype type) {
    size_t len;
    uint8_t *buf = read_all(file, &len);
    cr_assert_eq(memcmp(buf, "KVKQ", 4), 0);
    uint32_t hdr[4];
    memcpy(hdr, buf + 4, sizeof hdr);
    cr_assert_eq(hdr[0], (uint32_t)type);
    const uint32_t n_rows = hdr[1], n_per_row = hdr[2], src_rb = hdr[3];
    cr_assert_eq(src_rb, eng_row_bytes(type, n_per_row));
    const size_t q8_bytes = (size_t)n_rows * eng_row_bytes(ENG_Q8_0, n_per_row);
    cr_assert_eq(len, 20 + (size_t)n_rows * src_rb + q8_bytes);
    /* an owned copy: prepare must free it (ASan checks) */
    void *src = xmalloc((size_t)n_rows * src_rb);
    memcpy(src, buf + 20, (size_t)n_rows * src_rb);
    eng_tensor t = {.type = type, .ne = {n_per_row, n_rows}, .data = src, .owned = true};
    char err[256] = "";
    cr_assert_eq(eng_weight_prepare(&t, err, sizeof err), 0, "%s", err);
    cr_assert_eq(t.type, ENG_Q8_0);
    cr_assert(t.owned);
    cr_assert_eq(t.ne[0], n_per_row);
    cr_assert_eq(t.ne[1], n_rows);
    cr_assert_eq(memcmp(t.data, buf + 20 + (size_t)n_rows * src_rb, q8_bytes), 0,
                 "%s -> q8_0 differs from gguf-py", eng_dtype_name(type));
    /* and the converted matrix multiplies */
    check_matmul(NULL, &t, 5, "converted k-quant");
    eng_tensor_free(&t);
    free(buf);
}

Test(matmul, prepare_q4_k_to_q8_0) { check_kquant_fixture(FIXTURES "kquant_q8_0_q4_K.bin", ENG_Q4_K); }
Test(matmul, prepare_q6_k_to_q8_0) { check_kquant_fixture(FIXTURES "kquant_q8_0_q6_K.bin", ENG_Q6_K); }

Test(matmul, prepare_bf16_to_f32) {
    /* bf16 is the top half of a float32: the conversion is exact */
    const float vals[6] = {1.0f, -2.5f, 3.140625f, 0.0f, -1e-20f, 65280.0f};
    eng_bf16_t raw[6];
    for (int i = 0; i < 6; i++) {
        uint32_t u;
        memcpy(&u, &vals[i], 4);
        raw[i] = (eng_bf16_t)(u >> 16);
    }
    eng_tensor t = {.type = ENG_BF16, .ne = {3, 2}, .data = raw, .owned = false};
    char err[256] = "";
    cr_assert_eq(eng_weight_prepare(&t, err, sizeof err), 0, "%s", err);
    cr_assert_eq(t.type, ENG_F32);
    cr_assert(t.owned);
    cr_assert_neq(t.data, (void *)raw);
    for (int i = 0; i < 6; i++) {
        uint32_t u, v;
        memcpy(&u, &vals[i], 4);
        memcpy(&v, &((float *)t.data)[i], 4);
        cr_assert_eq(v, u & 0xffff0000u, "element %d", i);
    }
    eng_tensor_free(&t);
}

Test(matmul, prepare_keeps_runtime_types_in_place) {
    const eng_dtype types[] = {ENG_F32, ENG_F16, ENG_Q8_0, ENG_Q4_0, ENG_Q4_1};
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        cr_assert(eng_weight_is_runtime(types[i]));
        eng_tensor w = random_weights(types[i], 64, 3);
        void *before = w.data;
        char err[128];
        cr_assert_eq(eng_weight_prepare(&w, err, sizeof err), 0, "%s", err);
        cr_assert_eq(w.data, before, "%s moved", eng_dtype_name(types[i]));
        cr_assert_eq(w.type, types[i]);
        eng_tensor_free(&w);
    }
    cr_assert_not(eng_weight_is_runtime(ENG_BF16));
    cr_assert_not(eng_weight_is_runtime(ENG_Q4_K));
    cr_assert_not(eng_weight_is_runtime(ENG_Q8_1));
}

Test(matmul, prepare_rejects_with_a_message) {
    uint8_t data[1024] = {0};
    char err[256];
    /* a type the kernels cannot use: the message names it */
    eng_tensor t = {.type = ENG_Q8_1, .ne = {32, 2}, .data = data};
    cr_assert_eq(eng_weight_prepare(&t, err, sizeof err), -1);
    cr_assert(strstr(err, "q8_1") != NULL, "message: %s", err);
    t = (eng_tensor){.type = (eng_dtype)6, .ne = {32, 2}, .data = data};  /* ggml Q5_0 */
    cr_assert_eq(eng_weight_prepare(&t, err, sizeof err), -1);
    cr_assert(strstr(err, "6") != NULL, "message: %s", err);
    /* a row that is not whole blocks */
    t = (eng_tensor){.type = ENG_Q4_1, .ne = {48, 2}, .data = data};
    cr_assert_eq(eng_weight_prepare(&t, err, sizeof err), -1);
    cr_assert(strstr(err, "48") != NULL && strstr(err, "q4_1") != NULL, "message: %s", err);
    t = (eng_tensor){.type = ENG_Q4_K, .ne = {128, 2}, .data = data};
    cr_assert_eq(eng_weight_prepare(&t, err, sizeof err), -1);
    cr_assert(strstr(err, "128") != NULL, "message: %s", err);
    /* empty */
    t = (eng_tensor){.type = ENG_F32, .ne = {0, 2}, .data = data};
    cr_assert_eq(eng_weight_prepare(&t, err, sizeof err), -1);
}

Test(matmul, get_row_decodes_every_type) {
    rng_state = 77;
    const eng_dtype types[] = {ENG_F32, ENG_F16, ENG_Q8_0, ENG_Q4_0, ENG_Q4_1};
    float a[96], b[96];
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        eng_tensor w = random_weights(types[i], 96, 5);
        for (int64_t r = 0; r < 5; r++) {
            eng_weight_get_row(&w, r, a);
            eng_dequantize_row(w.type, (uint8_t *)w.data + r * eng_row_bytes(w.type, 96), b, 96);
            cr_assert_eq(memcmp(a, b, sizeof a), 0, "%s row %lld", eng_dtype_name(types[i]), (long long)r);
        }
        eng_tensor_free(&w);
    }
}

Test(matmul, isa_name) {
    eng_matmul_force_isa(NULL);
    const char *isa = eng_matmul_isa();
    cr_assert(strcmp(isa, "avx512") == 0 || strcmp(isa, "avx2") == 0 || strcmp(isa, "scalar") == 0, "isa %s",
              isa);
    if (have_avx512())
        cr_assert_str_eq(isa, "avx512", "AVX-512 VNNI is here but not chosen");
    cr_assert_eq(eng_matmul_force_isa("avx512-nonsense"), -1);
}
