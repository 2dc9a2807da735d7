/* cmd_bench.c: `kvserve bench`: single-stream prefill and decode speed.
 *
 * Prefill: one prompt of --prompt-len tokens in chunks of --batch; decode:
 * --gen-len greedy steps after it. The prompt is real text from a file when
 * --text is given, else a fixed pseudo-random token sequence. Each run starts
 * from an empty cache; the figures are medians over --repeat runs. --absorb
 * folds the K/V projections into the KV codecs' bases where they have one, to
 * time prefill with and without (README, "The KV cache"). Besides wall-clock
 * speeds, the prefill's process CPU time is reported: on a shared machine it
 * is what a run itself cost (with --threads 1 it is the compute alone). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/matmul.h"
#include "engine/tokenizer.h"
#include "server/cli.h"
#include "server/cmd_bench_engine.h"

static const char usage[] =
    "usage: kvserve bench --model PATH [--prompt-len N] [--gen-len N] [--repeat N]\n"
    "                     [--kv SPEC | --kv-k SPEC --kv-v SPEC] [--calib FILE] [--absorb]\n"
    "                     [--block-size N] [--threads N] [--backend cpu|cuda] [--device N] [--batch N]\n"
    "                     [--json]\n\n"
    "Single-stream prefill and decode tokens/s.\n"
    "With --concurrency N: the engine benchmark (kvserve bench --concurrency N --help).\n"
    "With --capacity: bytes per token and what fits in --kv-memory, per KV setting (--capacity --help).";

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* CPU seconds used by the whole process so far (all threads). */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int argmax(const float *v, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (v[i] > v[best])
            best = i;
    return best;
}

/* `kvserve bench --capacity`: for each KV setting, what a pool of --kv-memory
 * bytes holds: bytes per token (all layers, K and V, scales and padding),
 * the compression ratio against f16, pages, tokens, and sequences of --ctx
 * tokens. Needs only the model's shape. */
static int bench_capacity(int argc, char **argv) {
    const char *model = NULL, *kv = "f16,int8,int4", *calib = NULL;
    size_t kv_memory = (size_t)1 << 30;
    int ctx = 2048, block_size = 16;
    bool json = false, capacity = false;
    const cli_flag flags[] = {
        {"--capacity", CLI_BOOL, &capacity, "capacity per KV setting instead of speed"},
        {"--model", CLI_STR, &model, "GGUF file or Hugging Face directory (its shape is used)"},
        {"--kv", CLI_STR, &kv, "comma-separated settings: SPEC, or KSPEC/VSPEC (default f16,int8,int4)"},
        {"--kv-memory", CLI_SIZE, &kv_memory, "KV pool size (default 1G)"},
        {"--ctx", CLI_INT, &ctx, "sequence length for the sequence count (default 2048)"},
        {"--block-size", CLI_INT, &block_size, "tokens per page (default 16)"},
        {"--calib", CLI_STR, &calib, "calibration file for pca codecs"},
        {"--json", CLI_BOOL, &json, "print one JSON object"},
        {NULL, 0, NULL, NULL},
    };
    int rc = cli_parse("bench", "usage: kvserve bench --capacity --model PATH [--kv SPEC,KSPEC/VSPEC,...] "
                                "[--kv-memory BYTES] [--ctx N] [--calib FILE] [--json]\n\n"
                                "Bytes per token, tokens and sequences of --ctx tokens that fit, per KV setting.",
                       flags, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!model) {
        fprintf(stderr, "kvserve bench --capacity: --model is required (see --help)\n");
        return 2;
    }
    if (cli_check_min("bench --capacity", flags, "--ctx --block-size", 1))
        return 2;
    cli_runtime rt;
    if (cli_runtime_load(&rt, model))
        return 1;
    const eng_model_config *c = &rt.model->cfg;
    char list[1024], err[512];
    snprintf(list, sizeof list, "%s", kv);
    if (json)
        printf("{\"model\": \"%s\", \"kv_memory\": %zu, \"ctx\": %d, \"settings\": [", rt.model->name ? rt.model->name : model,
               kv_memory, ctx);
    else
        printf("%s: %d layers x %d kv heads x head_dim %d; KV memory %zu bytes, block %d, context %d\n"
               "%-36s %12s %8s %10s %12s %10s\n", rt.model->name ? rt.model->name : model, c->n_layer, c->n_kv_head,
               c->head_dim, kv_memory, block_size, ctx, "KV (K/V)", "bytes/token", "vs f16", "pages", "tokens", "seqs");
    int first = 1;
    for (char *save = NULL, *spec = strtok_r(list, ",", &save); spec && !rc; spec = strtok_r(NULL, ",", &save)) {
        char *v = strchr(spec, '/');
        if (v)
            *v++ = 0;
        kvc_config kc = {.n_layer = c->n_layer, .n_kv_head = c->n_kv_head, .head_dim = c->head_dim,
                         .block_size = block_size, .memory_bytes = kv_memory, .k_codec = spec,
                         .v_codec = v ? v : spec, .calib = calib};
        kvc_pool *pool;
        if (kvc_pool_create(&kc, &pool, err, sizeof err) != KVC_OK) {
            fprintf(stderr, "kvserve bench --capacity: %s\n", err);
            rc = 1;
            break;
        }
        long long tokens = (long long)kvc_pages_total(pool) * kvc_block_size(pool);
        if (json)
            printf("%s{\"kv_k\": \"%s\", \"kv_v\": \"%s\", \"bytes_per_token\": %zu, \"compression_ratio\": %.4f, "
                   "\"pages\": %d, \"tokens\": %lld, \"sequences\": %d}", first ? "" : ", ", kvc_k_codec(pool),
                   kvc_v_codec(pool), kvc_bytes_per_token(pool), kvc_compression_ratio(pool), kvc_pages_total(pool),
                   tokens, kvc_capacity_sequences(pool, ctx));
        else {
            char name[160];
            snprintf(name, sizeof name, v ? "%s / %s" : "%s", spec, v);
            printf("%-36s %12zu %7.2fx %10d %12lld %10d\n", name, kvc_bytes_per_token(pool),
                   kvc_compression_ratio(pool), kvc_pages_total(pool), tokens, kvc_capacity_sequences(pool, ctx));
        }
        first = 0;
        kvc_pool_destroy(pool);
    }
    if (json && !rc)
        printf("]}\n");
    cli_runtime_close(&rt);
    return rc;
}

int cmd_bench(int argc, char **argv) {
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--capacity"))
            return bench_capacity(argc, argv);
    for (int i = 1; i < argc; i++)
        if (!strncmp(argv[i], "--concurrency", 13) && (argv[i][13] == 0 || argv[i][13] == '='))
            return cmd_bench_engine(argc, argv);
    const char *model = NULL, *kv = NULL, *kv_k = NULL, *kv_v = NULL, *calib = NULL, *backend = NULL;
    int device = 0;
    int prompt_len = 512, gen_len = 128, repeat = 3, threads = 0, batch = 512, block_size = 16;
    bool json = false, absorb = false;
    const cli_flag flags[] = {
        {"--model", CLI_STR, &model, "GGUF file or Hugging Face directory"},
        {"--prompt-len", CLI_INT, &prompt_len, "prompt tokens (default 512)"},
        {"--gen-len", CLI_INT, &gen_len, "generated tokens (default 128)"},
        {"--repeat", CLI_INT, &repeat, "runs; medians are reported (default 3)"},
        {"--kv", CLI_STR, &kv, "KV codec for keys and values (default f32)"},
        {"--kv-k", CLI_STR, &kv_k, "KV codec for keys"},
        {"--kv-v", CLI_STR, &kv_v, "KV codec for values"},
        {"--calib", CLI_STR, &calib, "calibration file for pca codecs"},
        {"--absorb", CLI_BOOL, &absorb, "fold the K/V projections into the codecs' bases where they have one"},
        {"--block-size", CLI_INT, &block_size, "tokens per KV page (default 16)"},
        {"--threads", CLI_INT, &threads, "compute threads (default: all cores)"},
        {"--backend", CLI_STR, &backend, "cpu (default) or cuda (builds made with make CUDA=1)"},
        {"--device", CLI_INT, &device, "cuda: the GPU's index (default 0)"},
        {"--batch", CLI_INT, &batch, "prefill chunk in tokens (default 512)"},
        {"--json", CLI_BOOL, &json, "print one JSON object"},
        {NULL, 0, NULL, NULL},
    };
    int rc = cli_parse("bench", usage, flags, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!model) {
        fprintf(stderr, "kvserve bench: --model is required (see --help)\n");
        return 2;
    }
    if (cli_check_min("bench", flags, "--prompt-len --gen-len --repeat --batch --block-size", 1))
        return 2;
    cli_runtime rt;
    if (cli_runtime_load(&rt, model))
        return 1;
    const eng_model *m = rt.model;
    int n_ctx = prompt_len + gen_len;
    if (n_ctx > m->cfg.n_ctx_train) {
        fprintf(stderr, "kvserve bench: prompt + gen (%d) exceeds the model's context (%d)\n", n_ctx,
                m->cfg.n_ctx_train);
        cli_runtime_close(&rt);
        return 2;
    }
    if (!kv_k)
        kv_k = kv;
    if (!kv_v)
        kv_v = kv;
    cli_runtime_opts ro = {.threads = threads, .ctx_tokens = n_ctx, .n_seqs = 1, .kv_k = kv_k, .kv_v = kv_v,
                           .calib = calib, .block_size = block_size, .absorb = absorb,
                           .backend = backend, .device = device};
    char err[512];
    if (cli_runtime_start(&rt, &ro)) {
        cli_runtime_close(&rt);
        return 1;
    }
    const int n_vocab = m->cfg.n_vocab;
    int32_t *ids = malloc((size_t)(n_ctx + 1) * sizeof *ids);
    float *logits = malloc((size_t)n_vocab * sizeof(float));
    double *pre = calloc((size_t)repeat, sizeof(double)), *dec = calloc((size_t)repeat, sizeof(double));
    double *pre_cpu = calloc((size_t)repeat, sizeof(double));
    if (!ids || !logits || !pre || !dec || !pre_cpu) {
        fprintf(stderr, "kvserve bench: out of memory\n");
        rc = 1;
        goto done;
    }
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < prompt_len; i++) { /* xorshift: a fixed, model-independent prompt */
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        ids[i] = (int32_t)(x % (uint64_t)(n_vocab < 32000 ? n_vocab : 32000));
    }
    for (int r = 0; r < repeat && !rc; r++) {
        kvc_seq seq = {0};
        if (kvc_seq_reserve(rt.pool, &seq, n_ctx) != KVC_OK) {
            fprintf(stderr, "kvserve bench: KV cache too small\n");
            rc = 1;
            break;
        }
        double t0 = cli_now(), c0 = cpu_now();
        for (int p = 0; p < prompt_len && !rc; p += batch) {
            int c = prompt_len - p < batch ? prompt_len - p : batch;
            eng_segment s = {.seq = &seq, .pos0 = p, .n_tokens = c, .tokens = ids + p,
                             .want_logits = p + c == prompt_len};
            eng_batch b = {.n_segs = 1, .segs = &s};
            rc = eng_forward(rt.backend, &b, logits, err, sizeof err);
        }
        double t1 = cli_now(), c1 = cpu_now();
        for (int g = 0; g < gen_len && !rc; g++) {
            ids[prompt_len + g] = argmax(logits, n_vocab);
            eng_segment s = {.seq = &seq, .pos0 = prompt_len + g, .n_tokens = 1, .tokens = ids + prompt_len + g,
                             .want_logits = true};
            eng_batch b = {.n_segs = 1, .segs = &s};
            rc = eng_forward(rt.backend, &b, logits, err, sizeof err);
        }
        double t2 = cli_now();
        kvc_seq_release(rt.pool, &seq);
        if (rc) {
            fprintf(stderr, "kvserve bench: %s\n", err);
            break;
        }
        pre[r] = prompt_len / (t1 - t0);
        pre_cpu[r] = c1 - c0;
        dec[r] = gen_len / (t2 - t1);
        fprintf(stderr, "run %d/%d: prefill %.1f tok/s, decode %.1f tok/s\n", r + 1, repeat, pre[r], dec[r]);
    }
    if (!rc) {
        qsort(pre, (size_t)repeat, sizeof(double), cmp_double);
        qsort(dec, (size_t)repeat, sizeof(double), cmp_double);
        qsort(pre_cpu, (size_t)repeat, sizeof(double), cmp_double);
        const char *wfmt = eng_dtype_name(m->layers[0].wqkv.type), *ofmt = eng_dtype_name(m->output.type);
        int nt = threads > 0 ? threads : 0;
        if (json)
            printf("{\"model\": \"%s\", \"prefill_tokens_per_s\": %.1f, \"prefill_cpu_s\": %.4f, "
                   "\"decode_tokens_per_s\": %.1f, "
                   "\"prompt_len\": %d, \"gen_len\": %d, \"repeat\": %d, \"threads\": %d, \"isa\": \"%s\", "
                   "\"layer_weights\": \"%s\", \"output_weights\": \"%s\", \"kv_k\": \"%s\", \"kv_v\": \"%s\", "
                   "\"absorbed\": \"%s\", \"backend\": \"%s\"}\n",
                   m->name ? m->name : model, pre[repeat / 2], pre_cpu[repeat / 2], dec[repeat / 2], prompt_len,
                   gen_len, repeat, nt, eng_matmul_isa(), wfmt, ofmt, kvc_k_codec(rt.pool), kvc_v_codec(rt.pool),
                   eng_absorbed_name(rt.backend->absorbed), rt.backend->name);
        else
            printf("prefill %.1f tok/s (%d-token prompt, %.3f CPU s), decode %.1f tok/s (%d tokens); weights %s/%s, "
                   "kernels %s, KV %s/%s, absorbed %s, backend %s\n",
                   pre[repeat / 2], prompt_len, pre_cpu[repeat / 2], dec[repeat / 2], gen_len, wfmt, ofmt,
                   eng_matmul_isa(),
                   kvc_k_codec(rt.pool), kvc_v_codec(rt.pool), eng_absorbed_name(rt.backend->absorbed),
                   rt.backend->name);
    }
done:
    free(ids);
    free(logits);
    free(pre);
    free(pre_cpu);
    free(dec);
    cli_runtime_close(&rt);
    return rc;
}
