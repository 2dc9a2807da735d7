#!/bin/sh
# quality_table.sh: the KV codec quality table: perplexity of a model on a text
# for each KV setting (K and V codecs), bytes per token, whole-KV compression
# ratio against f16, the change in perplexity against f16, and prefill speed
# (with absorbed projections where the codecs allow them, and without); the
# Pareto-best settings (no other setting compresses at least as much with a
# smaller ΔPPL); then a PNG of ΔPPL against the ratio (tools/plot_quality.gp).
# Prefill speed is prompt tokens per CPU second of one thread (kvserve bench
# --threads 1, the prefill's process CPU time): on a shared machine wall-clock
# speeds swing several-fold with other jobs, CPU time much less.
#
#   tools/quality_table.sh            run every setting not yet in $OUT/quality.tsv, then table + plot
#   tools/quality_table.sh plot       table + plot from $OUT/quality.tsv only
#
# Environment (defaults in brackets):
#   KVSERVE_BIN  [./kvserve]   MODEL [~/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf]
#   TEXT   [../shared/data/text/wikitext2-test.txt]   TOKENS [16384]   CTX [1024]
#   CALIB_TEXT [../shared/data/text/wikitext2-valid.txt]: pca bases (keys after and
#     before RoPE, values) are fitted on it (never on the evaluated text) into
#     $OUT/calib.bin unless CALIB names a file
#   PREFILL [1024]: prompt tokens of the prefill timing (kvserve bench, median of
#     REPEAT [3] runs), after every setting's perplexity; PREFILL=0 skips it
#   THREADS [2]   OUT [quality]   PNG [$OUT/kv_quality.png]
#   BUILD [this checkout's commit, "+local changes" when it has some]: the build
#     KVSERVE_BIN came from, for $OUT/runs.log and the table's header
#   SETTINGS: a file of "name k_spec v_spec [block_size]" lines instead of the built-in list
# Each row is appended to $OUT/quality.tsv (perplexity) or $OUT/prefill.tsv
# (timing) as soon as it is measured, so an interrupted run resumes where it
# stopped; the build and the machine load of each run are recorded in
# $OUT/runs.log. Progress on stderr.
set -eu

BIN=${KVSERVE_BIN:-./kvserve}
MODEL=${MODEL:-$HOME/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-../shared/data/text/wikitext2-test.txt}
CALIB_TEXT=${CALIB_TEXT:-../shared/data/text/wikitext2-valid.txt}
TOKENS=${TOKENS:-16384}
CTX=${CTX:-1024}
THREADS=${THREADS:-2}
PREFILL=${PREFILL:-1024}
REPEAT=${REPEAT:-3}
OUT=${OUT:-quality}
PNG=${PNG:-$OUT/kv_quality.png}
HERE=$(dirname "$0")
TSV=$OUT/quality.tsv
mkdir -p "$OUT"

# name  k_spec  v_spec  [block_size, default 16]   (pca specs use the calibration file)
builtin_settings() {
    cat <<'EOF'
f16                       f16                                   f16
f32                       f32                                   f32
int8                      int8                                  int8
int4                      int4                                  int4
int4-g64                  int4:g64                              int4:g64
int4-block64              int4                                  int4                    64
int4-g64-block64          int4:g64                              int4:g64                64
K-int4-token              int4:token                            f16
K-int4-channel            int4:channel                          f16
V-int4-token              f16                                   int4:token
V-int4-channel            f16                                   int4:channel
V-lowrank-r48-orth        f16                                   lowrank:r48
V-lowrank-r48-pca         f16                                   lowrank:r48:pca
V-lowrank-r32-orth        f16                                   lowrank:r32
V-lowrank-r32-pca         f16                                   lowrank:r32:pca
V-lowrank-e99-pca         f16                                   lowrank:e99:pca
lowrank-r48-orth          lowrank:r48                           lowrank:r48
lowrank-r48-pca           lowrank:r48:pca                       lowrank:r48:pca
lowrank-r48-pca-preK      lowrank:r48:pca:prerope               lowrank:r48:pca
lowrank-r32-pca           lowrank:r32:pca                       lowrank:r32:pca
lowrank-r32-pca-preK      lowrank:r32:pca:prerope               lowrank:r32:pca
latent-192-pca            latent:192:pca                        latent:192:pca
latent-128-pca            latent:128:pca                        latent:128:pca
latent-128-pca-preK       latent:128:pca:prerope                latent:128:pca
latent-96-orth            latent:96                             latent:96
latent-96-pca             latent:96:pca                         latent:96:pca
latent-64-pca             latent:64:pca                         latent:64:pca
hybrid-r48-orth           hybrid:r48                            hybrid:r48
hybrid-r48-pca            hybrid:r48:pca                        hybrid:r48:pca
hybrid-r48-pca-preK       hybrid:r48:pca:prerope                hybrid:r48:pca
hybrid-r32-orth           hybrid:r32                            hybrid:r32
hybrid-r32-pca            hybrid:r32:pca                        hybrid:r32:pca
hybrid-r32-pca-preK       hybrid:r32:pca:prerope                hybrid:r32:pca
hybrid-latent-128-pca     hybrid:latent:128:pca                 hybrid:latent:128:pca
hybrid-latent-64-pca      hybrid:latent:64:pca                  hybrid:latent:64:pca
f16-prerope               f16:prerope                           f16
K-lowrank-r48-post        lowrank:r48:pca                       f16
K-lowrank-r48-pre         lowrank:r48:pca:prerope               f16
K-lowrank-r32-post        lowrank:r32:pca                       f16
K-lowrank-r32-pre         lowrank:r32:pca:prerope               f16
K-latent-96-post          latent:96:pca                         f16
K-latent-96-pre           latent:96:pca:prerope                 f16
K-latent-64-post          latent:64:pca                         f16
K-latent-64-pre           latent:64:pca:prerope                 f16
K-hybrid-latent-96-pre    hybrid:latent:96:pca:prerope          f16
Klat96hyb-pre+V-int4g64   hybrid:latent:96:pca:prerope          int4:token:g64
Klat96i4c-pre+V-int4g64   latent:96:pca:int4:channel:prerope    int4:token:g64          64
Klat80i4c-pre+V-int4g64   latent:80:pca:int4:channel:prerope    int4:token:g64          64
Klat64i4c-pre+V-int4g64   latent:64:pca:int4:channel:prerope    int4:token:g64          64
Klat64i4-pre+V-int4g64    latent:64:pca:int4:prerope            int4:token:g64          64
EOF
}

ppl_json() {   # k v block -> one JSON line
    "$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx "$CTX" --max-tokens "$TOKENS" --threads "$THREADS" \
        --kv-k "$1" --kv-v "$2" --block-size "$3" --calib "$CALIB" --absorb --json
}

prefill_cpu() {   # k v block [--absorb] -> median CPU seconds of a PREFILL-token prefill, one thread
    j=$("$BIN" bench --model "$MODEL" --prompt-len "$PREFILL" --gen-len 1 --repeat "$REPEAT" --threads 1 \
        --kv-k "$1" --kv-v "$2" --block-size "$3" --calib "$CALIB" ${4:-} --json) && field "$j" prefill_cpu_s
}

field() {      # json key -> value
    sed -n "s/.*\"$2\": \"\{0,1\}\([^\",}]*\)\"\{0,1\}[,}].*/\1/p" <<EOF
$1
EOF
}

if [ -n "${SETTINGS:-}" ]; then list=$(cat "$SETTINGS"); else list=$(builtin_settings); fi
if [ "${1:-}" != plot ]; then
    CALIB=${CALIB:-$OUT/calib.bin}
    if [ ! -f "$CALIB" ]; then
        echo "quality: calibrating on $CALIB_TEXT -> $CALIB" >&2
        "$BIN" calibrate --model "$MODEL" --text "$CALIB_TEXT" --energy 0.9 --tokens 16384 --threads "$THREADS" \
            --pre-rope --out "$CALIB"
    fi
    build=${BUILD:-$(git -C "$HERE/.." rev-parse --short HEAD 2>/dev/null || echo unknown)}
    [ -n "${BUILD:-}" ] || [ -z "$(git -C "$HERE/.." status --porcelain --untracked-files=no 2>/dev/null)" ] ||
        build="$build+local changes"
    echo "$(date -u '+%Y-%m-%d %H:%M') build $build, KVSERVE_ACTIVATIONS=${KVSERVE_ACTIVATIONS:-default}," \
         "$TOKENS tokens of $TEXT at ctx $CTX, $THREADS threads, load $(cut -d' ' -f1-3 /proc/loadavg)" \
         >> "$OUT/runs.log"
    [ -f "$TSV" ] || printf 'name\tk\tv\tblock\tbytes_per_token\tratio\tppl\tseconds\tabsorbed\n' > "$TSV"
    [ -f "$OUT/prefill.tsv" ] || printf 'name\tprompt\tcpu_s\tcpu_s_unabsorbed\n' > "$OUT/prefill.tsv"
    echo "$list" | while read -r name k v block; do
        [ -n "$name" ] || continue
        block=${block:-16}
        if grep -q "^$name	" "$TSV"; then continue; fi
        echo "quality: $name (K $k, V $v, block $block)" >&2
        j=$(ppl_json "$k" "$v" "$block") || { echo "quality: $name failed" >&2; continue; }
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$k" "$v" "$block" \
            "$(field "$j" bytes_per_token)" "$(field "$j" compression_ratio)" "$(field "$j" ppl)" \
            "$(field "$j" seconds)" "$(field "$j" absorbed)" >> "$TSV"
    done
    [ "$PREFILL" -gt 0 ] && echo "$list" | while read -r name k v block; do
        [ -n "$name" ] || continue
        if grep -q "^$name	" "$OUT/prefill.tsv"; then continue; fi
        absorbed=$(awk -F'\t' -v n="$name" '$1 == n { print $9 }' "$TSV")
        [ -n "$absorbed" ] || continue
        echo "quality: prefill timing: $name" >&2
        plain=$(prefill_cpu "$k" "$v" "${block:-16}") || continue
        cpu=$plain
        if [ "$absorbed" != none ]; then cpu=$(prefill_cpu "$k" "$v" "${block:-16}" --absorb) || continue; fi
        printf '%s\t%s\t%s\t%s\n' "$name" "$PREFILL" "$cpu" "$plain" >> "$OUT/prefill.tsv"
    done
fi

# ΔPPL against the f16 row; Pareto-best: no other row with a ratio at least as
# high and a smaller ΔPPL (or an equal ΔPPL and a higher ratio), a ΔPPL below
# zero counting as zero (noise: f32, a full-rank basis)
base=$(awk -F'\t' '$1 == "f16" { print $7 }' "$TSV")
[ -n "$base" ] || { echo "quality: no f16 row in $TSV" >&2; exit 1; }
awk -F'\t' -v base="$base" '
    NR > 1 { n++; name[n] = $1; r[n] = $6; d[n] = 100 * ($7 - base) / base; c[n] = d[n] < 0 ? 0 : d[n] }
    END {
        for (i = 1; i <= n; i++) {
            best = 1
            for (j = 1; j <= n && best; j++)
                if (j != i && r[j] >= r[i] && c[j] <= c[i] && (r[j] > r[i] || c[j] < c[i])) best = 0
            printf "%s\t%s\t%.3f\t%d\n", name[i], r[i], d[i], best
        }
    }' "$TSV" > "$OUT/quality.dat"
awk -F'\t' '$4 == 1' "$OUT/quality.dat" | sort -t'	' -k2,2g > "$OUT/pareto.dat"
{
    echo "| setting | K | V | block | bytes/token | compression | PPL | ΔPPL | prefill tok/CPU s | absorbed (without) | Pareto |"
    echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | :---: |"
    [ -f "$OUT/prefill.tsv" ] || : > "$OUT/prefill.tsv"
    # rows in the order of the settings list, then any others
    echo "$list" | awk 'NF { print $1 }' > "$OUT/order.txt"
    awk -F'\t' 'NR == FNR { pos[$1] = FNR; next } FNR > 1 { print ($1 in pos ? pos[$1] : 100000 + FNR) "\t" $0 }' \
        "$OUT/order.txt" "$TSV" | sort -t'	' -k1,1n | cut -f2- |
    awk -F'\t' -v base="$base" -v pareto="$OUT/quality.dat" -v prefill="$OUT/prefill.tsv" '
        BEGIN {
            while ((getline l < pareto) > 0) { split(l, f, "\t"); best[f[1]] = f[4] }
            while ((getline l < prefill) > 0) { split(l, f, "\t"); if (f[3] > 0) { speed[f[1]] = f[2] / f[3]; plain[f[1]] = f[2] / f[4] } }
        }
        {
            s = $1 in speed ? sprintf("%.0f", speed[$1]) : "-"
            a = $9 == "none" || $9 == "" ? "" : $1 in plain ? sprintf("%s (%.0f)", $9, plain[$1]) : $9
            printf "| %s | `%s` | `%s` | %d | %d | %.2fx | %.3f | %+.2f%% | %s | %s | %s |\n",
                $1, $2, $3, $4, $5, $6, $7, 100 * ($7 - base) / base, s, a, best[$1] ? "*" : ""
        }'
} > "$OUT/quality.md"
cat "$OUT/quality.md"
if command -v gnuplot >/dev/null 2>&1; then
    gnuplot -e "data='$OUT/quality.dat'; pareto='$OUT/pareto.dat'; out='$PNG'" "$HERE/plot_quality.gp"
    echo "quality: wrote $OUT/quality.md and $PNG" >&2
else
    echo "quality: gnuplot not found: wrote $OUT/quality.md only" >&2
fi
