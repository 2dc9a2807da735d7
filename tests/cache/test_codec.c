/* test_codec.c: the codecs against numpy (tests/fixtures/cache/codec_ref.bin,
 * made by tools/gen_cache_fixtures.py): f32 -> f16 round to nearest even on
 * 20,000 values (ties, subnormals, overflow, random bit patterns), f16 -> f32
 * for all 65,536 halves, and the int8 codec's dequantized values; each through
 * the portable conversion and through a pool with the portable and the AVX2
 * (F16C) kernels, in the K (dimension-major) and V (token-major) layouts. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/codec.h"
#include "cache/kvcache.h"

typedef struct {
    uint32_t n_f2h;
    float *f2h_in;        /* (n_f2h) */
    uint16_t *f2h_out;    /* (n_f2h) */
    float *h2f;           /* (65536) */
    uint32_t n_vec, dim;
    float *x, *dq;        /* (n_vec, dim) */
} fixture;

static void *read_n(FILE *f, size_t size, size_t n) {
    void *p = malloc(size * n);
    cr_assert(p && fread(p, size, n, f) == n, "codec_ref.bin is truncated");
    return p;
}

static fixture load_fixture(void) {
    const char *path = "tests/fixtures/cache/codec_ref.bin";
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot open %s (run the tests from the repository root)", path);
    fixture fx;
    cr_assert_eq(fread(&fx.n_f2h, 4, 1, f), 1);
    fx.f2h_in = read_n(f, 4, fx.n_f2h);
    fx.f2h_out = read_n(f, 2, fx.n_f2h);
    fx.h2f = read_n(f, 4, 65536);
    cr_assert_eq(fread(&fx.n_vec, 4, 1, f), 1);
    cr_assert_eq(fread(&fx.dim, 4, 1, f), 1);
    fx.x = read_n(f, 4, (size_t)fx.n_vec * fx.dim);
    fx.dq = read_n(f, 4, (size_t)fx.n_vec * fx.dim);
    fclose(f);
    return fx;
}

static void free_fixture(fixture *fx) {
    free(fx->f2h_in), free(fx->f2h_out), free(fx->h2f), free(fx->x), free(fx->dq);
}

static uint32_t bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

Test(codec, f32_to_f16_matches_numpy) {
    fixture fx = load_fixture();
    cr_assert_gt(fx.n_f2h, 10000);
    for (uint32_t i = 0; i < fx.n_f2h; i++)
        cr_assert_eq(kvc__f32_to_f16(fx.f2h_in[i]), fx.f2h_out[i], "%a (0x%08x): got 0x%04x, numpy 0x%04x",
                     fx.f2h_in[i], bits(fx.f2h_in[i]), kvc__f32_to_f16(fx.f2h_in[i]), fx.f2h_out[i]);
    uint16_t h = kvc__f32_to_f16(NAN);
    cr_expect((h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0, "NaN stays NaN: 0x%04x", h);
    free_fixture(&fx);
}

Test(codec, f16_to_f32_matches_numpy_for_every_half) {
    fixture fx = load_fixture();
    for (uint32_t h = 0; h < 65536; h++) {
        float got = kvc__f16_to_f32((uint16_t)h), want = fx.h2f[h];
        if (isnan(want)) cr_assert(isnan(got), "0x%04x", h);
        else cr_assert_eq(bits(got), bits(want), "0x%04x: got %a, numpy %a", h, got, want);
    }
    free_fixture(&fx);
}

/* Writes rows (n, dim) of values as K and V of one kv head, reads them back. */
static void roundtrip(const char *codec, int force_scalar, int block_size, const float *x, int n, int dim,
                      float *k_out, float *v_out) {
    kvc_config c = {.n_layer = 2, .n_kv_head = 1, .head_dim = dim, .block_size = block_size,
                    .memory_bytes = (size_t)(n + block_size) * 2 * 2 * dim * 4 + (1 << 16),
                    .k_codec = codec, .v_codec = codec, .force_scalar = force_scalar};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, n), KVC_OK);
    cr_assert_eq(kvc_write(pool, &s, 1, 0, n, x, x, dim), KVC_OK);
    kvc_read(pool, &s, 1, 0, n, k_out, v_out, dim);
    kvc_seq_release(pool, &s);
    kvc_pool_destroy(pool);
}

Test(codec, f16_pages_match_numpy) {
    fixture fx = load_fixture();
    const int dim = 64;
    int n = (int)fx.n_f2h / dim;
    float *k = malloc(sizeof(float) * (size_t)n * dim), *v = malloc(sizeof(float) * (size_t)n * dim);
    for (int fs = 0; fs < 2; fs++) {
        roundtrip("f16", fs, 16, fx.f2h_in, n, dim, k, v);
        for (int i = 0; i < n * dim; i++) {
            float want = fx.h2f[fx.f2h_out[i]];
            cr_assert_eq(bits(k[i]), bits(want), "%s K: %a -> %a, numpy %a", fs ? "scalar" : "auto",
                         fx.f2h_in[i], k[i], want);
            cr_assert_eq(bits(v[i]), bits(want), "%s V: %a -> %a, numpy %a", fs ? "scalar" : "auto",
                         fx.f2h_in[i], v[i], want);
        }
    }
    /* an odd head size: SIMD bodies plus scalar tails */
    for (int fs = 0; fs < 2; fs++) {
        roundtrip("f16", fs, 5, fx.f2h_in, 300, 13, k, v);
        for (int i = 0; i < 300 * 13; i++) {
            float want = fx.h2f[fx.f2h_out[i]];
            cr_assert_eq(bits(k[i]), bits(want));
            cr_assert_eq(bits(v[i]), bits(want));
        }
    }
    free(k), free(v);
    free_fixture(&fx);
}

Test(codec, f32_pages_are_exact) {
    fixture fx = load_fixture();
    int n = 200, dim = 20;
    float *k = malloc(sizeof(float) * (size_t)n * dim), *v = malloc(sizeof(float) * (size_t)n * dim);
    for (int fs = 0; fs < 2; fs++) {
        roundtrip("f32", fs, 16, fx.f2h_in, n, dim, k, v);
        cr_assert_eq(memcmp(k, fx.f2h_in, sizeof(float) * (size_t)n * dim), 0);
        cr_assert_eq(memcmp(v, fx.f2h_in, sizeof(float) * (size_t)n * dim), 0);
    }
    free(k), free(v);
    free_fixture(&fx);
}

Test(codec, int8_pages_match_numpy) {
    fixture fx = load_fixture();
    int n = (int)fx.n_vec, dim = (int)fx.dim;
    float *k = malloc(sizeof(float) * (size_t)n * dim), *v = malloc(sizeof(float) * (size_t)n * dim);
    static const int blocks[] = {16, 1, 7};
    for (int b = 0; b < 3; b++)
        for (int fs = 0; fs < 2; fs++) {
            roundtrip("int8", fs, blocks[b], fx.x, n, dim, k, v);
            for (int i = 0; i < n * dim; i++) {
                cr_assert_eq(k[i], fx.dq[i], "K vec %d dim %d: %a -> %a, numpy %a", i / dim, i % dim, fx.x[i],
                             k[i], fx.dq[i]);
                cr_assert_eq(v[i], fx.dq[i], "V vec %d dim %d: %a -> %a, numpy %a", i / dim, i % dim, fx.x[i],
                             v[i], fx.dq[i]);
            }
        }
    /* the quantization error bound: half a step of the vector's scale, which is
     * amax / 127 rounded up to a half (relative 2^-10, or 2^-24 when subnormal) */
    for (int r = 0; r < n; r++) {
        double amax = 0.0;
        for (int d = 0; d < dim; d++) amax = fmax(amax, fabs(fx.x[r * dim + d]));
        double bound = 0.5 * (amax / 127.0 * (1.0 + 0x1p-10) + 0x1p-24) * (1.0 + 1e-6);
        for (int d = 0; d < dim; d++)
            cr_expect_leq(fabs((double)k[r * dim + d] - fx.x[r * dim + d]), bound, "vec %d dim %d", r, d);
    }
    free(k), free(v);
    free_fixture(&fx);
}
