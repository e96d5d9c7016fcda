#!/usr/bin/env bash
# CPU composition of 8 task vectors (ViT-B/32 image tower), atlas-serve vs a memory copy vs
# PyTorch, in one sitting:
#
#   bench/compose.sh <torch_reference.py> [python] [out dir]
#
# Writes ours-f16.{json,txt}, ours-f32.{json,txt}, torch.json and load.txt (1-minute load
# average before each run) under the out dir (default bench/results/compose-cpu/latest).
# ITERS sets the timed iterations of ours (default 10).
set -euo pipefail
ref=${1:?usage: bench/compose.sh <torch_reference.py> [python] [out dir]}
py=${2:-python3}
out=${3:-bench/results/compose-cpu/latest}
atlas=${ATLAS:-target/release/atlas-serve}
iters=${ITERS:-10}
mkdir -p "$out"
load() { cut -d' ' -f1 /proc/loadavg; }
echo "f16 $(load)" > "$out/load.txt"
"$atlas" bench compose --iters "$iters" --out "$out/ours-f16.json" | tee "$out/ours-f16.txt"
echo "torch $(load)" >> "$out/load.txt"
"$py" "$ref" --only copy,compose --threads "$(nproc)" > "$out/torch.json"
echo "f32 $(load)" >> "$out/load.txt"
"$atlas" bench compose --store f32 --iters "$iters" --out "$out/ours-f32.json" | tee "$out/ours-f32.txt"
echo "end $(load)" >> "$out/load.txt"
cat "$out/torch.json"
