/* cmd_calibrate.c: `kvserve calibrate`: fits the PCA bases of the pca KV
 * codecs on sample text and writes a calibration file (format: cache/kvcache.h).
 *
 * The model runs over the first --tokens tokens of the text in windows of
 * --ctx tokens (each from an empty cache, as `ppl` does), with an f32 cache;
 * after each window every layer's K and V are read back (kvc_read) and added
 * to the statistics, then PCA is fitted per layer, per kv head and across
 * heads. With --pre-rope a second pass caches keys before RoPE (an f32:prerope
 * cache: the backend writes unrotated keys when kvc_keys_pre_rope says so)
 * and adds those statistics too, for the :prerope key codecs. Ranks per layer
 * come from --rank (the same everywhere) or --energy (the smallest rank that
 * keeps that share of the variance, per layer).
 *
 * The first token of each window counts --sink-weight times (default: the
 * window length). It is the attention sink: most heads put a large share of
 * every query's weight on it, so an error in its K or V reaches every output,
 * yet unweighted it is one vector in hundreds and its directions fall out of
 * the leading components (on SmolLM2, values at rank 60 of 64 doubled the
 * perplexity before the weighting; README, "The KV cache"). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "server/cli.h"

int cmd_calibrate(int argc, char **argv);

static const char usage[] =
    "usage: kvserve calibrate --model PATH --text FILE (--rank R | --energy E) --out FILE\n"
    "                         [--tokens N] [--ctx N] [--batch N] [--sink-weight W] [--pre-rope] [--threads N]\n\n"
    "Fits PCA bases of K and V (per layer, per kv head and across heads) on the text\n"
    "and writes the calibration file that pca codecs read (ppl/serve --calib FILE).\n"
    "Use text that is not the evaluation text. Progress on stderr.";

typedef struct {
    double t0;
} progress_ctx;

static void fit_progress(void *ctx, int done, int total) {
    progress_ctx *p = ctx;
    fprintf(stderr, "\rcalibrate: fitting %d/%d (%.0f s)   ", done, total, cli_now() - p->t0);
    if (done == total) fputc('\n', stderr);
}

/* Runs the windows of ids through the model with a cache whose keys are
 * stored as k_spec, adding every layer's K (to k_set) and V (when v too) to
 * the fit. Returns 0 or -1 (message printed). */
static int collect(cli_runtime *rt, const int32_t *ids, int n_ids, int ctx, int batch, bool bos, int threads,
                   double sink_weight, const char *k_spec, kvc_calib_fit *fit, int k_set, bool v, const char *what) {
    const eng_model *m = rt->model;
    const eng_model_config *c = &m->cfg;
    cli_runtime_opts ro = {.threads = threads, .ctx_tokens = ctx, .n_seqs = 1, .kv_k = k_spec, .kv_v = "f32"};
    if (cli_runtime_start(rt, &ro))
        return -1;
    const int HD = c->n_kv_head * c->head_dim, step = bos ? ctx - 1 : ctx;
    const int n_windows = (n_ids + step - 1) / step;
    float *k = malloc(sizeof(float) * (size_t)ctx * HD), *vv = malloc(sizeof(float) * (size_t)ctx * HD);
    float *logits = malloc(sizeof(float) * (size_t)c->n_vocab);
    int32_t *win = malloc(sizeof(int32_t) * (size_t)ctx);
    char err[512];
    int rc = k && vv && logits && win ? 0 : -1;
    if (rc)
        fprintf(stderr, "kvserve calibrate: out of memory\n");
    double t0 = cli_now();
    long seen = 0;
    for (int w = 0; w < n_windows && !rc; w++) {
        int n_text = n_ids - w * step < step ? n_ids - w * step : step, n = 0;
        if (bos)
            win[n++] = eng_tokenizer_bos(m->tok);
        memcpy(win + n, ids + (size_t)w * step, sizeof(int32_t) * (size_t)n_text);
        n += n_text;
        kvc_seq seq = {0};
        if (kvc_seq_reserve(rt->pool, &seq, n) != KVC_OK) {
            fprintf(stderr, "kvserve calibrate: KV cache too small for a window of %d tokens\n", n);
            rc = -1;
            break;
        }
        for (int p = 0; p < n && !rc; p += batch) {
            int cnt = n - p < batch ? n - p : batch;
            eng_segment s = {.seq = &seq, .pos0 = p, .n_tokens = cnt, .tokens = win + p, .want_logits = p + cnt == n};
            eng_batch b = {.n_segs = 1, .segs = &s};
            if (eng_forward(rt->backend, &b, logits, err, sizeof err)) {
                fprintf(stderr, "kvserve calibrate: %s\n", err);
                rc = -1;
            }
        }
        for (int l = 0; l < c->n_layer && !rc; l++) {
            kvc_read(rt->pool, &seq, l, 0, n, k, v ? vv : NULL, HD);
            kvc_calib_fit_add_weighted(fit, k_set, l, k, 1, HD, sink_weight);
            kvc_calib_fit_add(fit, k_set, l, k + HD, n - 1, HD);
            if (v) {
                kvc_calib_fit_add_weighted(fit, KVC_CALIB_V, l, vv, 1, HD, sink_weight);
                kvc_calib_fit_add(fit, KVC_CALIB_V, l, vv + HD, n - 1, HD);
            }
        }
        kvc_seq_release(rt->pool, &seq);
        seen += n;
        fprintf(stderr, "\rcalibrate: %s: window %d/%d, %ld tokens, %.0f tok/s   ", what, w + 1, n_windows, seen,
                seen / (cli_now() - t0 + 1e-9));
    }
    fputc('\n', stderr);
    free(k), free(vv), free(logits), free(win);
    /* keep the model, drop the cache and backend for the next pass */
    eng_backend_destroy(rt->backend);
    kvc_pool_destroy(rt->pool);
    rt->backend = NULL;
    rt->pool = NULL;
    return rc;
}

int cmd_calibrate(int argc, char **argv) {
    const char *model = NULL, *text_path = NULL, *out = NULL;
    int rank = 0, tokens = 16384, ctx = 512, batch = 512, threads = 0;
    float energy = 0, sink_weight = -1;
    bool pre_rope = false;
    const cli_flag flags[] = {
        {"--model", CLI_STR, &model, "GGUF file or Hugging Face directory"},
        {"--text", CLI_STR, &text_path, "UTF-8 text file to calibrate on"},
        {"--rank", CLI_INT, &rank, "per-head rank of every layer (latent: rank x kv heads)"},
        {"--energy", CLI_FLOAT, &energy, "per-layer ranks keeping this share of the variance, e.g. 0.95"},
        {"--tokens", CLI_INT, &tokens, "tokens of the text to use (default 16384)"},
        {"--ctx", CLI_INT, &ctx, "window length in tokens (default 512)"},
        {"--batch", CLI_INT, &batch, "prefill chunk in tokens (default 512)"},
        {"--sink-weight", CLI_FLOAT, &sink_weight, "weight of each window's first token (default: --ctx)"},
        {"--pre-rope", CLI_BOOL, &pre_rope, "also fit keys before RoPE (for :prerope key codecs)"},
        {"--threads", CLI_INT, &threads, "compute threads (default: all cores)"},
        {"--out", CLI_STR, &out, "calibration file to write"},
        {NULL, 0, NULL, NULL},
    };
    int rc = cli_parse("calibrate", usage, flags, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!model || !text_path || !out) {
        fprintf(stderr, "kvserve calibrate: --model, --text and --out are required (see --help)\n");
        return 2;
    }
    if ((rank > 0) == (energy > 0) || rank < 0 || energy < 0 || energy > 1) {
        fprintf(stderr, "kvserve calibrate: give exactly one of --rank R (>= 1) or --energy E (in (0, 1])\n");
        return 2;
    }
    if (cli_check_min("calibrate", flags, "--tokens --ctx", 2) || cli_check_min("calibrate", flags, "--batch", 1))
        return 2;
    if (sink_weight <= 0 && sink_weight != -1) {
        fprintf(stderr, "kvserve calibrate: --sink-weight %g: must be > 0\n", sink_weight);
        return 2;
    }
    size_t len;
    char *text = cli_read_file(text_path, &len);
    if (!text)
        return 1;
    cli_runtime rt;
    if (cli_runtime_load(&rt, model)) {
        free(text);
        return 1;
    }
    const eng_model *m = rt.model;
    const eng_model_config *c = &m->cfg;
    if (ctx > c->n_ctx_train)
        ctx = c->n_ctx_train;
    if (sink_weight == -1)
        sink_weight = (float)ctx;
    char err[512];
    int cap = (int)(len < 1 << 30 ? len : 1 << 30) + 8;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int n_ids = ids ? eng_tokenize(m->tok, text, len, false, false, ids, cap, err, sizeof err) : -1;
    free(text);
    kvc_calib_fit *fit = kvc_calib_fit_create(c->n_layer, c->n_kv_head, c->head_dim);
    rc = 1;
    if (n_ids < 2 || n_ids > cap || !fit) {
        fprintf(stderr, "kvserve calibrate: %s\n", !fit ? "out of memory, or more than 8192 K/V numbers per token"
                                                    : n_ids < 0 ? err : "the text has too few tokens");
        goto done;
    }
    if (n_ids > tokens)
        n_ids = tokens;
    const bool bos = eng_tokenizer_add_bos(m->tok) && eng_tokenizer_bos(m->tok) >= 0;
    double t0 = cli_now();
    fprintf(stderr, "calibrate: %s, %d tokens of %s in windows of %d, first tokens weighted %g\n",
            m->name ? m->name : model, n_ids, text_path, ctx, sink_weight);
    if (collect(&rt, ids, n_ids, ctx, batch, bos, threads, sink_weight, "f32", fit, KVC_CALIB_K, true, "K, V"))
        goto done;
    if (pre_rope && collect(&rt, ids, n_ids, ctx, batch, bos, threads, sink_weight, "f32:prerope", fit,
                            KVC_CALIB_K_PRE_ROPE, false, "pre-RoPE K"))
        goto done;
    progress_ctx pc = {cli_now()};
    kvc_calib_opts o = {.rank = rank, .energy = energy, .model = m->name ? m->name : model,
                        .progress = fit_progress, .progress_ctx = &pc};
    if (kvc_calib_fit_write(fit, &o, out, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvserve calibrate: %s\n", err);
        goto done;
    }
    fprintf(stderr, "calibrate: wrote %s (%s sets, %.0f s)\n", out, pre_rope ? "K, V, pre-RoPE K" : "K, V",
            cli_now() - t0);
    rc = 0;
done:
    kvc_calib_fit_destroy(fit);
    free(ids);
    cli_runtime_close(&rt);
    return rc;
}
