"""Shared helpers for the end-to-end tests: where the binary, the model and the
shared data are, and running the binary with a time limit."""
import json
import os
import subprocess

ROOT = os.getcwd()
BIN = os.environ.get("KVSERVE_BIN", os.path.join(ROOT, "kvserve"))
MODEL = os.environ.get("KVSERVE_MODEL", os.path.expanduser("~/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf"))
SHARED = os.environ.get("KVSERVE_SHARED", os.path.join(ROOT, "..", "shared"))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
WIKITEXT = os.path.join(SHARED, "data", "text", "wikitext2-test.txt")


def run(*args, timeout=600, check=True, input=None, env=None):
    """Runs kvserve with args (env: variables added to the environment);
    returns (returncode, stdout, stderr)."""
    p = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True, timeout=timeout, input=input,
                       env=dict(os.environ, **env) if env else None)
    if check and p.returncode != 0:
        raise AssertionError("kvserve %s exited %d:\n%s" % (" ".join(map(str, args)), p.returncode, p.stderr[-2000:]))
    return p.returncode, p.stdout, p.stderr


def smollm2_reference():
    with open(os.path.join(FIXTURES, "smollm2", "reference.json")) as f:
        return json.load(f)
