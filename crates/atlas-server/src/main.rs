//! The `atlas-serve` binary: one subcommand per job.

mod alloc;
mod bench;
mod cli;
mod device;
mod server;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use cli::{demo, finetune, learn, merge, serve, task_vector};

#[derive(Parser)]
#[command(
    name = "atlas-serve",
    version,
    about = "Model merging with learned anisotropic task-vector scaling (aTLAS) for CLIP"
)]
pub(crate) struct Cli {
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
    /// Merge task vectors by a FusionBench method into one task vector.
    Merge(merge::Args),
    /// Learn aTLAS coefficients on an ImageFolder directory.
    Learn(learn::Args),
    /// Fine-tune a CLIP image tower on an ImageFolder directory and write its task vector.
    Finetune(finetune::Args),
    /// The offline demo world: build it, fine-tune, replicate the paper's experiments.
    #[command(subcommand)]
    Demo(demo::Command),
    /// Benchmarks (composition bandwidth, classification throughput, the learning step, the
    /// kernels' self-check) and a random-weight model for serving benchmarks.
    #[command(subcommand)]
    Bench(bench::Command),
}

/// candle runs its element-wise CPU ops on a pool of its own whose threads spin between ops,
/// beside the rayon threads that run gemm and this project's kernels: on 2 cores the two pools
/// took turns, and a ViT-B/32 learning step spent a tenth of its time spinning at candle's
/// barrier (inference was unaffected). So unless the user says otherwise, candle's element-wise
/// ops run on the calling thread alone; gemm keeps every core.
fn one_elementwise_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

fn main() -> anyhow::Result<()> {
    one_elementwise_thread();
    alloc::keep_freed_memory_longer();
    let command = Cli::command().mut_subcommand("serve", server::config::describe_flags);
    let cli = Cli::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Serve(a) => serve::run(*a),
        Command::TaskVector(c) => task_vector::run(c),
        Command::Merge(a) => merge::run(a),
        Command::Learn(a) => learn::run(a),
        Command::Finetune(a) => finetune::run(a),
        Command::Demo(c) => demo::run(c),
        Command::Bench(c) => bench::run(c),
    }
}
