"""records_check.py: kvserve serve on the GPU with whole logit rows and with
records (engine/cuda/cands.cu): the same requests, one at a time (the same
batches, so the same logits), must give the same texts, and the greedy and
sampled logprobs within 1e-4.

    python3 tools/device/records_check.py KVSERVE MODEL

Runs `KVSERVE serve --backend cuda` twice (KVSERVE_CUDA_CANDS=0, then the
default), on loopback ports 18080 and 18081. Requests: greedy chat and
completions, seeded top-k with top-p or min-p, n = 2, logprobs (records),
seeded temperature alone and top-p alone (drawn on the GPU: the same token
unless a decision falls within float rounding), and a presence penalty
(applied on the GPU before the record).
Writes $OUT/records_check.json (both runs' responses) and the servers' logs;
exit status 1 when a request differs."""
import json
import os
import subprocess
import sys
import time
import urllib.request

REQS = [
    ("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 30,
              "temperature": 0, "logprobs": True}),
    ("completions", {"prompt": "The history of the Roman Empire", "max_tokens": 64, "temperature": 0}),
    ("chat", {"messages": [{"role": "user", "content": "Write a short poem about the sea."}], "max_tokens": 48,
              "temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 7, "logprobs": True}),
    ("completions", {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.0, "top_k": 5, "seed": 3,
                     "n": 2}),
    ("chat", {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 40, "temperature": 0.7,
              "top_k": 128, "min_p": 0.05, "seed": 11, "logprobs": True}),
    ("chat", {"messages": [{"role": "user", "content": "Tell me about cats."}], "max_tokens": 40, "temperature": 1.0,
              "seed": 5, "logprobs": True}),
    ("completions", {"prompt": "My favourite recipe is", "max_tokens": 40, "temperature": 0.8, "seed": 9}),
    ("chat", {"messages": [{"role": "user", "content": "Describe a forest."}], "max_tokens": 40, "temperature": 0.9,
              "top_p": 0.9, "seed": 13}),
    ("chat", {"messages": [{"role": "user", "content": "List some fruits."}], "max_tokens": 40, "temperature": 0,
              "presence_penalty": 0.5}),
]


def serve(kvserve, model, out, cands, port):
    env = dict(os.environ, KVSERVE_CUDA_CANDS=cands)
    log = open(os.path.join(out, "records_serve_cands%s.log" % cands), "w")
    proc = subprocess.Popen([kvserve, "serve", "--model", model, "--backend", "cuda", "--port", str(port),
                             "--kv-memory", "1G"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = "http://127.0.0.1:%d" % port
    try:
        for _ in range(600):
            try:
                if urllib.request.urlopen(base + "/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.1)
        outs = []
        for kind, body in REQS:
            path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
            req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            outs.append(json.loads(urllib.request.urlopen(req, timeout=60).read()))
        return outs
    finally:
        proc.terminate()
        proc.wait(30)


def text(choice):
    return choice["text"] if "text" in choice else choice["message"]["content"]


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: records_check.py KVSERVE MODEL")
    out = os.environ.get("OUT", ".")
    rows = serve(sys.argv[1], sys.argv[2], out, "0", 18080)
    recs = serve(sys.argv[1], sys.argv[2], out, "1", 18081)
    with open(os.path.join(out, "records_check.json"), "w") as f:
        json.dump({"rows": rows, "records": recs}, f, indent=1)
    same = 0
    for i, (a, b) in enumerate(zip(rows, recs)):
        ok = len(a["choices"]) == len(b["choices"])
        for ca, cb in zip(a["choices"], b["choices"]):
            ok = ok and text(ca) == text(cb)
            la, lb = ca.get("logprobs"), cb.get("logprobs")
            if la and lb and "content" in la:
                d = max(abs(p["logprob"] - q["logprob"]) for p, q in zip(la["content"], lb["content"]))
                ok = ok and d <= 1e-4
                print("request %d: logprobs differ by %.2e at most" % (i, d))
        same += ok
        print("request %d: %s: %r" % (i, "same" if ok else "DIFFERENT", text(a["choices"][0])[:70]))
    print("records_check: %d of %d requests the same with records" % (same, len(REQS)))
    sys.exit(0 if same == len(REQS) else 1)


main()
