#!/bin/sh
# plot_concurrency.sh: output tokens/s against concurrency, one line per KV
# codec, measured with `kvserve bench --concurrency N --json` (the engine
# benchmark through the continuous-batching scheduler) and drawn with gnuplot.
#
#   tools/plot_concurrency.sh            (or: make plot-concurrency)
#
# Environment (defaults in brackets):
#   KVSERVE_BIN   the binary [./kvserve]
#   MODEL         the model [~/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf]
#   CODECS        KV codecs, one line each ["f32 f16 int8 int4"]
#   CONCURRENCY   requests in flight ["1 2 4 8 16"]
#   PROMPT_LEN, GEN_LEN   tokens per request [128, 128]
#   THREADS       compute threads [all cores]
#   OUT           the PNG [build/concurrency.png]; the data go beside it (.dat)
#                 and each run's JSON to .jsonl
# Prints the table (markdown) on stdout.
set -eu

BIN=${KVSERVE_BIN:-./kvserve}
MODEL=${MODEL:-$HOME/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf}
CODECS=${CODECS:-"f32 f16 int8 int4"}
CONCURRENCY=${CONCURRENCY:-"1 2 4 8 16"}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-128}
THREADS=${THREADS:-0}
OUT=${OUT:-build/concurrency.png}
DATA=${OUT%.png}.dat
RUNS=${OUT%.png}.jsonl

command -v gnuplot >/dev/null 2>&1 || { echo "plot_concurrency: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "plot_concurrency: $BIN is not an executable (make kvserve first)" >&2; exit 1; }
[ -r "$MODEL" ] || { echo "plot_concurrency: model $MODEL not found (make model)" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
: > "$RUNS"

# one JSON field of a one-line JSON object
field() { sed -n "s/.*\"$2\": \"\{0,1\}\([^,\"}]*\).*/\1/p" "$1"; }

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
printf '# concurrency' > "$DATA"
for codec in $CODECS; do printf ' %s' "$codec" >> "$DATA"; done
printf '\n' >> "$DATA"
header="| concurrency |"; rule="| ---: |"
for codec in $CODECS; do header="$header $codec tok/s |"; rule="$rule ---: |"; done
table=""
for c in $CONCURRENCY; do
    row="$c"; mrow="| $c |"
    for codec in $CODECS; do
        echo "plot_concurrency: concurrency $c, KV $codec" >&2
        "$BIN" bench --model "$MODEL" --concurrency "$c" --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" \
            --kv "$codec" --threads "$THREADS" --json > "$tmp"
        cat "$tmp" >> "$RUNS"
        tps=$(field "$tmp" output_tokens_per_s)
        row="$row $tps"; mrow="$mrow $tps |"
    done
    echo "$row" >> "$DATA"
    table="$table$mrow
"
done

n_codecs=$(echo $CODECS | wc -w)
gnuplot <<EOF
set terminal pngcairo size 900,560 font "sans,11" noenhanced
set output "$OUT"
set title "kvserve: output tokens/s against concurrency ($(basename "$MODEL"), prompt $PROMPT_LEN + $GEN_LEN generated)"
set xlabel "concurrent requests"
set ylabel "output tokens/s"
set logscale x 2
set yrange [0:*]
set key top left
set grid
plot for [i=2:$((n_codecs + 1))] "$DATA" using 1:i with linespoints linewidth 2 pointtype 7 title "KV ".word("$CODECS", i-1)
EOF
echo "plot_concurrency: wrote $OUT ($DATA, $RUNS)" >&2
printf '%s\n%s\n%s' "$header" "$rule" "$table"
