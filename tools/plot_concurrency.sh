#!/bin/sh
# plot_concurrency.sh: output tokens/s against concurrency, one line per KV
# codec, measured with `kvserve bench --concurrency N --json` (the engine
# benchmark through the continuous-batching scheduler) and drawn with gnuplot.
#
#   make plot-concurrency                (or: tools/plot_concurrency.sh)
#
# The figures are only meaningful on an otherwise idle machine. The load
# average when the sweep starts and ends goes into the data file and the
# plot's title (a start above 1.0 draws a warning), and each run measures the
# CPU that other processes took while it ran (all busy CPU time from
# /proc/stat minus the benchmark's own, per second of the run): it goes into
# the .jsonl as other_cpu_cores. A point so disturbed (above MAX_OTHER cores)
# is run again, up to TRIES times; the largest value kept goes into the title
# and the last line printed, with a warning when it is above MAX_OTHER.
#
# Environment (defaults in brackets):
#   KVSERVE_BIN   the binary [./kvserve]
#   MODEL         the model [~/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf]
#   CODECS        KV codecs, one line each ["f16 int8 int4"]
#   CONCURRENCY   requests in flight ["1 4 8 16 32"]
#   PROMPT_LEN, GEN_LEN   tokens per request [128, 128]
#   THREADS       compute threads [all cores]
#   MAX_OTHER     cores other processes may take during a run [0.2]
#   TRIES         runs of a point at most while they take more [3]
#   REPEAT        runs of each point; the median is drawn [3] (this VM's speed
#                 wanders by +-15% from run to run even when nothing else runs)
#   OUT           the PNG [docs/concurrency.png]; the data go beside it (.dat)
#                 and each run's JSON, with the load average after it and
#                 other_cpu_cores, to .jsonl
# Prints the table (markdown) on stdout.
set -eu

BIN=${KVSERVE_BIN:-./kvserve}
MODEL=${MODEL:-$HOME/.cache/kvserve/SmolLM2-135M-Instruct.Q4_1.gguf}
CODECS=${CODECS:-"f16 int8 int4"}
CONCURRENCY=${CONCURRENCY:-"1 4 8 16 32"}
PROMPT_LEN=${PROMPT_LEN:-128}
GEN_LEN=${GEN_LEN:-128}
THREADS=${THREADS:-0}
MAX_OTHER=${MAX_OTHER:-0.2}
TRIES=${TRIES:-3}
REPEAT=${REPEAT:-3}
OUT=${OUT:-docs/concurrency.png}
DATA=${OUT%.png}.dat
RUNS=${OUT%.png}.jsonl

command -v gnuplot >/dev/null 2>&1 || { echo "plot_concurrency: gnuplot is not installed (apt-get install gnuplot-nox)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "plot_concurrency: $BIN is not an executable (make kvserve first)" >&2; exit 1; }
[ -r "$MODEL" ] || { echo "plot_concurrency: model $MODEL not found (make model)" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
: > "$RUNS"
tmp=$(mktemp)
trap 'rm -f "$tmp" "$tmp.times"' EXIT

# the 1-minute load average
load() { cut -d' ' -f1 /proc/loadavg; }
load_start=$(load)
if awk -v l="$load_start" 'BEGIN { exit !(l >= 1.0) }'; then
    echo "plot_concurrency: warning: load average $load_start at the start: the machine is busy, the figures will be low" >&2
fi

# CPU seconds: of every process since boot (busy, not idle or waiting for
# I/O), and of this script's finished children (the `times` builtin)
HZ=$(getconf CLK_TCK)
busy_s() { awk -v hz="$HZ" '/^cpu /{ printf "%.2f", ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat; }
# (`times` must run in this shell, not in a $(...) subshell: it reads the file it wrote)
children_s() {
    awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
                   printf "%.3f", t }' "$tmp.times"
}
now_s() { date +%s.%N; }
other_max=0

# one JSON field of a one-line JSON object
field() { sed -n "s/.*\"$2\": \"\{0,1\}\([^,\"}]*\).*/\1/p" "$1"; }

printf '# load average %s at the start\n# concurrency' "$load_start" > "$DATA"
for codec in $CODECS; do printf ' %s' "$codec" >> "$DATA"; done
printf '\n' >> "$DATA"
header="| concurrency |"; rule="| ---: |"
for codec in $CODECS; do header="$header $codec tok/s |"; rule="$rule ---: |"; done
table=""
for c in $CONCURRENCY; do
    row="$c"; mrow="| $c |"
    for codec in $CODECS; do
        runs=""
        for rep in $(seq "$REPEAT"); do
            try=1
            while :; do
                echo "plot_concurrency: concurrency $c, KV $codec, run $rep of $REPEAT (try $try)" >&2
                busy0=$(busy_s); times > "$tmp.times"; ours0=$(children_s); t0=$(now_s)
                "$BIN" bench --model "$MODEL" --concurrency "$c" --prompt-len "$PROMPT_LEN" --gen-len "$GEN_LEN" \
                    --kv "$codec" --threads "$THREADS" --json > "$tmp"
                t1=$(now_s); times > "$tmp.times"; ours1=$(children_s); busy1=$(busy_s)
                other=$(awk -v b="$busy1" -v B="$busy0" -v o="$ours1" -v O="$ours0" -v t="$t1" -v T="$t0" \
                    'BEGIN { x = ((b - B) - (o - O)) / (t - T); printf "%.2f", x < 0 ? 0 : x }')
                sed "s/}\$/, \"load_average_after\": $(load), \"other_cpu_cores\": $other, \"run\": $rep, \"try\": $try}/" "$tmp" >> "$RUNS"
                awk -v x="$other" -v m="$MAX_OTHER" 'BEGIN { exit !(x > m) }' && [ "$try" -lt "$TRIES" ] || break
                echo "plot_concurrency: other processes took $other cores: again" >&2
                try=$((try + 1))
            done
            other_max=$(awk -v a="$other" -v m="$other_max" 'BEGIN { print (a > m ? a : m) }')
            runs="$runs $(field "$tmp" output_tokens_per_s)"
        done
        # the median of the runs (the lower middle one for an even count)
        tps=$(echo $runs | tr ' ' '\n' | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
        echo "plot_concurrency: concurrency $c, KV $codec: runs$runs, median $tps" >&2
        row="$row $tps"; mrow="$mrow $tps |"
    done
    echo "$row" >> "$DATA"
    table="$table$mrow
"
done

load_end=$(load)
echo "# load average $load_end at the end; other processes took up to $other_max cores during a run" >> "$DATA"
if awk -v x="$other_max" -v m="$MAX_OTHER" 'BEGIN { exit !(x > m) }'; then
    echo "plot_concurrency: warning: other processes took up to $other_max cores during a run: the figures are disturbed" >&2
fi
n_codecs=$(echo $CODECS | wc -w)
gnuplot <<EOF
set terminal pngcairo size 900,560 font "sans,11" noenhanced
set output "$OUT"
set title "kvserve: output tokens/s against concurrency (median of $REPEAT runs)\n$(basename "$MODEL"), $PROMPT_LEN prompt + $GEN_LEN generated tokens per request\n$(nproc) cores; load average $load_start at the start, $load_end at the end; others took up to $other_max cores during a run"
set xlabel "concurrent requests"
set ylabel "output tokens/s"
set logscale x 2
set xtics ($(echo $CONCURRENCY | sed 's/ /, /g'))
set offsets graph 0.04, graph 0.04, 0, 0
set yrange [0:*]
set key top left
set grid
plot for [i=2:$((n_codecs + 1))] "$DATA" using 1:i with linespoints linewidth 2 pointtype 7 title "KV ".word("$CODECS", i-1)
EOF
echo "plot_concurrency: wrote $OUT ($DATA, $RUNS)" >&2
printf '%s\n%s\n%s' "$header" "$rule" "$table"
echo "load average $load_start at the start, $load_end at the end; other processes took up to $other_max cores during a run"
