/* backend.h: the compute backend contract: one forward pass over a flattened
 * batch of token segments from many sequences.
 *
 * A batch is a list of segments; each segment is a run of consecutive tokens
 * of one sequence (a prefill chunk, or the single token of a decode step) at
 * positions [pos0, pos0 + n_tokens). The backend writes each segment's K/V into
 * the sequence's pages (reserved beforehand by the caller for pos0 + n_tokens
 * positions) and returns logits for the rows asked: every token of segments
 * with all_logits, else only the last token of segments with want_logits. The
 * CPU and CUDA backends implement the same contract and are tested against each
 * other. A backend is used by one thread at a time (the engine thread). */
#ifndef ENG_BACKEND_H
#define ENG_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "cache/kvcache.h"
#include "engine/model.h"
#include "engine/sampler.h"

typedef struct {
    kvc_seq *seq;            /* the sequence's block table */
    int pos0;                /* position of tokens[0] */
    int n_tokens;
    const int32_t *tokens;   /* (n_tokens) */
    bool want_logits;        /* logits of the last token */
    bool all_logits;         /* logits of every token (perplexity) */
    /* > 0 (want_logits only, at most the backend's cands_max): the last
     * token's row comes back as its record instead, an eng_cands with
     * cands_k entries in the row's first bytes (engine/sampler.h);
     * ENG_CANDS_DRAW (where the backend has cands_draw): the record of the
     * row's draw by `draw` (eng_cands_draw) */
    int cands_k;
    eng_draw draw;
    /* with cands_k != 0 (where the backend has cands_penalties): applied to
     * the row before its record or draw (eng_penalties_apply); NULL: none */
    const eng_penalties *pen;
} eng_segment;

typedef struct {
    int n_segs;
    const eng_segment *segs;
} eng_batch;

/* Number of logit rows a batch produces (the order is segment order). */
int eng_batch_logit_rows(const eng_batch *b);
typedef struct eng_backend eng_backend;

/* What every backend checks before a forward: each segment has tokens,
 * positions reserved for them, ids inside the vocabulary, (gpt2) positions
 * the model learned, and records only where be returns them. 0, or -1 with a
 * message naming the segment. */
int eng_batch_check(const eng_backend *be, const eng_batch *b, const eng_model_config *c, char *err,
                    size_t errlen);

typedef struct {
    int n_threads;           /* CPU: compute threads (<= 0: all cores) */
    /* Absorbed projections (DESIGN.md §4): where the pool stores V, or keys
     * cached before RoPE, as coefficients on a fixed basis P (kvc_get_basis),
     * fold P^T into the K/V projection rows once at creation and compute the
     * coefficients directly (fewer rows than the projection they replace).
     * Ignored where the codecs have no basis. Off by default: the folded rows
     * are f32, more bytes per decode step than the quantized rows they replace. */
    bool absorb;
    int device;              /* CUDA: the GPU's index (0: the first) */
} eng_backend_options;

/* The CPU backend. The model and the pool must outlive it. It reads the
 * pool's codecs: keys cached before RoPE (kvc_keys_pre_rope) are written
 * unrotated and attended through kvc_attend_rope with the RoPE tables the
 * queries are rotated with. */
eng_backend *eng_backend_cpu_create(const eng_model *m, kvc_pool *pool,
                                    const eng_backend_options *opt, char *err, size_t errlen);

/* The CUDA backend (engine/cuda/forward.cu, in builds made with make
 * CUDA=1): the whole forward pass on one GPU, the KV pages in a device arena
 * of the pool's layout (the pool keeps the tables; its own arena stays
 * unused). Llama-family models; the pool's codecs must be in the GPU
 * kernels' compiled set (cache/cuda/kvc_cuda.h), or creation fails naming
 * the codec. Absorbed projections are not used (absorbed "none"). */
eng_backend *eng_backend_cuda_create(const eng_model *m, kvc_pool *pool,
                                     const eng_backend_options *opt, char *err, size_t errlen);

/* The backend called `name`: "cpu" or "cuda" (an error naming the build
 * when this binary has no CUDA). NULL with a message otherwise. */
eng_backend *eng_backend_create(const char *name, const eng_model *m, kvc_pool *pool,
                                const eng_backend_options *opt, char *err, size_t errlen);
/* Whether this binary was built with the CUDA backend. */
bool eng_backend_has_cuda(void);

/* eng_backend.absorbed: the projections folded into the cache's bases. */
enum { ENG_ABSORBED_K = 1, ENG_ABSORBED_V = 2 };
static inline const char *eng_absorbed_name(unsigned a) {
    return a == (ENG_ABSORBED_K | ENG_ABSORBED_V) ? "K+V" : a == ENG_ABSORBED_K ? "K" : a ? "V" : "none";
}

struct eng_backend {
    const char *name;
    const char *desc;        /* for logs: "cpu, 2 threads", "cuda, device 0 (NVIDIA H200)" */
    unsigned absorbed;       /* ENG_ABSORBED_K | ENG_ABSORBED_V, as eng_backend_options.absorb allowed */
    int cands_max;           /* the largest eng_segment.cands_k it takes (0: whole rows only) */
    bool cands_draw;         /* it takes cands_k ENG_CANDS_DRAW */
    bool cands_penalties;    /* it takes eng_segment.pen */
    /* logits: (eng_batch_logit_rows(b), n_vocab). Returns 0, or -1 with a
     * message (a position past the model's limit, out of memory). */
    int (*forward)(eng_backend *be, const eng_batch *b, float *logits, char *err, size_t errlen);
    void (*destroy)(eng_backend *be);
    /* Optional (NULL: malloc / free): host memory that forward's logits
     * land in fastest (page-locked for cuda: a plain buffer costs the copy
     * half its speed). Free it before destroying the backend. */
    void *(*alloc_host)(eng_backend *be, size_t bytes);
    void (*free_host)(eng_backend *be, void *p);
};

static inline void *eng_backend_alloc_host(eng_backend *be, size_t bytes) {
    return be->alloc_host ? be->alloc_host(be, bytes) : malloc(bytes);
}
static inline void eng_backend_free_host(eng_backend *be, void *p) {
    if (be->free_host)
        be->free_host(be, p);
    else
        free(p);
}

static inline int eng_forward(eng_backend *be, const eng_batch *b, float *logits, char *err, size_t errlen) {
    return be->forward(be, b, logits, err, errlen);
}
static inline void eng_backend_destroy(eng_backend *be) {
    if (be)
        be->destroy(be);
}

#endif
