# syntax=docker/dockerfile:1
#
# The atlas-serve image, for CPU (default) or NVIDIA GPU. From the repository root:
#
#     docker build -t atlas-serve:cpu .
#     docker build -t atlas-serve:cuda --build-arg VARIANT=cuda --build-arg CUDA_COMPUTE_CAP=90 .
#     docker run --rm -p 8080:8080 -v atlas-data:/data -v atlas-cache:/cache atlas-serve:cpu
#
# CUDA_COMPUTE_CAP is the GPU's compute capability without the dot (80 A100, 86 A10/RTX 30xx,
# 89 L4/L40, 90 H100): candle compiles its kernels for it, and no GPU can be queried while an
# image builds. Run the CUDA image with `--gpus all` (NVIDIA Container Toolkit).
#
# Both variants compile with deploy/build-server.sh, which CI runs too (.ci/deploy-checks, in
# the dev profile). The only network used while building is the base images' registry, Debian's
# or Ubuntu's package archive and crates.io.

ARG VARIANT=cpu
ARG RUST_VERSION=1.89
ARG CUDA_VERSION=12.4.1

# ------------------------------------------------------------------------------ toolchains
FROM rust:${RUST_VERSION}-bookworm AS build-cpu

# The CUDA devel image has nvcc and the CUDA libraries but no Rust: take the toolchain of the
# official Rust image (rustup's toolchains run on any glibc this recent).
FROM rust:${RUST_VERSION}-bookworm AS rust
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build-cuda
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} ATLAS_BUILD_CUDA=1

# ------------------------------------------------------------------------------ build
# hadolint ignore=DL3006
FROM build-${VARIANT} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
# Dependencies first, over stand-ins for the workspace's sources: this layer is rebuilt only when
# a manifest or the lock file changes. CI checks that these COPY lines name every member's
# manifest and that the stand-ins resolve the same dependencies as the real sources.
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY crates/atlas-core/Cargo.toml crates/atlas-core/
COPY crates/atlas-clip/Cargo.toml crates/atlas-clip/
COPY crates/atlas-learn/Cargo.toml crates/atlas-learn/
COPY crates/atlas-demo/Cargo.toml crates/atlas-demo/
COPY crates/atlas-server/Cargo.toml crates/atlas-server/
COPY deploy/build-server.sh deploy/
RUN deploy/build-server.sh --deps-only
# Then the sources.
COPY crates ./crates
RUN deploy/build-server.sh --out /out

# ------------------------------------------------------------------------------ runtimes
FROM debian:bookworm-slim AS runtime-cpu
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04 AS runtime-cuda
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility

# hadolint ignore=DL3006
FROM runtime-${VARIANT}
# CA certificates for the Hugging Face hub, curl for HEALTHCHECK. Versions come from the base
# image's release, which is pinned by the FROM lines.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid, so that Kubernetes' runAsUser and fsGroup can name it (deploy/kubernetes).
RUN groupadd --system --gid 10001 atlas \
    && useradd --system --uid 10001 --gid atlas --no-create-home --home-dir /nonexistent atlas \
    && mkdir -p /data/task-vectors /data/store /cache/huggingface /cache/atlas-serve \
    && chown -R atlas:atlas /data /cache
COPY --from=build /out/atlas-serve /usr/local/bin/atlas-serve
USER 10001:10001
# /data: the server's data (the task-vector library, the store); /cache: the Hugging Face hub
# cache and the demo world. The root file system can then be read-only.
ENV ATLAS_LISTEN=0.0.0.0:8080 \
    ATLAS_TV_DIR=/data/task-vectors \
    ATLAS_DATA_DIR=/data/store \
    HF_HOME=/cache/huggingface \
    ATLAS_CACHE=/cache/atlas-serve
VOLUME ["/data", "/cache"]
EXPOSE 8080
# The process answers (GET /healthz); readiness (/readyz) is for the orchestrator to wait on.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15m --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["atlas-serve"]
# Settings come from flags or ATLAS_* variables (config/README.md), e.g.
# -e ATLAS_MODEL=openai/clip-vit-base-patch32; without a model the demo world is served.
CMD ["serve"]
