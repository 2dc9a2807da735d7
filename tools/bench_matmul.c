/* bench_matmul.c: microbenchmark of the CPU kernels (engine/matmul.c) and the
 * thread pool on the shapes of SmolLM2-135M (30 layers, n_embd 576, fused
 * qkv 576 -> 960, wo 576 -> 576, fused gate/up 576 -> 3072, down 1536 -> 576
 * in Q4_1; tied output 576 -> 49152 in Q8_0).
 *
 *   make bench-matmul                  # builds $(BUILD)/tools/bench_matmul
 *   build/tools/bench_matmul [--threads N] [--isa scalar|avx2|avx512] [--act q8|q16|f32]
 *                            [--prefill N] [--seconds S] [--no-pack]
 *
 * --act picks how quantized weights meet the activations (matmul.h): q8, the
 * 8-bit integer kernels (default here), q16, the 16-bit integer kernels, or
 * f32, the exact f32 kernels. Weights are packed for the batched kernels as
 * the model loader packs them (eng_weight_pack) unless --no-pack.
 *
 * Per shape, at 1 token and at a prefill batch, it reports the best time of
 * repeated calls on one weight matrix (cache-warm) and GFLOP/s. Then it sweeps
 * a whole model's worth of distinct weights (30 layers, ~96 MB, so decode
 * streams from memory as in real use) and reports the matmul time of one
 * decoded token and of a prefill batch, per token. Weights and activations
 * are random: the kernels' speed does not depend on the values. The machine
 * is shared, so every figure is the best of several runs. */
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/matmul.h"
#include "engine/matmul_internal.h"
#include "engine/tensor.h"
#include "engine/threadpool.h"

#define N_LAYER 30

typedef struct {
    const char *name;
    eng_dtype type;
    int64_t n_in, n_out;
    int per_token;  /* uses per decoded token: 30 per layer matrix, 1 for output */
} shape;

static const shape shapes[] = {
    {"qkv     576->960   q4_1", ENG_Q4_1, 576, 960, N_LAYER},
    {"wo      576->576   q4_1", ENG_Q4_1, 576, 576, N_LAYER},
    {"gate_up 576->3072  q4_1", ENG_Q4_1, 576, 3072, N_LAYER},
    {"down    1536->576  q4_1", ENG_Q4_1, 1536, 576, N_LAYER},
    {"output  576->49152 q8_0", ENG_Q8_0, 576, 49152, 1},
};
#define N_SHAPES (int)(sizeof shapes / sizeof shapes[0])

static uint64_t rng = 88172645463325252ull;

static uint64_t rnd(void) {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n);
    if (!p) {
        fprintf(stderr, "bench_matmul: out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* Random blocks with small finite scales. */
static eng_tensor make_weights(eng_dtype type, int64_t n_in, int64_t n_out) {
    const size_t rb = eng_row_bytes(type, n_in), bytes = rb * (size_t)n_out;
    uint8_t *p = xmalloc(bytes);
    for (size_t i = 0; i < bytes; i++)
        p[i] = (uint8_t)rnd();
    const size_t bb = eng_dtype_block_bytes(type);
    for (size_t off = 0; off < bytes; off += bb) {
        eng_fp16_t d = eng_f32_to_fp16(0.01f), m = eng_f32_to_fp16(-0.05f);
        memcpy(p + off, &d, 2);
        if (type == ENG_Q4_1)
            memcpy(p + off + 2, &m, 2);
    }
    eng_tensor t = {.type = type, .ne = {n_in, n_out}, .data = p, .owned = true};
    char err[128];
    if (eng_weight_pack(&t, err, sizeof err)) {  /* as the model loader does */
        fprintf(stderr, "bench_matmul: %s\n", err);
        exit(1);
    }
    return t;
}

static float *make_x(int n_tok, int64_t n_in) {
    float *x = xmalloc((size_t)n_tok * (size_t)n_in * sizeof *x);
    for (int64_t i = 0; i < n_tok * n_in; i++)
        x[i] = (float)((int)(rnd() % 2001) - 1000) * 1e-3f;
    return x;
}

/* Best seconds per call of eng_matmul over about `budget` seconds. */
static double time_matmul(eng_threadpool *tp, const eng_tensor *w, const float *x, int n_tok,
                          float *y, double budget) {
    double best = 1e30, start = now_s();
    int reps = 0;
    do {
        double t0 = now_s();
        eng_matmul(tp, w, x, n_tok, y, w->ne[1]);
        double dt = now_s() - t0;
        best = dt < best ? dt : best;
        reps++;
    } while (now_s() - start < budget || reps < 3);
    return best;
}

static void empty_task(void *ctx, int task, int worker) {
    (void)ctx;
    (void)task;
    (void)worker;
}

/* Every task waits until all n_threads tasks have started: the job cannot
 * finish before every worker has picked it up, so this times a full
 * publish-wake-complete round trip. */
typedef struct {
    _Atomic int arrived;
    int n;
} rendezvous;

static void rendezvous_task(void *ctx, int task, int worker) {
    rendezvous *r = ctx;
    atomic_fetch_add(&r->arrived, 1);
    while (atomic_load(&r->arrived) < r->n)
        ;
}

static void bench_pool(eng_threadpool *tp) {
    const int n_threads = eng_threadpool_size(tp);
    for (int c = 0; c < 3; c++) {
        const int n_tasks = c == 1 ? 64 : n_threads;
        double best = 1e30;
        for (int round = 0; round < 5; round++) {
            const int n = 20000;
            rendezvous r = {.n = n_threads};
            double t0 = now_s();
            for (int i = 0; i < n; i++) {
                if (c < 2) {
                    eng_threadpool_run(tp, empty_task, NULL, n_tasks);
                } else {
                    atomic_store(&r.arrived, 0);
                    eng_threadpool_run(tp, rendezvous_task, &r, n_tasks);
                }
            }
            double dt = (now_s() - t0) / n;
            best = dt < best ? dt : best;
        }
        printf("  eng_threadpool_run, %2d %s tasks: %.2f us per job\n", n_tasks,
               c < 2 ? "empty" : "rendezvous", best * 1e6);
    }
}

/* The floor for decode: reading the same weights with no arithmetic. */
typedef struct {
    eng_tensor (*layers)[4];
    const eng_tensor *out;
    uint64_t sums[64];
} stream_job;

#define STREAM_TASKS_PER_MATRIX 8

static void stream_task(void *ctx, int task, int worker) {
    stream_job *j = ctx;
    const int mat = task / STREAM_TASKS_PER_MATRIX, part = task % STREAM_TASKS_PER_MATRIX;
    const eng_tensor *t = mat < N_LAYER * 4 ? &j->layers[mat / 4][mat % 4] : j->out;
    const size_t words = eng_tensor_bytes(t) / 8, per = words / STREAM_TASKS_PER_MATRIX;
    const uint64_t *p = (const uint64_t *)t->data + part * per;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= per; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    j->sums[worker] += s0 + s1 + s2 + s3;
}

static double stream(eng_threadpool *tp, eng_tensor (*layers)[4], const eng_tensor *out) {
    stream_job j = {.layers = layers, .out = out};
    double t0 = now_s();
    eng_threadpool_run(tp, stream_task, &j, (N_LAYER * 4 + 1) * STREAM_TASKS_PER_MATRIX);
    double dt = now_s() - t0;
    if (j.sums[0] == 42)  /* keeps the reads */
        printf(" ");
    return dt;
}

/* One decoded token / one prefill batch through 30 distinct layers. */
static double sweep(eng_threadpool *tp, eng_tensor (*layers)[4], const eng_tensor *out, int n_tok,
                    const float *x, float *y, bool with_output) {
    double t0 = now_s();
    for (int l = 0; l < N_LAYER; l++)
        for (int k = 0; k < 4; k++)
            eng_matmul(tp, &layers[l][k], x, n_tok, y, layers[l][k].ne[1]);
    if (with_output)  /* logits of the last position only */
        eng_matmul(tp, out, x, 1, y, out->ne[1]);
    return now_s() - t0;
}

int main(int argc, char **argv) {
    int only_threads = 0, n_prefill = 512;
    double seconds = 0.3;
    const char *isa = NULL;
    eng_act_mode act = ENG_ACT_Q8;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            only_threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc)
            isa = argv[++i];
        else if (!strcmp(argv[i], "--act") && i + 1 < argc && !strcmp(argv[i + 1], "q8"))
            act = ENG_ACT_Q8, i++;
        else if (!strcmp(argv[i], "--act") && i + 1 < argc && !strcmp(argv[i + 1], "f32"))
            act = ENG_ACT_F32, i++;
        else if (!strcmp(argv[i], "--act") && i + 1 < argc && !strcmp(argv[i + 1], "q16"))
            act = ENG_ACT_Q16, i++;
        else if (!strcmp(argv[i], "--prefill") && i + 1 < argc)
            n_prefill = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--no-pack"))
            eng_matmul_set_packing(false);
        else {
            fprintf(stderr, "usage: %s [--threads N] [--isa scalar|avx2|avx512] [--act q8|q16|f32] [--prefill N] "
                    "[--seconds S] [--no-pack]\n", argv[0]);
            return 2;
        }
    }
    if (eng_matmul_force_isa(isa) != 0) {
        fprintf(stderr, "bench_matmul: kernel set '%s' is not available here\n", isa);
        return 2;
    }
    if (n_prefill < 1) {
        fprintf(stderr, "bench_matmul: --prefill must be at least 1\n");
        return 2;
    }
    eng_matmul_set_activations(act);
    printf("kernels: %s, activations of quantized weights: %s\n", eng_matmul_isa(),
           act == ENG_ACT_Q8 ? "q8" : act == ENG_ACT_Q16 ? "q16" : "f32");

    const int max_tok = n_prefill;
    float *x = make_x(max_tok, 1536);
    float *y = xmalloc((size_t)max_tok * 49152 * sizeof *y);
    eng_tensor hot[N_SHAPES];
    for (int s = 0; s < N_SHAPES; s++)
        hot[s] = make_weights(shapes[s].type, shapes[s].n_in, shapes[s].n_out);
    eng_tensor (*layers)[4] = xmalloc(N_LAYER * sizeof *layers);
    for (int l = 0; l < N_LAYER; l++)
        for (int k = 0; k < 4; k++)
            layers[l][k] = make_weights(shapes[k].type, shapes[k].n_in, shapes[k].n_out);
    const eng_tensor *output = &hot[4];

    for (int n_threads = 1; n_threads <= 2; n_threads++) {
        if (only_threads && n_threads != only_threads)
            continue;
        eng_threadpool *tp = eng_threadpool_create(n_threads);
        if (!tp) {
            fprintf(stderr, "bench_matmul: cannot create a pool of %d threads\n", n_threads);
            return 1;
        }
        printf("\n== %d thread%s\n", n_threads, n_threads > 1 ? "s" : "");
        bench_pool(tp);
        const int toks[2] = {1, n_prefill};
        double implied[2] = {0, 0};
        for (int ti = 0; ti < 2; ti++) {
            printf("  n_tok = %d (one matrix, cache-warm)\n", toks[ti]);
            for (int s = 0; s < N_SHAPES; s++) {
                double t = time_matmul(tp, &hot[s], x, toks[ti], y, seconds);
                double flop = 2.0 * (double)shapes[s].n_in * (double)shapes[s].n_out * toks[ti];
                double bytes = (double)eng_tensor_bytes(&hot[s]);
                printf("    %s  %9.1f us  %7.1f GFLOP/s  %6.1f GB/s of weights\n", shapes[s].name,
                       t * 1e6, flop / t * 1e-9, bytes / t * 1e-9);
                /* the output matrix: all positions at decode, the last at prefill */
                if (s < 4)
                    implied[ti] += t * shapes[s].per_token;
                else
                    implied[ti] += ti == 0 ? t : time_matmul(tp, &hot[s], x, 1, y, seconds);
            }
        }
        printf("  implied from warm shapes: decode %.2f ms/token, prefill %.3f ms/token "
               "(%d-token batch, logits of the last position)\n",
               implied[0] * 1e3, implied[1] * 1e3 / n_prefill, n_prefill);

        /* whole model, distinct weights (memory-resident as in real use) */
        double best_dec = 1e30, best_pre = 1e30, best_stream = 1e30;
        for (int round = 0; round < 20; round++) {
            double t = sweep(tp, layers, output, 1, x, y, true);
            best_dec = t < best_dec ? t : best_dec;
            t = stream(tp, layers, output);
            best_stream = t < best_stream ? t : best_stream;
        }
        for (int round = 0; round < 3; round++) {
            double t = sweep(tp, layers, output, n_prefill, x, y, true);
            best_pre = t < best_pre ? t : best_pre;
        }
        const double model_bytes =
            (double)(N_LAYER * (eng_tensor_bytes(&layers[0][0]) + eng_tensor_bytes(&layers[0][1]) +
                                eng_tensor_bytes(&layers[0][2]) + eng_tensor_bytes(&layers[0][3])) +
                     eng_tensor_bytes(output));
        printf("  whole-model sweep (30 distinct layers + output, %.0f MB of weights):\n"
               "    decode  %.2f ms/token (%.0f tok/s matmul-only, %.1f GB/s); plain read of "
               "the same bytes %.2f ms (%.1f GB/s)\n"
               "    prefill %.3f ms/token (%.0f tok/s matmul-only, %d-token batch)\n",
               model_bytes / 1e6, best_dec * 1e3, 1.0 / best_dec, model_bytes / best_dec * 1e-9,
               best_stream * 1e3, model_bytes / best_stream * 1e-9, best_pre * 1e3 / n_prefill,
               n_prefill / best_pre, n_prefill);
        eng_threadpool_destroy(tp);
    }

    for (int s = 0; s < N_SHAPES; s++)
        eng_tensor_free(&hot[s]);
    for (int l = 0; l < N_LAYER; l++)
        for (int k = 0; k < 4; k++)
            eng_tensor_free(&layers[l][k]);
    free(layers);
    free(x);
    free(y);
    return 0;
}
