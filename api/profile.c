/* profile.c: the configuration table of `kvserve serve` and the readers of
 * profiles and flags built on it (see profile.h). */
#include "api/profile.h"

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define OFF(m) offsetof(api_config, m)
#define GiB 1073741824.0

static const api_cfg_field fields[] = {
    {"model", API_CFG_STR, OFF(model), "", 0, 0, NULL, "model",
     "GGUF file or Hugging Face directory (unset: $KVSERVE_MODEL, else the SmolLM2 download)"},
    {"backend", API_CFG_STR, OFF(backend), "cpu", 0, 0, "cpu|cuda", "model", "compute backend"},
    {"devices", API_CFG_DEVICES, OFF(devices), "", 0, 63, NULL, "model",
     "GPU ids to use (cuda; \"0,1\" as a flag)"},
    {"threads", API_CFG_INT, OFF(threads), "0", 0, 1024, NULL, "model", "compute threads (0: all cores)"},
    {"n_ctx", API_CFG_INT, OFF(n_ctx), "0", 0, 1 << 22, NULL, "model",
     "context per sequence, prompt + output (0: the model's)"},
    {"kv_memory", API_CFG_SIZE, OFF(kv_memory), "256M", 1 << 20, 1024 * GiB, NULL, "kv", "bytes of KV cache arena"},
    {"block_size", API_CFG_INT, OFF(block_size), "16", 1, 1024, NULL, "kv", "tokens per KV page"},
    {"kv_k", API_CFG_STR, OFF(kv_k), "f16", 0, 0, NULL, "kv", "codec spec for keys (f32, f16, int8, ...)"},
    {"kv_v", API_CFG_STR, OFF(kv_v), "f16", 0, 0, NULL, "kv", "codec spec for values"},
    {"calib", API_CFG_STR, OFF(calib), "", 0, 0, NULL, "kv", "calibration file for pca bases"},
    {"max_batched_tokens", API_CFG_INT, OFF(max_batched_tokens), "2048", 1, 1 << 20, NULL, "scheduler",
     "tokens per engine step, all sequences together"},
    {"max_seqs", API_CFG_INT, OFF(max_seqs), "64", 1, 4096, NULL, "scheduler", "running sequences at most"},
    {"prefill_chunk", API_CFG_INT, OFF(prefill_chunk), "512", 1, 1 << 20, NULL, "scheduler",
     "prompt tokens of one sequence per step at most"},
    {"max_waiting", API_CFG_INT, OFF(max_waiting), "256", 1, 1 << 20, NULL, "scheduler",
     "waiting requests at most; beyond it: 503 overloaded"},
    {"watermark", API_CFG_FLOAT, OFF(watermark), "0.01", 0, 0.5, NULL, "scheduler",
     "fraction of pages kept free at admission for decode"},
    {"host", API_CFG_STR, OFF(host), "127.0.0.1", 0, 0, NULL, "server", "address to listen on"},
    {"port", API_CFG_INT, OFF(port), "8080", 0, 65535, NULL, "server", "TCP port (0: any free port)"},
    {"api_key", API_CFG_STR, OFF(api_key), "", 0, 0, NULL, "server",
     "require 'Authorization: Bearer KEY' on /v1 and tokenizer endpoints (unset: $KVSERVE_API_KEY)"},
    {"served_model_name", API_CFG_STR, OFF(served_model_name), "", 0, 0, NULL, "server",
     "model id in the API (unset: the model file's name)"},
    {"max_header_bytes", API_CFG_SIZE, OFF(max_header_bytes), "16K", 1024, 1 << 20, NULL, "server",
     "request line + headers at most (431 beyond)"},
    {"max_body_bytes", API_CFG_SIZE, OFF(max_body_bytes), "8M", 1024, GiB, NULL, "server",
     "request body at most (413 beyond)"},
    {"max_connections", API_CFG_INT, OFF(max_connections), "1024", 1, 1 << 20, NULL, "server",
     "open connections at most (503 beyond)"},
    {"idle_timeout", API_CFG_FLOAT, OFF(idle_timeout), "60", 0.1, 86400, NULL, "server",
     "seconds a keep-alive connection may idle, and to send a whole request"},
    {"request_timeout", API_CFG_FLOAT, OFF(request_timeout), "600", 0.1, 86400, NULL, "server",
     "seconds a request may take from arrival to its last byte (504 beyond)"},
    {"shutdown_grace", API_CFG_FLOAT, OFF(shutdown_grace), "30", 0, 86400, NULL, "server",
     "seconds in-flight requests get to finish after SIGTERM/SIGINT"},
    {"description", API_CFG_STR, OFF(description), "", 0, 0, NULL, "doc", "what the profile is for"},
};
#define N_FIELDS ((int)(sizeof fields / sizeof fields[0]))

const api_cfg_field *api_cfg_fields(int *n) {
    *n = N_FIELDS;
    return fields;
}

static bool same_name(const char *a, const char *b) {
    for (; *a && *b; a++, b++) {
        char x = *a == '-' ? '_' : *a, y = *b == '-' ? '_' : *b;
        if (x != y)
            return false;
    }
    return *a == *b;
}

const api_cfg_field *api_cfg_find(const char *name) {
    for (int i = 0; i < N_FIELDS; i++)
        if (same_name(fields[i].name, name))
            return &fields[i];
    return NULL;
}

#define MEMBER(c, f, T) ((T *)((char *)(c) + (f)->offset))

/* ---- text values --------------------------------------------------------- */

static int parse_size(const char *s, size_t *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !(v >= 0) || !isfinite(v))
        return -1;
    double mul = 1;
    switch (*end) {
    case 'K': case 'k': mul = 1024.0; end++; break;
    case 'M': case 'm': mul = 1024.0 * 1024; end++; break;
    case 'G': case 'g': mul = GiB; end++; break;
    case 'T': case 't': mul = GiB * 1024; end++; break;
    default: break;
    }
    if (mul > 1 && *end == 'i')
        end++;
    if (*end == 'B')
        end++;
    if (*end || v * mul > 1e18)
        return -1;
    *out = (size_t)(v * mul);
    return 0;
}

/* "0,1,3" with ids within [min, max], normalized. */
static int parse_devices(const char *s, const api_cfg_field *f, char *norm, size_t n) {
    size_t at = 0;
    norm[0] = 0;
    while (*s) {
        char *end;
        errno = 0;
        long v = strtol(s, &end, 10);
        if (errno || end == s || v < f->min || v > f->max || (*end && *end != ','))
            return -1;
        int w = snprintf(norm + at, n - at, "%s%ld", at ? "," : "", v);
        if (w < 0 || (size_t)w >= n - at)
            return -1;
        at += (size_t)w;
        s = *end ? end + 1 : end;
    }
    return 0;
}

static void set_str(char **slot, const char *v) {
    free(*slot);
    *slot = v && *v ? strdup(v) : NULL;
}

static int invalid(const api_cfg_field *f, const char *origin, const char *found, char *err, size_t errlen) {
    switch (f->type) {
    case API_CFG_INT:
        snprintf(err, errlen, "%s: field '%s': must be an integer in [%.0f, %.0f], found %s", origin, f->name, f->min,
                 f->max, found);
        break;
    case API_CFG_FLOAT:
        snprintf(err, errlen, "%s: field '%s': must be a number in [%g, %g], found %s", origin, f->name, f->min,
                 f->max, found);
        break;
    case API_CFG_SIZE:
        snprintf(err, errlen, "%s: field '%s': must be a size in bytes (e.g. 256M, 2G) in [%.0f, %.0f], found %s",
                 origin, f->name, f->min, f->max, found);
        break;
    case API_CFG_DEVICES:
        snprintf(err, errlen, "%s: field '%s': must be a list of device ids in [%.0f, %.0f], found %s", origin,
                 f->name, f->min, f->max, found);
        break;
    case API_CFG_STR:
        if (f->choices)
            snprintf(err, errlen, "%s: field '%s': must be one of %s, found %s", origin, f->name, f->choices, found);
        else
            snprintf(err, errlen, "%s: field '%s': must be a %sstring, found %s", origin, f->name,
                     f->def[0] ? "non-empty " : "", found);
        break;
    }
    return -1;
}

static bool in_choices(const char *choices, const char *v) {
    size_t n = strlen(v);
    for (const char *p = choices; p && *p;) {
        const char *bar = strchr(p, '|');
        size_t len = bar ? (size_t)(bar - p) : strlen(p);
        if (len == n && !memcmp(p, v, n))
            return true;
        p = bar ? bar + 1 : p + len;
    }
    return false;
}

int api_config_set(api_config *c, const api_cfg_field *f, const char *value, const char *origin, char *err,
                   size_t errlen) {
    char quoted[96];
    snprintf(quoted, sizeof quoted, "\"%.80s\"", value);
    switch (f->type) {
    case API_CFG_STR:
        if ((f->choices && !in_choices(f->choices, value)) || (f->def[0] && !value[0]))
            return invalid(f, origin, quoted, err, errlen);
        set_str(MEMBER(c, f, char *), value);
        return 0;
    case API_CFG_INT: {
        char *end;
        errno = 0;
        long long v = strtoll(value, &end, 10);
        if (errno || end == value || *end || v < f->min || v > f->max)
            return invalid(f, origin, quoted, err, errlen);
        *MEMBER(c, f, int) = (int)v;
        return 0;
    }
    case API_CFG_FLOAT: {
        char *end;
        errno = 0;
        double v = strtod(value, &end);
        if (errno || end == value || *end || !(v >= f->min && v <= f->max))
            return invalid(f, origin, quoted, err, errlen);
        *MEMBER(c, f, double) = v;
        return 0;
    }
    case API_CFG_SIZE: {
        size_t v;
        if (parse_size(value, &v) || v < f->min || v > f->max)
            return invalid(f, origin, quoted, err, errlen);
        *MEMBER(c, f, size_t) = v;
        return 0;
    }
    case API_CFG_DEVICES: {
        char norm[256];
        if (parse_devices(value, f, norm, sizeof norm))
            return invalid(f, origin, quoted, err, errlen);
        set_str(MEMBER(c, f, char *), norm);
        return 0;
    }
    }
    abort();
}

/* ---- JSON values --------------------------------------------------------- */

int api_config_set_json(api_config *c, const api_cfg_field *f, const json_t *v, const char *origin, char *err,
                        size_t errlen) {
    char found[96];
    if (json_is_string(v))
        snprintf(found, sizeof found, "\"%.80s\"", json_string_value(v));
    else if (json_is_number(v))
        snprintf(found, sizeof found, "%.17g", json_number_value(v));
    else
        snprintf(found, sizeof found, "%s", json_is_boolean(v) ? (json_is_true(v) ? "true" : "false")
                                            : json_is_null(v) ? "null" : json_is_array(v) ? "an array" : "an object");
    char text[256];
    switch (f->type) {
    case API_CFG_STR:
        if (json_is_null(v) && !f->choices && !f->def[0]) {  /* optional string: null = unset */
            set_str(MEMBER(c, f, char *), NULL);
            return 0;
        }
        if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v))
            return invalid(f, origin, found, err, errlen);
        return api_config_set(c, f, json_string_value(v), origin, err, errlen);
    case API_CFG_INT:
        if (!json_is_integer(v))
            return invalid(f, origin, found, err, errlen);
        snprintf(text, sizeof text, "%lld", (long long)json_integer_value(v));
        break;
    case API_CFG_FLOAT:
        if (!json_is_number(v))
            return invalid(f, origin, found, err, errlen);
        snprintf(text, sizeof text, "%.17g", json_number_value(v));
        break;
    case API_CFG_SIZE:
        if (json_is_integer(v))
            snprintf(text, sizeof text, "%lld", (long long)json_integer_value(v));
        else if (json_is_string(v) && strlen(json_string_value(v)) < sizeof text)
            snprintf(text, sizeof text, "%s", json_string_value(v));
        else
            return invalid(f, origin, found, err, errlen);
        break;
    case API_CFG_DEVICES: {
        if (!json_is_array(v))
            return invalid(f, origin, found, err, errlen);
        size_t at = 0;
        text[0] = 0;
        for (size_t i = 0; i < json_array_size(v); i++) {
            const json_t *x = json_array_get(v, i);
            if (!json_is_integer(x) || at + 24 > sizeof text)
                return invalid(f, origin, "an array with a non-integer or too many entries", err, errlen);
            at += (size_t)snprintf(text + at, sizeof text - at, "%s%lld", i ? "," : "",
                                   (long long)json_integer_value(x));
        }
        break;
    }
    }
    /* the text form carries the bounds checks; the message shows the JSON value */
    if (api_config_set(c, f, text, origin, err, errlen))
        return invalid(f, origin, found, err, errlen);
    return 0;
}

int api_config_load_file(api_config *c, const char *path, char *err, size_t errlen) {
    json_error_t je;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    if (!root) {
        snprintf(err, errlen, "%s: %s (line %d, column %d)", path, je.text, je.line, je.column);
        return -1;
    }
    int rc = 0;
    if (!json_is_object(root)) {
        snprintf(err, errlen, "%s: a profile must be a JSON object of fields", path);
        rc = -1;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (rc)
            break;
        const api_cfg_field *f = api_cfg_find(key);
        if (!f || strcmp(f->name, key)) {
            snprintf(err, errlen, "%s: unknown field '%.64s' (see kvserve profiles --fields)", path, key);
            rc = -1;
        } else {
            rc = api_config_set_json(c, f, v, path, err, errlen);
        }
    }
    json_decref(root);
    return rc;
}

/* ---- defaults and display ------------------------------------------------ */

void api_config_init(api_config *c) {
    memset(c, 0, sizeof *c);
    char err[256];
    for (int i = 0; i < N_FIELDS; i++)
        if (fields[i].def[0] && api_config_set(c, &fields[i], fields[i].def, "default", err, sizeof err))
            abort();  /* a default outside its own bounds: a broken table */
}

void api_config_free(api_config *c) {
    for (int i = 0; i < N_FIELDS; i++)
        if (fields[i].type == API_CFG_STR || fields[i].type == API_CFG_DEVICES)
            free(*MEMBER(c, &fields[i], char *));
    memset(c, 0, sizeof *c);
}

static void format_size(size_t v, char *buf, size_t n) {
    static const char units[] = "KMGT";
    int u = -1;
    size_t x = v;
    while (x && x % 1024 == 0 && u < 3) {
        x /= 1024;
        u++;
    }
    if (u < 0)
        snprintf(buf, n, "%zu", v);
    else
        snprintf(buf, n, "%zu%c", x, units[u]);
}

void api_config_format(const api_config *c, const api_cfg_field *f, char *buf, size_t n) {
    switch (f->type) {
    case API_CFG_STR:
    case API_CFG_DEVICES: {
        const char *s = *MEMBER(c, f, char *const);
        snprintf(buf, n, "%s", s ? s : "");
        return;
    }
    case API_CFG_INT: snprintf(buf, n, "%d", *MEMBER(c, f, const int)); return;
    case API_CFG_FLOAT: snprintf(buf, n, "%g", *MEMBER(c, f, const double)); return;
    case API_CFG_SIZE: format_size(*MEMBER(c, f, const size_t), buf, n); return;
    }
}

bool api_config_is_default(const api_config *c, const api_cfg_field *f) {
    api_config d;
    api_config_init(&d);
    char a[512], b[512];
    api_config_format(c, f, a, sizeof a);
    api_config_format(&d, f, b, sizeof b);
    api_config_free(&d);
    return !strcmp(a, b);
}

int api_profile_find(const char *name_or_path, const char *const *dirs, int n_dirs, char *out, size_t outlen,
                     char *err, size_t errlen) {
    size_t len = strlen(name_or_path);
    if (strchr(name_or_path, '/') || (len > 5 && !strcmp(name_or_path + len - 5, ".json"))) {
        if (access(name_or_path, R_OK)) {
            snprintf(err, errlen, "profile %s: %s", name_or_path, strerror(errno));
            return -1;
        }
        snprintf(out, outlen, "%s", name_or_path);
        return 0;
    }
    char looked[512] = "";
    size_t at = 0;
    for (int i = 0; i < n_dirs; i++) {
        if (!dirs[i])
            continue;
        snprintf(out, outlen, "%s/%s.json", dirs[i], name_or_path);
        if (!access(out, R_OK))
            return 0;
        int w = snprintf(looked + at, sizeof looked - at, "%s%s", at ? ", " : "", dirs[i]);
        if (w > 0 && (size_t)w < sizeof looked - at)
            at += (size_t)w;
    }
    snprintf(err, errlen, "no profile named '%s' (looked in %s; see kvserve profiles)", name_or_path,
             at ? looked : "no directory");
    return -1;
}
