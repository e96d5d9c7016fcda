//! WUDI merging (Cheng et al. 2025, "Whoever Started the Interference Should End It") as
//! FusionBench's `wudi.wudi_merging`: per 2-D tensor, the merged delta τ starts at Σ_i τ_i and
//! takes `iter_num` Adam steps (lr 1e-5, PyTorch's defaults otherwise) on
//!
//! ```text
//! L(τ) = Σ_i ‖(τ − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F
//! ```
//!
//! Other tensors, and those named in `exclude_keys`, are averaged. The merged model is θ0 + τ.
//!
//! The gradient, 2 Σ_i (τ − τ_i) τ_iᵀ τ_i / ‖τ_i‖², is computed as τ·A − B with the constant
//! A = Σ_i 2 τ_iᵀτ_i / ‖τ_i‖² (n × n) and B = Σ_i 2 τ_i τ_iᵀ τ_i / ‖τ_i‖² (m × n), both formed
//! once at f64: one m × n × n product per step instead of 2k products of m × m × n. An input
//! whose tensor is all zeros has no term (FusionBench divides 0 by 0 there and gets NaN).

use super::params::Params;
use super::{Merged, Rows};
use crate::Result;
use nalgebra::DMatrix;
use serde_json::{json, Value};

/// Adam steps at most (FusionBench's default is 400).
pub const MAX_ITER: u64 = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct Wudi {
    pub iter_num: usize,
    /// Tensor names merged by the mean instead.
    pub exclude_keys: Vec<String>,
}

const LR: f64 = 1e-5;
const BETAS: (f64, f64) = (0.9, 0.999);
const EPS: f64 = 1e-8;

impl Wudi {
    pub(crate) fn parse(p: &mut Params) -> Result<Wudi> {
        Ok(Wudi {
            iter_num: p.integer("iter_num", 400, MAX_ITER)? as usize,
            exclude_keys: p.strings("exclude_keys")?,
        })
    }

    pub fn params(&self) -> Value {
        json!({ "iter_num": self.iter_num, "exclude_keys": self.exclude_keys })
    }

    /// The merged delta; `progress(done, total)` after each 2-D tensor (they take the time).
    pub(crate) fn merge(
        &self,
        rows: &Rows,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Merged> {
        let manifest = rows.manifest();
        super::check_tensor_names(manifest, "wudi", &self.exclude_keys)?;
        let total = manifest
            .blocks()
            .iter()
            .flat_map(|b| &b.tensors)
            .filter(|t| t.shape.len() == 2 && !self.exclude_keys.contains(&t.name))
            .count();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let blocks = rows.per_named_tensor(|name, shape, inputs| match shape {
            [m, n] if !self.exclude_keys.iter().any(|k| k == name) => {
                let out = self.solve(*m, *n, inputs);
                let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                progress(d, total);
                out
            }
            _ => super::iso::mean(inputs),
        });
        Ok(Merged::Delta { blocks, scale: 1.0 })
    }

    /// τ after `iter_num` Adam steps from Σ_i τ_i, for one m × n tensor (row-major inputs).
    fn solve(&self, m: usize, n: usize, inputs: &[&[f32]]) -> Vec<f32> {
        let mats: Vec<DMatrix<f64>> = inputs
            .iter()
            .map(|x| DMatrix::from_row_iterator(m, n, x.iter().map(|&v| v as f64)))
            .collect();
        let mut a = DMatrix::<f64>::zeros(n, n);
        let mut b = DMatrix::<f64>::zeros(m, n);
        for t in &mats {
            let norm2 = t.norm_squared();
            if norm2 == 0.0 {
                continue;
            }
            let gram = t.transpose() * t;
            b += (t * &gram) * (2.0 / norm2);
            a += gram * (2.0 / norm2);
        }
        // τ, Adam's moments and the product at f32, as the reference's parameter is.
        let a = a.map(|v| v as f32);
        let b = b.map(|v| v as f32);
        let mut tau = mats.iter().fold(DMatrix::<f32>::zeros(m, n), |acc, t| {
            acc + t.map(|v| v as f32)
        });
        let mut m1 = DMatrix::<f32>::zeros(m, n);
        let mut m2 = DMatrix::<f32>::zeros(m, n);
        for step in 1..=self.iter_num {
            let grad = &tau * &a - &b;
            let bc1 = 1.0 - BETAS.0.powi(step as i32);
            let bc2_sqrt = (1.0 - BETAS.1.powi(step as i32)).sqrt();
            let step_size = (LR / bc1) as f32;
            for ((p, g), (e1, e2)) in tau
                .iter_mut()
                .zip(grad.iter())
                .zip(m1.iter_mut().zip(m2.iter_mut()))
            {
                *e1 += (g - *e1) * (1.0 - BETAS.0 as f32);
                *e2 = *e2 * BETAS.1 as f32 + g * g * (1.0 - BETAS.1 as f32);
                let denom = e2.sqrt() / bc2_sqrt as f32 + EPS as f32;
                *p -= step_size * *e1 / denom;
            }
        }
        tau.transpose().iter().copied().collect()
    }
}
