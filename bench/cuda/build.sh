#!/usr/bin/env bash
# Builds atlas-serve with candle's CUDA backend on a CPU-only x86-64 Linux build machine (no
# GPU, no CUDA install) and packs it with the GPU run script:
#
#   bench/cuda/build.sh [python]        # from the repository root
#
# Output: target/cuda-dist/ (atlas-serve, run.sh, service.py, classify.sh, ratios.py,
# serve_load.py) and target/cuda-dist.tar.gz. Copy that to the GPU machine and run
# bench/cuda/run.sh there.
#
# What it does (see docs in README "Benchmarks"):
#  1. nvcc 13.0 and the CUDA headers from PyPI wheels (pip download, unpacked with zipfile:
#     nvidia-cuda-nvcc, nvidia-nvvm, nvidia-cuda-crt, nvidia-cuda-runtime, nvidia-cuda-cccl).
#  2. CUDA_COMPUTE_CAP=90 (H100/H200; there is no nvidia-smi to ask), compressed kernels.
#  3. candle-kernels links -lcudart: a libcudart.so linker script points at the static cudart.
#  4. cudarc: candle-core 0.11.1 asks for `dynamic-linking` + `cuda-version-from-build-system`;
#     a patched copy of candle-core (only change: `cuda-13000` + `dynamic-loading`) makes the
#     binary open libcuda/libcublas/libcurand/libnvrtc at run time, from PyTorch's CUDA 13
#     wheels on the GPU machine. The patch is given on the cargo command line (--config); the
#     workspace's Cargo.toml is not touched and Cargo.lock is restored afterwards.
#  5. cargo build --release -p atlas-server --features cuda into target/cuda (a separate target
#     dir, so the CPU build in target/release is not invalidated).
#
# Expected duration: about 13 minutes cold on 2 cores (mostly nvcc compiling candle-kernels),
# plus the Rust crates (about 10 more minutes cold on 2 cores); about 1 GB of wheels unpacked
# and 3 GB of build output under target/.
set -euo pipefail
py=${1:-python3}
# Steps 1-4.
source "$(dirname "$0")/env.sh"

# 5. The build.
time cargo build --release -p atlas-server --features cuda --target-dir target/cuda \
  --config "$candle_patch"

dist=$root/target/cuda-dist
rm -rf "$dist" && mkdir -p "$dist"
cp target/cuda/release/atlas-serve "$dist/"
strip "$dist/atlas-serve" 2>/dev/null || true
cp bench/cuda/run.sh bench/cuda/service.py bench/classify.sh bench/ratios.py bench/serve_load.py "$dist/"
tar -C "$root/target" -czf "$root/target/cuda-dist.tar.gz" cuda-dist
ls -la "$dist"
echo "glibc symbols needed: $(objdump -T "$dist/atlas-serve" | grep -o 'GLIBC_[0-9.]*' | sort -Vu | tail -1)"
