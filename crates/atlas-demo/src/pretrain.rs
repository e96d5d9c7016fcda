//! A tiny CLIP trained from scratch: both towers are atlas-clip's `VisionTower` / `TextTower`
//! over candle `Var`s (Hugging Face tensor names), random init as transformers'
//! `CLIPModel._init_weights`, contrastive pre-training (symmetric InfoNCE with a learnable
//! logit scale clamped at 100, as CLIP), AdamW with warm-up + cosine, and saving as a
//! `CLIPModel` directory that `Backbone::load` reads.

use crate::{DemoError, Result};
use atlas_clip::loss::log_softmax;
use atlas_clip::manifest::vision_tensors;
use atlas_clip::model::normalize;
use atlas_clip::{ClipConfig, TextConfig, TextTower, VisionConfig, VisionTower};
use atlas_core::safetensors_io::{write_file, OutTensor};
use atlas_core::TensorSpec;
use atlas_learn::optim::cosine_lr;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// CLIP's initial temperature, ln(1/0.07).
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778_4;
/// CLIP clamps the logit scale at ln(100).
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;

/// The tiny model's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelParams {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub vision_heads: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    /// MLP width as a multiple of the hidden size.
    pub mlp_ratio: usize,
    pub projection_dim: usize,
    pub max_text_len: usize,
}

impl ModelParams {
    /// The Hugging Face config for a vocabulary of `vocab` words with the given special ids.
    pub fn clip_config(&self, vocab: usize, bos: u32, eos: u32) -> ClipConfig {
        let vision = VisionConfig {
            hidden_size: self.vision_hidden,
            intermediate_size: self.vision_hidden * self.mlp_ratio,
            num_hidden_layers: self.vision_layers,
            num_attention_heads: self.vision_heads,
            num_channels: 3,
            image_size: self.image_size,
            patch_size: self.patch_size,
            projection_dim: self.projection_dim,
            ..VisionConfig::default()
        };
        let text = TextConfig {
            vocab_size: vocab,
            hidden_size: self.text_hidden,
            intermediate_size: self.text_hidden * self.mlp_ratio,
            num_hidden_layers: self.text_layers,
            num_attention_heads: self.text_heads,
            max_position_embeddings: self.max_text_len,
            projection_dim: self.projection_dim,
            bos_token_id: bos,
            eos_token_id: eos,
            pad_token_id: eos,
            ..TextConfig::default()
        };
        ClipConfig {
            vision,
            text: Some(text),
            projection_dim: self.projection_dim,
        }
    }
}

/// Pre-training settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainParams {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    /// Initial ln(logit scale); CLIP's is ln(1/0.07).
    pub logit_scale_init: f64,
    /// Learning-rate multiplier of the text tower. Below 1 the text tower's random word
    /// directions move slowly and act like fixed targets while the image tower finds the
    /// harder attributes (texture, shape, position, digits); at 1 it tends to collapse words
    /// the image tower does not separate yet, and those attributes are never learned.
    pub text_lr_scale: f64,
    /// Std of the image tower's initial position embeddings (transformers uses 0.02; larger
    /// lets a tiny ViT use patch positions within a few hundred steps). The text tower keeps
    /// 0.02.
    pub position_init_std: f64,
}

impl PretrainParams {
    pub fn init(&self, seed: u64) -> Init {
        Init {
            seed,
            logit_scale: self.logit_scale_init,
            position_std: self.position_init_std,
        }
    }
}

/// The text tower's tensors in order, with shapes (Hugging Face names).
pub fn text_tensors(cfg: &TextConfig, projection_dim: usize) -> Vec<TensorSpec> {
    let (d, m) = (cfg.hidden_size, cfg.intermediate_size);
    let e = "text_model.embeddings";
    let mut out = vec![
        TensorSpec::new(format!("{e}.token_embedding.weight"), &[cfg.vocab_size, d]),
        TensorSpec::new(
            format!("{e}.position_embedding.weight"),
            &[cfg.max_position_embeddings, d],
        ),
    ];
    for i in 0..cfg.num_hidden_layers {
        let l = format!("text_model.encoder.layers.{i}");
        out.extend(atlas_clip::manifest::encoder_layer_tensors(&l, d, m));
    }
    out.push(TensorSpec::new("text_model.final_layer_norm.weight", &[d]));
    out.push(TensorSpec::new("text_model.final_layer_norm.bias", &[d]));
    out.push(TensorSpec::new(
        "text_projection.weight",
        &[projection_dim, d],
    ));
    out
}

/// How transformers initialises a CLIP tensor: Some(std) for a normal draw, None for a
/// constant (1 for LayerNorm scales, 0 for biases).
fn init_std(name: &str, shape: &[usize], layers: usize, position: f64) -> Option<f64> {
    let d = *shape.last().unwrap_or(&1) as f64;
    let depth = (2.0 * layers as f64).powf(-0.5);
    let norm = ["layer_norm", "layernorm", "layrnorm"]
        .iter()
        .any(|k| name.contains(k));
    if norm || name.ends_with(".bias") {
        return None;
    }
    Some(if name.ends_with("class_embedding") {
        d.powf(-0.5)
    } else if name.starts_with("vision_model") && name.contains("position_embedding") {
        position
    } else if name.contains("embedding") {
        0.02
    } else if name.contains("q_proj") || name.contains("k_proj") || name.contains("v_proj") {
        d.powf(-0.5) * depth
    } else if name.contains("out_proj") {
        d.powf(-0.5)
    } else if name.contains("fc1") {
        (2.0 * d).powf(-0.5)
    } else if name.contains("fc2") {
        // fc2's input is the MLP width; transformers scales by the hidden size.
        (shape[0] as f64).powf(-0.5) * depth
    } else {
        // Projections.
        d.powf(-0.5)
    })
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box–Muller; u1 is kept away from 0 so ln stays finite.
    let u1: f64 = rng.gen::<f64>().max(1e-12);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn init_tensor(
    spec: &TensorSpec,
    layers: usize,
    init: &Init,
    rng: &mut ChaCha8Rng,
) -> Result<Tensor> {
    let n = spec.numel();
    let data: Vec<f32> = match init_std(&spec.name, &spec.shape, layers, init.position_std) {
        Some(std) => (0..n).map(|_| normal(rng) * std as f32).collect(),
        None if spec.name.ends_with(".weight") => vec![1.0; n],
        None => vec![0.0; n],
    };
    Ok(Tensor::from_vec(data, spec.shape.as_slice(), &Device::Cpu)?)
}

/// Random-init settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Init {
    pub seed: u64,
    /// ln(logit scale).
    pub logit_scale: f64,
    /// Std of the image tower's position embeddings.
    pub position_std: f64,
}

impl Init {
    /// transformers' init with `seed`.
    pub fn transformers(seed: u64) -> Self {
        Init {
            seed,
            logit_scale: LOGIT_SCALE_INIT,
            position_std: 0.02,
        }
    }
}

/// A trainable tiny CLIP: every tensor a `Var`, plus the logit scale.
pub struct TinyClip {
    pub config: ClipConfig,
    vars: Vec<(String, Var)>,
    logit_scale: Var,
}

impl TinyClip {
    /// Random weights, deterministic for `seed`.
    pub fn init(config: &ClipConfig, init: &Init) -> Result<Self> {
        let text = config
            .text
            .as_ref()
            .ok_or_else(|| DemoError::Invalid("the tiny CLIP needs a text config".into()))?;
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(init.seed);
        let mut vars = Vec::new();
        let towers = [
            (
                vision_tensors(&config.vision, config.projection_dim),
                config.vision.num_hidden_layers,
            ),
            (
                text_tensors(text, config.projection_dim),
                text.num_hidden_layers,
            ),
        ];
        for (specs, layers) in towers {
            for spec in specs {
                let t = init_tensor(&spec, layers, init, &mut rng)?;
                vars.push((spec.name, Var::from_tensor(&t)?));
            }
        }
        let logit_scale = Var::from_tensor(&Tensor::new(init.logit_scale as f32, &Device::Cpu)?)?;
        Ok(TinyClip {
            config: config.clone(),
            vars,
            logit_scale,
        })
    }

    /// The weights as tensors that share the vars (gradients reach the vars).
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    pub fn towers(&self) -> Result<(VisionTower, TextTower)> {
        let w = self.weights();
        let text_cfg = self.config.text.as_ref().expect("checked in init");
        let vision = VisionTower::new(&self.config.vision, Some(self.config.projection_dim), &w)?;
        let text = TextTower::new(text_cfg, self.config.projection_dim, &w)?;
        Ok((vision, text))
    }

    pub fn logit_scale(&self) -> f32 {
        self.logit_scale
            .as_tensor()
            .to_scalar::<f32>()
            .unwrap_or(LOGIT_SCALE_INIT as f32)
    }

    /// Image-to-text logits `[B_img, B_txt]`: exp(logit_scale) · cosine similarity.
    pub fn logits(&self, pixels: &Tensor, ids: &Tensor) -> Result<Tensor> {
        let (vision, text) = self.towers()?;
        let img = normalize(&vision.forward(pixels)?)?;
        let txt = normalize(&text.forward(ids)?)?;
        let sims = img.matmul(&txt.t()?)?;
        Ok(sims.broadcast_mul(&self.logit_scale.as_tensor().exp()?)?)
    }

    /// Writes `config.json`, `model.safetensors` (f32, Hugging Face names) and `tokenizer.json`
    /// into `dir`, which must exist.
    pub fn save(&self, dir: &Path, tokenizer_json: &str) -> Result<()> {
        let mut tensors = Vec::with_capacity(self.vars.len() + 1);
        for (name, var) in self
            .vars
            .iter()
            .chain([&("logit_scale".to_string(), self.logit_scale.clone())])
        {
            let data: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
            tensors.push(OutTensor {
                name: name.clone(),
                dtype: safetensors::Dtype::F32,
                shape: var.dims().to_vec(),
                bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            });
        }
        let md = HashMap::from([("format".to_string(), "pt".to_string())]);
        write_file(&dir.join("model.safetensors"), &tensors, md)?;
        let config = hf_config_json(&self.config)?;
        write_text(&dir.join("config.json"), &config)?;
        write_text(&dir.join("tokenizer.json"), tokenizer_json)
    }

    /// Parameter groups `(vars, lr multiplier, weight decay)`: per tower, matrices get weight
    /// decay and gains, biases and the class embedding none (as CLIP trains); the logit scale
    /// goes with the image tower's undecayed group.
    fn param_groups(&self, p: &PretrainParams) -> Vec<(Vec<Var>, f64, f64)> {
        let mut groups = vec![
            (Vec::new(), 1.0, p.weight_decay),
            (vec![self.logit_scale.clone()], 1.0, 0.0),
            (Vec::new(), p.text_lr_scale, p.weight_decay),
            (Vec::new(), p.text_lr_scale, 0.0),
        ];
        for (name, v) in &self.vars {
            let text = name.starts_with("text_");
            let g = 2 * usize::from(text) + usize::from(v.rank() < 2);
            groups[g].0.push(v.clone());
        }
        groups
    }

    fn clamp_logit_scale(&self) -> Result<()> {
        let s = self.logit_scale.as_tensor().clamp(0.0, LOGIT_SCALE_MAX)?;
        Ok(self.logit_scale.set(&s)?)
    }
}

pub fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| DemoError::file(path, e))
}

/// `config.json` of a Hugging Face `CLIPModel`.
pub fn hf_config_json(cfg: &ClipConfig) -> Result<String> {
    let err = |e: serde_json::Error| DemoError::Invalid(format!("config.json: {e}"));
    let mut text = serde_json::to_value(cfg.text.as_ref().expect("text config")).map_err(err)?;
    text["model_type"] = "clip_text_model".into();
    let mut vision = serde_json::to_value(&cfg.vision).map_err(err)?;
    vision["model_type"] = "clip_vision_model".into();
    let doc = serde_json::json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.projection_dim,
        "logit_scale_init_value": LOGIT_SCALE_INIT,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
        "text_config": text,
        "vision_config": vision,
    });
    serde_json::to_string_pretty(&doc).map_err(err)
}

/// One pre-training batch: pixels `[B, 3, S, S]`, token ids `[M, L]` of M captions (several
/// per image) and soft targets `[B, M]` where `targets[i·M + j] = 1` when caption j is true of
/// image i.
pub struct Batch {
    pub pixels: Tensor,
    pub ids: Tensor,
    pub targets: Vec<f32>,
}

/// Symmetric InfoNCE over image-to-caption logits `[B, M]` with multi-positive soft targets:
/// a caption that is also true of another image in the batch (a short caption often is) is
/// not pushed away from it. Each image row and each caption column must have a positive.
pub fn contrastive_loss(logits: &Tensor, targets: &[f32]) -> Result<Tensor> {
    let (b, m) = logits.dims2()?;
    let t = Tensor::from_slice(targets, (b, m), logits.device())?;
    let soft = |t: &Tensor| -> Result<Tensor> { Ok(t.broadcast_div(&t.sum_keepdim(1)?)?) };
    let i2t = (soft(&t)? * log_softmax(logits)?)?.sum_all()?;
    let tt = t.t()?.contiguous()?;
    let t2i = (soft(&tt)? * log_softmax(&logits.t()?.contiguous()?)?)?.sum_all()?;
    let i2t = (i2t / (-(b as f64)))?;
    let t2i = (t2i / (-(m as f64)))?;
    Ok(((i2t + t2i)? * 0.5)?)
}

/// Reported after every pre-training step.
#[derive(Debug, Clone, Copy)]
pub struct PretrainStep {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub lr: f64,
    pub logit_scale: f32,
}

/// Trains `model` for `params.steps` steps on batches from `next_batch`. Returns the mean loss
/// of the last tenth of the steps. `cancelled` is polled before every step.
pub fn pretrain(
    model: &TinyClip,
    params: &PretrainParams,
    next_batch: &mut dyn FnMut(usize) -> Result<Batch>,
    progress: &mut dyn FnMut(&PretrainStep),
    cancelled: &dyn Fn() -> bool,
) -> Result<f32> {
    let mut opts = Vec::new();
    for (vars, mult, wd) in model.param_groups(params) {
        let config = ParamsAdamW {
            lr: params.lr * mult,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: wd,
        };
        opts.push((AdamW::new(vars, config)?, mult));
    }
    let tail = (params.steps / 10).max(1);
    let mut tail_sum = 0.0;
    for step in 0..params.steps {
        if cancelled() {
            return Err(DemoError::Cancelled);
        }
        let lr = cosine_lr(params.lr, step, params.steps, params.warmup_steps);
        let batch = next_batch(params.batch_size)?;
        let loss = contrastive_loss(&model.logits(&batch.pixels, &batch.ids)?, &batch.targets)?;
        let grads = loss.backward()?;
        for (opt, mult) in &mut opts {
            opt.set_learning_rate(lr * *mult);
            opt.step(&grads)?;
        }
        model.clamp_logit_scale()?;
        let loss = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if step + tail >= params.steps {
            tail_sum += loss;
        }
        progress(&PretrainStep {
            step: step + 1,
            steps: params.steps,
            loss,
            lr,
            logit_scale: model.logit_scale(),
        });
    }
    Ok(tail_sum / tail.min(params.steps.max(1)) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ClipConfig {
        ModelParams {
            image_size: 16,
            patch_size: 8,
            vision_hidden: 16,
            vision_layers: 1,
            vision_heads: 2,
            text_hidden: 16,
            text_layers: 1,
            text_heads: 2,
            mlp_ratio: 2,
            projection_dim: 8,
            max_text_len: 8,
        }
        .clip_config(12, 10, 11)
    }

    #[test]
    fn init_is_deterministic_and_follows_transformers() {
        let a = TinyClip::init(&tiny(), &Init::transformers(1)).unwrap();
        let b = TinyClip::init(&tiny(), &Init::transformers(1)).unwrap();
        let c = TinyClip::init(&tiny(), &Init::transformers(2)).unwrap();
        let get = |m: &TinyClip, n: &str| -> Vec<f32> {
            m.weights()[n].flatten_all().unwrap().to_vec1().unwrap()
        };
        let n = "vision_model.encoder.layers.0.mlp.fc1.weight";
        assert_eq!(get(&a, n), get(&b, n));
        assert_ne!(get(&a, n), get(&c, n));
        assert!(get(&a, "text_model.final_layer_norm.weight")
            .iter()
            .all(|&x| x == 1.0));
        assert!(get(&a, "vision_model.pre_layrnorm.bias")
            .iter()
            .all(|&x| x == 0.0));
        assert!(get(&a, "vision_model.post_layernorm.weight")
            .iter()
            .all(|&x| x == 1.0));
        let tok = get(&a, "text_model.embeddings.token_embedding.weight");
        let std = (tok.iter().map(|x| x * x).sum::<f32>() / tok.len() as f32).sqrt();
        assert!((0.014..0.026).contains(&std), "{std}");
    }

    #[test]
    fn loss_with_identity_targets_is_infonce() {
        let logits = Tensor::new(&[[2.0f32, 0.0], [1.0, 3.0]], &Device::Cpu).unwrap();
        let l = contrastive_loss(&logits, &[1.0, 0.0, 0.0, 1.0]).unwrap();
        let lse = |a: f32, b: f32| (a.exp() + b.exp()).ln();
        let i2t = (lse(2.0, 0.0) - 2.0) + (lse(1.0, 3.0) - 3.0);
        let t2i = (lse(2.0, 1.0) - 2.0) + (lse(0.0, 3.0) - 3.0);
        let want = (i2t + t2i) / 4.0;
        assert!((l.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
    }
}
