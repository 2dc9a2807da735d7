/* tensor.c: element-type tables, half-precision conversions and the scalar
 * reference decoders of every weight format kvserve reads (engine/tensor.h).
 *
 * The decoders follow ggml's dequantize_row_* in ggml-quants.c operation for
 * operation (same products in the same order), so their output is bit-exact
 * with ggml and with gguf-py's numpy decoders; SIMD kernels are tested against
 * these. fp16 conversions are exact bit manipulations: round to nearest even,
 * subnormals kept, NaN payloads kept (as numpy does), so fp16 -> f32 -> fp16
 * is the identity on all 65536 bit patterns. */
#include "engine/tensor.h"

#include <stdlib.h>
#include <string.h>

_Static_assert(sizeof(eng_block_q4_0) == 18, "q4_0 block is 18 bytes");
_Static_assert(sizeof(eng_block_q4_1) == 20, "q4_1 block is 20 bytes");
_Static_assert(sizeof(eng_block_q8_0) == 34, "q8_0 block is 34 bytes");
_Static_assert(sizeof(eng_block_q8_1) == 40, "q8_1 block is 40 bytes");
_Static_assert(sizeof(eng_block_q4_k) == 144, "q4_K block is 144 bytes");
_Static_assert(sizeof(eng_block_q6_k) == 210, "q6_K block is 210 bytes");

typedef struct {
    const char *name;
    int64_t block_elems;
    size_t block_bytes;
} dtype_traits;

static const dtype_traits traits[ENG_DTYPE_COUNT] = {
    [ENG_F32]  = {"f32", 1, 4},
    [ENG_F16]  = {"f16", 1, 2},
    [ENG_BF16] = {"bf16", 1, 2},
    [ENG_Q4_0] = {"q4_0", ENG_QK, sizeof(eng_block_q4_0)},
    [ENG_Q4_1] = {"q4_1", ENG_QK, sizeof(eng_block_q4_1)},
    [ENG_Q8_0] = {"q8_0", ENG_QK, sizeof(eng_block_q8_0)},
    [ENG_Q8_1] = {"q8_1", ENG_QK, sizeof(eng_block_q8_1)},
    [ENG_Q4_K] = {"q4_K", ENG_QKK, sizeof(eng_block_q4_k)},
    [ENG_Q6_K] = {"q6_K", ENG_QKK, sizeof(eng_block_q6_k)},
};

static const dtype_traits *traits_of(eng_dtype type) {
    if ((unsigned)type >= ENG_DTYPE_COUNT || traits[type].name == NULL)
        return NULL;
    return &traits[type];
}

const char *eng_dtype_name(eng_dtype type) {
    const dtype_traits *t = traits_of(type);
    return t ? t->name : NULL;
}

int64_t eng_dtype_block_elems(eng_dtype type) {
    const dtype_traits *t = traits_of(type);
    return t ? t->block_elems : 0;
}

size_t eng_dtype_block_bytes(eng_dtype type) {
    const dtype_traits *t = traits_of(type);
    return t ? t->block_bytes : 0;
}

size_t eng_row_bytes(eng_dtype type, int64_t n) {
    const dtype_traits *t = traits_of(type);
    if (t == NULL || n < 0 || n % t->block_elems != 0)
        return 0;
    uint64_t blocks = (uint64_t)(n / t->block_elems);
    if (blocks > SIZE_MAX / t->block_bytes)
        return 0;
    return (size_t)blocks * t->block_bytes;
}

/* ---- half precision ------------------------------------------------------ */

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

float eng_fp16_to_f32(eng_fp16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0x1f)  /* Inf / NaN: payload kept */
        return f32_from_bits(sign | 0x7f800000u | (mant << 13));
    if (exp != 0)     /* normal: rebias 15 -> 127 */
        return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
    if (mant == 0)
        return f32_from_bits(sign);
    /* subnormal: mant * 2^-24, normalized into a float32 normal */
    int shift = 0;
    while ((mant & 0x400u) == 0) {
        mant <<= 1;
        shift++;
    }
    return f32_from_bits(sign | ((uint32_t)(113 - shift) << 23) | ((mant & 0x3ffu) << 13));
}

/* Shifts m right by s (1..31) rounding to nearest, ties to even. */
static uint32_t shift_round_even(uint32_t m, int s) {
    uint32_t q = m >> s;
    uint32_t rem = m & ((1u << s) - 1u);
    uint32_t half = 1u << (s - 1);
    if (rem > half || (rem == half && (q & 1u)))
        q++;
    return q;
}

eng_fp16_t eng_f32_to_fp16(float f) {
    uint32_t x = f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) {
        if (x == 0x7f800000u)
            return sign | 0x7c00u;
        /* NaN: keep the top payload bits; never let it collapse into Inf */
        uint16_t payload = (uint16_t)((x >> 13) & 0x3ffu);
        return sign | 0x7c00u | (payload ? payload : 1u);
    }
    if (x >= 0x47800000u)  /* >= 2^16: beyond the largest half even after rounding */
        return sign | 0x7c00u;
    uint32_t exp = x >> 23;
    uint32_t mant = (x & 0x7fffffu) | 0x800000u;
    if (exp < 113) {       /* below 2^-14: half subnormal (or zero) */
        if (exp < 102)     /* below 2^-25: rounds to zero */
            return sign;
        return sign | (uint16_t)shift_round_even(mant, (int)(126 - exp));
    }
    /* normal: a carry out of the mantissa bumps the exponent (up to Inf) */
    uint32_t h = ((exp - 112u) << 10) + shift_round_even(mant & 0x7fffffu, 13);
    return sign | (uint16_t)h;
}

float eng_bf16_to_f32(eng_bf16_t h) {
    return f32_from_bits((uint32_t)h << 16);
}

/* ---- row decoders (one per format, as in ggml-quants.c) ------------------ */

static void dequant_q4_0(const eng_block_q4_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = eng_fp16_to_f32(x[i].d);
        for (int j = 0; j < ENG_QK / 2; j++) {
            const int x0 = (x[i].qs[j] & 0x0f) - 8;
            const int x1 = (x[i].qs[j] >> 4) - 8;
            y[i * ENG_QK + j] = (float)x0 * d;
            y[i * ENG_QK + j + ENG_QK / 2] = (float)x1 * d;
        }
    }
}

static void dequant_q4_1(const eng_block_q4_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = eng_fp16_to_f32(x[i].d);
        const float m = eng_fp16_to_f32(x[i].m);
        for (int j = 0; j < ENG_QK / 2; j++) {
            const int x0 = x[i].qs[j] & 0x0f;
            const int x1 = x[i].qs[j] >> 4;
            y[i * ENG_QK + j] = (float)x0 * d + m;
            y[i * ENG_QK + j + ENG_QK / 2] = (float)x1 * d + m;
        }
    }
}

static void dequant_q8_0(const eng_block_q8_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = eng_fp16_to_f32(x[i].d);
        for (int j = 0; j < ENG_QK; j++)
            y[i * ENG_QK + j] = (float)x[i].qs[j] * d;
    }
}

static void dequant_q8_1(const eng_block_q8_1 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++)
        for (int j = 0; j < ENG_QK; j++)
            y[i * ENG_QK + j] = (float)x[i].qs[j] * x[i].d;
}

/* The j-th (0..7) 6-bit scale and min of a Q4_K super-block: the first four
 * sit in the low 6 bits of bytes 0..3 (scales) and 4..7 (mins); the last four
 * take their low 4 bits from bytes 8..11 and their high 2 bits from the top
 * bits of bytes 0..7. */
static void q4_k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *mn = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void dequant_q4_k(const eng_block_q4_k *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = eng_fp16_to_f32(x[i].d);
        const float dmin = eng_fp16_to_f32(x[i].dmin);
        const uint8_t *q = x[i].qs;
        int is = 0;
        /* 4 groups of 64: low nibbles of 32 bytes, then their high nibbles */
        for (int j = 0; j < ENG_QKK; j += 64) {
            uint8_t sc, mn;
            q4_k_scale_min(is + 0, x[i].scales, &sc, &mn);
            const float d1 = d * sc, m1 = dmin * mn;
            q4_k_scale_min(is + 1, x[i].scales, &sc, &mn);
            const float d2 = d * sc, m2 = dmin * mn;
            for (int l = 0; l < 32; l++)
                *y++ = d1 * (float)(q[l] & 0x0f) - m1;
            for (int l = 0; l < 32; l++)
                *y++ = d2 * (float)(q[l] >> 4) - m2;
            q += 32;
            is += 2;
        }
    }
}

static void dequant_q6_k(const eng_block_q6_k *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = eng_fp16_to_f32(x[i].d);
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        /* 2 halves of 128: 64 ql bytes (low nibble, high nibble), 32 qh bytes
         * (four 2-bit fields), 8 scales of 16 elements each */
        for (int n = 0; n < ENG_QKK; n += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int)((ql[l + 0] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * (float)q1;
                y[l + 32] = d * sc[is + 2] * (float)q2;
                y[l + 64] = d * sc[is + 4] * (float)q3;
                y[l + 96] = d * sc[is + 6] * (float)q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    }
}

int eng_dequantize_row(eng_dtype type, const void *src, float *dst, int64_t n) {
    const dtype_traits *t = traits_of(type);
    if (t == NULL || n < 0 || n % t->block_elems != 0)
        return -1;
    const int64_t nb = n / t->block_elems;
    switch (type) {
    case ENG_F32:
        memmove(dst, src, (size_t)n * sizeof(float));
        return 0;
    case ENG_F16: {
        const eng_fp16_t *h = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = eng_fp16_to_f32(h[i]);
        return 0;
    }
    case ENG_BF16: {
        const eng_bf16_t *h = src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = eng_bf16_to_f32(h[i]);
        return 0;
    }
    case ENG_Q4_0: dequant_q4_0(src, dst, nb); return 0;
    case ENG_Q4_1: dequant_q4_1(src, dst, nb); return 0;
    case ENG_Q8_0: dequant_q8_0(src, dst, nb); return 0;
    case ENG_Q8_1: dequant_q8_1(src, dst, nb); return 0;
    case ENG_Q4_K: dequant_q4_k(src, dst, nb); return 0;
    case ENG_Q6_K: dequant_q6_k(src, dst, nb); return 0;
    default:
        return -1;
    }
}

void eng_tensor_free(eng_tensor *t) {
    if (t == NULL)
        return;
    if (t->owned)
        free(t->data);
    free(t->packed);
    memset(t, 0, sizeof *t);
}
