/* gpu_test.cu: the GPU kernels of cache/cuda/ against the CPU cache code
 * (the reference), run on the device machine; no Criterion (a plain program:
 * exit status 0 when every check passes, each failure printed).
 *
 * For each case (head_dim, kv heads, n_rep, K codec, V codec, context
 * lengths) on fresh random inputs (seed printed; --seed to repeat):
 *   1. write: a CPU pool reserves pages for every sequence (interleaved, so
 *      block tables are scattered); kvc_cu_write encodes the tokens of two
 *      layers into a zeroed device arena and kvc_write does the same on the
 *      CPU, in the same calls: every sequence's first positions in one call
 *      (a prefill), then its last TAIL positions one per call (decode steps:
 *      one token of each sequence per call; int4 keys per channel widen and
 *      re-code their pages here); the two arenas must be byte-identical.
 *   2. the unwritten slots of each sequence's last page are then poisoned:
 *      f16 and int8 with +inf through kvc_cu_write (f16: inf; int8: the
 *      largest scale and codes); with int4 keys both sides by setting their
 *      bytes (key codes 15: the per-channel parameters are shared with the
 *      written slots and stay; values f16 +inf, int8 the largest codes and an
 *      inf scale, int4 codes 15 and per-token scales and minima inf). A
 *      kernel that reads past a context turns that into NaN or a wrong
 *      result.
 *   3. decode: kvc_cu_decode for one query token per sequence at its last
 *      position against kvc_attend, in each plan: the default, forced splits
 *      (8 pages: many partials merged; 3 pages: warps left without a page), a
 *      single split, one warp per (sequence, head) doing all of it, two warps
 *      per (sequence, head) and two pairs a block. A context of 0 gives
 *      zeros.
 *   4. prefill: chunks [pos0, pos0 + n) of one sequence through
 *      kvc_cu_prefill against kvc_attend (causal inside the chunk), with
 *      quantized pages read both ways (expanded into f16 scratch pages, and
 *      dequantized per tile in registers), the context split as planned,
 *      not at all, in 3 and in runs of one tile (partials merged by a
 *      second kernel), and the chunk's tokens as decode sequences.
 *   5. a decode step as an engine runs it: every sequence's next token
 *      written by kvc_cu_write and attended by kvc_cu_decode in one stream
 *      with no synchronisation between (the write may let the decode launch
 *      early), against kvc_write and kvc_attend.
 * Outputs are poisoned (NaN bytes) before each launch; every element must be
 * finite afterwards.
 *
 * Error bound, per output vector (query token, head): ||gpu - cpu||_2 /
 * ||cpu||_2 <= 1e-4 * max(1, context / 4096) * max(1, q_gain) on the decode kernel: its
 * tensor-core products see the query and the softmax weights as fp16 hi +
 * lo pairs (~22-bit operands; int4 keys' per-channel scales and int4
 * values' per-token scales folded in without rounding loss; codes exact as
 * halves) and it sums in fp32, so it is as exact as fp32 arithmetic, whose
 * running sums over thousands of pages add ~1e-4 at 20k positions (and
 * scale with the logits' spread: a peaky case's one-warp plan, every page
 * of 33k positions in one running sum with queries 4x larger, measured
 * 8.4e-4 in session 19). <= 5e-3 * max(1, q_gain) on the prefill, which rounds the
 * scaled query, the softmax weights and (quantized pages) the dequantized
 * K/V numbers to fp16 (each a relative 2^-11 = 4.9e-4 at most; the bound
 * leaves a factor of ten at unit-scale queries): a logit moves by ~2^-11 of
 * its size, so the error grows with the logits' spread (the peaky case,
 * queries 4x larger, gets 4x the bound; measured 3.5e-3 and 5.8e-3 there,
 * <= 1.2e-3 elsewhere).
 *
 * Transform codecs (lowrank, latent, hybrid; orthogonal and pca bases) take
 * the same steps. Their CPU pool uses the portable kernels (force_scalar),
 * whose projection the GPU write repeats operation for operation, so the
 * arenas must again be byte-identical; decode keeps the decode bound (the
 * query's projection and the output's expansion add fp32 sums of head_dim
 * or R products, far below it) and prefill the prefill bound (the
 * tensor-core kernel over the coefficients). One pca case reads per-layer
 * ranks (32 and 64) from its calibration file.
 *
 * Usage: gpu_test [--seed N] [--quick]   (--quick: fewer, shorter cases, for
 * compute-sanitizer). */
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <vector>

extern "C" {
#include "cache/kvcache.h"
#include "cache/pool_internal.h"
}
#include "cache/cuda/kvc_cuda.h"
#include "tests/cuda/expect.cuh"

static uint64_t rng_state;
static float frand(void) {   /* uniform [-1, 1), splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}
static float nrand(void) { return (frand() + frand() + frand()) * 1.0f; }   /* bell-shaped, sd 1 */

template <typename T> struct dev_buf {
    T *p = nullptr;
    size_t n = 0;
    explicit dev_buf(size_t count) : n(count) { CK(cudaMalloc(&p, count * sizeof(T) + 16)); }
    ~dev_buf() { cudaFree(p); }
    void up(const T *h) { CK(cudaMemcpy(p, h, n * sizeof(T), cudaMemcpyHostToDevice)); }
    void down(T *h) const { CK(cudaMemcpy(h, p, n * sizeof(T), cudaMemcpyDeviceToHost)); }
    void poison() { CK(cudaMemset(p, 0xff, n * sizeof(T))); }
};

/* Relative L2 error of each vector of length D; the max, and whether every
 * GPU number is finite. */
static double max_rel_err(const float *gpu, const float *cpu, size_t n_vec, int D, int *non_finite) {
    double worst = 0.0;
    *non_finite = 0;
    for (size_t i = 0; i < n_vec; i++) {
        double num = 0.0, den = 0.0;
        for (int d = 0; d < D; d++) {
            float g = gpu[i * D + d], c = cpu[i * D + d];
            if (!isfinite(g)) (*non_finite)++;
            num += ((double)g - c) * ((double)g - c);
            den += (double)c * c;
        }
        double r = den > 0 ? sqrt(num / den) : sqrt(num);
        if (!(r <= worst)) worst = r;
    }
    return worst;
}

/* The bound of the fp32 paths: 1e-4, growing past 4096 positions with the
 * running sums' rounding (one fp32 add per page into l and o) and with the
 * queries' gain (the logits' spread). */
static double f32_bound(int ctx, float q_gain) {
    return 1e-4 * (ctx > 4096 ? ctx / 4096.0 : 1.0) * (q_gain > 1.0f ? q_gain : 1.0f);
}

struct test_case {
    int D, H, G;
    const char *kc, *vc;
    std::vector<int> ctx;                   /* one sequence each (0 allowed) */
    std::vector<std::pair<int, int>> chunks; /* prefill (pos0, n) on the longest sequence */
    float q_gain;
    const char *calib = nullptr;            /* calibration file for pca codecs */
    int k_ranks[2] = {0, 0};                /* > 0: the key side's per-layer ranks expected */
};

static bool is_transform(const char *spec) {
    return !strncmp(spec, "lowrank", 7) || !strncmp(spec, "latent", 6) || !strncmp(spec, "hybrid", 6);
}

static const char *fmt_name(const char *k, const char *v, char *buf) {
    snprintf(buf, 64, "%s/%s", k, v);
    return buf;
}

/* Decode arguments: S sequences (block tables bt_stride apart, context
 * lengths ctx), G query rows a kv head, q and out qs floats a sequence. */
static kvc_cu_decode_args decode_args(const int32_t *bt, int bt_stride, const int32_t *ctx, int S, int max_ctx, int G,
                                      float scale, const float *q, float *out, int64_t qs) {
    kvc_cu_decode_args a;
    memset(&a, 0, sizeof a);
    a.block_tables = bt;
    a.bt_stride = bt_stride;
    a.ctx_lens = ctx;
    a.n_seqs = S;
    a.max_ctx = max_ctx;
    a.n_rep = G;
    a.scale = scale;
    a.q = q;
    a.q_stride = qs;
    a.out = out;
    a.out_stride = qs;
    return a;
}

static void run_case(const test_case &c) {
    const int D = c.D, H = c.H, G = c.G, L = 2, B = 16, layer = 1;
    const int S = (int)c.ctx.size();
    char name[64];
    fmt_name(c.kc, c.vc, name);
    printf("case D=%d H=%d G=%d %s ctx=[", D, H, G, name);
    int max_ctx = 0, total_pages = 0, longest = 0;
    for (int s = 0; s < S; s++) {
        printf("%s%d", s ? "," : "", c.ctx[s]);
        if (c.ctx[s] > max_ctx) max_ctx = c.ctx[s], longest = s;
        total_pages += (c.ctx[s] + B - 1) / B;
    }
    printf("]\n");
    fflush(stdout);

    kvc_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.n_layer = L;
    cfg.n_kv_head = H;
    cfg.head_dim = D;
    cfg.block_size = B;
    cfg.k_codec = c.kc;
    cfg.v_codec = c.vc;
    cfg.calib = c.calib;
    /* AVX2 where present: the reference is fast; its element encoders equal
     * the portable ones. Transform codecs: portable, whose projection the GPU
     * write repeats operation for operation (AVX2's FMAs round otherwise). */
    cfg.force_scalar = is_transform(c.kc) || is_transform(c.vc);
    cfg.memory_bytes = (size_t)(total_pages + 4) * (size_t)L * H * D * B * 4 * 2 + (1u << 20);
    kvc_pool *pool;
    char err[256];
    if (kvc_pool_create(&cfg, &pool, err, sizeof err) != KVC_OK) {
        EXPECT(0, "kvc_pool_create: %s", err);
        return;
    }
    if (c.k_ranks[0] > 0)
        EXPECT(pool->kc.dim[0] == c.k_ranks[0] && pool->kc.dim[1] == c.k_ranks[1],
               "%s: key ranks %d / %d, want %d / %d", name, pool->kc.dim[0], pool->kc.dim[1], c.k_ranks[0],
               c.k_ranks[1]);
    kvc_cu_layout lay;
    if (kvc_cu_layout_init(&lay, pool, err, sizeof err) != KVC_OK) {
        EXPECT(0, "kvc_cu_layout_init: %s", err);
        kvc_pool_destroy(pool);
        return;
    }

    /* reserve 16 tokens at a time round-robin: scattered page ids */
    std::vector<kvc_seq> seqs(S);
    for (auto &q : seqs) memset(&q, 0, sizeof q);
    for (int done = 0; !done;) {
        done = 1;
        for (int s = 0; s < S; s++) {
            int want = seqs[s].n_tokens + B < c.ctx[s] ? seqs[s].n_tokens + B : c.ctx[s];
            if (want > seqs[s].n_tokens) {
                done = 0;
                EXPECT(kvc_seq_reserve(pool, &seqs[s], want) == KVC_OK, "reserve");
            }
        }
    }

    /* K/V of every token of both layers: (tokens, H, D) per sequence */
    const int64_t kvs = (int64_t)H * D;
    std::vector<std::vector<float>> K(S * L), V(S * L);
    for (int s = 0; s < S; s++)
        for (int l = 0; l < L; l++) {
            auto &k = K[s * L + l], &v = V[s * L + l];
            k.resize((size_t)c.ctx[s] * kvs);
            v.resize((size_t)c.ctx[s] * kvs);
            for (size_t i = 0; i < k.size(); i++) {
                /* per-dimension spread so int8 rounding is exercised unevenly */
                float dim_gain = 0.5f + (float)((i % D) % 7) * 0.3f;
                k[i] = nrand() * dim_gain;
                v[i] = nrand() + 0.25f;
            }
        }

    /* 1. compress-on-write on both sides: positions [0, ctx - TAIL) of every
     * sequence in one call, then one position of every sequence per call */
    const int TAIL = 5;
    const size_t arena_bytes = pool->arena_bytes;
    dev_buf<uint8_t> arena(arena_bytes);
    CK(cudaMemset(arena.p, 0, arena_bytes));
    int n_tok = 0;
    for (int s = 0; s < S; s++) n_tok += c.ctx[s];
    if (n_tok > 0) {
        std::vector<int32_t> slots(n_tok);
        std::vector<float> kin((size_t)n_tok * kvs), vin((size_t)n_tok * kvs);
        dev_buf<int32_t> d_slots(n_tok);
        dev_buf<float> d_k((size_t)n_tok * kvs), d_v((size_t)n_tok * kvs);
        for (int l = 0; l < L; l++)
            for (int step = -1; step < TAIL; step++) {
                /* step -1: the bulk; step i: position ctx - TAIL + i */
                int t = 0;
                for (int s = 0; s < S; s++) {
                    const int bulk = c.ctx[s] > TAIL ? c.ctx[s] - TAIL : 0;
                    const int p0 = step < 0 ? 0 : bulk + step, p1 = step < 0 ? bulk : bulk + step + 1;
                    if (p1 > c.ctx[s]) continue;
                    for (int pos = p0; pos < p1; pos++, t++) {
                        slots[t] = seqs[s].pages[pos / B] * B + pos % B;
                        memcpy(&kin[(size_t)t * kvs], &K[s * L + l][(size_t)pos * kvs], sizeof(float) * kvs);
                        memcpy(&vin[(size_t)t * kvs], &V[s * L + l][(size_t)pos * kvs], sizeof(float) * kvs);
                    }
                    if (p1 > p0)
                        EXPECT(kvc_write(pool, &seqs[s], l, p0, p1 - p0, &K[s * L + l][(size_t)p0 * kvs],
                                         &V[s * L + l][(size_t)p0 * kvs], kvs) == KVC_OK, "kvc_write");
                }
                if (t == 0) continue;
                CK(cudaMemcpy(d_slots.p, slots.data(), sizeof(int32_t) * t, cudaMemcpyHostToDevice));
                CK(cudaMemcpy(d_k.p, kin.data(), sizeof(float) * t * kvs, cudaMemcpyHostToDevice));
                CK(cudaMemcpy(d_v.p, vin.data(), sizeof(float) * t * kvs, cudaMemcpyHostToDevice));
                int rc = kvc_cu_write(&lay, arena.p, l, d_slots.p, t, d_k.p, d_v.p, kvs, NULL, err, sizeof err);
                EXPECT(rc == KVC_OK, "kvc_cu_write: %s", err);
                CK(cudaDeviceSynchronize());
            }
        std::vector<uint8_t> got(arena_bytes);
        arena.down(got.data());
        size_t diff = 0, first = 0;
        for (size_t i = 0; i < arena_bytes; i++)
            if (got[i] != pool->arena[i]) {
                if (!diff) first = i;
                diff++;
            }
        EXPECT(diff == 0, "write: %zu of %zu arena bytes differ from kvc_write (first at %zu: gpu %02x cpu %02x)",
               diff, arena_bytes, first, got[first], pool->arena[first]);
        printf("  write: %d tokens x 2 layers, arena %zu bytes, %zu differ\n", n_tok, arena_bytes, diff);
    }

    /* 2. poison the slots past each context in its last page */
    const bool is_int4 = lay.k_fmt == KVC_CU_U4C;   /* re-encoding would widen the shared parameters */
    if (is_int4) {
        std::vector<uint8_t> img(arena_bytes);
        arena.down(img.data());
        const int G4 = D / (lay.v_fmt == KVC_CU_U4T64 ? 64 : 32);
        for (int l = 0; l < L; l++)
            for (int s = 0; s < S; s++)
                for (int pos = c.ctx[s]; pos % B != 0; pos++) {
                    const size_t page = (size_t)seqs[s].pages[pos / B] * pool->page_bytes + pool->layer_off[l];
                    const int j = pos % B;
                    for (int h = 0; h < H; h++) {
                        uint8_t *kb = img.data() + page + (size_t)h * pool->kc.block_bytes[l];
                        uint8_t *vb = img.data() + page + pool->k_region[l] + (size_t)h * pool->vc.block_bytes[l];
                        for (int d = 0; d < D; d++) kb[d * 8 + j / 2] |= (uint8_t)(15 << (4 * (j & 1)));
                        if (lay.v_fmt == KVC_CU_F16) {             /* (B, D) halves: +inf */
                            uint16_t *row = reinterpret_cast<uint16_t *>(vb) + (size_t)j * D;
                            for (int d = 0; d < D; d++) row[d] = 0x7c00;
                        } else if (lay.v_fmt == KVC_CU_I8) {       /* (B, D) codes, then B scales: +inf */
                            memset(vb + (size_t)j * D, 0x7f, D);
                            reinterpret_cast<uint16_t *>(vb + 16 * D)[j] = 0x7c00;
                        } else {
                            memset(vb + (size_t)j * D / 2, 0xff, D / 2);
                            uint16_t *par = reinterpret_cast<uint16_t *>(vb + 8 * D);
                            for (int g = 0; g < 2 * G4; g++) par[g * B + j] = 0x7c00;   /* scales, then minima */
                        }
                    }
                }
        arena.up(img.data());
    } else {
        std::vector<int32_t> slots;
        for (int s = 0; s < S; s++)
            for (int pos = c.ctx[s]; pos % B != 0; pos++) slots.push_back(seqs[s].pages[pos / B] * B + pos % B);
        if (!slots.empty()) {
            const int n = (int)slots.size();
            std::vector<float> inf((size_t)n * kvs, INFINITY);
            dev_buf<int32_t> d_slots(n);
            dev_buf<float> d_inf((size_t)n * kvs);
            d_slots.up(slots.data());
            d_inf.up(inf.data());
            for (int l = 0; l < L; l++)
                EXPECT(kvc_cu_write(&lay, arena.p, l, d_slots.p, n, d_inf.p, d_inf.p, kvs, NULL, err, sizeof err) ==
                           KVC_OK, "poison write: %s", err);
            CK(cudaDeviceSynchronize());
        }
    }

    const float scale = 1.0f / sqrtf((float)D);
    std::vector<float> scratch(kvc_attend_scratch_floats(pool, max_ctx + 1, G) + 64);

    /* 3. decode */
    {
        const int64_t qs = (int64_t)H * G * D;
        std::vector<float> q((size_t)S * qs), ref((size_t)S * qs, 0.0f), got((size_t)S * qs);
        for (auto &x : q) x = nrand() * c.q_gain;
        for (int s = 0; s < S; s++) {
            if (c.ctx[s] == 0) continue;
            for (int h = 0; h < H; h++)
                kvc_attend(pool, &seqs[s], layer, h, &q[s * qs + (int64_t)h * G * D], qs, 1, G, c.ctx[s] - 1, scale,
                           &ref[s * qs + (int64_t)h * G * D], qs, scratch.data());
        }
        int max_pages = (max_ctx + B - 1) / B;
        if (max_pages < 1) max_pages = 1;
        std::vector<int32_t> bt((size_t)S * max_pages, -1);
        for (int s = 0; s < S; s++)
            for (int i = 0; i < seqs[s].n_pages; i++) bt[(size_t)s * max_pages + i] = seqs[s].pages[i];
        dev_buf<int32_t> d_bt(bt.size()), d_ctx(S);
        d_bt.up(bt.data());
        d_ctx.up(c.ctx.data());
        dev_buf<float> d_q(q.size()), d_out(q.size());
        d_q.up(q.data());
        /* the split plans, and 8 and 3 splits as clusters and not (the
         * default decides by the grid, which small test grids rarely fill);
         * int8 at head_dim <= 64 by its wide instance (the default where the
         * grid fits) and, in the odd variants, by its plain one */
        const int p8 = (max_pages + 7) / 8, p3 = (max_pages + 2) / 3;
        const int pps_set[10] = {0, 8, 3, 1 << 20, 0, 0, p8, p3, p8, p3};
        const int wph_set[10] = {0, -1, -1, -1, 1, 2, -1, -1, -1, -1};
        const int cl_set[10] = {-1, -1, -1, -1, -1, -1, 0, 0, 1, 1};
        const char *pps_name[10] = {"auto",     "8 pages",  "3 pages",     "one split",   "warp/head",
                                    "2 warps/head", "8 splits", "3 splits", "8 splits, cl", "3 splits, cl"};
        for (int v = 0; v < 10; v++) {
            kvc_cu_set_decode_tuning(pps_set[v], wph_set[v]);
            kvc_cu_set_decode_cluster(cl_set[v]);
            kvc_cu_set_decode_wide(v & 1 ? 0 : -1);
            const kvc_cu_decode_args a =
                decode_args(d_bt.p, max_pages, d_ctx.p, S, max_ctx, G, scale, d_q.p, d_out.p, qs);
            size_t wsb = kvc_cu_decode_workspace(&lay, S, max_ctx, G);
            dev_buf<uint8_t> ws(wsb);
            CK(cudaMemset(ws.p, 0, wsb));
            d_out.poison();
            for (int rep = 0; rep < 2; rep++) {   /* twice: the counters must be back at zero */
                int rc = kvc_cu_decode(&lay, arena.p, layer, &a, ws.p, wsb, NULL, err, sizeof err);
                EXPECT(rc == KVC_OK, "kvc_cu_decode: %s", err);
                CK(cudaDeviceSynchronize());
                d_out.down(got.data());
                int nf;
                double e = max_rel_err(got.data(), ref.data(), (size_t)S * H * G, D, &nf);
                EXPECT(nf == 0 && e <= f32_bound(max_ctx, c.q_gain),
                       "decode (%s, run %d): max rel err %.3g, %d non-finite", pps_name[v], rep, e, nf);
                if (rep == 0) printf("  decode %-11s: %d seqs, max rel err %.3g, non-finite %d\n", pps_name[v], S, e, nf);
                d_out.poison();
            }
            /* the workspace opens with (S, heads, 2 (1 + FAN)) merge counters
             * (FAN 64, decode.cu); two latent sides regroup the H * G rows
             * into heads of up to 8 */
            int heads = H;
            if (lay.k_shape == KVC_CU_LATENT && lay.v_shape == KVC_CU_LATENT) {
                int gv = 8;
                while ((H * G) % gv) gv--;
                heads = H * G / gv;
            }
            std::vector<int> ws_back((size_t)S * heads * 2 * (1 + 64));
            CK(cudaMemcpy(ws_back.data(), ws.p, sizeof(int) * ws_back.size(), cudaMemcpyDeviceToHost));
            int dirty = 0;
            for (int x : ws_back) dirty += x != 0;
            EXPECT(dirty == 0, "decode (%s): %d merge counters left non-zero", pps_name[v], dirty);
        }
        kvc_cu_set_decode_tuning(0, 0);
        kvc_cu_set_decode_cluster(-1);
        kvc_cu_set_decode_wide(-1);
    }

    /* 4. prefill chunks of the longest sequence */
    for (auto ch : c.chunks) {
        const int pos0 = ch.first, n = ch.second;
        if (pos0 + n > c.ctx[longest]) continue;
        const int64_t qs = (int64_t)H * G * D;
        std::vector<float> q((size_t)n * qs), ref((size_t)n * qs), got((size_t)n * qs);
        for (auto &x : q) x = nrand() * c.q_gain;
        for (int h = 0; h < H; h++)
            kvc_attend(pool, &seqs[longest], layer, h, &q[(int64_t)h * G * D], qs, n, G, pos0, scale,
                       &ref[(int64_t)h * G * D], qs, scratch.data());
        const kvc_seq &sq = seqs[longest];
        dev_buf<int32_t> d_bt(sq.n_pages);
        d_bt.up(sq.pages);
        dev_buf<float> d_q(q.size()), d_out(q.size());
        d_q.up(q.data());
        /* both ways of reading quantized pages (dequantized a tile at a
         * time in registers, or the context expanded once into f16 scratch
         * pages; f16 pages read the same either way), the chunk's tokens as
         * sequences of the decode kernel, and the context split as planned
         * (-1), not at all (0), in 3, and in as many splits as may start
         * before pos0 (64 asked: runs of one tile) */
        static const struct {
            const char *name;
            int expand, split;
            bool decode;
        } ways[] = {{"in registers", 0, -1, false},          {"expanded", 1, -1, false},
                    {"by decode", 1, -1, true},              {"expanded, one split", 1, 0, false},
                    {"in registers, 3 splits", 0, 3, false}, {"expanded, most splits", 1, 64, false}};
        for (const auto &w : ways) {
            kvc_cu_set_prefill_expand(w.expand);
            kvc_cu_set_prefill_small(w.decode ? n : 0);
            kvc_cu_set_prefill_split(w.split);
            d_out.poison();
            int rc = kvc_cu_prefill(&lay, arena.p, layer, d_bt.p, pos0, n, G, scale, d_q.p, qs, d_out.p, qs, NULL,
                                    err, sizeof err);
            EXPECT(rc == KVC_OK, "kvc_cu_prefill: %s", err);
            CK(cudaDeviceSynchronize());
            d_out.down(got.data());
            int nf;
            double e = max_rel_err(got.data(), ref.data(), (size_t)n * H * G, D, &nf);
            const double bound = 5e-3 * (c.q_gain > 1.0f ? c.q_gain : 1.0f);
            EXPECT(nf == 0 && e <= bound, "prefill (%s) pos0 %d n %d: max rel err %.3g (bound %.0e), %d non-finite",
                   w.name, pos0, n, e, bound, nf);
            printf("  prefill %s pos0=%d n=%d: max rel err %.3g, non-finite %d\n", w.name, pos0, n, e, nf);
        }
        kvc_cu_set_prefill_expand(-1);
        kvc_cu_set_prefill_small(-1);
        kvc_cu_set_prefill_split(-1);
    }

    /* 5. a decode step as the engine runs it: each sequence's next token
     * written into layer `layer` and the decode over the context with it, in
     * one stream with no synchronisation between them (the write lets the
     * decode launch early; the decode's griddepcontrol.wait must see every
     * byte the write stored) */
    {
        std::vector<int> ctx1(S);
        int max1 = 1;
        for (int s = 0; s < S; s++) {
            ctx1[s] = c.ctx[s] + 1;
            max1 = ctx1[s] > max1 ? ctx1[s] : max1;
            EXPECT(kvc_seq_reserve(pool, &seqs[s], ctx1[s]) == KVC_OK, "reserve one more");
        }
        const int64_t qs = (int64_t)H * G * D;
        std::vector<float> kn((size_t)S * kvs), vn((size_t)S * kvs), q((size_t)S * qs), ref((size_t)S * qs, 0.0f),
            got((size_t)S * qs);
        for (size_t i = 0; i < kn.size(); i++) {
            kn[i] = nrand() * (0.5f + (float)((i % D) % 7) * 0.3f);
            vn[i] = nrand() + 0.25f;
        }
        for (auto &x : q) x = nrand() * c.q_gain;
        std::vector<int32_t> slots(S);
        const int mp = (max1 + B - 1) / B;
        std::vector<int32_t> bt((size_t)S * mp, -1);
        for (int s = 0; s < S; s++) {
            slots[s] = seqs[s].pages[c.ctx[s] / B] * B + c.ctx[s] % B;
            EXPECT(kvc_write(pool, &seqs[s], layer, c.ctx[s], 1, &kn[s * kvs], &vn[s * kvs], kvs) == KVC_OK,
                   "kvc_write of the next token");
            for (int h = 0; h < H; h++)
                kvc_attend(pool, &seqs[s], layer, h, &q[s * qs + (int64_t)h * G * D], qs, 1, G, c.ctx[s], scale,
                           &ref[s * qs + (int64_t)h * G * D], qs, scratch.data());
            for (int i = 0; i < seqs[s].n_pages && i < mp; i++) bt[(size_t)s * mp + i] = seqs[s].pages[i];
        }
        dev_buf<int32_t> d_bt(bt.size()), d_ctx(S), d_slots(S);
        dev_buf<float> d_k(kn.size()), d_v(vn.size()), d_q(q.size()), d_out(q.size());
        d_bt.up(bt.data());
        d_ctx.up(ctx1.data());
        d_slots.up(slots.data());
        d_k.up(kn.data());
        d_v.up(vn.data());
        d_q.up(q.data());
        kvc_cu_decode_args a = decode_args(d_bt.p, mp, d_ctx.p, S, max1, G, scale, d_q.p, d_out.p, qs);
        const size_t wsb = kvc_cu_decode_workspace(&lay, S, max1, G);
        dev_buf<uint8_t> ws(wsb), before(arena_bytes);
        CK(cudaMemset(ws.p, 0, wsb));
        CK(cudaMemcpy(before.p, arena.p, arena_bytes, cudaMemcpyDeviceToDevice));
        cudaStream_t st;
        CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
        /* the decode as a plain promise-free call, then with the engine's
         * prefetch promise (the write before it stores each sequence's last
         * position only): its first pages are read while the write runs */
        for (int pre = 0; pre < 2; pre++) {
            a.prefetch = pre;
            a.fresh = 1;
            CK(cudaMemcpy(arena.p, before.p, arena_bytes, cudaMemcpyDeviceToDevice));
            d_out.poison();
            CK(cudaDeviceSynchronize());
            int rc = kvc_cu_write(&lay, arena.p, layer, d_slots.p, S, d_k.p, d_v.p, kvs, st, err, sizeof err);
            EXPECT(rc == KVC_OK, "step: kvc_cu_write: %s", err);
            rc = kvc_cu_decode(&lay, arena.p, layer, &a, ws.p, wsb, st, err, sizeof err);
            EXPECT(rc == KVC_OK, "step: kvc_cu_decode: %s", err);
            CK(cudaStreamSynchronize(st));
            d_out.down(got.data());
            int nf;
            const double e = max_rel_err(got.data(), ref.data(), (size_t)S * H * G, D, &nf);
            EXPECT(nf == 0 && e <= f32_bound(max1, c.q_gain),
                   "step (write + decode, no sync between%s): max rel err %.3g, %d non-finite", pre ? ", prefetch" : "",
                   e, nf);
            printf("  step (write + decode, no sync between%s): %d seqs, max rel err %.3g, non-finite %d\n",
                   pre ? ", prefetch" : "", S, e, nf);
        }
        CK(cudaStreamDestroy(st));
    }

    for (auto &q : seqs) kvc_seq_release(pool, &q);
    kvc_cu_layout_dispose(&lay);
    kvc_pool_destroy(pool);
}

/* Sizes outside the compiled set fail with a message, not a crash. */
static void check_errors(void) {
    char err[256];
    struct bad {
        int D, B;
        const char *kc, *vc;
    } cases[] = {{80, 16, "f16", "f16"},
                 {64, 32, "f16", "f16"},
                 {64, 16, "f32", "f16"},
                 {64, 16, "int4:token", "int4"},
                 {64, 16, "lowrank:r16", "f16"},
                 {64, 16, "int8", "int4:channel"},                 /* int4 values per channel */
                 {64, 16, "lowrank:r32:prerope", "lowrank:r32"},   /* pre-RoPE keys: not on the GPU */
                 {64, 16, "lowrank:r48", "lowrank:r48"},           /* rank not compiled */
                 {64, 16, "lowrank:r32:int4", "lowrank:r32"},      /* int4 coefficients */
                 {64, 16, "lowrank:r32", "hybrid:r32"},            /* rank 32: f16 or int8 on both sides */
                 {64, 16, "f16", "lowrank:r32"},                   /* 64 K numbers, 32 V numbers */
                 {128, 16, "latent:96", "latent:96"}};                 /* rank not compiled */
    for (auto &b : cases) {
        kvc_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.n_layer = 1;
        cfg.n_kv_head = 1;
        cfg.head_dim = b.D;
        cfg.block_size = b.B;
        cfg.k_codec = b.kc;
        cfg.v_codec = b.vc;
        cfg.force_scalar = 1;
        cfg.memory_bytes = 1 << 20;
        kvc_pool *pool;
        if (kvc_pool_create(&cfg, &pool, err, sizeof err) != KVC_OK) {
            EXPECT(0, "pool D=%d B=%d: %s", b.D, b.B, err);
            continue;
        }
        kvc_cu_layout lay;
        err[0] = 0;
        int rc = kvc_cu_layout_init(&lay, pool, err, sizeof err);
        EXPECT(rc == KVC_ERR_INVAL && err[0], "layout D=%d B=%d %s: rc %d", b.D, b.B, b.kc, rc);
        printf("  refused as expected: %s\n", err);
        kvc_pool_destroy(pool);
    }
    /* n_rep 9 */
    kvc_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.n_layer = 1;
    cfg.n_kv_head = 1;
    cfg.head_dim = 64;
    cfg.block_size = 16;
    cfg.k_codec = cfg.v_codec = "f16";
    cfg.force_scalar = 1;
    cfg.memory_bytes = 1 << 20;
    kvc_pool *pool;
    if (kvc_pool_create(&cfg, &pool, err, sizeof err) == KVC_OK) {
        kvc_cu_layout lay;
        EXPECT(kvc_cu_layout_init(&lay, pool, err, sizeof err) == KVC_OK, "layout: %s", err);
        dev_buf<float> d(64 * 9 + 64);
        dev_buf<int32_t> bt(4);
        const kvc_cu_decode_args a = decode_args(bt.p, 0, bt.p, 1, 16, 9, 0.0f, d.p, d.p, 64 * 9);
        err[0] = 0;
        int rc = kvc_cu_decode(&lay, d.p, 0, &a, d.p, 64, NULL, err, sizeof err);
        EXPECT(rc == KVC_ERR_INVAL && err[0], "n_rep 9: rc %d", rc);
        printf("  refused as expected: %s\n", err);
        kvc_cu_layout_dispose(&lay);
        kvc_pool_destroy(pool);
    }
}

/* A calibration file (pca bases with means) fitted on random vectors of n_layer
 * layers, keys and values, at `path`, every layer at rank 32 or (rank_last >
 * 0) the last at rank_last (rewritten in the file: its per-layer ranks come
 * before each set's bases, kvcache.h); false on failure. */
static bool make_calib(const char *path, int n_layer, int H, int D, int rank_last = 0) {
    kvc_calib_fit *fit = kvc_calib_fit_create(n_layer, H, D);
    if (!fit) return false;
    const int n = 600;
    std::vector<float> x((size_t)n * H * D);
    for (int set = 0; set < 2; set++)
        for (int l = 0; l < n_layer; l++) {
            for (size_t i = 0; i < x.size(); i++) x[i] = nrand() * (0.3f + (float)(i % D) / D) + 0.5f * (float)(i % 5);
            kvc_calib_fit_add(fit, set, l, x.data(), n, (int64_t)H * D);
        }
    kvc_calib_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.rank = 32;
    opts.model = "gpu_test";
    char err[256];
    const int rc = kvc_calib_fit_write(fit, &opts, path, err, sizeof err);
    kvc_calib_fit_destroy(fit);
    if (rc != KVC_OK) {
        printf("calibration: %s\n", err);
        return false;
    }
    if (rank_last <= 0) return true;
    /* header: magic 8, version and shape 16, n_sets 4, n_tokens 8, model 64;
     * a set: kind 8, rank_head[n_layer], rank_latent[n_layer], then per
     * layer H (2 D + D D) + (2 HD + HD HD) floats */
    const long HD = (long)H * D, per_layer = 4 * (H * (2L * D + (long)D * D) + 2 * HD + HD * HD);
    const long set_bytes = 8 + 8L * n_layer + n_layer * per_layer;
    FILE *fp = fopen(path, "r+b");
    bool ok = fp != NULL;
    const uint32_t r = (uint32_t)rank_last;
    for (int set = 0; set < 2 && ok; set++)
        ok = fseek(fp, 100 + set * set_bytes + 8 + 4L * (n_layer - 1), SEEK_SET) == 0 && fwrite(&r, 4, 1, fp) == 1;
    if (fp && fclose(fp) != 0) ok = false;
    if (!ok) printf("calibration: cannot rewrite the ranks of %s\n", path);
    return ok;
}

int main(int argc, char **argv) {
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
    int quick = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--quick")) quick = 1;
        else {
            fprintf(stderr, "usage: %s [--seed N] [--quick]\n", argv[0]);
            return 2;
        }
    }
    rng_state = seed;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("gpu_test: %s, %d SMs, seed %llu%s\n", prop.name, prop.multiProcessorCount, (unsigned long long)seed,
           quick ? " (quick)" : "");

    /* the first NQ on every shape, the rest on the two model shapes; int4
     * on one side only (f16 / int4: the multi-gpu profile) takes the f16
     * path with the register path's int4 reads */
    const int NQ = 5, NC = 11;
    const char *codecs[NC][2] = {{"f16", "f16"},          {"int8", "int8"},        {"int4", "int4"},
                                 {"f16", "int4"},         {"int4", "int8"},        {"f16", "int8"},
                                 {"int8", "f16"},         {"int4:g64", "int4:g64"}, {"int8", "int4:g64"},
                                 {"int4", "f16"},         {"f16", "int4:g64"}};
    std::vector<test_case> cases;
    const std::vector<int> mix = {1, 15, 16, 17, 100, 777, 0, 2053};
    const std::vector<std::pair<int, int>> chunks = {{0, 300}, {100, 129}, {1000, 64}, {1990, 63}};
    struct shape {
        int D, H, G;
    } shapes[] = {{64, 3, 3}, {128, 8, 4}, {64, 2, 1}, {128, 1, 8}, {64, 2, 2}, {128, 2, 5}, {64, 1, 6}, {128, 1, 7}};
    for (auto &sh : shapes)
        for (int ci = 0; ci < NC; ci++) {
            bool main_shape = sh.D == 64 ? sh.H == 3 : sh.H == 8;
            if (!main_shape && ci >= NQ) continue;
            if (quick && !(main_shape && ci < NQ)) continue;
            test_case tc;
            tc.D = sh.D;
            tc.H = sh.H;
            tc.G = sh.G;
            tc.kc = codecs[ci][0];
            tc.vc = codecs[ci][1];
            tc.ctx = quick ? std::vector<int>{1, 17, 0, 300} : mix;
            tc.chunks = quick ? std::vector<std::pair<int, int>>{{0, 100}, {200, 33}} : chunks;
            tc.q_gain = 1.0f;
            cases.push_back(tc);
        }
    if (!quick) {
        /* long contexts: many splits merged; a peaky softmax (large q) */
        test_case a = {64, 3, 3, "f16", "f16", {33000, 5}, {{30000, 200}}, 1.0f};
        test_case b = {128, 2, 4, "int8", "int8", {20000}, {{19000, 100}}, 4.0f};
        test_case c = {128, 8, 4, "f16", "f16", {4099, 4096, 1}, {{2048, 2048}, {0, 2051}}, 1.0f};
        test_case d = {64, 3, 3, "int4", "int4", {33000, 5}, {{32900, 100}}, 1.0f};
        test_case e = {128, 2, 4, "int4:g64", "int4:g64", {20000, 4100}, {{19000, 64}}, 4.0f};
        test_case f = {128, 8, 4, "f16", "int4", {9000, 31}, {{8900, 100}}, 4.0f};
        cases.push_back(f);
        cases.push_back(a);
        cases.push_back(b);
        cases.push_back(c);
        cases.push_back(d);
        cases.push_back(e);
    }
    /* transform codecs (orthogonal bases): rank 32 f16 / int8 (the D 32
     * instances), latents (one block for all heads; two latent sides regroup
     * the rows), ranks 64 / 128 with mixed elements, a plain side beside a
     * transformed one */
    struct tcase {
        int D;
        const char *kc, *vc;
        bool all_shapes;
    } tcases[] = {{0, "lowrank:r32", "lowrank:r32", true},        {0, "hybrid:r32", "hybrid:r32", false},
                  {0, "latent:64", "latent:64", true},            {0, "hybrid:latent:64", "hybrid:latent:64", false},
                  {0, "lowrank:r64", "hybrid:r64", false},        {64, "f16", "lowrank:r64", false},
                  {128, "latent:128", "latent:128", true},        {128, "hybrid:latent:128", "lowrank:r128", false},
                  {128, "latent:128", "hybrid:latent:128", false}};
    for (auto &sh : shapes)
        for (auto &t : tcases) {
            const bool main_shape = sh.D == 64 ? sh.H == 3 : sh.H == 8;
            if ((t.D && t.D != sh.D) || (!main_shape && !t.all_shapes) || quick) continue;
            test_case tc = {sh.D, sh.H, sh.G, t.kc, t.vc, mix, chunks, 1.0f};
            cases.push_back(tc);
        }
    /* pca bases: means (the expansion adds them; the K mean cancels) */
    static const char *calib_path = "/tmp/kvc_gpu_test_calib.bin";
    const bool have_calib = make_calib(calib_path, 2, 3, 64);
    EXPECT(have_calib, "calibration file");
    if (have_calib && !quick) {
        test_case a = {64, 3, 3, "lowrank:r32:pca", "lowrank:r32:pca", mix, chunks, 1.0f, calib_path};
        test_case b = {64, 3, 3, "hybrid:latent:64:pca", "latent:64:pca", mix, chunks, 1.0f, calib_path};
        cases.push_back(a);
        cases.push_back(b);
    }
    /* per-layer pca ranks (the rank left out of the spec): layer 0 at 32,
     * layer 1 (the one decoded) at 64; the workspace is the largest layer's */
    static const char *calib2_path = "/tmp/kvc_gpu_test_calib_layers.bin";
    const bool have_calib2 = !quick && make_calib(calib2_path, 2, 3, 64, 64);
    EXPECT(quick || have_calib2, "calibration file with per-layer ranks");
    if (have_calib2) {
        test_case a = {64, 3, 3, "hybrid:pca", "hybrid:pca", mix, chunks, 1.0f, calib2_path, {32, 64}};
        cases.push_back(a);
    }
    if (quick) {
        test_case a = {64, 3, 3, "hybrid:r32", "hybrid:r32", {1, 17, 0, 300}, {{0, 100}, {200, 33}}, 1.0f};
        test_case b = {128, 8, 4, "latent:128", "hybrid:latent:128", {1, 17, 0, 300}, {{0, 100}, {200, 33}}, 1.0f};
        cases.push_back(a);
        cases.push_back(b);
        /* a warp over several latent heads (NH 3 f16, NH 2 int8) */
        test_case c = {64, 3, 3, "latent:64", "latent:64", {1, 17, 0, 300}, {{0, 100}}, 1.0f};
        test_case d = {128, 8, 4, "hybrid:latent:128", "hybrid:latent:128", {1, 17, 0, 300}, {{0, 100}}, 1.0f};
        cases.push_back(c);
        cases.push_back(d);
    } else {
        /* both sides latent: a warp takes NH heads of G rows (NH 3 at head
         * dim 64, f16 and int8; NH 2 at 128, f16 only): G 8 with NH 3 and 2,
         * the int8 register path at head dim 64 (and NH 1 at 128), many
         * splits merged */
        test_case n1 = {64, 6, 4, "latent:64", "latent:64", mix, {{0, 300}}, 1.0f};
        test_case n2 = {64, 6, 4, "hybrid:latent:64", "hybrid:latent:64", mix, {{0, 300}}, 1.0f};
        test_case n3 = {64, 4, 4, "latent:64", "latent:64", mix, {{0, 300}}, 1.0f};
        test_case n4 = {128, 8, 4, "latent:128", "latent:128", mix, {{0, 300}}, 1.0f};
        test_case n5 = {64, 3, 3, "hybrid:latent:64", "hybrid:latent:64", {33000, 5}, {{32900, 100}}, 4.0f};
        test_case n6 = {128, 8, 4, "hybrid:latent:128", "hybrid:latent:128", {20000, 4100}, {{19000, 64}}, 1.0f};
        cases.push_back(n1);
        cases.push_back(n2);
        cases.push_back(n3);
        cases.push_back(n4);
        cases.push_back(n5);
        cases.push_back(n6);
        test_case a = {64, 3, 3, "hybrid:r32", "hybrid:r32", {33000, 5}, {{32900, 100}}, 1.0f};
        test_case b = {128, 8, 4, "latent:128", "latent:128", {20000, 4100}, {{19000, 64}}, 4.0f};
        test_case c = {64, 3, 3, "lowrank:r32", "lowrank:r32", {4099, 4096, 1}, {{2048, 2048}, {0, 2051}}, 1.0f};
        cases.push_back(a);
        cases.push_back(b);
        cases.push_back(c);
    }
    for (auto &c : cases) run_case(c);
    printf("errors:\n");
    check_errors();
    printf("gpu_test: %d checks, %d failed\n", g_checks, g_fail);
    return g_fail ? 1 : 0;
}
