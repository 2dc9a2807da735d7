/* calib.h (internal to cache/): a loaded calibration file, as the pca codecs
 * read it (the format is in kvcache.h; calib.c reads and writes it). */
#ifndef KVC_CALIB_H
#define KVC_CALIB_H

#include <stddef.h>

#include "cache/kvcache.h"

typedef struct kvc__calib kvc__calib;

/* Loads and checks `path` against the cache shape. Returns KVC_OK, or
 * KVC_ERR_INVAL / KVC_ERR_NOMEM with a message naming the file and, for a
 * mismatch, the shape it was made for and the one asked. */
int kvc__calib_load(const char *path, int n_layer, int n_kv_head, int head_dim, kvc__calib **out,
                    char *err, size_t errlen);
void kvc__calib_free(kvc__calib *c);

/* Whether the file holds statistics of `set` (KVC_CALIB_K, ...). */
int kvc__calib_has(const kvc__calib *c, int set);
/* The rank the file chose for `layer` (per head, or cross-head when latent). */
int kvc__calib_rank(const kvc__calib *c, int set, int layer, int latent);
/* The rank keeping `energy` (0, 1] of the variance of (set, layer) by the
 * file's eigenvalues, as kvserve calibrate --energy chooses it: per head the
 * largest over the layer's kv heads, or cross-head when latent. */
int kvc__calib_rank_energy(const kvc__calib *c, int set, int layer, int latent, double energy);
/* The first `rank` components of (set, layer, group) as the columns of
 * basis (in_dim, rank) row-major, and the mean (in_dim); group -1: the
 * cross-head fit (in_dim = n_kv_head * head_dim), else a kv head's. */
void kvc__calib_basis(const kvc__calib *c, int set, int layer, int group, int rank, float *basis, float *mean);

#endif
