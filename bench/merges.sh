#!/usr/bin/env bash
# What each FusionBench merge costs on a ViT image tower with 8 random task vectors (f16, as
# the library stores them): wall time and peak memory, one process per method (peak RSS is
# per process). RegMean and Fisher merging read EXAMPLES random images per input (FusionBench:
# 256); their statistics grow linearly with that number, their solve does not.
#
#   bench/merges.sh [out dir]
#
# Environment: MODEL (B/32), EXAMPLES (256), METHODS (all), SLOW and SLOW_LAYERS (below), ATLAS
# the binary (default target/release/atlas-serve). Writes <method>.json and merges.md (the
# table of every <method>.json there, also printed).
set -euo pipefail
out=${1:-bench/results/merges-cpu}
bin=${ATLAS:-target/release/atlas-serve}
[ -x "$bin" ] || cargo build --release -p atlas-server
methods=${METHODS:-simple_average task_arithmetic ties_merging dare_task_arithmetic dare_ties_merging breadcrumbs magmax iso_c iso_cts tsv_m wudi regmean regmean_plusplus fisher_merging}
mkdir -p "$out"
# The SVD merges and WUDI take minutes to an hour on the whole tower: SLOW methods are timed on
# SLOW_LAYERS encoder layers and scaled (their work is per tensor).
slow=" ${SLOW:-iso_cts tsv_m wudi} "
for m in $methods; do
  layers=()
  [[ "$slow" == *" $m "* ]] && layers=(--layers "${SLOW_LAYERS:-1}")
  echo "== $m ${layers[*]} (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  "$bin" bench merge --method "$m" --model "${MODEL:-B/32}" --examples "${EXAMPLES:-256}" \
    "${layers[@]}" > "$out/$m.json"
done
python3 "$(dirname "$0")/merges_table.py" "$out" | tee "$out/merges.md"
