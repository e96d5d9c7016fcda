//! Fine-tuning jobs over HTTP (`POST /task-vectors` with `finetune`), end to end on the real
//! binary over the tiny fixture CLIP: progress, cancel, resume after SIGKILL from the last
//! epoch checkpoint, and the task vector serving in compositions across restarts.

mod common;

use common::{b64, png, spec, start, tiny_flags, Server, TV_NAMES};
use reqwest::blocking::multipart::{Form, Part};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const CLASSES: [&str; 4] = ["red circle", "blue square", "green forest", "dog toy"];

fn finetune(name: &str, epochs: usize) -> Value {
    let examples: Vec<Value> = (0..8)
        .map(|i| json!({"image": b64(&png((i * 13) as u8)), "label": i % 4}))
        .collect();
    json!({"name": name, "finetune": {"classes": CLASSES, "examples": examples,
        "config": {"epochs": epochs, "batch_size": 4, "lr": 1e-3}}})
}

/// Posts a fine-tuning job; returns its id.
fn post_job(s: &Server, name: &str, epochs: usize) -> String {
    let (code, view) = s.post("/task-vectors", &finetune(name, epochs));
    assert_eq!(code, 202, "{view}");
    spec::validate("Composition", &view);
    assert_eq!(view["kind"], "finetune");
    assert_eq!(view["status"], "queued");
    view["id"].as_str().unwrap().to_string()
}

/// Polls a job until `want` holds.
fn wait_for(s: &Server, id: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = s.get(&format!("/compositions/{id}"));
        if want(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn step(v: &Value) -> u64 {
    v["progress"]["step"].as_u64().unwrap_or(0)
}

fn task_vector(s: &Server, name: &str) -> Option<Value> {
    let (_, list) = s.get("/task-vectors");
    list["task_vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
}

fn classify(s: &Server, composition: &str) {
    let images: Vec<String> = (0..2).map(|i| b64(&png(i * 13))).collect();
    let (code, out) = s.post(
        "/classify",
        &json!({"composition": composition, "classes": CLASSES, "images": images}),
    );
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["predictions"].as_array().unwrap().len(), 2);
}

#[test]
fn finetune_jobs_progress_cancel_resume_after_a_kill_and_their_task_vectors_serve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = start(&data, &tiny_flags(), &[]);

    // A short job runs to the end; its task vector joins the library and serves.
    let id = post_job(&s, "ft_a", 2);
    let done = s.wait_final(&id, Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    spec::validate("Composition", &done);
    let kinds: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["epoch", "epoch"], "{done}");
    assert_eq!(done["task_vectors"], json!(["ft_a"]));
    assert_eq!(done["coefficients"], json!([1.0]));
    let tv = task_vector(&s, "ft_a").expect("ft_a in the library");
    assert_eq!(done["summary"]["digest"], tv["digest"]);
    let hash = done["provenance"]["data_hash"].as_str().unwrap();
    let source = tv["source"].as_str().unwrap();
    assert!(
        source.contains("finetune") && source.contains(hash),
        "{source}"
    );
    classify(&s, &id);
    let (code, mixed) = s.post(
        "/compositions",
        &json!({"task_vectors": ["ft_a", TV_NAMES[0]], "coefficients": [0.7, 0.3]}),
    );
    assert_eq!(code, 201, "{mixed}");
    let mixed = mixed["id"].as_str().unwrap().to_string();
    classify(&s, &mixed);
    let (code, p) = s.post("/task-vectors", &finetune("ft_a", 1));
    assert_eq!(code, 409, "{p}");

    // A long job, its images as multipart file parts, reports progress and stops when
    // cancelled; its memory does not grow with the steps it has taken.
    let examples: Vec<Value> = (0..8)
        .map(|i| json!({"file": format!("{i}.png"), "label": i % 4}))
        .collect();
    let request = json!({"name": "ft_cancelled", "finetune": {"classes": CLASSES,
        "examples": examples, "config": {"epochs": 1000, "batch_size": 4}}});
    let mut form = Form::new().part("request", Part::text(request.to_string()));
    for i in 0..8u8 {
        let part = Part::bytes(png(i * 13)).file_name(format!("{i}.png"));
        form = form.part("files", part.mime_str("image/png").unwrap());
    }
    let (code, view) = s.post_with("/task-vectors", |r| r.multipart(form));
    assert_eq!(code, 202, "{view}");
    let id = view["id"].as_str().unwrap().to_string();
    wait_for(&s, &id, |v| step(v) >= 20);
    let early = s.rss_mib();
    let at = step(&s.get(&format!("/compositions/{id}")).1);
    wait_for(&s, &id, |v| step(v) >= 4 * at);
    let late = s.rss_mib();
    println!(
        "server RSS {early:.1} MiB at step {at}, {late:.1} MiB at step {}",
        4 * at
    );
    assert!(
        late <= early * 1.05 + 8.0,
        "{early:.1} MiB at step {at}, {late:.1} MiB at {}",
        4 * at
    );
    let (code, v) = s.post(&format!("/compositions/{id}/cancel"), &json!({}));
    assert_eq!(code, 202, "{v}");
    let done = s.wait_final(&id, Duration::from_secs(60));
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(task_vector(&s, "ft_cancelled").is_none());

    // Killed after its second epoch checkpoint, a job resumes from there at the next start.
    let id = post_job(&s, "ft_b", 40);
    wait_for(&s, &id, |v| {
        v["history"]
            .as_array()
            .is_some_and(|h| h.iter().filter(|e| e["kind"] == "epoch").count() >= 2)
    });
    let log = s.kill();
    assert!(!log.contains("panicked"), "{log}");
    let s = start(&data, &tiny_flags(), &[]);
    let done = s.wait_final(&id, Duration::from_secs(300));
    assert_eq!(done["status"], "succeeded", "{done}");
    let history = done["history"].as_array().unwrap();
    let resumed = history
        .iter()
        .find(|e| e["kind"] == "resumed")
        .unwrap_or_else(|| panic!("no resumption: {done}"));
    assert!(resumed["epoch"].as_u64().unwrap() >= 2, "{resumed}");
    let epochs: Vec<u64> = history
        .iter()
        .filter(|e| e["kind"] == "epoch")
        .map(|e| e["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(*epochs.last().unwrap(), 40, "{epochs:?}");
    assert!(epochs.len() < 40 + 2, "resumed, not restarted: {epochs:?}");
    classify(&s, &id);

    // After a clean restart the fine-tuned task vectors and their compositions still serve.
    let digest = task_vector(&s, "ft_a").unwrap()["digest"].clone();
    assert!(s.terminate().success());
    let s = start(&data, &tiny_flags(), &[]);
    assert_eq!(task_vector(&s, "ft_a").unwrap()["digest"], digest);
    assert!(task_vector(&s, "ft_b").is_some());
    classify(&s, &mixed);
    classify(&s, &id);
    // The fine-tuned task vector is in use: deleting it waits for its compositions.
    assert_eq!(s.delete("/task-vectors/ft_a").0, 409);
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}
