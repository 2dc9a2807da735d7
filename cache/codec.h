/* codec.h (internal to cache/): how K and V vectors are stored in a page's
 * blocks, and the inner loops attention runs over them.
 *
 * A codec is an element format plus an optional linear transform:
 *   - element formats (the numbers a block stores): f32, f16, int8 (one fp16
 *     scale per token), int4 per token (KVC__U4, KVC__U4G64: 4-bit codes, fp16
 *     scale and minimum per group of 32 or 64 numbers of a token) and int4 per channel
 *     (KVC__U4C: fp16 scale and minimum per number index over the block's
 *     tokens: KIVI-style keys);
 *   - transforms: none (a block per kv head holds head_dim numbers per token),
 *     low rank (a block per kv head holds R coefficients c = P^T (x - mean) on
 *     an orthonormal basis P of that head) or latent (one block per layer
 *     holds N coefficients of the concatenated kv heads).
 * lowrank = transform + f16, hybrid = transform + int8.
 *
 * Attention works in the stored numbers: the query is projected once per row
 * onto the head's slice of the K basis (q' = P_h^T q; the K mean adds the same
 * q.mean to every score and cancels in the softmax), `scores` runs over the
 * coefficients, `accum` sums weighted V coefficients, and the sum is expanded
 * once at the end (out = mean_h + P_h acc / l). A kernel never expands a page
 * to f32 in memory: it converts inside its loop.
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


/* Largest stored dimension (rank of a latent). */
#define KVC__DIM_MAX 8192

typedef enum { KVC__ROLE_K = 0, KVC__ROLE_V = 1 } kvc__role;
/* int4 per token comes with groups of 32 (KVC__U4) or 64 (KVC__U4G64) numbers. */
typedef enum { KVC__F32, KVC__F16, KVC__I8, KVC__U4, KVC__U4G64, KVC__U4C } kvc__fmt;
typedef enum { KVC__PLAIN, KVC__LOWRANK, KVC__LATENT } kvc__shape;

/* The kernels of one element format in one role. blk: one block; B: the
 * block size; dim: numbers per token. */
typedef struct {
    /* Stores tokens [slot, slot + n) of a block (all in this block) from x,
     * token t's dim floats at x + t * x_stride. */
    void (*encode)(void *blk, int B, int dim, int slot, int n, const float *x, int64_t x_stride);
    /* x (dim floats) = token `slot` as attention sees it. */
    void (*decode)(const void *blk, int B, int dim, int slot, float *x);
    /* K role: s[r * s_stride + j] = q[r * dim ...] . k_j for j < n, r < nr,
     * k_j as decode gives it (minima and scales included). */
    void (*scores)(const void *blk, int B, int dim, int n, const float *q, int nr,
                   float *s, int s_stride);
    /* V role: acc[r * dim + d] += sum_{j<n} w[r * w_stride + j] * v_j[d]. */
    void (*accum)(const void *blk, int B, int dim, int n, const float *w, int w_stride,
                  int nr, float *acc);
    /* K role, optional (NULL: kvc__codec_decode_tile decodes token by token):
     * x[d * x_stride + t] = number d of token j0 + t as decode gives it, for
     * t < n, d < dim: tokens of a block widened to f32 in its (dim, B) order.
     * j0 is even. */
    void (*unpack)(const void *blk, int B, int dim, int j0, int n, float *x, int x_stride);
} kvc__kernels;

/* The transform's two loops over a basis P (n rows of R floats, row-major):
 * project: coef[r] = sum_{d<n} P[d][r] (x[d] - mu[d])   (mu NULL: 0)
 * expand:  out[d] = mu[d] + sum_{r<R} P[d][r] coef[r]    (mu NULL: 0) */
typedef void (*kvc__project_fn)(const float *P, int R, int n, const float *x, const float *mu, float *coef);
typedef void (*kvc__expand_fn)(const float *P, int R, int n, const float *coef, const float *mu, float *out);
/* expand for m tokens at once (keys cached before RoPE are expanded a tile
 * at a time): out[d * out_stride + t] = mu[d] + sum_{r<R} P[d][r] c[r * c_stride + t]
 * for d < n, t < m, each sum taken in the order of r as expand does. */
typedef void (*kvc__expand_tile_fn)(const float *P, int R, int n, const float *c, int c_stride, int m,
                                    const float *mu, float *out, int out_stride);
/* The f32 scores kernel (kvc__kernels.scores of f32 keys). */
typedef void (*kvc__scores_fn)(const void *blk, int B, int dim, int n, const float *q, int nr, float *s,
                               int s_stride);

/* RoPE on a (dim, n) tile of keys cached before RoPE (x[d * x_stride + t]):
 * token t's pair i turns by the angle whose cosine and sine are
 * cos[i * c_stride + t], sin[...] (tables by pair, then token: contiguous
 * over the tile's tokens); the pair is (2i, 2i + 1), or (i, i + rope_dim / 2)
 * with neox: x_a' = x_a cos - x_b sin, x_b' = x_a sin + x_b cos. */
typedef void (*kvc__rotate_fn)(float *x, int x_stride, int n, int rope_dim, int neox, const float *cos,
                               const float *sin, int c_stride);

/* Tokens decoded per kvc__codec_decode_tile call at most. */
#define KVC__TILE_TOKENS 64

/* The calibration a pca codec reads its bases from (calib.c). */
typedef struct kvc__calib kvc__calib;

typedef struct {
    char name[64];             /* the spec */
    kvc__role role;
    kvc__fmt fmt;
    kvc__shape shape;
    int pre_rope;              /* keys stored before RoPE; attention rotates them */
    int pca;                   /* bases from the calibration file */
    int n_layer, n_kv_head, head_dim, block_size;
    int n_groups;              /* blocks per layer: n_kv_head, or 1 for a latent */
    int in_dim;                /* floats one group encodes: head_dim or n_kv_head * head_dim */
    int *dim;                  /* (n_layer) numbers stored per token per group */
    size_t *block_bytes;       /* (n_layer) one block, padded to 16 bytes */
    int max_dim;               /* max over layers of dim */
    /* Transforms: per (layer, group) an orthonormal basis and a mean. */
    float **basis;             /* (n_layer * n_groups) -> (in_dim, dim[l]) row-major */
    float **mean;              /* (n_layer * n_groups) -> (in_dim), NULL entries: zero mean */
    kvc__kernels kern;         /* the element kernels chosen for this machine */
    kvc__project_fn project;   /* portable or AVX2 */
    kvc__expand_fn expand;
    kvc__expand_tile_fn expand_tile;
    kvc__scores_fn scores_f32; /* scores over f32 tiles of keys (pre-RoPE keys, rotated) */
    kvc__rotate_fn rotate;     /* pre-RoPE keys: RoPE on a decoded tile */
} kvc__codec;

/* Parses `spec` for `role` (field names the config field for messages, e.g.
 * "k_codec"); pca bases come from calib (NULL: none loaded; calib_path names
 * it in messages). Returns 0, or -1 with a message (an unknown spec lists the
 * valid ones). */
int kvc__codec_init(kvc__codec *c, const char *spec, const char *field, kvc__role role,
                    int n_layer, int n_kv_head, int head_dim, int block_size, int force_scalar,
                    const kvc__calib *calib, const char *calib_path, char *err, size_t errlen);
void kvc__codec_free(kvc__codec *c);

/* True when `spec` needs a calibration file (a pca basis). -1: unparseable. */
int kvc__codec_needs_calib(const char *spec);

/* The valid specs, for messages and kvc_codec_specs(). */
const char *kvc__codec_specs(void);

/* Encodes tokens [slot, slot + n) of group `group` (a kv head, or 0 for a
 * latent) of `layer` into blk; token t's in_dim floats at x + t * x_stride. */
void kvc__codec_encode(const kvc__codec *c, int layer, int group, void *blk, int slot, int n,
                       const float *x, int64_t x_stride);
/* Writes token `slot` of kv head `head`'s vector (head_dim floats) to x as
 * attention sees it; blk is the head's block (its group's for a latent). */
void kvc__codec_decode_head(const kvc__codec *c, int layer, int head, const void *blk, int slot, float *x);
/* q' (dim[layer]) = P_head^T q (q: head_dim floats); a copy when plain. */
void kvc__codec_project(const kvc__codec *c, int layer, int head, const float *q, float *qp);
/* out (head_dim) = mean_head + P_head coef (coef: dim[layer]); a copy when plain. */
void kvc__codec_expand(const kvc__codec *c, int layer, int head, const float *coef, float *out);

/* Tokens [j0, j0 + n) (n <= KVC__TILE_TOKENS, j0 even) of kv head `head`'s
 * K vectors in blk as attention sees them, in the K blocks' dimension-major
 * order: x[d * x_stride + t] for d < head_dim, t < n. A transform's
 * coefficients are widened into work (KVC__TILE_TOKENS * max_dim floats) and
 * expanded as one (head_dim, R) x (R, n) product. */
void kvc__codec_decode_tile(const kvc__codec *c, int layer, int head, const void *blk, int j0, int n,
                            float *x, int x_stride, float *work);

/* The group a kv head's numbers live in. */
static inline int kvc__codec_group(const kvc__codec *c, int head) { return c->shape == KVC__LATENT ? 0 : head; }


/* IEEE half conversions (round to nearest even), portable. */
uint16_t kvc__f32_to_f16(float f);
float kvc__f16_to_f32(uint16_t h);
/* The largest half <= f and the smallest half >= f (f finite, |f| <= 65504). */
uint16_t kvc__f16_down(float f);
uint16_t kvc__f16_up(float f);

/* int8 blocks: the numbers, then one fp16 scale per token at this byte
 * offset (16-byte aligned). */
static inline size_t kvc__i8_scale_offset(int B, int dim) { return ((size_t)B * dim + 15) & ~(size_t)15; }

/* int8: the scale for a vector of max |x| amax (the smallest half >= amax / 127,
 * at most 65504), and one number's quantized value (round to nearest even,
 * clamped to +-127; NaN gives -127). Shared by the portable and AVX2 encoders. */
void kvc__i8_scale(float amax, uint16_t *scale_half, float *scale);
int8_t kvc__i8_round(float v);

/* int4 blocks. Codes are 4-bit, two per byte (even index in the low nibble);
 * K: (dim, Bp) code matrix, Bp = B rounded up to even; V: (B, Dp), Dp = dim
 * rounded up to even. Then, 16-byte aligned, fp16 scales, then fp16 minima:
 * per token (KVC__U4, KVC__U4G64): (n_groups, B) each, group g = numbers
 * [gs g, gs g + gs) (gs = 32 or 64, the last group shorter); per channel
 * (KVC__U4C): (dim) each. A number is min + scale * code. */
static inline int kvc__u4_groups(int dim, int gs) { return (dim + gs - 1) / gs; }
static inline int kvc__even(int n) { return n + (n & 1); }
static inline size_t kvc__u4_param_offset(kvc__role role, int B, int dim) {
    size_t codes = role == KVC__ROLE_K ? (size_t)dim * kvc__even(B) / 2 : (size_t)B * kvc__even(dim) / 2;
    return (codes + 15) & ~(size_t)15;
}
/* Quantization parameters of a range [lo, hi]: the minimum (largest half <=
 * lo) and the scale (smallest half >= (hi - min) / 15); codes then lie in
 * [0, 15] with an error of at most scale / 2. */
void kvc__u4_params(float lo, float hi, uint16_t *min_half, uint16_t *scale_half);
uint8_t kvc__u4_round(float v);   /* nearest even, clamped to [0, 15]; NaN gives 0 */

/* AVX2 kernels (codec_avx2.c), only called after a CPU check: fills the
 * members it has a faster version of, NULL for the rest. */
void kvc__codec_avx2_get(kvc__fmt fmt, kvc__role role, kvc__kernels *out);
/* The AVX-512 scores and weighted sums (codec_avx512.c), only after
 * kvc__have_avx512(), NULL for the rest; they give the AVX2 kernels' bits.
 * Scores take block sizes that are multiples of 16, sums widths (dim) that
 * are multiples of 16: the caller installs them only there. */
void kvc__codec_avx512_get(kvc__fmt fmt, kvc__role role, kvc__kernels *out);
void kvc__project_avx2(const float *P, int R, int n, const float *x, const float *mu, float *coef);
void kvc__expand_avx2(const float *P, int R, int n, const float *coef, const float *mu, float *out);
void kvc__expand_tile_avx2(const float *P, int R, int n, const float *c, int c_stride, int m,
                           const float *mu, float *out, int out_stride);
void kvc__rotate_avx2(float *x, int x_stride, int n, int rope_dim, int neox, const float *cos, const float *sin,
                      int c_stride);

#endif
