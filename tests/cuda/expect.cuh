/* expect.cuh: the checks of the standalone GPU test programs (no test
 * framework there: they run on a machine without Criterion). Each program
 * prints "NAME: g_checks checks, g_fail failed" and exits 1 on a failure. */
#ifndef KVSERVE_TESTS_CUDA_EXPECT_CUH
#define KVSERVE_TESTS_CUDA_EXPECT_CUH

#include <stdio.h>

#include "tests/cuda/check.cuh"

static int g_fail = 0, g_checks = 0;

/* Counts a check; a failure is printed as "FAIL file:line: ..." (the first
 * 40, then only counted). */
#define EXPECT(cond, ...)                                                                 \
    do {                                                                                  \
        g_checks++;                                                                       \
        if (!(cond) && ++g_fail <= 40) {                                                  \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                   \
            printf(__VA_ARGS__);                                                          \
            printf("\n");                                                                 \
        }                                                                                 \
    } while (0)

#endif
