//! `atlas-serve bench`: benchmarks, not tests. One file per benchmark; [`common`] holds what
//! they share.

mod classify;
pub(crate) mod common;
mod compose;
mod compose_device;
mod kernels;
mod learn;
mod merge;
mod write_model;

#[derive(clap::Subcommand)]
pub enum Command {
    /// CPU composition of task vectors over the ViT-B/32 image tower, next to a memory copy of
    /// the same bytes and the naive one-pass-per-task-vector loop.
    Compose(compose::ComposeArgs),
    /// Image-embedding throughput of a random ViT image tower per batch size and dtype.
    Classify(classify::ClassifyArgs),
    /// Write a CLIPModel directory with random weights (a B/32, B/16 or L/14 image tower, a
    /// small text tower on the demo vocabulary) for `serve --model DIR` and bench/serve_load.py.
    #[command(name = "write-model")]
    WriteModel(write_model::WriteModelArgs),
    /// Self-check of the custom ops (fused kernels, composition) against plain candle ops on
    /// one device, with timings; exits non-zero when one differs beyond tolerance.
    Kernels(kernels::KernelsArgs),
    /// One aTLAS learning step on ViT-B/32-shaped random weights: time and peak memory.
    Learn(learn::LearnArgs),
    /// One FusionBench merge over random task vectors on a ViT image tower: time and peak
    /// memory (the data merges on random images).
    Merge(merge::MergeArgs),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Compose(a) => compose::run(a),
        Command::Classify(a) => classify::run(a),
        Command::WriteModel(a) => write_model::run(a),
        Command::Kernels(a) => kernels::run(a),
        Command::Learn(a) => learn::run(a),
        Command::Merge(a) => merge::run(a),
    }
}
