//! The HTTP service end to end: the real binary on loopback over the tiny fixture CLIP and two
//! open_clip-named task vectors; predictions checked against atlas-clip computed directly;
//! responses validated against openapi.yaml.

mod common;

use atlas_clip::preprocess::Preprocess;
use atlas_clip::{templates, Backbone, LoadOptions, ZeroShotHead};
use atlas_core::{Coefficients, Layout, StorageDType};
use common::{b64, fixtures, png, spec, start, tiny_flags, Server, TVS, TV_NAMES};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
                bb.load_task_vector(&fixtures().join(t), None, StorageDType::F32)
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
    assert_eq!(preds.as_array().unwrap().len(), want.len());
    for (row, probs) in preds.as_array().unwrap().iter().zip(want) {
        let top = &row[0];
        let class = CLASSES
            .iter()
            .position(|c| *c == top["label"].as_str().unwrap())
            .unwrap();
        let best = probs.iter().cloned().fold(f32::MIN, f32::max);
        assert!((probs[class] - best).abs() < 1e-6, "top-1 differs");
        assert!((top["probability"].as_f64().unwrap() as f32 - best).abs() < 1e-5);
    }
}

fn tiny(dir: &std::path::Path, extra: &[&str]) -> Server {
    let mut flags = tiny_flags();
    flags.extend(extra.iter().map(|s| s.to_string()));
    start(&dir.join("data"), &flags, &[])
}

fn images() -> (Vec<Vec<u8>>, Vec<String>) {
    let images: Vec<Vec<u8>> = (0..3).map(png).collect();
    let encoded = images.iter().map(|b| b64(b)).collect();
    (images, encoded)
}

#[test]
fn classify_explicit_compositions_heads_and_task_vectors() {
    let dir = tempfile::tempdir().unwrap();
    let s = tiny(dir.path(), &[]);
    let (images, encoded) = images();

    let (code, tvs) = s.get("/task-vectors");
    assert_eq!(code, 200);
    spec::validate("TaskVectorList", &tvs);
    assert_eq!(tvs["task_vectors"].as_array().unwrap().len(), 2);
    let n_blocks = tvs["blocks"].as_u64().unwrap() as usize;
    let (code, tv) = s.get(&format!("/task-vectors/{}", TV_NAMES[0]));
    assert_eq!(code, 200, "{tv}");
    spec::validate("TaskVectorDetail", &tv);
    assert_eq!(tv["blocks"].as_array().unwrap().len(), n_blocks);
    assert!(tv["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b["norm"].as_f64().unwrap() > 0.0));

    // The pre-trained model, by class names and by a head id.
    let (code, out) = s.post(
        "/classify",
        &json!({"classes": CLASSES, "images": encoded, "top_k": 2}),
    );
    assert_eq!(code, 200, "{out}");
    spec::validate("ClassifyResponse", &out);
    assert_eq!(out["composition"], "base");
    assert_eq!(out["predictions"][0].as_array().unwrap().len(), 2);
    check_against(&out["predictions"], &direct(None, &images));
    let (code, head) = s.post("/heads", &json!({"classes": CLASSES}));
    assert_eq!(code, 201, "{head}");
    spec::validate("HeadView", &head);
    assert_eq!(
        head["id"], out["head"],
        "the same content gives the same head id"
    );
    let (code, _) = s.post("/heads", &json!({"classes": CLASSES}));
    assert_eq!(code, 200, "a known head");
    let hid = head["id"].as_str().unwrap();
    assert_eq!(s.get(&format!("/heads/{hid}")).1, head);
    let (code, by_id) = s.post("/classify", &json!({"head": hid, "images": encoded}));
    assert_eq!(code, 200, "{by_id}");
    check_against(&by_id["predictions"], &direct(None, &images));

    // Explicit per-block coefficients, checked against composing directly.
    let values: Vec<f64> = (0..2 * n_blocks)
        .map(|i| ((i * 37 % 11) as f64 - 4.0) * 0.5)
        .collect();
    let rows: Vec<&[f64]> = values.chunks(n_blocks).collect();
    let (code, comp) = s.post(
        "/compositions",
        &json!({"name": "mix", "task_vectors": TV_NAMES, "coefficients": rows}),
    );
    assert_eq!(code, 201, "{comp}");
    spec::validate("Composition", &comp);
    assert_eq!(comp["status"], "succeeded");
    let id = comp["id"].as_str().unwrap().to_string();
    let (code, out) = s.post(
        "/classify",
        &json!({"composition": id, "head": hid, "images": encoded}),
    );
    assert_eq!(code, 200, "{out}");
    let coefs = Coefficients::new(Layout::PerBlock, 2, n_blocks, values).unwrap();
    check_against(&out["predictions"], &direct(Some(&coefs), &images));

    // Scalars (task arithmetic) and a map by block name widen as documented.
    let block0 = tv["blocks"][0]["name"].as_str().unwrap();
    let (code, c2) = s.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.3, {"*": 0.1, block0: -0.5}]}),
    );
    assert_eq!(code, 201, "{c2}");
    assert_eq!(c2["layout"]["kind"], "per_block");
    let got = c2["coefficients"].as_array().unwrap();
    assert_eq!(got.len(), 2 * n_blocks);
    assert_eq!(
        (
            got[0].as_f64(),
            got[n_blocks].as_f64(),
            got[n_blocks + 1].as_f64()
        ),
        (Some(0.3), Some(-0.5), Some(0.1))
    );
    let parts: Vec<Vec<f64>> = (0..n_blocks).map(|b| vec![0.1 * b as f64, -0.2]).collect();
    let (code, c3) = s.post(
        "/compositions",
        &json!({"task_vectors": [TV_NAMES[1]], "coefficients": [parts], "parts_seed": 7}),
    );
    assert_eq!(code, 201, "{c3}");
    assert_eq!(c3["layout"], json!({"kind": "per_part", "k": 2, "seed": 7}));
    let (code, _) = s.post(
        "/classify",
        &json!({"composition": c3["id"], "classes": CLASSES, "images": encoded}),
    );
    assert_eq!(code, 200);

    // Explicit compositions are not jobs.
    assert!(s.metrics().contains("atlas_jobs{state=\"succeeded\"} 0"));
    // Paging, status filter, heat maps.
    let (code, page) = s.get("/compositions?limit=2");
    assert_eq!(code, 200);
    spec::validate("CompositionPage", &page);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_offset"], 2);
    let (_, rest) = s.get("/compositions?limit=2&offset=2&status=succeeded");
    assert_eq!(rest["items"].as_array().unwrap().len(), 1);
    assert!(rest.get("next_offset").is_none());
    let svg =
        reqwest::blocking::get(format!("{}/compositions/{id}/coefficients.svg", s.base)).unwrap();
    assert_eq!(svg.headers()["content-type"], "image/svg+xml");
    let svg = svg.text().unwrap();
    assert!(svg.starts_with("<svg") && svg.contains(TV_NAMES[1]));
    let png = reqwest::blocking::get(format!("{}/compositions/{id}/coefficients.png", s.base))
        .unwrap()
        .bytes()
        .unwrap();
    let img = image::load_from_memory(&png).unwrap();
    // The PNG is the SVG's picture (labels, title, colour bar around the cells), at its size.
    let attr = |name: &str| -> u32 {
        let at = svg.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
        svg[at..].split('"').next().unwrap().parse().unwrap()
    };
    assert_eq!((img.width(), img.height()), (attr("width"), attr("height")));
    assert!(img.width() as usize > n_blocks * 4 + 100);
    assert!(svg.contains("<g id=\"colour-bar\">"));

    // Uploading a task vector (base64 safetensors), using it, refusing to delete it while a
    // composition uses it, then deleting both.
    // The fixture with one value's last bit changed: the library holds one vector per digest,
    // and the fixture itself is loaded at start.
    let mut bytes = std::fs::read(fixtures().join(TVS[0])).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header] ^= 1;
    let (code, up) = s.post(
        "/task-vectors",
        &json!({"name": "uploaded", "safetensors": b64(&bytes)}),
    );
    assert_eq!(code, 201, "{up}");
    spec::validate("TaskVectorSummary", &up);
    let (code, uses) = s.post(
        "/compositions",
        &json!({"task_vectors": ["uploaded"], "coefficients": [0.5]}),
    );
    assert_eq!(code, 201, "{uses}");
    let (code, p) = s.delete("/task-vectors/uploaded");
    assert_eq!(code, 409, "{p}");
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains(uses["id"].as_str().unwrap()));
    assert_eq!(
        s.delete(&format!("/compositions/{}", uses["id"].as_str().unwrap()))
            .0,
        204
    );
    assert_eq!(s.delete("/task-vectors/uploaded").0, 204);
    assert_eq!(s.get("/task-vectors/uploaded").0, 404);
    assert!(std::fs::read_dir(dir.path().join("data/task-vectors"))
        .unwrap()
        .next()
        .is_none());
}

/// A bad request and what its problem's detail must mention.
fn refused(s: &Server, path: &str, body: Value, code: u16, needle: &str) {
    let (c, v) = s.post(path, &body);
    assert_eq!(c, code, "{body} -> {v}");
    let detail = v["detail"].as_str().unwrap_or("");
    assert!(detail.contains(needle), "{v} lacks {needle:?}");
}

#[test]
fn bad_input_is_refused_with_problems_that_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let s = tiny(dir.path(), &["--max-body-mib", "1"]);
    let (_, encoded) = images();
    let cl = |extra: Value| {
        let mut v = json!({"classes": CLASSES, "images": encoded});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    refused(
        &s,
        "/classify",
        cl(json!({"images": ["%%%"]})),
        400,
        "image 0",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"images": [b64(b"not an image")]})),
        400,
        "not a JPEG, PNG or WebP",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"images": [b64(&png(1)[..40])]})),
        400,
        "image 0",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"images": []})),
        400,
        "between 1 and",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"classes": []})),
        400,
        "class names",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"classes": ["a", "a"]})),
        400,
        "twice",
    );
    refused(&s, "/classify", cl(json!({"top_k": 0})), 400, "top_k");
    refused(
        &s,
        "/classify",
        cl(json!({"templates": ["no placeholder"]})),
        400,
        "{}",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"templates": "NoSuchSet"})),
        400,
        "NoSuchSet",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"composition": "c999"})),
        404,
        "c999",
    );
    refused(&s, "/classify", cl(json!({"head": "h0"})), 400, "not both");
    refused(
        &s,
        "/classify",
        json!({"head": "h0", "images": encoded}),
        404,
        "h0",
    );
    refused(
        &s,
        "/classify",
        cl(json!({"classes": "not a list"})),
        400,
        "classes",
    );
    refused(&s, "/classify", cl(json!({"surprise": 1})), 400, "surprise");
    let tvs = json!(TV_NAMES);
    refused(
        &s,
        "/compositions",
        json!({"task_vectors": ["nope"], "coefficients": [1.0]}),
        400,
        "nope",
    );
    refused(
        &s,
        "/compositions",
        json!({"task_vectors": [TV_NAMES[0], TV_NAMES[0]], "coefficients": [1.0, 1.0]}),
        400,
        "twice",
    );
    refused(
        &s,
        "/compositions",
        json!({"task_vectors": tvs, "coefficients": [1.0]}),
        400,
        "one coefficients entry per task vector",
    );
    refused(
        &s,
        "/compositions",
        json!({"task_vectors": [TV_NAMES[0]], "coefficients": [[1.0, 2.0]]}),
        400,
        "2 values given",
    );
    refused(
        &s,
        "/compositions",
        json!({"task_vectors": [TV_NAMES[0]], "coefficients": [1e308]}),
        400,
        "out of range",
    );
    refused(
        &s,
        "/compositions",
        json!({"task_vectors": [TV_NAMES[0]], "coefficients": [{"no.such.block": 1.0}]}),
        400,
        "no block named",
    );
    refused(
        &s,
        "/compositions",
        json!({"task_vectors": [TV_NAMES[0]], "coefficients": [[[]]]}),
        400,
        "parts per block",
    );
    let ex = json!([{"image": encoded[0], "label": 0}]);
    let job = |extra: Value| {
        let mut v =
            json!({"objective": "few_shot", "tasks": [{"classes": CLASSES, "examples": ex}]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    refused(
        &s,
        "/compositions",
        job(
            json!({"tasks": [{"classes": CLASSES, "examples": [{"image": encoded[0], "label": 9}]}]}),
        ),
        400,
        "out of range",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"tasks": [{"classes": CLASSES, "examples": [{"image": encoded[0]}]}]})),
        400,
        "label is required",
    );
    refused(
        &s,
        "/compositions",
        job(
            json!({"tasks": [{"classes": CLASSES, "examples": [{"image": b64(b"GIF89a"), "label": 1}]}]}),
        ),
        400,
        "task 0 example 0",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"layout": {"parts": 0}})),
        400,
        "parts must be between",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"layout": {"parts": 1_000_000_000u64}})),
        400,
        "parts must be between",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"layout": "diagonal"})),
        400,
        "unknown layout",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"objective": "negation"})),
        400,
        "two (target, then control)",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"objective": "dream"})),
        400,
        "objective",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"config": {"epochs": 1_000_000}})),
        400,
        "epochs",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"config": {"lr": -1.0}})),
        400,
        "lr",
    );
    refused(
        &s,
        "/compositions",
        job(json!({"task_vectors": ["nope"]})),
        400,
        "nope",
    );
    refused(
        &s,
        "/task-vectors",
        json!({"name": "../evil", "safetensors": b64(b"x")}),
        400,
        "must be 1 to 100 characters",
    );
    refused(
        &s,
        "/task-vectors",
        json!({"name": "bad", "safetensors": b64(&[255u8; 16])}),
        400,
        "bad",
    );
    refused(
        &s,
        "/task-vectors",
        json!({"name": "two", "file": "a", "safetensors": "AA=="}),
        400,
        "exactly one source",
    );
    refused(
        &s,
        "/task-vectors",
        json!({"name": "f", "file": "x.safetensors"}),
        400,
        "no library directory",
    );
    refused(
        &s,
        "/task-vectors",
        json!({"name": TV_NAMES[0], "safetensors": "AA=="}),
        409,
        "exists already",
    );
    refused(
        &s,
        "/heads",
        json!({"classes": (0..1001).map(|i| i.to_string()).collect::<Vec<_>>()}),
        400,
        "between 1 and 1000",
    );
    for path in [
        "/compositions/nope",
        "/heads/nope",
        "/task-vectors/nope",
        "/compositions/nope/coefficients.svg",
        "/nowhere",
    ] {
        let (code, v) = s.get(path);
        assert_eq!(code, 404, "{path}: {v}");
    }
    assert_eq!(s.post("/compositions/nope/cancel", &json!({})).0, 404);
    assert_eq!(s.delete("/compositions/nope").0, 404);
    let (code, v) = s.post_with("/classify", |r| {
        r.header("content-type", "application/json")
            .body("{not json")
    });
    assert_eq!(code, 400, "{v}");
    let (code, v) = s.post_with("/classify", |r| r.body("{}"));
    assert_eq!(code, 415, "{v}");
    let big = "A".repeat(2 << 20);
    let (code, v) = s.post("/classify", &json!({"classes": CLASSES, "images": [big]}));
    assert_eq!(code, 413, "{v}");
    let (code, _) = s.get("/compositions?limit=0");
    assert_eq!(code, 400);
    let (code, _) = s.get("/compositions?status=lost");
    assert_eq!(code, 400);
    // Still healthy and serving, with nothing panicking.
    assert_eq!(
        s.post("/classify", &json!({"classes": CLASSES, "images": encoded}))
            .0,
        200
    );
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

fn few_shot(encoded: &[String], epochs: usize, n: usize) -> Value {
    let examples: Vec<Value> = (0..n)
        .map(|i| json!({"image": encoded[i % encoded.len()], "label": i % 4}))
        .collect();
    json!({"objective": "few_shot", "task_vectors": TV_NAMES,
        "tasks": [{"classes": CLASSES, "examples": examples}], "config": {"epochs": epochs, "batch_size": 4}})
}

fn distinct_pngs(n: usize) -> Vec<String> {
    (0..n).map(|i| b64(&png(i as u8 * 7))).collect()
}

/// The same Idempotency-Key gives the same job for the same request, and 409 for another.
fn check_idempotency(s: &Server, job: &Value, view: &Value, encoded: &[String]) {
    let (code, again) = s.post_with("/compositions", |r| {
        r.header("Idempotency-Key", "job-1").json(job)
    });
    assert_eq!(
        (code, &again["id"]),
        (202, &view["id"]),
        "same key, same job"
    );
    let other = few_shot(encoded, 3, 12);
    let (code, p) = s.post_with("/compositions", |r| {
        r.header("Idempotency-Key", "job-1").json(&other)
    });
    assert_eq!(code, 409, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("different request"));
}

#[test]
fn learning_jobs_stream_progress_cancel_and_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let s = tiny(dir.path(), &[]);
    let encoded = distinct_pngs(12);

    let job = few_shot(&encoded, 2, 12);
    let (code, view) = s.post_with("/compositions", |r| {
        r.header("Idempotency-Key", "job-1").json(&job)
    });
    assert_eq!(code, 202, "{view}");
    spec::validate("Composition", &view);
    let id = view["id"].as_str().unwrap().to_string();
    // Follow the job's events from now: the checks below take long enough for a two-epoch job
    // to end before a stream opened after them (which then saw no step).
    let events = std::thread::scope(|scope| {
        let stream = scope.spawn(|| s.events_until_final(&id));
        check_idempotency(&s, &job, &view, &encoded);
        stream.join().unwrap()
    });
    assert!(
        events.iter().any(|e| e["progress"]["kind"] == "step"),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["status"], "succeeded", "{events:?}");
    let done = s.wait_final(&id, Duration::from_secs(10));
    spec::validate("Composition", &done);
    assert_eq!(done["summary"]["metric"], "accuracy");
    // Whether the job learned anything is part of its result (issue 19).
    let outcome = done["summary"]["outcome"].as_str().unwrap();
    assert!(["improved", "kept_start"].contains(&outcome), "{done}");
    assert!(done["summary"]["warnings"].is_array(), "{done}");
    assert_eq!(done["history"].as_array().unwrap().len(), 2);
    assert_eq!(
        done["provenance"]["task_vector_digests"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(done["provenance"]["data_hash"].as_str().unwrap().len(), 64);
    assert!(
        done["request"]["tasks"][0]["examples"][0]
            .get("image")
            .is_none(),
        "no image bytes in the store's view"
    );
    let (code, out) = s.post(
        "/classify",
        &json!({"composition": id, "classes": CLASSES, "images": &encoded[..2]}),
    );
    assert_eq!(code, 200, "{out}");
    assert_eq!(
        s.post(&format!("/compositions/{id}/cancel"), &json!({})).0,
        409
    );

    // A long job: cancelled while running; a task vector in use cannot be deleted meanwhile.
    let (code, long) = s.post("/compositions", &few_shot(&encoded, 1000, 12));
    assert_eq!(code, 202, "{long}");
    let lid = long["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.get(&format!("/compositions/{lid}")).1["status"] != "running" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.delete(&format!("/task-vectors/{}", TV_NAMES[0])).0, 409);
    // Serving stays responsive while the job learns on its worker thread.
    let body = json!({"classes": CLASSES, "images": [encoded[0]]});
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let t0 = Instant::now();
        assert_eq!(s.post("/classify", &body).0, 200);
        worst = worst.max(t0.elapsed());
    }
    assert!(
        worst < Duration::from_secs(2),
        "classify took {worst:?} during a job"
    );
    assert_eq!(
        s.get(&format!("/compositions/{lid}")).1["status"],
        "running"
    );
    let (code, _) = s.post(&format!("/compositions/{lid}/cancel"), &json!({}));
    assert_eq!(code, 202);
    assert_eq!(
        s.wait_final(&lid, Duration::from_secs(60))["status"],
        "cancelled"
    );
    let (_, cancelled) = s.get("/compositions?status=cancelled");
    assert_eq!(cancelled["items"][0]["id"], lid.as_str());
    assert!(s.metrics().contains("atlas_jobs{state=\"cancelled\"} 1"));

    // Multipart: the request as a JSON part, examples as file parts named in it.
    let form = reqwest::blocking::multipart::Form::new()
        .part("request", reqwest::blocking::multipart::Part::text(
            json!({"objective": "few_shot", "task_vectors": [TV_NAMES[0]], "layout": "isotropic",
                "tasks": [{"classes": ["x", "y"], "examples": [{"file": "a.png", "label": 0}, {"file": "b.png", "label": 1}]}],
                "config": {"epochs": 1}}).to_string()))
        .part("files", reqwest::blocking::multipart::Part::bytes(png(3)).file_name("a.png"))
        .part("files", reqwest::blocking::multipart::Part::bytes(png(4)).file_name("b.png"));
    let (code, mp) = s.post_with("/compositions", |r| r.multipart(form));
    assert_eq!(code, 202, "{mp}");
    let mp = s.wait_final(mp["id"].as_str().unwrap(), Duration::from_secs(60));
    assert_eq!(mp["status"], "succeeded", "{mp}");
    assert_eq!(mp["coefficients"].as_array().unwrap().len(), 1);
    let form = reqwest::blocking::multipart::Form::new()
        .part(
            "request",
            reqwest::blocking::multipart::Part::text(
                json!({"classes": CLASSES, "top_k": 1}).to_string(),
            ),
        )
        .part(
            "image",
            reqwest::blocking::multipart::Part::bytes(png(9)).file_name("q.png"),
        );
    let (code, out) = s.post_with("/classify", |r| r.multipart(form));
    assert_eq!(code, 200, "{out}");
    assert_eq!(out["predictions"].as_array().unwrap().len(), 1);
}

/// Λ over both fixture task vectors (in `TVS` order) from a composition's task vectors and
/// per-block coefficients, 0 for a task vector it does not name.
fn over_both(done: &Value, n_blocks: usize) -> Coefficients {
    let names = done["task_vectors"].as_array().unwrap();
    let values: Vec<f64> = done["coefficients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut full = vec![0.0; 2 * n_blocks];
    for (row, name) in names.iter().enumerate() {
        let at = TV_NAMES
            .iter()
            .position(|t| *t == name.as_str().unwrap())
            .unwrap();
        full[at * n_blocks..(at + 1) * n_blocks]
            .copy_from_slice(&values[row * n_blocks..(row + 1) * n_blocks]);
    }
    Coefficients::new(Layout::PerBlock, 2, n_blocks, full).unwrap()
}

#[test]
fn learning_budgets_keep_b_task_vectors_whole_or_per_block() {
    let dir = tempfile::tempdir().unwrap();
    let s = tiny(dir.path(), &[]);
    let n_blocks = s.get("/task-vectors").1["blocks"].as_u64().unwrap() as usize;
    let encoded = distinct_pngs(8);
    let raw: Vec<Vec<u8>> = (0..2).map(|i| png(i as u8 * 7)).collect();

    let mut whole = few_shot(&encoded, 1, 8);
    whole["budget"] = json!({"task_vectors": 1});
    let mut blockwise = few_shot(&encoded, 1, 8);
    blockwise["budget"] = json!({"task_vectors": 1, "blockwise": true});
    blockwise["layout"] = json!("isotropic");
    let ids: Vec<String> = [whole, blockwise]
        .iter()
        .map(|job| {
            let (code, view) = s.post("/compositions", job);
            assert_eq!(code, 202, "{view}");
            view["id"].as_str().unwrap().to_string()
        })
        .collect();

    // Whole: the composition names the one task vector kept, and serves exactly it.
    let done = s.wait_final(&ids[0], Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    spec::validate("Composition", &done);
    let budget = &done["provenance"]["budget"];
    assert_eq!(budget["kept"].as_array().unwrap().len(), 1, "{budget}");
    assert_eq!(done["task_vectors"], budget["kept"]);
    assert_eq!(
        done["provenance"]["task_vector_digests"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        done["coefficients"].as_array().unwrap().len(),
        n_blocks,
        "one row of Λ"
    );
    let images: Vec<String> = raw.iter().map(|b| b64(b)).collect();
    let (code, out) = s.post(
        "/classify",
        &json!({"composition": ids[0], "classes": CLASSES, "images": images}),
    );
    assert_eq!(code, 200, "{out}");
    check_against(
        &out["predictions"],
        &direct(Some(&over_both(&done, n_blocks)), &raw),
    );

    // Blockwise: every block keeps one task vector; the other's coefficient there is 0, and the
    // isotropic layout became per block.
    let done = s.wait_final(&ids[1], Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    spec::validate("Composition", &done);
    assert_eq!(done["layout"]["kind"], "per_block", "{done}");
    assert_eq!(done["task_vectors"].as_array().unwrap().len(), 2);
    let blocks = done["provenance"]["budget"]["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), n_blocks);
    let coefs = over_both(&done, n_blocks);
    for (b, kept) in blocks.iter().enumerate() {
        let kept = kept["task_vectors"].as_array().unwrap();
        assert_eq!(kept.len(), 1, "{kept:?}");
        let keep = TV_NAMES
            .iter()
            .position(|t| *t == kept[0].as_str().unwrap())
            .unwrap();
        assert_eq!(
            coefs.block(1 - keep, b),
            &[0.0],
            "block {b}: not kept, so 0"
        );
    }
    let (code, out) = s.post(
        "/classify",
        &json!({"composition": ids[1], "classes": CLASSES, "images": images}),
    );
    assert_eq!(code, 200, "{out}");
    check_against(&out["predictions"], &direct(Some(&coefs), &raw));
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

#[test]
fn api_keys_guard_mutations_and_stay_secret() {
    let dir = tempfile::tempdir().unwrap();
    let key = "k-0123456789abcdef-secret";
    let mut s = start(
        &dir.path().join("data"),
        &tiny_flags(),
        &[("ATLAS_API_KEYS", &format!("other-key-0123456789,{key}"))],
    );
    let body = json!({"classes": CLASSES, "images": [b64(&png(1))]});
    for (path, b) in [
        ("/classify", &body),
        ("/heads", &json!({"classes": ["a"]})),
        ("/compositions", &json!({})),
        ("/task-vectors", &json!({})),
    ] {
        let (code, v) = s.post(path, b);
        assert_eq!(code, 401, "{path}: {v}");
        assert!(v["detail"].as_str().unwrap().contains("bearer"));
    }
    assert_eq!(s.delete("/compositions/x").0, 401);
    s.key = Some("wrong-key-0123456789".into());
    assert_eq!(s.post("/classify", &body).0, 401);
    assert_eq!(
        s.get("/task-vectors").0,
        200,
        "reads are open unless auth_reads"
    );
    s.key = Some(key.into());
    assert_eq!(s.post("/classify", &body).0, 200);
    assert_eq!(s.get("/healthz").0, 200);
    assert!(!s.metrics().contains(key));
    assert!(!s.log_text().contains(key), "{}", s.log_text());
}

#[test]
fn concurrent_requests_are_batched() {
    let dir = tempfile::tempdir().unwrap();
    let s = tiny(dir.path(), &["--max-wait-ms", "200"]);
    let body = json!({"classes": CLASSES, "images": [b64(&png(5))]});
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| assert_eq!(s.post("/classify", &body).0, 200));
        }
    });
    let m = s.metrics();
    let value = |name: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    let batches = value("atlas_batch_size_count");
    assert_eq!(value("atlas_batch_size_sum"), 8.0);
    assert!(
        batches < 8.0,
        "8 concurrent requests ran as {batches} batches\n{m}"
    );
    assert!(
        m.contains(
            "atlas_http_requests_total{method=\"POST\",route=\"/classify\",status=\"200\"} 8"
        ),
        "{m}"
    );
}

/// The kinds of a composition's history events ("epoch", "resumed").
fn history_kinds(c: &Value) -> Vec<&str> {
    c["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect()
}

#[test]
fn jobs_survive_a_kill_and_compositions_persist() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = start(&data, &tiny_flags(), &[]);
    let encoded = distinct_pngs(16);
    let (code, kept) = s.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.2, -0.1]}),
    );
    assert_eq!(code, 201);
    let (code, job) = s.post("/compositions", &few_shot(&encoded, 6, 64));
    assert_eq!(code, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let (_, queued) = s.post("/compositions", &few_shot(&encoded, 1, 8));
    // Kill once the first epoch's checkpoint is written (the epoch event follows it).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, v) = s.get(&format!("/compositions/{id}"));
        if !v["history"].as_array().unwrap().is_empty() {
            assert_eq!(v["status"], "running", "killed too late: {v}");
            break;
        }
        assert!(Instant::now() < deadline, "no epoch: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    s.kill();
    {
        let conn = rusqlite::Connection::open(data.join("atlas.db")).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }
    let s = start(&data, &tiny_flags(), &[]);
    assert!(s.log_text().contains("requeued"), "{}", s.log_text());
    let done = s.wait_final(&id, Duration::from_secs(300));
    assert_eq!(done["status"], "succeeded", "{done}");
    let kinds = history_kinds(&done);
    assert!(kinds.contains(&"resumed"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "epoch").count(),
        6,
        "{kinds:?}"
    );
    assert_eq!(
        s.wait_final(queued["id"].as_str().unwrap(), Duration::from_secs(120))["status"],
        "succeeded"
    );
    let (code, k) = s.get(&format!("/compositions/{}", kept["id"].as_str().unwrap()));
    assert_eq!((code, &k["coefficients"]), (200, &kept["coefficients"]));
    // SIGTERM while a job runs: a clean exit, the job back in the queue, then resumed.
    let (_, job) = s.post("/compositions", &few_shot(&encoded, 4, 64));
    let id = job["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    while s.get(&format!("/compositions/{id}")).1["history"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.terminate().success());
    let s = start(&data, &tiny_flags(), &[]);
    let done = s.wait_final(&id, Duration::from_secs(300));
    assert_eq!(done["status"], "succeeded", "{done}");
    let kinds = history_kinds(&done);
    assert_eq!(
        kinds.iter().filter(|k| **k == "epoch").count(),
        4,
        "{kinds:?}"
    );
}

#[test]
fn the_composed_model_cache_evicts_past_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    // A budget of 0 bytes keeps only the latest model: every switch is a miss and an eviction.
    let s = tiny(dir.path(), &["--cache-mib", "0"]);
    let (_, c) = s.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.5, 0.5]}),
    );
    let id = c["id"].as_str().unwrap();
    let img = json!([b64(&png(2))]);
    for composition in ["base", "base", id, "base"] {
        let body = json!({"composition": composition, "classes": CLASSES, "images": img});
        assert_eq!(s.post("/classify", &body).0, 200);
    }
    let m = s.metrics();
    for line in [
        "atlas_cache_hits_total 1",
        "atlas_cache_misses_total 3",
        "atlas_cache_evictions_total 2",
    ] {
        assert!(m.contains(line), "{line} missing:\n{m}");
    }
    assert!(m.contains("atlas_compose_seconds_count 3"), "{m}");
}
