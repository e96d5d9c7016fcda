//! `atlas-serve learn`: learn aTLAS coefficients over ImageFolder directories and a set of task
//! vectors, with a progress bar; writes the coefficients file and prints the validation metric
//! before (zero-shot) and after.

use anyhow::{bail, Context};
use atlas_clip::{templates, Backbone, LoadOptions};
use atlas_core::{Layout, StoreDType, TaskVector};
use atlas_learn::budget::{self, Budget};
use atlas_learn::output::CoefficientsFile;
use atlas_learn::{learn, Dataset, Event, EventKind, Job, LearnConfig, Task};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Objective {
    FewShot,
    MultiTask,
    Negation,
    Entropy,
    Ufm,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LayoutArg {
    Isotropic,
    PerBlock,
    PerPart,
}

#[derive(clap::Args)]
pub struct Args {
    /// Backbone: a CLIPModel directory or hub id.
    #[arg(long)]
    model: String,
    /// Task-vector safetensors files (repeat).
    #[arg(long = "tv", required = true)]
    tvs: Vec<PathBuf>,
    /// ImageFolder directories (one subfolder per class). Multi-task takes several; negation
    /// takes the target then the control.
    #[arg(long = "data", required = true)]
    data: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "few-shot")]
    objective: Objective,
    #[arg(long, value_enum, default_value = "per-block")]
    layout: LayoutArg,
    /// Parts per block for --layout per-part.
    #[arg(long, default_value_t = 4)]
    parts: usize,
    #[arg(long, default_value_t = 0)]
    part_seed: u64,
    /// Prompt templates: a data-set name (e.g. MNIST) or "default".
    #[arg(long, default_value = "default")]
    templates: String,
    /// Override the recipe's settings.
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long)]
    weight_decay: Option<f64>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    val_fraction: Option<f64>,
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
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let backbone = Backbone::load(&a.model, LoadOptions::default())
        .with_context(|| format!("loading the backbone {}", a.model))?;
    let mut tvs = Vec::new();
    for p in &a.tvs {
        let tv = backbone
            .load_task_vector(p, None, StoreDType::F16)
            .with_context(|| format!("loading {}", p.display()))?;
        tvs.push(Arc::new(tv));
    }
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
    let bar = ProgressBar::new(0);
    bar.set_style(ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise}, eta {eta}]",
    )?);
    let mut on_event = |e: &Event| report(&bar, e);
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
        "objective": job.kind(), "metric": out.metric, "before": out.before, "after": out.after,
        "best_epoch": out.best_epoch, "history": out.history, "config": config,
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
    println!("coefficients written to {}", a.out.display());
    Ok(())
}

fn report(bar: &ProgressBar, e: &Event) {
    bar.set_length(e.total_steps as u64);
    bar.set_position(e.step as u64);
    match e.kind {
        EventKind::Step => bar.set_message(format!(
            "epoch {}/{} loss {:.4} lr {:.2e}",
            e.epoch + 1,
            e.epochs,
            e.loss.unwrap_or(f64::NAN),
            e.lr
        )),
        EventKind::Epoch | EventKind::Started | EventKind::Resumed => bar.println(format!(
            "epoch {}/{}: validation {:.4}",
            e.epoch,
            e.epochs,
            e.val_metric.unwrap_or(f64::NAN)
        )),
        EventKind::Finished => {}
    }
}

fn job(a: &Args, backbone: &Backbone) -> anyhow::Result<Job> {
    let names: Vec<&str> = match a.templates.as_str() {
        "default" => templates::default_templates().to_vec(),
        name => templates::templates_for(name)
            .with_context(|| {
                format!(
                    "no templates for data set {name}; try one of {:?} or 'default'",
                    templates::dataset_names()
                )
            })?
            .to_vec(),
    };
    let mut tasks = Vec::new();
    for dir in &a.data {
        let data = Dataset::from_image_folder(dir)?;
        let name = dir
            .file_name()
            .map_or("task".into(), |n| n.to_string_lossy().into_owned());
        let data = if matches!(a.objective, Objective::Entropy | Objective::Ufm) {
            data.unlabelled()
        } else {
            data
        };
        tasks.push(Task::new(backbone, &name, data, &names)?);
    }
    let one = |mut ts: Vec<Task>| -> anyhow::Result<Task> {
        if ts.len() != 1 {
            bail!(
                "this objective takes exactly one --data directory, got {}",
                ts.len()
            );
        }
        Ok(ts.remove(0))
    };
    Ok(match a.objective {
        Objective::FewShot => Job::FewShot(one(tasks)?),
        Objective::Entropy => Job::Entropy(one(tasks)?),
        Objective::Ufm => Job::Ufm(one(tasks)?),
        Objective::MultiTask => Job::MultiTask(tasks),
        Objective::Negation => {
            if tasks.len() != 2 {
                bail!("negation takes two --data directories: the target, then the control");
            }
            let control = tasks.pop().expect("two");
            Job::Negation {
                target: tasks.pop().expect("two"),
                control,
            }
        }
    })
}

fn config(a: &Args, job: &Job) -> anyhow::Result<LearnConfig> {
    let mut c = LearnConfig::recipe(job);
    c.layout = match a.layout {
        LayoutArg::Isotropic => Layout::Isotropic,
        LayoutArg::PerBlock => Layout::PerBlock,
        LayoutArg::PerPart => Layout::PerPart {
            k: a.parts,
            seed: a.part_seed,
        },
    };
    if let Some(v) = a.epochs {
        c.epochs = v;
    }
    if let Some(v) = a.lr {
        c.optimizer.lr = v;
    }
    if let Some(v) = a.weight_decay {
        c.optimizer.weight_decay = v;
    }
    if let Some(v) = a.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = a.warmup_steps {
        c.warmup_steps = v;
    }
    if let Some(v) = a.seed {
        c.seed = v;
    }
    if let Some(v) = a.val_fraction {
        c.val_fraction = v;
    }
    c.validate()?;
    Ok(c)
}

/// Unused-import guard for TaskVector in signatures above.
#[allow(dead_code)]
fn _types(_: &TaskVector) {}
