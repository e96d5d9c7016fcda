//! The HTTP service end to end: the real binary on loopback over the tiny fixture CLIP and two
//! open_clip-named task vectors; predictions checked against atlas-clip computed directly.

use atlas_clip::preprocess::Preprocess;
use atlas_clip::{templates, Backbone, LoadOptions, ZeroShotHead};
use atlas_core::{Coefficients, Layout, StoreDType};
use base64::Engine as _;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

const TVS: [&str; 2] = [
    "delta_c_openclip.safetensors",
    "delta_a_openclip_with_proj.safetensors",
];

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atlas-serve"));
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--model",
        fixtures().join("clip").to_str().unwrap(),
        "--store",
        "f32",
    ]);
    for tv in TVS {
        cmd.args(["--tv", fixtures().join(tv).to_str().unwrap()]);
    }
    let server = Server {
        child: cmd.spawn().unwrap(),
        base: format!("http://127.0.0.1:{port}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::blocking::get(format!("{}/healthz", server.base)).is_err() {
        assert!(Instant::now() < deadline, "server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(40, 36, |x, y| {
        image::Rgb([
            (x * 5) as u8 ^ seed,
            (y * 7) as u8,
            seed.wrapping_mul(3) ^ (x + y) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn post(s: &Server, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::blocking::Client::new()
        .post(format!("{}{path}", s.base))
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn get(s: &Server, path: &str) -> (u16, Value) {
    let r = reqwest::blocking::get(format!("{}{path}", s.base)).unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

const CLASSES: [&str; 4] = ["red circle", "blue square", "green forest", "dog toy"];

/// Class probabilities computed without the server.
fn direct(coefs: Option<&Coefficients>, images: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let bb = Backbone::load(
        fixtures().join("clip").to_str().unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    let tvs: Vec<_> = TVS
        .iter()
        .map(|t| {
            Arc::new(
                bb.load_task_vector(&fixtures().join(t), None, StoreDType::F32)
                    .unwrap(),
            )
        })
        .collect();
    let tower = match coefs {
        Some(c) => bb.composed_vision(&tvs, c).unwrap(),
        None => bb.base_vision().unwrap(),
    };
    let classes: Vec<String> = CLASSES.iter().map(|s| s.to_string()).collect();
    let head = ZeroShotHead::build(&bb, &classes, templates::default_templates()).unwrap();
    let pre = Preprocess::from_config(32);
    let px: Vec<Vec<f32>> = images.iter().map(|b| pre.from_bytes(b).unwrap()).collect();
    let logits = head
        .logits(
            &tower
                .forward(&pre.batch(&px, bb.device()).unwrap())
                .unwrap(),
        )
        .unwrap();
    let lp = atlas_clip::loss::log_softmax(&logits).unwrap();
    lp.exp().unwrap().to_vec2().unwrap()
}

fn check_against(preds: &Value, want: &[Vec<f32>]) {
    for (row, probs) in preds.as_array().unwrap().iter().zip(want) {
        let top = &row[0];
        let class = CLASSES
            .iter()
            .position(|c| *c == top["class"].as_str().unwrap())
            .unwrap();
        let best = probs.iter().cloned().fold(f32::MIN, f32::max);
        assert!((probs[class] - best).abs() < 1e-6, "top-1 differs");
        assert!((top["score"].as_f64().unwrap() as f32 - best).abs() < 1e-5);
    }
}

#[test]
fn classify_compose_learn_and_refuse_bad_input() {
    let s = start();
    let images: Vec<Vec<u8>> = (0..3).map(png).collect();
    let encoded: Vec<String> = images.iter().map(|b| b64(b)).collect();

    let (code, tvs) = get(&s, "/task-vectors");
    assert_eq!(code, 200);
    assert_eq!(tvs["task_vectors"].as_array().unwrap().len(), 2);
    let n_blocks = tvs["blocks"].as_u64().unwrap() as usize;

    // The pre-trained model.
    let (code, out) = post(
        &s,
        "/classify",
        &json!({"classes": CLASSES, "images": encoded, "top_k": 2}),
    );
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["predictions"][0].as_array().unwrap().len(), 2);
    check_against(&out["predictions"], &direct(None, &images));

    // An explicit per-block composition.
    let values: Vec<f64> = (0..2 * n_blocks)
        .map(|i| ((i * 37 % 11) as f64 - 4.0) * 0.5)
        .collect();
    let (code, comp) = post(
        &s,
        "/compositions",
        &json!({"kind": "explicit", "task_vectors": ["delta_c_openclip", "delta_a_openclip_with_proj"], "layout": {"kind": "per_block"}, "values": values}),
    );
    assert_eq!(code, 201, "{comp}");
    let id = comp["id"].as_str().unwrap().to_string();
    let (code, out) = post(
        &s,
        "/classify",
        &json!({"composition": id, "classes": CLASSES, "images": encoded}),
    );
    assert_eq!(code, 200, "{out}");
    let coefs = Coefficients::new(Layout::PerBlock, 2, n_blocks, values).unwrap();
    check_against(&out["predictions"], &direct(Some(&coefs), &images));

    // Bad input: a 4xx that says what was wrong.
    let bad = |body: Value, path: &str, code: u16, needle: &str| {
        let (c, v) = post(&s, path, &body);
        assert_eq!(c, code, "{body} -> {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains(needle),
            "{v} lacks {needle:?}"
        );
    };
    bad(
        json!({"classes": CLASSES, "images": ["%%%"]}),
        "/classify",
        400,
        "image 0",
    );
    bad(
        json!({"classes": CLASSES, "images": [b64(b"not an image")]}),
        "/classify",
        400,
        "image 0",
    );
    bad(
        json!({"classes": [], "images": encoded}),
        "/classify",
        400,
        "class names",
    );
    bad(
        json!({"classes": CLASSES, "images": encoded, "top_k": 0}),
        "/classify",
        400,
        "top_k",
    );
    bad(
        json!({"classes": CLASSES, "images": encoded, "templates": ["no placeholder"]}),
        "/classify",
        400,
        "{}",
    );
    bad(
        json!({"classes": CLASSES, "images": encoded, "templates": "NoSuchSet"}),
        "/classify",
        400,
        "NoSuchSet",
    );
    bad(
        json!({"composition": "c999", "classes": CLASSES, "images": encoded}),
        "/classify",
        404,
        "c999",
    );
    bad(
        json!({"kind": "explicit", "task_vectors": ["nope"], "layout": {"kind": "isotropic"}, "values": [1.0]}),
        "/compositions",
        404,
        "nope",
    );
    bad(
        json!({"kind": "explicit", "task_vectors": ["delta_c_openclip"], "layout": {"kind": "per_block"}, "values": [1.0]}),
        "/compositions",
        400,
        "expected",
    );
    bad(
        json!({"classes": "not a list"}),
        "/classify",
        400,
        "classes",
    );
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/classify", s.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.json::<Value>().unwrap()["error"].is_string());

    // A learning job: queued, then ready with a summary, then servable.
    let examples: Vec<Value> = (0..12)
        .map(|i| json!({"image": b64(&png(i as u8 * 20)), "label": i % 4}))
        .collect();
    let job = json!({"kind": "learn", "objective": "few_shot", "task_vectors": ["delta_c_openclip", "delta_a_openclip_with_proj"],
        "tasks": [{"classes": CLASSES, "examples": examples}], "config": {"epochs": 2, "batch_size": 4}});
    let (code, view) = post(&s, "/compositions", &job);
    assert_eq!(code, 202, "{view}");
    let id = view["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let (_, v) = get(&s, &format!("/compositions/{id}"));
        if v["status"] == "ready" || v["status"] == "failed" {
            break v;
        }
        assert!(Instant::now() < deadline, "job did not finish: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["status"], "ready", "{done}");
    assert_eq!(done["summary"]["metric"], "accuracy");
    assert_eq!(done["progress"]["kind"], "finished");
    let (code, out) = post(
        &s,
        "/classify",
        &json!({"composition": id, "classes": CLASSES, "images": encoded}),
    );
    assert_eq!(code, 200, "{out}");
    // A learning job with a label out of range is refused up front.
    let wrong = json!({"kind": "learn", "objective": "few_shot", "task_vectors": ["delta_c_openclip"],
        "tasks": [{"classes": CLASSES, "examples": [{"image": encoded[0], "label": 9}]}]});
    bad(wrong, "/compositions", 400, "out of range");

    // DELETE removes a finished composition; a long job is cancelled and ends `cancelled`.
    let r = reqwest::blocking::Client::new()
        .delete(format!("{}/compositions/{id}", s.base))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(get(&s, &format!("/compositions/{id}")).0, 404);
    let long = json!({"kind": "learn", "objective": "few_shot", "task_vectors": ["delta_c_openclip"],
        "tasks": [{"classes": CLASSES, "examples": (0..12).map(|i| json!({"image": b64(&png(i as u8)), "label": i % 4})).collect::<Vec<_>>()}],
        "config": {"epochs": 100000, "batch_size": 2}});
    let (code, view) = post(&s, "/compositions", &long);
    assert_eq!(code, 202, "{view}");
    let id = view["id"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(300));
    let r = reqwest::blocking::Client::new()
        .delete(format!("{}/compositions/{id}", s.base))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = get(&s, &format!("/compositions/{id}"));
        if v["status"] == "cancelled" {
            break;
        }
        assert!(
            Instant::now() < deadline && v["status"] != "ready",
            "not cancelled: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let text = reqwest::blocking::get(format!("{}/metrics", s.base))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains("atlas_http_requests_total")
            && text.contains("atlas_classified_images_total"),
        "{text}"
    );
}
