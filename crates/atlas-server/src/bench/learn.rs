//! `atlas-serve bench learn`: one aTLAS learning step on ViT-B/32-shaped random weights (image
//! tower + projection, 8 task vectors by default), timed, with peak memory. `--mode leaves` is
//! atlas-serve's path (compose without a graph, composed tensors as gradient leaves, fused
//! block reduction); `--mode graph` builds θ0 + Σ Λ τ inside the autograd graph, as the
//! reference PyTorch code does, for comparison. Run each mode in its own process: peak RSS
//! (VmHWM) is per process.

use anyhow::Context;
use atlas_clip::grad::{coefficient_gradient_timed, StepPhases};
use atlas_clip::loss::cross_entropy;
use atlas_clip::manifest::vision_tensors;
use atlas_clip::model::normalize;
use atlas_clip::{Backbone, ClipConfig, LoadOptions, VisionTower};
use atlas_core::{Buffer, Coefficients, Layout, StorageDType, TaskVector, TaskVectorMeta};
use atlas_learn::optim::{clip_grad_norm, AdamW, AdamWConfig};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Copy, Debug, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Leaves,
    Graph,
}

#[derive(clap::Args)]
pub struct LearnArgs {
    #[arg(long, value_enum, default_value = "leaves")]
    mode: Mode,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 8)]
    n_tv: usize,
    /// Timed steps after one warm-up step.
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Task-vector storage for --mode leaves (graph mode keeps f32 tensors, as PyTorch does).
    #[arg(long, default_value = "f16")]
    store: String,
    /// A tiny tower instead of ViT-B/32, to check the command quickly.
    #[arg(long)]
    tiny: bool,
    /// Time only the host work around the model (compose, and the reduction of a random
    /// gradient), without forward or backward: quick, steadier figures for those kernels.
    #[arg(long)]
    host_only: bool,
    /// Parts per block (aTLAS×K) for --host-only; 1 is one coefficient per block.
    #[arg(long, default_value_t = 1)]
    parts: usize,
    /// cpu, or cuda (GPU 0; needs a build with the `cuda` feature). Peak RSS stays the host's.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The backbone's dtype. bf16 on a CPU with a bf16 kernel runs the linear layers' products
    /// in bf16 (autocast); the rest of the step stays f32.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

pub fn run(a: LearnArgs) -> anyhow::Result<()> {
    let store: StorageDType = a
        .store
        .parse()
        .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
    let vision = super::common::vision_config(if a.tiny { "tiny" } else { "B/32" })?;
    let proj = vision.projection_dim;
    let cfg = ClipConfig {
        vision: vision.clone(),
        text: None,
        projection_dim: proj,
    };
    let dev = crate::device::open(&a.device)?;
    let setup = Instant::now();
    let base = random_blocks(&cfg, 0, 0.02, true);
    let opts = LoadOptions {
        device: dev.clone(),
        dtype: crate::device::compute_dtype(&a.dtype)?,
        ..LoadOptions::default()
    };
    let bf16_kernel = opts.bf16_kernel().map(|k| k.name());
    let bb = Backbone::from_vision_blocks("random", cfg.clone(), base, opts)?;
    let nb = bb.manifest().len();
    let tvs: Vec<Arc<TaskVector>> = (0..a.n_tv)
        .map(|i| {
            let blocks = random_blocks(&cfg, 1 + i as u64, 1e-3, false)
                .into_iter()
                .map(|b| Buffer::from_f32(&b, store))
                .collect();
            let meta = TaskVectorMeta {
                name: format!("tv{i}"),
                ..Default::default()
            };
            Ok(Arc::new(TaskVector::from_buffers(
                bb.manifest(),
                meta,
                store,
                blocks,
            )?))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let head = normalize(&Tensor::randn(0f32, 1.0, (10, proj), &dev)?)?;
    let labels = Tensor::new(
        (0..a.batch)
            .map(|_| rng.gen_range(0..10u32))
            .collect::<Vec<_>>(),
        &dev,
    )?;
    let pixels = Tensor::randn(
        0f32,
        1.0,
        (a.batch, 3, vision.image_size, vision.image_size),
        &dev,
    )?;
    let loss = |tower: &VisionTower| -> atlas_clip::Result<Tensor> {
        let emb = normalize(&tower.forward(&pixels)?)?;
        cross_entropy(&(emb.matmul(&head.t()?)? * 100.0)?, &labels)
    };
    let mut coefs = Coefficients::new(
        Layout::PerBlock,
        a.n_tv,
        nb,
        (0..a.n_tv * nb).map(|_| rng.gen_range(-0.5..0.5)).collect(),
    )?;
    let mut adam = AdamW::new(
        AdamWConfig {
            lr: 1e-1,
            ..AdamWConfig::default()
        },
        coefs.values.len(),
    );
    if a.host_only {
        return host_only(&a, &cfg, &bb, &tvs, &coefs, setup.elapsed().as_secs_f64());
    }
    let graph = match a.mode {
        Mode::Graph => Some(GraphComposition::new(&bb, &tvs)?),
        Mode::Leaves => None,
    };
    let setup_s = setup.elapsed().as_secs_f64();
    let rss_setup = peak_rss_gib();
    let mut times = Vec::new();
    let mut phases: Vec<StepPhases> = Vec::new();
    for i in 0..=a.iters {
        let t = Instant::now();
        let (_, mut grad, ph) = match &graph {
            None => coefficient_gradient_timed::<f32>(&bb, &tvs, &coefs, &loss)?,
            Some(g) => {
                let (v, g) = g.gradient(&bb, &coefs, &loss)?;
                (v, g, StepPhases::default())
            }
        };
        clip_grad_norm(&mut grad, 1.0);
        let mut v = coefs.values.clone();
        adam.step(&mut v, &grad, 1e-1);
        coefs = coefs.with_values(v)?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
            phases.push(ph);
        }
    }
    times.sort_by(f64::total_cmp);
    // Median of each phase over the timed steps (graph mode has no phases: all zero).
    let median = |f: fn(&StepPhases) -> f64| {
        let mut v: Vec<f64> = phases.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let phase_ms: Vec<(&str, f64)> = vec![
        ("compose", median(|p| p.compose_ms)),
        ("wrap", median(|p| p.wrap_ms)),
        ("forward", median(|p| p.forward_ms)),
        ("backward", median(|p| p.backward_ms)),
        ("copy_out", median(|p| p.copy_out_ms)),
        ("reduce", median(|p| p.reduce_ms)),
        ("free", median(|p| p.free_ms)),
    ];
    let step_ms = times[times.len() / 2];
    eprintln!(
        "{:?} batch {} n_tv {}: {step_ms:.0} ms/step (median of {})",
        a.mode,
        a.batch,
        a.n_tv,
        times.len()
    );
    if matches!(a.mode, Mode::Leaves) {
        for (name, ms) in &phase_ms {
            eprintln!("  {name:<9} {ms:8.1} ms");
        }
        let accounted: f64 = phase_ms.iter().map(|(_, ms)| ms).sum();
        eprintln!("  {:<9} {:8.1} ms", "other", step_ms - accounted);
    }
    let out = serde_json::json!({
        "mode": a.mode, "device": a.device, "dtype": a.dtype, "bf16_kernel": bf16_kernel, "batch": a.batch, "n_tv": a.n_tv, "store": a.store, "tiny": a.tiny,
        "threads": rayon::current_num_threads(), "setup_s": setup_s, "machine": super::common::machine(),
        "ms_per_step_median": step_ms, "ms_per_step_all": times,
        "phase_ms_median": phase_ms.iter().map(|(n, ms)| (n.to_string(), serde_json::json!(ms)))
            .collect::<serde_json::Map<_, _>>(),
        "phase_ms_all": phases,
        "peak_rss_gib_after_setup": rss_setup, "peak_rss_gib": peak_rss_gib(),
        "task_vector_gib": tvs.iter().map(|t| t.nbytes()).sum::<usize>() as f64 / (1u64 << 30) as f64,
    });
    println!("{out}");
    Ok(())
}

/// `--host-only`: compose θ, then reduce a random gradient against every task vector.
fn host_only(
    a: &LearnArgs,
    cfg: &ClipConfig,
    bb: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    setup_s: f64,
) -> anyhow::Result<()> {
    let m = bb.manifest();
    let coefs = if a.parts > 1 {
        let layout = Layout::PerPart {
            k: a.parts,
            seed: 1,
        };
        let n = layout.len(a.n_tv, m.len());
        Coefficients::new(
            layout,
            a.n_tv,
            m.len(),
            (0..n).map(|i| (i % 11) as f64 * 0.1 - 0.5).collect(),
        )?
    } else {
        coefs.clone()
    };
    let grads = random_blocks(cfg, 99, 1.0, false);
    let (mut compose_ms, mut reduce_ms) = (Vec::new(), Vec::new());
    for i in 0..=a.iters {
        let t = Instant::now();
        let theta: Vec<Vec<f32>> = atlas_core::compose(m, bb.base_blocks(), tvs, &coefs)?;
        let c = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let full = atlas_core::reduce_gradient(m, &grads, tvs, &coefs)?;
        let r = t.elapsed().as_secs_f64() * 1e3;
        std::hint::black_box((theta, full));
        if i > 0 {
            compose_ms.push(c);
            reduce_ms.push(r);
        }
    }
    compose_ms.sort_by(f64::total_cmp);
    reduce_ms.sort_by(f64::total_cmp);
    let (c, r) = (
        compose_ms[compose_ms.len() / 2],
        reduce_ms[reduce_ms.len() / 2],
    );
    eprintln!(
        "host only, n_tv {}, parts {}: compose {c:.1} ms, reduce {r:.1} ms (medians of {})",
        a.n_tv,
        a.parts,
        compose_ms.len()
    );
    let out = serde_json::json!({
        "mode": "host_only", "n_tv": a.n_tv, "parts": a.parts, "store": a.store, "tiny": a.tiny,
        "threads": rayon::current_num_threads(), "setup_s": setup_s, "machine": super::common::machine(),
        "compose_ms_median": c, "reduce_ms_median": r,
        "compose_ms_all": compose_ms, "reduce_ms_all": reduce_ms,
    });
    println!("{out}");
    Ok(())
}

/// θ0 (or a task vector) per block: N(0, std²)-like uniform values; LayerNorm weights at 1 for θ0.
fn random_blocks(cfg: &ClipConfig, seed: u64, std: f32, base: bool) -> Vec<Vec<f32>> {
    let half_width = std * 3f32.sqrt();
    vision_tensors(&cfg.vision, cfg.projection_dim)
        .into_par_iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed << 16 | i as u64);
            let ln_weight = base && spec.name.contains("norm") && spec.name.ends_with("weight")
                || spec.name.contains("layrnorm.weight");
            (0..spec.numel())
                .map(|_| {
                    if ln_weight {
                        1.0
                    } else {
                        rng.gen_range(-half_width..half_width)
                    }
                })
                .collect()
        })
        .collect()
}

/// θ = θ0 + Σ_i Λ[i,b] τ_i built from candle ops with Λ a Var: every product and partial sum
/// stays in the graph until backward.
struct GraphComposition {
    base: HashMap<String, Tensor>,
    taus: Vec<HashMap<String, Tensor>>,
}

impl GraphComposition {
    fn new(bb: &Backbone, tvs: &[Arc<TaskVector>]) -> anyhow::Result<Self> {
        let m = bb.manifest();
        let tensors = |f: &dyn Fn(usize) -> Vec<f32>| -> anyhow::Result<HashMap<String, Tensor>> {
            let mut out = HashMap::new();
            for (b, block) in m.blocks().iter().enumerate() {
                let spec = &block.tensors[0];
                out.insert(
                    spec.name.clone(),
                    Tensor::from_vec(f(b), spec.shape.as_slice(), bb.device())?,
                );
            }
            Ok(out)
        };
        let base = tensors(&|b| bb.base_blocks()[b].clone())?;
        let taus = tvs
            .iter()
            .map(|tv| tensors(&|b| tv.block(b).to_f32_vec()))
            .collect::<anyhow::Result<_>>()?;
        Ok(GraphComposition { base, taus })
    }

    fn gradient(
        &self,
        bb: &Backbone,
        coefs: &Coefficients,
        loss: &dyn Fn(&VisionTower) -> atlas_clip::Result<Tensor>,
    ) -> anyhow::Result<(f64, Vec<f64>)> {
        let nb = coefs.n_blocks;
        let lam = Var::from_vec(
            coefs.values.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            coefs.values.len(),
            bb.device(),
        )?;
        let mut weights = HashMap::new();
        for (b, block) in bb.manifest().blocks().iter().enumerate() {
            let name = &block.tensors[0].name;
            let mut theta = self.base[name].clone();
            for (i, taus) in self.taus.iter().enumerate() {
                let c = lam.as_tensor().narrow(0, i * nb + b, 1)?;
                theta = theta.broadcast_add(&taus[name].broadcast_mul(&c)?)?;
            }
            weights.insert(name.clone(), theta);
        }
        let tower = bb.vision(&weights)?;
        let l = loss(&tower)?;
        let grads = l.backward()?;
        let g = grads.get(lam.as_tensor()).context("no gradient for Λ")?;
        Ok((
            l.to_scalar::<f32>()? as f64,
            g.to_dtype(DType::F64)?.to_vec1()?,
        ))
    }
}

/// Peak resident set size of this process (VmHWM), GiB.
pub(super) fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    kb / (1u64 << 20) as f64
}
