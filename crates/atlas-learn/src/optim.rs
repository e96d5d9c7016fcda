//! AdamW over the coefficient vector, with every hyper-parameter explicit, a cosine schedule with
//! optional linear warm-up, and gradient-norm clipping. The state is serialisable so a learning
//! job resumes exactly where it stopped.

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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    pub m: Vec<f64>,
    pub v: Vec<f64>,
    pub t: u64,
}

impl AdamW {
    pub fn new(config: AdamWConfig, n: usize) -> Self {
        AdamW {
            config,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One update of `params` at learning rate `lr` (decoupled weight decay, as torch's AdamW).
    pub fn step(&mut self, params: &mut [f64], grad: &[f64], lr: f64) {
        let c = self.config;
        self.t += 1;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for i in 0..params.len() {
            params[i] *= 1.0 - lr * c.weight_decay;
            self.m[i] = c.beta1 * self.m[i] + (1.0 - c.beta1) * grad[i];
            self.v[i] = c.beta2 * self.v[i] + (1.0 - c.beta2) * grad[i] * grad[i];
            let denom = (self.v[i] / bc2).sqrt() + c.eps;
            params[i] -= lr * (self.m[i] / bc1) / denom;
        }
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
    fn schedule_and_clipping() {
        assert!((cosine_lr(1.0, 0, 10, 2) - 0.5).abs() < 1e-12);
        assert!((cosine_lr(1.0, 2, 10, 2) - 1.0).abs() < 1e-12);
        assert!(cosine_lr(1.0, 9, 10, 0) < 0.05);
        let mut g = vec![3.0, 4.0];
        assert_eq!(clip_grad_norm(&mut g, 1.0), 5.0);
        assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
    }
}
