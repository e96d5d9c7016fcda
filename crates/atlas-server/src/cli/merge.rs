//! `atlas-serve merge`: merge task vectors (files, or fine-tuned checkpoints) by a FusionBench
//! method and write the result as one task vector, θ_merged − θ0 with the method's scale
//! applied, so that composing it at 1 gives FusionBench's merged model.

use super::progress::Progress;
use super::task_vector::{load_backbone, print_summary, save};
use anyhow::{bail, Context};
use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{Backbone, ZeroShotHead};
use atlas_core::merge::{self, Method};
use atlas_core::{StorageDType, TaskVector, TaskVectorMeta};
use atlas_learn::merge_data::{merge_on_data, Watch};
use atlas_learn::Dataset;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// The pre-trained CLIPModel: a directory or a hub id (org/name[@revision]).
    #[arg(long)]
    base: String,
    /// FusionBench's method name: simple_average, task_arithmetic, ties_merging,
    /// dare_task_arithmetic, dare_ties_merging, breadcrumbs (mergekit's), magmax, iso_c,
    /// iso_cts, tsv_m, wudi, regmean, regmean_plusplus or fisher_merging.
    #[arg(long)]
    method: String,
    /// An input: a task-vector file, or a fine-tuned checkpoint directory. Repeat, in order.
    #[arg(long = "tv", required = true)]
    tvs: Vec<PathBuf>,
    /// The method's parameters as a JSON object in FusionBench's names, e.g.
    /// '{"threshold": 20, "merge_func": "sum"}'; absent ones take its defaults.
    #[arg(long, default_value = "{}")]
    params: String,
    /// regmean, regmean_plusplus and fisher_merging: an ImageFolder directory per --tv, in order (one
    /// subfolder per class; Fisher merging's head is built from the folder names).
    #[arg(long = "data")]
    data: Vec<PathBuf>,
    /// Prompt templates of Fisher merging's heads: a data set's name or "default".
    #[arg(long, default_value = "default")]
    templates: String,
    /// Output file (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Also write the merged model θ0 + τ_merged as a transformers CLIPVisionModel checkpoint
    /// (config.json, model.safetensors at f32) into this directory.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
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
            let unit = match method.examples() {
                Some(_) => "batches read, then layers solved",
                None => "tensors",
            };
            p.0.stage(&format!("{} {unit}", method.name()), total as u64);
            p.1 = true;
        }
        p.0.tick(done as u64, "");
    };
    let merged = match method.examples() {
        Some(_) => on_data(&a, &backbone, &method, inputs.clone(), &report)?,
        None if !a.data.is_empty() => bail!("--data: {} reads no data", method.name()),
        None => {
            let never = AtomicBool::new(false);
            merge::merge_reporting(&method, backbone.manifest(), &refs, &report, &never)?
        }
    };
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
    if let Some(dir) = &a.checkpoint {
        write_checkpoint(&backbone, &blocks, dir)?;
    }
    Ok(())
}

/// A data merge (RegMean, RegMean++, Fisher merging): input i read on the images of `--data` i.
fn on_data(
    a: &Args,
    backbone: &Backbone,
    method: &Method,
    inputs: Vec<TaskVector>,
    report: &(dyn Fn(usize, usize) + Sync),
) -> anyhow::Result<merge::Merged> {
    if a.data.len() != inputs.len() {
        bail!(
            "{} reads one --data directory per --tv, in order: {} --tv, {} --data",
            method.name(),
            inputs.len(),
            a.data.len()
        );
    }
    let pre = Preprocess::from_config(backbone.config.vision.image_size);
    let data = a
        .data
        .iter()
        .map(|d| Dataset::from_image_folder(d, &pre).with_context(|| d.display().to_string()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let templates = atlas_clip::templates::resolve(std::slice::from_ref(&a.templates))
        .map_err(anyhow::Error::msg)?;
    let t_refs: Vec<&str> = templates.iter().map(String::as_str).collect();
    let heads = match method {
        Method::Fisher(_) => data
            .iter()
            .map(|d| ZeroShotHead::build(backbone, &d.classes, &t_refs))
            .collect::<Result<Vec<_>, _>>()?,
        _ => Vec::new(),
    };
    let inputs: Vec<Arc<TaskVector>> = inputs.into_iter().map(Arc::new).collect();
    let cancel = AtomicBool::new(false);
    Ok(merge_on_data(
        backbone,
        method,
        &inputs,
        &data.iter().collect::<Vec<_>>(),
        &heads.iter().collect::<Vec<_>>(),
        Watch {
            progress: &mut |d, t| report(d, t),
            cancel: &cancel,
        },
    )?)
}

/// θ0 + `delta` as a CLIPVisionModel checkpoint. The projection is outside that model (as in
/// FusionBench's merged models): a merge that moved it says so, since the checkpoint drops it.
fn write_checkpoint(backbone: &Backbone, delta: &[Vec<f32>], dir: &Path) -> anyhow::Result<()> {
    let mut tensors = Vec::new();
    for (spec, loc) in backbone.manifest().tensor_specs() {
        let range = loc.offset..loc.offset + loc.numel;
        let (base, d) = (
            &backbone.base_blocks()[loc.block][range.clone()],
            &delta[loc.block][range],
        );
        if !spec.name.starts_with("vision_model.") {
            if d.iter().any(|x| *x != 0.0) {
                eprintln!(
                    "atlas-serve merge: {} is outside CLIPVisionModel and not written to the                      checkpoint, though the merge moved it (the task vector keeps it)",
                    spec.name
                );
            }
            continue;
        }
        tensors.push(atlas_core::safetensors_io::RawTensor {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            dtype: safetensors::Dtype::F32,
            data: base.iter().zip(d).map(|(b, x)| b + x).collect(),
        });
    }
    atlas_clip::checkpoint::write_vision_model(dir, &backbone.config.vision, &tensors)
        .with_context(|| format!("writing the checkpoint {}", dir.display()))?;
    println!("wrote the merged CLIPVisionModel to {}", dir.display());
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
