//! Evaluation: image embeddings of a data set under a composed model (pixels prepared in
//! parallel, one batch at a time), accuracy and mean prediction entropy against a head.

use crate::augment::{pixels, rng_for, View};
use crate::data::{Dataset, Item};
use crate::job::Task;
use crate::Result;
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{Backbone, VisionTower, ZeroShotHead};
use atlas_core::{Coefficients, TaskVector};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use std::sync::Arc;

/// `[B, 3, S, S]` pixels for items under `view`; random views are keyed by (seed, epoch, index).
pub fn batch_pixels(
    pre: &Preprocess,
    items: &[(usize, &Item)],
    view: View,
    seed: u64,
    epoch: usize,
    device: &Device,
) -> Result<Tensor> {
    let px: Vec<Vec<f32>> = items
        .par_iter()
        .map(|(i, it)| pixels(pre, &it.image, view, &mut rng_for(seed, epoch, *i)))
        .collect();
    Ok(pre.batch(&px, device)?)
}

/// Which views of the images to take: random views are keyed by (seed, epoch, index).
#[derive(Debug, Clone, Copy)]
pub struct Views {
    pub view: View,
    pub seed: u64,
    pub epoch: usize,
}

impl Views {
    pub const PLAIN: Views = Views {
        view: View::Plain,
        seed: 0,
        epoch: 0,
    };
}

/// Unnormalised image embeddings `[N, P]` for a whole data set.
pub fn embed(
    tower: &VisionTower,
    pre: &Preprocess,
    data: &Dataset,
    views: Views,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let Views { view, seed, epoch } = views;
    let indexed: Vec<(usize, &Item)> = data.items.iter().enumerate().collect();
    let mut parts = Vec::new();
    for chunk in indexed.chunks(batch) {
        parts.push(
            tower
                .forward(&batch_pixels(pre, chunk, view, seed, epoch, device)?)?
                .to_dtype(DType::F32)?,
        );
    }
    Ok(Tensor::cat(&parts, 0)?)
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// Share of labelled images predicted right (NaN when nothing is labelled).
    pub accuracy: f64,
    /// Mean entropy of the predicted class distribution.
    pub entropy: f64,
    /// Entropy of the mean predicted distribution minus the mean entropy: the mutual information
    /// between image and prediction. High when predictions are confident and spread over the
    /// classes; a collapse onto a few classes lowers it even as the mean entropy falls.
    pub mutual_information: f64,
}

/// Metrics of logits `[N, C]` against labels.
pub fn metrics(logits: &Tensor, data: &Dataset) -> Result<Metrics> {
    let lp = atlas_clip::loss::log_softmax(logits)?;
    let entropy = (lp.exp()? * &lp)?
        .sum(D::Minus1)?
        .neg()?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    let marginal: Vec<f32> = lp.exp()?.mean(0)?.to_vec1()?;
    let marginal_entropy: f64 = marginal
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -(p as f64) * (p as f64).ln())
        .sum();
    let pred: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let labelled: Vec<(u32, u32)> = data
        .items
        .iter()
        .zip(&pred)
        .filter_map(|(it, &p)| it.label.map(|l| (l, p)))
        .collect();
    let accuracy = if labelled.is_empty() {
        f64::NAN
    } else {
        labelled.iter().filter(|(l, p)| l == p).count() as f64 / labelled.len() as f64
    };
    Ok(Metrics {
        accuracy,
        entropy,
        mutual_information: marginal_entropy - entropy,
    })
}

/// Logits of a data set under a tower and head.
pub fn logits(
    tower: &VisionTower,
    head: &ZeroShotHead,
    data: &Dataset,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let pre = Preprocess::from_config(tower.config().image_size);
    let emb = embed(tower, &pre, data, Views::PLAIN, batch, device)?;
    Ok(head.to_dtype(DType::F32)?.logits(&emb)?)
}

/// Metrics of the composition θ0 + Σ Λ τ on `data` with `task`'s head.
pub fn evaluate(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    task: &Task,
    data: &Dataset,
) -> Result<Metrics> {
    let tower = backbone.composed_vision(tvs, coefs)?;
    metrics(
        &logits(&tower, &task.head, data, 64, backbone.device())?,
        data,
    )
}

/// Accuracy of the composition on `data` with `task`'s head.
pub fn accuracy(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    coefs: &Coefficients,
    task: &Task,
    data: &Dataset,
) -> Result<f64> {
    Ok(evaluate(backbone, tvs, coefs, task, data)?.accuracy)
}
