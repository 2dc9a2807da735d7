"""Deployment profiles (deploy/profiles) against the real binary: each one
validates, each serves (GPU profiles with the CPU override the error message
names), broken profiles and flags are refused naming the field and the
file, and `kvserve profiles` lists what each sets."""
import json
import os
import re
import tempfile
import unittest

from daemon import Daemon, metric
from kv import run

PROFILES = ["laptop", "single-gpu", "multi-gpu", "low-latency", "long-context"]
GPU = {"single-gpu", "multi-gpu", "low-latency", "long-context"}
# small enough for this machine: applied after the profile, as flags
CPU_FIT = ["--kv-memory", "64M", "--n-ctx", "512", "--threads", "2", "--max-seqs", "8", "--host", "127.0.0.1"]


class Profiles(unittest.TestCase):
    def test_listing(self):
        _, out, _ = run("profiles")
        for name in PROFILES:
            self.assertRegex(out, r"(?m)^%s: " % re.escape(name))
        self.assertNotIn("INVALID", out)
        _, out, _ = run("profiles", "--fields")
        for field in ("--kv-k S", "--max-seqs N", "--kv-memory BYTES", "--request-timeout X", "--devices IDS"):
            self.assertIn(field, out)

    def test_each_validates(self):
        for name in PROFILES:
            _, out, _ = run("profiles", name)
            self.assertIn("kv_k", out)
            self.assertIn("max_batched_tokens", out)

    def test_gpu_profile_says_cpu_is_one_flag_away(self):
        rc, _, err = run("serve", "--profile", "single-gpu", check=False)
        self.assertEqual(rc, 2)
        self.assertIn("built without CUDA", err)
        self.assertIn("--backend cpu", err)

    def serve_profile(self, name):
        extra = ["--backend", "cpu"] if name in GPU else []
        d = Daemon("--profile", name, *CPU_FIT, *extra, base=False).start(wait=False)
        try:
            d.wait_ready(120)
            status, _, body = d.json("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "ignore_eos": True})
            self.assertEqual(status, 200)
            self.assertEqual(body["usage"]["completion_tokens"], 2)
            self.assertIn('profile="%s"' % name, d.metrics())
            self.assertEqual(d.stop(), 0)
        finally:
            d.close()

    def test_serve_laptop(self):
        self.serve_profile("laptop")

    def test_serve_single_gpu_on_cpu(self):
        self.serve_profile("single-gpu")

    def test_serve_multi_gpu_on_cpu(self):
        self.serve_profile("multi-gpu")

    def test_serve_low_latency_on_cpu(self):
        self.serve_profile("low-latency")

    def test_serve_long_context_on_cpu(self):
        self.serve_profile("long-context")

    def test_broken_profiles_name_field_and_file(self):
        cases = [({"max_seqs": "many"}, "field 'max_seqs'"), ({"kv_memory": "lots"}, "field 'kv_memory'"),
                 ({"backend": "gpu"}, "field 'backend'"), ({"max_seqz": 4}, "unknown field 'max_seqz'")]
        for content, words in cases:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(content, f)
            try:
                rc, _, err = run("serve", "--profile", f.name, check=False)
                self.assertEqual(rc, 2, content)
                self.assertIn(f.name, err)
                self.assertIn(words, err)
            finally:
                os.unlink(f.name)

    def test_bad_flags(self):
        rc, _, err = run("serve", "--profile", "laptop", "--max-seqs", "0", check=False)
        self.assertEqual(rc, 2)
        self.assertIn("--max-seqs: field 'max_seqs'", err)
        rc, _, err = run("serve", "--no-such-flag", "1", check=False)
        self.assertEqual(rc, 2)
        self.assertIn("--no-such-flag", err)
        rc, _, err = run("serve", "--profile", "nonexistent", check=False)
        self.assertEqual(rc, 2)
        self.assertIn("no profile named 'nonexistent'", err)

    def test_flags_override_profile(self):
        d = Daemon("--profile", "laptop", *CPU_FIT, "--kv-k", "f16", "--kv-v", "int8", "--served-model-name",
                   "smol", base=False).start()
        try:
            status, _, body = d.json("GET", "/v1/models")
            self.assertEqual(body["data"][0]["id"], "smol")
            m = d.metrics()
            self.assertIn('k_codec="f16"', m)
            self.assertIn('v_codec="int8"', m)
            self.assertEqual(d.stop(), 0)
        finally:
            d.close()
