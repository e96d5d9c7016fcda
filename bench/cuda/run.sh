#!/usr/bin/env bash
# On the GPU machine (CUDA 13 driver + PyTorch; no Rust, no network), from the unpacked
# target/cuda-dist folder that bench/cuda/build.sh made:
#
#   ./run.sh <torch_reference.py> [python] [out dir]
#
# Runs, in one sitting: `atlas-serve bench kernels --device cuda` (the custom kernels'
# self-check, first; kernels.txt; on a failure the rest runs with ATLAS_CUDA_KERNELS=0, plain
# candle ops), service.py (the server over HTTP on the CPU and the GPU, compared), `atlas-serve
# bench compose --device cuda`, then `atlas-serve bench classify --device cuda` and
# torch_reference.py on the same figures, alternating (classify.sh), serve_load.py (served
# /classify against the raw tower, f16), `atlas-serve bench learn --device cuda` at batch 8, 32
# and 128, then torch_reference.py's copy, compose and learn parts. Results and ratios land in
# the out dir (default $OUT, else ./results-gpu).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ref=${1:?usage: run.sh <torch_reference.py> [python] [out dir]}
py=${2:-/opt/torch/.venv/bin/python}
out=${3:-${OUT:-$here/results-gpu}}
mkdir -p "$out"

# cudarc opens the unversioned names (libcublas.so, ...) first: link them to PyTorch's CUDA 13
# libraries in a folder placed first on LD_LIBRARY_PATH; the driver is libcuda.so.1.
cu13=$("$py" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
links=$(mktemp -d)
for f in "$cu13"/lib*.so.*; do
  b=$(basename "$f"); ln -sf "$f" "$links/${b%%.so.*}.so"
done
export LD_LIBRARY_PATH=$links:$cu13:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true; } | tee "$out/machine.txt"
"$py" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)' | tee -a "$out/machine.txt"

# The custom CUDA kernels against plain candle ops on this GPU first. If one fails its check,
# the rest of the run uses plain candle ops (ATLAS_CUDA_KERNELS=0), so it still gives baseline
# figures, and kernels.txt says so.
if ! "$here/atlas-serve" bench kernels --device cuda 2>&1 | tee "$out/kernels.txt"; then
  echo "a kernel failed its check: the rest of this run uses plain candle ops (ATLAS_CUDA_KERNELS=0)" |
    tee -a "$out/kernels.txt"
  export ATLAS_CUDA_KERNELS=0
fi
# The service for real: the same HTTP requests (pre-trained, explicit, coefficient 100, a short
# few-shot job) on the CPU at f32 and on the GPU at f16 and bf16, probabilities compared
# (service.py; standard library only). A failure is recorded, the run goes on.
"$py" "$here/service.py" --bin "$here/atlas-serve" --out "$out/service" \
  --configs cpu:f32,cuda:f16,cuda:bf16 2>&1 | tee "$out/service.txt" ||
  echo "service.py found a failure (service/service.json)" | tee -a "$out/service.txt"
# Device-resident composition of 8 task vectors next to a device copy of the same bytes (it
# checks the device result against the host's first; a failure is recorded, the run goes on).
"$here/atlas-serve" bench compose --device cuda --n-tv 8 --out "$out/compose_cuda.json" 2>&1 |
  tee "$out/compose_cuda.txt" || echo "bench compose --device cuda failed" | tee -a "$out/compose_cuda.txt"

ATLAS=$here/atlas-serve DEVICE=cuda ITERS=${ITERS:-20} MAX_SECONDS=${MAX_SECONDS:-20} \
  "$here/classify.sh" "$ref" "$py" "$out/classify"
# Served /classify throughput (single-image requests, concurrency 1 to 64) against the raw
# tower at the batch the server ran, f16 on the GPU (serve_load.py).
model=$(mktemp -d)
"$here/atlas-serve" bench write-model --vision B/32 --out "$model" >/dev/null
"$py" "$here/serve_load.py" --bin "$here/atlas-serve" --model "$model" --device cuda --dtype f16 \
  --concurrency 1,8,32,64 --out "$out/serve_load_cuda_f16.json" 2>&1 | tee "$out/serve_load.txt" ||
  echo "serve_load.py failed" | tee -a "$out/serve_load.txt"
# One aTLAS learning step (8 task vectors, f32) at the reference's batch sizes, then PyTorch's.
for b in 8 32 128; do
  "$here/atlas-serve" bench learn --device cuda --batch "$b" --iters 5 > "$out/learn_cuda_bs$b.json"
done
"$py" "$ref" --only copy,compose,learn --learn-batches 8,32,128 > "$out/torch_reference.json"
echo "results in $out"
