/* sampler.c: choosing the next token from a row of logits (see sampler.h).
 *
 * Pipeline per token, as vLLM defines each step:
 *   1. penalties, over the distinct tokens seen so far only (never a vocab
 *      scan): repetition (prompt or output: positive logits divided, negative
 *      multiplied), then frequency (count * penalty) and presence (once);
 *   2. greedy when temperature == 0 (argmax, ties to the lowest id);
 *   3. else weights w_i = exp((l_i - max) / T), so the best token has w = 1
 *      and min-p is a plain threshold on w (the exp loop is the hot one: AVX2
 *      in sampler_avx2.c when the CPU has it);
 *   4. top-k by a bounded heap over the logits for k <= 128 (nearly every
 *      logit is one compare with the root), its k best then sorted, so that
 *      min-p, top-p and the draw see them in one order whoever found them
 *      (a backend's record of a row, eng_cands, draws the same token); top-p
 *      over the whole row, and larger top-k, by a
 *      histogram of the weights in 1/8-octave buckets (read off the float
 *      bits) that finds the bucket where the kept prefix ends: tokens above
 *      it are kept as they are, and only that bucket is ordered, by a
 *      quickselect guided by weight or count: O(n). min-p
 *      is a threshold on w. The hot loops are branch-free;
 *   5. a draw from the request's own xoshiro256** stream: over the top-k
 *      candidates best first; without top-k over the kept tokens in id
 *      order (the whole row, or the nucleus and min-p's, draw_kept), so that
 *      a backend that draws on its own device (eng_cands_draw) can scan the
 *      same order.
 *
 * Candidate order is a strict total order (weight descending, then id
 * ascending), so the kept set is exactly defined even with tied logits, and
 * the same seed and logits give the same token whatever runs beside it. */
#include "engine/sampler.h"

#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sampler_internal.h"

#define PROMPT_BIT 0x80000000u
#define COUNT_MASK 0x7fffffffu
#define HEAP_MAX_K 128            /* larger top-k: the weight histogram */
#define HIST_BUCKETS 1024         /* weight keys: w in [0, 1] has bits >> 20 <= 1016 */

struct eng_sampler {
    eng_sampling_params params;
    int n_vocab;
    uint64_t rng[4];          /* xoshiro256** state */
    /* Penalty state, NULL when every penalty is off. */
    uint32_t *token_state;    /* (n_vocab): PROMPT_BIT | generated count */
    int32_t *seen;            /* (n_seen) distinct ids with token_state != 0 */
    int n_seen, cap_seen;
    /* Candidate scratch (struct of arrays), grown on demand. */
    float *cand_w;            /* (cap_cand) logit, then weight */
    int32_t *cand_id;         /* (cap_cand) token id */
    int cap_cand;
};

/* ---- random stream ------------------------------------------------------ */

static uint64_t splitmix64_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t s[4])
{
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Advances the state by 2^128 draws (the generator's published jump
 * polynomial). */
static void xoshiro_jump(uint64_t s[4])
{
    static const uint64_t poly[4] = {0x180ec6d33cfd0abaull, 0xd5a61266f0c9392cull,
                                     0xa9582618e03fc9aaull, 0x39abdc4529b1661cull};
    uint64_t acc[4] = {0, 0, 0, 0};
    for (int w = 0; w < 4; w++) {
        for (int b = 0; b < 64; b++) {
            if (poly[w] & (1ull << b)) {
                for (int i = 0; i < 4; i++)
                    acc[i] ^= s[i];
            }
            xoshiro_next(s);
        }
    }
    memcpy(s, acc, sizeof acc);
}

/* Uniform in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t s[4])
{
    return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53;
}

/* ---- parameters --------------------------------------------------------- */

void eng_sampling_params_default(eng_sampling_params *p)
{
    p->temperature = 1.0f;
    p->top_k = 0;
    p->top_p = 1.0f;
    p->min_p = 0.0f;
    p->repetition_penalty = 1.0f;
    p->presence_penalty = 0.0f;
    p->frequency_penalty = 0.0f;
    p->seed = 0;
}

const char *eng_sampling_params_check(const eng_sampling_params *p)
{
    /* Written so that NaN fails every test. */
    if (!(p->temperature >= 0.0f && p->temperature <= FLT_MAX))
        return "temperature must be a finite number >= 0";
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return "top_p must be in (0, 1]";
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return "min_p must be in [0, 1]";
    if (!(p->repetition_penalty > 0.0f && p->repetition_penalty <= FLT_MAX))
        return "repetition_penalty must be a finite number > 0";
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return "presence_penalty must be in [-2, 2]";
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return "frequency_penalty must be in [-2, 2]";
    return NULL;
}

/* ---- lifetime ----------------------------------------------------------- */

eng_sampler *eng_sampler_create_stream(const eng_sampling_params *p, int n_vocab,
                                       uint32_t stream_index)
{
    if (!p || n_vocab < 1 || eng_sampling_params_check(p))
        return NULL;
    eng_sampler *s = calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->params = *p;
    s->n_vocab = n_vocab;
    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64_next(&x);
    for (uint32_t i = 0; i < stream_index; i++)
        xoshiro_jump(s->rng);
    bool penalize = p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f ||
                    p->frequency_penalty != 0.0f;
    if (penalize) {
        s->token_state = calloc((size_t)n_vocab, sizeof *s->token_state);
        if (!s->token_state) {
            free(s);
            return NULL;
        }
    }
    return s;
}

eng_sampler *eng_sampler_create(const eng_sampling_params *p, int n_vocab)
{
    return eng_sampler_create_stream(p, n_vocab, 0);
}

void eng_sampler_free(eng_sampler *s)
{
    if (!s)
        return;
    free(s->token_state);
    free(s->seen);
    free(s->cand_w);
    free(s->cand_id);
    free(s);
}

/* ---- penalties ---------------------------------------------------------- */

void eng_sampler_accept(eng_sampler *s, int32_t id, bool generated)
{
    if (!s->token_state || id < 0 || id >= s->n_vocab)
        return;
    uint32_t st = s->token_state[id];
    if (st == 0) {
        if (s->n_seen == s->cap_seen) {
            int cap = s->cap_seen ? 2 * s->cap_seen : 256;
            if (cap > s->n_vocab)
                cap = s->n_vocab;
            int32_t *grown = realloc(s->seen, (size_t)cap * sizeof *grown);
            if (!grown)
                return; /* out of memory: this token goes unpenalized */
            s->seen = grown;
            s->cap_seen = cap;
        }
        s->seen[s->n_seen++] = id;
    }
    if (generated) {
        if ((st & COUNT_MASK) != COUNT_MASK)
            st++;
    } else {
        st |= PROMPT_BIT;
    }
    s->token_state[id] = st;
}

/* One seen token's logit, penalized: repetition (positive logits divided,
 * negative multiplied), then frequency and presence for generated ones. The
 * operations a backend repeats exactly (eng_penalties_apply, cands.cu). */
static float penalize(float l, uint32_t count, float rep, float presence, float frequency)
{
    if (rep != 1.0f)
        l = l > 0.0f ? l / rep : l * rep;
    if (count > 0)
        l -= frequency * (float)count + presence;
    return l;
}

static void apply_penalties(const eng_sampler *s, float *logits)
{
    const eng_sampling_params *p = &s->params;
    for (int i = 0; i < s->n_seen; i++) {
        int32_t id = s->seen[i];
        logits[id] = penalize(logits[id], s->token_state[id] & COUNT_MASK, p->repetition_penalty,
                              p->presence_penalty, p->frequency_penalty);
    }
}

bool eng_sampler_has_penalties(const eng_sampler *s)
{
    return s->token_state != NULL;
}

int eng_sampler_penalties(const eng_sampler *s, eng_pen_entry *e, int cap, eng_penalties *p)
{
    *p = (eng_penalties){.repetition = s->params.repetition_penalty, .presence = s->params.presence_penalty,
                         .frequency = s->params.frequency_penalty, .n = s->n_seen, .e = e};
    for (int i = 0; i < s->n_seen && i < cap; i++)
        e[i] = (eng_pen_entry){.id = s->seen[i], .count = s->token_state[s->seen[i]] & COUNT_MASK};
    return s->n_seen;
}

void eng_penalties_apply(float *row, const eng_penalties *p)
{
    for (int i = 0; i < p->n; i++)
        row[p->e[i].id] = penalize(row[p->e[i].id], p->e[i].count, p->repetition, p->presence, p->frequency);
}

/* ---- helpers over the logits ------------------------------------------- */

static atomic_bool force_scalar;

void eng__sampler_force_scalar(bool on)
{
    atomic_store(&force_scalar, on);
}

static bool has_avx2(void)
{
    return !atomic_load_explicit(&force_scalar, memory_order_relaxed) &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Maximum logit, after mapping NaN to -inf and +inf to FLT_MAX; if nothing is
 * finite every logit becomes 0 (a uniform draw). The repair pass runs only
 * for rows holding a non-finite value. */
static float sanitized_max(float *logits, int n)
{
    float max = -INFINITY;
    int nonfinite = 0;
    if (has_avx2()) {
        max = eng__sampler_max_avx2(logits, n, &nonfinite);
    } else {
        for (int i = 0; i < n; i++) {
            float l = logits[i];
            max = l > max ? l : max;
            nonfinite |= !(l - l == 0.0f); /* NaN and +-inf */
        }
    }
    if (!nonfinite)
        return max;
    max = -INFINITY;
    for (int i = 0; i < n; i++) {
        float l = logits[i];
        if (isnan(l))
            l = -INFINITY;
        else if (l > FLT_MAX)
            l = FLT_MAX;
        logits[i] = l;
        max = l > max ? l : max;
    }
    if (max == -INFINITY) {
        for (int i = 0; i < n; i++)
            logits[i] = 0.0f;
        max = 0.0f;
    }
    return max;
}

/* The lowest id holding `max` (a value of the row). */
static int first_at(const float *logits, int n, float max)
{
    for (int i = 0; i < n; i++)
        if (logits[i] == max)
            return i;
    return 0;
}

/* x[i] = exp((x[i] - max) * inv_temp); returns their sum. Every x[i] <= max. */
static double softmax_weights(float *x, int n, float max, float inv_temp)
{
    if (has_avx2())
        return eng__sampler_weights_avx2(x, n, max, inv_temp);
    double total = 0.0;
    for (int i = 0; i < n; i++) {
        x[i] = expf((x[i] - max) * inv_temp);
        total += x[i];
    }
    return total;
}

/* ---- candidates --------------------------------------------------------- */

/* Room for `need` candidates (at most n_vocab + 2: the gathers' spare slots). */
static bool ensure_cand(eng_sampler *s, int need)
{
    if (need <= s->cap_cand)
        return true;
    int cap = s->cap_cand ? s->cap_cand : 64;
    while (cap < need)
        cap *= 2;
    if (cap > s->n_vocab + 2)
        cap = need > s->n_vocab + 2 ? need : s->n_vocab + 2;
    float *w = realloc(s->cand_w, (size_t)cap * sizeof *w);
    if (w)
        s->cand_w = w;
    int32_t *id = realloc(s->cand_id, (size_t)cap * sizeof *id);
    if (id)
        s->cand_id = id;
    if (!w || !id)
        return false;
    s->cap_cand = cap;
    return true;
}

/* The candidate order: larger value first, then lower id. */
static inline bool better(float wa, int32_t ia, float wb, int32_t ib)
{
    return (wa > wb) | ((wa == wb) & (ia < ib));
}

static inline void cand_swap(float *w, int32_t *id, int a, int b)
{
    float tw = w[a];
    w[a] = w[b];
    w[b] = tw;
    int32_t ti = id[a];
    id[a] = id[b];
    id[b] = ti;
}

/* Restores the min-heap property (worst candidate at the root) below i. */
static void heap_sift_down(float *w, int32_t *id, int n, int i)
{
    for (;;) {
        int worst = i, l = 2 * i + 1, r = l + 1;
        if (l < n && better(w[worst], id[worst], w[l], id[l]))
            worst = l;
        if (r < n && better(w[worst], id[worst], w[r], id[r]))
            worst = r;
        if (worst == i)
            return;
        cand_swap(w, id, i, worst);
        i = worst;
    }
}

/* The k best of logits[0, n) (ties to lower ids) into w/id, unordered. */
static void select_top_k(float *w, int32_t *id, const float *logits, int n, int k)
{
    for (int i = 0; i < k; i++) {
        w[i] = logits[i];
        id[i] = i;
    }
    for (int i = k / 2 - 1; i >= 0; i--)
        heap_sift_down(w, id, k, i);
    for (int i = k; i < n; i++) {
        /* i is larger than every id in the heap, so only a strictly larger
         * logit beats the root. */
        if (logits[i] > w[0]) {
            w[0] = logits[i];
            id[0] = i;
            heap_sift_down(w, id, k, 0);
        }
    }
}

/* Sorts w/id[0, n) best first: insertion sort for short runs, else an
 * in-place heapsort (the worst-at-root heap moves the worst to the end). */
static void cand_sort(float *w, int32_t *id, int n)
{
    if (n <= 24) {
        for (int i = 1; i < n; i++)
            for (int j = i; j > 0 && better(w[j], id[j], w[j - 1], id[j - 1]); j--)
                cand_swap(w, id, j, j - 1);
        return;
    }
    for (int i = n / 2 - 1; i >= 0; i--)
        heap_sift_down(w, id, n, i);
    for (int end = n - 1; end > 0; end--) {
        cand_swap(w, id, 0, end);
        heap_sift_down(w, id, end, 0);
    }
}

/* Reorders w/id[0, n) so that its first c entries are the shortest best-first
 * prefix whose weight reaches `target`, and returns c (n when the whole set
 * weighs less). With by_count every entry weighs 1 (top-k), else w[i] (top-p).
 * Quickselect guided by that weight: expected O(n); after too many lopsided
 * partitions the remaining range is sorted instead. */
static int select_prefix(float *w, int32_t *id, int n, double target, bool by_count)
{
    int lo = 0, hi = n;   /* [0, lo) taken; the answer ends inside [lo, hi] */
    double need = target;
    int budget = 2 * (32 - __builtin_clz((unsigned)n | 1u)) + 8;
    while (hi - lo > 0) {
        if (hi - lo <= 24 || budget-- <= 0) {
            cand_sort(w + lo, id + lo, hi - lo);
            double acc = 0.0;
            for (int i = lo; i < hi; i++) {
                acc += by_count ? 1.0 : (double)w[i];
                if (acc >= need)
                    return i + 1;
            }
            return hi;
        }
        /* Median of three as pivot, moved to hi - 1. */
        int mid = lo + (hi - lo) / 2, last = hi - 1;
        if (better(w[mid], id[mid], w[lo], id[lo]))
            cand_swap(w, id, mid, lo);
        if (better(w[last], id[last], w[lo], id[lo]))
            cand_swap(w, id, last, lo);
        if (better(w[mid], id[mid], w[last], id[last]))
            cand_swap(w, id, mid, last);
        const float pw = w[last];
        const int32_t pid = id[last];
        /* Branch-free Lomuto: [lo, a) better than the pivot, [a, j) not; the
         * swap is harmless when w[j] stays on the "not" side. */
        int a = lo;
        float mass = 0.0f;
        double mass_total = 0.0;
        for (int j = lo; j < last; j++) {
            float wj = w[j];
            int32_t ij = id[j];
            bool b = better(wj, ij, pw, pid);
            w[j] = w[a];
            id[j] = id[a];
            w[a] = wj;
            id[a] = ij;
            a += b;
            mass += b ? (by_count ? 1.0f : wj) : 0.0f;
            if (((j - lo) & 255) == 255) {
                mass_total += mass;
                mass = 0.0f;
            }
        }
        mass_total += mass;
        cand_swap(w, id, a, last);
        double pivot_mass = by_count ? 1.0 : (double)pw;
        if (mass_total >= need) {
            hi = a;
        } else if (mass_total + pivot_mass >= need) {
            return a + 1;
        } else {
            need -= mass_total + pivot_mass;
            lo = a + 1;
        }
    }
    return lo;
}

static inline int weight_key(float w)
{
    uint32_t bits;
    memcpy(&bits, &w, sizeof bits);
    return (int)(bits >> 20);
}

/* Fills the candidates with the shortest best-first prefix of the weights
 * w[0, n) (each in [0, 1]) that reaches `target`, counting tokens (by_count)
 * or weight, and returns its size; -1 when scratch memory runs out. */
static int keep_best(eng_sampler *s, const float *w, int n, double target, bool by_count)
{
    /* Two interleaved histograms, so that runs of one bucket do not chain
     * every add through the same memory slot. */
    struct {
        float mass;
        int count;
    } hist[2][HIST_BUCKETS];
    memset(hist, 0, sizeof hist);
    for (int i = 0; i < n; i++) {
        int k = weight_key(w[i]);
        hist[i & 1][k].mass += w[i];
        hist[i & 1][k].count++;
    }
    /* The bucket where the prefix ends; everything above it is kept. */
    int edge = -1, n_sure = 0, n_edge = 0;
    double above = 0.0;
    for (int b = HIST_BUCKETS - 1; b >= 0; b--) {
        int count = hist[0][b].count + hist[1][b].count;
        double weight = by_count ? count : (double)hist[0][b].mass + hist[1][b].mass;
        if (above + weight >= target) {
            edge = b;
            n_edge = count;
            break;
        }
        above += weight;
        n_sure += count;
    }
    /* Branch-free gather: kept tokens fill from the front, edge tokens from
     * the back; each side has one spare slot for its unconditional store. */
    int slots = n_sure + n_edge + 2;
    if (!ensure_cand(s, slots))
        return -1;
    float *cw = s->cand_w;
    int32_t *cid = s->cand_id;
    int front = 0, back = slots - 1;
    for (int i = 0; i < n; i++) {
        int k = weight_key(w[i]);
        cw[front] = w[i];
        cid[front] = i;
        front += k > edge;
        cw[back] = w[i];
        cid[back] = i;
        back -= k == edge;
    }
    memmove(cw + n_sure, cw + back + 1, (size_t)n_edge * sizeof *cw);
    memmove(cid + n_sure, cid + back + 1, (size_t)n_edge * sizeof *cid);
    return n_sure + select_prefix(cw + n_sure, cid + n_sure, n_edge, target - above, by_count);
}

/* Sum of w[0, n): float sums of 16 (which vectorize) added into a double. */
static double sum_weights(const float *w, int n)
{
    double total = 0.0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        float block = 0.0f;
        for (int j = 0; j < 16; j++)
            block += w[i + j];
        total += block;
    }
    for (; i < n; i++)
        total += w[i];
    return total;
}

/* Draws an index of w[0, n) with probability w[i] / total, where total is
 * sum_weights(w, n) or another sum of the same values, at the uniform u01 in
 * [0, 1); returns it and the log of that probability. The scan skips whole
 * blocks of 16 first. */
static int draw_at(double u01, const float *w, int n, double total, float *logprob)
{
    double u = u01 * total;
    double acc = 0.0;
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        float block = 0.0f;
        for (int j = 0; j < 16; j++)
            block += w[i + j];
        if (acc + block > u)
            break;
        acc += block;
    }
    int pick = -1;
    for (; i < n; i++) {
        if (w[i] <= 0.0f)
            continue;
        pick = i;
        acc += w[i];
        if (acc > u)
            break;
    }
    if (pick < 0) /* rounding pushed u past the end: the last positive weight */
        for (pick = n - 1; pick > 0 && w[pick] <= 0.0f; pick--)
            ;
    if (logprob)
        *logprob = (float)(log(w[pick]) - log(total));
    return pick;
}

/* draw_at with the next uniform of the stream. */
static int draw(uint64_t rng[4], const float *w, int n, double total, float *logprob)
{
    return draw_at(rng_uniform(rng), w, n, total, logprob);
}

/* The top-k draw on cand_w/cand_id[0, count), the count best logits best
 * first (a full row's or a record's, so both draw the same token): weights,
 * min-p, then top-p against the mass of the count, then the draw. The order
 * is fixed by the logits alone, whichever way the candidates were found. */
static int32_t draw_sorted(eng_sampler *s, int count, float max, float inv_temp, float *logprob)
{
    const eng_sampling_params *p = &s->params;
    const double total = softmax_weights(s->cand_w, count, max, inv_temp);
    if (p->min_p > 0.0f) { /* a prefix: the best has weight 1 */
        int kept = 0;
        while (kept < count && s->cand_w[kept] >= p->min_p)
            kept++;
        count = kept;
    }
    if (p->top_p < 1.0f) {
        const double need = (double)p->top_p * total;
        double acc = 0.0;
        for (int i = 0; i < count; i++) {
            acc += s->cand_w[i];
            if (acc >= need) {
                count = i + 1;
                break;
            }
        }
    }
    return s->cand_id[draw(s->rng, s->cand_w, count, sum_weights(s->cand_w, count), logprob)];
}

/* Top-p and min-p over the whole row of weights w (total their sum): the
 * kept tokens are the nucleus, the shortest best-first prefix whose mass
 * reaches top_p * total (all for top_p 1), with weight >= min_p; the draw at
 * u01 scans them in id order, as draw does, against their own mass (*mass,
 * where not NULL). The order depends on the weights alone, so a backend's
 * draw (eng_cands_draw) takes the same token. */
static int draw_kept(eng_sampler *s, const float *w, int n, double total, float top_p, float min_p, double u01,
                     float *logprob, double *mass)
{
    float wb = 0.0f; /* the nucleus's worst entry: tokens at least as good are kept */
    int32_t ib = INT32_MAX;
    if (top_p < 1.0f) {
        const int count = keep_best(s, w, n, (double)top_p * total, false);
        if (count < 0) { /* out of scratch memory: the best token */
            if (logprob)
                *logprob = 0.0f;
            if (mass)
                *mass = 1.0;
            return first_at(w, n, 1.0f);
        }
        wb = s->cand_w[0], ib = s->cand_id[0];
        for (int j = 1; j < count; j++)
            if (better(wb, ib, s->cand_w[j], s->cand_id[j]))
                wb = s->cand_w[j], ib = s->cand_id[j];
    }
#define KEPT(i) ((w[i] > wb || (w[i] == wb && (i) <= ib)) && w[i] >= min_p)
    double m = 0.0;
    for (int i = 0; i < n; i += 16) {
        float block = 0.0f;
        for (int j = i; j < i + 16 && j < n; j++)
            block += KEPT(j) ? w[j] : 0.0f;
        m += block;
    }
    const double u = u01 * m;
    double acc = 0.0;
    int pick = -1;
    for (int i = 0; i < n; i++) {
        if (!KEPT(i) || w[i] <= 0.0f)
            continue;
        pick = i;
        acc += w[i];
        if (acc > u)
            break;
    }
#undef KEPT
    if (pick < 0) /* nothing positive kept (cannot happen: the best token is) */
        pick = first_at(w, n, 1.0f);
    if (logprob)
        *logprob = (float)(log(w[pick]) - log(m));
    if (mass)
        *mass = m;
    return pick;
}

/* ---- sampling ----------------------------------------------------------- */

int32_t eng_sampler_sample(eng_sampler *s, float *logits, float *logprob)
{
    const eng_sampling_params *p = &s->params;
    const int n = s->n_vocab;
    if (s->token_state)
        apply_penalties(s, logits);
    const float max = sanitized_max(logits, n);

    if (p->temperature == 0.0f) {
        int best = first_at(logits, n, max);
        if (logprob) /* the best token's weight is exactly 1 */
            *logprob = (float)-log(softmax_weights(logits, n, max, 1.0f));
        return best;
    }

    /* Temperatures below 1e-30 act as 1e-30: already a certain argmax, and
     * 1 / T stays finite so (l - max) / T is 0 for the best token. */
    const float inv_temp = 1.0f / fmaxf(p->temperature, 1e-30f);
    const bool use_top_k = p->top_k > 0 && p->top_k < n;
    const bool use_top_p = p->top_p < 1.0f;
    const bool use_min_p = p->min_p > 0.0f;
    if (use_top_k && p->top_k <= HEAP_MAX_K) {
        if (!ensure_cand(s, p->top_k)) { /* out of scratch memory: the best token */
            if (logprob)
                *logprob = 0.0f;
            return first_at(logits, n, max);
        }
        select_top_k(s->cand_w, s->cand_id, logits, n, p->top_k);
        cand_sort(s->cand_w, s->cand_id, p->top_k);
        return draw_sorted(s, p->top_k, max, inv_temp, logprob);
    }

    /* weights over the whole row; total is the mass top-p is measured against */
    double total = softmax_weights(logits, n, max, inv_temp);
    if (!use_top_k) {
        if (!use_top_p && !use_min_p)
            return draw(s->rng, logits, n, total, logprob);
        return draw_kept(s, logits, n, total, p->top_p, p->min_p, rng_uniform(s->rng), logprob, NULL);
    }
    int count = keep_best(s, logits, n, (double)p->top_k, true);
    if (count < 0)
        goto fallback_greedy;
    total = sum_weights(s->cand_w, count);
    /* min-p and top-p each keep a best-first prefix, so applying them in
     * either order keeps their intersection. */
    if (use_min_p) {
        int kept = 0;
        for (int i = 0; i < count; i++) {
            s->cand_w[kept] = s->cand_w[i];
            s->cand_id[kept] = s->cand_id[i];
            kept += s->cand_w[i] >= p->min_p;
        }
        count = kept;
    }
    if (use_top_p)
        count = select_prefix(s->cand_w, s->cand_id, count, (double)p->top_p * total, false);
    return s->cand_id[draw(s->rng, s->cand_w, count, sum_weights(s->cand_w, count), logprob)];

fallback_greedy:
    /* Out of scratch memory: the best token (weight 1), which every filter keeps. */
    if (logprob)
        *logprob = 0.0f;
    return first_at(logits, n, 1.0f);
}

/* ---- candidates ----------------------------------------------------------- */

_Static_assert(ENG_CANDS_MAX <= HEAP_MAX_K, "a record's draw is the heap path's");

/* A logit as the sampler reads it: NaN as -inf, +inf as FLT_MAX. */
static float sane_logit(float l)
{
    return isnan(l) ? -INFINITY : l > FLT_MAX ? FLT_MAX : l;
}

int eng_cands_reduce(const float *row, int n, int k, eng_cands *out)
{
    if (k < 1 || k > n || k > ENG_CANDS_MAX)
        return -1;
    float *x = calloc((size_t)n, sizeof *x);
    if (!x)
        return -1;
    float max = -INFINITY;
    for (int i = 0; i < n; i++) {
        x[i] = sane_logit(row[i]);
        max = x[i] > max ? x[i] : max;
    }
    if (max == -INFINITY) { /* nothing finite: a uniform row, as sanitized_max leaves it */
        for (int i = 0; i < n; i++)
            x[i] = 0.0f;
        max = 0.0f;
    }
    float w[ENG_CANDS_MAX];
    int32_t id[ENG_CANDS_MAX];
    select_top_k(w, id, x, n, k);
    cand_sort(w, id, k);
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += expf(x[i] - max);
    free(x);
    out->max = max;
    out->n = k;
    out->sum_exp = (float)sum;
    for (int i = 0; i < k; i++)
        out->c[i] = (eng_cand){.id = id[i], .logit = w[i]};
    return 0;
}

int eng_sampler_cands_k(const eng_sampler *s)
{
    const eng_sampling_params *p = &s->params;
    if (p->temperature == 0.0f)
        return 1;
    if (p->top_k > 0 && p->top_k < s->n_vocab)
        return p->top_k <= ENG_CANDS_MAX ? p->top_k : 0;
    return ENG_CANDS_DRAW;
}

static float inv_temp_of(const eng_sampling_params *p)
{
    return 1.0f / fmaxf(p->temperature, 1e-30f);
}

void eng_sampler_take_draw(eng_sampler *s, eng_draw *d)
{
    d->u = rng_uniform(s->rng);
    d->inv_temp = inv_temp_of(&s->params);
    d->top_p = s->params.top_p;
    d->min_p = s->params.min_p;
}

int eng_cands_draw(const float *row, int n, const eng_draw *d, eng_cands *out)
{
    if (n < 1 || !(d->u >= 0.0 && d->u < 1.0) || !(d->inv_temp > 0.0f && d->inv_temp <= FLT_MAX) ||
        !(d->top_p > 0.0f && d->top_p <= 1.0f) || !(d->min_p >= 0.0f && d->min_p <= 1.0f))
        return -1;
    float *w = malloc((size_t)n * sizeof *w);
    if (!w)
        return -1;
    memcpy(w, row, (size_t)n * sizeof *w);
    const float max = sanitized_max(w, n);
    double total = softmax_weights(w, n, max, d->inv_temp);
    eng_sampler scratch = {.n_vocab = n};   /* keep_best's candidates */
    const int pick = d->top_p < 1.0f || d->min_p > 0.0f
                         ? draw_kept(&scratch, w, n, total, d->top_p, d->min_p, d->u, NULL, &total)
                         : draw_at(d->u, w, n, total, NULL);
    free(scratch.cand_w);
    free(scratch.cand_id);
    bool none = true;   /* nothing finite: sanitized_max read every logit as 0 */
    for (int i = 0; i < n && none; i++)
        none = isnan(row[i]) || row[i] == -INFINITY;
    free(w);
    out->max = max;
    out->n = 1;
    out->sum_exp = (float)total;
    out->c[0] = (eng_cand){.id = pick, .logit = none ? 0.0f : sane_logit(row[pick])};
    return 0;
}

int32_t eng_sampler_sample_cands(eng_sampler *s, const eng_cands *c, float *logprob)
{
    const eng_sampling_params *p = &s->params;
    if (eng_sampler_cands_k(s) == ENG_CANDS_DRAW) { /* drawn by the backend */
        if (logprob)
            *logprob = (float)((double)(c->c[0].logit - c->max) * inv_temp_of(p) - log((double)c->sum_exp));
        return c->c[0].id;
    }
    if (p->temperature == 0.0f) {
        if (logprob) /* as the row's greedy path: the best token's weight is 1 */
            *logprob = (float)-log((double)c->sum_exp);
        return c->c[0].id;
    }
    const int k = p->top_k;
    if (!ensure_cand(s, k)) {
        if (logprob)
            *logprob = 0.0f;
        return c->c[0].id;
    }
    for (int i = 0; i < k; i++) {
        s->cand_w[i] = c->c[i].logit;
        s->cand_id[i] = c->c[i].id;
    }
    return draw_sorted(s, k, c->max, 1.0f / fmaxf(p->temperature, 1e-30f), logprob);
}
