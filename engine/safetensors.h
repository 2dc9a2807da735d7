/* safetensors.h: reader for Hugging Face .safetensors weight files, single or
 * sharded (model.safetensors.index.json + model-0000N-of-0000M.safetensors).
 *
 * A .safetensors file is an 8-byte little-endian header length N, N bytes of
 * JSON ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
 * "__metadata__": {...}}), then the data section; offsets are relative to its
 * start. Files are mapped read-only and fully validated at open (header
 * bounds, JSON, dtypes, shapes, offsets inside the data section, no two
 * tensors overlapping), so every later accessor is a plain lookup. kvserve
 * computes with F32, F16 and BF16 only. A tensor of another dtype the format
 * defines (I64, U8, BOOL, F8_*, ...: old checkpoints carry integer buffers
 * such as GPT-2's attention mask) does not stop the file from opening; it gets
 * type ENG_DTYPE_COUNT, and whoever needs it must refuse it with
 * eng_st_check_float(). An unknown dtype name is an error at open. Every error
 * names the file and the tensor or key at fault, with what was expected and
 * what was found.
 *
 * Tensor data stays in the mapping and is valid until eng_st_close(). It is
 * not guaranteed to be aligned to its element size (the format does not
 * require it): copy before reading it as float/uint16 when it is not. */
#ifndef ENG_SAFETENSORS_H
#define ENG_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "engine/tensor.h"

#define ENG_ST_MAX_DIMS 8
/* The format's limit on the JSON header (the reference implementation's). */
#define ENG_ST_MAX_HEADER ((uint64_t)100 * 1000 * 1000)

typedef struct {
    const char *name;                /* NUL-terminated, owned by the eng_st */
    eng_dtype type;                  /* ENG_F32, ENG_F16, ENG_BF16, or ENG_DTYPE_COUNT: other */
    const char *dtype;               /* the file's dtype name ("BF16", "I64") */
    int n_dims;                      /* 0 (a scalar) .. ENG_ST_MAX_DIMS */
    int64_t shape[ENG_ST_MAX_DIMS];  /* file order: shape[n_dims-1] is contiguous */
    int64_t n_elems;
    const void *data;                /* inside the mapping; see alignment above */
    size_t nbytes;
    const char *file;                /* path of the .safetensors file holding it */
} eng_st_tensor;

typedef struct eng_st eng_st;

/* Opens and validates one .safetensors file. NULL with a message on error. */
eng_st *eng_st_open(const char *path, char *err, size_t errlen);
/* Opens a sharded checkpoint from its index (a JSON object whose "weight_map"
 * maps tensor names to file names in the index's directory). Every shard is
 * validated; every tensor of the weight map must be in the file it names; a
 * tensor present in two shards is an error. */
eng_st *eng_st_open_index(const char *index_path, char *err, size_t errlen);
/* A Hugging Face model directory: model.safetensors if present, else
 * model.safetensors.index.json. */
eng_st *eng_st_open_dir(const char *dir, char *err, size_t errlen);
/* Unmaps every file. NULL is accepted. */
void eng_st_close(eng_st *st);

/* What was opened (the file or the index), for messages. */
const char *eng_st_path(const eng_st *st);
/* All tensors of all shards, in name order. */
size_t eng_st_n_tensors(const eng_st *st);
const eng_st_tensor *eng_st_tensor_at(const eng_st *st, size_t i);
/* Lookup by exact name; NULL when absent. */
const eng_st_tensor *eng_st_find(const eng_st *st, const char *name);

/* 0 when t's type is F32, F16 or BF16; else -1 with a message naming the
 * file, the tensor and its dtype. */
int eng_st_check_float(const eng_st_tensor *t, char *err, size_t errlen);

/* Writes "[a, b, c]" (the shape in file order) to buf; returns buf. */
const char *eng_st_shape_str(const eng_st_tensor *t, char *buf, size_t cap);

#endif
