/* test_calib.c: calibration files (cache/calib.c).
 *
 * The eigen-solver against matrices built from a known spectrum
 * (A = Q diag(w) Q^T, Q a random orthogonal matrix): eigenvalues, A v = w v,
 * orthonormal vectors. The fit against data whose sample covariance is known
 * exactly: x_t = mean + sum_i a_i s_i(t) u_i with s_i Walsh functions (mean 0,
 * mutually orthogonal over 2^k tokens) and u_i unit vectors each inside one kv
 * head, so the per-head and cross-head covariances are sum a_i^2 u_i u_i^T:
 * the file must hold those eigenvalues, the mean, ranks chosen from --rank or
 * --energy as computed by hand, and pca codecs built from it must reproduce
 * the vectors. Files that do not fit (other dimensions, truncated, wrong magic
 * or version, a missing pre-RoPE set) are refused with messages that say so. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cache/kvcache.h"

static uint64_t rng = 99;
static double urand(void) {            /* uniform [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng >> 11) / 4503599627370496.0 - 1.0;
}

/* A random (n, n) orthogonal matrix, rows orthonormal (Gram-Schmidt). */
static void random_orthogonal(double *q, int n) {
    for (int i = 0; i < n; i++) {
        double *v = q + (size_t)i * n;
        for (int k = 0; k < n; k++) v[k] = urand();
        for (int pass = 0; pass < 2; pass++)
            for (int j = 0; j < i; j++) {
                double dot = 0.0;
                for (int k = 0; k < n; k++) dot += v[k] * q[(size_t)j * n + k];
                for (int k = 0; k < n; k++) v[k] -= dot * q[(size_t)j * n + k];
            }
        double nrm = 0.0;
        for (int k = 0; k < n; k++) nrm += v[k] * v[k];
        for (int k = 0; k < n; k++) v[k] /= sqrt(nrm);
    }
}

static int cmp_desc(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void check_eigen(int n, const double *spectrum) {
    double *q = malloc(sizeof(double) * n * n), *a = malloc(sizeof(double) * n * n), *a0 = malloc(sizeof(double) * n * n);
    double *w = malloc(sizeof(double) * n), *vecs = malloc(sizeof(double) * n * n), *want = malloc(sizeof(double) * n);
    random_orthogonal(q, n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0.0;
            for (int k = 0; k < n; k++) s += q[(size_t)k * n + i] * spectrum[k] * q[(size_t)k * n + j];
            a[(size_t)i * n + j] = a0[(size_t)i * n + j] = s;
        }
    memcpy(want, spectrum, sizeof(double) * n);
    qsort(want, (size_t)n, sizeof(double), cmp_desc);
    cr_assert_eq(kvc_sym_eigen(a, n, w, vecs), 0, "n %d: no convergence", n);
    double scale = fabs(want[0]) + fabs(want[n - 1]) + 1e-300;
    for (int i = 0; i < n; i++) {
        cr_assert(fabs(w[i] - want[i]) <= 1e-10 * scale, "n %d: eigenvalue %d: %.15g, want %.15g", n, i, w[i], want[i]);
        for (int r = 0; r < n; r++) {        /* A v = w v */
            double av = 0.0;
            for (int k = 0; k < n; k++) av += a0[(size_t)r * n + k] * vecs[(size_t)i * n + k];
            cr_assert(fabs(av - w[i] * vecs[(size_t)i * n + r]) <= 1e-9 * scale, "n %d: residual of vector %d", n, i);
        }
        for (int j = 0; j <= i; j++) {
            double dot = 0.0;
            for (int k = 0; k < n; k++) dot += vecs[(size_t)i * n + k] * vecs[(size_t)j * n + k];
            cr_assert(fabs(dot - (i == j)) < 1e-10, "n %d: vectors %d, %d: dot %g", n, i, j, dot);
        }
    }
    free(q), free(a), free(a0), free(w), free(vecs), free(want);
}

Test(calib, eigen_solver_recovers_known_spectra) {
    double one[1] = {3.5};
    check_eigen(1, one);
    double two[2] = {-1.0, 4.0};
    check_eigen(2, two);
    double rep[6] = {2.0, 2.0, 2.0, 0.0, 0.0, -7.0};      /* repeated and zero eigenvalues */
    check_eigen(6, rep);
    double big[96];
    for (int i = 0; i < 96; i++) big[i] = exp(-0.15 * i) * (i % 7 == 3 ? 0.0 : 1.0);   /* a decaying spectrum */
    check_eigen(96, big);
}

/* ---- the fit ----------------------------------------------------------------- */

enum { L = 3, H = 2, D = 8, HD = H * D, N_TOK = 64 };

/* Layer l's directions: unit vectors inside one head each, with amplitudes. */
typedef struct {
    int n;
    int head[4];
    double amp[4];
    double u[4][D];
} layer_design;

static layer_design designs[L];
static double means[L][HD];

static void make_designs(void) {
    static const double amps[L][4] = {{4.0, 2.0, 1.0, 0.5}, {3.0, 3.0, 0.2, 0.1}, {1.0, 0.0, 0.0, 0.0}};
    static const int heads[L][4] = {{0, 1, 0, 1}, {1, 0, 1, 1}, {1, 0, 0, 0}};
    static const int counts[L] = {4, 4, 1};
    double q[D * D];
    for (int l = 0; l < L; l++) {
        layer_design *g = &designs[l];
        g->n = counts[l];
        random_orthogonal(q, D);
        for (int i = 0; i < g->n; i++) {
            g->head[i] = heads[l][i];
            g->amp[i] = amps[l][i];
            memcpy(g->u[i], q + i * D, sizeof(double) * D);   /* distinct rows: orthogonal within a head */
        }
        for (int d = 0; d < HD; d++) means[l][d] = urand() * 3.0;
    }
}

/* Walsh function `mask` at token t: +-1. */
static double walsh(int mask, int t) { return __builtin_popcount((unsigned)(mask & t)) % 2 ? -1.0 : 1.0; }

static void make_vectors(int l, float *x) {     /* (N_TOK, HD) */
    const layer_design *g = &designs[l];
    for (int t = 0; t < N_TOK; t++)
        for (int d = 0; d < HD; d++) {
            double v = means[l][d];
            for (int i = 0; i < g->n; i++)
                if (d / D == g->head[i]) v += g->amp[i] * walsh(i + 1 + 8 * l, t) * g->u[i][d % D];
            x[t * HD + d] = (float)v;
        }
}

/* Reads the file's floats for set index si, layer l: per head and cross-head
 * (mean, eigenvalues, components). */
typedef struct {
    uint32_t rank_head[L], rank_latent[L];
    float head[L][H][2 * D + D * D];
    float cross[L][2 * HD + HD * HD];
} set_data;

static void read_file(const char *path, uint32_t *n_sets, set_data *sets, int max_sets) {
    FILE *f = fopen(path, "rb");
    cr_assert(f);
    char magic[8];
    uint32_t hdr[5];
    uint64_t n_tok;
    char model[64];
    cr_assert_eq(fread(magic, 1, 8, f), 8);
    cr_assert_eq(memcmp(magic, "KVCCALIB", 8), 0);
    cr_assert_eq(fread(hdr, 4, 5, f), 5);
    cr_assert_eq(hdr[0], 1, "version");
    cr_assert(hdr[1] == L && hdr[2] == H && hdr[3] == D);
    *n_sets = hdr[4];
    cr_assert_eq(fread(&n_tok, 8, 1, f), 1);
    cr_assert_eq(n_tok, N_TOK);
    cr_assert_eq(fread(model, 1, 64, f), 64);
    cr_assert_str_eq(model, "test model");
    for (uint32_t s = 0; s < *n_sets && (int)s < max_sets; s++) {
        uint32_t kind[2];
        cr_assert_eq(fread(kind, 4, 2, f), 2);
        cr_assert_eq(fread(sets[s].rank_head, 4, L, f), L);
        cr_assert_eq(fread(sets[s].rank_latent, 4, L, f), L);
        for (int l = 0; l < L; l++) {
            for (int h = 0; h < H; h++) cr_assert_eq(fread(sets[s].head[l][h], 4, 2 * D + D * D, f), 2 * D + D * D);
            cr_assert_eq(fread(sets[s].cross[l], 4, 2 * HD + HD * HD, f), 2 * HD + HD * HD);
        }
    }
    long here = ftell(f);
    fseek(f, 0, SEEK_END);
    cr_assert_eq(ftell(f), here, "trailing bytes");
    fclose(f);
}

static char *tmp_path(const char *tag) {
    static char buf[4][256];
    static int i;
    char *p = buf[i++ % 4];
    snprintf(p, 256, "/tmp/kvc_test_calib_%d_%s.bin", (int)getpid(), tag);
    return p;
}

static kvc_calib_fit *fit_designs(int with_pre) {
    make_designs();
    kvc_calib_fit *fit = kvc_calib_fit_create(L, H, D);
    cr_assert(fit);
    float x[N_TOK * HD];
    for (int l = 0; l < L; l++) {
        make_vectors(l, x);
        kvc_calib_fit_add(fit, KVC_CALIB_K, l, x, N_TOK / 2, HD);            /* in two pieces */
        kvc_calib_fit_add(fit, KVC_CALIB_K, l, x + N_TOK / 2 * HD, N_TOK / 2, HD);
        for (int i = 0; i < N_TOK * HD; i++) x[i] *= 0.5f;                  /* V: the same, halved */
        kvc_calib_fit_add(fit, KVC_CALIB_V, l, x, N_TOK, HD);
        if (with_pre) kvc_calib_fit_add(fit, KVC_CALIB_K_PRE_ROPE, l, x, N_TOK, HD);
    }
    return fit;
}

Test(calib, file_holds_the_known_statistics) {
    kvc_calib_fit *fit = fit_designs(0);
    char err[512];
    const char *path = tmp_path("energy");
    kvc_calib_opts o = {.energy = 0.9, .model = "test model"};
    cr_assert_eq(kvc_calib_fit_write(fit, &o, path, err, sizeof err), KVC_OK, "%s", err);
    static set_data sets[2];
    uint32_t n_sets;
    read_file(path, &n_sets, sets, 2);
    cr_assert_eq(n_sets, 2, "K and V");
    for (int s = 0; s < 2; s++) {
        double f = s ? 0.25 : 1.0;                 /* V variances are a quarter */
        for (int l = 0; l < L; l++) {
            const layer_design *g = &designs[l];
            /* expected spectra: per head, and all of them across heads */
            double want_h[H][D] = {{0}}, want_x[HD] = {0};
            int nh[H] = {0}, nx = 0;
            for (int i = 0; i < g->n; i++) {
                want_h[g->head[i]][nh[g->head[i]]++] = g->amp[i] * g->amp[i] * f;
                want_x[nx++] = g->amp[i] * g->amp[i] * f;
            }
            for (int h = 0; h < H; h++) qsort(want_h[h], D, sizeof(double), cmp_desc);
            qsort(want_x, HD, sizeof(double), cmp_desc);
            for (int h = 0; h < H; h++) {
                const float *p = sets[s].head[l][h];
                for (int d = 0; d < D; d++) {
                    double mu = means[l][h * D + d] * (s ? 0.5 : 1.0);
                    cr_expect(fabs(p[d] - mu) <= 1e-5 * (1 + fabs(mu)), "set %d layer %d head %d mean %d", s, l, h, d);
                    cr_expect(fabs(p[D + d] - want_h[h][d]) <= 1e-4, "set %d layer %d head %d eigenvalue %d: %g, want %g",
                              s, l, h, d, p[D + d], want_h[h][d]);
                }
            }
            for (int d = 0; d < HD; d++)
                cr_expect(fabs(sets[s].cross[l][HD + d] - want_x[d]) <= 1e-4, "set %d layer %d cross eigenvalue %d", s,
                          l, d);
            /* ranks for 90% energy, by hand: per head the max over heads */
            int rank_h = 1;
            for (int h = 0; h < H; h++) {
                double tot = 0.0, run = 0.0;
                for (int d = 0; d < D; d++) tot += want_h[h][d];
                int r = 0;
                while (r < D && run < 0.9 * tot * (1 - 1e-9)) run += want_h[h][r++];
                rank_h = r > rank_h ? r : rank_h;
            }
            double tot = 0.0, run = 0.0;
            for (int d = 0; d < HD; d++) tot += want_x[d];
            int rank_x = 0;
            while (rank_x < HD && run < 0.9 * tot * (1 - 1e-9)) run += want_x[rank_x++];
            cr_expect_eq(sets[s].rank_head[l], (uint32_t)rank_h, "set %d layer %d", s, l);
            cr_expect_eq(sets[s].rank_latent[l], (uint32_t)rank_x, "set %d layer %d", s, l);
        }
    }
    /* layer 0 keeps 4 directions, 2 per head: 90% needs one per head (16 of
     * 17 in head 0, 4 of 4.25 in head 1) and 2 of 4 across heads (20 of 21.25) */
    cr_expect_eq(sets[0].rank_head[0], 1);
    cr_expect_eq(sets[0].rank_latent[0], 2);
    cr_expect_eq(sets[0].rank_latent[2], 1);
    kvc_calib_fit_destroy(fit);

    /* --rank: every layer the same; latent rank x heads */
    fit = fit_designs(0);
    o = (kvc_calib_opts){.rank = 3, .model = "test model"};
    cr_assert_eq(kvc_calib_fit_write(fit, &o, path, err, sizeof err), KVC_OK, "%s", err);
    read_file(path, &n_sets, sets, 2);
    for (int l = 0; l < L; l++) {
        cr_expect_eq(sets[1].rank_head[l], 3);
        cr_expect_eq(sets[1].rank_latent[l], 6);
    }
    kvc_calib_fit_destroy(fit);
    unlink(path);
}

/* The pca codecs built from the file reproduce vectors that lie in the fitted
 * subspaces, with per-layer ranks from the file. */
Test(calib, pca_codecs_reproduce_the_subspace) {
    kvc_calib_fit *fit = fit_designs(1);
    char err[512];
    const char *path = tmp_path("codec");
    kvc_calib_opts o = {.energy = 0.999999, .model = "test model"};
    cr_assert_eq(kvc_calib_fit_write(fit, &o, path, err, sizeof err), KVC_OK, "%s", err);
    kvc_calib_fit_destroy(fit);
    static const char *specs[] = {"lowrank:pca", "latent:pca", "hybrid:pca", "hybrid:latent:pca", "lowrank:r2:pca",
                                  "latent:4:pca"};
    for (size_t i = 0; i < sizeof specs / sizeof *specs; i++) {
        kvc_config c = {.n_layer = L, .n_kv_head = H, .head_dim = D, .block_size = 16, .memory_bytes = 1 << 20,
                        .k_codec = specs[i], .v_codec = specs[i], .calib = path};
        kvc_pool *pool;
        cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s: %s", specs[i], err);
        kvc_seq s = {0};
        cr_assert_eq(kvc_seq_reserve(pool, &s, N_TOK), KVC_OK);
        float x[N_TOK * HD], k[N_TOK * HD];
        for (int l = 0; l < L; l++) {
            make_vectors(l, x);
            cr_assert_eq(kvc_write(pool, &s, l, 0, N_TOK, x, x, HD), KVC_OK);
            kvc_read(pool, &s, l, 0, N_TOK, k, NULL, HD);
            kvc_basis b;
            cr_assert_eq(kvc_get_basis(pool, 0, l, 0, &b), KVC_OK);
            /* the file's ranks: every direction of the layer (2, 2, 1 per head; 4, 4, 1 across) */
            int want_rank = strstr(specs[i], ":r2") ? 2 : strstr(specs[i], "latent:4") ? 4
                            : strstr(specs[i], "latent") ? designs[l].n : (l == 2 ? 1 : l == 1 ? 3 : 2);
            cr_expect_eq(b.rank, want_rank, "%s layer %d: rank %d", specs[i], l, b.rank);
            /* where the rank covers every direction the vectors come back but for
             * the coefficients' rounding (f16, or int8 for hybrid) */
            int per_head[H] = {0}, need = 0;
            for (int j = 0; j < designs[l].n; j++)
                if (designs[l].amp[j] > 0) per_head[designs[l].head[j]]++, need++;
            if (!strstr(specs[i], "latent")) need = per_head[0] > per_head[1] ? per_head[0] : per_head[1];
            double emax = 0.0, amax = 0.0;
            for (int j = 0; j < N_TOK * HD; j++) emax = fmax(emax, fabs(k[j] - x[j])), amax = fmax(amax, fabs(x[j]));
            double tol = (strstr(specs[i], "hybrid") ? 0.02 : 2e-3) * amax;
            if (b.rank >= need) cr_expect_leq(emax, tol, "%s layer %d: max error %g", specs[i], l, emax);
            else cr_expect_gt(emax, 0.05, "%s layer %d: rank %d < %d directions, yet max error %g", specs[i], l,
                              b.rank, need, emax);
        }
        kvc_seq_release(pool, &s);
        kvc_pool_destroy(pool);
    }
    /* pre-RoPE keys use their own set */
    kvc_config c = {.n_layer = L, .n_kv_head = H, .head_dim = D, .block_size = 16, .memory_bytes = 1 << 20,
                    .k_codec = "lowrank:pca:prerope", .v_codec = "f16", .calib = path};
    kvc_pool *pool;
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s", err);
    kvc_basis b;
    cr_assert_eq(kvc_get_basis(pool, 0, 0, 0, &b), KVC_OK);
    cr_expect(fabs(b.mean[0] - 0.5 * means[0][0]) < 1e-5, "the pre-RoPE set's mean (halved data)");
    kvc_pool_destroy(pool);
    unlink(path);
}

static void expect_refused(const char *path, int n_layer, int n_kv_head, int head_dim, const char *spec,
                           const char *needle, int names_file) {
    kvc_config c = {.n_layer = n_layer, .n_kv_head = n_kv_head, .head_dim = head_dim, .block_size = 16,
                    .memory_bytes = 1 << 20, .k_codec = spec, .v_codec = "f16", .calib = path};
    kvc_pool *pool = NULL;
    char err[512] = "";
    cr_expect_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_ERR_INVAL, "%s accepted", path);
    cr_expect_null(pool);
    cr_expect(strstr(err, needle) != NULL, "message '%s' lacks '%s'", err, needle);
    if (names_file) cr_expect(strstr(err, path) != NULL, "message '%s' does not name the file", err);
}

Test(calib, files_that_do_not_fit_are_refused) {
    kvc_calib_fit *fit = fit_designs(0);
    char err[512];
    const char *path = tmp_path("good"), *bad = tmp_path("bad");
    kvc_calib_opts o = {.rank = 2, .model = "test model"};
    cr_assert_eq(kvc_calib_fit_write(fit, &o, path, err, sizeof err), KVC_OK, "%s", err);
    kvc_calib_fit_destroy(fit);
    expect_refused(path, 4, H, D, "lowrank:pca", "made for 3 layers x 2 kv heads x head_dim 8 (test model); "
                                                "this model has 4 x 2 x 8", 1);
    expect_refused(path, L, 3, D, "latent:4:pca", "this model has 3 x 3 x 8", 1);
    expect_refused(path, L, H, 16, "lowrank:r2:pca", "this model has 3 x 2 x 16", 1);
    expect_refused(path, L, H, D, "lowrank:pca:prerope", "has no pre-RoPE key statistics", 1);
    expect_refused(path, L, H, D, "lowrank:r9:pca", "rank 9 in layer 0: must be 1..8", 0);
    /* damaged copies */
    FILE *f = fopen(path, "rb");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    rewind(f);
    unsigned char *buf = malloc((size_t)size);
    cr_assert_eq(fread(buf, 1, (size_t)size, f), (size_t)size);
    fclose(f);
    static const struct { long len; int at; unsigned char val; const char *needle; } damage[] = {
        {-1, 0, 'X', "not a calibration file"},
        {-1, 8, 2, "version 2; this build reads version 1"},
        {-5, -1, 0, "truncated or corrupt"},
        {150, -1, 0, "truncated or corrupt"},
        {10, -1, 0, "too short for a header"},
        {-1, 100, 7, "kind 7 unknown"},
        {-1, 108, 0, "rank 0 outside 1..8"},
    };
    for (size_t i = 0; i < sizeof damage / sizeof *damage; i++) {
        unsigned char *copy = malloc((size_t)size);
        memcpy(copy, buf, (size_t)size);
        if (damage[i].at >= 0) copy[damage[i].at] = damage[i].val;
        long len = damage[i].len == -1 ? size : damage[i].len < 0 ? size + damage[i].len : damage[i].len;
        f = fopen(bad, "wb");
        fwrite(copy, 1, (size_t)len, f);
        fclose(f);
        expect_refused(bad, L, H, D, "lowrank:pca", damage[i].needle, 1);
        free(copy);
    }
    free(buf);
    /* writing needs vectors and a rank or an energy */
    fit = kvc_calib_fit_create(L, H, D);
    cr_expect_eq(kvc_calib_fit_write(fit, &o, bad, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "no vectors"), "%s", err);
    float x[HD] = {0};
    kvc_calib_fit_add(fit, KVC_CALIB_V, 0, x, 1, HD);
    cr_expect_eq(kvc_calib_fit_write(fit, &o, bad, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "need at least 2"), "%s", err);
    o.rank = 0, o.energy = 1.5;
    cr_expect_eq(kvc_calib_fit_write(fit, &o, bad, err, sizeof err), KVC_ERR_INVAL);
    cr_expect(strstr(err, "energy in (0, 1]"), "%s", err);
    kvc_calib_fit_destroy(fit);
    unlink(path);
    unlink(bad);
}

/* The rank of `spec`'s keys (v_role 0) or values in each layer. */
static void spec_ranks(const char *path, const char *spec, int v_role, int *ranks) {
    kvc_config c = {.n_layer = L, .n_kv_head = H, .head_dim = D, .block_size = 16, .memory_bytes = 1 << 20,
                    .k_codec = v_role ? "f16" : spec, .v_codec = v_role ? spec : "f16", .calib = path};
    kvc_pool *pool;
    char err[512];
    cr_assert_eq(kvc_pool_create(&c, &pool, err, sizeof err), KVC_OK, "%s: %s", spec, err);
    for (int l = 0; l < L; l++) {
        kvc_basis b;
        cr_assert_eq(kvc_get_basis(pool, v_role, l, 0, &b), KVC_OK);
        ranks[l] = b.rank;
    }
    kvc_pool_destroy(pool);
}

/* eP specs take per-layer ranks from the file's eigenvalues: the ranks
 * `kvserve calibrate --energy P/100` writes, whatever the file was made with. */
Test(calib, energy_specs_choose_the_ranks_calibrate_writes) {
    char err[512];
    const char *by_energy = tmp_path("e90"), *by_rank = tmp_path("r3");
    kvc_calib_fit *fit = fit_designs(1);
    kvc_calib_opts o = {.energy = 0.9, .model = "test model"};
    cr_assert_eq(kvc_calib_fit_write(fit, &o, by_energy, err, sizeof err), KVC_OK, "%s", err);
    kvc_calib_fit_destroy(fit);
    fit = fit_designs(1);
    o = (kvc_calib_opts){.rank = 3, .model = "test model"};
    cr_assert_eq(kvc_calib_fit_write(fit, &o, by_rank, err, sizeof err), KVC_OK, "%s", err);
    kvc_calib_fit_destroy(fit);
    static const struct { const char *file_ranks, *energy; int v_role; } pairs[] = {
        {"lowrank:pca", "lowrank:e90:pca", 0},          {"lowrank:pca", "lowrank:e90:pca", 1},
        {"latent:pca", "latent:e90:pca", 0},            {"hybrid:latent:pca", "hybrid:latent:e90:pca", 1},
        {"hybrid:pca:prerope", "hybrid:e90:pca:prerope", 0},
    };
    for (size_t i = 0; i < sizeof pairs / sizeof *pairs; i++) {
        int want[L], got[L], fixed[L];
        spec_ranks(by_energy, pairs[i].file_ranks, pairs[i].v_role, want);
        spec_ranks(by_rank, pairs[i].energy, pairs[i].v_role, got);
        spec_ranks(by_rank, pairs[i].file_ranks, pairs[i].v_role, fixed);
        for (int l = 0; l < L; l++) {
            cr_expect_eq(got[l], want[l], "%s layer %d: rank %d, calibrate --energy 0.9 wrote %d", pairs[i].energy, l,
                         got[l], want[l]);
            cr_expect_eq(fixed[l], strstr(pairs[i].file_ranks, "latent") ? 3 * H : 3, "the --rank 3 file's own");
        }
    }
    /* by hand (file_holds_the_known_statistics): layer 0 keeps one direction
     * per head and two across heads at 90% */
    int r[L];
    spec_ranks(by_rank, "lowrank:e90:pca", 0, r);
    cr_expect_eq(r[0], 1);
    spec_ranks(by_rank, "latent:e90:pca", 0, r);
    cr_expect_eq(r[0], 2);
    spec_ranks(by_rank, "latent:e99.9:pca", 0, r);
    cr_expect_eq(r[0], 4, "every direction of layer 0 at 99.9%%");
    static const char *bad[] = {"lowrank:e0:pca", "lowrank:e101:pca", "lowrank:e:pca", "lowrank:e90",
                                "latent:e90x:pca", "lowrank:e90:r2:pca"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        expect_refused(by_rank, L, H, D, bad[i], "unknown codec", 0);
    unlink(by_energy);
    unlink(by_rank);
}

/* A vector added with weight w counts as w copies of it: the same means and
 * the same subspaces (projectors onto each layer's directions) as adding it
 * w times. */
Test(calib, weighted_vectors_count_as_copies) {
    make_designs();
    const char *copies = tmp_path("copies"), *weighted = tmp_path("weighted");
    char err[512];
    float x[N_TOK * HD];
    kvc_calib_fit *a = kvc_calib_fit_create(L, H, D), *b = kvc_calib_fit_create(L, H, D);
    for (int l = 0; l < L; l++) {
        make_vectors(l, x);
        for (int i = 0; i < 5; i++) kvc_calib_fit_add(a, KVC_CALIB_V, l, x, 1, HD);
        kvc_calib_fit_add(a, KVC_CALIB_V, l, x + HD, N_TOK - 1, HD);
        kvc_calib_fit_add_weighted(b, KVC_CALIB_V, l, x, 1, HD, 5.0);
        kvc_calib_fit_add(b, KVC_CALIB_V, l, x + HD, N_TOK - 1, HD);
    }
    kvc_calib_opts o = {.rank = 3, .model = "test model"};
    cr_assert_eq(kvc_calib_fit_write(a, &o, copies, err, sizeof err), KVC_OK, "%s", err);
    cr_assert_eq(kvc_calib_fit_write(b, &o, weighted, err, sizeof err), KVC_OK, "%s", err);
    kvc_calib_fit_destroy(a);
    kvc_calib_fit_destroy(b);
    kvc_pool *p[2];
    const char *files[2] = {copies, weighted};
    for (int i = 0; i < 2; i++) {
        kvc_config c = {.n_layer = L, .n_kv_head = H, .head_dim = D, .block_size = 16, .memory_bytes = 1 << 20,
                        .k_codec = "f16", .v_codec = "latent:6:pca", .calib = files[i]};
        cr_assert_eq(kvc_pool_create(&c, &p[i], err, sizeof err), KVC_OK, "%s", err);
    }
    double mean_moved = 0;
    for (int l = 0; l < L; l++) {
        kvc_basis ba, bb;
        cr_assert_eq(kvc_get_basis(p[0], 1, l, 0, &ba), KVC_OK);
        cr_assert_eq(kvc_get_basis(p[1], 1, l, 0, &bb), KVC_OK);
        for (int d = 0; d < HD; d++) {
            cr_expect(fabs(ba.mean[d] - bb.mean[d]) <= 1e-5 * (1 + fabs(ba.mean[d])), "layer %d mean %d", l, d);
            mean_moved = fmax(mean_moved, fabs(ba.mean[d] - means[l][d]));
        }
        const int R = designs[l].n;      /* the layer's directions: a gap after them */
        for (int i = 0; i < HD; i++)
            for (int j = 0; j < HD; j++) {
                double pa = 0, pb = 0;
                for (int r = 0; r < R; r++) {
                    pa += (double)ba.basis[i * ba.rank + r] * ba.basis[j * ba.rank + r];
                    pb += (double)bb.basis[i * bb.rank + r] * bb.basis[j * bb.rank + r];
                }
                cr_expect(fabs(pa - pb) <= 1e-4, "layer %d projector (%d, %d): %g vs %g", l, i, j, pa, pb);
            }
    }
    cr_expect_gt(mean_moved, 1e-3, "the weighted vector moved the means");
    kvc_pool_destroy(p[0]);
    kvc_pool_destroy(p[1]);
    unlink(copies);
    unlink(weighted);
}
