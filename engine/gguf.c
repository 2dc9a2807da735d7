/* gguf.c: the GGUF v2/v3 reader (engine/gguf.h).
 *
 * Layout of a GGUF file (all little-endian):
 *   "GGUF" u32 version  u64 n_tensors  u64 n_kv
 *   n_kv x   { string key; u32 vtype; value }
 *   n_tensors x { string name; u32 n_dims; u64 ne[n_dims]; u32 ggml_type; u64 offset }
 *   padding to general.alignment (default 32), then the data section;
 *   each tensor's data lies at data_start + offset, offset a multiple of the
 *   alignment. A string is u64 length + bytes (no NUL); an array is u32
 *   element type + u64 count + elements, and elements may themselves be
 *   arrays (nested to any depth) or strings.
 *
 * The file is mapped read-only and parsed once at open with a bounds check on
 * every read, so no later accessor can run off the mapping. Open builds:
 *   - for each string array, a table of element pointers, so element i is
 *     O(1) (tokenizers read 50k-entry vocabularies by index);
 *   - open-addressing hash tables over keys and tensor names, which also
 *     reject duplicates. */
#include "engine/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the GGUF reader assumes a little-endian host");

#define GGUF_MAGIC "GGUF"
#define GGUF_HEADER_BYTES 24      /* magic, version, n_tensors, n_kv */
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_ARRAY_DEPTH 16   /* nesting depth of arrays of arrays */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_VTYPE_COUNT 13

/* A key-value entry: the public view first, so a pointer to it converts back. */
typedef struct {
    eng_gguf_kv kv;
    const uint8_t **str_elems;    /* (arr_len) for string arrays: each element's length prefix */
} kv_entry;

/* Hash table of entry indices + 1 (0 = empty), linear probing. */
typedef struct {
    uint64_t *slots;              /* (cap) */
    uint64_t cap;                 /* a power of two, >= 2 * entries */
} name_index;

struct eng_gguf {
    char *path;
    const uint8_t *map;           /* (size) the whole file, read-only */
    size_t size;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_start;          /* file offset of the data section */
    uint64_t n_kv;
    kv_entry *kvs;                /* (n_kv) */
    uint64_t n_tensors;
    eng_gguf_tensor *tensors;     /* (n_tensors) */
    name_index kv_index, tensor_index;
};

/* Parsing state: a bounds-checked cursor over the mapping. */
typedef struct {
    const uint8_t *base;
    size_t size;
    size_t pos;
    const char *path;
    char *err;
    size_t errlen;
} cursor;

static const char *const vtype_names[GGUF_VTYPE_COUNT] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
    "bool", "string", "array", "uint64", "int64", "float64",
};

/* Bytes of a fixed-size value type; 0 for string / array (variable size). */
static const uint8_t vtype_size[GGUF_VTYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

/* Names of ggml's type codes, for messages about types kvserve cannot read. */
static const char *ggml_type_name(uint32_t code) {
    static const char *const names[] = {
        "f32", "f16", "q4_0", "q4_1", NULL, NULL, "q5_0", "q5_1", "q8_0", "q8_1",
        "q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q8_K", "iq2_xxs", "iq2_xs", "iq3_xxs",
        "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "i8", "i16", "i32", "i64", "f64",
        "iq1_m", "bf16", NULL, NULL, NULL, "tq1_0", "tq2_0", NULL, NULL, NULL, "mxfp4",
    };
    if (code < sizeof names / sizeof names[0] && names[code] != NULL)
        return names[code];
    return "unknown";
}

const char *eng_gguf_vtype_name(eng_gguf_vtype t) {
    if ((unsigned)t >= GGUF_VTYPE_COUNT)
        return "unknown";
    return vtype_names[t];
}

static bool vtype_is_int(eng_gguf_vtype t) {
    switch (t) {
    case ENG_GGUF_UINT8: case ENG_GGUF_INT8: case ENG_GGUF_UINT16: case ENG_GGUF_INT16:
    case ENG_GGUF_UINT32: case ENG_GGUF_INT32: case ENG_GGUF_UINT64: case ENG_GGUF_INT64:
        return true;
    default:
        return false;
    }
}

static bool vtype_is_signed(eng_gguf_vtype t) {
    return t == ENG_GGUF_INT8 || t == ENG_GGUF_INT16 || t == ENG_GGUF_INT32 || t == ENG_GGUF_INT64;
}

/* ---- errors -------------------------------------------------------------- */

/* Writes "<path>: <message>" into err. */
static void vset_err(char *err, size_t errlen, const char *path, const char *fmt, va_list ap) {
    if (err == NULL || errlen == 0)
        return;
    int n = snprintf(err, errlen, "%s: ", path ? path : "(gguf)");
    if (n < 0 || (size_t)n >= errlen)
        return;
    vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
}

__attribute__((format(printf, 4, 5)))
static void set_err(char *err, size_t errlen, const char *path, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vset_err(err, errlen, path, fmt, ap);
    va_end(ap);
}

__attribute__((format(printf, 2, 3)))
static int cur_fail(cursor *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vset_err(c->err, c->errlen, c->path, fmt, ap);
    va_end(ap);
    return -1;
}

/* Prints a (ptr, len) string into a bounded, printable form for messages. */
static const char *quote(const eng_gguf_str *s, char *buf, size_t cap) {
    size_t n = 0;
    for (uint64_t i = 0; i < s->len && n + 5 < cap; i++) {
        unsigned char ch = (unsigned char)s->ptr[i];
        buf[n++] = (ch >= 0x20 && ch < 0x7f) ? (char)ch : '?';
        if (i == 80 && s->len > 84) {
            memcpy(buf + n, "...", 3);
            n += 3;
            break;
        }
    }
    buf[n] = '\0';
    return buf;
}

/* ---- cursor reads -------------------------------------------------------- */

static size_t cur_left(const cursor *c) { return c->size - c->pos; }

/* Reads n bytes into out; `what` names the field for the error message. */
static int cur_read(cursor *c, void *out, size_t n, const char *what) {
    if (cur_left(c) < n)
        return cur_fail(c, "%s at offset %zu: needs %zu bytes, file ends at %zu bytes",
                        what, c->pos, n, c->size);
    memcpy(out, c->base + c->pos, n);
    c->pos += n;
    return 0;
}

static int cur_u32(cursor *c, uint32_t *v, const char *what) { return cur_read(c, v, 4, what); }
static int cur_u64(cursor *c, uint64_t *v, const char *what) { return cur_read(c, v, 8, what); }

/* Reads a string (u64 length + bytes) as a view into the mapping. */
static int cur_str(cursor *c, eng_gguf_str *s, const char *what) {
    uint64_t len = 0;
    size_t at = c->pos;
    if (cur_u64(c, &len, what) != 0)
        return -1;
    if (len > cur_left(c))
        return cur_fail(c, "%s at offset %zu: string length %" PRIu64
                        " extends past end of file (%zu bytes left of %zu)",
                        what, at, len, cur_left(c), c->size);
    s->ptr = (const char *)c->base + c->pos;
    s->len = len;
    c->pos += (size_t)len;
    return 0;
}

/* Skips over one value of type t (validating it), used for the elements of
 * nested arrays. `what` names the key for messages. */
static int skip_value(cursor *c, eng_gguf_vtype t, int depth, const char *what);

/* Reads an array header and validates its elements; on success *elem_type,
 * *count and *first (the first element's offset) describe it. */
static int read_array(cursor *c, int depth, const char *what,
                      eng_gguf_vtype *elem_type, uint64_t *count, size_t *first) {
    uint32_t et = 0;
    size_t at = c->pos;
    if (depth > GGUF_MAX_ARRAY_DEPTH)
        return cur_fail(c, "%s: arrays nested deeper than %d levels at offset %zu",
                        what, GGUF_MAX_ARRAY_DEPTH, at);
    if (cur_u32(c, &et, what) != 0 || cur_u64(c, count, what) != 0)
        return -1;
    if (et >= GGUF_VTYPE_COUNT)
        return cur_fail(c, "%s: array element type %" PRIu32
                        " at offset %zu is not a GGUF value type (0..12)", what, et, at);
    *elem_type = (eng_gguf_vtype)et;
    *first = c->pos;
    size_t esz = vtype_size[et];
    /* smallest possible element, to bound the count before walking */
    size_t min_elem = esz ? esz : (et == ENG_GGUF_STRING ? 8 : 12);
    if (*count > cur_left(c) / min_elem)
        return cur_fail(c, "%s: array of %" PRIu64 " %s at offset %zu (at least %zu bytes each)"
                        " cannot fit in the %zu bytes left of the file (%zu bytes)", what, *count,
                        vtype_names[et], at, min_elem, cur_left(c), c->size);
    if (esz != 0 && et != ENG_GGUF_BOOL) {
        c->pos += (size_t)*count * esz;
        return 0;
    }
    for (uint64_t i = 0; i < *count; i++)
        if (skip_value(c, *elem_type, depth + 1, what) != 0)
            return -1;
    return 0;
}

static int skip_value(cursor *c, eng_gguf_vtype t, int depth, const char *what) {
    if (t == ENG_GGUF_STRING) {
        eng_gguf_str s;
        return cur_str(c, &s, what);
    }
    if (t == ENG_GGUF_ARRAY) {
        eng_gguf_vtype et;
        uint64_t n;
        size_t first;
        return read_array(c, depth, what, &et, &n, &first);
    }
    if (t == ENG_GGUF_BOOL) {
        uint8_t b = 0;
        size_t at = c->pos;
        if (cur_read(c, &b, 1, what) != 0)
            return -1;
        if (b > 1)
            return cur_fail(c, "%s: bool at offset %zu is %u, expected 0 or 1", what, at, b);
        return 0;
    }
    size_t esz = vtype_size[t];
    if (cur_left(c) < esz)
        return cur_fail(c, "%s: %s value at offset %zu: needs %zu bytes, file ends at %zu bytes",
                        what, vtype_names[t], c->pos, esz, c->size);
    c->pos += esz;
    return 0;
}

/* ---- name hash tables ---------------------------------------------------- */

static uint64_t hash_bytes(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ull;  /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 1099511628211ull;
    }
    return h;
}

static int index_init(name_index *ix, uint64_t n) {
    uint64_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    ix->slots = calloc(cap, sizeof *ix->slots);
    ix->cap = cap;
    return ix->slots ? 0 : -1;
}

/* Finds name in the index; `name_at(ctx, i)` gives entry i's name. Returns
 * the entry index, or -1 with *slot_out set to the empty slot it would use. */
typedef const eng_gguf_str *(*name_fn)(const eng_gguf *g, uint64_t i);

static int64_t index_find(const name_index *ix, const eng_gguf *g, name_fn name_at,
                          const char *name, size_t len, uint64_t *slot_out) {
    if (ix->slots == NULL)
        return -1;
    uint64_t mask = ix->cap - 1;
    for (uint64_t s = hash_bytes(name, len) & mask;; s = (s + 1) & mask) {
        uint64_t v = ix->slots[s];
        if (v == 0) {
            if (slot_out)
                *slot_out = s;
            return -1;
        }
        const eng_gguf_str *cand = name_at(g, v - 1);
        if (cand->len == len && memcmp(cand->ptr, name, len) == 0)
            return (int64_t)(v - 1);
    }
}

static const eng_gguf_str *kv_name(const eng_gguf *g, uint64_t i) { return &g->kvs[i].kv.key; }
static const eng_gguf_str *tensor_name(const eng_gguf *g, uint64_t i) { return &g->tensors[i].name; }

/* ---- parsing ------------------------------------------------------------- */

static int parse_kv(eng_gguf *g, cursor *c, uint64_t i) {
    kv_entry *e = &g->kvs[i];
    eng_gguf_kv *kv = &e->kv;
    char what[160], qbuf[100];
    snprintf(what, sizeof what, "key-value #%" PRIu64 " key", i);
    if (cur_str(c, &kv->key, what) != 0)
        return -1;
    snprintf(what, sizeof what, "key '%s'", quote(&kv->key, qbuf, sizeof qbuf));
    uint64_t slot = 0;
    if (index_find(&g->kv_index, g, kv_name, kv->key.ptr, (size_t)kv->key.len, &slot) >= 0)
        return cur_fail(c, "%s appears twice", what);
    g->kv_index.slots[slot] = i + 1;

    uint32_t t = 0;
    size_t at = c->pos;
    if (cur_u32(c, &t, what) != 0)
        return -1;
    if (t >= GGUF_VTYPE_COUNT)
        return cur_fail(c, "%s: value type %" PRIu32 " at offset %zu is not a GGUF value type (0..12)",
                        what, t, at);
    kv->type = (eng_gguf_vtype)t;
    at = c->pos;
    switch (kv->type) {
    case ENG_GGUF_UINT8:  { uint8_t v = 0;  if (cur_read(c, &v, 1, what)) return -1; kv->v.u64 = v; break; }
    case ENG_GGUF_INT8:   { int8_t v = 0;   if (cur_read(c, &v, 1, what)) return -1; kv->v.i64 = v; break; }
    case ENG_GGUF_UINT16: { uint16_t v = 0; if (cur_read(c, &v, 2, what)) return -1; kv->v.u64 = v; break; }
    case ENG_GGUF_INT16:  { int16_t v = 0;  if (cur_read(c, &v, 2, what)) return -1; kv->v.i64 = v; break; }
    case ENG_GGUF_UINT32: { uint32_t v = 0; if (cur_read(c, &v, 4, what)) return -1; kv->v.u64 = v; break; }
    case ENG_GGUF_INT32:  { int32_t v = 0;  if (cur_read(c, &v, 4, what)) return -1; kv->v.i64 = v; break; }
    case ENG_GGUF_UINT64: { uint64_t v = 0; if (cur_read(c, &v, 8, what)) return -1; kv->v.u64 = v; break; }
    case ENG_GGUF_INT64:  { int64_t v = 0;  if (cur_read(c, &v, 8, what)) return -1; kv->v.i64 = v; break; }
    case ENG_GGUF_FLOAT32: { float v = 0;   if (cur_read(c, &v, 4, what)) return -1; kv->v.f64 = v; break; }
    case ENG_GGUF_FLOAT64: { double v = 0;  if (cur_read(c, &v, 8, what)) return -1; kv->v.f64 = v; break; }
    case ENG_GGUF_BOOL: {
        uint8_t v = 0;
        if (cur_read(c, &v, 1, what))
            return -1;
        if (v > 1)
            return cur_fail(c, "%s: bool at offset %zu is %u, expected 0 or 1", what, at, v);
        kv->v.boolean = v;
        break;
    }
    case ENG_GGUF_STRING:
        if (cur_str(c, &kv->v.str, what) != 0)
            return -1;
        break;
    case ENG_GGUF_ARRAY: {
        size_t first;
        if (read_array(c, 1, what, &kv->arr_type, &kv->arr_len, &first) != 0)
            return -1;
        kv->arr_data = c->base + first;
        if (kv->arr_type == ENG_GGUF_STRING && kv->arr_len > 0) {
            /* the elements were validated by read_array: index them */
            e->str_elems = malloc((size_t)kv->arr_len * sizeof *e->str_elems);
            if (e->str_elems == NULL)
                return cur_fail(c, "%s: out of memory indexing %" PRIu64 " strings", what, kv->arr_len);
            const uint8_t *p = kv->arr_data;
            for (uint64_t k = 0; k < kv->arr_len; k++) {
                uint64_t len;
                e->str_elems[k] = p;
                memcpy(&len, p, 8);
                p += 8 + len;
            }
        }
        break;
    }
    }
    return 0;
}

static int parse_tensor_info(eng_gguf *g, cursor *c, uint64_t i) {
    eng_gguf_tensor *t = &g->tensors[i];
    char what[160], qbuf[100];
    snprintf(what, sizeof what, "tensor #%" PRIu64 " name", i);
    if (cur_str(c, &t->name, what) != 0)
        return -1;
    snprintf(what, sizeof what, "tensor '%s'", quote(&t->name, qbuf, sizeof qbuf));
    uint64_t slot = 0;
    if (index_find(&g->tensor_index, g, tensor_name, t->name.ptr, (size_t)t->name.len, &slot) >= 0)
        return cur_fail(c, "%s appears twice", what);
    g->tensor_index.slots[slot] = i + 1;

    if (cur_u32(c, &t->n_dims, what) != 0)
        return -1;
    if (t->n_dims > GGUF_MAX_DIMS)
        return cur_fail(c, "%s: n_dims is %" PRIu32 ", expected at most %d", what, t->n_dims, GGUF_MAX_DIMS);
    int64_t n_elems = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) {
        uint64_t ne = 1;
        if ((uint32_t)d < t->n_dims && cur_u64(c, &ne, what) != 0)
            return -1;
        if (ne > (uint64_t)INT64_MAX)
            return cur_fail(c, "%s: ne[%d] = %" PRIu64 " is out of range", what, d, ne);
        t->ne[d] = (int64_t)ne;
        if (ne != 0 && n_elems > INT64_MAX / (int64_t)ne)
            return cur_fail(c, "%s: element count overflows at ne[%d] = %" PRIu64, what, d, ne);
        n_elems *= (int64_t)ne;
    }
    uint32_t type = 0;
    size_t at = c->pos;
    if (cur_u32(c, &type, what) != 0)
        return -1;
    /* Q8_1 is kvserve's own activation layout (float scales), not ggml's */
    if (type >= ENG_DTYPE_COUNT || eng_dtype_name((eng_dtype)type) == NULL || type == ENG_Q8_1)
        return cur_fail(c, "%s: type %" PRIu32 " (%s) at offset %zu is not supported; kvserve reads "
                        "f32, f16, bf16, q4_0, q4_1, q8_0, q4_K, q6_K", what, type, ggml_type_name(type), at);
    t->type = (eng_dtype)type;
    int64_t be = eng_dtype_block_elems(t->type);
    if (t->ne[0] % be != 0)
        return cur_fail(c, "%s: ne[0] = %" PRId64 " is not a multiple of the %s block size %" PRId64,
                        what, t->ne[0], eng_dtype_name(t->type), be);
    /* bytes = row bytes * rows; both bounded by the element count, checked
     * against SIZE_MAX in row-bytes units */
    size_t row = eng_row_bytes(t->type, t->ne[0]);
    uint64_t rows = t->ne[0] == 0 ? 0 : (uint64_t)(n_elems / t->ne[0]);
    if (t->ne[0] != 0 && row == 0)
        return cur_fail(c, "%s: row of %" PRId64 " elements is too large", what, t->ne[0]);
    if (row != 0 && rows > SIZE_MAX / row)
        return cur_fail(c, "%s: data size overflows", what);
    t->nbytes = row * (size_t)rows;
    return cur_u64(c, &t->offset, what);
}

/* Reads general.alignment when present: a uint32 power of two. */
static int read_alignment(eng_gguf *g, char *err, size_t errlen) {
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const eng_gguf_kv *kv = eng_gguf_find(g, "general.alignment");
    if (kv == NULL)
        return 0;
    if (kv->type != ENG_GGUF_UINT32) {
        set_err(err, errlen, g->path, "key 'general.alignment': expected uint32, found %s",
                eng_gguf_vtype_name(kv->type));
        return -1;
    }
    if (kv->v.u64 == 0 || (kv->v.u64 & (kv->v.u64 - 1)) != 0) {
        set_err(err, errlen, g->path, "key 'general.alignment': %" PRIu64
                " is not a power of two", kv->v.u64);
        return -1;
    }
    g->alignment = (uint32_t)kv->v.u64;
    return 0;
}

/* Places every tensor's data inside the data section. */
static int place_tensors(eng_gguf *g, size_t info_end, char *err, size_t errlen) {
    if (g->n_tensors == 0)
        return 0;
    uint64_t start = ((uint64_t)info_end + g->alignment - 1) / g->alignment * g->alignment;
    if (start > g->size) {
        set_err(err, errlen, g->path, "data section starts at %" PRIu64
                " (tensor infos end at %zu, aligned to %" PRIu32 "), past end of file (%zu bytes)",
                start, info_end, g->alignment, g->size);
        return -1;
    }
    g->data_start = start;
    uint64_t avail = g->size - start;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        eng_gguf_tensor *t = &g->tensors[i];
        char qbuf[100];
        if (t->offset % g->alignment != 0) {
            set_err(err, errlen, g->path, "tensor '%s': data offset %" PRIu64
                    " is not a multiple of the alignment %" PRIu32,
                    quote(&t->name, qbuf, sizeof qbuf), t->offset, g->alignment);
            return -1;
        }
        if (t->offset > avail) {
            set_err(err, errlen, g->path, "tensor '%s': data offset %" PRIu64 " (from the data section"
                    " at %" PRIu64 ") lies past end of file (%zu bytes)", quote(&t->name, qbuf, sizeof qbuf),
                    t->offset, start, g->size);
            return -1;
        }
        if (t->nbytes > avail - t->offset) {
            uint64_t from = start + t->offset;
            uint64_t to = t->nbytes > UINT64_MAX - from ? UINT64_MAX : from + t->nbytes;
            set_err(err, errlen, g->path, "tensor '%s': data [%" PRIu64 ", %" PRIu64
                    ") extends past end of file (%zu bytes)", quote(&t->name, qbuf, sizeof qbuf),
                    from, to, g->size);
            return -1;
        }
        t->data = g->map + start + t->offset;
    }
    return 0;
}

static int parse(eng_gguf *g, char *err, size_t errlen) {
    cursor c = {.base = g->map, .size = g->size, .path = g->path, .err = err, .errlen = errlen};
    char magic[4];
    if (g->size < GGUF_HEADER_BYTES) {
        set_err(err, errlen, g->path, "file is %zu bytes, too small for a GGUF header (%d bytes)",
                g->size, GGUF_HEADER_BYTES);
        return -1;
    }
    cur_read(&c, magic, 4, "magic");
    if (memcmp(magic, GGUF_MAGIC, 4) != 0) {
        set_err(err, errlen, g->path, "not a GGUF file: magic is %02x %02x %02x %02x, expected \"GGUF\"",
                (unsigned char)magic[0], (unsigned char)magic[1], (unsigned char)magic[2],
                (unsigned char)magic[3]);
        return -1;
    }
    cur_u32(&c, &g->version, "version");
    if (g->version != 2 && g->version != 3) {
        uint32_t swapped = __builtin_bswap32(g->version);
        if (swapped == 2 || swapped == 3)
            set_err(err, errlen, g->path, "big-endian GGUF (version %" PRIu32 ") is not supported", swapped);
        else
            set_err(err, errlen, g->path, "GGUF version %" PRIu32 " is not supported (expected 2 or 3)",
                    g->version);
        return -1;
    }
    cur_u64(&c, &g->n_tensors, "tensor count");
    cur_u64(&c, &g->n_kv, "key-value count");
    /* smallest key-value: 8-byte length + 4-byte type + 1-byte value;
     * smallest tensor info: 8-byte length + n_dims + type + offset */
    if (g->n_kv > cur_left(&c) / 13) {
        set_err(err, errlen, g->path, "key-value count %" PRIu64 " cannot fit in the file (%zu bytes)",
                g->n_kv, g->size);
        return -1;
    }
    if (g->n_tensors > cur_left(&c) / 24) {
        set_err(err, errlen, g->path, "tensor count %" PRIu64 " cannot fit in the file (%zu bytes)",
                g->n_tensors, g->size);
        return -1;
    }
    g->kvs = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kvs);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    if (g->kvs == NULL || g->tensors == NULL || index_init(&g->kv_index, g->n_kv) != 0 ||
        index_init(&g->tensor_index, g->n_tensors) != 0) {
        set_err(err, errlen, g->path, "out of memory");
        return -1;
    }
    for (uint64_t i = 0; i < g->n_kv; i++)
        if (parse_kv(g, &c, i) != 0)
            return -1;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        if (parse_tensor_info(g, &c, i) != 0)
            return -1;
    if (read_alignment(g, err, errlen) != 0)
        return -1;
    return place_tensors(g, c.pos, err, errlen);
}

/* ---- open / close -------------------------------------------------------- */

eng_gguf *eng_gguf_open(const char *path, char *err, size_t errlen) {
    if (err && errlen)
        err[0] = '\0';
    eng_gguf *g = calloc(1, sizeof *g);
    if (g == NULL || (g->path = strdup(path)) == NULL) {
        free(g);
        set_err(err, errlen, path, "out of memory");
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        set_err(err, errlen, path, "cannot open: %s", strerror(errno));
        eng_gguf_close(g);
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        set_err(err, errlen, path, "not a regular file");
        close(fd);
        eng_gguf_close(g);
        return NULL;
    }
    g->size = (size_t)st.st_size;
    if (g->size >= GGUF_HEADER_BYTES) {
        void *p = mmap(NULL, g->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            set_err(err, errlen, path, "cannot map %zu bytes: %s", g->size, strerror(errno));
            close(fd);
            eng_gguf_close(g);
            return NULL;
        }
        g->map = p;
    }
    close(fd);
    if (parse(g, err, errlen) != 0) {
        eng_gguf_close(g);
        return NULL;
    }
    return g;
}

void eng_gguf_close(eng_gguf *g) {
    if (g == NULL)
        return;
    if (g->kvs)
        for (uint64_t i = 0; i < g->n_kv; i++)
            free(g->kvs[i].str_elems);
    free(g->kvs);
    free(g->tensors);
    free(g->kv_index.slots);
    free(g->tensor_index.slots);
    if (g->map)
        munmap((void *)g->map, g->size);
    free(g->path);
    free(g);
}

/* ---- accessors ----------------------------------------------------------- */

const char *eng_gguf_path(const eng_gguf *g) { return g->path; }
uint32_t eng_gguf_version(const eng_gguf *g) { return g->version; }
uint64_t eng_gguf_n_kv(const eng_gguf *g) { return g->n_kv; }
uint64_t eng_gguf_n_tensors(const eng_gguf *g) { return g->n_tensors; }

const eng_gguf_kv *eng_gguf_kv_at(const eng_gguf *g, uint64_t i) {
    return i < g->n_kv ? &g->kvs[i].kv : NULL;
}

const eng_gguf_tensor *eng_gguf_tensor_at(const eng_gguf *g, uint64_t i) {
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const eng_gguf_kv *eng_gguf_find(const eng_gguf *g, const char *key) {
    int64_t i = index_find(&g->kv_index, g, kv_name, key, strlen(key), NULL);
    return i < 0 ? NULL : &g->kvs[i].kv;
}

const eng_gguf_tensor *eng_gguf_find_tensor(const eng_gguf *g, const char *name) {
    int64_t i = index_find(&g->tensor_index, g, tensor_name, name, strlen(name), NULL);
    return i < 0 ? NULL : &g->tensors[i];
}

/* Describes a kv's type for messages: "uint32", "array of string". */
static const char *type_desc(const eng_gguf_kv *kv, char *buf, size_t cap) {
    if (kv->type == ENG_GGUF_ARRAY)
        snprintf(buf, cap, "array of %s", eng_gguf_vtype_name(kv->arr_type));
    else
        snprintf(buf, cap, "%s", eng_gguf_vtype_name(kv->type));
    return buf;
}

int eng_gguf_get_u32(const eng_gguf *g, const char *key, uint32_t *out, char *err, size_t errlen) {
    const eng_gguf_kv *kv = eng_gguf_find(g, key);
    if (kv == NULL)
        return 1;
    char tbuf[40];
    if (!vtype_is_int(kv->type)) {
        set_err(err, errlen, g->path, "key '%s': expected an unsigned 32-bit integer, found %s",
                key, type_desc(kv, tbuf, sizeof tbuf));
        return -1;
    }
    if (vtype_is_signed(kv->type) ? (kv->v.i64 < 0 || kv->v.i64 > (int64_t)UINT32_MAX)
                                  : kv->v.u64 > UINT32_MAX) {
        if (vtype_is_signed(kv->type))
            set_err(err, errlen, g->path, "key '%s': expected an unsigned 32-bit integer, found %s %" PRId64,
                    key, eng_gguf_vtype_name(kv->type), kv->v.i64);
        else
            set_err(err, errlen, g->path, "key '%s': expected an unsigned 32-bit integer, found %s %" PRIu64,
                    key, eng_gguf_vtype_name(kv->type), kv->v.u64);
        return -1;
    }
    *out = (uint32_t)kv->v.u64;
    return 0;
}

int eng_gguf_get_f32(const eng_gguf *g, const char *key, float *out, char *err, size_t errlen) {
    const eng_gguf_kv *kv = eng_gguf_find(g, key);
    if (kv == NULL)
        return 1;
    char tbuf[40];
    if (kv->type == ENG_GGUF_FLOAT32 || kv->type == ENG_GGUF_FLOAT64)
        *out = (float)kv->v.f64;
    else if (vtype_is_int(kv->type))
        *out = vtype_is_signed(kv->type) ? (float)kv->v.i64 : (float)kv->v.u64;
    else {
        set_err(err, errlen, g->path, "key '%s': expected a number, found %s", key,
                type_desc(kv, tbuf, sizeof tbuf));
        return -1;
    }
    return 0;
}

int eng_gguf_get_bool(const eng_gguf *g, const char *key, int *out, char *err, size_t errlen) {
    const eng_gguf_kv *kv = eng_gguf_find(g, key);
    if (kv == NULL)
        return 1;
    char tbuf[40];
    if (kv->type != ENG_GGUF_BOOL) {
        set_err(err, errlen, g->path, "key '%s': expected bool, found %s", key,
                type_desc(kv, tbuf, sizeof tbuf));
        return -1;
    }
    *out = kv->v.boolean;
    return 0;
}

int eng_gguf_get_str(const eng_gguf *g, const char *key, char **out, char *err, size_t errlen) {
    const eng_gguf_kv *kv = eng_gguf_find(g, key);
    if (kv == NULL)
        return 1;
    char tbuf[40];
    if (kv->type != ENG_GGUF_STRING) {
        set_err(err, errlen, g->path, "key '%s': expected string, found %s", key,
                type_desc(kv, tbuf, sizeof tbuf));
        return -1;
    }
    char *s = malloc((size_t)kv->v.str.len + 1);
    if (s == NULL) {
        set_err(err, errlen, g->path, "key '%s': out of memory copying %" PRIu64 " bytes",
                key, kv->v.str.len);
        return -1;
    }
    memcpy(s, kv->v.str.ptr, (size_t)kv->v.str.len);
    s[kv->v.str.len] = '\0';
    *out = s;
    return 0;
}

/* Array accessors. kv must come from this reader (kv_at / find): the string
 * index lives beside it. A wrong element type or an index out of range is a
 * caller bug; they return an empty string / 0 rather than read out of bounds. */
eng_gguf_str eng_gguf_arr_str(const eng_gguf_kv *kv, uint64_t i) {
    eng_gguf_str s = {NULL, 0};
    if (kv->type != ENG_GGUF_ARRAY || kv->arr_type != ENG_GGUF_STRING || i >= kv->arr_len)
        return s;
    const kv_entry *e = (const kv_entry *)kv;
    const uint8_t *p = e->str_elems[i];
    memcpy(&s.len, p, 8);
    s.ptr = (const char *)p + 8;
    return s;
}

/* Element i of a numeric array, in whichever field its type widens into. */
static bool arr_elem(const eng_gguf_kv *kv, uint64_t i, int64_t *iv, double *fv) {
    if (kv->type != ENG_GGUF_ARRAY || i >= kv->arr_len || (unsigned)kv->arr_type >= GGUF_VTYPE_COUNT)
        return false;
    size_t esz = vtype_size[kv->arr_type];
    if (esz == 0)
        return false;
    const uint8_t *p = (const uint8_t *)kv->arr_data + i * esz;
    switch (kv->arr_type) {
    case ENG_GGUF_UINT8:  *iv = p[0]; break;
    case ENG_GGUF_BOOL:   *iv = p[0]; break;
    case ENG_GGUF_INT8:   *iv = (int8_t)p[0]; break;
    case ENG_GGUF_UINT16: { uint16_t v; memcpy(&v, p, 2); *iv = v; break; }
    case ENG_GGUF_INT16:  { int16_t v;  memcpy(&v, p, 2); *iv = v; break; }
    case ENG_GGUF_UINT32: { uint32_t v; memcpy(&v, p, 4); *iv = v; break; }
    case ENG_GGUF_INT32:  { int32_t v;  memcpy(&v, p, 4); *iv = v; break; }
    case ENG_GGUF_UINT64: { uint64_t v; memcpy(&v, p, 8); *iv = (int64_t)v; *fv = (double)v; return true; }
    case ENG_GGUF_INT64:  { int64_t v;  memcpy(&v, p, 8); *iv = v; break; }
    case ENG_GGUF_FLOAT32: { float v;   memcpy(&v, p, 4); *fv = v; *iv = 0; return true; }
    case ENG_GGUF_FLOAT64: { double v;  memcpy(&v, p, 8); *fv = v; *iv = 0; return true; }
    default: return false;
    }
    *fv = (double)*iv;
    return true;
}

int64_t eng_gguf_arr_int(const eng_gguf_kv *kv, uint64_t i) {
    int64_t iv = 0;
    double fv = 0;
    if (!arr_elem(kv, i, &iv, &fv))
        return 0;
    if (kv->arr_type == ENG_GGUF_FLOAT32 || kv->arr_type == ENG_GGUF_FLOAT64)
        return 0;
    return iv;
}

double eng_gguf_arr_float(const eng_gguf_kv *kv, uint64_t i) {
    int64_t iv = 0;
    double fv = 0;
    return arr_elem(kv, i, &iv, &fv) ? fv : 0.0;
}
