/* cli.c: flag parsing and runtime set-up shared by the offline subcommands. */
#include "server/cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void print_usage(const char *usage, const cli_flag *flags) {
    printf("%s\n\nFlags:\n", usage);
    for (const cli_flag *f = flags; f->name; f++) {
        const char *arg = f->type == CLI_BOOL ? "" : f->type == CLI_STR ? " S" : f->type == CLI_SIZE ? " BYTES"
                          : f->type == CLI_FLOAT ? " X" : " N";
        char left[48];
        snprintf(left, sizeof left, "%s%s", f->name, arg);
        printf("  %-24s %s\n", left, f->help);
    }
    printf("  %-24s %s\n", "--help", "show this help");
}

static int parse_value(const cli_flag *f, const char *s, const char *cmd) {
    char *end = NULL;
    errno = 0;
    switch (f->type) {
    case CLI_STR:
        *(const char **)f->value = s;
        return 0;
    case CLI_INT: {
        long v = strtol(s, &end, 10);
        if (errno || end == s || *end || v < -2147483647L || v > 2147483647L)
            break;
        *(int *)f->value = (int)v;
        return 0;
    }
    case CLI_U64: {
        unsigned long long v = strtoull(s, &end, 10);
        if (errno || end == s || *end || s[0] == '-')
            break;
        *(uint64_t *)f->value = v;
        return 0;
    }
    case CLI_FLOAT: {
        float v = strtof(s, &end);
        if (errno || end == s || *end || !isfinite(v))
            break;
        *(float *)f->value = v;
        return 0;
    }
    case CLI_SIZE: {
        double v = strtod(s, &end);
        if (errno || end == s || v < 0)
            break;
        double mul = 1;
        if (*end == 'K' || *end == 'k') mul = 1024.0, end++;
        else if (*end == 'M' || *end == 'm') mul = 1024.0 * 1024, end++;
        else if (*end == 'G' || *end == 'g') mul = 1024.0 * 1024 * 1024, end++;
        if (*end == 'i') end++;
        if (*end == 'B') end++;
        if (*end)
            break;
        *(size_t *)f->value = (size_t)(v * mul);
        return 0;
    }
    case CLI_BOOL:
        break;
    }
    static const char *what[] = {"a string", "an integer", "a number", "a non-negative integer", "", "a size (e.g. 256M)"};
    fprintf(stderr, "kvserve %s: %s: '%s' is not %s\n", cmd, f->name, s, what[f->type]);
    return -1;
}

int cli_parse(const char *cmd, const char *usage, const cli_flag *flags, int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            print_usage(usage, flags);
            return 1;
        }
        const char *eq = strchr(a, '=');
        size_t name_len = eq ? (size_t)(eq - a) : strlen(a);
        const cli_flag *f = flags;
        for (; f->name; f++)
            if (strlen(f->name) == name_len && !strncmp(f->name, a, name_len))
                break;
        if (!f->name) {
            fprintf(stderr, "kvserve %s: unknown flag '%s' (see kvserve %s --help)\n", cmd, a, cmd);
            return -1;
        }
        if (f->type == CLI_BOOL) {
            if (eq) {
                fprintf(stderr, "kvserve %s: %s takes no value\n", cmd, f->name);
                return -1;
            }
            *(bool *)f->value = true;
            continue;
        }
        const char *val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
        if (!val) {
            fprintf(stderr, "kvserve %s: %s needs a value\n", cmd, f->name);
            return -1;
        }
        if (parse_value(f, val, cmd))
            return -1;
    }
    return 0;
}

int cli_check_min(const char *cmd, const cli_flag *flags, const char *names, int min) {
    for (const char *n = names; *n;) {
        size_t len = strcspn(n, " ");
        const cli_flag *f = flags;
        while (f->name && (f->type != CLI_INT || strlen(f->name) != len || strncmp(f->name, n, len)))
            f++;
        if (!f->name) {  /* a misspelt name must not drop its check silently */
            fprintf(stderr, "kvserve %s: internal error: no integer flag '%.*s'\n", cmd, (int)len, n);
            return -1;
        }
        const int v = *(const int *)f->value;
        if (v < min) {
            fprintf(stderr, "kvserve %s: %s %d: must be >= %d\n", cmd, f->name, v, min);
            return -1;
        }
        n += len;
        n += strspn(n, " ");
    }
    return 0;
}

char *cli_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "kvserve: %s: %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    while (buf) {
        size_t r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (n < cap)
            break;
        cap *= 2;
        char *nb = realloc(buf, cap + 1);
        if (!nb) {
            free(buf);
            buf = NULL;
        }
        buf = nb;
    }
    int bad = ferror(f);
    fclose(f);
    if (!buf || bad) {
        fprintf(stderr, "kvserve: %s: %s\n", path, buf ? "read error" : "out of memory");
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    if (len)
        *len = n;
    return buf;
}

int cli_runtime_load(cli_runtime *rt, const char *model_path) {
    char err[512];
    memset(rt, 0, sizeof *rt);
    if (!model_path) {
        fprintf(stderr, "kvserve: --model PATH is required\n");
        return -1;
    }
    rt->model = eng_model_load(model_path, err, sizeof err);
    if (!rt->model) {
        fprintf(stderr, "kvserve: cannot load model: %s\n", err);
        return -1;
    }
    return 0;
}

int cli_runtime_start(cli_runtime *rt, const cli_runtime_opts *o) {
    char err[512];
    const eng_model_config *c = &rt->model->cfg;
    /* no codec given: exact f32 pages on the CPU, f16 (the kernels' baseline) on the GPU */
    const char *dflt = o->backend && !strcmp(o->backend, "cuda") ? "f16" : "f32";
    kvc_config kc = {
        .n_layer = c->n_layer, .n_kv_head = c->n_kv_head, .head_dim = c->head_dim,
        .block_size = o->block_size > 0 ? o->block_size : 16,
        .k_codec = o->kv_k ? o->kv_k : dflt, .v_codec = o->kv_v ? o->kv_v : dflt, .calib = o->calib,
    };
    kc.memory_bytes = o->kv_memory;
    if (!kc.memory_bytes) {
        /* size for n_seqs sequences of ctx_tokens: ask a small pool what a token costs */
        kvc_config probe = kc;
        probe.memory_bytes = (size_t)64 << 20;
        kvc_pool *p = NULL;
        if (kvc_pool_create(&probe, &p, err, sizeof err) != KVC_OK) {
            fprintf(stderr, "kvserve: KV cache: %s\n", err);
            cli_runtime_close(rt);
            return -1;
        }
        size_t bpt = kvc_bytes_per_token(p);
        kvc_pool_destroy(p);
        int pages = (o->ctx_tokens + kc.block_size - 1) / kc.block_size + 1;
        kc.memory_bytes = bpt * (size_t)kc.block_size * (size_t)pages * (size_t)(o->n_seqs > 0 ? o->n_seqs : 1);
    }
    if (kvc_pool_create(&kc, &rt->pool, err, sizeof err) != KVC_OK) {
        fprintf(stderr, "kvserve: KV cache: %s\n", err);
        cli_runtime_close(rt);
        return -1;
    }
    eng_backend_options bo = {.n_threads = o->threads, .absorb = o->absorb, .device = o->device};
    rt->backend = eng_backend_create(o->backend, rt->model, rt->pool, &bo, err, sizeof err);
    if (!rt->backend) {
        fprintf(stderr, "kvserve: %s\n", err);
        cli_runtime_close(rt);
        return -1;
    }
    return 0;
}

void cli_runtime_close(cli_runtime *rt) {
    eng_backend_destroy(rt->backend);
    if (rt->pool)
        kvc_pool_destroy(rt->pool);
    eng_model_free(rt->model);
    memset(rt, 0, sizeof *rt);
}
