/* gguf.h: reader for GGUF v2/v3 model files (the llama.cpp format).
 *
 * The file is mapped read-only; metadata is parsed and validated at open, so
 * every later accessor is a plain lookup that cannot fail on a corrupt file.
 * Tensor data stays in the mapping: eng_gguf_tensor.data points into it and is
 * valid until eng_gguf_close(). Every error message names the file and the
 * key or tensor at fault, with what was expected and what was found. */
#ifndef ENG_GGUF_H
#define ENG_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "engine/tensor.h"

typedef enum {
    ENG_GGUF_UINT8 = 0, ENG_GGUF_INT8 = 1, ENG_GGUF_UINT16 = 2, ENG_GGUF_INT16 = 3,
    ENG_GGUF_UINT32 = 4, ENG_GGUF_INT32 = 5, ENG_GGUF_FLOAT32 = 6, ENG_GGUF_BOOL = 7,
    ENG_GGUF_STRING = 8, ENG_GGUF_ARRAY = 9, ENG_GGUF_UINT64 = 10, ENG_GGUF_INT64 = 11,
    ENG_GGUF_FLOAT64 = 12
} eng_gguf_vtype;

/* A string inside the mapping: NOT NUL-terminated. */
typedef struct { const char *ptr; uint64_t len; } eng_gguf_str;

typedef struct {
    eng_gguf_str key;
    eng_gguf_vtype type;
    /* For ENG_GGUF_ARRAY: element type, element count and a pointer to the
     * first element inside the mapping (strings: the first length prefix). */
    eng_gguf_vtype arr_type;
    uint64_t arr_len;
    const void *arr_data;
    union {
        uint64_t u64; int64_t i64; double f64; int boolean; eng_gguf_str str;
    } v;  /* scalars widened to 64 bits; booleans 0/1 */
} eng_gguf_kv;

typedef struct {
    eng_gguf_str name;
    uint32_t n_dims;
    int64_t ne[4];         /* ne[0] innermost; unused dims are 1 */
    eng_dtype type;
    uint64_t offset;       /* from the start of the data section */
    const void *data;      /* inside the mapping */
    size_t nbytes;
} eng_gguf_tensor;

typedef struct eng_gguf eng_gguf;

/* Opens and validates `path`. On failure returns NULL and writes a message
 * of at most errlen bytes to err. */
eng_gguf *eng_gguf_open(const char *path, char *err, size_t errlen);
void eng_gguf_close(eng_gguf *g);

const char *eng_gguf_path(const eng_gguf *g);
uint32_t eng_gguf_version(const eng_gguf *g);
uint64_t eng_gguf_n_kv(const eng_gguf *g);
const eng_gguf_kv *eng_gguf_kv_at(const eng_gguf *g, uint64_t i);
uint64_t eng_gguf_n_tensors(const eng_gguf *g);
const eng_gguf_tensor *eng_gguf_tensor_at(const eng_gguf *g, uint64_t i);

/* Lookups by name; NULL when absent. */
const eng_gguf_kv *eng_gguf_find(const eng_gguf *g, const char *key);
const eng_gguf_tensor *eng_gguf_find_tensor(const eng_gguf *g, const char *name);

/* Typed getters. Each returns 0 on success, 1 when the key is absent (out is
 * left unchanged, so callers preset defaults), and -1 when the key exists with
 * an incompatible type (message in err naming key, expected and found type).
 * Integer getters accept any integer type whose value fits. */
int eng_gguf_get_u32(const eng_gguf *g, const char *key, uint32_t *out, char *err, size_t errlen);
int eng_gguf_get_f32(const eng_gguf *g, const char *key, float *out, char *err, size_t errlen);
int eng_gguf_get_bool(const eng_gguf *g, const char *key, int *out, char *err, size_t errlen);
/* Returns a malloc'd NUL-terminated copy in *out. */
int eng_gguf_get_str(const eng_gguf *g, const char *key, char **out, char *err, size_t errlen);

/* Array access (validated at open). The element i of a string array: */
eng_gguf_str eng_gguf_arr_str(const eng_gguf_kv *kv, uint64_t i);
/* Numeric array elements widened: */
int64_t eng_gguf_arr_int(const eng_gguf_kv *kv, uint64_t i);
double eng_gguf_arr_float(const eng_gguf_kv *kv, uint64_t i);

const char *eng_gguf_vtype_name(eng_gguf_vtype t);

#endif
