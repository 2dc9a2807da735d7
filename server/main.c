/* main.c: the kvserve binary: subcommand dispatch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache/kvcache.h"
#include "engine/matmul.h"

#include "server/cli.h"
#include "server/server.h"

int cmd_calibrate(int argc, char **argv);   /* server/cmd_calibrate.c */

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *help;
} commands[] = {
    {"serve", cmd_serve, "the OpenAI-compatible HTTP daemon"},
    {"generate", cmd_generate, "one prompt from the command line, streamed to stdout"},
    {"tokenize", cmd_tokenize, "token ids of a text with a model's tokenizer"},
    {"ppl", cmd_ppl, "perplexity of a model on a text file (the quality meter)"},
    {"calibrate", cmd_calibrate, "fits low-rank KV bases (PCA) on sample text into a calibration file"},
    {"bench", cmd_bench, "offline benchmark: prefill and decode tokens/s"},
    {"profiles", cmd_profiles, "lists the deployment profiles and what each sets"},
};

static void usage(FILE *f) {
    fprintf(f, "usage: kvserve COMMAND [flags]   (kvserve COMMAND --help for its flags)\n\ncommands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nenvironment:\n  KVSERVE_ACTIVATIONS=q16|f32|q8  how activations meet quantized weights "
               "(default q16: 16-bit, within 0.001%% of f32; f32: exact; q8: 8-bit, fastest, least exact)\n"
               "  KVSERVE_PACKED=1|0              keep a second copy of quantized weights laid out for batched steps "
               "(default 1: faster batches, about 1.2x the weights' memory; same results)\n"
               "  KVSERVE_ISA=avx512|avx2|scalar  the CPU kernels' instruction set, matmuls and attention (default: the best "
               "this CPU has; avx512 and avx2 give the same results; for comparisons)\n");
}

/* The environment every subcommand reads: KVSERVE_ACTIVATIONS (the
 * activation precision for quantized weights, engine/matmul.h),
 * KVSERVE_PACKED (the batched kernels' weight copy) and KVSERVE_ISA (the
 * matmul and attention kernel sets). */
static int apply_environment(void) {
    const char *v = getenv("KVSERVE_ACTIVATIONS");
    if (!v || !*v || !strcmp(v, "q16"))
        eng_matmul_set_activations(ENG_ACT_Q16);
    else if (!strcmp(v, "f32"))
        eng_matmul_set_activations(ENG_ACT_F32);
    else if (!strcmp(v, "q8"))
        eng_matmul_set_activations(ENG_ACT_Q8);
    else {
        fprintf(stderr, "kvserve: KVSERVE_ACTIVATIONS='%s': expected q16, f32 or q8\n", v);
        return -1;
    }
    const char *p = getenv("KVSERVE_PACKED");
    if (p && *p && strcmp(p, "0") && strcmp(p, "1")) {
        fprintf(stderr, "kvserve: KVSERVE_PACKED='%s': expected 1 or 0\n", p);
        return -1;
    }
    eng_matmul_set_packing(!p || strcmp(p, "0"));
    const char *isa = getenv("KVSERVE_ISA");
    if (isa && *isa && eng_matmul_force_isa(isa) != 0) {
        fprintf(stderr, "kvserve: KVSERVE_ISA='%s': expected avx512, avx2 or scalar, one this CPU has\n", isa);
        return -1;
    }
    if (isa && *isa)
        kvc_set_default_kernels(!strcmp(isa, "scalar") ? 1 : !strcmp(isa, "avx2") ? 2 : 0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (apply_environment())
        return 2;
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kvserve: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
