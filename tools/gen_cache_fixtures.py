#!/usr/bin/env python3
"""gen_cache_fixtures.py: reference vectors for tests/cache/test_codec.c, computed
with numpy (an independent implementation of IEEE half conversion).

Writes tests/fixtures/cache/codec_ref.bin, little-endian, in this order:
  u32 n_f2h; f32 in[n_f2h]; u16 half[n_f2h]     numpy float32 -> float16 (round to nearest even)
  f32 h2f[65536]                                 numpy float16 -> float32 for every bit pattern
  u32 n_vec, u32 dim; f32 x[n_vec][dim]; f32 dq[n_vec][dim]
      int8 codec reference: scale = the smallest f16 >= max|x| / 127 (at most 65504),
      q = clip(rint(x / scale), -127, 127), dq = q * scale  (scale as f32; 0 when max|x| is 0)
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

with open(out, "wb") as f:
    f.write(struct.pack("<I", len(f2h_in)))
    f.write(f2h_in.astype("<f4").tobytes())
    f.write(f2h_out.astype("<u2").tobytes())
    f.write(h2f.astype("<f4").tobytes())
    f.write(struct.pack("<II", n_vec, dim))
    f.write(x.astype("<f4").tobytes())
    f.write(dq.astype("<f4").tobytes())
print(out, os.path.getsize(out), "bytes;", len(f2h_in), "f32->f16 cases")
