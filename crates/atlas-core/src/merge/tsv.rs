//! Task Singular Vectors merging (TSV-M, Gargiulo et al. 2025) as FusionBench's
//! `TSVM_utils.compute_and_sum_svd_mem_reduction`: per 2-D tensor, each of the T inputs
//! keeps its top ⌊k/T⌋ singular triplets; the kept left and right singular vectors are
//! orthogonalised together (U Vᵀ of their concatenation) and recombined with the kept
//! singular values. Other tensors are averaged.
//!
//! SVDs run at f64. Flipping a singular pair's signs flips the same column of both sides,
//! which cancels around the diagonal of singular values, so the result does not depend on the
//! signs an SVD picks.

use super::params::Params;
use super::{Merged, Rows};
use crate::Result;
use nalgebra::{DMatrix, DVector};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Tsv {
    /// FusionBench's `alpha`: a number scales the merged delta; a list (one per input)
    /// scales each input before the SVDs.
    pub alpha: Alpha,
    /// 2-D tensors averaged instead, as the others.
    pub exclude_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Alpha {
    After(f64),
    PerInput(Vec<f64>),
}

impl Tsv {
    pub(crate) fn parse(p: &mut Params, n_inputs: usize) -> Result<Tsv> {
        let alpha = match p.raw("alpha") {
            Some(Value::Array(_)) => Alpha::PerInput(p.per_input("alpha", n_inputs)?),
            _ => Alpha::After(p.number("alpha", 1.0, |_| true, "or a list of numbers")?),
        };
        let exclude_keys = p.strings("exclude_keys")?;
        p.only_default("return_single_task_models", &json!(false))?;
        Ok(Tsv {
            alpha,
            exclude_keys,
        })
    }

    pub fn params(&self) -> Value {
        let alpha = match &self.alpha {
            Alpha::After(a) => json!(a),
            Alpha::PerInput(a) => json!(a),
        };
        let mut v = json!({ "alpha": alpha });
        if !self.exclude_keys.is_empty() {
            v["exclude_keys"] = json!(self.exclude_keys);
        }
        v
    }

    pub(crate) fn merge(&self, rows: &Rows) -> Merged {
        let (weights, scale) = match &self.alpha {
            Alpha::After(a) => (vec![1.0; rows.n_inputs()], *a),
            Alpha::PerInput(a) => (a.clone(), 1.0),
        };
        let blocks = rows.per_named_tensor(|name, shape, inputs| {
            let scaled: Vec<Vec<f64>> = inputs
                .iter()
                .zip(&weights)
                .map(|(x, &w)| x.iter().map(|&v| (v as f64) * w).collect())
                .collect();
            match shape {
                [m, n] if !self.exclude_keys.iter().any(|k| k == name) => tsv(&scaled, *m, *n),
                _ => mean(&scaled),
            }
        });
        Merged::Delta { blocks, scale }
    }
}

fn mean(inputs: &[Vec<f64>]) -> Vec<f32> {
    let n = inputs.len() as f64;
    (0..inputs[0].len())
        .map(|j| (inputs.iter().map(|x| x[j]).sum::<f64>() / n) as f32)
        .collect()
}

fn tsv(inputs: &[Vec<f64>], m: usize, n: usize) -> Vec<f32> {
    let k = m.min(n);
    let r = (k as f64 * (1.0 / inputs.len() as f64)) as usize;
    let mut us = DMatrix::zeros(m, k);
    let mut vs = DMatrix::zeros(k, n);
    let mut s = DVector::zeros(k);
    for (i, x) in inputs.iter().enumerate() {
        let svd = DMatrix::from_row_slice(m, n, x).svd(true, true);
        us.columns_mut(i * r, r)
            .copy_from(&svd.u.unwrap().columns(0, r));
        vs.rows_mut(i * r, r)
            .copy_from(&svd.v_t.unwrap().rows(0, r));
        s.rows_mut(i * r, r)
            .copy_from(&svd.singular_values.rows(0, r));
    }
    let merged = polar(us) * DMatrix::from_diagonal(&s) * polar(vs);
    merged.transpose().iter().map(|&v| v as f32).collect()
}

/// U Vᵀ of a = U S Vᵀ.
fn polar(a: DMatrix<f64>) -> DMatrix<f64> {
    let svd = a.svd(true, true);
    svd.u.unwrap() * svd.v_t.unwrap()
}
