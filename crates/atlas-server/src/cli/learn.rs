//! `atlas-serve learn`: learn aTLAS coefficients over ImageFolder directories and a set of task
//! vectors, with a progress bar; writes the coefficients file and prints the validation metric
//! before (zero-shot) and after.

use super::progress::Progress;
use anyhow::{bail, Context};
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{templates, Backbone, LoadOptions};
use atlas_core::{Layout, StorageDType, TaskVector};
use atlas_learn::budget::{self, Budget};
use atlas_learn::output::CoefficientsFile;
use atlas_learn::{learn, Dataset, Event, EventKind, Job, LearnConfig, Objective, Overrides, Task};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LayoutArg {
    Isotropic,
    PerBlock,
    PerPart,
}

#[derive(clap::Args)]
pub struct Args {
    /// Backbone: a CLIPModel directory or hub id, or `demo` / `demo:full` / `demo:ci` for the
    /// offline demo world (built into the cache first if needed).
    #[arg(long)]
    model: String,
    /// Task-vector safetensors files (repeat). With the demo world also a task's name
    /// (colour, shape, ...), and by default all of its task vectors.
    #[arg(long = "tv")]
    tvs: Vec<PathBuf>,
    /// ImageFolder directories (one subfolder per class). Multi-task takes several; negation
    /// takes the target then the control.
    #[arg(long = "data", required = true)]
    data: Vec<PathBuf>,
    /// few-shot, task-addition (or multi-task), negation, entropy, ufm or adamerging (one
    /// --data per task; its labels are not read).
    #[arg(long, default_value = "few-shot")]
    objective: Objective,
    #[arg(long, value_enum, default_value = "per-block")]
    layout: LayoutArg,
    /// Parts per block for --layout per-part.
    #[arg(long, default_value_t = 4)]
    parts: usize,
    #[arg(long, default_value_t = 0)]
    part_seed: u64,
    /// Prompt templates, as the API takes them: a data set's name (e.g. MNIST) or "default",
    /// or templates of your own, each with one {} for the class name (repeat the flag).
    #[arg(long = "templates", default_value = "default")]
    templates: Vec<String>,
    /// Override the recipe's settings.
    #[command(flatten)]
    overrides: Overrides,
    /// Keep only this many task vectors (ranked by one gradient pass).
    #[arg(long)]
    budget: Option<usize>,
    /// With --budget, mix task vectors per block instead of keeping whole ones.
    #[arg(long)]
    blockwise: bool,
    /// Resumable checkpoint (resumes when it exists).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Where to write the learned coefficients (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Compute dtype: f32, or bf16 (on a CPU with AMX or AVX512-BF16 the linear layers'
    /// products run in bf16 with f32 sums, as PyTorch's bf16 autocast; elsewhere f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Learning runs in f32 on the CPU; bf16 only moves the linear products to its kernel.
    let dtype = match a.dtype.as_str() {
        "f32" | "float32" => candle_core::DType::F32,
        "bf16" | "bfloat16" => candle_core::DType::BF16,
        other => bail!("--dtype {other:?}: use f32 or bf16"),
    };
    let opts = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    let (backbone, demo_tvs) = super::model::load(&a.model, opts)?;
    let tvs = task_vectors(&a.tvs, &backbone, demo_tvs)?;
    let job = job(&a, &backbone)?;
    let config = config(&a, &job)?;
    let tvs = match a.budget {
        Some(b) => {
            let mode = if a.blockwise {
                Budget::Blockwise(b)
            } else {
                Budget::Whole(b)
            };
            budget::select(&backbone, &tvs, &job, &config, mode)?
        }
        None => tvs,
    };
    let mut bar = Progress::new("atlas-serve: learn");
    let mut on_event = |e: &Event| report(&mut bar, e);
    let out = learn(
        &backbone,
        &tvs,
        &job,
        &config,
        &mut on_event,
        &AtomicBool::new(false),
        a.checkpoint.as_deref(),
    )?;
    bar.finish();
    let summary = serde_json::json!({
        "objective": job.objective(), "metric": out.metric, "before": out.before, "after": out.after,
        "best_epoch": out.best_epoch, "outcome": out.outcome, "warnings": out.warnings,
        "history": out.history, "config": config,
    });
    let file = CoefficientsFile::new(
        backbone.manifest(),
        &backbone.id,
        backbone.base_digest(),
        &tvs,
        out.coefs,
        summary,
    );
    file.save(&a.out)?;
    println!(
        "validation {}: {:.4} before (Λ = 0, zero-shot), {:.4} after (epoch {})",
        out.metric, out.before, out.after, out.best_epoch
    );
    let outcome = serde_json::to_value(out.outcome)?;
    println!("outcome: {}", outcome.as_str().unwrap_or("?"));
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    println!("coefficients written to {}", a.out.display());
    Ok(())
}

/// The `--tv` files; with the demo world, its task vectors by name too (all by default).
fn task_vectors(
    given: &[PathBuf],
    backbone: &Backbone,
    demo: Option<Vec<Arc<TaskVector>>>,
) -> anyhow::Result<Vec<Arc<TaskVector>>> {
    match (&demo, given.is_empty()) {
        (Some(all), true) => return Ok(all.clone()),
        (None, true) => bail!("give task vectors with --tv (safetensors files)"),
        _ => {}
    }
    let mut tvs = Vec::new();
    for p in given {
        let named = demo.iter().flatten().find(|t| Path::new(t.name()) == p);
        // A file of that name wins; a directory (the exported images of that task, say) does not.
        if let Some(tv) = named.filter(|_| !p.is_file()) {
            tvs.push(tv.clone());
            continue;
        }
        let tv = backbone
            .load_task_vector(p, None, StorageDType::F16)
            .with_context(|| match &demo {
                Some(all) => format!(
                    "loading {} (the demo world's task vectors: {})",
                    p.display(),
                    all.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
                ),
                None => format!("loading {}", p.display()),
            })?;
        tvs.push(Arc::new(tv));
    }
    Ok(tvs)
}

fn report(bar: &mut Progress, e: &Event) {
    let epoch_line = || {
        format!(
            "epoch {}/{}: validation {:.4}",
            e.epoch,
            e.epochs,
            e.val_metric.unwrap_or(f64::NAN)
        )
    };
    match e.kind {
        EventKind::Started | EventKind::Resumed => {
            bar.stage("learning", e.total_steps as u64);
            bar.note(&epoch_line());
        }
        EventKind::Step => bar.tick(
            e.step as u64,
            &format!(
                "epoch {}/{} loss {:.4} lr {:.2e}",
                e.epoch + 1,
                e.epochs,
                e.loss.unwrap_or(f64::NAN),
                e.lr
            ),
        ),
        EventKind::Epoch => bar.note(&epoch_line()),
        EventKind::Finished => {}
    }
}

fn job(a: &Args, backbone: &Backbone) -> anyhow::Result<Job> {
    let templates = templates::resolve(&a.templates).map_err(anyhow::Error::msg)?;
    let names: Vec<&str> = templates.iter().map(String::as_str).collect();
    let pre = Preprocess::from_config(backbone.config.vision.image_size);
    let mut tasks = Vec::new();
    for dir in &a.data {
        let data = Dataset::from_image_folder(dir, &pre)?;
        let name = dir
            .file_name()
            .map_or("task".into(), |n| n.to_string_lossy().into_owned());
        let data = if a.objective.is_unsupervised() {
            data.unlabelled()
        } else {
            data
        };
        tasks.push(Task::new(backbone, &name, data, &names)?);
    }
    Ok(Job::from_tasks(a.objective, tasks)?)
}

fn config(a: &Args, job: &Job) -> anyhow::Result<LearnConfig> {
    let layout = match a.layout {
        LayoutArg::Isotropic => Layout::Isotropic,
        LayoutArg::PerBlock => Layout::PerBlock,
        LayoutArg::PerPart => Layout::PerPart {
            k: a.parts,
            seed: a.part_seed,
        },
    };
    a.overrides.check()?;
    let c = LearnConfig {
        layout,
        ..LearnConfig::recipe(job.objective())
    }
    .with(&a.overrides);
    c.validate()?;
    Ok(c)
}
