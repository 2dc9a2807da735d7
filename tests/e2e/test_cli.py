"""The offline subcommands on the real SmolLM2 model: generation, perplexity,
tokenization against transformers' figures, and clear errors on bad input."""
import json
import os
import tempfile
import unittest

from kv import MODEL, WIKITEXT, run, smollm2_reference

REF = smollm2_reference()


class Generate(unittest.TestCase):
    def test_chat_greedy_answers_paris(self):
        _, out, _ = run("generate", "--model", MODEL, "--chat", "--temperature", "0", "--max-tokens", "40",
                        "--prompt", "What is the capital of France?")
        self.assertIn("Paris", out)
        # transformers' greedy answer (float32, same GGUF), without the end token
        self.assertEqual(out.strip(), REF["chat_greedy_text"].replace("<|im_end|>", "").strip())

    def test_same_seed_same_text(self):
        args = ["generate", "--model", MODEL, "--prompt", "Once upon a time", "--max-tokens", "24",
                "--temperature", "0.9", "--top-p", "0.95"]
        a = run(*args, "--seed", "7")[1]
        b = run(*args, "--seed", "7")[1]
        c = run(*args, "--seed", "8")[1]
        self.assertEqual(a, b)
        self.assertNotEqual(a, c)

    def test_max_tokens_bounds_output(self):
        _, out, err = run("generate", "--model", MODEL, "--prompt", "1, 2, 3,", "--max-tokens", "5",
                          "--temperature", "0", "--ignore-eos")
        self.assertIn("generated 5 tokens", err)


class Perplexity(unittest.TestCase):
    def test_ppl_matches_transformers(self):
        _, out, _ = run("ppl", "--model", MODEL, "--text", WIKITEXT, "--ctx", "1024", "--max-tokens", "4096",
                        "--json")
        r = json.loads(out)
        ref = REF["ppl_ctx1024_n4096"]  # 21.1930 from transformers 5.17 / torch 2.11, float32
        self.assertEqual(r["ctx"], 1024)
        self.assertEqual(r["tokens"], 4 * 1023)
        self.assertLess(abs(r["ppl"] - ref) / ref, 0.005, "kvserve %.4f vs transformers %.4f" % (r["ppl"], ref))


class Absorb(unittest.TestCase):
    """--absorb folds the value projection into a low-rank codec's basis, so
    the coefficients come straight out of the projection instead of being
    projected from the values: the same perplexity up to float rounding, and
    the run says what it absorbed."""

    def ppl(self, *extra):
        _, out, _ = run("ppl", "--model", MODEL, "--text", WIKITEXT, "--ctx", "256", "--max-tokens", "1024",
                        "--kv-v", "lowrank:r32", "--json", *extra)
        return json.loads(out)

    def test_absorbed_values_same_perplexity(self):
        plain, absorbed = self.ppl(), self.ppl("--absorb")
        self.assertEqual(plain["absorbed"], "none")
        self.assertEqual(absorbed["absorbed"], "V")
        self.assertLess(abs(absorbed["ppl"] - plain["ppl"]) / plain["ppl"], 1e-3,
                        "absorbed %r vs plain %r" % (absorbed["ppl"], plain["ppl"]))


class KernelSets(unittest.TestCase):
    """KVSERVE_ISA picks the CPU kernel set; the sets give the same bits (the
    batched 16-bit kernels of every set keep one order of float work), so a
    perplexity run whose prefill chunks go through the batched kernels prints
    the same figure with AVX2 as with AVX-512 VNNI, where this CPU has it."""

    def ppl(self, isa):
        rc, out, err = run("ppl", "--model", MODEL, "--text", WIKITEXT, "--ctx", "256", "--max-tokens", "1024",
                           "--json", env={"KVSERVE_ISA": isa}, check=False)
        return rc, out, err

    def test_avx512_matches_avx2(self):
        rc, out512, err = self.ppl("avx512")
        if rc == 2 and "KVSERVE_ISA" in err:
            self.skipTest("this CPU has no AVX-512 VNNI")
        self.assertEqual(rc, 0, err)
        rc, out2, err = self.ppl("avx2")
        self.assertEqual(rc, 0, err)
        a, b = json.loads(out512), json.loads(out2)
        self.assertEqual(a["tokens"], b["tokens"])
        self.assertEqual(a["ppl"], b["ppl"], "avx512 %r vs avx2 %r" % (a["ppl"], b["ppl"]))

    def test_bad_isa_named(self):
        rc, _, err = run("tokenize", "--model", MODEL, "--text", "x", env={"KVSERVE_ISA": "avx9000"}, check=False)
        self.assertEqual(rc, 2)
        self.assertIn("KVSERVE_ISA='avx9000'", err)


class Tokenize(unittest.TestCase):
    def test_wikitext_ids_match_transformers(self):
        _, out, _ = run("tokenize", "--model", MODEL, "--file", WIKITEXT)
        ids = [int(x) for x in out.split()]
        self.assertEqual(len(ids), REF["text_tokens"])
        self.assertEqual(ids[:4096], REF["ids_first_4096"])

    def test_chat_prompt_special_tokens(self):
        _, out, _ = run("tokenize", "--model", MODEL, "--special", "--text", REF["chat_prompt"])
        self.assertEqual([int(x) for x in out.split()], REF["chat_prompt_ids"])


class Errors(unittest.TestCase):
    def test_help_on_every_subcommand(self):
        for cmd in ("generate", "tokenize", "ppl", "bench"):
            rc, out, _ = run(cmd, "--help", check=False)
            self.assertEqual(rc, 0, cmd)
            self.assertIn("usage: kvserve " + cmd, out)

    def test_bad_flag_names_itself(self):
        for cmd in ("generate", "tokenize", "ppl", "bench"):
            rc, _, err = run(cmd, "--model", MODEL, "--bogus-flag", "1", check=False)
            self.assertEqual(rc, 2, cmd)
            self.assertIn("--bogus-flag", err)

    def test_bad_value_names_flag(self):
        rc, _, err = run("generate", "--model", MODEL, "--prompt", "x", "--max-tokens", "many", check=False)
        self.assertEqual(rc, 2)
        self.assertIn("--max-tokens", err)
        self.assertIn("many", err)

    def test_out_of_range_value_names_flag(self):
        for args, msg in ((("ppl", "--text", WIKITEXT, "--ctx", 1), "ppl: --ctx 1: must be >= 2"),
                          (("ppl", "--text", WIKITEXT, "--max-tokens", -1), "ppl: --max-tokens -1: must be >= 0"),
                          (("generate", "--prompt", "x", "--max-tokens", -3), "generate: --max-tokens -3: must be >= 0"),
                          (("calibrate", "--text", WIKITEXT, "--out", os.devnull, "--rank", 4, "--tokens", 1),
                           "calibrate: --tokens 1: must be >= 2")):
            rc, _, err = run(args[0], "--model", MODEL, *args[1:], check=False)
            self.assertEqual(rc, 2, args)
            self.assertIn(msg, err)

    def test_backend_named_in_errors(self):
        # this build has no CUDA (make test builds the CPU binary): the cuda
        # backend is refused with what to do, an unknown one by its name
        for cmd, extra in (("generate", ("--prompt", "x")), ("ppl", ("--text", WIKITEXT, "--max-tokens", "64")),
                           ("bench", ("--prompt-len", "8", "--gen-len", "2", "--repeat", "1")),
                           ("bench", ("--concurrency", "2", "--prompt-len", "8", "--gen-len", "2"))):
            rc, _, err = run(cmd, "--model", MODEL, *extra, "--backend", "cuda", check=False)
            self.assertEqual(rc, 1, (cmd, err))
            self.assertIn("built without CUDA", err)
            self.assertIn("--backend cpu", err)
        rc, _, err = run("generate", "--model", MODEL, "--prompt", "x", "--backend", "tpu", check=False)
        self.assertEqual(rc, 1)
        self.assertIn('backend "tpu": must be cpu or cuda', err)

    def test_unknown_command(self):
        rc, _, err = run("frobnicate", check=False)
        self.assertEqual(rc, 2)
        self.assertIn("frobnicate", err)

    def test_missing_and_corrupt_model(self):
        rc, _, err = run("tokenize", "--model", "/nonexistent/model.gguf", "--text", "x", check=False)
        self.assertEqual(rc, 1)
        self.assertIn("/nonexistent/model.gguf", err)
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "bad.gguf")
            with open(MODEL, "rb") as f:
                head = f.read(4096)
            with open(bad, "wb") as f:
                f.write(head)  # a truncated copy of the real model
            rc, _, err = run("generate", "--model", bad, "--prompt", "x", check=False)
            self.assertEqual(rc, 1)
            self.assertIn("bad.gguf", err)


if __name__ == "__main__":
    unittest.main()
