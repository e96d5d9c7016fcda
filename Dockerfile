# syntax=docker/dockerfile:1
#
# Multi-stage build of the atlas-serve binary (CPU). Build from the repository root:
#
#     docker build -t atlas-serve .
#     docker run --rm -p 8080:8080 -v atlas-data:/data -e ATLAS_MODEL=openai/clip-vit-base-patch32 atlas-serve
#
# NOT TESTED: this file was written on a machine without a Docker engine; it has never been
# built. Expect to fix small things the first time it is.
#
# Only Cargo.toml, Cargo.lock and crates/ are copied, so BuildKit sends just those from the
# build context (target/ and the test fixtures stay out).

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# The cache mounts keep the crates.io registry and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p atlas-server \
    && install -m 0755 target/release/atlas-serve /usr/local/bin/atlas-serve

FROM debian:bookworm-slim
# CA certificates for downloads from the Hugging Face hub; nothing else is needed at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# A fixed uid/gid (10001) so that Kubernetes' runAsNonRoot/runAsUser can name it (deploy/).
RUN groupadd --system --gid 10001 atlas \
    && useradd --system --uid 10001 --gid atlas --create-home --home-dir /home/atlas atlas \
    && mkdir -p /data/hf /data/task-vectors \
    && chown -R atlas:atlas /data
COPY --from=builder /usr/local/bin/atlas-serve /usr/local/bin/atlas-serve
USER atlas
# Data: the Hugging Face cache (models and checkpoints named by hub id) and task vectors.
ENV HF_HOME=/data/hf
VOLUME ["/data"]
# `serve` listens on 127.0.0.1 by default; in a container it must listen on every interface.
ENV ATLAS_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["atlas-serve"]
# The main job. Settings come from flags or ATLAS_* environment variables (config/README.md),
# e.g. -e ATLAS_MODEL=openai/clip-vit-base-patch32 -e ATLAS_TV_DIR=/data/task-vectors.
CMD ["serve"]
