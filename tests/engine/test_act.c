/* test_act.c: the activation functions (engine/act.h) against a double
 * precision reference, over the range a real model produces and beyond
 * (large magnitudes where a naive e^-x overflows), with lengths that leave
 * a scalar tail after the 8-lane part. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "engine/act.h"

static uint64_t rng = 0x243F6A8885A308D3ull;

static double uniform(double lo, double hi) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return lo + (hi - lo) * (double)(rng >> 11) / 9007199254740992.0;
}

Test(act, swiglu_matches_double_reference) {
    const int lens[] = {1, 7, 8, 9, 1536, 1543};
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
        const int n = lens[k];
        float *g = malloc(sizeof(float) * (size_t)n), *u = malloc(sizeof(float) * (size_t)n);
        double *want = malloc(sizeof(double) * (size_t)n);
        for (int i = 0; i < n; i++) {
            const double span = i % 5 == 0 ? 200.0 : 12.0;  /* some far outside exp's comfortable range */
            g[i] = (float)uniform(-span, span);
            u[i] = (float)uniform(-3, 3);
            if (i == 3)
                g[i] = 0.0f;
            const double x = g[i];
            want[i] = x / (1.0 + exp(-x)) * u[i];
        }
        eng_swiglu(g, g, u, n);
        for (int i = 0; i < n; i++) {
            const double tol = 4e-7 * fabs(want[i]) + 1e-30;  /* e^-87 and below flush to 0 */
            cr_assert(isfinite(g[i]) && fabs(g[i] - want[i]) <= tol,
                      "n %d, i %d: %.9g, expected %.9g", n, i, g[i], want[i]);
        }
        free(g);
        free(u);
        free(want);
    }
}

Test(act, swiglu_extremes) {
    float g[8] = {-1000.0f, -90.0f, -20.0f, 0.0f, 20.0f, 90.0f, 1000.0f, -0.0f};
    const float u[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    eng_swiglu(g, g, u, 8);
    cr_assert_eq(g[0], 0.0f);   /* -1000 e^-1000: 0, not NaN */
    cr_assert(fabsf(g[1]) < 1e-30f);
    cr_assert(fabsf(g[2] - (float)(-20.0 / (1.0 + exp(20.0)))) <= 1e-6f * fabsf(g[2]));
    cr_assert_eq(g[3], 0.0f);
    cr_assert(fabsf(g[4] - 20.0f) < 1e-5f);
    cr_assert_eq(g[5], 90.0f);
    cr_assert_eq(g[6], 1000.0f);
    cr_assert_eq(g[7], 0.0f);
}
