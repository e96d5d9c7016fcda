//! The text tower: token and position embeddings, causally masked pre-LN encoder layers
//! pooled at the end-of-text token, and the text projection.

use super::layers::{load_layers, EncoderLayer, LayerDims, Linear, Norm};
use super::ops::{causal_mask, repeat_rows};
use super::WeightSource;
use crate::config::TextConfig;
use crate::{ClipError, Result};
use candle_core::{DType, Tensor};

/// The text tower + text projection.
#[derive(Debug, Clone)]
pub struct TextTower {
    cfg: TextConfig,
    token: Tensor,
    position: Tensor,
    layers: Vec<EncoderLayer>,
    last: Norm,
    projection: Linear,
}

impl TextTower {
    pub fn new(cfg: &TextConfig, projection_dim: usize, src: &dyn WeightSource) -> Result<Self> {
        let d = cfg.hidden_size;
        let e = "text_model.embeddings";
        Ok(TextTower {
            cfg: cfg.clone(),
            token: src.get(&format!("{e}.token_embedding.weight"), &[cfg.vocab_size, d])?,
            position: src.get(
                &format!("{e}.position_embedding.weight"),
                &[cfg.max_position_embeddings, d],
            )?,
            layers: load_layers(
                src,
                |i| format!("text_model.encoder.layers.{i}"),
                cfg.num_hidden_layers,
                &LayerDims {
                    d,
                    m: cfg.intermediate_size,
                    heads: cfg.num_attention_heads,
                    act: cfg.hidden_act,
                    eps: cfg.layer_norm_eps,
                },
            )?,
            last: Norm::load(src, "text_model.final_layer_norm", d, cfg.layer_norm_eps)?,
            projection: Linear::new(
                src.get("text_projection.weight", &[projection_dim, d])?,
                None,
            )?
            .packed_for(src)?,
        })
    }

    /// Text embeddings (projected, not normalised) for token ids `[N, L]` (u32), padded after
    /// the end-of-text token; the causal mask keeps padding out of the pooled position.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (n, l) = ids.dims2()?;
        if l > self.cfg.max_position_embeddings {
            return Err(ClipError::Tokenizer(format!(
                "{l} tokens, the text tower takes at most {}",
                self.cfg.max_position_embeddings
            )));
        }
        let d = self.cfg.hidden_size;
        let ids = ids.to_dtype(DType::U32)?;
        let tokens = self
            .token
            .embedding(&ids.flatten_all()?)?
            .reshape((n, l, d))?;
        let mut x = repeat_rows(&tokens, &self.position.narrow(0, 0, l)?, false)?;
        let mask = causal_mask(l, x.dtype(), x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&mask))?;
        }
        x = self.last.forward(&x)?;
        let rows = self.pool_positions(&ids)?;
        let index = Tensor::from_vec(rows, n, x.device())?;
        let pooled = x.reshape((n * l, d))?.index_select(&index, 0)?;
        self.projection.forward(&pooled)
    }

    /// Flat row index (i·L + position) of each sequence's end-of-text token, as transformers
    /// picks it: the first `eos_token_id`, or the highest id under the legacy config.
    fn pool_positions(&self, ids: &Tensor) -> Result<Vec<u32>> {
        let rows = ids.to_vec2::<u32>()?;
        let l = rows.first().map_or(0, Vec::len);
        rows.iter()
            .enumerate()
            .map(|(i, row)| {
                let pos = if self.cfg.pools_at_argmax() {
                    row.iter()
                        .enumerate()
                        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)))
                        .map(|(p, _)| p)
                } else {
                    row.iter().position(|&t| t == self.cfg.eos_token_id)
                };
                let pos = pos.ok_or_else(|| {
                    ClipError::Tokenizer(format!("sequence {i} has no end-of-text token"))
                })?;
                Ok((i * l + pos) as u32)
            })
            .collect()
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }
}
