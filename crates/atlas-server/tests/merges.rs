//! Merges over HTTP on a real server: `POST /compositions` with a FusionBench method name.
//! A delta-producing merge adds a derived task vector (checked against FusionBench's result
//! on the same fine-tunes), bound by digest like any composition's task vector; a coefficient
//! merge is a plain isotropic composition; a repeated merge reuses its task vector.

mod common;

use common::{b64, fixtures, library_flags, png, start, Server};
use serde_json::json;

const CLASSES: [&str; 2] = ["cat", "dog"];

/// A server whose library has the three tiny fine-tunes as `a`, `b`, `c` (stored at f32).
fn server(dir: &std::path::Path) -> Server {
    let lib = dir.join("lib");
    for ft in ["ft_a", "ft_b", "ft_c"] {
        let to = lib.join(ft);
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(fixtures().join(ft)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let s = start(&dir.join("data"), &library_flags(&lib), &[]);
    for (name, ft) in [("a", "ft_a"), ("b", "ft_b"), ("c", "ft_c")] {
        let (code, v) = s.post("/task-vectors", &json!({"name": name, "checkpoint": ft}));
        assert_eq!(code, 201, "{v}");
    }
    s
}

/// ‖θ_merged − θ0‖ per tensor in FusionBench's result for `case`.
fn oracle_norms(case: &str) -> std::collections::HashMap<String, f64> {
    common::oracle::case(case)
        .into_iter()
        .map(|(name, x)| {
            (
                name,
                x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt(),
            )
        })
        .collect()
}

fn classify(s: &Server, composition: &str) -> u16 {
    let body = json!({"classes": CLASSES, "composition": composition, "images": [b64(&png(3))]});
    s.post("/classify", &body).0
}

#[test]
fn ties_merge_adds_a_derived_task_vector_equal_to_fusionbenchs() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let body = json!({
        "name": "ties of three",
        "method": "ties_merging",
        "task_vectors": ["a", "b", "c"],
        "params": {"scaling_factor": 0.3, "threshold": 20, "merge_func": "sum"},
    });
    let (code, c) = s.post("/compositions", &body);
    assert_eq!(code, 201, "{c}");
    assert_eq!(c["kind"], "merge");
    assert_eq!(c["coefficients"], json!([0.3]));
    let derived = c["task_vectors"][0].as_str().unwrap().to_string();
    assert!(derived.starts_with("ties_merging-"), "{derived}");
    let merge = &c["provenance"]["merge"];
    assert_eq!(merge["method"], "ties_merging");
    assert_eq!(merge["params"]["threshold"], 20.0);
    assert_eq!(merge["inputs"], json!(["a", "b", "c"]));
    let (_, a) = s.get("/task-vectors/a");
    assert_eq!(merge["input_digests"][0], a["digest"]);

    // The derived task vector, scaled as composed, has FusionBench's per-tensor norms.
    let (code, tv) = s.get(&format!("/task-vectors/{derived}"));
    assert_eq!(code, 200, "{tv}");
    assert_eq!(c["provenance"]["task_vector_digests"][0], tv["digest"]);
    let source = tv["source"].as_str().unwrap();
    assert!(
        source.starts_with("merge ") && source.contains("ties_merging"),
        "{source}"
    );
    let want = oracle_norms("ties_sum");
    for b in tv["blocks"].as_array().unwrap() {
        let name = b["name"].as_str().unwrap();
        let ours = 0.3 * b["norm"].as_f64().unwrap();
        assert!(
            (ours - want[name]).abs() <= 1e-5,
            "{name}: {ours} vs {}",
            want[name]
        );
    }
    assert_eq!(classify(&s, c["id"].as_str().unwrap()), 200);

    // The same merge again reuses the derived task vector.
    let (code, again) = s.post("/compositions", &body);
    assert_eq!(code, 201, "{again}");
    assert_eq!(again["task_vectors"], c["task_vectors"]);
    // Bound like any task vector: not deletable while used, then deletable.
    assert_eq!(s.delete(&format!("/task-vectors/{derived}")).0, 409);
    for id in [&c["id"], &again["id"]] {
        assert_eq!(
            s.delete(&format!("/compositions/{}", id.as_str().unwrap()))
                .0,
            204
        );
    }
    assert_eq!(s.delete(&format!("/task-vectors/{derived}")).0, 204);
}

#[test]
fn coefficient_merges_and_named_dare_results() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let (_, before) = s.get("/task-vectors");
    let (code, c) = s.post(
        "/compositions",
        &json!({"method": "simple_average", "task_vectors": ["a", "b", "c"]}),
    );
    assert_eq!(code, 201, "{c}");
    assert_eq!(c["task_vectors"], json!(["a", "b", "c"]));
    let third = c["coefficients"].as_array().unwrap();
    assert!(third
        .iter()
        .all(|x| (x.as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-12));
    let (_, after) = s.get("/task-vectors");
    assert_eq!(before, after, "a coefficient merge adds no task vector");
    assert_eq!(classify(&s, c["id"].as_str().unwrap()), 200);

    let dare = |seed: u64| {
        json!({"method": "dare_task_arithmetic", "task_vectors": ["a", "b"],
               "params": {"sparsity_ratio": 0.3, "seed": seed}, "task_vector": format!("dare{seed}")})
    };
    let (code, d1) = s.post("/compositions", &dare(1));
    assert_eq!(code, 201, "{d1}");
    assert_eq!(d1["task_vectors"], json!(["dare1"]));
    assert_eq!(d1["provenance"]["merge"]["params"]["seed"], 1);
    let (code, d2) = s.post("/compositions", &dare(2));
    assert_eq!(code, 201, "{d2}");
    assert_ne!(
        d1["provenance"]["task_vector_digests"], d2["provenance"]["task_vector_digests"],
        "another seed draws other masks"
    );
    // A taken name with other deltas is a conflict.
    let mut clash = dare(3);
    clash["task_vector"] = json!("dare1");
    assert_eq!(s.post("/compositions", &clash).0, 409);
}

/// A derived task vector is kept like an upload: after a restart it is in the library with
/// its digest and source, and the composition that names it still classifies.
#[test]
fn derived_task_vectors_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let body = json!({"method": "iso_c", "task_vectors": ["a", "c"], "task_vector": "iso-ac"});
    let (code, c) = s.post("/compositions", &body);
    assert_eq!(code, 202, "an SVD merge is a job: {c}");
    let c = s.wait_final(
        c["id"].as_str().unwrap(),
        std::time::Duration::from_secs(120),
    );
    assert_eq!(c["status"], "succeeded", "{c}");
    assert_eq!(c["task_vectors"], json!(["iso-ac"]));
    let (_, before) = s.get("/task-vectors/iso-ac");
    assert!(s.terminate().success());
    let s = start(
        &dir.path().join("data"),
        &library_flags(&dir.path().join("lib")),
        &[],
    );
    let (code, after) = s.get("/task-vectors/iso-ac");
    assert_eq!(code, 200, "{after}");
    assert_eq!(after["digest"], before["digest"]);
    assert_eq!(after["source"], before["source"]);
    assert_eq!(classify(&s, c["id"].as_str().unwrap()), 200);
}

/// WUDI over HTTP: FusionBench's result on the same fine-tunes (per-tensor norms of the
/// oracle's case, the projection excluded there and here), and bad parameters are 400s that
/// name them.
#[test]
fn wudi_merge_matches_fusionbenchs_and_refuses_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let body = json!({"method": "wudi", "task_vectors": ["a", "b", "c"],
        "params": {"iter_num": 100, "exclude_keys": ["visual_projection.weight"]}});
    let (code, c) = s.post("/compositions", &body);
    assert_eq!(code, 202, "{c}");
    assert_eq!(c["status"], "queued");
    assert_eq!(c["kind"], "merge");
    // Followed like a learning job: progress per tensor, then its end.
    let events = s.events_until_final(c["id"].as_str().unwrap());
    assert_eq!(events.last().unwrap()["status"], "succeeded", "{events:?}");
    let (_, c) = s.get(&format!("/compositions/{}", c["id"].as_str().unwrap()));
    assert_eq!(c["coefficients"], json!([1.0]));
    assert_eq!(
        c["summary"]["digest"],
        c["provenance"]["task_vector_digests"][0]
    );
    let derived = c["task_vectors"][0].as_str().unwrap();
    let (_, tv) = s.get(&format!("/task-vectors/{derived}"));
    let want = oracle_norms("wudi");
    let mut compared = 0;
    for b in tv["blocks"].as_array().unwrap() {
        let name = b["name"].as_str().unwrap();
        if let Some(w) = want.get(name) {
            let ours = b["norm"].as_f64().unwrap();
            assert!((ours - w).abs() <= 1e-5, "{name}: {ours} vs {w}");
            compared += 1;
        }
    }
    assert!(compared >= 5, "{compared}");
    assert_eq!(classify(&s, c["id"].as_str().unwrap()), 200);
    for (params, named) in [
        (json!({"iter_num": -1}), "iter_num"),
        (json!({"iter_num": 1_000_000}), "iter_num"),
        (json!({"exclude_keys": "x"}), "exclude_keys"),
        (
            json!({"exclude_keys": ["no.such.tensor"]}),
            "no.such.tensor",
        ),
        (json!({"lr": 0.1}), "lr"),
    ] {
        let (code, r) = s.post(
            "/compositions",
            &json!({"method": "wudi", "task_vectors": ["a", "b"], "params": params}),
        );
        assert_eq!(code, 400, "{params}: {r}");
        assert!(r["detail"].as_str().unwrap().contains(named), "{r}");
    }
}

/// AdaMerging is a learning job over several tasks' unlabelled images: layer-wise (per block,
/// the default) and task-wise (isotropic); as a `method` it is a 400 saying how to ask for it.
#[test]
fn adamerging_learns_one_merge_from_unlabelled_images_of_several_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let unlabelled = |seed: u8| -> Vec<serde_json::Value> {
        (0..12u8)
            .map(|i| json!({"image": b64(&png(seed.wrapping_add(i * 19)))}))
            .collect()
    };
    let tasks = json!([{"classes": CLASSES, "examples": unlabelled(0)},
                       {"classes": CLASSES, "examples": unlabelled(101)}]);
    let (_, tv) = s.get("/task-vectors/a");
    let n_blocks = tv["blocks"].as_array().unwrap().len();
    for (layout, per_tv) in [("per_block", n_blocks), ("isotropic", 1)] {
        let body = json!({"objective": "adamerging", "task_vectors": ["a", "b", "c"],
            "layout": layout, "tasks": tasks, "config": {"epochs": 2}});
        let (code, job) = s.post("/compositions", &body);
        assert_eq!(code, 202, "{job}");
        assert_eq!(job["kind"], "adamerging");
        let done = s.wait_final(
            job["id"].as_str().unwrap(),
            std::time::Duration::from_secs(300),
        );
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(
            done["summary"]["metric"], "mean_mutual_information",
            "{done}"
        );
        assert_eq!(done["coefficients"].as_array().unwrap().len(), 3 * per_tv);
        let config = &done["provenance"]["config"];
        assert_eq!(config["prior"], 0.3, "{config}");
        assert_eq!(config["optimizer"]["weight_decay"], 0.0, "{config}");
        assert_eq!(classify(&s, done["id"].as_str().unwrap()), 200);
    }
    let (code, r) = s.post(
        "/compositions",
        &json!({"method": "adamerging", "task_vectors": ["a", "b"]}),
    );
    assert_eq!(code, 400, "{r}");
    assert!(
        r["detail"]
            .as_str()
            .unwrap()
            .contains("\"objective\": \"adamerging\""),
        "{r}"
    );
}

/// The library's own merge on `images[i]` (task i), in process: the block norms the server's
/// job must reproduce.
fn in_process_norms(
    method: &str,
    images: &[Vec<Vec<u8>>],
) -> std::collections::HashMap<String, f64> {
    let bb = common::data_merge::backbone();
    let pre = atlas_clip::preprocess::Preprocess::from_config(bb.config.vision.image_size);
    let classes: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
    let data: Vec<atlas_learn::Dataset> = images
        .iter()
        .map(|imgs| {
            let items = imgs.iter().map(|b| (b.clone(), None)).collect();
            atlas_learn::Dataset::from_bytes(classes.clone(), items, &pre).unwrap()
        })
        .collect();
    let blocks = common::data_merge::merged(&bb, method, &data);
    bb.manifest()
        .blocks()
        .iter()
        .zip(blocks)
        .map(|(b, x)| {
            let norm = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            (b.name.clone(), norm)
        })
        .collect()
}

/// RegMean, RegMean++ and Fisher merging are jobs on uploaded images, one task per task vector: the
/// derived task vector is the merge the library computes on the same images, and bad tasks
/// or parameters are 400s naming them.
#[test]
fn regmean_and_fisher_merge_on_each_task_vectors_images() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let images: Vec<Vec<Vec<u8>>> = (0..3u8)
        .map(|t| (0..5u8).map(|i| png(t * 50 + i * 7)).collect())
        .collect();
    let tasks = |classes: bool| -> serde_json::Value {
        images
            .iter()
            .map(|imgs| {
                let examples: Vec<_> = imgs.iter().map(|b| json!({"image": b64(b)})).collect();
                match classes {
                    true => json!({"classes": CLASSES, "examples": examples}),
                    false => json!({"examples": examples}),
                }
            })
            .collect()
    };
    for (method, with_classes) in [
        ("regmean", false),
        ("regmean_plusplus", false),
        ("fisher_merging", true),
    ] {
        let body = json!({"method": method, "task_vectors": ["a", "b", "c"],
            "tasks": tasks(with_classes)});
        let (code, c) = s.post("/compositions", &body);
        assert_eq!(code, 202, "{method}: {c}");
        assert!(c["provenance"]["data_hash"].is_string(), "{c}");
        let done = s.wait_final(
            c["id"].as_str().unwrap(),
            std::time::Duration::from_secs(300),
        );
        assert_eq!(done["status"], "succeeded", "{done}");
        let progress = &done["progress"];
        assert_eq!(progress["step"], progress["total_steps"], "{done}");
        assert_eq!(done["coefficients"], json!([1.0]));
        let params = &done["provenance"]["merge"]["params"];
        assert_eq!(params["dataloader_kwargs"]["batch_size"], 32, "{params}");
        let derived = done["task_vectors"][0].as_str().unwrap();
        assert!(derived.starts_with(method), "{derived}");
        let (_, tv) = s.get(&format!("/task-vectors/{derived}"));
        let want = in_process_norms(method, &images);
        for b in tv["blocks"].as_array().unwrap() {
            let name = b["name"].as_str().unwrap();
            let (ours, w) = (b["norm"].as_f64().unwrap(), want[name]);
            assert!(
                (ours - w).abs() <= 1e-5 * w.max(1.0),
                "{method} {name}: {ours} vs {w}"
            );
        }
        assert_eq!(classify(&s, done["id"].as_str().unwrap()), 200);
    }
    let bad = [
        (
            json!({"method": "regmean", "task_vectors": ["a", "b"]}),
            "tasks",
        ),
        (
            json!({"method": "regmean", "task_vectors": ["a", "b"], "tasks": tasks(false)}),
            "one task per task vector",
        ),
        (
            json!({"method": "fisher_merging", "task_vectors": ["a", "b", "c"],
                   "tasks": tasks(false)}),
            "task 0",
        ),
        (
            json!({"method": "ties_merging", "task_vectors": ["a", "b", "c"],
                   "tasks": tasks(true)}),
            "reads no data",
        ),
        (
            json!({"method": "regmean", "task_vectors": ["a", "b", "c"], "tasks": tasks(false),
                   "params": {"reduce_non_diagonal_ratio": 2}}),
            "reduce_non_diagonal_ratio",
        ),
        (
            json!({"method": "fisher_merging", "task_vectors": ["a", "b", "c"],
                   "tasks": tasks(true), "params": {"dataloader_kwargs": {"batch_size": 0}}}),
            "dataloader_kwargs",
        ),
        (
            json!({"method": "fisher_merging", "task_vectors": ["a", "b", "c"],
                   "tasks": tasks(true), "params": {"num_fisher_examples": 0}}),
            "num_fisher_examples",
        ),
    ];
    for (body, named) in bad {
        let (code, r) = s.post("/compositions", &body);
        assert_eq!(code, 400, "{body}: {r}");
        let detail = r["detail"].as_str().unwrap();
        assert!(detail.contains(named), "{named}: {detail}");
    }
}

/// A long merge job stops between tensors when cancelled, well before its work would end.
#[test]
fn a_cancelled_merge_job_stops_between_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    // At most 100,000 Adam steps per tensor: minutes of work on the tiny model.
    let body = json!({"method": "wudi", "task_vectors": ["a", "b", "c"],
        "params": {"iter_num": 100_000}});
    let (code, c) = s.post("/compositions", &body);
    assert_eq!(code, 202, "{c}");
    let id = c["id"].as_str().unwrap();
    let started = std::time::Instant::now();
    while s.get(&format!("/compositions/{id}")).1["status"] != "running" {
        assert!(started.elapsed().as_secs() < 60, "never ran");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let asked = std::time::Instant::now();
    let (code, _) = s.post(&format!("/compositions/{id}/cancel"), &json!({}));
    assert_eq!(code, 202);
    let done = s.wait_final(id, std::time::Duration::from_secs(120));
    assert_eq!(done["status"], "cancelled", "{done}");
    let took = asked.elapsed().as_secs_f64();
    let (_, tvs) = s.get("/task-vectors");
    assert!(
        !tvs.to_string().contains("wudi-"),
        "a cancelled merge added a task vector: {tvs}"
    );
    eprintln!("cancelled after {took:.1} s: {}", done["progress"]);
    assert!(took < 30.0, "the cancel took {took:.1} s");
    // The whole job takes about 14 s here; it stopped with tensors left undone. A cancel that
    // lands before the first tensor is done leaves no progress at all (none done).
    let progress = &done["progress"];
    if !progress.is_null() {
        let (step, total) = (&progress["step"], &progress["total_steps"]);
        assert!(step.as_u64() < total.as_u64(), "{step} of {total}");
    }
}
