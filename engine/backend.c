/* backend.c: picks a backend by name. The CUDA one exists only in builds
 * made with `make CUDA=1` (KVSERVE_CUDA defined, engine/cuda/ linked). */
#include <stdio.h>
#include <string.h>

#include "engine/backend.h"

bool eng_backend_has_cuda(void) {
#ifdef KVSERVE_CUDA
    return true;
#else
    return false;
#endif
}

eng_backend *eng_backend_create(const char *name, const eng_model *m, kvc_pool *pool,
                                const eng_backend_options *opt, char *err, size_t errlen) {
    if (!name || !strcmp(name, "cpu"))
        return eng_backend_cpu_create(m, pool, opt, err, errlen);
    if (!strcmp(name, "cuda")) {
#ifdef KVSERVE_CUDA
        return eng_backend_cuda_create(m, pool, opt, err, errlen);
#else
        snprintf(err, errlen,
                 "backend \"cuda\": this kvserve was built without CUDA (build it with make CUDA=1, which needs "
                 "nvcc; or use --backend cpu)");
        return NULL;
#endif
    }
    snprintf(err, errlen, "backend \"%s\": must be cpu or cuda", name);
    return NULL;
}

int eng_batch_check(const eng_backend *be, const eng_batch *b, const eng_model_config *c, char *err,
                    size_t errlen) {
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        if (s->cands_k == ENG_CANDS_DRAW) {
            const eng_draw *d = &s->draw;
            if (!be->cands_draw || !s->want_logits || s->all_logits || !(d->u >= 0.0 && d->u < 1.0) ||
                !(d->inv_temp > 0.0f && d->inv_temp <= 3.4e38f) || !(d->top_p > 0.0f && d->top_p <= 1.0f) ||
                !(d->min_p >= 0.0f && d->min_p <= 1.0f)) {
                snprintf(err, errlen, "forward: segment %d asks a draw (at %g, 1 / temperature %g, top-p %g, min-p %g) %s",
                         i, d->u, (double)d->inv_temp, (double)d->top_p, (double)d->min_p,
                         be->cands_draw ? "out of range" : "this backend does not make");
                return -1;
            }
        } else if (s->cands_k && (s->cands_k < 0 || s->cands_k > be->cands_max || !s->want_logits || s->all_logits)) {
            snprintf(err, errlen, "forward: segment %d asks a record of %d candidates (this backend: 1 to %d, "
                     "a last token's row only)", i, s->cands_k, be->cands_max);
            return -1;
        }
        if (s->pen && (!s->cands_k || !be->cands_penalties)) {
            snprintf(err, errlen, "forward: segment %d asks penalties %s", i,
                     s->cands_k ? "this backend does not apply" : "without a record or draw");
            return -1;
        }
        for (int j = 0; s->pen && j < s->pen->n; j++)
            if (s->pen->e[j].id < 0 || s->pen->e[j].id >= c->n_vocab) {
                snprintf(err, errlen, "forward: segment %d: a penalty on token %d, outside the vocabulary", i,
                         s->pen->e[j].id);
                return -1;
            }
        if (s->n_tokens <= 0 || s->pos0 < 0 || !s->seq || s->seq->n_tokens < s->pos0 + s->n_tokens) {
            snprintf(err, errlen, "forward: segment %d: %d tokens at position %d, %d positions reserved", i,
                     s->n_tokens, s->pos0, s->seq ? s->seq->n_tokens : 0);
            return -1;
        }
        if (c->arch == ENG_ARCH_GPT2 && s->pos0 + s->n_tokens > c->n_ctx_train) {
            snprintf(err, errlen, "forward: position %d is past the model's %d learned positions",
                     s->pos0 + s->n_tokens - 1, c->n_ctx_train);
            return -1;
        }
        for (int t = 0; t < s->n_tokens; t++)
            if (s->tokens[t] < 0 || s->tokens[t] >= c->n_vocab) {
                snprintf(err, errlen, "forward: token id %d outside the vocabulary [0, %d)", s->tokens[t],
                         c->n_vocab);
                return -1;
            }
    }
    return 0;
}
