//! CLIP configuration, parsed from Hugging Face `config.json` (full `CLIPModel` or a
//! vision-only `CLIPVisionModel`), with the transformers defaults for absent fields.

use crate::{ClipError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
}

impl Default for VisionConfig {
    /// ViT-B/32, the transformers default.
    fn default() -> Self {
        VisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 512,
        }
    }
}

impl VisionConfig {
    pub fn vit_b32() -> Self {
        Self::default()
    }
    pub fn vit_b16() -> Self {
        VisionConfig {
            patch_size: 16,
            ..Self::default()
        }
    }
    pub fn vit_l14() -> Self {
        VisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            projection_dim: 768,
            ..Self::default()
        }
    }
    pub fn num_patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
    pub fn validate(&self) -> Result<()> {
        check_heads("vision", self.hidden_size, self.num_attention_heads)?;
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(ClipError::Config(format!(
                "vision image_size {} is not a multiple of patch_size {}",
                self.image_size, self.patch_size
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub projection_dim: usize,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            projection_dim: 512,
            bos_token_id: 49406,
            eos_token_id: 49407,
            pad_token_id: 1,
        }
    }
}

impl TextConfig {
    /// transformers' legacy rule: configs with `eos_token_id == 2` pool at the highest token id
    /// (the real end-of-text token has the largest id in the OpenAI vocabulary).
    pub fn pools_at_argmax(&self) -> bool {
        self.eos_token_id == 2
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "gelu")]
    Gelu,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vision: VisionConfig,
    /// None for a vision-only checkpoint.
    pub text: Option<TextConfig>,
    pub projection_dim: usize,
}

#[derive(Deserialize)]
struct RawFull {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    projection_dim: Option<usize>,
    #[serde(default)]
    text_config: Option<TextConfig>,
    #[serde(default)]
    vision_config: Option<VisionConfig>,
}

impl ClipConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ClipError::file(path, e))?;
        Self::from_json(&text).map_err(|e| ClipError::file(path, e))
    }

    /// Parses a `CLIPModel` (`model_type: "clip"`) or `CLIPVisionModel`
    /// (`model_type: "clip_vision_model"`) config.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawFull =
            serde_json::from_str(text).map_err(|e| ClipError::Config(e.to_string()))?;
        let cfg = match raw.model_type.as_deref() {
            Some("clip") => {
                let vision = raw.vision_config.unwrap_or_default();
                let text = raw.text_config.unwrap_or_default();
                let projection_dim = raw.projection_dim.unwrap_or(512);
                ClipConfig { vision, text: Some(text), projection_dim }
            }
            Some("clip_vision_model") => {
                let vision: VisionConfig =
                    serde_json::from_str(text).map_err(|e| ClipError::Config(e.to_string()))?;
                let projection_dim = vision.projection_dim;
                ClipConfig { vision, text: None, projection_dim }
            }
            Some(other) => {
                return Err(ClipError::Config(format!(
                    "model_type {other:?} is not a CLIP model (expected \"clip\" or \"clip_vision_model\")"
                )))
            }
            None => return Err(ClipError::Config("no model_type: not a Hugging Face CLIP config".into())),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        if let Some(t) = &self.text {
            check_heads("text", t.hidden_size, t.num_attention_heads)?;
        }
        Ok(())
    }
}

fn check_heads(tower: &str, hidden: usize, heads: usize) -> Result<()> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(ClipError::Config(format!(
            "{tower} hidden_size {hidden} is not divisible by num_attention_heads {heads}"
        )));
    }
    Ok(())
}
