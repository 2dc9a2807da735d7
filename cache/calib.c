/* calib.c: calibration files for pca bases: collecting K/V statistics
 * (means and covariances, in double), fitting PCA per layer (per kv head, and
 * across a layer's kv heads for latents) with a symmetric eigen-solver,
 * choosing per-layer ranks, and writing / loading the versioned file whose
 * format kvcache.h documents.
 *
 * The per-head covariances are the diagonal blocks of the cross-head one, so
 * only the cross-head matrix (n_kv_head * head_dim squared per layer and set)
 * is accumulated. */
#include "cache/calib.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/pool_internal.h"

static const char calib_magic[8] = {'K', 'V', 'C', 'C', 'A', 'L', 'I', 'B'};
enum { HEADER_BYTES = 8 + 4 + 3 * 4 + 4 + 8 + 64 };

/* ---- symmetric eigen-decomposition: cyclic Jacobi ------------------------- */

int kvc_sym_eigen(double *a, int n, double *w, double *vecs) {
    double *v = malloc(sizeof(double) * (size_t)n * n);    /* (n, n): eigenvectors as columns */
    int *order = malloc(sizeof(int) * (size_t)n);
    if (!v || !order) {
        free(v), free(order);
        return -1;
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) v[(size_t)i * n + j] = i == j;
    double total = 0.0;
    for (size_t i = 0; i < (size_t)n * n; i++) total += a[i] * a[i];
    int converged = 0;
    for (int sweep = 0; sweep < 100 && !converged; sweep++) {
        double off = 0.0;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) off += a[(size_t)p * n + q] * a[(size_t)p * n + q];
        if (off <= 1e-30 * total || off == 0.0) {
            converged = 1;
            break;
        }
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[(size_t)p * n + q];
                if (apq == 0.0) continue;
                /* the rotation in the (p, q) plane that zeroes a_pq: t = tan(phi) */
                double theta = (a[(size_t)q * n + q] - a[(size_t)p * n + p]) / (2.0 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1.0));
                double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; k++) {                 /* A J */
                    double akp = a[(size_t)k * n + p], akq = a[(size_t)k * n + q];
                    a[(size_t)k * n + p] = c * akp - s * akq;
                    a[(size_t)k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) {                 /* J^T (A J) */
                    double apk = a[(size_t)p * n + k], aqk = a[(size_t)q * n + k];
                    a[(size_t)p * n + k] = c * apk - s * aqk;
                    a[(size_t)q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {                 /* V J */
                    double vkp = v[(size_t)k * n + p], vkq = v[(size_t)k * n + q];
                    v[(size_t)k * n + p] = c * vkp - s * vkq;
                    v[(size_t)k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    if (converged) {
        for (int i = 0; i < n; i++) order[i] = i;
        for (int i = 1; i < n; i++) {                        /* insertion sort, descending */
            int o = order[i], j = i;
            for (; j > 0 && a[(size_t)order[j - 1] * n + order[j - 1]] < a[(size_t)o * n + o]; j--)
                order[j] = order[j - 1];
            order[j] = o;
        }
        for (int i = 0; i < n; i++) {
            w[i] = a[(size_t)order[i] * n + order[i]];
            for (int k = 0; k < n; k++) vecs[(size_t)i * n + k] = v[(size_t)k * n + order[i]];
        }
    }
    free(v), free(order);
    return converged ? 0 : -1;
}

/* ---- statistics ------------------------------------------------------------ */

typedef struct {
    int64_t n;       /* vectors added */
    double w;        /* their total weight */
    double *sum;     /* (HD) weighted sum of x */
    double *cov;     /* (HD, HD) weighted sum of x x^T, upper triangle */
} layer_stats;

struct kvc_calib_fit {
    int n_layer, n_kv_head, head_dim;
    int64_t n_tokens;                       /* vectors added to layer 0 of the first set used */
    layer_stats *stats[KVC_CALIB_SETS];     /* (n_layer) each, allocated on first use */
    int failed;                             /* out of memory while adding */
};

kvc_calib_fit *kvc_calib_fit_create(int n_layer, int n_kv_head, int head_dim) {
    if (n_layer < 1 || n_kv_head < 1 || head_dim < 1 || (int64_t)n_kv_head * head_dim > KVC__DIM_MAX) return NULL;
    kvc_calib_fit *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->n_layer = n_layer, f->n_kv_head = n_kv_head, f->head_dim = head_dim;
    return f;
}

void kvc_calib_fit_destroy(kvc_calib_fit *f) {
    if (!f) return;
    for (int s = 0; s < KVC_CALIB_SETS; s++) {
        if (!f->stats[s]) continue;
        for (int l = 0; l < f->n_layer; l++) free(f->stats[s][l].sum), free(f->stats[s][l].cov);
        free(f->stats[s]);
    }
    free(f);
}

void kvc_calib_fit_add(kvc_calib_fit *f, int set, int layer, const float *x, int n, int64_t x_stride) {
    kvc_calib_fit_add_weighted(f, set, layer, x, n, x_stride, 1.0);
}

void kvc_calib_fit_add_weighted(kvc_calib_fit *f, int set, int layer, const float *x, int n, int64_t x_stride,
                                double weight) {
    KVC__CHECK(set >= 0 && set < KVC_CALIB_SETS && layer >= 0 && layer < f->n_layer && n >= 0 && weight > 0,
               "set %d layer %d n %d weight %g", set, layer, n, weight);
    const int HD = f->n_kv_head * f->head_dim;
    if (!f->stats[set] && !(f->stats[set] = calloc((size_t)f->n_layer, sizeof(layer_stats)))) {
        f->failed = 1;
        return;
    }
    layer_stats *st = &f->stats[set][layer];
    if (!st->sum) {
        st->sum = calloc((size_t)HD, sizeof(double));
        st->cov = calloc((size_t)HD * HD, sizeof(double));
        if (!st->sum || !st->cov) {
            free(st->sum), free(st->cov);
            st->sum = st->cov = NULL;
            f->failed = 1;
            return;
        }
    }
    double xd[KVC__DIM_MAX];
    for (int t = 0; t < n; t++) {
        const float *xt = x + t * x_stride;
        for (int i = 0; i < HD; i++) {
            KVC__CHECK(isfinite(xt[i]), "calibration vector %d of layer %d: %g at %d", t, layer, xt[i], i);
            xd[i] = xt[i];
            st->sum[i] += weight * xd[i];
        }
        for (int i = 0; i < HD; i++) {
            double *row = st->cov + (size_t)i * HD, xi = weight * xd[i];
            for (int j = i; j < HD; j++) row[j] += xi * xd[j];
        }
    }
    st->n += n;
    st->w += weight * n;
    if (layer == 0) {
        int first = 0;
        while (first < KVC_CALIB_SETS && !f->stats[first]) first++;
        if (first == set) f->n_tokens += n;
    }
}

/* The smallest r with sum_{i<r} w_i >= energy * sum w (negative w count as 0). */
static int rank_for_energy(const double *w, int n, double energy) {
    double total = 0.0, run = 0.0;
    for (int i = 0; i < n; i++) total += w[i] > 0 ? w[i] : 0;
    if (total <= 0.0) return 1;
    for (int r = 0; r < n; r++) {
        run += w[r] > 0 ? w[r] : 0;
        if (run >= energy * total * (1.0 - 1e-12)) return r + 1;
    }
    return n;
}

static int put(FILE *fp, const void *p, size_t bytes) { return fwrite(p, 1, bytes, fp) == bytes ? 0 : -1; }

static int put_f32(FILE *fp, const double *x, size_t n) {
    float buf[256];
    for (size_t i = 0; i < n;) {
        size_t m = n - i < 256 ? n - i : 256;
        for (size_t k = 0; k < m; k++) buf[k] = (float)x[i + k];
        if (put(fp, buf, m * sizeof(float))) return -1;
        i += m;
    }
    return 0;
}

/* One PCA of a covariance block: rows/cols [o, o + n) of the layer's (HD, HD)
 * statistics. mean (n), w (n), vecs (n, n); cov_buf (n, n) scratch. */
static int pca_block(const layer_stats *st, int HD, int o, int n, double *mean, double *w, double *vecs,
                     double *cov_buf) {
    double inv = 1.0 / st->w;
    for (int i = 0; i < n; i++) mean[i] = st->sum[o + i] * inv;
    for (int i = 0; i < n; i++)
        for (int j = i; j < n; j++) {
            double c = st->cov[(size_t)(o + i) * HD + (o + j)] * inv - mean[i] * mean[j];
            cov_buf[(size_t)i * n + j] = cov_buf[(size_t)j * n + i] = c;
        }
    return kvc_sym_eigen(cov_buf, n, w, vecs);
}

int kvc_calib_fit_write(kvc_calib_fit *f, const kvc_calib_opts *o, const char *path, char *err, size_t errlen) {
    const int L = f->n_layer, H = f->n_kv_head, D = f->head_dim, HD = H * D;
    if (f->failed) {
        snprintf(err, errlen, "kvc: calibration: out of memory for the statistics");
        return KVC_ERR_NOMEM;
    }
    if (o->rank <= 0 && !(o->energy > 0.0 && o->energy <= 1.0)) {
        snprintf(err, errlen, "kvc: calibration: give a rank >= 1 or an energy in (0, 1]");
        return KVC_ERR_INVAL;
    }
    uint32_t n_sets = 0;
    for (int s = 0; s < KVC_CALIB_SETS; s++) {
        if (!f->stats[s]) continue;
        for (int l = 0; l < L; l++)
            if (f->stats[s][l].n < 2) {
                snprintf(err, errlen, "kvc: calibration: set %d layer %d saw %lld vectors; need at least 2", s, l,
                         (long long)f->stats[s][l].n);
                return KVC_ERR_INVAL;
            }
        n_sets++;
    }
    if (!n_sets) {
        snprintf(err, errlen, "kvc: calibration: no vectors were added");
        return KVC_ERR_INVAL;
    }
    /* Fit everything first (ranks go before the bases in the file). */
    size_t per_layer = (size_t)H * (2 * D + (size_t)D * D) + 2 * (size_t)HD + (size_t)HD * HD;
    double *fit = malloc(sizeof(double) * per_layer * L * n_sets);
    double *cov = malloc(sizeof(double) * (size_t)HD * HD);
    uint32_t *ranks = malloc(sizeof(uint32_t) * 2 * (size_t)L * n_sets);
    int rc = KVC_ERR_NOMEM;
    FILE *fp = NULL;
    if (!fit || !cov || !ranks) {
        snprintf(err, errlen, "kvc: calibration: out of memory for the fit");
        goto out;
    }
    int si = 0;
    for (int s = 0; s < KVC_CALIB_SETS; s++) {
        if (!f->stats[s]) continue;
        for (int l = 0; l < L; l++) {
            double *p = fit + per_layer * ((size_t)si * L + l);
            int rh = 1;
            for (int h = 0; h < H; h++, p += 2 * D + (size_t)D * D) {
                if (pca_block(&f->stats[s][l], HD, h * D, D, p, p + D, p + 2 * D, cov)) goto no_converge;
                int r = o->rank > 0 ? (o->rank < D ? o->rank : D) : rank_for_energy(p + D, D, o->energy);
                rh = r > rh ? r : rh;
            }
            if (pca_block(&f->stats[s][l], HD, 0, HD, p, p + HD, p + 2 * HD, cov)) goto no_converge;
            int rl = o->rank > 0 ? (o->rank * H < HD ? o->rank * H : HD) : rank_for_energy(p + HD, HD, o->energy);
            ranks[(size_t)si * 2 * L + l] = (uint32_t)rh;
            ranks[(size_t)si * 2 * L + L + l] = (uint32_t)rl;
            if (o->progress) o->progress(o->progress_ctx, si * L + l + 1, (int)n_sets * L);
        }
        si++;
    }
    fp = fopen(path, "wb");
    if (!fp) {
        snprintf(err, errlen, "kvc: calibration: cannot write %s: %s", path, strerror(errno));
        rc = KVC_ERR_INVAL;
        goto out;
    }
    char model[64] = {0};
    snprintf(model, sizeof model, "%s", o->model ? o->model : "");
    uint32_t hdr[4] = {KVC_CALIB_VERSION, (uint32_t)L, (uint32_t)H, (uint32_t)D};
    uint64_t n_tok = (uint64_t)f->n_tokens;
    int bad = put(fp, calib_magic, 8) || put(fp, hdr, sizeof hdr) || put(fp, &n_sets, 4) || put(fp, &n_tok, 8) ||
              put(fp, model, sizeof model);
    si = 0;
    for (int s = 0; s < KVC_CALIB_SETS && !bad; s++) {
        if (!f->stats[s]) continue;
        uint32_t kind[2] = {(uint32_t)s, 0};
        bad = put(fp, kind, sizeof kind) || put(fp, ranks + (size_t)si * 2 * L, sizeof(uint32_t) * 2 * L);
        for (int l = 0; l < L && !bad; l++)
            bad = put_f32(fp, fit + per_layer * ((size_t)si * L + l), per_layer);
        si++;
    }
    if (fclose(fp) != 0 || bad) {
        snprintf(err, errlen, "kvc: calibration: writing %s failed: %s", path, strerror(errno));
        rc = KVC_ERR_INVAL;
        fp = NULL;
        goto out;
    }
    fp = NULL;
    rc = KVC_OK;
    goto out;
no_converge:
    snprintf(err, errlen, "kvc: calibration: the eigen-solver did not converge (non-finite statistics?)");
    rc = KVC_ERR_INVAL;
out:
    if (fp) fclose(fp);
    free(fit), free(cov), free(ranks);
    return rc;
}

/* ---- loading ---------------------------------------------------------------- */

struct kvc__calib {
    int n_layer, n_kv_head, head_dim;
    const uint32_t *ranks[KVC_CALIB_SETS];   /* (2, n_layer): per head, cross-head; NULL: set absent */
    const float *data[KVC_CALIB_SETS];       /* (n_layer, per_layer) */
    size_t per_layer;                        /* floats per layer of a set */
    void *file;                              /* the whole file */
};

static uint32_t get_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

int kvc__calib_load(const char *path, int n_layer, int n_kv_head, int head_dim, kvc__calib **out,
                    char *err, size_t errlen) {
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        snprintf(err, errlen, "kvc: calibration file %s: %s", path, strerror(errno));
        return KVC_ERR_INVAL;
    }
    uint8_t *buf = NULL;
    size_t size = 0;
    if (fseek(fp, 0, SEEK_END) == 0) {
        long sz = ftell(fp);
        size = sz > 0 ? (size_t)sz : 0;
        rewind(fp);
    }
    if (size < HEADER_BYTES) {
        fclose(fp);
        snprintf(err, errlen, "kvc: calibration file %s: %zu bytes: too short for a header", path, size);
        return KVC_ERR_INVAL;
    }
    buf = malloc(size);
    if (!buf || fread(buf, 1, size, fp) != size) {
        fclose(fp);
        free(buf);
        snprintf(err, errlen, "kvc: calibration file %s: %s", path, buf ? "read error" : "out of memory");
        return buf ? KVC_ERR_INVAL : KVC_ERR_NOMEM;
    }
    fclose(fp);
    int rc = KVC_ERR_INVAL;
    kvc__calib *c = NULL;
    if (memcmp(buf, calib_magic, 8) != 0) {
        snprintf(err, errlen, "kvc: calibration file %s: not a calibration file (magic is not KVCCALIB)", path);
        goto fail;
    }
    uint32_t version = get_u32(buf + 8);
    if (version != KVC_CALIB_VERSION) {
        snprintf(err, errlen, "kvc: calibration file %s: version %u; this build reads version %d", path, version,
                 KVC_CALIB_VERSION);
        goto fail;
    }
    uint32_t L = get_u32(buf + 12), H = get_u32(buf + 16), D = get_u32(buf + 20), n_sets = get_u32(buf + 24);
    if ((int)L != n_layer || (int)H != n_kv_head || (int)D != head_dim) {
        char model[65];
        memcpy(model, buf + 36, 64);
        model[64] = 0;
        snprintf(err, errlen, "kvc: calibration file %s: made for %u layers x %u kv heads x head_dim %u (%s); "
                 "this model has %d x %d x %d", path, L, H, D, model[0] ? model : "unnamed", n_layer, n_kv_head,
                 head_dim);
        goto fail;
    }
    size_t HD = (size_t)H * D;
    size_t per_layer = H * (2 * (size_t)D + (size_t)D * D) + 2 * HD + HD * HD;
    size_t set_bytes = 8 + 8 * (size_t)L + 4 * per_layer * L;
    if (n_sets < 1 || n_sets > KVC_CALIB_SETS || size != HEADER_BYTES + n_sets * set_bytes) {
        snprintf(err, errlen, "kvc: calibration file %s: %zu bytes; %u sets of this shape take %zu (truncated "
                 "or corrupt)", path, size, n_sets, HEADER_BYTES + (n_sets <= KVC_CALIB_SETS ? n_sets : 0) * set_bytes);
        goto fail;
    }
    c = calloc(1, sizeof *c);
    if (!c) {
        snprintf(err, errlen, "kvc: calibration file %s: out of memory", path);
        rc = KVC_ERR_NOMEM;
        goto fail;
    }
    c->n_layer = n_layer, c->n_kv_head = n_kv_head, c->head_dim = head_dim;
    c->per_layer = per_layer;
    c->file = buf;
    for (uint32_t s = 0; s < n_sets; s++) {
        const uint8_t *p = buf + HEADER_BYTES + s * set_bytes;
        uint32_t kind = get_u32(p);
        if (kind >= KVC_CALIB_SETS || c->ranks[kind]) {
            snprintf(err, errlen, "kvc: calibration file %s: set %u: kind %u %s", path, s, kind,
                     kind >= KVC_CALIB_SETS ? "unknown" : "repeated");
            goto fail;
        }
        c->ranks[kind] = (const uint32_t *)(p + 8);     /* 4-byte aligned: the header is 100 bytes */
        c->data[kind] = (const float *)(p + 8 + 8 * (size_t)L);
        for (uint32_t l = 0; l < 2 * L; l++) {
            uint32_t r = c->ranks[kind][l], max = l < L ? D : (uint32_t)HD;
            if (r < 1 || r > max) {
                snprintf(err, errlen, "kvc: calibration file %s: set %u layer %u: rank %u outside 1..%u", path, kind,
                         l % L, r, max);
                goto fail;
            }
        }
        for (size_t i = 0; i < per_layer * L; i++)
            if (!isfinite(c->data[kind][i])) {
                snprintf(err, errlen, "kvc: calibration file %s: set %u: a non-finite number at float %zu", path,
                         kind, i);
                goto fail;
            }
    }
    *out = c;
    return KVC_OK;
fail:
    free(c);
    free(buf);
    return rc;
}

void kvc__calib_free(kvc__calib *c) {
    if (!c) return;
    free(c->file);
    free(c);
}

int kvc__calib_has(const kvc__calib *c, int set) { return set >= 0 && set < KVC_CALIB_SETS && c->ranks[set]; }

int kvc__calib_rank(const kvc__calib *c, int set, int layer, int latent) {
    return (int)c->ranks[set][(latent ? c->n_layer : 0) + layer];
}

int kvc__calib_rank_energy(const kvc__calib *c, int set, int layer, int latent, double energy) {
    const int D = c->head_dim, H = c->n_kv_head, n = latent ? H * D : D;
    double *w = calloc((size_t)n, sizeof(double));
    KVC__CHECK(w, "out of memory for %d eigenvalues", n);
    const float *p = c->data[set] + c->per_layer * layer;
    int rank = 1;
    for (int g = 0; g < (latent ? 1 : H); g++) {
        /* per head: (mean, eigenvalues, components) blocks, then the cross-head one */
        const float *eig = (latent ? p + (size_t)H * (2 * D + (size_t)D * D) : p + (size_t)g * (2 * D + (size_t)D * D)) + n;
        for (int i = 0; i < n; i++) w[i] = eig[i];
        int r = rank_for_energy(w, n, energy);
        rank = r > rank ? r : rank;
    }
    free(w);
    return rank;
}

void kvc__calib_basis(const kvc__calib *c, int set, int layer, int group, int rank, float *basis, float *mean) {
    const int D = c->head_dim, HD = c->n_kv_head * D;
    const float *p = c->data[set] + c->per_layer * layer;
    int n = D;
    if (group < 0) {
        p += (size_t)c->n_kv_head * (2 * D + (size_t)D * D);
        n = HD;
    } else {
        p += (size_t)group * (2 * D + (size_t)D * D);
    }
    KVC__CHECK(rank >= 1 && rank <= n, "rank %d of %d", rank, n);
    memcpy(mean, p, sizeof(float) * (size_t)n);
    const float *comp = p + 2 * (size_t)n;       /* (n, n): component r is row r */
    for (int i = 0; i < n; i++)
        for (int r = 0; r < rank; r++) basis[(size_t)i * rank + r] = comp[(size_t)r * n + i];
}
