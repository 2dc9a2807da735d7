/* cmd_bench_engine.c: `kvserve bench --concurrency N --prompt-len P --gen-len G`:
 * the offline benchmark of the engine through its scheduler.
 *
 * N requests are kept in flight (closed loop) until --requests have finished;
 * each has its own pseudo-random prompt of P tokens and generates exactly G
 * tokens (greedy, EOS ignored). Measured from the events, as a client sees
 * them: output tokens/s over the whole run, time to first token and
 * inter-token latency percentiles; from the engine: the most KV pages in use
 * at once and the preemptions. A progress bar goes to stderr, the figures to
 * stdout (one JSON object with --json). */
#include "server/cmd_bench_engine.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cache/kvcache.h"
#include "engine/engine.h"
#include "engine/matmul.h"
#include "engine/metrics.h"
#include "server/cli.h"

static const char usage[] =
    "usage: kvserve bench --model PATH --concurrency N [--prompt-len N] [--gen-len N] [--requests N]\n"
    "                     [--kv SPEC] [--kv-k SPEC] [--kv-v SPEC] [--calib FILE] [--kv-memory BYTES]\n"
    "                     [--threads N] [--backend cpu|cuda] [--device N] [--max-batched-tokens N] [--prefill-chunk N] [--block-size N]\n"
    "                     [--json]\n\n"
    "Engine benchmark: N requests in flight through the continuous-batching scheduler;\n"
    "output tokens/s, TTFT and inter-token latency percentiles, peak KV pages used.";

typedef struct {
    double t_submit, t_first, t_last;
    int n_tokens;
    double *itl;        /* (gen_len) gaps between tokens */
    int n_itl;
    bool done;
    eng_finish_reason finish;
    char error[160];
} bench_req;

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    bench_req *reqs;    /* (n_requests) */
    long tokens;        /* generated so far, all requests */
    int done;
} bench_state;

typedef struct {
    bench_state *st;
    int index;
} bench_ref;

/* Engine thread: record the time of each token. */
static void on_event(const eng_event *ev, void *user) {
    bench_ref *ref = user;
    bench_state *st = ref->st;
    double now = cli_now();
    pthread_mutex_lock(&st->lock);
    bench_req *r = &st->reqs[ref->index];
    if (ev->token >= 0) {
        if (r->n_tokens == 0)
            r->t_first = now;
        else
            r->itl[r->n_itl++] = now - r->t_last;
        r->t_last = now;
        r->n_tokens++;
        st->tokens++;
    }
    if (ev->finish != ENG_FINISH_NONE) {
        r->done = true;
        r->finish = ev->finish;
        if (ev->error)
            snprintf(r->error, sizeof r->error, "%s", ev->error);
        st->done++;
        pthread_cond_signal(&st->cv);
    }
    pthread_mutex_unlock(&st->lock);
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentile q (0..100) of sorted v[0, n) with linear interpolation (numpy's default). */
static double percentile(const double *v, size_t n, double q) {
    if (n == 0)
        return 0.0;
    double pos = q / 100.0 * (double)(n - 1);
    size_t i = (size_t)pos;
    if (i + 1 >= n)
        return v[n - 1];
    return v[i] + (pos - (double)i) * (v[i + 1] - v[i]);
}

static void progress(long tokens, long total, int done, int n_requests, double elapsed, bool tty, int *last_decile) {
    double frac = total > 0 ? (double)tokens / (double)total : 1.0;
    if (tty) {
        char bar[31];
        int fill = (int)(frac * 30.0 + 0.5);
        for (int i = 0; i < 30; i++)
            bar[i] = i < fill ? '#' : '-';
        bar[30] = 0;
        fprintf(stderr, "\rbench [%s] %3.0f%%  %ld/%ld tokens  %d/%d requests  %.1f tok/s ", bar, frac * 100.0,
                tokens, total, done, n_requests, elapsed > 0 ? tokens / elapsed : 0.0);
    } else if ((int)(frac * 10.0) > *last_decile) {
        *last_decile = (int)(frac * 10.0);
        fprintf(stderr, "bench: %3.0f%%  %ld/%ld tokens  %d/%d requests\n", frac * 100.0, tokens, total, done,
                n_requests);
    }
}

/* Bytes of one page for this model and these codecs (a one-page probe pool). */
static size_t page_bytes_for(const char *model_path, const char *kv_k, const char *kv_v, const char *calib,
                             int block_size) {
    char err[512];
    eng_model *m = eng_model_load(model_path, err, sizeof err);
    if (!m) {
        fprintf(stderr, "kvserve bench: cannot load model: %s\n", err);
        return 0;
    }
    kvc_config kc = {.n_layer = m->cfg.n_layer, .n_kv_head = m->cfg.n_kv_head, .head_dim = m->cfg.head_dim,
                     .block_size = block_size, .memory_bytes = (size_t)4 << 20, .k_codec = kv_k, .v_codec = kv_v,
                     .calib = calib};
    eng_model_free(m);
    kvc_pool *p = NULL;
    if (kvc_pool_create(&kc, &p, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvserve bench: KV cache: %s\n", err);
        return 0;
    }
    size_t bytes = kvc_page_bytes(p);
    kvc_pool_destroy(p);
    return bytes;
}

static double metric_value(eng_engine *e, const char *series) {
    char *text = eng_metrics_render(eng_engine_metrics(e));
    double v = 0.0;
    size_t n = strlen(series);
    for (const char *p = text; p && *p;) {
        if (!strncmp(p, series, n) && p[n] == ' ') {
            v = strtod(p + n + 1, NULL);
            break;
        }
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    free(text);
    return v;
}

int cmd_bench_engine(int argc, char **argv) {
    const char *model = NULL, *kv = NULL, *kv_k = NULL, *kv_v = NULL, *calib = NULL, *backend = NULL;
    int device = 0;
    int concurrency = 0, prompt_len = 256, gen_len = 128, n_requests = 0, threads = 0;
    int max_batched = 2048, chunk = 512, block_size = 16, top_k = 0;
    float temperature = 0.0f, top_p = 1.0f, presence = 0.0f, frequency = 0.0f, repetition = 1.0f;
    size_t kv_memory = 0;
    bool json = false;
    const cli_flag flags[] = {
        {"--model", CLI_STR, &model, "GGUF file or Hugging Face directory"},
        {"--concurrency", CLI_INT, &concurrency, "requests in flight at once"},
        {"--prompt-len", CLI_INT, &prompt_len, "prompt tokens per request (default 256)"},
        {"--gen-len", CLI_INT, &gen_len, "generated tokens per request (default 128)"},
        {"--requests", CLI_INT, &n_requests, "requests in all (default: the concurrency)"},
        {"--kv", CLI_STR, &kv, "KV codec for keys and values (default f16)"},
        {"--kv-k", CLI_STR, &kv_k, "KV codec for keys (overrides --kv)"},
        {"--kv-v", CLI_STR, &kv_v, "KV codec for values (overrides --kv)"},
        {"--calib", CLI_STR, &calib, "calibration file for pca codecs (kvserve calibrate)"},
        {"--kv-memory", CLI_SIZE, &kv_memory, "KV arena (default: room for every request in flight)"},
        {"--threads", CLI_INT, &threads, "compute threads (default: all cores)"},
        {"--backend", CLI_STR, &backend, "cpu (default) or cuda (builds made with make CUDA=1)"},
        {"--device", CLI_INT, &device, "cuda: the GPU's index (default 0)"},
        {"--max-batched-tokens", CLI_INT, &max_batched, "tokens per step (default 2048)"},
        {"--prefill-chunk", CLI_INT, &chunk, "prompt tokens of one request per step (default 512)"},
        {"--block-size", CLI_INT, &block_size, "tokens per KV page (default 16)"},
        {"--temperature", CLI_FLOAT, &temperature, "sampling temperature (default 0: greedy); request i seeds i"},
        {"--top-k", CLI_INT, &top_k, "top-k sampling (default 0: off)"},
        {"--top-p", CLI_FLOAT, &top_p, "top-p sampling (default 1: off)"},
        {"--presence-penalty", CLI_FLOAT, &presence, "presence penalty (default 0: off)"},
        {"--frequency-penalty", CLI_FLOAT, &frequency, "frequency penalty (default 0: off)"},
        {"--repetition-penalty", CLI_FLOAT, &repetition, "repetition penalty (default 1: off)"},
        {"--json", CLI_BOOL, &json, "print one JSON object"},
        {NULL, 0, NULL, NULL},
    };
    int rc = cli_parse("bench", usage, flags, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (n_requests == 0)
        n_requests = concurrency;
    if (!model) {
        fprintf(stderr, "kvserve bench: --model is required (see --help)\n");
        return 2;
    }
    if (cli_check_min("bench", flags, "--concurrency --prompt-len --gen-len --requests --block-size", 1))
        return 2;
    eng_sampling_params sampling;
    eng_sampling_params_default(&sampling);
    sampling.temperature = temperature;
    sampling.top_k = top_k > 0 ? top_k : 0;
    sampling.top_p = top_p;
    sampling.presence_penalty = presence;
    sampling.frequency_penalty = frequency;
    sampling.repetition_penalty = repetition;
    const char *bad = top_k < 0 ? "top_k must be >= 0" : eng_sampling_params_check(&sampling);
    if (bad) {
        fprintf(stderr, "kvserve bench: %s\n", bad);
        return 2;
    }
    if (!kv_k)
        kv_k = kv ? kv : "f16";
    if (!kv_v)
        kv_v = kv ? kv : "f16";
    int in_flight = concurrency < n_requests ? concurrency : n_requests;
    int n_ctx = prompt_len + gen_len;
    if (!kv_memory) {
        size_t pb = page_bytes_for(model, kv_k, kv_v, calib, block_size);
        if (!pb)
            return 1;
        size_t pages = (size_t)((n_ctx + block_size - 1) / block_size) * (size_t)in_flight;
        kv_memory = pb * (pages + pages / 50 + 2); /* + the scheduler's watermark */
    }

    eng_engine_config cfg;
    eng_engine_config_default(&cfg);
    cfg.model_path = model;
    cfg.threads = threads;
    cfg.backend = backend;
    cfg.device = device;
    cfg.kv_memory = kv_memory;
    cfg.block_size = block_size;
    cfg.kv_k = kv_k;
    cfg.kv_v = kv_v;
    cfg.calib_path = calib;
    cfg.max_batched_tokens = max_batched;
    cfg.max_seqs = in_flight > 64 ? in_flight : 64;
    cfg.prefill_chunk = chunk;
    cfg.max_waiting = n_requests + 1;
    cfg.n_ctx = n_ctx;
    cfg.profile_name = "bench";
    char err[512];
    eng_engine *e = eng_engine_create(&cfg, err, sizeof err);
    if (!e) {
        fprintf(stderr, "kvserve bench: %s\n", err);
        return 1;
    }
    const int n_vocab = eng_engine_model(e)->cfg.n_vocab;

    bench_state st = {.lock = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    st.reqs = calloc((size_t)n_requests, sizeof *st.reqs);
    bench_ref *refs = calloc((size_t)n_requests, sizeof *refs);
    int32_t *prompt = malloc((size_t)prompt_len * sizeof *prompt);
    double *all_itl = malloc((size_t)n_requests * (size_t)gen_len * sizeof *all_itl);
    double *ttft = malloc((size_t)n_requests * sizeof *ttft);
    bool oom = !st.reqs || !refs || !prompt || !all_itl || !ttft;
    for (int i = 0; st.reqs && i < n_requests; i++)
        if (!(st.reqs[i].itl = malloc((size_t)gen_len * sizeof(double))))
            oom = true;
    if (oom) {
        fprintf(stderr, "kvserve bench: out of memory\n");
        rc = 1;
        goto out;
    }

    eng_request q = {0};
    q.sampling = sampling;
    q.prompt = prompt;
    q.n_prompt = prompt_len;
    q.max_tokens = gen_len;
    q.n = 1;
    q.ignore_eos = true;
    q.on_event = on_event;

    /* warm-up: threads started, code and weights paged in */
    {
        bench_state wst = {.lock = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
        bench_req wr = {0};
        double witl[4];
        wr.itl = witl;
        wst.reqs = &wr;
        bench_ref wref = {&wst, 0};
        eng_request w = q;
        w.n_prompt = prompt_len < 16 ? prompt_len : 16;
        w.max_tokens = gen_len < 4 ? gen_len : 4;   /* inside the context of prompt_len + gen_len */
        w.user = &wref;
        for (int i = 0; i < w.n_prompt; i++)
            prompt[i] = (int32_t)(i * 7 + 11) % n_vocab;
        if (eng_engine_submit(e, &w, NULL, err, sizeof err) != ENG_OK) {
            fprintf(stderr, "kvserve bench: %s\n", err);
            rc = 1;
            goto out;
        }
        eng_engine_wait_idle(e, 600.0);
    }

    const bool tty = isatty(2);
    const long total = (long)n_requests * gen_len;
    int submitted = 0, last_decile = -1;
    double t_start = cli_now();
    pthread_mutex_lock(&st.lock);
    while (st.done < n_requests) {
        /* keep `in_flight` requests running */
        while (submitted < n_requests && submitted - st.done < in_flight) {
            uint64_t x = 0x9E3779B97F4A7C15ull * (uint64_t)(submitted + 1);
            for (int i = 0; i < prompt_len; i++) { /* xorshift: a different fixed prompt per request */
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                prompt[i] = (int32_t)(x % (uint64_t)(n_vocab < 32000 ? n_vocab : 32000));
            }
            refs[submitted] = (bench_ref){&st, submitted};
            q.user = &refs[submitted];
            q.sampling.seed = (uint64_t)submitted;
            st.reqs[submitted].t_submit = cli_now();
            pthread_mutex_unlock(&st.lock);
            int src = eng_engine_submit(e, &q, NULL, err, sizeof err);
            pthread_mutex_lock(&st.lock);
            if (src != ENG_OK) {
                fprintf(stderr, "\nkvserve bench: request %d: %s\n", submitted, err);
                rc = 1;
                break;
            }
            submitted++;
        }
        if (rc)
            break;
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&st.cv, &st.lock, &ts);
        progress(st.tokens, total, st.done, n_requests, cli_now() - t_start, tty, &last_decile);
    }
    pthread_mutex_unlock(&st.lock);
    if (rc) {
        eng_engine_destroy(e);
        e = NULL;
        goto out;
    }
    eng_engine_wait_idle(e, 600.0);
    double t_end = 0.0;
    size_t n_itl = 0;
    long produced = 0;
    for (int i = 0; i < n_requests; i++) {
        bench_req *r = &st.reqs[i];
        if (r->finish == ENG_FINISH_ERROR) {
            fprintf(stderr, "%skvserve bench: request %d failed: %s\n", tty ? "\n" : "", i, r->error);
            rc = 1;
        }
        if (r->t_last > t_end)
            t_end = r->t_last;
        ttft[i] = r->t_first - r->t_submit;
        memcpy(all_itl + n_itl, r->itl, (size_t)r->n_itl * sizeof(double));
        n_itl += (size_t)r->n_itl;
        produced += r->n_tokens;
    }
    if (tty)
        fputc('\n', stderr);
    if (rc)
        goto out;
    qsort(ttft, (size_t)n_requests, sizeof(double), cmp_double);
    qsort(all_itl, n_itl, sizeof(double), cmp_double);
    double wall = t_end - t_start;
    eng_engine_stats es;
    eng_engine_stats_get(e, &es);
    double preemptions = metric_value(e, "kvserve_num_preemptions_total");
    double tps = produced / wall;
    if (json) {
        printf("{\"model\": \"%s\", \"concurrency\": %d, \"requests\": %d, \"prompt_len\": %d, \"gen_len\": %d, "
               "\"kv_k\": \"%s\", \"kv_v\": \"%s\", \"bytes_per_token\": %zu, \"backend\": \"%s\", \"threads\": %d, "
               "\"isa\": \"%s\", "
               "\"output_tokens_per_s\": %.2f, \"total_tokens_per_s\": %.2f, \"wall_s\": %.3f, "
               "\"ttft_p50_s\": %.4f, \"ttft_p90_s\": %.4f, \"ttft_p99_s\": %.4f, "
               "\"itl_p50_s\": %.4f, \"itl_p90_s\": %.4f, \"itl_p99_s\": %.4f, "
               "\"peak_pages_used\": %d, \"pages_total\": %d, \"block_size\": %d, \"preemptions\": %.0f, "
               "\"steps\": %llu, \"temperature\": %g, \"top_k\": %d, \"top_p\": %g, \"presence_penalty\": %g, "
               "\"frequency_penalty\": %g, \"repetition_penalty\": %g}\n",
               eng_engine_model(e)->name ? eng_engine_model(e)->name : model, concurrency, n_requests, prompt_len,
               gen_len, kv_k, kv_v, es.bytes_per_token, backend ? backend : "cpu", threads, eng_matmul_isa(), tps,
               (produced + (double)n_requests * prompt_len) / wall, wall, percentile(ttft, (size_t)n_requests, 50),
               percentile(ttft, (size_t)n_requests, 90), percentile(ttft, (size_t)n_requests, 99),
               percentile(all_itl, n_itl, 50), percentile(all_itl, n_itl, 90), percentile(all_itl, n_itl, 99),
               es.pages_peak, es.pages_total, block_size, preemptions, (unsigned long long)es.steps,
               (double)temperature, sampling.top_k, (double)top_p, (double)presence, (double)frequency,
               (double)repetition);
    } else {
        printf("concurrency %d, %d requests of %d prompt + %d generated tokens, KV %s/%s (%zu bytes/token), "
               "backend %s\n",
               concurrency, n_requests, prompt_len, gen_len, kv_k, kv_v, es.bytes_per_token, backend ? backend : "cpu");
        printf("  output        %.1f tokens/s (%ld tokens in %.2f s; %.1f tokens/s with prompts)\n", tps, produced,
               wall, (produced + (double)n_requests * prompt_len) / wall);
        printf("  TTFT          p50 %.3f s  p90 %.3f s  p99 %.3f s\n", percentile(ttft, (size_t)n_requests, 50),
               percentile(ttft, (size_t)n_requests, 90), percentile(ttft, (size_t)n_requests, 99));
        printf("  inter-token   p50 %.1f ms  p90 %.1f ms  p99 %.1f ms\n", 1e3 * percentile(all_itl, n_itl, 50),
               1e3 * percentile(all_itl, n_itl, 90), 1e3 * percentile(all_itl, n_itl, 99));
        printf("  KV pages      peak %d of %d used; %.0f preemptions; %llu steps\n", es.pages_peak, es.pages_total,
               preemptions, (unsigned long long)es.steps);
    }
out:
    eng_engine_destroy(e);
    if (st.reqs)
        for (int i = 0; i < n_requests; i++)
            free(st.reqs[i].itl);
    free(st.reqs);
    free(refs);
    free(prompt);
    free(all_itl);
    free(ttft);
    return rc;
}
