/* cli.h: what the offline subcommands (generate, tokenize, ppl, bench) share:
 * a table-driven flag parser and the runtime they stand on (model, KV pool,
 * backend). */
#ifndef SRV_CLI_H
#define SRV_CLI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cache/kvcache.h"
#include "engine/backend.h"
#include "engine/model.h"

typedef enum { CLI_STR, CLI_INT, CLI_FLOAT, CLI_U64, CLI_BOOL, CLI_SIZE } cli_type;

typedef struct {
    const char *name;   /* "--max-tokens" */
    cli_type type;
    void *value;        /* char ** / int * / float * / uint64_t * / bool * / size_t * */
    const char *help;
} cli_flag;

/* Parses argv[1..] against flags (terminated by a {NULL} entry). --help prints
 * usage and returns 1; an unknown flag, a missing or malformed value prints an
 * error naming the flag and returns -1; success returns 0. Sizes accept K, M,
 * G suffixes (binary). */
int cli_parse(const char *cmd, const char *usage, const cli_flag *flags, int argc, char **argv);

/* After cli_parse: each CLI_INT flag named in `names` (space-separated) must
 * hold at least `min`. Prints "kvserve CMD: --flag V: must be >= MIN" for
 * the first that does not and returns -1 (also for a name that is not an
 * integer flag of the table); else 0. */
int cli_check_min(const char *cmd, const cli_flag *flags, const char *names, int min);

/* Everything a subcommand needs to run the model. */
typedef struct {
    eng_model *model;
    kvc_pool *pool;
    eng_backend *backend;
} cli_runtime;

typedef struct {
    int threads;             /* <= 0: all cores */
    int ctx_tokens;          /* longest sequence to hold */
    int n_seqs;              /* sequences held at once */
    const char *kv_k, *kv_v; /* codec specs (NULL: f32) */
    const char *calib;       /* calibration file for pca codecs, or NULL */
    int block_size;
    size_t kv_memory;        /* 0: sized for n_seqs x ctx_tokens */
    bool absorb;             /* fold the K/V projections into the codecs' bases (eng_backend_options) */
    const char *backend;     /* "cpu" (NULL) or "cuda" */
    int device;              /* cuda: the GPU's index */
} cli_runtime_opts;

/* Loads the model (rt zeroed first); prints the error naming the file on
 * failure and returns -1. */
int cli_runtime_load(cli_runtime *rt, const char *model_path);
/* Sets up the KV pool and the backend (o->backend) for the loaded model. */
int cli_runtime_start(cli_runtime *rt, const cli_runtime_opts *o);
void cli_runtime_close(cli_runtime *rt);

/* Reads a whole file into a NUL-terminated malloc'd buffer; NULL with a
 * message on stderr. */
char *cli_read_file(const char *path, size_t *len);

double cli_now(void);  /* monotonic seconds */

int cmd_generate(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_ppl(int argc, char **argv);
int cmd_bench(int argc, char **argv);

#endif
