/* cands_test.cu: engine/cuda/cands.cu's records and draws against the CPU
 * sampler's own (eng_cands_reduce, eng_cands_draw; engine/sampler.c), run on
 * the device machine (a plain program: exit status 0 when every check
 * passes, each failure printed).
 *
 *   cands_test            the checks
 *   cands_test --quick    fewer (rows of 260, 4,099 and 32,000 logits; k 1,
 *                         17, 64, 128; 3 draws a case), for compute-sanitizer
 *   cands_test --bench    also times the records and the copies they save
 *
 * Rows of 260 to 151,936 logits: Gaussian, on a coarse grid (many ties),
 * with NaN, +-inf, -0 beside +0, nothing finite, all equal (more ties at
 * the threshold than the kernel collects at once), 3,000 equal best logits,
 * and the best logits all in one thread's share of the row (ids 1024 apart,
 * with ties). Records of k = 1 to ENG_CANDS_MAX: every entry must equal the
 * CPU's bit for bit (the same ids, in the same order, the same logits), max
 * and n exactly, sum_exp within 1e-5 relative (float sums in another
 * order). Draws at three temperatures, top-p 0.5 to 0.95, min-p, fresh
 * uniforms: the CPU's token, or another where a decision falls within
 * float rounding (check_draws). Penalties applied to rows bit for bit as
 * the CPU sampler applies them (check_penalties). Records are poisoned
 * first; a request out of range leaves its record untouched. */
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

#include "engine/cuda/cands.cuh"
#include "tests/cuda/expect.cuh"

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

/* Device requests: every row asks the same k (ENG_CANDS_DRAW: the draw d
 * at uniform u[r]). */
static eng_cands_req *upload_reqs(int n_rows, int k, eng_draw d, const double *u) {
    std::vector<eng_cands_req> h(n_rows);
    for (int r = 0; r < n_rows; r++) {
        h[r] = eng_cands_req{k, d};
        h[r].d.u = u ? u[r] : 0.0;
    }
    eng_cands_req *dev;
    CK(cudaMalloc(&dev, sizeof(eng_cands_req) * n_rows));
    CK(cudaMemcpy(dev, h.data(), sizeof(eng_cands_req) * n_rows, cudaMemcpyHostToDevice));
    return dev;
}

/* The kernel's records of the rows h (n_rows x n), each asking k (draws: d
 * at u[r]), poisoned first. */
static std::vector<eng_cands> run_rows(const std::vector<float> &h, int n, int n_rows, int k, eng_draw d,
                                       const double *u) {
    float *d_rows;
    eng_cands *d_out;
    CK(cudaMalloc(&d_rows, h.size() * sizeof(float)));
    CK(cudaMalloc(&d_out, sizeof(eng_cands) * n_rows));
    CK(cudaMemcpy(d_rows, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemset(d_out, 0xff, sizeof(eng_cands) * n_rows));
    eng_cands_req *d_req = upload_reqs(n_rows, k, d, u);
    CK(eng_cands_launch(d_rows, n_rows, n, d_req, d_out, 0));
    CK(cudaDeviceSynchronize());
    std::vector<eng_cands> got(n_rows);
    CK(cudaMemcpy(got.data(), d_out, sizeof(eng_cands) * n_rows, cudaMemcpyDeviceToHost));
    CK(cudaFree(d_req));
    CK(cudaFree(d_rows));
    CK(cudaFree(d_out));
    return got;
}

/* Records of rows rows x n by the kernel, checked against the CPU's. */
static void check_case(int n, int n_rows, int k, int kind) {
    std::vector<float> h((size_t)n * n_rows);
    for (int r = 0; r < n_rows; r++)
        make_row(&h[(size_t)r * n], n, r == 0 ? kind : (kind + r) % KINDS);
    const std::vector<eng_cands> got = run_rows(h, n, n_rows, k, eng_draw{0.0, 1.0f, 1.0f, 0.0f}, NULL);
    for (int r = 0; r < n_rows; r++) {
        const int rk = r == 0 ? kind : (kind + r) % KINDS;
        eng_cands want;
        if (eng_cands_reduce(&h[(size_t)r * n], n, k, &want)) {
            EXPECT(0, "eng_cands_reduce(n %d, k %d) failed", n, k);
            continue;
        }
        const eng_cands &g = got[r];
        EXPECT(g.n == k, "n %d k %d %s row %d: n %d", n, k, kind_name[rk], r, g.n);
        EXPECT(g.max == want.max, "n %d k %d %s row %d: max %.9g, CPU %.9g", n, k, kind_name[rk], r, g.max,
              want.max);
        EXPECT(fabsf(g.sum_exp - want.sum_exp) <= 1e-5f * want.sum_exp, "n %d k %d %s row %d: sum_exp %.9g, CPU %.9g",
              n, k, kind_name[rk], r, g.sum_exp, want.sum_exp);
        int bad = 0;
        for (int i = 0; i < k; i++)
            if (g.c[i].id != want.c[i].id || !same_bits(g.c[i].logit, want.c[i].logit)) {
                if (!bad)
                    printf("  first: entry %d is (%d, %.9g), CPU (%d, %.9g)\n", i, g.c[i].id, g.c[i].logit,
                           want.c[i].id, want.c[i].logit);
                bad++;
            }
        EXPECT(!bad, "n %d k %d %s row %d: %d entries differ", n, k, kind_name[rk], r, bad);
    }
}

/* Draws of n_rows rows at fresh uniforms against eng_cands_draw's. The
 * CPU's weights come from its own exp (AVX2 or not) and its sums from
 * other orders than the GPU's, so a draw may take another token where a
 * decision falls within float rounding: the uniform at the boundary between
 * two tokens of the id-order scan, or the nucleus's mass at top_p exactly.
 * Each such draw must be explained by one of those in double precision
 * (within 1e-5 of the mass), its token must be one the filters keep (or
 * the nucleus's ambiguous end), and at most 1% of draws may differ. */
static int draw_misses, draw_count;
static void check_draws(int n, int n_rows, eng_draw dr, int kind) {
    std::vector<float> h((size_t)n * n_rows);
    std::vector<double> u(n_rows);
    for (int r = 0; r < n_rows; r++) {
        make_row(&h[(size_t)r * n], n, r == 0 ? kind : (kind + r) % KINDS);
        u[r] = uniform01() * 0.999999;
    }
    const std::vector<eng_cands> got = run_rows(h, n, n_rows, ENG_CANDS_DRAW, dr, u.data());
    for (int r = 0; r < n_rows; r++) {
        const int rk = r == 0 ? kind : (kind + r) % KINDS;
        const float *row = &h[(size_t)r * n];
        eng_draw d = dr;
        d.u = u[r];
        eng_cands want;
        if (eng_cands_draw(row, n, &d, &want)) {
            EXPECT(0, "eng_cands_draw(n %d) failed", n);
            continue;
        }
        const eng_cands &g = got[r];
        draw_count++;
        EXPECT(g.n == 1 && g.max == want.max, "draw n %d %s row %d: n %d, max %.9g (CPU %.9g)", n, kind_name[rk], r,
               g.n, g.max, want.max);
        const bool same_mass = fabsf(g.sum_exp - want.sum_exp) <= 1e-4f * want.sum_exp;
        if (g.c[0].id == want.c[0].id && same_mass) {
            EXPECT(same_bits(g.c[0].logit, want.c[0].logit), "draw n %d %s row %d: logit %.9g, CPU %.9g", n,
                   kind_name[rk], r, g.c[0].logit, want.c[0].logit);
            continue;
        }
        /* another token, or another kept set: the decisions in double
         * precision (another kept set only at the nucleus's end) */
        draw_misses++;
        double mx = -INFINITY;
        for (int i = 0; i < n; i++)
            mx = std::max(mx, (double)(isnan(row[i]) ? -INFINITY : std::min(row[i], FLT_MAX)));
        std::vector<double> w(n);
        std::vector<int> order(n);
        double W = 0;
        for (int i = 0; i < n; i++) {
            const double l = isnan(row[i]) ? -INFINITY : std::min(row[i], FLT_MAX);
            w[i] = mx == -INFINITY ? 1.0 : exp((l - mx) * d.inv_temp);
            W += w[i];
            order[i] = i;
        }
        std::sort(order.begin(), order.end(), [&](int a, int b) { return w[a] > w[b] || (w[a] == w[b] && a < b); });
        std::vector<char> keep(n, 0);
        bool nucleus_near = false;
        double acc = 0;
        for (int j = 0; j < n; j++) {
            const int i = order[j];
            keep[i] = 1;
            acc += w[i];
            if (d.top_p < 1.0f && acc >= d.top_p * W) {
                nucleus_near = fabs(acc - d.top_p * W) <= 1e-5 * W || fabs(acc - w[i] - d.top_p * W) <= 1e-5 * W;
                if (j + 1 < n && nucleus_near)
                    keep[order[j + 1]] = 1;   /* the ambiguous end */
                break;
            }
        }
        for (int i = 0; i < n; i++)
            keep[i] = keep[i] && (w[i] >= d.min_p || fabs(w[i] - d.min_p) <= 1e-6);
        double M = 0, below = 0;
        const int lo = std::min(g.c[0].id, want.c[0].id);
        for (int i = 0; i < n; i++)
            if (keep[i]) {
                M += w[i];
                if (i <= lo)
                    below += w[i];
            }
        const bool ok_token = g.c[0].id >= 0 && g.c[0].id < n && keep[g.c[0].id];
        EXPECT(ok_token && (nucleus_near || (same_mass && fabs(below - u[r] * M) <= 1e-5 * M)),
               "draw n %d T %g p %g min-p %g %s row %d: token %d (kept %d), CPU %d; mass %.9g, CPU %.9g; the boundary "
               "at %.9g of the mass, the target at %.9g%s",
               n, 1 / d.inv_temp, d.top_p, d.min_p, kind_name[rk], r, g.c[0].id, ok_token, want.c[0].id, g.sum_exp,
               want.sum_exp, below / M, u[r], nucleus_near ? " (the nucleus's end within rounding)" : "");
    }
}

/* Penalties on the GPU against eng_penalties_apply, bit for bit: rows of
 * every kind, up to 300 seen tokens a row (prompt-only ones among them),
 * positive and negative parameters. */
static void check_penalties(int n, int n_rows) {
    std::vector<float> h((size_t)n * n_rows), want;
    for (int r = 0; r < n_rows; r++)
        make_row(&h[(size_t)r * n], n, r % KINDS);
    want = h;
    std::vector<eng_cands_pen> e;
    const float params[4][3] = {{1.3f, 0.0f, 0.0f}, {1.0f, 0.7f, 0.3f}, {0.8f, -1.5f, -0.25f}, {1.1f, 2.0f, 1.7f}};
    for (int r = 0; r < n_rows; r++) {
        const float *pr = params[r % 4];
        std::vector<eng_pen_entry> pe;
        for (int j = 0; j < 300 && j * 13 < n; j++)
            pe.push_back(eng_pen_entry{j * 13, (uint32_t)(j % 5)});
        const eng_penalties pp = {pr[0], pr[1], pr[2], (int)pe.size(), pe.data()};
        eng_penalties_apply(&want[(size_t)r * n], &pp);
        for (const eng_pen_entry &x : pe)
            e.push_back(eng_cands_pen{r, x.id, x.count, pr[0], pr[1], pr[2]});
    }
    float *d_rows;
    eng_cands_pen *d_e;
    CK(cudaMalloc(&d_rows, h.size() * sizeof(float)));
    CK(cudaMalloc(&d_e, e.size() * sizeof(eng_cands_pen)));
    CK(cudaMemcpy(d_rows, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_e, e.data(), e.size() * sizeof(eng_cands_pen), cudaMemcpyHostToDevice));
    CK(eng_cands_penalize(d_rows, n, d_e, (int)e.size(), 0));
    std::vector<float> got(h.size());
    CK(cudaMemcpy(got.data(), d_rows, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    size_t bad = 0, changed = 0;
    for (size_t i = 0; i < got.size(); i++) {
        bad += !same_bits(got[i], want[i]) && !(isnan(got[i]) && isnan(want[i]));   /* (NaN payloads may differ) */
        changed += !same_bits(h[i], want[i]);
    }
    EXPECT(bad == 0 && changed > 0, "penalties n %d: %zu of %zu logits differ from the CPU's (%zu penalized)", n, bad,
           got.size(), changed);
    CK(cudaFree(d_rows));
    CK(cudaFree(d_e));
}

/* The smallest of 5 timings (after a warm-up) of what enqueue puts on the
 * default stream, in microseconds. */
template <typename F> static float best_us(F &&enqueue) {
    const std::vector<double> t = event_times_us(0, 6, 1, [&](int) { enqueue(); });
    return (float)*std::min_element(t.begin(), t.end());
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
        CK(cudaMalloc(&d_rows, h.size() * sizeof(float)));
        CK(cudaMalloc(&d_out, sizeof(eng_cands) * n_rows));
        CK(cudaMallocHost(&host, h.size() * sizeof(float)));
        CK(cudaMemcpy(d_rows, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
        eng_cands_req *d_req[3];
        for (int ik = 0; ik < 3; ik++)
            d_req[ik] = upload_reqs(n_rows, ks[ik], eng_draw{0.0, 1.0f, 1.0f, 0.0f}, NULL);
        std::vector<double> u(n_rows, 0.5);
        eng_cands_req *d_draw = upload_reqs(n_rows, ENG_CANDS_DRAW, eng_draw{0.0, 1.0f, 1.0f, 0.0f}, u.data());
        eng_cands_req *d_nucleus = upload_reqs(n_rows, ENG_CANDS_DRAW, eng_draw{0.0, 1.0f, 0.9f, 0.0f}, u.data());
        const float rows_us = best_us(
            [&] { CK(cudaMemcpyAsync(host, d_rows, h.size() * sizeof(float), cudaMemcpyDeviceToHost)); });
        printf("cands bench: %3d rows of %d: whole rows copied %8.1f us\n", n_rows, n, rows_us);
        for (int ik = 0; ik < 3; ik++) {
            const float us = best_us([&] {
                CK(eng_cands_launch(d_rows, n_rows, n, d_req[ik], d_out, 0));
                CK(cudaMemcpy2DAsync(host, sizeof(float) * n, d_out, sizeof(eng_cands), ENG_CANDS_BYTES(ks[ik]),
                                     n_rows, cudaMemcpyDeviceToHost));
            });
            printf("cands bench: %3d rows of %d: k %3d reduced and copied %8.1f us\n", n_rows, n, ks[ik], us);
            CK(cudaFree(d_req[ik]));
        }
        const float draw_us = best_us([&] {
            CK(eng_cands_launch(d_rows, n_rows, n, d_draw, d_out, 0));
            CK(cudaMemcpy2DAsync(host, sizeof(float) * n, d_out, sizeof(eng_cands), ENG_CANDS_BYTES(1), n_rows,
                                 cudaMemcpyDeviceToHost));
        });
        printf("cands bench: %3d rows of %d: drawn and copied %8.1f us\n", n_rows, n, draw_us);
        const float nucleus_us = best_us([&] {
            CK(eng_cands_launch(d_rows, n_rows, n, d_nucleus, d_out, 0));
            CK(cudaMemcpy2DAsync(host, sizeof(float) * n, d_out, sizeof(eng_cands), ENG_CANDS_BYTES(1), n_rows,
                                 cudaMemcpyDeviceToHost));
        });
        printf("cands bench: %3d rows of %d: drawn from the top-p 0.9 nucleus and copied %8.1f us\n", n_rows, n,
               nucleus_us);
        CK(cudaFree(d_draw));
        CK(cudaFree(d_nucleus));
        CK(cudaFree(d_rows));
        CK(cudaFree(d_out));
        CK(cudaFreeHost(host));
    }
}

int main(int argc, char **argv) {
    const bool do_bench = argc > 1 && !strcmp(argv[1], "--bench");
    const bool quick = argc > 1 && !strcmp(argv[1], "--quick");   /* for compute-sanitizer */
    if (argc > 2 || (argc > 1 && !do_bench && !quick)) {
        fprintf(stderr, "usage: cands_test [--bench | --quick]\n");
        return 2;
    }
    const std::vector<int> ns = quick ? std::vector<int>{260, 4099, 32000}
                                      : std::vector<int>{260, 1000, 32000, 49152, 49153, 151936};
    const std::vector<int> ks = quick ? std::vector<int>{1, 17, 64, 128} : std::vector<int>{1, 2, 3, 17, 40, 64, 127, 128};
    for (int n : ns)
        for (int k : ks)
            for (int kind = 0; kind < KINDS; kind++)
                check_case(n, n == 49152 ? 9 : 2, k, kind);
    const eng_draw draws[6] = {{0, 1.0f, 1.0f, 0.0f},        {0, 1.0f / 0.6f, 1.0f, 0.0f}, {0, 1.0f / 1.7f, 1.0f, 0.0f},
                               {0, 1.0f, 0.9f, 0.0f},        {0, 1.0f / 0.8f, 0.5f, 0.0f}, {0, 1.0f / 1.2f, 0.95f, 0.02f}};
    for (int n : ns)
        for (int id = 0; id < 6; id++)
            for (int kind = 0; kind < KINDS; kind++)
                check_draws(n, quick ? 3 : 12, draws[id], kind);
    for (int n : ns)
        check_penalties(n, 2 * KINDS);
    EXPECT(draw_misses * 100 <= draw_count, "%d of %d draws landed beside the CPU's", draw_misses, draw_count);
    printf("draws: %d, %d with another token or kept set than the CPU's (a decision within rounding)\n", draw_count,
           draw_misses);
    /* out of range: refused, or (a row's request) its record untouched */
    EXPECT(eng_cands_launch(NULL, 1, 0, NULL, NULL, 0) == cudaErrorInvalidValue, "n_vocab 0 accepted");
    EXPECT(eng_cands_launch(NULL, 0, 100, NULL, NULL, 0) == cudaSuccess, "no rows refused");
    {
        const int n = 100, bad_k[4] = {0, ENG_CANDS_MAX + 1, n + 1, -2};
        std::vector<float> h(n * 4);
        for (int r = 0; r < 4; r++)
            make_row(&h[r * n], n, GAUSS);
        std::vector<eng_cands_req> q(4);
        for (int r = 0; r < 4; r++)
            q[r] = eng_cands_req{bad_k[r], eng_draw{0.5, 1.0f, 1.0f, 0.0f}};
        float *d_rows;
        eng_cands *d_out;
        eng_cands_req *d_req;
        CK(cudaMalloc(&d_rows, h.size() * sizeof(float)));
        CK(cudaMalloc(&d_out, sizeof(eng_cands) * 4));
        CK(cudaMalloc(&d_req, sizeof(eng_cands_req) * 4));
        CK(cudaMemcpy(d_rows, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
        CK(cudaMemcpy(d_req, q.data(), sizeof(eng_cands_req) * 4, cudaMemcpyHostToDevice));
        CK(cudaMemset(d_out, 0x5a, sizeof(eng_cands) * 4));
        CK(eng_cands_launch(d_rows, 4, n, d_req, d_out, 0));
        std::vector<unsigned char> got(sizeof(eng_cands) * 4);
        CK(cudaMemcpy(got.data(), d_out, got.size(), cudaMemcpyDeviceToHost));
        int touched = 0;
        for (unsigned char c : got)
            touched += c != 0x5a;
        EXPECT(touched == 0, "requests k 0, 129, n + 1, -2: %d bytes of their records written", touched);
        CK(cudaFree(d_rows));
        CK(cudaFree(d_out));
        CK(cudaFree(d_req));
    }
    printf("cands_test: %d checks, %d failed\n", g_checks, g_fail);
    if (do_bench)
        bench();
    return g_fail ? 1 : 0;
}
