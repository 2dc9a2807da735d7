#!/bin/bash
# gpu_bench.sh: builds, checks and times the GPU kernels (cache/cuda/) in one
# run on the H200 machine, from the repository root:
#   1. the binaries: build-gpu/gpu/gpu_test and gpu_bench (built here with
#      `make BUILD=build-gpu gpu-bins` and carried, or built there if they
#      are missing or do not start);
#   2. test: gpu_test, every kernel against the CPU cache code; rows_test,
#      the cuda backend's fused products (engine/cuda/rows.cu) against a CPU
#      reference, and cands_test, its logit rows' records (engine/cuda/cands.cu)
#      against the CPU sampler's (where the build has them);
#   3. san:  gpu_test --quick (and cands_test --quick where the build has it)
#      under compute-sanitizer memcheck and racecheck;
#   4. bench: gpu_bench (decode, prefill, write against the memory floor);
#      rows_bench (a layer's fused products against cuBLAS, where the build
#      has it);
#   5. sdpa: PyTorch scaled_dot_product_attention on a contiguous f16 cache of
#      the same shapes (the comparison the issue asks for);
#   6. prof (only when named in STEPS): ncu on the decode configurations in
#      PROF ("shape kcodec vcodec n_seqs ctx", ';'-separated);
#   7. timeline (only when named in STEPS): each decode block's start, SM,
#      page loop ends and exit in one launch of the configurations in
#      TIMELINE (as PROF), from a build with -DKVC_CU_TIMELINE ($BUILD-tl,
#      built there when missing or not runnable); a CSV a configuration.
#   8. ab (only when named in STEPS): builds against each other, alternated
#      AB_ROUNDS times (default 2) in this one run: AB="DIR DIR[:VAR=V,...]"
#      names packed builds (tools/gpu_pack.sh NAME, carried as build-pack/NAME)
#      or build folders, each optionally with environment settings (the same
#      build twice with KVC_CU_PF=0 and =1, say); every round runs each entry's
#      gpu_bench with AB_ARGS (e.g. --match " pw"), and the summary is a
#      table of the decode default plans, steps and prefills, a column per
#      entry and round.
#   9. engine (only when named in STEPS): the cuda backend on a real model
#      from ENGINE_BUILD (default build-cuda: a `make CUDA=1` build, or a
#      packed one, PROGS="kvserve gpu_engine" tools/gpu_pack.sh NAME
#      build-cuda): gpu_engine (every logit row of mixed batches against the
#      CPU backend, per codec; again on a random-weight Hugging Face model of
#      SmolLM2's shape, made there, for its neox RoPE), the daemon with whole
#      logit rows and with records (tools/device/records_check.py), kvserve ppl
#      on both backends, and kvserve bench --backend cuda at ENGINE_CONC (default
#      "1 8 64 256") requests in flight per codec in ENGINE_KV (default "f16
#      int8 int4 f16/int4").
#      MODEL (default the SmolLM2 download) and TEXT (a UTF-8 text file) name
#      the inputs.
# A BUILD of a packed build (build-pack/NAME) is unpacked into BUILD/gpu first.
# Logs go to $OUT (or ./build-gpu/out); the summary is printed last.
#   STEPS="test san bench sdpa" (default all) picks steps; BENCH_ARGS passes
#   options to gpu_bench (e.g. --quick, --match lowrank); T_TEST, T_SAN and
#   T_BENCH are the steps' time limits in seconds (each sanitizer gets T_SAN),
#   to keep one call inside the device tool's 10 minutes.
set -u
BUILD=${BUILD:-build-gpu}
OUT=${OUT:-$BUILD/out}
STEPS=${STEPS:-test san bench sdpa}
mkdir -p "$OUT"
bin=$BUILD/gpu
status=0

# A packed build (tools/gpu_pack.sh): DIR/*.xz -> DIR/gpu/, once.
unpack() {
    local x
    for x in "$1"/*.xz; do
        [ -f "$x" ] || continue
        local p="$1/gpu/$(basename "$x" .xz)"
        [ -x "$p" ] && continue
        mkdir -p "$1/gpu" && xz -dc "$x" >"$p" && chmod +x "$p"
    done
}
unpack "$BUILD"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 | tee "$OUT/gpu.txt"

has() { case " $STEPS " in *" $1 "*) return 0 ;; esac; return 1; }

# the steps on BUILD's programs need them (ab and sdpa do not)
if { has test || has san || has bench || has prof; } &&
    { ! "$bin/gpu_test" --help 2>&1 | grep -q usage || ! "$bin/gpu_bench" --help 2>&1 | grep -q usage; }; then
    echo "== building (carried binaries missing or not runnable)"
    make -j16 BUILD="$BUILD" NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" gpu-bins >"$OUT/build.log" 2>&1 \
        || { tail -30 "$OUT/build.log"; exit 1; }
fi

if has test; then
    echo "== gpu_test"
    timeout "${T_TEST:-300}" "$bin/gpu_test" >"$OUT/test.log" 2>&1; rc=$?
    echo "gpu_test exit $rc" >>"$OUT/test.log"
    grep -E "FAIL|checks|exit" "$OUT/test.log" | tail -20
    [ $rc = 0 ] || status=1
    for t in rows_test cands_test; do
        [ -x "$bin/$t" ] || continue
        echo "== $t"
        timeout 120 "$bin/$t" >"$OUT/$t.log" 2>&1; rc=$?
        echo "$t exit $rc" >>"$OUT/$t.log"
        grep -E "FAIL|checks|exit" "$OUT/$t.log" | tail -20
        [ $rc = 0 ] || status=1
    done
fi

if has san; then
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer $tool"
        timeout "${T_SAN:-240}" compute-sanitizer --tool $tool --error-exitcode 9 "$bin/gpu_test" --quick >"$OUT/san_$tool.log" 2>&1; rc=$?
        echo "sanitizer $tool exit $rc" >>"$OUT/san_$tool.log"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|checks|exit" "$OUT/san_$tool.log" | head -12
        [ $rc = 0 ] || status=1
        [ -x "$bin/cands_test" ] || continue
        echo "== compute-sanitizer $tool, cands_test --quick"
        timeout "${T_SAN:-240}" compute-sanitizer --tool $tool --error-exitcode 9 "$bin/cands_test" --quick \
            >"$OUT/san_cands_$tool.log" 2>&1; rc=$?
        echo "sanitizer $tool exit $rc" >>"$OUT/san_cands_$tool.log"
        grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid|checks|exit" "$OUT/san_cands_$tool.log" | head -12
        [ $rc = 0 ] || status=1
    done
fi

if has bench; then
    echo "== gpu_bench"
    timeout "${T_BENCH:-400}" "$bin/gpu_bench" --csv "$OUT/bench.csv" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1; rc=$?
    echo "gpu_bench exit $rc" >>"$OUT/bench.log"
    [ $rc = 0 ] || { tail -5 "$OUT/bench.log"; status=1; }
    if [ -x "$bin/rows_bench" ]; then
        echo "== rows_bench"
        timeout 200 "$bin/rows_bench" >"$OUT/rows_bench.log" 2>&1 || { tail -5 "$OUT/rows_bench.log"; status=1; }
    fi
fi

if has prof; then
    # ncu on single decode configurations: PROF="smollm2 f16 f16 64 2048;llama8b f16 f16 64 2048"
    IFS=';' read -ra cfgs <<<"${PROF:-smollm2 f16 f16 64 2048}"
    for c in "${cfgs[@]}"; do
        echo "== ncu $c" | tee -a "$OUT/prof.txt"
        timeout 120 ncu --clock-control none -k regex:decode_kernel --launch-skip 10 --launch-count 1 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
            --section SchedulerStats --section Occupancy --section LaunchStats \
            "$bin/gpu_bench" --one $c >>"$OUT/prof.txt" 2>&1
        echo "ncu exit $?" >>"$OUT/prof.txt"
    done
    grep -E "^== ncu|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Issued Warp|No Eligible|Stall|Registers|Theoretical Occ|Block Limit" "$OUT/prof.txt" | head -80
fi

if has timeline; then
    tl=$BUILD-tl/gpu/gpu_bench
    cfgs=()
    if ! "$tl" --help 2>&1 | grep -q usage; then
        echo "== building $tl"
        make -j16 BUILD="$BUILD-tl" NVCCFLAGS="-O3 -lineinfo -DKVC_CU_TIMELINE" \
            NVCC="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)" "$tl" >"$OUT/build_tl.log" 2>&1 \
            || { tail -30 "$OUT/build_tl.log"; status=1; }
    fi
    # no timelines from a failed build
    "$tl" --help 2>&1 | grep -q usage && IFS=';' read -ra cfgs <<<"${TIMELINE:-smollm2 f16 f16 64 2048}"
    for c in "${cfgs[@]}"; do
        read -r shp kc vc n ctx <<<"$c"
        echo "== timeline $c"
        timeout 60 "$tl" --timeline $c "$OUT/timeline_${shp}_${kc}_${vc}_${n}x${ctx}.csv" >>"$OUT/timeline.log" 2>&1 \
            || { echo "timeline $c failed" >>"$OUT/timeline.log"; status=1; }
    done
fi

if has sdpa; then
    echo "== pytorch sdpa"
    PYTHONUNBUFFERED=1 timeout 240 python3 - >"$OUT/sdpa.log" 2>&1 <<'EOF'
# PyTorch SDPA on a contiguous f16 cache, per layer: decode (q of one token
# per sequence against (B, H, ctx, D) K and V, GQA) and a causal 2048-token
# prefill. Median of 50 calls between events, as the issue measured; "rot"
# rotates among copies totalling >= 800 MB so L2 holds none of it.
import math, statistics, torch
import torch.nn.functional as F
FLOOR = 4.3e12
dev = "cuda"
def time_calls(fn, n_sets, reps=50, warm=5):
    for i in range(warm): fn(i % n_sets)
    torch.cuda.synchronize()
    ts = []
    for i in range(reps):
        e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
        e0.record(); fn(i % n_sets); e1.record(); e1.synchronize()
        ts.append(e0.elapsed_time(e1) * 1e3)
    return statistics.median(ts)
print("torch", torch.__version__, torch.cuda.get_device_name())
for name, H, G, D in [("smollm2", 3, 3, 64), ("llama8b", 8, 4, 128)]:
    for B, ctx in [(64, 2048), (256, 512), (1, 32768)]:
        kv_bytes = B * H * ctx * D * 2 * 2
        n = max(1, min(32, math.ceil(800e6 / kv_bytes)))
        ks = [torch.randn(B, H, ctx, D, device=dev, dtype=torch.float16) for _ in range(n)]
        vs = [torch.randn(B, H, ctx, D, device=dev, dtype=torch.float16) for _ in range(n)]
        q = torch.randn(B, H * G, 1, D, device=dev, dtype=torch.float16)
        f = lambda i: F.scaled_dot_product_attention(q, ks[i], vs[i], enable_gqa=True)
        t_rot = time_calls(f, n)
        t_same = time_calls(f, 1)
        byts = kv_bytes + 2 * q.numel() * 2
        fl = byts / FLOOR * 1e6
        print(f"SDPA decode {name:8s} {B:4d}x{ctx:<6d} {t_rot:8.2f} us rot ({fl / t_rot * 100:5.1f}% of floor)"
              f" {t_same:8.2f} us same-buffer ({fl / t_same * 100:5.1f}%)  [floor {fl:.2f} us]")
        del ks, vs
        torch.cuda.empty_cache()
    n = 2048
    q = torch.randn(1, H * G, n, D, device=dev, dtype=torch.float16)
    k = torch.randn(1, H, n, D, device=dev, dtype=torch.float16)
    v = torch.randn(1, H, n, D, device=dev, dtype=torch.float16)
    t = time_calls(lambda i: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), 1)
    flops = 4.0 * D * H * G * n * (n + 1) / 2
    print(f"SDPA prefill {name:8s} pos0 0 n {n}: {t:8.1f} us, {flops / t * 1e-6:6.1f} TFLOP/s")
EOF
    echo "sdpa exit $?" >>"$OUT/sdpa.log"
fi

if has ab; then
    labels=()
    eval "ab_args=(${AB_ARGS:-})"   # quotes in AB_ARGS group words: --match "llama8b f16/f16 pw"
    for r in $(seq 1 "${AB_ROUNDS:-2}"); do
        for e in ${AB:?STEPS=ab needs AB="DIR DIR[:VAR=V,...]"}; do
            d=${e%%:*}; vars=; [ "$d" != "$e" ] && vars=${e#*:}
            unpack "$d"
            label=$(basename "$d")${vars:+_$(echo "$vars" | tr -c 'A-Za-z0-9_\n' '_')}
            [ "$r" = 1 ] && labels+=("$label")
            echo "== ab round $r: $label"
            env $(echo "$vars" | tr ',' ' ') timeout "${T_AB:-150}" "$d/gpu/gpu_bench" "${ab_args[@]}" \
                >"$OUT/ab_${label}_r$r.log" 2>&1 || { echo "ab $label round $r failed"; status=1; }
        done
    done
    # key -> time (us) per log: decode default plans, steps, prefills
    for l in "${labels[@]}"; do for r in $(seq 1 "${AB_ROUNDS:-2}"); do echo "$OUT/ab_${l}_r$r.log"; done; done |
        xargs awk '
            FNR == 1 { n++; col[n] = FILENAME; sub(/.*\/ab_/, "", col[n]); sub(/\.log$/, "", col[n]) }
            /^BEST decode/ { for (i = 1; i < NF; i++) if ($i == "plan") v = $(i + 1); k = "decode " $3 " " $4 " " $5 }
            /^step /       { v = $8; k = "step " $2 " " $3 " " $4 }
            /^prefill /    { v = $8; k = "prefill " $2 " " $3 " pos0 " $5 }
            /^(BEST decode|step |prefill )/ { sub(/:$/, "", k); if (!(k in seen)) { seen[k] = 1; keys[++nk] = k } t[k, n] = v }
            END {
                printf "%-42s", "us"; for (c = 1; c <= n; c++) printf " %14s", col[c]; print ""
                for (i = 1; i <= nk; i++) {
                    printf "%-42s", keys[i]; for (c = 1; c <= n; c++) printf " %14s", ((keys[i], c) in t ? t[keys[i], c] : "-"); print ""
                }
            }' >"$OUT/ab.txt"
fi

if has engine; then
    eb=${ENGINE_BUILD:-build-cuda}
    unpack "$eb"
    ek=$eb/gpu/kvserve; [ -x "$ek" ] || ek=$eb/kvserve
    model=${MODEL:-$HOME/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf}
    text=${TEXT:?STEPS=engine needs TEXT=FILE, a UTF-8 text}
    # cuBLAS: the CUDA install's, else a Python wheel's (PyTorch's)
    if ! ldd "$ek" | grep -q "libcublas.so.*=> /"; then
        d=$(dirname "$(find / -name 'libcublas.so.1[0-9]*' -not -path '*/proc/*' 2>/dev/null | head -1)")
        export LD_LIBRARY_PATH=${d}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
    echo "== gpu_engine"
    timeout "${T_ENGINE:-300}" "$eb/gpu/gpu_engine" "$model" "$text" ${ENGINE_ARGS:-} >"$OUT/engine.log" 2>&1; rc=$?
    echo "gpu_engine exit $rc" >>"$OUT/engine.log"
    grep -vE "^(FAIL)" "$OUT/engine.log" | tail -12; grep -E "^FAIL" "$OUT/engine.log" | head -20
    [ $rc = 0 ] || status=1
    # a Hugging Face llama of SmolLM2's shape (neox RoPE, where the GGUF's is
    # interleaved), random weights, made here: that loader's model through the
    # fused products end to end against the CPU (its near-uniform attention
    # hides a wrong angle: rows_test checks the RoPE itself)
    hf=$HOME/.cache/kvserve/sm2-shape
    [ -f "$hf/model.safetensors" ] || python3 tools/device/make_llama_shape.py "$hf" tests/fixtures/models/llama \
        --preset smollm2 >/dev/null
    echo "== gpu_engine, $hf (random weights)"
    timeout "${T_ENGINE:-300}" "$eb/gpu/gpu_engine" "$hf" "$text" --codecs f16/f16,int8/int8 >"$OUT/engine_hf.log" 2>&1
    rc=$?
    echo "gpu_engine exit $rc" >>"$OUT/engine_hf.log"
    grep -vE "^(FAIL)" "$OUT/engine_hf.log" | tail -4; grep -E "^FAIL" "$OUT/engine_hf.log" | head -20
    [ $rc = 0 ] || status=1
    echo "== the daemon with whole logit rows and with records"
    timeout 300 python3 tools/device/records_check.py "$ek" "$model" >"$OUT/records_check.log" 2>&1 || status=1
    tail -3 "$OUT/records_check.log"
    echo "== kvserve ppl, cpu and cuda"
    for kv in ${ENGINE_PPL_KV:-f16 int8 int4}; do
        for be in cpu cuda; do
            timeout 300 "$ek" ppl --model "$model" --text "$text" --ctx 512 --max-tokens 8192 --kv "$kv" \
                --backend $be --json 2>>"$OUT/ppl.err" | tee -a "$OUT/ppl.log" || status=1
        done
    done
    echo "== kvserve bench --backend cuda"
    for kv in ${ENGINE_KV:-f16 int8 int4 f16/int4}; do
        k=${kv%/*}; v=${kv#*/}
        for c in ${ENGINE_CONC:-1 8 64 256}; do
            timeout 300 "$ek" bench --model "$model" --backend cuda --concurrency "$c" --requests "$((2 * c))" \
                --prompt-len "${ENGINE_PROMPT:-512}" --gen-len "${ENGINE_GEN:-256}" --kv-k "$k" --kv-v "$v" \
                --max-batched-tokens 8192 --json 2>>"$OUT/engine_bench.err" | tee -a "$OUT/engine_bench.log" || status=1
        done
    done
fi

echo "================ summary ================"
[ -f "$OUT/test.log" ] && grep -E "^gpu_test:|FAIL" "$OUT/test.log" | head -12
[ -f "$OUT/rows_test.log" ] && grep -E "^rows_test:|FAIL" "$OUT/rows_test.log" | head -12
[ -f "$OUT/cands_test.log" ] && grep -E "^cands_test:|FAIL" "$OUT/cands_test.log" | head -12
[ -f "$OUT/records_check.log" ] && grep -E "^records_check:|DIFFERENT" "$OUT/records_check.log" | head -12
for tool in memcheck racecheck; do
    [ -f "$OUT/san_$tool.log" ] && grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_test:|exit" "$OUT/san_$tool.log" | tail -3
done
[ -f "$OUT/bench.log" ] && grep -E "^copy|^BEST|^prefill|^write" "$OUT/bench.log"
[ -f "$OUT/rows_bench.log" ] && cat "$OUT/rows_bench.log"
[ -f "$OUT/sdpa.log" ] && grep -E "^SDPA|Error|error" "$OUT/sdpa.log"
[ -f "$OUT/timeline.log" ] && cat "$OUT/timeline.log"
[ -f "$OUT/ab.txt" ] && cat "$OUT/ab.txt"
[ -f "$OUT/engine.log" ] && grep -E "^gpu_engine|rows|refused" "$OUT/engine.log"
exit $status
