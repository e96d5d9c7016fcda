#!/usr/bin/env bash
# One aTLAS learning step on ViT-B/32-shaped random weights with 8 task vectors, on the CPU:
# atlas-serve (composed leaves + block reduction, f16 task vectors) next to the PyTorch reference
# (loop and stacked compositions, f32 task vectors), in one sitting. The two alternate, ROUNDS
# times per batch, so that both see the same share of the machine; the table gives each round's
# ratio and their median. Peak memory is each process's maximum RSS.
#
#   bench/learn.sh <torch_reference.py> [python] [out dir]   (python needs torch + transformers)
#
# Environment: BATCHES (default "8 32"), ROUNDS (3), ITERS steps per run (3), ATLAS the binary
# (default target/release/atlas-serve). Writes candle-b<B>-r<R>.json, torch-b<B>-r<R>.json,
# torch-b<B>-r<R>.rss, out.txt (everything printed) and learn.md (the table, also printed).
set -euo pipefail
ref=${1:?usage: bench/learn.sh <torch_reference.py> [python] [out dir]}
py=${2:-python3}
out=${3:-bench/results/learn-cpu}
bin=${ATLAS:-target/release/atlas-serve}
[ -x "$bin" ] || cargo build --release -p atlas-server
threads=$(nproc)
mkdir -p "$out"
exec > >(tee "$out/out.txt") 2>&1
echo "# machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
for b in ${BATCHES:-8 32}; do
  for r in $(seq "${ROUNDS:-3}"); do
    echo "== batch $b round $r: candle (load $(cut -d' ' -f1 /proc/loadavg))"
    "$bin" bench learn --mode leaves --batch "$b" --iters "${ITERS:-3}" | tee "$out/candle-b$b-r$r.json"
    echo "== batch $b round $r: torch (load $(cut -d' ' -f1 /proc/loadavg))"
    /usr/bin/time -f "%M" -o "$out/torch-b$b-r$r.rss" "$py" "$ref" --only learn \
      --learn-batches "$b" --iters "${ITERS:-3}" --threads "$threads" > "$out/torch-b$b-r$r.json"
    cat "$out/torch-b$b-r$r.json"
  done
done
"$py" "$(dirname "$0")/ratios.py" learn "$out" | tee "$out/learn.md"
