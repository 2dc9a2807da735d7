/* cmd_generate.c: `kvserve generate`: one prompt, streamed to stdout. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat.h"
#include "engine/sampler.h"
#include "engine/tokenizer.h"
#include "server/cli.h"

#define PREFILL_CHUNK 512

static const char usage[] =
    "usage: kvserve generate --model PATH --prompt TEXT [--chat] [--max-tokens N]\n"
    "                        [--temperature T] [--top-p P] [--top-k K] [--min-p P] [--seed S]\n"
    "                        [--backend cpu|cuda] [--device N]\n\n"
    "Generates a completion for one prompt and streams it to stdout; timing goes to stderr.\n"
    "--chat wraps the prompt as a user message in the model's chat template.";

/* Builds the token ids of the prompt; returns the count or -1. *out is malloc'd. */
static int prompt_tokens(const eng_model *m, const char *prompt, const char *system, bool chat, bool verbose,
                         int32_t **out) {
    char err[256];
    char *text = NULL;
    bool special = false;
    if (chat) {
        const char *tmpl = m->chat_template ? m->chat_template : eng_tokenizer_chat_template(m->tok);
        eng_chat_msg msgs[2];
        int n = 0;
        if (system)
            msgs[n++] = (eng_chat_msg){.role = "system", .content = system};
        msgs[n++] = (eng_chat_msg){.role = "user", .content = prompt};
        if (eng_chat_apply(eng_chat_detect(tmpl), tmpl, msgs, n, true, &text, err, sizeof err)) {
            fprintf(stderr, "kvserve generate: chat template: %s\n", err);
            return -1;
        }
        special = true;
    }
    const char *src = text ? text : prompt;
    size_t len = strlen(src);
    int cap = (int)len + 8;
    int32_t *ids = malloc((size_t)cap * sizeof *ids);
    int n = ids ? eng_tokenize(m->tok, src, len, !chat && eng_tokenizer_add_bos(m->tok), special, ids, cap,
                               err, sizeof err) : -1;
    if (verbose && n >= 0 && n <= cap) {
        fprintf(stderr, "[prompt text]\n%s\n[prompt ids]", src);
        for (int i = 0; i < n; i++)
            fprintf(stderr, " %d", ids[i]);
        fprintf(stderr, "\n");
    }
    free(text);
    if (n < 0 || n > cap) {
        fprintf(stderr, "kvserve generate: cannot tokenize the prompt: %s\n", n < 0 ? err : "too many tokens");
        free(ids);
        return -1;
    }
    *out = ids;
    return n;
}

int cmd_generate(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *system = NULL, *backend = NULL;
    int device = 0;
    bool chat = false, ignore_eos = false, verbose = false;
    int max_tokens = 256, threads = 0;
    eng_sampling_params sp;
    eng_sampling_params_default(&sp);
    sp.seed = 0;
    const cli_flag flags[] = {
        {"--model", CLI_STR, &model, "GGUF file or Hugging Face directory"},
        {"--prompt", CLI_STR, &prompt, "prompt text"},
        {"--chat", CLI_BOOL, &chat, "apply the model's chat template"},
        {"--system", CLI_STR, &system, "system message (with --chat)"},
        {"--max-tokens", CLI_INT, &max_tokens, "tokens to generate at most (default 256)"},
        {"--temperature", CLI_FLOAT, &sp.temperature, "0 = greedy (default 1)"},
        {"--top-p", CLI_FLOAT, &sp.top_p, "nucleus sampling (default 1 = off)"},
        {"--top-k", CLI_INT, &sp.top_k, "top-k sampling (default 0 = off)"},
        {"--min-p", CLI_FLOAT, &sp.min_p, "min-p sampling (default 0 = off)"},
        {"--repetition-penalty", CLI_FLOAT, &sp.repetition_penalty, "default 1 = off"},
        {"--presence-penalty", CLI_FLOAT, &sp.presence_penalty, "default 0 = off"},
        {"--frequency-penalty", CLI_FLOAT, &sp.frequency_penalty, "default 0 = off"},
        {"--seed", CLI_U64, &sp.seed, "random seed (default 0)"},
        {"--ignore-eos", CLI_BOOL, &ignore_eos, "keep going past end-of-generation tokens"},
        {"--threads", CLI_INT, &threads, "compute threads (default: all cores)"},
        {"--backend", CLI_STR, &backend, "cpu (default) or cuda (builds made with make CUDA=1)"},
        {"--device", CLI_INT, &device, "cuda: the GPU's index (default 0)"},
        {"--verbose", CLI_BOOL, &verbose, "print the prompt text and token ids to stderr"},
        {NULL, 0, NULL, NULL},
    };
    int rc = cli_parse("generate", usage, flags, argc, argv);
    if (rc)
        return rc > 0 ? 0 : 2;
    if (!model || !prompt) {
        fprintf(stderr, "kvserve generate: --model and --prompt are required (see --help)\n");
        return 2;
    }
    if (cli_check_min("generate", flags, "--max-tokens", 0))
        return 2;
    const char *bad = eng_sampling_params_check(&sp);
    if (bad) {
        fprintf(stderr, "kvserve generate: %s\n", bad);
        return 2;
    }
    cli_runtime rt;
    if (cli_runtime_load(&rt, model))
        return 1;
    int32_t *ids = NULL;
    int n_prompt = prompt_tokens(rt.model, prompt, system, chat, verbose, &ids);
    if (n_prompt < 0) {
        cli_runtime_close(&rt);
        return 1;
    }
    int n_ctx = n_prompt + max_tokens;
    if (n_ctx > rt.model->cfg.n_ctx_train) {
        fprintf(stderr, "kvserve generate: prompt (%d tokens) + max tokens (%d) exceeds the model's context (%d)\n",
                n_prompt, max_tokens, rt.model->cfg.n_ctx_train);
        free(ids);
        cli_runtime_close(&rt);
        return 1;
    }
    cli_runtime_opts ro = {.threads = threads, .ctx_tokens = n_ctx, .n_seqs = 1, .backend = backend, .device = device};
    if (cli_runtime_start(&rt, &ro)) {
        free(ids);
        cli_runtime_close(&rt);
        return 1;
    }
    const eng_model *m = rt.model;
    const int n_vocab = m->cfg.n_vocab;
    float *logits = malloc((size_t)n_vocab * sizeof(float));
    eng_sampler *smp = eng_sampler_create(&sp, n_vocab);
    int32_t *all = realloc(ids, (size_t)(n_ctx + 1) * sizeof *all);
    kvc_seq seq = {0};
    char err[512];
    rc = 0;
    if (!logits || !smp || !all) {
        fprintf(stderr, "kvserve generate: out of memory\n");
        rc = 1;
        goto done;
    }
    ids = all;
    if (kvc_seq_reserve(rt.pool, &seq, n_ctx) != KVC_OK) {
        fprintf(stderr, "kvserve generate: KV cache too small for %d tokens\n", n_ctx);
        rc = 1;
        goto done;
    }
    for (int i = 0; i < n_prompt; i++)
        eng_sampler_accept(smp, ids[i], false);

    double t0 = cli_now();
    for (int p = 0; p < n_prompt; p += PREFILL_CHUNK) {
        int n = n_prompt - p < PREFILL_CHUNK ? n_prompt - p : PREFILL_CHUNK;
        eng_segment s = {.seq = &seq, .pos0 = p, .n_tokens = n, .tokens = ids + p, .want_logits = p + n == n_prompt};
        eng_batch b = {.n_segs = 1, .segs = &s};
        if (eng_forward(rt.backend, &b, logits, err, sizeof err)) {
            fprintf(stderr, "kvserve generate: %s\n", err);
            rc = 1;
            goto done;
        }
    }
    double t1 = cli_now();
    eng_detok dt;
    eng_detok_init(&dt);
    char text[512];
    int n_gen = 0;
    while (n_gen < max_tokens) {
        int32_t id = eng_sampler_sample(smp, logits, NULL);
        if (!ignore_eos && eng_tokenizer_is_eog(m->tok, id))
            break;
        eng_sampler_accept(smp, id, true);
        int len = eng_detok_push(&dt, m->tok, id, text, sizeof text);
        fwrite(text, 1, (size_t)len, stdout);
        fflush(stdout);
        ids[n_prompt + n_gen++] = id;
        if (n_gen == max_tokens)
            break;
        eng_segment s = {.seq = &seq, .pos0 = n_prompt + n_gen - 1, .n_tokens = 1,
                         .tokens = &ids[n_prompt + n_gen - 1], .want_logits = true};
        eng_batch b = {.n_segs = 1, .segs = &s};
        if (eng_forward(rt.backend, &b, logits, err, sizeof err)) {
            fprintf(stderr, "\nkvserve generate: %s\n", err);
            rc = 1;
            goto done;
        }
    }
    int len = eng_detok_flush(&dt, text, sizeof text);
    fwrite(text, 1, (size_t)len, stdout);
    printf("\n");
    double t2 = cli_now();
    fprintf(stderr, "[prompt %d tokens in %.3f s (%.1f tok/s); generated %d tokens in %.3f s (%.1f tok/s)]\n",
            n_prompt, t1 - t0, n_prompt / (t1 - t0 + 1e-12), n_gen, t2 - t1, n_gen / (t2 - t1 + 1e-12));
done:
    kvc_seq_release(rt.pool, &seq);
    eng_sampler_free(smp);
    free(logits);
    free(ids);
    cli_runtime_close(&rt);
    return rc;
}
