//! Losses on logits, from primitive ops so they are differentiable: mean cross-entropy and mean
//! prediction entropy.

use crate::Result;
use candle_core::{Tensor, D};

/// log_softmax over the last dimension (max-shifted; the shift carries no gradient).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Mean over the batch of −log p(label). `labels` are u32 class indices `[B]`.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    let picked = lp.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Mean over the batch of −Σ p log p.
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let lp = log_softmax(logits)?;
    let h = (lp.exp()? * &lp)?.sum(D::Minus1)?;
    Ok(h.mean_all()?.neg()?)
}
