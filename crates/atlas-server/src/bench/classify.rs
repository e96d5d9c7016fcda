//! `atlas-serve bench classify`: image-embedding throughput of the image tower (+ projection)
//! on random weights of ViT-B/32, B/16 or L/14 shape (timings do not depend on values), at
//! several batch sizes and dtypes. Each figure runs warm-up passes, then timed passes until
//! `--iters` passes or `--max-seconds` of timed work, whichever comes first (at least one).

use super::common::{machine, median, vision_config};
use anyhow::{bail, Context};
use atlas_clip::manifest::vision_tensors;
use atlas_clip::{LoadOptions, VisionConfig, VisionTower};
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct ClassifyArgs {
    /// Image towers, comma-separated: B/32, B/16, L/14.
    #[arg(long, default_value = "B/32")]
    models: String,
    /// Dtypes, comma-separated: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    dtypes: String,
    /// Batch sizes, comma-separated.
    #[arg(long, default_value = "1,8,32,256")]
    batches: String,
    /// Largest number of timed passes per figure.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed warm-up passes per figure.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Stop timing a figure after this many seconds of timed passes (one pass always runs).
    #[arg(long, default_value_t = 20.0)]
    max_seconds: f64,
    /// cpu, or cuda (GPU 0; needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Append one JSON object per figure (JSON lines) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_list<T>(s: &str, f: impl Fn(&str) -> anyhow::Result<T>) -> anyhow::Result<Vec<T>> {
    s.split(',').map(|x| f(x.trim())).collect()
}

/// A tower with random weights: N(0, 0.02²) everywhere, LayerNorm weights at 1; made as the
/// backbone makes its towers (bf16 on the CPU: packed bf16 matmuls over f32 activations).
fn random_tower(cfg: &VisionConfig, opts: &LoadOptions) -> anyhow::Result<VisionTower> {
    let (dtype, dev) = (opts.tensor_dtype(), &opts.device);
    let mut weights = HashMap::new();
    for spec in vision_tensors(cfg, cfg.projection_dim) {
        let is_norm = spec.name.contains("norm") || spec.name.contains("layrnorm");
        let t = if is_norm && spec.name.ends_with("weight") {
            Tensor::ones(spec.shape.as_slice(), dtype, dev)?
        } else {
            Tensor::randn(0f32, 0.02, spec.shape.as_slice(), dev)?.to_dtype(dtype)?
        };
        weights.insert(spec.name, t);
    }
    let src = opts.source(&weights);
    Ok(VisionTower::new(cfg, Some(cfg.projection_dim), &src)?)
}

/// Per-pass times in ms of one figure.
fn time_passes(tower: &VisionTower, pixels: &Tensor, a: &ClassifyArgs) -> anyhow::Result<Vec<f64>> {
    for _ in 0..a.warmup {
        tower.forward(pixels)?;
    }
    let start = Instant::now();
    let mut ms = Vec::new();
    while ms.is_empty() || (ms.len() < a.iters && start.elapsed().as_secs_f64() < a.max_seconds) {
        let t = Instant::now();
        let emb = tower.forward(pixels)?;
        // Reading one value forces the result (candle's CPU ops are eager, but be explicit).
        emb.flatten_all()?
            .get(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ms)
}

pub fn run(a: ClassifyArgs) -> anyhow::Result<()> {
    if a.iters == 0 {
        bail!("--iters must be at least 1");
    }
    let models = parse_list(&a.models, |m| Ok((m.to_string(), vision_config(m)?)))?;
    let dtypes = parse_list(&a.dtypes, crate::device::compute_dtype)?;
    let batches = parse_list(&a.batches, |b| {
        b.parse::<usize>()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("batch size {b:?} is not a positive integer"))
    })?;
    let mut out = match &a.out {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))?,
        ),
        None => None,
    };
    let dev = crate::device::open(&a.device)?;
    let threads = candle_core::utils::get_num_threads();
    println!(
        "{:<6} {:<5} {:>6} {:>11} {:>11} {:>10} {:>6}",
        "model", "dtype", "batch", "median ms", "mean ms", "img/s", "passes"
    );
    for (name, cfg) in &models {
        for &dtype in &dtypes {
            let opts = LoadOptions {
                device: dev.clone(),
                dtype,
                ..LoadOptions::default()
            };
            let tower = random_tower(cfg, &opts)?;
            let kernel = opts.bf16_kernel().map(|k| k.name());
            for &bs in &batches {
                let s = cfg.image_size;
                let pixels =
                    Tensor::randn(0f32, 1.0, (bs, 3, s, s), &dev)?.to_dtype(opts.tensor_dtype())?;
                let dt = format!("{dtype:?}").to_lowercase();
                // A dtype the backend cannot run (bf16 matmul on the CPU) is a result too.
                let ms = match time_passes(&tower, &pixels, &a) {
                    Ok(ms) => ms,
                    Err(e) => {
                        let e = format!("{e:#}");
                        let first = e.lines().next().unwrap_or_default().to_string();
                        println!("{name:<6} {dt:<5} {bs:>6} unsupported: {first}");
                        let rec = json!({
                            "benchmark": "classify", "engine": "candle", "device": a.device,
                            "model": name, "dtype": dt, "batch": bs, "error": first,
                            "machine": machine(),
                        });
                        if let Some(f) = out.as_mut() {
                            writeln!(f, "{rec}").context("writing --out")?;
                        }
                        continue;
                    }
                };
                let med = median(&ms);
                let mean = ms.iter().sum::<f64>() / ms.len() as f64;
                println!(
                    "{name:<6} {dt:<5} {bs:>6} {med:>11.2} {mean:>11.2} {:>10.1} {:>6}",
                    bs as f64 / mean * 1e3,
                    ms.len()
                );
                let rec = json!({
                    "benchmark": "classify", "engine": "candle", "device": a.device, "model": name, "dtype": dt,
                    "batch": bs, "threads": threads, "passes": ms.len(), "warmup": a.warmup,
                    "ms_median": med, "ms_mean": mean, "ms_all": ms,
                    "img_per_s": bs as f64 / mean * 1e3, "bf16_kernel": kernel, "machine": machine(),
                });
                if let Some(f) = out.as_mut() {
                    writeln!(f, "{rec}").context("writing --out")?;
                }
            }
        }
    }
    Ok(())
}
