//! `atlas-serve demo …`: the offline demo world (generated scenes + UCI digits, a tiny CLIP
//! pre-trained here, one fine-tuned task vector per task), built once and cached.

use anyhow::{bail, Context};
use atlas_demo::replicate::ReplicateConfig;
use atlas_demo::tasks::{task_specs, Split};
use atlas_demo::world::{default_cache_root, task_data, world_dir, BuildReport};
use atlas_demo::{Preset, World, WorldParams};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Build the demo world (or find it in the cache) and print zero-shot and fine-tuned
    /// accuracy per task.
    Build(BuildArgs),
    /// Write one task's split as an ImageFolder directory (one subfolder of PNGs per class),
    /// e.g. for `atlas-serve finetune`.
    Export(ExportArgs),
    /// Run the paper's experiments on the world (building it first if needed) and write a
    /// Markdown report.
    Replicate(ReplicateArgs),
}

#[derive(clap::Args)]
pub struct ReplicateArgs {
    #[arg(long, default_value = "full", value_parser = parse_preset)]
    preset: Preset,
    /// Cache root (as for `demo build`).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Where to write the report.
    #[arg(long, default_value = "crates/atlas-demo/results/replicate.md")]
    out: PathBuf,
    /// Few-shot seeds (the paper: 3).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Few-shot k values, comma-separated.
    #[arg(long, default_value = "1,2,4,8,16", value_delimiter = ',')]
    shots: Vec<usize>,
}

#[derive(clap::Args)]
pub struct BuildArgs {
    /// `full` (minutes on 2 cores) or `ci` (well under a minute).
    #[arg(long, default_value = "full", value_parser = parse_preset)]
    preset: Preset,
    /// Cache root (default: $ATLAS_CACHE, $XDG_CACHE_HOME/atlas-serve or ~/.cache/atlas-serve).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Delete the cached world first and build it again.
    #[arg(long)]
    rebuild: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    #[arg(long, default_value = "full", value_parser = parse_preset)]
    preset: Preset,
    /// Task name (colour, shape, texture, count, position, digit).
    #[arg(long)]
    task: String,
    /// train, val or test.
    #[arg(long, default_value = "train", value_parser = parse_split)]
    split: Split,
    /// Output directory (created; must be empty or absent).
    #[arg(long)]
    out: PathBuf,
}

fn parse_preset(s: &str) -> Result<Preset, String> {
    Preset::parse(s).ok_or_else(|| format!("unknown preset {s:?} (expected full or ci)"))
}

fn parse_split(s: &str) -> Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "val" => Ok(Split::Val),
        "test" => Ok(Split::Test),
        _ => Err(format!("unknown split {s:?} (expected train, val or test)")),
    }
}

pub fn run(c: Command) -> anyhow::Result<()> {
    single_threaded();
    match c {
        Command::Build(a) => build(a),
        Command::Export(a) => export(a),
        Command::Replicate(a) => replicate(a),
    }
}

/// The demo's tensors are tiny: candle's spinning worker pool for elementwise ops, and rayon
/// threads for its small matmuls, cost more than they save (the ci build was measured slower
/// with them on 2 cores). Only where the user has not chosen.
fn single_threaded() {
    for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "1");
        }
    }
}

fn build(a: BuildArgs) -> anyhow::Result<()> {
    let params = WorldParams::preset(a.preset);
    let root = match a.cache {
        Some(p) => p,
        None => default_cache_root()?,
    };
    let dir = world_dir(&root, &params);
    if a.rebuild && dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let start = Instant::now();
    let mut bars = super::progress::Progress::new("atlas-serve: demo");
    let (world, built) = World::open(&params, &root, &mut bars, &AtomicBool::new(false))?;
    bars.finish();
    if built {
        println!(
            "built the {} world in {:.0} s: {}",
            a.preset.name(),
            start.elapsed().as_secs_f64(),
            world.dir.display()
        );
    } else {
        println!("cached {} world: {}", a.preset.name(), world.dir.display());
    }
    print_report(&world.report);
    Ok(())
}

fn replicate(a: ReplicateArgs) -> anyhow::Result<()> {
    let params = WorldParams::preset(a.preset);
    let root = match a.cache {
        Some(p) => p,
        None => default_cache_root()?,
    };
    let mut bars = super::progress::Progress::new("atlas-serve: demo");
    let cancel = AtomicBool::new(false);
    let (world, _) = World::open(&params, &root, &mut bars, &cancel)?;
    let mut config = ReplicateConfig::paper(world.tasks.len());
    config.seeds = (0..a.seeds).collect();
    config.shots = a.shots;
    let md = atlas_demo::replicate::replicate(&world, &config, &mut bars, &cancel)?;
    bars.finish();
    let md = with_provenance(&md);
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&a.out, &md).with_context(|| format!("writing {}", a.out.display()))?;
    println!("{md}");
    println!("wrote {}", a.out.display());
    Ok(())
}

/// The report with the command that made it and the machine it ran on, after its title.
fn with_provenance(md: &str) -> String {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let line = format!(
        "Made by `atlas-serve {}` on {}.\n",
        args.join(" "),
        machine()
    );
    match md.split_once("\n\n") {
        Some((title, rest)) => format!("{title}\n\n{line}\n{rest}"),
        None => format!("{line}\n{md}"),
    }
}

/// CPU model and core count (Linux), and the threads the demo uses.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "an unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    format!(
        "{cpu}, {cores} cores, {} ({threads} compute threads), {build} build",
        std::env::consts::OS
    )
}

fn print_report(r: &BuildReport) {
    println!(
        "pre-training {:.0} s (final loss {:.3}); whole build {:.0} s",
        r.pretrain_secs, r.pretrain_loss, r.total_secs
    );
    println!(
        "{:<10} {:>7} {:>10} {:>11}",
        "task", "classes", "zero-shot", "fine-tuned"
    );
    for t in &r.tasks {
        println!(
            "{:<10} {:>7} {:>9.1}% {:>10.1}%",
            t.name,
            t.classes,
            100.0 * t.zero_shot,
            100.0 * t.finetuned
        );
    }
}

fn export(a: ExportArgs) -> anyhow::Result<()> {
    let params = WorldParams::preset(a.preset);
    let Some(index) = task_specs().iter().position(|t| t.name == a.task) else {
        let names: Vec<_> = task_specs().iter().map(|t| t.name).collect();
        bail!(
            "unknown task {:?} (expected one of {})",
            a.task,
            names.join(", ")
        );
    };
    if a.out.exists() && a.out.read_dir()?.next().is_some() {
        bail!("{} exists and is not empty", a.out.display());
    }
    let tasks = task_data(&params)?;
    let task = &tasks[index];
    for class in &task.spec.classes {
        let d = a.out.join(class);
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let examples = task.split(a.split);
    for (i, e) in examples.iter().enumerate() {
        let class = &task.spec.classes[e.label as usize];
        let path = a.out.join(class).join(format!("{i:05}.png"));
        e.image
            .save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "wrote {} images of task {} ({:?}) to {}",
        examples.len(),
        a.task,
        a.split,
        a.out.display()
    );
    Ok(())
}
