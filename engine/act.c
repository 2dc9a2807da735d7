/* act.c: run-time choice and scalar fallback of the activation functions
 * (act.h); the AVX2 versions are in act_avx2.c. */
#include "engine/act.h"

#include <math.h>
#include <stdbool.h>

void eng__swiglu_avx2(float *out, const float *g, const float *u, int n);

static bool has_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
}

void eng_swiglu(float *out, const float *g, const float *u, int n) {
    static int avx2 = -1;  /* a benign race: every thread computes the same answer */
    if (avx2 < 0)
        avx2 = has_avx2();
    int i = 0;
    if (avx2) {
        eng__swiglu_avx2(out, g, u, n - n % 8);
        i = n - n % 8;
    }
    for (; i < n; i++)
        out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
