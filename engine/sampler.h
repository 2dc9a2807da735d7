/* sampler.h: choosing the next token from logits.
 *
 * Order of operations (as llama.cpp and vLLM apply them): penalties on the
 * logits (repetition, then presence and frequency over the tokens generated so
 * far); then greedy if temperature == 0; else temperature, top-k, top-p, min-p,
 * and a draw from the request's own random stream. Same seed and inputs, same
 * tokens, whatever else runs in the batch. (Between machines with and without
 * AVX2 the softmax weights differ by ~1e-7 relative, which can change a draw
 * that lands that close to a boundary.) */
#ifndef ENG_SAMPLER_H
#define ENG_SAMPLER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    float temperature;         /* 0 = greedy; default 1 */
    int top_k;                 /* <= 0: off */
    float top_p;               /* 1: off */
    float min_p;               /* 0: off */
    float repetition_penalty;  /* 1: off (divides positive logits, multiplies negative) */
    float presence_penalty;    /* 0: off */
    float frequency_penalty;   /* 0: off */
    uint64_t seed;
} eng_sampling_params;

void eng_sampling_params_default(eng_sampling_params *p);
/* Returns NULL when valid, else a static message naming the bad field. */
const char *eng_sampling_params_check(const eng_sampling_params *p);

/* Per-sequence sampler state: the random stream and token counts for the
 * penalties. Created per request; not shared between threads. */
typedef struct eng_sampler eng_sampler;

/* Returns NULL when p fails eng_sampling_params_check, n_vocab < 1 or memory
 * runs out. The random stream is xoshiro256** seeded from p->seed through
 * splitmix64. Memory: 4 * n_vocab bytes when a penalty is on, plus scratch
 * that grows to the largest candidate set seen (at most 8 * n_vocab bytes). */
eng_sampler *eng_sampler_create(const eng_sampling_params *p, int n_vocab);
/* Sampler number `stream_index` of one request, for n > 1 choices: stream 0 is
 * exactly eng_sampler_create's, and stream i starts i * 2^128 draws further
 * along the same xoshiro256** sequence (its jump function), so the streams of
 * one seed never overlap. Costs about a microsecond per index. */
eng_sampler *eng_sampler_create_stream(const eng_sampling_params *p, int n_vocab,
                                       uint32_t stream_index);
void eng_sampler_free(eng_sampler *s);
/* Records a token as part of the context the penalties see (prompt tokens count
 * for the repetition penalty, generated tokens for all three). Ids outside
 * [0, n_vocab) are ignored: callers validate user-supplied ids. */
void eng_sampler_accept(eng_sampler *s, int32_t id, bool generated);
/* Samples from logits (n_vocab floats; modified in place). If logprob is not
 * NULL it receives log p(token) under the final distribution: for greedy, the
 * log-softmax of the penalized logits; otherwise the renormalized probability
 * after temperature, top-k, top-p and min-p. Greedy ties go to the lowest id.
 * NaN logits count as -inf, +inf as FLT_MAX; if no logit is finite the draw is
 * uniform. */
int32_t eng_sampler_sample(eng_sampler *s, float *logits, float *logprob);

/* ---- candidates: a row reduced to its best logits ----------------------------
 *
 * A backend that keeps the logits on its own device can return a row as a
 * record of its best logits instead (the cuda backend: 1 KB instead of 4 x
 * n_vocab bytes to copy, and no pass over the row on the CPU). A sampler with
 * no penalty that draws greedily or by top-k <= ENG_CANDS_MAX needs nothing
 * else: eng_sampler_sample_cands on a row's record draws the token, from the
 * same random stream, that eng_sampler_sample draws on the row itself. */
#define ENG_CANDS_MAX 128
/* eng_sampler_cands_k's answer for sampling without top-k (temperature,
 * top-p, min-p; no penalty): the backend draws the token itself
 * (eng_cands_draw), at the uniform eng_sampler_take_draw takes from the
 * stream. */
#define ENG_CANDS_DRAW (-1)

typedef struct {
    int32_t id;
    float logit;
} eng_cand;

typedef struct {
    float max;          /* the largest logit, NaN read as -inf and +inf as FLT_MAX (0 if none is finite) */
    int32_t n;          /* entries in c */
    float sum_exp;      /* sum over the row of exp(l - max) (n_vocab if no logit is finite); a draw's
                           record: of exp((l - max) / temperature) over the kept tokens */
    eng_cand c[ENG_CANDS_MAX];   /* the n best, best first: larger logit, then lower id (as read above;
                                    every logit 0 when none is finite) */
} eng_cands;

/* Bytes of a record with k entries (what a backend copies). */
#define ENG_CANDS_BYTES(k) (offsetof(eng_cands, c) + (size_t)(k) * sizeof(eng_cand))

/* The most entries a record in a row of n_vocab logits holds. */
static inline int eng_cands_fit(int n_vocab) {
    const size_t room = (size_t)n_vocab * sizeof(float);
    const size_t k = room > offsetof(eng_cands, c) ? (room - offsetof(eng_cands, c)) / sizeof(eng_cand) : 0;
    return k < ENG_CANDS_MAX ? (int)k : ENG_CANDS_MAX;
}

/* The record of row[0, n) with its k best (1 <= k <= ENG_CANDS_MAX, k <= n):
 * the reference the GPU's reduction is tested against. Returns -1 when
 * memory runs out (a sanitized copy of the row) or k is out of range, else 0. */
int eng_cands_reduce(const float *row, int n, int k, eng_cands *out);
/* What this sampler's next draw needs: a record of 1 (greedy) or top_k
 * (<= ENG_CANDS_MAX) entries, ENG_CANDS_DRAW (no top-k: a draw the backend
 * makes), or 0: the whole row (a larger top-k). With penalties
 * (eng_sampler_penalties) the record or draw is of the penalized row. */
int eng_sampler_cands_k(const eng_sampler *s);

/* A sampler's penalties, as a backend applies them to a row before its
 * record or draw: the row's logits of the seen tokens, each as
 * eng_sampler_sample changes them (eng_penalties_apply). */
typedef struct {
    int32_t id;
    uint32_t count;        /* times generated (0: a prompt token: repetition only) */
} eng_pen_entry;
typedef struct {
    float repetition, presence, frequency;
    int n;
    const eng_pen_entry *e;
} eng_penalties;
/* Whether s has penalties. */
bool eng_sampler_has_penalties(const eng_sampler *s);
/* The entries of s's seen tokens into e (room for cap) and its parameters
 * into p (p->e = e); returns how many there are (more than cap: call again
 * with room for them). */
int eng_sampler_penalties(const eng_sampler *s, eng_pen_entry *e, int cap, eng_penalties *p);
/* Applies p to row (n_vocab logits), as eng_sampler_sample does. */
void eng_penalties_apply(float *row, const eng_penalties *p);

/* A draw a backend makes: the uniform in [0, 1) and the filters. */
typedef struct {
    double u;
    float inv_temp;     /* 1 / temperature */
    float top_p, min_p;
} eng_draw;
/* For ENG_CANDS_DRAW: the next draw's arguments, its uniform taken from the
 * stream now (once a token, before the forward whose row it draws from;
 * eng_sampler_sample_cands then takes none). */
void eng_sampler_take_draw(eng_sampler *s, eng_draw *d);
/* The draw of row[0, n) by d, as eng_sampler_sample draws it (the same
 * weights, kept set and scan in id order): a record with n = 1, the token
 * and its logit in c[0], max, and the kept tokens' weights' sum in sum_exp.
 * The reference for the GPU's draws. -1 for arguments out of range or no
 * memory, else 0. */
int eng_cands_draw(const float *row, int n, const eng_draw *d, eng_cands *out);
/* eng_sampler_sample on a row's record: c->n >= eng_sampler_cands_k(s) >
 * 0, or a draw record (ENG_CANDS_DRAW) of the uniform the sampler gave; of
 * the row with the sampler's penalties applied (it applies none here). */
int32_t eng_sampler_sample_cands(eng_sampler *s, const eng_cands *c, float *logprob);

#endif
