//! Model Breadcrumbs (Davari & Belilovsky 2023) as mergekit's `breadcrumbs` method: per tensor
//! (mergekit works tensor by tensor), each input keeps the `density` share of its elements
//! left after the `gamma` share of largest magnitudes and the smallest ones are masked
//! (`sparsify.magnitude_outliers`); the masked inputs are weighted and summed, optionally
//! normalised by the weights' sum, and scaled by `lambda`.

use super::params::Params;
use super::{Merged, Rows};
use crate::Result;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Breadcrumbs {
    pub density: f64,
    pub gamma: f64,
    /// One weight per input.
    pub weight: Vec<f64>,
    pub normalize: bool,
    /// mergekit's rescale: match each masked tensor's L1 norm to the unmasked one's.
    pub rescale: bool,
    pub lambda: f64,
}

impl Breadcrumbs {
    pub(crate) fn parse(p: &mut Params, n_inputs: usize) -> Result<Breadcrumbs> {
        let share = |x: f64| (0.0..=1.0).contains(&x);
        Ok(Breadcrumbs {
            density: p.number("density", 1.0, share, "in [0, 1]")?,
            gamma: p.number("gamma", 0.01, share, "in [0, 1]")?,
            weight: p.per_input("weight", n_inputs)?,
            normalize: p.boolean("normalize", false)?,
            rescale: p.boolean("rescale", false)?,
            lambda: p.number("lambda", 1.0, |_| true, "")?,
        })
    }

    pub fn params(&self) -> Value {
        json!({
            "density": self.density, "gamma": self.gamma, "weight": self.weight,
            "normalize": self.normalize, "rescale": self.rescale, "lambda": self.lambda,
        })
    }

    pub(crate) fn merge(&self, rows: &Rows) -> Merged {
        let sum: f64 = self.weight.iter().sum();
        // mergekit divides by the weights' sum only when it is not about zero.
        let divisor = match self.normalize {
            true if sum.abs() >= 1e-8 => sum as f32,
            _ => 1.0,
        };
        let blocks = rows.per_tensor(|_, inputs| {
            let mut out = vec![0.0f32; inputs[0].len()];
            for (x, w) in inputs.iter().zip(&self.weight) {
                for (o, k) in out.iter_mut().zip(self.sparsify(x)) {
                    *o += k * *w as f32;
                }
            }
            out.iter_mut().for_each(|o| *o /= divisor);
            out
        });
        Merged::Delta {
            blocks,
            scale: self.lambda,
        }
    }

    /// One tensor of one input with mergekit's `magnitude_outliers` mask applied.
    pub fn sparsify(&self, x: &[f32]) -> Vec<f32> {
        if self.density >= 1.0 {
            return x.to_vec();
        }
        let n = x.len();
        let target = (self.density * n as f64) as usize;
        let top = (self.gamma * n as f64) as usize;
        let bottom = n.saturating_sub(target + top);
        let mut order: Vec<usize> = (0..n).collect();
        // Stable, so equal magnitudes keep index order.
        order.sort_by(|&a, &b| x[a].abs().total_cmp(&x[b].abs()));
        let mut out = vec![0.0f32; n];
        for &j in &order[bottom..(bottom + target).min(n)] {
            out[j] = x[j];
        }
        if self.rescale {
            l1_rescale(x, &mut out);
        }
        out
    }
}

/// mergekit's `rescaled_masked_tensor` with the L1 norm: unchanged when either norm is
/// below 1e-7.
fn l1_rescale(before: &[f32], masked: &mut [f32]) {
    let l1 = |v: &[f32]| v.iter().map(|x| x.abs()).sum::<f32>();
    let (b, a) = (l1(before), l1(masked));
    if b < 1e-7 || a < 1e-7 {
        return;
    }
    let s = b / a;
    masked.iter_mut().for_each(|x| *x *= s);
}
