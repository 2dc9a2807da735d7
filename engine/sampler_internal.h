/* sampler_internal.h: what engine/sampler.c shares with its per-ISA kernel
 * file (sampler_avx2.c). Not part of the engine's public API. */
#ifndef ENG_SAMPLER_INTERNAL_H
#define ENG_SAMPLER_INTERNAL_H

#include <stdbool.h>

/* For the tests: true makes every sampler use the scalar loops even on an
 * AVX2 CPU; false restores the run-time choice. */
void eng__sampler_force_scalar(bool on);

/* x[i] = exp((x[i] - max) * inv_temp) for i < n, where every x[i] <= max and
 * none is NaN; returns the sum of the results. Arguments below -87 (including
 * -inf logits) give exactly 0. AVX2 + FMA: call only when the CPU has both. */
double eng__sampler_weights_avx2(float *x, int n, float max, float inv_temp);

/* The largest of x[0, n) ignoring NaN (-inf when n == 0 or all are NaN);
 * *nonfinite is set when some x[i] is NaN or +-inf. AVX2 only. */
float eng__sampler_max_avx2(const float *x, int n, int *nonfinite);

#endif
