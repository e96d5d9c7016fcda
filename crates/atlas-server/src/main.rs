//! The `atlas-serve` binary: one subcommand per job.

mod bench;
mod bench_classify;
mod bench_learn;
mod bench_serve;
mod config;
mod demo;
mod finetune_cmd;
mod learn;
mod serve;
mod server;
mod task_vector;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "atlas-serve",
    version,
    about = "Model merging with learned anisotropic task-vector scaling (aTLAS) for CLIP"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve zero-shot classification from compositions over HTTP (the demo world when no
    /// model is given).
    Serve(Box<serve::Args>),
    /// Build, convert or inspect task vectors.
    #[command(subcommand, name = "task-vector")]
    TaskVector(task_vector::Command),
    /// Learn aTLAS coefficients on an ImageFolder directory.
    Learn(learn::Args),
    /// Fine-tune a CLIP image tower on an ImageFolder directory and write its task vector.
    Finetune(finetune_cmd::Args),
    /// The offline demo world: build it, fine-tune, replicate the paper's experiments.
    #[command(subcommand)]
    Demo(demo::Command),
    /// Benchmarks (composition bandwidth, classification throughput) and a random-weight model
    /// for serving benchmarks.
    #[command(subcommand)]
    Bench(bench::Command),
    /// One learning step on ViT-B/32-shaped random weights: time and peak memory.
    #[command(name = "bench-learn")]
    BenchLearn(bench_learn::LearnArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve(a) => serve::run(*a),
        Command::TaskVector(c) => task_vector::run(c),
        Command::Learn(a) => learn::run(a),
        Command::Finetune(a) => finetune_cmd::run(a),
        Command::Demo(c) => demo::run(c),
        Command::Bench(c) => bench::run(c),
        Command::BenchLearn(a) => bench_learn::run_learn(a),
    }
}
