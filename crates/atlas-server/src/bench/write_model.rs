//! `atlas-serve bench write-model`: a CLIPModel directory with random weights for serving
//! benchmarks (`bench/serve_load.py`). The image tower has a named shape (B/32, B/16, L/14, as
//! `bench classify`); the text tower is small and uses the demo vocabulary, so heads built from
//! class names cost little and model time is the image tower's, as in production.

use anyhow::Context;
use atlas_clip::{ClipConfig, TextConfig};
use atlas_demo::pretrain::{Init, TinyClip};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct WriteModelArgs {
    /// Image-tower shape: B/32, B/16, L/14 (or tiny, for tests).
    #[arg(long, default_value = "B/32")]
    vision: String,
    /// Output directory (created if missing): config.json, model.safetensors, tokenizer.json.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The config: the named image tower and a 2-layer, 64-wide text tower over `vocab` words.
fn config(vision: &str, vocab: &atlas_demo::vocab::Vocab) -> anyhow::Result<ClipConfig> {
    let vision = super::common::vision_config(vision)?;
    let projection_dim = vision.projection_dim;
    let text = TextConfig {
        vocab_size: vocab.size,
        hidden_size: 64,
        intermediate_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        projection_dim,
        bos_token_id: vocab.bos,
        eos_token_id: vocab.eos,
        pad_token_id: vocab.eos,
        ..TextConfig::default()
    };
    Ok(ClipConfig {
        vision,
        text: Some(text),
        projection_dim,
    })
}

/// Writes the random-weight model for the image tower `vision` into `out`.
pub fn write_model(vision: &str, out: &Path, seed: u64) -> anyhow::Result<ClipConfig> {
    let vocab = atlas_demo::vocab::tokenizer()?;
    let cfg = config(vision, &vocab)?;
    let model = TinyClip::init(&cfg, &Init::transformers(seed))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    model.save(out, &vocab.json)?;
    Ok(cfg)
}

pub fn run(a: WriteModelArgs) -> anyhow::Result<()> {
    let cfg = write_model(&a.vision, &a.out, a.seed)?;
    let v = &cfg.vision;
    println!(
        "wrote {} (image tower {}: {}x{} px, patch {}, width {}, {} layers; text tower: demo vocabulary)",
        a.out.display(),
        a.vision,
        v.image_size,
        v.image_size,
        v.patch_size,
        v.hidden_size,
        v.num_hidden_layers
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlas_clip::{Backbone, LoadOptions, ZeroShotHead};
    use candle_core::{Device, Tensor};

    #[test]
    fn written_model_loads_and_classifies() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_model("tiny", dir.path(), 1).unwrap();
        let bb = Backbone::load(dir.path().to_str().unwrap(), LoadOptions::default()).unwrap();
        assert_eq!(bb.config, cfg);
        let classes = vec!["circle".to_string(), "square".to_string()];
        let head = ZeroShotHead::build(&bb, &classes, &["a photo of a {}."]).unwrap();
        let s = cfg.vision.image_size;
        let px = Tensor::randn(0f32, 1.0, (3, 3, s, s), &Device::Cpu).unwrap();
        let emb = bb.base_vision().unwrap().forward(&px).unwrap();
        let logits = head.logits(&emb).unwrap();
        assert_eq!(logits.dims(), &[3, 2]);
    }
}
