/* attention_avx2.c: the online-softmax step of kvc_attend with AVX2 + FMA: the
 * page's row maxima, exp of 8 scores at once, their sums, and the rescaling
 * of the accumulators. Same contract as kvc__softmax_scalar (attention.c);
 * reached only after kvc__have_avx2().
 *
 * exp: x = n ln2 + r with |r| <= ln2/2, exp(r) from a degree-7 polynomial
 * (the classic Cephes expf coefficients), 2^n built in the exponent bits;
 * about 1 ulp. Arguments below -87 (including -inf) give 0. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "cache/pool_internal.h"

static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), lo);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r);
    y = _mm256_add_ps(y, _mm256_set1_ps(1.0f));
    __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
    return _mm256_andnot_ps(underflow, y);
}

static inline float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

void kvc__softmax_avx2(float *s, int s_stride, int nb, int nr, const int *valid,
                       float *m, float *l, float *acc, int acc_dim) {
    for (int r = 0; r < nr; r++) {
        float *sr = s + (size_t)r * s_stride;
        int nv = valid[r];
        if (nv == 0) {
            memset(sr, 0, sizeof(float) * (size_t)nb);
            continue;
        }
        int j = 0;
        __m256 vmax = _mm256_set1_ps(-INFINITY);
        for (; j + 8 <= nv; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sr + j));
        float mx = hmax256(vmax);
        for (; j < nv; j++) mx = sr[j] > mx ? sr[j] : mx;
        float m_new = m[r] > mx ? m[r] : mx;
        float alpha = expf(m[r] - m_new);       /* 0 on the first page (m = -inf) */
        __m256 vm = _mm256_set1_ps(m_new), vsum = _mm256_setzero_ps();
        for (j = 0; j + 8 <= nv; j += 8) {
            __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + j), vm));
            _mm256_storeu_ps(sr + j, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum256(vsum);
        for (; j < nv; j++) {
            sr[j] = expf(sr[j] - m_new);
            sum += sr[j];
        }
        for (j = nv; j < nb; j++) sr[j] = 0.0f;
        l[r] = l[r] * alpha + sum;
        if (alpha != 1.0f) {
            float *ar = acc + (size_t)r * acc_dim;
            __m256 va = _mm256_set1_ps(alpha);
            int d = 0;
            for (; d + 8 <= acc_dim; d += 8) _mm256_storeu_ps(ar + d, _mm256_mul_ps(_mm256_loadu_ps(ar + d), va));
            for (; d < acc_dim; d++) ar[d] *= alpha;
        }
        m[r] = m_new;
    }
}
