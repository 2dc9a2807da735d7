/* bench_attention.c: decode-attention microbenchmark of the paged KV cache.
 *
 * SmolLM2-135M's attention shape by default (30 layers, 3 kv heads, 9 query
 * heads, head_dim 64), n_seq sequences of ctx cached tokens each, block size
 * 16. Pages are handed out round-robin across the sequences, so a sequence's
 * pages are scattered as in a busy server. One token-step = kvc_attend for
 * every (sequence, layer, kv head) with one query token; it reads every cached
 * K and V byte once. Reports the time per step, the decode tokens per second
 * it allows (sequences / step time: attention only, no matmuls) and the cache
 * bytes read per second, per codec. A codec is a spec for K and V, or
 * "KSPEC/VSPEC"; pca specs need --calib FILE (kvserve calibrate). The cached
 * K/V are random, so only speed is measured here.
 *
 *   make bench-attention [BENCH_ARGS="--ctx 2048 --seqs 8 --threads 1 --codecs f32,f16,int8"]
 *
 * --scalar runs the portable kernels, --avx2 the AVX2 ones where the CPU
 * also has AVX-512 (the default: the best it has).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cache/kvcache.h"

typedef struct {
    int n_layer, n_kv_head, n_rep, head_dim, block_size, ctx, n_seq, steps, threads, scalar;
    const char *calib;
} bench_opts;

typedef struct {
    const bench_opts *o;
    kvc_pool *pool;
    kvc_seq *seqs;
    const float *q;      /* (n_seq, n_kv_head * n_rep * head_dim) */
    float *out;          /* same shape */
    int worker;
    const kvc_rope *rope;   /* keys cached before RoPE: the tables; else NULL */
} job;

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static double now(void) { return clock_s(CLOCK_MONOTONIC); }
/* CPU seconds of the whole process: on a shared machine, the time the step
 * would take with the cores to itself (single-threaded runs). */
static double cpu_now(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

/* One token-step's share: units (seq, layer, kv head) worker, worker + threads, ... */
static void *step_worker(void *arg) {
    job *j = arg;
    const bench_opts *o = j->o;
    float *scratch = malloc(sizeof(float) * kvc_attend_scratch_floats(j->pool, o->ctx, o->n_rep));
    int64_t qdim = (int64_t)o->n_kv_head * o->n_rep * o->head_dim;
    int n_units = o->n_seq * o->n_layer * o->n_kv_head;
    for (int u = j->worker; u < n_units; u += o->threads) {
        int s = u / (o->n_layer * o->n_kv_head), layer = u / o->n_kv_head % o->n_layer, h = u % o->n_kv_head;
        int64_t off = (int64_t)s * qdim + (int64_t)h * o->n_rep * o->head_dim;
        kvc_attend_rope(j->pool, &j->seqs[s], layer, h, j->q + off, qdim, 1, o->n_rep, o->ctx - 1,
                        1.0f / sqrtf((float)o->head_dim), j->out + off, qdim, scratch, j->rope);
    }
    free(scratch);
    return NULL;
}

static int bench_codec(const bench_opts *o, const char *codec) {
    char kspec[128], *vspec;
    snprintf(kspec, sizeof kspec, "%s", codec);
    vspec = strchr(kspec, '/');
    if (vspec) *vspec++ = 0;
    else vspec = kspec;
    kvc_config cfg = {.n_layer = o->n_layer, .n_kv_head = o->n_kv_head, .head_dim = o->head_dim,
                      .block_size = o->block_size, .k_codec = kspec, .v_codec = vspec,
                      .force_scalar = o->scalar, .calib = o->calib};
    /* Size the arena from a probe pool's page size. */
    cfg.memory_bytes = (size_t)1 << 30;
    kvc_pool *pool;
    char err[256];
    if (kvc_pool_create(&cfg, &pool, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "bench_attention: %s\n", err);
        return 1;
    }
    size_t page_bytes = kvc_page_bytes(pool);
    kvc_pool_destroy(pool);
    int pages_per_seq = (o->ctx + o->block_size - 1) / o->block_size;
    cfg.memory_bytes = page_bytes * (size_t)pages_per_seq * (size_t)o->n_seq;
    if (kvc_pool_create(&cfg, &pool, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "bench_attention: %s\n", err);
        return 1;
    }

    kvc_seq *seqs = calloc((size_t)o->n_seq, sizeof *seqs);
    for (int p = 0; p < pages_per_seq; p++)            /* round-robin: scattered pages */
        for (int s = 0; s < o->n_seq; s++) {
            int n = (p + 1) * o->block_size;
            if (kvc_seq_reserve(pool, &seqs[s], n < o->ctx ? n : o->ctx) != KVC_OK) {
                fprintf(stderr, "bench_attention: pool full\n");
                return 1;
            }
        }
    int64_t kv_stride = (int64_t)o->n_kv_head * o->head_dim;
    float *kv = malloc(sizeof(float) * (size_t)o->ctx * kv_stride);
    uint32_t x = 12345;
    for (size_t i = 0; i < (size_t)o->ctx * kv_stride; i++) {
        x = x * 1664525u + 1013904223u;
        kv[i] = (float)(x >> 8) / 16777216.0f * 2.0f - 1.0f;
    }
    double t_write = now();
    for (int s = 0; s < o->n_seq; s++)
        for (int layer = 0; layer < o->n_layer; layer++)
            kvc_write(pool, &seqs[s], layer, 0, o->ctx, kv, kv, kv_stride);
    t_write = now() - t_write;

    /* RoPE tables (theta 10000, every dimension) for keys cached before RoPE */
    int half = o->head_dim / 2;
    float *rcos = malloc(sizeof(float) * (size_t)o->ctx * (half + 1)), *rsin = malloc(sizeof(float) * (size_t)o->ctx * (half + 1));
    for (int p = 0; p < o->ctx; p++)
        for (int i = 0; i < half; i++) {
            double a = p * pow(10000.0, -2.0 * i / o->head_dim);
            rcos[(size_t)p * half + i] = (float)cos(a);
            rsin[(size_t)p * half + i] = (float)sin(a);
        }
    kvc_rope rope = {.rope_dim = 2 * half, .neox = 1, .cos = rcos, .sin = rsin, .n_pos = o->ctx};
    int64_t qdim = (int64_t)o->n_kv_head * o->n_rep * o->head_dim;
    float *q = malloc(sizeof(float) * (size_t)o->n_seq * qdim);
    float *out = malloc(sizeof(float) * (size_t)o->n_seq * qdim);
    for (int64_t i = 0; i < o->n_seq * qdim; i++) q[i] = kv[i % ((int64_t)o->ctx * kv_stride)];

    double best = 1e30, total = 0.0, best_cpu = 1e30;
    for (int step = 0; step < o->steps + 1; step++) {
        pthread_t th[64];
        job jobs[64];
        double t0 = now(), c0 = cpu_now();
        for (int w = 0; w < o->threads; w++) {
            jobs[w] = (job){o, pool, seqs, q, out, w, kvc_keys_pre_rope(pool) ? &rope : NULL};
            if (w > 0) pthread_create(&th[w], NULL, step_worker, &jobs[w]);
        }
        step_worker(&jobs[0]);
        for (int w = 1; w < o->threads; w++) pthread_join(th[w], NULL);
        double dt = now() - t0, dc = (cpu_now() - c0) / o->threads;
        if (step == 0) continue;                        /* warm-up */
        total += dt;
        if (dt < best) best = dt;
        if (dc < best_cpu) best_cpu = dc;
    }
    double bytes = (double)kvc_bytes_per_token(pool) * o->ctx * o->n_seq;
    double checksum = 0.0;
    for (int64_t i = 0; i < o->n_seq * qdim; i++) checksum += out[i];
    printf("%-28s %6zu B/token %6.1f MB/step  wall: %8.2f ms/step (best %8.2f) %6.2f GB/s %7.1f tok/s  "
           "cpu: %8.2f ms/step %6.2f GB/s %7.1f tok/s  fill %.0f ms/seq  (checksum %.4f)\n",
           codec, kvc_bytes_per_token(pool), bytes / 1e6, 1e3 * total / o->steps, 1e3 * best,
           bytes / best / 1e9, o->n_seq / best, 1e3 * best_cpu, bytes / best_cpu / 1e9, o->n_seq / best_cpu,
           1e3 * t_write / o->n_seq, checksum);
    for (int s = 0; s < o->n_seq; s++) kvc_seq_release(pool, &seqs[s]);
    kvc_pool_destroy(pool);
    free(seqs), free(kv), free(q), free(out), free(rcos), free(rsin);
    return 0;
}

/* What one thread reads from memory when streaming: a baseline for GB/s. */
static void bench_stream(size_t bytes) {
    size_t n = bytes / sizeof(uint64_t);
    uint64_t *buf = malloc(n * sizeof *buf);
    for (size_t i = 0; i < n; i++) buf[i] = i * 0x9e3779b97f4a7c15ull;
    double best = 1e30, best_cpu = 1e30;
    uint64_t acc = 0;
    for (int rep = 0; rep < 4; rep++) {
        double t0 = now(), c0 = cpu_now();
        uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        for (size_t i = 0; i + 4 <= n; i += 4) a0 ^= buf[i], a1 ^= buf[i + 1], a2 ^= buf[i + 2], a3 ^= buf[i + 3];
        acc += a0 ^ a1 ^ a2 ^ a3;
        double dt = now() - t0, dc = cpu_now() - c0;
        if (dt < best) best = dt;
        if (dc < best_cpu) best_cpu = dc;
    }
    printf("stream read baseline (%.0f MB, one thread): wall %.2f GB/s, cpu %.2f GB/s  (%llx)\n", bytes / 1e6,
           bytes / best / 1e9, bytes / best_cpu / 1e9, (unsigned long long)(acc & 0xff));
    free(buf);
}

int main(int argc, char **argv) {
    bench_opts o = {.n_layer = 30, .n_kv_head = 3, .n_rep = 3, .head_dim = 64, .block_size = 16,
                    .ctx = 2048, .n_seq = 8, .steps = 5, .threads = 1, .scalar = 0};
    const char *codecs = "f32,f16,int8";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int *field = !strcmp(a, "--ctx") ? &o.ctx : !strcmp(a, "--seqs") ? &o.n_seq
                   : !strcmp(a, "--threads") ? &o.threads : !strcmp(a, "--steps") ? &o.steps
                   : !strcmp(a, "--layers") ? &o.n_layer : !strcmp(a, "--kv-heads") ? &o.n_kv_head
                   : !strcmp(a, "--rep") ? &o.n_rep : !strcmp(a, "--head-dim") ? &o.head_dim
                   : !strcmp(a, "--block") ? &o.block_size : NULL;
        if (!strcmp(a, "--scalar")) {
            o.scalar = 1;
        } else if (!strcmp(a, "--avx2")) {
            o.scalar = 2;
        } else if (!strcmp(a, "--codecs") && v) {
            codecs = v, i++;
        } else if (!strcmp(a, "--calib") && v) {
            o.calib = v, i++;
        } else if (field && v) {
            *field = atoi(v), i++;
        } else {
            fprintf(stderr, "usage: bench_attention [--ctx N] [--seqs N] [--threads N] [--steps N] "
                            "[--layers N] [--kv-heads N] [--rep N] [--head-dim N] [--block N] "
                            "[--codecs f32,f16,int8,KSPEC/VSPEC] [--calib FILE] [--scalar | --avx2]\n");
            return 2;
        }
    }
    if (o.ctx < 1 || o.n_seq < 1 || o.steps < 1 || o.threads < 1 || o.threads > 64 || o.n_rep < 1) {
        fprintf(stderr, "bench_attention: ctx, seqs, steps, rep >= 1; threads 1..64\n");
        return 2;
    }
    printf("decode attention: %d layers, %d kv heads x %d query heads each, head_dim %d, block %d, "
           "context %d, %d sequences, %d thread(s)%s\n",
           o.n_layer, o.n_kv_head, o.n_rep, o.head_dim, o.block_size, o.ctx, o.n_seq, o.threads,
           o.scalar == 1 ? ", portable kernels" : o.scalar == 2 ? ", AVX2 kernels" : "");
    bench_stream((size_t)256 << 20);
    char list[2048];
    snprintf(list, sizeof list, "%s", codecs);
    for (char *save = NULL, *c = strtok_r(list, ",", &save); c; c = strtok_r(NULL, ",", &save))
        if (bench_codec(&o, c)) return 1;
    return 0;
}
