//! The image tower's block manifest in Hugging Face naming: every parameter tensor of
//! `vision_model.*` plus `visual_projection.weight`, in transformers' parameter order.
//!
//! With [`QkvBlocks::Fused`] each layer's q/k/v weights form one block and q/k/v biases another,
//! as open_clip's fused `in_proj_weight`/`in_proj_bias` do (152 blocks for ViT-B/32 instead of
//! 200); the tensors themselves keep their HF names.

use crate::config::VisionConfig;
use atlas_core::{Block, Manifest, TensorSpec};

pub const VISUAL_PROJECTION: &str = "visual_projection.weight";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkvBlocks {
    #[default]
    Separate,
    Fused,
}

pub fn layer_prefix(i: usize) -> String {
    format!("vision_model.encoder.layers.{i}")
}

/// One pre-LN encoder layer's tensors (image or text tower), in transformers' parameter order.
pub fn encoder_layer_tensors(l: &str, d: usize, m: usize) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
        out.push(TensorSpec::new(
            format!("{l}.self_attn.{proj}.weight"),
            &[d, d],
        ));
        out.push(TensorSpec::new(format!("{l}.self_attn.{proj}.bias"), &[d]));
    }
    out.push(TensorSpec::new(format!("{l}.layer_norm1.weight"), &[d]));
    out.push(TensorSpec::new(format!("{l}.layer_norm1.bias"), &[d]));
    out.push(TensorSpec::new(format!("{l}.mlp.fc1.weight"), &[m, d]));
    out.push(TensorSpec::new(format!("{l}.mlp.fc1.bias"), &[m]));
    out.push(TensorSpec::new(format!("{l}.mlp.fc2.weight"), &[d, m]));
    out.push(TensorSpec::new(format!("{l}.mlp.fc2.bias"), &[d]));
    out.push(TensorSpec::new(format!("{l}.layer_norm2.weight"), &[d]));
    out.push(TensorSpec::new(format!("{l}.layer_norm2.bias"), &[d]));
    out
}

/// The image-tower tensors in order, with shapes.
pub fn vision_tensors(cfg: &VisionConfig, projection_dim: usize) -> Vec<TensorSpec> {
    let (d, m, p, c) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.patch_size,
        cfg.num_channels,
    );
    let e = "vision_model.embeddings";
    let mut out = vec![
        TensorSpec::new(format!("{e}.class_embedding"), &[d]),
        TensorSpec::new(format!("{e}.patch_embedding.weight"), &[d, c, p, p]),
        TensorSpec::new(
            format!("{e}.position_embedding.weight"),
            &[cfg.num_patches() + 1, d],
        ),
        TensorSpec::new("vision_model.pre_layrnorm.weight", &[d]),
        TensorSpec::new("vision_model.pre_layrnorm.bias", &[d]),
    ];
    for i in 0..cfg.num_hidden_layers {
        out.extend(encoder_layer_tensors(&layer_prefix(i), d, m));
    }
    out.push(TensorSpec::new("vision_model.post_layernorm.weight", &[d]));
    out.push(TensorSpec::new("vision_model.post_layernorm.bias", &[d]));
    out.push(TensorSpec::new(VISUAL_PROJECTION, &[projection_dim, d]));
    out
}

/// The block manifest of the image tower.
pub fn vision_manifest(cfg: &VisionConfig, projection_dim: usize, qkv: QkvBlocks) -> Manifest {
    let specs = vision_tensors(cfg, projection_dim);
    let blocks = match qkv {
        QkvBlocks::Separate => specs.into_iter().map(Block::single).collect(),
        QkvBlocks::Fused => fuse_qkv(specs),
    };
    Manifest::new(blocks).expect("generated manifest has unique names")
}

/// Groups q, k, v (in that order, as open_clip's in_proj concatenates them) into one block per
/// layer for weights and one for biases, placed where the k weight was.
fn fuse_qkv(specs: Vec<TensorSpec>) -> Vec<Block> {
    let find = |name: &str| {
        specs
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .expect("qkv tensor")
    };
    let mut blocks = Vec::new();
    for s in &specs {
        let Some(l) = s
            .name
            .strip_suffix(".self_attn.k_proj.weight")
            .or(s.name.strip_suffix(".self_attn.k_proj.bias"))
        else {
            if !is_qkv(&s.name) {
                blocks.push(Block::single(s.clone()));
            }
            continue;
        };
        let kind = if s.name.ends_with("weight") {
            "weight"
        } else {
            "bias"
        };
        let tensors = ["q_proj", "k_proj", "v_proj"]
            .map(|p| find(&format!("{l}.self_attn.{p}.{kind}")))
            .to_vec();
        blocks.push(Block {
            name: format!("{l}.self_attn.in_proj_{kind}"),
            tensors,
        });
    }
    blocks
}

fn is_qkv(name: &str) -> bool {
    ["q_proj", "k_proj", "v_proj"]
        .iter()
        .any(|p| name.contains(&format!(".self_attn.{p}.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b32_block_counts_match_the_paper() {
        let cfg = VisionConfig::vit_b32();
        let hf = vision_manifest(&cfg, 512, QkvBlocks::Separate);
        assert_eq!(hf.len(), 200);
        let fused = vision_manifest(&cfg, 512, QkvBlocks::Fused);
        assert_eq!(fused.len(), 152);
        assert_eq!(hf.numel(), fused.numel());
        // 87.8M parameters in the ViT-B/32 image tower with its projection.
        assert_eq!(hf.numel(), 87_849_216);
        let qkv = fused
            .blocks()
            .iter()
            .find(|b| b.name.ends_with("layers.0.self_attn.in_proj_weight"))
            .unwrap();
        let names: Vec<_> = qkv
            .tensors
            .iter()
            .map(|t| t.name.rsplit('.').nth(1).unwrap())
            .collect();
        assert_eq!(names, ["q_proj", "k_proj", "v_proj"]);
    }
}
