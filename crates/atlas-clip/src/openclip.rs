//! open_clip naming → Hugging Face naming for image-tower tensors.
//!
//! | open_clip (`model.visual.` or `visual.` prefix) | Hugging Face (`vision_model.` prefix)            |
//! |---|---|
//! | `class_embedding`                              | `embeddings.class_embedding`                     |
//! | `positional_embedding`                         | `embeddings.position_embedding.weight`           |
//! | `conv1.weight`                                 | `embeddings.patch_embedding.weight`              |
//! | `ln_pre.*`                                     | `pre_layrnorm.*`                                 |
//! | `transformer.resblocks.{i}.attn.in_proj_weight` | `encoder.layers.{i}.self_attn.{q,k,v}_proj.weight` (rows split in that order; ONE block under `QkvBlocks::Fused`) |
//! | `transformer.resblocks.{i}.attn.in_proj_bias`  | `encoder.layers.{i}.self_attn.{q,k,v}_proj.bias` |
//! | `transformer.resblocks.{i}.attn.out_proj.*`    | `encoder.layers.{i}.self_attn.out_proj.*`        |
//! | `transformer.resblocks.{i}.ln_1.*` / `ln_2.*`  | `encoder.layers.{i}.layer_norm1.*` / `layer_norm2.*` |
//! | `transformer.resblocks.{i}.mlp.c_fc.*` / `c_proj.*` | `encoder.layers.{i}.mlp.fc1.*` / `fc2.*`    |
//! | `ln_post.*`                                    | `post_layernorm.*`                               |
//! | `proj` `[D, P]`                                | `visual_projection.weight` `[P, D]` (transposed; no prefix) |
//!
//! Tensors outside the image tower (text tower, logit scale) are skipped.

use crate::manifest::VISUAL_PROJECTION;
use crate::{ClipError, Result};
use atlas_core::safetensors_io::RawTensor;
use atlas_core::task_vector::Delta;

/// True when the file uses open_clip names.
pub fn is_open_clip(tensors: &[RawTensor]) -> bool {
    tensors.iter().any(|t| strip_visual(&t.name).is_some())
}

fn strip_visual(name: &str) -> Option<&str> {
    name.strip_prefix("model.visual.")
        .or_else(|| name.strip_prefix("visual."))
}

/// Maps the image-tower tensors of an open_clip state dict to Hugging Face names.
pub fn to_hf(tensors: Vec<RawTensor>) -> Result<Vec<Delta>> {
    let mut out = Vec::new();
    for t in tensors {
        let Some(rest) = strip_visual(&t.name) else {
            continue;
        };
        if !t.is_float() {
            continue;
        }
        let rest = rest.to_string();
        out.extend(map_one(&rest, t)?);
    }
    Ok(out)
}

fn map_one(rest: &str, t: RawTensor) -> Result<Vec<Delta>> {
    let delta = |name: String, t: RawTensor| Delta {
        name,
        shape: t.shape,
        data: t.data,
    };
    let v = |s: &str| format!("vision_model.{s}");
    let simple = match rest {
        "class_embedding" => Some(v("embeddings.class_embedding")),
        "positional_embedding" => Some(v("embeddings.position_embedding.weight")),
        "conv1.weight" => Some(v("embeddings.patch_embedding.weight")),
        "ln_pre.weight" => Some(v("pre_layrnorm.weight")),
        "ln_pre.bias" => Some(v("pre_layrnorm.bias")),
        "ln_post.weight" => Some(v("post_layernorm.weight")),
        "ln_post.bias" => Some(v("post_layernorm.bias")),
        _ => None,
    };
    if let Some(name) = simple {
        return Ok(vec![delta(name, t)]);
    }
    if rest == "proj" {
        return Ok(vec![transpose(t)?]);
    }
    let Some((layer, field)) = rest
        .strip_prefix("transformer.resblocks.")
        .and_then(|r| r.split_once('.'))
    else {
        return Err(ClipError::tensor(
            &t.name,
            "is not an open_clip image-tower tensor this map knows",
        ));
    };
    let l = format!("vision_model.encoder.layers.{layer}");
    match field {
        "attn.in_proj_weight" | "attn.in_proj_bias" => split_qkv(&l, t),
        _ => {
            let hf = match field {
                "attn.out_proj.weight" => "self_attn.out_proj.weight",
                "attn.out_proj.bias" => "self_attn.out_proj.bias",
                "ln_1.weight" => "layer_norm1.weight",
                "ln_1.bias" => "layer_norm1.bias",
                "ln_2.weight" => "layer_norm2.weight",
                "ln_2.bias" => "layer_norm2.bias",
                "mlp.c_fc.weight" => "mlp.fc1.weight",
                "mlp.c_fc.bias" => "mlp.fc1.bias",
                "mlp.c_proj.weight" => "mlp.fc2.weight",
                "mlp.c_proj.bias" => "mlp.fc2.bias",
                _ => {
                    return Err(ClipError::tensor(
                        &t.name,
                        "is not an open_clip image-tower tensor this map knows",
                    ))
                }
            };
            Ok(vec![delta(format!("{l}.{hf}"), t)])
        }
    }
}

/// `in_proj_*` is q, k, v stacked along the first dimension.
fn split_qkv(layer: &str, t: RawTensor) -> Result<Vec<Delta>> {
    let rows = t.shape.first().copied().unwrap_or(0);
    if rows % 3 != 0 {
        return Err(ClipError::tensor(
            &t.name,
            format!("has shape {:?}; the first dimension must be 3·D", t.shape),
        ));
    }
    let mut shape = t.shape.clone();
    shape[0] = rows / 3;
    let n = t.data.len() / 3;
    let kind = if t.name.ends_with("weight") {
        "weight"
    } else {
        "bias"
    };
    Ok(["q_proj", "k_proj", "v_proj"]
        .iter()
        .enumerate()
        .map(|(i, p)| Delta {
            name: format!("{layer}.self_attn.{p}.{kind}"),
            shape: shape.clone(),
            data: t.data[i * n..(i + 1) * n].to_vec(),
        })
        .collect())
}

/// open_clip's `proj` is `[D, P]` (x @ proj); Hugging Face stores `[P, D]` (x @ Wᵀ).
fn transpose(t: RawTensor) -> Result<Delta> {
    let [d, p] = t.shape[..] else {
        return Err(ClipError::tensor(
            &t.name,
            format!("has shape {:?}, expected 2 dimensions", t.shape),
        ));
    };
    let mut data = vec![0.0; d * p];
    for i in 0..d {
        for j in 0..p {
            data[j * d + i] = t.data[i * p + j];
        }
    }
    Ok(Delta {
        name: VISUAL_PROJECTION.to_string(),
        shape: vec![p, d],
        data,
    })
}
