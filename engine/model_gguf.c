/* model_gguf.c: builds an eng_model from a GGUF file (llama.cpp's format).
 *
 * Architectures: "llama" and "mistral" (RoPE NORM: the converter permuted Q/K
 * for adjacent-pair rotation), "qwen2" (RoPE NEOX, Q/K/V biases) and "gpt2"
 * (LayerNorm, learned positions, fused QKV). Config comes from the
 * {arch}.* keys, the vocabulary size from tokenizer.ggml.tokens. Every tensor's
 * shape is checked against the config here, with the tensor's GGUF name in
 * the message; a tensor the loader does not consume is an error too (it means
 * a model variant kvserve would silently run wrong).
 *
 * Weights stay in the mapping (owned = false) except fused ones: Q/K/V and
 * gate/up become one owned matrix each (eng_tensor_concat_rows). The mapping
 * lives as long as the model: m->release closes it. */
#include "engine/model.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/tokenizer.h"

/* Sanity bounds on config values, so a corrupt file cannot ask for absurd
 * allocations before any tensor is checked. */
#define MAX_LAYERS 1024
#define MAX_DIM (1 << 20)
#define MAX_HEADS 4096
#define MAX_CTX (1 << 24)

typedef struct {
    eng_gguf *g;
    const char *path;
    const char *arch;          /* the GGUF architecture name: key prefix */
    bool *used;                /* (n_tensors) consumed by the loader */
    char *err;
    size_t errlen;
} loader;

__attribute__((format(printf, 2, 3)))
static int fail(loader *L, const char *fmt, ...) {
    if (L->err == NULL || L->errlen == 0)
        return -1;
    int n = snprintf(L->err, L->errlen, "%s: ", L->path);
    if (n >= 0 && (size_t)n < L->errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(L->err + n, L->errlen - (size_t)n, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* ---- config keys --------------------------------------------------------- */

static void arch_key(const loader *L, const char *suffix, char *key, size_t cap) {
    snprintf(key, cap, "%s.%s", L->arch, suffix);
}

/* Reads {arch}.suffix as an integer in [lo, hi]. Absent: *out keeps its
 * preset value, or an error when required. */
static int key_int(loader *L, const char *suffix, bool required, int lo, int hi, int *out) {
    char key[128];
    arch_key(L, suffix, key, sizeof key);
    uint32_t v;
    int rc = eng_gguf_get_u32(L->g, key, &v, L->err, L->errlen);
    if (rc < 0)
        return -1;
    if (rc == 1)
        return required ? fail(L, "key '%s' is missing", key) : 0;
    if (v < (uint32_t)lo || v > (uint32_t)hi)
        return fail(L, "key '%s': %" PRIu32 " is out of range (expected %d..%d)", key, v, lo, hi);
    *out = (int)v;
    return 0;
}

static int key_float(loader *L, const char *suffix, float *out) {
    char key[128];
    arch_key(L, suffix, key, sizeof key);
    float v;
    int rc = eng_gguf_get_f32(L->g, key, &v, L->err, L->errlen);
    if (rc < 0)
        return -1;
    if (rc == 0) {
        if (!isfinite(v) || v < 0)
            return fail(L, "key '%s': %g is not a finite non-negative number", key, (double)v);
        *out = v;
    }
    return 0;
}

/* ---- tensors ------------------------------------------------------------- */

/* Finds a tensor of shape (ne0) when ne1 == 0 (a vector; stored 1-D or as
 * {ne0, 1}) or (ne0, ne1), and views it. Absent and not required: *out is
 * left empty (data == NULL). */
static int take(loader *L, const char *name, int64_t ne0, int64_t ne1, bool required, eng_tensor *out) {
    const eng_gguf_tensor *t = eng_gguf_find_tensor(L->g, name);
    memset(out, 0, sizeof *out);
    if (t == NULL)
        return required ? fail(L, "tensor '%s' is missing (the %s loader needs it)", name, L->arch) : 0;
    L->used[t - eng_gguf_tensor_at(L->g, 0)] = true;
    bool ok = t->ne[0] == ne0 && t->ne[1] == (ne1 ? ne1 : 1) && t->ne[2] == 1 && t->ne[3] == 1;
    if (!ok) {
        char want[64];
        if (ne1)
            snprintf(want, sizeof want, "{%" PRId64 ", %" PRId64 "}", ne0, ne1);
        else
            snprintf(want, sizeof want, "{%" PRId64 "}", ne0);
        return fail(L, "tensor '%s': shape {%" PRId64 ", %" PRId64 ", %" PRId64 ", %" PRId64
                    "}, expected %s", name, t->ne[0], t->ne[1], t->ne[2], t->ne[3], want);
    }
    *out = (eng_tensor){
        .type = t->type,
        .ne = {t->ne[0], t->ne[1]},
        .data = (void *)t->data,  /* read-only mapping: nothing writes weights in place */
        .owned = false,
    };
    return 0;
}

static int take_layer(loader *L, int layer, const char *what, int64_t ne0, int64_t ne1, bool required,
                      eng_tensor *out) {
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s", layer, what);
    return take(L, name, ne0, ne1, required, out);
}

/* Fuses parts into one owned tensor; names the layer on error. */
static int fuse(loader *L, int layer, const char *what, const eng_tensor *parts, int n, eng_tensor *out) {
    char msg[256];
    if (eng_tensor_concat_rows(parts, n, out, msg, sizeof msg) != 0)
        return fail(L, "blk.%d %s: %s", layer, what, msg);
    return 0;
}

/* ---- configuration ------------------------------------------------------- */

/* Llama 3 stores its RoPE scaling as per-dimension frequency factors
 * (rope_freqs.weight) computed from (factor, low_freq_factor,
 * high_freq_factor, original context). kvserve's config holds those four
 * numbers, so recover them: try the published parameter sets and accept the
 * one that reproduces every factor. */
static double llama3_factor(double theta, int rope_dim, int i, double factor, double low, double high,
                            double orig) {
    double freq = 1.0 / pow(theta, (double)(2 * i) / rope_dim);
    double wavelen = 2.0 * M_PI / freq;
    if (wavelen < orig / high)
        return 1.0;
    if (wavelen > orig / low)
        return factor;
    double smooth = (orig / wavelen - low) / (high - low);
    return 1.0 / ((1.0 - smooth) / factor + smooth);
}

static int read_rope_freqs(loader *L, eng_model_config *c) {
    const char *name = "rope_freqs.weight";
    const eng_gguf_tensor *t = eng_gguf_find_tensor(L->g, name);
    if (t == NULL)
        return 0;
    eng_tensor view;
    if (take(L, name, c->rope_dim / 2, 0, true, &view) != 0)
        return -1;
    if (view.type != ENG_F32)
        return fail(L, "tensor '%s': type %s, expected f32", name, eng_dtype_name(view.type));
    const float *f = view.data;
    const int n = c->rope_dim / 2;
    double factor = f[n - 1];
    bool all_one = true;
    for (int i = 0; i < n; i++)
        all_one &= f[i] == 1.0f;
    if (all_one)
        return 0;
    static const double lows_highs[][2] = {{1, 4}, {1, 2}, {2, 4}, {1, 8}};
    int origs[] = {c->rope_orig_ctx, 8192, 4096, 2048, 16384, 32768, 65536, 131072};
    for (size_t o = 0; o < sizeof origs / sizeof origs[0]; o++) {
        if (origs[o] <= 0)
            continue;
        for (size_t k = 0; k < sizeof lows_highs / sizeof lows_highs[0]; k++) {
            bool match = true;
            for (int i = 0; i < n && match; i++) {
                double want = llama3_factor(c->rope_theta, c->rope_dim, i, factor, lows_highs[k][0],
                                            lows_highs[k][1], origs[o]);
                match = fabs((double)f[i] - want) <= 1e-4 * want;
            }
            if (match) {
                c->rope_scaling = ENG_ROPE_SCALING_LLAMA3;
                c->rope_factor = (float)factor;
                c->rope_low_freq_factor = (float)lows_highs[k][0];
                c->rope_high_freq_factor = (float)lows_highs[k][1];
                c->rope_orig_ctx = origs[o];
                return 0;
            }
        }
    }
    return fail(L, "tensor '%s': per-dimension RoPE frequency factors that do not follow the Llama 3 "
                "rule (factor %g) are not supported", name, factor);
}

static int read_rope_scaling(loader *L, eng_model_config *c) {
    char key[128], *type = NULL;
    if (key_int(L, "rope.scaling.original_context_length", false, 1, MAX_CTX, &c->rope_orig_ctx))
        return -1;
    arch_key(L, "rope.scaling.type", key, sizeof key);
    int rc = eng_gguf_get_str(L->g, key, &type, L->err, L->errlen);
    if (rc < 0)
        return -1;
    float factor = 0;
    if (key_float(L, "rope.scaling.factor", &factor) != 0) {
        free(type);
        return -1;
    }
    if (rc == 1) {
        float linear = 0;  /* the older key of linear scaling */
        if (key_float(L, "rope.scale_linear", &linear) != 0)
            return -1;
        if (linear > 0 && linear != 1.0f) {
            c->rope_scaling = ENG_ROPE_SCALING_LINEAR;
            c->rope_factor = linear;
        }
    } else if (strcmp(type, "none") == 0) {
        /* nothing */
    } else if (strcmp(type, "linear") == 0) {
        if (!(factor > 0)) {
            free(type);
            arch_key(L, "rope.scaling.factor", key, sizeof key);
            return fail(L, "linear RoPE scaling needs key '%s' > 0", key);
        }
        c->rope_scaling = factor == 1.0f ? ENG_ROPE_SCALING_NONE : ENG_ROPE_SCALING_LINEAR;
        c->rope_factor = factor;
    } else {
        fail(L, "key '%s': RoPE scaling '%s' is not supported (expected none or linear)", key, type);
        free(type);
        return -1;
    }
    free(type);
    return read_rope_freqs(L, c);
}

static int read_config(loader *L, eng_model_config *c, bool gpt2, bool neox) {
    memset(c, 0, sizeof *c);
    c->arch = gpt2 ? ENG_ARCH_GPT2 : ENG_ARCH_LLAMA;
    if (key_int(L, "block_count", true, 1, MAX_LAYERS, &c->n_layer) ||
        key_int(L, "embedding_length", true, 1, MAX_DIM, &c->n_embd) ||
        key_int(L, "feed_forward_length", true, 1, MAX_DIM, &c->n_ff) ||
        key_int(L, "attention.head_count", true, 1, MAX_HEADS, &c->n_head) ||
        key_int(L, "context_length", true, 1, MAX_CTX, &c->n_ctx_train))
        return -1;
    c->n_kv_head = c->n_head;
    if (key_int(L, "attention.head_count_kv", false, 1, c->n_head, &c->n_kv_head))
        return -1;
    if (c->n_head % c->n_kv_head != 0)
        return fail(L, "%d attention heads are not a multiple of %d kv heads", c->n_head, c->n_kv_head);
    c->head_dim = 0;
    if (key_int(L, "attention.key_length", false, 1, MAX_DIM, &c->head_dim))
        return -1;
    if (c->head_dim == 0) {
        if (c->n_embd % c->n_head != 0)
            return fail(L, "embedding length %d is not a multiple of %d heads (and no %s.attention.key_length)",
                        c->n_embd, c->n_head, L->arch);
        c->head_dim = c->n_embd / c->n_head;
    }
    int value_len = c->head_dim;
    if (key_int(L, "attention.value_length", false, 1, MAX_DIM, &value_len))
        return -1;
    if (value_len != c->head_dim)
        return fail(L, "key length %d differs from value length %d: not supported", c->head_dim, value_len);

    char key[128];
    c->norm_eps = 1e-5f;
    if (key_float(L, gpt2 ? "attention.layer_norm_epsilon" : "attention.layer_norm_rms_epsilon", &c->norm_eps))
        return -1;
    if (gpt2)
        return 0;
    c->rope_style = neox ? ENG_ROPE_NEOX : ENG_ROPE_NORM;
    c->rope_theta = 10000.0f;
    if (key_float(L, "rope.freq_base", &c->rope_theta))
        return -1;
    if (!(c->rope_theta > 0)) {
        arch_key(L, "rope.freq_base", key, sizeof key);
        return fail(L, "key '%s': %g is not positive", key, (double)c->rope_theta);
    }
    c->rope_dim = c->head_dim;
    if (key_int(L, "rope.dimension_count", false, 2, c->head_dim, &c->rope_dim))
        return -1;
    if (c->rope_dim % 2 != 0) {
        arch_key(L, "rope.dimension_count", key, sizeof key);
        return fail(L, "key '%s': %d is odd", key, c->rope_dim);
    }
    return read_rope_scaling(L, c);
}

/* ---- tensors per architecture -------------------------------------------- */

static int load_llama_layer(loader *L, const eng_model_config *c, int i, eng_layer *l) {
    const int64_t e = c->n_embd, q = (int64_t)c->n_head * c->head_dim, kv = (int64_t)c->n_kv_head * c->head_dim;
    eng_tensor qkv[3], qkv_b[3], gate_up[2];
    if (take_layer(L, i, "attn_norm.weight", e, 0, true, &l->attn_norm) ||
        take_layer(L, i, "attn_q.weight", e, q, true, &qkv[0]) ||
        take_layer(L, i, "attn_k.weight", e, kv, true, &qkv[1]) ||
        take_layer(L, i, "attn_v.weight", e, kv, true, &qkv[2]) ||
        take_layer(L, i, "attn_q.bias", q, 0, false, &qkv_b[0]) ||
        take_layer(L, i, "attn_k.bias", kv, 0, false, &qkv_b[1]) ||
        take_layer(L, i, "attn_v.bias", kv, 0, false, &qkv_b[2]) ||
        take_layer(L, i, "attn_output.weight", q, e, true, &l->wo) ||
        take_layer(L, i, "attn_output.bias", e, 0, false, &l->bo) ||
        take_layer(L, i, "ffn_norm.weight", e, 0, true, &l->ffn_norm) ||
        take_layer(L, i, "ffn_gate.weight", e, c->n_ff, true, &gate_up[0]) ||
        take_layer(L, i, "ffn_up.weight", e, c->n_ff, true, &gate_up[1]) ||
        take_layer(L, i, "ffn_down.weight", c->n_ff, e, true, &l->w_down))
        return -1;
    int n_bias = (qkv_b[0].data != NULL) + (qkv_b[1].data != NULL) + (qkv_b[2].data != NULL);
    if (n_bias != 0 && n_bias != 3)
        return fail(L, "blk.%d: attn_q/k/v biases must all be present or all absent (found %d of 3)", i, n_bias);
    if (fuse(L, i, "attn_q/k/v.weight", qkv, 3, &l->wqkv) ||
        (n_bias == 3 && fuse(L, i, "attn_q/k/v.bias", qkv_b, 3, &l->bqkv)) ||
        fuse(L, i, "ffn_gate/up.weight", gate_up, 2, &l->w_gate_up))
        return -1;
    return 0;
}

static int load_gpt2_layer(loader *L, const eng_model_config *c, int i, eng_layer *l) {
    const int64_t e = c->n_embd, q = (int64_t)c->n_head * c->head_dim, kv = (int64_t)c->n_kv_head * c->head_dim;
    if (take_layer(L, i, "attn_norm.weight", e, 0, true, &l->attn_norm) ||
        take_layer(L, i, "attn_norm.bias", e, 0, true, &l->attn_norm_b) ||
        take_layer(L, i, "attn_qkv.weight", e, q + 2 * kv, true, &l->wqkv) ||
        take_layer(L, i, "attn_qkv.bias", q + 2 * kv, 0, true, &l->bqkv) ||
        take_layer(L, i, "attn_output.weight", q, e, true, &l->wo) ||
        take_layer(L, i, "attn_output.bias", e, 0, true, &l->bo) ||
        take_layer(L, i, "ffn_norm.weight", e, 0, true, &l->ffn_norm) ||
        take_layer(L, i, "ffn_norm.bias", e, 0, true, &l->ffn_norm_b) ||
        take_layer(L, i, "ffn_up.weight", e, c->n_ff, true, &l->w_up) ||
        take_layer(L, i, "ffn_up.bias", c->n_ff, 0, true, &l->b_up) ||
        take_layer(L, i, "ffn_down.weight", c->n_ff, e, true, &l->w_down) ||
        take_layer(L, i, "ffn_down.bias", e, 0, true, &l->b_down))
        return -1;
    return 0;
}

static int load_tensors(loader *L, eng_model *m, bool gpt2) {
    const eng_model_config *c = &m->cfg;
    if (take(L, "token_embd.weight", c->n_embd, c->n_vocab, true, &m->tok_embd) ||
        take(L, "output.weight", c->n_embd, c->n_vocab, false, &m->output) ||
        take(L, "output_norm.weight", c->n_embd, 0, true, &m->out_norm) ||
        (gpt2 && (take(L, "output_norm.bias", c->n_embd, 0, true, &m->out_norm_b) ||
                  take(L, "position_embd.weight", c->n_embd, c->n_ctx_train, true, &m->pos_embd))))
        return -1;
    m->cfg.tied_embeddings = m->output.data == NULL;
    for (int i = 0; i < c->n_layer; i++)
        if ((gpt2 ? load_gpt2_layer : load_llama_layer)(L, c, i, &m->layers[i]) != 0)
            return -1;
    for (uint64_t i = 0; i < eng_gguf_n_tensors(L->g); i++)
        if (!L->used[i]) {
            const eng_gguf_tensor *t = eng_gguf_tensor_at(L->g, i);
            return fail(L, "tensor '%.*s' is not used by the %s loader: this model variant is not supported",
                        (int)(t->name.len > 200 ? 200 : t->name.len), t->name.ptr, L->arch);
        }
    return 0;
}

/* ---- entry point --------------------------------------------------------- */

static void release_gguf(void *ctx) { eng_gguf_close(ctx); }

static char *base_name(const char *path) {
    const char *slash = strrchr(path, '/');
    return strdup(slash ? slash + 1 : path);
}

eng_model *eng_model_load_gguf(const char *path, char *err, size_t errlen) {
    eng_gguf *g = eng_gguf_open(path, err, errlen);
    if (g == NULL)
        return NULL;
    loader L = {.g = g, .path = path, .err = err, .errlen = errlen};
    char *arch = NULL;
    eng_model *m = calloc(1, sizeof *m);
    L.used = calloc(eng_gguf_n_tensors(g) + 1, sizeof *L.used);
    if (m == NULL || L.used == NULL) {
        fail(&L, "out of memory");
        free(m);
        free(L.used);
        eng_gguf_close(g);
        return NULL;
    }
    m->release = release_gguf;
    m->release_ctx = g;

    int rc = eng_gguf_get_str(g, "general.architecture", &arch, err, errlen);
    if (rc == 1)
        fail(&L, "key 'general.architecture' is missing");
    if (rc != 0)
        goto fail;
    L.arch = arch;
    bool gpt2 = strcmp(arch, "gpt2") == 0, neox = strcmp(arch, "qwen2") == 0;
    if (!gpt2 && !neox && strcmp(arch, "llama") != 0 && strcmp(arch, "mistral") != 0) {
        fail(&L, "architecture '%s' is not supported (kvserve loads llama, mistral, qwen2, gpt2)", arch);
        goto fail;
    }
    if (read_config(&L, &m->cfg, gpt2, neox) != 0)
        goto fail;

    const eng_gguf_kv *tokens = eng_gguf_find(g, "tokenizer.ggml.tokens");
    if (tokens == NULL || tokens->type != ENG_GGUF_ARRAY || tokens->arr_type != ENG_GGUF_STRING ||
        tokens->arr_len == 0 || tokens->arr_len > INT32_MAX) {
        fail(&L, "key 'tokenizer.ggml.tokens': expected a non-empty array of strings, found %s",
             tokens == NULL ? "nothing" : tokens->type == ENG_GGUF_ARRAY ? "another array" : eng_gguf_vtype_name(tokens->type));
        goto fail;
    }
    m->cfg.n_vocab = (int)tokens->arr_len;

    int n_layer = m->cfg.n_layer;
    m->layers = calloc((size_t)n_layer, sizeof *m->layers);
    if (m->layers == NULL) {
        fail(&L, "out of memory for %d layers", n_layer);
        goto fail;
    }
    if (load_tensors(&L, m, gpt2) != 0)
        goto fail;

    m->tok = eng_tokenizer_from_gguf(g, err, errlen);
    if (m->tok == NULL)
        goto fail;
    if (eng_gguf_get_str(g, "tokenizer.chat_template", &m->chat_template, err, errlen) < 0 ||
        eng_gguf_get_str(g, "general.name", &m->name, err, errlen) < 0)
        goto fail;
    if (m->name == NULL && (m->name = base_name(path)) == NULL) {
        fail(&L, "out of memory");
        goto fail;
    }
    if ((m->path = strdup(path)) == NULL) {
        fail(&L, "out of memory");
        goto fail;
    }
    char msg[512];
    if (eng_model_finish(m, msg, sizeof msg) != 0) {
        fail(&L, "%s", msg);
        goto fail;
    }
    free(arch);
    free(L.used);
    return m;

fail:
    free(arch);
    free(L.used);
    eng_model_free(m);  /* releases the mapping */
    return NULL;
}
