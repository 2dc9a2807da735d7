/* test_codec.c: the codecs.
 *
 * Against numpy (tests/fixtures/cache/codec_ref.bin, made by
 * tools/gen_cache_fixtures.py): f32 -> f16 round to nearest even on 20,000
 * values (ties, subnormals, overflow, random bit patterns), f16 -> f32 for all
 * 65,536 halves, and the int8, int4 (per token) and int4:channel codecs'
 * dequantized values; each through the portable conversion and through a pool
 * with the portable and the AVX2 kernels, in the K (dimension-major) and V
 * (token-major) layouts.
 *
 * Spec grammar: every form accepted, malformed ones rejected with the list of
 * valid specs, ranges checked. Transforms: bases orthonormal (P^T P = I), a
 * full-rank basis a lossless rotation, a rank-R round trip equal to the
 * projection P P^T x the test computes in double, within the coefficients'
 * rounding.
 *
 * Real SmolLM2 K/V: the model ($KVSERVE_MODEL) runs over the start of
 * wikitext2-test.txt with an f32 cache; its K and V of every layer go through
 * each codec and must meet the codec's error bound (f16 half an ulp, int8 half
 * a step of the token's scale, int4 half a step of the group's or channel's
 * scale, low-rank: the projection plus the coefficients' rounding), and the
 * relative errors are reported. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache/codec.h"
#include "cache/kvcache.h"
#include "engine/backend.h"
#include "engine/model.h"
#include "engine/tokenizer.h"

typedef struct {
    uint32_t n_f2h;
    float *f2h_in;        /* (n_f2h) */
    uint16_t *f2h_out;    /* (n_f2h) */
    float *h2f;           /* (65536) */
    uint32_t n_vec, dim;
    float *x, *dq;        /* (n_vec, dim) */
    uint32_t n4, dim4, block4;
    float *x4, *dq_token, *dq_channel, *dq_token64;   /* (n4, dim4) */
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
    cr_assert_eq(fread(&fx.n4, 4, 1, f), 1);
    cr_assert_eq(fread(&fx.dim4, 4, 1, f), 1);
    cr_assert_eq(fread(&fx.block4, 4, 1, f), 1);
    fx.x4 = read_n(f, 4, (size_t)fx.n4 * fx.dim4);
    fx.dq_token = read_n(f, 4, (size_t)fx.n4 * fx.dim4);
    fx.dq_channel = read_n(f, 4, (size_t)fx.n4 * fx.dim4);
    fx.dq_token64 = read_n(f, 4, (size_t)fx.n4 * fx.dim4);
    fclose(f);
    return fx;
}

static void free_fixture(fixture *fx) {
    free(fx->f2h_in), free(fx->f2h_out), free(fx->h2f), free(fx->x), free(fx->dq);
    free(fx->x4), free(fx->dq_token), free(fx->dq_channel), free(fx->dq_token64);
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

Test(codec, int4_pages_match_numpy) {
    fixture fx = load_fixture();
    int n = (int)fx.n4, dim = (int)fx.dim4;
    float *k = malloc(sizeof(float) * (size_t)n * dim), *v = malloc(sizeof(float) * (size_t)n * dim);
    static const int blocks[] = {16, 1, 7};
    for (int b = 0; b < 3; b++)
        for (int fs = 0; fs < 2; fs++) {
            roundtrip("int4:token", fs, blocks[b], fx.x4, n, dim, k, v);
            for (int i = 0; i < n * dim; i++) {
                cr_assert_eq(k[i], fx.dq_token[i], "block %d %s K vec %d dim %d: %a -> %a, numpy %a", blocks[b],
                             fs ? "scalar" : "auto", i / dim, i % dim, fx.x4[i], k[i], fx.dq_token[i]);
                cr_assert_eq(v[i], fx.dq_token[i], "V vec %d dim %d: %a -> %a, numpy %a", i / dim, i % dim,
                             fx.x4[i], v[i], fx.dq_token[i]);
            }
        }
    /* groups of 64 */
    for (int b = 0; b < 3; b++)
        for (int fs = 0; fs < 2; fs++) {
            roundtrip("int4:token:g64", fs, blocks[b], fx.x4, n, dim, k, v);
            cr_assert_eq(memcmp(k, fx.dq_token64, sizeof(float) * (size_t)n * dim), 0, "g64 K, block %d", blocks[b]);
            cr_assert_eq(memcmp(v, fx.dq_token64, sizeof(float) * (size_t)n * dim), 0, "g64 V, block %d", blocks[b]);
        }
    /* per channel: the fixture's blocks of block4 tokens, each written in one run */
    for (int fs = 0; fs < 2; fs++) {
        roundtrip("int4:channel", fs, (int)fx.block4, fx.x4, n, dim, k, v);
        for (int i = 0; i < n * dim; i++) {
            cr_assert_eq(k[i], fx.dq_channel[i], "K vec %d dim %d: %a -> %a, numpy %a", i / dim, i % dim, fx.x4[i],
                         k[i], fx.dq_channel[i]);
            cr_assert_eq(v[i], fx.dq_channel[i], "V vec %d dim %d", i / dim, i % dim);
        }
    }
    free(k), free(v);
    free_fixture(&fx);
}

/* int4 is keys per channel and values per token */
Test(codec, int4_default_is_channel_keys_token_values) {
    fixture fx = load_fixture();
    int n = (int)fx.n4, dim = (int)fx.dim4;
    float *k = malloc(sizeof(float) * (size_t)n * dim), *v = malloc(sizeof(float) * (size_t)n * dim);
    roundtrip("int4", 0, (int)fx.block4, fx.x4, n, dim, k, v);
    cr_assert_eq(memcmp(k, fx.dq_channel, sizeof(float) * (size_t)n * dim), 0);
    cr_assert_eq(memcmp(v, fx.dq_token, sizeof(float) * (size_t)n * dim), 0);
    roundtrip("int4:g64", 0, (int)fx.block4, fx.x4, n, dim, k, v);
    cr_assert_eq(memcmp(k, fx.dq_channel, sizeof(float) * (size_t)n * dim), 0);
    cr_assert_eq(memcmp(v, fx.dq_token64, sizeof(float) * (size_t)n * dim), 0);
    free(k), free(v);
    free_fixture(&fx);
}

/* ---- error bounds ---------------------------------------------------------- */

/* Half a step of an int4 range [lo, hi] (with the halves' rounding of min and
 * scale), plus float rounding of x. */
static double u4_bound(double lo, double hi, double x) {
    double step = (hi - lo + fabs(lo) * 0x1p-10 + 0x1p-24) / 15.0 * (1.0 + 0x1p-10) + 0x1p-24;
    return 0.5 * step * (1.0 + 1e-5) + fabs(x) * 0x1p-22;
}

/* Max error of (n, dim) rows x vs decoded y for an element codec, checked
 * against its bound; n tokens written as `runs` (0: one kvc_write; else
 * token by token). Returns the max relative error (per row, RMS). */
static double check_element_codec(const char *codec, const float *x, const float *y, int n, int dim, int B,
                                  int token_by_token) {
    double worst_rel = 0.0;
    for (int t = 0; t < n; t++) {
        const float *xt = x + (size_t)t * dim, *yt = y + (size_t)t * dim;
        double amax = 0.0, se = 0.0, sx = 0.0;
        for (int d = 0; d < dim; d++) amax = fmax(amax, fabs(xt[d]));
        for (int d = 0; d < dim; d++) {
            double e = fabs((double)yt[d] - xt[d]), bound;
            if (!strcmp(codec, "f16")) {
                bound = fabs(xt[d]) * 0x1p-11 + 0x1p-25;
            } else if (!strcmp(codec, "int8")) {
                bound = 0.5 * (amax / 127.0 * (1.0 + 0x1p-10) + 0x1p-24) * (1.0 + 1e-6);
            } else if (!strcmp(codec, "int4:token")) {
                int g0 = d / 32 * 32, g1 = g0 + 32 < dim ? g0 + 32 : dim;
                double lo = INFINITY, hi = -INFINITY;
                for (int i = g0; i < g1; i++) lo = fmin(lo, xt[i]), hi = fmax(hi, xt[i]);
                bound = u4_bound(lo, hi, xt[d]);
            } else {        /* int4:channel: the range of the channel over the token's block */
                int b0 = t / B * B, b1 = b0 + B < n ? b0 + B : n;
                double lo = INFINITY, hi = -INFINITY;
                for (int i = b0; i < b1; i++) lo = fmin(lo, x[(size_t)i * dim + d]), hi = fmax(hi, x[(size_t)i * dim + d]);
                /* appends re-code earlier tokens when the range widens: a
                 * re-coding adds at most half a step each, at most B - 1 times */
                bound = u4_bound(lo, hi, xt[d]) * (token_by_token ? B : 1);
            }
            cr_assert_leq(e, bound, "%s%s: token %d dim %d: %.9g -> %.9g (error %.3g > %.3g)", codec,
                          token_by_token ? " (appended)" : "", t, d, xt[d], yt[d], e, bound);
            se += e * e;
            sx += (double)xt[d] * xt[d];
        }
        if (sx > 0) worst_rel = fmax(worst_rel, sqrt(se / sx));
    }
    return worst_rel;
}

Test(codec, element_codecs_meet_their_bounds_on_random_data) {
    const int n = 100, dim = 72, B = 16;
    float *x = malloc(sizeof(float) * n * dim), *k = malloc(sizeof(float) * n * dim), *v = malloc(sizeof(float) * n * dim);
    uint64_t r = 42;
    for (int i = 0; i < n * dim; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(r >> 11) / 9007199254740992.0 - 0.5) * (i % dim == 9 ? 40.0f : 2.0f) +
               (i % dim == 30 ? 7.0f : 0.0f);
    }
    static const char *codecs[] = {"f16", "int8", "int4:token", "int4:channel"};
    for (int c = 0; c < 4; c++)
        for (int fs = 0; fs < 2; fs++) {
            roundtrip(codecs[c], fs, B, x, n, dim, k, v);
            check_element_codec(codecs[c], x, k, n, dim, B, 0);
            check_element_codec(codecs[c], x, v, n, dim, B, 0);
        }
    /* int4:channel written token by token, as decode appends */
    kvc_config cfg = {.n_layer = 1, .n_kv_head = 1, .head_dim = dim, .block_size = B, .memory_bytes = 1 << 20,
                      .k_codec = "int4:channel", .v_codec = "int4:channel"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&cfg, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, n), KVC_OK);
    for (int t = 0; t < n; t++) cr_assert_eq(kvc_write(pool, &s, 0, t, 1, x + t * dim, x + t * dim, dim), KVC_OK);
    kvc_read(pool, &s, 0, 0, n, k, v, dim);
    check_element_codec("int4:channel", x, k, n, dim, B, 1);
    check_element_codec("int4:channel", x, v, n, dim, B, 1);
    kvc_seq_release(pool, &s);
    kvc_pool_destroy(pool);
    free(x), free(k), free(v);
}

/* ---- spec grammar ------------------------------------------------------------ */

static int try_spec(const char *k, const char *v, const char *calib, char *err, size_t errlen) {
    kvc_config c = {.n_layer = 2, .n_kv_head = 3, .head_dim = 16, .block_size = 16, .memory_bytes = 1 << 20,
                    .k_codec = k, .v_codec = v, .calib = calib};
    kvc_pool *pool = NULL;
    int rc = kvc_pool_create(&c, &pool, err, errlen);
    kvc_pool_destroy(pool);
    return rc;
}

Test(codec, spec_grammar) {
    char err[512];
    static const char *good[] = {"f32", "f16", "int8", "int4", "int4:token", "int4:channel", "int4:g64", "int4:g32",
                                 "int4:token:g64", "int4:token:g32", "lowrank:r8", "lowrank:r16:orthogonal",
                                 "lowrank:r1", "latent:48", "latent:5:orthogonal", "hybrid:r4", "hybrid:r16:orthogonal",
                                 "hybrid:latent:24", "hybrid:latent:24:orthogonal", "lowrank:r8:int4",
                                 "latent:48:orthogonal:int4:g64", "hybrid:r16:int4:g32", "lowrank:r8:int4:channel",
                                 "hybrid:latent:24:orthogonal:int4:channel"};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        cr_expect_eq(try_spec(good[i], good[i], NULL, err, sizeof err), KVC_OK, "%s: %s", good[i], err);
        char pre[64];
        snprintf(pre, sizeof pre, "%s:prerope", good[i]);
        cr_expect_eq(try_spec(pre, "f16", NULL, err, sizeof err), KVC_OK, "%s: %s", pre, err);
        cr_expect_eq(try_spec("f16", pre, NULL, err, sizeof err), KVC_ERR_INVAL, "%s for values", pre);
        cr_expect(strstr(err, "keys only"), "%s", err);
    }
    static const char *bad[] = {"", "F16", "int3", "int4:tokens", "int8:channel", "int4:channel:g64", "int4:g16",
                                "int4:g64:token", "f16:g64", "lowrank", "lowrank:32", "lowrank:r0", "lowrank:r",
                                "lowrank:r8:random", "latent", "latent:r8", "latent:0", "hybrid", "hybrid:latent",
                                "hybrid:latent:r8", "f16:orthogonal", "int8:pca", "lowrank:r8:pca:orthogonal",
                                "lowrank:r08", "prerope", "f16:prerope:prerope", "lowrank:r8:", ":lowrank:r8",
                                "lowrank:r99999999999", "latent:4:pca:x", "lowrank:r8:int4:pca", "lowrank:r8:int8",
                                "latent:4:int4:g16", "lowrank:int4", "int8:int4", "lowrank:r8:int4:channel:g64",
                                "lowrank:r8:channel", "lowrank:r8:int4:token"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        cr_expect_eq(try_spec(bad[i], "f16", NULL, err, sizeof err), KVC_ERR_INVAL, "'%s' accepted", bad[i]);
        cr_expect(strstr(err, "unknown codec; valid: f32, f16, int8, int4"), "'%s': %s", bad[i], err);
    }
    /* ranks: 1..head_dim per head, 1..n_kv_head * head_dim for latents */
    cr_expect_eq(try_spec("lowrank:r17", "f16", NULL, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "rank 17 in layer 0: must be 1..16"), "%s", err);
    cr_expect_eq(try_spec("f16", "latent:49", NULL, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "v_codec \"latent:49\": rank 49 in layer 0: must be 1..48"), "%s", err);
    /* a latent transforms all kv heads' numbers together: at most 8192 */
    kvc_config big = {.n_layer = 1, .n_kv_head = 129, .head_dim = 64, .block_size = 16, .memory_bytes = 64u << 20,
                      .k_codec = "f16", .v_codec = "latent:64"};
    kvc_pool *bp = NULL;
    cr_expect_eq(kvc_pool_create(&big, &bp, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "a transform of 8256 numbers per token; at most 8192"), "%s", err);
    big.v_codec = "lowrank:r64";      /* per head is fine */
    cr_expect_eq(kvc_pool_create(&big, &bp, err, sizeof err), KVC_OK, "%s", err);
    kvc_pool_destroy(bp);
    /* pca needs a calibration file, and a readable one */
    cr_expect_eq(try_spec("lowrank:r8:pca", "f16", NULL, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "needs a calibration file"), "%s", err);
    cr_expect_eq(try_spec("f16", "latent:pca", "/nonexistent/calib.bin", err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "/nonexistent/calib.bin"), "%s", err);
    /* a file is not read when no codec needs it */
    cr_expect_eq(try_spec("f16", "lowrank:r4", "/nonexistent/calib.bin", err, sizeof err), KVC_OK, "%s", err);
}

/* Bytes per token follow the documented layouts (B = 16, head_dim 64, 3 kv heads, 2 layers). */
Test(codec, layout_sizes) {
    static const struct { const char *spec; size_t k_block; } cases[] = {
        {"f16", 2048}, {"int8", 1056}, {"int4:token", 512 + 2 * 16 * 4}, {"int4:channel", 512 + 64 * 4},
        {"int4", 512 + 64 * 4},   /* keys per channel */
        {"int4:token:g64", 512 + 16 * 4},
        {"lowrank:r32:int4", 256 + 16 * 4}, {"lowrank:r40:int4", 320 + 2 * 16 * 4},
        {"lowrank:r32:int4:channel", 256 + 32 * 4},
        {"lowrank:r32", 32 * 16 * 2}, {"hybrid:r32", 512 + 32}, {"lowrank:r5", 160}, {"hybrid:r5", 80 + 32},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        kvc_config c = {.n_layer = 2, .n_kv_head = 3, .head_dim = 64, .block_size = 16, .memory_bytes = 1 << 22,
                        .k_codec = cases[i].spec, .v_codec = "f16"};
        kvc_pool *pool;
        char err[256];
        cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
        size_t want = 2 * 3 * (cases[i].k_block + 2048);
        cr_expect_eq(kvc_page_bytes(pool), want, "%s: page %zu, want %zu", cases[i].spec, kvc_page_bytes(pool), want);
        kvc_pool_destroy(pool);
    }
    /* a latent has one block per layer: 2 x (96 x 16 x 2) for K */
    kvc_config c = {.n_layer = 2, .n_kv_head = 3, .head_dim = 64, .block_size = 16, .memory_bytes = 1 << 22,
                    .k_codec = "latent:96", .v_codec = "hybrid:latent:96"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    cr_expect_eq(kvc_page_bytes(pool), 2 * (96 * 16 * 2 + 96 * 16 + 32));
    cr_expect_float_eq(kvc_compression_ratio(pool), 2.0 * 3 * 64 * 2 * 2 * 16 / (2 * (96 * 16 * 2 + 96 * 16 + 32)), 1e-12);
    kvc_pool_destroy(pool);
}

/* ---- transforms ----------------------------------------------------------------- */

/* Checks one pool's transform codecs on rows x (n, H * D): bases orthonormal,
 * decoded = mean + P P^T (x - mean) within the coefficients' rounding (coef_rel:
 * relative error per coefficient vector, as a 2-norm). Returns the max RMS
 * relative error over rows. */
static double check_transform(kvc_pool *pool, int v_role, const float *x, const float *y, int n, int H, int D,
                              double coef_rel) {
    kvc_basis b;
    cr_assert_eq(kvc_get_basis(pool, v_role, 0, 0, &b), KVC_OK);
    const int G = b.n_groups, R = b.rank, N = b.in_dim;
    cr_assert(G == H ? N == D : (G == 1 && N == H * D), "groups %d in_dim %d", G, N);
    double worst = 0.0;
    double *c = malloc(sizeof(double) * R), *p = malloc(sizeof(double) * N);
    for (int g = 0; g < G; g++) {
        cr_assert_eq(kvc_get_basis(pool, v_role, 0, g, &b), KVC_OK);
        for (int i = 0; i < R; i++)        /* P^T P = I */
            for (int j = 0; j < R; j++) {
                double dot = 0.0;
                for (int d = 0; d < N; d++) dot += (double)b.basis[d * R + i] * b.basis[d * R + j];
                cr_assert(fabs(dot - (i == j)) < 1e-5, "basis columns %d, %d: dot %g", i, j, dot);
            }
        for (int t = 0; t < n; t++) {
            const float *xt = x + (size_t)t * H * D + (size_t)g * N, *yt = y + (size_t)t * H * D + (size_t)g * N;
            double cn = 0.0, se = 0.0, sx = 0.0, emax = 0.0;
            for (int r = 0; r < R; r++) {
                c[r] = 0.0;
                for (int d = 0; d < N; d++) c[r] += (double)b.basis[d * R + r] * (xt[d] - (b.mean ? b.mean[d] : 0.0));
                cn += c[r] * c[r];
            }
            for (int d = 0; d < N; d++) {
                p[d] = b.mean ? b.mean[d] : 0.0;
                for (int r = 0; r < R; r++) p[d] += (double)b.basis[d * R + r] * c[r];
                emax = fmax(emax, fabs(p[d] - yt[d]));
                se += (yt[d] - xt[d]) * (double)(yt[d] - xt[d]);
                sx += (double)xt[d] * xt[d];
            }
            /* |P e|_inf <= |e|_2 for orthonormal columns; float rounding besides */
            double bound = coef_rel * sqrt(cn) + 1e-5 * (sqrt(sx) + 1e-3);
            cr_assert_leq(emax, bound, "group %d token %d: |decoded - P P^T x| %.3g > %.3g", g, t, emax, bound);
            if (sx > 0) worst = fmax(worst, sqrt(se / sx));
        }
    }
    free(c), free(p);
    return worst;
}

/* rows (n, H * D) through a pool of `spec` for K and V; returns the pool (caller destroys). */
static kvc_pool *write_read(const char *k_spec, const char *v_spec, const float *x, int n, int H, int D, float *k,
                            float *v, int force_scalar) {
    kvc_config c = {.n_layer = 1, .n_kv_head = H, .head_dim = D, .block_size = 16,
                    .memory_bytes = (size_t)(n + 16) * H * D * 8 * 2 + (1 << 20), .k_codec = k_spec,
                    .v_codec = v_spec, .force_scalar = force_scalar};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, n), KVC_OK);
    cr_assert_eq(kvc_write(pool, &s, 0, 0, n, x, x, (int64_t)H * D), KVC_OK);
    kvc_read(pool, &s, 0, 0, n, k, v, (int64_t)H * D);
    kvc_seq_release(pool, &s);
    return pool;
}

Test(codec, transforms_project_onto_orthonormal_bases) {
    const int n = 50, H = 3, D = 24;
    float *x = malloc(sizeof(float) * n * H * D), *k = malloc(sizeof(float) * n * H * D),
          *v = malloc(sizeof(float) * n * H * D);
    uint64_t r = 7;
    for (int i = 0; i < n * H * D; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(r >> 11) / 9007199254740992.0 - 0.5) * 3.0f + (i % 5 == 0 ? 2.0f : 0.0f);
    }
    /* full rank: a rotation, lossless but for the f16 coefficients */
    for (int fs = 0; fs < 2; fs++) {
        kvc_pool *pool = write_read("lowrank:r24", "latent:72", x, n, H, D, k, v, fs);
        cr_expect_leq(check_transform(pool, 0, x, k, n, H, D, 0x1p-11), 0x1p-10);
        cr_expect_leq(check_transform(pool, 1, x, v, n, H, D, 0x1p-11), 0x1p-10);
        kvc_pool_destroy(pool);
    }
    /* low rank: the projection; int8 coefficients: half a step of the token's
     * scale each, sqrt(R) of them; their scale is max|c| / 127 <= |c|_2 / 127 */
    static const struct { const char *k, *v; double kr, vr; } cases[] = {
        {"lowrank:r8", "latent:20", 0x1p-11, 0x1p-11},
        {"hybrid:r8", "hybrid:latent:20", 0.5 / 127 * 1.001 * 2.9, 0.5 / 127 * 1.001 * 4.5},
        {"lowrank:r1", "hybrid:r3", 0x1p-11, 0.5 / 127 * 1.001 * 1.8},
        /* int4 coefficients: half a step of (max - min) / 15 <= 2 max|c| / 15 each */
        {"lowrank:r24:int4", "latent:72:int4:g64", 1.0 / 15 * 1.01 * 4.9, 1.0 / 15 * 1.01 * 8.5},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        for (int fs = 0; fs < 2; fs++) {
            kvc_pool *pool = write_read(cases[i].k, cases[i].v, x, n, H, D, k, v, fs);
            check_transform(pool, 0, x, k, n, H, D, cases[i].kr);
            check_transform(pool, 1, x, v, n, H, D, cases[i].vr);
            kvc_pool_destroy(pool);
        }
    /* the same seeds give the same bases; K and V bases differ */
    kvc_pool *a = write_read("lowrank:r8", "lowrank:r8", x, n, H, D, k, v, 0);
    kvc_pool *b = write_read("lowrank:r8", "f16", x, n, H, D, k, v, 1);
    kvc_basis ba, bb, bv;
    kvc_get_basis(a, 0, 0, 1, &ba);
    kvc_get_basis(b, 0, 0, 1, &bb);
    kvc_get_basis(a, 1, 0, 1, &bv);
    cr_expect_eq(memcmp(ba.basis, bb.basis, sizeof(float) * D * 8), 0, "same seed, same basis");
    cr_expect_neq(memcmp(ba.basis, bv.basis, sizeof(float) * D * 8), 0, "K and V bases differ");
    cr_expect_eq(kvc_get_basis(b, 1, 0, 0, &bv), KVC_ERR_INVAL, "f16 has no basis");
    kvc_pool_destroy(a);
    kvc_pool_destroy(b);
    free(x), free(k), free(v);
}

/* int4:channel coefficients: each coefficient within one step of its
 * block's range over the tokens, (max - min) / 15 (a block whose range widened
 * re-codes its earlier tokens: up to a second half step); vectors projected by
 * the cache and coefficients handed over give the same pages. */
Test(codec, int4_channel_coefficients) {
    enum { N = 50, H = 3, D = 24 };
    static float x[N * H * D], coef[N * H * D], k[N * H * D], v[N * H * D], k2[N * H * D], v2[N * H * D];
    for (int i = 0; i < N * H * D; i++)    /* coefficients of very different sizes per dimension */
        x[i] = sinf((float)i * 0.71f) * (1.0f + (float)(i % D)) + cosf((float)i * 0.13f);
    for (int fs = 0; fs < 2; fs++) {
        kvc_pool *pool = write_read("lowrank:r24:int4:channel", "latent:72:int4:channel", x, N, H, D, k, v, fs);
        for (int role = 0; role < 2; role++) {
            const float *y = role ? v : k;
            kvc_basis b;
            cr_assert_eq(kvc_get_basis(pool, role, 0, 0, &b), KVC_OK);
            const int G = b.n_groups, R = b.rank, NI = b.in_dim;
            for (int g = 0; g < G; g++) {
                cr_assert_eq(kvc_get_basis(pool, role, 0, g, &b), KVC_OK);
                for (int t0 = 0; t0 < N; t0 += 16)
                    for (int r = 0; r < R; r++) {
                        double c[16], lo = INFINITY, hi = -INFINITY;
                        int nt = N - t0 < 16 ? N - t0 : 16;
                        for (int t = 0; t < nt; t++) {
                            c[t] = 0.0;
                            for (int d = 0; d < NI; d++)
                                c[t] += (double)b.basis[d * R + r] * x[(t0 + t) * H * D + g * NI + d];
                            lo = fmin(lo, c[t]), hi = fmax(hi, c[t]);
                        }
                        for (int t = 0; t < nt; t++) {
                            double cd = 0.0;     /* full rank: the decoded vector's coefficient */
                            for (int d = 0; d < NI; d++)
                                cd += (double)b.basis[d * R + r] * y[(t0 + t) * H * D + g * NI + d];
                            double step = (hi - lo) / 15 * 1.01 + 1e-3 * (fabs(hi) + fabs(lo));
                            cr_assert_leq(fabs(cd - c[t]), step, "role %d group %d token %d coef %d: %g vs %g", role, g,
                                          t0 + t, r, cd, c[t]);
                        }
                    }
            }
            /* the same coefficients handed over */
            for (int t = 0; t < N; t++)
                for (int g = 0; g < G; g++) {
                    kvc_get_basis(pool, role, 0, g, &b);
                    for (int r = 0; r < R; r++) {
                        float a = 0.0f;
                        for (int d = 0; d < NI; d++) a += b.basis[d * R + r] * x[t * H * D + g * NI + d];
                        coef[t * G * R + g * R + r] = a;
                    }
                }
            kvc_seq s = {0};
            cr_assert_eq(kvc_seq_reserve(pool, &s, N), KVC_OK);
            cr_assert_eq(kvc_write_ex(pool, &s, 0, 0, N, role ? x : coef, role ? H * D : G * R, !role,
                                      role ? coef : x, role ? G * R : H * D, role), KVC_OK);
            kvc_read(pool, &s, 0, 0, N, k2, v2, H * D);
            const float *y2 = role ? v2 : k2;
            for (int i = 0; i < N * H * D; i++)
                cr_assert(fabsf(y[i] - y2[i]) <= 1e-4f * (fabsf(y[i]) + 1.0f), "role %d %d: %g vs %g", role, i, y[i],
                          y2[i]);
            kvc_seq_release(pool, &s);
        }
        kvc_pool_destroy(pool);
    }
}

/* Coefficients handed over directly (absorbed projections) give the same
 * pages as vectors projected by the cache. */
Test(codec, write_coefficients) {
    const int n = 20, H = 2, D = 16, R = 6;
    float x[20 * 2 * 16], coef[20 * 2 * 6], k1[20 * 32], v1[20 * 32], k2[20 * 32], v2[20 * 32];
    for (int i = 0; i < n * H * D; i++) x[i] = sinf((float)i * 0.37f) * 2.0f;
    kvc_config c = {.n_layer = 1, .n_kv_head = H, .head_dim = D, .block_size = 16, .memory_bytes = 1 << 20,
                    .k_codec = "hybrid:r6", .v_codec = "lowrank:r6"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    for (int t = 0; t < n; t++)
        for (int g = 0; g < H; g++) {
            kvc_basis b;
            cr_assert_eq(kvc_get_basis(pool, 1, 0, g, &b), KVC_OK);
            cr_assert_eq(b.rank, R);
            for (int r = 0; r < R; r++) {
                float a = 0.0f;
                for (int d = 0; d < D; d++) a += b.basis[d * R + r] * x[t * H * D + g * D + d];
                coef[t * H * R + g * R + r] = a;
            }
        }
    kvc_seq s1 = {0}, s2 = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s1, n), KVC_OK);
    cr_assert_eq(kvc_seq_reserve(pool, &s2, n), KVC_OK);
    cr_assert_eq(kvc_write(pool, &s1, 0, 0, n, x, x, H * D), KVC_OK);
    cr_assert_eq(kvc_write_ex(pool, &s2, 0, 0, n, x, H * D, 0, coef, H * R, 1), KVC_OK);
    kvc_read(pool, &s1, 0, 0, n, k1, v1, H * D);
    kvc_read(pool, &s2, 0, 0, n, k2, v2, H * D);
    for (int i = 0; i < n * H * D; i++) {
        cr_assert_eq(k1[i], k2[i]);
        cr_assert(fabsf(v1[i] - v2[i]) <= 1e-3f * (fabsf(v1[i]) + 1e-2f), "%d: %g vs %g", i, v1[i], v2[i]);
    }
    kvc_seq_release(pool, &s1);
    kvc_seq_release(pool, &s2);
    kvc_pool_destroy(pool);
}

/* ---- real SmolLM2 K/V ---------------------------------------------------------- */

enum { REAL_TOKENS = 64 };

typedef struct {
    int n_layer, H, D, n;
    float *k, *v;      /* (n_layer, n, H * D) */
} real_kv;

/* Runs the model over the start of wikitext2-test.txt with an f32 cache and
 * reads every layer's K and V back. */
static real_kv capture_real_kv(void) {
    const char *model = getenv("KVSERVE_MODEL"), *shared = getenv("KVSERVE_SHARED");
    char path[1024], err[512];
    snprintf(path, sizeof path, "%s/data/text/wikitext2-test.txt", shared ? shared : "../shared");
    cr_assert(model, "KVSERVE_MODEL is not set (make unit sets it)");
    eng_model *m = eng_model_load(model, err, sizeof err);
    cr_assert(m, "%s", err);
    FILE *f = fopen(path, "rb");
    cr_assert(f, "cannot open %s", path);
    char text[8192];
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    int32_t ids[4096];
    int n_ids = eng_tokenize(m->tok, text, len, false, false, ids, 4096, err, sizeof err);
    cr_assert_geq(n_ids, REAL_TOKENS, "%s", err);
    const eng_model_config *mc = &m->cfg;
    real_kv r = {mc->n_layer, mc->n_kv_head, mc->head_dim, REAL_TOKENS, NULL, NULL};
    kvc_config c = {.n_layer = r.n_layer, .n_kv_head = r.H, .head_dim = r.D, .block_size = 16,
                    .memory_bytes = (size_t)r.n_layer * r.H * r.D * 8 * (REAL_TOKENS + 16), .k_codec = "f32",
                    .v_codec = "f32"};
    kvc_pool *pool;
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    eng_backend_options bo = {.n_threads = 2};
    eng_backend *be = eng_backend_cpu_create(m, pool, &bo, err, sizeof err);
    cr_assert(be, "%s", err);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, REAL_TOKENS), KVC_OK);
    float *logits = malloc(sizeof(float) * mc->n_vocab);
    eng_segment seg = {.seq = &s, .pos0 = 0, .n_tokens = REAL_TOKENS, .tokens = ids, .want_logits = true};
    eng_batch b = {.n_segs = 1, .segs = &seg};
    cr_assert_eq(eng_forward(be, &b, logits, err, sizeof err), 0, "%s", err);
    size_t per = (size_t)r.n * r.H * r.D;
    r.k = malloc(sizeof(float) * per * r.n_layer);
    r.v = malloc(sizeof(float) * per * r.n_layer);
    for (int l = 0; l < r.n_layer; l++) kvc_read(pool, &s, l, 0, r.n, r.k + per * l, r.v + per * l, r.H * r.D);
    kvc_seq_release(pool, &s);
    eng_backend_destroy(be);
    kvc_pool_destroy(pool);
    eng_model_free(m);
    free(logits);
    return r;
}

static void real_kv_meets_the_bounds(const real_kv *rp) {
    real_kv r = *rp;
    const int HD = r.H * r.D;
    size_t per = (size_t)r.n * HD;
    float *k = malloc(sizeof(float) * per), *v = malloc(sizeof(float) * per);
    double kmax = 0.0;
    for (size_t i = 0; i < per * r.n_layer; i++) kmax = fmax(kmax, fabs(r.k[i]));
    cr_assert_gt(kmax, 1.0, "real keys look empty: max |k| %g", kmax);
    static const char *elems[] = {"f16", "int8", "int4:token", "int4:channel"};
    for (int e = 0; e < 4; e++) {
        double wk = 0.0, wv = 0.0;
        for (int l = 0; l < r.n_layer; l += 7) {
            kvc_pool *pool = write_read(elems[e], elems[e], r.k + per * l, r.n, r.H, r.D, k, NULL, 0);
            kvc_pool_destroy(pool);
            pool = write_read(elems[e], elems[e], r.v + per * l, r.n, r.H, r.D, v, NULL, 0);
            kvc_pool_destroy(pool);
            /* each head's vector is a row of its own for the bounds */
            wk = fmax(wk, check_element_codec(elems[e], r.k + per * l, k, r.n * r.H, r.D, 16 * r.H, 0));
            wv = fmax(wv, check_element_codec(elems[e], r.v + per * l, v, r.n * r.H, r.D, 16 * r.H, 0));
        }
        cr_log_info("real K/V %-13s worst per-vector relative RMS error: K %.4f V %.4f", elems[e], wk, wv);
    }
    static const char *transforms[] = {"lowrank:r32", "latent:96", "hybrid:r32", "hybrid:latent:96"};
    static const double coef_rel[] = {0x1p-11, 0x1p-11, 0.5 / 127 * 1.001 * 5.7, 0.5 / 127 * 1.001 * 9.8};
    for (int t = 0; t < 4; t++)
        for (int l = 0; l < r.n_layer; l += 7) {
            kvc_pool *pool = write_read(transforms[t], transforms[t], r.k + per * l, r.n, r.H, r.D, k, NULL, 0);
            double wk = check_transform(pool, 0, r.k + per * l, k, r.n, r.H, r.D, coef_rel[t]);
            kvc_pool_destroy(pool);
            if (l == 14) cr_log_info("real K layer 14 %-17s (orthogonal) relative RMS error %.3f", transforms[t], wk);
        }
    free(k), free(v);
}

/* PCA on real values: fitted on one layer's V of the captured tokens, a
 * rank-R pca codec's mean squared residual on those same vectors equals the
 * sum of the discarded eigenvalues (the defining property of PCA), per head and
 * across heads (ranks below the 64 tokens, so the fit is not trivially
 * exact); and a pca basis leaves less residual than a random one. */
static void real_pca_residual_is_the_discarded_variance(const real_kv *rp) {
    real_kv r = *rp;
    const int HD = r.H * r.D, layer = 14;
    size_t per = (size_t)r.n * HD;
    const float *x = r.v + per * layer;
    /* a one-layer cache holding that layer (one fit instead of 30) */
    kvc_calib_fit *fit = kvc_calib_fit_create(1, r.H, r.D);
    kvc_calib_fit_add(fit, KVC_CALIB_V, 0, x, r.n, HD);
    char err[512], path[64];
    snprintf(path, sizeof path, "/tmp/kvc_test_codec_%d.calib", (int)getpid());
    kvc_calib_opts o = {.rank = 16, .model = "smollm2"};
    cr_assert_eq(kvc_calib_fit_write(fit, &o, path, err, sizeof err), KVC_OK, "%s", err);
    kvc_calib_fit_destroy(fit);
    /* the file's eigenvalues for this layer: per head, then across heads */
    FILE *f = fopen(path, "rb");
    cr_assert(f);
    size_t per_layer = (size_t)r.H * (2 * r.D + r.D * r.D) + 2 * HD + (size_t)HD * HD;
    float *lay = malloc(sizeof(float) * per_layer);
    fseek(f, 100 + 8 + 8, SEEK_SET);              /* header, the set's kind and its two ranks */
    cr_assert_eq(fread(lay, sizeof(float), per_layer, f), per_layer);
    fclose(f);
    static const struct { const char *spec; int rank, latent; } cases[] = {
        {"lowrank:r8:pca", 8, 0}, {"lowrank:r24:pca", 24, 0}, {"latent:16:pca", 16, 1}, {"latent:40:pca", 40, 1}};
    float *y = malloc(sizeof(float) * per);
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        kvc_config c = {.n_layer = 1, .n_kv_head = r.H, .head_dim = r.D, .block_size = 16,
                        .memory_bytes = 8u << 20, .k_codec = "f16", .v_codec = cases[i].spec, .calib = path};
        kvc_pool *pool;
        cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
        kvc_seq s = {0};
        cr_assert_eq(kvc_seq_reserve(pool, &s, r.n), KVC_OK);
        cr_assert_eq(kvc_write(pool, &s, 0, 0, r.n, x, x, HD), KVC_OK);
        kvc_read(pool, &s, 0, 0, r.n, NULL, y, HD);
        double se = 0.0, want = 0.0, total = 0.0;
        for (size_t j = 0; j < per; j++) se += ((double)y[j] - x[j]) * ((double)y[j] - x[j]);
        se /= r.n;
        if (cases[i].latent) {
            const float *eig = lay + (size_t)r.H * (2 * r.D + r.D * r.D) + HD;
            for (int d = 0; d < HD; d++) total += eig[d], want += d >= cases[i].rank ? eig[d] : 0.0;
        } else {
            for (int h = 0; h < r.H; h++) {
                const float *eig = lay + (size_t)h * (2 * r.D + r.D * r.D) + r.D;
                for (int d = 0; d < r.D; d++) total += eig[d], want += d >= cases[i].rank ? eig[d] : 0.0;
            }
        }
        /* f16 coefficients add about 2^-12 relative per number */
        cr_expect(fabs(se - want) <= 0.01 * want + 1e-6 * total, "%s: residual %.6g, discarded variance %.6g",
                  cases[i].spec, se, want);
        cr_log_info("real V layer %d %-16s keeps %.1f%% of the variance", layer, cases[i].spec,
                    100.0 * (1.0 - want / total));
        kvc_seq_release(pool, &s);
        kvc_pool_destroy(pool);
    }
    /* a random basis of the same rank leaves more */
    kvc_config c = {.n_layer = 1, .n_kv_head = r.H, .head_dim = r.D, .block_size = 16,
                    .memory_bytes = 8u << 20, .k_codec = "f16", .v_codec = "lowrank:r24"};
    kvc_pool *pool;
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, r.n), KVC_OK);
    cr_assert_eq(kvc_write(pool, &s, 0, 0, r.n, x, x, HD), KVC_OK);
    kvc_read(pool, &s, 0, 0, r.n, NULL, y, HD);
    double se_orth = 0.0, want24 = 0.0;
    for (size_t j = 0; j < per; j++) se_orth += ((double)y[j] - x[j]) * ((double)y[j] - x[j]);
    for (int h = 0; h < r.H; h++)
        for (int d = 24; d < r.D; d++) want24 += lay[(size_t)h * (2 * r.D + r.D * r.D) + r.D + d];
    cr_expect_gt(se_orth / r.n, 2.0 * want24, "random basis residual %g vs pca %g", se_orth / r.n, want24);
    kvc_seq_release(pool, &s);
    kvc_pool_destroy(pool);
    unlink(path);
    free(y), free(lay);
}

/* One capture (the model runs once) for both checks on real data. */
Test(codec, real_smollm2_kv) {
    real_kv r = capture_real_kv();
    real_kv_meets_the_bounds(&r);
    real_pca_residual_is_the_discarded_variance(&r);
    free(r.k), free(r.v);
}
