#!/bin/bash
# gpu_pack.sh: packs a build's GPU programs for the device machine, where
# only 64 MiB travel per call with the tree (two uncompressed programs are
# ~60 MB, xz takes each to ~24 MB):
#   tools/gpu_pack.sh NAME [BUILD]
# writes build-pack/NAME/gpu_test.xz, gpu_bench.xz, rows_test.xz, rows_bench.xz and cands_test.xz
# from BUILD/gpu/
# (default build-gpu; build it first with `make BUILD=build-gpu gpu-bins`);
# PROGS="kvserve gpu_engine" packs those instead (from BUILD/gpu/ or BUILD/:
# a CUDA=1 build's engine programs, for gpu_bench.sh's engine step).
# build-pack/ is ignored by git: name the folders in the device call's carry,
# then on the device `AB="build-pack/old build-pack/new" STEPS=ab
# tools/gpu_bench.sh` unpacks them and times one against the other, and
# `BUILD=build-pack/NAME STEPS="test san" tools/gpu_bench.sh` runs the
# checks on a packed build.
set -eu
name=${1:?usage: tools/gpu_pack.sh NAME [BUILD]}
build=${2:-build-gpu}
case $name in */* | .* | "") echo "gpu_pack: NAME must be a plain folder name, not '$name'" >&2; exit 2 ;; esac
dst=build-pack/$name
mkdir -p "$dst"
for p in ${PROGS:-gpu_test gpu_bench rows_test rows_bench cands_test}; do
    src=$build/gpu/$p
    [ -x "$src" ] || src=$build/$p
    [ -x "$src" ] || { echo "gpu_pack: $build/gpu/$p missing: make BUILD=$build gpu-bins (CUDA=1 for the engine's)" >&2; exit 1; }
    xz -T0 -6 -c "$src" >"$dst/$p.xz"
done
git rev-parse --short HEAD >"$dst/commit" 2>/dev/null || true
du -b "$dst"/*.xz | awk '{s += $1; print} END {printf "gpu_pack: %.1f MiB in %s\n", s / 1048576, dst}' dst="$dst"
