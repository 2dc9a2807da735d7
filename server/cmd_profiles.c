/* cmd_profiles.c: `kvserve profiles`: the deployment profiles and what each
 * sets (fields that differ from the defaults), one profile in full, or the
 * configuration table itself. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api/profile.h"
#include "server/server.h"

static void print_profile(const char *name, const api_config *c, bool all) {
    int n;
    const api_cfg_field *fields = api_cfg_fields(&n);
    printf("%s%s%s\n", name, c->description ? ": " : "", c->description ? c->description : "");
    for (int i = 0; i < n; i++) {
        if (!strcmp(fields[i].name, "description") || (!all && api_config_is_default(c, &fields[i])))
            continue;
        char v[512];
        api_config_format(c, &fields[i], v, sizeof v);
        printf("    %-20s %s\n", fields[i].name, v[0] ? v : "(none)");
    }
}

static int by_name(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Every *.json of the first profile directory that has any. */
static int list_profiles(void) {
    const char *dirs[8];
    int nd = srv_profile_dirs(dirs, 8), rc = 0;
    for (int d = 0; d < nd; d++) {
        DIR *dir = opendir(dirs[d]);
        if (!dir)
            continue;
        char *names[256];
        int n = 0;
        struct dirent *de;
        while ((de = readdir(dir)) && n < 256) {
            size_t len = strlen(de->d_name);
            if (len > 5 && !strcmp(de->d_name + len - 5, ".json"))
                names[n++] = strdup(de->d_name);
        }
        closedir(dir);
        if (!n)
            continue;
        qsort(names, (size_t)n, sizeof *names, by_name);
        printf("Deployment profiles in %s (kvserve serve --profile NAME; fields that differ from the defaults):\n\n",
               dirs[d]);
        for (int i = 0; i < n; i++) {
            char path[1400], err[1024];
            snprintf(path, sizeof path, "%s/%s", dirs[d], names[i]);
            names[i][strlen(names[i]) - 5] = 0;
            api_config c;
            api_config_init(&c);
            if (api_config_load_file(&c, path, err, sizeof err)) {
                printf("%s: INVALID: %s\n", names[i], err);
                rc = 1;
            } else {
                print_profile(names[i], &c, false);
            }
            printf("\n");
            api_config_free(&c);
            free(names[i]);
        }
        printf("Every field is also a flag of kvserve serve; kvserve profiles --fields lists them.\n");
        return rc;
    }
    fprintf(stderr, "kvserve profiles: no profile directory found (looked in");
    for (int d = 0; d < nd; d++)
        fprintf(stderr, " %s", dirs[d]);
    fprintf(stderr, ")\n");
    return 1;
}

int cmd_profiles(int argc, char **argv) {
    if (argc < 2)
        return list_profiles();
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        printf("usage: kvserve profiles [NAME|FILE] [--fields]\n\n"
               "  (no argument)   each profile in deploy/profiles and the fields it sets\n"
               "  NAME|FILE       one profile with every field, defaults included (validates it)\n"
               "  --fields        the configuration table: fields, defaults, bounds\n");
        return 0;
    }
    if (!strcmp(argv[1], "--fields")) {
        printf("Configuration fields (profile key = flag without the dashes, '-' read as '_'):\n");
        srv_print_fields(stdout);
        return 0;
    }
    if (argv[1][0] == '-' || argc > 2) {
        fprintf(stderr, "kvserve profiles: unexpected argument '%s' (see kvserve profiles --help)\n",
                argv[1][0] == '-' ? argv[1] : argv[2]);
        return 2;
    }
    api_config c;
    api_config_init(&c);
    char path[1100], err[1024];
    int rc = srv_config_load_profile(&c, argv[1], path, sizeof path, err, sizeof err);
    if (rc)
        fprintf(stderr, "kvserve profiles: %s\n", err);
    else
        print_profile(path, &c, true);
    api_config_free(&c);
    return rc ? 1 : 0;
}
