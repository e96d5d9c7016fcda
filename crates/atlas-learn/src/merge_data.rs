//! Merges that read each input model on its own task's data, as FusionBench runs them: RegMean
//! (the Gram matrices of every encoder linear layer's input), RegMean++ (the same, layer by
//! layer, on activations that come through the layers merged so far) and Fisher merging (the
//! diagonal Fisher of the model's own predictions). Input i is θ0 + τ_i, read on task i's first
//! images in batches until the method's example count is reached; its statistics are added to
//! the method's sums (atlas-core) and dropped before the next input is read.
//!
//! FusionBench merges the `CLIPVisionModel`; the visual projection is outside it (it keeps the
//! pre-trained one), so here the projection carries no statistics and is averaged (RegMean,
//! Fisher merging) or kept (RegMean++): a zero delta for fine-tunes that leave it, FusionBench's
//! result.

use crate::augment::View;
use crate::data::Dataset;
use crate::eval::batch_pixels;
use crate::{LearnError, Result};
use atlas_clip::grad::Leaves;
use atlas_clip::loss::log_softmax;
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{Backbone, ZeroShotHead};
use atlas_core::merge::{Examples, FisherSums, Gram, Merged, Method, RegMean, RegMeanSums};
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
    let batches = Batches::Images {
        backbone,
        data,
        examples,
        pre: Preprocess::from_config(backbone.config.vision.image_size),
    };
    merge_from(backbone, method, inputs, &batches, heads, watch)
}

/// As [`merge_on_data`], on pixel batches given per input (`[B, 3, S, S]`).
pub fn merge_batches(
    backbone: &Backbone,
    method: &Method,
    inputs: &[Arc<TaskVector>],
    batches: &[Vec<Tensor>],
    heads: &[&ZeroShotHead],
    watch: Watch,
) -> Result<Merged> {
    merge_from(
        backbone,
        method,
        inputs,
        &Batches::Given(batches),
        heads,
        watch,
    )
}

/// Each input's pixel batches: given, or made from its images as that input is read, so that
/// one input's pixels are held at a time (ViT-B/32: 256 images are 154 MB of f32 pixels).
enum Batches<'a> {
    Given(&'a [Vec<Tensor>]),
    Images {
        backbone: &'a Backbone,
        data: &'a [&'a Dataset],
        examples: Examples,
        pre: Preprocess,
    },
}

impl Batches<'_> {
    /// Batches of input `i`.
    fn count(&self, i: usize) -> usize {
        match self {
            Batches::Given(b) => b[i].len(),
            Batches::Images { data, examples, .. } => examples
                .used(data[i].items.len())
                .div_ceil(examples.batch_size),
        }
    }

    fn of(&self, i: usize) -> Result<std::borrow::Cow<'_, [Tensor]>> {
        Ok(match self {
            Batches::Given(b) => std::borrow::Cow::Borrowed(&b[i]),
            Batches::Images {
                backbone,
                data,
                examples,
                pre,
            } => std::borrow::Cow::Owned(task_batches(backbone, pre, data[i], examples)?),
        })
    }
}

fn merge_from(
    backbone: &Backbone,
    method: &Method,
    inputs: &[Arc<TaskVector>],
    batches: &Batches,
    heads: &[&ZeroShotHead],
    mut watch: Watch,
) -> Result<Merged> {
    let manifest = backbone.manifest();
    let layers = backbone.config.vision.num_hidden_layers;
    let reads: usize = (0..inputs.len()).map(|i| batches.count(i)).sum();
    let total = match method {
        Method::RegMean(_) => reads + 4 * layers,
        // Each layer reads every batch, then is solved.
        Method::RegMeanPlusPlus(_) => layers * (reads + 1),
        _ => reads,
    };
    let mut counter = Counter {
        done: 0,
        total,
        watch: &mut watch,
    };
    match method {
        Method::RegMeanPlusPlus(rm) => {
            regmean_plus_plus(backbone, rm, inputs, batches, &mut counter)
        }
        Method::RegMean(rm) => {
            let mut sums = RegMeanSums::new(manifest, rm);
            let coefs = input_model(backbone)?;
            for (i, tv) in inputs.iter().enumerate() {
                let b = batches.of(i)?;
                let tower = backbone.composed_vision(std::slice::from_ref(tv), &coefs)?;
                let mut grams = GramSums::default();
                for pixels in b.iter() {
                    tower.forward_recording(pixels, &mut grams.recorder())?;
                    counter.tick()?;
                }
                sums.add(tv, grams.finish()?)?;
            }
            // Solving takes a while on a real model: progress and cancel between layers.
            let merged = sums.finish(&mut |_, _| counter.tick().is_ok())?;
            merged.ok_or(LearnError::Cancelled)
        }
        Method::Fisher(f) => {
            let mut sums = FisherSums::new(manifest, f);
            for (i, (tv, head)) in inputs.iter().zip(heads).enumerate() {
                let b = batches.of(i)?;
                sums.add(tv, &fisher(backbone, tv, head, &b, &mut counter)?)?;
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

/// Σ x xᵀ per recorded layer input (the weights reading it, the sum, the rows summed), over
/// the passes each [`GramSums::recorder`] watches.
#[derive(Default)]
struct GramSums {
    sites: Vec<(Vec<String>, Tensor, usize)>,
}

impl GramSums {
    /// A recorder for one pass: its k-th input adds to the k-th site.
    fn recorder(&mut self) -> impl FnMut(&[String], &Tensor) -> atlas_clip::Result<()> + '_ {
        let mut k = 0;
        move |names, x| {
            let d = x.dim(D::Minus1)?;
            let x = x.to_dtype(DType::F32)?.reshape(((), d))?;
            let rows = x.dim(0)?;
            let g = x.t()?.matmul(&x)?;
            match self.sites.get_mut(k) {
                Some((_, s, n)) => {
                    *s = (&*s + g)?;
                    *n += rows;
                }
                None => self.sites.push((names.to_vec(), g, rows)),
            }
            k += 1;
            Ok(())
        }
    }

    /// Mean x xᵀ over the tokens each site read.
    fn finish(self) -> Result<Vec<Gram>> {
        self.sites
            .into_iter()
            .map(|(weights, s, rows)| {
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
}

/// Tensors FusionBench's RegMean++ averages before the first layer.
fn embedding(name: &str) -> bool {
    name.starts_with("vision_model.embeddings") || name.starts_with("vision_model.pre_layrnorm")
}

/// RegMean++ (FusionBench's `RegMeanAlgorithmForCLIPPlusPlus`): the embeddings averaged, then
/// layer by layer, each input model's own layer l reads its task's activations as the layers
/// merged so far leave them, the layer is merged by RegMean, and the activations advance
/// through the merged layer. The tensors after the last layer (post-LayerNorm, projection)
/// stay θ0's, as there.
fn regmean_plus_plus(
    backbone: &Backbone,
    rm: &RegMean,
    inputs: &[Arc<TaskVector>],
    batches: &Batches,
    counter: &mut Counter,
) -> Result<Merged> {
    let manifest = backbone.manifest();
    let mut delta: Vec<Vec<f32>> = manifest
        .blocks()
        .iter()
        .map(|b| vec![0.0; b.numel()])
        .collect();
    let mean = {
        let mut sums = RegMeanSums::new(manifest, rm);
        for tv in inputs {
            sums.add(tv, Vec::new())?;
        }
        delta_blocks(sums.finish(&mut |_, _| true)?)?
    };
    // Each layer's tensors other than its linear weights are averaged too, as RegMean does;
    // layers after the one being merged do not reach the activations, so they can be set now.
    copy_tensors(manifest, &mean, &mut delta, |n| {
        embedding(n) || n.starts_with("vision_model.encoder.layers.")
    });
    let mut merged = merged_tower(backbone, &delta)?;
    // The activations of every input are kept (ViT-B/32: 39 MB per 256 images and layer), the
    // pixels only while they are embedded.
    let mut xs: Vec<Vec<Tensor>> = (0..inputs.len())
        .map(|i| {
            batches
                .of(i)?
                .iter()
                .map(|p| Ok(merged.embed(p)?))
                .collect()
        })
        .collect::<Result<_>>()?;
    let coefs = input_model(backbone)?;
    for l in 0..merged.n_layers() {
        let mut sums = RegMeanSums::solving_only(manifest, rm);
        let mut solved = Vec::new();
        for (tv, x) in inputs.iter().zip(&xs) {
            let tower = backbone.composed_vision(std::slice::from_ref(tv), &coefs)?;
            let mut grams = GramSums::default();
            for x in x {
                tower.forward_layer(l, x, Some(&mut grams.recorder()))?;
                counter.tick()?;
            }
            let grams = grams.finish()?;
            solved = grams.iter().flat_map(|g| g.weights.clone()).collect();
            sums.add(tv, grams)?;
        }
        let layer = delta_blocks(sums.finish(&mut |_, _| true)?)?;
        counter.tick()?;
        copy_tensors(manifest, &layer, &mut delta, |n| {
            solved.iter().any(|w| w == n)
        });
        merged = merged_tower(backbone, &delta)?;
        if l + 1 < merged.n_layers() {
            for x in xs.iter_mut().flatten() {
                *x = merged.forward_layer(l, x, None)?;
            }
        }
    }
    Ok(Merged::Delta {
        blocks: delta,
        scale: 1.0,
    })
}

fn delta_blocks(merged: Option<Merged>) -> Result<Vec<Vec<f32>>> {
    match merged {
        Some(Merged::Delta { blocks, .. }) => Ok(blocks),
        _ => Err(LearnError::Job("regmean gave no delta".into())),
    }
}

/// Copies the tensors `which` picks from `from` into `to` (blocks of the manifest).
fn copy_tensors(
    manifest: &atlas_core::Manifest,
    from: &[Vec<f32>],
    to: &mut [Vec<f32>],
    which: impl Fn(&str) -> bool,
) {
    for (spec, loc) in manifest.tensor_specs() {
        if which(&spec.name) {
            let r = loc.offset..loc.offset + loc.numel;
            to[loc.block][r.clone()].copy_from_slice(&from[loc.block][r]);
        }
    }
}

/// The image tower of θ0 + `delta`.
fn merged_tower(backbone: &Backbone, delta: &[Vec<f32>]) -> Result<atlas_clip::VisionTower> {
    let meta = atlas_core::TaskVectorMeta {
        name: "merged".into(),
        ..Default::default()
    };
    let tv = atlas_core::merge::to_task_vector(
        backbone.manifest(),
        meta,
        atlas_core::StorageDType::F32,
        delta,
    )?;
    Ok(backbone.composed_vision(&[Arc::new(tv)], &input_model(backbone)?)?)
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
