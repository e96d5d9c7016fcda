#!/usr/bin/env bash
# What each FusionBench merge costs on a ViT image tower with 8 random task vectors (f16, as
# the library stores them): wall time and peak memory, one process per method (peak RSS is
# per process). RegMean and Fisher merging read EXAMPLES random images per input (FusionBench:
# 256); their statistics grow linearly with that number, their solve does not.
#
#   bench/merges.sh [out dir]
#
# Environment: MODEL (B/32), EXAMPLES (256), METHODS (all), ATLAS the binary (default
# target/release/atlas-serve). Writes <method>.json and merges.md (the table, also printed).
set -euo pipefail
out=${1:-bench/results/merges-cpu}
bin=${ATLAS:-target/release/atlas-serve}
[ -x "$bin" ] || cargo build --release -p atlas-server
methods=${METHODS:-simple_average task_arithmetic ties_merging dare_task_arithmetic dare_ties_merging breadcrumbs magmax iso_c iso_cts tsv_m wudi regmean fisher_merging}
mkdir -p "$out"
for m in $methods; do
  echo "== $m (load $(cut -d' ' -f1 /proc/loadavg))" >&2
  "$bin" bench merge --method "$m" --model "${MODEL:-B/32}" --examples "${EXAMPLES:-256}" > "$out/$m.json"
done
python3 - "$out" $methods <<'PY' | tee "$out/merges.md"
import json, sys
out, methods = sys.argv[1], sys.argv[2:]
rows = [json.load(open(f"{out}/{m}.json")) for m in methods]
r0 = rows[0]
mc = r0["machine"]
print(f"# Merge costs: {r0['model']} image tower, {r0['n_tv']} task vectors ({r0['store']})\n")
print(f"Machine: {mc['cpu']}, {mc['logical_cores']} logical cores, {', '.join(mc['features'])}. "
      "Command: `bench/merges.sh`. Peak memory is the process's maximum RSS, the backbone "
      "(θ0 at f32) and the task vectors included; after setup is before the merge starts.\n")
print("| method | time (s) | peak RSS (GiB) | after setup (GiB) | images per input |")
print("|---|---:|---:|---:|---:|")
for r in rows:
    ex = r["examples"] if r["examples"] is not None else ""
    print(f"| `{r['method']}` | {r['seconds']:.2f} | {r['peak_rss_gib']:.2f} | "
          f"{r['peak_rss_gib_after_setup']:.2f} | {ex} |")
PY
