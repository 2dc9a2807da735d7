/* safetensors.c: maps .safetensors files (one, or the shards of an index) and
 * validates their JSON headers completely at open, so that a corrupt or
 * hostile file gives a message naming the file and tensor instead of a crash.
 * See safetensors.h for the format and the contract. */
#include "engine/safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/util.h"

typedef struct {
    char *path;
    void *map;       /* whole file, PROT_READ */
    size_t size;
} st_file;

struct eng_st {
    char *path;               /* the file or index that was opened */
    st_file *files;           /* n_files */
    int n_files;
    eng_st_tensor *tensors;   /* n_tensors, sorted by name once loading ends */
    size_t n_tensors;
};

/* Every dtype the format defines, with its width, so that a file holding a
 * tensor kvserve does not compute with (an integer buffer, say) still opens
 * and is validated; such tensors get type ENG_DTYPE_COUNT. */
static const struct { const char *name; eng_dtype type; unsigned bits; } st_dtypes[] = {
    {"F32", ENG_F32, 32}, {"F16", ENG_F16, 16}, {"BF16", ENG_BF16, 16},
    {"F64", ENG_DTYPE_COUNT, 64}, {"I64", ENG_DTYPE_COUNT, 64}, {"U64", ENG_DTYPE_COUNT, 64},
    {"C64", ENG_DTYPE_COUNT, 64}, {"I32", ENG_DTYPE_COUNT, 32}, {"U32", ENG_DTYPE_COUNT, 32},
    {"I16", ENG_DTYPE_COUNT, 16}, {"U16", ENG_DTYPE_COUNT, 16}, {"I8", ENG_DTYPE_COUNT, 8},
    {"U8", ENG_DTYPE_COUNT, 8}, {"BOOL", ENG_DTYPE_COUNT, 8}, {"F8_E4M3", ENG_DTYPE_COUNT, 8},
    {"F8_E5M2", ENG_DTYPE_COUNT, 8}, {"F8_E8M0", ENG_DTYPE_COUNT, 8},
    {"F6_E2M3", ENG_DTYPE_COUNT, 6}, {"F6_E3M2", ENG_DTYPE_COUNT, 6}, {"F4", ENG_DTYPE_COUNT, 4},
};

/* A JSON value in a few words, for "found ..." in messages. */
static const char *st_json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return json_integer_value(v) < 0 ? "a negative integer" : "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

const char *eng_st_shape_str(const eng_st_tensor *t, char *buf, size_t cap)
{
    size_t n = 0;
    if (cap == 0)
        return buf;
    buf[0] = '\0';
    n += (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < t->n_dims && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%lld", i ? ", " : "", (long long)t->shape[i]);
    if (n < cap)
        snprintf(buf + n, cap - n, "]");
    return buf;
}

/* One tensor's header entry -> *t (data not yet set). Returns 0 or -1. */
static int st_parse_entry(const char *path, const char *name, json_t *entry, uint64_t data_size,
                          eng_st_tensor *t, uint64_t *begin, uint64_t *end, char *err, size_t errlen)
{
    if (!json_is_object(entry)) {
        eng_seterr(err, errlen, "%s: tensor '%s': expected an object, found %s", path, name,
                st_json_kind(entry));
        return -1;
    }
    json_t *jd = json_object_get(entry, "dtype");
    json_t *js = json_object_get(entry, "shape");
    json_t *jo = json_object_get(entry, "data_offsets");
    if (!jd || !js || !jo) {
        eng_seterr(err, errlen, "%s: tensor '%s': missing \"%s\"", path, name,
                !jd ? "dtype" : !js ? "shape" : "data_offsets");
        return -1;
    }
    if (!json_is_string(jd)) {
        eng_seterr(err, errlen, "%s: tensor '%s': dtype: expected a string, found %s", path, name,
                st_json_kind(jd));
        return -1;
    }
    const char *dt = json_string_value(jd);
    size_t k, n_known = sizeof st_dtypes / sizeof st_dtypes[0];
    for (k = 0; k < n_known; k++)
        if (strcmp(dt, st_dtypes[k].name) == 0)
            break;
    if (k == n_known) {
        eng_seterr(err, errlen, "%s: tensor '%s': unknown dtype '%.32s' (expected F32, F16 or BF16)",
                path, name, dt);
        return -1;
    }
    t->type = st_dtypes[k].type;
    t->dtype = st_dtypes[k].name;

    if (!json_is_array(js)) {
        eng_seterr(err, errlen, "%s: tensor '%s': shape: expected an array, found %s", path, name,
                st_json_kind(js));
        return -1;
    }
    size_t nd = json_array_size(js);
    if (nd > ENG_ST_MAX_DIMS) {
        eng_seterr(err, errlen, "%s: tensor '%s': shape has %zu dimensions (at most %d supported)",
                path, name, nd, ENG_ST_MAX_DIMS);
        return -1;
    }
    t->n_dims = (int)nd;
    uint64_t elems = 1, bits = st_dtypes[k].bits;
    for (size_t i = 0; i < nd; i++) {
        json_t *d = json_array_get(js, i);
        if (!json_is_integer(d) || json_integer_value(d) < 0) {
            eng_seterr(err, errlen, "%s: tensor '%s': shape[%zu]: expected a non-negative integer, found %s",
                    path, name, i, st_json_kind(d));
            return -1;
        }
        uint64_t v = (uint64_t)json_integer_value(d);
        if (v != 0 && elems > (UINT64_MAX / bits) / v) {
            eng_seterr(err, errlen, "%s: tensor '%s': shape is too large (element count overflows)", path, name);
            return -1;
        }
        elems *= v;
        t->shape[i] = (int64_t)v;
    }
    t->n_elems = (int64_t)elems;

    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        !json_is_integer(json_array_get(jo, 0)) || !json_is_integer(json_array_get(jo, 1)) ||
        json_integer_value(json_array_get(jo, 0)) < 0 || json_integer_value(json_array_get(jo, 1)) < 0) {
        eng_seterr(err, errlen, "%s: tensor '%s': data_offsets: expected two non-negative integers [begin, end]",
                path, name);
        return -1;
    }
    *begin = (uint64_t)json_integer_value(json_array_get(jo, 0));
    *end = (uint64_t)json_integer_value(json_array_get(jo, 1));
    if (*begin > *end) {
        eng_seterr(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu]: begin is after end", path, name,
                (unsigned long long)*begin, (unsigned long long)*end);
        return -1;
    }
    if (*end > data_size) {
        eng_seterr(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] end past the data section (%llu bytes)",
                path, name, (unsigned long long)*begin, (unsigned long long)*end,
                (unsigned long long)data_size);
        return -1;
    }
    if (elems * bits % 8 != 0) {
        eng_seterr(err, errlen, "%s: tensor '%s': %llu elements of %s do not fill whole bytes", path, name,
                (unsigned long long)elems, dt);
        return -1;
    }
    uint64_t need = elems * bits / 8;
    if (*end - *begin != need) {
        char sb[160];
        eng_seterr(err, errlen, "%s: tensor '%s': data_offsets [%llu, %llu] hold %llu bytes, but dtype %s "
                "and shape %s need %llu", path, name, (unsigned long long)*begin,
                (unsigned long long)*end, (unsigned long long)(*end - *begin), dt,
                eng_st_shape_str(t, sb, sizeof sb), (unsigned long long)need);
        return -1;
    }
    t->nbytes = (size_t)need;
    return 0;
}

typedef struct { uint64_t begin, end; size_t idx; } st_range;

static int st_range_cmp(const void *a, const void *b)
{
    const st_range *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return (x->end > y->end) - (x->end < y->end);
}

/* Maps `path`, validates it, and appends its tensors to st. */
static int st_load_file(eng_st *st, const char *path, char *err, size_t errlen)
{
    st_file *files = realloc(st->files, (size_t)(st->n_files + 1) * sizeof *files);
    if (!files) {
        eng_seterr(err, errlen, "%s: out of memory", path);
        return -1;
    }
    st->files = files;
    st_file *f = &files[st->n_files];
    memset(f, 0, sizeof *f);
    f->path = strdup(path);
    if (!f->path) {
        eng_seterr(err, errlen, "%s: out of memory", path);
        return -1;
    }
    st->n_files++;  /* from here on eng_st_close releases it */

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        eng_seterr(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        eng_seterr(err, errlen, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    if (sb.st_size < 8) {
        eng_seterr(err, errlen, "%s: truncated: %lld bytes, a safetensors file needs at least 8 "
                "(the header length)", path, (long long)sb.st_size);
        close(fd);
        return -1;
    }
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) {
        eng_seterr(err, errlen, "%s: mmap failed: %s", path, strerror(map_errno));
        return -1;
    }
    f->map = map;
    f->size = (size_t)sb.st_size;

    const unsigned char *bytes = map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | bytes[i];
    if (hlen > ENG_ST_MAX_HEADER) {
        eng_seterr(err, errlen, "%s: header length %llu exceeds the format's limit of %llu bytes",
                path, (unsigned long long)hlen, (unsigned long long)ENG_ST_MAX_HEADER);
        return -1;
    }
    if (hlen > f->size - 8) {
        eng_seterr(err, errlen, "%s: truncated: header length %llu, but only %zu bytes follow it",
                path, (unsigned long long)hlen, f->size - 8);
        return -1;
    }
    if (hlen < 2 || bytes[8] != '{') {
        eng_seterr(err, errlen, "%s: not a safetensors file: the header does not start with '{'", path);
        return -1;
    }
    uint64_t data_size = f->size - 8 - hlen;
    const unsigned char *data = bytes + 8 + hlen;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)bytes + 8, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        eng_seterr(err, errlen, "%s: header JSON: %s (at byte %d of the header)", path, jerr.text,
                jerr.position);
        return -1;
    }
    if (!json_is_object(root)) {
        eng_seterr(err, errlen, "%s: header JSON: expected an object, found %s", path, st_json_kind(root));
        json_decref(root);
        return -1;
    }

    size_t n_new = json_object_size(root);
    eng_st_tensor *ts = realloc(st->tensors, (st->n_tensors + n_new + 1) * sizeof *ts);
    st_range *ranges = malloc((n_new + 1) * sizeof *ranges);
    if (ts)
        st->tensors = ts;
    if (!ts || !ranges) {
        eng_seterr(err, errlen, "%s: out of memory", path);
        free(ranges);
        json_decref(root);
        return -1;
    }

    int rc = 0;
    size_t n_ranges = 0;
    const char *name;
    json_t *entry;
    json_object_foreach(root, name, entry) {
        if (strcmp(name, "__metadata__") == 0)
            continue;
        if (name[0] == '\0') {
            eng_seterr(err, errlen, "%s: a tensor has an empty name", path);
            rc = -1;
            break;
        }
        eng_st_tensor *t = &st->tensors[st->n_tensors];
        memset(t, 0, sizeof *t);
        uint64_t begin, end;
        if (st_parse_entry(path, name, entry, data_size, t, &begin, &end, err, errlen) != 0) {
            rc = -1;
            break;
        }
        t->name = strdup(name);
        if (!t->name) {
            eng_seterr(err, errlen, "%s: out of memory", path);
            rc = -1;
            break;
        }
        t->data = data + begin;
        t->file = f->path;
        ranges[n_ranges++] = (st_range){begin, end, st->n_tensors};
        st->n_tensors++;
    }
    json_decref(root);

    /* Sorted by begin, a range overlaps another iff it starts before the
     * furthest end seen so far. Empty tensors occupy nothing. */
    if (rc == 0) {
        qsort(ranges, n_ranges, sizeof *ranges, st_range_cmp);
        const st_range *far = NULL;
        for (size_t i = 0; i < n_ranges; i++) {
            const st_range *r = &ranges[i];
            if (r->begin == r->end)
                continue;
            if (far && r->begin < far->end) {
                eng_seterr(err, errlen, "%s: tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap", path,
                        st->tensors[far->idx].name, (unsigned long long)far->begin,
                        (unsigned long long)far->end, st->tensors[r->idx].name,
                        (unsigned long long)r->begin, (unsigned long long)r->end);
                rc = -1;
                break;
            }
            if (!far || r->end > far->end)
                far = r;
        }
    }
    free(ranges);
    return rc;
}

static int st_name_cmp(const void *a, const void *b)
{
    return strcmp(((const eng_st_tensor *)a)->name, ((const eng_st_tensor *)b)->name);
}

/* Sorts by name and rejects a name present twice (only possible across shards). */
static int st_index_names(eng_st *st, char *err, size_t errlen)
{
    if (st->n_tensors > 1)
        qsort(st->tensors, st->n_tensors, sizeof *st->tensors, st_name_cmp);
    for (size_t i = 1; i < st->n_tensors; i++) {
        if (strcmp(st->tensors[i - 1].name, st->tensors[i].name) == 0) {
            eng_seterr(err, errlen, "%s: tensor '%s' is in both %s and %s", st->path, st->tensors[i].name,
                    st->tensors[i - 1].file, st->tensors[i].file);
            return -1;
        }
    }
    return 0;
}

static eng_st *st_create(const char *path, char *err, size_t errlen)
{
    eng_st *st = calloc(1, sizeof *st);
    if (st)
        st->path = strdup(path);
    if (!st || !st->path) {
        free(st);
        eng_seterr(err, errlen, "%s: out of memory", path);
        return NULL;
    }
    return st;
}

eng_st *eng_st_open(const char *path, char *err, size_t errlen)
{
    eng_st *st = st_create(path, err, errlen);
    if (!st)
        return NULL;
    if (st_load_file(st, path, err, errlen) != 0 || st_index_names(st, err, errlen) != 0) {
        eng_st_close(st);
        return NULL;
    }
    return st;
}

/* A shard name must stay inside the index's directory. */
static bool st_plain_file_name(const char *s)
{
    return s[0] != '\0' && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

eng_st *eng_st_open_index(const char *index_path, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        eng_seterr(err, errlen, "%s: %s (line %d, column %d)", index_path, jerr.text, jerr.line, jerr.column);
        return NULL;
    }
    json_t *wm = json_object_get(root, "weight_map");
    if (!json_is_object(root) || !json_is_object(wm) || json_object_size(wm) == 0) {
        eng_seterr(err, errlen, "%s: weight_map: expected a non-empty object, found %s", index_path,
                wm ? st_json_kind(wm) : "nothing");
        json_decref(root);
        return NULL;
    }
    eng_st *st = st_create(index_path, err, errlen);
    char *dir = strdup(index_path);
    if (!st || !dir) {
        eng_seterr(err, errlen, "%s: out of memory", index_path);
        goto fail;
    }
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        strcpy(dir, ".");

    const char *name;
    json_t *jf;
    json_object_foreach(wm, name, jf) {
        if (!json_is_string(jf) || !st_plain_file_name(json_string_value(jf))) {
            eng_seterr(err, errlen, "%s: weight_map['%s']: expected a file name in the index's directory, "
                    "found %s%s%s", index_path, name, st_json_kind(jf),
                    json_is_string(jf) ? " " : "", json_is_string(jf) ? json_string_value(jf) : "");
            goto fail;
        }
        char *fpath = eng_path_join(dir, json_string_value(jf));
        if (!fpath) {
            eng_seterr(err, errlen, "%s: out of memory", index_path);
            goto fail;
        }
        bool seen = false;
        for (int i = 0; i < st->n_files && !seen; i++)
            seen = strcmp(st->files[i].path, fpath) == 0;
        int rc = seen ? 0 : st_load_file(st, fpath, err, errlen);
        free(fpath);
        if (rc != 0)
            goto fail;
    }
    if (st_index_names(st, err, errlen) != 0)
        goto fail;
    json_object_foreach(wm, name, jf) {
        const eng_st_tensor *t = eng_st_find(st, name);
        if (!t) {
            eng_seterr(err, errlen, "%s: weight_map puts tensor '%s' in %s, but that file has no such tensor",
                    index_path, name, json_string_value(jf));
            goto fail;
        }
        const char *base = strrchr(t->file, '/');
        base = base ? base + 1 : t->file;
        if (strcmp(base, json_string_value(jf)) != 0) {
            eng_seterr(err, errlen, "%s: weight_map puts tensor '%s' in %s, but it is in %s", index_path,
                    name, json_string_value(jf), t->file);
            goto fail;
        }
    }
    free(dir);
    json_decref(root);
    return st;
fail:
    free(dir);
    eng_st_close(st);
    json_decref(root);
    return NULL;
}

static bool st_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

eng_st *eng_st_open_dir(const char *dir, char *err, size_t errlen)
{
    char *single = eng_path_join(dir, "model.safetensors");
    char *index = eng_path_join(dir, "model.safetensors.index.json");
    char *bin = eng_path_join(dir, "pytorch_model.bin");
    eng_st *st = NULL;
    if (!single || !index || !bin)
        eng_seterr(err, errlen, "%s: out of memory", dir);
    else if (st_exists(single))
        st = eng_st_open(single, err, errlen);
    else if (st_exists(index))
        st = eng_st_open_index(index, err, errlen);
    else if (st_exists(bin))
        eng_seterr(err, errlen, "%s: has only pytorch_model.bin; kvserve reads safetensors weights "
                "(model.safetensors or model.safetensors.index.json)", dir);
    else
        eng_seterr(err, errlen, "%s: no model.safetensors or model.safetensors.index.json", dir);
    free(single);
    free(index);
    free(bin);
    return st;
}

void eng_st_close(eng_st *st)
{
    if (!st)
        return;
    for (size_t i = 0; i < st->n_tensors; i++)
        free((char *)st->tensors[i].name);
    free(st->tensors);
    for (int i = 0; i < st->n_files; i++) {
        if (st->files[i].map)
            munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    free(st->files);
    free(st->path);
    free(st);
}

const char *eng_st_path(const eng_st *st) { return st->path; }
size_t eng_st_n_tensors(const eng_st *st) { return st->n_tensors; }

const eng_st_tensor *eng_st_tensor_at(const eng_st *st, size_t i)
{
    return i < st->n_tensors ? &st->tensors[i] : NULL;
}

int eng_st_check_float(const eng_st_tensor *t, char *err, size_t errlen)
{
    if (t->type == ENG_F32 || t->type == ENG_F16 || t->type == ENG_BF16)
        return 0;
    eng_seterr(err, errlen, "%s: tensor '%s': dtype %s is not supported (expected F32, F16 or BF16)", t->file,
            t->name, t->dtype);
    return -1;
}

const eng_st_tensor *eng_st_find(const eng_st *st, const char *name)
{
    if (st->n_tensors == 0)
        return NULL;
    eng_st_tensor key = {.name = name};
    return bsearch(&key, st->tensors, st->n_tensors, sizeof key, st_name_cmp);
}
