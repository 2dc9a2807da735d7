/* act_avx2.c: the AVX2 + FMA activation functions (act.h), 8 lanes at a time. */
#include <immintrin.h>

#include "engine/simd_avx2.h"

void eng__swiglu_avx2(float *out, const float *g, const float *u, int n);

/* n a multiple of 8. sigmoid(x) from e = e^-|x| (never overflows):
 * 1 / (1 + e) for x >= 0, e / (1 + e) below. */
void eng__swiglu_avx2(float *out, const float *g, const float *u, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    for (int i = 0; i < n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = eng__exp_nonpositive(_mm256_or_ps(x, sign));  /* e^-|x| */
        const __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
        const __m256 num = _mm256_blendv_ps(one, e, neg);
        const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u + i)));
    }
}
