#!/usr/bin/env bash
# One aTLAS learning step on ViT-B/32-shaped random weights with 8 task vectors, on the CPU:
# atlas-serve (composed leaves + block reduction, f16 task vectors) and the same composition
# built inside the autograd graph, next to the PyTorch reference (loop and stacked
# compositions), in one sitting. Peak memory is each process's maximum RSS.
# Usage: bench/learn.sh PATH/TO/torch_reference.py [PYTHON]   (needs: pip install torch transformers)
set -euo pipefail
ref=${1:?path to torch_reference.py}
py=${2:-python3}
bin=target/release/atlas-serve
[ -x "$bin" ] || cargo build --release -p atlas-server
threads=$(nproc)
echo "# machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), $(free -g | awk '/Mem:/ {print $2}') GiB RAM"
for b in 8 32; do
  "$bin" bench-learn --mode leaves --batch "$b" --iters 3
done
"$bin" bench-learn --mode graph --batch 8 --iters 2
for b in 8 32; do
  /usr/bin/time -f "torch_peak_rss_kib=%M batch=$b" "$py" "$ref" --only learn --learn-batches "$b" --iters 3 --threads "$threads"
done
