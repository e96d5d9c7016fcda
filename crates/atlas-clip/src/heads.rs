//! Zero-shot classification heads: for each class, the mean of the L2-normalised text
//! embeddings of its prompts, renormalised; logits = exp(logit_scale) · normalise(image) · headᵀ.

use crate::backbone::Backbone;
use crate::model::normalize;
use crate::templates::fill;
use crate::{ClipError, Result};
use candle_core::{DType, Tensor};

/// Texts encoded per text-tower call: bounds memory for large class lists.
const TEXT_BATCH: usize = 256;

#[derive(Debug, Clone)]
pub struct ZeroShotHead {
    pub classes: Vec<String>,
    /// `[C, P]`, rows L2-normalised.
    pub weights: Tensor,
    /// exp(logit_scale).
    pub scale: f64,
}

impl ZeroShotHead {
    pub fn build(backbone: &Backbone, classes: &[String], templates: &[&str]) -> Result<Self> {
        if classes.is_empty() {
            return Err(ClipError::Config(
                "a head needs at least one class name".into(),
            ));
        }
        if templates.is_empty() {
            return Err(ClipError::Config(
                "a head needs at least one prompt template".into(),
            ));
        }
        let rows = classes
            .iter()
            .map(|c| {
                let texts: Vec<String> = templates.iter().map(|t| fill(t, c)).collect();
                let emb = normalize(&encode_texts(backbone, &texts)?)?;
                Ok(normalize(&emb.mean_keepdim(0)?)?.squeeze(0)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ZeroShotHead {
            classes: classes.to_vec(),
            weights: Tensor::stack(&rows, 0)?,
            scale: backbone.logit_scale().exp(),
        })
    }

    /// Logits `[B, C]` for image embeddings `[B, P]` (unnormalised).
    pub fn logits(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let img = normalize(image_embeds)?;
        let w = self.weights.to_dtype(img.dtype())?;
        Ok((img.matmul(&w.t()?)? * self.scale)?)
    }

    /// The head at another dtype (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(ZeroShotHead {
            weights: self.weights.to_dtype(dtype)?,
            ..self.clone()
        })
    }
}

/// Text embeddings `[N, P]` (unnormalised) for raw texts.
pub fn encode_texts(backbone: &Backbone, texts: &[String]) -> Result<Tensor> {
    let tokenizer = backbone
        .tokenizer()
        .ok_or_else(|| ClipError::Tokenizer("the backbone has no tokenizer.json".into()))?;
    let text = backbone
        .text()
        .ok_or_else(|| ClipError::Config("the backbone has no text tower".into()))?;
    let mut parts = Vec::new();
    for chunk in texts.chunks(TEXT_BATCH) {
        let ids = tokenizer.encode_padded(chunk, backbone.device())?;
        parts.push(text.forward(&ids)?);
    }
    Ok(Tensor::cat(&parts, 0)?)
}
