//! Deterministic pseudo-random θ0 blocks, task vectors and coefficients over a manifest, for
//! benchmarks and self-checks: the values do not matter there, only that they are repeatable
//! and nonzero.

use crate::coefficients::{Coefficients, Layout};
use crate::manifest::Manifest;
use crate::parts::splitmix64;
use crate::task_vector::{Delta, TaskVector, TaskVectorMeta};
use crate::{Result, StorageDType};
use rayon::prelude::*;

/// Values uniform in [-scale, scale), a function of `seed` and the index only.
fn fill_random(out: &mut [f32], seed: u64, scale: f32) {
    for (j, x) in out.iter_mut().enumerate() {
        let r = splitmix64(seed.wrapping_mul(0x9E37_79B9).wrapping_add(j as u64));
        *x = ((r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
    }
}

/// One f32 vector per block of `manifest`, uniform in [-scale, scale).
pub fn random_blocks(manifest: &Manifest, seed: u64, scale: f32) -> Vec<Vec<f32>> {
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

/// Task vector number `i` (named `random{i}`), entries uniform in [-1e-3, 1e-3), stored at
/// `store`.
pub fn random_task_vector(
    manifest: &Manifest,
    i: usize,
    store: StorageDType,
) -> Result<TaskVector> {
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
    TaskVector::from_deltas(manifest, meta, store, deltas, &|_| false)
}

/// Coefficients in [0.05, 0.55): never 0, so no block is skipped by the composition.
pub fn random_coefficients(layout: Layout, n_tv: usize, n_blocks: usize) -> Result<Coefficients> {
    let n = layout.len(n_tv, n_blocks);
    let values = (0..n)
        .map(|j| 0.05 + (splitmix64(77 + j as u64) >> 11) as f64 / (1u64 << 53) as f64 * 0.5)
        .collect();
    Coefficients::new(layout, n_tv, n_blocks, values)
}
