#!/usr/bin/env python3
"""gen_cache_fixtures.py: reference vectors for tests/cache/test_codec.c, computed
with numpy (an independent implementation of IEEE half conversion).

Writes tests/fixtures/cache/codec_ref.bin, little-endian, in this order:
  u32 n_f2h; f32 in[n_f2h]; u16 half[n_f2h]     numpy float32 -> float16 (round to nearest even)
  f32 h2f[65536]                                 numpy float16 -> float32 for every bit pattern
  u32 n_vec, u32 dim; f32 x[n_vec][dim]; f32 dq[n_vec][dim]
      int8 codec reference: scale = the smallest f16 >= max|x| / 127 (at most 65504),
      q = clip(rint(x / scale), -127, 127), dq = q * scale  (scale as f32; 0 when max|x| is 0)
  u32 n4, u32 dim4, u32 block4; f32 x4[n4][dim4]; f32 dq_token[n4][dim4]; f32 dq_channel[n4][dim4];
  f32 dq_token64[n4][dim4]
      int4 references (asymmetric 4-bit, float32 arithmetic): for a range [lo, hi],
      min = the largest f16 <= lo, scale = the smallest f16 >= (hi - min) / 15,
      code = clip(rint((x - min) / scale), 0, 15) (0 when scale is 0), dq = min + scale * code.
      dq_token: ranges per token over groups of 32 numbers (the last group shorter);
      dq_token64: the same with groups of 64 (here the whole vector);
      dq_channel: ranges per number index over each block of block4 consecutive tokens.
Run: python3 tools/gen_cache_fixtures.py   (numpy only; deterministic)
"""
import os
import struct

import numpy as np

rng = np.random.default_rng(20240601)
out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "cache", "codec_ref.bin")

# f32 -> f16: edges, exact ties at several exponents, random bit patterns and magnitudes.
edges = [0.0, -0.0, 1.0, -1.0, 65504.0, 65519.996, 65520.0, -65520.0, 1e6, np.inf, -np.inf,
         2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0000001, 2.0**-26, 3 * 2.0**-26, 5.960464477539063e-08,
         6.097555160522461e-05, 6.103515625e-05, 1.401298464324817e-45, 3.4028234663852886e38]
ties = []
for e in range(-24, 16):
    for m in range(0, 1024, 37):
        base = (1.0 + m / 1024.0) * 2.0**e if e >= -14 else m / 1024.0 * 2.0**-14
        step = 2.0**(e - 10) if e >= -14 else 2.0**-24
        ties += [base + step / 2, -(base + step / 2), base + step / 2 * 1.0001, base + step / 2 * 0.9999]
bits = rng.integers(0, 2**32, size=12000, dtype=np.uint64).astype(np.uint32)
rand_bits = bits.view(np.float32)
rand_bits = rand_bits[~np.isnan(rand_bits)]
mags = (rng.standard_normal(4000) * np.exp2(rng.integers(-26, 17, size=4000))).astype(np.float32)
f2h_in = np.concatenate([np.array(edges + ties, dtype=np.float32), rand_bits, mags]).astype(np.float32)
with np.errstate(over="ignore"):
    f2h_out = f2h_in.astype(np.float16).view(np.uint16)

h2f = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

n_vec, dim = 64, 64
x = rng.standard_normal((n_vec, dim)).astype(np.float32) * np.exp2(rng.integers(-12, 12, size=(n_vec, 1))).astype(np.float32)
x[0] = 0.0
x[1, :] = 0.0
x[1, 7] = -3.5
x[2] = np.linspace(-1, 1, dim, dtype=np.float32)
amax = np.max(np.abs(x), axis=1).astype(np.float32)
t = (amax / np.float32(127.0)).astype(np.float32)
s16 = t.astype(np.float16)
s16 = np.where(s16.astype(np.float32) < t, np.nextafter(s16, np.float16(np.inf)), s16)
scale = np.minimum(s16, np.float16(65504)).astype(np.float32)
safe = np.where(scale > 0, scale, np.float32(1.0))
q = np.where(scale[:, None] > 0, np.clip(np.rint(x / safe[:, None]), -127, 127), 0).astype(np.float32)
dq = (q * scale[:, None]).astype(np.float32)



def half_down(v):
    """The largest float16 <= v (float32 array), as float16."""
    h = v.astype(np.float16)
    return np.where(h.astype(np.float32) > v, np.nextafter(h, np.float16(-np.inf)), h)


def u4_quant(x, lo, hi):
    """int4 codes of x for ranges [lo, hi] (broadcast), dequantized, float32."""
    lo = np.clip(lo, -65504, 65504).astype(np.float32)
    hi = np.clip(np.maximum(hi, lo), -65504, 65504).astype(np.float32)
    m = half_down(lo).astype(np.float32)
    t = ((hi - m) / np.float32(15)).astype(np.float32)
    s = (-half_down(-t)).astype(np.float32)
    s = np.minimum(s, np.float32(65504))
    safe = np.where(s > 0, s, np.float32(1))
    code = np.where(s > 0, np.clip(np.rint((x - m) / safe), 0, 15), 0).astype(np.float32)
    return (m + s * code).astype(np.float32)


n4, dim4, block4 = 64, 40, 16
x4 = rng.standard_normal((n4, dim4)).astype(np.float32)
x4[:, 3] = x4[:, 3] * 20 + 5            # an outlier channel with an offset, as keys have
x4[:, 17] += 12
x4[5] = 0.0
x4[6, :] = 2.5                          # a constant token: scale 0 in its groups
x4 *= np.exp2(rng.integers(-3, 4, size=(n4, 1))).astype(np.float32)
def per_token(gs):
    dq = np.empty_like(x4)
    for g0 in range(0, dim4, gs):
        blk = x4[:, g0:g0 + gs]
        dq[:, g0:g0 + gs] = u4_quant(blk, blk.min(axis=1, keepdims=True), blk.max(axis=1, keepdims=True))
    return dq


dq_token, dq_token64 = per_token(32), per_token(64)
dq_channel = np.empty_like(x4)
for t0 in range(0, n4, block4):
    blk = x4[t0:t0 + block4]
    dq_channel[t0:t0 + block4] = u4_quant(blk, blk.min(axis=0, keepdims=True), blk.max(axis=0, keepdims=True))

with open(out, "wb") as f:
    f.write(struct.pack("<I", len(f2h_in)))
    f.write(f2h_in.astype("<f4").tobytes())
    f.write(f2h_out.astype("<u2").tobytes())
    f.write(h2f.astype("<f4").tobytes())
    f.write(struct.pack("<II", n_vec, dim))
    f.write(x.astype("<f4").tobytes())
    f.write(dq.astype("<f4").tobytes())
    f.write(struct.pack("<III", n4, dim4, block4))
    f.write(x4.astype("<f4").tobytes())
    f.write(dq_token.astype("<f4").tobytes())
    f.write(dq_channel.astype("<f4").tobytes())
    f.write(dq_token64.astype("<f4").tobytes())
print(out, os.path.getsize(out), "bytes;", len(f2h_in), "f32->f16 cases")
