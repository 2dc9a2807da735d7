/* model.h: a loaded model: its configuration, weights, tokenizer and chat
 * template, independent of the file format it came from.
 *
 * Loaders (model_gguf.c, model_hf.c) fill an eng_model and hand it to
 * eng_model_finish(), which converts every weight into a format the compute
 * kernels read (eng_weight_prepare) and checks every shape, so the forward
 * pass never meets an unexpected layout. Weights of one layer that are used
 * together are fused at load: Q, K and V become one matrix `wqkv`
 * (rows: n_head*head_dim of Q, then n_kv_head*head_dim of K, then of V), and for
 * the llama family gate and up become one matrix `w_gate_up` (n_ff gate rows,
 * then n_ff up rows). A tensor with data == NULL is absent (biases, etc.). */
#ifndef ENG_MODEL_H
#define ENG_MODEL_H

#include <stdbool.h>
#include <stddef.h>

#include "engine/tensor.h"

struct eng_tokenizer;

typedef enum { ENG_ARCH_LLAMA = 0, ENG_ARCH_GPT2 = 1 } eng_arch;

/* RoPE pairing: NORM rotates adjacent pairs (x[2i], x[2i+1]), as GGUF llama
 * files expect after the converter permuted Q and K; NEOX rotates halves
 * (x[i], x[i + d/2]), as Hugging Face checkpoints expect. */
typedef enum { ENG_ROPE_NORM = 0, ENG_ROPE_NEOX = 1 } eng_rope_style;

typedef enum { ENG_ROPE_SCALING_NONE = 0, ENG_ROPE_SCALING_LLAMA3 = 1, ENG_ROPE_SCALING_LINEAR = 2 } eng_rope_scaling;

typedef struct {
    eng_arch arch;
    int n_layer;
    int n_embd;
    int n_head;
    int n_kv_head;
    int head_dim;
    int n_ff;
    int n_vocab;
    int n_ctx_train;          /* the context the model was trained for */
    float norm_eps;           /* RMSNorm / LayerNorm epsilon */
    /* llama family */
    float rope_theta;
    int rope_dim;             /* dims rotated per head (== head_dim usually) */
    eng_rope_style rope_style;
    eng_rope_scaling rope_scaling;
    float rope_factor;        /* llama3 / linear */
    float rope_low_freq_factor, rope_high_freq_factor;  /* llama3 */
    int rope_orig_ctx;        /* llama3: original_max_position_embeddings */
    bool tied_embeddings;     /* output projection is tok_embd */
} eng_model_config;

typedef struct {
    eng_tensor attn_norm, attn_norm_b;     /* (n_embd); _b: LayerNorm bias (gpt2) */
    eng_tensor wqkv, bqkv;                 /* (n_embd) -> (q_dim + 2 kv_dim) */
    eng_tensor wo, bo;                     /* (q_dim) -> (n_embd) */
    eng_tensor ffn_norm, ffn_norm_b;       /* (n_embd) */
    eng_tensor w_gate_up;                  /* llama: (n_embd) -> (2 n_ff): gate rows, then up */
    eng_tensor w_up, b_up;                 /* gpt2:  (n_embd) -> (n_ff) */
    eng_tensor w_down, b_down;             /* (n_ff) -> (n_embd) */
} eng_layer;

typedef struct eng_model {
    eng_model_config cfg;
    eng_tensor tok_embd;      /* (n_vocab rows of n_embd) */
    eng_tensor pos_embd;      /* gpt2: (n_ctx_train rows of n_embd) */
    eng_tensor out_norm, out_norm_b;
    eng_tensor output;        /* (n_embd) -> (n_vocab); data == tok_embd.data when tied */
    eng_layer *layers;        /* n_layer */
    struct eng_tokenizer *tok;
    char *chat_template;      /* the model's template source, or NULL */
    char *name;               /* a display name (file name or general.name) */
    char *path;               /* what the user passed */
    /* Format-specific resources released by eng_model_free (a GGUF mapping,
     * safetensors mappings). */
    void (*release)(void *);
    void *release_ctx;
} eng_model;

/* The RoPE inverse frequency of each rotated pair i < rope_dim / 2, with the
 * config's scaling (linear, or Llama 3.1's smooth band), computed in double
 * and rounded to f32 as transformers keeps them. Both backends rotate with
 * these. */
void eng_rope_inv_freq(const eng_model_config *c, float *out);

/* Loads a model from a GGUF file or a Hugging Face directory (config.json +
 * model.safetensors or model.safetensors.index.json + tokenizer). Returns NULL
 * with a message naming the file and what is wrong. */
eng_model *eng_model_load(const char *path, char *err, size_t errlen);
void eng_model_free(eng_model *m);

/* Called by loaders once every tensor and config field is set: prepares the
 * weights for the kernels and validates all shapes against cfg. Returns 0 or
 * -1 with a message. */
int eng_model_finish(eng_model *m, char *err, size_t errlen);

/* Loader entry points (each file format's own file). */
eng_model *eng_model_load_gguf(const char *path, char *err, size_t errlen);
eng_model *eng_model_load_hf(const char *dir, char *err, size_t errlen);

/* Concatenates matrices with equal ne[0] along rows into one owned tensor,
 * converting to a common type first when their types differ. Used to fuse
 * Q/K/V and gate/up. Returns 0 or -1 with a message. */
int eng_tensor_concat_rows(const eng_tensor *parts, int n, eng_tensor *out, char *err, size_t errlen);

#endif
