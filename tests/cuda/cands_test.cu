/* cands_test.cu: engine/cuda/cands.cu's records against the CPU sampler's
 * own (eng_cands_reduce, engine/sampler.c), run on the device machine (a
 * plain program: exit status 0 when every check passes, each failure
 * printed).
 *
 *   cands_test            the checks
 *   cands_test --bench    also times the reduction and the copies it saves
 *
 * Rows of 260 to 151,936 logits: Gaussian, on a coarse grid (many ties),
 * with NaN, +-inf, -0 beside +0, nothing finite, all equal (more ties at
 * the threshold than the kernel collects at once), 3,000 equal best logits,
 * and the best logits all in one thread's share of the row (ids 1024
 * apart, with ties); k from 1 to ENG_CANDS_MAX. Every record's entries must equal the
 * CPU's bit for bit (the same ids, in the same order, the same logits), its
 * max and n exactly, its sum_exp within 1e-5 relative (float sums in
 * another order). Records are poisoned first. */
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vector>

#include "engine/cuda/cands.cuh"

static int failures, checks;

#define CHECK(cond, ...)                                                                                       \
    do {                                                                                                       \
        checks++;                                                                                              \
        if (!(cond)) {                                                                                         \
            if (++failures <= 40) {                                                                            \
                printf("FAIL: ");                                                                              \
                printf(__VA_ARGS__);                                                                           \
                printf("\n");                                                                                  \
            }                                                                                                  \
        }                                                                                                      \
    } while (0)

#define CU(call)                                                                                               \
    do {                                                                                                       \
        cudaError_t e_ = (call);                                                                               \
        if (e_ != cudaSuccess) {                                                                               \
            printf("FAIL: %s: %s\n", #call, cudaGetErrorString(e_));                                           \
            exit(1);                                                                                           \
        }                                                                                                      \
    } while (0)

static uint64_t rng = 0x2545f4914f6cdd1dull;
static double uniform01() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return ((rng >> 11) + 0.5) * 0x1.0p-53;
}
static float gauss() { return (float)(sqrt(-2.0 * log(uniform01())) * cos(6.283185307179586 * uniform01())); }

enum { GAUSS, GRID, NONFINITE, NOTHING, ALL_EQUAL, TOP_TIES, ZEROS, CLUSTER, KINDS };
static const char *kind_name[KINDS] = {"gauss", "grid", "nonfinite", "nothing finite", "all equal", "3000 best tied",
                                       "signed zeros", "best in one thread's share"};

static void make_row(float *row, int n, int kind) {
    for (int i = 0; i < n; i++)
        row[i] = kind == GRID ? roundf(6.0f * gauss()) * 0.5f : 4.0f * gauss();
    switch (kind) {
    case NONFINITE:
        for (int i = 0; i < n; i += 97)
            row[i] = NAN;
        row[n / 2] = INFINITY;
        row[3] = INFINITY;
        row[n - 1] = -INFINITY;
        row[n / 3] = -INFINITY;
        break;
    case NOTHING:
        for (int i = 0; i < n; i++)
            row[i] = i % 3 ? -INFINITY : NAN;
        break;
    case ALL_EQUAL:
        for (int i = 0; i < n; i++)
            row[i] = 1.5f;
        break;
    case TOP_TIES:
        for (int i = 0, c = 0; i < n && c < 3000; i += 7, c++)
            row[i] = 30.0f;
        break;
    case CLUSTER:   /* ids 1024 apart: the kernel's thread 5 reads them all */
        for (int i = 5, j = 0; i < n; i += 1024, j++)
            row[i] = 40.0f - 0.125f * (float)(j % 9);
        break;
    case ZEROS:
        for (int i = 0; i < n; i++)
            row[i] = (i & 1) ? 0.0f : -0.0f;
        for (int i = 5; i < n; i += 11)
            row[i] = -1.0f - (float)(i % 5);
        break;
    }
}

static bool same_bits(float a, float b) { return memcmp(&a, &b, sizeof a) == 0; }

/* Records of rows rows x n by the kernel, checked against the CPU's. */
static void check_case(int n, int n_rows, int k, int kind) {
    std::vector<float> h((size_t)n * n_rows);
    for (int r = 0; r < n_rows; r++)
        make_row(&h[(size_t)r * n], n, r == 0 ? kind : (kind + r) % KINDS);
    float *d_rows;
    eng_cands *d_out;
    CU(cudaMalloc(&d_rows, h.size() * sizeof(float)));
    CU(cudaMalloc(&d_out, sizeof(eng_cands) * n_rows));
    CU(cudaMemcpy(d_rows, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    CU(cudaMemset(d_out, 0xff, sizeof(eng_cands) * n_rows));
    CU(eng_cands_launch(d_rows, n_rows, n, k, d_out, 0));
    CU(cudaDeviceSynchronize());
    std::vector<eng_cands> got(n_rows);
    CU(cudaMemcpy(got.data(), d_out, sizeof(eng_cands) * n_rows, cudaMemcpyDeviceToHost));
    for (int r = 0; r < n_rows; r++) {
        const int rk = r == 0 ? kind : (kind + r) % KINDS;
        eng_cands want;
        if (eng_cands_reduce(&h[(size_t)r * n], n, k, &want)) {
            CHECK(0, "eng_cands_reduce(n %d, k %d) failed", n, k);
            continue;
        }
        const eng_cands &g = got[r];
        CHECK(g.n == k, "n %d k %d %s row %d: n %d", n, k, kind_name[rk], r, g.n);
        CHECK(g.max == want.max, "n %d k %d %s row %d: max %.9g, CPU %.9g", n, k, kind_name[rk], r, g.max,
              want.max);
        CHECK(fabsf(g.sum_exp - want.sum_exp) <= 1e-5f * want.sum_exp, "n %d k %d %s row %d: sum_exp %.9g, CPU %.9g",
              n, k, kind_name[rk], r, g.sum_exp, want.sum_exp);
        int bad = 0;
        for (int i = 0; i < k; i++)
            if (g.c[i].id != want.c[i].id || !same_bits(g.c[i].logit, want.c[i].logit)) {
                if (!bad)
                    printf("  first: entry %d is (%d, %.9g), CPU (%d, %.9g)\n", i, g.c[i].id, g.c[i].logit,
                           want.c[i].id, want.c[i].logit);
                bad++;
            }
        CHECK(!bad, "n %d k %d %s row %d: %d entries differ", n, k, kind_name[rk], r, bad);
    }
    CU(cudaFree(d_rows));
    CU(cudaFree(d_out));
}

/* What a step's logits cost to bring back: the reduction and its records'
 * copy against the whole rows' copy (pinned memory, as the backend's). */
static void bench(void) {
    const int n = 49152, ks[3] = {1, 40, 128}, rows_list[5] = {1, 4, 16, 64, 256};
    for (int ir = 0; ir < 5; ir++) {
        const int n_rows = rows_list[ir];
        std::vector<float> h((size_t)n * n_rows);
        for (int r = 0; r < n_rows; r++)
            make_row(&h[(size_t)r * n], n, GAUSS);
        float *d_rows, *host;
        eng_cands *d_out;
        CU(cudaMalloc(&d_rows, h.size() * sizeof(float)));
        CU(cudaMalloc(&d_out, sizeof(eng_cands) * n_rows));
        CU(cudaMallocHost(&host, h.size() * sizeof(float)));
        CU(cudaMemcpy(d_rows, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
        cudaEvent_t a, b;
        CU(cudaEventCreate(&a));
        CU(cudaEventCreate(&b));
        float ms_rows = 0;
        for (int it = 0; it < 6; it++) {   /* the median-ish of 5 after a warm-up: the smallest */
            CU(cudaEventRecord(a));
            CU(cudaMemcpyAsync(host, d_rows, h.size() * sizeof(float), cudaMemcpyDeviceToHost));
            CU(cudaEventRecord(b));
            CU(cudaEventSynchronize(b));
            float ms;
            CU(cudaEventElapsedTime(&ms, a, b));
            if (it && (it == 1 || ms < ms_rows))
                ms_rows = ms;
        }
        printf("cands bench: %3d rows of %d: whole rows copied %8.1f us\n", n_rows, n, 1e3 * ms_rows);
        for (int ik = 0; ik < 3; ik++) {
            float best = 0;
            for (int it = 0; it < 6; it++) {
                CU(cudaEventRecord(a));
                CU(eng_cands_launch(d_rows, n_rows, n, ks[ik], d_out, 0));
                CU(cudaMemcpy2DAsync(host, sizeof(float) * n, d_out, sizeof(eng_cands), ENG_CANDS_BYTES(ks[ik]),
                                     n_rows, cudaMemcpyDeviceToHost));
                CU(cudaEventRecord(b));
                CU(cudaEventSynchronize(b));
                float ms;
                CU(cudaEventElapsedTime(&ms, a, b));
                if (it && (it == 1 || ms < best))
                    best = ms;
            }
            printf("cands bench: %3d rows of %d: k %3d reduced and copied %8.1f us\n", n_rows, n, ks[ik], 1e3 * best);
        }
        CU(cudaFree(d_rows));
        CU(cudaFree(d_out));
        CU(cudaFreeHost(host));
    }
}

int main(int argc, char **argv) {
    const bool do_bench = argc > 1 && !strcmp(argv[1], "--bench");
    if (argc > 1 && !do_bench) {
        fprintf(stderr, "usage: cands_test [--bench]\n");
        return 2;
    }
    const int ns[6] = {260, 1000, 32000, 49152, 49153, 151936};
    const int ks[8] = {1, 2, 3, 17, 40, 64, 127, 128};
    for (int in = 0; in < 6; in++)
        for (int ik = 0; ik < 8; ik++)
            for (int kind = 0; kind < KINDS; kind++)
                check_case(ns[in], in == 3 ? 9 : 2, ks[ik], kind);
    /* arguments out of range are refused, nothing launched */
    CHECK(eng_cands_launch(NULL, 1, 100, 0, NULL, 0) == cudaErrorInvalidValue, "k 0 accepted");
    CHECK(eng_cands_launch(NULL, 1, 100, ENG_CANDS_MAX + 1, NULL, 0) == cudaErrorInvalidValue, "k 129 accepted");
    CHECK(eng_cands_launch(NULL, 1, 10, 11, NULL, 0) == cudaErrorInvalidValue, "k > n accepted");
    CHECK(eng_cands_launch(NULL, 0, 100, 5, NULL, 0) == cudaSuccess, "no rows refused");
    printf("cands_test: %d checks, %d failed\n", checks, failures);
    if (do_bench)
        bench();
    return failures ? 1 : 0;
}
