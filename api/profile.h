/* profile.h: the daemon's configuration as one table.
 *
 * Every setting of `kvserve serve` (backend, KV cache, scheduler, server
 * limits) is a row of one table: name, type, default, bounds, help. The same
 * rows read deployment profiles (deploy/profiles/NAME.json, keys = names),
 * parse command-line flags (--name-with-dashes VALUE) and print
 * `kvserve profiles`. Precedence: defaults < profile < flags.
 *
 * An unknown or invalid field is an error naming the field and where it came
 * from (the profile's path or the flag), with what was expected and found. */
#ifndef API_PROFILE_H
#define API_PROFILE_H

#include <stdbool.h>
#include <stddef.h>

#include <jansson.h>

typedef enum {
    API_CFG_STR,        /* string; optional strings default to NULL ("" in the table) */
    API_CFG_INT,        /* integer within [min, max] */
    API_CFG_FLOAT,      /* number within [min, max] */
    API_CFG_SIZE,       /* bytes: an integer or "256M", "1.5G", "64KiB" (binary units) */
    API_CFG_DEVICES,    /* device ids: JSON array of integers, or "0,1" as a flag */
} api_cfg_type;

typedef struct {
    /* model and backend */
    char *model;                /* GGUF file or Hugging Face directory */
    char *backend;              /* "cpu" or "cuda" */
    char *devices;              /* "0,1": device ids (cuda), NULL: the first */
    /* KV cache */
    size_t kv_memory;
    int block_size;
    char *kv_k, *kv_v;          /* codec specs */
    char *calib;                /* calibration file (pca bases) or NULL */
    /* scheduler */
    int max_batched_tokens, max_seqs, prefill_chunk, max_waiting;
    double watermark;
    int n_ctx;                  /* 0: the model's */
    int threads;                /* 0: all cores */
    /* server */
    char *host;
    int port;
    char *api_key;              /* NULL: no authentication */
    char *served_model_name;    /* NULL: the model file's name */
    size_t max_header_bytes, max_body_bytes;
    int max_connections;
    double idle_timeout, request_timeout, shutdown_grace;   /* seconds */
    /* documentation */
    char *description;
} api_config;

typedef struct {
    const char *name;           /* JSON key, e.g. "max_seqs"; flag "--max-seqs" */
    api_cfg_type type;
    size_t offset;              /* of the member in api_config */
    const char *def;            /* default, as text ("" = unset) */
    double min, max;            /* bounds of INT, FLOAT and SIZE */
    const char *choices;        /* STR with a fixed set: "cpu|cuda", else NULL */
    const char *group;          /* "model", "kv", "scheduler", "server", "doc" */
    const char *help;
} api_cfg_field;

/* The table (n rows). */
const api_cfg_field *api_cfg_fields(int *n);
/* The row named `name` ('-' and '_' are the same); NULL if none. */
const api_cfg_field *api_cfg_find(const char *name);

/* Sets every field to its default. */
void api_config_init(api_config *c);
void api_config_free(api_config *c);

/* Sets f from text (a flag's value). origin names where it came from
 * ("--max-seqs", "profile.json") for the message. Returns 0 or -1. */
int api_config_set(api_config *c, const api_cfg_field *f, const char *value, const char *origin, char *err,
                   size_t errlen);
/* Sets f from a JSON value (a profile's). */
int api_config_set_json(api_config *c, const api_cfg_field *f, const json_t *v, const char *origin, char *err,
                        size_t errlen);
/* Applies a profile file: every key must be a field. On error nothing is
 * promised about c (callers stop). */
int api_config_load_file(api_config *c, const char *path, char *err, size_t errlen);

/* f's value in c as text ("256M", "0.01", "" for unset strings). */
void api_config_format(const api_config *c, const api_cfg_field *f, char *buf, size_t n);
/* Whether f's value in c differs from the default. */
bool api_config_is_default(const api_config *c, const api_cfg_field *f);

/* Resolves --profile: a value with a '/' or ending in ".json" is a path;
 * otherwise NAME.json in the first of dirs[0, n_dirs) that has it. Returns 0
 * with the path in out, or -1 naming the profile and where it looked. */
int api_profile_find(const char *name_or_path, const char *const *dirs, int n_dirs, char *out, size_t outlen,
                     char *err, size_t errlen);

#endif
