//! Zero-shot classification heads: for each class, the mean of the L2-normalised text
//! embeddings of its prompts, renormalised; logits = exp(logit_scale) · normalise(image) · headᵀ.

use crate::backbone::Backbone;
use crate::model::{normalize, softmax_last};
use crate::templates::fill;
use crate::tokenizer::ClipTokenizer;
use crate::{ClipError, Result};
use candle_core::{DType, Tensor};
use std::collections::HashMap;

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
        if let Some(tokenizer) = backbone.tokenizer() {
            check_distinct(tokenizer, classes)?;
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
        // In f32 whatever the model's dtype: at f16 the squared norm of a large embedding
        // overflows, and every probability became NaN.
        let img = normalize(&image_embeds.to_dtype(DType::F32)?)?;
        let w = self.weights.to_dtype(DType::F32)?;
        Ok((img.matmul(&w.t()?)? * self.scale)?)
    }

    /// Class probabilities per image: the softmax of each row of `logits` (`[B, C]`, as
    /// [`ZeroShotHead::logits`] gives them), computed in f32 whatever the model's dtype.
    pub fn probabilities(&self, logits: &Tensor) -> Result<Vec<Vec<f32>>> {
        let p = softmax_last(&logits.to_dtype(DType::F32)?)?;
        Ok(p.to_vec2()?)
    }

    /// The `k` most probable classes of one row of [`ZeroShotHead::probabilities`] (at least
    /// one), most probable first: (class index, class name, probability).
    pub fn top_k<'a>(&'a self, probs: &[f32], k: usize) -> Vec<(usize, &'a str, f32)> {
        let mut idx: Vec<usize> = (0..probs.len().min(self.classes.len())).collect();
        idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        idx.into_iter()
            .take(k.max(1))
            .map(|i| (i, self.classes[i].as_str(), probs[i]))
            .collect()
    }

    /// The head at another dtype (f64 for gradient checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(ZeroShotHead {
            weights: self.weights.to_dtype(dtype)?,
            ..self.clone()
        })
    }
}

/// Refuses classes the tokenizer cannot tell apart: a class with no token it knows (a small
/// vocabulary drops unknown words) or two classes with the same ids (`Cat` and `cat` once
/// lowercased). Their prompts would embed alike and split the probability between them.
pub fn check_distinct(tokenizer: &ClipTokenizer, classes: &[String]) -> Result<()> {
    let mut seen: HashMap<Vec<u32>, &str> = HashMap::with_capacity(classes.len());
    for class in classes {
        let ids = tokenizer.known_ids(class)?;
        if ids.is_empty() {
            return Err(ClipError::Config(format!(
                "class {class:?} has no word this model's tokenizer knows: the model cannot read it"
            )));
        }
        if let Some(other) = seen.insert(ids, class) {
            return Err(ClipError::Config(format!(
                "classes {other:?} and {class:?} are the same to this model's tokenizer (the same token ids): the model cannot tell them apart"
            )));
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn probabilities_are_row_softmaxes_and_top_k_ranks_them() {
        let head = ZeroShotHead {
            classes: vec!["a".into(), "b".into(), "c".into()],
            weights: Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
            scale: 1.0,
        };
        let logits = Tensor::new(&[[0f32, 2.0, 1.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let p = head.probabilities(&logits).unwrap();
        let e = [1.0f32, 2f32.exp(), 1f32.exp()];
        let sum: f32 = e.iter().sum();
        for (got, want) in p[0].iter().zip(e.iter().map(|x| x / sum)) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
        let top = head.top_k(&p[0], 2);
        assert_eq!(top.len(), 2);
        assert_eq!((top[0].0, top[0].1), (1, "b"));
        assert_eq!((top[1].0, top[1].1), (2, "c"));
        assert_eq!(head.top_k(&p[0], 0).len(), 1);
    }
}
