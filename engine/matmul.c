/* matmul.c: weight preparation and the matrix products of the forward pass
 * (contract in engine/matmul.h): format conversion at load, the run-time
 * choice of kernels, activation quantization, the split of a product into
 * tasks for the thread pool, and the scalar kernels that serve as the
 * fallback on CPUs without AVX2. Kernel sets: "avx2" (matmul_avx2.c) and
 * "avx512", the AVX2 set whose batched 16-bit kernels are replaced by
 * AVX-512 VNNI ones (matmul_avx512.c), chosen where the CPU has them; every
 * set's 16-bit kernels give the same bits.
 *
 * Weights are used in their file layout for decode: a single token streams
 * them from memory, and the AVX2 decode kernel already runs faster than
 * memory delivers them. Batched steps are compute-bound and read a second,
 * panel-packed copy of each quantized matrix (eng_weight_pack,
 * matmul_internal.h) made at load, so no batch unpacks or transposes
 * weights; the original stays a plain ggml-layout matrix that
 * eng_dequantize_row, row concatenation and the tied embedding lookup can
 * read. Tiling across tokens is done on the activation side: the
 * activations are quantized per call, so they can be laid out for the
 * kernels for free (see matmul_internal.h).
 *
 * Threads: eng_matmul is called by one thread at a time per pool (the engine
 * thread). Its scratch for quantized activations is per calling thread, kept
 * between calls and grown as needed. */
#include "engine/matmul.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "engine/matmul_act32.h"
#include "engine/matmul_internal.h"

/* ---- scalar kernels ------------------------------------------------------ */

/* The documented activation quantization of one block of 32: d = max|x| /
 * qmax, q = x * (1 / d) rounded to nearest even (clamped as the AVX2 packs
 * saturate), returns sum(q). */
static int quantize_block_scalar(const float *v, float qmax, int32_t q[ENG_QK], float *d_out) {
    float amax = 0.0f;
    for (int j = 0; j < ENG_QK; j++)
        amax = fmaxf(amax, fabsf(v[j]));
    const float d = amax / qmax;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    int sum = 0;
    for (int j = 0; j < ENG_QK; j++) {
        float r = nearbyintf(v[j] * id);
        r = r > qmax ? qmax : r < -qmax - 1.0f ? -qmax - 1.0f : r;
        q[j] = (int32_t)r;
        sum += q[j];
    }
    *d_out = d;
    return sum;
}

static void quantize_scalar(const float *x, eng_block_q8_1 *out, int64_t n) {
    for (int64_t b = 0; b < n / ENG_QK; b++) {
        int32_t q[ENG_QK];
        const int sum = quantize_block_scalar(x + b * ENG_QK, 127.0f, q, &out[b].d);
        for (int j = 0; j < ENG_QK; j++)
            out[b].qs[j] = (int8_t)q[j];
        out[b].s = out[b].d * (float)sum;
    }
}

/* Q4_0 and Q4_1 rows: nibbles are used unsigned (0..15), the offset enters
 * through s: sum_j (d q_j + m) x_j = d dx sum_j q_j qx_j + m s, with
 * m = -8 d for Q4_0. */
static void rows_q4_scalar(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    const bool has_min = m->type == ENG_Q4_1;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = m->w + r * m->row_bytes;
        for (int t = t0; t < t1; t++) {
            const eng_block_q8_1 *xb = m->xr + (int64_t)t * m->nb;
            float sum = 0.0f;
            for (int64_t b = 0; b < m->nb; b++) {
                const uint8_t *qs;
                float d, mn;
                if (has_min) {
                    const eng_block_q4_1 *blk = (const eng_block_q4_1 *)row + b;
                    d = eng_fp16_to_f32(blk->d);
                    mn = eng_fp16_to_f32(blk->m);
                    qs = blk->qs;
                } else {
                    const eng_block_q4_0 *blk = (const eng_block_q4_0 *)row + b;
                    d = eng_fp16_to_f32(blk->d);
                    mn = -8.0f * d;
                    qs = blk->qs;
                }
                int isum = 0;
                for (int j = 0; j < ENG_QK / 2; j++)
                    isum += (qs[j] & 15) * xb[b].qs[j] + (qs[j] >> 4) * xb[b].qs[j + ENG_QK / 2];
                sum += d * xb[b].d * (float)isum + mn * xb[b].s;
            }
            m->y[t * m->y_stride + r] = sum;
        }
    }
}

static void rows_q8_0_scalar(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    for (int64_t r = r0; r < r1; r++) {
        const eng_block_q8_0 *row = (const eng_block_q8_0 *)(m->w + r * m->row_bytes);
        for (int t = t0; t < t1; t++) {
            const eng_block_q8_1 *xb = m->xr + (int64_t)t * m->nb;
            float sum = 0.0f;
            for (int64_t b = 0; b < m->nb; b++) {
                int isum = 0;
                for (int j = 0; j < ENG_QK; j++)
                    isum += row[b].qs[j] * xb[b].qs[j];
                sum += eng_fp16_to_f32(row[b].d) * xb[b].d * (float)isum;
            }
            m->y[t * m->y_stride + r] = sum;
        }
    }
}

static void rows_float_scalar(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    for (int64_t r = r0; r < r1; r++) {
        const void *row = m->w + r * m->row_bytes;
        for (int t = t0; t < t1; t++) {
            const float *x = m->x + t * m->n_in;
            float sum = 0.0f;
            if (m->type == ENG_F32) {
                const float *w = row;
                for (int64_t i = 0; i < m->n_in; i++)
                    sum += w[i] * x[i];
            } else {
                const eng_fp16_t *w = row;
                for (int64_t i = 0; i < m->n_in; i++)
                    sum += eng_fp16_to_f32(w[i]) * x[i];
            }
            m->y[t * m->y_stride + r] = sum;
        }
    }
}

/* ---- 16-bit activations (scalar) ------------------------------------------ */

static void quantize16_scalar(const float *x, eng_block_q16 *out, int64_t n) {
    for (int64_t b = 0; b < n / ENG_QK; b++) {
        int32_t q[ENG_QK];
        const int sum = quantize_block_scalar(x + b * ENG_QK, 32767.0f, q, &out[b].d);
        for (int j = 0; j < ENG_QK; j++)
            out[b].qs[j] = (int16_t)q[j];
        out[b].s = out[b].d * (float)sum;
    }
}

/* Returns the block's weights as integers and its scale d and offset m
 * (value = d q + m; m = 0 for Q8_0). */
static void int_block(eng_dtype type, const uint8_t *row, int64_t b, int q[ENG_QK], float *d, float *mn) {
    if (type == ENG_Q8_0) {
        const eng_block_q8_0 *blk = (const eng_block_q8_0 *)row + b;
        for (int j = 0; j < ENG_QK; j++)
            q[j] = blk->qs[j];
        *d = eng_fp16_to_f32(blk->d);
        *mn = 0.0f;
        return;
    }
    const uint8_t *qs;
    if (type == ENG_Q4_1) {
        const eng_block_q4_1 *blk = (const eng_block_q4_1 *)row + b;
        *d = eng_fp16_to_f32(blk->d);
        *mn = eng_fp16_to_f32(blk->m);
        qs = blk->qs;
    } else {
        const eng_block_q4_0 *blk = (const eng_block_q4_0 *)row + b;
        *d = eng_fp16_to_f32(blk->d);
        *mn = -8.0f * *d;
        qs = blk->qs;
    }
    for (int j = 0; j < ENG_QK / 2; j++) {
        q[j] = qs[j] & 15;
        q[j + ENG_QK / 2] = qs[j] >> 4;
    }
}

static void rows16_scalar(const eng__mm *m, int64_t r0, int64_t r1, int t0, int t1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = m->w + r * m->row_bytes;
        for (int t = t0; t < t1; t++) {
            const eng_block_q16 *xb = m->xr16 + (int64_t)t * m->nb;
            float sum = 0.0f;
            for (int64_t b = 0; b < m->nb; b++) {
                int q[ENG_QK];
                float d, mn;
                int_block(m->type, row, b, q, &d, &mn);
                int isum = 0;
                for (int j = 0; j < ENG_QK; j++)
                    isum += q[j] * xb[b].qs[j];
                sum += d * xb[b].d * (float)isum + mn * xb[b].s;
            }
            m->y[t * m->y_stride + r] = sum;
        }
    }
}

static const eng__mm_kernels kernels_scalar = {
    .name = "scalar",
    .quantize = quantize_scalar,
    .rows = {
        [ENG_F32] = rows_float_scalar,
        [ENG_F16] = rows_float_scalar,
        [ENG_Q4_0] = rows_q4_scalar,
        [ENG_Q4_1] = rows_q4_scalar,
        [ENG_Q8_0] = rows_q8_0_scalar,
    },
    .quantize16 = quantize16_scalar,
    .rows16 = {
        [ENG_Q4_0] = rows16_scalar,
        [ENG_Q4_1] = rows16_scalar,
        [ENG_Q8_0] = rows16_scalar,
    },
};

/* ---- kernel choice ------------------------------------------------------- */

static bool cpu_has_avx2(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
}

static bool cpu_has_avx512(void) {
#if defined(__x86_64__) || defined(__i386__)
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return false;
#endif
}

/* The AVX2 set with the AVX-512 batched kernels (matmul_avx512.c), made
 * once on first use. */
static eng__mm_kernels kernels_avx512;
static pthread_once_t kernels_avx512_once = PTHREAD_ONCE_INIT;

static void kernels_avx512_init(void) {
    kernels_avx512 = eng__mm_kernels_avx2;
    kernels_avx512.name = "avx512";
    for (int t = 0; t < ENG_DTYPE_COUNT; t++)
        if (eng__panel16_avx512[t])
            kernels_avx512.panel16[t] = eng__panel16_avx512[t];
}

static const eng__mm_kernels *avx512_set(void) {
    pthread_once(&kernels_avx512_once, kernels_avx512_init);
    return &kernels_avx512;
}

static const eng__mm_kernels *best_kernels(void) {
    if (cpu_has_avx512())
        return avx512_set();
    return cpu_has_avx2() ? &eng__mm_kernels_avx2 : &kernels_scalar;
}

static _Atomic(const eng__mm_kernels *) chosen;

static const eng__mm_kernels *kernels(void) {
    const eng__mm_kernels *k = atomic_load_explicit(&chosen, memory_order_acquire);
    if (!k) {
        k = best_kernels();
        atomic_store_explicit(&chosen, k, memory_order_release);
    }
    return k;
}

int eng_matmul_force_isa(const char *name) {
    const eng__mm_kernels *k = NULL;
    if (name == NULL)
        k = best_kernels();
    else if (strcmp(name, "scalar") == 0)
        k = &kernels_scalar;
    else if (strcmp(name, "avx2") == 0 && cpu_has_avx2())
        k = &eng__mm_kernels_avx2;
    else if (strcmp(name, "avx512") == 0 && cpu_has_avx512())
        k = avx512_set();
    if (!k)
        return -1;
    atomic_store_explicit(&chosen, k, memory_order_release);
    return 0;
}

const char *eng_matmul_isa(void) {
    return kernels()->name;
}

void eng__quantize_q8_1(const float *x, eng_block_q8_1 *out, int64_t n) {
    kernels()->quantize(x, out, n);
}

void eng__quantize_q16(const float *x, eng_block_q16 *out, int64_t n) {
    kernels()->quantize16(x, out, n);
}

/* ---- weight formats ------------------------------------------------------ */

int eng_weight_is_runtime(eng_dtype type) {
    return type == ENG_F32 || type == ENG_F16 || type == ENG_Q8_0 || type == ENG_Q4_0 ||
           type == ENG_Q4_1;
}

/* Q8_0 as ggml's quantize_row_q8_0_ref makes it: d = max|x| / 127 (stored as
 * fp16), q = round(x / d) half away from zero. */
static void quantize_row_q8_0(const float *x, eng_block_q8_0 *out, int64_t n) {
    for (int64_t b = 0; b < n / ENG_QK; b++) {
        const float *v = x + b * ENG_QK;
        float amax = 0.0f;
        for (int j = 0; j < ENG_QK; j++)
            amax = fmaxf(amax, fabsf(v[j]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        out[b].d = eng_f32_to_fp16(d);
        for (int j = 0; j < ENG_QK; j++)
            out[b].qs[j] = (int8_t)roundf(v[j] * id);
    }
}

static const char *type_name(eng_dtype type, char *buf, size_t len) {
    const char *name = eng_dtype_name(type);
    if (name)
        return name;
    snprintf(buf, len, "type code %d", (int)type);
    return buf;
}

static _Atomic bool packing = true;

void eng_matmul_set_packing(bool on) { packing = on; }
static bool pack_enabled(void) { return packing; }

/* The 32 codes of a Q4 / Q8_0 block in input order: Q4 unsigned 0..15 (low
 * nibbles hold inputs 0..15, high nibbles 16..31), Q8_0 the signed bytes. */
static void block_codes(eng_dtype type, const uint8_t *blk, uint8_t out[ENG_QK]) {
    if (type == ENG_Q8_0) {
        memcpy(out, ((const eng_block_q8_0 *)blk)->qs, ENG_QK);
        return;
    }
    const uint8_t *qs = type == ENG_Q4_1 ? ((const eng_block_q4_1 *)blk)->qs : ((const eng_block_q4_0 *)blk)->qs;
    for (int e = 0; e < ENG_QK / 2; e++) {
        out[e] = qs[e] & 0x0f;
        out[e + ENG_QK / 2] = qs[e] >> 4;
    }
}

int eng_weight_pack(eng_tensor *t, char *err, size_t errlen) {
    const size_t pbb = eng__pack_block_bytes(t->type);
    /* the batched kernels (panel16; the scalar set has none) read the copy */
    if (pbb == 0 || !kernels()->panel16[t->type] || !pack_enabled())
        return 0;
    const int64_t n_in = t->ne[0], n_out = t->ne[1], nb = n_in / ENG_QK;
    const int64_t n_panels = (n_out + ENG__PANEL_ROWS - 1) / ENG__PANEL_ROWS;
    const size_t row_bytes = eng_row_bytes(t->type, n_in), bb = eng_dtype_block_bytes(t->type);
    if (row_bytes == 0 || (uint64_t)n_panels * (uint64_t)nb > SIZE_MAX / pbb) {
        snprintf(err, errlen, "%s matrix of shape [%lld, %lld] cannot be packed", eng_dtype_name(t->type),
                 (long long)n_in, (long long)n_out);
        return -1;
    }
    /* large ones in huge pages where the kernel gives them: a batch step
     * streams every packed byte, and 4 KB pages cost a TLB miss per 4 KB */
    const size_t need = (size_t)n_panels * (size_t)nb * pbb, huge = (size_t)2 << 20;
    const size_t align = need >= huge ? huge : 64, bytes = (need + align - 1) & ~(align - 1);
    uint8_t *dst = aligned_alloc(align, bytes);
    if (dst && align == huge)
        madvise(dst, bytes, MADV_HUGEPAGE);
    if (!dst) {
        snprintf(err, errlen, "out of memory packing a %s matrix of shape [%lld, %lld]",
                 eng_dtype_name(t->type), (long long)n_in, (long long)n_out);
        return -1;
    }
    const bool q8 = t->type == ENG_Q8_0;
    const size_t codes = q8 ? ENG__PACK_Q8_CODES : ENG__PACK_Q4_CODES;
    uint8_t *o = dst;
    for (int64_t p = 0; p < n_panels; p++) {
        const uint8_t *row[ENG__PANEL_ROWS];
        for (int i = 0; i < ENG__PANEL_ROWS; i++) {
            const int64_t r = p * ENG__PANEL_ROWS + i < n_out ? p * ENG__PANEL_ROWS + i : n_out - 1;
            row[i] = (const uint8_t *)t->data + (size_t)r * row_bytes;
        }
        for (int64_t b = 0; b < nb; b++, o += pbb) {
            float *d = (float *)(o + codes), *mn = d + ENG__PANEL_ROWS;
            /* pairs of codes as 16-bit units: pair k of row i is c[i][k] */
            uint16_t c[ENG__PANEL_ROWS][ENG_QK / 2], out[ENG__PACK_Q8_CODES / 2];
            for (int i = 0; i < ENG__PANEL_ROWS; i++) {
                uint8_t q[ENG_QK];
                block_codes(t->type, row[i] + b * bb, q);
                memcpy(c[i], q, sizeof q);
            }
            for (int k = 0; k < ENG_QK / 2; k++)
                for (int r = 0; r < 8; r++) {
                    if (q8) {
                        out[16 * k + r] = c[r][k];
                        out[16 * k + 8 + r] = c[8 + r][k];
                    } else {  /* codes < 16: one shift moves both nibbles of the pair up */
                        out[8 * k + r] = (uint16_t)(c[r][k] | c[8 + r][k] << 4);
                    }
                }
            memcpy(o, out, codes);
            for (int i = 0; i < ENG__PANEL_ROWS; i++) {
                const uint8_t *blk = row[i] + b * bb;
                d[i] = eng_fp16_to_f32(((const eng_fp16_t *)blk)[0]);
                if (!q8)
                    mn[i] = t->type == ENG_Q4_1 ? eng_fp16_to_f32(((const eng_fp16_t *)blk)[1]) : -8.0f * d[i];
            }
        }
    }
    free(t->packed);
    t->packed = dst;
    return 0;
}

int eng_weight_prepare(eng_tensor *t, char *err, size_t errlen) {
    char tbuf[32];
    const char *tname = type_name(t->type, tbuf, sizeof tbuf);
    const int64_t n_in = t->ne[0], n_out = t->ne[1];
    if (n_in <= 0 || n_out <= 0 || !t->data) {
        snprintf(err, errlen, "%s matrix of shape [%lld, %lld]%s: expected a non-empty matrix",
                 tname, (long long)n_in, (long long)n_out, t->data ? "" : " without data");
        return -1;
    }
    const bool to_f32 = t->type == ENG_BF16;
    const bool to_q8_0 = t->type == ENG_Q4_K || t->type == ENG_Q6_K;
    if (!eng_weight_is_runtime(t->type) && !to_f32 && !to_q8_0) {
        snprintf(err, errlen, "weight type %s is not supported by the CPU kernels "
                 "(expected f32, f16, bf16, q8_0, q4_0, q4_1, q4_K or q6_K)", tname);
        return -1;
    }
    const size_t src_row = eng_row_bytes(t->type, n_in);
    if (src_row == 0) {
        snprintf(err, errlen, "%s matrix: row length %lld is not a multiple of the %lld-element "
                 "block", tname, (long long)n_in, (long long)eng_dtype_block_elems(t->type));
        return -1;
    }
    if (!to_f32 && !to_q8_0)
        return 0;

    const eng_dtype dst_type = to_f32 ? ENG_F32 : ENG_Q8_0;
    const size_t dst_row = eng_row_bytes(dst_type, n_in);
    if (dst_row == 0 || (uint64_t)n_out > SIZE_MAX / dst_row) {
        snprintf(err, errlen, "%s matrix of shape [%lld, %lld] is too large", tname,
                 (long long)n_in, (long long)n_out);
        return -1;
    }
    uint8_t *dst = malloc(dst_row * (size_t)n_out);
    float *tmp = to_q8_0 ? malloc((size_t)n_in * sizeof *tmp) : NULL;
    if (!dst || (to_q8_0 && !tmp)) {
        free(dst);
        free(tmp);
        snprintf(err, errlen, "converting a %s matrix of shape [%lld, %lld] to %s: out of memory",
                 tname, (long long)n_in, (long long)n_out, eng_dtype_name(dst_type));
        return -1;
    }
    const uint8_t *src = t->data;
    for (int64_t r = 0; r < n_out; r++) {
        float *row = to_f32 ? (float *)(dst + r * dst_row) : tmp;
        if (eng_dequantize_row(t->type, src + r * src_row, row, n_in) != 0) {
            free(dst);
            free(tmp);
            snprintf(err, errlen, "cannot decode weight type %s", tname);
            return -1;
        }
        if (to_q8_0)
            quantize_row_q8_0(tmp, (eng_block_q8_0 *)(dst + r * dst_row), n_in);
    }
    free(tmp);
    if (t->owned)
        free(t->data);
    t->type = dst_type;
    t->data = dst;
    t->owned = true;
    return 0;
}

void eng_weight_get_row(const eng_tensor *w, int64_t row, float *out) {
    const size_t rb = eng_row_bytes(w->type, w->ne[0]);
    if (rb == 0 || row < 0 || row >= w->ne[1] ||
        eng_dequantize_row(w->type, (const uint8_t *)w->data + row * rb, out, w->ne[0]) != 0) {
        fprintf(stderr, "%s:%d: eng_weight_get_row: row %lld of a %s matrix [%lld, %lld]\n",
                __FILE__, __LINE__, (long long)row, eng_dtype_name(w->type) ? eng_dtype_name(w->type)
                : "?", (long long)w->ne[0], (long long)w->ne[1]);
        abort();
    }
}

/* ---- activation scratch (per calling thread) ----------------------------- */

typedef struct {
    void *buf;
    size_t cap;
} scratch;

static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *p) {
    scratch *s = p;
    free(s->buf);
    free(s);
}

static void scratch_key_init(void) {
    if (pthread_key_create(&scratch_key, scratch_free) != 0)
        abort();
}

/* A 64-byte aligned buffer of at least `bytes`, valid until the calling
 * thread's next call. Aborts when memory is exhausted: activations are small
 * next to the weights, so this is not an input-caused failure. */
static void *scratch_get(size_t bytes) {
    pthread_once(&scratch_once, scratch_key_init);
    scratch *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scratch_key, s) != 0)
            abort();
    }
    if (s->cap < bytes) {
        free(s->buf);
        size_t cap = bytes + bytes / 2;
        cap = (cap + 63) & ~(size_t)63;
        s->buf = aligned_alloc(64, cap);
        if (!s->buf) {
            fprintf(stderr, "%s:%d: eng_matmul: out of memory (%zu bytes of scratch)\n",
                    __FILE__, __LINE__, cap);
            abort();
        }
        s->cap = cap;
    }
    return s->buf;
}

/* ---- the product --------------------------------------------------------- */

#define ROW_TILE 4      /* rows: chunk sizes are multiples of this */
#define TOKEN_BLOCK 128 /* tokens per task in a large batch (a multiple of 8) */
#define MIN_TASK_MACS 32768

typedef struct {
    eng__mm m;
    const eng__mm_kernels *k;
    const float *x;          /* (n_tok, n_in), for the quantization job */
    int n_tok;
    int n_grouped;           /* tokens [0, n_grouped) go through the group kernel */
    bool wide;               /* 16-bit activations (xr16, xg16) */
    int64_t n_out;
    int64_t chunk_rows;
    int tok_block, n_tok_blocks;
} mm_job;

static void quantize16_task(const mm_job *j, int task) {
    const int t0 = task * ENG__GROUP;
    const int t1 = t0 + ENG__GROUP < j->n_tok ? t0 + ENG__GROUP : j->n_tok;
    eng_block_q16 *xr = (eng_block_q16 *)j->m.xr16;
    for (int t = t0; t < t1; t++)
        j->k->quantize16(j->x + (int64_t)t * j->m.n_in, xr + (int64_t)t * j->m.nb, j->m.n_in);
}

static void quantize_task(void *p, int task, int worker) {
    const mm_job *j = p;
    if (j->wide) {
        quantize16_task(j, task);
        return;
    }
    const int64_t nb = j->m.nb;
    const int t0 = task * ENG__GROUP;
    const int t1 = t0 + ENG__GROUP < j->n_tok ? t0 + ENG__GROUP : j->n_tok;
    eng_block_q8_1 *xr = (eng_block_q8_1 *)j->m.xr;
    for (int t = t0; t < t1; t++)
        j->k->quantize(j->x + (int64_t)t * j->m.n_in, xr + (int64_t)t * nb, j->m.n_in);
    if (t0 >= j->n_grouped)
        return;
    /* a last, partial group is padded with zero tokens */
    eng__q8x8 *xg = (eng__q8x8 *)j->m.xg + (int64_t)task * nb;
    if (t1 - t0 < ENG__GROUP)
        memset(xg, 0, (size_t)nb * sizeof *xg);
    for (int64_t b = 0; b < nb; b++) {
        for (int t = 0; t < t1 - t0; t++) {
            const eng_block_q8_1 *src = xr + (int64_t)(t0 + t) * nb + b;
            xg[b].d[t] = src->d;
            xg[b].s[t] = src->s;
            for (int q = 0; q < ENG_QK / 4; q++)
                memcpy(&xg[b].qs[q * 4 * ENG__GROUP + t * 4], &src->qs[q * 4], 4);
        }
    }
}

static void matmul_task(void *p, int task, int worker) {
    const mm_job *j = p;
    const int rc = task / j->n_tok_blocks, tb = task % j->n_tok_blocks;
    const int64_t r0 = rc * j->chunk_rows;
    const int64_t r1 = r0 + j->chunk_rows < j->n_out ? r0 + j->chunk_rows : j->n_out;
    const int t0 = tb * j->tok_block;
    const int t1 = t0 + j->tok_block < j->n_tok ? t0 + j->tok_block : j->n_tok;
    const int tg = t1 < j->n_grouped ? t1 : j->n_grouped;
    if (j->wide) {
        /* the panel takes every token of a batch (no group layout) */
        if (tg > t0)
            j->k->panel16[j->m.type](&j->m, r0, r1, t0, t1);
        else
            j->k->rows16[j->m.type](&j->m, r0, r1, t0, t1);
        return;
    }
    if (tg > t0)
        j->k->groups[j->m.type](&j->m, r0, r1, t0 / ENG__GROUP, (tg + ENG__GROUP - 1) / ENG__GROUP);
    const int tr = t0 > j->n_grouped ? t0 : j->n_grouped;
    if (t1 > tr)
        j->k->rows[j->m.type](&j->m, r0, r1, tr, t1);
}

/* ---- quantized weights x f32 activations (matmul_act32.h) --------------- */

static _Atomic int act_mode = ENG_ACT_Q16;

void eng_matmul_set_activations(eng_act_mode mode) { act_mode = mode; }
eng_act_mode eng_matmul_activations(void) { return (eng_act_mode)act_mode; }

#define ACT32_TOKEN_BLOCK 64 /* tokens per task: their activations stay in L2 */

typedef struct {
    eng__act32 m;
    void (*rows)(const eng__act32 *, int64_t, int64_t, float *);
    int64_t n_out, chunk_rows;
    int n_tok_blocks;
} act32_job;

static void act32_task(void *p, int task, int worker) {
    const act32_job *j = p;
    const int rc = task / j->n_tok_blocks, tb = task % j->n_tok_blocks;
    const int64_t r0 = rc * j->chunk_rows;
    const int64_t r1 = r0 + j->chunk_rows < j->n_out ? r0 + j->chunk_rows : j->n_out;
    eng__act32 m = j->m;
    const int t0 = tb * ACT32_TOKEN_BLOCK;
    m.n_tok = j->m.n_tok - t0 < ACT32_TOKEN_BLOCK ? j->m.n_tok - t0 : ACT32_TOKEN_BLOCK;
    m.x += (int64_t)t0 * m.n_in;
    m.y += (int64_t)t0 * m.y_stride;
    j->rows(&m, r0, r1, scratch_get((size_t)ENG__ACT32_PANEL_ROWS * (size_t)m.n_in * sizeof(float)));
}

static void matmul_act32(eng_threadpool *tp, const eng_tensor *w, const float *x, int n_tok, float *y,
                         int64_t y_stride) {
    act32_job j = {
        .m = {.type = w->type, .w = w->data, .row_bytes = eng_row_bytes(w->type, w->ne[0]), .n_in = w->ne[0],
              .x = x, .n_tok = n_tok, .y = y, .y_stride = y_stride},
        .rows = kernels() == &kernels_scalar ? eng__act32_rows_scalar : eng__act32_rows_avx2,
        .n_out = w->ne[1],
        .n_tok_blocks = (n_tok + ACT32_TOKEN_BLOCK - 1) / ACT32_TOKEN_BLOCK,
    };
    const int n_threads = eng_threadpool_size(tp);
    int64_t n_chunks = n_threads == 1 ? 1 : (8 * n_threads + j.n_tok_blocks - 1) / j.n_tok_blocks;
    const int64_t max_chunks = (j.n_out * w->ne[0] * (n_tok < ACT32_TOKEN_BLOCK ? n_tok : ACT32_TOKEN_BLOCK)) / MIN_TASK_MACS;
    if (n_chunks > max_chunks)
        n_chunks = max_chunks > 0 ? max_chunks : 1;
    int64_t chunk = (j.n_out + n_chunks - 1) / n_chunks;
    chunk = (chunk + ENG__ACT32_PANEL_ROWS - 1) / ENG__ACT32_PANEL_ROWS * ENG__ACT32_PANEL_ROWS;
    j.chunk_rows = chunk;
    n_chunks = (j.n_out + chunk - 1) / chunk;
    eng_threadpool_run(tp, act32_task, &j, (int)(n_chunks * j.n_tok_blocks));
}

void eng_matmul(eng_threadpool *tp, const eng_tensor *w, const float *x, int n_tok, float *y,
                int64_t y_stride) {
    const eng__mm_kernels *k = kernels();
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    const size_t row_bytes = eng_row_bytes(w->type, n_in);
    if (!eng_weight_is_runtime(w->type) || row_bytes == 0 || n_tok < 0 || y_stride < n_out) {
        fprintf(stderr, "%s:%d: eng_matmul: unprepared weight (%s [%lld, %lld]) or bad shape "
                "(n_tok %d, y_stride %lld)\n", __FILE__, __LINE__,
                eng_dtype_name(w->type) ? eng_dtype_name(w->type) : "?", (long long)n_in,
                (long long)n_out, n_tok, (long long)y_stride);
        abort();
    }
    if (n_tok == 0 || n_out == 0)
        return;

    const bool quantized = eng_dtype_block_elems(w->type) == ENG_QK;
    const eng_act_mode mode = (eng_act_mode)act_mode;
    if (quantized && mode == ENG_ACT_F32) {
        matmul_act32(tp, w, x, n_tok, y, y_stride);
        return;
    }
    mm_job j = {
        .m = {.type = w->type, .w = w->data, .row_bytes = row_bytes, .n_in = n_in,
              .nb = n_in / ENG_QK, .n_tok = n_tok, .x = x, .y = y, .y_stride = y_stride},
        .k = k,
        .x = x,
        .n_tok = n_tok,
        .n_out = n_out,
        .wide = quantized && mode == ENG_ACT_Q16,
    };
    if (j.wide)
        j.m.wp = w->packed;
    if (quantized) {
        /* Full groups of 8 tokens, and a last partial one when it has 5 or
         * more tokens: a group kernel on 5 of 8 lanes still beats the row
         * kernel. */
        int n_groups = 0;
        if (j.wide) {
            if (k->panel16[w->type] && n_tok >= (w->packed ? ENG__PANEL_MIN_PACKED : ENG__PANEL_MIN))
                j.n_grouped = n_tok;
        } else if (k->groups[w->type]) {
            n_groups = n_tok / ENG__GROUP + (n_tok % ENG__GROUP >= 5);
            j.n_grouped = n_groups * ENG__GROUP < n_tok ? n_groups * ENG__GROUP : n_tok;
        }
        const size_t xr_bytes = (size_t)n_tok * (size_t)j.m.nb *
                                (j.wide ? sizeof(eng_block_q16) : sizeof(eng_block_q8_1));
        const size_t xg_bytes = (size_t)n_groups * (size_t)j.m.nb * sizeof(eng__q8x8);
        const size_t xr_pad = (xr_bytes + 63) & ~(size_t)63;
        uint8_t *buf = scratch_get(xr_pad + xg_bytes);
        if (j.wide) {
            j.m.xr16 = (const eng_block_q16 *)buf;
        } else {
            j.m.xr = (const eng_block_q8_1 *)buf;
            j.m.xg = (const eng__q8x8 *)(buf + xr_pad);
        }
        const int n_qtasks = (n_tok + ENG__GROUP - 1) / ENG__GROUP;
        /* One group of tokens is quantized faster than a job is handed out. */
        eng_threadpool_run(n_qtasks > 1 ? tp : NULL, quantize_task, &j, n_qtasks);
    }

    /* Tasks: chunks of rows x blocks of tokens, enough of them for dynamic
     * balancing (8 per thread) but none smaller than MIN_TASK_MACS. */
    const int n_threads = eng_threadpool_size(tp);
    j.tok_block = n_tok <= TOKEN_BLOCK ? n_tok : TOKEN_BLOCK;
    j.n_tok_blocks = (n_tok + j.tok_block - 1) / j.tok_block;
    int64_t n_chunks = n_threads == 1 ? 1 : (8 * n_threads + j.n_tok_blocks - 1) / j.n_tok_blocks;
    const int64_t max_chunks = n_out * n_in * j.tok_block / MIN_TASK_MACS;
    if (n_chunks > max_chunks)
        n_chunks = max_chunks > 0 ? max_chunks : 1;
    int64_t chunk = (n_out + n_chunks - 1) / n_chunks;
    const int row_tile = j.wide && j.n_grouped ? ENG__PANEL_ROWS : ROW_TILE;
    chunk = (chunk + row_tile - 1) / row_tile * row_tile;
    j.chunk_rows = chunk;
    n_chunks = (n_out + chunk - 1) / chunk;
    eng_threadpool_run(tp, matmul_task, &j, (int)(n_chunks * j.n_tok_blocks));
}
