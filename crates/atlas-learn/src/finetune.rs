//! Fine-tuning an image tower on one labelled task, to make a task vector τ = θ_ft − θ0.
//!
//! Every image-tower tensor of the backbone's manifest (the visual projection included) is a
//! trainable `Var`; the text tower stays frozen and only provides the classifier, a
//! [`ZeroShotHead`] built from class names. Loss: cross-entropy on the head's logits. Optimiser:
//! AdamW with a linear warm-up then cosine decay, and global grad-norm clipping, as in the task
//! vector papers (their lr is 1e-5 for pre-trained ViTs; tiny models trained from scratch, like
//! the demo world's, want about 1e-3).
//!
//! Training runs in f32 whatever the backbone's compute dtype.

use crate::optim::{cosine_lr, AdamW, AdamWConfig};
use atlas_clip::backbone::block_tensors;
use atlas_clip::loss::cross_entropy;
use atlas_clip::{Backbone, ClipError, VisionTower, ZeroShotHead};
use atlas_core::task_vector::Delta;
use atlas_core::{CoreError, StorageDType, TaskVector, TaskVectorMeta};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error("fine-tuning: {0}")]
    Invalid(String),
    #[error("fine-tuning was cancelled")]
    Cancelled,
    #[error(transparent)]
    Clip(#[from] ClipError),
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, FinetuneError>;

/// Settings of one fine-tuning run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FinetuneConfig {
    /// Name given to the task vector.
    pub name: String,
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    pub weight_decay: f64,
    /// Fraction of the steps spent warming up linearly from 0.
    pub warmup: f64,
    /// Global gradient-norm clip; None for no clipping.
    pub grad_clip: Option<f64>,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
    /// Storage dtype of the task vector.
    pub store: StorageDType,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            name: "task".into(),
            epochs: 10,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.1,
            warmup: 0.1,
            grad_clip: Some(1.0),
            seed: 0,
            store: StorageDType::F16,
        }
    }
}

/// Labelled training data: preprocessed CHW pixels at the model's image size, one label each.
#[derive(Debug, Clone, Copy)]
pub struct Labelled<'a> {
    pub pixels: &'a [Vec<f32>],
    pub labels: &'a [u32],
}

/// Reported after every optimiser step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// 1-based step number.
    pub step: usize,
    pub steps: usize,
    /// 0-based epoch.
    pub epoch: usize,
    pub loss: f32,
    pub lr: f64,
}

pub struct Finetuned {
    /// θ_ft by tensor name (detached, f32), usable as a [`atlas_clip::WeightSource`].
    pub weights: HashMap<String, Tensor>,
    pub task_vector: TaskVector,
    /// Mean training loss of the last epoch.
    pub final_loss: f32,
}

/// Fine-tunes the backbone's image tower on `data` with `head` as the classifier. `progress` is
/// called after each step; setting `cancel` stops at the next step with
/// [`FinetuneError::Cancelled`].
pub fn finetune(
    backbone: &Backbone,
    head: &ZeroShotHead,
    data: Labelled<'_>,
    config: &FinetuneConfig,
    progress: &mut dyn FnMut(&Step),
    cancel: &AtomicBool,
) -> Result<Finetuned> {
    let mut no_checkpoints = |_: &EpochDone<'_>| Ok(());
    finetune_from(
        backbone,
        head,
        data,
        config,
        None,
        progress,
        &mut no_checkpoints,
        cancel,
    )
}

/// Where a resumed run starts: θ (f32, by tensor name) after `epochs_done` completed epochs.
pub struct Resume {
    pub epochs_done: usize,
    pub weights: HashMap<String, Tensor>,
}

/// What [`finetune_from`] reports after each completed epoch, to checkpoint.
pub struct EpochDone<'a> {
    /// Completed epochs so far (1-based).
    pub epochs_done: usize,
    /// Mean training loss of that epoch.
    pub loss: f32,
    /// θ now, by tensor name (f32).
    pub weights: &'a HashMap<String, Tensor>,
}

/// [`finetune`] that may start after completed epochs (`resume`) and calls `on_epoch` after
/// each one, so a caller can checkpoint θ and resume after an interruption. Only θ is carried
/// over: a resumed run restarts the optimiser's moments, while the learning-rate schedule and
/// the per-epoch shuffles continue where they were.
#[allow(clippy::too_many_arguments)]
pub fn finetune_from(
    backbone: &Backbone,
    head: &ZeroShotHead,
    data: Labelled<'_>,
    config: &FinetuneConfig,
    resume: Option<Resume>,
    progress: &mut dyn FnMut(&Step),
    on_epoch: &mut dyn FnMut(&EpochDone<'_>) -> Result<()>,
    cancel: &AtomicBool,
) -> Result<Finetuned> {
    check(backbone, head, data, config)?;
    let vars = base_vars(backbone)?;
    let mut start = 0;
    if let Some(r) = resume {
        for (name, var) in &vars {
            let t = r.weights.get(name).ok_or_else(|| {
                FinetuneError::Invalid(format!("the checkpoint has no tensor {name}"))
            })?;
            var.set(&t.to_dtype(DType::F32)?.to_device(backbone.device())?)?;
        }
        start = r.epochs_done.min(config.epochs);
    }
    let weights = var_weights(&vars);
    let optimizer = AdamWConfig {
        lr: config.lr,
        weight_decay: config.weight_decay,
        ..AdamWConfig::default()
    };
    let mut opt = AdamW::for_vars(optimizer, vars.iter().map(|(_, v)| v))?;
    let head = head.to_dtype(DType::F32)?;
    let per_epoch = data.pixels.len().div_ceil(config.batch_size);
    let steps = per_epoch * config.epochs;
    let warmup = (config.warmup * steps as f64).round() as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..data.pixels.len()).collect();
    // The shuffles of the epochs done, replayed so the next epoch sees the order it would have.
    for _ in 0..start {
        order.shuffle(&mut rng);
    }
    let mut step = start * per_epoch;
    let mut final_loss = f32::NAN;
    for epoch in start..config.epochs {
        order.shuffle(&mut rng);
        let mut sum = 0.0;
        for batch in order.chunks(config.batch_size) {
            if cancel.load(Ordering::Relaxed) {
                return Err(FinetuneError::Cancelled);
            }
            let lr = cosine_lr(config.lr, step, steps, warmup);
            let run = Run {
                backbone,
                head: &head,
                weights: &weights,
                vars: &vars,
                data,
                grad_clip: config.grad_clip,
            };
            let loss = run.step(batch, lr, &mut opt)?;
            step += 1;
            sum += loss;
            progress(&Step {
                step,
                steps,
                epoch,
                loss,
                lr,
            });
        }
        final_loss = sum / per_epoch as f32;
        on_epoch(&EpochDone {
            epochs_done: epoch + 1,
            loss: final_loss,
            weights: &weights,
        })?;
    }
    let task_vector = task_vector(backbone, &vars, config)?;
    let weights = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_detached_tensor()))
        .collect();
    Ok(Finetuned {
        weights,
        task_vector,
        final_loss,
    })
}

fn check(
    backbone: &Backbone,
    head: &ZeroShotHead,
    data: Labelled<'_>,
    config: &FinetuneConfig,
) -> Result<()> {
    let invalid = |m: String| Err(FinetuneError::Invalid(m));
    if data.pixels.is_empty() {
        return invalid("no training images".into());
    }
    if data.pixels.len() != data.labels.len() {
        return invalid(format!(
            "{} images but {} labels",
            data.pixels.len(),
            data.labels.len()
        ));
    }
    if config.batch_size == 0 || config.epochs == 0 {
        return invalid("batch size and epochs must be at least 1".into());
    }
    if !(config.lr.is_finite() && config.lr > 0.0) {
        return invalid(format!("learning rate {} is not positive", config.lr));
    }
    let classes = head.classes.len() as u32;
    if let Some(l) = data.labels.iter().find(|&&l| l >= classes) {
        return invalid(format!("label {l} but the head has {classes} classes"));
    }
    let s = backbone.config.vision.image_size;
    let want = backbone.config.vision.num_channels * s * s;
    if let Some(i) = data.pixels.iter().position(|p| p.len() != want) {
        return invalid(format!(
            "image {i} has {} values, the model takes {want} (CHW at {s}x{s})",
            data.pixels[i].len()
        ));
    }
    Ok(())
}

/// θ0 as f32 `Var`s, in manifest order.
fn base_vars(backbone: &Backbone) -> Result<Vec<(String, Var)>> {
    let manifest = backbone.manifest();
    let tensors = block_tensors(
        manifest,
        backbone.base_blocks().to_vec(),
        backbone.device(),
        DType::F32,
    )?;
    manifest
        .tensor_specs()
        .map(|(spec, _)| {
            let t = tensors
                .get(&spec.name)
                .ok_or_else(|| ClipError::tensor(&spec.name, "missing from the backbone"))?;
            Ok((spec.name.clone(), Var::from_tensor(t)?))
        })
        .collect()
}

/// The vars as a weight source; the tensors share the vars' storage and ids, so they are the
/// gradient leaves and see every optimiser update.
fn var_weights(vars: &[(String, Var)]) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect()
}

/// What one training step needs.
struct Run<'a> {
    backbone: &'a Backbone,
    head: &'a ZeroShotHead,
    weights: &'a HashMap<String, Tensor>,
    vars: &'a [(String, Var)],
    data: Labelled<'a>,
    grad_clip: Option<f64>,
}

impl Run<'_> {
    /// Forward, backward, clip and update on the images `batch`; returns the loss.
    fn step(&self, batch: &[usize], lr: f64, opt: &mut AdamW<Vec<Tensor>>) -> Result<f32> {
        let tower = self.backbone.vision(self.weights)?;
        let (pixels, labels) = batch_tensors(self.backbone, self.data, batch)?;
        let loss = cross_entropy(&self.head.logits(&tower.forward(&pixels)?)?, &labels)?;
        let mut grads = loss.backward()?;
        if let Some(max) = self.grad_clip {
            clip_grad_norm(&mut grads, self.weights.values(), max)?;
        }
        opt.step_vars(self.vars.iter().map(|(_, v)| v), &grads, lr)?;
        Ok(loss.to_scalar::<f32>()?)
    }
}

fn batch_tensors(
    backbone: &Backbone,
    data: Labelled<'_>,
    batch: &[usize],
) -> Result<(Tensor, Tensor)> {
    let v = &backbone.config.vision;
    let (c, s) = (v.num_channels, v.image_size);
    let mut flat = Vec::with_capacity(batch.len() * c * s * s);
    for &i in batch {
        flat.extend_from_slice(&data.pixels[i]);
    }
    let dev = backbone.device();
    let pixels = Tensor::from_vec(flat, (batch.len(), c, s, s), dev)?;
    let labels: Vec<u32> = batch.iter().map(|&i| data.labels[i]).collect();
    Ok((pixels, Tensor::from_vec(labels, batch.len(), dev)?))
}

/// Scales every gradient so their global L2 norm is at most `max`; returns the norm before.
pub fn clip_grad_norm<'a>(
    grads: &mut GradStore,
    params: impl Iterator<Item = &'a Tensor> + Clone,
    max: f64,
) -> Result<f64> {
    let mut sq = 0.0;
    for p in params.clone() {
        if let Some(g) = grads.get(p) {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if norm > max && norm.is_finite() {
        let k = max / (norm + 1e-6);
        for p in params {
            if let Some(g) = grads.remove(p) {
                grads.insert(p, (g * k)?);
            }
        }
    }
    Ok(norm)
}

fn task_vector(
    backbone: &Backbone,
    vars: &[(String, Var)],
    config: &FinetuneConfig,
) -> Result<TaskVector> {
    let manifest = backbone.manifest();
    let base = backbone.base_blocks();
    let mut deltas = Vec::with_capacity(vars.len());
    for (name, var) in vars {
        let loc = manifest
            .locate(name)
            .ok_or_else(|| ClipError::tensor(name, "is not in the manifest"))?;
        let ft: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let b = &base[loc.block][loc.offset..loc.offset + loc.numel];
        deltas.push(Delta {
            name: name.clone(),
            shape: var.dims().to_vec(),
            data: ft.iter().zip(b).map(|(f, b)| f - b).collect(),
        });
    }
    let meta = TaskVectorMeta {
        name: config.name.clone(),
        base_model: backbone.id.clone(),
        base_digest: backbone.base_digest().to_string(),
        source: format!(
            "atlas-learn finetune: epochs {}, batch {}, lr {}, wd {}, seed {}",
            config.epochs, config.batch_size, config.lr, config.weight_decay, config.seed
        ),
    };
    Ok(TaskVector::from_deltas(
        manifest,
        meta,
        config.store,
        deltas,
        &|_| false,
    )?)
}

/// Top-1 accuracy of `tower` + `head` on labelled pixels, in batches of `batch_size`.
pub fn accuracy(
    tower: &VisionTower,
    head: &ZeroShotHead,
    data: Labelled<'_>,
    batch_size: usize,
) -> Result<f64> {
    let preds = predict(tower, head, data.pixels, batch_size)?;
    if preds.len() != data.labels.len() || preds.is_empty() {
        return Err(FinetuneError::Invalid(format!(
            "{} images but {} labels",
            preds.len(),
            data.labels.len()
        )));
    }
    let right = preds
        .iter()
        .zip(data.labels)
        .filter(|(p, l)| p == l)
        .count();
    Ok(right as f64 / preds.len() as f64)
}

/// Predicted class of each image.
pub fn predict(
    tower: &VisionTower,
    head: &ZeroShotHead,
    pixels: &[Vec<f32>],
    batch_size: usize,
) -> Result<Vec<u32>> {
    let cfg = tower.config();
    let (c, s) = (cfg.num_channels, cfg.image_size);
    let dev = head.weights.device();
    let mut out = Vec::with_capacity(pixels.len());
    for chunk in pixels.chunks(batch_size.max(1)) {
        let mut flat = Vec::with_capacity(chunk.len() * c * s * s);
        for (i, p) in chunk.iter().enumerate() {
            if p.len() != c * s * s {
                return Err(FinetuneError::Invalid(format!(
                    "image {i} of a batch has {} values, the model takes {}",
                    p.len(),
                    c * s * s
                )));
            }
            flat.extend_from_slice(p);
        }
        let x = Tensor::from_vec(flat, (chunk.len(), c, s, s), dev)?;
        let logits = head.logits(&tower.forward(&x)?)?;
        out.extend(logits.argmax(1)?.to_vec1::<u32>()?);
    }
    Ok(out)
}
