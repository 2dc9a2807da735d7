#!/bin/sh
# bench_http.sh: the daemon's HTTP figures for the README, on loopback.
#
#   1. GET /health requests/s with wrk (the HTTP layer alone).
#   2. Streaming completions at CONCURRENCY clients through HTTP against the
#      engine alone (kvserve bench --concurrency CONCURRENCY) with the same
#      settings and the same workload: closed loop, REQUESTS requests of
#      PROMPT_LEN token-id prompts generating exactly GEN_LEN tokens (greedy,
#      EOS ignored); output tokens/s of each and their ratio (the HTTP path
#      should keep >= 90% of the engine's). The two alternate ROUNDS times
#      (the idle daemon sleeps on a condition variable meanwhile) and the
#      medians are compared, which evens out a machine shared with others.
#
# Usage: tools/bench_http.sh            (after make; uses ./kvserve)
# Environment: KVSERVE_BIN, MODEL, CONCURRENCY (16), PROMPT_LEN (128),
#   GEN_LEN (64), REQUESTS (2 x CONCURRENCY), THREADS (0: all cores),
#   KV_MEMORY (256M), WRK_SECONDS (10), WRK_CONNECTIONS (64), PORT (18123),
#   ROUNDS (3).
set -eu

BIN=${KVSERVE_BIN:-./kvserve}
MODEL=${MODEL:-$HOME/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf}
CONCURRENCY=${CONCURRENCY:-16}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-64}
REQUESTS=${REQUESTS:-$((2 * CONCURRENCY))}
THREADS=${THREADS:-0}
KV_MEMORY=${KV_MEMORY:-256M}
WRK_SECONDS=${WRK_SECONDS:-10}
WRK_CONNECTIONS=${WRK_CONNECTIONS:-64}
PORT=${PORT:-18123}
ROUNDS=${ROUNDS:-3}
COMMON="--threads $THREADS --kv-memory $KV_MEMORY --max-batched-tokens 2048 --prefill-chunk 512"

log=$(mktemp /tmp/kvserve-bench-http.XXXXXX)
loadgen=$(mktemp /tmp/kvserve-bench-http-load.XXXXXX)
"$BIN" serve --model "$MODEL" --port "$PORT" $COMMON --kv-k f16 --kv-v f16 \
    --max-seqs "$CONCURRENCY" --max-waiting 4096 >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; rm -f "$log" "$loadgen"' EXIT
i=0
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 $pid 2>/dev/null; then cat "$log"; exit 1; fi
    sleep 0.1
done

echo "== GET /health: wrk -t2 -c$WRK_CONNECTIONS -d${WRK_SECONDS}s"
wrk -t2 -c"$WRK_CONNECTIONS" -d"${WRK_SECONDS}s" "http://127.0.0.1:$PORT/health" | grep -E "Requests/sec|Latency|requests in"

# The HTTP load generator: CONCURRENCY closed-loop streaming clients.
cat >"$loadgen" <<'EOF'
import http.client, json, random, sys, threading, time
port, conc, n_req, plen, glen = map(int, sys.argv[1:])
rng = random.Random(1234)
prompts = [[rng.randrange(1000, 40000) for _ in range(plen)] for _ in range(n_req)]
lock = threading.Lock()
next_req = [0]
tokens = [0]
errors = []

def client():
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    while True:
        with lock:
            i = next_req[0]
            next_req[0] += 1
        if i >= n_req:
            break
        body = {"prompt": prompts[i], "max_tokens": glen, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        c.request("POST", "/v1/completions", json.dumps(body))
        r = c.getresponse()
        data = r.read()
        if r.status != 200:
            errors.append((r.status, data[:200]))
            continue
        usage = [json.loads(l[6:]) for l in data.split(b"\n") if l.startswith(b"data: {")][-1]["usage"]
        with lock:
            tokens[0] += usage["completion_tokens"]
    c.close()

t0 = time.time()
threads = [threading.Thread(target=client) for _ in range(conc)]
for t in threads:
    t.start()
for t in threads:
    t.join()
dt = time.time() - t0
if errors:
    sys.exit("errors: %r" % errors[:3])
print("%.2f" % (tokens[0] / dt))
EOF

http_run() {
    python3 "$loadgen" "$PORT" "$CONCURRENCY" "$REQUESTS" "$PROMPT_LEN" "$GEN_LEN"
}

engine_run() {
    "$BIN" bench --model "$MODEL" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
        --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" --kv f16 $COMMON --json 2>/dev/null |
        python3 -c 'import json, sys; print("%.2f" % json.load(sys.stdin)["output_tokens_per_s"])'
}

echo "== streaming completions: $CONCURRENCY clients, $REQUESTS requests, prompt $PROMPT_LEN, gen $GEN_LEN"
echo "   output tokens/s through HTTP (this daemon) and of the engine alone (kvserve bench --concurrency $CONCURRENCY)"
http_all=""
eng_all=""
r=1
while [ "$r" -le "$ROUNDS" ]; do
    h=$(http_run)
    e=$(engine_run)
    echo "   round $r: HTTP $h  engine $e"
    http_all="$http_all $h"
    eng_all="$eng_all $e"
    r=$((r + 1))
done
python3 -c '
import statistics, sys
a = sys.argv[1:]
cut = a.index("/")
h, e = statistics.median(map(float, a[:cut])), statistics.median(map(float, a[cut + 1:]))
print("   median: HTTP %.2f  engine %.2f  HTTP / engine %.1f%%" % (h, e, 100 * h / e))
' $http_all / $eng_all
kill -TERM $pid
wait $pid || true
