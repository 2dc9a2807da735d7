/* test_model_hf.c: tests engine/model_hf.c (eng_model_load_hf).
 *
 * Two sources of models:
 *   - checkpoints saved by transformers' save_pretrained (the lead's fixtures
 *     in tests/fixtures/models/: llama F32 and BF16, llama3 rope + tied
 *     embeddings, sharded mistral, qwen2 F16 with q/k/v biases, gpt2): the
 *     loaded config must match config.json, and every fused or transposed
 *     weight must equal the tensors of the file, read independently;
 *   - tiny directories built here (config.json from jansson, safetensors from
 *     our own writer, the tokenizer copied from the llama fixture), where each
 *     element's value encodes its tensor and index, to check the fusion order,
 *     the GPT-2 transpose, config parsing and every error message.
 * Runs under ASan + UBSan. */
#define _GNU_SOURCE
#include <criterion/criterion.h>
#include <ftw.h>
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/matmul.h"
#include "engine/model.h"
#include "engine/safetensors.h"

#define MODELS "tests/fixtures/models"

/* ---- temp directory ------------------------------------------------------ */

static char tmpdir[64];

static void make_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/kvserve-hf-XXXXXX");
    cr_assert_not_null(mkdtemp(tmpdir));
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    return remove(p);
}

static void remove_tmpdir(void)
{
    nftw(tmpdir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
}

static const char *tmp_path(const char *name)
{
    static char buf[4][256];
    static int k;
    char *p = buf[k++ % 4];
    snprintf(p, 256, "%s/%s", tmpdir, name);
    return p;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    cr_assert_not_null(f, "cannot write %s", path);
    fputs(text, f);
    fclose(f);
}

static void copy_file(const char *src, const char *dst)
{
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    cr_assert(in && out, "copy %s -> %s", src, dst);
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        cr_assert_eq(fwrite(buf, 1, n, out), n);
    fclose(in);
    fclose(out);
}

TestSuite(model_hf, .init = make_tmpdir, .fini = remove_tmpdir);

/* ---- comparing loaded weights with file tensors ------------------------- */

static float src_val(const eng_st_tensor *t, int64_t k)
{
    const char *p = t->data;
    if (t->type == ENG_F32) {
        float v;
        memcpy(&v, p + 4 * k, 4);
        return v;
    }
    uint16_t h;
    memcpy(&h, p + 2 * k, 2);
    if (t->type == ENG_F16)
        return eng_fp16_to_f32(h);
    uint32_t bits = (uint32_t)h << 16;  /* bfloat16 is the top half of an f32 */
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

/* Rows [row0, row0 + rows of src) of w equal src (a [rows, cols] file
 * tensor), or its transpose when `conv1d` (src is [cols_of_w, rows]). */
static void expect_rows(const eng_tensor *w, int64_t row0, const eng_st_tensor *src, bool conv1d, const char *what)
{
    cr_assert_not_null(src, "%s: source tensor missing", what);
    int64_t rows = conv1d ? src->shape[1] : src->shape[0];
    int64_t cols = conv1d ? src->shape[0] : src->shape[1];
    cr_assert_eq(w->ne[0], cols, "%s: ne[0] %lld, expected %lld", what, (long long)w->ne[0], (long long)cols);
    float *row = malloc((size_t)cols * sizeof *row);
    for (int64_t r = 0; r < rows; r++) {
        eng_weight_get_row(w, row0 + r, row);
        for (int64_t c = 0; c < cols; c++) {
            float want = conv1d ? src_val(src, c * rows + r) : src_val(src, r * cols + c);
            cr_assert_eq(row[c], want, "%s: row %lld col %lld: %g, expected %g", what, (long long)r,
                         (long long)c, row[c], want);
        }
    }
    free(row);
}

/* A prepared vector (flat F32) equals src, starting at element off. */
static void expect_vec(const eng_tensor *v, int64_t off, const eng_st_tensor *src, const char *what)
{
    cr_assert_not_null(src, "%s: source tensor missing", what);
    cr_assert_not_null(v->data, "%s: not loaded", what);
    cr_assert_eq(v->type, ENG_F32);
    for (int64_t k = 0; k < src->n_elems; k++)
        cr_assert_eq(((const float *)v->data)[off + k], src_val(src, k), "%s[%lld]", what, (long long)k);
}

static const eng_st_tensor *find(const eng_st *st, const char *fmt, int i)
{
    char name[128];
    snprintf(name, sizeof name, fmt, i);
    return eng_st_find(st, name);
}

static eng_model *load_ok(const char *dir)
{
    char err[512] = "";
    eng_model *m = eng_model_load_hf(dir, err, sizeof err);
    cr_assert_not_null(m, "loading %s: %s", dir, err);
    return m;
}

/* Checks every llama-family weight of m against the checkpoint's files. */
static void expect_llama_weights(const eng_model *m, const char *dir, bool qkv_bias)
{
    char err[256];
    eng_st *st = eng_st_open_dir(dir, err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    const eng_model_config *c = &m->cfg;
    int64_t q_dim = (int64_t)c->n_head * c->head_dim, kv_dim = (int64_t)c->n_kv_head * c->head_dim;
    expect_rows(&m->tok_embd, 0, eng_st_find(st, "model.embed_tokens.weight"), false, "embed");
    expect_vec(&m->out_norm, 0, eng_st_find(st, "model.norm.weight"), "norm");
    if (c->tied_embeddings)
        cr_assert_eq(m->output.data, m->tok_embd.data, "tied output must share the embedding");
    else
        expect_rows(&m->output, 0, eng_st_find(st, "lm_head.weight"), false, "lm_head");
    for (int i = 0; i < c->n_layer; i++) {
        const eng_layer *L = &m->layers[i];
        cr_assert_eq(L->wqkv.ne[1], q_dim + 2 * kv_dim);
        expect_rows(&L->wqkv, 0, find(st, "model.layers.%d.self_attn.q_proj.weight", i), false, "q");
        expect_rows(&L->wqkv, q_dim, find(st, "model.layers.%d.self_attn.k_proj.weight", i), false, "k");
        expect_rows(&L->wqkv, q_dim + kv_dim, find(st, "model.layers.%d.self_attn.v_proj.weight", i), false, "v");
        expect_rows(&L->wo, 0, find(st, "model.layers.%d.self_attn.o_proj.weight", i), false, "o");
        cr_assert_eq(L->w_gate_up.ne[1], 2 * (int64_t)c->n_ff);
        expect_rows(&L->w_gate_up, 0, find(st, "model.layers.%d.mlp.gate_proj.weight", i), false, "gate");
        expect_rows(&L->w_gate_up, c->n_ff, find(st, "model.layers.%d.mlp.up_proj.weight", i), false, "up");
        expect_rows(&L->w_down, 0, find(st, "model.layers.%d.mlp.down_proj.weight", i), false, "down");
        expect_vec(&L->attn_norm, 0, find(st, "model.layers.%d.input_layernorm.weight", i), "attn_norm");
        expect_vec(&L->ffn_norm, 0, find(st, "model.layers.%d.post_attention_layernorm.weight", i), "ffn_norm");
        if (qkv_bias) {
            expect_vec(&L->bqkv, 0, find(st, "model.layers.%d.self_attn.q_proj.bias", i), "q bias");
            expect_vec(&L->bqkv, q_dim, find(st, "model.layers.%d.self_attn.k_proj.bias", i), "k bias");
            expect_vec(&L->bqkv, q_dim + kv_dim, find(st, "model.layers.%d.self_attn.v_proj.bias", i), "v bias");
        } else {
            cr_assert_null(L->bqkv.data);
        }
        cr_assert_null(L->bo.data);
        cr_assert_null(L->w_up.data);
    }
    eng_st_close(st);
}

/* ---- transformers checkpoints ------------------------------------------- */

Test(model_hf, transformers_llama)
{
    eng_model *m = load_ok(MODELS "/llama");
    const eng_model_config *c = &m->cfg;
    cr_assert_eq(c->arch, ENG_ARCH_LLAMA);
    cr_assert_eq(c->n_embd, 64);
    cr_assert_eq(c->n_ff, 160);
    cr_assert_eq(c->n_layer, 2);
    cr_assert_eq(c->n_head, 4);
    cr_assert_eq(c->n_kv_head, 2);
    cr_assert_eq(c->head_dim, 16);
    cr_assert_eq(c->rope_dim, 16);
    cr_assert_eq(c->n_vocab, 320);
    cr_assert_eq(c->n_ctx_train, 256);
    cr_assert_float_eq(c->norm_eps, 1e-5f, 1e-12);
    cr_assert_eq(c->rope_theta, 10000.0f);
    cr_assert_eq(c->rope_style, ENG_ROPE_NEOX);
    cr_assert_eq(c->rope_scaling, ENG_ROPE_SCALING_NONE);
    cr_assert(!c->tied_embeddings);
    cr_assert_str_eq(m->name, "llama");
    cr_assert_str_eq(m->path, MODELS "/llama");
    cr_assert_not_null(m->tok);
    /* the template of tokenizer_config.json, read here independently */
    json_t *tc = json_load_file(MODELS "/llama/tokenizer_config.json", 0, NULL);
    cr_assert_not_null(m->chat_template);
    cr_assert_str_eq(m->chat_template, json_string_value(json_object_get(tc, "chat_template")));
    json_decref(tc);
    expect_llama_weights(m, MODELS "/llama", false);
    eng_model_free(m);
}

Test(model_hf, transformers_llama_bf16)
{
    eng_model *m = load_ok(MODELS "/llama-bf16");
    cr_assert_eq(m->layers[0].wqkv.type, ENG_F32, "BF16 weights are widened by eng_weight_prepare");
    expect_llama_weights(m, MODELS "/llama-bf16", false);
    eng_model_free(m);
}

Test(model_hf, transformers_llama3_rope_and_tied)
{
    eng_model *m = load_ok(MODELS "/llama3-tied");
    const eng_model_config *c = &m->cfg;
    cr_assert_eq(c->n_embd, 96);
    cr_assert_eq(c->n_head, 3);
    cr_assert_eq(c->n_kv_head, 1);
    cr_assert_eq(c->head_dim, 32);
    cr_assert_eq(c->rope_theta, 500000.0f);
    cr_assert_eq(c->rope_scaling, ENG_ROPE_SCALING_LLAMA3);
    cr_assert_eq(c->rope_factor, 8.0f);
    cr_assert_eq(c->rope_low_freq_factor, 1.0f);
    cr_assert_eq(c->rope_high_freq_factor, 4.0f);
    cr_assert_eq(c->rope_orig_ctx, 32);
    cr_assert(c->tied_embeddings);
    expect_llama_weights(m, MODELS "/llama3-tied", false);
    eng_model_free(m);
}

Test(model_hf, transformers_mistral_sharded)
{
    eng_model *m = load_ok(MODELS "/mistral-sharded");
    /* sliding_window 4096 is beyond max_position_embeddings 256 */
    cr_assert_eq(m->cfg.n_ctx_train, 256);
    cr_assert_eq(m->cfg.n_kv_head, 2);
    expect_llama_weights(m, MODELS "/mistral-sharded", false);
    eng_model_free(m);
}

Test(model_hf, transformers_qwen2_biases)
{
    eng_model *m = load_ok(MODELS "/qwen2");
    cr_assert_eq(m->layers[0].wqkv.type, ENG_F16, "F16 weights stay F16");
    expect_llama_weights(m, MODELS "/qwen2", true);
    eng_model_free(m);
}

Test(model_hf, transformers_gpt2)
{
    eng_model *m = load_ok(MODELS "/gpt2");
    const eng_model_config *c = &m->cfg;
    cr_assert_eq(c->arch, ENG_ARCH_GPT2);
    cr_assert_eq(c->n_embd, 64);
    cr_assert_eq(c->n_head, 4);
    cr_assert_eq(c->n_kv_head, 4);
    cr_assert_eq(c->head_dim, 16);
    cr_assert_eq(c->n_ff, 256, "n_inner null -> 4 * n_embd");
    cr_assert_eq(c->n_ctx_train, 128);
    cr_assert_float_eq(c->norm_eps, 1e-5f, 1e-12);
    cr_assert(c->tied_embeddings);
    cr_assert_eq(m->output.data, m->tok_embd.data);

    char err[256];
    eng_st *st = eng_st_open_dir(MODELS "/gpt2", err, sizeof err);
    cr_assert_not_null(st, "%s", err);
    expect_rows(&m->tok_embd, 0, eng_st_find(st, "transformer.wte.weight"), false, "wte");
    expect_rows(&m->pos_embd, 0, eng_st_find(st, "transformer.wpe.weight"), false, "wpe");
    expect_vec(&m->out_norm, 0, eng_st_find(st, "transformer.ln_f.weight"), "ln_f");
    expect_vec(&m->out_norm_b, 0, eng_st_find(st, "transformer.ln_f.bias"), "ln_f.bias");
    for (int i = 0; i < c->n_layer; i++) {
        const eng_layer *L = &m->layers[i];
        expect_rows(&L->wqkv, 0, find(st, "transformer.h.%d.attn.c_attn.weight", i), true, "c_attn");
        expect_vec(&L->bqkv, 0, find(st, "transformer.h.%d.attn.c_attn.bias", i), "c_attn.bias");
        expect_rows(&L->wo, 0, find(st, "transformer.h.%d.attn.c_proj.weight", i), true, "attn.c_proj");
        expect_vec(&L->bo, 0, find(st, "transformer.h.%d.attn.c_proj.bias", i), "attn.c_proj.bias");
        expect_rows(&L->w_up, 0, find(st, "transformer.h.%d.mlp.c_fc.weight", i), true, "c_fc");
        expect_vec(&L->b_up, 0, find(st, "transformer.h.%d.mlp.c_fc.bias", i), "c_fc.bias");
        expect_rows(&L->w_down, 0, find(st, "transformer.h.%d.mlp.c_proj.weight", i), true, "mlp.c_proj");
        expect_vec(&L->b_down, 0, find(st, "transformer.h.%d.mlp.c_proj.bias", i), "mlp.c_proj.bias");
        expect_vec(&L->attn_norm, 0, find(st, "transformer.h.%d.ln_1.weight", i), "ln_1");
        expect_vec(&L->attn_norm_b, 0, find(st, "transformer.h.%d.ln_1.bias", i), "ln_1.bias");
        expect_vec(&L->ffn_norm, 0, find(st, "transformer.h.%d.ln_2.weight", i), "ln_2");
        expect_vec(&L->ffn_norm_b, 0, find(st, "transformer.h.%d.ln_2.bias", i), "ln_2.bias");
        cr_assert_null(L->w_gate_up.data);
    }
    eng_st_close(st);
    eng_model_free(m);
}

/* ---- tiny models built here ---------------------------------------------- */

/* Element k of the tensor at index ti holds ti * 65536 + k (exact in F32),
 * or (ti * 31 + k) % 2048 in F16 (exact integers): a value names its origin. */
typedef struct {
    char name[96];
    const char *dtype;
    int n_dims;
    int64_t shape[2];
} spec;

typedef struct {
    spec t[96];
    int n;
} model_spec;

static float spec_value(const spec *s, int ti, int64_t k)
{
    return strcmp(s->dtype, "F16") == 0 ? (float)((ti * 31 + k) % 2048) : (float)(ti * 65536 + k);
}

static void add(model_spec *ms, const char *dtype, int64_t rows, int64_t cols, const char *fmt, int i)
{
    cr_assert(ms->n < 96);
    spec *s = &ms->t[ms->n++];
    snprintf(s->name, sizeof s->name, fmt, i);
    s->dtype = dtype;
    s->n_dims = rows ? 2 : 1;
    s->shape[0] = rows ? rows : cols;
    s->shape[1] = rows ? cols : 0;
}

static int spec_index(const model_spec *ms, const char *name)
{
    for (int i = 0; i < ms->n; i++)
        if (strcmp(ms->t[i].name, name) == 0)
            return i;
    cr_assert_fail("no tensor %s in the spec", name);
    return -1;
}

static void spec_remove(model_spec *ms, const char *name)
{
    int i = spec_index(ms, name);
    memmove(&ms->t[i], &ms->t[i + 1], (size_t)(ms->n - i - 1) * sizeof ms->t[0]);
    ms->n--;
}

static size_t spec_elems(const spec *s)
{
    return (size_t)s->shape[0] * (size_t)(s->n_dims == 2 ? s->shape[1] : 1);
}

static size_t dtype_size(const char *dtype)
{
    return strcmp(dtype, "F32") == 0 ? 4 : strcmp(dtype, "I64") == 0 ? 8 : 2;
}

/* Our writer: tensors back to back in spec order; `lead_pad` bytes of an F16
 * tensor first, so that what follows may start unaligned. */
static void write_weights(const model_spec *ms, const char *file, int lead_pad_elems)
{
    size_t total = (size_t)lead_pad_elems * 2;
    for (int i = 0; i < ms->n; i++)
        total += spec_elems(&ms->t[i]) * dtype_size(ms->t[i].dtype);
    unsigned char *data = calloc(1, total + 1);
    size_t hcap = 64 + (size_t)ms->n * 256, hl = 0, off = 0;
    char *hdr = malloc(hcap);
    hl += (size_t)snprintf(hdr, hcap, "{\"__metadata__\":{\"format\":\"pt\"}");
    if (lead_pad_elems) {
        hl += (size_t)snprintf(hdr + hl, hcap - hl, ",\"pad\":{\"dtype\":\"F16\",\"shape\":[%d],"
                               "\"data_offsets\":[0,%d]}", lead_pad_elems, 2 * lead_pad_elems);
        off = (size_t)lead_pad_elems * 2;
    }
    for (int i = 0; i < ms->n; i++) {
        const spec *s = &ms->t[i];
        size_t n = spec_elems(s), es = dtype_size(s->dtype);
        hl += (size_t)snprintf(hdr + hl, hcap - hl, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld", s->name,
                               s->dtype, (long long)s->shape[0]);
        if (s->n_dims == 2)
            hl += (size_t)snprintf(hdr + hl, hcap - hl, ",%lld", (long long)s->shape[1]);
        hl += (size_t)snprintf(hdr + hl, hcap - hl, "],\"data_offsets\":[%zu,%zu]}", off, off + n * es);
        for (size_t k = 0; k < n; k++) {
            float v = spec_value(s, i, (int64_t)k);
            if (es == 4) {
                memcpy(data + off + 4 * k, &v, 4);
            } else if (es == 2) {
                uint16_t h = eng_f32_to_fp16(v);
                memcpy(data + off + 2 * k, &h, 2);
            }
        }
        off += n * es;
    }
    hl += (size_t)snprintf(hdr + hl, hcap - hl, "}");
    while (hl % 8)
        hdr[hl++] = ' ';
    FILE *f = fopen(tmp_path(file), "wb");
    cr_assert_not_null(f);
    unsigned char len[8];
    for (int i = 0; i < 8; i++)
        len[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(hdr, 1, hl, f);
    fwrite(data, 1, total, f);
    fclose(f);
    free(hdr);
    free(data);
}

/* Tiny llama: 8 wide, 2 heads of 4, 1 kv head, ff 12, vocab 320 (the
 * fixture tokenizer's size), 2 layers. */
enum { T_E = 8, T_H = 2, T_KV = 1, T_HD = 4, T_FF = 12, T_V = 320, T_LAYERS = 2 };

static json_t *llama_config(const char *arch)
{
    return json_pack("{s:[s], s:i, s:i, s:i, s:i, s:i, s:i, s:f, s:i, s:b, s:s, s:f}", "architectures", arch,
                     "hidden_size", T_E, "intermediate_size", T_FF, "num_hidden_layers", T_LAYERS,
                     "num_attention_heads", T_H, "num_key_value_heads", T_KV, "vocab_size", T_V,
                     "rms_norm_eps", 1e-5, "max_position_embeddings", 256, "tie_word_embeddings", 0,
                     "hidden_act", "silu", "rope_theta", 10000.0);
}

static void llama_spec(model_spec *ms, const char *prefix, bool qkv_bias, bool o_bias, bool lm_head)
{
    char f[128];
    ms->n = 0;
    snprintf(f, sizeof f, "%sembed_tokens.weight", prefix);
    add(ms, "F32", T_V, T_E, f, 0);
    for (int i = 0; i < T_LAYERS; i++) {
#define LAYER(suffix) (snprintf(f, sizeof f, "%slayers.%%d.%s", prefix, suffix), f)
        add(ms, "F32", 0, T_E, LAYER("input_layernorm.weight"), i);
        add(ms, "F32", T_H * T_HD, T_E, LAYER("self_attn.q_proj.weight"), i);
        add(ms, "F32", T_KV * T_HD, T_E, LAYER("self_attn.k_proj.weight"), i);
        add(ms, "F32", T_KV * T_HD, T_E, LAYER("self_attn.v_proj.weight"), i);
        if (qkv_bias) {
            add(ms, "F32", 0, T_H * T_HD, LAYER("self_attn.q_proj.bias"), i);
            add(ms, "F32", 0, T_KV * T_HD, LAYER("self_attn.k_proj.bias"), i);
            add(ms, "F32", 0, T_KV * T_HD, LAYER("self_attn.v_proj.bias"), i);
        }
        add(ms, "F32", T_E, T_H * T_HD, LAYER("self_attn.o_proj.weight"), i);
        if (o_bias)
            add(ms, "F32", 0, T_E, LAYER("self_attn.o_proj.bias"), i);
        add(ms, "F32", 0, T_E, LAYER("post_attention_layernorm.weight"), i);
        add(ms, "F32", T_FF, T_E, LAYER("mlp.gate_proj.weight"), i);
        add(ms, "F32", T_FF, T_E, LAYER("mlp.up_proj.weight"), i);
        add(ms, "F32", T_E, T_FF, LAYER("mlp.down_proj.weight"), i);
#undef LAYER
    }
    snprintf(f, sizeof f, "%snorm.weight", prefix);
    add(ms, "F32", 0, T_E, f, 0);
    if (lm_head)
        add(ms, "F32", T_V, T_E, "lm_head.weight", 0);
}

static void write_config(json_t *cfg)
{
    cr_assert_eq(json_dump_file(cfg, tmp_path("config.json"), JSON_INDENT(2)), 0);
    json_decref(cfg);
}

static void copy_tokenizer(void)
{
    copy_file(MODELS "/llama/tokenizer.json", tmp_path("tokenizer.json"));
}

/* A complete tiny llama-family directory; returns its spec in *ms. */
static void build_llama(model_spec *ms, json_t *cfg, const char *prefix, bool qkv_bias, bool o_bias, bool lm_head)
{
    llama_spec(ms, prefix, qkv_bias, o_bias, lm_head);
    write_config(cfg);
    write_weights(ms, "model.safetensors", 0);
    copy_tokenizer();
}

static void expect_load_error(const char *frag1, const char *frag2)
{
    char err[512] = "";
    eng_model *m = eng_model_load_hf(tmpdir, err, sizeof err);
    if (m)
        eng_model_free(m);
    cr_assert_null(m, "loaded; expected an error with '%s'", frag1);
    cr_assert(strstr(err, frag1), "message '%s' lacks '%s'", err, frag1);
    if (frag2)
        cr_assert(strstr(err, frag2), "message '%s' lacks '%s'", err, frag2);
}

/* Row r of w holds the values of tensor `name` row r - row0 (F32 spec). */
static void expect_spec_rows(const eng_tensor *w, int64_t row0, const model_spec *ms, const char *name)
{
    int ti = spec_index(ms, name);
    const spec *s = &ms->t[ti];
    float row[64];
    cr_assert_eq(w->ne[0], s->shape[1], "%s: ne[0]", name);
    for (int64_t r = 0; r < s->shape[0]; r++) {
        eng_weight_get_row(w, row0 + r, row);
        for (int64_t c = 0; c < s->shape[1]; c++)
            cr_assert_eq(row[c], spec_value(s, ti, r * s->shape[1] + c), "%s [%lld, %lld]", name,
                         (long long)r, (long long)c);
    }
}

static void expect_spec_vec(const eng_tensor *v, int64_t off, const model_spec *ms, const char *name)
{
    int ti = spec_index(ms, name);
    const spec *s = &ms->t[ti];
    cr_assert_not_null(v->data, "%s not loaded", name);
    for (int64_t k = 0; k < s->shape[0]; k++)
        cr_assert_eq(((const float *)v->data)[off + k], spec_value(s, ti, k), "%s[%lld]", name, (long long)k);
}

Test(model_hf, llama_fusion_order)
{
    model_spec ms;
    build_llama(&ms, llama_config("LlamaForCausalLM"), "model.", false, false, true);
    eng_model *m = load_ok(tmpdir);
    cr_assert_eq(m->cfg.n_ctx_train, 256);
    cr_assert_null(m->chat_template, "no tokenizer_config.json, no template");
    for (int i = 0; i < T_LAYERS; i++) {
        const eng_layer *L = &m->layers[i];
        char n[128];
        cr_assert_eq(L->wqkv.ne[1], (T_H + 2 * T_KV) * T_HD);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.q_proj.weight", i);
        expect_spec_rows(&L->wqkv, 0, &ms, n);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.k_proj.weight", i);
        expect_spec_rows(&L->wqkv, T_H * T_HD, &ms, n);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.v_proj.weight", i);
        expect_spec_rows(&L->wqkv, (T_H + T_KV) * T_HD, &ms, n);
        snprintf(n, sizeof n, "model.layers.%d.mlp.gate_proj.weight", i);
        expect_spec_rows(&L->w_gate_up, 0, &ms, n);
        snprintf(n, sizeof n, "model.layers.%d.mlp.up_proj.weight", i);
        expect_spec_rows(&L->w_gate_up, T_FF, &ms, n);
        snprintf(n, sizeof n, "model.layers.%d.mlp.down_proj.weight", i);
        expect_spec_rows(&L->w_down, 0, &ms, n);
        snprintf(n, sizeof n, "model.layers.%d.self_attn.o_proj.weight", i);
        expect_spec_rows(&L->wo, 0, &ms, n);
    }
    expect_spec_rows(&m->output, 0, &ms, "lm_head.weight");
    expect_spec_rows(&m->tok_embd, 0, &ms, "model.embed_tokens.weight");
    expect_spec_vec(&m->out_norm, 0, &ms, "model.norm.weight");
    eng_model_free(m);
}

Test(model_hf, llama_attention_bias_and_unprefixed_names)
{
    model_spec ms;
    json_t *cfg = llama_config("LlamaForCausalLM");
    json_object_set_new(cfg, "attention_bias", json_true());
    build_llama(&ms, cfg, "", true, true, true);
    eng_model *m = load_ok(tmpdir);
    const eng_layer *L = &m->layers[1];
    expect_spec_vec(&L->bqkv, 0, &ms, "layers.1.self_attn.q_proj.bias");
    expect_spec_vec(&L->bqkv, T_H * T_HD, &ms, "layers.1.self_attn.k_proj.bias");
    expect_spec_vec(&L->bqkv, (T_H + T_KV) * T_HD, &ms, "layers.1.self_attn.v_proj.bias");
    expect_spec_vec(&L->bo, 0, &ms, "layers.1.self_attn.o_proj.bias");
    expect_spec_rows(&L->wqkv, T_H * T_HD, &ms, "layers.1.self_attn.k_proj.weight");
    eng_model_free(m);
}

Test(model_hf, qwen2_requires_biases)
{
    model_spec ms;
    build_llama(&ms, llama_config("Qwen2ForCausalLM"), "model.", true, false, true);
    eng_model *m = load_ok(tmpdir);
    expect_spec_vec(&m->layers[0].bqkv, T_H * T_HD, &ms, "model.layers.0.self_attn.k_proj.bias");
    cr_assert_null(m->layers[0].bo.data, "Qwen2 has no o_proj bias");
    eng_model_free(m);
    spec_remove(&ms, "model.layers.1.self_attn.v_proj.bias");
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("model.layers.1.self_attn.v_proj.bias", "missing");
}

Test(model_hf, tied_embeddings_and_missing_lm_head)
{
    model_spec ms;
    json_t *cfg = llama_config("LlamaForCausalLM");
    json_object_set_new(cfg, "tie_word_embeddings", json_true());
    build_llama(&ms, cfg, "model.", false, false, false);
    eng_model *m = load_ok(tmpdir);
    cr_assert(m->cfg.tied_embeddings);
    cr_assert_eq(m->output.data, m->tok_embd.data);
    eng_model_free(m);
    /* not tied (LlamaConfig's default): lm_head.weight is required */
    cfg = llama_config("LlamaForCausalLM");
    json_object_del(cfg, "tie_word_embeddings");
    write_config(cfg);
    expect_load_error("lm_head.weight", "missing");
}

Test(model_hf, unaligned_f32_data_is_copied)
{
    model_spec ms;
    llama_spec(&ms, "model.", false, false, true);
    write_config(llama_config("MistralForCausalLM"));
    write_weights(&ms, "model.safetensors", 3);  /* 6 bytes of F16 first: every F32 tensor is misaligned */
    copy_tokenizer();
    eng_model *m = load_ok(tmpdir);
    expect_spec_rows(&m->tok_embd, 0, &ms, "model.embed_tokens.weight");
    expect_spec_vec(&m->layers[0].attn_norm, 0, &ms, "model.layers.0.input_layernorm.weight");
    expect_spec_rows(&m->layers[0].wqkv, 0, &ms, "model.layers.0.self_attn.q_proj.weight");
    eng_model_free(m);
}

Test(model_hf, config_defaults_and_legacy_rope)
{
    model_spec ms;
    /* no architectures: model_type; no num_key_value_heads: = heads; no
     * max_position_embeddings: the class default; legacy rope_scaling */
    json_t *cfg = json_pack("{s:s, s:i, s:i, s:i, s:i, s:i, s:f, s:{s:s, s:f}}", "model_type", "llama",
                            "hidden_size", T_E, "intermediate_size", T_FF, "num_hidden_layers", T_LAYERS,
                            "num_attention_heads", T_H, "vocab_size", T_V, "rope_theta", 500000.0,
                            "rope_scaling", "type", "linear", "factor", 4.0);
    llama_spec(&ms, "model.", false, false, true);
    for (int i = 0; i < ms.n; i++)  /* kv heads = heads: k/v as wide as q */
        if (strstr(ms.t[i].name, "k_proj") || strstr(ms.t[i].name, "v_proj"))
            ms.t[i].shape[0] = T_H * T_HD;
    write_config(cfg);
    write_weights(&ms, "model.safetensors", 0);
    copy_tokenizer();
    eng_model *m = load_ok(tmpdir);
    const eng_model_config *c = &m->cfg;
    cr_assert_eq(c->n_kv_head, T_H);
    cr_assert_eq(c->head_dim, T_E / T_H);
    cr_assert_eq(c->n_ctx_train, 2048, "LlamaConfig's max_position_embeddings");
    cr_assert_float_eq(c->norm_eps, 1e-6f, 1e-12, "LlamaConfig's rms_norm_eps");
    cr_assert(!c->tied_embeddings);
    cr_assert_eq(c->rope_theta, 500000.0f);
    cr_assert_eq(c->rope_scaling, ENG_ROPE_SCALING_LINEAR);
    cr_assert_eq(c->rope_factor, 4.0f);
    expect_spec_rows(&m->layers[0].wqkv, 2 * T_H * T_HD, &ms, "model.layers.0.self_attn.v_proj.weight");
    eng_model_free(m);

    /* v4-style llama3 scaling (Llama 3.1's config.json) */
    cfg = llama_config("LlamaForCausalLM");
    json_object_set_new(cfg, "num_key_value_heads", json_integer(T_H));
    json_object_set_new(cfg, "rope_scaling",
                        json_pack("{s:s, s:f, s:f, s:f, s:i}", "rope_type", "llama3", "factor", 8.0,
                                  "low_freq_factor", 1.0, "high_freq_factor", 4.0,
                                  "original_max_position_embeddings", 8192));
    write_config(cfg);
    m = load_ok(tmpdir);
    cr_assert_eq(m->cfg.rope_scaling, ENG_ROPE_SCALING_LLAMA3);
    cr_assert_eq(m->cfg.rope_orig_ctx, 8192);
    cr_assert_eq(m->cfg.rope_high_freq_factor, 4.0f);
    eng_model_free(m);
}

Test(model_hf, sliding_window_caps_context)
{
    model_spec ms;
    json_t *cfg = llama_config("MistralForCausalLM");
    json_object_set_new(cfg, "sliding_window", json_integer(64));
    build_llama(&ms, cfg, "model.", false, false, true);
    eng_model *m = load_ok(tmpdir);
    cr_assert_eq(m->cfg.n_ctx_train, 64);
    eng_model_free(m);

    cfg = llama_config("Qwen2ForCausalLM");
    json_object_set_new(cfg, "use_sliding_window", json_true());
    json_object_set_new(cfg, "max_window_layers", json_integer(1));
    json_object_set_new(cfg, "sliding_window", json_integer(32));
    build_llama(&ms, cfg, "model.", true, false, true);
    m = load_ok(tmpdir);
    cr_assert_eq(m->cfg.n_ctx_train, 32);
    eng_model_free(m);

    /* every layer below max_window_layers: full attention everywhere */
    cfg = llama_config("Qwen2ForCausalLM");
    json_object_set_new(cfg, "use_sliding_window", json_true());
    json_object_set_new(cfg, "max_window_layers", json_integer(T_LAYERS));
    json_object_set_new(cfg, "sliding_window", json_integer(32));
    write_config(cfg);
    m = load_ok(tmpdir);
    cr_assert_eq(m->cfg.n_ctx_train, 256);
    eng_model_free(m);

    /* transformers v5: per-layer types */
    cfg = llama_config("Qwen2ForCausalLM");
    json_object_set_new(cfg, "layer_types", json_pack("[s,s]", "full_attention", "sliding_attention"));
    json_object_set_new(cfg, "sliding_window", json_integer(48));
    write_config(cfg);
    m = load_ok(tmpdir);
    cr_assert_eq(m->cfg.n_ctx_train, 48);
    eng_model_free(m);

    cfg = llama_config("Qwen2ForCausalLM");
    json_object_set_new(cfg, "layer_types", json_pack("[s,s]", "full_attention", "chunked_attention"));
    write_config(cfg);
    expect_load_error("layer_types[1]", "chunked_attention");
}

Test(model_hf, chat_template_sources)
{
    model_spec ms;
    build_llama(&ms, llama_config("LlamaForCausalLM"), "model.", false, false, true);
    write_text(tmp_path("tokenizer_config.json"),
               "{\"chat_template\":[{\"name\":\"tool_use\",\"template\":\"T\"},"
               "{\"name\":\"default\",\"template\":\"D\"}]}");
    eng_model *m = load_ok(tmpdir);
    cr_assert_str_eq(m->chat_template, "D");
    eng_model_free(m);
    write_text(tmp_path("chat_template.jinja"), "{{ messages }}\n");
    m = load_ok(tmpdir);
    cr_assert_str_eq(m->chat_template, "{{ messages }}\n", "chat_template.jinja takes precedence");
    eng_model_free(m);
    remove(tmp_path("chat_template.jinja"));
    write_text(tmp_path("tokenizer_config.json"), "{\"chat_template\": 42}");
    expect_load_error("tokenizer_config.json", "chat_template");
}

/* ---- errors ----------------------------------------------------------------- */

Test(model_hf, missing_tensor_and_wrong_shape)
{
    model_spec ms;
    build_llama(&ms, llama_config("LlamaForCausalLM"), "model.", false, false, true);
    spec_remove(&ms, "model.layers.1.self_attn.k_proj.weight");
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("model.layers.1.self_attn.k_proj.weight", "missing");

    llama_spec(&ms, "model.", false, false, true);
    ms.t[spec_index(&ms, "model.layers.0.self_attn.v_proj.weight")].shape[0] = 5;
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("model.layers.0.self_attn.v_proj.weight", "expected shape [4, 8], found [5, 8]");

    llama_spec(&ms, "model.", false, false, true);
    ms.t[spec_index(&ms, "model.norm.weight")].n_dims = 2;
    ms.t[spec_index(&ms, "model.norm.weight")].shape[1] = 1;
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("model.norm.weight", "expected shape [8], found [8, 1]");

    llama_spec(&ms, "model.", false, false, true);
    ms.t[spec_index(&ms, "model.embed_tokens.weight")].shape[0] = 100;
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("model.embed_tokens.weight", "expected shape [320, 8], found [100, 8]");

    llama_spec(&ms, "model.", false, false, true);
    ms.t[spec_index(&ms, "model.layers.0.mlp.up_proj.weight")].dtype = "I64";
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("model.layers.0.mlp.up_proj.weight", "dtype I64 is not supported");

    remove(tmp_path("model.safetensors"));
    expect_load_error(tmpdir, "no model.safetensors");
}

static void expect_config_error(json_t *cfg, const char *frag1, const char *frag2)
{
    write_config(cfg);
    expect_load_error(frag1, frag2);
}

Test(model_hf, config_errors)
{
    model_spec ms;
    build_llama(&ms, llama_config("LlamaForCausalLM"), "model.", false, false, true);

    expect_config_error(json_pack("{s:[s]}", "architectures", "BertForMaskedLM"), "BertForMaskedLM",
                        "not supported");
    expect_config_error(json_pack("{s:s}", "model_type", "falcon"), "model_type 'falcon'", "not supported");
    expect_config_error(json_pack("{s:i}", "hidden_size", 8), "neither 'architectures' nor 'model_type'", NULL);

    json_t *c = llama_config("LlamaForCausalLM");
    json_object_del(c, "hidden_size");
    expect_config_error(c, "config.json", "missing field 'hidden_size'");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "num_attention_heads", json_string("2"));
    expect_config_error(c, "field 'num_attention_heads': expected an integer", "\"2\"");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "num_hidden_layers", json_integer(0));
    expect_config_error(c, "field 'num_hidden_layers'", "found 0");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "num_attention_heads", json_integer(3));
    json_object_set_new(c, "num_key_value_heads", json_integer(2));
    expect_config_error(c, "num_attention_heads (3)", "num_key_value_heads (2)");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "num_attention_heads", json_integer(3));
    json_object_set_new(c, "num_key_value_heads", json_integer(1));
    expect_config_error(c, "hidden_size (8) is not a multiple of num_attention_heads (3)", NULL);
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "head_dim", json_integer(3));
    expect_config_error(c, "head_dim 3", "even");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "hidden_act", json_string("gelu"));
    expect_config_error(c, "hidden_act 'gelu'", "LlamaForCausalLM");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "rms_norm_eps", json_real(-1));
    expect_config_error(c, "field 'rms_norm_eps'", "positive");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "tie_word_embeddings", json_integer(1));
    expect_config_error(c, "field 'tie_word_embeddings'", "true or false");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "rope_scaling", json_pack("{s:s, s:f}", "rope_type", "yarn", "factor", 4.0));
    expect_config_error(c, "rope_scaling.rope_type 'yarn' is not supported", NULL);
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "rope_parameters", json_pack("{s:s, s:f}", "rope_type", "dynamic", "rope_theta", 1e4));
    expect_config_error(c, "rope_parameters.rope_type 'dynamic'", NULL);
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "rope_scaling", json_pack("{s:s, s:f, s:f, s:i}", "rope_type", "llama3", "factor", 8.0,
                                                     "high_freq_factor", 4.0,
                                                     "original_max_position_embeddings", 8192));
    expect_config_error(c, "missing field 'rope_scaling.low_freq_factor'", NULL);
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "mlp_bias", json_true());
    expect_config_error(c, "mlp_bias", "not supported");
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "partial_rotary_factor", json_real(0.5));
    expect_config_error(c, "partial_rotary_factor", NULL);
    c = llama_config("LlamaForCausalLM");
    json_object_set_new(c, "quantization_config", json_pack("{s:s}", "quant_method", "gptq"));
    expect_config_error(c, "quant_method 'gptq'", "not supported");
    c = llama_config("MistralForCausalLM");
    json_object_set_new(c, "sliding_window", json_string("big"));
    json_object_set_new(c, "layer_types", json_pack("[s,s]", "sliding_attention", "full_attention"));
    expect_config_error(c, "field 'sliding_window'", "\"big\"");

    write_text(tmp_path("config.json"), "{\"hidden_size\": 8,");
    expect_load_error("config.json", "line");
    remove(tmp_path("config.json"));
    expect_load_error("config.json", NULL);
}

/* ---- GPT-2 ---------------------------------------------------------------- */

enum { G_E = 8, G_H = 2, G_POS = 16, G_LAYERS = 2 };

static void gpt2_spec(model_spec *ms, const char *prefix, const char *wdtype, int n_ff)
{
    char f[128];
    ms->n = 0;
#define NAME(suffix) (snprintf(f, sizeof f, "%s%s", prefix, suffix), f)
    add(ms, "F32", T_V, G_E, NAME("wte.weight"), 0);
    add(ms, "F32", G_POS, G_E, NAME("wpe.weight"), 0);
    for (int i = 0; i < G_LAYERS; i++) {
        add(ms, "F32", 0, G_E, NAME("h.%d.ln_1.weight"), i);
        add(ms, "F32", 0, G_E, NAME("h.%d.ln_1.bias"), i);
        add(ms, wdtype, G_E, 3 * G_E, NAME("h.%d.attn.c_attn.weight"), i);
        add(ms, "F32", 0, 3 * G_E, NAME("h.%d.attn.c_attn.bias"), i);
        add(ms, wdtype, G_E, G_E, NAME("h.%d.attn.c_proj.weight"), i);
        add(ms, "F32", 0, G_E, NAME("h.%d.attn.c_proj.bias"), i);
        add(ms, "F32", 0, G_E, NAME("h.%d.ln_2.weight"), i);
        add(ms, "F32", 0, G_E, NAME("h.%d.ln_2.bias"), i);
        add(ms, wdtype, G_E, n_ff, NAME("h.%d.mlp.c_fc.weight"), i);
        add(ms, "F32", 0, n_ff, NAME("h.%d.mlp.c_fc.bias"), i);
        add(ms, wdtype, n_ff, G_E, NAME("h.%d.mlp.c_proj.weight"), i);
        add(ms, "F32", 0, G_E, NAME("h.%d.mlp.c_proj.bias"), i);
        /* old checkpoints carry the causal mask as an integer buffer */
        add(ms, "I64", 0, 4, NAME("h.%d.attn.bias"), i);
    }
    add(ms, "F32", 0, G_E, NAME("ln_f.weight"), 0);
    add(ms, "F32", 0, G_E, NAME("ln_f.bias"), 0);
#undef NAME
}

static json_t *gpt2_config(void)
{
    return json_pack("{s:[s], s:i, s:i, s:i, s:i, s:i, s:s}", "architectures", "GPT2LMHeadModel", "n_embd", G_E,
                     "n_layer", G_LAYERS, "n_head", G_H, "n_positions", G_POS, "vocab_size", T_V,
                     "activation_function", "gelu_new");
}

/* w's row o, column i must be the Conv1D weight's [i][o]. */
static void expect_transposed(const eng_tensor *w, const model_spec *ms, const char *name)
{
    int ti = spec_index(ms, name);
    const spec *s = &ms->t[ti];
    int64_t n_in = s->shape[0], n_out = s->shape[1];
    cr_assert_eq(w->ne[0], n_in, "%s", name);
    cr_assert_eq(w->ne[1], n_out, "%s", name);
    float row[64];
    for (int64_t o = 0; o < n_out; o++) {
        eng_weight_get_row(w, o, row);
        for (int64_t i = 0; i < n_in; i++)
            cr_assert_eq(row[i], spec_value(s, ti, i * n_out + o), "%s: [%lld][%lld]", name, (long long)o,
                         (long long)i);
    }
}

Test(model_hf, gpt2_transpose_f16_unprefixed)
{
    model_spec ms;
    json_t *cfg = gpt2_config();
    json_object_set_new(cfg, "n_inner", json_integer(20));
    json_object_set_new(cfg, "layer_norm_epsilon", json_real(1e-3));
    gpt2_spec(&ms, "", "F16", 20);  /* names as in the original gpt2 repository */
    write_config(cfg);
    write_weights(&ms, "model.safetensors", 0);
    copy_tokenizer();
    eng_model *m = load_ok(tmpdir);
    const eng_model_config *c = &m->cfg;
    cr_assert_eq(c->n_ff, 20);
    cr_assert_float_eq(c->norm_eps, 1e-3f, 1e-9);
    cr_assert_eq(c->n_ctx_train, G_POS);
    for (int i = 0; i < G_LAYERS; i++) {
        const eng_layer *L = &m->layers[i];
        char n[64];
        cr_assert_eq(L->wqkv.type, ENG_F16, "F16 weights keep their type through the transpose");
        snprintf(n, sizeof n, "h.%d.attn.c_attn.weight", i);
        expect_transposed(&L->wqkv, &ms, n);
        snprintf(n, sizeof n, "h.%d.attn.c_proj.weight", i);
        expect_transposed(&L->wo, &ms, n);
        snprintf(n, sizeof n, "h.%d.mlp.c_fc.weight", i);
        expect_transposed(&L->w_up, &ms, n);
        snprintf(n, sizeof n, "h.%d.mlp.c_proj.weight", i);
        expect_transposed(&L->w_down, &ms, n);
        snprintf(n, sizeof n, "h.%d.attn.c_attn.bias", i);
        expect_spec_vec(&L->bqkv, 0, &ms, n);
        snprintf(n, sizeof n, "h.%d.mlp.c_fc.bias", i);
        expect_spec_vec(&L->b_up, 0, &ms, n);
        snprintf(n, sizeof n, "h.%d.ln_2.bias", i);
        expect_spec_vec(&L->ffn_norm_b, 0, &ms, n);
    }
    expect_spec_rows(&m->pos_embd, 0, &ms, "wpe.weight");
    cr_assert_eq(m->output.data, m->tok_embd.data);
    eng_model_free(m);
}

Test(model_hf, gpt2_errors)
{
    model_spec ms;
    gpt2_spec(&ms, "transformer.", "F32", 4 * G_E);
    write_config(gpt2_config());
    write_weights(&ms, "model.safetensors", 0);
    copy_tokenizer();
    eng_model *m = load_ok(tmpdir);
    cr_assert_eq(m->cfg.n_ff, 4 * G_E, "n_inner absent -> 4 * n_embd");
    eng_model_free(m);

    json_t *c = gpt2_config();
    json_object_set_new(c, "activation_function", json_string("relu"));
    expect_config_error(c, "activation_function 'relu'", NULL);
    c = gpt2_config();
    json_object_set_new(c, "scale_attn_by_inverse_layer_idx", json_true());
    expect_config_error(c, "scale_attn_by_inverse_layer_idx", "not supported");
    c = gpt2_config();
    json_object_set_new(c, "n_head", json_integer(3));
    expect_config_error(c, "n_embd (8) is not a multiple of n_head (3)", NULL);
    c = gpt2_config();
    json_object_del(c, "n_embd");
    expect_config_error(c, "missing field 'n_embd'", NULL);

    write_config(gpt2_config());
    gpt2_spec(&ms, "transformer.", "F32", 4 * G_E);
    ms.t[spec_index(&ms, "transformer.h.1.attn.c_attn.weight")].shape[1] = 3 * G_E - 1;
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("transformer.h.1.attn.c_attn.weight", "expected shape [8, 24], found [8, 23]");

    gpt2_spec(&ms, "transformer.", "F32", 4 * G_E);
    spec_remove(&ms, "transformer.ln_f.bias");
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("transformer.ln_f.bias", "missing");

    gpt2_spec(&ms, "transformer.", "F32", 4 * G_E);
    ms.t[spec_index(&ms, "transformer.wpe.weight")].shape[0] = 8;
    write_weights(&ms, "model.safetensors", 0);
    expect_load_error("transformer.wpe.weight", "expected shape [16, 8], found [8, 8]");
}
