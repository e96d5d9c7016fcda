//! The optimiser loop over Λ: per step, compose θ without a graph, back-propagate the objective
//! to the composed tensors and reduce to ∂L/∂Λ (atlas-clip's `coefficient_gradient`), clip,
//! AdamW; per epoch, validate and keep the best epoch, then checkpoint.

use crate::augment::View;
use crate::checkpoint::{self, EpochSummary, State};
use crate::data::{Dataset, Item};
use crate::eval::{batch_pixels, embed, logits, metrics, Views};
use crate::job::{Job, Objective, Task};
use crate::optim::{clip_grad_norm, cosine_lr, AdamW, AdamWConfig};
use crate::recipe::LearnConfig;
use crate::{LearnError, Result};
use atlas_clip::grad::coefficient_gradient;
use atlas_clip::loss::{cross_entropy, entropy, log_softmax};
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{Backbone, VisionTower};
use atlas_core::{Coefficients, TaskVector};
use candle_core::{DType, Tensor, D};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Resumed,
    Step,
    Epoch,
    Finished,
}

/// Progress of a learning job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub epoch: usize,
    pub epochs: usize,
    pub step: usize,
    pub total_steps: usize,
    pub loss: Option<f64>,
    pub lr: f64,
    pub grad_norm: Option<f64>,
    pub val_metric: Option<f64>,
    pub elapsed_s: f64,
    pub eta_s: Option<f64>,
}

/// What a learning job's selected Λ amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// An epoch beat the starting point on the validation metric, and its Λ was kept.
    Improved,
    /// No epoch beat the starting point (or none was eligible): Λ is the start, unchanged.
    KeptStart,
}

/// The result of [`learn`].
#[derive(Debug, Clone)]
pub struct Learned {
    /// Λ of the best epoch (the start when no epoch beat it).
    pub coefs: Coefficients,
    /// Λ after the last epoch.
    pub last: Coefficients,
    /// 0 when no epoch beat the starting point.
    pub best_epoch: usize,
    /// Validation metric at the start (zero-shot for Λ = 0) and at the best epoch.
    pub before: f64,
    pub after: f64,
    /// What the metric is: "accuracy", "mean_normalised_accuracy", "target_accuracy",
    /// "mutual_information".
    pub metric: &'static str,
    pub outcome: Outcome,
    /// Why the result may not be what was wanted, in words (empty when nothing to say).
    pub warnings: Vec<String>,
    pub history: Vec<EpochSummary>,
}

/// Below this largest |Λ − start| after all epochs, the coefficients have barely left the
/// start: the learning rate is too small for the number of steps (seen: ±0.025 with lr 1e-3
/// over ~30 steps).
const BARELY_MOVED: f64 = 0.05;

/// How a stream's slice of the batch enters the loss.
#[derive(Debug, Clone)]
enum Role {
    CrossEntropy,
    /// SAR-style: the mean over the reliable samples (test-time adaptation).
    Entropy,
    /// The mean over every sample (AdaMerging).
    MeanEntropy,
    /// Soft pseudo-label targets per item (UFM).
    Soft(Vec<Vec<f32>>),
}

/// One task's share of every batch.
struct Stream<'a> {
    task: &'a Task,
    train: Dataset,
    role: Role,
    weight: f64,
    view: View,
}

/// Learns Λ for `job`. `progress` sees every step and epoch; setting `cancel` stops at the next
/// step with [`LearnError::Cancelled`]; with `checkpoint`, state is saved every epoch and a run
/// over an existing checkpoint of the same job resumes from it.
pub fn learn(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    job: &Job,
    config: &LearnConfig,
    progress: &mut dyn FnMut(&Event),
    cancel: &AtomicBool,
    checkpoint: Option<&Path>,
) -> Result<Learned> {
    job.validate()?;
    config.validate()?;
    let n_blocks = backbone.manifest().len();
    let start = match &config.initial {
        Some(c) if c.layout != config.layout || c.n_tv != tvs.len() || c.n_blocks != n_blocks => {
            return Err(LearnError::Job(
                "the initial coefficients do not match the layout and task vectors".into(),
            ))
        }
        Some(c) => c.clone(),
        None => {
            let mut c = Coefficients::zeros(config.layout, tvs.len(), n_blocks)?;
            if let Some(p) = config.prior {
                c.values.iter_mut().for_each(|v| *v = p);
            }
            c
        }
    };
    let (mut streams, vals) = prepare(job, config);
    let fingerprint = fingerprint(job, config, tvs);
    let steps_per_epoch = streams
        .iter()
        .map(|s| s.train.len().div_ceil(config.batch_size))
        .max()
        .unwrap_or(1)
        .max(1);
    let total_steps = steps_per_epoch * config.epochs;
    // The fingerprint above hashes the config as given; the run uses the lr its data allow.
    let config = &LearnConfig {
        optimizer: AdamWConfig {
            lr: config.lr_for(total_steps),
            ..config.optimizer
        },
        ..config.clone()
    };
    let run = Run {
        backbone,
        tvs,
        job,
        config,
        vals: &vals,
    };

    let resumed = match checkpoint {
        Some(p) => checkpoint::load(p, &fingerprint)?,
        None => None,
    };
    let mut state = match resumed {
        Some(s) => s,
        None => {
            let control_zero_shot = run.control_accuracy(&start)?;
            let (score, metric, _) = run.validate(&start, control_zero_shot)?;
            State {
                version: checkpoint::VERSION,
                fingerprint,
                epochs_done: 0,
                step: 0,
                values: start.values.clone(),
                adam: AdamW::new(config.optimizer, start.values.len()),
                best_values: start.values.clone(),
                best_epoch: 0,
                best_score: score,
                before: metric,
                control_zero_shot,
                history: Vec::new(),
            }
        }
    };
    let clock = Instant::now();
    let first_step = state.step;
    let event = |kind, state: &State, loss, lr, grad_norm, val_metric| {
        let done = state.step - first_step;
        let elapsed_s = clock.elapsed().as_secs_f64();
        let eta_s = (done > 0).then(|| elapsed_s / done as f64 * (total_steps - state.step) as f64);
        Event {
            kind,
            epoch: state.epochs_done,
            epochs: config.epochs,
            step: state.step,
            total_steps,
            loss,
            lr,
            grad_norm,
            val_metric,
            elapsed_s,
            eta_s,
        }
    };
    let kind = if state.epochs_done > 0 {
        EventKind::Resumed
    } else {
        EventKind::Started
    };
    progress(&event(
        kind,
        &state,
        None,
        config.optimizer.lr,
        None,
        Some(state.before),
    ));

    // Negation stops once the control guard fails, as the reference code does: later epochs
    // move further from it.
    let guard_failed = |s: &State| {
        matches!(job, Job::Negation { .. }) && s.history.last().is_some_and(|h| !h.eligible)
    };
    while state.epochs_done < config.epochs && !guard_failed(&state) {
        let epoch = state.epochs_done + 1;
        let coefs = start.with_values(state.values.clone())?;
        run.refresh_pseudo_labels(&mut streams, &coefs, epoch)?;
        let orders = shuffled(&streams, config.seed, epoch);
        let mut loss_sum = 0.0;
        for s in 0..steps_per_epoch {
            if cancel.load(Ordering::Relaxed) {
                return Err(LearnError::Cancelled);
            }
            let coefs = start.with_values(state.values.clone())?;
            let (loss, mut grad) = run.step_gradient(&streams, &orders, s, epoch, &coefs)?;
            let grad_norm = match config.grad_clip {
                Some(c) => clip_grad_norm(&mut grad, c),
                None => grad.iter().map(|g| g * g).sum::<f64>().sqrt(),
            };
            let lr = cosine_lr(
                config.optimizer.lr,
                state.step,
                total_steps,
                config.warmup_steps,
            );
            state.adam.step(&mut state.values, &grad, lr);
            if state.values.iter().any(|v| !v.is_finite()) || !loss.is_finite() {
                return Err(LearnError::Job(format!(
                    "learning diverged at step {} (loss {loss}); lower the learning rate",
                    state.step + 1
                )));
            }
            state.step += 1;
            loss_sum += loss;
            progress(&event(
                EventKind::Step,
                &state,
                Some(loss),
                lr,
                Some(grad_norm),
                None,
            ));
        }
        let coefs = start.with_values(state.values.clone())?;
        let (score, metric, eligible) = run.validate(&coefs, state.control_zero_shot)?;
        if eligible && score > state.best_score {
            state.best_score = score;
            state.best_values = state.values.clone();
            state.best_epoch = epoch;
        }
        state.epochs_done = epoch;
        state.history.push(EpochSummary {
            epoch,
            train_loss: loss_sum / steps_per_epoch as f64,
            val_metric: metric,
            eligible,
        });
        if let Some(p) = checkpoint {
            checkpoint::save(p, &state)?;
        }
        let lr = cosine_lr(
            config.optimizer.lr,
            state.step,
            total_steps,
            config.warmup_steps,
        );
        progress(&event(
            EventKind::Epoch,
            &state,
            Some(loss_sum / steps_per_epoch as f64),
            lr,
            None,
            Some(metric),
        ));
    }
    let after = state
        .history
        .iter()
        .find(|h| h.epoch == state.best_epoch)
        .map_or(state.before, |h| h.val_metric);
    progress(&event(
        EventKind::Finished,
        &state,
        None,
        0.0,
        None,
        Some(after),
    ));
    let outcome = if state.best_epoch == 0 || state.best_values == start.values {
        Outcome::KeptStart
    } else {
        Outcome::Improved
    };
    let warnings = warnings(job, config, &state, outcome, &start.values, total_steps);
    Ok(Learned {
        coefs: start.with_values(state.best_values.clone())?,
        last: start.with_values(state.values.clone())?,
        best_epoch: state.best_epoch,
        before: state.before,
        after,
        metric: metric_name(job),
        outcome,
        warnings,
        history: state.history,
    })
}

/// What a caller should know about a finished run: the start was kept (and why, as far as the
/// history tells), Λ barely moved, or the metric is not accuracy.
fn warnings(
    job: &Job,
    config: &LearnConfig,
    state: &State,
    outcome: Outcome,
    start: &[f64],
    total_steps: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let metric = metric_name(job);
    if outcome == Outcome::KeptStart {
        let epochs = state.history.len();
        if state.history.iter().all(|h| !h.eligible) && epochs > 0 {
            out.push(format!(
                "kept the start: the control accuracy fell below {} × its zero-shot accuracy \
                 in all {epochs} epochs; lower lr or epochs",
                config.control_guard
            ));
        } else {
            out.push(format!(
                "kept the start: no epoch of {epochs} beat it on the validation {metric} \
                 ({:.4}); the result is the starting coefficients",
                state.before
            ));
        }
    }
    let moved = state
        .values
        .iter()
        .zip(start)
        .map(|(v, s)| (v - s).abs())
        .fold(0.0, f64::max);
    if moved < BARELY_MOVED {
        out.push(format!(
            "Λ barely moved: at most {moved:.3} from the start after {total_steps} steps at lr \
             {}; raise lr or epochs",
            config.optimizer.lr
        ));
    }
    if job.objective().is_unsupervised() {
        out.push(
            "no labels: epochs are compared by the mutual information of the predictions on \
             held-out images, not by accuracy"
                .into(),
        );
    }
    out
}

fn metric_name(job: &Job) -> &'static str {
    match job {
        Job::FewShot(_) => "accuracy",
        Job::TaskAddition(_) => "mean_normalised_accuracy",
        Job::Negation { .. } => "target_accuracy",
        Job::Entropy(_) | Job::Ufm(_) => "mutual_information",
        Job::AdaMerging(_) => "mean_mutual_information",
    }
}

/// Streams and validation sets: each task's own val split, or a held-out share of its data.
fn prepare<'a>(job: &'a Job, config: &LearnConfig) -> (Vec<Stream<'a>>, Vec<Dataset>) {
    let mut streams = Vec::new();
    let mut vals = Vec::new();
    for (i, task) in job.tasks().into_iter().enumerate() {
        let (train, val) = match (&task.val, job) {
            (Some(v), _) => (task.data.clone(), v.clone()),
            // As the reference code: negation learns and picks its epoch on the same data.
            // Making the target worse is the goal, not something to over-fit, and the control
            // guard needs every image (on 12 held-out images one miss breaks 0.95).
            (None, Job::Negation { .. }) => (task.data.clone(), task.data.clone()),
            (None, _) => task.data.split(config.val_fraction, config.seed ^ i as u64),
        };
        // A class with a single example cannot be split: validate on the training data then.
        let val = if val.is_empty() { train.clone() } else { val };
        let (role, weight, view) = match job {
            Job::Negation { .. } if i == 0 => (Role::CrossEntropy, -1.0, config.view),
            Job::Entropy(_) => (Role::Entropy, 1.0, config.view),
            Job::AdaMerging(_) => (Role::MeanEntropy, 1.0, config.view),
            Job::Ufm(_) => (Role::Soft(Vec::new()), 1.0, View::Strong),
            _ => (Role::CrossEntropy, 1.0, config.view),
        };
        streams.push(Stream {
            task,
            train,
            role,
            weight,
            view,
        });
        vals.push(val);
    }
    (streams, vals)
}

/// Per stream, the epoch's order of its items (seeded by seed, epoch and stream).
fn shuffled(streams: &[Stream], seed: u64, epoch: usize) -> Vec<Vec<usize>> {
    streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut idx: Vec<usize> = (0..s.train.len()).collect();
            let key = atlas_core::parts::splitmix64(seed ^ ((epoch as u64) << 20) ^ i as u64);
            idx.shuffle(&mut ChaCha8Rng::seed_from_u64(key));
            idx
        })
        .collect()
}

fn fingerprint(job: &Job, config: &LearnConfig, tvs: &[Arc<TaskVector>]) -> String {
    let mut text = serde_json::to_string(config).unwrap_or_default();
    // Checkpoints written before task addition had one name hashed "multi_task": keeping it
    // lets a job interrupted across an upgrade resume instead of failing.
    text.push_str(match job.objective() {
        Objective::TaskAddition => "multi_task",
        o => o.as_str(),
    });
    for tv in tvs {
        text.push_str(tv.digest());
    }
    for t in job.tasks() {
        text.push_str(&format!("{}:{}:{:?}", t.name, t.data.len(), t.data.classes));
    }
    format!("{:016x}", atlas_core::parts::fnv1a64(text.as_bytes()))
}

struct Run<'a> {
    backbone: &'a Backbone,
    tvs: &'a [Arc<TaskVector>],
    job: &'a Job,
    config: &'a LearnConfig,
    vals: &'a [Dataset],
}

impl Run<'_> {
    fn pre(&self) -> Preprocess {
        Preprocess::from_config(self.backbone.config.vision.image_size)
    }

    fn tower(&self, coefs: &Coefficients) -> Result<VisionTower> {
        Ok(self.backbone.composed_vision(self.tvs, coefs)?)
    }

    /// Zero-shot accuracy of the negation control, the reference for the guard.
    fn control_accuracy(&self, coefs: &Coefficients) -> Result<Option<f64>> {
        let Job::Negation { control, .. } = self.job else {
            return Ok(None);
        };
        let tower = self.tower(coefs)?;
        let m = metrics(
            &logits(
                &tower,
                &control.head,
                &self.vals[1],
                self.config.eval_batch,
                self.backbone.device(),
            )?,
            &self.vals[1],
        )?;
        Ok(Some(m.accuracy))
    }

    /// (score, higher is better; the reported metric; whether the epoch may be kept).
    fn validate(
        &self,
        coefs: &Coefficients,
        control_zero_shot: Option<f64>,
    ) -> Result<(f64, f64, bool)> {
        let tower = self.tower(coefs)?;
        let dev = self.backbone.device();
        let m = |t: &Task, d: &Dataset| {
            metrics(&logits(&tower, &t.head, d, self.config.eval_batch, dev)?, d)
        };
        Ok(match self.job {
            Job::FewShot(t) => {
                let a = m(t, &self.vals[0])?.accuracy;
                (a, a, true)
            }
            Job::TaskAddition(ts) => {
                let mut sum = 0.0;
                for (t, v) in ts.iter().zip(self.vals) {
                    sum += m(t, v)?.accuracy / t.reference_accuracy.unwrap_or(1.0);
                }
                let mean = sum / ts.len() as f64;
                (mean, mean, true)
            }
            Job::Negation { target, control } => {
                let t = m(target, &self.vals[0])?.accuracy;
                let c = m(control, &self.vals[1])?.accuracy;
                let guard = self.config.control_guard * control_zero_shot.unwrap_or(0.0);
                (-t, t, c >= guard)
            }
            // Not the entropy the objective lowers: that rewards collapsing onto few classes
            // and rose on most tasks tried. Mutual information also wants the predictions
            // spread over the classes. The reference code picks the epoch by labelled
            // validation accuracy, which a label-free job does not have.
            Job::Entropy(t) | Job::Ufm(t) => {
                let mi = m(t, &self.vals[0])?.mutual_information;
                (mi, mi, true)
            }
            Job::AdaMerging(ts) => {
                let mut sum = 0.0;
                for (t, v) in ts.iter().zip(self.vals) {
                    sum += m(t, v)?.mutual_information;
                }
                let mean = sum / ts.len() as f64;
                (mean, mean, true)
            }
        })
    }

    /// UFM: pseudo-labels from weak views under the current Λ, sharpened, kept for the trusted
    /// set (the most confident images of each predicted class).
    fn refresh_pseudo_labels(
        &self,
        streams: &mut [Stream],
        coefs: &Coefficients,
        epoch: usize,
    ) -> Result<()> {
        let Job::Ufm(task) = self.job else {
            return Ok(());
        };
        let pool = &self.vals_or_train(task);
        let tower = self.tower(coefs)?;
        let views = Views {
            view: View::Weak,
            seed: self.config.seed,
            epoch,
        };
        let emb = embed(
            &tower,
            &self.pre(),
            pool,
            views,
            self.config.eval_batch,
            self.backbone.device(),
        )?;
        let probs: Vec<Vec<f32>> = log_softmax(&task.head.to_dtype(DType::F32)?.logits(&emb)?)?
            .exp()?
            .to_vec2()?;
        let (items, targets) = trusted(
            pool,
            &probs,
            self.config.trusted_fraction,
            self.config.sharpen_temperature,
        );
        streams[0].train = Dataset {
            classes: pool.classes.clone(),
            items,
        };
        streams[0].role = Role::Soft(targets);
        Ok(())
    }

    /// The images UFM draws pseudo-labels from: all of the task's training images.
    fn vals_or_train(&self, task: &Task) -> Dataset {
        match &task.val {
            Some(_) => task.data.clone(),
            None => {
                task.data
                    .split(self.config.val_fraction, self.config.seed)
                    .0
            }
        }
    }

    /// Loss and ∂L/∂Λ for step `s` of `epoch`.
    fn step_gradient(
        &self,
        streams: &[Stream],
        orders: &[Vec<usize>],
        s: usize,
        epoch: usize,
        coefs: &Coefficients,
    ) -> Result<(f64, Vec<f64>)> {
        let bs = self.config.batch_size;
        let pre = self.pre();
        let dev = self.backbone.device();
        let mut pixel_parts = Vec::new();
        let mut picks = Vec::new();
        for (stream, order) in streams.iter().zip(orders) {
            let n = order.len();
            let take = bs.min(n);
            let idx: Vec<usize> = (0..take).map(|j| order[(s * bs + j) % n]).collect();
            let items: Vec<(usize, &Item)> =
                idx.iter().map(|&i| (i, &stream.train.items[i])).collect();
            pixel_parts.push(batch_pixels(
                &pre,
                &items,
                stream.view,
                self.config.seed,
                epoch,
                dev,
            )?);
            picks.push(idx);
        }
        let pixels = Tensor::cat(&pixel_parts, 0)?;
        coefficient_gradient::<f32>(self.backbone, self.tvs, coefs, |tower| {
            let emb = tower.forward(&pixels)?;
            let mut total: Option<Tensor> = None;
            let mut offset = 0;
            for (stream, idx) in streams.iter().zip(&picks) {
                let logits = stream
                    .task
                    .head
                    .logits(&emb.narrow(0, offset, idx.len())?)?;
                offset += idx.len();
                let l = (stream_loss(stream, &logits, idx)? * stream.weight)?;
                total = Some(match total {
                    Some(t) => (t + l)?,
                    None => l,
                });
            }
            Ok(total.expect("at least one stream"))
        })
        .map_err(LearnError::from)
    }
}

fn stream_loss(stream: &Stream, logits: &Tensor, idx: &[usize]) -> atlas_clip::Result<Tensor> {
    let dev = logits.device();
    match &stream.role {
        Role::CrossEntropy => {
            let labels: Vec<u32> = idx
                .iter()
                .map(|&i| stream.train.items[i].label.unwrap_or(0))
                .collect();
            cross_entropy(logits, &Tensor::new(labels, dev)?)
        }
        Role::Entropy => reliable_entropy(logits),
        Role::MeanEntropy => entropy(logits),
        Role::Soft(targets) => {
            let c = logits.dim(1)?;
            let flat: Vec<f32> = idx
                .iter()
                .flat_map(|&i| targets[i].iter().copied())
                .collect();
            let q = Tensor::from_vec(flat, (idx.len(), c), dev)?.to_dtype(logits.dtype())?;
            Ok((q * log_softmax(logits)?)?
                .sum(D::Minus1)?
                .mean_all()?
                .neg()?)
        }
    }
}

/// SAR-style entropy: the mean over samples whose entropy is below 0.4·ln(C) (the reliable
/// ones), or over all samples when none is.
fn reliable_entropy(logits: &Tensor) -> atlas_clip::Result<Tensor> {
    let lp = log_softmax(logits)?;
    let h = (lp.exp()? * &lp)?.sum(D::Minus1)?.neg()?;
    let c = logits.dim(1)? as f64;
    let values: Vec<f64> = h.to_dtype(DType::F64)?.to_vec1()?;
    let limit = 0.4 * c.ln();
    let mut mask: Vec<f64> = values
        .iter()
        .map(|&v| if v < limit { 1.0 } else { 0.0 })
        .collect();
    if mask.iter().all(|&m| m == 0.0) {
        mask.iter_mut().for_each(|m| *m = 1.0);
    }
    let count: f64 = mask.iter().sum();
    let mask = Tensor::new(mask, logits.device())?.to_dtype(h.dtype())?;
    Ok(((h * mask)?.sum_all()? / count)?)
}

/// The trusted set: for each class, the `fraction × N / C` most confident images predicted as
/// it, with sharpened soft targets q ∝ p^(1/T).
fn trusted(
    pool: &Dataset,
    probs: &[Vec<f32>],
    fraction: f64,
    temperature: f64,
) -> (Vec<Item>, Vec<Vec<f32>>) {
    let c = pool.classes.len().max(1);
    let per_class = ((fraction * pool.len() as f64 / c as f64).ceil() as usize).max(1);
    let mut by_class: Vec<Vec<(f32, usize)>> = vec![Vec::new(); c];
    for (i, p) in probs.iter().enumerate() {
        let (cls, conf) =
            p.iter()
                .enumerate()
                .fold((0, f32::MIN), |m, (j, &v)| if v > m.1 { (j, v) } else { m });
        by_class[cls].push((conf, i));
    }
    let mut keep = Vec::new();
    for mut members in by_class {
        members.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        keep.extend(members.into_iter().take(per_class).map(|(_, i)| i));
    }
    keep.sort_unstable();
    let power = (1.0 / temperature) as f32;
    let targets = keep
        .iter()
        .map(|&i| {
            let q: Vec<f32> = probs[i].iter().map(|p| p.max(1e-12).powf(power)).collect();
            let sum: f32 = q.iter().sum();
            q.iter().map(|x| x / sum).collect()
        })
        .collect();
    let items = keep
        .iter()
        .map(|&i| Item {
            image: pool.items[i].image.clone(),
            label: None,
        })
        .collect();
    (items, targets)
}

/// One pass over the training data at `coefs`, accumulating |∂L/∂Λ| per coefficient (budget
/// selection ranks task vectors or blocks by it).
pub(crate) fn abs_gradient_pass(
    backbone: &Backbone,
    tvs: &[Arc<TaskVector>],
    job: &Job,
    config: &LearnConfig,
    coefs: &Coefficients,
) -> Result<Vec<f64>> {
    job.validate()?;
    let (mut streams, vals) = prepare(job, config);
    let run = Run {
        backbone,
        tvs,
        job,
        config,
        vals: &vals,
    };
    run.refresh_pseudo_labels(&mut streams, coefs, 1)?;
    let orders = shuffled(&streams, config.seed, 1);
    let steps = streams
        .iter()
        .map(|s| s.train.len().div_ceil(config.batch_size))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut acc = vec![0.0; coefs.values.len()];
    for s in 0..steps {
        let (_, grad) = run.step_gradient(&streams, &orders, s, 1, coefs)?;
        acc.iter_mut().zip(&grad).for_each(|(a, g)| *a += g.abs());
    }
    Ok(acc)
}
