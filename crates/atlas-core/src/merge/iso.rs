//! Isotropic merging (Marczak et al. 2025) as FusionBench's `isotropic_merging.iso_utils`:
//! per 2-D tensor, the merged matrix keeps the directions of its singular vectors and gives
//! every direction the same singular value, the mean of its spectrum. Iso-C uses the SVD of
//! Σ_i τ_i; Iso-CTS keeps the top `common_space_fraction` of that space and fills the rest
//! with each input's own top directions outside it. Other tensors are averaged.
//!
//! SVDs run at f64 (FusionBench's at f32). U·Vᵀ does not depend on the signs an SVD picks,
//! and neither does anything below, so the results agree to rounding.

use super::params::Params;
use super::{Merged, Rows};
use crate::Result;
use nalgebra::DMatrix;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Iso {
    pub scaling_factor: f64,
    /// None for Iso-C, the common space's share for Iso-CTS.
    pub common_space_fraction: Option<f64>,
    /// 2-D tensors averaged instead, as the others.
    pub exclude_keys: Vec<String>,
}

impl Iso {
    pub(crate) fn parse(p: &mut Params, cts: bool) -> Result<Iso> {
        let scaling_factor = p.number("scaling_factor", 1.0, |_| true, "")?;
        let common_space_fraction = if cts {
            let share = |x: f64| (0.0..=1.0).contains(&x);
            Some(p.number("common_space_fraction", 0.8, share, "in [0, 1]")?)
        } else {
            None
        };
        Ok(Iso {
            scaling_factor,
            common_space_fraction,
            exclude_keys: p.strings("exclude_keys")?,
        })
    }

    pub fn params(&self) -> Value {
        let mut v = json!({ "scaling_factor": self.scaling_factor });
        if !self.exclude_keys.is_empty() {
            v["exclude_keys"] = json!(self.exclude_keys);
        }
        if let Some(f) = self.common_space_fraction {
            v["common_space_fraction"] = json!(f);
        }
        v
    }

    pub(crate) fn merge(&self, rows: &Rows) -> Merged {
        let blocks = rows.per_named_tensor(|name, shape, inputs| match shape {
            [m, n] if !self.exclude_keys.iter().any(|k| k == name) => {
                let mats: Vec<DMatrix<f64>> = inputs
                    .iter()
                    .map(|x| DMatrix::from_row_iterator(*m, *n, x.iter().map(|&v| v as f64)))
                    .collect();
                let merged = match self.common_space_fraction {
                    None => iso_c(&mats),
                    Some(f) => iso_cts(&mats, f),
                };
                merged.transpose().iter().map(|&v| v as f32).collect()
            }
            _ => mean(inputs),
        });
        Merged::Delta {
            blocks,
            scale: self.scaling_factor,
        }
    }
}

pub(super) fn mean(inputs: &[&[f32]]) -> Vec<f32> {
    let n = inputs.len() as f32;
    (0..inputs[0].len())
        .map(|j| inputs.iter().map(|x| x[j]).sum::<f32>() / n)
        .collect()
}

/// mean(S) · U Vᵀ of Σ_i τ_i = U S Vᵀ.
fn iso_c(mats: &[DMatrix<f64>]) -> DMatrix<f64> {
    let sum = sum(mats);
    let svd = sum.svd(true, true);
    let level = svd.singular_values.mean();
    svd.u.unwrap() * svd.v_t.unwrap() * level
}

fn iso_cts(mats: &[DMatrix<f64>], fraction: f64) -> DMatrix<f64> {
    let (m, n) = mats[0].shape();
    let k = m.min(n);
    let t = mats.len();
    let (common, per_task) = spaces(k, t, fraction);
    let svd = sum(mats).svd(true, true);
    let (u, v_t) = (svd.u.unwrap(), svd.v_t.unwrap());
    let cu = u.columns(0, common).into_owned();
    let mut us = DMatrix::zeros(m, k);
    let mut vs = DMatrix::zeros(k, n);
    let mut s = vec![0.0; k];
    for (i, w) in mats.iter().enumerate() {
        let outside = w - &cu * (cu.transpose() * w);
        let own = outside.svd(true, true);
        let at = i * per_task;
        us.columns_mut(at, per_task)
            .copy_from(&own.u.unwrap().columns(0, per_task));
        vs.rows_mut(at, per_task)
            .copy_from(&own.v_t.unwrap().rows(0, per_task));
        s[at..at + per_task].copy_from_slice(&own.singular_values.as_slice()[..per_task]);
    }
    let at = t * per_task;
    us.columns_mut(at, common).copy_from(&cu);
    vs.rows_mut(at, common).copy_from(&v_t.rows(0, common));
    s[at..at + common].copy_from_slice(&svd.singular_values.as_slice()[..common]);
    let level = s.iter().sum::<f64>() / k as f64;
    polar(us) * polar(vs) * level
}

/// The common space's size and each input's, as FusionBench rounds them: the task-specific
/// total is a multiple of the input count (Python's round, half to even) and the common space
/// takes what is left.
fn spaces(k: usize, t: usize, fraction: f64) -> (usize, usize) {
    let common = (k as f64 * fraction) as usize;
    let per_task = ((k - common) as f64 / t as f64).round_ties_even() as usize;
    // FusionBench's common space would go negative here (it then fails); keep it at 0.
    let per_task = per_task.min(k / t);
    (k - per_task * t, per_task)
}

/// U Vᵀ of a = U S Vᵀ: the nearest matrix with orthonormal columns (or rows).
fn polar(a: DMatrix<f64>) -> DMatrix<f64> {
    let svd = a.svd(true, true);
    svd.u.unwrap() * svd.v_t.unwrap()
}

fn sum(mats: &[DMatrix<f64>]) -> DMatrix<f64> {
    mats[1..].iter().fold(mats[0].clone(), |acc, x| acc + x)
}
