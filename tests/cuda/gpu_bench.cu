/* gpu_bench.cu: times the GPU kernels of cache/cuda/ on the device machine,
 * per layer, against the memory floor.
 *
 * First the ceiling: a 2 GiB device-to-device copy (bytes read + written over
 * time). Then, for the SmolLM2-135M shape (3 kv heads, head_dim 64, n_rep 3)
 * and the Llama-3-8B shape (8 kv heads, head_dim 128, n_rep 4), per codec:
 *   decode at 64 sequences x 2048, 256 x 512 and 1 x 32768 positions: the
 *     bytes a launch must move (every K/V block of every context page, the
 *     queries, the outputs), time per launch, GB/s and the fraction of the
 *     4.3 TB/s floor (and of the copy just measured). Pages are scattered
 *     (a random permutation); each launch reads another layer of a pool of
 *     >= 800 MB so the 60 MB L2 holds none of it. Timed as a CUDA graph of
 *     2 * n_layer launches replayed 20 times (median replay / launches), and
 *     as single launches between events (median of 50, PyTorch's method),
 *     for several plans ("auto" is the default; warp/seq and 2warp/seq a warp
 *     or two per (sequence, kv head); ppsN splits of N pages);
 *   prefill of a 2048-token chunk at positions 0 and 2048 (TFLOP/s, counting
 *     4 * head_dim per (query row, visible position)); quantized chunks of
 *     32-2048 tokens in registers (`regs`) and expanded (`expd`); chunks of
 *     8-512 tokens after 2048 and 16384 positions by the decode kernel
 *     (`decd`), the prefill kernel in one split (`one`) and split as
 *     planned (`splt`), and by default;
 *   compress-on-write of 64 tokens (a decode step) and 2048 (a chunk);
 *   a layer's decode step as an engine runs it (`step` lines: the write of
 *   each sequence's newest token, then the decode), for the decode cases of
 *   f16, int8 and int4 (others with --match "shape k/v NxCTX step").
 * Transform codecs (lowrank, latent, hybrid) count their stored blocks (a
 * latent: one block a page for all kv heads); the queries' projection and
 * the outputs' expansion are two more launches inside each timed call.
 * Stored numbers are random halves (int8 blocks: random bytes and scales):
 * never zeros.
 *
 * Usage: gpu_bench [--quick] [--csv FILE] [--match TEXT]... [--cases NxCTX,...] [--pps N,...]
 *        (--pps: the ppsN plans timed, default 16,32,64,128,256;
 *        --match: only the decode cases whose label "shape kcodec/vcodec
 *        NxCTX" contains one of the texts, and the prefill and write cases
 *        whose label "shape kcodec/vcodec pw" does; --cases: the decode
 *        cases instead of 64x2048,256x512,1x32768)
 *        gpu_bench --one smollm2|llama8b KCODEC VCODEC N_SEQS CTX   (20 launches, for ncu)
 *        gpu_bench --chunks   (HBM read bandwidth of random 1..64 KB chunks)
 *        gpu_bench --splits smollm2|llama8b KCODEC VCODEC POS0 N K,K,...
 *          (a prefill chunk with its context in each forced number of
 *          splits K, then as planned)
 *        gpu_bench --timeline smollm2|llama8b KCODEC VCODEC N_SEQS CTX [CSV]
 *          (a build with -DKVC_CU_TIMELINE: one launch's per-block marks,
 *          see decode.cu; CSV gets block, SM and the marks in us)
 *        GPU_BENCH_PPS=N in the environment: --one and --timeline run N
 *          pages a split instead of the default plan */
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

extern "C" {
#include "cache/kvcache.h"
#include "cache/pool_internal.h"
}
#include "cache/cuda/common.cuh"   /* kvc__cu_project / kvc__cu_expand: the transforms' share, timed alone */
#include "tests/cuda/check.cuh"

#define KV(call)                                                                          \
    do {                                                                                  \
        char err_[256] = "";                                                              \
        int rc_ = (call);                                                                 \
        if (rc_ != KVC_OK) {                                                              \
            fprintf(stderr, "%s:%d: %s: %d %s\n", __FILE__, __LINE__, #call, rc_, err_);  \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

static const double FLOOR_BW = 4.3e12;   /* bytes/s, the copy bandwidth measured on this GPU */
static FILE *g_csv = NULL;
static std::vector<const char *> g_match;   /* --match */
static std::vector<int> g_pps = {16, 32, 64, 128, 256};   /* --pps: the ppsN plans timed beside the others */

static bool selected(const char *label) {
    if (g_match.empty()) return true;
    for (const char *m : g_match)
        if (strstr(label, m)) return true;
    return false;
}

__global__ void fill_random(uint32_t *p, size_t n_words, uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_words; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 0x9E3779B1u ^ seed;
        h ^= h >> 15;
        h *= 0x2C1B3C6Du;
        h ^= h >> 12;
        h *= 0x297A2D39u;
        h ^= h >> 15;
        __half a = __float2half((float)(h & 0xffff) / 32768.0f - 1.0f);
        __half b = __float2half((float)(h >> 16) / 32768.0f - 1.0f);
        p[i] = (uint32_t)__half_as_ushort(a) | ((uint32_t)__half_as_ushort(b) << 16);
    }
}

static void fill(void *p, size_t bytes, uint32_t seed) {
    fill_random<<<1024, 256>>>((uint32_t *)p, bytes / 4, seed);
    CK(cudaGetLastError());
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

/* Microseconds a call: launch(rep) between two events on st, reps times,
 * the first `warm` dropped, the median. */
template <typename F> static double event_us(cudaStream_t st, int reps, int warm, F &&launch) {
    return median(event_times_us(st, reps, warm, launch));
}

static double copy_bandwidth(void) {
    const size_t bytes = (size_t)2 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, bytes));
    CK(cudaMalloc(&b, bytes));
    fill(a, bytes, 1);
    const double us = event_us(NULL, 13, 3, [&](int) { CK(cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice)); });
    CK(cudaFree(a));
    CK(cudaFree(b));
    return 2.0 * bytes / (us * 1e-6);
}

struct shape {
    const char *name;
    int H, G, D;
};

struct bench_pool {
    kvc_pool *pool = NULL;
    kvc_cu_layout lay;
    uint8_t *arena = NULL;
    int n_pages = 0, n_layer = 0;
};

/* A pool of n_pages pages and enough layers for >= 800 MB of one layer's blocks. */
static bench_pool make_pool(const shape &s, const char *kc, const char *vc, int n_pages) {
    bench_pool b;
    kvc_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.n_kv_head = s.H;
    cfg.head_dim = s.D;
    cfg.block_size = 16;
    cfg.k_codec = kc;
    cfg.v_codec = vc;
    cfg.n_layer = 1;
    cfg.memory_bytes = (size_t)1 << 30;
    char err[256];
    kvc_pool *probe;
    if (kvc_pool_create(&cfg, &probe, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "pool: %s\n", err);
        exit(2);
    }
    size_t layer_bytes = kvc_page_bytes(probe) * (size_t)n_pages;
    kvc_pool_destroy(probe);
    int nl = (int)((800e6 + layer_bytes - 1) / layer_bytes);
    nl = nl < 2 ? 2 : nl > 64 ? 64 : nl;
    cfg.n_layer = nl;
    cfg.memory_bytes = (size_t)n_pages * (layer_bytes / n_pages) * nl;
    if (kvc_pool_create(&cfg, &b.pool, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "pool: %s\n", err);
        exit(2);
    }
    if (kvc_cu_layout_init(&b.lay, b.pool, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "layout: %s\n", err);
        exit(2);
    }
    b.n_pages = kvc_pages_total(b.pool);
    b.n_layer = nl;
    CK(cudaMalloc(&b.arena, (size_t)b.n_pages * b.lay.page_bytes));
    fill(b.arena, (size_t)b.n_pages * b.lay.page_bytes, 12345);
    return b;
}

static void free_pool(bench_pool &b) {
    CK(cudaFree(b.arena));
    kvc_cu_layout_dispose(&b.lay);
    kvc_pool_destroy(b.pool);
}

/* One decode configuration on the device: a pool of n_seqs sequences of
 * ctx positions (their pages a random permutation of the pool's), queries
 * (halves as floats: small finite numbers), outputs and the call's
 * arguments. */
struct decode_case {
    bench_pool bp;
    int pages_per_seq, n_pages;
    int32_t *d_bt, *d_ctx;
    float *d_q, *d_out;
    int64_t qs;                  /* floats a sequence's query (and output) */
    kvc_cu_decode_args a;
};

/* xorshift64 */
static uint64_t next_random(uint64_t &r) {
    r ^= r << 13, r ^= r >> 7, r ^= r << 17;
    return r;
}

static decode_case make_decode_case(const shape &s, const char *kc, const char *vc, int n_seqs, int ctx) {
    decode_case c;
    c.pages_per_seq = (ctx + 15) / 16;
    c.n_pages = n_seqs * c.pages_per_seq;
    c.bp = make_pool(s, kc, vc, c.n_pages);
    std::vector<int32_t> perm(c.n_pages);
    for (int i = 0; i < c.n_pages; i++) perm[i] = i;
    uint64_t r = 88172645463325252ull;
    for (int i = c.n_pages - 1; i > 0; i--) std::swap(perm[i], perm[next_random(r) % (uint64_t)(i + 1)]);
    CK(cudaMalloc(&c.d_bt, sizeof(int32_t) * c.n_pages));
    CK(cudaMemcpy(c.d_bt, perm.data(), sizeof(int32_t) * c.n_pages, cudaMemcpyHostToDevice));
    std::vector<int32_t> ctxs(n_seqs, ctx);
    CK(cudaMalloc(&c.d_ctx, sizeof(int32_t) * n_seqs));
    CK(cudaMemcpy(c.d_ctx, ctxs.data(), sizeof(int32_t) * n_seqs, cudaMemcpyHostToDevice));
    c.qs = (int64_t)s.H * s.G * s.D;
    CK(cudaMalloc(&c.d_q, sizeof(float) * c.qs * n_seqs));
    CK(cudaMalloc(&c.d_out, sizeof(float) * c.qs * n_seqs));
    fill(c.d_q, sizeof(float) * c.qs * n_seqs, 777);
    memset(&c.a, 0, sizeof c.a);
    c.a.block_tables = c.d_bt;
    c.a.bt_stride = c.pages_per_seq;
    c.a.ctx_lens = c.d_ctx;
    c.a.n_seqs = n_seqs;
    c.a.max_ctx = ctx;
    c.a.n_rep = s.G;
    c.a.scale = 1.0f / sqrtf((float)s.D);
    c.a.q = c.d_q;
    c.a.q_stride = c.qs;
    c.a.out = c.d_out;
    c.a.out_stride = c.qs;
    /* the engine's promise (a decode step's write before it stores each
     * sequence's last position only): the graph's decode after decode and
     * the step's decode after its write both keep it (KVC_CU_PREFETCH=0 off) */
    c.a.prefetch = 1;
    c.a.fresh = 1;
    return c;
}

static void free_decode_case(decode_case &c) {
    CK(cudaFree(c.d_bt));
    CK(cudaFree(c.d_ctx));
    CK(cudaFree(c.d_q));
    CK(cudaFree(c.d_out));
    free_pool(c.bp);
}

/* Microseconds a launch: n_launch calls of launch(i) captured in one CUDA
 * graph on st, replayed 23 times (the first 3 dropped), the median. */
template <typename F> static double graph_us(cudaStream_t st, int n_launch, F &&launch) {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
    for (int i = 0; i < n_launch; i++) launch(i);
    CK(cudaStreamEndCapture(st, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    const double us = event_us(st, 23, 3, [&](int) { CK(cudaGraphLaunch(exec, st)); });
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    return us / n_launch;
}

static void bench_decode(const shape &s, const char *kc, const char *vc, int n_seqs, int ctx, bool quick) {
    decode_case dc = make_decode_case(s, kc, vc, n_seqs, ctx);
    bench_pool &bp = dc.bp;
    const int pages_per_seq = dc.pages_per_seq, n_pages = dc.n_pages;
    const int64_t qs = dc.qs;
    kvc_cu_decode_args &a = dc.a;
    const kvc_pool *p = bp.pool;
    /* a latent side has one block a page for all kv heads */
    const double kv_bytes = (double)n_seqs * pages_per_seq *
                            ((double)p->kc.n_groups * p->kc.block_bytes[0] + (double)p->vc.n_groups * p->vc.block_bytes[0]);
    const double bytes = kv_bytes + 2.0 * sizeof(float) * qs * n_seqs + 4.0 * n_pages + 4.0 * n_seqs;
    const double floor_us = bytes / FLOOR_BW * 1e6;

    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    struct tuning {
        int pps, wph;
    };
    std::vector<tuning> tunings = {{0, 0}, {0, 1}, {0, 2}};
    for (int pps : g_pps) tunings.push_back({pps, -1});
    if (quick) tunings = {{0, 0}};
    double best_us = 1e30, auto_us = 0;
    tuning best = {0, 0};
    for (const tuning &tu : tunings) {
        if (tu.pps > pages_per_seq) continue;
        kvc_cu_set_decode_tuning(tu.pps, tu.wph);
        size_t wsb = kvc_cu_decode_workspace(&bp.lay, n_seqs, ctx, s.G);
        void *ws;
        CK(cudaMalloc(&ws, wsb));
        CK(cudaMemset(ws, 0, wsb));
        KV(kvc_cu_decode(&bp.lay, bp.arena, 0, &a, ws, wsb, st, err_, sizeof err_));   /* outside capture: first-use setup */
        CK(cudaStreamSynchronize(st));
        /* graph of 2 * n_layer launches, one per layer in turn */
        const double ug = graph_us(st, 2 * bp.n_layer, [&](int i) {
            KV(kvc_cu_decode(&bp.lay, bp.arena, i % bp.n_layer, &a, ws, wsb, st, err_, sizeof err_));
        });
        const double ue = event_us(st, 55, 5, [&](int rep) {
            KV(kvc_cu_decode(&bp.lay, bp.arena, rep % bp.n_layer, &a, ws, wsb, st, err_, sizeof err_));
        });
        CK(cudaFree(ws));
        char pn[32];
        if (tu.pps) snprintf(pn, sizeof pn, "pps%d", tu.pps);
        else if (tu.wph) snprintf(pn, sizeof pn, tu.wph == 1 ? "warp/seq" : "2warp/seq");
        else snprintf(pn, sizeof pn, "auto");
        printf("decode %-8s %-9s %4dx%-6d %-7s %8.2f us graph (%6.0f GB/s, %5.1f%% of floor) %8.2f us event (%5.1f%%)  [%.1f MB, floor %.2f us]\n",
               s.name, kc, n_seqs, ctx, pn, ug, bytes / ug * 1e-3, floor_us / ug * 100, ue, floor_us / ue * 100,
               bytes / 1e6, floor_us);
        if (g_csv)
            fprintf(g_csv, "decode,%s,%s/%s,%d,%d,%s,%.3f,%.3f,%.0f,%.3f\n", s.name, kc, vc, n_seqs, ctx, pn, ug, ue,
                    bytes, floor_us);
        if (ug < best_us) best_us = ug, best = tu;
        if (!tu.pps && !tu.wph) auto_us = ug;
    }
    printf("BEST decode %-8s %s/%s %dx%d: %.2f us (pps %d mode %d), %.1f%% of floor %.2f us; default plan %.2f us (%.1f%%)\n",
           s.name, kc, vc, n_seqs, ctx, best_us, best.pps, best.wph, floor_us / best_us * 100, floor_us, auto_us,
           floor_us / auto_us * 100);
    if (bp.lay.k_shape != KVC_CU_PLAIN && bp.lay.v_shape != KVC_CU_PLAIN) {
        /* the two transform launches alone (project q, expand out), graph of
         * 2 * n_layer pairs as above */
        float *d_c;
        CK(cudaMalloc(&d_c, sizeof(float) * qs * n_seqs));
        CK(cudaMemset(d_c, 0, sizeof(float) * qs * n_seqs));
        auto pair = [&](int i) {
            const int layer = i % bp.n_layer;
            KV(kvc__cu_project(&bp.lay, layer, n_seqs, s.G, dc.d_q, qs, d_c, st, err_, sizeof err_));
            KV(kvc__cu_expand(&bp.lay, layer, n_seqs, s.G, d_c, dc.d_ctx, 0, dc.d_out, qs, st, err_, sizeof err_));
        };
        pair(0);
        CK(cudaStreamSynchronize(st));
        const double ut = graph_us(st, 2 * bp.n_layer, pair);
        CK(cudaFree(d_c));
        printf("TRANSFORM %-8s %s/%s %dx%d: project + expand %.2f us of the default plan's %.2f\n", s.name, kc, vc,
               n_seqs, ctx, ut, auto_us);
        if (g_csv) fprintf(g_csv, "transform,%s,%s/%s,%d,%d,,%.3f,,,\n", s.name, kc, vc, n_seqs, ctx, ut);
    }
    fflush(stdout);
    kvc_cu_set_decode_tuning(0, 0);
    CK(cudaStreamDestroy(st));
    free_decode_case(dc);
}

/* A decode step of one layer as the engine runs it: the write of each
 * sequence's newest token (its last position) then the decode over the
 * context, graph of n_layer * 2 such pairs, against the write alone and the
 * decode alone in graphs of their own (the write lets the decode launch at
 * its start where the decode's grid lands well beside it, write.cu;
 * KVC_CU_WRITE_PDL=0 never, =1 always). */
/* The codecs of a step, prefill or write line: the key codec when both
 * sides have it, else "k/v". */
static std::string pair_name(const char *kc, const char *vc) {
    return !strcmp(kc, vc) ? std::string(kc) : std::string(kc) + "/" + vc;
}

static void bench_step(const shape &s, const char *kc, const char *vc, int n_seqs, int ctx) {
    decode_case dc = make_decode_case(s, kc, vc, n_seqs, ctx);
    bench_pool &bp = dc.bp;
    std::vector<int32_t> bt(dc.n_pages), slots(n_seqs);
    CK(cudaMemcpy(bt.data(), dc.d_bt, sizeof(int32_t) * dc.n_pages, cudaMemcpyDeviceToHost));
    for (int i = 0; i < n_seqs; i++) slots[i] = bt[(size_t)i * dc.pages_per_seq + (ctx - 1) / 16] * 16 + (ctx - 1) % 16;
    int32_t *d_slots;
    float *d_k, *d_v;
    const int64_t kvs = (int64_t)s.H * s.D;
    CK(cudaMalloc(&d_slots, sizeof(int32_t) * n_seqs));
    CK(cudaMemcpy(d_slots, slots.data(), sizeof(int32_t) * n_seqs, cudaMemcpyHostToDevice));
    CK(cudaMalloc(&d_k, sizeof(float) * kvs * n_seqs));
    CK(cudaMalloc(&d_v, sizeof(float) * kvs * n_seqs));
    fill(d_k, sizeof(float) * kvs * n_seqs, 5);
    fill(d_v, sizeof(float) * kvs * n_seqs, 6);
    const size_t wsb = kvc_cu_decode_workspace(&bp.lay, n_seqs, ctx, s.G);
    void *ws;
    CK(cudaMalloc(&ws, wsb));
    CK(cudaMemset(ws, 0, wsb));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    auto write = [&](int layer) {
        KV(kvc_cu_write(&bp.lay, bp.arena, layer, d_slots, n_seqs, d_k, d_v, kvs, st, err_, sizeof err_));
    };
    auto decode = [&](int layer) {
        KV(kvc_cu_decode(&bp.lay, bp.arena, layer, &dc.a, ws, wsb, st, err_, sizeof err_));
    };
    write(0);
    decode(0);
    CK(cudaStreamSynchronize(st));
    const int n = 2 * bp.n_layer;
    const double us = graph_us(st, n, [&](int i) {
        write(i % bp.n_layer);
        decode(i % bp.n_layer);
    });
    const double uw = graph_us(st, n, [&](int i) { write(i % bp.n_layer); });
    const double ud = graph_us(st, n, [&](int i) { decode(i % bp.n_layer); });
    const char *e = getenv("KVC_CU_WRITE_PDL");
    printf("step   %-8s %-9s %4dx%-6d write + decode %8.2f us graph (write alone %.2f, decode alone %.2f; "
           "KVC_CU_WRITE_PDL %s)\n",
           s.name, pair_name(kc, vc).c_str(), n_seqs, ctx, us, uw, ud, e && *e ? e : "unset");
    if (g_csv) fprintf(g_csv, "step,%s,%s/%s,%d,%d,,%.3f,%.3f,%.3f,\n", s.name, kc, vc, n_seqs, ctx, us, uw, ud);
    CK(cudaStreamDestroy(st));
    CK(cudaFree(ws));
    CK(cudaFree(d_slots));
    CK(cudaFree(d_k));
    CK(cudaFree(d_v));
    free_decode_case(dc);
}

static int g_splits = -1;   /* --splits: the context splits forced (kvc_cu_set_prefill_split) */

/* way: -1 every default; 0 / 1 the prefill kernel with quantized pages
 * dequantized in registers / expanded into f16 scratch pages
 * (kvc_cu_set_prefill_expand); 2 the chunk through the decode kernel
 * (kvc_cu_set_prefill_small); 3 / 4 the prefill kernel, expanded, its
 * context in one split / split as planned (kvc_cu_set_prefill_split).
 * 0 and 1 split as planned. --splits forces the split count of every way
 * but 3. */
static void bench_prefill(const shape &s, const char *kc, const char *vc, int pos0, int n, int way) {
    const int B = 16, pages = (pos0 + n + B - 1) / B;
    bench_pool bp = make_pool(s, kc, vc, pages);
    std::vector<int32_t> bt(pages);
    for (int i = 0; i < pages; i++) bt[i] = (i * 7919) % pages;   /* scattered; 7919 prime > pages or coprime */
    int32_t *d_bt;
    CK(cudaMalloc(&d_bt, sizeof(int32_t) * pages));
    CK(cudaMemcpy(d_bt, bt.data(), sizeof(int32_t) * pages, cudaMemcpyHostToDevice));
    const int64_t qs = (int64_t)s.H * s.G * s.D;
    float *d_q, *d_out;
    CK(cudaMalloc(&d_q, sizeof(float) * qs * n));
    CK(cudaMalloc(&d_out, sizeof(float) * qs * n));
    fill(d_q, sizeof(float) * qs * n, 99);
    if (way >= 0) kvc_cu_set_prefill_expand(way != 0);
    if (way >= 0) kvc_cu_set_prefill_small(way == 2 ? n : 0);
    kvc_cu_set_prefill_split(way == 3 ? 0 : g_splits);
    const double us = event_us(NULL, 23, 3, [&](int rep) {
        KV(kvc_cu_prefill(&bp.lay, bp.arena, rep % bp.n_layer, d_bt, pos0, n, s.G, 1.0f / sqrtf((float)s.D), d_q, qs,
                          d_out, qs, NULL, err_, sizeof err_));
    });
    double flops = 0;
    for (int i = 0; i < n; i++) flops += 4.0 * s.D * (pos0 + i + 1) * s.H * s.G;
    kvc_cu_set_prefill_expand(-1);
    kvc_cu_set_prefill_small(-1);
    kvc_cu_set_prefill_split(-1);
    const char *hows[6] = {"", " regs", " expd", " decd", " one", " splt"};
    char forced[16];
    snprintf(forced, sizeof forced, " s%d", g_splits);
    const char *how = g_splits >= 0 && way != 3 ? forced : hows[way + 1];
    printf("prefill%s %-8s %-9s pos0 %-5d n %d: %9.1f us, %6.1f TFLOP/s\n", how, s.name, pair_name(kc, vc).c_str(),
           pos0, n, us, flops / us * 1e-6);
    if (g_csv) fprintf(g_csv, "prefill%s,%s,%s/%s,%d,%d,,%.3f,,%.0f,\n", how, s.name, kc, vc, pos0, n, us, flops);
    fflush(stdout);
    CK(cudaFree(d_bt));
    CK(cudaFree(d_q));
    CK(cudaFree(d_out));
    free_pool(bp);
}

/* step false: n tokens of a prefill chunk (runs of 16 filling pages); true:
 * a decode step's n tokens, one in each of n pages at offsets 3..15 (the
 * pages' earlier tokens re-coded where int4 keys widen a channel's range;
 * pages 3 i mod 4 n are distinct while 3 does not divide n).
 * Event-timed launches and a graph of 2 * n_layer launches. */
static void bench_write(const shape &s, const char *kc, const char *vc, int n, bool step) {
    bench_pool bp = make_pool(s, kc, vc, step ? 4 * n : (n + 15) / 16 * 4);
    std::vector<int32_t> slots(n);
    for (int i = 0; i < n; i++)
        slots[i] = step ? (int32_t)(((int64_t)i * 3 % bp.n_pages) * 16 + 3 + (i * 5) % 13)
                        : ((i / 16) * 3 % bp.n_pages) * 16 + i % 16;
    int32_t *d_slots;
    CK(cudaMalloc(&d_slots, sizeof(int32_t) * n));
    CK(cudaMemcpy(d_slots, slots.data(), sizeof(int32_t) * n, cudaMemcpyHostToDevice));
    const int64_t kvs = (int64_t)s.H * s.D;
    float *d_k, *d_v;
    CK(cudaMalloc(&d_k, sizeof(float) * kvs * n));
    CK(cudaMalloc(&d_v, sizeof(float) * kvs * n));
    fill(d_k, sizeof(float) * kvs * n, 5);
    fill(d_v, sizeof(float) * kvs * n, 6);
    const double us = event_us(NULL, 23, 3, [&](int rep) {
        KV(kvc_cu_write(&bp.lay, bp.arena, rep % bp.n_layer, d_slots, n, d_k, d_v, kvs, NULL, err_, sizeof err_));
    });
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    const double ug = graph_us(st, 2 * bp.n_layer, [&](int i) {
        KV(kvc_cu_write(&bp.lay, bp.arena, i % bp.n_layer, d_slots, n, d_k, d_v, kvs, st, err_, sizeof err_));
    });
    CK(cudaStreamDestroy(st));
    const kvc_pool *p = bp.pool;
    const double bytes = 2.0 * 4 * kvs * n + (double)n / 16 *
                         ((double)p->kc.n_groups * p->kc.block_bytes[0] + (double)p->vc.n_groups * p->vc.block_bytes[0]);
    printf("write%s %-8s %-9s %5d tokens: %8.2f us, %6.0f GB/s; graph %8.2f us\n", step ? "-step" : "     ", s.name,
           pair_name(kc, vc).c_str(), n, us, bytes / us * 1e-3, ug);
    if (g_csv)
        fprintf(g_csv, "write%s,%s,%s/%s,%d,,,%.3f,%.3f,%.0f,\n", step ? "-step" : "", s.name, kc, vc, n, us, ug, bytes);
    CK(cudaFree(d_slots));
    CK(cudaFree(d_k));
    CK(cudaFree(d_v));
    free_pool(bp);
}

/* --chunks: read bandwidth of chunks of 1..64 KB at random places of 2 GiB
 * (what a paged layout's scattered blocks can get from HBM), each byte once,
 * and of the same chunks in order (sequential), two ways:
 *   ld:   a warp per chunk in turn, 16 bytes a lane a load, 8 loads in
 *         flight a lane (as the cp.async rings issue them);
 *   bulk: a warp per chunk in turn, lane 0 copying pieces of <= 8 KB into a
 *         ring of 16-24 KB of shared memory by the bulk copy engine
 *         (cp.async.bulk, an mbarrier a slot), all but one slot in flight.
 * The chunk offsets are read from a table, as a block table is. */
template <int UPL>   /* 16-byte units a lane per chunk */
__global__ void chunk_ld(const uint4 *__restrict__ base, const int64_t *__restrict__ chunk_u4, int n_chunks,
                         uint32_t *sink) {
    const int lane = threadIdx.x & 31, nw = gridDim.x * (blockDim.x >> 5);
    const int w = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int mine = n_chunks > w ? (n_chunks - w + nw - 1) / nw : 0, n_items = mine * UPL;
    uint32_t acc = 0;
    for (int j = 0; j < n_items; j += 8) {
        uint4 v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const int jj = j + k;
            v[k] = jj < n_items ? __ldcs(base + chunk_u4[w + nw * (jj / UPL)] + lane + 32 * (jj % UPL))
                                : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < 8; k++) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    if (acc == 0x12345678u) *sink = acc;
}

__global__ void chunk_bulk(const uint8_t *__restrict__ base, const int64_t *__restrict__ chunk_u4, int n_chunks,
                           int piece, int n_pieces, int slots, uint32_t *sink) {
    extern __shared__ __align__(16) unsigned char ring_raw[];
    const int lane = threadIdx.x & 31, wl = threadIdx.x >> 5, nw = gridDim.x * (blockDim.x >> 5);
    const int w = blockIdx.x * (blockDim.x >> 5) + wl;
    unsigned char *ring = ring_raw + (size_t)wl * (slots * piece + 8 * 32);
    const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring), mbar = ring_s + slots * piece;
    const int mine = n_chunks > w ? (n_chunks - w + nw - 1) / nw : 0, n_items = mine * n_pieces;
    if (lane == 0) {
        for (int i = 0; i < slots; i++) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(mbar + 8 * i));
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncwarp();
    auto issue = [&](int j) {
        if (lane == 0 && j < n_items) {
            const int s = j % slots;
            const uint8_t *src = base + 16 * chunk_u4[w + nw * (j / n_pieces)] + (size_t)piece * (j % n_pieces);
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(mbar + 8 * s), "r"(piece)
                         : "memory");
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                    ring_s + s * piece),
                "l"(src), "r"(piece), "r"(mbar + 8 * s)
                : "memory");
        }
    };
    for (int j = 0; j < slots - 1; j++) issue(j);
    uint32_t acc = 0;
    for (int j = 0; j < n_items; j++) {
        issue(j + slots - 1);
        const int s = j % slots;
        const uint32_t parity = (uint32_t)(j / slots) & 1;
        asm volatile(
            "{\n.reg .pred done;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
            "@!done bra WAIT;\n}\n" ::"r"(mbar + 8 * s),
            "r"(parity)
            : "memory");
        acc ^= reinterpret_cast<const uint32_t *>(ring + s * piece)[lane];
        __syncwarp();
    }
    if (acc == 0x12345678u) *sink = acc;
}

/* The decode kernels' f16 copy pattern: a warp's ring of S slots of P 2 KB
 * chunks, 16 bytes a lane by cp.async, S - 1 slots in flight. */
template <int S, int P>
__global__ void chunk_cpa(const uint8_t *__restrict__ base, const int64_t *__restrict__ chunk_u4, int n_chunks,
                          uint32_t *sink) {
    extern __shared__ __align__(16) unsigned char ring_raw[];
    constexpr int SLOT = P * 2048;
    const int lane = threadIdx.x & 31, wl = threadIdx.x >> 5, nw = gridDim.x * (blockDim.x >> 5);
    const int w = blockIdx.x * (blockDim.x >> 5) + wl;
    unsigned char *ring = ring_raw + (size_t)wl * S * SLOT;
    const int mine = n_chunks > w ? (n_chunks - w + nw - 1) / nw : 0, n_slots = (mine + P - 1) / P;
    auto issue = [&](int j) {
        if (j < n_slots)
#pragma unroll
            for (int q = 0; q < P; q++) {
                const int c = j * P + q;
                if (c < mine) {
                    const uint8_t *src = base + 16 * chunk_u4[w + nw * c] + 16 * lane;
                    const uint32_t dst = (uint32_t)__cvta_generic_to_shared(ring + (j % S) * SLOT + q * 2048 + 16 * lane);
#pragma unroll
                    for (int i = 0; i < 4; i++)
                        asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(dst + 512 * i),
                                     "l"(src + 512 * i));
                }
            }
        asm volatile("cp.async.commit_group;");
    };
    for (int j = 0; j < S - 1; j++) issue(j);
    uint32_t acc = 0;
    for (int j = 0; j < n_slots; j++) {
        issue(j + S - 1);
        asm volatile("cp.async.wait_group %0;" ::"n"(S - 1));
        __syncwarp();
        acc ^= reinterpret_cast<const uint32_t *>(ring + (j % S) * SLOT)[lane];
        __syncwarp();
    }
    if (acc == 0x12345678u) *sink = acc;
}

/* 2 KB random chunks through chunk_cpa at S slots and `per_sm` blocks of 4
 * warps: one launch between events, and a graph of 8 launches (each on
 * another of 4 offset tables: d_off holds 4 n). */
template <int S, int P> static void bench_cpa(const uint8_t *base, const int64_t *d_off, size_t n, size_t bytes,
                                              int n_sm, uint32_t *sink, cudaStream_t st) {
    const size_t smem = (size_t)4 * S * P * 2048;
    CK(cudaFuncSetAttribute(chunk_cpa<S, P>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    int max_sm = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&max_sm, chunk_cpa<S, P>, 128, smem));
    std::vector<int> grids;
    for (int per_sm = 2; per_sm <= max_sm; per_sm++) grids.push_back(n_sm * per_sm);
    if (S == 3 && P == 2) grids.push_back(384);   /* SmolLM2 64 x 2k decode's grid */
    for (int grid : grids) {
        const int per_sm = (grid + n_sm - 1) / n_sm;
        auto launch = [&](int i) {
            chunk_cpa<S, P><<<grid, 128, smem, st>>>(base, d_off + (i % 4) * n, (int)n, sink);
        };
        const double us = event_us(st, 8, 2, launch);
        const double ug = graph_us(st, 8, launch);
        CK(cudaGetLastError());
        printf("cp.async ring %d slots of %d KB, %4d blocks, %2d warps an SM (%3d KB in flight an SM), %4zu MB: "
               "%6.0f GB/s (%.2f us), graph %6.0f GB/s (%.2f us)\n",
               S, 2 * P, grid, 4 * per_sm, 4 * per_sm * (S - 1) * 2 * P, bytes >> 20, bytes / us * 1e-3, us,
               bytes / ug * 1e-3, ug);
    }
}

/* Chunk offsets (in 16-byte units) on the device; free with cudaFree. */
static int64_t *device_offsets(const std::vector<int64_t> &off) {
    int64_t *d;
    CK(cudaMalloc(&d, sizeof(int64_t) * off.size()));
    CK(cudaMemcpy(d, off.data(), sizeof(int64_t) * off.size(), cudaMemcpyHostToDevice));
    return d;
}

static void bench_chunks(void) {
    const size_t buf = (size_t)2 << 30, total = (size_t)512 << 20;
    uint8_t *base;
    uint32_t *sink;
    CK(cudaMalloc(&base, buf));
    CK(cudaMalloc(&sink, 4));
    fill(base, buf, 3);
    int n_sm;
    CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, 0));
    for (int kb : {1, 2, 4, 6, 8, 12, 16, 32, 64}) {
        const size_t chunk = (size_t)kb << 10, n = total / chunk, slots_total = buf / chunk;
        const int piece = chunk <= 8192 ? (int)chunk : chunk % 8192 ? 4096 : 8192;
        const int slots = std::max(2, std::min(24576 / piece, 8));
        const size_t smem = 4 * ((size_t)slots * piece + 8 * 32);
        CK(cudaFuncSetAttribute(chunk_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
        for (int seq = 0; seq < 2; seq++) {
            std::vector<int64_t> off(n);
            uint64_t r = 0x9E3779B97F4A7C15ull * (uint64_t)kb;
            for (size_t c = 0; c < n; c++)
                off[c] = (int64_t)(seq ? c : next_random(r) % slots_total) * (int64_t)(chunk / 16);
            int64_t *d_off = device_offsets(off);
            const int upl = (int)(chunk / 512);
            const double us_ld = event_us(NULL, 8, 2, [&](int) {
#define CHUNK_LD(U) \
    case U: chunk_ld<U><<<n_sm * 8, 256>>>((const uint4 *)base, d_off, (int)n, sink); break;
                switch (upl) {
                    CHUNK_LD(2) CHUNK_LD(4) CHUNK_LD(8) CHUNK_LD(12) CHUNK_LD(16) CHUNK_LD(24) CHUNK_LD(32)
                    CHUNK_LD(64) CHUNK_LD(128)
                }
#undef CHUNK_LD
            });
            CK(cudaGetLastError());
            int per_sm = 0;
            CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, chunk_bulk, 128, smem));
            const double us_bulk = event_us(NULL, 8, 2, [&](int) {
                chunk_bulk<<<n_sm * per_sm, 128, smem>>>(base, d_off, (int)n, piece, (int)(chunk / piece), slots,
                                                         sink);
            });
            CK(cudaGetLastError());
            printf("chunks %2d KB %-10s: ld %6.0f GB/s, bulk %6.0f GB/s (pieces of %d B, %d slots a warp, %d warps an SM)\n",
                   kb, seq ? "sequential" : "random", total / us_ld * 1e-3, total / us_bulk * 1e-3, piece, slots,
                   4 * per_sm);
            CK(cudaFree(d_off));
        }
    }
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    for (size_t bytes : {(size_t)25 << 20, (size_t)100 << 20, (size_t)512 << 20}) {
        const size_t n = bytes / 2048, slots_total = buf / 2048;
        std::vector<int64_t> off(4 * n);
        uint64_t r = 0x2545F4914F6CDD1Dull;
        for (size_t c = 0; c < 4 * n; c++) off[c] = (int64_t)(next_random(r) % slots_total) * 128;
        int64_t *d_off = device_offsets(off);
        bench_cpa<2, 2>(base, d_off, n, bytes, n_sm, sink, st);
        bench_cpa<3, 2>(base, d_off, n, bytes, n_sm, sink, st);
        bench_cpa<4, 2>(base, d_off, n, bytes, n_sm, sink, st);
        bench_cpa<6, 2>(base, d_off, n, bytes, n_sm, sink, st);
        bench_cpa<3, 4>(base, d_off, n, bytes, n_sm, sink, st);
        CK(cudaFree(d_off));
    }
    CK(cudaStreamDestroy(st));
    CK(cudaFree(base));
    CK(cudaFree(sink));
}

/* --one: a single decode configuration launched 20 times (layers in turn),
 * nothing else: a target for ncu. */
static void one_decode(const shape &s, const char *kc, const char *vc, int n_seqs, int ctx) {
    decode_case dc = make_decode_case(s, kc, vc, n_seqs, ctx);
    size_t wsb = kvc_cu_decode_workspace(&dc.bp.lay, n_seqs, ctx, s.G);
    void *ws;
    CK(cudaMalloc(&ws, wsb));
    CK(cudaMemset(ws, 0, wsb));
    for (int i = 0; i < 20; i++)
        KV(kvc_cu_decode(&dc.bp.lay, dc.bp.arena, i % dc.bp.n_layer, &dc.a, ws, wsb, NULL, err_, sizeof err_));
    CK(cudaDeviceSynchronize());
    CK(cudaFree(ws));
    free_decode_case(dc);
    printf("one: %s %s/%s %dx%d done\n", s.name, kc, vc, n_seqs, ctx);
}

#ifdef KVC_CU_TIMELINE
extern "C" int kvc__cu_timeline_read(unsigned long long *dst, size_t n);
extern "C" int kvc__cu_timeline_clear(void);

/* --timeline: four decode launches after a graph of them (its time for
 * scale); the last launch's marks (each block overwrites its own): each
 * mark's spread over the blocks, the page loops' mean end by SM, and the
 * blocks' marks into csv. */
constexpr int TL_BLOCKS = 16384, TL_MARKS = 12;   /* decode.cu's mark table */
static void timeline(const shape &s, const char *kc, const char *vc, int n_seqs, int ctx, const char *csv) {
    decode_case dc = make_decode_case(s, kc, vc, n_seqs, ctx);
    const size_t wsb = kvc_cu_decode_workspace(&dc.bp.lay, n_seqs, ctx, s.G);
    void *ws;
    CK(cudaMalloc(&ws, wsb));
    CK(cudaMemset(ws, 0, wsb));
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    auto launch = [&](int i) {
        KV(kvc_cu_decode(&dc.bp.lay, dc.bp.arena, i % dc.bp.n_layer, &dc.a, ws, wsb, st, err_, sizeof err_));
    };
    const double ug = graph_us(st, 2 * dc.bp.n_layer, launch);
    CK(cudaStreamSynchronize(st));
    CK((cudaError_t)kvc__cu_timeline_clear());
    for (int i = 0; i < 4; i++) launch(i);
    CK(cudaStreamSynchronize(st));
    std::vector<unsigned long long> tl(TL_MARKS * TL_BLOCKS);
    CK((cudaError_t)kvc__cu_timeline_read(tl.data(), tl.size()));
    unsigned long long t0 = ~0ull;
    std::vector<int> blocks;
    for (int b = 0; b < TL_BLOCKS; b++)
        if (tl[TL_MARKS * b]) blocks.push_back(b), t0 = std::min(t0, tl[TL_MARKS * b]);
    if (blocks.empty()) {
        fprintf(stderr, "timeline: no block left marks (is decode.cu built with -DKVC_CU_TIMELINE?)\n");
        exit(1);
    }
    auto us = [&](int b, int k) { return tl[TL_MARKS * b + k] ? (tl[TL_MARKS * b + k] - t0) * 1e-3 : -1.0; };
    auto loop_end = [&](int b) {
        double m = 0;
        for (int k = 3; k < 7; k++) m = std::max(m, us(b, k));
        return m;
    };
    double span = 0;
    for (int b : blocks) span = std::max(span, us(b, 7));
    printf("timeline %s %s/%s %dx%d: graph %.2f us a launch; %zu blocks, first start to last exit %.2f us\n", s.name,
           kc, vc, n_seqs, ctx, ug, blocks.size(), span);
    const char *names[8] = {"start", "", "slot 0 in (w0)", "loop end w0", "loop end w1", "loop end w2", "loop end w3",
                            "exit"};
    for (int k : {0, 2, 3, 4, 5, 6, 7}) {
        std::vector<double> v;
        for (int b : blocks)
            if (us(b, k) >= 0) v.push_back(us(b, k));
        if (v.empty()) continue;
        std::sort(v.begin(), v.end());
        auto q = [&](double f) { return v[(size_t)(f * (v.size() - 1))]; };
        printf("  %-15s min %7.2f  p10 %7.2f  p50 %7.2f  p90 %7.2f  max %7.2f us\n", names[k], q(0), q(0.1),
               q(0.5), q(0.9), q(1));
    }
    std::vector<std::vector<double>> by_sm(1024);
    for (int b : blocks) by_sm[tl[TL_MARKS * b + 1] & 1023].push_back(loop_end(b));
    std::vector<std::pair<double, int>> sm_mean;
    for (int sm = 0; sm < 1024; sm++)
        if (!by_sm[sm].empty()) {
            double m = 0;
            for (double x : by_sm[sm]) m += x;
            sm_mean.push_back({m / by_sm[sm].size(), sm});
        }
    std::sort(sm_mean.begin(), sm_mean.end());
    printf("  page loops' end by SM (mean of its blocks): %zu SMs, fastest", sm_mean.size());
    for (size_t i = 0; i < sm_mean.size() && i < 6; i++) printf(" %d:%.1f", sm_mean[i].second, sm_mean[i].first);
    printf(", median %.1f, slowest %d:%.1f us\n", sm_mean[sm_mean.size() / 2].first, sm_mean.back().second,
           sm_mean.back().first);
    if (csv) {
        FILE *f = fopen(csv, "w");
        if (!f) {
            fprintf(stderr, "timeline: cannot write %s\n", csv);
            exit(2);
        }
        fprintf(f, "block,sm,start,slot0,end_w0,end_w1,end_w2,end_w3,exit,stored,group_merge,merge\n");
        for (int b : blocks)
            fprintf(f, "%d,%llu,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f,%.3f\n", b, tl[TL_MARKS * b + 1], us(b, 0),
                    us(b, 2), us(b, 3), us(b, 4), us(b, 5), us(b, 6), us(b, 7), us(b, 8), us(b, 9), us(b, 10));
        fclose(f);
    }
    CK(cudaFree(ws));
    CK(cudaStreamDestroy(st));
    free_decode_case(dc);
}
#endif

/* "64x2048,1x32768" -> cases; false (nothing changed) on anything else. */
/* --pps N,N,...: pages-a-split plans to time (1..2^20 each); false on
 * anything else, naming it. */
/* Reads a decimal number in [lo, hi] at s and moves s past it; false
 * (s unmoved) when there is none or it is out of range. */
static bool read_num(const char *&s, long lo, long hi, long &n) {
    char *e;
    n = strtol(s, &e, 10);
    if (e == s || n < lo || n > hi) return false;
    s = e;
    return true;
}

static bool parse_pps(const char *s) {
    std::vector<int> v;
    for (const char *c = s; *c;) {
        long n;
        if (!read_num(c, 1, 1 << 20, n) || (*c && (*c != ',' || !c[1]))) {
            fprintf(stderr, "gpu_bench: --pps %s: want pages-a-split counts 1..%d separated by commas\n", s, 1 << 20);
            return false;
        }
        v.push_back((int)n);
        c += *c != 0;
    }
    if (v.empty()) return false;
    g_pps = v;
    return true;
}

static bool parse_cases(const char *s, std::vector<std::pair<int, int>> &cases) {
    std::vector<std::pair<int, int>> out;
    while (*s) {
        long n, ctx;
        if (!read_num(s, 1, 65535, n) || *s++ != 'x' || !read_num(s, 1, 1 << 20, ctx) || (*s && *s != ','))
            return false;
        out.push_back({(int)n, (int)ctx});
        s += *s != 0;
    }
    if (out.empty()) return false;
    cases = out;
    return true;
}

int main(int argc, char **argv) {
    bool quick = false;
    std::vector<std::pair<int, int>> cases = {{64, 2048}, {256, 512}, {1, 32768}};
    const shape shapes[2] = {{"smollm2", 3, 3, 64}, {"llama8b", 8, 4, 128}};
    /* --one / --timeline SHAPE KCODEC VCODEC N_SEQS CTX: one decode configuration */
    auto config = [&](const shape *&sh, int &n, int &ctx) {
        sh = !strcmp(argv[2], "smollm2") ? &shapes[0] : !strcmp(argv[2], "llama8b") ? &shapes[1] : NULL;
        n = atoi(argv[5]), ctx = atoi(argv[6]);
        if (!sh || n < 1 || n > 65535 || ctx < 1) {
            fprintf(stderr, "%s %s: want smollm2|llama8b KCODEC VCODEC N_SEQS (1..65535) CTX (>= 1), got %s ... %s %s\n",
                    argv[0], argv[1], argv[2], argv[5], argv[6]);
            return false;
        }
        return true;
    };
    const shape *sh;
    int n_seqs, ctx;
    /* GPU_BENCH_PPS=N: --one and --timeline run pages-per-split N instead of the default plan */
    if (const char *e = getenv("GPU_BENCH_PPS")) {
        const char *c = e;
        long pps;
        if (!read_num(c, 1, 1 << 20, pps) || *c) {
            fprintf(stderr, "%s: GPU_BENCH_PPS=%s: want pages a split, 1..%d\n", argv[0], e, 1 << 20);
            return 2;
        }
        kvc_cu_set_decode_tuning((int)pps, 0);
    }
    if (argc == 7 && !strcmp(argv[1], "--one")) {
        if (!config(sh, n_seqs, ctx)) return 2;
        one_decode(*sh, argv[3], argv[4], n_seqs, ctx);
        return 0;
    }
#ifdef KVC_CU_TIMELINE
    if ((argc == 7 || argc == 8) && !strcmp(argv[1], "--timeline")) {
        if (!config(sh, n_seqs, ctx)) return 2;
        timeline(*sh, argv[3], argv[4], n_seqs, ctx, argc == 8 ? argv[7] : NULL);
        return 0;
    }
#endif
    if (argc == 8 && !strcmp(argv[1], "--splits")) {
        const shape *ps = !strcmp(argv[2], "smollm2") ? &shapes[0] : !strcmp(argv[2], "llama8b") ? &shapes[1] : NULL;
        if (!ps) return 2;
        const int pos0 = atoi(argv[5]), n = atoi(argv[6]);
        for (const char *c = argv[7]; *c; c += strcspn(c, ",") + (c[strcspn(c, ",")] == ',')) {
            g_splits = atoi(c);
            bench_prefill(*ps, argv[3], argv[4], pos0, n, -1);
        }
        g_splits = -1;
        bench_prefill(*ps, argv[3], argv[4], pos0, n, -1);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "--chunks")) {
        bench_chunks();
        return 0;
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        else if (!strcmp(argv[i], "--csv") && i + 1 < argc) g_csv = fopen(argv[++i], "w");
        else if (!strcmp(argv[i], "--match") && i + 1 < argc) g_match.push_back(argv[++i]);
        else if (!strcmp(argv[i], "--cases") && i + 1 < argc && parse_cases(argv[++i], cases)) continue;
        else if (!strcmp(argv[i], "--pps") && i + 1 < argc && parse_pps(argv[++i])) continue;
        else {
            fprintf(stderr, "usage: %s [--quick] [--csv FILE] [--match TEXT]... [--cases NxCTX,...] [--pps N,...]\n",
                    argv[0]);
            return 2;
        }
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("gpu_bench: %s, %d SMs, L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    const double bw = copy_bandwidth();
    printf("copy bandwidth (read + write): %.0f GB/s; floor below uses %.0f GB/s\n", bw * 1e-9, FLOOR_BW * 1e-9);
    if (g_csv) fprintf(g_csv, "copy,,,,,,,,%.0f,\n", bw);
    /* codecs: D 0 on both shapes, else only on that head_dim; prefill and
     * write time the "pw" ones */
    struct codec {
        int D;
        const char *k, *v;
        bool pw;
    } codecs[] = {{0, "f16", "f16", true},
                  {0, "int8", "int8", true},
                  {0, "int4", "int4", true},
                  {0, "int4:g64", "int4:g64", false},
                  {0, "f16", "int8", false},
                  {0, "f16", "int4", true},
                  {0, "int4", "int8", false},
                  {64, "lowrank:r32", "lowrank:r32", true},
                  {64, "hybrid:r32", "hybrid:r32", false},
                  {64, "latent:64", "latent:64", true},
                  {64, "hybrid:latent:64", "hybrid:latent:64", false},
                  {128, "lowrank:r64", "lowrank:r64", true},
                  {128, "hybrid:r64", "hybrid:r64", false},
                  {128, "latent:128", "latent:128", true},
                  {128, "hybrid:latent:128", "hybrid:latent:128", false}};
    for (auto &s : shapes)
        for (auto &c : codecs) {
            if ((c.D && c.D != s.D) || (quick && strcmp(c.k, c.v) != 0 && !c.pw)) continue;
            for (auto &cs : cases) {
                char label[96];
                snprintf(label, sizeof label, "%s %s/%s %dx%d", s.name, c.k, c.v, cs.first, cs.second);
                if (selected(label)) bench_decode(s, c.k, c.v, cs.first, cs.second, quick);
            }
        }
    /* a layer's decode step (write then decode): the plain "pw" codecs, or
     * (--match) the "pw" codecs whose label "shape kcodec/vcodec NxCTX step"
     * matches */
    for (auto &s : shapes)
        for (auto &c : codecs) {
            if (!c.pw || (c.D && c.D != s.D)) continue;
            for (auto &cs : cases) {
                char label[96];
                snprintf(label, sizeof label, "%s %s/%s %dx%d step", s.name, c.k, c.v, cs.first, cs.second);
                if ((!g_match.empty() || !strchr(c.k, ':')) && selected(label))
                    bench_step(s, c.k, c.v, cs.first, cs.second);
            }
        }
    /* prefill and write: every "pw" codec, or (--match) those whose label
     * "shape kcodec/vcodec pw" matches */
    auto pw_selected = [&](const shape &s, const codec &c) {
        char label[96];
        snprintf(label, sizeof label, "%s %s/%s pw", s.name, c.k, c.v);
        return c.pw && (!c.D || c.D == s.D) && selected(label);
    };
    for (auto &s : shapes)
        for (auto &c : codecs)
            if (pw_selected(s, c))
                for (int pos0 : {0, 2048}) bench_prefill(s, c.k, c.v, pos0, 2048, -1);
    /* quantized plain pages: both ways of reading them, at chunk sizes from
     * one block of query rows to 2048 tokens */
    for (auto &s : shapes)
        for (auto &c : codecs)
            if (pw_selected(s, c) && !c.D && !(!strcmp(c.k, "f16") && !strcmp(c.v, "f16")))   /* D 0: plain */
                for (int n : {32, 64, 128, 512, 2048})
                    for (int expand : {0, 1}) bench_prefill(s, c.k, c.v, 2048, n, expand);
    /* small and mid-sized chunks after long contexts: the decode kernel,
     * the prefill kernel in one split and split as planned (quantized
     * pages: in registers and expanded), the default (--quick: 32, 128 and
     * 512 tokens by decode, in one split and by default) */
    for (auto &s : shapes)
        for (auto &c : codecs)
            if (pw_selected(s, c) && !c.D)
                for (int pos0 : {2048, 16384})
                    for (int n : {8, 32, 64, 128, 256, 512})
                        for (int way : {2, 3, 0, 4, -1}) {
                            const bool f16 = !strcmp(c.k, "f16") && !strcmp(c.v, "f16");
                            const bool in_quick = (n == 32 || n == 128 || n == 512) && way != 0 && way != 4;
                            if ((way == 0 && f16) || (quick && !in_quick)) continue;
                            bench_prefill(s, c.k, c.v, pos0, n, way);
                        }
    for (auto &s : shapes)
        for (auto &c : codecs)
            if (pw_selected(s, c))
                for (int n : {64, 2048}) bench_write(s, c.k, c.v, n, false);
    for (auto &s : shapes)
        for (auto &c : codecs)
            if (pw_selected(s, c))
                for (int n : {64, 256}) bench_write(s, c.k, c.v, n, true);
    if (g_csv) fclose(g_csv);
    return 0;
}
