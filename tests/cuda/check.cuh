/* check.cuh: the CUDA call check of the standalone GPU test and benchmark
 * (no test framework there: they run on a machine without Criterion). */
#ifndef KVSERVE_TESTS_CUDA_CHECK_CUH
#define KVSERVE_TESTS_CUDA_CHECK_CUH

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#include <vector>

/* Exits with status 2 naming the call, file and line when it fails. */
#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(2);                                                                      \
        }                                                                                 \
    } while (0)

/* Microseconds of each of reps calls of launch(rep) between two events on
 * st, the first `warm` dropped (the benchmarks' timing loop). */
template <typename F> static std::vector<double> event_times_us(cudaStream_t st, int reps, int warm, F &&launch) {
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<double> t;
    for (int rep = 0; rep < reps; rep++) {
        CK(cudaEventRecord(e0, st));
        launch(rep);
        CK(cudaEventRecord(e1, st));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (rep >= warm)
            t.push_back(ms * 1e3);
    }
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return t;
}

#endif
