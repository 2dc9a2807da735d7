/* codec.h (internal to cache/): how K and V vectors are stored in a page's head
 * blocks, and the inner loops attention runs over them.
 *
 * A codec is an entry in a table keyed by the spec's name ("f32", "f16",
 * "int8"); kvc__codec_init parses a spec into an instance bound to the pool's
 * dimensions. An instance stores `dim` numbers per token per head; attention
 * works in those numbers:
 *   - scores: s[r][j] = q'_r . k_j for the B tokens of one head block, q' the
 *     query already scaled (and, for a transforming codec, projected);
 *   - accum:  acc[r] += sum_j w[r][j] v_j, in the stored space.
 * Element formats (f32, f16, int8) give the kernels. The compressed codecs to
 * come add a transform around them without changing the page walk: low-rank
 * stores R coefficients (dim = R, a per-layer basis P held by the instance),
 * maps q to P^T q before `scores` and expands acc by P after the last page;
 * hybrid is low-rank coefficients in the int8 format. A kernel never expands
 * a page to f32 in memory: it converts inside its loop.
 *
 * Kernels come in a portable version (codec.c) and an AVX2+FMA+F16C version
 * (codec_avx2.c); kvc__codec_init picks one per instance. */
#ifndef KVC_CODEC_H
#define KVC_CODEC_H

#include <stddef.h>
#include <stdint.h>

/* Query rows processed together by one kernel call (tile of (token, head)
 * rows sharing one read of each K/V row). */
#define KVC__ROWS_MAX 16

typedef enum { KVC__ROLE_K = 0, KVC__ROLE_V = 1 } kvc__role;

/* The kernels of one element format in one role. blk: one head block; B: the
 * block size; dim: numbers per token. */
typedef struct {
    /* Stores token `slot` of a head block from x (dim floats). */
    void (*encode)(void *blk, int B, int dim, int slot, const float *x);
    /* x (dim floats) = token `slot` as attention sees it. */
    void (*decode)(const void *blk, int B, int dim, int slot, float *x);
    /* K role: s[r * s_stride + j] = q[r * dim ...] . k_j for j < n, r < nr. */
    void (*scores)(const void *blk, int B, int dim, int n, const float *q, int nr,
                   float *s, int s_stride);
    /* V role: acc[r * dim + d] += sum_{j<n} w[r * w_stride + j] * v_j[d]. */
    void (*accum)(const void *blk, int B, int dim, int n, const float *w, int w_stride,
                  int nr, float *acc);
} kvc__kernels;

typedef struct {
    const char *name;          /* the spec */
    int dim;                   /* numbers stored per token per head (head_dim) */
    int block_size;
    size_t block_bytes;        /* one head block, padded to 64 bytes */
    kvc__role role;
    kvc__kernels kern;         /* the kernels chosen for this machine */
} kvc__codec;

/* Parses `spec` for `role` (field names the config field for messages, e.g.
 * "k_codec"). Returns 0, or -1 with a message listing the valid specs. */
int kvc__codec_init(kvc__codec *c, const char *spec, const char *field, kvc__role role,
                    int head_dim, int block_size, int force_scalar, char *err, size_t errlen);

/* The comma-separated list of valid specs. */
const char *kvc__codec_specs(void);

/* IEEE half conversions (round to nearest even), portable. */
uint16_t kvc__f32_to_f16(float f);
float kvc__f16_to_f32(uint16_t h);

/* int8 head blocks: the numbers, then one fp16 scale per token at this byte
 * offset (16-byte aligned). */
static inline size_t kvc__i8_scale_offset(int B, int dim) { return ((size_t)B * dim + 15) & ~(size_t)15; }

/* int8: the scale for a vector of max |x| amax (the smallest half >= amax / 127,
 * at most 65504), and one number's quantized value (round to nearest even,
 * clamped to +-127; NaN gives -127). Shared by the portable and AVX2 encoders. */
void kvc__i8_scale(float amax, uint16_t *scale_half, float *scale);
int8_t kvc__i8_round(float v);

/* AVX2 kernels (codec_avx2.c), only called after a CPU check: fills the
 * members it has a faster version of, NULL for the rest; -1 for an unknown name. */
int kvc__codec_avx2_get(const char *name, kvc__role role, kvc__kernels *out);

#endif
