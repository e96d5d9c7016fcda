#!/usr/bin/env bash
# Runs kernels/attention.cu on the CPU, no GPU needed: g++ compiles the kernel source as host
# C++ (emu.h maps the CUDA built-ins used there to std::thread, std::barrier and host types;
# inc/ stands in for the fp16/bf16 headers), one OS thread per CUDA thread, under ASan/UBSan,
# and compares every output with a double-precision reference. Checks index math, barriers,
# masking and both load paths; says nothing about speed or the real compiler's code.
#
#   bench/cuda/emu/run.sh        # from the repository root; about a minute
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernel=$here/../../../crates/atlas-clip/kernels/attention.cu
bin=$(mktemp -d)/attention_test
trap 'rm -rf "$(dirname "$bin")"' EXIT
g++ -std=c++20 -O1 -pthread -fsanitize=address,undefined -Wno-unknown-pragmas \
  -I"$here/inc" -include "$here/emu.h" -include "$kernel" "$here/attention_test.cpp" -o "$bin"
"$bin"
