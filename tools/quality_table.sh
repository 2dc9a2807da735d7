#!/bin/sh
# quality_table.sh: the KV codec quality table: perplexity of a model on a text
# for each KV setting (K and V codecs), bytes per token, whole-KV compression
# ratio against f16, and the change in perplexity against f16; then a PNG of
# the change against the ratio (tools/plot_quality.gp, gnuplot).
#
#   tools/quality_table.sh            run every setting not yet in $OUT/quality.tsv, then table + plot
#   tools/quality_table.sh plot       table + plot from $OUT/quality.tsv only
#
# Environment (defaults in brackets):
#   KVSERVE_BIN  [./kvserve]   MODEL [~/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf]
#   TEXT   [../shared/data/text/wikitext2-test.txt]   TOKENS [16384]   CTX [1024]
#   CALIB_TEXT [../shared/data/text/wikitext2-valid.txt]: pca bases are fitted on it
#     (never on the evaluated text) into $OUT/calib.bin unless CALIB names a file
#   PRE_ROPE [auto]: 1 to include the pre-RoPE rows (the backend must cache keys
#     before RoPE when the K codec asks: kvc_keys_pre_rope); auto: 1 when a probe
#     ppl run with an f16:prerope K codec runs and matches the f16 perplexity
#   THREADS [2]   OUT [quality]   SETTINGS: a file of "name k_spec v_spec [block_size]"
#     lines instead of the built-in list
# Each row is appended to $OUT/quality.tsv as soon as it is measured, so an
# interrupted run resumes where it stopped. Progress on stderr.
set -eu

BIN=${KVSERVE_BIN:-./kvserve}
MODEL=${MODEL:-$HOME/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=${TEXT:-../shared/data/text/wikitext2-test.txt}
CALIB_TEXT=${CALIB_TEXT:-../shared/data/text/wikitext2-valid.txt}
TOKENS=${TOKENS:-16384}
CTX=${CTX:-1024}
THREADS=${THREADS:-2}
OUT=${OUT:-quality}
PRE_ROPE=${PRE_ROPE:-auto}
HERE=$(dirname "$0")
TSV=$OUT/quality.tsv
mkdir -p "$OUT"

# name  k_spec  v_spec  [block_size, default 16]   (pca specs use the calibration file)
builtin_settings() {
    cat <<'EOF'
f16                     f16                     f16
f32                     f32                     f32
int8                    int8                    int8
int4                    int4                    int4
int4-block32            int4                    int4                    32
int4-g64                int4:g64                int4:g64
int4-g64-block32        int4:g64                int4:g64                32
int4-g64-block64        int4:g64                int4:g64                64
K-rotated-int4          lowrank:r64:int4        int4:token
int4-token-K+V          int4:token              int4:token
K-int4-token            int4:token              f16
K-int4-channel          int4:channel            f16
V-int4-token            f16                     int4:token
V-int4-channel          f16                     int4:channel
V-lowrank-r48-orth      f16                     lowrank:r48
V-lowrank-r48-pca       f16                     lowrank:r48:pca
V-lowrank-r32-pca       f16                     lowrank:r32:pca
lowrank-r48-orth        lowrank:r48             lowrank:r48
lowrank-r48-pca         lowrank:r48:pca         lowrank:r48:pca
lowrank-r32-pca         lowrank:r32:pca         lowrank:r32:pca
lowrank-energy90-pca    lowrank:pca             lowrank:pca
latent-192-pca          latent:192:pca          latent:192:pca
latent-128-pca          latent:128:pca          latent:128:pca
latent-96-orth          latent:96               latent:96
latent-96-pca           latent:96:pca           latent:96:pca
latent-64-pca           latent:64:pca           latent:64:pca
hybrid-r48-orth         hybrid:r48              hybrid:r48
hybrid-r48-pca          hybrid:r48:pca          hybrid:r48:pca
hybrid-r32-pca          hybrid:r32:pca          hybrid:r32:pca
hybrid-latent-128-pca   hybrid:latent:128:pca   hybrid:latent:128:pca
hybrid-latent-64-pca    hybrid:latent:64:pca    hybrid:latent:64:pca
EOF
    if [ "$PRE_ROPE" = 1 ]; then
        cat <<'EOF'
f16-prerope             f16:prerope             f16
K-lowrank-r48-post      lowrank:r48:pca         f16
K-lowrank-r48-pre       lowrank:r48:pca:prerope f16
K-lowrank-r32-post      lowrank:r32:pca         f16
K-lowrank-r32-pre       lowrank:r32:pca:prerope f16
K-latent-96-post        latent:96:pca           f16
K-latent-96-pre         latent:96:pca:prerope   f16
K-latent-64-post        latent:64:pca           f16
K-latent-64-pre         latent:64:pca:prerope   f16
EOF
    fi
}

ppl_json() {   # k v block -> one JSON line
    "$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx "$CTX" --max-tokens "$TOKENS" --threads "$THREADS" \
        --kv-k "$1" --kv-v "$2" --block-size "$3" --calib "$CALIB" --json
}

field() {      # json key -> value
    sed -n "s/.*\"$2\": \"\{0,1\}\([^\",}]*\)\"\{0,1\}[,}].*/\1/p" <<EOF
$1
EOF
}

if [ "${1:-}" != plot ]; then
    CALIB=${CALIB:-$OUT/calib.bin}
    if [ ! -f "$CALIB" ]; then
        pre=""
        [ "$PRE_ROPE" = 1 ] && pre=--pre-rope
        echo "quality: calibrating on $CALIB_TEXT -> $CALIB" >&2
        "$BIN" calibrate --model "$MODEL" --text "$CALIB_TEXT" --energy 0.9 --tokens 16384 --threads "$THREADS" \
            $pre --out "$CALIB"
    fi
    if [ "$PRE_ROPE" = auto ]; then
        PRE_ROPE=0
        a=$("$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx 256 --max-tokens 256 --kv f16 --json 2>/dev/null || true)
        b=$("$BIN" ppl --model "$MODEL" --text "$TEXT" --ctx 256 --max-tokens 256 --kv-k f16:prerope --kv-v f16 \
                --json 2>/dev/null || true)
        # an unwired backend aborts on a pre-RoPE cache; a wired one matches f16 (up to noise)
        if [ -n "$b" ] && awk -v a="$(field "$a" ppl)" -v b="$(field "$b" ppl)" \
                'BEGIN { exit !(b > 0 && (a - b) / a < 0.02 && (b - a) / a < 0.02) }'; then PRE_ROPE=1; fi
        echo "quality: pre-RoPE rows: $PRE_ROPE" >&2
    fi
    [ -f "$TSV" ] || printf 'name\tk\tv\tblock\tbytes_per_token\tratio\tppl\tseconds\n' > "$TSV"
    if [ -n "${SETTINGS:-}" ]; then list=$(cat "$SETTINGS"); else list=$(builtin_settings); fi
    echo "$list" | while read -r name k v block; do
        [ -n "$name" ] || continue
        block=${block:-16}
        if grep -q "^$name	" "$TSV"; then continue; fi
        echo "quality: $name (K $k, V $v, block $block)" >&2
        j=$(ppl_json "$k" "$v" "$block") || { echo "quality: $name failed" >&2; continue; }
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$k" "$v" "$block" "$(field "$j" bytes_per_token)" \
            "$(field "$j" compression_ratio)" "$(field "$j" ppl)" "$(field "$j" seconds)" >> "$TSV"
    done
fi

# the table (markdown) and the plot data: dppl against the f16 row
base=$(awk -F'\t' '$1 == "f16" { print $7 }' "$TSV")
[ -n "$base" ] || { echo "quality: no f16 row in $TSV" >&2; exit 1; }
awk -F'\t' -v base="$base" 'NR > 1 { printf "%s\t%s\t%.3f\n", $1, $6, 100 * ($7 - base) / base }' "$TSV" \
    > "$OUT/quality.dat"
{
    echo "| setting | K | V | block | bytes/token | compression | PPL | ΔPPL |"
    echo "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
    awk -F'\t' -v base="$base" 'NR > 1 { printf "| %s | `%s` | `%s` | %d | %d | %.2fx | %.3f | %+.2f%% |\n",
        $1, $2, $3, $4, $5, $6, $7, 100 * ($7 - base) / base }' "$TSV"
} > "$OUT/quality.md"
cat "$OUT/quality.md"
if command -v gnuplot >/dev/null 2>&1; then
    gnuplot -e "data='$OUT/quality.dat'; out='$OUT/kv_quality.png'" "$HERE/plot_quality.gp"
    echo "quality: wrote $OUT/quality.md and $OUT/kv_quality.png" >&2
else
    echo "quality: gnuplot not found: wrote $OUT/quality.md only" >&2
fi
