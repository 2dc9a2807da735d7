/* backend.c: picks a backend by name. The CUDA one exists only in builds
 * made with `make CUDA=1` (KVSERVE_CUDA defined, engine/cuda/ linked). */
#include <stdio.h>
#include <string.h>

#include "engine/backend.h"

bool eng_backend_has_cuda(void) {
#ifdef KVSERVE_CUDA
    return true;
#else
    return false;
#endif
}

eng_backend *eng_backend_create(const char *name, const eng_model *m, kvc_pool *pool,
                                const eng_backend_options *opt, char *err, size_t errlen) {
    if (!name || !strcmp(name, "cpu"))
        return eng_backend_cpu_create(m, pool, opt, err, errlen);
    if (!strcmp(name, "cuda")) {
#ifdef KVSERVE_CUDA
        return eng_backend_cuda_create(m, pool, opt, err, errlen);
#else
        snprintf(err, errlen,
                 "backend \"cuda\": this kvserve was built without CUDA (build it with make CUDA=1, which needs "
                 "nvcc; or use --backend cpu)");
        return NULL;
#endif
    }
    snprintf(err, errlen, "backend \"%s\": must be cpu or cuda", name);
    return NULL;
}
