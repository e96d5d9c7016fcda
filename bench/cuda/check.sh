#!/usr/bin/env bash
# Checks that the CUDA build compiles (candle's CUDA backend, atlas-clip's kernels through nvcc,
# the cuda_fwd glue) without linking or packing it: the quick gate before build.sh.
#
#   bench/cuda/check.sh [python]        # from the repository root
#
# Shares build.sh's toolchain and environment (env.sh) and its target dir, target/cuda, in the
# release profile, so candle-kernels' compiled kernels are reused.
set -euo pipefail
py=${1:-python3}
source "$(dirname "$0")/env.sh"
cargo check --release -p atlas-server --features cuda --target-dir target/cuda \
  --config "$candle_patch"
