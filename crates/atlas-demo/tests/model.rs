//! The tiny CLIP: saved as a Hugging Face CLIPModel directory that `Backbone::load` reads, and
//! the loaded model reproduces the in-memory logits.

use atlas_clip::heads::encode_texts;
use atlas_clip::model::normalize;
use atlas_clip::{Backbone, ClipConfig, LoadOptions};
use atlas_demo::pretrain::{pretrain, Init, ModelParams, PretrainParams, TinyClip};
use atlas_demo::world::CaptionSampler;
use atlas_demo::{vocab, Preset, WorldParams};
use candle_core::Tensor;

fn tiny(v: &vocab::Vocab) -> ClipConfig {
    ModelParams {
        image_size: 32,
        patch_size: 8,
        vision_hidden: 16,
        vision_layers: 1,
        vision_heads: 2,
        text_hidden: 16,
        text_layers: 1,
        text_heads: 2,
        mlp_ratio: 2,
        projection_dim: 8,
        max_text_len: 32,
    }
    .clip_config(v.size, v.bos, v.eos)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn saved_model_loads_and_reproduces_logits() {
    let v = vocab::tokenizer().unwrap();
    let model = TinyClip::init(&tiny(&v), &Init::transformers(3)).unwrap();
    let tok = atlas_clip::tokenizer::ClipTokenizer::from_bytes(v.json.as_bytes()).unwrap();
    let mut sampler = CaptionSampler::new(&WorldParams::preset(Preset::Ci)).unwrap();
    // A few steps so the weights are not the init.
    let params = PretrainParams {
        steps: 3,
        batch_size: 8,
        lr: 1e-2,
        weight_decay: 0.1,
        warmup_steps: 1,
        logit_scale_init: 2.0,
        text_lr_scale: 1.0,
        position_init_std: 0.02,
    };
    let mut next = |n| sampler.batch(n, &tok);
    pretrain(&model, &params, &mut next, &mut |_| {}, &|| false).unwrap();
    let batch = sampler.batch(6, &tok).unwrap();
    let want = model.logits(&batch.pixels, &batch.ids).unwrap();

    let dir = tempfile::tempdir().unwrap();
    model.save(dir.path(), &v.json).unwrap();
    let bb = Backbone::load(dir.path().to_str().unwrap(), LoadOptions::default()).unwrap();
    assert_eq!(bb.config, model.config);
    assert_eq!(bb.config.text.as_ref().unwrap().eos_token_id, v.eos);
    let img = normalize(&bb.base_vision().unwrap().forward(&batch.pixels).unwrap()).unwrap();
    let txt = normalize(&bb.text().unwrap().forward(&batch.ids).unwrap()).unwrap();
    let got = (img.matmul(&txt.t().unwrap()).unwrap() * bb.logit_scale().exp()).unwrap();
    assert!(max_diff(&got, &want) < 1e-4, "{}", max_diff(&got, &want));
    assert!((bb.logit_scale() as f32 - model.logit_scale()).abs() < 1e-6);

    // The saved tokenizer gives the same text embeddings as the in-memory one.
    let texts = vec![
        "a photo of a red circle.".to_string(),
        "the digit seven.".to_string(),
    ];
    let ids = tok
        .encode_padded(&texts, &candle_core::Device::Cpu)
        .unwrap();
    let (_, text) = model.towers().unwrap();
    let d = max_diff(
        &encode_texts(&bb, &texts).unwrap(),
        &text.forward(&ids).unwrap(),
    );
    assert!(d < 1e-5, "{d}");
}

#[test]
fn config_json_is_a_hugging_face_clip_config() {
    let v = vocab::tokenizer().unwrap();
    let cfg = tiny(&v);
    let text = atlas_demo::pretrain::hf_config_json(&cfg).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["model_type"], "clip");
    assert_eq!(json["text_config"]["hidden_act"], "quick_gelu");
    assert_eq!(json["vision_config"]["hidden_act"], "quick_gelu");
    assert_eq!(json["text_config"]["eos_token_id"], v.eos);
    assert_eq!(ClipConfig::from_json(&text).unwrap(), cfg);
}
