"""KV codec quality and the calibration path, through the real binary and the
real SmolLM2 model: the int8 quality gate (first 2,048 tokens of
wikitext2-test.txt, windows of 512: int8 K+V within 1% of f16's perplexity),
`kvserve calibrate` files feeding pca codecs (a full-rank basis is lossless,
a damaged or missing file is refused with a message naming it), and
`kvserve bench --capacity` arithmetic."""
import json
import os
import shutil
import tempfile
import unittest

from kv import MODEL, SHARED, WIKITEXT, run

WIKITEXT_VALID = os.path.join(SHARED, "data", "text", "wikitext2-valid.txt")


def ppl(*kv, tokens=2048, ctx=512, extra=()):
    _, out, _ = run("ppl", "--model", MODEL, "--text", WIKITEXT, "--ctx", ctx, "--max-tokens", tokens, "--json",
                    *kv, *extra)
    return json.loads(out)


class QualityGate(unittest.TestCase):
    def test_int8_within_one_percent_of_f16(self):
        f16 = ppl("--kv", "f16")
        int8 = ppl("--kv", "int8")
        self.assertEqual(f16["tokens"], int8["tokens"])
        self.assertEqual(f16["tokens"], 4 * 511)          # 4 windows of 512, each scoring 511
        delta = (int8["ppl"] - f16["ppl"]) / f16["ppl"]
        self.assertLess(abs(delta), 0.01, "int8 %.4f vs f16 %.4f: %+.2f%%" % (int8["ppl"], f16["ppl"], 100 * delta))
        # bytes per token: 30 layers x 3 kv heads x (K, V) x 16-token blocks of
        # 64 x 16 int8 + 16 fp16 scales = 1056 bytes: 66 bytes per token and head
        self.assertEqual(f16["bytes_per_token"], 30 * 3 * 2 * 128)
        self.assertEqual(int8["bytes_per_token"], 30 * 3 * 2 * 66)
        self.assertAlmostEqual(int8["compression_ratio"], 128 / 66, places=3)

    def test_int4_keys_per_channel_beat_keys_per_token(self):
        """The measurement behind int4's default: keys quantized per channel
        (KIVI) lose less than keys quantized per token."""
        chan = ppl("--kv-k", "int4:channel", "--kv-v", "f16", tokens=1024)
        tok = ppl("--kv-k", "int4:token", "--kv-v", "f16", tokens=1024)
        self.assertLess(chan["ppl"], tok["ppl"])


class Calibration(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="kvserve-calib-")
        cls.calib = os.path.join(cls.dir, "smol.calib")
        _, _, err = run("calibrate", "--model", MODEL, "--text", WIKITEXT_VALID, "--rank", "64", "--tokens", "1024",
                        "--out", cls.calib)
        cls.progress = err

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def test_file_header(self):
        with open(self.calib, "rb") as f:
            head = f.read(100)
        self.assertEqual(head[:8], b"KVCCALIB")
        self.assertEqual(int.from_bytes(head[8:12], "little"), 1)                 # version
        dims = [int.from_bytes(head[i:i + 4], "little") for i in (12, 16, 20, 24)]
        self.assertEqual(dims, [30, 3, 64, 2])                                   # layers, kv heads, head_dim, sets
        self.assertEqual(int.from_bytes(head[28:36], "little"), 1024)            # tokens seen
        self.assertIn("fitting 60/60", self.progress)

    def test_full_rank_pca_is_lossless(self):
        """Rank 64 of 64 per head is a rotation: perplexity as f16, same bytes."""
        f16 = ppl("--kv", "f16", tokens=1024)
        pca = ppl("--kv", "lowrank:pca", "--calib", self.calib, tokens=1024)
        self.assertEqual(pca["bytes_per_token"], f16["bytes_per_token"])
        self.assertLess(abs(pca["ppl"] - f16["ppl"]) / f16["ppl"], 0.005, "%.4f vs %.4f" % (pca["ppl"], f16["ppl"]))

    def test_pca_beats_a_random_basis(self):
        pca = ppl("--kv-k", "f16", "--kv-v", "lowrank:r32:pca", "--calib", self.calib, tokens=1024)
        orth = ppl("--kv-k", "f16", "--kv-v", "lowrank:r32", tokens=1024)
        self.assertLess(pca["ppl"], orth["ppl"])
        self.assertEqual(pca["bytes_per_token"], orth["bytes_per_token"])

    def test_bad_files_are_refused(self):
        damaged = os.path.join(self.dir, "damaged.calib")
        with open(self.calib, "rb") as f, open(damaged, "wb") as g:
            g.write(f.read(5000))
        for path, needle in ((damaged, "truncated or corrupt"), (os.path.join(self.dir, "missing"), "No such file")):
            rc, _, err = run("ppl", "--model", MODEL, "--text", WIKITEXT, "--max-tokens", "64", "--kv", "lowrank:pca",
                             "--calib", path, check=False)
            self.assertNotEqual(rc, 0)
            self.assertIn(path, err)
            self.assertIn(needle, err)
        rc, _, err = run("ppl", "--model", MODEL, "--text", WIKITEXT, "--max-tokens", "64", "--kv", "latent:96:pca",
                         check=False)
        self.assertNotEqual(rc, 0)
        self.assertIn("needs a calibration file", err)

    def test_calibrate_flag_errors(self):
        rc, _, err = run("calibrate", "--model", MODEL, "--text", WIKITEXT, "--out", os.path.join(self.dir, "x"),
                         check=False)
        self.assertEqual(rc, 2)
        self.assertIn("--rank", err)
        rc, _, err = run("calibrate", "--model", MODEL, "--text", WIKITEXT, "--rank", "8", "--energy", "0.9",
                         "--out", os.path.join(self.dir, "x"), check=False)
        self.assertEqual(rc, 2)


class Capacity(unittest.TestCase):
    def test_capacity_arithmetic(self):
        _, out, _ = run("bench", "--capacity", "--model", MODEL, "--kv", "f16,int8,int4/hybrid:r32",
                        "--kv-memory", "64M", "--ctx", "1000", "--json")
        r = json.loads(out)
        rows = {(s["kv_k"], s["kv_v"]): s for s in r["settings"]}
        self.assertEqual(rows[("f16", "f16")]["bytes_per_token"], 23040)
        self.assertEqual(rows[("int8", "int8")]["bytes_per_token"], 11880)
        # int4 keys per channel: (64 x 16 codes / 2 + 64 x 4) / 16 = 48 B per head-token;
        # hybrid:r32 values: (32 x 16 + 16 x 2) / 16 = 34
        self.assertEqual(rows[("int4", "hybrid:r32")]["bytes_per_token"], 30 * 3 * (48 + 34))
        for s in r["settings"]:
            page = s["bytes_per_token"] * 16
            self.assertEqual(s["pages"], (64 << 20) // page)
            self.assertEqual(s["tokens"], s["pages"] * 16)
            self.assertEqual(s["sequences"], s["pages"] // 63)          # 1000 tokens: 63 pages each
            self.assertAlmostEqual(s["compression_ratio"], 23040 / s["bytes_per_token"], places=3)

    def test_unknown_codec_lists_valid_ones(self):
        rc, _, err = run("bench", "--capacity", "--model", MODEL, "--kv", "int3", check=False)
        self.assertNotEqual(rc, 0)
        self.assertIn("unknown codec; valid: f32, f16, int8, int4", err)


if __name__ == "__main__":
    unittest.main()
