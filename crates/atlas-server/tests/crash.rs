//! Crash safety: SIGKILL at several points (learning jobs queued and running, compositions and
//! task-vector uploads being written), then a restart on the same data directory. Every
//! accepted (2xx) job and composition is there, jobs resume and finish, an upload is either
//! fully present or absent, and SQLite's integrity check passes.

mod common;

use common::{b64, fixtures, png, start, tiny_flags, Server, TVS, TV_NAMES};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const CLASSES: [&str; 4] = ["red circle", "blue square", "green forest", "dog toy"];

fn job(epochs: usize, n: usize) -> Value {
    let examples: Vec<Value> = (0..n)
        .map(|i| json!({"image": b64(&png((i * 11 % 256) as u8)), "label": i % 4}))
        .collect();
    json!({"objective": "few_shot", "task_vectors": TV_NAMES,
        "tasks": [{"classes": CLASSES, "examples": examples}],
        "config": {"epochs": epochs, "batch_size": 4}})
}

fn integrity_ok(data: &Path) {
    let conn = rusqlite::Connection::open(data.join("atlas.db")).unwrap();
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

/// Posts `body(i)` for i = 0, 1, ... until the server stops answering; returns the 2xx answers.
fn post_until_gone(base: &str, path: &str, body: impl Fn(usize) -> Value) -> Vec<(usize, Value)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut accepted = Vec::new();
    for i in 0.. {
        let Ok(r) = client.post(format!("{base}{path}")).json(&body(i)).send() else {
            break;
        };
        if r.status().is_success() {
            match r.json::<Value>() {
                Ok(v) => accepted.push((i, v)),
                Err(_) => break,
            }
        }
    }
    accepted
}

/// Kills the server after `after` while `work` runs against it; returns what `work` returned.
fn kill_during<T: Send>(s: Server, after: Duration, work: impl FnOnce(&str) -> T + Send) -> T {
    let base = s.base.clone();
    let started = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let h = scope.spawn(|| {
            started.store(true, Ordering::SeqCst);
            work(&base)
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(after);
        let log = s.kill();
        assert!(!log.contains("panicked"), "{log}");
        h.join().unwrap()
    })
}

fn wait_for(s: &Server, id: &str, want: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = s.get(&format!("/compositions/{id}"));
        if want(&v) {
            return;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigkill_at_several_points_loses_nothing_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let flags = tiny_flags();
    let mut jobs: Vec<String> = Vec::new();
    let mut comps: Vec<(String, Value)> = Vec::new();
    let mut kills = 0;

    // 1. Right after a job is accepted (queued, perhaps just started).
    let s = start(&data, &flags, &[]);
    let (code, v) = s.post("/compositions", &job(3, 16));
    assert_eq!(code, 202, "{v}");
    jobs.push(v["id"].as_str().unwrap().into());
    s.kill();
    kills += 1;
    integrity_ok(&data);

    // 2. A job running, before its first checkpoint; a second one queued behind it.
    let s = start(&data, &flags, &[]);
    let (_, a) = s.post("/compositions", &job(3, 16));
    let (_, b) = s.post("/compositions", &job(2, 8));
    let id = a["id"].as_str().unwrap().to_string();
    jobs.push(id.clone());
    jobs.push(b["id"].as_str().unwrap().into());
    wait_for(&s, &id, |v| v["status"] == "running");
    s.kill();
    kills += 1;
    integrity_ok(&data);

    // 3. A job running after a checkpoint (its first epoch recorded).
    let s = start(&data, &flags, &[]);
    let (_, a) = s.post("/compositions", &job(4, 32));
    let id = a["id"].as_str().unwrap().to_string();
    jobs.push(id.clone());
    wait_for(&s, &id, |v| {
        v["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["kind"] == "epoch"))
    });
    s.kill();
    kills += 1;
    integrity_ok(&data);

    // 4 and 5. Explicit compositions posted in a loop, killed at two different moments.
    for ms in [150, 700] {
        let s = start(&data, &flags, &[]);
        let accepted = kill_during(s, Duration::from_millis(ms), |base| {
            post_until_gone(base, "/compositions", |i| {
                json!({"name": format!("loop-{ms}-{i}"), "task_vectors": TV_NAMES,
                    "coefficients": [0.001 * i as f64, -0.5]})
            })
        });
        assert!(!accepted.is_empty(), "no composition accepted in {ms} ms");
        comps.extend(
            accepted
                .into_iter()
                .map(|(_, v)| (v["id"].as_str().unwrap().to_string(), v)),
        );
        kills += 1;
        integrity_ok(&data);
    }

    // 6 and 7. Task-vector uploads in flight.
    let bytes = std::fs::read(fixtures().join(TVS[0])).unwrap();
    let mut uploads: Vec<(String, bool)> = Vec::new();
    for ms in [100, 400] {
        let s = start(&data, &flags, &[]);
        let encoded = b64(&bytes);
        let accepted = kill_during(s, Duration::from_millis(ms), |base| {
            post_until_gone(
                base,
                "/task-vectors",
                |i| json!({"name": format!("up-{ms}-{i}"), "safetensors": encoded}),
            )
        });
        let tried = accepted.last().map_or(0, |(i, _)| i + 2);
        for i in 0..tried {
            let name = format!("up-{ms}-{i}");
            let ok = accepted
                .iter()
                .any(|(_, v)| v["name"] == json!(name.as_str()));
            uploads.push((name, ok));
        }
        kills += 1;
        integrity_ok(&data);
    }

    // After the last restart: everything accepted is there and every job finishes.
    let s = start(&data, &flags, &[]);
    for (id, v) in &comps {
        let (code, got) = s.get(&format!("/compositions/{id}"));
        assert_eq!(code, 200, "accepted composition {id} lost");
        assert_eq!(got["coefficients"], v["coefficients"]);
    }
    for id in &jobs {
        let done = s.wait_final(id, Duration::from_secs(300));
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    let (_, lib) = s.get("/task-vectors");
    let digest = lib["task_vectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == TV_NAMES[0])
        .unwrap()["digest"]
        .clone();
    for (name, accepted) in &uploads {
        let (code, v) = s.get(&format!("/task-vectors/{name}"));
        if *accepted {
            assert_eq!(code, 200, "accepted upload {name} lost");
        }
        // Present means complete: the same content as the file uploaded.
        if code == 200 {
            assert_eq!(v["digest"], digest, "{name} is damaged");
        }
    }
    // No half-written upload is left behind in the data directory.
    let stray: Vec<_> = std::fs::read_dir(data.join("task-vectors"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    integrity_ok(&data);
    println!(
        "kill points survived: {kills}; jobs {}, compositions {}, uploads {} ({} accepted)",
        jobs.len(),
        comps.len(),
        uploads.len(),
        uploads.iter().filter(|u| u.1).count()
    );
    assert!(!s.log_text().contains("panicked"));
}

/// Uploads racing under one name with different contents: one wins, and what the store keeps
/// (loaded again after a restart) is the winner's content. (A library holds one task vector
/// per digest, so each round's winner is deleted before the next round races.)
#[test]
fn racing_uploads_of_one_name_keep_the_winner() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let model_only: Vec<String> = tiny_flags().into_iter().take(4).collect();
    let s = start(&data, &model_only, &[]);
    let contents: Vec<String> = TVS
        .iter()
        .map(|t| b64(&std::fs::read(fixtures().join(t)).unwrap()))
        .collect();
    let mut last = Value::Null;
    for round in 0..3 {
        let name = format!("race-{round}");
        let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
            let hs: Vec<_> = (0..6)
                .map(|i| {
                    let body = json!({"name": name, "safetensors": contents[i % 2]});
                    let s = &s;
                    scope.spawn(move || s.post("/task-vectors", &body))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let won: Vec<&Value> = answers
            .iter()
            .filter(|a| a.0 == 201)
            .map(|a| &a.1)
            .collect();
        assert_eq!(won.len(), 1, "{answers:?}");
        assert!(
            answers.iter().all(|a| a.0 == 201 || a.0 == 409),
            "{answers:?}"
        );
        last = s.get(&format!("/task-vectors/{name}")).1["digest"].clone();
        assert_eq!(last, won[0]["digest"]);
        if round < 2 {
            assert_eq!(s.delete(&format!("/task-vectors/{name}")).0, 204);
        }
    }
    s.kill();
    let s = start(&data, &model_only, &[]);
    let (code, v) = s.get("/task-vectors/race-2");
    assert_eq!((code, &v["digest"]), (200, &last), "race-2 after restart");
    assert_eq!(s.get("/task-vectors/race-0").0, 404);
}

/// A budget job killed after its selection was recorded resumes over the same selection (no
/// second gradient pass picks anew) from its checkpoint, and its composition serves.
#[test]
fn a_budget_job_killed_mid_way_resumes_over_its_recorded_selection() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = start(&data, &tiny_flags(), &[]);
    let mut body = job(200, 8);
    body["budget"] = json!({"task_vectors": 1, "blockwise": true});
    let (code, v) = s.post("/compositions", &body);
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    wait_for(&s, &id, |v| {
        v["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["kind"] == "epoch"))
    });
    let (_, before) = s.get(&format!("/compositions/{id}"));
    let selection = before["provenance"]["budget"].clone();
    assert!(selection["blocks"].is_array(), "{before}");
    let log = s.kill();
    assert!(!log.contains("panicked"), "{log}");

    let s = start(&data, &tiny_flags(), &[]);
    let done = s.wait_final(&id, Duration::from_secs(300));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["provenance"]["budget"], selection);
    assert!(
        done["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "resumed"),
        "{done}"
    );
    let images = [b64(&png(3))];
    let (code, out) = s.post(
        "/classify",
        &json!({"composition": id, "classes": CLASSES, "images": images}),
    );
    assert_eq!(code, 200, "{out}");
}
