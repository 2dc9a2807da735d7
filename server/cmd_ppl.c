/* cmd_ppl.c: `kvserve ppl`: perplexity of a model on a text file, for any KV
 * codec: the quality meter.
 *
 * The text is tokenized whole (no BOS, no special-token parsing), cut into
 * non-overlapping windows of --ctx tokens, and each window is evaluated on its
 * own from an empty cache: token t is scored from tokens [0, t) of its window,
 * so a window of C tokens contributes C - 1 predictions (C when the model wants
 * BOS, which then leads each window). K/V pass through the chosen codecs as in
 * serving: prefill chunks are compressed as they are written. With --absorb
 * the K/V projections are folded into the codecs' bases where they have one
 * (eng_backend_options.absorb). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tokenizer.h"
#include "server/cli.h"

static const char usage[] =
    "usage: kvserve ppl --model PATH --text FILE [--ctx N] [--max-tokens N] [--json]\n"
    "                   [--kv SPEC | --kv-k SPEC --kv-v SPEC] [--calib FILE] [--absorb] [--batch N]\n"
    "                   [--threads N] [--backend cpu|cuda] [--device N]\n\n"
    "Perplexity over non-overlapping windows of --ctx tokens; progress on stderr.";

/* -log p(target) from one row of logits, in double. */
static double nll_of(const float *logits, int n_vocab, int32_t target) {
    float mx = logits[0];
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > mx)
            mx = logits[i];
    double sum = 0;
    for (int i = 0; i < n_vocab; i++)
        sum += exp((double)logits[i] - mx);
    return log(sum) + mx - logits[target];
}

int cmd_ppl(int argc, char **argv) {
    const char *model = NULL, *text_path = NULL, *kv = NULL, *kv_k = NULL, *kv_v = NULL, *calib = NULL, *backend = NULL;
    int device = 0;
    int ctx = 512, max_tokens = 0, batch = 512, threads = 0, block_size = 16;
    bool json = false, absorb = false;
    const cli_flag flags[] = {
        {"--model", CLI_STR, &model, "GGUF file or Hugging Face directory"},
        {"--text", CLI_STR, &text_path, "UTF-8 text file"},
        {"--ctx", CLI_INT, &ctx, "window length in tokens (default 512)"},
        {"--max-tokens", CLI_INT, &max_tokens, "use only the first N tokens of the text (default: all)"},
        {"--kv", CLI_STR, &kv, "KV codec for keys and values (default f32; f16 with --backend cuda)"},
        {"--kv-k", CLI_STR, &kv_k, "KV codec for keys"},
        {"--kv-v", CLI_STR, &kv_v, "KV codec for values"},
        {"--calib", CLI_STR, &calib, "calibration file for pca codecs (kvserve calibrate)"},
        {"--absorb", CLI_BOOL, &absorb, "fold the K/V projections into the codecs' bases where they have one"},
        {"--block-size", CLI_INT, &block_size, "tokens per KV page (default 16)"},
        {"--batch", CLI_INT, &batch, "prefill chunk in tokens (default 512)"},
        {"--threads", CLI_INT, &threads, "compute threads (default: all cores)"},
        {"--backend", CLI_STR, &backend, "cpu (default) or cuda (builds made with make CUDA=1)"},
        {"--device", CLI_INT, &device, "cuda: the GPU's index (default 0)"},
        {"--json", CLI_BOOL, &json, "print one JSON object"},
        {NULL, 0, NULL, NULL},
    };
    int rc = cli_parse("ppl", usage, flags, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!model || !text_path) {
        fprintf(stderr, "kvserve ppl: --model and --text are required (see --help)\n");
        return 2;
    }
    if (cli_check_min("ppl", flags, "--ctx", 2) || cli_check_min("ppl", flags, "--batch --block-size", 1) ||
        cli_check_min("ppl", flags, "--max-tokens", 0))
        return 2;
    if (!kv_k)
        kv_k = kv;
    if (!kv_v)
        kv_v = kv;
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
    if (ctx > m->cfg.n_ctx_train) {
        fprintf(stderr, "kvserve ppl: --ctx %d exceeds the model's context (%d)\n", ctx, m->cfg.n_ctx_train);
        free(text);
        cli_runtime_close(&rt);
        return 2;
    }
    char err[512];
    int cap = (int)(len < 1 << 30 ? len : 1 << 30) + 8;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int n_ids = ids ? eng_tokenize(m->tok, text, len, false, false, ids, cap, err, sizeof err) : -1;
    free(text);
    if (n_ids < 0 || n_ids > cap) {
        fprintf(stderr, "kvserve ppl: cannot tokenize %s: %s\n", text_path, n_ids < 0 ? err : "too many tokens");
        free(ids);
        cli_runtime_close(&rt);
        return 1;
    }
    if (max_tokens && max_tokens < n_ids)
        n_ids = max_tokens;
    const bool bos = eng_tokenizer_add_bos(m->tok) && eng_tokenizer_bos(m->tok) >= 0;
    const int step = bos ? ctx - 1 : ctx;
    const int n_windows = (n_ids + step - 1) / step;
    cli_runtime_opts ro = {.threads = threads, .ctx_tokens = ctx, .n_seqs = 1, .kv_k = kv_k, .kv_v = kv_v,
                           .calib = calib, .block_size = block_size, .absorb = absorb,
                           .backend = backend, .device = device};
    if (n_ids < 2 || cli_runtime_start(&rt, &ro)) {
        if (n_ids < 2)
            fprintf(stderr, "kvserve ppl: %s has %d tokens; need at least 2\n", text_path, n_ids);
        free(ids);
        cli_runtime_close(&rt);
        return 1;
    }
    const int n_vocab = m->cfg.n_vocab;
    if (batch > ctx)
        batch = ctx;
    float *logits = malloc((size_t)batch * n_vocab * sizeof(float));
    int32_t *win = malloc((size_t)ctx * sizeof *win);
    double nll = 0, t0 = cli_now();
    long scored = 0;
    rc = 0;
    for (int w = 0; w < n_windows && logits && win; w++) {
        int n_text = n_ids - w * step < step ? n_ids - w * step : step;
        int n = 0;
        if (bos)
            win[n++] = eng_tokenizer_bos(m->tok);
        memcpy(win + n, ids + (size_t)w * step, (size_t)n_text * sizeof *win);
        n += n_text;
        if (n < 2)
            break;
        kvc_seq seq = {0};
        if (kvc_seq_reserve(rt.pool, &seq, n) != KVC_OK) {
            fprintf(stderr, "kvserve ppl: KV cache too small for a window of %d tokens\n", n);
            rc = 1;
            break;
        }
        for (int p = 0; p < n && !rc; p += batch) {
            int c = n - p < batch ? n - p : batch;
            eng_segment s = {.seq = &seq, .pos0 = p, .n_tokens = c, .tokens = win + p, .all_logits = true};
            eng_batch b = {.n_segs = 1, .segs = &s};
            if (eng_forward(rt.backend, &b, logits, err, sizeof err)) {
                fprintf(stderr, "kvserve ppl: %s\n", err);
                rc = 1;
                break;
            }
            for (int t = 0; t < c; t++)
                if (p + t + 1 < n) {
                    nll += nll_of(logits + (size_t)t * n_vocab, n_vocab, win[p + t + 1]);
                    scored++;
                }
        }
        kvc_seq_release(rt.pool, &seq);
        double el = cli_now() - t0;
        fprintf(stderr, "\rppl: window %d/%d, %ld tokens scored, ppl %.4f, %.0f tok/s   ", w + 1, n_windows,
                scored, exp(nll / (scored ? scored : 1)), (w * step + n_text) / (el + 1e-12));
    }
    fprintf(stderr, "\n");
    if (!logits || !win) {
        fprintf(stderr, "kvserve ppl: out of memory\n");
        rc = 1;
    }
    if (!rc) {
        double secs = cli_now() - t0, ppl = exp(nll / scored);
        const eng_model_config *c = &m->cfg;
        double f16_bpt = (double)c->n_layer * c->n_kv_head * c->head_dim * 2 * 2;
        size_t bpt = kvc_bytes_per_token(rt.pool);
        if (json)
            printf("{\"ppl\": %.6f, \"tokens\": %ld, \"ctx\": %d, \"windows\": %d, \"kv_k\": \"%s\", "
                   "\"kv_v\": \"%s\", \"bytes_per_token\": %zu, \"compression_ratio\": %.4f, "
                   "\"absorbed\": \"%s\", \"backend\": \"%s\", \"seconds\": %.3f, \"tokens_per_s\": %.1f}\n",
                   ppl, scored, ctx, n_windows, kvc_k_codec(rt.pool), kvc_v_codec(rt.pool), bpt, f16_bpt / bpt,
                   eng_absorbed_name(rt.backend->absorbed), rt.backend->name, secs, (double)n_ids / secs);
        else
            printf("ppl = %.4f over %ld tokens (ctx %d, %d windows, KV %s/%s, %zu bytes/token, absorbed %s) "
                   "in %.1f s (%s)\n", ppl, scored, ctx, n_windows, kvc_k_codec(rt.pool), kvc_v_codec(rt.pool), bpt,
                   eng_absorbed_name(rt.backend->absorbed), secs, rt.backend->name);
    }
    free(logits);
    free(win);
    free(ids);
    cli_runtime_close(&rt);
    return rc;
}
