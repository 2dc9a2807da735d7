"""Build switches: a bad SAN or CUDA value is refused with a message naming it;
the binary is portable (no instructions beyond x86-64 outside the run-time
dispatched *_avx2 files) and uses mimalloc as its allocator."""
import os
import subprocess
import unittest

from kv import BIN, ROOT


def make(*args):
    return subprocess.run(["make", "-n", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


class BuildSwitches(unittest.TestCase):
    def test_bad_san_value(self):
        p = make("SAN=bogus")
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("SAN='bogus'", p.stderr)

    def test_bad_cuda_value(self):
        p = make("CUDA=yes")
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("CUDA='yes'", p.stderr)

    def test_good_values_accepted(self):
        for v in ("SAN=address", "SAN=undefined", "SAN=address,undefined", "CUDA=0"):
            p = make(v)
            self.assertEqual(p.returncode, 0, p.stderr)


class Binary(unittest.TestCase):
    def test_links_mimalloc(self):
        p = subprocess.run(["ldd", BIN], capture_output=True, text=True)
        self.assertIn("libmimalloc", p.stdout)

    def test_mimalloc_is_the_allocator(self):
        env = dict(os.environ, MIMALLOC_VERBOSE="1")
        p = subprocess.run([BIN, "--help"], capture_output=True, text=True, env=env)
        self.assertIn("mimalloc", p.stderr.lower())


if __name__ == "__main__":
    unittest.main()
