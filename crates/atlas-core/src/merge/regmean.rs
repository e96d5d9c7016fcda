//! RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
//! Models") as FusionBench's `regmean.regmean_merging`: each linear layer's merged weight
//! solves the least-squares problem of matching every input model's outputs on its own task's
//! inputs,
//!
//! ```text
//! W = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,   G̃_i = r·G_i + (1 − r)·diag(G_i),
//! ```
//!
//! where G_i is the mean of x xᵀ over the tokens that layer of model i read and r is
//! `reduce_non_diagonal_ratio`. Every other tensor is averaged. On deltas, with W_i = W0 + τ_i:
//! τ = (Σ_i τ_i G̃_i)(Σ_i G̃_i)⁻¹ (the G̃ are symmetric), so the inputs are added one at a time
//! and only the two sums are kept: Σ G̃ per layer input and Σ τ G̃ per weight.

use super::params::{Examples, Params};
use super::Merged;
use crate::{CoreError, Manifest, Result, TaskVector};
use nalgebra::DMatrix;
use serde_json::Value;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq)]
pub struct RegMean {
    pub examples: Examples,
    pub reduce_non_diagonal_ratio: f64,
}

impl RegMean {
    pub(crate) fn parse(p: &mut Params) -> Result<RegMean> {
        p.only_default("weight_transpose", &serde_json::json!(true))?;
        p.only_default("exclude_param_names_regex", &serde_json::json!([]))?;
        Ok(RegMean {
            examples: Examples::parse(p, "num_regmean_examples")?,
            reduce_non_diagonal_ratio: p.number(
                "reduce_non_diagonal_ratio",
                0.95,
                |x| (0.0..=1.0).contains(&x),
                "in [0, 1]",
            )?,
        })
    }

    pub fn params(&self) -> Value {
        let mut v = self.examples.params("num_regmean_examples");
        v["reduce_non_diagonal_ratio"] = self.reduce_non_diagonal_ratio.into();
        v
    }
}

/// The mean of x xᵀ over the tokens one layer input held (`[dim, dim]`, row-major), with the
/// weights (tensor names) that read that input.
#[derive(Debug, Clone)]
pub struct Gram {
    pub weights: Vec<String>,
    pub dim: usize,
    pub values: Vec<f32>,
}

/// RegMean's sums over the inputs added so far.
pub struct RegMeanSums<'a> {
    manifest: &'a Manifest,
    ratio: f32,
    /// Σ G̃ per layer input, with the weights reading it.
    grams: Vec<Gram>,
    /// Σ τ G̃ per weight (`[out, in]`, as the weight).
    products: HashMap<String, Vec<f32>>,
    /// Σ τ per block, for the tensors that are averaged (None: they are left at zero).
    sum: Option<Vec<Vec<f32>>>,
    inputs: usize,
}

impl<'a> RegMeanSums<'a> {
    pub fn new(manifest: &'a Manifest, method: &RegMean) -> Self {
        RegMeanSums {
            manifest,
            ratio: method.reduce_non_diagonal_ratio as f32,
            grams: Vec::new(),
            products: HashMap::new(),
            sum: Some(
                manifest
                    .blocks()
                    .iter()
                    .map(|b| vec![0.0; b.numel()])
                    .collect(),
            ),
            inputs: 0,
        }
    }

    /// As [`RegMeanSums::new`], solving the weights the Grams name and leaving every other
    /// tensor at zero: for a caller that merges one layer at a time and averages the rest once.
    pub fn solving_only(manifest: &'a Manifest, method: &RegMean) -> Self {
        RegMeanSums {
            sum: None,
            ..Self::new(manifest, method)
        }
    }

    /// Adds one input model: its task vector and its layers' Gram matrices. Every input must
    /// give Grams for the same weights.
    pub fn add(&mut self, tv: &TaskVector, grams: Vec<Gram>) -> Result<()> {
        tv.check_manifest(self.manifest)?;
        self.check_weights(&grams)?;
        for (b, s) in self.sum.iter_mut().flatten().enumerate() {
            let x = tv.block(b).to_f32_vec();
            s.iter_mut().zip(x).for_each(|(s, x)| *s += x);
        }
        for (k, mut g) in grams.into_iter().enumerate() {
            self.reduce_non_diagonal(&mut g);
            let gm = DMatrix::from_row_slice(g.dim, g.dim, &g.values);
            for w in &g.weights {
                let spec = self.manifest.spec(w).expect("checked");
                let tau = tv.tensor_f32(self.manifest, w).expect("checked");
                let t = DMatrix::from_row_slice(spec.shape[0], g.dim, &tau);
                // Row-major τ G̃ is the column-major (G̃ τᵀ): G̃ is symmetric.
                let prod = &gm * t.transpose();
                let acc = self
                    .products
                    .entry(w.clone())
                    .or_insert_with(|| vec![0.0; tau.len()]);
                acc.iter_mut().zip(prod.iter()).for_each(|(a, p)| *a += p);
            }
            match self.grams.get_mut(k) {
                Some(sum) => sum
                    .values
                    .iter_mut()
                    .zip(&g.values)
                    .for_each(|(s, x)| *s += x),
                None => self.grams.push(g),
            }
        }
        self.inputs += 1;
        Ok(())
    }

    /// Scales the off-diagonal entries by r, as FusionBench's `reduce_non_diagonal_elements`.
    fn reduce_non_diagonal(&self, g: &mut Gram) {
        for (i, row) in g.values.chunks_mut(g.dim).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                if i != j {
                    *x *= self.ratio;
                }
            }
        }
    }

    /// The Grams name weights of the manifest, 2-D with `dim` inputs, each once; after the
    /// first input, the same weights in the same order.
    fn check_weights(&self, grams: &[Gram]) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for g in grams {
            if g.values.len() != g.dim * g.dim {
                return Err(CoreError::Invalid(format!(
                    "a Gram matrix of {} values is not {}×{}",
                    g.values.len(),
                    g.dim,
                    g.dim
                )));
            }
            for w in &g.weights {
                let ok = matches!(self.manifest.spec(w), Some(s) if s.shape.len() == 2 && s.shape[1] == g.dim);
                if !ok || !seen.insert(w) {
                    return Err(CoreError::tensor(
                        w,
                        format!(
                            "not a 2-D weight of the model with {} inputs, or named twice",
                            g.dim
                        ),
                    ));
                }
            }
        }
        let same = |a: &[Gram], b: &[Gram]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.weights == y.weights)
        };
        if self.inputs > 0 && !same(&self.grams, grams) {
            return Err(CoreError::Invalid(
                "every input must give Gram matrices for the same weights".into(),
            ));
        }
        Ok(())
    }

    /// The merged delta; `step(done, total)` after each layer input's solve, and None as soon
    /// as it returns false (a cancelled job).
    pub fn finish(self, step: &mut dyn FnMut(usize, usize) -> bool) -> Result<Option<Merged>> {
        if self.inputs == 0 {
            return Err(CoreError::Invalid(
                "regmean needs at least one input".into(),
            ));
        }
        let n = self.inputs as f32;
        let mut blocks: Vec<Vec<f32>> = match self.sum {
            Some(sum) => sum
                .into_iter()
                .map(|b| b.into_iter().map(|x| x / n).collect())
                .collect(),
            None => self
                .manifest
                .blocks()
                .iter()
                .map(|b| vec![0.0; b.numel()])
                .collect(),
        };
        let total = self.grams.len();
        for (k, g) in self.grams.iter().enumerate() {
            let s = DMatrix::from_row_iterator(g.dim, g.dim, g.values.iter().map(|&x| x as f64));
            let chol = s.clone().cholesky();
            let lu = chol.is_none().then(|| s.lu());
            for w in &g.weights {
                let p = &self.products[w];
                let rows = p.len() / g.dim;
                // (Σ τ G̃) S⁻¹ = (S⁻¹ (Σ τ G̃)ᵀ)ᵀ: solve for the columns of the transposed
                // product, which the column-major view of the row-major product is.
                let pt = DMatrix::from_column_slice(g.dim, rows, p).map(|x| x as f64);
                let x = match (&chol, &lu) {
                    (Some(c), _) => Some(c.solve(&pt)),
                    (None, Some(lu)) => lu.solve(&pt),
                    (None, None) => None,
                }
                .ok_or_else(|| {
                    CoreError::tensor(w, "the summed Gram matrix of its inputs is singular: give more examples, or a reduce_non_diagonal_ratio below 1")
                })?;
                let loc = self.manifest.locate(w).expect("checked");
                let out = &mut blocks[loc.block][loc.offset..loc.offset + loc.numel];
                // The column-major x is [in, out]: its memory is the row-major [out, in].
                out.iter_mut()
                    .zip(x.iter())
                    .for_each(|(o, v)| *o = *v as f32);
            }
            if !step(k + 1, total) {
                return Ok(None);
            }
        }
        Ok(Some(Merged::Delta { blocks, scale: 1.0 }))
    }
}
