//! Tuning aid for the world's pre-training: trains a preset's tiny CLIP (optionally with a JSON
//! patch of its parameters) and prints zero-shot accuracy on every task's val split as it goes.
//!
//! `CANDLE_NUM_THREADS=1 cargo run --release -p atlas-demo --example tune -- ci \
//!     '{"pretrain":{"steps":500}}' 100`  (preset, patch, report every N steps).
//! With `DEBUG_TASK=<index>` it also prints that task's confusion matrix and the cosine
//! similarities between its head's class embeddings at the end.

use atlas_clip::model::normalize;
use atlas_clip::tokenizer::ClipTokenizer;
use atlas_demo::pretrain::{pretrain, TinyClip};
use atlas_demo::world::{labels, pixels, task_data, CaptionSampler, WorldParams};
use atlas_demo::{vocab, Preset};
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() {
    let preset = Preset::parse(&std::env::args().nth(1).unwrap_or("ci".into())).unwrap();
    let mut params = WorldParams::preset(preset);
    if let Some(j) = std::env::args().nth(2) {
        let mut v = serde_json::to_value(&params).unwrap();
        let patch: serde_json::Value = serde_json::from_str(&j).unwrap();
        merge(&mut v, &patch);
        params = serde_json::from_value(v).unwrap();
    }
    let every: usize = std::env::args()
        .nth(3)
        .map(|s| s.parse().unwrap())
        .unwrap_or(100);
    let v = vocab::tokenizer().unwrap();
    let tok = ClipTokenizer::from_bytes(v.json.as_bytes())
        .unwrap()
        .with_max_len(params.model.max_text_len);
    let cfg = params.model.clip_config(v.size, v.bos, v.eos);
    let model = TinyClip::init(&cfg, &params.pretrain.init(params.seed)).unwrap();
    let tasks = task_data(&params).unwrap();
    let evals: Vec<_> = tasks
        .iter()
        .map(|t| (t.spec.clone(), pixels(&params, &t.val), labels(&t.val)))
        .collect();
    let mut sampler = CaptionSampler::new(&params).unwrap();
    let mut next = |n| sampler.batch(n, &tok);
    let t0 = Instant::now();
    let mut prog = |s: &atlas_demo::pretrain::PretrainStep| {
        if s.step.is_multiple_of(every) || s.step == s.steps {
            let accs: Vec<String> = evals
                .iter()
                .map(|(spec, px, y)| {
                    format!("{} {:.0}", spec.name, 100.0 * zs(&model, &tok, spec, px, y))
                })
                .collect();
            eprintln!(
                "[{:.0}s] step {} loss {:.3} scale {:.1} | {}",
                t0.elapsed().as_secs_f64(),
                s.step,
                s.loss,
                s.logit_scale.exp(),
                accs.join(" ")
            );
        }
    };
    pretrain(&model, &params.pretrain, &mut next, &mut prog, &|| false).unwrap();
    if let Ok(t) = std::env::var("DEBUG_TASK") {
        let i: usize = t.parse().unwrap();
        let (spec, px, y) = &evals[i];
        let (vis, txt) = model.towers().unwrap();
        let head = head_of(&txt, &tok, spec);
        eprintln!("head cos:\n{}", head.matmul(&head.t().unwrap()).unwrap());
        let pred = predict(&vis, &head, px);
        let c = spec.classes.len();
        let mut m = vec![vec![0; c]; c];
        for (p, l) in pred.iter().zip(y.iter()) {
            m[*l as usize][*p as usize] += 1;
        }
        for (k, row) in m.iter().enumerate() {
            eprintln!("{:>22} {:?}", spec.classes[k], row);
        }
    }
}

/// Unit class embeddings of a task's head (templates averaged, as `ZeroShotHead`).
fn head_of(
    txt: &atlas_clip::TextTower,
    tok: &ClipTokenizer,
    spec: &atlas_demo::tasks::TaskSpec,
) -> Tensor {
    let rows: Vec<Tensor> = spec
        .classes
        .iter()
        .map(|c| {
            let texts: Vec<String> = spec.templates.iter().map(|t| t.replace("{}", c)).collect();
            let e = normalize(
                &txt.forward(&tok.encode_padded(&texts, &Device::Cpu).unwrap())
                    .unwrap(),
            )
            .unwrap();
            normalize(&e.mean_keepdim(0).unwrap())
                .unwrap()
                .squeeze(0)
                .unwrap()
                .detach()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}
/// Zero-shot accuracy of the model being trained on one task's examples.
fn zs(
    m: &TinyClip,
    tok: &ClipTokenizer,
    spec: &atlas_demo::tasks::TaskSpec,
    px: &[Vec<f32>],
    y: &[u32],
) -> f64 {
    let (vis, txt) = m.towers().unwrap();
    let head = head_of(&txt, tok, spec);
    let pred = predict(&vis, &head, px);
    pred.iter().zip(y).filter(|(a, b)| a == b).count() as f64 / y.len() as f64
}

/// Arg-max class of each image under a head of unit class embeddings.
fn predict(vis: &atlas_clip::VisionTower, head: &Tensor, px: &[Vec<f32>]) -> Vec<u32> {
    let s = ((px[0].len() / 3) as f64).sqrt() as usize;
    let x = Tensor::from_vec(px.concat(), (px.len(), 3, s, s), &Device::Cpu).unwrap();
    let img = normalize(&vis.forward(&x).unwrap()).unwrap();
    img.matmul(&head.t().unwrap())
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Overwrites `a` with `b` recursively (a JSON merge patch without deletions).
fn merge(a: &mut serde_json::Value, b: &serde_json::Value) {
    match (a, b) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v)
            }
        }
        (a, b) => *a = b.clone(),
    }
}
