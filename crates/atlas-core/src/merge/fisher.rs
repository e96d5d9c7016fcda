//! Fisher merging (Matena & Raffel 2022) as FusionBench's `fisher_merging.fisher_merging`:
//! each parameter is the mean of the input models' values weighted by their diagonal Fisher
//! information F_i (the mean over batches of the squared gradient of Σ √p·log p, p the model's
//! own predicted probabilities),
//!
//! ```text
//! θ = Σ_i c_i (F_i + ε) θ_i / Σ_i c_i (F_i + ε),   c_i ∝ 1 / (‖F_i‖ + ε) when normalised,
//! ```
//!
//! ε = `minimal_fisher_weight` and ‖F_i‖ the L2 norm of model i's whole Fisher. On deltas the
//! same weights apply to τ_i, and a common factor of the c_i cancels, so each input is added
//! as its Fisher is known and only the two sums are kept. Tensors without a Fisher (outside
//! the merged model) are averaged.

use super::params::{Examples, Params};
use super::Merged;
use crate::{CoreError, Manifest, Result, TaskVector};
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct Fisher {
    pub examples: Examples,
    pub normalize_fisher_weight: bool,
    pub minimal_fisher_weight: f64,
}

impl Fisher {
    pub(crate) fn parse(p: &mut Params) -> Result<Fisher> {
        p.only_default("exclude_param_names_regex", &json!([]))?;
        Ok(Fisher {
            examples: Examples::parse(p, "num_fisher_examples")?,
            normalize_fisher_weight: p.boolean("normalize_fisher_weight", true)?,
            minimal_fisher_weight: p.number(
                "minimal_fisher_weight",
                1e-6,
                |x| x > 0.0,
                "above 0",
            )?,
        })
    }

    pub fn params(&self) -> Value {
        let mut v = self.examples.params("num_fisher_examples");
        v["normalize_fisher_weight"] = self.normalize_fisher_weight.into();
        v["minimal_fisher_weight"] = self.minimal_fisher_weight.into();
        v
    }
}

/// Fisher merging's sums over the inputs added so far.
pub struct FisherSums<'a> {
    manifest: &'a Manifest,
    method: Fisher,
    /// Per block, Σ c (F + ε) τ where a Fisher is given, else Σ τ.
    num: Vec<Vec<f32>>,
    /// Per block, Σ c (F + ε) where a Fisher is given.
    den: Vec<Vec<f32>>,
    /// Per block, whether it has a Fisher (set by the first input).
    weighted: Vec<bool>,
    inputs: usize,
}

impl<'a> FisherSums<'a> {
    pub fn new(manifest: &'a Manifest, method: &Fisher) -> Self {
        let zeros = || {
            manifest
                .blocks()
                .iter()
                .map(|b| vec![0.0; b.numel()])
                .collect()
        };
        FisherSums {
            manifest,
            method: method.clone(),
            num: zeros(),
            den: zeros(),
            weighted: Vec::new(),
            inputs: 0,
        }
    }

    /// Adds one input model: its task vector and, per block, its diagonal Fisher (None for
    /// blocks outside the merged model). Every input must give Fishers for the same blocks.
    pub fn add(&mut self, tv: &TaskVector, fisher: &[Option<Vec<f32>>]) -> Result<()> {
        tv.check_manifest(self.manifest)?;
        let weighted: Vec<bool> = fisher.iter().map(Option::is_some).collect();
        let sizes_ok = fisher.len() == self.manifest.len()
            && fisher
                .iter()
                .zip(self.manifest.blocks())
                .all(|(f, b)| f.as_ref().is_none_or(|f| f.len() == b.numel()));
        if !sizes_ok || (self.inputs > 0 && weighted != self.weighted) {
            return Err(CoreError::Invalid(
                "a Fisher per block of the model, for the same blocks for every input".into(),
            ));
        }
        self.weighted = weighted;
        let eps = self.method.minimal_fisher_weight as f32;
        let c = if self.method.normalize_fisher_weight {
            let norm = fisher
                .iter()
                .flatten()
                .flat_map(|f| f.iter().map(|&x| (x as f64).powi(2)))
                .sum::<f64>()
                .sqrt();
            (1.0 / (norm + self.method.minimal_fisher_weight)) as f32
        } else {
            1.0
        };
        for (b, f) in fisher.iter().enumerate() {
            let tau = tv.block(b).to_f32_vec();
            let (num, den) = (&mut self.num[b], &mut self.den[b]);
            match f {
                Some(f) => {
                    for ((n, d), (t, f)) in
                        num.iter_mut().zip(den.iter_mut()).zip(tau.iter().zip(f))
                    {
                        let w = c * (f + eps);
                        *n += w * t;
                        *d += w;
                    }
                }
                None => num.iter_mut().zip(&tau).for_each(|(n, t)| *n += t),
            }
        }
        self.inputs += 1;
        Ok(())
    }

    /// The merged delta.
    pub fn finish(self) -> Result<Merged> {
        if self.inputs == 0 {
            return Err(CoreError::Invalid(
                "fisher_merging needs at least one input".into(),
            ));
        }
        let n = self.inputs as f32;
        let blocks = self
            .num
            .into_iter()
            .zip(self.den)
            .zip(&self.weighted)
            .map(|((num, den), &w)| match w {
                true => num.iter().zip(&den).map(|(n, d)| n / d).collect(),
                false => num.iter().map(|x| x / n).collect(),
            })
            .collect();
        Ok(Merged::Delta { blocks, scale: 1.0 })
    }
}
