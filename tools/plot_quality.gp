# plot_quality.gp: ΔPPL against whole-KV compression ratio, one labelled
# point per KV setting, the Pareto-best ones joined, from the data
# tools/quality_table.sh writes (name, ratio, ΔPPL %, Pareto-best 0/1;
# tab-separated; pareto: the Pareto-best rows by ratio).
#   gnuplot -e "data='quality/quality.dat'; pareto='quality/pareto.dat'; out='quality/kv_quality.png'" tools/plot_quality.gp
if (!exists("data")) data = 'quality/quality.dat'
if (!exists("pareto")) pareto = 'quality/pareto.dat'
if (!exists("out")) out = 'quality/kv_quality.png'
set terminal pngcairo size 1400,900 font ",10"
set output out
set datafile separator "\t"
set title "KV codecs on SmolLM2-135M, WikiText-2 test: perplexity change vs compression (f16 = 1x)"
set xlabel "whole-KV compression ratio against f16 (scales and padding included)"
set ylabel "ΔPPL against f16 (%, log scale)"
set logscale y
set yrange [0.01:*]
set xrange [0.8:*]
set offsets 0, 0.7, 0, 0
set grid
set key bottom right box opaque
# ΔPPL below 0.01% (or negative: noise) is drawn at 0.01
clip(y) = y < 0.01 ? 0.01 : y
plot pareto using 2:(clip($3)) with lines lw 2 lc rgb "#9467bd" title "Pareto-best settings", \
     data using 2:(clip($3)):($4 > 0 ? 0xd62728 : 0x1f77b4) with points pt 7 ps 1.2 lc rgb variable notitle, \
     data using 2:(clip($3)):1 with labels offset 0.8,0.6 left font ",8" notitle, \
     6 with lines dt 2 lc rgb "#d62728" title "6% (target for >= 5x)", \
     3 with lines dt 2 lc rgb "#ff7f0e" title "3% (target for >= 3.5x)", \
     0.5 with lines dt 3 lc rgb "#2ca02c" title "0.5% (target for int8)"
