/* test_attention.c: kvc_attend against a plain double-precision attention over
 * the K/V the cache decodes (kvc_read), for every codec, with the portable and
 * the AVX2 kernels: GQA (n_rep 1, 3, 4), block sizes 1, 16, 32, contexts 1, 15,
 * 16, 17, 100, 1000 (partial pages), decode and prefill chunks (causal inside
 * the chunk), head_dim 64, 128 and an odd 20, several layers and kv heads;
 * low-rank, latent and hybrid codecs (orthogonal bases) on a smaller sweep, and
 * keys cached before RoPE, rotated by the test in double before the reference.
 * Pass: for every output vector, max_d |out_d - ref_d| <= 1e-5 * max_d sum_t p_t |v_t,d|
 * (p the softmax weights): relative to the size of what is averaged, which is
 * max |ref| when no output cancels to near zero (with head_dim 1 some do). */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/kvcache.h"
#include "engine/backend.h"
#include "engine/model.h"

static uint64_t rng_state;
static float frand(void) {          /* uniform [-1, 1), splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

typedef struct {
    const char *codec;
    int n_rep, block_size, ctx, n_q, head_dim;
    float q_gain;           /* scales q: larger means peakier softmax */
    int force_scalar;
    const char *v_codec;    /* NULL: codec */
    int neox;               /* pre-RoPE keys: pairing of the test's RoPE */
} attn_case;

/* RoPE tables for the pre-RoPE cases: angle p * 10000^(-2i/D), as float. */
static void rope_tables(int n_pos, int D, float *cs, float *sn) {
    for (int p = 0; p < n_pos; p++)
        for (int i = 0; i < D / 2; i++) {
            double a = p * pow(10000.0, -2.0 * i / D);
            cs[p * (D / 2) + i] = (float)cos(a);
            sn[p * (D / 2) + i] = (float)sin(a);
        }
}

/* Rotates a decoded key (double) as the tables say. */
static void rope_ref(double *x, int D, int p, const float *cs, const float *sn, int neox) {
    for (int i = 0; i < D / 2; i++) {
        int a = neox ? i : 2 * i, b = neox ? i + D / 2 : 2 * i + 1;
        double c = cs[p * (D / 2) + i], s = sn[p * (D / 2) + i], xa = x[a], xb = x[b];
        x[a] = xa * c - xb * s;
        x[b] = xa * s + xb * c;
    }
}

/* When set, run_case copies each kv head's outputs (n_q x n_head x D
 * floats, that head's part written) here, head after head. */
static float *capture;

/* Relative error of one case (max over output vectors). */
static double run_case(const attn_case *c) {
    const int L = 2, H = 2, D = c->head_dim, n_head = H * c->n_rep;
    kvc_config cfg = {.n_layer = L, .n_kv_head = H, .head_dim = D, .block_size = c->block_size,
                      .k_codec = c->codec, .v_codec = c->v_codec ? c->v_codec : c->codec,
                      .force_scalar = c->force_scalar};
    size_t token_bytes = (size_t)L * H * D * 4 * 2 + 1024;
    cfg.memory_bytes = (size_t)(c->ctx + 2 * c->block_size) * token_bytes + (1u << 20);
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&cfg, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq seq = {0};
    rng_state = (uint64_t)c->ctx * 1000003u + (uint64_t)c->n_rep * 101u + (uint64_t)c->block_size;

    /* Write the context in uneven chunks, as decode and prefill would. */
    int64_t kv_stride = (int64_t)H * D;
    float *k = malloc(sizeof(float) * (size_t)c->ctx * kv_stride);     /* (ctx, H, D) */
    float *v = malloc(sizeof(float) * (size_t)c->ctx * kv_stride);
    for (int layer = 0; layer < L; layer++) {
        for (size_t i = 0; i < (size_t)c->ctx * kv_stride; i++) {
            k[i] = frand();
            v[i] = frand() + 0.25f;
        }
        for (int pos = 0; pos < c->ctx;) {
            int n = 1 + (pos * 7 + layer) % 23;
            if (n > c->ctx - pos) n = c->ctx - pos;
            if (layer == 0) cr_assert_eq(kvc_seq_reserve(pool, &seq, pos + n), KVC_OK);
            cr_assert_eq(kvc_write(pool, &seq, layer, pos, n, k + pos * kv_stride, v + pos * kv_stride,
                                   kv_stride), KVC_OK);
            pos += n;
        }
    }

    const int pos0 = c->ctx - c->n_q;
    int64_t q_stride = (int64_t)n_head * D;
    float *q = malloc(sizeof(float) * (size_t)c->n_q * q_stride);       /* (n_q, n_head, D) */
    float *out = malloc(sizeof(float) * (size_t)c->n_q * q_stride);
    for (size_t i = 0; i < (size_t)c->n_q * q_stride; i++) q[i] = frand() * c->q_gain;
    float *scratch = malloc(sizeof(float) * kvc_attend_scratch_floats(pool, c->ctx, c->n_rep));
    double *sc = malloc(sizeof(double) * (size_t)c->ctx);
    const float scale = 1.0f / sqrtf((float)D);
    double worst = 0.0;
    const int pre = kvc_keys_pre_rope(pool);
    float *cs = malloc(sizeof(float) * (size_t)c->ctx * (D / 2 + 1)), *sn = malloc(sizeof(float) * (size_t)c->ctx * (D / 2 + 1));
    rope_tables(c->ctx, D, cs, sn);
    kvc_rope rope = {.rope_dim = D, .neox = c->neox, .cos = cs, .sin = sn, .n_pos = c->ctx};
    double *kd = malloc(sizeof(double) * (size_t)c->ctx * kv_stride);   /* keys as the reference sees them */

    for (int layer = L - 1; layer < L; layer++) {      /* the last layer: offsets matter */
        kvc_read(pool, &seq, layer, 0, c->ctx, k, v, kv_stride);      /* what attention sees */
        for (int t = 0; t < c->ctx; t++)
            for (int h = 0; h < H; h++) {
                double *x = kd + t * kv_stride + h * D;
                for (int d = 0; d < D; d++) x[d] = k[t * kv_stride + h * D + d];
                if (pre) rope_ref(x, D, t, cs, sn, c->neox);
            }
        for (int h = 0; h < H; h++) {
            memset(out, 0xff, sizeof(float) * (size_t)c->n_q * q_stride);   /* NaN: unwritten */
            kvc_attend_rope(pool, &seq, layer, h, q + (size_t)h * c->n_rep * D, q_stride, c->n_q, c->n_rep,
                            pos0, scale, out + (size_t)h * c->n_rep * D, q_stride, scratch, pre ? &rope : NULL);
            if (capture)
                memcpy(capture + (size_t)h * c->n_q * q_stride, out, sizeof(float) * (size_t)c->n_q * q_stride);
            for (int i = 0; i < c->n_q; i++)
                for (int r = 0; r < c->n_rep; r++) {
                    const float *qv = q + i * q_stride + (size_t)(h * c->n_rep + r) * D;
                    const float *ov = out + i * q_stride + (size_t)(h * c->n_rep + r) * D;
                    int n_ctx = pos0 + i + 1;
                    double mx = -INFINITY, sum = 0.0;
                    for (int t = 0; t < n_ctx; t++) {
                        double s = 0.0;
                        for (int d = 0; d < D; d++) s += (double)qv[d] * kd[t * kv_stride + h * D + d];
                        sc[t] = s * scale;
                        mx = fmax(mx, sc[t]);
                    }
                    for (int t = 0; t < n_ctx; t++) sum += (sc[t] = exp(sc[t] - mx));
                    double max_ref = 0.0, max_err = 0.0;
                    for (int d = 0; d < D; d++) {
                        double ref = 0.0, mag = 0.0;
                        for (int t = 0; t < n_ctx; t++) {
                            ref += sc[t] * v[t * kv_stride + h * D + d];
                            mag += sc[t] * fabs(v[t * kv_stride + h * D + d]);
                        }
                        ref /= sum;
                        max_ref = fmax(max_ref, mag / sum);
                        double e = fabs(ref - ov[d]);
                        max_err = isnan(e) ? INFINITY : fmax(max_err, e);
                    }
                    worst = fmax(worst, max_err / max_ref);
                }
        }
    }
    kvc_seq_release(pool, &seq);
    cr_assert_eq(kvc_pages_free(pool), kvc_pages_total(pool));
    kvc_pool_destroy(pool);
    free(k), free(v), free(q), free(out), free(scratch), free(sc), free(cs), free(sn), free(kd);
    return worst;
}

static void sweep(const char *codec, int force_scalar) {
    static const int reps[] = {1, 3, 4}, blocks[] = {1, 16, 32}, ctxs[] = {1, 15, 16, 17, 100, 1000};
    int n_cases = 0;
    for (size_t a = 0; a < 3; a++)
        for (size_t b = 0; b < 3; b++)
            for (size_t x = 0; x < 6; x++) {
                int ctx = ctxs[x];
                /* decode, a prefill chunk after cached tokens, a whole prompt */
                int n_qs[3] = {1, ctx > 19 ? 19 : ctx, ctx <= 100 ? ctx : 0};
                for (int iq = 0; iq < 3; iq++) {
                    if (n_qs[iq] == 0 || (iq > 0 && n_qs[iq] == n_qs[iq - 1])) continue;
                    attn_case c = {codec, reps[a], blocks[b], ctx, n_qs[iq], 64, 3.0f, force_scalar, NULL, 0};
                    double e = run_case(&c);
                    cr_expect(e <= 1e-5, "%s %s: n_rep %d block %d ctx %d n_q %d: relative error %.3g",
                              codec, force_scalar ? "scalar" : "auto", c.n_rep, c.block_size, c.ctx,
                              c.n_q, e);
                    n_cases++;
                }
            }
    cr_assert_gt(n_cases, 100);
}

Test(attention, f32_auto) { sweep("f32", 0); }
Test(attention, f32_scalar) { sweep("f32", 1); }
Test(attention, f16_auto) { sweep("f16", 0); }
Test(attention, f16_scalar) { sweep("f16", 1); }
Test(attention, int8_auto) { sweep("int8", 0); }
Test(attention, int8_scalar) { sweep("int8", 1); }
Test(attention, int4_auto) { sweep("int4", 0); }          /* keys per channel, values per token */
Test(attention, int4_scalar) { sweep("int4", 1); }

/* The transform codecs and int4 per channel, on a smaller sweep (each case
 * with the portable and the AVX2 kernels): GQA, block sizes 16 and 7 (partial
 * pages, SIMD tails), decode and prefill rows, K and V codecs mixed. */
static void small_sweep(const char *k_codec, const char *v_codec, int head_dim) {
    static const int reps[] = {1, 3}, blocks[] = {16, 7}, ctxs[] = {1, 17, 100, 300};
    for (size_t a = 0; a < 2; a++)
        for (size_t b = 0; b < 2; b++)
            for (size_t x = 0; x < 4; x++)
                for (int fs = 0; fs < 2; fs++) {
                    int ctx = ctxs[x];
                    int n_q = (int)(a + b + x) % 2 ? 1 : (ctx < 19 ? ctx : 19);
                    attn_case c = {k_codec, reps[a], blocks[b], ctx, n_q, head_dim, 3.0f, fs, v_codec, (int)x % 2};
                    double e = run_case(&c);
                    cr_expect(e <= 1e-5, "%s / %s %s: n_rep %d block %d ctx %d n_q %d: relative error %.3g",
                              k_codec, v_codec, fs ? "scalar" : "auto", c.n_rep, c.block_size, c.ctx, c.n_q, e);
                }
}

/* The AVX-512 kernels (where this CPU has AVX-512 F/BW/VL) give the AVX2
 * kernels' bits (force_scalar 2 keeps a pool on AVX2): every element format,
 * K and V mixed, GQA, decode and prefill rows, partial pages, block sizes 16
 * and 32 (the 512-bit tiles) and 7 (handed to AVX2), head sizes 64, 128 and
 * 20 (V sums handed to AVX2). The sweeps above hold them to the reference. */
Test(attention, avx512_gives_avx2_bits) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl"))
        cr_skip_test("this CPU has no AVX-512");
    static const char *specs[][2] = {{"f32", "f32"}, {"f16", "f16"}, {"int8", "int8"}, {"int4", "int4"},
                                     {"int4:g64", "int4:g64"}, {"int4:token", "int4:token:g64"},
                                     {"f16", "int8"}, {"int8", "int4"}, {"int4:channel", "f16"}};
    static const int blocks[] = {16, 32, 7}, ctxs[] = {1, 17, 100, 300}, dims[] = {64, 128, 20};
    int n = 0;
    for (int c = 0; c < 9; c++)
        for (int b = 0; b < 3; b++)
            for (int x = 0; x < 4; x++) {
                const int D = dims[(c + x) % 3], rep = 1 + (c + b + x) % 4;
                const int n_q = (c + x) % 2 ? 1 : (ctxs[x] < 19 ? ctxs[x] : 19);
                const size_t floats = (size_t)2 * n_q * 2 * rep * D;
                float *a = malloc(sizeof(float) * floats), *z = malloc(sizeof(float) * floats);
                attn_case k = {specs[c][0], rep, blocks[b], ctxs[x], n_q, D, 3.0f, 2, specs[c][1], 0};
                capture = a;
                run_case(&k);
                k.force_scalar = 0;
                capture = z;
                double e = run_case(&k);
                capture = NULL;
                cr_expect_eq(memcmp(a, z, sizeof(float) * floats), 0,
                             "%s / %s: block %d ctx %d n_q %d n_rep %d head_dim %d: AVX-512 differs from AVX2",
                             specs[c][0], specs[c][1], blocks[b], ctxs[x], n_q, rep, D);
                cr_expect(e <= 1e-5, "%s / %s: relative error %.3g", specs[c][0], specs[c][1], e);
                free(a), free(z);
                n++;
            }
    cr_assert_eq(n, 108);
}

Test(attention, int4_variants) {
    small_sweep("int4:token", "int4:channel", 64);
    small_sweep("int4:token:g64", "int4:g64", 64);
    small_sweep("int4:g64", "int4:token:g64", 100);      /* two groups, the second shorter */
}
/* 64-token pages (the int4:g64 deployment setting): the AVX2 int4 tiles
 * read 16 codes at a time in split (even, odd) order over whole pages. */
Test(attention, int4_64_token_pages) {
    static const int ctxs[] = {64, 65, 300};
    for (int x = 0; x < 3; x++)
        for (int fs = 0; fs < 2; fs++)
            for (int iq = 0; iq < 2; iq++) {
                attn_case c = {"int4:g64", 3, 64, ctxs[x], iq ? 19 : 1, 64, 3.0f, fs, "int4:token:g64", 0};
                double e = run_case(&c);
                cr_expect(e <= 1e-5, "int4:g64 block 64 %s: ctx %d n_q %d: relative error %.3g",
                          fs ? "scalar" : "auto", c.ctx, c.n_q, e);
            }
}
Test(attention, lowrank) { small_sweep("lowrank:r24", "lowrank:r64", 64); }
Test(attention, latent) { small_sweep("latent:40", "latent:128", 64); }
Test(attention, hybrid) {
    small_sweep("hybrid:r16", "hybrid:latent:72", 64);
    small_sweep("lowrank:r64:int4", "latent:72:int4:g64", 64);
    small_sweep("lowrank:r20:int4:channel", "hybrid:latent:50:int4:channel", 64);
}
Test(attention, mixed_odd_head) { small_sweep("hybrid:latent:33", "int4", 20); }
Test(attention, pre_rope) {
    small_sweep("f16:prerope", "int8", 64);
    small_sweep("lowrank:r20:prerope", "lowrank:r12", 64);
    small_sweep("hybrid:latent:30:prerope", "f16", 20);
    small_sweep("lowrank:r24:int4:channel:prerope", "int4:g64", 64);
}

/* Pre-RoPE keys of every element format on pages of one decode tile (64
 * tokens: the AVX2 unpack, the (head_dim, R) x (R, 64) expansion and the
 * rotation by slot with the query turned back by the page) and larger
 * (100: two tiles per page), tokens past the tables' first page. */
Test(attention, pre_rope_pages) {
    static const char *specs[][2] = {
        {"latent:80:int4:channel:prerope", "int4:token:g64"}, {"hybrid:latent:96:prerope", "int4:token:g64"},
        {"latent:40:int4:prerope", "f16"}, {"lowrank:r24:int4:g64:prerope", "int8"},
        {"f32:prerope", "f32"}, {"int4:channel:prerope", "int4"}};
    static const int blocks[] = {64, 100}, ctxs[] = {130, 300};
    for (int c = 0; c < 6; c++)
        for (int b = 0; b < 2; b++)
            for (int fs = 0; fs < 2; fs++) {
                int ctx = ctxs[(c + b) % 2], n_q = (c + fs) % 2 ? 1 : 19;
                attn_case k = {specs[c][0], 3, blocks[b], ctx, n_q, 64, 3.0f, fs, specs[c][1], (c + b) % 2};
                double e = run_case(&k);
                cr_expect(e <= 1e-5, "%s / %s %s: block %d ctx %d n_q %d: relative error %.3g", specs[c][0],
                          specs[c][1], fs ? "scalar" : "auto", k.block_size, ctx, n_q, e);
            }
}

/* Head sizes with SIMD tails, peaky and flat softmax, block sizes not a
 * multiple of 8. */
Test(attention, shapes) {
    static const char *codecs[] = {"f32", "f16", "int8", "int4"};
    static const int dims[] = {128, 20, 8, 1};
    static const int blocks[] = {16, 7, 24};
    static const float gains[] = {0.1f, 3.0f, 12.0f};
    for (int ic = 0; ic < 4; ic++)
        for (int id = 0; id < 4; id++)
            for (int ib = 0; ib < 3; ib++)
                for (int ig = 0; ig < 3; ig++)
                    for (int fs = 0; fs < 2; fs++) {
                        attn_case c = {codecs[ic], 3, blocks[ib], 77, 9, dims[id], gains[ig], fs, NULL, 0};
                        double e = run_case(&c);
                        cr_expect(e <= 1e-5, "%s head_dim %d block %d gain %g %s: relative error %.3g",
                                  c.codec, c.head_dim, c.block_size, c.q_gain,
                                  fs ? "scalar" : "auto", e);
                    }
}

/* A query row of a tile that spans more than one tile (n_rep > 16 rows);
 * with pre-RoPE keys, more tiles than share a decoded key block (16). */
Test(attention, many_heads_per_kv_head) {
    attn_case c = {"f16", 20, 16, 50, 3, 64, 3.0f, 0, NULL, 0};
    double e = run_case(&c);
    cr_expect(e <= 1e-5, "relative error %.3g", e);
    attn_case p = {"lowrank:r40:prerope", 20, 16, 50, 19, 64, 3.0f, 0, "int8", 1};
    e = run_case(&p);
    cr_expect(e <= 1e-5, "pre-RoPE keys: relative error %.3g", e);
}

/* One position with a much larger score than the rest: attention must pick
 * its V row (checks the masking too: a future position holds a larger score). */
Test(attention, one_hot) {
    const int D = 64, B = 16, ctx = 40;
    kvc_config cfg = {.n_layer = 1, .n_kv_head = 1, .head_dim = D, .block_size = B,
                      .memory_bytes = 1 << 20, .k_codec = "f32", .v_codec = "f32"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&cfg, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_seq seq = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &seq, ctx), KVC_OK);
    float k[40 * 64] = {0}, v[40 * 64] = {0};
    for (int t = 0; t < ctx; t++) v[t * D] = (float)t;        /* V row t = (t, 0, ...) */
    k[20 * D + 5] = 100.0f;                                   /* position 20 wins ... */
    k[35 * D + 5] = 200.0f;                                   /* ... until 35 is visible */
    cr_assert_eq(kvc_write(pool, &seq, 0, 0, ctx, k, v, D), KVC_OK);
    float q[64] = {0}, out[64];
    float *scratch = malloc(sizeof(float) * kvc_attend_scratch_floats(pool, ctx, 1));
    q[5] = 1.0f;
    kvc_attend(pool, &seq, 0, 0, q, D, 1, 1, 30, 1.0f, out, D, scratch);
    cr_expect_float_eq(out[0], 20.0f, 1e-4, "pos 30 sees 20: %f", out[0]);
    kvc_attend(pool, &seq, 0, 0, q, D, 1, 1, 39, 1.0f, out, D, scratch);
    cr_expect_float_eq(out[0], 35.0f, 1e-4, "pos 39 sees 35: %f", out[0]);
    kvc_attend(pool, &seq, 0, 0, q, D, 1, 1, 10, 1.0f, out, D, scratch);
    cr_expect_float_eq(out[0], 5.0f, 1e-4, "pos 10 sees a uniform mean of 0..10: %f", out[0]);
    free(scratch);
    kvc_seq_release(pool, &seq);
    kvc_pool_destroy(pool);
}

/* ---- early prefill compression: scratch does not grow with the prompt -------
 * Attention scratch is sized without the context length; and a whole prefill
 * through the CPU forward pass (tiny llama fixture, prompt in chunks of 32,
 * int4 cache) peaks at the same heap size for a 64-token and a 1,024-token
 * prompt, within less than half of what the longer prompt's full-precision
 * K/V would take (the RoPE table, 8 floats a position here, may grow). The
 * heap is watched through the sanitizer allocator's hooks: under the
 * sanitizer build (make unit) only. */
/* the sanitizer allocator's interface (its header is not always installed) */
extern int __sanitizer_install_malloc_and_free_hooks(void (*)(const volatile void *, size_t),
                                                     void (*)(const volatile void *)) __attribute__((weak));
extern size_t __sanitizer_get_current_allocated_bytes(void) __attribute__((weak));

static size_t heap_peak;
static void on_malloc(const volatile void *p, size_t n) {
    size_t now = __sanitizer_get_current_allocated_bytes();
    size_t seen = __atomic_load_n(&heap_peak, __ATOMIC_RELAXED);
    while (now > seen && !__atomic_compare_exchange_n(&heap_peak, &seen, now, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
}
static void on_free(const volatile void *p) {}

/* Peak heap growth (bytes) over the prefill of n tokens, after set-up. */
static size_t prefill_heap_growth(int n) {
    char err[512], path[1024];
    const char *dir = getenv("KVSERVE_FIXTURES");
    cr_assert_not_null(dir, "KVSERVE_FIXTURES is not set (make unit sets it; make fixtures writes llama/model-f32.gguf)");
    snprintf(path, sizeof path, "%s/llama/model-f32.gguf", dir);
    eng_model *m = eng_model_load(path, err, sizeof err);
    cr_assert(m, "%s", err);
    const eng_model_config *mc = &m->cfg;
    kvc_config c = {.n_layer = mc->n_layer, .n_kv_head = mc->n_kv_head, .head_dim = mc->head_dim, .block_size = 16,
                    .memory_bytes = 8u << 20, .k_codec = "int4", .v_codec = "int4"};
    kvc_pool *pool;
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    eng_backend_options bo = {.n_threads = 2};
    eng_backend *be = eng_backend_cpu_create(m, pool, &bo, err, sizeof err);
    cr_assert(be, "%s", err);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n);
    for (int i = 0; i < n; i++) ids[i] = 3 + (i * 7919) % (mc->n_vocab - 3);
    float *logits = malloc(sizeof(float) * (size_t)mc->n_vocab);
    kvc_seq s = {0};
    cr_assert_eq(kvc_seq_reserve(pool, &s, n), KVC_OK);
    size_t base = __sanitizer_get_current_allocated_bytes();
    __atomic_store_n(&heap_peak, base, __ATOMIC_RELAXED);
    for (int p = 0; p < n; p += 32) {
        eng_segment seg = {.seq = &s, .pos0 = p, .n_tokens = n - p < 32 ? n - p : 32, .tokens = ids + p,
                           .want_logits = p + 32 >= n};
        eng_batch b = {.n_segs = 1, .segs = &seg};
        cr_assert_eq(eng_forward(be, &b, logits, err, sizeof err), 0, "%s", err);
    }
    size_t growth = __atomic_load_n(&heap_peak, __ATOMIC_RELAXED) - base;
    kvc_seq_release(pool, &s);
    eng_backend_destroy(be);
    kvc_pool_destroy(pool);
    eng_model_free(m);
    free(ids), free(logits);
    return growth;
}

Test(attention, prefill_scratch_does_not_grow_with_the_prompt) {
    kvc_config c = {.n_layer = 30, .n_kv_head = 3, .head_dim = 64, .block_size = 16, .memory_bytes = 64u << 20,
                    .k_codec = "hybrid:latent:64:prerope", .v_codec = "int4"};
    kvc_pool *pool;
    char err[256];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    for (int rep = 1; rep <= 9; rep += 4)
        cr_expect_eq(kvc_attend_scratch_floats(pool, 1, rep), kvc_attend_scratch_floats(pool, 1 << 20, rep));
    kvc_pool_destroy(pool);

    if (!__sanitizer_install_malloc_and_free_hooks || !__sanitizer_get_current_allocated_bytes)
        cr_skip_test("the heap is watched through the sanitizer allocator: run under make unit (SAN)");
    cr_assert(__sanitizer_install_malloc_and_free_hooks(on_malloc, on_free));
    size_t short_prompt = prefill_heap_growth(64), long_prompt = prefill_heap_growth(1024);
    /* full-precision K/V of 1,024 tokens: 2 layers x 2 kv heads x 16 dims x (K, V) x 4 bytes */
    size_t full_kv = 1024u * 2 * 2 * 16 * 2 * 4;
    cr_log_info("prefill heap peak growth: 64 tokens %zu bytes, 1024 tokens %zu bytes (full K/V would be %zu)",
                short_prompt, long_prompt, full_kv);
    cr_expect_lt(long_prompt, short_prompt + full_kv / 2, "peak heap grew from %zu to %zu bytes", short_prompt,
                 long_prompt);
}
