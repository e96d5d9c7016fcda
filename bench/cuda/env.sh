# Sourced by bench/cuda/build.sh and bench/cuda/check.sh, from the repository root, with $py
# set to a Python 3: the CUDA 13.0 toolchain from PyPI wheels (downloaded once), the environment
# bindgen_cuda, candle-kernels and atlas-clip's build.rs read, static cudart, and a patched copy
# of candle-core ($candle_patch is the `--config` that points cargo at it). Restores Cargo.lock
# on exit (the patch rewrites it).
root=$(pwd)
[ -f Cargo.toml ] && [ -d crates/atlas-server ] || { echo "run from the repository root" >&2; exit 1; }
work=$root/target/cuda-toolchain
mkdir -p "$work/wheels" "$work/unpacked" "$work/link"

# 1. The CUDA 13.0 compiler and headers.
if [ ! -x "$work/unpacked/nvidia/cu13/bin/nvcc" ]; then
  "$py" -m pip download --no-deps --only-binary=:all: -d "$work/wheels" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
  for w in "$work"/wheels/*.whl; do "$py" -m zipfile -e "$w" "$work/unpacked"; done
fi
cu=$work/unpacked/nvidia/cu13
chmod +x "$cu"/bin/* "$cu"/nvvm/bin/* 2>/dev/null || true
"$cu/bin/nvcc" --version | tail -2

# 2. Environment for bindgen_cuda / candle-kernels.
export CUDA_ROOT=$cu CUDA_HOME=$cu CUDA_PATH=$cu NVCC=$cu/bin/nvcc PATH=$cu/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export NVCC_APPEND_FLAGS=${NVCC_APPEND_FLAGS:---compress-mode=size}

# 3. Static cudart behind the -lcudart that candle-kernels asks for.
echo "INPUT($cu/lib/libcudart_static.a -lpthread -ldl -lrt)" > "$work/link/libcudart.so"
export RUSTFLAGS="${RUSTFLAGS:-} -L native=$work/link"

# 4. candle-core with cudarc's run-time loading of the CUDA 13 libraries.
cargo fetch --locked >/dev/null
# The workspace's own copy (vendor/candle-core, with its changes), copied again only when it
# changes: a fresh copy has new mtimes, which would rebuild candle-core and everything above it.
stamp=$(cd "$root" && find vendor/candle-core -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum)
if [ "$(cat "$work/candle-core.stamp" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "$work/candle-core" && cp -r "$root/vendor/candle-core" "$work/candle-core"
  "$py" - "$work/candle-core/Cargo.toml" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
old = '"cuda-version-from-build-system",\n    "dynamic-linking",'
assert old in s, "candle-core's cudarc features changed; update bench/cuda/env.sh"
open(p, "w").write(s.replace(old, '"cuda-13000",\n    "dynamic-loading",'))
PY
  echo "$stamp" > "$work/candle-core.stamp"
fi
candle_patch="patch.crates-io.candle-core.path=\"$work/candle-core\""
cp Cargo.lock "$work/Cargo.lock.orig"
trap 'cp "$work/Cargo.lock.orig" "$root/Cargo.lock"' EXIT

