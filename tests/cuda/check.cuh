/* check.cuh: the CUDA call check of the standalone GPU test and benchmark
 * (no test framework there: they run on a machine without Criterion). */
#ifndef KVSERVE_TESTS_CUDA_CHECK_CUH
#define KVSERVE_TESTS_CUDA_CHECK_CUH

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

/* Exits with status 2 naming the call, file and line when it fails. */
#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

#endif
