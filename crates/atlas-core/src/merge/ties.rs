//! TIES merging as FusionBench's `ties_merging_utils.ties_merging`: each input is trimmed to
//! its largest-magnitude fraction over the whole flattened model (not block by block), a sign
//! is elected per element by summed mass, and the inputs agreeing with it are combined.

use super::params::Params;
use super::{Merged, Rows};
use crate::Result;
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeFunc {
    Sum,
    Mean,
    Max,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ties {
    pub scaling_factor: f64,
    /// Share of each input kept: a fraction in [0, 1) or, above 1, a percentage (FusionBench
    /// divides values above 1 by 100; exactly 1 would make its k-th value lookup fail).
    pub threshold: f64,
    pub merge_func: MergeFunc,
}

impl Ties {
    pub(crate) fn parse(p: &mut Params, default_scaling: f64) -> Result<Ties> {
        let scaling_factor = p.number("scaling_factor", default_scaling, |_| true, "")?;
        let threshold = p.number(
            "threshold",
            20.0,
            |x| (0.0..100.0).contains(&x) && x != 1.0,
            "in [0, 1) (a fraction kept) or (1, 100) (a percentage kept)",
        )?;
        let merge_func = match p.choice("merge_func", "sum", &["sum", "mean", "max"])? {
            "mean" => MergeFunc::Mean,
            "max" => MergeFunc::Max,
            _ => MergeFunc::Sum,
        };
        p.only_default("remove_keys", &json!([]))?;
        Ok(Ties {
            scaling_factor,
            threshold,
            merge_func,
        })
    }

    pub fn params(&self) -> Value {
        let f = match self.merge_func {
            MergeFunc::Sum => "sum",
            MergeFunc::Mean => "mean",
            MergeFunc::Max => "max",
        };
        json!({"scaling_factor": self.scaling_factor, "threshold": self.threshold, "merge_func": f})
    }

    /// The fraction of each input kept.
    pub fn keep_fraction(&self) -> f64 {
        if self.threshold > 1.0 {
            self.threshold / 100.0
        } else {
            self.threshold
        }
    }

    pub(crate) fn merge(&self, rows: &Rows) -> Merged {
        let cut = magnitude_cuts(rows, self.keep_fraction());
        let signs = elect_signs(rows, &cut);
        let blocks = (0..rows.n_blocks())
            .map(|b| self.disjoint(&trimmed(rows, &cut, b), &signs[b]))
            .collect();
        Merged::Delta {
            blocks,
            scale: self.scaling_factor,
        }
    }

    /// Combines, per element, the trimmed inputs whose sign is the elected one.
    fn disjoint(&self, rows: &[Vec<f32>], signs: &[i8]) -> Vec<f32> {
        (0..signs.len())
            .map(|j| {
                let s = signs[j];
                let agree = rows.iter().map(|r| r[j]).filter(|&x| agrees(x, s));
                match self.merge_func {
                    MergeFunc::Sum => agree.sum(),
                    MergeFunc::Mean => {
                        let (sum, count) = agree.fold((0.0f32, 0u32), |(s, c), x| (s + x, c + 1));
                        sum / count.max(1) as f32
                    }
                    MergeFunc::Max => agree.fold(0.0f32, |m, x| m.max(x.abs())) * s as f32,
                }
            })
            .collect()
    }
}

/// FusionBench keeps x where the elected sign is positive and x > 0, or where it is not
/// positive and x < 0 (zeros never count).
fn agrees(x: f32, sign: i8) -> bool {
    if sign > 0 {
        x > 0.0
    } else {
        x < 0.0
    }
}

/// Per input, the magnitude an element needs to survive trimming: the k-th smallest |x| over
/// the whole flattened model with k = d − ⌊d · keep⌋ (torch `kthvalue`, 1-based), so that
/// elements with |x| ≥ it are kept, ties included.
pub fn magnitude_cuts(rows: &Rows, keep: f64) -> Vec<f32> {
    (0..rows.n_inputs())
        .map(|i| {
            let mut all: Vec<f32> = (0..rows.n_blocks())
                .flat_map(|b| rows.block(i, b))
                .map(f32::abs)
                .collect();
            let d = all.len();
            let k = d - (d as f64 * keep) as usize;
            *all.select_nth_unstable_by(k.max(1) - 1, f32::total_cmp).1
        })
        .collect()
}

/// Block `b` of every input with the elements under its cut set to zero.
pub fn trimmed(rows: &Rows, cut: &[f32], b: usize) -> Vec<Vec<f32>> {
    (0..rows.n_inputs())
        .map(|i| {
            let mut v = rows.block(i, b);
            v.iter_mut()
                .filter(|x| x.abs() < cut[i])
                .for_each(|x| *x = 0.0);
            v
        })
        .collect()
}

/// The elected sign per element, per block: the sign of the trimmed inputs' sum; where that
/// is 0, the sign of the sum of all elected signs over the whole model (FusionBench's
/// "majority" rule).
pub fn elect_signs(rows: &Rows, cut: &[f32]) -> Vec<Vec<i8>> {
    let mut signs: Vec<Vec<i8>> = (0..rows.n_blocks())
        .map(|b| {
            let t = trimmed(rows, cut, b);
            (0..t[0].len())
                .map(|j| sign(t.iter().map(|r| r[j]).sum::<f32>()))
                .collect()
        })
        .collect();
    let total: i64 = signs.iter().flatten().map(|&s| s as i64).sum();
    let majority = total.signum() as i8;
    signs
        .iter_mut()
        .flatten()
        .filter(|s| **s == 0)
        .for_each(|s| *s = majority);
    signs
}

fn sign(x: f32) -> i8 {
    if x > 0.0 {
        1
    } else if x < 0.0 {
        -1
    } else {
        0
    }
}
