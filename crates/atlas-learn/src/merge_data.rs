//! Merges that read each input model on its own task's data, as FusionBench runs them: RegMean
//! (the Gram matrices of every encoder linear layer's input) and Fisher merging (the diagonal
//! Fisher of the model's own predictions). Input i is θ0 + τ_i, read on task i's first images
//! in batches until the method's example count is reached; its statistics are added to the
//! method's sums (atlas-core) and dropped before the next input is read.
//!
//! FusionBench merges the `CLIPVisionModel`; the visual projection is outside it (it keeps the
//! pre-trained one), so here the projection carries no statistics and is averaged: a zero
//! delta for fine-tunes that leave it, FusionBench's result.

use crate::augment::View;
use crate::data::Dataset;
use crate::eval::batch_pixels;
use crate::{LearnError, Result};
use atlas_clip::grad::Leaves;
use atlas_clip::loss::log_softmax;
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{Backbone, ZeroShotHead};
use atlas_core::merge::{Examples, FisherSums, Gram, Merged, Method, RegMeanSums};
use atlas_core::{Coefficients, TaskVector};
use candle_core::{DType, Tensor, D};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Prefix of the tensors of the merged model (FusionBench's `CLIPVisionModel`).
const MERGED_MODEL: &str = "vision_model.";

/// Progress and cancellation of a data merge.
pub struct Watch<'a> {
    /// `(done, total)` after each batch read and each layer solved.
    pub progress: &'a mut dyn FnMut(usize, usize),
    pub cancel: &'a AtomicBool,
}

/// Merges `inputs` by a data-dependent `method`; `data[i]` holds input i's images and
/// `heads[i]` its classes' head, which Fisher merging needs (RegMean reads none: it may be
/// given no heads).
pub fn merge_on_data(
    backbone: &Backbone,
    method: &Method,
    inputs: &[Arc<TaskVector>],
    data: &[&Dataset],
    heads: &[&ZeroShotHead],
    watch: Watch,
) -> Result<Merged> {
    let heads_ok =
        heads.len() == inputs.len() || (heads.is_empty() && !matches!(method, Method::Fisher(_)));
    if inputs.len() != data.len() || inputs.is_empty() || !heads_ok {
        return Err(LearnError::Job(format!(
            "{} needs one task per task vector: {} task vectors, {} tasks, {} heads",
            method.name(),
            inputs.len(),
            data.len(),
            heads.len()
        )));
    }
    let examples = method
        .examples()
        .ok_or_else(|| LearnError::Job(format!("{} reads no data", method.name())))?;
    let pre = Preprocess::from_config(backbone.config.vision.image_size);
    let batches: Vec<Vec<Tensor>> = data
        .iter()
        .map(|d| task_batches(backbone, &pre, d, &examples))
        .collect::<Result<_>>()?;
    merge_batches(backbone, method, inputs, &batches, heads, watch)
}

/// As [`merge_on_data`], on pixel batches given per input (`[B, 3, S, S]`).
pub fn merge_batches(
    backbone: &Backbone,
    method: &Method,
    inputs: &[Arc<TaskVector>],
    batches: &[Vec<Tensor>],
    heads: &[&ZeroShotHead],
    mut watch: Watch,
) -> Result<Merged> {
    let manifest = backbone.manifest();
    let layer_inputs = 4 * backbone.config.vision.num_hidden_layers;
    let reads: usize = batches.iter().map(Vec::len).sum();
    let mut counter = Counter {
        done: 0,
        total: reads
            + if matches!(method, Method::RegMean(_)) {
                layer_inputs
            } else {
                0
            },
        watch: &mut watch,
    };
    match method {
        Method::RegMean(rm) => {
            let mut sums = RegMeanSums::new(manifest, rm);
            for (tv, b) in inputs.iter().zip(batches) {
                sums.add(tv, grams(backbone, tv, b, &mut counter)?)?;
            }
            // Solving takes a while on a real model: progress and cancel between layers.
            let merged = sums.finish(&mut |_, _| counter.tick().is_ok())?;
            merged.ok_or(LearnError::Cancelled)
        }
        Method::Fisher(f) => {
            let mut sums = FisherSums::new(manifest, f);
            for ((tv, b), head) in inputs.iter().zip(batches).zip(heads) {
                sums.add(tv, &fisher(backbone, tv, head, b, &mut counter)?)?;
            }
            Ok(sums.finish()?)
        }
        _ => Err(LearnError::Job(format!("{} reads no data", method.name()))),
    }
}

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    match cancel.load(Ordering::Relaxed) {
        true => Err(LearnError::Cancelled),
        false => Ok(()),
    }
}

struct Counter<'w, 'a> {
    done: usize,
    total: usize,
    watch: &'w mut Watch<'a>,
}

impl Counter<'_, '_> {
    /// One more unit of work done; Err once the job is cancelled.
    fn tick(&mut self) -> Result<()> {
        self.at(self.done + 1);
        check_cancel(self.watch.cancel)
    }

    fn at(&mut self, done: usize) {
        self.done = done;
        (self.watch.progress)(done, self.total);
    }
}

/// The task's first images, as many as `examples` reads, in batches of its batch size.
fn task_batches(
    backbone: &Backbone,
    pre: &Preprocess,
    data: &Dataset,
    examples: &Examples,
) -> Result<Vec<Tensor>> {
    let used = examples.used(data.items.len());
    let items: Vec<_> = data.items.iter().take(used).enumerate().collect();
    items
        .chunks(examples.batch_size)
        .map(|chunk| batch_pixels(pre, chunk, View::Plain, 0, 0, backbone.device()))
        .collect()
}

/// Coefficient 1 on one task vector: the input model θ0 + τ.
fn input_model(backbone: &Backbone) -> Result<Coefficients> {
    Ok(Coefficients::isotropic(
        vec![1.0],
        backbone.manifest().len(),
    )?)
}

/// Mean x xᵀ over the tokens of every encoder linear layer's input, for model θ0 + τ.
fn grams(
    backbone: &Backbone,
    tv: &Arc<TaskVector>,
    batches: &[Tensor],
    counter: &mut Counter,
) -> Result<Vec<Gram>> {
    let coefs = input_model(backbone)?;
    let tower = backbone.composed_vision(std::slice::from_ref(tv), &coefs)?;
    let mut sums: Vec<(Vec<String>, Tensor)> = Vec::new();
    let mut rows = 0;
    for pixels in batches {
        let mut k = 0;
        let mut seen_rows = 0;
        tower.forward_recording(pixels, &mut |names, x| {
            let d = x.dim(D::Minus1)?;
            let x = x.to_dtype(DType::F32)?.reshape(((), d))?;
            seen_rows = x.dim(0)?;
            let g = x.t()?.matmul(&x)?;
            match sums.get_mut(k) {
                Some((_, s)) => *s = (&*s + g)?,
                None => sums.push((names.to_vec(), g)),
            }
            k += 1;
            Ok(())
        })?;
        rows += seen_rows;
        counter.tick()?;
    }
    sums.into_iter()
        .map(|(weights, s)| {
            let dim = s.dim(0)?;
            let values = (s / rows as f64)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(Gram {
                weights,
                dim,
                values,
            })
        })
        .collect()
}

/// The diagonal Fisher of model θ0 + τ per block (None outside the merged model): the squared
/// gradient of Σ √p·log p per batch, summed over batches, over the number of images read (as
/// FusionBench's CLIP class counts; its generic function counts whole batches: the same when
/// every batch is full). A per-batch square, so the batch size matters, as there.
fn fisher(
    backbone: &Backbone,
    tv: &Arc<TaskVector>,
    head: &ZeroShotHead,
    batches: &[Tensor],
    counter: &mut Counter,
) -> Result<Vec<Option<Vec<f32>>>> {
    let manifest = backbone.manifest();
    let coefs = input_model(backbone)?;
    let leaves = Leaves::compose::<f32>(backbone, std::slice::from_ref(tv), &coefs)?;
    let mut sum: Vec<Vec<f32>> = manifest
        .blocks()
        .iter()
        .map(|b| vec![0.0; b.numel()])
        .collect();
    let mut images = 0;
    for pixels in batches {
        let tower = backbone.vision(&leaves)?;
        let logits = head.logits(&tower.forward(pixels)?)?;
        let lp = log_softmax(&logits)?;
        let root_p = lp.exp()?.sqrt()?.detach();
        let objective = (root_p * &lp)?.sum_all()?;
        let grads = objective.backward()?;
        let g = leaves.block_grads::<f32>(manifest, &grads)?;
        for (s, g) in sum.iter_mut().zip(g) {
            s.iter_mut().zip(g).for_each(|(s, g)| *s += g * g);
        }
        images += pixels.dim(0)?;
        counter.tick()?;
    }
    let inside = |b: &atlas_core::Block| b.tensors.iter().all(|t| t.name.starts_with(MERGED_MODEL));
    Ok(sum
        .into_iter()
        .zip(manifest.blocks())
        .map(|(s, b)| inside(b).then(|| s.into_iter().map(|x| x / images as f32).collect()))
        .collect())
}
