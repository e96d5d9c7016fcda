//! What the benchmarks share: timing with a median, deterministic random weights, task vectors
//! and coefficients, bandwidth, and the image-tower shapes by name.

use anyhow::bail;
use atlas_clip::VisionConfig;
use atlas_core::parts::splitmix64;
use atlas_core::task_vector::Delta;
use atlas_core::{Coefficients, Layout, Manifest, StoreDType, TaskVector, TaskVectorMeta};
use rayon::prelude::*;
use serde_json::json;
use std::time::Instant;

/// Timing summary of one figure, in milliseconds.
pub(crate) struct Timing {
    pub(crate) median: f64,
    min: f64,
    max: f64,
}

impl Timing {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({ "median_ms": self.median, "min_ms": self.min, "max_ms": self.max })
    }
}

/// Runs `f` `warmup` times untimed, then `iters` times timed. Whatever `f` returns is dropped
/// outside the timed region.
pub(crate) fn time<R>(warmup: usize, iters: usize, mut f: impl FnMut() -> R) -> Timing {
    for _ in 0..warmup {
        drop(f());
    }
    let ms: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            let r = f();
            let dt = t.elapsed().as_secs_f64() * 1e3;
            drop(r);
            dt
        })
        .collect();
    Timing {
        median: median(&ms),
        min: ms.iter().copied().fold(f64::INFINITY, f64::min),
        max: ms.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

/// Deterministic pseudo-random values, uniform in [-scale, scale).
fn fill_random(out: &mut [f32], seed: u64, scale: f32) {
    for (j, x) in out.iter_mut().enumerate() {
        let r = splitmix64(seed.wrapping_mul(0x9E37_79B9).wrapping_add(j as u64));
        *x = ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
    }
}

pub(crate) fn random_blocks(manifest: &Manifest, seed: u64, scale: f32) -> Vec<Vec<f32>> {
    manifest
        .blocks()
        .par_iter()
        .enumerate()
        .map(|(b, block)| {
            let mut v = vec![0.0; block.numel()];
            fill_random(&mut v, seed * 100_000 + b as u64, scale);
            v
        })
        .collect()
}

pub(crate) fn random_task_vector(
    manifest: &Manifest,
    i: usize,
    store: StoreDType,
) -> anyhow::Result<TaskVector> {
    let specs: Vec<_> = manifest.tensor_specs().map(|(t, _)| t.clone()).collect();
    let deltas: Vec<Delta> = specs
        .into_par_iter()
        .enumerate()
        .map(|(j, t)| {
            let mut data = vec![0.0; t.numel()];
            fill_random(&mut data, (i as u64 + 1) * 1_000_000 + j as u64, 1e-3);
            Delta {
                name: t.name,
                shape: t.shape,
                data,
            }
        })
        .collect();
    let meta = TaskVectorMeta {
        name: format!("random{i}"),
        source: "bench: random weights".into(),
        ..Default::default()
    };
    Ok(TaskVector::from_deltas(
        manifest,
        meta,
        store,
        deltas,
        &|_| false,
    )?)
}

/// Coefficients in [0.05, 0.55): never 0, so no block is skipped by the composition.
pub(crate) fn random_coefficients(
    layout: Layout,
    n_tv: usize,
    n_blocks: usize,
) -> anyhow::Result<Coefficients> {
    let n = layout.len(n_tv, n_blocks);
    let values = (0..n)
        .map(|j| 0.05 + (splitmix64(77 + j as u64) >> 11) as f64 / (1u64 << 53) as f64 * 0.5)
        .collect();
    Ok(Coefficients::new(layout, n_tv, n_blocks, values)?)
}

pub(crate) fn gbps(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

/// The median of `v` (the mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The image-tower shape called `name`.
pub(crate) fn vision_config(name: &str) -> anyhow::Result<VisionConfig> {
    Ok(match name {
        "B/32" => VisionConfig::vit_b32(),
        "B/16" => VisionConfig::vit_b16(),
        "L/14" => VisionConfig::vit_l14(),
        "tiny" => VisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 32,
            patch_size: 8,
            projection_dim: 32,
            ..VisionConfig::default()
        },
        _ => bail!("unknown model {name:?} (B/32, B/16, L/14 or tiny)"),
    })
}
