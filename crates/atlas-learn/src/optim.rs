//! The optimiser of every training loop here: AdamW with every hyper-parameter explicit, over the
//! coefficient vector Λ (serialisable, so a learning job resumes exactly where it stopped) or over
//! candle `Var`s (fine-tuning); the cosine schedule with optional linear warm-up; gradient-norm
//! clipping of a flat gradient.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch.optim.AdamW's defaults except the paper's weight decay of 0.1.
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW as torch.optim.AdamW: decoupled weight decay, bias-corrected moments. `M` holds the
/// moments: `Vec<f64>` for the coefficient vector, `Vec<Tensor>` for `Var`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW<M = Vec<f64>> {
    pub config: AdamWConfig,
    pub m: M,
    pub v: M,
    pub t: u64,
}

/// What one step applies: parameters scale by `decay`, then move by lr · (m / c1) / (√(v / c2) + ε).
struct StepFactors {
    decay: f64,
    c1: f64,
    c2: f64,
}

impl<M> AdamW<M> {
    /// Counts a step at learning rate `lr` and returns its factors.
    fn advance(&mut self, lr: f64) -> StepFactors {
        self.t += 1;
        let c = self.config;
        StepFactors {
            decay: 1.0 - lr * c.weight_decay,
            c1: 1.0 - c.beta1.powi(self.t as i32),
            c2: 1.0 - c.beta2.powi(self.t as i32),
        }
    }
}

impl AdamW {
    /// Over a vector of `n` values.
    pub fn new(config: AdamWConfig, n: usize) -> Self {
        AdamW {
            config,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One update of `params` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f64], grad: &[f64], lr: f64) {
        let f = self.advance(lr);
        let c = self.config;
        for i in 0..params.len() {
            params[i] *= f.decay;
            self.m[i] = c.beta1 * self.m[i] + (1.0 - c.beta1) * grad[i];
            self.v[i] = c.beta2 * self.v[i] + (1.0 - c.beta2) * grad[i] * grad[i];
            let denom = (self.v[i] / f.c2).sqrt() + c.eps;
            params[i] -= lr * (self.m[i] / f.c1) / denom;
        }
    }
}

impl AdamW<Vec<Tensor>> {
    /// Over `vars`; [`AdamW::step_vars`] must get the same vars in the same order.
    pub fn for_vars<'a>(
        config: AdamWConfig,
        vars: impl Iterator<Item = &'a Var>,
    ) -> candle_core::Result<Self> {
        let zeros = vars
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            config,
            m: zeros.clone(),
            v: zeros,
            t: 0,
        })
    }

    /// One update, at learning rate `lr`, of every var that has a gradient in `grads`.
    pub fn step_vars<'a>(
        &mut self,
        vars: impl Iterator<Item = &'a Var>,
        grads: &GradStore,
        lr: f64,
    ) -> candle_core::Result<()> {
        let f = self.advance(lr);
        let c = self.config;
        for ((var, m), v) in vars.zip(&mut self.m).zip(&mut self.v) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Detached: the gradient carries the ops that made it, and the moments built from
            // it would chain every step's graph to the next (memory growing per step).
            let g = g.detach();
            *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&*m / f.c1)? / ((&*v / f.c2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * f.decay)?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

/// Learning rate at `step` of `total`: linear warm-up over `warmup` steps, then cosine decay to 0.
pub fn cosine_lr(base: f64, step: usize, total: usize, warmup: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = (step - warmup) as f64 / span as f64;
    0.5 * base * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Scales `grad` so its L2 norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grad: &mut [f64], max_norm: f64) -> f64 {
    let norm = grad.iter().map(|g| g * g).sum::<f64>().sqrt();
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        grad.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by torch.optim.AdamW(lr=0.1, betas=(0.9, 0.999), eps=1e-8,
    /// weight_decay=0.1) in f64 on params [1.0, -2.0] with gradients [0.5, -1.0] then [0.25, 0.5].
    #[test]
    fn matches_torch_adamw() {
        let mut p = vec![1.0, -2.0];
        let mut opt = AdamW::new(
            AdamWConfig {
                lr: 0.1,
                ..Default::default()
            },
            2,
        );
        opt.step(&mut p, &[0.5, -1.0], 0.1);
        assert!(
            (p[0] - 0.890000002).abs() < 1e-12 && (p[1] - -1.880000001).abs() < 1e-12,
            "{p:?}"
        );
        opt.step(&mut p, &[0.25, 0.5], 0.1);
        assert!((p[0] - 0.7878820404574624).abs() < 1e-12, "{p:?}");
        assert!((p[1] - -1.8345662973609032).abs() < 1e-12, "{p:?}");
    }

    #[test]
    fn var_adamw_matches_pytorch_first_steps() {
        // PyTorch AdamW(lr=0.1, weight_decay=0.5) on x = 2 with gradient 3 then -1:
        // step 1: x = 2·(1 − 0.05) − 0.1 · m̂/(√v̂ + ε) = 1.9 − 0.1 = 1.8.
        let dev = candle_core::Device::Cpu;
        let x = Var::new(&[2.0f64], &dev).unwrap();
        let config = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::for_vars(config, [&x].into_iter()).unwrap();
        let mut step = |g: f64| {
            let loss = (x.as_tensor() * g).unwrap().sum_all().unwrap();
            opt.step_vars([&x].into_iter(), &loss.backward().unwrap(), 0.1)
                .unwrap();
            x.as_tensor().to_vec1::<f64>().unwrap()[0]
        };
        let x1 = step(3.0);
        assert!((x1 - 1.8).abs() < 1e-9, "{x1}");
        // step 2: m = 0.9·0.3 − 0.1 = 0.17, v = 0.999·0.009 + 0.001 = 0.009991;
        // m̂ = 0.17/0.19, v̂ = 0.009991/0.001999.
        let x2 = step(-1.0);
        let (mh, vh) = (0.17 / 0.19, 0.009991 / 0.001999);
        let want = 1.8 * (1.0 - 0.05) - 0.1 * mh / (f64::sqrt(vh) + 1e-8);
        assert!((x2 - want).abs() < 1e-9, "{x2} vs {want}");
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        let lrs: Vec<f64> = (0..10).map(|s| cosine_lr(1.0, s, 10, 2)).collect();
        assert!((lrs[0] - 0.5).abs() < 1e-12 && (lrs[1] - 1.0).abs() < 1e-12);
        assert!((lrs[2] - 1.0).abs() < 1e-12);
        assert!(lrs.windows(2).skip(2).all(|w| w[1] < w[0]));
        assert!(cosine_lr(1.0, 10, 10, 2).abs() < 1e-12);
        // No warm-up: starts at the peak.
        assert_eq!(cosine_lr(0.1, 0, 5, 0), 0.1);
    }

    #[test]
    fn schedule_and_clipping() {
        assert!((cosine_lr(1.0, 0, 10, 2) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(1.0, 2, 10, 2) - 1.0).abs() < 1e-12);
        assert!(cosine_lr(1.0, 9, 10, 0) < 0.05);
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
    }
}
