/* pool_internal.h (internal to cache/): the pool's definition and page
 * addressing, shared by pool.c (pages, block tables, kvc_write) and
 * attention.c (kvc_attend). The layout is the one kvcache.h documents. */
#ifndef KVC_POOL_INTERNAL_H
#define KVC_POOL_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "cache/codec.h"
#include "cache/kvcache.h"

/* Aborts with file and line: for broken invariants (caller bugs), never for
 * bad input. */
#define KVC__CHECK(cond, ...)                                                    \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "%s:%d: kvc: invariant broken: %s: ", __FILE__,      \
                    __LINE__, #cond);                                            \
            fprintf(stderr, __VA_ARGS__);                                        \
            fputc('\n', stderr);                                                 \
            abort();                                                             \
        }                                                                        \
    } while (0)

/* One page's softmax step for nr query rows (see attention.c). */
typedef void (*kvc__softmax_fn)(float *s, int s_stride, int nb, int nr, const int *valid,
                                float *m, float *l, float *acc, int acc_dim);

struct kvc_pool {
    int n_layer, n_kv_head, head_dim, block_size;
    kvc__codec kc, vc;          /* K and V codecs */
    size_t *layer_off;          /* (n_layer) byte offset of each layer's region in a page */
    size_t *k_region;           /* (n_layer) kc.n_groups * kc.block_bytes[l]: where V starts */
    size_t page_bytes;          /* sum of the layers' regions */
    uint8_t *arena;             /* (n_pages, page_bytes), mmap'ed, zero-filled */
    size_t arena_bytes;
    int n_pages;
    int32_t *refcount;          /* (n_pages) references held; 0: on the free list */
    int32_t *free_stack;        /* (n_pages) ids of free pages in [0, n_free) */
    int n_free;
    int64_t tokens_cached;      /* sum of live sequences' n_tokens */
    pthread_mutex_t cow_lock;   /* serialises copy-on-write inside kvc_write */
    kvc__softmax_fn softmax;    /* scalar or AVX2 */
    int ready;                  /* fully created (cow_lock initialised) */
    /* kvc_pool_set_page_copier: copies pages elsewhere (a device arena) */
    void (*copy_page)(void *ctx, int32_t dst, int32_t src);
    void *copy_ctx;
};

static inline uint8_t *kvc__page(const kvc_pool *p, int32_t page) {
    return p->arena + (size_t)page * p->page_bytes;
}

/* K block of (layer, group) in a page (group: kv head, or 0 for a latent). */
static inline uint8_t *kvc__k_block(const kvc_pool *p, int32_t page, int layer, int group) {
    return kvc__page(p, page) + p->layer_off[layer] + (size_t)group * p->kc.block_bytes[layer];
}

static inline uint8_t *kvc__v_block(const kvc_pool *p, int32_t page, int layer, int group) {
    return kvc__page(p, page) + p->layer_off[layer] + p->k_region[layer] +
           (size_t)group * p->vc.block_bytes[layer];
}

/* attention.c / attention_avx2.c */
void kvc__softmax_scalar(float *s, int s_stride, int nb, int nr, const int *valid,
                         float *m, float *l, float *acc, int acc_dim);
void kvc__softmax_avx2(float *s, int s_stride, int nb, int nr, const int *valid,
                       float *m, float *l, float *acc, int acc_dim);

/* True when the AVX2 + FMA + F16C kernels may run here. */
int kvc__have_avx2(void);
/* True when the AVX-512 (F, BW, VL) attention kernels may run here too. */
int kvc__have_avx512(void);

#endif
