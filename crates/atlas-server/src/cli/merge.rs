//! `atlas-serve merge`: merge task vectors (files, or fine-tuned checkpoints) by a FusionBench
//! method and write the result as one task vector, θ_merged − θ0 with the method's scale
//! applied, so that composing it at 1 gives FusionBench's merged model.

use super::progress::Progress;
use super::task_vector::{load_backbone, print_summary, save};
use anyhow::{bail, Context};
use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::Backbone;
use atlas_core::merge::{self, Method};
use atlas_core::{StorageDType, TaskVector, TaskVectorMeta};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The pre-trained CLIPModel: a directory or a hub id (org/name[@revision]).
    #[arg(long)]
    base: String,
    /// FusionBench's method name: simple_average, task_arithmetic, ties_merging,
    /// dare_task_arithmetic, dare_ties_merging, breadcrumbs (mergekit's), magmax, iso_c,
    /// iso_cts, tsv_m or wudi.
    #[arg(long)]
    method: String,
    /// An input: a task-vector file, or a fine-tuned checkpoint directory. Repeat, in order.
    #[arg(long = "tv", required = true)]
    tvs: Vec<PathBuf>,
    /// The method's parameters as a JSON object in FusionBench's names, e.g.
    /// '{"threshold": 20, "merge_func": "sum"}'; absent ones take its defaults.
    #[arg(long, default_value = "{}")]
    params: String,
    /// Output file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Name of the merged task vector (default: the output's file stem).
    #[arg(long)]
    name: Option<String>,
    /// Storage dtype of the output: f16, bf16 or f32 (inputs are merged at f32).
    #[arg(long, default_value = "f16")]
    store: StorageDType,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params: serde_json::Value =
        serde_json::from_str(&a.params).context("--params must be a JSON object")?;
    let Some(params) = params.as_object() else {
        bail!("--params must be a JSON object, got {params}");
    };
    let method = Method::parse(&a.method, params, a.tvs.len())?;
    let backbone = load_backbone(&a.base)?;
    let inputs = a
        .tvs
        .iter()
        .map(|p| input(&backbone, p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let refs: Vec<&TaskVector> = inputs.iter().collect();
    // WUDI's gradient steps take minutes on a real model: a bar (or log lines) per tensor.
    let progress = std::sync::Mutex::new((Progress::new("atlas-serve merge"), false));
    let report = |done: usize, total: usize| {
        let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
        if !p.1 {
            p.0.stage(&format!("{} tensors", method.name()), total as u64);
            p.1 = true;
        }
        p.0.tick(done as u64, "");
    };
    let merged = merge::merge_reporting(&method, backbone.manifest(), &refs, &report)?;
    progress
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .0
        .finish();
    let record = serde_json::json!({
        "method": method.name(),
        "params": method.params(),
        "inputs": a.tvs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "input_digests": inputs.iter().map(|t| t.digest()).collect::<Vec<_>>(),
        "scale_applied": true,
    });
    let meta = TaskVectorMeta {
        name: a.name.unwrap_or_else(|| stem(&a.out)),
        base_model: inputs[0].meta.base_model.clone(),
        base_digest: inputs[0].meta.base_digest.clone(),
        source: format!("merge {record}"),
    };
    let blocks = merged.model_delta(&refs);
    let tv = merge::to_task_vector(backbone.manifest(), meta, a.store, &blocks)?;
    save(&tv, &a.out, backbone.manifest())?;
    print_summary(&tv, &a.out, backbone.manifest());
    Ok(())
}

/// A task-vector file, or τ = θ_ft − θ0 of a fine-tuned checkpoint directory, at f32.
fn input(backbone: &Backbone, path: &Path) -> anyhow::Result<TaskVector> {
    let name = stem(path);
    let tv = if path.is_dir() {
        let ft = Checkpoint::open(&path.display().to_string())?;
        backbone.task_vector_from_checkpoint(ft, &name, StorageDType::F32)
    } else {
        backbone.load_task_vector(path, None, StorageDType::F32)
    };
    tv.with_context(|| format!("reading the input {}", path.display()))
}

fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "merged".into())
}
