/* forward_cpu.c: the CPU backend: one forward pass over a flattened batch.
 *
 * All tokens of all segments are stacked into one (T, n_embd) activation
 * matrix, so every weight matmul runs once per layer for the whole batch.
 * Per layer: norm -> fused QKV matmul -> RoPE -> K/V written into the paged
 * cache (compressed as they are written) -> attention from the pages, threaded
 * over (segment, kv head, query block) -> output projection -> norm -> fused
 * gate/up matmul -> SiLU*up (GELU for gpt2) -> down projection. Scratch grows
 * with the largest batch seen and is bounded by the scheduler's token budget,
 * never by prompt length.
 *
 * Two cache options change the K/V path. Keys cached before RoPE (a K codec
 * ending in :prerope) are written unrotated and rotated inside attention by
 * the same cos/sin tables the queries were rotated with. Absorbed projections
 * (eng_backend_options.absorb): where the cache stores coefficients
 * c = P^T (x - mean) on a fixed basis P and x = W h + b, the folded rows
 * P^T W and P^T (b - mean) are built once per layer, and the coefficients
 * come out of one f32 matmul instead of W's rows followed by the projection. */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/act.h"
#include "engine/backend.h"
#include "engine/matmul.h"
#include "engine/threadpool.h"

#define QUERY_BLOCK 16  /* query tokens per attention task in a prefill chunk */

/* A layer with absorbed projections. K or V is absorbed when its codec has a
 * basis (and, for K, when keys are cached before RoPE or the model has no
 * RoPE: RoPE does not commute with P). */
typedef struct {
    eng_layer layer;    /* the model's layer with wqkv / bqkv cut to the rows still
                         * computed in full: Q, then K and V where not absorbed */
    bool own_wqkv;      /* layer.wqkv is a copy (Q and V rows, K absorbed), else a view */
    int k_col, v_col;   /* K's and V's first column in a qkv row; -1: absorbed */
    eng_tensor w_coef;  /* F32 (n_embd) -> (n_coef): K's groups' coefficients, then V's */
    float *b_coef;      /* (n_coef) P^T (b - mean) */
    int n_coef;
    int v_coef_col;     /* V's first coefficient (K's start at 0) */
} absorbed_layer;

typedef struct {
    eng_backend base;
    char desc[96];
    const eng_model *m;
    kvc_pool *pool;
    eng_threadpool *tp;
    int n_threads;
    int q_dim, kv_dim, qkv_dim;
    /* scratch, sized for cap_tokens */
    int cap_tokens;
    float *x;     /* (T, n_embd) residual stream */
    float *xb;    /* (T, max(n_embd, q_dim)) normed input, then attention output */
    float *qkv;   /* (T, qkv_dim) */
    float *hb;    /* (T, 2 n_ff) */
    float *ff;    /* (T, n_ff) the FFN activation, the down projection's input */
    float *tmp;   /* (T, n_embd) */
    float *coef;  /* (T, coef_dim) absorbed K/V coefficients */
    int *tok_pos; /* (T) position of each token */
    bool pre_rope;             /* keys cached before RoPE (kvc_keys_pre_rope) */
    absorbed_layer *absorbed;  /* (n_layer), or NULL when nothing is absorbed */
    int coef_dim;              /* max n_coef over layers */
    /* RoPE tables, grown to rope_cap positions: (rope_cap, rope_dim / 2) */
    int rope_cap;
    float *rope_cos, *rope_sin;
    double *inv_freq; /* (rope_dim / 2) */
    /* attention scratch per worker */
    int att_ctx_cap;
    float **att_scratch;
} cpu_backend;

int eng_batch_logit_rows(const eng_batch *b) {
    int n = 0;
    for (int i = 0; i < b->n_segs; i++)
        n += b->segs[i].all_logits ? b->segs[i].n_tokens : (b->segs[i].want_logits ? 1 : 0);
    return n;
}

/* ---- RoPE ------------------------------------------------------------------ */

static int rope_init_freqs(cpu_backend *cb) {
    const int half = cb->m->cfg.rope_dim / 2;
    float *f = malloc(sizeof(float) * (size_t)(half + 1));
    if (!f)
        return -1;
    eng_rope_inv_freq(&cb->m->cfg, f);
    for (int i = 0; i < half; i++)
        cb->inv_freq[i] = f[i];
    free(f);
    return 0;
}

static int rope_grow(cpu_backend *cb, int n_pos) {
    if (n_pos <= cb->rope_cap)
        return 0;
    int cap = cb->rope_cap ? cb->rope_cap : 256;
    while (cap < n_pos)
        cap *= 2;
    int half = cb->m->cfg.rope_dim / 2;
    float *c = realloc(cb->rope_cos, (size_t)cap * half * sizeof(float));
    if (!c)
        return -1;
    cb->rope_cos = c;
    float *s = realloc(cb->rope_sin, (size_t)cap * half * sizeof(float));
    if (!s)
        return -1;
    cb->rope_sin = s;
    for (int p = cb->rope_cap; p < cap; p++)
        for (int i = 0; i < half; i++) {
            double a = (double)p * cb->inv_freq[i];
            c[(size_t)p * half + i] = (float)cos(a);
            s[(size_t)p * half + i] = (float)sin(a);
        }
    cb->rope_cap = cap;
    return 0;
}

/* Rotates n_heads heads of head_dim floats at x for position pos. */
static void rope_apply(const cpu_backend *cb, float *x, int n_heads, int pos) {
    const eng_model_config *c = &cb->m->cfg;
    const int half = c->rope_dim / 2, hd = c->head_dim;
    const float *cs = cb->rope_cos + (size_t)pos * half, *sn = cb->rope_sin + (size_t)pos * half;
    for (int h = 0; h < n_heads; h++) {
        float *v = x + (size_t)h * hd;
        if (c->rope_style == ENG_ROPE_NEOX) {
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * cs[i] - b * sn[i];
                v[i + half] = a * sn[i] + b * cs[i];
            }
        } else {
            for (int i = 0; i < half; i++) {
                float a = v[2 * i], b = v[2 * i + 1];
                v[2 * i] = a * cs[i] - b * sn[i];
                v[2 * i + 1] = a * sn[i] + b * cs[i];
            }
        }
    }
}

/* ---- row-parallel elementwise work ------------------------------------------ */

typedef enum {
    OP_NORM,        /* xb = norm(x) * w (+ b) */
    OP_ADD_NORM,    /* x += tmp (+ bias); xb = norm(x) * w (+ b) */
    OP_QKV_POST,    /* qkv += bqkv; rope q and k */
    OP_SWIGLU,      /* ff = silu(gate) * up (gate, up: hb's halves) */
    OP_GELU,        /* ff = gelu(hb[:, :n_ff] + b_up) */
} row_op;

typedef struct {
    cpu_backend *cb;
    row_op op;
    int n_rows, rows_per_task;
    const float *w, *b, *bias;  /* norm weight / norm bias / residual bias */
    int layer;                  /* OP_QKV_POST */
} row_job;

/* The rows the QKV matmul computes for layer l, and where K and V sit in them. */
static const eng_layer *qkv_layer(const cpu_backend *cb, int l, int *k_col, int *v_col) {
    const absorbed_layer *a = cb->absorbed ? &cb->absorbed[l] : NULL;
    *k_col = a ? a->k_col : cb->q_dim;
    *v_col = a ? a->v_col : cb->q_dim + cb->kv_dim;
    return a ? &a->layer : &cb->m->layers[l];
}

static void norm_row(const cpu_backend *cb, const float *x, float *out, const float *w, const float *b) {
    const eng_model_config *c = &cb->m->cfg;
    const int n = c->n_embd;
    if (c->arch == ENG_ARCH_GPT2) {
        float mean = 0, var = 0;
        for (int i = 0; i < n; i++)
            mean += x[i];
        mean /= n;
        for (int i = 0; i < n; i++)
            var += (x[i] - mean) * (x[i] - mean);
        float r = 1.0f / sqrtf(var / n + c->norm_eps);
        for (int i = 0; i < n; i++)
            out[i] = (x[i] - mean) * r * w[i] + (b ? b[i] : 0.0f);
    } else {
        float ss = 0;
        for (int i = 0; i < n; i++)
            ss += x[i] * x[i];
        float r = 1.0f / sqrtf(ss / n + c->norm_eps);
        for (int i = 0; i < n; i++)
            out[i] = x[i] * r * w[i];
    }
}

static inline float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

static void row_task(void *ctx, int task, int worker) {
    const row_job *j = ctx;
    cpu_backend *cb = j->cb;
    const eng_model_config *c = &cb->m->cfg;
    const int n_embd = c->n_embd, n_ff = c->n_ff;
    int r0 = task * j->rows_per_task, r1 = r0 + j->rows_per_task;
    if (r1 > j->n_rows)
        r1 = j->n_rows;
    for (int r = r0; r < r1; r++) {
        float *x = cb->x + (size_t)r * n_embd, *xb = cb->xb + (size_t)r * n_embd;
        switch (j->op) {
        case OP_ADD_NORM: {
            const float *t = cb->tmp + (size_t)r * n_embd;
            if (j->bias)
                for (int i = 0; i < n_embd; i++)
                    x[i] += t[i] + j->bias[i];
            else
                for (int i = 0; i < n_embd; i++)
                    x[i] += t[i];
        }
            /* fall through */
        case OP_NORM:
            norm_row(cb, x, xb, j->w, j->b);
            break;
        case OP_QKV_POST: {
            int k_col, v_col;
            const eng_layer *L = qkv_layer(cb, j->layer, &k_col, &v_col);
            float *q = cb->qkv + (size_t)r * cb->qkv_dim;
            if (L->bqkv.data)
                for (int i = 0; i < L->wqkv.ne[1]; i++)
                    q[i] += ((const float *)L->bqkv.data)[i];
            if (cb->absorbed) {
                const absorbed_layer *a = &cb->absorbed[j->layer];
                float *cf = cb->coef + (size_t)r * cb->coef_dim;
                for (int i = 0; i < a->n_coef; i++)
                    cf[i] += a->b_coef[i];
            }
            if (c->arch != ENG_ARCH_GPT2) {
                rope_apply(cb, q, c->n_head, cb->tok_pos[r]);
                if (k_col >= 0 && !cb->pre_rope)
                    rope_apply(cb, q + k_col, c->n_kv_head, cb->tok_pos[r]);
            }
            break;
        }
        case OP_SWIGLU: {
            const float *g = cb->hb + (size_t)r * 2 * n_ff;
            eng_swiglu(cb->ff + (size_t)r * n_ff, g, g + n_ff, n_ff);
            break;
        }
        case OP_GELU: {
            const float *h = cb->hb + (size_t)r * 2 * n_ff;
            float *o = cb->ff + (size_t)r * n_ff;
            for (int i = 0; i < n_ff; i++)
                o[i] = gelu_tanh(h[i] + (j->bias ? j->bias[i] : 0.0f));
            break;
        }
        }
    }
}

static void run_job(cpu_backend *cb, row_job *j) {
    if (j->n_rows < 4) { /* decode: not worth waking the workers */
        j->rows_per_task = j->n_rows;
        row_task(j, 0, 0);
        return;
    }
    int n_tasks = cb->n_threads * 4;
    j->rows_per_task = (j->n_rows + n_tasks - 1) / n_tasks;
    n_tasks = (j->n_rows + j->rows_per_task - 1) / j->rows_per_task;
    eng_threadpool_run(cb->tp, row_task, j, n_tasks);
}

static void run_rows(cpu_backend *cb, row_op op, int n_rows, const float *w, const float *b,
                     const float *bias) {
    row_job j = {.cb = cb, .op = op, .n_rows = n_rows, .w = w, .b = b, .bias = bias};
    run_job(cb, &j);
}

/* Biases of layer l's QKV rows (and absorbed coefficients), then RoPE. */
static void run_qkv_post(cpu_backend *cb, int n_rows, int layer) {
    row_job j = {.cb = cb, .op = OP_QKV_POST, .n_rows = n_rows, .layer = layer};
    run_job(cb, &j);
}

/* ---- attention -------------------------------------------------------------- */

typedef struct {
    int seg, kv_head, q0, nq, row0; /* row0: first row of the segment in the batch */
} att_unit;

typedef struct {
    cpu_backend *cb;
    const eng_batch *b;
    int layer;
    att_unit *units;
    const kvc_rope *rope;   /* the queries' RoPE, for keys cached before it */
} att_job;

static void att_task(void *ctx, int task, int worker) {
    const att_job *j = ctx;
    cpu_backend *cb = j->cb;
    const eng_model_config *c = &cb->m->cfg;
    const att_unit *u = &j->units[task];
    const eng_segment *s = &j->b->segs[u->seg];
    const int n_rep = c->n_head / c->n_kv_head;
    const size_t hoff = (size_t)u->kv_head * n_rep * c->head_dim;
    const int row = u->row0 + u->q0;
    kvc_attend_rope(cb->pool, s->seq, j->layer, u->kv_head, cb->qkv + (size_t)row * cb->qkv_dim + hoff,
                    cb->qkv_dim, u->nq, n_rep, s->pos0 + u->q0, 1.0f / sqrtf((float)c->head_dim),
                    cb->xb + (size_t)row * cb->q_dim + hoff, cb->q_dim, cb->att_scratch[worker], j->rope);
}

/* ---- K/V into the cache -------------------------------------------------------- */

typedef struct {
    cpu_backend *cb;
    const eng_batch *b;
    int layer, k_col, v_col;
    const int *row0;  /* (n_segs) each segment's first row */
    _Atomic int failed;  /* 1 + the lowest failing segment, or 0 */
} kv_job;

/* Segment `task`'s K and V of the layer into its pages (kvc_write may run
 * concurrently for different sequences): from the qkv rows, or as absorbed
 * coefficients. Encoding is a real cost for some codecs (int4 keys per
 * channel re-quantize their page's channel groups), so segments go in parallel. */
static void kv_task(void *ctx, int task, int worker) {
    kv_job *j = ctx;
    cpu_backend *cb = j->cb;
    const eng_segment *s = &j->b->segs[task];
    const absorbed_layer *a = cb->absorbed ? &cb->absorbed[j->layer] : NULL;
    const int row = j->row0[task];
    const float *qkv = cb->qkv + (size_t)row * cb->qkv_dim, *coef = cb->coef + (size_t)row * cb->coef_dim;
    const float *k = j->k_col >= 0 ? qkv + j->k_col : coef;
    const float *v = j->v_col >= 0 ? qkv + j->v_col : coef + a->v_coef_col;
    if (kvc_write_ex(cb->pool, s->seq, j->layer, s->pos0, s->n_tokens, k,
                     j->k_col >= 0 ? cb->qkv_dim : cb->coef_dim, j->k_col < 0, v,
                     j->v_col >= 0 ? cb->qkv_dim : cb->coef_dim, j->v_col < 0) != KVC_OK) {
        int seen = atomic_load(&j->failed);
        while ((seen == 0 || seen > task + 1) && !atomic_compare_exchange_weak(&j->failed, &seen, task + 1))
            ;
    }
}

/* Writes every segment's K and V of layer l into its pages. Returns 0, or -1
 * when a page shared with another sequence needs a copy and no page is free. */
static int write_kv(cpu_backend *cb, const eng_batch *b, const int *row0, int l, int k_col, int v_col, char *err,
                    size_t errlen) {
    kv_job j = {.cb = cb, .b = b, .layer = l, .k_col = k_col, .v_col = v_col, .row0 = row0};
    if (b->n_segs == 1)
        kv_task(&j, 0, 0);
    else
        eng_threadpool_run(cb->tp, kv_task, &j, b->n_segs);
    const int failed = atomic_load(&j.failed);
    if (failed) {
        snprintf(err, errlen, "forward: segment %d: no free KV page to copy a shared page into", failed - 1);
        return -1;
    }
    return 0;
}

/* ---- scratch ---------------------------------------------------------------- */

static int grow(cpu_backend *cb, int n_tokens, int max_ctx) {
    const eng_model_config *c = &cb->m->cfg;
    if (n_tokens > cb->cap_tokens) {
        int cap = n_tokens;
        size_t wide = (size_t)(c->n_embd > cb->q_dim ? c->n_embd : cb->q_dim);
        float **bufs[] = {&cb->x, &cb->xb, &cb->qkv, &cb->hb, &cb->ff, &cb->tmp, &cb->coef};
        size_t widths[] = {(size_t)c->n_embd, wide, (size_t)cb->qkv_dim, 2 * (size_t)c->n_ff, (size_t)c->n_ff,
                           (size_t)c->n_embd, (size_t)(cb->coef_dim ? cb->coef_dim : 1)};
        for (int i = 0; i < 7; i++) {
            free(*bufs[i]);
            *bufs[i] = aligned_alloc(64, ((size_t)cap * widths[i] * sizeof(float) + 63) & ~(size_t)63);
            if (!*bufs[i])
                return -1;
        }
        free(cb->tok_pos);
        cb->tok_pos = malloc((size_t)cap * sizeof(int));
        if (!cb->tok_pos)
            return -1;
        cb->cap_tokens = cap;
    }
    if (max_ctx > cb->att_ctx_cap) {
        int cap = max_ctx < 1024 ? 1024 : max_ctx;
        size_t n = kvc_attend_scratch_floats(cb->pool, cap, c->n_head / c->n_kv_head);
        for (int w = 0; w < cb->n_threads; w++) {
            free(cb->att_scratch[w]);
            cb->att_scratch[w] = malloc(n * sizeof(float));
            if (!cb->att_scratch[w])
                return -1;
        }
        cb->att_ctx_cap = cap;
    }
    return rope_grow(cb, max_ctx);
}

/* ---- the forward pass ----------------------------------------------------------- */

static int cpu_forward(eng_backend *be, const eng_batch *b, float *logits, char *err, size_t errlen) {
    cpu_backend *cb = (cpu_backend *)be;
    const eng_model *m = cb->m;
    const eng_model_config *c = &m->cfg;
    const int n_embd = c->n_embd;

    if (eng_batch_check(be, b, c, err, errlen))
        return -1;
    int T = 0, max_ctx = 0, n_units = 0;
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        T += s->n_tokens;
        if (s->pos0 + s->n_tokens > max_ctx)
            max_ctx = s->pos0 + s->n_tokens;
        n_units += c->n_kv_head * ((s->n_tokens + QUERY_BLOCK - 1) / QUERY_BLOCK);
    }
    if (T == 0)
        return 0;
    if (grow(cb, T, max_ctx)) {
        snprintf(err, errlen, "forward: out of memory for a batch of %d tokens", T);
        return -1;
    }
    att_unit *units = malloc((size_t)n_units * sizeof *units + (size_t)b->n_segs * sizeof(int));
    if (!units) {
        snprintf(err, errlen, "forward: out of memory");
        return -1;
    }
    int *seg_row = (int *)(units + n_units);  /* each segment's first row */

    /* embeddings, positions, attention work units */
    int row = 0, u = 0;
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        seg_row[i] = row;
        for (int k = 0; k < c->n_kv_head; k++)
            for (int q0 = 0; q0 < s->n_tokens; q0 += QUERY_BLOCK)
                units[u++] = (att_unit){.seg = i, .kv_head = k, .q0 = q0, .row0 = row,
                                        .nq = s->n_tokens - q0 < QUERY_BLOCK ? s->n_tokens - q0 : QUERY_BLOCK};
        for (int t = 0; t < s->n_tokens; t++, row++) {
            float *x = cb->x + (size_t)row * n_embd;
            eng_weight_get_row(&m->tok_embd, s->tokens[t], x);
            cb->tok_pos[row] = s->pos0 + t;
            if (c->arch == ENG_ARCH_GPT2) {
                float *p = cb->tmp;
                eng_weight_get_row(&m->pos_embd, s->pos0 + t, p);
                for (int e = 0; e < n_embd; e++)
                    x[e] += p[e];
            }
        }
    }

    /* the tables rope_apply rotates queries with, for keys cached before RoPE */
    const kvc_rope rope = {.rope_dim = c->arch == ENG_ARCH_GPT2 ? 0 : c->rope_dim,
                           .neox = c->rope_style == ENG_ROPE_NEOX, .cos = cb->rope_cos, .sin = cb->rope_sin,
                           .n_pos = cb->rope_cap};
    const float *F = NULL;
#define VEC(t) ((const float *)(t).data)
    run_rows(cb, OP_NORM, T, VEC(m->layers[0].attn_norm), VEC(m->layers[0].attn_norm_b), F);
    for (int l = 0; l < c->n_layer; l++) {
        int k_col, v_col;
        const eng_layer *L = qkv_layer(cb, l, &k_col, &v_col);
        eng_matmul(cb->tp, &L->wqkv, cb->xb, T, cb->qkv, cb->qkv_dim);
        if (cb->absorbed)
            eng_matmul(cb->tp, &cb->absorbed[l].w_coef, cb->xb, T, cb->coef, cb->coef_dim);
        run_qkv_post(cb, T, l);
        if (write_kv(cb, b, seg_row, l, k_col, v_col, err, errlen)) {
            free(units);
            return -1;
        }
        att_job aj = {.cb = cb, .b = b, .layer = l, .units = units, .rope = &rope};
        if (n_units == 1)
            att_task(&aj, 0, 0);
        else
            eng_threadpool_run(cb->tp, att_task, &aj, n_units);
        eng_matmul(cb->tp, &L->wo, cb->xb, T, cb->tmp, n_embd);
        run_rows(cb, OP_ADD_NORM, T, VEC(L->ffn_norm), VEC(L->ffn_norm_b), VEC(L->bo));
        if (c->arch == ENG_ARCH_GPT2) {
            eng_matmul(cb->tp, &L->w_up, cb->xb, T, cb->hb, 2 * (int64_t)c->n_ff);
            run_rows(cb, OP_GELU, T, F, F, VEC(L->b_up));
        } else {
            eng_matmul(cb->tp, &L->w_gate_up, cb->xb, T, cb->hb, 2 * (int64_t)c->n_ff);
            run_rows(cb, OP_SWIGLU, T, F, F, F);
        }
        eng_matmul(cb->tp, &L->w_down, cb->ff, T, cb->tmp, n_embd);
        if (l + 1 < c->n_layer)
            run_rows(cb, OP_ADD_NORM, T, VEC(m->layers[l + 1].attn_norm), VEC(m->layers[l + 1].attn_norm_b),
                     VEC(L->b_down));
        else
            run_rows(cb, OP_ADD_NORM, T, VEC(m->out_norm), VEC(m->out_norm_b), VEC(L->b_down));
    }
#undef VEC
    free(units);

    /* gather the rows that want logits (in order, into the front of xb) */
    int n_out = 0;
    row = 0;
    for (int i = 0; i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        int first = s->all_logits ? 0 : (s->want_logits ? s->n_tokens - 1 : s->n_tokens);
        for (int t = first; t < s->n_tokens; t++, n_out++)
            if (n_out != row + t)
                memmove(cb->xb + (size_t)n_out * n_embd, cb->xb + (size_t)(row + t) * n_embd,
                        (size_t)n_embd * sizeof(float));
        row += s->n_tokens;
    }
    if (n_out)
        eng_matmul(cb->tp, &m->output, cb->xb, n_out, logits, c->n_vocab);
    /* records and draws where asked (KVSERVE_CPU_CANDS=1), in place */
    for (int i = 0, r = 0; cb->base.cands_max && i < b->n_segs; i++) {
        const eng_segment *s = &b->segs[i];
        if (s->cands_k) {
            eng_cands rec;
            float *lr = logits + (size_t)r * c->n_vocab;
            if (s->pen)
                eng_penalties_apply(lr, s->pen);
            if (s->cands_k == ENG_CANDS_DRAW ? eng_cands_draw(lr, c->n_vocab, &s->draw, &rec)
                                              : eng_cands_reduce(lr, c->n_vocab, s->cands_k, &rec)) {
                snprintf(err, errlen, "forward: out of memory reducing a row of logits");
                return -1;
            }
            memcpy(lr, &rec, ENG_CANDS_BYTES(rec.n));
        }
        r += s->all_logits ? s->n_tokens : s->want_logits ? 1 : 0;
    }
    return 0;
}

/* ---- absorbed projections ------------------------------------------------------ */

static void absorbed_free(cpu_backend *cb) {
    if (!cb->absorbed)
        return;
    for (int l = 0; l < cb->m->cfg.n_layer; l++) {
        absorbed_layer *a = &cb->absorbed[l];
        if (a->own_wqkv)
            eng_tensor_free(&a->layer.wqkv);
        free(a->layer.bqkv.data);
        eng_tensor_free(&a->w_coef);
        free(a->b_coef);
    }
    free(cb->absorbed);
    cb->absorbed = NULL;
}

/* Rows [row0, row0 + n) of w, without copying. */
static eng_tensor rows_view(const eng_tensor *w, int64_t row0, int64_t n) {
    eng_tensor v = *w;
    v.data = (char *)w->data + (size_t)row0 * eng_row_bytes(w->type, w->ne[0]);
    v.ne[1] = n;
    v.owned = false;
    v.packed = NULL;
    return v;
}

/* Folds one role's bases into coefficient rows: for each group g and basis
 * column r, w_out[g R + r] = sum_d P[d][r] W[g in_dim + d] and b_out[g R + r] =
 * sum_d P[d][r] (b[g in_dim + d] - mean[d]), in double. W: the role's decoded
 * projection rows (kv_dim, n_embd); b: their bias, or NULL. */
static void fold_role(const cpu_backend *cb, int v, int l, const float *W, const float *b, float *w_out,
                      float *b_out, double *acc) {
    const int n_embd = cb->m->cfg.n_embd;
    kvc_basis bs;
    kvc_get_basis(cb->pool, v, l, 0, &bs);   /* the caller checked that the role has one */
    const int n_groups = bs.n_groups;
    for (int g = 0; g < n_groups; g++) {
        kvc_get_basis(cb->pool, v, l, g, &bs);
        for (int r = 0; r < bs.rank; r++) {
            double bsum = 0;
            memset(acc, 0, sizeof(double) * (size_t)n_embd);
            for (int d = 0; d < bs.in_dim; d++) {
                double p = bs.basis[(size_t)d * bs.rank + r];
                const float *wr = W + (size_t)(g * bs.in_dim + d) * n_embd;
                for (int e = 0; e < n_embd; e++)
                    acc[e] += p * wr[e];
                bsum += p * ((b ? b[g * bs.in_dim + d] : 0.0) - (bs.mean ? bs.mean[d] : 0.0));
            }
            size_t o = (size_t)g * bs.rank + r;
            for (int e = 0; e < n_embd; e++)
                w_out[o * n_embd + e] = (float)acc[e];
            b_out[o] = (float)bsum;
        }
    }
}

/* Coefficients per token of one role in layer l (0 when it has no basis). */
static int role_coefs(const cpu_backend *cb, int v, int l) {
    kvc_basis bs;
    return kvc_get_basis(cb->pool, v, l, 0, &bs) == KVC_OK ? bs.n_groups * bs.rank : 0;
}

/* Fills cb->absorbed[l]. W (2 kv_dim, n_embd) and acc (n_embd) are scratch.
 * Returns 0, or -1 with a message. */
static int absorb_layer(cpu_backend *cb, int l, bool k_abs, bool v_abs, float *W, double *acc, char *err,
                        size_t errlen) {
    const int n_embd = cb->m->cfg.n_embd, q_dim = cb->q_dim, kv_dim = cb->kv_dim;
    const eng_layer *L = &cb->m->layers[l];
    absorbed_layer *a = &cb->absorbed[l];
    a->layer = *L;   /* views of the model's tensors; only wqkv, bqkv, w_coef, b_coef are ours */
    a->layer.wqkv = (eng_tensor){0};
    a->layer.bqkv = (eng_tensor){0};
    a->k_col = k_abs ? -1 : q_dim;
    a->v_col = v_abs ? -1 : k_abs ? q_dim : q_dim + kv_dim;
    /* the rows still computed in full: a prefix of wqkv, or its Q and V rows */
    const int prefix = k_abs ? q_dim : q_dim + kv_dim;
    if (k_abs && !v_abs) {
        eng_tensor parts[2] = {rows_view(&L->wqkv, 0, q_dim), rows_view(&L->wqkv, q_dim + kv_dim, kv_dim)};
        if (eng_tensor_concat_rows(parts, 2, &a->layer.wqkv, err, errlen))
            return -1;
        a->own_wqkv = true;
    } else {
        a->layer.wqkv = rows_view(&L->wqkv, 0, prefix);
    }
    const int width = (int)a->layer.wqkv.ne[1];
    const float *bias = L->bqkv.data;
    if (bias) {
        float *bq = malloc(sizeof(float) * (size_t)width);
        if (!bq)
            goto nomem;
        memcpy(bq, bias, sizeof(float) * (size_t)prefix);
        if (k_abs && !v_abs)
            memcpy(bq + q_dim, bias + q_dim + kv_dim, sizeof(float) * (size_t)kv_dim);
        a->layer.bqkv = (eng_tensor){.type = ENG_F32, .ne = {width, 1}, .data = bq, .owned = true};
    }
    const int nk = k_abs ? role_coefs(cb, 0, l) : 0, nv = v_abs ? role_coefs(cb, 1, l) : 0;
    a->n_coef = nk + nv;
    a->v_coef_col = nk;
    float *wc = aligned_alloc(64, (sizeof(float) * (size_t)a->n_coef * n_embd + 63) & ~(size_t)63);
    a->w_coef = (eng_tensor){.type = ENG_F32, .ne = {n_embd, a->n_coef}, .data = wc, .owned = true};
    a->b_coef = malloc(sizeof(float) * (size_t)a->n_coef);
    if (!wc || !a->b_coef)
        goto nomem;
    for (int i = 0; i < 2 * kv_dim; i++)
        eng_weight_get_row(&L->wqkv, q_dim + i, W + (size_t)i * n_embd);
    if (k_abs)
        fold_role(cb, 0, l, W, bias ? bias + q_dim : NULL, wc, a->b_coef, acc);
    if (v_abs)
        fold_role(cb, 1, l, W + (size_t)kv_dim * n_embd, bias ? bias + q_dim + kv_dim : NULL,
                  wc + (size_t)nk * n_embd, a->b_coef + nk, acc);
    if (a->n_coef > cb->coef_dim)
        cb->coef_dim = a->n_coef;
    return 0;
nomem:
    snprintf(err, errlen, "cpu backend: out of memory for absorbed projections");
    return -1;
}

/* Builds cb->absorbed when the codecs allow it. Returns 0, or -1 with a message. */
static int absorbed_init(cpu_backend *cb, char *err, size_t errlen) {
    const eng_model_config *c = &cb->m->cfg;
    const bool k_abs = role_coefs(cb, 0, 0) > 0 && (cb->pre_rope || c->arch == ENG_ARCH_GPT2);
    const bool v_abs = role_coefs(cb, 1, 0) > 0;
    if (!k_abs && !v_abs)
        return 0;
    cb->absorbed = calloc((size_t)c->n_layer, sizeof *cb->absorbed);
    float *W = malloc(sizeof(float) * (size_t)2 * cb->kv_dim * c->n_embd);
    double *acc = malloc(sizeof(double) * (size_t)c->n_embd);
    int rc = 0;
    if (!cb->absorbed || !W || !acc) {
        snprintf(err, errlen, "cpu backend: out of memory for absorbed projections");
        rc = -1;
    }
    for (int l = 0; l < c->n_layer && !rc; l++)
        rc = absorb_layer(cb, l, k_abs, v_abs, W, acc, err, errlen);
    free(W);
    free(acc);
    if (rc)
        absorbed_free(cb);
    else
        cb->base.absorbed = (k_abs ? ENG_ABSORBED_K : 0) | (v_abs ? ENG_ABSORBED_V : 0);
    return rc;
}

static void cpu_destroy(eng_backend *be) {
    cpu_backend *cb = (cpu_backend *)be;
    absorbed_free(cb);
    eng_threadpool_destroy(cb->tp);
    free(cb->x);
    free(cb->xb);
    free(cb->qkv);
    free(cb->hb);
    free(cb->ff);
    free(cb->tmp);
    free(cb->coef);
    free(cb->tok_pos);
    free(cb->rope_cos);
    free(cb->rope_sin);
    free(cb->inv_freq);
    if (cb->att_scratch)
        for (int w = 0; w < cb->n_threads; w++)
            free(cb->att_scratch[w]);
    free(cb->att_scratch);
    free(cb);
}

eng_backend *eng_backend_cpu_create(const eng_model *m, kvc_pool *pool, const eng_backend_options *opt,
                                    char *err, size_t errlen) {
    cpu_backend *cb = calloc(1, sizeof *cb);
    if (!cb) {
        snprintf(err, errlen, "cpu backend: out of memory");
        return NULL;
    }
    cb->base.name = "cpu";
    cb->base.forward = cpu_forward;
    cb->base.destroy = cpu_destroy;
    /* KVSERVE_CPU_CANDS=1: rows as records (eng_cands_reduce), as a GPU
     * returns them: the engine's record path without a GPU (its tests) */
    const char *ca = getenv("KVSERVE_CPU_CANDS");
    if (ca && *ca && strcmp(ca, "0") && strcmp(ca, "1")) {
        snprintf(err, errlen, "cpu backend: KVSERVE_CPU_CANDS=%s: not 0 or 1", ca);
        free(cb);
        return NULL;
    }
    if (ca && !strcmp(ca, "1")) {
        cb->base.cands_max = eng_cands_fit(m->cfg.n_vocab);
        cb->base.cands_draw = cb->base.cands_max > 0;
        cb->base.cands_penalties = cb->base.cands_max > 0;
    }
    cb->m = m;
    cb->pool = pool;
    const eng_model_config *c = &m->cfg;
    cb->q_dim = c->n_head * c->head_dim;
    cb->kv_dim = c->n_kv_head * c->head_dim;
    cb->qkv_dim = cb->q_dim + 2 * cb->kv_dim;
    cb->tp = eng_threadpool_create(opt ? opt->n_threads : 0);
    cb->inv_freq = calloc((size_t)(c->rope_dim / 2 + 1), sizeof(double));
    if (!cb->tp || !cb->inv_freq) {
        snprintf(err, errlen, "cpu backend: cannot start %d compute threads", opt ? opt->n_threads : 0);
        cpu_destroy(&cb->base);
        return NULL;
    }
    cb->n_threads = eng_threadpool_size(cb->tp);
    snprintf(cb->desc, sizeof cb->desc, "cpu, %d thread%s%s", cb->n_threads, cb->n_threads == 1 ? "" : "s",
             cb->base.cands_max ? ", records and draws (KVSERVE_CPU_CANDS=1)" : "");
    cb->base.desc = cb->desc;
    cb->att_scratch = calloc((size_t)cb->n_threads, sizeof(float *));
    if (!cb->att_scratch) {
        snprintf(err, errlen, "cpu backend: out of memory");
        cpu_destroy(&cb->base);
        return NULL;
    }
    if (rope_init_freqs(cb)) {
        snprintf(err, errlen, "cpu backend: out of memory");
        cpu_destroy(&cb->base);
        return NULL;
    }
    cb->pre_rope = kvc_keys_pre_rope(pool);
    if (opt && opt->absorb && absorbed_init(cb, err, errlen)) {
        cpu_destroy(&cb->base);
        return NULL;
    }
    return &cb->base;
}
