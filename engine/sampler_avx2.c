/* sampler_avx2.c: the sampler's passes over the whole vocabulary (see
 * sampler.c), 8 lanes at a time: the maximum logit, and the unnormalized
 * softmax weights. Compiled with -mavx2 -mfma; sampler.c calls these only
 * after a run-time CPU check.
 *
 * exp: engine/simd_avx2.h (about 2 ulp, far below what sampling can
 * notice). */
#include "engine/sampler_internal.h"

#include <immintrin.h>

#include "engine/simd_avx2.h"

static inline double hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return (double)_mm_cvtss_f32(s);
}

double eng__sampler_weights_avx2(float *x, int n, float max, float inv_temp)
{
    const __m256 vmax = _mm256_set1_ps(max), vinv = _mm256_set1_ps(inv_temp);
    double total = 0.0;
    int i = 0;
    /* Float lanes accumulate blocks of 256 values (32 per lane), then the
     * block sum joins a double, so the total keeps ~1e-7 relative accuracy. */
    while (i + 8 <= n) {
        __m256 acc = _mm256_setzero_ps();
        int end = i + 256 <= n ? i + 256 : n - (n - i) % 8;
        for (; i < end; i += 8) {
            __m256 arg = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmax), vinv);
            __m256 w = eng__exp_nonpositive(arg);
            _mm256_storeu_ps(x + i, w);
            acc = _mm256_add_ps(acc, w);
        }
        total += hsum(acc);
    }
    if (i < n) {
        /* The tail through a masked load: lanes past n read as max, which
         * gives e^0 = 1, and are neither stored nor summed. */
        __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - i), lane);
        __m256 v = _mm256_blendv_ps(vmax, _mm256_maskload_ps(x + i, mask),
                                    _mm256_castsi256_ps(mask));
        __m256 w = eng__exp_nonpositive(_mm256_mul_ps(_mm256_sub_ps(v, vmax), vinv));
        w = _mm256_and_ps(w, _mm256_castsi256_ps(mask));
        _mm256_maskstore_ps(x + i, mask, w);
        total += hsum(w);
    }
    return total;
}

float eng__sampler_max_avx2(const float *x, int n, int *nonfinite)
{
    __m256 vmax = _mm256_set1_ps(-__builtin_inff());
    __m256 bad = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        vmax = _mm256_max_ps(v, vmax); /* a NaN in v yields vmax */
        __m256 d = _mm256_sub_ps(v, v); /* NaN exactly for NaN and +-inf */
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    float max = _mm_cvtss_f32(m);
    int flag = _mm256_movemask_ps(bad) != 0;
    for (; i < n; i++) {
        float v = x[i];
        max = v > max ? v : max;
        flag |= !(v - v == 0.0f);
    }
    *nonfinite = flag;
    return max;
}
