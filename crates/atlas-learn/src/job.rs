//! What to learn (the [`Job`]), on which data ([`Task`]), and how ([`LearnConfig`], with the
//! paper's recipe per objective as defaults).

use crate::augment::View;
use crate::data::Dataset;
use crate::optim::AdamWConfig;
use crate::{LearnError, Result};
use atlas_clip::{Backbone, ZeroShotHead};
use atlas_core::{Coefficients, Layout};
use serde::{Deserialize, Serialize};

/// A data set with its zero-shot head (from its class names) and, optionally, its own held-out
/// split; without one, `LearnConfig::val_fraction` of the data is held out.
#[derive(Debug, Clone)]
pub struct Task {
    pub name: String,
    pub data: Dataset,
    pub val: Option<Dataset>,
    pub head: ZeroShotHead,
    /// Accuracy of the task's own fine-tuned model, to report normalised accuracy.
    pub reference_accuracy: Option<f64>,
}

impl Task {
    pub fn new(backbone: &Backbone, name: &str, data: Dataset, templates: &[&str]) -> Result<Self> {
        if data.classes.is_empty() {
            return Err(LearnError::Data(format!("task {name} has no class names")));
        }
        let head = ZeroShotHead::build(backbone, &data.classes, templates)?;
        Ok(Task {
            name: name.to_string(),
            data,
            val: None,
            head,
            reference_accuracy: None,
        })
    }

    pub fn with_val(mut self, val: Dataset) -> Self {
        self.val = Some(val);
        self
    }
}

#[derive(Debug, Clone)]
pub enum Job {
    /// Cross-entropy on labelled images of one task.
    FewShot(Task),
    /// Task addition: summed cross-entropy over per-task slices of each batch.
    MultiTask(Vec<Task>),
    /// −CE(target) + CE(control); kept only while control accuracy stays ≥ guard × zero-shot.
    Negation { target: Task, control: Task },
    /// Test-time adaptation: entropy minimisation on unlabelled images (SAR-style filtering).
    Entropy(Task),
    /// Test-time adaptation: UFM pseudo-labelling (weak view → pseudo-labels, strong view → loss).
    Ufm(Task),
}

impl Job {
    pub fn tasks(&self) -> Vec<&Task> {
        match self {
            Job::FewShot(t) | Job::Entropy(t) | Job::Ufm(t) => vec![t],
            Job::MultiTask(ts) => ts.iter().collect(),
            Job::Negation { target, control } => vec![target, control],
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Job::FewShot(_) => "few_shot",
            Job::MultiTask(_) => "multi_task",
            Job::Negation { .. } => "negation",
            Job::Entropy(_) => "entropy",
            Job::Ufm(_) => "ufm",
        }
    }
    pub fn is_unsupervised(&self) -> bool {
        matches!(self, Job::Entropy(_) | Job::Ufm(_))
    }
    /// Checks the data fit the objective.
    pub fn validate(&self) -> Result<()> {
        for t in self.tasks() {
            if t.data.is_empty() {
                return Err(LearnError::Data(format!("task {} has no images", t.name)));
            }
            if !self.is_unsupervised() && !t.data.is_labelled() {
                return Err(LearnError::Data(format!(
                    "task {} needs a label for every image for {}",
                    t.name,
                    self.kind()
                )));
            }
            if t.head.classes.len() != t.data.classes.len() {
                return Err(LearnError::Data(format!(
                    "task {}: the head has {} classes, the data {}",
                    t.name,
                    t.head.classes.len(),
                    t.data.classes.len()
                )));
            }
        }
        if let Job::MultiTask(ts) = self {
            if ts.is_empty() {
                return Err(LearnError::Job(
                    "a multi-task merge needs at least one task".into(),
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LearnConfig {
    pub layout: Layout,
    pub optimizer: AdamWConfig,
    pub epochs: usize,
    /// Images per step (per task for a multi-task merge and for negation).
    pub batch_size: usize,
    pub warmup_steps: usize,
    /// Gradient-norm clipping; None turns it off.
    pub grad_clip: Option<f64>,
    pub seed: u64,
    /// Share of each class held out for choosing the best epoch when a task has no val split.
    pub val_fraction: f64,
    /// Training view of labelled images (Train = RandomResizedCrop + flip; Plain = none).
    pub view: View,
    /// Starting Λ (default: zeros, the pre-trained model).
    pub initial: Option<Coefficients>,
    /// Negation: control accuracy must stay ≥ this × its zero-shot accuracy.
    pub control_guard: f64,
    /// UFM: share of each class's expected count kept in the trusted set.
    pub trusted_fraction: f64,
    /// UFM: pseudo-label sharpening temperature (targets ∝ p^(1/T)).
    pub sharpen_temperature: f64,
    /// Images per forward pass when evaluating.
    pub eval_batch: usize,
}

/// The recipe for a job kind ("few_shot", "multi_task", "negation", "entropy", "ufm").
pub fn recipe_for_kind(kind: &str) -> LearnConfig {
    LearnConfig::recipe_kind(kind)
}

impl LearnConfig {
    /// The paper's recipe for the job (method notes: AdamW, cosine, grad-norm clip 1.0).
    pub fn recipe(job: &Job) -> Self {
        Self::recipe_kind(job.kind())
    }

    fn recipe_kind(kind: &str) -> Self {
        let base = LearnConfig {
            layout: Layout::PerBlock,
            optimizer: AdamWConfig {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
            epochs: 10,
            batch_size: 32,
            warmup_steps: 0,
            grad_clip: Some(1.0),
            seed: 0,
            val_fraction: 0.2,
            view: View::Train,
            initial: None,
            control_guard: 0.95,
            trusted_fraction: 0.3,
            sharpen_temperature: 0.5,
            eval_batch: 64,
        };
        match kind {
            "few_shot" => LearnConfig {
                optimizer: AdamWConfig {
                    lr: 1e-1,
                    ..base.optimizer
                },
                ..base
            },
            "multi_task" => LearnConfig {
                epochs: 20,
                batch_size: 16,
                ..base
            },
            "negation" => LearnConfig {
                batch_size: 16,
                ..base
            },
            _ => LearnConfig {
                view: View::Plain,
                ..base
            },
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LearnError::Job(m.to_string()));
        let o = &self.optimizer;
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad("lr must be a positive number");
        }
        if !(0.0..1.0).contains(&o.beta1) || !(0.0..1.0).contains(&o.beta2) {
            return bad("betas must be in [0, 1)");
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(o.eps) || !o.weight_decay.is_finite() || o.weight_decay < 0.0 {
            return bad("eps must be positive and weight_decay non-negative");
        }
        if self.epochs == 0 || self.batch_size == 0 || self.eval_batch == 0 {
            return bad("epochs, batch_size and eval_batch must be at least 1");
        }
        if !(0.0..1.0).contains(&self.val_fraction) {
            return bad("val_fraction must be in [0, 1)");
        }
        if self.grad_clip.is_some_and(|c| !positive(c)) {
            return bad("grad_clip must be positive");
        }
        if !positive(self.trusted_fraction)
            || self.trusted_fraction > 1.0
            || !positive(self.sharpen_temperature)
        {
            return bad("trusted_fraction must be in (0, 1] and sharpen_temperature positive");
        }
        Ok(())
    }
}
