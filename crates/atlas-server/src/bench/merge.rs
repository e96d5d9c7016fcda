//! `atlas-serve bench merge`: one FusionBench merge over random task vectors on a ViT image
//! tower (B/32 by default, 8 task vectors, as FusionBench's table), timed, with peak memory.
//! The data merges (RegMean, RegMean++, Fisher merging) read random images per input (`--examples`, in batches of the
//! method's batch size). Run each method in its own process: peak RSS (VmHWM) is per process.

use super::common::{machine, random_blocks, random_task_vector, vision_config};
use atlas_clip::{Backbone, ClipConfig, LoadOptions, ZeroShotHead};
use atlas_core::merge::{self, Method};
use atlas_core::{StorageDType, TaskVector};
use atlas_learn::merge_data::{merge_batches, Watch};
use candle_core::{Device, Tensor};
use serde_json::json;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args)]
pub struct MergeArgs {
    /// FusionBench's method name.
    #[arg(long)]
    method: String,
    /// The method's parameters (JSON, FusionBench's names).
    #[arg(long, default_value = "{}")]
    params: String,
    /// Image tower: B/32, B/16, L/14 or tiny.
    #[arg(long, default_value = "B/32")]
    model: String,
    /// Encoder layers to build (default: the model's). The per-tensor merges (SVDs, WUDI) and
    /// the statistics grow linearly with layers, so a slow method can be timed on a few.
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value_t = 8)]
    n_tv: usize,
    /// Images per input for the data merges (FusionBench: 256).
    #[arg(long, default_value_t = 256)]
    examples: usize,
    /// Task-vector storage: f16, bf16 or f32.
    #[arg(long, default_value = "f16")]
    store: StorageDType,
}

pub fn run(a: MergeArgs) -> anyhow::Result<()> {
    let params: serde_json::Value = serde_json::from_str(&a.params)?;
    let params = params
        .as_object()
        .ok_or_else(|| anyhow::anyhow!("--params must be a JSON object"))?;
    let method = Method::parse(&a.method, params, a.n_tv)?;
    let mut vision = vision_config(&a.model)?;
    let full_layers = vision.num_hidden_layers;
    vision.num_hidden_layers = a.layers.unwrap_or(full_layers);
    let cfg = ClipConfig {
        projection_dim: vision.projection_dim,
        vision: vision.clone(),
        text: None,
    };
    let setup = Instant::now();
    let manifest = atlas_clip::vision_manifest(&vision, cfg.projection_dim, Default::default());
    let base = random_blocks(&manifest, 0, 0.02);
    let bb = Backbone::from_vision_blocks("random", cfg, base, LoadOptions::default())?;
    let tvs: Vec<Arc<TaskVector>> = (0..a.n_tv)
        .map(|i| Ok(Arc::new(random_task_vector(bb.manifest(), i, a.store)?)))
        .collect::<anyhow::Result<_>>()?;
    let setup_s = setup.elapsed().as_secs_f64();
    let rss_setup = super::learn::peak_rss_gib();
    let started = Instant::now();
    let merged = match method.examples() {
        Some(ex) => {
            let s = vision.image_size;
            let used = ex.used(a.examples);
            let batches: Vec<Vec<Tensor>> = (0..a.n_tv)
                .map(|_| {
                    (0..used)
                        .step_by(ex.batch_size)
                        .map(|b| {
                            let n = ex.batch_size.min(used - b);
                            Ok(Tensor::randn(0f32, 1.0, (n, 3, s, s), &Device::Cpu)?)
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
                .collect::<anyhow::Result<_>>()?;
            let head = ZeroShotHead {
                classes: (0..10).map(|c| c.to_string()).collect(),
                weights: atlas_clip::model::normalize(&Tensor::randn(
                    0f32,
                    1.0,
                    (10, vision.projection_dim),
                    &Device::Cpu,
                )?)?,
                scale: 100.0,
            };
            let heads = vec![&head; a.n_tv];
            let cancel = AtomicBool::new(false);
            let mut last = Instant::now();
            let mut progress = |d: usize, t: usize| {
                if last.elapsed().as_secs() >= 10 || d == t {
                    eprintln!(
                        "{} {d}/{t} {:.0} s",
                        a.method,
                        started.elapsed().as_secs_f64()
                    );
                    last = Instant::now();
                }
            };
            merge_batches(
                &bb,
                &method,
                &tvs,
                &batches,
                &heads,
                Watch {
                    progress: &mut progress,
                    cancel: &cancel,
                },
            )?
        }
        None => {
            let refs: Vec<&TaskVector> = tvs.iter().map(Arc::as_ref).collect();
            merge::merge(&method, bb.manifest(), &refs)?
        }
    };
    let secs = started.elapsed().as_secs_f64();
    drop(merged);
    let out = json!({
        "bench": "merge", "method": method.name(), "params": method.params(),
        "model": a.model, "layers": vision.num_hidden_layers, "model_layers": full_layers,
        "n_tv": a.n_tv, "store": format!("{:?}", a.store),
        "examples": method.examples().map(|e| e.used(a.examples)),
        "seconds": secs, "setup_seconds": setup_s,
        "peak_rss_gib_after_setup": rss_setup, "peak_rss_gib": super::learn::peak_rss_gib(),
        "machine": machine(),
    });
    println!("{out}");
    Ok(())
}
