/* cmd_serve.c: `kvserve serve`: builds the daemon's configuration from the
 * defaults, a deployment profile and flags (in that order of precedence, all
 * through the one table of api/profile.h), checks what can be checked before
 * listening, and runs the daemon. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api/profile.h"
#include "engine/backend.h"
#include "server/server.h"

#define DEFAULT_MODEL_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"

int srv_profile_dirs(const char **dirs, int cap) {
    static char env_dir[1024], exe_dir[1024], exe_up[1024];
    int n = 0;
    const char *env = getenv("KVSERVE_PROFILES");
    if (env && *env && n < cap) {
        snprintf(env_dir, sizeof env_dir, "%s", env);
        dirs[n++] = env_dir;
    }
    if (n < cap)
        dirs[n++] = "deploy/profiles";
    char exe[900];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash)
            *slash = 0;
        snprintf(exe_dir, sizeof exe_dir, "%s/deploy/profiles", exe);
        snprintf(exe_up, sizeof exe_up, "%s/../deploy/profiles", exe);
        if (n < cap)
            dirs[n++] = exe_dir;
        if (n < cap)
            dirs[n++] = exe_up;
    }
    return n;
}

int srv_config_load_profile(api_config *c, const char *name_or_path, char *path, size_t pathlen, char *err,
                            size_t errlen) {
    const char *dirs[8];
    int n = srv_profile_dirs(dirs, 8);
    if (api_profile_find(name_or_path, dirs, n, path, pathlen, err, errlen))
        return -1;
    return api_config_load_file(c, path, err, errlen);
}

static const char *type_word(api_cfg_type t) {
    switch (t) {
    case API_CFG_STR: return "S";
    case API_CFG_INT: return "N";
    case API_CFG_FLOAT: return "X";
    case API_CFG_SIZE: return "BYTES";
    case API_CFG_DEVICES: return "IDS";
    }
    return "";
}

void srv_print_fields(FILE *f) {
    int n;
    const api_cfg_field *fields = api_cfg_fields(&n);
    api_config d;
    api_config_init(&d);
    const char *group = "";
    for (int i = 0; i < n; i++) {
        const api_cfg_field *fd = &fields[i];
        if (strcmp(group, fd->group))
            fprintf(f, "\n  [%s]\n", group = fd->group);
        char flag[64], def[64], bounds[96] = "";
        snprintf(flag, sizeof flag, "--%s %s", fd->name, type_word(fd->type));
        for (char *p = flag + 2; *p && *p != ' '; p++)
            if (*p == '_')
                *p = '-';
        api_config_format(&d, fd, def, sizeof def);
        if (fd->choices)
            snprintf(bounds, sizeof bounds, " {%s}", fd->choices);
        else if (fd->type == API_CFG_INT || fd->type == API_CFG_DEVICES)
            snprintf(bounds, sizeof bounds, " [%.0f, %.0f]", fd->min, fd->max);
        else if (fd->type == API_CFG_FLOAT)
            snprintf(bounds, sizeof bounds, " [%g, %g]", fd->min, fd->max);
        else if (fd->type == API_CFG_SIZE)
            snprintf(bounds, sizeof bounds, " [%.0fK, %.0fM]", fd->min / 1024, fd->max / 1048576);
        fprintf(f, "  %-30s %s (default %s)%s\n", flag, fd->help, def[0] ? def : "none", bounds);
    }
    api_config_free(&d);
}

static void usage(void) {
    printf("usage: kvserve serve [--model PATH] [--profile NAME|FILE] [--host H] [--port N] [--api-key KEY] [flags]\n\n"
           "The OpenAI-compatible daemon. Settings come from the defaults, then the profile\n"
           "(deploy/profiles/NAME.json; see kvserve profiles), then flags. Every profile field\n"
           "is a flag (max_seqs: --max-seqs). It listens at once; GET /health answers 503\n"
           "\"loading\" until the model is ready. SIGTERM or SIGINT drains and exits 0.\n\nFlags:\n"
           "  %-30s %s\n", "--profile NAME|FILE", "deployment profile (a name in deploy/profiles, or a path)");
    srv_print_fields(stdout);
    printf("  %-30s %s\n", "--help", "show this help");
}

/* Splits "--name=value" / "--name value"; returns the field or NULL. */
static int flag_value(int argc, char **argv, int *i, const char **name, char *namebuf, size_t n, const char **value) {
    const char *a = argv[*i];
    const char *eq = strchr(a, '=');
    size_t len = eq ? (size_t)(eq - a) : strlen(a);
    snprintf(namebuf, n, "%.*s", (int)len, a);
    *name = namebuf;
    if (eq) {
        *value = eq + 1;
        return 0;
    }
    if (*i + 1 >= argc)
        return -1;
    *value = argv[++*i];
    return 0;
}

int cmd_serve(int argc, char **argv) {
    api_config cfg;
    api_config_init(&cfg);
    char err[1024], path[1100] = "";
    const char *profile = NULL;
    int rc = 2;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage();
            api_config_free(&cfg);
            return 0;
        }
        if (!strncmp(argv[i], "--profile", 9) && (argv[i][9] == 0 || argv[i][9] == '=')) {
            char nb[64];
            const char *nm;
            if (flag_value(argc, argv, &i, &nm, nb, sizeof nb, &profile)) {
                fprintf(stderr, "kvserve serve: --profile needs a value\n");
                goto out;
            }
        }
    }
    const char *env_model = getenv("KVSERVE_MODEL"), *env_key = getenv("KVSERVE_API_KEY");
    if (env_model && *env_model)
        api_config_set(&cfg, api_cfg_find("model"), env_model, "KVSERVE_MODEL", err, sizeof err);
    if (env_key && *env_key)
        api_config_set(&cfg, api_cfg_find("api_key"), env_key, "KVSERVE_API_KEY", err, sizeof err);
    if (profile && srv_config_load_profile(&cfg, profile, path, sizeof path, err, sizeof err)) {
        fprintf(stderr, "kvserve serve: %s\n", err);
        goto out;
    }
    for (int i = 1; i < argc; i++) {
        const char *name, *value;
        char nb[64];
        if (strncmp(argv[i], "--", 2)) {
            fprintf(stderr, "kvserve serve: unexpected argument '%s' (see kvserve serve --help)\n", argv[i]);
            goto out;
        }
        if (flag_value(argc, argv, &i, &name, nb, sizeof nb, &value)) {
            fprintf(stderr, "kvserve serve: %s needs a value\n", argv[i]);
            goto out;
        }
        if (!strcmp(name, "--profile"))
            continue;
        const api_cfg_field *f = api_cfg_find(name + 2);
        if (!f) {
            fprintf(stderr, "kvserve serve: unknown flag '%s' (see kvserve serve --help)\n", name);
            goto out;
        }
        if (api_config_set(&cfg, f, value, name, err, sizeof err)) {
            fprintf(stderr, "kvserve serve: %s\n", err);
            goto out;
        }
    }
    if (!cfg.model) {
        const char *home = getenv("HOME");
        char def[1024];
        snprintf(def, sizeof def, "%s/.cache/kvserve/" DEFAULT_MODEL_FILE, home ? home : ".");
        api_config_set(&cfg, api_cfg_find("model"), def, "default", err, sizeof err);
    }
    if (access(cfg.model, R_OK)) {
        fprintf(stderr, "kvserve serve: model %s: %s (give --model PATH, or run make model)\n", cfg.model,
                strerror(errno));
        goto out;
    }
    if (!strcmp(cfg.backend, "cuda") && !eng_backend_has_cuda()) {
        fprintf(stderr,
                "kvserve serve: %s%s%sbackend \"cuda\", but this kvserve was built without CUDA (build it with "
                "make CUDA=1 on a machine with nvcc).\n"
                "The CPU is one flag away: add --backend cpu (and a --kv-memory that fits this machine).\n",
                profile ? "profile " : "", profile ? path : "", profile ? " sets " : "");
        goto out;
    }
    if (!strcmp(cfg.backend, "cuda") && cfg.devices && strchr(cfg.devices, ','))
        /* one engine, one GPU: the model's layers are not split across devices */
        fprintf(stderr,
                "kvserve serve: %s%s%sdevices %s: the cuda backend runs on one GPU, device %d (run one "
                "daemon per GPU to use the others)\n",
                profile ? "profile " : "", profile ? path : "", profile ? " sets " : "", cfg.devices,
                atoi(cfg.devices));
    char pname[sizeof path] = "";
    if (profile) {
        const char *base = strrchr(path, '/');
        snprintf(pname, sizeof pname, "%s", base ? base + 1 : path);
        size_t n = strlen(pname);
        if (n > 5 && !strcmp(pname + n - 5, ".json"))
            pname[n - 5] = 0;
    }
    rc = srv_serve(&cfg, profile ? pname : NULL);
out:
    api_config_free(&cfg);
    return rc;
}
