/* cands.cu: logit rows reduced to their samplers' records, or drawn from
 * (cands.cuh).
 *
 * One block of 1024 threads a row. The first pass over the row finds its best
 * entry (the largest logit, then the lowest id), each thread's best, and the
 * sum of exp(l - max) by an online rescaled sum per thread; greedy rows
 * (k == 1) are done there. For k > 1 the k-th best of the 1024 threads'
 * maxima bounds the row's k best from below (those k entries reach it), so
 * a second pass collects the entries that reach it into shared memory
 * (about k of them on real rows; at most 2048, else the row itself is
 * searched). Among those a radix select finds the k-th best key in four
 * passes of 8 bits (lanes of a bin added together), then the entries above
 * it and the lowest ids of those equal to it are taken and placed by rank.
 * A draw (plain temperature sampling) scans the weights as the CPU sampler
 * does, in id order, each thread a run of neighbours: their sums' prefix
 * over the block finds the run where the uniform's share of the mass ends. Logits are read as the CPU sampler reads them:
 * NaN as -inf, +inf as FLT_MAX, -0 equal to +0; a row with nothing finite
 * reads as all zeros. */
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdint.h>

#include "engine/cuda/cands.cuh"

namespace {

constexpr int NT = 1024;
constexpr int NWARP = NT / 32;
constexpr int NHIST = 8;         /* radix histograms, each shared by four warps */
constexpr int CAP = 2048;        /* entries collected above the threads' maxima's k-th (and ties at once) */
constexpr unsigned FULL = 0xffffffffu;
constexpr uint32_t NONE = 0xffffffffu;

__device__ __forceinline__ float sane(float l) { return isnan(l) ? -INFINITY : fminf(l, FLT_MAX); }

/* An order-preserving key of a sanitized logit (-0 as +0). */
__device__ __forceinline__ uint32_t key_of(float v) {
    const uint32_t u = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (u & 0x80000000u) ? ~u : u | 0x80000000u;
}

/* The sampler's candidate order: larger logit, then lower id. */
__device__ __forceinline__ bool better(uint32_t ka, int ia, uint32_t kb, int ib) {
    return ka > kb || (ka == kb && ia < ib);
}

struct scratch {
    uint32_t hist[NHIST][256];
    uint32_t l_key[CAP];           /* the collected entries */
    int l_id[CAP];
    int tie_id[CAP];
    uint32_t tmax[NT];             /* each thread's best key over its share of the row */
    uint32_t c_key[ENG_CANDS_MAX];
    int c_id[ENG_CANDS_MAX];
    uint32_t r_key[NWARP];
    int r_id[NWARP];
    float r_m[NWARP];
    float r_s[NWARP];
    double r_d[NWARP];
    int warp_cnt[NWARP];
    uint32_t prefix;
    int need, n_eq, n_list, n_gt_seen, n_eq_seen;
    double mass_need, mass_above;
};

/* Entries read from the row itself (entry i is token i) or from a list. */
struct row_src {
    const float *row;
    __device__ uint32_t key(int i) const { return key_of(sane(__ldg(row + i))); }
    __device__ int id(int i) const { return i; }
    static constexpr bool ORDERED = true;   /* entry order is id order */
};
struct list_src {
    const uint32_t *keys;
    const int *ids;
    __device__ uint32_t key(int i) const { return keys[i]; }
    __device__ int id(int i) const { return ids[i]; }
    static constexpr bool ORDERED = false;
};

/* For a chunk of neighbouring ids (thread t: the chunk's id t): the rank in
 * id order of this thread's entry among the chunk's entries with eq,
 * counting `taken` entries before the chunk; taken then counts the chunk's
 * too. Every thread of the block calls it. */
__device__ int chunk_rank(bool eq, int &taken, scratch &sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const unsigned b = __ballot_sync(FULL, eq);
    if (lane == 0)
        sh.warp_cnt[warp] = __popc(b);
    __syncthreads();
    int before = taken + __popc(b & ((1u << lane) - 1)), total = 0;
    for (int w = 0; w < NWARP; w++) {
        before += w < warp ? sh.warp_cnt[w] : 0;
        total += sh.warp_cnt[w];
    }
    taken += total;
    __syncthreads();
    return before;
}

/* The k-th largest key T of entries [0, m) (k <= m), 8 bits a pass from the
 * top: how many entries equal T (n_eq) and how many of them the k best take
 * (need). */
template <class S>
__device__ void radix_kth(const S &src, int m, int k, scratch &sh, uint32_t &T, int &need, int &n_eq) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    uint32_t prefix = 0, mask = 0;
    need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < NHIST * 256; i += NT)
            (&sh.hist[0][0])[i] = 0;
        __syncthreads();
        for (int base = 0; base < m; base += NT) {
            const int i = base + tid;
            uint32_t bin = NONE;
            if (i < m) {
                const uint32_t key = src.key(i);
                if ((key & mask) == prefix)
                    bin = (key >> shift) & 255;
            }
            const unsigned peers = __match_any_sync(FULL, bin);
            if (bin != NONE && lane == __ffs(peers) - 1)
                atomicAdd(&sh.hist[warp % NHIST][bin], (uint32_t)__popc(peers));
        }
        __syncthreads();
        if (tid < 256) {
            uint32_t tot = 0;
            for (int h = 0; h < NHIST; h++)
                tot += sh.hist[h][tid];
            sh.hist[0][tid] = tot;
        }
        __syncthreads();
        if (warp == 0) {
            /* lane l: bins 255 - 8 l - j (j < 8), from the top down */
            uint32_t c[8], own = 0;
            for (int j = 0; j < 8; j++)
                c[j] = sh.hist[0][255 - 8 * lane - j], own += c[j];
            uint32_t incl = own;
            for (int o = 1; o < 32; o <<= 1) {
                const uint32_t t = __shfl_up_sync(FULL, incl, o);
                if (lane >= o)
                    incl += t;
            }
            uint32_t acc = incl - own;
            if (acc < (uint32_t)need && (uint32_t)need <= incl)
                for (int j = 0; j < 8; j++) {
                    if (acc + c[j] >= (uint32_t)need) {
                        sh.prefix = prefix | ((uint32_t)(255 - 8 * lane - j) << shift);
                        sh.need = need - (int)acc;
                        sh.n_eq = (int)c[j];
                        break;
                    }
                    acc += c[j];
                }
        }
        __syncthreads();
        prefix = sh.prefix;
        need = sh.need;
        mask |= 255u << shift;
    }
    T = prefix;
    n_eq = sh.n_eq;
}

/* The k best of entries [0, m) given their k-th key T (radix_kth): those
 * above T and the `need` lowest ids of the n_eq at T, into the record best
 * first (logits read again from the row). */
template <class S>
__device__ void take_best(const S &src, int m, int k, uint32_t T, int need, int n_eq, const float *row, scratch &sh,
                          eng_cands *rec) {
    const int tid = threadIdx.x;
    const int n_gt = k - need;
    if (tid == 0)
        sh.n_gt_seen = 0, sh.n_eq_seen = 0;
    __syncthreads();
    const bool collect = !S::ORDERED || n_eq <= CAP;
    for (int i = tid; i < m; i += NT) {
        const uint32_t key = src.key(i);
        if (key > T) {
            const int slot = atomicAdd(&sh.n_gt_seen, 1);
            sh.c_key[slot] = key, sh.c_id[slot] = src.id(i);
        } else if (key == T && collect) {
            sh.tie_id[atomicAdd(&sh.n_eq_seen, 1)] = src.id(i);
        }
    }
    __syncthreads();
    if (collect) {
        for (int t = tid; t < n_eq; t += NT) {
            const int id = sh.tie_id[t];
            int rank = 0;
            for (int j = 0; j < n_eq; j++)
                rank += sh.tie_id[j] < id;
            if (rank < need)
                sh.c_key[n_gt + rank] = T, sh.c_id[n_gt + rank] = id;
        }
    } else {
        /* more ties than scratch (the row itself): in id order, a chunk at a time */
        int taken = 0;
        for (int base = 0; base < m && taken < need; base += NT) {
            const int i = base + tid;
            const bool eq = i < m && src.key(i) == T;
            const int before = chunk_rank(eq, taken, sh);
            if (eq && before < need)
                sh.c_key[n_gt + before] = T, sh.c_id[n_gt + before] = i;
        }
    }
    __syncthreads();
    if (tid < k) {
        const uint32_t key = sh.c_key[tid];
        const int id = sh.c_id[tid];
        int rank = 0;
        for (int j = 0; j < k; j++)
            rank += better(sh.c_key[j], sh.c_id[j], key, id);
        rec->c[rank] = eng_cand{id, sane(row[id])};
    }
}

/* A block-wide exclusive prefix sum of x over threads in order; *total the
 * sum of all. */
__device__ double block_exclusive_sum(double x, double *total, scratch &sh) {
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    double incl = x;
    for (int o = 1; o < 32; o <<= 1) {
        const double t = __shfl_up_sync(FULL, incl, o);
        if (lane >= o)
            incl += t;
    }
    if (lane == 31)
        sh.r_d[warp] = incl;
    __syncthreads();
    double before = 0.0, all = 0.0;
    for (int w = 0; w < NWARP; w++) {
        before += w < warp ? sh.r_d[w] : 0.0;
        all += sh.r_d[w];
    }
    *total = all;
    return before + incl - x;
}

/* A token's weight in a draw: exp((l - max) inv_temp), 1 for every token
 * of a row with nothing finite. */
struct weights {
    const float *row;
    float mx, inv_temp;
    bool none;
    __device__ float operator()(int i) const { return none ? 1.0f : expf((sane(__ldg(row + i)) - mx) * inv_temp); }
};

/* The nucleus's worst entry: the shortest best-first prefix of the weights
 * (larger, then lower id) whose mass reaches target ends at the weight with
 * key T (its bits) and the id *ib. A radix select by mass, 8 bits of the key
 * a pass from the top, then the ties at T taken in id order until the mass
 * is reached. */
__device__ void nucleus_end(const weights &w, int n, double target, scratch &sh, uint32_t &T, int &ib) {
    const int tid = threadIdx.x, warp = tid >> 5;
    float(*mh)[256] = reinterpret_cast<float(*)[256]>(sh.l_key);   /* NHIST x 256 masses (l_key is free) */
    uint32_t prefix = 0, mask = 0;
    double need = target, above = 0.0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < NHIST * 256; i += NT)
            (&sh.hist[0][0])[i] = 0, (&mh[0][0])[i] = 0.0f;
        __syncthreads();
        for (int i = tid; i < n; i += NT) {
            const float x = w(i);
            const uint32_t key = __float_as_uint(x);
            if ((key & mask) == prefix) {
                const int bin = (key >> shift) & 255;
                atomicAdd(&sh.hist[warp % NHIST][bin], 1u);
                atomicAdd(&mh[warp % NHIST][bin], x);
            }
        }
        __syncthreads();
        if (tid < 256) {
            uint32_t c = 0;
            float m = 0.0f;
            for (int h = 0; h < NHIST; h++)
                c += sh.hist[h][tid], m += mh[h][tid];
            sh.hist[0][tid] = c, mh[0][tid] = m;
        }
        __syncthreads();
        if (tid == 0) {
            /* from the top, the first bin whose mass reaches need (the last
             * non-empty one where rounding leaves need above them all) */
            double acc = 0.0;
            int chosen = -1, last = -1;
            for (int bin = 255; bin >= 0 && chosen < 0; bin--) {
                if (!sh.hist[0][bin])
                    continue;
                last = bin;
                if (acc + mh[0][bin] >= need)
                    chosen = bin;
                else
                    acc += mh[0][bin];
            }
            if (chosen < 0)
                chosen = last, acc -= mh[0][last];
            sh.prefix = prefix | ((uint32_t)chosen << shift);
            sh.mass_need = need - acc;
            sh.mass_above = above + acc;
            sh.n_eq = (int)sh.hist[0][chosen];
        }
        __syncthreads();
        prefix = sh.prefix;
        need = sh.mass_need;
        above = sh.mass_above;
        mask |= 255u << shift;
    }
    T = prefix;
    const float wt = __uint_as_float(T);
    const int n_eq = sh.n_eq;
    int m = wt > 0.0f ? (int)ceil(need / (double)wt) : n_eq;
    m = m < 1 ? 1 : m > n_eq ? n_eq : m;
    /* the m-th lowest id among the n_eq at T */
    if (tid == 0)
        sh.n_eq_seen = 0;
    __syncthreads();
    if (n_eq <= CAP) {
        for (int i = tid; i < n; i += NT)
            if (__float_as_uint(w(i)) == T)
                sh.tie_id[atomicAdd(&sh.n_eq_seen, 1)] = i;
        __syncthreads();
        for (int t = tid; t < n_eq; t += NT) {
            int rank = 0;
            for (int j = 0; j < n_eq; j++)
                rank += sh.tie_id[j] < sh.tie_id[t];
            if (rank == m - 1)
                sh.n_list = sh.tie_id[t];
        }
    } else {
        int taken = 0;
        for (int base = 0; base < n && taken < m; base += NT) {
            const int i = base + tid;
            const bool eq = i < n && __float_as_uint(w(i)) == T;
            if (chunk_rank(eq, taken, sh) == m - 1 && eq)
                sh.n_list = i;
        }
    }
    __syncthreads();
    ib = sh.n_list;
}

/* The draw d of the row as the CPU sampler's draw scans it (draw_kept):
 * the kept tokens (the nucleus where top_p < 1, weights >= min_p) in id
 * order, each thread a run of neighbours, the first whose running sum
 * passes u times their mass, skipping zeros. */
__device__ void draw_row(const float *row, int n, float mx, bool none, const eng_draw &d, scratch &sh,
                         eng_cands *rec) {
    const int tid = threadIdx.x;
    const int per = (n + NT - 1) / NT, lo = tid * per, hi = min(n, lo + per);
    const weights w{row, mx, d.inv_temp, none};
    uint32_t T = 0;          /* every key is >= 0: all kept */
    int ib = INT32_MAX;
    if (d.top_p < 1.0f) {
        float mine = 0.0f;
        for (int i = lo; i < hi; i++)
            mine += w(i);
        double total;
        block_exclusive_sum((double)mine, &total, sh);
        __syncthreads();
        nucleus_end(w, n, (double)d.top_p * total, sh, T, ib);
    }
    auto kept = [&](int i, float x) {
        const uint32_t key = __float_as_uint(x);
        return (key > T || (key == T && i <= ib)) && x >= d.min_p;
    };
    float mine = 0.0f;
    for (int i = lo; i < hi; i++) {
        const float x = w(i);
        mine += kept(i, x) ? x : 0.0f;
    }
    double mass;
    __syncthreads();
    const double before = block_exclusive_sum((double)mine, &mass, sh);
    const double target = d.u * mass;
    if (tid == 0)
        sh.n_list = -1;
    __syncthreads();
    if (mine > 0.0f && before <= target)
        atomicMax(&sh.n_list, tid);   /* the last run that starts at or before the target */
    __syncthreads();
    if (tid != sh.n_list)
        return;
    double acc = before;
    int pick = -1;
    for (int i = lo; i < hi; i++) {
        const float x = w(i);
        if (!kept(i, x) || x <= 0.0f)
            continue;
        pick = i;
        acc += x;
        if (acc > target)
            break;
    }
    rec->max = none ? 0.0f : mx;
    rec->n = 1;
    rec->sum_exp = (float)mass;
    rec->c[0] = eng_cand{pick, none ? 0.0f : sane(row[pick])};
}

__global__ void __launch_bounds__(NT) cands_kernel(const float *__restrict__ logits, int n,
                                                   const eng_cands_req *__restrict__ reqs,
                                                   eng_cands *__restrict__ out) {
    __shared__ scratch sh;
    const float *row = logits + (size_t)blockIdx.x * n;
    eng_cands *rec = out + blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const eng_cands_req req = reqs[blockIdx.x];
    const int k = req.k;
    if (!(k == ENG_CANDS_DRAW || (k >= 1 && k <= ENG_CANDS_MAX && k <= n)))
        return;

    /* 1. the best entry, each thread's best key and the online sum of exp(l
     * - m), U loads in flight a thread (a row is latency, not bandwidth) */
    constexpr int U = 4;
    uint32_t bk = 0;
    int bi = INT32_MAX;
    float m = -INFINITY, s = 0.0f;
    for (int base = tid; base < n; base += U * NT) {
        float v[U];
#pragma unroll
        for (int u = 0; u < U; u++)
            v[u] = base + u * NT < n ? sane(__ldg(row + base + u * NT)) : -INFINITY;
        float vm = m;
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (base + u * NT < n && better(key_of(v[u]), base + u * NT, bk, bi))
                bk = key_of(v[u]), bi = base + u * NT;
            vm = fmaxf(vm, v[u]);
        }
        if (vm == -INFINITY)
            continue;
        s = m == -INFINITY ? 0.0f : s * expf(m - vm);
        m = vm;
#pragma unroll
        for (int u = 0; u < U; u++)
            s += expf(v[u] - m);   /* 0 for -inf */
    }
    sh.tmax[tid] = bk;                    /* 0 (below every key) for a thread past the row */
    for (int o = 16; o; o >>= 1) {
        const uint32_t ok = __shfl_xor_sync(FULL, bk, o);
        const int oi = __shfl_xor_sync(FULL, bi, o);
        if (better(ok, oi, bk, bi))
            bk = ok, bi = oi;
        const float om = __shfl_xor_sync(FULL, m, o), os = __shfl_xor_sync(FULL, s, o);
        const float nm = fmaxf(m, om);
        if (nm != -INFINITY)
            s = (m == -INFINITY ? 0.0f : s * expf(m - nm)) + (om == -INFINITY ? 0.0f : os * expf(om - nm));
        m = nm;
    }
    if (lane == 0)
        sh.r_key[warp] = bk, sh.r_id[warp] = bi, sh.r_m[warp] = m, sh.r_s[warp] = s;
    __syncthreads();
    bk = sh.r_key[0], bi = sh.r_id[0];
    float mx = sh.r_m[0];
    for (int w = 1; w < NWARP; w++) {
        if (better(sh.r_key[w], sh.r_id[w], bk, bi))
            bk = sh.r_key[w], bi = sh.r_id[w];
        mx = fmaxf(mx, sh.r_m[w]);
    }
    const bool none = mx == -INFINITY;   /* nothing finite: every logit reads as 0 */
    if (k == ENG_CANDS_DRAW) {
        draw_row(row, n, mx, none, req.d, sh, rec);
        return;
    }
    if (none) {
        if (tid < k)
            rec->c[tid] = eng_cand{tid, 0.0f};
        if (tid == 0)
            rec->max = 0.0f, rec->n = k, rec->sum_exp = (float)n;
        return;
    }
    if (tid == 0) {
        double sum = 0.0;
        for (int w = 0; w < NWARP; w++)
            if (sh.r_m[w] != -INFINITY)
                sum += (double)sh.r_s[w] * exp((double)sh.r_m[w] - (double)mx);
        rec->max = mx;
        rec->n = k;
        rec->sum_exp = (float)sum;
        if (k == 1)
            rec->c[0] = eng_cand{bi, sane(row[bi])};
        sh.n_list = 0;
    }
    if (k == 1)
        return;

    uint32_t T;
    int need, n_eq;
    if (n > CAP) {
        /* 2. the k-th best of the threads' maxima bounds the k best from
         * below (k entries reach it): collect what reaches it */
        radix_kth(list_src{sh.tmax, NULL}, NT, k, sh, T, need, n_eq);
        for (int base = 0; base < n; base += U * NT) {
            uint32_t key[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = base + u * NT + tid;
                key[u] = i < n ? key_of(sane(__ldg(row + i))) : 0;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int i = base + u * NT + tid;
                const bool in = i < n && key[u] >= T;
                const unsigned b = __ballot_sync(FULL, in);
                if (!b)
                    continue;
                int first = 0;
                if (lane == 0)
                    first = atomicAdd(&sh.n_list, __popc(b));
                first = __shfl_sync(FULL, first, 0);
                const int slot = first + __popc(b & ((1u << lane) - 1));
                if (in && slot < CAP)
                    sh.l_key[slot] = key[u], sh.l_id[slot] = i;
            }
        }
        __syncthreads();
        const int n_list = sh.n_list;
        if (n_list <= CAP) {
            /* 3. the k best of the collected */
            const list_src src{sh.l_key, sh.l_id};
            radix_kth(src, n_list, k, sh, T, need, n_eq);
            take_best(src, n_list, k, T, need, n_eq, row, sh, rec);
            return;
        }
    }
    /* 3. (short rows, or too many at the bound) the k best of the row */
    const row_src src{row};
    radix_kth(src, n, k, sh, T, need, n_eq);
    take_best(src, n, k, T, need, n_eq, row, sh, rec);
}

__global__ void penalize_kernel(float *logits, int n_vocab, const eng_cands_pen *__restrict__ e, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n)
        return;
    const eng_cands_pen p = e[i];
    float *x = logits + (size_t)p.row * n_vocab + p.id;
    float l = *x;
    /* the CPU sampler's operations, each rounded on its own (no contraction) */
    if (p.repetition != 1.0f)
        l = l > 0.0f ? __fdiv_rn(l, p.repetition) : __fmul_rn(l, p.repetition);
    if (p.count > 0)
        l = __fsub_rn(l, __fadd_rn(__fmul_rn(p.frequency, __uint2float_rn(p.count)), p.presence));
    *x = l;
}

}  // namespace

cudaError_t eng_cands_penalize(float *logits, int n_vocab, const eng_cands_pen *e, int n, cudaStream_t stream) {
    if (n < 0 || n_vocab < 1)
        return cudaErrorInvalidValue;
    if (n == 0)
        return cudaSuccess;
    penalize_kernel<<<(n + 255) / 256, 256, 0, stream>>>(logits, n_vocab, e, n);
    return cudaGetLastError();
}

cudaError_t eng_cands_launch(const float *logits, int n_rows, int n_vocab, const eng_cands_req *req,
                             eng_cands *out, cudaStream_t stream) {
    if (n_rows < 0 || n_vocab < 1)
        return cudaErrorInvalidValue;
    if (n_rows == 0)
        return cudaSuccess;
    cands_kernel<<<n_rows, NT, 0, stream>>>(logits, n_vocab, req, out);
    return cudaGetLastError();
}
