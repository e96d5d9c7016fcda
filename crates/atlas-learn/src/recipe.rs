//! How to learn: [`LearnConfig`], the paper's recipe per [`Objective`] as its defaults, and the
//! [`Overrides`] a caller may set on top of it (the same for the HTTP API and the command line).

use crate::augment::View;
use crate::job::Objective;
use crate::optim::AdamWConfig;
use crate::{LearnError, Result};
use atlas_core::{Coefficients, Layout};
use serde::{Deserialize, Serialize};

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
    /// Training view of labelled images: Plain (none, the default), Crop (RandomResizedCrop,
    /// scale 0.5–1) or Train (Crop + horizontal flip, the paper's).
    pub view: View,
    /// Starting Λ (default: zeros, the pre-trained model).
    pub initial: Option<Coefficients>,
    /// Without `initial`: every coefficient's starting value (AdaMerging's prior λ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prior: Option<f64>,
    /// Negation: control accuracy must stay ≥ this × its zero-shot accuracy.
    pub control_guard: f64,
    /// UFM: share of each class's expected count kept in the trusted set.
    pub trusted_fraction: f64,
    /// UFM: pseudo-label sharpening temperature (targets ∝ p^(1/T)).
    pub sharpen_temperature: f64,
    /// Images per forward pass when evaluating.
    pub eval_batch: usize,
    /// How far each coefficient can move over the run at least: AdamW moves a coefficient by
    /// about lr per step, so when lr × steps falls short of this the learner raises lr to
    /// travel / steps. The paper's lr of 1e-3 assumes thousands of steps; a few dozen images
    /// give a few dozen, and Λ would stay within ±0.03 of its start. None: lr as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub travel: Option<f64>,
}

/// Task addition's least travel of a coefficient over a run (see [`LearnConfig::travel`]). The
/// paper's merge takes thousands of steps at 1e-3 (a travel of a few). On the full demo world
/// (300 steps) aTLAS per block reached 65.0% mean test accuracy at a travel of 1, 69.9% at 3
/// (lr 0.01) and 70.3% at 9; on the ci world 52.4%, 52.1% and 53.2% at 1, 3 and 5.
pub const MERGE_TRAVEL: f64 = 3.0;

/// Negation's least travel. The reference code runs 1e-3 × a per-task factor of 2–10 for 2–20
/// epochs of a validation split: a travel of about 1 to 2. On the ci world, 1 lowers all six
/// targets with the control kept; lr 1e-3 alone (30–50 steps) moved none.
pub const NEGATION_TRAVEL: f64 = 1.0;

/// Test-time adaptation's least travel: smaller, because nothing checks the result against
/// labels. On four shifted tasks of the ci world, entropy minimisation's last epoch ended below
/// zero-shot on all four at a travel of 1, on two at 0.2 (count by 0.8 points, digit by 4.7;
/// the label-free epoch choice kept the start on digit).
pub const TTA_TRAVEL: f64 = 0.2;

/// AdaMerging's starting coefficient for every task vector and block.
pub const ADAMERGING_PRIOR: f64 = 0.3;

/// Largest learning rate a job may ask for (the recipes use 1e-3 and 1e-1).
pub const MAX_LR: f64 = 10.0;
/// Largest epochs and batch size a job may ask for (bounded work per job).
pub const MAX_EPOCHS: usize = 1000;
pub const MAX_BATCH: usize = 1024;
/// Longest learning-rate warm-up a job may ask for, in steps.
pub const MAX_WARMUP: usize = 100_000;

impl LearnConfig {
    /// The paper's recipe for the objective (method notes: AdamW, cosine, grad-norm clip 1.0).
    pub fn recipe(objective: Objective) -> Self {
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
            // Off by default: crops and flips took few-shot accuracy on the demo world's digits
            // from 82.7% to 34.8% (issue 19); a flip changes the label of digits, text and
            // left/right, a crop that of counts and positions.
            view: View::Plain,
            initial: None,
            prior: None,
            control_guard: 0.95,
            trusted_fraction: 0.3,
            sharpen_temperature: 0.5,
            eval_batch: 64,
            travel: None,
        };
        match objective {
            Objective::FewShot => LearnConfig {
                optimizer: AdamWConfig {
                    lr: 1e-1,
                    ..base.optimizer
                },
                ..base
            },
            Objective::TaskAddition => LearnConfig {
                epochs: 20,
                batch_size: 16,
                travel: Some(MERGE_TRAVEL),
                ..base
            },
            Objective::Negation => LearnConfig {
                batch_size: 16,
                travel: Some(NEGATION_TRAVEL),
                ..base
            },
            Objective::Entropy | Objective::Ufm => LearnConfig {
                travel: Some(TTA_TRAVEL),
                ..base
            },
            // The paper's: Adam at 1e-3 without weight decay or clipping, 16 images per task
            // per step, every coefficient starting at 0.3 (its "prior" λ).
            Objective::AdaMerging => LearnConfig {
                optimizer: AdamWConfig {
                    weight_decay: 0.0,
                    ..base.optimizer
                },
                batch_size: 16,
                grad_clip: None,
                prior: Some(ADAMERGING_PRIOR),
                ..base
            },
        }
    }

    /// The learning rate for a run of `total_steps` steps: lr, raised to travel / steps.
    pub fn lr_for(&self, total_steps: usize) -> f64 {
        match self.travel {
            Some(t) => self
                .optimizer
                .lr
                .max(t / total_steps.max(1) as f64)
                .min(MAX_LR),
            None => self.optimizer.lr,
        }
    }

    /// The recipe with the caller's overrides applied (an lr given is taken as it is).
    pub fn with(mut self, o: &Overrides) -> Self {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        set(&mut self.epochs, o.epochs);
        if o.lr.is_some() {
            self.travel = None;
        }
        set(&mut self.optimizer.lr, o.lr);
        set(&mut self.optimizer.weight_decay, o.weight_decay);
        set(&mut self.batch_size, o.batch_size);
        set(&mut self.warmup_steps, o.warmup_steps);
        set(&mut self.seed, o.seed);
        set(&mut self.val_fraction, o.val_fraction);
        self.view = match (o.augment, o.flip) {
            (Some(false), _) => View::Plain,
            (_, Some(true)) => View::Train,
            (Some(true), _) => View::Crop,
            // Flip off, crops as they were (a flipping recipe keeps its crops).
            (None, Some(false)) if self.view == View::Train => View::Crop,
            _ => self.view,
        };
        self
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LearnError::Job(m.to_string()));
        let o = &self.optimizer;
        // A larger rate only overflows Λ a few steps in, failing the job long after its 202.
        if !(o.lr.is_finite() && o.lr > 0.0 && o.lr <= MAX_LR) {
            return bad("lr must be a positive number at most 10");
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
        if self.travel.is_some_and(|t| !positive(t)) {
            return bad("travel must be positive");
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

/// Settings of a learning job that override the objective's recipe; unset fields keep it. The
/// HTTP API's `config` and, with the `clap` feature, the command line's flags.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Passes over the training data.
    #[cfg_attr(feature = "clap", arg(long))]
    pub epochs: Option<usize>,
    /// Peak learning rate.
    #[cfg_attr(feature = "clap", arg(long))]
    pub lr: Option<f64>,
    /// AdamW's decoupled weight decay.
    #[cfg_attr(feature = "clap", arg(long))]
    pub weight_decay: Option<f64>,
    /// Images per step (per task for task addition and negation).
    #[cfg_attr(feature = "clap", arg(long))]
    pub batch_size: Option<usize>,
    /// Steps of linear learning-rate warm-up before the cosine decay.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<usize>,
    /// Seed of the shuffles, splits and augmentation.
    #[cfg_attr(feature = "clap", arg(long))]
    pub seed: Option<u64>,
    /// Share of each class held out to pick the best epoch (when a task has no validation split).
    #[cfg_attr(feature = "clap", arg(long))]
    pub val_fraction: Option<f64>,
    /// Random crops of labelled images, RandomResizedCrop at scale 0.5–1 as in the paper (true
    /// or false; default off). For photos of objects whose label survives a crop; not for
    /// counts or positions, which a crop changes.
    #[cfg_attr(feature = "clap", arg(long))]
    pub augment: Option<bool>,
    /// Random horizontal flips of labelled images, with the crops (true or false; default off).
    /// Only where a mirror image has the same label: not digits, text or left/right.
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip: Option<bool>,
}

impl Overrides {
    /// Refuses overrides past the bounds on a job's work (the API and the CLI both ask).
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(LearnError::Job(m));
        if self.epochs.is_some_and(|e| e > MAX_EPOCHS) {
            return bad(format!("epochs must be at most {MAX_EPOCHS}"));
        }
        if self.batch_size.is_some_and(|b| b > MAX_BATCH) {
            return bad(format!("batch_size must be at most {MAX_BATCH}"));
        }
        if self.warmup_steps.is_some_and(|w| w > MAX_WARMUP) {
            return bad(format!("warmup_steps must be at most {MAX_WARMUP}"));
        }
        if self.val_fraction.is_some_and(|v| !(0.0..1.0).contains(&v)) {
            return bad("val_fraction must be in [0, 1)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_only_what_they_set() {
        let recipe = LearnConfig::recipe(Objective::FewShot);
        assert_eq!(recipe.clone().with(&Overrides::default()), recipe);
        let o = Overrides {
            epochs: Some(3),
            lr: Some(0.5),
            warmup_steps: Some(2),
            augment: Some(false),
            ..Overrides::default()
        };
        let c = recipe.clone().with(&o);
        assert_eq!((c.epochs, c.optimizer.lr, c.warmup_steps), (3, 0.5, 2));
        assert_eq!(c.view, View::Plain);
        assert_eq!(c.batch_size, recipe.batch_size);
        let view = |augment, flip| {
            let o = Overrides {
                augment,
                flip,
                ..Overrides::default()
            };
            recipe.clone().with(&o).view
        };
        assert_eq!(view(Some(true), None), View::Crop);
        assert_eq!(view(Some(true), Some(false)), View::Crop);
        assert_eq!(view(None, Some(true)), View::Train);
        assert_eq!(view(Some(true), Some(true)), View::Train);
        assert_eq!(view(Some(false), Some(true)), View::Plain);
        assert_eq!(view(None, None), View::Plain);
        assert_eq!(c.optimizer.weight_decay, recipe.optimizer.weight_decay);
    }

    #[test]
    fn recipes_follow_the_paper() {
        assert_eq!(LearnConfig::recipe(Objective::FewShot).optimizer.lr, 1e-1);
        assert_eq!(LearnConfig::recipe(Objective::TaskAddition).epochs, 20);
        for o in Objective::ALL {
            assert_eq!(
                LearnConfig::recipe(o).view,
                View::Plain,
                "{o}: no augmentation"
            );
        }
        for o in Objective::ALL {
            LearnConfig::recipe(o).validate().unwrap();
        }
    }
}
