//! The service over the demo world (ci preset): a few-shot job learned from uploaded images
//! must raise accuracy over the pre-trained model on held-out images, served over HTTP.

mod common;

use atlas_demo::tasks::Split;
use atlas_demo::{Preset, World, WorldParams};
use common::{b64, encode_png, start};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

fn accuracy(s: &common::Server, composition: &str, head: &str, images: &[(String, u32)]) -> f64 {
    let mut correct = 0;
    for chunk in images.chunks(128) {
        let encoded: Vec<&String> = chunk.iter().map(|(i, _)| i).collect();
        let (code, out) = s.post(
            "/classify",
            &json!({"composition": composition, "head": head, "images": encoded, "top_k": 1}),
        );
        assert_eq!(code, 200, "{out}");
        for ((_, label), p) in chunk.iter().zip(out["predictions"].as_array().unwrap()) {
            correct += usize::from(p[0]["label"] == head_class(s, head, *label));
        }
    }
    correct as f64 / images.len() as f64
}

fn head_class(s: &common::Server, head: &str, label: u32) -> Value {
    s.get(&format!("/heads/{head}")).1["classes"][label as usize].clone()
}

#[test]
fn few_shot_learning_over_http_beats_the_pretrained_model_on_held_out_images() {
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("atlas-cache");
    let dir = tempfile::tempdir().unwrap();
    let cache_env = cache.display().to_string();
    let s = start(
        &dir.path().join("data"),
        // The demo world by the name the CLI takes (as `learn` and `finetune` do).
        &["--model".into(), "demo:ci".into()],
        // The demo world's tensors are tiny: one thread each is faster (see `demo` command).
        &[
            ("ATLAS_CACHE", &cache_env),
            ("CANDLE_NUM_THREADS", "1"),
            ("RAYON_NUM_THREADS", "1"),
        ],
    );
    assert!(
        s.log_text().contains("demo world 'demo:ci'"),
        "{}",
        s.log_text()
    );
    // The server has built (or loaded) the world: this loads the same one from the cache.
    let params = WorldParams::preset(Preset::Ci);
    let (world, built) = World::open(
        &params,
        &cache,
        &mut atlas_demo::world::Quiet,
        &AtomicBool::new(false),
    )
    .unwrap();
    assert!(!built);
    // The task whose fine-tuning gained most: its task vector has something to give.
    let gain = |i: usize| world.report.tasks[i].finetuned - world.report.tasks[i].zero_shot;
    let (t, task) = world
        .tasks
        .iter()
        .enumerate()
        .max_by(|a, b| gain(a.0).total_cmp(&gain(b.0)))
        .unwrap();
    let classes: Vec<String> = task.spec.classes.clone();
    let (code, head) = s.post(
        "/heads",
        &json!({"classes": classes, "templates": task.spec.templates}),
    );
    assert_eq!(code, 201, "{head}");
    let head = head["id"].as_str().unwrap().to_string();

    // 16 shots per class from the training split.
    let mut shots = vec![0; classes.len()];
    let examples: Vec<Value> = task
        .split(Split::Train)
        .iter()
        .filter(|e| {
            shots[e.label as usize] += 1;
            shots[e.label as usize] <= 16
        })
        .map(|e| json!({"image": b64(&encode_png(&e.image)), "label": e.label}))
        .collect();
    let job = json!({"objective": "few_shot", "tasks": [{"name": task.spec.name, "classes": classes,
        "templates": task.spec.templates, "examples": examples}],
        // Crops and flips would change position and count labels.
        "config": {"augment": false}});
    let posted = Instant::now();
    let (code, view) = s.post("/compositions", &job);
    assert_eq!(code, 202, "{view}");
    let id = view["id"].as_str().unwrap().to_string();
    let done = s.wait_final(&id, Duration::from_secs(600));
    let servable = posted.elapsed();
    assert_eq!(done["status"], "succeeded", "{done}");

    let test: Vec<(String, u32)> = task
        .split(Split::Test)
        .iter()
        .map(|e| (b64(&encode_png(&e.image)), e.label))
        .collect();
    let base = accuracy(&s, "base", &head, &test);
    let learned = accuracy(&s, &id, &head, &test);
    eprintln!(
        "task {t} ({}): held-out accuracy base {base:.3}, few-shot composition {learned:.3}; POST to servable {:.1} s; summary {}",
        task.spec.name,
        servable.as_secs_f64(),
        done["summary"]
    );
    assert!(
        learned > base + 0.05,
        "few-shot {learned:.3} does not beat the pre-trained {base:.3} on held-out images"
    );

    // Batch-1 latency on the cached composition (debug build here: see the README for release).
    let one = json!({"composition": id, "head": head, "images": [test[0].0], "top_k": 1});
    let mut times: Vec<f64> = (0..50)
        .map(|_| {
            let t0 = Instant::now();
            assert_eq!(s.post("/classify", &one).0, 200);
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "classify batch 1, cached composition: p50 {:.2} ms, p99 {:.2} ms",
        times[25], times[49]
    );
    drop(s);

    // The demo world honours --dtype: bf16 runs on the CPU's bf16 kernel where it has one (and
    // says so), and keeps the pre-trained model's accuracy.
    let s = start(
        &dir.path().join("data-bf16"),
        &[
            "--model".into(),
            "demo:ci".into(),
            "--dtype".into(),
            "bf16".into(),
        ],
        &[
            ("ATLAS_CACHE", &cache_env),
            ("CANDLE_NUM_THREADS", "1"),
            ("RAYON_NUM_THREADS", "1"),
        ],
    );
    assert!(s.log_text().contains("bf16 on the CPU"), "{}", s.log_text());
    let (code, head) = s.post(
        "/heads",
        &json!({"classes": task.spec.classes, "templates": task.spec.templates}),
    );
    assert_eq!(code, 201, "{head}");
    let bf16_base = accuracy(&s, "base", head["id"].as_str().unwrap(), &test);
    eprintln!("held-out accuracy of the pre-trained model: f32 {base:.3}, bf16 {bf16_base:.3}");
    assert!(
        (bf16_base - base).abs() <= 0.02,
        "f32 {base:.3}, bf16 {bf16_base:.3}"
    );
}
