/* model_hf.c: loads a Hugging Face model directory (config.json, safetensors
 * weights single or sharded, tokenizer files) into an eng_model.
 *
 * Architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM (the
 * llama family: RMSNorm, SwiGLU, NEOX-style RoPE as HF checkpoints store Q/K)
 * and GPT2LMHeadModel. Config fields and their defaults follow transformers'
 * config classes, in both the v4 layout (rope_theta, rope_scaling) and the v5
 * one (rope_parameters). Every tensor's shape is checked against the config
 * before use. Weights stay in their file dtype and, where they can, in the
 * mapping: F32/F16/BF16 views are handed to eng_model_finish() as they are;
 * fused matrices (wqkv, w_gate_up, bqkv) and GPT-2's transposed Conv1D weights
 * are owned copies. The mappings live until eng_model_free (m->release).
 *
 * Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is
 * not computed; instead the model's context (n_ctx_train) is capped at the
 * window, inside which sliding-window and full attention are identical. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/model.h"
#include "engine/safetensors.h"
#include "engine/tokenizer.h"
#include "engine/util.h"

typedef enum { HF_LLAMA, HF_MISTRAL, HF_QWEN2, HF_GPT2 } hf_kind;

static const struct {
    const char *arch;        /* config.json "architectures" */
    const char *model_type;  /* config.json "model_type" */
    hf_kind kind;
    int default_ctx;         /* the config class's max_position_embeddings */
} hf_archs[] = {
    {"LlamaForCausalLM", "llama", HF_LLAMA, 2048},
    {"MistralForCausalLM", "mistral", HF_MISTRAL, 131072},
    {"Qwen2ForCausalLM", "qwen2", HF_QWEN2, 32768},
    {"GPT2LMHeadModel", "gpt2", HF_GPT2, 1024},
};
#define HF_N_ARCHS (sizeof hf_archs / sizeof hf_archs[0])
#define HF_SUPPORTED "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel"

/* The largest dimension accepted from a config: keeps every product of two
 * dims far from overflow and rejects nonsense early. */
#define HF_MAX_DIM (1 << 24)

typedef struct {
    int arch;                 /* index into hf_archs */
    bool qkv_bias, o_bias;    /* llama family: which attention biases the file has */
    eng_model_config cfg;
} hf_config;

/* Where config values come from, for messages: "<file>: <ctx><key>: ...". */
typedef struct {
    const char *file;
    char *err;
    size_t errlen;
} hf_src;

/* A JSON value as compact text for "found ..." (at most 40 characters). */
static void hf_found(const json_t *v, char *buf, size_t cap)
{
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    snprintf(buf, cap, "%.40s%s", s ? s : "?", s && strlen(s) > 40 ? "..." : "");
    free(s);
}

/* ---- config fields ------------------------------------------------------ */

/* Each getter: absent or null -> the default (or an error when required);
 * present with a wrong type or out of range -> an error naming the field. */
static int hf_int(const hf_src *s, json_t *obj, const char *ctx, const char *key, bool required,
                  int def, int lo, int hi, int *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required) {
            eng_seterr(s->err, s->errlen, "%s: missing field '%s%s'", s->file, ctx, key);
            return -1;
        }
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char f[64];
        hf_found(v, f, sizeof f);
        eng_seterr(s->err, s->errlen, "%s: field '%s%s': expected an integer in [%d, %d], found %s",
                s->file, ctx, key, lo, hi, f);
        return -1;
    }
    *out = (int)json_integer_value(v);
    return 0;
}

/* Floats must be finite and > 0 (every one we read is a scale or epsilon). */
static int hf_float(const hf_src *s, json_t *obj, const char *ctx, const char *key, bool required,
                    double def, float *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        if (required) {
            eng_seterr(s->err, s->errlen, "%s: missing field '%s%s'", s->file, ctx, key);
            return -1;
        }
        *out = (float)def;
        return 0;
    }
    double d = json_is_number(v) ? json_number_value(v) : NAN;
    if (!(isfinite(d) && d > 0 && d < 1e30)) {
        char f[64];
        hf_found(v, f, sizeof f);
        eng_seterr(s->err, s->errlen, "%s: field '%s%s': expected a positive number, found %s",
                s->file, ctx, key, f);
        return -1;
    }
    *out = (float)d;
    return 0;
}

static int hf_bool(const hf_src *s, json_t *obj, const char *key, bool def, bool *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_boolean(v)) {
        char f[64];
        hf_found(v, f, sizeof f);
        eng_seterr(s->err, s->errlen, "%s: field '%s': expected true or false, found %s", s->file, key, f);
        return -1;
    }
    *out = json_is_true(v);
    return 0;
}

/* *out points into the JSON (valid while obj lives). */
static int hf_str(const hf_src *s, json_t *obj, const char *ctx, const char *key, const char *def,
                  const char **out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return 0;
    }
    if (!json_is_string(v)) {
        char f[64];
        hf_found(v, f, sizeof f);
        eng_seterr(s->err, s->errlen, "%s: field '%s%s': expected a string, found %s", s->file, ctx, key, f);
        return -1;
    }
    *out = json_string_value(v);
    return 0;
}

/* "architectures" (first known entry) or else "model_type". */
static int hf_find_arch(const hf_src *s, json_t *root, int *arch)
{
    json_t *archs = json_object_get(root, "architectures");
    if (archs && !json_is_null(archs)) {
        if (!json_is_array(archs) || json_array_size(archs) == 0) {
            eng_seterr(s->err, s->errlen, "%s: field 'architectures': expected a non-empty array of names",
                    s->file);
            return -1;
        }
        size_t i;
        json_t *a;
        json_array_foreach(archs, i, a) {
            for (size_t k = 0; k < HF_N_ARCHS; k++) {
                if (json_is_string(a) && strcmp(json_string_value(a), hf_archs[k].arch) == 0) {
                    *arch = (int)k;
                    return 0;
                }
            }
        }
        char f[64];
        hf_found(archs, f, sizeof f);
        eng_seterr(s->err, s->errlen, "%s: architecture %s is not supported (supported: " HF_SUPPORTED ")",
                s->file, f);
        return -1;
    }
    const char *mt;
    if (hf_str(s, root, "", "model_type", NULL, &mt) != 0)
        return -1;
    if (!mt) {
        eng_seterr(s->err, s->errlen, "%s: neither 'architectures' nor 'model_type' is set", s->file);
        return -1;
    }
    for (size_t k = 0; k < HF_N_ARCHS; k++) {
        if (strcmp(mt, hf_archs[k].model_type) == 0) {
            *arch = (int)k;
            return 0;
        }
    }
    eng_seterr(s->err, s->errlen, "%s: model_type '%.40s' is not supported (supported: llama, mistral, qwen2, gpt2)",
            s->file, mt);
    return -1;
}

/* RoPE base and scaling: transformers v5 writes one "rope_parameters" object
 * (rope_theta inside); v4 writes "rope_theta" and an optional "rope_scaling". */
static int hf_rope(const hf_src *s, json_t *root, eng_model_config *c)
{
    json_t *params = json_object_get(root, "rope_parameters");
    const char *ctx = "rope_parameters.";
    if (params && !json_is_null(params)) {
        if (!json_is_object(params)) {
            eng_seterr(s->err, s->errlen, "%s: field 'rope_parameters': expected an object", s->file);
            return -1;
        }
        if (hf_float(s, params, ctx, "rope_theta", false, 10000.0, &c->rope_theta) != 0)
            return -1;
    } else {
        if (hf_float(s, root, "", "rope_theta", false, 10000.0, &c->rope_theta) != 0)
            return -1;
        params = json_object_get(root, "rope_scaling");
        ctx = "rope_scaling.";
        if (params && !json_is_null(params) && !json_is_object(params)) {
            eng_seterr(s->err, s->errlen, "%s: field 'rope_scaling': expected an object or null", s->file);
            return -1;
        }
    }
    c->rope_scaling = ENG_ROPE_SCALING_NONE;
    if (!params || json_is_null(params))
        return 0;
    const char *type;
    if (hf_str(s, params, ctx, "rope_type", NULL, &type) != 0)
        return -1;
    if (!type && hf_str(s, params, ctx, "type", NULL, &type) != 0)
        return -1;
    if (!type || strcmp(type, "default") == 0)
        return 0;
    if (strcmp(type, "linear") == 0) {
        c->rope_scaling = ENG_ROPE_SCALING_LINEAR;
        return hf_float(s, params, ctx, "factor", true, 0, &c->rope_factor);
    }
    if (strcmp(type, "llama3") == 0) {
        c->rope_scaling = ENG_ROPE_SCALING_LLAMA3;
        if (hf_float(s, params, ctx, "factor", true, 0, &c->rope_factor) != 0 ||
            hf_float(s, params, ctx, "low_freq_factor", true, 0, &c->rope_low_freq_factor) != 0 ||
            hf_float(s, params, ctx, "high_freq_factor", true, 0, &c->rope_high_freq_factor) != 0 ||
            hf_int(s, params, ctx, "original_max_position_embeddings", true, 0, 1, HF_MAX_DIM,
                   &c->rope_orig_ctx) != 0)
            return -1;
        if (c->rope_high_freq_factor <= c->rope_low_freq_factor) {
            eng_seterr(s->err, s->errlen, "%s: %shigh_freq_factor (%g) must be greater than low_freq_factor (%g)",
                    s->file, ctx, c->rope_high_freq_factor, c->rope_low_freq_factor);
            return -1;
        }
        return 0;
    }
    eng_seterr(s->err, s->errlen, "%s: %srope_type '%.40s' is not supported (supported: default, linear, llama3)",
            s->file, ctx, type);
    return -1;
}

/* Sliding-window attention, when a layer uses it: returns the window in
 * *window (0: none). Qwen2 v5 lists per-layer "layer_types"; v4 slides the
 * layers from max_window_layers on when use_sliding_window is set. */
static int hf_sliding_window(const hf_src *s, json_t *root, hf_kind kind, int n_layer, int *window)
{
    *window = 0;
    bool slides = false;
    json_t *types = json_object_get(root, "layer_types");
    if (types && !json_is_null(types)) {
        size_t i;
        json_t *t;
        if (!json_is_array(types) || json_array_size(types) != (size_t)n_layer) {
            eng_seterr(s->err, s->errlen, "%s: field 'layer_types': expected an array of %d layer types",
                    s->file, n_layer);
            return -1;
        }
        json_array_foreach(types, i, t) {
            const char *v = json_is_string(t) ? json_string_value(t) : "";
            if (strcmp(v, "sliding_attention") == 0) {
                slides = true;
            } else if (strcmp(v, "full_attention") != 0) {
                char f[64];
                hf_found(t, f, sizeof f);
                eng_seterr(s->err, s->errlen, "%s: field 'layer_types[%zu]': expected \"full_attention\" or "
                        "\"sliding_attention\", found %s", s->file, i, f);
                return -1;
            }
        }
    } else if (kind == HF_MISTRAL) {
        json_t *w = json_object_get(root, "sliding_window");
        slides = w && !json_is_null(w);
    } else if (kind == HF_QWEN2) {
        bool use;
        int max_window_layers;
        if (hf_bool(s, root, "use_sliding_window", false, &use) != 0 ||
            hf_int(s, root, "", "max_window_layers", false, 28, 0, HF_MAX_DIM, &max_window_layers) != 0)
            return -1;
        slides = use && max_window_layers < n_layer;
    }
    if (!slides || kind == HF_LLAMA || kind == HF_GPT2)
        return 0;
    return hf_int(s, root, "", "sliding_window", true, 0, 1, HF_MAX_DIM, window);
}

static int hf_parse_llama(const hf_src *s, json_t *root, hf_config *h)
{
    eng_model_config *c = &h->cfg;
    hf_kind kind = hf_archs[h->arch].kind;
    if (hf_int(s, root, "", "hidden_size", true, 0, 1, HF_MAX_DIM, &c->n_embd) != 0 ||
        hf_int(s, root, "", "intermediate_size", true, 0, 1, HF_MAX_DIM, &c->n_ff) != 0 ||
        hf_int(s, root, "", "num_hidden_layers", true, 0, 1, 65536, &c->n_layer) != 0 ||
        hf_int(s, root, "", "num_attention_heads", true, 0, 1, 65536, &c->n_head) != 0 ||
        hf_int(s, root, "", "num_key_value_heads", false, c->n_head, 1, 65536, &c->n_kv_head) != 0 ||
        hf_int(s, root, "", "vocab_size", true, 0, 1, HF_MAX_DIM, &c->n_vocab) != 0 ||
        hf_int(s, root, "", "max_position_embeddings", false, hf_archs[h->arch].default_ctx, 1,
               HF_MAX_DIM, &c->n_ctx_train) != 0 ||
        hf_float(s, root, "", "rms_norm_eps", false, 1e-6, &c->norm_eps) != 0 ||
        hf_bool(s, root, "tie_word_embeddings", false, &c->tied_embeddings) != 0 ||
        hf_rope(s, root, c) != 0)
        return -1;
    if (c->n_head % c->n_kv_head != 0) {
        eng_seterr(s->err, s->errlen, "%s: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)",
                s->file, c->n_head, c->n_kv_head);
        return -1;
    }
    json_t *hd = json_object_get(root, "head_dim");
    if ((!hd || json_is_null(hd)) && c->n_embd % c->n_head != 0) {
        eng_seterr(s->err, s->errlen, "%s: hidden_size (%d) is not a multiple of num_attention_heads (%d) "
                "and head_dim is not given", s->file, c->n_embd, c->n_head);
        return -1;
    }
    if (hf_int(s, root, "", "head_dim", false, c->n_embd / c->n_head, 2, 65536, &c->head_dim) != 0)
        return -1;
    if (c->head_dim % 2 != 0 || (int64_t)c->head_dim * c->n_head > HF_MAX_DIM) {
        eng_seterr(s->err, s->errlen, "%s: head_dim %d: expected an even number with head_dim * "
                "num_attention_heads <= %d", s->file, c->head_dim, HF_MAX_DIM);
        return -1;
    }

    const char *act;
    if (hf_str(s, root, "", "hidden_act", "silu", &act) != 0)
        return -1;
    if (strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0) {
        eng_seterr(s->err, s->errlen, "%s: hidden_act '%.40s' is not supported for %s (expected silu)",
                s->file, act, hf_archs[h->arch].arch);
        return -1;
    }
    float partial = 1.0f;
    if (hf_float(s, root, "", "partial_rotary_factor", false, 1.0, &partial) != 0)
        return -1;
    if (partial != 1.0f) {
        eng_seterr(s->err, s->errlen, "%s: partial_rotary_factor %g is not supported (expected 1)", s->file,
                partial);
        return -1;
    }
    bool attention_bias = false, mlp_bias = false;
    if (kind == HF_LLAMA &&
        (hf_bool(s, root, "attention_bias", false, &attention_bias) != 0 ||
         hf_bool(s, root, "mlp_bias", false, &mlp_bias) != 0))
        return -1;
    if (mlp_bias) {
        eng_seterr(s->err, s->errlen, "%s: mlp_bias true is not supported (MLP projections without bias only)",
                s->file);
        return -1;
    }
    /* LlamaAttention: q/k/v/o biases iff attention_bias; Qwen2: q/k/v always. */
    h->qkv_bias = attention_bias || kind == HF_QWEN2;
    h->o_bias = attention_bias;

    int window;
    if (hf_sliding_window(s, root, kind, c->n_layer, &window) != 0)
        return -1;
    if (window > 0 && window < c->n_ctx_train)
        c->n_ctx_train = window;

    c->arch = ENG_ARCH_LLAMA;
    c->rope_dim = c->head_dim;
    c->rope_style = ENG_ROPE_NEOX;
    return 0;
}

static int hf_parse_gpt2(const hf_src *s, json_t *root, hf_config *h)
{
    eng_model_config *c = &h->cfg;
    if (hf_int(s, root, "", "n_embd", true, 0, 1, HF_MAX_DIM, &c->n_embd) != 0 ||
        hf_int(s, root, "", "n_layer", true, 0, 1, 65536, &c->n_layer) != 0 ||
        hf_int(s, root, "", "n_head", true, 0, 1, 65536, &c->n_head) != 0 ||
        hf_int(s, root, "", "vocab_size", true, 0, 1, HF_MAX_DIM, &c->n_vocab) != 0 ||
        hf_int(s, root, "", "n_positions", false, hf_archs[h->arch].default_ctx, 1, HF_MAX_DIM,
               &c->n_ctx_train) != 0 ||
        hf_float(s, root, "", "layer_norm_epsilon", false, 1e-5, &c->norm_eps) != 0 ||
        hf_bool(s, root, "tie_word_embeddings", true, &c->tied_embeddings) != 0)
        return -1;
    if (c->n_embd > HF_MAX_DIM / 4 ||
        hf_int(s, root, "", "n_inner", false, 4 * c->n_embd, 1, HF_MAX_DIM, &c->n_ff) != 0)
        return -1;
    if (c->n_embd % c->n_head != 0) {
        eng_seterr(s->err, s->errlen, "%s: n_embd (%d) is not a multiple of n_head (%d)", s->file, c->n_embd,
                c->n_head);
        return -1;
    }
    /* The forward computes GELU with the tanh approximation (gelu_new); exact
     * "gelu" differs from it by < 1e-3 and is accepted as the same. */
    const char *act;
    if (hf_str(s, root, "", "activation_function", "gelu_new", &act) != 0)
        return -1;
    if (strcmp(act, "gelu_new") != 0 && strcmp(act, "gelu") != 0 && strcmp(act, "gelu_pytorch_tanh") != 0) {
        eng_seterr(s->err, s->errlen, "%s: activation_function '%.40s' is not supported (expected gelu_new or gelu)",
                s->file, act);
        return -1;
    }
    bool scale_weights, scale_by_layer;
    if (hf_bool(s, root, "scale_attn_weights", true, &scale_weights) != 0 ||
        hf_bool(s, root, "scale_attn_by_inverse_layer_idx", false, &scale_by_layer) != 0)
        return -1;
    if (!scale_weights || scale_by_layer) {
        eng_seterr(s->err, s->errlen, "%s: %s is not supported (attention scaled by 1/sqrt(head_dim) only)",
                s->file, !scale_weights ? "scale_attn_weights false" : "scale_attn_by_inverse_layer_idx true");
        return -1;
    }
    c->arch = ENG_ARCH_GPT2;
    c->n_kv_head = c->n_head;
    c->head_dim = c->n_embd / c->n_head;
    return 0;
}

static int hf_parse_config(const char *dir, hf_config *h, char *err, size_t errlen)
{
    char *path = eng_path_join(dir, "config.json");
    if (!path) {
        eng_seterr(err, errlen, "%s: out of memory", dir);
        return -1;
    }
    hf_src s = {path, err, errlen};
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    int rc = -1;
    memset(h, 0, sizeof *h);
    if (!root) {
        eng_seterr(err, errlen, "%s: %s (line %d, column %d)", path, jerr.text, jerr.line, jerr.column);
    } else if (!json_is_object(root)) {
        eng_seterr(err, errlen, "%s: expected a JSON object", path);
    } else if (json_is_object(json_object_get(root, "quantization_config"))) {
        const char *qm = json_string_value(json_object_get(json_object_get(root, "quantization_config"),
                                                           "quant_method"));
        eng_seterr(err, errlen, "%s: quantized checkpoints (quantization_config, quant_method '%.40s') are "
                "not supported: use the original F32/F16/BF16 weights or a GGUF file", path, qm ? qm : "?");
    } else if (hf_find_arch(&s, root, &h->arch) == 0) {
        rc = hf_archs[h->arch].kind == HF_GPT2 ? hf_parse_gpt2(&s, root, h) : hf_parse_llama(&s, root, h);
    }
    json_decref(root);
    free(path);
    return rc;
}

/* ---- weights ------------------------------------------------------------ */

typedef struct {
    const eng_st *st;
    const char *prefix;   /* "model." / "transformer.": some checkpoints omit it */
    char *err;
    size_t errlen;
} hf_weights;

static const eng_st_tensor *hf_lookup(const hf_weights *w, const char *name)
{
    const eng_st_tensor *t = eng_st_find(w->st, name);
    size_t pl = strlen(w->prefix);
    if (!t && strncmp(name, w->prefix, pl) == 0)
        t = eng_st_find(w->st, name + pl);
    return t;
}

static size_t hf_elem_size(eng_dtype type)
{
    return type == ENG_F32 ? 4 : 2;
}

/* Finds `name` and checks its dtype and file shape: [rows, cols], or [cols]
 * when rows == 0. */
static int hf_find_checked(const hf_weights *w, const char *name, int64_t rows, int64_t cols,
                           const eng_st_tensor **found)
{
    const eng_st_tensor *t = hf_lookup(w, name);
    *found = t;
    if (!t) {
        eng_seterr(w->err, w->errlen, "%s: tensor '%s' is missing", eng_st_path(w->st), name);
        return -1;
    }
    if (eng_st_check_float(t, w->err, w->errlen) != 0)
        return -1;
    bool ok = rows == 0 ? t->n_dims == 1 && t->shape[0] == cols
                        : t->n_dims == 2 && t->shape[0] == rows && t->shape[1] == cols;
    if (!ok) {
        char exp[64], got[160];
        if (rows == 0)
            snprintf(exp, sizeof exp, "[%lld]", (long long)cols);
        else
            snprintf(exp, sizeof exp, "[%lld, %lld]", (long long)rows, (long long)cols);
        eng_seterr(w->err, w->errlen, "%s: tensor '%s': expected shape %s, found %s", t->file, name, exp,
                eng_st_shape_str(t, got, sizeof got));
        return -1;
    }
    return 0;
}

/* A view of the tensor as (rows of ne[0]); copied when the data is not
 * aligned to its element size, so kernels may read it as float / uint16. */
static int hf_view(const hf_weights *w, const eng_st_tensor *t, int64_t rows, int64_t cols, eng_tensor *out)
{
    out->type = t->type;
    out->ne[0] = cols;
    out->ne[1] = rows == 0 ? 1 : rows;
    out->data = (void *)t->data;
    out->owned = false;
    if ((uintptr_t)t->data % hf_elem_size(t->type) != 0) {
        out->data = malloc(t->nbytes ? t->nbytes : 1);
        if (!out->data) {
            eng_seterr(w->err, w->errlen, "%s: tensor '%s': out of memory", t->file, t->name);
            return -1;
        }
        memcpy(out->data, t->data, t->nbytes);
        out->owned = true;
    }
    return 0;
}

/* Loads the tensor named by fmt... with file shape [rows, cols] (rows == 0:
 * a vector [cols]) into *out. */
__attribute__((format(printf, 5, 6)))
static int hf_tensor(const hf_weights *w, int64_t rows, int64_t cols, eng_tensor *out,
                     const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const eng_st_tensor *t;
    memset(out, 0, sizeof *out);
    if (hf_find_checked(w, name, rows, cols, &t) != 0)
        return -1;
    return hf_view(w, t, rows, cols, out);
}

/* GPT-2's Conv1D stores its weight as [n_in, n_out] (x @ W); kernels want
 * n_out rows of n_in. Returns an owned transposed copy in the file dtype. */
__attribute__((format(printf, 5, 6)))
static int hf_conv1d(const hf_weights *w, int64_t n_in, int64_t n_out, eng_tensor *out, const char *fmt, ...)
{
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    const eng_st_tensor *t;
    memset(out, 0, sizeof *out);
    if (hf_find_checked(w, name, n_in, n_out, &t) != 0)
        return -1;
    size_t es = hf_elem_size(t->type);
    unsigned char *dst = malloc(t->nbytes ? t->nbytes : 1);
    if (!dst) {
        eng_seterr(w->err, w->errlen, "%s: tensor '%s': out of memory", t->file, name);
        return -1;
    }
    /* src (n_in, n_out) -> dst (n_out, n_in), in tiles so that both sides
     * stay in cache; constant-size memcpy: the source may be unaligned. */
    const unsigned char *src = t->data;
    const int64_t tile = 32;
    for (int64_t i0 = 0; i0 < n_in; i0 += tile)
        for (int64_t o0 = 0; o0 < n_out; o0 += tile)
            for (int64_t i = i0; i < i0 + tile && i < n_in; i++)
                for (int64_t o = o0; o < o0 + tile && o < n_out; o++) {
                    size_t d = (size_t)o * (size_t)n_in + (size_t)i, s = (size_t)i * (size_t)n_out + (size_t)o;
                    if (es == 4)
                        memcpy(dst + 4 * d, src + 4 * s, 4);
                    else
                        memcpy(dst + 2 * d, src + 2 * s, 2);
                }
    *out = (eng_tensor){.type = t->type, .ne = {n_in, n_out}, .data = dst, .owned = true};
    return 0;
}

/* Concatenates parts' rows into *out (owned) and frees the parts. Vectors of
 * different lengths (biases) are joined end to end (see model.c). */
static int hf_fuse(eng_tensor *parts, int n, eng_tensor *out, char *err, size_t errlen)
{
    int rc = eng_tensor_concat_rows(parts, n, out, err, errlen);
    for (int i = 0; i < n; i++)
        eng_tensor_free(&parts[i]);
    return rc;
}

static int hf_load_llama(eng_model *m, const hf_config *h, const hf_weights *w)
{
    const eng_model_config *c = &m->cfg;
    int64_t E = c->n_embd, F = c->n_ff, V = c->n_vocab;
    int64_t q_dim = (int64_t)c->n_head * c->head_dim, kv_dim = (int64_t)c->n_kv_head * c->head_dim;
    char *err = w->err;
    size_t el = w->errlen;

    if (hf_tensor(w, V, E, &m->tok_embd, "model.embed_tokens.weight") != 0 ||
        hf_tensor(w, 0, E, &m->out_norm, "model.norm.weight") != 0)
        return -1;
    for (int i = 0; i < c->n_layer; i++) {
        eng_layer *L = &m->layers[i];
        eng_tensor p[3];
        const char *pre = "model.layers";
        if (hf_tensor(w, 0, E, &L->attn_norm, "%s.%d.input_layernorm.weight", pre, i) != 0 ||
            hf_tensor(w, 0, E, &L->ffn_norm, "%s.%d.post_attention_layernorm.weight", pre, i) != 0)
            return -1;
        memset(p, 0, sizeof p);
        if (hf_tensor(w, q_dim, E, &p[0], "%s.%d.self_attn.q_proj.weight", pre, i) != 0 ||
            hf_tensor(w, kv_dim, E, &p[1], "%s.%d.self_attn.k_proj.weight", pre, i) != 0 ||
            hf_tensor(w, kv_dim, E, &p[2], "%s.%d.self_attn.v_proj.weight", pre, i) != 0 ||
            hf_fuse(p, 3, &L->wqkv, err, el) != 0)
            goto fail_parts;
        if (h->qkv_bias &&
            (hf_tensor(w, 0, q_dim, &p[0], "%s.%d.self_attn.q_proj.bias", pre, i) != 0 ||
             hf_tensor(w, 0, kv_dim, &p[1], "%s.%d.self_attn.k_proj.bias", pre, i) != 0 ||
             hf_tensor(w, 0, kv_dim, &p[2], "%s.%d.self_attn.v_proj.bias", pre, i) != 0 ||
             hf_fuse(p, 3, &L->bqkv, err, el) != 0))
            goto fail_parts;
        if (hf_tensor(w, E, q_dim, &L->wo, "%s.%d.self_attn.o_proj.weight", pre, i) != 0 ||
            (h->o_bias && hf_tensor(w, 0, E, &L->bo, "%s.%d.self_attn.o_proj.bias", pre, i) != 0))
            return -1;
        if (hf_tensor(w, F, E, &p[0], "%s.%d.mlp.gate_proj.weight", pre, i) != 0 ||
            hf_tensor(w, F, E, &p[1], "%s.%d.mlp.up_proj.weight", pre, i) != 0 ||
            hf_fuse(p, 2, &L->w_gate_up, err, el) != 0)
            goto fail_parts;
        if (hf_tensor(w, E, F, &L->w_down, "%s.%d.mlp.down_proj.weight", pre, i) != 0)
            return -1;
        continue;
fail_parts:
        for (int k = 0; k < 3; k++)
            eng_tensor_free(&p[k]);
        return -1;
    }
    if (!c->tied_embeddings)
        return hf_tensor(w, V, E, &m->output, "lm_head.weight");
    return 0;
}

static int hf_load_gpt2(eng_model *m, const hf_weights *w)
{
    const eng_model_config *c = &m->cfg;
    int64_t E = c->n_embd, F = c->n_ff, V = c->n_vocab;
    const char *pre = "transformer.h";

    if (hf_tensor(w, V, E, &m->tok_embd, "transformer.wte.weight") != 0 ||
        hf_tensor(w, c->n_ctx_train, E, &m->pos_embd, "transformer.wpe.weight") != 0 ||
        hf_tensor(w, 0, E, &m->out_norm, "transformer.ln_f.weight") != 0 ||
        hf_tensor(w, 0, E, &m->out_norm_b, "transformer.ln_f.bias") != 0)
        return -1;
    for (int i = 0; i < c->n_layer; i++) {
        eng_layer *L = &m->layers[i];
        if (hf_tensor(w, 0, E, &L->attn_norm, "%s.%d.ln_1.weight", pre, i) != 0 ||
            hf_tensor(w, 0, E, &L->attn_norm_b, "%s.%d.ln_1.bias", pre, i) != 0 ||
            hf_conv1d(w, E, 3 * E, &L->wqkv, "%s.%d.attn.c_attn.weight", pre, i) != 0 ||
            hf_tensor(w, 0, 3 * E, &L->bqkv, "%s.%d.attn.c_attn.bias", pre, i) != 0 ||
            hf_conv1d(w, E, E, &L->wo, "%s.%d.attn.c_proj.weight", pre, i) != 0 ||
            hf_tensor(w, 0, E, &L->bo, "%s.%d.attn.c_proj.bias", pre, i) != 0 ||
            hf_tensor(w, 0, E, &L->ffn_norm, "%s.%d.ln_2.weight", pre, i) != 0 ||
            hf_tensor(w, 0, E, &L->ffn_norm_b, "%s.%d.ln_2.bias", pre, i) != 0 ||
            hf_conv1d(w, E, F, &L->w_up, "%s.%d.mlp.c_fc.weight", pre, i) != 0 ||
            hf_tensor(w, 0, F, &L->b_up, "%s.%d.mlp.c_fc.bias", pre, i) != 0 ||
            hf_conv1d(w, F, E, &L->w_down, "%s.%d.mlp.c_proj.weight", pre, i) != 0 ||
            hf_tensor(w, 0, E, &L->b_down, "%s.%d.mlp.c_proj.bias", pre, i) != 0)
            return -1;
    }
    if (!c->tied_embeddings)
        return hf_tensor(w, V, E, &m->output, "lm_head.weight");
    return 0;
}

/* ---- tokenizer side files ----------------------------------------------- */

/* Reads a whole small text file; NULL with a message when unreadable. */
static char *hf_read_text(const char *path, size_t max, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        eng_seterr(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(max + 1);
    size_t n = buf ? fread(buf, 1, max + 1, f) : 0;
    bool bad = !buf || ferror(f) || n > max;
    fclose(f);
    if (bad) {
        eng_seterr(err, errlen, "%s: %s", path, !buf ? "out of memory" : n > max ? "file too large" : "read error");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

/* The chat template: chat_template.jinja (newer transformers save it there),
 * else tokenizer_config.json's "chat_template" (a string, or a list of
 * {name, template} from which "default" is taken). *out = NULL when none. */
static int hf_chat_template(const char *dir, char **out, char *err, size_t errlen)
{
    struct stat sb;
    *out = NULL;
    char *jinja = eng_path_join(dir, "chat_template.jinja");
    char *tc = eng_path_join(dir, "tokenizer_config.json");
    int rc = -1;
    json_t *root = NULL;
    if (!jinja || !tc) {
        eng_seterr(err, errlen, "%s: out of memory", dir);
        goto done;
    }
    if (stat(jinja, &sb) == 0) {
        *out = hf_read_text(jinja, 1 << 20, err, errlen);
        rc = *out ? 0 : -1;
        goto done;
    }
    if (stat(tc, &sb) != 0) {
        rc = 0;
        goto done;
    }
    json_error_t jerr;
    root = json_load_file(tc, 0, &jerr);
    if (!root) {
        eng_seterr(err, errlen, "%s: %s (line %d, column %d)", tc, jerr.text, jerr.line, jerr.column);
        goto done;
    }
    json_t *ct = json_object_get(root, "chat_template");
    const char *text = NULL;
    if (json_is_string(ct)) {
        text = json_string_value(ct);
    } else if (json_is_array(ct)) {
        size_t i;
        json_t *e;
        json_array_foreach(ct, i, e) {
            const char *nm = json_string_value(json_object_get(e, "name"));
            const char *tpl = json_string_value(json_object_get(e, "template"));
            if (tpl && (!text || (nm && strcmp(nm, "default") == 0)))
                text = tpl;
        }
    }
    if (ct && !json_is_null(ct) && !text) {
        eng_seterr(err, errlen, "%s: field 'chat_template': expected a string or a list of {name, template}", tc);
        goto done;
    }
    if (text && !(*out = strdup(text))) {
        eng_seterr(err, errlen, "%s: out of memory", tc);
        goto done;
    }
    rc = 0;
done:
    json_decref(root);
    free(jinja);
    free(tc);
    return rc;
}

/* The last path component, without trailing slashes ("a/b/" -> "b"). */
static char *hf_base_name(const char *dir)
{
    size_t n = strlen(dir);
    while (n > 1 && dir[n - 1] == '/')
        n--;
    size_t b = n;
    while (b > 0 && dir[b - 1] != '/')
        b--;
    if (b == n)  /* "/" */
        return strdup(dir);
    return strndup(dir + b, n - b);
}

static void hf_release(void *ctx)
{
    eng_st_close(ctx);
}

eng_model *eng_model_load_hf(const char *dir, char *err, size_t errlen)
{
    hf_config h;
    if (hf_parse_config(dir, &h, err, errlen) != 0)
        return NULL;
    eng_model *m = calloc(1, sizeof *m);
    eng_layer *layers = calloc((size_t)h.cfg.n_layer, sizeof *layers);
    if (!m || !layers) {
        free(m);
        free(layers);
        eng_seterr(err, errlen, "%s: out of memory", dir);
        return NULL;
    }
    m->cfg = h.cfg;
    m->layers = layers;
    m->path = strdup(dir);
    m->name = hf_base_name(dir);
    if (!m->path || !m->name) {
        eng_seterr(err, errlen, "%s: out of memory", dir);
        goto fail;
    }

    eng_st *st = eng_st_open_dir(dir, err, errlen);
    if (!st)
        goto fail;
    m->release = hf_release;
    m->release_ctx = st;

    bool gpt2 = hf_archs[h.arch].kind == HF_GPT2;
    hf_weights w = {st, gpt2 ? "transformer." : "model.", err, errlen};
    if ((gpt2 ? hf_load_gpt2(m, &w) : hf_load_llama(m, &h, &w)) != 0)
        goto fail;
    if (m->cfg.tied_embeddings) {
        m->output = m->tok_embd;
        m->output.owned = false;
    }

    m->tok = eng_tokenizer_from_hf_dir(dir, err, errlen);
    if (!m->tok)
        goto fail;
    if (hf_chat_template(dir, &m->chat_template, err, errlen) != 0)
        goto fail;
    if (eng_model_finish(m, err, errlen) != 0)
        goto fail;
    return m;
fail:
    eng_model_free(m);
    return NULL;
}
