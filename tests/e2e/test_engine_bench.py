"""`kvserve bench --concurrency N`: the engine benchmark through the
continuous-batching scheduler, on the real SmolLM2 model. Checks the JSON
contract, the page accounting against the arithmetic of the cache layout, that
a KV arena too small for every request in flight preempts and still finishes,
and clear errors on bad flags."""
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

from kv import FIXTURES, MODEL, ROOT, run


def bench(*args):
    _, out, err = run("bench", "--model", MODEL, "--json", *map(str, args), timeout=600)
    return json.loads(out), err


class EngineBench(unittest.TestCase):
    def test_json_contract_and_pages(self):
        r, err = bench("--concurrency", 4, "--prompt-len", 40, "--gen-len", 8, "--kv", "f16")
        for key in ("output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "itl_p50_s", "itl_p90_s",
                    "itl_p99_s", "peak_pages_used", "pages_total", "preemptions"):
            self.assertIn(key, r)
        self.assertGreater(r["output_tokens_per_s"], 0)
        self.assertLessEqual(r["ttft_p50_s"], r["ttft_p99_s"])
        self.assertLessEqual(r["itl_p50_s"], r["itl_p99_s"])
        # SmolLM2-135M: 30 layers x 3 kv heads x 64 dims x (K + V) x 2 bytes
        self.assertEqual(r["bytes_per_token"], 30 * 3 * 64 * 2 * 2)
        # 4 sequences of 48 positions in 16-token pages, all in flight at once
        self.assertEqual(r["peak_pages_used"], 4 * math.ceil(48 / 16))
        self.assertLessEqual(r["peak_pages_used"], r["pages_total"])
        self.assertEqual(r["preemptions"], 0)
        self.assertIn("KV cache: ", err)
        self.assertIn("max concurrency", err)

    def test_short_requests(self):
        # a context of prompt + 2 tokens: the warm-up request must fit in it too
        r, _ = bench("--concurrency", 2, "--prompt-len", 4, "--gen-len", 2, "--kv", "int8")
        self.assertEqual(r["requests"], 2)
        self.assertEqual(r["gen_len"], 2)
        self.assertGreater(r["output_tokens_per_s"], 0)

    def test_small_arena_preempts_and_finishes(self):
        # room for about 2 of the 6 sequences in flight: preemption, then recompute
        page = 16 * 30 * 3 * 64 * 2 * 2
        r, _ = bench("--concurrency", 6, "--prompt-len", 24, "--gen-len", 40, "--kv", "f16",
                     "--kv-memory", 9 * page)
        self.assertEqual(r["pages_total"], 9)
        self.assertGreater(r["preemptions"], 0)
        self.assertLessEqual(r["peak_pages_used"], 9)
        self.assertGreater(r["output_tokens_per_s"], 0)

    def test_random_llama_shape(self):
        # tools/device/make_llama_shape.py (the GPU runs' Llama-8B-shaped model,
        # made where it runs): its tiny preset has the same head geometry (head
        # dim 128) in 2 layers of 1 kv head, and must load and run as written
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "device", "make_llama_shape.py"), d,
                            os.path.join(FIXTURES, "models", "llama"), "--preset", "tiny"],
                           check=True, capture_output=True, timeout=300)
            _, out, _ = run("bench", "--model", d, "--json", "--concurrency", 3, "--prompt-len", 40, "--gen-len", 8,
                            "--kv", "int8", timeout=300)
        r = json.loads(out)
        self.assertEqual(r["requests"], 3)
        self.assertEqual(r["gen_len"], 8)
        # 2 layers x 1 kv head x (128 codes + 2 bytes of scale) x (K + V)
        self.assertEqual(r["bytes_per_token"], 2 * 1 * (128 + 2) * 2)
        self.assertGreater(r["output_tokens_per_s"], 0)

    def test_bad_flags(self):
        # each bad number is named with its value, and only it
        for args, flag, value in ((("--concurrency", 0), "--concurrency", "0"),
                                  (("--concurrency", 4, "--prompt-len", -5), "--prompt-len", "-5"),
                                  (("--concurrency", 4, "--requests", -1), "--requests", "-1"),
                                  (("--concurrency", 2, "--block-size", 0), "--block-size", "0"),
                                  (("--gen-len", 0), "--gen-len", "0"),
                                  (("--capacity", "--ctx", 0), "--ctx", "0")):
            rc, _, err = run("bench", "--model", MODEL, *args, check=False)
            self.assertEqual(rc, 2, args)
            self.assertIn("%s %s: must be >= 1" % (flag, value), err)
            self.assertNotIn("--model", err)
        rc, _, err = run("bench", "--concurrency", 2, check=False)
        self.assertEqual(rc, 2)
        self.assertIn("--model is required", err)
        rc, _, err = run("bench", "--model", MODEL, "--concurrency", 2, "--kv", "nope", "--prompt-len", 8,
                         "--gen-len", 2, check=False)
        self.assertNotEqual(rc, 0)
        self.assertIn("nope", err)


if __name__ == "__main__":
    unittest.main()
