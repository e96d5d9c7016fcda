//! Coefficient layouts Λ: one scalar per task vector (isotropic task arithmetic), one per
//! (task vector, block) (aTLAS), or one per (task vector, block, part) (aTLAS×K).
//!
//! Values are kept as f64 so finite-difference checks are meaningful; 0 means 0 and negative
//! values are allowed (negation). NaN and infinities are rejected.

use crate::{CoreError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Layout {
    Isotropic,
    PerBlock,
    PerPart { k: usize, seed: u64 },
}

impl Layout {
    /// Parts per block (1 unless per part).
    pub fn parts(&self) -> usize {
        match self {
            Layout::PerPart { k, .. } => *k,
            _ => 1,
        }
    }
    /// Number of coefficients for `n_tv` task vectors over `n_blocks` blocks.
    pub fn len(&self, n_tv: usize, n_blocks: usize) -> usize {
        match self {
            Layout::Isotropic => n_tv,
            Layout::PerBlock => n_tv * n_blocks,
            Layout::PerPart { k, .. } => n_tv * n_blocks * k,
        }
    }
}

/// Largest K: part ids are kept in a byte.
pub const MAX_PARTS: usize = 256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Coefficients {
    pub layout: Layout,
    pub n_tv: usize,
    pub n_blocks: usize,
    /// Row-major: `[n_tv]`, `[n_tv, n_blocks]` or `[n_tv, n_blocks, k]`.
    pub values: Vec<f64>,
}

impl Coefficients {
    pub fn new(layout: Layout, n_tv: usize, n_blocks: usize, values: Vec<f64>) -> Result<Self> {
        if let Layout::PerPart { k, .. } = layout {
            if k == 0 || k > MAX_PARTS {
                return Err(CoreError::Coefficients(format!(
                    "parts per block must be in 1..={MAX_PARTS}, got {k}"
                )));
            }
        }
        let want = layout.len(n_tv, n_blocks);
        if values.len() != want {
            return Err(CoreError::Coefficients(format!(
                "expected {want} values for {layout:?} with {n_tv} task vectors and {n_blocks} blocks, got {}",
                values.len()
            )));
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(CoreError::Coefficients(format!(
                "value {} at index {i} is not a finite number",
                values[i]
            )));
        }
        Ok(Coefficients {
            layout,
            n_tv,
            n_blocks,
            values,
        })
    }

    pub fn zeros(layout: Layout, n_tv: usize, n_blocks: usize) -> Result<Self> {
        Self::new(
            layout,
            n_tv,
            n_blocks,
            vec![0.0; layout.len(n_tv, n_blocks)],
        )
    }
    pub fn isotropic(values: Vec<f64>, n_blocks: usize) -> Result<Self> {
        Self::new(Layout::Isotropic, values.len(), n_blocks, values)
    }

    pub fn parts(&self) -> usize {
        self.layout.parts()
    }

    /// The K coefficients of task vector `i` on block `b` (one value unless per part).
    pub fn block(&self, i: usize, b: usize) -> &[f64] {
        let k = self.parts();
        let start = match self.layout {
            Layout::Isotropic => i,
            _ => (i * self.n_blocks + b) * k,
        };
        &self.values[start..start + k]
    }

    /// The same composition written per part with `k` parts (isotropic and per block expand).
    pub fn expanded(&self) -> Vec<f64> {
        let k = self.parts();
        let mut out = Vec::with_capacity(self.n_tv * self.n_blocks * k);
        for i in 0..self.n_tv {
            for b in 0..self.n_blocks {
                out.extend_from_slice(self.block(i, b));
            }
        }
        out
    }

    /// Folds a full `[n_tv, n_blocks, k]` gradient back into this layout's shape: a shared
    /// coefficient's gradient is the sum over the places it is used.
    pub fn fold_gradient(&self, full: &[f64]) -> Vec<f64> {
        let k = self.parts();
        assert_eq!(full.len(), self.n_tv * self.n_blocks * k, "gradient size");
        match self.layout {
            Layout::Isotropic => full
                .chunks(self.n_blocks * k)
                .map(|row| row.iter().sum())
                .collect(),
            _ => full.to_vec(),
        }
    }

    /// Replaces the values (same layout), rejecting non-finite ones.
    pub fn with_values(&self, values: Vec<f64>) -> Result<Self> {
        Self::new(self.layout, self.n_tv, self.n_blocks, values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_nan_inf_and_wrong_sizes() {
        let e = Coefficients::new(
            Layout::PerBlock,
            2,
            3,
            vec![0.0, 1.0, f64::NAN, 0.0, 0.0, 0.0],
        );
        assert!(e.unwrap_err().to_string().contains("index 2"));
        let e = Coefficients::isotropic(vec![f64::INFINITY], 3);
        assert!(e.unwrap_err().to_string().contains("not a finite"));
        let e = Coefficients::new(Layout::PerBlock, 2, 3, vec![0.0; 5]);
        assert!(e.unwrap_err().to_string().contains("expected 6"));
        let e = Coefficients::zeros(Layout::PerPart { k: 0, seed: 0 }, 1, 1);
        assert!(e.is_err());
    }

    #[test]
    fn block_access_and_fold() {
        let iso = Coefficients::isotropic(vec![0.5, -1.0], 3).unwrap();
        assert_eq!(iso.block(1, 2), &[-1.0]);
        assert_eq!(iso.expanded(), vec![0.5, 0.5, 0.5, -1.0, -1.0, -1.0]);
        assert_eq!(
            iso.fold_gradient(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            vec![6.0, 15.0]
        );
        let vals: Vec<f64> = (0..12).map(f64::from).collect();
        let pp = Coefficients::new(Layout::PerPart { k: 2, seed: 1 }, 2, 3, vals).unwrap();
        assert_eq!(pp.block(1, 1), &[8.0, 9.0]);
    }

    #[test]
    fn negative_and_zero_are_values() {
        let c = Coefficients::new(Layout::PerBlock, 1, 2, vec![0.0, -3.0]).unwrap();
        assert_eq!(c.block(0, 0), &[0.0]);
        assert_eq!(c.block(0, 1), &[-3.0]);
    }
}
