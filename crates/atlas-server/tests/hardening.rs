//! Hardening against classes of hostile or careless use found by an outside battery: limits that
//! a burst of concurrent requests could slip past, races between requests, streams that held
//! shutdown, settings that silently turned authentication off, and clients that could create
//! metric series. Each test fails on the code before its fix.

mod common;

use common::{b64, fixtures, library_flags, png, start, tiny_flags, Server, TVS, TV_NAMES};
use serde_json::{json, Value};
use std::io::Read;
use std::time::{Duration, Instant};

const CLASSES: [&str; 4] = ["red circle", "blue square", "green forest", "dog toy"];

fn job(epochs: usize) -> Value {
    let examples: Vec<Value> = (0..32)
        .map(|i| json!({"image": b64(&png((i * 11 % 256) as u8)), "label": i % 4}))
        .collect();
    json!({"objective": "few_shot", "task_vectors": TV_NAMES,
        "tasks": [{"classes": CLASSES, "examples": examples}],
        "config": {"epochs": epochs, "batch_size": 4}})
}

fn flags(extra: &[&str]) -> Vec<String> {
    let mut f = tiny_flags();
    f.extend(extra.iter().map(|s| s.to_string()));
    f
}

fn queued(s: &Server) -> usize {
    let (code, page) = s.get("/compositions?status=queued&limit=500");
    assert_eq!(code, 200, "{page}");
    page["items"].as_array().unwrap().len()
}

/// The job-queue limit was checked before the insert, not with it: 50 concurrent submissions
/// once left 28 jobs queued against a limit of 16.
#[test]
fn the_job_queue_limit_holds_under_concurrent_submissions() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &flags(&["--job-queue", "3", "--workers", "1"]),
        &[],
    );
    // One long job keeps the only worker busy, so every later job stays queued.
    let (code, first) = s.post("/compositions", &job(1000));
    assert_eq!(code, 202, "{first}");
    let body = job(1000);
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                scope.spawn(|| {
                    (0..3)
                        .map(|_| s.post("/compositions", &body).0)
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect::<Vec<u16>>()
    });
    let accepted = answers.iter().filter(|&&c| c == 202).count();
    assert!(
        answers.iter().all(|c| [202, 429].contains(c)),
        "{answers:?}"
    );
    assert!(
        queued(&s) <= 3,
        "{} queued against a limit of 3",
        queued(&s)
    );
    assert!(
        accepted <= 4,
        "{accepted} accepted with one slot running and 3 queued"
    );
    // The running job shows in the log every ten seconds, with an ETA.
    let id = first["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !s.log_text().contains(&format!("job {id}: step ")) {
        assert!(
            Instant::now() < deadline,
            "no progress line: {}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("job {id}: step ")))
        .unwrap();
    assert!(line.contains("eta "), "{line}");
}

/// Creating a composition raced deleting one of its task vectors: both could succeed, and the
/// composition then answered 409 for good.
#[test]
fn a_composition_and_the_deletion_of_its_task_vector_never_both_succeed() {
    let dir = tempfile::tempdir().unwrap();
    // The model alone: the upload must not have the digest of a vector loaded at start.
    let model_only: Vec<String> = tiny_flags().into_iter().take(4).collect();
    let s = start(&dir.path().join("data"), &model_only, &[]);
    let bytes = b64(&std::fs::read(fixtures().join(TVS[0])).unwrap());
    let upload = json!({"name": "racer", "safetensors": bytes});
    let create = json!({"task_vectors": ["racer"], "coefficients": [0.5]});
    let mut both = 0;
    for round in 0..40 {
        let (code, up) = s.post("/task-vectors", &upload);
        assert_eq!(code, 201, "round {round}: {up}");
        let ((created, c), (deleted, _)) = std::thread::scope(|scope| {
            let a = scope.spawn(|| s.post("/compositions", &create));
            let b = scope.spawn(|| s.delete("/task-vectors/racer"));
            (a.join().unwrap(), b.join().unwrap())
        });
        if created == 201 && deleted == 204 {
            both += 1;
        }
        if created == 201 {
            let id = c["id"].as_str().unwrap();
            let (code, _) = s.post(
                "/classify",
                &json!({"composition": id, "classes": CLASSES,
                "images": [b64(&png(1))]}),
            );
            assert!(deleted != 204 || code == 409);
            assert_eq!(s.delete(&format!("/compositions/{id}")).0, 204);
        }
        if deleted != 204 {
            assert_eq!(s.delete("/task-vectors/racer").0, 204, "round {round}");
        }
    }
    assert_eq!(
        both, 0,
        "{both} of 40 rounds created a composition over a deleted vector"
    );
}

/// An open event stream held shutdown: after SIGTERM the server had not exited in 40 s, past
/// Kubernetes' default grace period of 30 s.
#[test]
fn open_event_streams_do_not_hold_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &flags(&["--workers", "1"]), &[]);
    let (code, _) = s.post("/compositions", &job(1000));
    assert_eq!(code, 202);
    let (code, waiting) = s.post("/compositions", &job(1000));
    assert_eq!(code, 202);
    let url = format!(
        "{}/compositions/{}/events",
        s.base,
        waiting["id"].as_str().unwrap()
    );
    let mut stream = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap()
        .get(url)
        .send()
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let mut first = [0u8; 16];
    stream.read_exact(&mut first).unwrap();
    // Keep reading in the background, as a client following a job does.
    let reader = std::thread::spawn(move || {
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
    let t = Instant::now();
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    assert!(
        t.elapsed() < Duration::from_secs(25),
        "shutdown took {:?} with a stream open",
        t.elapsed()
    );
    reader.join().unwrap();
}

/// `api_keys` made only of separators started the server with no authentication and no
/// warning; and the bearer scheme was matched case-sensitively (RFC 7235: it is not).
#[test]
fn authentication_cannot_be_turned_off_by_separators_and_its_scheme_is_case_insensitive() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("separators.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_atlas-serve"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(tiny_flags())
        .env("ATLAS_API_KEYS", " , ")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "still serving, or started, with api_keys \" , \": {err}"
    );
    assert!(
        err.contains("api_keys") && err.contains("no values"),
        "{err}"
    );

    let key = "a-key-of-sixteen-characters";
    let s = start(
        &dir.path().join("data2"),
        &tiny_flags(),
        &[("ATLAS_API_KEYS", key)],
    );
    let body = json!({"classes": CLASSES, "images": [b64(&png(2))]});
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = reqwest::blocking::Client::new()
            .post(format!("{}/classify", s.base))
            .header("authorization", format!("{scheme} {key}"))
            .json(&body)
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "scheme {scheme}");
    }
}

/// Every distinct HTTP method made a new metric series (5,000 methods: /metrics grew from
/// 11 KB to 15.9 MB), without a key on a server with keys.
#[test]
fn clients_cannot_create_metric_series() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &tiny_flags(), &[]);
    let client = reqwest::blocking::Client::new();
    for i in 0..200 {
        let method = reqwest::Method::from_bytes(format!("XMETHOD{i}").as_bytes()).unwrap();
        let path = format!("/no-such-route-{i}");
        let _ = client
            .request(method.clone(), format!("{}/healthz", s.base))
            .send();
        let _ = client.request(method, format!("{}{path}", s.base)).send();
    }
    let text = s.metrics();
    assert!(!text.contains("XMETHOD"), "a method became a label");
    assert!(!text.contains("no-such-route"), "a path became a label");
    assert!(text.contains("method=\"other\""));
}

/// `?offset=18446744073709551615` wrapped round in SQLite and returned the first page; a
/// second multipart `request` part silently replaced the first.
#[test]
fn an_offset_past_the_end_and_a_repeated_request_part_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &tiny_flags(), &[]);
    let (code, _) = s.post(
        "/compositions",
        &json!({"task_vectors": [TV_NAMES[0]], "coefficients": [0.5]}),
    );
    assert_eq!(code, 201);
    let (code, p) = s.get("/compositions?offset=18446744073709551615");
    assert_eq!(code, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("offset"), "{p}");
    let (code, page) = s.get("/compositions?offset=1000000");
    assert_eq!((code, page["items"].as_array().unwrap().len()), (200, 0));

    let part = |v: &Value| reqwest::blocking::multipart::Part::text(v.to_string());
    let classify = json!({"classes": CLASSES});
    let form = reqwest::blocking::multipart::Form::new()
        .part("request", part(&classify))
        .part("request", part(&json!({"classes": ["x", "y"]})))
        .part(
            "image",
            reqwest::blocking::multipart::Part::bytes(png(3)).file_name("a.png"),
        );
    let (code, p) = s.post_with("/classify", |r| r.multipart(form));
    assert_eq!(code, 400, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("twice"), "{p}");
}

/// Reads what the server sends on `stream` until it closes the connection or `limit` passes;
/// returns the text and whether the connection was closed.
fn read_until_closed(stream: &mut std::net::TcpStream, limit: Duration) -> (String, bool) {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (String::from_utf8_lossy(&got).into_owned(), true)
            }
            Err(_) => {}
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), false)
}

fn connect(s: &Server) -> std::net::TcpStream {
    std::net::TcpStream::connect(s.base.trim_start_matches("http://")).unwrap()
}

/// Partial headers, a body trickled in, and a body cut short each held a connection past 65 s
/// (300 of them exhausted file descriptors); `Expect: 100-continue` with a Content-Length of
/// 10^11 was answered "100 Continue".
#[test]
fn slow_and_oversized_requests_are_cut_off() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &flags(&["--header-timeout-s", "2", "--body-timeout-s", "2"]),
        &[],
    );
    let mut partial = connect(&s);
    partial
        .write_all(b"POST /classify HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let (_, closed) = read_until_closed(&mut partial, Duration::from_secs(15));
    assert!(closed, "partial headers held the connection for 15 s");

    let mut short = connect(&s);
    short
        .write_all(
            b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{\"classes\"",
        )
        .unwrap();
    let (text, _) = read_until_closed(&mut short, Duration::from_secs(15));
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");

    let mut huge = connect(&s);
    huge.write_all(
        b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100000000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let (text, _) = read_until_closed(&mut huge, Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    assert!(!text.contains("100 Continue"), "{text:?}");
    assert_eq!(s.get("/readyz").0, 200);
}

/// Connections past `max_connections` wait for a free slot instead of taking a descriptor each.
#[test]
fn connections_past_the_limit_wait_for_a_slot() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &flags(&["--max-connections", "3", "--header-timeout-s", "30"]),
        &[],
    );
    let idle: Vec<_> = (0..3).map(|_| connect(&s)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let waited = quick.get(format!("{}/healthz", s.base)).send();
    assert!(
        waited.is_err(),
        "a fourth connection was served: {waited:?}"
    );
    drop(idle);
    let r = quick.get(format!("{}/healthz", s.base)).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

fn big_png(w: u32, h: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(w, h, image::Rgb([shade, 255 - shade, shade / 2]));
    common::encode_png(&img)
}

fn wait_status(s: &Server, id: &str, want: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let (_, c) = s.get(&format!("/compositions/{id}"));
        if c["status"] == want {
            return c;
        }
        assert!(Instant::now() < deadline, "not {want}: {c}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A learning job's examples were kept decoded at full size: 40 PNGs of 4096×4096 in a 3 MiB
/// request took the server from 74 MiB to 2 GiB. They are kept at the model's input size, and
/// what they take then is bounded (max_job_mib) before the job is accepted.
#[test]
fn a_job_holds_its_examples_at_the_model_input_size_within_a_stated_bound() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &flags(&["--max-job-mib", "1"]),
        &[],
    );
    let examples: Vec<Value> = (0..24)
        .map(|i| json!({"image": b64(&big_png(3000, 3000, i as u8 * 10)), "label": i % 4}))
        .collect();
    let body = json!({"objective": "few_shot", "task_vectors": TV_NAMES,
        "tasks": [{"classes": CLASSES, "examples": examples}],
        "config": {"epochs": 1000, "batch_size": 4}});
    let (code, c) = s.post("/compositions", &body);
    assert_eq!(code, 202, "{c}");
    let id = c["id"].as_str().unwrap();
    wait_status(&s, id, "running", Duration::from_secs(60));
    // Decoded at full size, the 24 images alone would be 24 × 27 MB.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut peak: f64 = 0.0;
    while Instant::now() < deadline {
        peak = peak.max(s.rss_mib());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(peak < 400.0, "RSS {peak:.0} MiB while the job learns");

    // 300 examples 4:1 wide keep 3 × 32 × 128 bytes each: more than the 1 MiB allowed.
    let wide: Vec<Value> = (0..300)
        .map(|i| json!({"image": b64(&big_png(512, 128, i as u8)), "label": i % 4}))
        .collect();
    let body = json!({"objective": "few_shot", "task_vectors": TV_NAMES,
        "tasks": [{"classes": CLASSES, "examples": wide}]});
    let (code, p) = s.post("/compositions", &body);
    assert_eq!(code, 413, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("max_job_mib"), "{p}");
}

/// A job that killed the server was requeued at every start and killed it again: one request,
/// a permanent crash loop. Found running after three abrupt stops, it fails, saying why.
#[test]
fn a_job_the_server_dies_under_three_times_ends_failed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut s = start(&data, &tiny_flags(), &[]);
    let (code, c) = s.post("/compositions", &job(1000));
    assert_eq!(code, 202, "{c}");
    let id = c["id"].as_str().unwrap().to_string();
    for _ in 0..2 {
        wait_status(&s, &id, "running", Duration::from_secs(60));
        s.kill();
        s = start(&data, &tiny_flags(), &[]);
    }
    wait_status(&s, &id, "running", Duration::from_secs(60));
    s.kill();
    let s = start(&data, &tiny_flags(), &[]);
    let c = wait_status(&s, &id, "failed", Duration::from_secs(10));
    assert!(c["error"].as_str().unwrap().contains("3 times"), "{c}");
}

/// At `--dtype f16` an explicit coefficient of 100 answered 200 with `"probability": null` for
/// every class. Logits and softmax run in f32, and a model whose outputs still overflow the
/// serving dtype is a 409 that says so, never a 200 without numbers.
#[test]
fn large_coefficients_at_f16_never_answer_null_probabilities() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &flags(&["--dtype", "f16"]), &[]);
    let mut refused = 0;
    for lambda in [1.0, 100.0, 1e4] {
        let (code, c) = s.post(
            "/compositions",
            &json!({"task_vectors": TV_NAMES, "coefficients": [lambda, lambda]}),
        );
        assert_eq!(code, 201, "{c}");
        let (code, r) = s.post(
            "/classify",
            &json!({"composition": c["id"], "classes": CLASSES, "images": [b64(&png(5))]}),
        );
        match code {
            200 => {
                let preds = r["predictions"][0].as_array().unwrap();
                assert!(
                    preds.iter().all(|p| p["probability"].is_f64()),
                    "λ = {lambda}: {r}"
                );
            }
            409 => {
                assert!(r["detail"].as_str().unwrap().contains("overflow"), "{r}");
                refused += 1;
            }
            _ => panic!("λ = {lambda}: {code} {r}"),
        }
    }
    assert!(refused < 3, "even λ = 1 was refused");
}

/// Adding a different task vector under a name a composition uses served the old composition
/// with the new weights, with 200. A composition is bound to its vectors' digests.
#[test]
fn a_composition_is_never_served_with_a_different_vector_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let (data, lib) = (dir.path().join("data"), dir.path().join("lib"));
    std::fs::create_dir(&lib).unwrap();
    std::fs::copy(fixtures().join(TVS[0]), lib.join("x.safetensors")).unwrap();
    let flags = library_flags(&lib);
    let s = start(&data, &flags, &[]);
    let (code, c) = s.post(
        "/compositions",
        &json!({"task_vectors": ["x"], "coefficients": [0.5]}),
    );
    assert_eq!(code, 201, "{c}");
    let digest = c["provenance"]["task_vector_digests"][0].as_str().unwrap();
    let classify = json!({"composition": c["id"], "classes": CLASSES, "images": [b64(&png(7))]});
    assert_eq!(s.post("/classify", &classify).0, 200);
    assert!(s.terminate().success());

    std::fs::copy(fixtures().join(TVS[1]), lib.join("x.safetensors")).unwrap();
    let s = start(&data, &flags, &[]);
    let (code, p) = s.post("/classify", &classify);
    assert_eq!(code, 409, "{p}");
    let detail = p["detail"].as_str().unwrap();
    let (_, now) = s.get("/task-vectors/x");
    let new_digest = now["digest"].as_str().unwrap();
    assert_ne!(digest, new_digest);
    assert!(
        detail.contains(digest) && detail.contains(new_digest),
        "{detail}"
    );
}

/// Task vectors added from a checkpoint were not kept across a restart (a composition that got
/// 201 then answered 409, queued jobs failed); an empty uploaded file (a power loss before the
/// data reached the disk) stopped the server from starting at all.
#[test]
fn every_library_entry_survives_a_restart_and_an_unreadable_one_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (data, lib) = (dir.path().join("data"), dir.path().join("lib"));
    common::copy_dir(&fixtures().join("ft_a"), &lib.join("ft_a"));
    // In a subfolder: not loaded at start, so it is added over HTTP only.
    std::fs::create_dir_all(lib.join("sub")).unwrap();
    std::fs::copy(fixtures().join(TVS[0]), lib.join("sub/c.safetensors")).unwrap();
    let flags = library_flags(&lib);
    let s = start(&data, &flags, &[]);
    let added = [
        json!({"name": "from-checkpoint", "checkpoint": "ft_a"}),
        json!({"name": "from-file", "file": "sub/c.safetensors"}),
        json!({"name": "uploaded", "safetensors": b64(&std::fs::read(fixtures().join(TVS[1])).unwrap())}),
    ];
    let mut digests = Vec::new();
    for body in &added {
        let (code, tv) = s.post("/task-vectors", body);
        assert_eq!(code, 201, "{tv}");
        digests.push((tv["name"].clone(), tv["digest"].clone()));
    }
    let names: Vec<&Value> = digests.iter().map(|d| &d.0).collect();
    let (code, c) = s.post(
        "/compositions",
        &json!({"task_vectors": names, "coefficients": [0.3, 0.3, 0.3]}),
    );
    assert_eq!(code, 201, "{c}");
    drop(s.kill());

    let s = start(&data, &flags, &[]);
    for (name, digest) in &digests {
        let (code, tv) = s.get(&format!("/task-vectors/{}", name.as_str().unwrap()));
        assert_eq!(code, 200, "{name} is gone after a restart: {tv}");
        assert_eq!(&tv["digest"], digest, "{name}");
    }
    let classify = json!({"composition": c["id"], "classes": CLASSES, "images": [b64(&png(9))]});
    let (code, r) = s.post("/classify", &classify);
    assert_eq!(code, 200, "{r}");
    assert!(s.terminate().success());

    // The upload's file (named after it and its digest) empty, as a power loss before fsync
    // could leave it.
    let file = std::fs::read_dir(data.join("task-vectors"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .find(|n| n.starts_with("uploaded.") && n.ends_with(".safetensors"))
        .unwrap();
    std::fs::write(data.join("task-vectors").join(&file), b"").unwrap();
    let s = start(&data, &flags, &[]);
    assert_eq!(s.get("/task-vectors/uploaded").0, 404);
    assert_eq!(s.get("/task-vectors/from-checkpoint").0, 200);
    assert!(data.join("task-vectors/quarantine").join(&file).exists());
    assert!(s.log_text().contains("quarantine"), "{}", s.log_text());
    let (code, r) = s.post("/classify", &classify);
    assert_eq!(code, 409, "{r}");
    assert!(r["detail"].as_str().unwrap().contains("uploaded"), "{r}");
}

/// A 60 MiB JSON array of numbers cost 1.1 GiB before its 400 (18 times the body): a body's
/// values and nesting are counted from its bytes before it is parsed.
#[test]
fn a_json_body_of_many_small_values_is_refused_before_it_is_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &tiny_flags(), &[]);
    let before = s.rss_mib();
    let numbers = "0,".repeat(12_000_000);
    let body = format!("{{\"classes\": [\"a\", \"b\"], \"images\": [], \"x\": [{numbers}0]}}");
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/compositions", s.base))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let p: Value = r.json().unwrap();
    assert!(p["detail"].as_str().unwrap().contains("values"), "{p}");
    let grew = s.rss_mib() - before;
    assert!(grew < 120.0, "RSS grew {grew:.0} MiB for a 24 MB body");
}

/// Heads were built on the engine thread: 1,000 classes × 10 long templates held every other
/// client for 24 s. Heads are built on a thread of their own; a classification whose head
/// and composition are ready does not wait for another request's head.
#[test]
fn building_a_large_head_does_not_stall_requests_with_ready_heads() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &tiny_flags(), &[]);
    let ready = json!({"classes": CLASSES, "images": [b64(&png(3))]});
    assert_eq!(s.post("/classify", &ready).0, 200);
    let words = "a very long description of a picture with many words in it ".repeat(15);
    let classes: Vec<String> = (0..300).map(|i| format!("class {i} {words}")).collect();
    let templates: Vec<String> = (0..10).map(|i| format!("{i} {words} {{}}")).collect();
    let big = json!({"classes": classes, "templates": templates, "images": [b64(&png(4))]});
    let (big_took, victims) = std::thread::scope(|scope| {
        let builder = scope.spawn(|| {
            let t = Instant::now();
            let (code, r) = s.post("/classify", &big);
            assert_eq!(code, 200, "{r}");
            t.elapsed()
        });
        std::thread::sleep(Duration::from_millis(100));
        let mut victims = Vec::new();
        while !builder.is_finished() {
            let t = Instant::now();
            assert_eq!(s.post("/classify", &ready).0, 200);
            victims.push(t.elapsed());
        }
        (builder.join().unwrap(), victims)
    });
    let slowest = victims.iter().max().copied().unwrap_or_default();
    eprintln!(
        "a head of 3,000 prompts built in {big_took:?}; meanwhile {} ready requests, slowest {slowest:?}",
        victims.len()
    );
    assert!(
        !victims.is_empty(),
        "the large head was built in {big_took:?}"
    );
    assert!(
        slowest < big_took / 2,
        "a ready request took {slowest:?} while a head took {big_took:?} to build"
    );
}

/// 1,000 subscribers to /events used 1.75 cores, each woken by every job's events: open event
/// streams are bounded (256), past that a 429 with Retry-After, and a closed stream frees its
/// slot.
#[test]
fn event_streams_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &tiny_flags(), &[]);
    let (code, c) = s.post(
        "/compositions",
        &json!({"task_vectors": [TV_NAMES[0]], "coefficients": [0.5]}),
    );
    assert_eq!(code, 201);
    let (_, job) = s.post("/compositions", &job(1000));
    let url = format!(
        "{}/compositions/{}/events",
        s.base,
        job["id"].as_str().unwrap()
    );
    let client = reqwest::blocking::Client::builder()
        .timeout(None)
        .build()
        .unwrap();
    let open: Vec<_> = (0..256)
        .map(|i| {
            let r = client.get(&url).send().unwrap();
            assert_eq!(r.status().as_u16(), 200, "stream {i}");
            r
        })
        .collect();
    let refused = client.get(&url).send().unwrap();
    assert_eq!(refused.status().as_u16(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = client.get(&url).send().unwrap();
        if r.status().as_u16() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(100));
    }
    // An ended composition's stream is one event, then closed: it needs no slot for long.
    let ended = format!(
        "{}/compositions/{}/events",
        s.base,
        c["id"].as_str().unwrap()
    );
    assert_eq!(client.get(ended).send().unwrap().status().as_u16(), 200);
}

/// Heads and the library grew without bound: 2,000 POST /heads of 1,000 classes added 406 MB
/// to the database with no way to delete a head, and one checkpoint added under 1,000 names
/// stored 1,000 copies.
#[test]
fn stored_heads_are_bounded_and_deletable_and_a_task_vector_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &flags(&["--max-heads", "3"]), &[]);
    let head = |i: usize| json!({"classes": [format!("class {i}"), "other"]});
    let mut ids = Vec::new();
    for i in 0..3 {
        let (code, h) = s.post("/heads", &head(i));
        assert_eq!(code, 201, "{h}");
        ids.push(h["id"].as_str().unwrap().to_string());
    }
    assert_eq!(s.post("/heads", &head(0)).0, 200, "the same head again");
    let (code, p) = s.post("/heads", &head(3));
    assert_eq!(code, 409, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("max_heads"), "{p}");
    assert_eq!(s.delete(&format!("/heads/{}", ids[0])).0, 204);
    assert_eq!(s.get(&format!("/heads/{}", ids[0])).0, 404);
    assert_eq!(s.delete(&format!("/heads/{}", ids[0])).0, 404);
    assert_eq!(s.post("/heads", &head(3)).0, 201);

    let bytes = b64(&std::fs::read(fixtures().join(TVS[0])).unwrap());
    let (code, p) = s.post(
        "/task-vectors",
        &json!({"name": "again", "safetensors": bytes}),
    );
    assert_eq!(code, 409, "{p}");
    assert!(p["detail"].as_str().unwrap().contains(TV_NAMES[0]), "{p}");
    let stored = std::fs::read_dir(s.data.join("task-vectors"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_file())
        .count();
    assert_eq!(stored, 0, "a refused task vector left a file");
}

/// Error details showed absolute server paths (of the library directory and the data
/// directory): a client is told which of its names was wrong, not where the server keeps it.
#[test]
fn error_details_do_not_show_the_servers_paths() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib");
    std::fs::create_dir_all(lib.join("not-a-checkpoint")).unwrap();
    // In a subfolder: a broken file at the top would stop the server from starting.
    std::fs::create_dir_all(lib.join("sub")).unwrap();
    let broken = b"\x08\x00\x00\x00\x00\x00\x00\x00{}";
    std::fs::write(lib.join("sub/broken.safetensors"), broken).unwrap();
    let s = start(&dir.path().join("data"), &library_flags(&lib), &[]);
    let root = std::fs::canonicalize(dir.path())
        .unwrap()
        .display()
        .to_string();
    for body in [
        json!({"name": "a", "checkpoint": "not-a-checkpoint"}),
        json!({"name": "b", "file": "sub/broken.safetensors"}),
        json!({"name": "c", "safetensors": b64(b"not safetensors at all")}),
    ] {
        let (code, p) = s.post("/task-vectors", &body);
        assert_eq!(code, 400, "{p}");
        let detail = p["detail"].as_str().unwrap();
        assert!(!detail.contains(&root), "{detail}");
    }
}

/// Runs the binary's `args` to completion (a subcommand other than `serve`).
fn atlas(args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_atlas-serve"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {out:?}");
}

/// Compositions were composed on the engine thread: every request for a model already resident
/// waited behind each cache miss queued ahead of it. Models are composed on a thread of their
/// own (one at a time, on the background pool): while six misses of a ViT-B/32 compose, requests
/// for a resident composition keep being answered.
#[test]
fn composing_models_does_not_stall_requests_for_resident_ones() {
    let dir = tempfile::tempdir().unwrap();
    let d = |p: &str| dir.path().join(p).display().to_string();
    atlas(&[
        "bench",
        "write-model",
        "--vision",
        "B/32",
        "--out",
        &d("base"),
    ]);
    atlas(&[
        "bench",
        "write-model",
        "--vision",
        "B/32",
        "--seed",
        "1",
        "--out",
        &d("ft"),
    ]);
    let tv = d("t1.safetensors");
    atlas(&[
        "task-vector",
        "build",
        "--base",
        &d("base"),
        "--finetuned",
        &d("ft"),
        "--name",
        "t1",
        "--out",
        &tv,
    ]);
    std::fs::remove_dir_all(d("ft")).unwrap();
    let flags: Vec<String> = ["--model", &d("base"), "--tvs", &tv, "--cache-mib", "1024"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let s = start(&dir.path().join("data"), &flags, &[]);
    let create = |c: f64| {
        let (code, r) = s.post(
            "/compositions",
            &json!({"task_vectors": ["t1"], "coefficients": [c]}),
        );
        assert_eq!(code, 201, "{r}");
        r["id"].as_str().unwrap().to_string()
    };
    let classify = |id: &str| {
        // Words of the demo vocabulary, which the written model's tokenizer knows.
        let body = json!({"composition": id, "classes": ["red", "blue"], "images": [b64(&png(5))]});
        let t = Instant::now();
        let (code, r) = s.post("/classify", &body);
        assert_eq!(code, 200, "{r}");
        t.elapsed()
    };
    let resident = create(0.01);
    classify(&resident);
    let misses: Vec<String> = (1..=6).map(|i| create(0.01 + i as f64 * 1e-3)).collect();
    let (misses_took, victims) = std::thread::scope(|scope| {
        let started = Instant::now();
        let handles: Vec<_> = misses
            .iter()
            .map(|id| scope.spawn(move || classify(id)))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let mut victims = Vec::new();
        while handles.iter().any(|h| !h.is_finished()) {
            victims.push(classify(&resident));
        }
        for h in handles {
            h.join().unwrap();
        }
        (started.elapsed(), victims)
    });
    let slowest = victims.iter().max().copied().unwrap_or_default();
    eprintln!(
        "six compositions served in {misses_took:?}; meanwhile {} requests for a resident one, \
         slowest {slowest:?}",
        victims.len()
    );
    assert!(victims.len() >= 2, "the misses took {misses_took:?}");
    assert!(
        slowest < misses_took / 2,
        "a resident composition took {slowest:?} while six misses took {misses_took:?}"
    );
}

/// 256 images of 4096x4096 in one 19 MiB request took 20 CPU-seconds to decode. A request's
/// images may hold `max_request_pixels` together, checked from their headers before any is
/// decoded: past it, a 413 that names the setting.
#[test]
fn a_requests_decoding_work_is_bounded_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &flags(&["--max-request-pixels", "5000000"]),
        &[],
    );
    let big = b64(&big_png(3000, 1000, 7));
    let two = json!({"classes": CLASSES, "images": [big, big]});
    let t = Instant::now();
    let (code, r) = s.post("/classify", &two);
    assert_eq!(code, 413, "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("max_request_pixels"),
        "{r}"
    );
    eprintln!("refused in {:?}", t.elapsed());
    let one = json!({"classes": CLASSES, "images": [big]});
    assert_eq!(s.post("/classify", &one).0, 200);
}

/// Fills the file system under `dir` with one file, to the last byte it takes.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![7u8; 64 << 10];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.kind(), std::io::ErrorKind::StorageFull, "{e}");
            return path;
        }
    }
}

/// A full disk left a job "running" with no progress, a cancel of it answered 202 and did
/// nothing, and the half-written examples of a refused job (jobs/<id>.tmp) stayed. The server
/// runs on a small tmpfs of its own (a mount namespace, so no privileges are needed): when it
/// fills, a new job is a 507 that leaves nothing behind, the running job ends failed saying why,
/// and once space is freed jobs run again.
#[test]
fn a_full_disk_fails_jobs_with_the_reason_and_leaves_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mount = "mount -t tmpfs -o size=24m tmpfs \"$1\" && shift && exec \"$@\"";
    let under: Vec<String> = [
        "unshare",
        "--user",
        "--map-root-user",
        "--mount",
        "sh",
        "-c",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([mount.to_string(), "sh".into(), data.display().to_string()])
    .collect();
    let s = common::start_under(&under, &data, &tiny_flags(), &[]);
    // The server's view of its data directory: the tmpfs, through its mount namespace.
    let seen = std::path::PathBuf::from(format!("/proc/{}/root{}", s.pid(), data.display()));
    let (code, running) = s.post("/compositions", &job(1000));
    assert_eq!(code, 202, "{running}");
    let id = running["id"].as_str().unwrap();
    wait_status(&s, id, "running", Duration::from_secs(60));
    let filler = fill(&seen);

    let (code, r) = s.post("/compositions", &job(1));
    assert_eq!(code, 507, "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("disk is full"),
        "{r}"
    );
    let left: Vec<String> = std::fs::read_dir(seen.join("jobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "half-written examples left: {left:?}");

    // The job notices at its next write (progress or checkpoint); its end is recorded at the
    // latest once space is freed.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::remove_file(filler).unwrap();
    let ended = s.wait_final(id, Duration::from_secs(60));
    assert_eq!(ended["status"], "failed", "{ended}");
    let why = ended["error"].as_str().unwrap();
    eprintln!("the running job ended failed: {why}");
    assert!(why.contains("space") || why.contains("full"), "{ended}");
    assert_eq!(
        s.post(&format!("/compositions/{id}/cancel"), &json!({})).0,
        409
    );

    let (code, again) = s.post("/compositions", &job(1));
    assert_eq!(code, 202, "{again}");
    let done = s.wait_final(again["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
}

/// A classification waited for its head without a bound: a head of many long prompts held its
/// client for as long as it took to build. `request_timeout_s` bounds the whole answer (head,
/// composition and forward pass): past it a 503 with Retry-After, while the head goes on being
/// built and cached, so that a retry is answered.
#[test]
fn a_slow_head_answers_503_within_the_request_timeout_and_a_retry_finds_it_built() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(
        &dir.path().join("data"),
        &flags(&["--request-timeout-s", "1"]),
        &[],
    );
    let words = "a very long description of a picture with many words in it ".repeat(15);
    let classes: Vec<String> = (0..200).map(|i| format!("class {i} {words}")).collect();
    let templates: Vec<String> = (0..20).map(|i| format!("{i} {words} {{}}")).collect();
    let big = json!({"classes": classes, "templates": templates, "images": [b64(&png(4))]});
    let t = Instant::now();
    let (code, r) = s.post("/classify", &big);
    let took = t.elapsed();
    assert_eq!(code, 503, "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("request_timeout_s"),
        "{r}"
    );
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (code, r) = s.post("/classify", &big);
        if code == 200 {
            break;
        }
        assert_eq!(code, 503, "{r}");
        assert!(Instant::now() < deadline, "the head was never built");
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "refused after {took:?}; built and answered within {:?}",
        t.elapsed()
    );
}

/// 431 and 414 answers had empty bodies (hyper's own). A request target or header section over
/// the server's bounds is refused with a problem that names the bound.
#[test]
fn a_long_target_or_large_headers_get_a_problem_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &tiny_flags(), &[]);
    let (code, r) = s.get(&format!("/compositions?status={}", "a".repeat(9000)));
    assert_eq!(code, 414, "{r}");
    assert!(
        r["detail"].as_str().unwrap().contains("at most 8192"),
        "{r}"
    );
    let client = reqwest::blocking::Client::new();
    let mut many = reqwest::blocking::Client::new().get(format!("{}/healthz", s.base));
    for i in 0..70 {
        many = many.header(format!("x-extra-{i}"), "1");
    }
    let large = client
        .get(format!("{}/healthz", s.base))
        .header("x-large", "b".repeat(40 << 10));
    for req in [many, large] {
        let r = req.send().unwrap();
        assert_eq!(r.status().as_u16(), 431);
        assert_eq!(common::content_type(&r), "application/problem+json");
        let v: Value = r.json().unwrap();
        assert!(
            v["detail"].as_str().unwrap().contains("header fields"),
            "{v}"
        );
    }
    assert_eq!(s.get("/healthz").0, 200);
}

/// What a classify request at its bounds costs in memory: images of `max_request_pixels`
/// (64 Mi pixels: four of 4096x4096) are decoded a pool thread at a time and kept at the model's
/// input size, so the server's resident memory grows by a few decoded images, not by all of
/// them at full size. The README's per-request figure comes from this test.
#[test]
fn a_classify_request_at_its_pixel_bound_takes_a_bounded_amount_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(&dir.path().join("data"), &tiny_flags(), &[]);
    let small = json!({"classes": CLASSES, "images": [b64(&png(3))]});
    assert_eq!(s.post("/classify", &small).0, 200);
    let before = s.rss_mib();
    let images: Vec<String> = (0..4).map(|i| b64(&big_png(4096, 4096, i * 40))).collect();
    let body = json!({"classes": CLASSES, "images": images});
    let peak = std::thread::scope(|scope| {
        let request = scope.spawn(|| s.post("/classify", &body));
        let mut peak = before;
        while !request.is_finished() {
            peak = peak.max(s.rss_mib());
            std::thread::sleep(Duration::from_millis(20));
        }
        let (code, r) = request.join().unwrap();
        assert_eq!(code, 200, "{r}");
        peak.max(s.rss_mib())
    });
    eprintln!("4 images of 4096x4096 in one request: RSS {before:.0} MiB -> peak {peak:.0} MiB");
    // One decoded 4096x4096 RGB image is 48 MiB; all four at once would be 192 MiB.
    assert!(peak - before < 160.0, "RSS {before:.0} -> {peak:.0} MiB");
}
