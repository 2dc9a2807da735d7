/* act.h: the elementwise activation functions of the forward pass, chosen at
 * run time like the matmul kernels (AVX2 + FMA when present, else scalar). */
#ifndef ENG_ACT_H
#define ENG_ACT_H

/* out[i] = silu(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i], for i < n (out
 * may be g). The
 * AVX2 path uses a polynomial exp (about 2 ulp; engine/simd_avx2.h); both
 * paths are deterministic per element, so results do not depend on batching. */
void eng_swiglu(float *out, const float *g, const float *u, int n);

#endif
