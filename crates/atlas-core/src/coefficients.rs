//! Coefficient layouts Λ: one scalar per task vector (isotropic task arithmetic), one per
//! (task vector, block) (aTLAS), or one per (task vector, block, part) (aTLAS×K).
//!
//! Values are kept as f64 so finite-difference checks are meaningful; 0 means 0 and negative
//! values are allowed (negation). NaN, infinities and magnitudes over
//! [`MAX_ABS_COEFFICIENT`] are rejected, and so is K outside `1..=`[`MAX_PARTS`], also when
//! read from JSON.

use crate::library::Library;
use crate::safetensors_io::printable;
use crate::task_vector::TaskVector;
use crate::{CoreError, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", try_from = "LayoutJson")]
pub enum Layout {
    Isotropic,
    PerBlock,
    PerPart { k: usize, seed: u64 },
}

/// What JSON may say; [`Layout`] is this with K checked.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum LayoutJson {
    Isotropic,
    PerBlock,
    PerPart { k: usize, seed: u64 },
}

impl TryFrom<LayoutJson> for Layout {
    type Error = CoreError;
    fn try_from(l: LayoutJson) -> Result<Self> {
        let layout = match l {
            LayoutJson::Isotropic => Layout::Isotropic,
            LayoutJson::PerBlock => Layout::PerBlock,
            LayoutJson::PerPart { k, seed } => Layout::PerPart { k, seed },
        };
        layout.check()?;
        Ok(layout)
    }
}

impl Layout {
    /// K must be in `1..=MAX_PARTS`.
    pub fn check(&self) -> Result<()> {
        match *self {
            Layout::PerPart { k, .. } if k == 0 || k > MAX_PARTS => Err(CoreError::Coefficients(
                format!("parts per block must be in 1..={MAX_PARTS}, got {k}"),
            )),
            _ => Ok(()),
        }
    }

    /// Parts per block (1 unless per part).
    pub fn parts(&self) -> usize {
        match self {
            Layout::PerPart { k, .. } => *k,
            _ => 1,
        }
    }
    /// Number of coefficients for `n_tv` task vectors over `n_blocks` blocks (saturating: an
    /// absurd count fails the length check instead of overflowing).
    pub fn len(&self, n_tv: usize, n_blocks: usize) -> usize {
        match self {
            Layout::Isotropic => n_tv,
            Layout::PerBlock => n_tv.saturating_mul(n_blocks),
            Layout::PerPart { k, .. } => n_tv.saturating_mul(n_blocks).saturating_mul(*k),
        }
    }
}

/// Largest K: part ids are kept in a byte.
pub const MAX_PARTS: usize = 256;

/// Largest full `[n_tv, n_blocks, K]` grid (2^24, e.g. 327 task vectors x 200 blocks x 256
/// parts): [`Coefficients::expanded`] and the gradients materialise it, so an isotropic layout
/// claiming 2^40 blocks must not get through on the strength of its few values.
pub const MAX_GRID: usize = 1 << 24;

/// Largest |Λ| accepted. Far beyond any useful coefficient, and small enough that Λ·τ stays
/// finite in f32 for any half-precision τ (65504 · 1e6 ≈ 6.6e10), so a composition can never
/// hold infinities.
pub const MAX_ABS_COEFFICIENT: f64 = 1e6;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "CoefficientsJson")]
pub struct Coefficients {
    pub layout: Layout,
    pub n_tv: usize,
    pub n_blocks: usize,
    /// Row-major: `[n_tv]`, `[n_tv, n_blocks]` or `[n_tv, n_blocks, k]`.
    pub values: Vec<f64>,
}

/// Stored coefficients as JSON gives them; [`Coefficients`] is this validated.
#[derive(Deserialize)]
struct CoefficientsJson {
    layout: Layout,
    n_tv: usize,
    n_blocks: usize,
    values: Vec<f64>,
}

impl TryFrom<CoefficientsJson> for Coefficients {
    type Error = CoreError;
    fn try_from(c: CoefficientsJson) -> Result<Self> {
        Coefficients::new(c.layout, c.n_tv, c.n_blocks, c.values)
    }
}

impl Coefficients {
    /// Checks K, the number of values and every value (finite, at most
    /// [`MAX_ABS_COEFFICIENT`]); errors name the task vector and block by index.
    pub fn new(layout: Layout, n_tv: usize, n_blocks: usize, values: Vec<f64>) -> Result<Self> {
        let names = Names {
            tv: &|i| i.to_string(),
            block: &|b| b.to_string(),
        };
        Self::validated(layout, n_tv, n_blocks, values, &names)
    }

    /// [`Coefficients::new`] with errors naming task vectors and blocks as `names` says.
    fn validated(
        layout: Layout,
        n_tv: usize,
        n_blocks: usize,
        values: Vec<f64>,
        names: &Names<'_>,
    ) -> Result<Self> {
        layout.check()?;
        let grid = n_tv
            .checked_mul(n_blocks)
            .and_then(|n| n.checked_mul(layout.parts()));
        if grid.is_none_or(|g| g > MAX_GRID) {
            return Err(CoreError::Coefficients(format!(
                "{n_tv} task vectors x {n_blocks} blocks x {} parts is over the limit of {MAX_GRID} coefficients",
                layout.parts()
            )));
        }
        let want = layout.len(n_tv, n_blocks);
        if values.len() != want {
            return Err(CoreError::Coefficients(format!(
                "expected {want} values for {layout:?} with {n_tv} task vectors and {n_blocks} blocks, got {}",
                values.len()
            )));
        }
        let bad = values
            .iter()
            .position(|v| !v.is_finite() || v.abs() > MAX_ABS_COEFFICIENT);
        if let Some(i) = bad {
            return Err(CoreError::Coefficients(format!(
                "value {} at index {i} ({}) is not a finite number of magnitude at most {MAX_ABS_COEFFICIENT:e}",
                short_number(values[i]),
                names.place(layout, n_blocks, i)
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
        // Check K before allocating: K = 10^9 must not allocate 10^9 zeros first.
        layout.check()?;
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

/// A number as an error shows it: 1e308 rather than its 309 digits.
fn short_number(v: f64) -> String {
    if v.abs() < 1e7 {
        v.to_string()
    } else {
        format!("{v:e}")
    }
}

/// How errors name task vector `i` and block `b`.
struct Names<'a> {
    tv: &'a dyn Fn(usize) -> String,
    block: &'a dyn Fn(usize) -> String,
}

impl Names<'_> {
    /// The task vector, block and part that value `index` of a layout applies to.
    fn place(&self, layout: Layout, n_blocks: usize, index: usize) -> String {
        let n_blocks = n_blocks.max(1);
        match layout {
            Layout::Isotropic => format!("task vector {}, every block", (self.tv)(index)),
            Layout::PerBlock => format!(
                "task vector {}, block {}",
                (self.tv)(index / n_blocks),
                (self.block)(index % n_blocks)
            ),
            Layout::PerPart { k, .. } => format!(
                "task vector {}, block {}, part {}",
                (self.tv)(index / k / n_blocks),
                (self.block)(index / k % n_blocks),
                index % k
            ),
        }
    }
}

/// Explicit coefficients as a request gives them: task-vector names, a layout and the values,
/// row-major (`[n_tv]`, `[n_tv, n_blocks]` or `[n_tv, n_blocks, K]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoefficientsRequest {
    pub task_vectors: Vec<String>,
    pub layout: Layout,
    pub values: Vec<f64>,
}

impl CoefficientsRequest {
    /// Parses the JSON form; the error names what is wrong (with line and column).
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        serde_json::from_slice(bytes).map_err(|e| {
            CoreError::Coefficients(format!("invalid request: {}", printable(&e.to_string())))
        })
    }

    /// Checks the request against a library and returns the named task vectors, in order,
    /// with their coefficients; see [`resolve`].
    pub fn resolve(&self, library: &Library) -> Result<(Vec<Arc<TaskVector>>, Coefficients)> {
        resolve(
            library,
            &self.task_vectors,
            self.layout,
            self.values.clone(),
        )
    }
}

/// Explicit coefficients checked against a library: at least one task vector, each name known
/// and given once, K in range, one value per (task vector, block[, part]), every value finite
/// and at most [`MAX_ABS_COEFFICIENT`] in magnitude. Errors name the task vector and block.
pub fn resolve(
    library: &Library,
    names: &[String],
    layout: Layout,
    values: Vec<f64>,
) -> Result<(Vec<Arc<TaskVector>>, Coefficients)> {
    if names.is_empty() {
        return Err(CoreError::Coefficients(
            "name at least one task vector".into(),
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if library.get(name).is_none() {
            return Err(CoreError::Coefficients(format!(
                "no task vector named {}",
                printable(name)
            )));
        }
        if names[..i].contains(name) {
            return Err(CoreError::Coefficients(format!(
                "task vector {} is named twice",
                printable(name)
            )));
        }
    }
    let tvs = library.select(names)?;
    let manifest = library.manifest();
    let block_names = Names {
        tv: &|i| printable(&names[i]),
        block: &|b| manifest.blocks()[b].name.clone(),
    };
    let n_blocks = manifest.len();
    let coefs = Coefficients::validated(layout, tvs.len(), n_blocks, values, &block_names)?;
    Ok((tvs, coefs))
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
