//! Data-free merges of task vectors under FusionBench's method names and parameters (and
//! mergekit's for Breadcrumbs), with their defaults and meanings.
//!
//! A merge either picks coefficients for the inputs (simple average, task arithmetic), or
//! builds a new delta τ_m; the merged model is then θ0 + scale · τ_m, where `scale` is the
//! method's scaling factor, kept apart from τ_m so that the delta can be stored as a task
//! vector and composed like any other.

mod breadcrumbs;
pub mod dare;
mod fisher;
mod iso;
mod params;
mod regmean;
pub mod ties;
mod tsv;
mod wudi;

use crate::buffer::Buffer;
use crate::{CoreError, Manifest, Result, StorageDType, TaskVector, TaskVectorMeta};
use params::Params;
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};

pub use breadcrumbs::Breadcrumbs;
pub use dare::{Dare, Keep};
pub use fisher::{Fisher, FisherSums};
pub use iso::Iso;
pub use params::Examples;
pub use regmean::{Gram, RegMean, RegMeanSums};
pub use ties::{MergeFunc, Ties};
pub use tsv::{Alpha, Tsv};
pub use wudi::Wudi;

/// The method names accepted, FusionBench's spelling.
pub const METHODS: &[&str] = &[
    "simple_average",
    "task_arithmetic",
    "ties_merging",
    "dare_task_arithmetic",
    "dare_ties_merging",
    "breadcrumbs",
    "magmax",
    "iso_c",
    "iso_cts",
    "tsv_m",
    "wudi",
    "regmean",
    "regmean_plusplus",
    "fisher_merging",
];

/// A merge method with its parameters resolved (defaults filled in).
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    SimpleAverage,
    TaskArithmetic {
        scaling_factor: f64,
    },
    Ties(Ties),
    DareTaskArithmetic {
        dare: Dare,
        scaling_factor: f64,
    },
    DareTies {
        dare: Dare,
        ties: Ties,
    },
    Breadcrumbs(Breadcrumbs),
    MagMax {
        scaling_factor: f64,
    },
    /// Iso-C, or Iso-CTS when it has a common space fraction.
    Iso(Iso),
    Tsv(Tsv),
    Wudi(Wudi),
    /// Needs each input's Gram matrices on its task's data ([`RegMeanSums`]).
    RegMean(RegMean),
    /// RegMean layer by layer, each layer's inputs from the layers merged before it.
    RegMeanPlusPlus(RegMean),
    /// Needs each input's Fisher on its task's data ([`FisherSums`]).
    Fisher(Fisher),
}

/// What a merge produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Merged {
    /// One isotropic coefficient per input task vector.
    Coefficients(Vec<f64>),
    /// A new delta per manifest block, composed with coefficient `scale`.
    Delta { blocks: Vec<Vec<f32>>, scale: f64 },
}

impl Merged {
    /// θ_merged − θ0 per block: the coefficients or the scale applied (what FusionBench's
    /// merged model holds, as one delta to compose at 1).
    pub fn model_delta(&self, inputs: &[&TaskVector]) -> Vec<Vec<f32>> {
        match self {
            Merged::Delta { blocks, scale } => blocks
                .iter()
                .map(|b| b.iter().map(|x| *scale as f32 * x).collect())
                .collect(),
            Merged::Coefficients(c) => (0..inputs[0].blocks().len())
                .map(|b| {
                    let mut out = vec![0.0f32; inputs[0].block(b).len()];
                    for (tv, &c) in inputs.iter().zip(c) {
                        let x = tv.block(b).to_f32_vec();
                        out.iter_mut().zip(x).for_each(|(o, x)| *o += c as f32 * x);
                    }
                    out
                })
                .collect(),
        }
    }
}

fn finite(_: f64) -> bool {
    true
}

impl Method {
    /// Reads `params` (FusionBench's parameter names) for method `name`, for `n_inputs` task
    /// vectors. Absent parameters take FusionBench's defaults.
    pub fn parse(name: &str, params: &Map<String, Value>, n_inputs: usize) -> Result<Method> {
        let mut p = Params::new(name, params);
        let method = match name {
            "simple_average" => Method::SimpleAverage,
            "task_arithmetic" => Method::TaskArithmetic {
                scaling_factor: p.number("scaling_factor", 0.3, finite, "")?,
            },
            "ties_merging" => Method::Ties(Ties::parse(&mut p, 0.3)?),
            "dare_task_arithmetic" => Method::DareTaskArithmetic {
                scaling_factor: p.number("scaling_factor", 0.3, finite, "")?,
                dare: Dare::parse(&mut p)?,
            },
            "dare_ties_merging" => Method::DareTies {
                dare: Dare::parse(&mut p)?,
                ties: Ties::parse(&mut p, 0.5)?,
            },
            "breadcrumbs" => Method::Breadcrumbs(Breadcrumbs::parse(&mut p, n_inputs)?),
            "magmax" => {
                p.only_default("inplace", &json!(true))?;
                Method::MagMax {
                    scaling_factor: p.number("scaling_factor", 0.5, finite, "")?,
                }
            }
            "iso_c" => Method::Iso(Iso::parse(&mut p, false)?),
            "iso_cts" => Method::Iso(Iso::parse(&mut p, true)?),
            "tsv_m" => Method::Tsv(Tsv::parse(&mut p, n_inputs)?),
            "wudi" => Method::Wudi(Wudi::parse(&mut p)?),
            "regmean" => Method::RegMean(RegMean::parse(&mut p)?),
            "regmean_plusplus" => Method::RegMeanPlusPlus(RegMean::parse(&mut p)?),
            "fisher_merging" => Method::Fisher(Fisher::parse(&mut p)?),
            _ => {
                return Err(CoreError::Invalid(format!(
                    "method \"{}\" is not known; known are {METHODS:?}",
                    crate::safetensors_io::printable(name)
                )))
            }
        };
        p.finish()?;
        if n_inputs == 0 {
            return Err(CoreError::Invalid(format!(
                "{name} needs at least one task vector"
            )));
        }
        Ok(method)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Method::SimpleAverage => "simple_average",
            Method::TaskArithmetic { .. } => "task_arithmetic",
            Method::Ties(_) => "ties_merging",
            Method::DareTaskArithmetic { .. } => "dare_task_arithmetic",
            Method::DareTies { .. } => "dare_ties_merging",
            Method::Breadcrumbs(_) => "breadcrumbs",
            Method::MagMax { .. } => "magmax",
            Method::Iso(i) if i.common_space_fraction.is_some() => "iso_cts",
            Method::Iso(_) => "iso_c",
            Method::Tsv(_) => "tsv_m",
            Method::Wudi(_) => "wudi",
            Method::RegMean(_) => "regmean",
            Method::RegMeanPlusPlus(_) => "regmean_plusplus",
            Method::Fisher(_) => "fisher_merging",
        }
    }

    /// Every parameter with the value used, defaults included (for provenance).
    pub fn params(&self) -> Value {
        match self {
            Method::SimpleAverage => json!({}),
            Method::TaskArithmetic { scaling_factor } | Method::MagMax { scaling_factor } => {
                json!({ "scaling_factor": scaling_factor })
            }
            Method::Ties(t) => t.params(),
            Method::DareTaskArithmetic {
                dare,
                scaling_factor,
            } => merge_objects(dare.params(), json!({ "scaling_factor": scaling_factor })),
            Method::DareTies { dare, ties } => merge_objects(dare.params(), ties.params()),
            Method::Breadcrumbs(b) => b.params(),
            Method::Iso(i) => i.params(),
            Method::Tsv(t) => t.params(),
            Method::Wudi(w) => w.params(),
            Method::RegMean(r) | Method::RegMeanPlusPlus(r) => r.params(),
            Method::Fisher(f) => f.params(),
        }
    }

    /// Checks what depends on the model (names of its tensors), before any work.
    pub fn check(&self, manifest: &Manifest) -> Result<()> {
        let name = self.name();
        match self {
            Method::Wudi(w) => check_tensor_names(manifest, name, &w.exclude_keys),
            Method::Iso(i) => check_tensor_names(manifest, name, &i.exclude_keys),
            Method::Tsv(t) => check_tensor_names(manifest, name, &t.exclude_keys),
            _ => Ok(()),
        }
    }

    /// How many examples of each input's task the merge reads, if it reads data.
    pub fn examples(&self) -> Option<Examples> {
        match self {
            Method::RegMean(r) | Method::RegMeanPlusPlus(r) => Some(r.examples),
            Method::Fisher(f) => Some(f.examples),
            _ => None,
        }
    }

    /// Whether the result is coefficients rather than a new delta.
    pub fn gives_coefficients(&self) -> bool {
        matches!(self, Method::SimpleAverage | Method::TaskArithmetic { .. })
    }
}

/// Every name in `exclude_keys` is a tensor of the model.
fn check_tensor_names(manifest: &Manifest, method: &str, names: &[String]) -> Result<()> {
    match names.iter().find(|k| manifest.spec(k).is_none()) {
        Some(key) => Err(CoreError::Invalid(format!(
            "params.exclude_keys of {method}: {key:?} is not a tensor of the model"
        ))),
        None => Ok(()),
    }
}

fn merge_objects(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

/// Merges `inputs` (all over `manifest`) by `method`; DARE draws its masks from its seed.
pub fn merge(method: &Method, manifest: &Manifest, inputs: &[&TaskVector]) -> Result<Merged> {
    merge_with(method, manifest, inputs, None)
}

/// As [`merge`], calling `progress(done, total)` as a long merge (WUDI's gradient steps)
/// finishes each of its parts, and stopping between blocks once `cancel` is set
/// ([`CoreError::Cancelled`]): an SVD merge or WUDI on ViT-B/32 takes minutes.
pub fn merge_reporting(
    method: &Method,
    manifest: &Manifest,
    inputs: &[&TaskVector],
    progress: &(dyn Fn(usize, usize) + Sync),
    cancel: &AtomicBool,
) -> Result<Merged> {
    let merged = match method {
        Method::Wudi(w) => {
            check_inputs(manifest, inputs)?;
            w.merge(
                &Rows::new(manifest, inputs, None)?.cancelled_by(cancel),
                progress,
            )
        }
        _ => merge_rows(method, manifest, inputs, None, Some(cancel)),
    };
    match cancel.load(Ordering::Relaxed) {
        true => Err(CoreError::Cancelled),
        false => merged,
    }
}

/// As [`merge`], with DARE's keep masks given (one per input, over the flattened manifest)
/// instead of drawn: how results are compared with another implementation's draws.
pub fn merge_with(
    method: &Method,
    manifest: &Manifest,
    inputs: &[&TaskVector],
    masks: Option<&[Vec<bool>]>,
) -> Result<Merged> {
    merge_rows(method, manifest, inputs, masks, None)
}

fn merge_rows(
    method: &Method,
    manifest: &Manifest,
    inputs: &[&TaskVector],
    masks: Option<&[Vec<bool>]>,
    cancel: Option<&AtomicBool>,
) -> Result<Merged> {
    check_inputs(manifest, inputs)?;
    method.check(manifest)?;
    let n = inputs.len();
    let rows = |drop| -> Result<Rows> {
        let r = Rows::new(manifest, inputs, drop)?;
        Ok(match cancel {
            Some(c) => r.cancelled_by(c),
            None => r,
        })
    };
    let plain = rows(None)?;
    Ok(match method {
        Method::SimpleAverage => Merged::Coefficients(vec![1.0 / n as f64; n]),
        Method::TaskArithmetic { scaling_factor } => Merged::Coefficients(vec![*scaling_factor; n]),
        Method::Ties(t) => t.merge(&plain),
        Method::DareTaskArithmetic {
            dare,
            scaling_factor,
        } => Merged::Delta {
            blocks: rows(Some(dare.keep(masks)))?.sum(),
            scale: *scaling_factor,
        },
        Method::DareTies { dare, ties } => ties.merge(&rows(Some(dare.keep(masks)))?),
        Method::Breadcrumbs(b) => b.merge(&plain),
        Method::MagMax { scaling_factor } => Merged::Delta {
            blocks: plain.magmax(),
            scale: *scaling_factor,
        },
        Method::Iso(i) => i.merge(&plain),
        Method::Tsv(t) => t.merge(&plain),
        Method::Wudi(w) => w.merge(&plain, &|_, _| {})?,
        Method::RegMean(_) | Method::RegMeanPlusPlus(_) | Method::Fisher(_) => {
            return Err(CoreError::Invalid(format!(
                "{} reads each input's task data: run it with its sums ({})",
                method.name(),
                "RegMeanSums, FisherSums"
            )))
        }
    })
}

/// A merged delta as a task vector stored at `dtype`; every value must be finite there.
pub fn to_task_vector(
    manifest: &Manifest,
    meta: TaskVectorMeta,
    dtype: StorageDType,
    blocks: &[Vec<f32>],
) -> Result<TaskVector> {
    for (block, values) in manifest.blocks().iter().zip(blocks) {
        if let Some(x) = values
            .iter()
            .find(|x| !x.is_finite() || !crate::task_vector::fits(dtype, **x))
        {
            return Err(CoreError::tensor(
                &block.name,
                format!("the merge gives {x}, not storable at {dtype:?}"),
            ));
        }
    }
    let buffers = blocks.iter().map(|b| Buffer::from_f32(b, dtype)).collect();
    TaskVector::from_buffers(manifest, meta, dtype, buffers)
}

fn check_inputs(manifest: &Manifest, inputs: &[&TaskVector]) -> Result<()> {
    if inputs.is_empty() {
        return Err(CoreError::Invalid("a merge needs a task vector".into()));
    }
    inputs.iter().try_for_each(|tv| tv.check_manifest(manifest))
}

/// The inputs as a merge sees them: block `b` of input `i` as f32, after DARE's drop when
/// there is one.
pub struct Rows<'a> {
    manifest: &'a Manifest,
    inputs: &'a [&'a TaskVector],
    drop: Option<(&'a Dare, Keep<'a>)>,
    /// Offset of each block in the flattened manifest (where DARE's draws are indexed).
    offsets: Vec<usize>,
    /// Once set, blocks not yet merged are skipped (zeros): the result is then discarded.
    cancel: Option<&'a AtomicBool>,
}

impl<'a> Rows<'a> {
    pub fn new(
        manifest: &'a Manifest,
        inputs: &'a [&'a TaskVector],
        drop: Option<(&'a Dare, Keep<'a>)>,
    ) -> Result<Self> {
        if let Some((_, Keep::Given(masks))) = &drop {
            let ok =
                masks.len() == inputs.len() && masks.iter().all(|m| m.len() == manifest.numel());
            if !ok {
                return Err(CoreError::Invalid(
                    "one keep mask per input over the whole manifest is needed".into(),
                ));
            }
        }
        let offsets = manifest
            .blocks()
            .iter()
            .scan(0, |acc, b| {
                let at = *acc;
                *acc += b.numel();
                Some(at)
            })
            .collect();
        Ok(Rows {
            manifest,
            inputs,
            drop,
            offsets,
            cancel: None,
        })
    }

    pub fn cancelled_by(self, cancel: &'a AtomicBool) -> Self {
        Rows {
            cancel: Some(cancel),
            ..self
        }
    }

    pub fn n_inputs(&self) -> usize {
        self.inputs.len()
    }
    pub fn n_blocks(&self) -> usize {
        self.manifest.len()
    }
    pub fn manifest(&self) -> &Manifest {
        self.manifest
    }

    /// Block `b` of input `i`.
    pub fn block(&self, i: usize, b: usize) -> Vec<f32> {
        let mut v = self.inputs[i].block(b).to_f32_vec();
        if let Some((dare, keep)) = &self.drop {
            let mut at = 0;
            for t in &self.manifest.blocks()[b].tensors {
                let n = t.numel();
                if dare.drops(t) {
                    dare.drop_in_place(&mut v[at..at + n], keep, i, self.offsets[b] + at);
                }
                at += n;
            }
        }
        v
    }

    /// Σ_i of the rows, per block.
    fn sum(&self) -> Vec<Vec<f32>> {
        self.per_block(|rows| {
            let mut out = rows[0].clone();
            for r in &rows[1..] {
                out.iter_mut().zip(r).for_each(|(o, x)| *o += x);
            }
            out
        })
    }

    /// MagMax: per element the input of largest magnitude, a later input winning ties
    /// (FusionBench's `>=`).
    fn magmax(&self) -> Vec<Vec<f32>> {
        self.per_block(|rows| {
            let mut out = rows[0].clone();
            for r in &rows[1..] {
                for (o, &x) in out.iter_mut().zip(r) {
                    if x.abs() >= o.abs() {
                        *o = x;
                    }
                }
            }
            out
        })
    }

    /// Applies `f` to every block's rows (one per input).
    fn per_block(&self, f: impl Fn(&[Vec<f32>]) -> Vec<f32> + Sync) -> Vec<Vec<f32>> {
        self.per_block_indexed(|_, rows| f(rows))
    }

    /// Applies `f` to every tensor: its shape and its slice of each input.
    fn per_tensor(&self, f: impl Fn(&[usize], &[&[f32]]) -> Vec<f32> + Sync) -> Vec<Vec<f32>> {
        self.per_named_tensor(|_, shape, parts| f(shape, parts))
    }

    /// Applies `f` to every tensor: its name, its shape and its slice of each input.
    fn per_named_tensor(
        &self,
        f: impl Fn(&str, &[usize], &[&[f32]]) -> Vec<f32> + Sync,
    ) -> Vec<Vec<f32>> {
        self.per_block_indexed(|b, rows| {
            let mut out = Vec::with_capacity(rows[0].len());
            let mut start = 0;
            for t in &self.manifest.blocks()[b].tensors {
                let end = start + t.numel();
                let parts: Vec<&[f32]> = rows.iter().map(|r| &r[start..end]).collect();
                out.extend(f(&t.name, &t.shape, &parts));
                start = end;
            }
            out
        })
    }

    /// Blocks run in parallel: an SVD merge of a ViT-B/32 is minutes of single-threaded work.
    fn per_block_indexed(
        &self,
        f: impl Fn(usize, &[Vec<f32>]) -> Vec<f32> + Sync,
    ) -> Vec<Vec<f32>> {
        (0..self.n_blocks())
            .into_par_iter()
            .map(|b| {
                if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return vec![0.0; self.manifest.blocks()[b].numel()];
                }
                let rows: Vec<Vec<f32>> = (0..self.n_inputs()).map(|i| self.block(i, b)).collect();
                f(b, &rows)
            })
            .collect()
    }
}
