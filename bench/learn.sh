#!/usr/bin/env bash
# One aTLAS learning step on ViT-B/32-shaped random weights with 8 task vectors, on the CPU:
# atlas-serve (composed leaves + block reduction, f16 task vectors) next to the PyTorch reference
# (loop and stacked compositions, f32 task vectors), in one sitting. The two alternate, ROUNDS
# times per batch, so that both see the same share of the machine; the table gives each round's
# ratio and their median. Peak memory is each process's maximum RSS.
#
# With bf16 in DTYPES, each round also runs atlas-serve's step with `--dtype bf16` (the linear
# layers' products on the CPU's bf16 kernel, as autocast) next to bench/torch_learn_bf16.py,
# PyTorch's same step under torch.autocast(bfloat16) and at f32 in one process: the table sets
# ours against PyTorch's autocast and against PyTorch's faster of the two.
#
#   bench/learn.sh <torch_reference.py> [python] [out dir]   (python needs torch + transformers)
#
# Environment: BATCHES (default "8 32"), DTYPES ("f32 bf16"), ROUNDS (3), ITERS steps per run
# (3), ATLAS the binary (default target/release/atlas-serve). Writes candle-b<B>-r<R>.json,
# torch-b<B>-r<R>.json, torch-b<B>-r<R>.rss (f32), candle-bf16-b<B>-r<R>.json,
# torch-bf16-b<B>-r<R>.json (bf16), out.txt (everything printed) and learn.md (the tables, also
# printed).
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
echo "# flags: $(grep -m1 -o -w -E 'avx512f|avx512_bf16|amx_tile|amx_bf16' /proc/cpuinfo | tr '\n' ' ')"
dtypes=${DTYPES:-f32 bf16}
for b in ${BATCHES:-8 32}; do
  for r in $(seq "${ROUNDS:-3}"); do
    if [[ " $dtypes " == *" f32 "* ]]; then
      echo "== batch $b round $r: candle f32 (load $(cut -d' ' -f1 /proc/loadavg))"
      "$bin" bench learn --mode leaves --batch "$b" --iters "${ITERS:-3}" | tee "$out/candle-b$b-r$r.json"
      echo "== batch $b round $r: torch f32 (load $(cut -d' ' -f1 /proc/loadavg))"
      /usr/bin/time -f "%M" -o "$out/torch-b$b-r$r.rss" "$py" "$ref" --only learn \
        --learn-batches "$b" --iters "${ITERS:-3}" --threads "$threads" > "$out/torch-b$b-r$r.json"
      cat "$out/torch-b$b-r$r.json"
    fi
    if [[ " $dtypes " == *" bf16 "* ]]; then
      echo "== batch $b round $r: candle bf16 (load $(cut -d' ' -f1 /proc/loadavg))"
      "$bin" bench learn --mode leaves --dtype bf16 --batch "$b" --iters "${ITERS:-3}" \
        | tee "$out/candle-bf16-b$b-r$r.json"
      echo "== batch $b round $r: torch bf16 autocast and f32 (load $(cut -d' ' -f1 /proc/loadavg))"
      "$py" "$(dirname "$0")/torch_learn_bf16.py" --batches "$b" --iters "${ITERS:-3}" \
        --threads "$threads" | sed -n '/^{/,$p' > "$out/torch-bf16-b$b-r$r.json"
      cat "$out/torch-bf16-b$b-r$r.json"
    fi
  done
done
"$py" "$(dirname "$0")/ratios.py" learn "$out" | tee "$out/learn.md"
