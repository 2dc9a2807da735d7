"""Runs every end-to-end test (tests/e2e/test_*.py) against the real binary
($KVSERVE_BIN) and the default model ($KVSERVE_MODEL), and ends with one
"e2e: N passed, N failed, N skipped" line. Exit status 0 only if none failed.
Usage: python3 tests/e2e/run.py [pattern]"""
import os
import sys
import unittest

here = os.path.dirname(os.path.abspath(__file__))
os.chdir(os.path.dirname(os.path.dirname(here)))
pattern = sys.argv[1] if len(sys.argv) > 1 else "test_*.py"
suite = unittest.defaultTestLoader.discover(here, pattern=pattern, top_level_dir=here)
res = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
failed = len(res.failures) + len(res.errors) + len(res.unexpectedSuccesses)
skipped = len(res.skipped)
passed = res.testsRun - failed - skipped
print("e2e: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
sys.exit(0 if failed == 0 and res.testsRun > 0 else 1)
