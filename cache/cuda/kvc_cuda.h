/* kvc_cuda.h: the paged KV cache on an NVIDIA GPU (sm_90, H100/H200): the
 * compress-on-write kernel, paged decode attention and paged prefill
 * attention, all reading and writing the exact page layout of cache/kvcache.h
 * (the CPU code in cache/ is the reference; a GPU arena holds the same bytes a
 * CPU pool's arena would).
 *
 * The GPU side keeps no page bookkeeping: a CPU kvc_pool of the same config
 * does that (its own arena is mapped lazily and stays untouched when only
 * its block tables are used) and describes the byte layout; the caller
 * allocates the device arena (kvc_page_bytes(pool) for each of the pool's
 * kvc_pages_total(pool) pages, cudaMalloc, zero-filled: decode reads f16
 * blocks through tensor maps of that many pages), copies block tables to
 * device int32 arrays and passes them per call. Page p of the device arena
 * holds the bytes page p of the pool's arena would hold.
 *
 * Compiled set (anything else is an explicit KVC_ERR_INVAL with a message):
 *   codecs: keys f16, int8 or int4 per channel (int4:channel, the keys'
 *   "int4"), values f16, int8 or int4 per token with groups of 32 or 64
 *   (int4:token, the values' "int4" and "int4:g64"), in any pairing (e.g.
 *   the multi-gpu profile's f16 keys with int4 values); head_dim 64 or 128;
 *   block_size 16; n_rep (query heads per kv head) 1..8.
 * Decode runs on tensor cores with the query and the softmax weights split
 * into fp16 hi + lo pairs (as exact as fp32; see cuda/decode.cu). Prefill
 * runs on tensor cores (mma.sync f16, f32 accumulation; query and weights
 * rounded to fp16; quantized pages dequantized to fp16 once per call into
 * scratch pages, or per tile in shared memory: kvc_cu_set_prefill_expand,
 * cuda/prefill.cu).
 *
 * Transform codecs (lowrank:rR, latent:N, hybrid:rR, hybrid:latent:N, with
 * orthogonal or pca bases): the pages hold coefficients c = P^T (x - mean),
 * fp16 or int8 with a scale per token, in the f16 / int8 layouts with R (or
 * N) numbers in place of head_dim. The write projects each new vector on its
 * basis (the same fp32 operations as codec.c's portable project, so the
 * bytes equal kvc_write's with force_scalar); decode and prefill project
 * each query row once onto its kv head's slice of the K basis, run the
 * attention kernels over the coefficients (scores q'.c, weighted sums of V
 * coefficients) and expand each output row once (mean + P_h acc / l). A
 * latent block is shared by all kv heads of the layer: its query rows are
 * regrouped (up to 8 a group) over all kv heads so each group reads the
 * latent pages once. Compiled: stored ranks 32, 64 and 128 (per layer; K and
 * V of a layer must store the same number of coefficients, a plain side
 * counting head_dim), elements f16/int8 (at rank 32: both f16 or both int8).
 * Not on the GPU (refused by kvc_cu_layout_init with a message): keys cached
 * before RoPE (:prerope), int4 coefficients (:int4...), other ranks, int4
 * keys per token and int4 values per channel.
 *
 * All pointers named "device" are device memory; every call is asynchronous
 * on `stream` (a cudaStream_t; NULL is the default stream) and returns KVC_OK,
 * KVC_ERR_INVAL (bad arguments, message in err) or KVC_ERR_NOMEM (a CUDA
 * error: launch failure, too little shared memory; message in err). Threading:
 * calls may come from any host thread; the caller orders work on the arena.
 * Decode is a programmatic dependent launch (Hopper): its blocks may become
 * resident during the previous kernel's tail but read nothing before that
 * kernel has completed (unless the call's arguments promise what that kernel
 * does not write: kvc_cu_decode_args.prefetch), so stream order holds as for
 * a plain launch; a
 * kernel of the caller's launched after it with the programmatic attribute
 * must itself wait (griddepcontrol.wait / cudaGridDependencySynchronize)
 * before reading decode's output. KVC_CU_PDL=0 in the environment makes
 * every launch plain. */
#ifndef KVC_CUDA_H
#define KVC_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "cache/kvcache.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Element formats the GPU kernels read (codec.h's KVC__F16, KVC__I8,
 * KVC__U4, KVC__U4G64, KVC__U4C). */
enum { KVC_CU_F16 = 1, KVC_CU_I8 = 2, KVC_CU_U4T32 = 3, KVC_CU_U4T64 = 4, KVC_CU_U4C = 5 };

/* Shapes of a side's transform (codec.h's KVC__PLAIN, KVC__LOWRANK, KVC__LATENT). */
enum { KVC_CU_PLAIN = 0, KVC_CU_LOWRANK = 1, KVC_CU_LATENT = 2 };

/* What the kernels need of a pool's layout. The pool must outlive it. */
typedef struct {
    const kvc_pool *pool;           /* per-layer offsets, block sizes and ranks */
    int n_layer, n_kv_head, head_dim, block_size;
    int k_fmt, v_fmt;               /* KVC_CU_*: the stored numbers' element format */
    int k_shape, v_shape;           /* KVC_CU_PLAIN, _LOWRANK, _LATENT */
    size_t page_bytes;
    /* Transform codecs only (else NULL): the bases in device memory, owned
     * by the layout (kvc_cu_layout_dispose frees them). For side r (0 K,
     * 1 V) and layer l, at byte offset basis_off[2 * l + r] of `bases`, f32:
     *   P  (n_groups, in_dim, R)  row-major, as codec.h's basis
     *   Pt (n_groups, R, in_dim)  the same transposed (the expansion's reads)
     *   mu (n_groups, in_dim)     the mean (zeros for orthogonal bases)
     * (in_dim: head_dim, or n_kv_head * head_dim for a latent; R the layer's rank). */
    void *bases;
    size_t *basis_off;              /* host (n_layer * 2) */
} kvc_cu_layout;

/* Fills L from a pool; with a transform codec it also copies the bases to
 * the device (synchronously, on the current device). KVC_OK, KVC_ERR_INVAL
 * naming the codec or size the GPU kernels are not compiled for, or
 * KVC_ERR_NOMEM (host or device allocation, message in err). Pair every
 * successful init with kvc_cu_layout_dispose. */
int kvc_cu_layout_init(kvc_cu_layout *L, const kvc_pool *pool, char *err, size_t errlen);
/* Frees what init allocated (nothing for plain codecs); L is zeroed. */
void kvc_cu_layout_dispose(kvc_cu_layout *L);

/* Compress-on-write: encodes n tokens' K and V of one layer into their page
 * slots, exactly as kvc_write would (same bytes: f16 round-to-nearest-even;
 * int8 scale = the smallest half >= max|x| / 127, q = round-half-even(x / scale);
 * int4 minimum and scale per group or channel as kvc__u4_params).
 * int4:channel keys: tokens i, i + 1, ... with consecutive slots of one page
 * form a run, encoded as one kvc_write call would encode that page's part
 * (earlier tokens of the page re-coded when the run widens a channel's
 * range); a call must hold at most one run per page (a decode step's one
 * token per sequence, a chunk's consecutive positions), and earlier slots of
 * the page must have been written. The write is a programmatic dependent
 * launch: its blocks may start during the kernel before it and wait for it
 * (griddepcontrol.wait) before touching memory (KVC_CU_WRITE_WAIT=0 in the
 * environment launches it plainly). Where the last kvc_cu_decode of this
 * host thread had a grid that lands well beside a running kernel, the write
 * lets the kernel after it in the stream start early (programmatic dependent
 * launch: a decode's blocks wait in griddepcontrol.wait for the write's
 * bytes; a kernel launched without that attribute is not affected);
 * KVC_CU_WRITE_PDL=0 in the environment never does, =1 always does.
 *   arena: device (n_pages, page_bytes)
 *   slots: device (n) int32, page_id * block_size + offset in page; < 0 skips the token
 *   k, v:  device (n, n_kv_head, head_dim) f32, kv_stride floats between tokens */
int kvc_cu_write(const kvc_cu_layout *L, void *arena, int layer, const int32_t *slots, int n,
                 const float *k, const float *v, int64_t kv_stride, void *stream, char *err,
                 size_t errlen);

/* Decode attention: query token of sequence s attends to its positions
 * [0, ctx_lens[s]) through its block table; the n_rep query heads of each kv
 * head are processed together, so each page is read once per step. Long
 * contexts are split across thread blocks and merged in the same launch
 * (no second kernel): 2..8 splits of a (sequence, kv head) filling the GPU
 * in one wave as one thread block cluster, merged through distributed shared
 * memory; otherwise by the last block to end its page loops, through the
 * workspace. */
typedef struct {
    const int32_t *block_tables;  /* device (n_seqs, bt_stride) page ids; bt_stride 0: one shared table */
    int bt_stride;
    const int32_t *ctx_lens;      /* device (n_seqs) context lengths, each 0..max_ctx (0: output zeros);
                                   * NULL: sequence s has ctx0 + s positions (a prefill chunk's rows) */
    int ctx0;
    int n_seqs;
    int max_ctx;                  /* host: >= every ctx_lens[s]; sizes the split */
    int n_rep;                    /* query heads per kv head, 1..8 */
    float scale;                  /* applied to scores, normally 1/sqrt(head_dim) */
    const float *q;               /* device (n_seqs, n_kv_head * n_rep, head_dim) f32, q_stride floats per sequence */
    int64_t q_stride;
    float *out;                   /* device, like q, out_stride floats per sequence */
    int64_t out_stride;
    /* 1: a promise that lets the decode stream its first pages while the
     * kernel before it in the stream still runs (programmatic launch): that
     * kernel writes, of what the decode reads, at most the last `fresh`
     * positions of each sequence (not q, the block tables or the context
     * lengths; a decode step's kvc_cu_write before it: fresh 1; nothing: 0),
     * and everything before that kernel has completed when it starts (it is
     * a plain launch, or waits for its predecessor before letting the decode
     * launch, as every kvc_cu_* kernel does). Pages holding the last `fresh`
     * positions, out and the workspace are touched only after that kernel
     * completes. 0 (the default): nothing is read before. The environment's
     * KVC_CU_PREFETCH=0 ignores the promise. */
    int prefetch;
    int fresh;
} kvc_cu_decode_args;

/* Device workspace bytes kvc_cu_decode needs for these sizes (split partials
 * and merge counters). The workspace must be zero-filled once after
 * allocation (cudaMemset); kernels leave it ready for the next call. One
 * workspace serves one stream at a time. */
size_t kvc_cu_decode_workspace(const kvc_cu_layout *L, int n_seqs, int max_ctx, int n_rep);
int kvc_cu_decode(const kvc_cu_layout *L, const void *arena, int layer,
                  const kvc_cu_decode_args *a, void *workspace, size_t workspace_bytes,
                  void *stream, char *err, size_t errlen);

/* Prefill attention for a chunk of one sequence: query token i (position
 * pos0 + i) attends causally to positions [0, pos0 + i], read from the pages
 * (write the chunk's own K/V with kvc_cu_write first, as kvc_attend expects).
 * Transform codecs run the tensor-core kernel over the coefficients between
 * the query projection and the output expansion, with scratch for the
 * projected rows and the coefficient outputs; quantized plain pages are
 * expanded into f16 scratch pages first (kvc_cu_set_prefill_expand). Scratch
 * is taken stream-ordered from a memory pool of the device that kvc_cuda
 * keeps (it holds on to the largest scratch a call has needed: (pos0 + n) *
 * n_kv_head * head_dim * 4 bytes for an expansion) and given back after the
 * launches.
 *   block_table: device (>= ceil((pos0 + n) / block_size)) page ids
 *   q, out: device (n, n_kv_head * n_rep, head_dim) f32, q_stride / out_stride floats per token */
int kvc_cu_prefill(const kvc_cu_layout *L, const void *arena, int layer,
                   const int32_t *block_table, int pos0, int n, int n_rep, float scale,
                   const float *q, int64_t q_stride, float *out, int64_t out_stride, void *stream, char *err,
                   size_t errlen);

/* How prefill reads quantized pages (plain codecs with head_dim >= 64): 1
 * expanded: the chunk's context dequantized once into f16 pages of a
 * stream-ordered scratch arena, which the f16 kernel's tensor copies then
 * read; 0 in registers: each block of 128 query rows dequantizes every
 * tile it reads; -1 (the default) expanded but for chunks of one block of
 * query rows a kv head (n * n_rep <= 128) after at least 1024 positions,
 * whose context the prefill kernel splits so that each block dequantizes
 * only its run, once (cuda/prefill.cu, expand_pays). The environment's
 * KVC_CU_PREFILL_EXPAND (0, 1, -1) sets the same where this was never
 * called. Not thread-safe; set before use. */
void kvc_cu_set_prefill_expand(int on);
/* Small prefill chunks (plain codecs) run on the decode kernel: each token
 * a sequence of its own context length sharing the block table, the context
 * split across thread blocks, read once per token. max_n -1 (the default):
 * chunks of at most 128 query rows a kv head (n * n_rep <= 128) whose n
 * tokens' reads of the context (n times its stored bytes in the layer) are
 * at most 64 MB, which L2 mostly serves (cuda/prefill.cu, small_by_decode);
 * 0: never; > 0: chunks of at most max_n tokens. The environment's KVC_CU_PREFILL_SMALL sets the same where this
 * was never called. Not thread-safe; set before use. */
void kvc_cu_set_prefill_small(int max_n);
/* Splits of a prefill chunk's context (the prefill kernel, not the decode
 * kernel's small chunks): each split's blocks attend to a run of the
 * context and a second kernel merges their partials, as decode does. n -1
 * (the default): a grid that would leave multiprocessors idle (few query
 * rows after a long context) splits to fill them, in runs of at least 256
 * positions; 0: never; n > 0: n splits (at most 64, and each must start at
 * or before the chunk's first position, so fewer where the context is
 * short). The environment's KVC_CU_PREFILL_SPLIT sets the same where this
 * was never called. Not thread-safe; set before use. */
void kvc_cu_set_prefill_split(int n);

/* Tuning for benchmarks: context pages each decode thread block covers (0:
 * planned from the sizes and the device, the default) and whether each warp
 * takes a whole (sequence, kv head) (1), two warps do, two pairs a block
 * (2), blocks split the context (-1), or the plan decides (0, the default).
 * Not thread-safe; set before use. */
void kvc_cu_set_decode_tuning(int pages_per_split, int warp_per_sequence);
/* Whether the 2..8 split blocks of a (sequence, kv head) run as one thread
 * block cluster (kernels of head_dim <= 64, one kv head a warp): -1 where
 * the plan fills one wave (the default; the environment's KVC_CU_CLUSTER=0
 * turns it off, =2 on), 0 never, 1 always (tests of both merges). Not
 * thread-safe; set before use. */
void kvc_cu_set_decode_cluster(int mode);
/* Whether int8 / int8 decode at head_dim <= 64 (one kv head a warp) takes
 * its wide instance, four pages a slot at 3 blocks a multiprocessor, or the
 * plain one, two pages at 4: -1 as planned (the default: wide where its grid
 * fits one wave and costs no more; the environment's KVC_CU_WIDE=0 / 1 sets
 * never / always), 0 never, 1 always (tests of both). Not thread-safe; set
 * before use. */
void kvc_cu_set_decode_wide(int mode);

#ifdef __cplusplus
}
#endif

#endif
