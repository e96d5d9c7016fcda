#!/usr/bin/env bash
# Classification throughput, atlas-serve (candle) vs PyTorch eager, in one sitting.
#
#   bench/classify.sh <torch_reference.py> [python] [out dir]
#
# For every (model, batch) of $PLAN it runs `atlas-serve bench classify` and then
# torch_reference.py --only classify on the same figure, ROUNDS times, so the two alternate and
# share the machine's load; the 1-minute load average is recorded before each run. Writes, under
# the out dir (default bench/results/classify-<device>): candle.jsonl (one record per round),
# torch-<figure>-r<round>.json, load.txt and classify.md (table + candle/PyTorch ratios per
# round and their median, also printed).
#
# Environment:
#   PLAN     "model:batches ..." (default "B/32:1,8,32,256 B/16:1,8,32 L/14:1,8" on CPU)
#   DTYPES   candle dtypes (default f32,bf16 on CPU; f32,f16,bf16 on cuda). On a CPU, PyTorch's
#            bf16 figures come from torch_cpu_bf16.py beside this script (model.to(bfloat16),
#            eager: the best configuration PyTorch offers on CPUs with bf16 units), its f32
#            ones from torch_reference.py.
#   DEVICE   cpu or cuda (default cpu)
#   THREADS  CPU threads for both (default: all cores)
#   ITERS    timed passes per figure for both (default 3); MAX_SECONDS bounds candle's (60)
#   ROUNDS   times each figure is taken on both sides, alternating (default 1): on a machine
#            whose speed drifts over minutes, the median of the rounds' ratios
#   ATLAS    the atlas-serve binary (default target/release/atlas-serve)
set -euo pipefail
ref=${1:?usage: bench/classify.sh <torch_reference.py> [python] [out dir]}
py=${2:-python3}
device=${DEVICE:-cpu}
out=${3:-bench/results/classify-$device}
atlas=${ATLAS:-target/release/atlas-serve}
threads=${THREADS:-$(nproc)}
iters=${ITERS:-3}
rounds=${ROUNDS:-1}
if [ "$device" = cpu ]; then
  plan=${PLAN:-"B/32:1,8,32,256 B/16:1,8,32 L/14:1,8"}
  dtypes=${DTYPES:-f32,bf16}
else
  plan=${PLAN:-"B/32:1,8,32,256 B/16:1,8,32,256 L/14:1,8,32,256"}
  dtypes=${DTYPES:-f32,f16,bf16}
fi
mkdir -p "$out"
: > "$out/candle.jsonl"
: > "$out/load.txt"
export RAYON_NUM_THREADS=$threads
torch_dtypes=$(echo "$dtypes" | sed 's/bf16/bfloat16/; s/f16/float16/; s/f32/float32/')
cpu_bf16=
if [ "$device" = cpu ] && echo ",$dtypes," | grep -q ',bf16,'; then
  cpu_bf16=1
  torch_dtypes=$(echo "$dtypes" | tr , '\n' | { grep -v '^bf16$' || true; } | sed 's/f16/float16/; s/f32/float32/' | paste -sd,)
fi
load() { cut -d' ' -f1 /proc/loadavg; }
for item in $plan; do
  model=${item%%:*}
  for bs in $(echo "${item#*:}" | tr , " "); do
    for round in $(seq 1 "$rounds"); do
      tag=$(echo "$model" | tr -d /)-bs$bs-r$round
      echo "== $model batch $bs round $round (load $(load))" >&2
      echo "$tag candle $(load)" >> "$out/load.txt"
      "$atlas" bench classify --device "$device" --models "$model" --dtypes "$dtypes" \
        --batches "$bs" --iters "$iters" --max-seconds "${MAX_SECONDS:-60}" --out "$out/candle.jsonl" >&2
      echo "$tag torch $(load)" >> "$out/load.txt"
      if [ -n "$torch_dtypes" ]; then
        "$py" "$ref" --only classify --models "$model" --dtypes "$torch_dtypes" --batches "$bs" \
          --iters "$iters" --threads "$threads" > "$out/torch-$tag.json"
      fi
      if [ -n "$cpu_bf16" ]; then
        echo "$tag torch-bf16 $(load)" >> "$out/load.txt"
        "$py" "$(dirname "$0")/torch_cpu_bf16.py" --models "$model" --dtypes bfloat16 \
          --batches "$bs" --iters "$iters" --threads "$threads" \
          --out "$out/torch-bf16-$tag.json" > /dev/null
      fi
    done
  done
done
echo "end $(load)" >> "$out/load.txt"
"$py" "$(dirname "$0")/ratios.py" classify "$out" | tee "$out/classify.md"
