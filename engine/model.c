/* model.c: format-independent model handling: loading by path, the final
 * preparation and shape check of every weight, fusion of matrices, freeing. */
#include "engine/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/matmul.h"
#include "engine/tokenizer.h"

eng_model *eng_model_load(const char *path, char *err, size_t errlen) {
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, errlen, "%s: no such file or directory", path);
        return NULL;
    }
    if (S_ISDIR(st.st_mode))
        return eng_model_load_hf(path, err, errlen);
    return eng_model_load_gguf(path, err, errlen);
}

static void free_layer(eng_layer *l) {
    eng_tensor *all[] = {&l->attn_norm, &l->attn_norm_b, &l->wqkv, &l->bqkv, &l->wo, &l->bo,
                         &l->ffn_norm, &l->ffn_norm_b, &l->w_gate_up, &l->w_up, &l->b_up,
                         &l->w_down, &l->b_down};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        eng_tensor_free(all[i]);
}

void eng_model_free(eng_model *m) {
    if (!m)
        return;
    if (m->layers)
        for (int i = 0; i < m->cfg.n_layer; i++)
            free_layer(&m->layers[i]);
    free(m->layers);
    if (m->output.data == m->tok_embd.data)
        m->output.owned = false;
    eng_tensor_free(&m->output);
    eng_tensor_free(&m->tok_embd);
    eng_tensor_free(&m->pos_embd);
    eng_tensor_free(&m->out_norm);
    eng_tensor_free(&m->out_norm_b);
    if (m->tok)
        eng_tokenizer_free(m->tok);
    free(m->chat_template);
    free(m->name);
    free(m->path);
    if (m->release)
        m->release(m->release_ctx);
    free(m);
}

/* Decodes any decodable tensor into a new owned F32 tensor of the same shape. */
static int to_f32(const eng_tensor *src, eng_tensor *dst, char *err, size_t errlen) {
    size_t n = (size_t)src->ne[0] * (size_t)src->ne[1];
    float *f = malloc(n * sizeof(float));
    if (!f) {
        snprintf(err, errlen, "out of memory decoding a %lld x %lld tensor",
                 (long long)src->ne[0], (long long)src->ne[1]);
        return -1;
    }
    size_t rb = eng_row_bytes(src->type, src->ne[0]);
    for (int64_t r = 0; r < src->ne[1]; r++) {
        if (eng_dequantize_row(src->type, (const char *)src->data + rb * (size_t)r,
                               f + (size_t)r * (size_t)src->ne[0], src->ne[0]) != 0) {
            free(f);
            snprintf(err, errlen, "cannot decode tensor type %d", (int)src->type);
            return -1;
        }
    }
    *dst = (eng_tensor){.type = ENG_F32, .ne = {src->ne[0], src->ne[1]}, .data = f, .owned = true};
    return 0;
}

int eng_tensor_concat_rows(const eng_tensor *parts, int n, eng_tensor *out, char *err, size_t errlen) {
    bool vectors = true, same_cols = true;
    for (int i = 0; i < n; i++) {
        if (!parts[i].data) {
            snprintf(err, errlen, "fusing tensors: part %d of %d is missing", i + 1, n);
            return -1;
        }
        vectors &= parts[i].ne[1] == 1;
        same_cols &= parts[i].ne[0] == parts[0].ne[0];
    }
    /* Vectors of different lengths (biases) concatenate element-wise in F32. */
    if (!same_cols && !vectors) {
        snprintf(err, errlen, "fusing tensors: row lengths differ (%lld vs %lld)",
                 (long long)parts[0].ne[0], (long long)parts[1].ne[0]);
        return -1;
    }
    eng_tensor conv[8];
    if (n > 8) {
        snprintf(err, errlen, "fusing tensors: too many parts (%d)", n);
        return -1;
    }
    bool same_type = true;
    int rc = 0, done = 0;
    for (; done < n; done++) {
        conv[done] = parts[done];
        conv[done].owned = false;
        if (vectors && !same_cols)
            rc = conv[done].type == ENG_F32 ? 0 : to_f32(&parts[done], &conv[done], err, errlen);
        else
            rc = eng_weight_prepare(&conv[done], err, errlen);
        if (rc)
            break;
        same_type &= conv[done].type == conv[0].type;
    }
    if (!rc && !same_type) { /* mixed runtime types: widen everything to F32 */
        for (int i = 0; i < n && !rc; i++) {
            if (conv[i].type == ENG_F32)
                continue;
            eng_tensor f;
            rc = to_f32(&conv[i], &f, err, errlen);
            if (!rc) {
                eng_tensor_free(&conv[i]);
                conv[i] = f;
            }
        }
    }
    if (!rc) {
        size_t total = 0;
        int64_t rows = 0, cols = 0;
        for (int i = 0; i < n; i++) {
            total += eng_tensor_bytes(&conv[i]);
            rows += conv[i].ne[1];
            cols += conv[i].ne[0];
        }
        char *buf = malloc(total ? total : 1);
        if (!buf) {
            snprintf(err, errlen, "fusing tensors: out of memory (%zu bytes)", total);
            rc = -1;
        } else {
            size_t off = 0;
            for (int i = 0; i < n; i++) {
                memcpy(buf + off, conv[i].data, eng_tensor_bytes(&conv[i]));
                off += eng_tensor_bytes(&conv[i]);
            }
            *out = (eng_tensor){.type = conv[0].type, .data = buf, .owned = true};
            if (vectors && !same_cols) {
                out->ne[0] = cols;
                out->ne[1] = 1;
            } else {
                out->ne[0] = conv[0].ne[0];
                out->ne[1] = rows;
            }
        }
    }
    for (int i = 0; i < done; i++) /* conv[done] failed and holds nothing */
        eng_tensor_free(&conv[i]);
    return rc;
}

/* Checks a tensor's shape; vectors are given as (n, 1). */
static int check(const eng_tensor *t, const char *what, int layer, int64_t ne0, int64_t ne1,
                 bool required, char *err, size_t errlen) {
    char name[64];
    if (layer >= 0)
        snprintf(name, sizeof name, "layer %d %s", layer, what);
    else
        snprintf(name, sizeof name, "%s", what);
    if (!t->data) {
        if (!required)
            return 0;
        snprintf(err, errlen, "%s: missing", name);
        return -1;
    }
    /* A vector may come as (n, 1) or as (1, n); a bias vector as rows of its parts. */
    int64_t n_el = t->ne[0] * t->ne[1];
    bool ok = ne1 == 1 ? n_el == ne0 : (t->ne[0] == ne0 && t->ne[1] == ne1);
    if (!ok) {
        snprintf(err, errlen, "%s: shape [%lld, %lld], expected [%lld, %lld]", name,
                 (long long)t->ne[0], (long long)t->ne[1], (long long)ne0, (long long)ne1);
        return -1;
    }
    return 0;
}

/* Vectors (norm weights, biases) become flat F32 arrays. */
static int prepare_vector(eng_tensor *t, char *err, size_t errlen) {
    if (!t->data)
        return 0;
    int64_t n = t->ne[0] * t->ne[1];
    if (t->type != ENG_F32) {
        eng_tensor f;
        eng_tensor flat = *t;
        if (t->ne[1] != 1 && eng_dtype_block_elems(t->type) == 1) {
            flat.ne[0] = n;
            flat.ne[1] = 1;
        }
        if (to_f32(&flat, &f, err, errlen))
            return -1;
        eng_tensor_free(t);
        *t = f;
    }
    t->ne[0] = n;
    t->ne[1] = 1;
    return 0;
}

static int prepare_matrix(eng_tensor *t, const char *what, int layer, char *err, size_t errlen) {
    if (!t->data)
        return 0;
    char msg[256];
    if (eng_weight_prepare(t, msg, sizeof msg)) {
        if (layer >= 0)
            snprintf(err, errlen, "layer %d %s: %s", layer, what, msg);
        else
            snprintf(err, errlen, "%s: %s", what, msg);
        return -1;
    }
    return 0;
}

int eng_model_finish(eng_model *m, char *err, size_t errlen) {
    eng_model_config *c = &m->cfg;
    if (c->n_layer <= 0 || c->n_embd <= 0 || c->n_head <= 0 || c->n_kv_head <= 0 ||
        c->n_ff <= 0 || c->n_vocab <= 0 || c->head_dim <= 0) {
        snprintf(err, errlen, "model config: non-positive dimension (layers %d, embd %d, heads %d, "
                 "kv heads %d, head_dim %d, ff %d, vocab %d)", c->n_layer, c->n_embd, c->n_head,
                 c->n_kv_head, c->head_dim, c->n_ff, c->n_vocab);
        return -1;
    }
    if (c->n_head % c->n_kv_head != 0) {
        snprintf(err, errlen, "model config: %d heads is not a multiple of %d kv heads", c->n_head,
                 c->n_kv_head);
        return -1;
    }
    if (c->rope_dim <= 0 || c->rope_dim > c->head_dim)
        c->rope_dim = c->head_dim;
    if (c->norm_eps <= 0)
        c->norm_eps = 1e-5f;
    if (c->n_ctx_train <= 0)
        c->n_ctx_train = 2048;
    const int64_t q_dim = (int64_t)c->n_head * c->head_dim, kv_dim = (int64_t)c->n_kv_head * c->head_dim;
    const bool gpt2 = c->arch == ENG_ARCH_GPT2;

    if (prepare_matrix(&m->tok_embd, "token embedding", -1, err, errlen) ||
        check(&m->tok_embd, "token embedding", -1, c->n_embd, c->n_vocab, true, err, errlen))
        return -1;
    if (c->tied_embeddings || !m->output.data) {
        c->tied_embeddings = true;
        if (m->output.data && m->output.data != m->tok_embd.data)
            eng_tensor_free(&m->output);
        m->output = m->tok_embd;
        m->output.owned = false;
    } else if (prepare_matrix(&m->output, "output", -1, err, errlen) ||
               check(&m->output, "output", -1, c->n_embd, c->n_vocab, true, err, errlen)) {
        return -1;
    }
    if (prepare_vector(&m->out_norm, err, errlen) || prepare_vector(&m->out_norm_b, err, errlen) ||
        check(&m->out_norm, "output norm", -1, c->n_embd, 1, true, err, errlen) ||
        check(&m->out_norm_b, "output norm bias", -1, c->n_embd, 1, gpt2, err, errlen))
        return -1;
    if (gpt2) {
        if (prepare_matrix(&m->pos_embd, "position embedding", -1, err, errlen) ||
            check(&m->pos_embd, "position embedding", -1, c->n_embd, m->pos_embd.ne[1], true, err, errlen))
            return -1;
        c->n_ctx_train = (int)m->pos_embd.ne[1];
    }
    for (int i = 0; i < c->n_layer; i++) {
        eng_layer *l = &m->layers[i];
        eng_tensor *vecs[] = {&l->attn_norm, &l->attn_norm_b, &l->bqkv, &l->bo, &l->ffn_norm,
                              &l->ffn_norm_b, &l->b_up, &l->b_down};
        for (size_t v = 0; v < sizeof vecs / sizeof vecs[0]; v++)
            if (prepare_vector(vecs[v], err, errlen))
                return -1;
        if (prepare_matrix(&l->wqkv, "qkv", i, err, errlen) ||
            prepare_matrix(&l->wo, "attn output", i, err, errlen) ||
            prepare_matrix(&l->w_gate_up, "ffn gate+up", i, err, errlen) ||
            prepare_matrix(&l->w_up, "ffn up", i, err, errlen) ||
            prepare_matrix(&l->w_down, "ffn down", i, err, errlen))
            return -1;
        if (check(&l->attn_norm, "attn norm", i, c->n_embd, 1, true, err, errlen) ||
            check(&l->attn_norm_b, "attn norm bias", i, c->n_embd, 1, gpt2, err, errlen) ||
            check(&l->wqkv, "qkv", i, c->n_embd, q_dim + 2 * kv_dim, true, err, errlen) ||
            check(&l->bqkv, "qkv bias", i, q_dim + 2 * kv_dim, 1, gpt2, err, errlen) ||
            check(&l->wo, "attn output", i, q_dim, c->n_embd, true, err, errlen) ||
            check(&l->bo, "attn output bias", i, c->n_embd, 1, gpt2, err, errlen) ||
            check(&l->ffn_norm, "ffn norm", i, c->n_embd, 1, true, err, errlen) ||
            check(&l->ffn_norm_b, "ffn norm bias", i, c->n_embd, 1, gpt2, err, errlen) ||
            check(&l->w_down, "ffn down", i, c->n_ff, c->n_embd, true, err, errlen) ||
            check(&l->b_down, "ffn down bias", i, c->n_embd, 1, gpt2, err, errlen))
            return -1;
        if (gpt2 ? (check(&l->w_up, "ffn up", i, c->n_embd, c->n_ff, true, err, errlen) ||
                    check(&l->b_up, "ffn up bias", i, c->n_ff, 1, true, err, errlen))
                 : check(&l->w_gate_up, "ffn gate+up", i, c->n_embd, 2 * (int64_t)c->n_ff, true, err, errlen))
            return -1;
    }
    /* the batched kernels' copies (the tied output's is its own) */
    for (int i = 0; i < c->n_layer; i++) {
        eng_layer *l = &m->layers[i];
        eng_tensor *mats[] = {&l->wqkv, &l->wo, &l->w_gate_up, &l->w_up, &l->w_down};
        for (size_t k = 0; k < sizeof mats / sizeof mats[0]; k++)
            if (mats[k]->data && eng_weight_pack(mats[k], err, errlen))
                return -1;
    }
    if (eng_weight_pack(&m->output, err, errlen))
        return -1;
    if (m->tok && eng_tokenizer_n_vocab(m->tok) > c->n_vocab) {
        snprintf(err, errlen, "tokenizer has %d tokens but the model's vocabulary is %d",
                 eng_tokenizer_n_vocab(m->tok), c->n_vocab);
        return -1;
    }
    return 0;
}

void eng_rope_inv_freq(const eng_model_config *c, float *out) {
    const int half = c->rope_dim / 2;
    for (int i = 0; i < half; i++) {
        double f = 1.0 / pow((double)c->rope_theta, (double)(2 * i) / c->rope_dim);
        if (c->rope_scaling == ENG_ROPE_SCALING_LINEAR && c->rope_factor > 0) {
            f /= c->rope_factor;
        } else if (c->rope_scaling == ENG_ROPE_SCALING_LLAMA3) {
            /* Llama 3.1: long wavelengths are divided by `factor`, short ones
             * kept, and the band between is interpolated smoothly. */
            double low_wl = c->rope_orig_ctx / c->rope_low_freq_factor;
            double high_wl = c->rope_orig_ctx / c->rope_high_freq_factor;
            double wl = 2 * M_PI / f;
            if (wl > low_wl) {
                f /= c->rope_factor;
            } else if (wl >= high_wl) {
                double s = (c->rope_orig_ctx / wl - c->rope_low_freq_factor) /
                           (c->rope_high_freq_factor - c->rope_low_freq_factor);
                f = (1 - s) * f / c->rope_factor + s * f;
            }
        }
        out[i] = (float)f;
    }
}
