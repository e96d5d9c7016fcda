#!/usr/bin/env bash
# Builds the atlas-serve binary. This is the one build command of the container image
# (Dockerfile) and of CI (.ci/deploy-checks), so that CI runs what the image build runs; CI uses
# `--profile dev` only because a release build costs it about ten more minutes on two cores.
#
#   deploy/build-server.sh [--profile release|dev] [--cuda] [--out DIR]
#   deploy/build-server.sh --deps-only [--profile ...] [--cuda]
#   deploy/build-server.sh --stubs-only
#
# --cuda       builds candle with CUDA kernels (needs nvcc and CUDA_COMPUTE_CAP, e.g. 80 for A100,
#              90 for H100: there is no GPU to query while an image builds). ATLAS_BUILD_CUDA=1
#              in the environment does the same (the Dockerfile's CUDA stage sets it).
# --out DIR    copies the binary to DIR/atlas-serve.
# --deps-only  compiles only the dependencies, over empty stand-ins for the workspace crates'
#              sources: the image's dependency layer, which then does not change when only the
#              sources do. Run it on a tree that holds the manifests and the lock file only.
# --stubs-only only writes those stand-ins (CI checks that they resolve the same dependencies).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
cuda=${ATLAS_BUILD_CUDA:-0}
deps_only=0
stubs_only=0
out=""
while (($#)); do
    case $1 in
        --profile) profile=${2:?--profile needs a value}; shift 2 ;;
        --cuda) cuda=1; shift ;;
        --deps-only) deps_only=1; shift ;;
        --stubs-only) stubs_only=1; shift ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        *) echo "build-server.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

# The workspace members, from the `members = [...]` array (one line or several).
members=$(awk '/^members *= *\[/ { f = 1 } f { print } f && /\]/ { exit }' Cargo.toml | grep -o '"[^"]*"' | tr -d '"' || true)
if [[ -z $members ]]; then
    echo "build-server.sh: no workspace members found in Cargo.toml" >&2
    exit 1
fi

args=(build --locked --profile "$profile" -p atlas-server)
if [[ $cuda == 1 ]]; then
    if [[ -z ${CUDA_COMPUTE_CAP:-} ]]; then
        echo "build-server.sh: --cuda needs CUDA_COMPUTE_CAP (e.g. 80 or 90)" >&2
        exit 2
    fi
    args+=(--features atlas-clip/cuda)
fi

# Stand-ins: an empty library, or `fn main() {}` for each [[bin]] path a manifest names.
write_stubs() {
    for m in $members; do
        bins=$(sed -n 's/^path *= *"\(.*\)"/\1/p' "$m/Cargo.toml")
        if [[ -n $bins ]]; then
            for b in $bins; do
                mkdir -p "$(dirname "$m/$b")"
                [[ -e $m/$b ]] || echo 'fn main() {}' >"$m/$b"
            done
        else
            mkdir -p "$m/src"
            [[ -e $m/src/lib.rs ]] || : >"$m/src/lib.rs"
        fi
    done
}

if ((stubs_only)); then
    write_stubs
    exit 0
fi

if ((deps_only)); then
    write_stubs
    cargo "${args[@]}"
    # Forget the stand-ins' artifacts, so that the real sources are compiled afterwards even
    # where their files are older than the stand-ins' build.
    cleans=()
    for m in $members; do
        cleans+=(-p "$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$m/Cargo.toml" | head -1)")
    done
    cargo clean --profile "$profile" "${cleans[@]}"
    exit 0
fi

cargo "${args[@]}"
if [[ -n $out ]]; then
    dir=$profile
    [[ $profile == dev ]] && dir=debug
    mkdir -p "$out"
    install -m 0755 "${CARGO_TARGET_DIR:-target}/$dir/atlas-serve" "$out/atlas-serve"
fi
