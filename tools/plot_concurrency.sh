#!/bin/sh
# plot_concurrency.sh: output tokens/s against concurrency, one line per KV
# codec, measured with `kvserve bench --concurrency N --json` (the engine
# benchmark through the continuous-batching scheduler) and drawn with gnuplot.
#
#   make plot-concurrency                (or: tools/plot_concurrency.sh)
#
# The figures are only meaningful on an otherwise idle machine: the load
# average when the run starts and ends is printed, written into the data file
# and the plot's title, and a start above 1.0 draws a warning.
#
# Environment (defaults in brackets):
#   KVSERVE_BIN   the binary [./kvserve]
#   MODEL         the model [~/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf]
#   CODECS        KV codecs, one line each ["f16 int8 int4"]
#   CONCURRENCY   requests in flight ["1 4 8 16 32"]
#   PROMPT_LEN, GEN_LEN   tokens per request [128, 128]
#   THREADS       compute threads [all cores]
#   OUT           the PNG [docs/concurrency.png]; the data go beside it (.dat)
#                 and each run's JSON, with the load average after it, to .jsonl
# Prints the table (markdown) on stdout.
set -eu

BIN=${KVSERVE_BIN:-./kvserve}
MODEL=${MODEL:-$HOME/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf}
CODECS=${CODECS:-"f16 int8 int4"}
CONCURRENCY=${CONCURRENCY:-"1 4 8 16 32"}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-128}
THREADS=${THREADS:-0}
OUT=${OUT:-docs/concurrency.png}
DATA=${OUT%.png}.dat
RUNS=${OUT%.png}.jsonl

command -v gnuplot >/dev/null 2>&1 || { echo "plot_concurrency: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "plot_concurrency: $BIN is not an executable (make kvserve first)" >&2; exit 1; }
[ -r "$MODEL" ] || { echo "plot_concurrency: model $MODEL not found (make model)" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
: > "$RUNS"

# the 1-minute load average
load() { cut -d' ' -f1 /proc/loadavg; }
load_start=$(load)
if awk -v l="$load_start" 'BEGIN { exit !(l >= 1.0) }'; then
    echo "plot_concurrency: warning: load average $load_start at the start: the machine is busy, the figures will be low" >&2
fi

# one JSON field of a one-line JSON object
field() { sed -n "s/.*\"$2\": \"\{0,1\}\([^,\"}]*\).*/\1/p" "$1"; }

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
printf '# load average %s at the start\n# concurrency' "$load_start" > "$DATA"
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
        sed "s/}\$/, \"load_average_after\": $(load)}/" "$tmp" >> "$RUNS"
        tps=$(field "$tmp" output_tokens_per_s)
        row="$row $tps"; mrow="$mrow $tps |"
    done
    echo "$row" >> "$DATA"
    table="$table$mrow
"
done

load_end=$(load)
echo "# load average $load_end at the end" >> "$DATA"
n_codecs=$(echo $CODECS | wc -w)
gnuplot <<EOF
set terminal pngcairo size 900,560 font "sans,11" noenhanced
set output "$OUT"
set title "kvserve: output tokens/s against concurrency\n$(basename "$MODEL"), $PROMPT_LEN prompt + $GEN_LEN generated tokens per request\n$(nproc) cores, load average $load_start at the start, $load_end at the end"
set xlabel "concurrent requests"
set ylabel "output tokens/s"
set logscale x 2
set xtics ($(echo $CONCURRENCY | sed 's/ /, /g'))
set yrange [0:*]
set key top left
set grid
plot for [i=2:$((n_codecs + 1))] "$DATA" using 1:i with linespoints linewidth 2 pointtype 7 title "KV ".word("$CODECS", i-1)
EOF
echo "plot_concurrency: wrote $OUT ($DATA, $RUNS)" >&2
printf '%s\n%s\n%s' "$header" "$rule" "$table"
echo "load average $load_start at the start, $load_end at the end"
