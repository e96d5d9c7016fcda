//! Several real server processes on loopback sharing one PostgreSQL (a cluster the tests start)
//! and one blob directory: what one replica acknowledges, the others serve; jobs are claimed by
//! any replica, followed and cancelled from any, and finished by another when the replica
//! running them dies.

mod common;

use common::{b64, png, postgres, start, tiny_flags, Server, TV_NAMES};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const CLASSES: [&str; 4] = ["a photo of red", "green", "blue", "yellow"];
/// Short leases, so that a dead replica's jobs are resumed within seconds.
const LEASE_S: &str = "3";

/// One shared database and blob directory; each replica has a data directory of its own.
struct Cluster {
    dir: tempfile::TempDir,
    url: String,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            dir: tempfile::tempdir().unwrap(),
            url: postgres::database(),
        }
    }

    fn blobs(&self) -> PathBuf {
        self.dir.path().join("blobs")
    }

    fn start(&self, name: &str) -> Server {
        self.start_with(name, &[])
    }

    fn start_with(&self, name: &str, extra: &[&str]) -> Server {
        let mut flags = tiny_flags();
        flags.extend(
            [
                "--database-url",
                &self.url,
                "--blob-dir",
                self.blobs().to_str().unwrap(),
                "--replica",
                name,
                "--job-lease-s",
                LEASE_S,
            ]
            .iter()
            .chain(extra)
            .map(|s| s.to_string()),
        );
        start(&self.dir.path().join(name), &flags, &[])
    }
}

fn job(epochs: usize, n: usize) -> Value {
    let examples: Vec<Value> = (0..n)
        .map(|i| json!({"image": b64(&png((i * 13 % 256) as u8)), "label": i % 4}))
        .collect();
    json!({"objective": "few_shot", "task_vectors": TV_NAMES,
        "tasks": [{"classes": CLASSES, "examples": examples}],
        "config": {"epochs": epochs, "batch_size": 4, "seed": 7}})
}

fn classify(s: &Server, composition: &str) -> (u16, Value) {
    s.post(
        "/classify",
        &json!({"composition": composition, "classes": CLASSES,
            "images": [b64(&png(3)), b64(&png(90))]}),
    )
}

fn wait_until(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

/// A composition made on one replica is served by the others, with the same probabilities.
#[test]
fn replicas_serve_what_any_of_them_acknowledged() {
    let c = Cluster::new();
    let (a, b, d) = (c.start("a"), c.start("b"), c.start("c"));
    let (code, comp) = a.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.4, -0.3]}),
    );
    assert_eq!(code, 201, "{comp}");
    let on_a = classify(&a, &id(&comp));
    let on_b = classify(&b, &id(&comp));
    assert_eq!(on_a.0, 200, "{}", on_a.1);
    assert_eq!(on_a.1["predictions"], on_b.1["predictions"]);
    assert_eq!(
        d.get(&format!("/compositions/{}", id(&comp))).1["coefficients"],
        comp["coefficients"]
    );
}

/// A task vector added on one replica (a merge's result) is usable on the others within a
/// second; deleted on another, it is gone from all within a second, caches included.
#[test]
fn a_task_vector_added_on_one_replica_is_usable_on_the_others_within_a_second() {
    let c = Cluster::new();
    let (a, b, d) = (c.start("a"), c.start("b"), c.start("c"));
    // A merge's result is a new task vector, stored by a.
    let (code, merged) = a.post(
        "/compositions",
        &json!({"method": "ties_merging", "task_vectors": TV_NAMES}),
    );
    assert_eq!(code, 201, "{merged}");
    let derived = merged["task_vectors"][0].as_str().unwrap().to_string();
    for s in [&b, &d] {
        let took = wait_until(
            Duration::from_secs(1),
            "the merge's task vector elsewhere",
            || s.get(&format!("/task-vectors/{derived}")).0 == 200,
        );
        eprintln!("derived task vector seen on another replica after {took:?}");
        let (code, r) = classify(s, &id(&merged));
        assert_eq!(code, 200, "{r}");
    }
    assert_eq!(d.delete(&format!("/compositions/{}", id(&merged))).0, 204);
    // Deleted on c: the composition is gone on a and b at once (their caches were told).
    for s in [&a, &b] {
        wait_until(Duration::from_secs(1), "the delete elsewhere", || {
            classify(s, &id(&merged)).0 == 404
        });
    }
    assert_eq!(d.delete(&format!("/task-vectors/{derived}")).0, 204);
    for s in [&a, &b] {
        wait_until(
            Duration::from_secs(1),
            "the task vector's delete elsewhere",
            || s.get(&format!("/task-vectors/{derived}")).0 == 404,
        );
    }
}

/// A job submitted to a is followed on b's event stream and cancelled from c; the replica that
/// ran it stops it.
#[test]
fn a_job_is_followed_on_one_replica_and_cancelled_from_another() {
    let c = Cluster::new();
    let (a, b, d) = (c.start("a"), c.start("b"), c.start("c"));
    let (code, j) = a.post("/compositions", &job(1000, 16));
    assert_eq!(code, 202, "{j}");
    let jid = id(&j);
    wait_until(Duration::from_secs(60), "the job running", || {
        b.get(&format!("/compositions/{jid}")).1["status"] == "running"
    });
    let events = std::thread::scope(|scope| {
        let followed = scope.spawn(|| b.events_until_final(&jid));
        // Some progress reaches b's stream before the cancel.
        std::thread::sleep(Duration::from_secs(2));
        let (code, r) = d.post(&format!("/compositions/{jid}/cancel"), &json!({}));
        assert_eq!(code, 202, "{r}");
        followed.join().unwrap()
    });
    assert!(
        events.iter().any(|e| e["progress"]["kind"] == "step"),
        "{events:?}"
    );
    assert_eq!(events.last().unwrap()["status"], "cancelled", "{events:?}");
    // The worker that ran it is free again: a short job now finishes.
    let (_, short) = a.post("/compositions", &job(1, 8));
    let done = d.wait_final(&id(&short), Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        b.get(&format!("/compositions/{jid}")).1["status"],
        "cancelled"
    );
}

/// SIGKILL of the replica running a job: once its lease expires another replica resumes the job
/// from its last checkpoint and ends with the Λ of an uninterrupted run.
#[test]
fn a_killed_replicas_job_is_finished_by_another_from_its_checkpoint() {
    let c = Cluster::new();
    let a = c.start("a");
    // Long enough that a is still at it when killed after its first epoch, on a fast machine.
    let (_, whole) = a.post("/compositions", &job(40, 32));
    let whole = a.wait_final(&id(&whole), Duration::from_secs(600));
    assert_eq!(whole["status"], "succeeded", "{whole}");

    let (_, j) = a.post("/compositions", &job(40, 32));
    let jid = id(&j);
    wait_until(Duration::from_secs(120), "the job running on a", || {
        a.get(&format!("/compositions/{jid}")).1["status"] == "running"
    });
    // Started now, b finds the job under a's lease and leaves it.
    let b = c.start("b");
    wait_until(Duration::from_secs(120), "an epoch checkpoint", || {
        let v = a.get(&format!("/compositions/{jid}")).1;
        v["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["kind"] == "epoch"))
    });
    a.kill();
    let killed = Instant::now();
    let done = b.wait_final(&jid, Duration::from_secs(300));
    eprintln!(
        "the job finished on b {:?} after a was killed",
        killed.elapsed()
    );
    assert_eq!(done["status"], "succeeded", "{done}");
    let kinds: Vec<&str> = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(kinds.contains(&"resumed"), "{kinds:?}");
    assert_eq!(done["coefficients"], whole["coefficients"]);
    assert!(b
        .metrics()
        .contains("atlas_job_claims_total{how=\"expired\"} 1"));
}

/// 1,000 concurrent creates spread over three replicas: every 201 is there once; an
/// idempotency key reused on two replicas gives one job.
#[test]
fn concurrent_creates_over_replicas_lose_nothing_and_keys_hold_across_them() {
    let c = Cluster::new();
    let replicas = [c.start("a"), c.start("b"), c.start("c")];
    let created: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..20)
            .map(|w| {
                let s = &replicas[w % 3];
                scope.spawn(move || {
                    (0..50)
                        .map(|i| {
                            let (code, v) = s.post(
                                "/compositions",
                                &json!({"name": format!("c{w}-{i}"), "task_vectors": TV_NAMES,
                                    "coefficients": [0.01 * i as f64, 0.1]}),
                            );
                            assert_eq!(code, 201, "{v}");
                            id(&v)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert_eq!(created.len(), 1000);
    let mut listed = Vec::new();
    let mut offset = 0;
    loop {
        let (_, page) = replicas[1].get(&format!("/compositions?limit=500&offset={offset}"));
        listed.extend(page["items"].as_array().unwrap().iter().map(id));
        match page["next_offset"].as_u64() {
            Some(n) => offset = n as usize,
            None => break,
        }
    }
    let mut want = created.clone();
    want.sort();
    listed.sort();
    assert_eq!(listed, want, "every acknowledged composition, once");

    let body = job(1, 8);
    let keyed: Vec<Value> = std::thread::scope(|scope| {
        let posts: Vec<_> = replicas[..2]
            .iter()
            .map(|s| {
                let body = &body;
                scope.spawn(move || {
                    s.post_with("/compositions", |r| {
                        r.header("Idempotency-Key", "shared-key").json(body)
                    })
                })
            })
            .collect();
        posts.into_iter().map(|p| p.join().unwrap().1).collect()
    });
    assert_eq!(id(&keyed[0]), id(&keyed[1]), "{keyed:?}");
}

/// Everything acknowledged survives stopping every replica, cleanly and by SIGKILL, and
/// starting them again: compositions, heads, stored task vectors, finished jobs.
#[test]
fn everything_survives_stopping_all_replicas_and_starting_them_again() {
    let c = Cluster::new();
    let (a, b) = (c.start("a"), c.start("b"));
    let (_, comp) = a.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.3, 0.2]}),
    );
    let (_, merged) = b.post(
        "/compositions",
        &json!({"method": "task_arithmetic", "task_vectors": TV_NAMES}),
    );
    let (_, head) = a.post("/heads", &json!({"classes": CLASSES}));
    let (_, j) = b.post("/compositions", &job(2, 8));
    let j = b.wait_final(&id(&j), Duration::from_secs(120));
    let before: Vec<Value> = [&comp, &merged, &j]
        .iter()
        .map(|x| classify(&a, &id(x)).1)
        .collect();
    a.terminate();
    b.kill();
    let (a, b) = (c.start("a"), c.start("b"));
    for (x, want) in [&comp, &merged, &j].iter().zip(&before) {
        assert_eq!(&classify(&b, &id(x)).1, want);
    }
    assert_eq!(a.get(&format!("/heads/{}", id(&head))).0, 200);
    assert_eq!(b.get(&format!("/compositions/{}", id(&j))).1, j);
    a.kill();
    b.kill();
    let a = c.start("a");
    assert_eq!(classify(&a, &id(&merged)).1, before[1]);
}

/// A database outage: /readyz and mutating routes answer 503 with Retry-After while
/// /classify on a composition already resident keeps answering; all recover with the database.
#[test]
fn a_database_outage_is_a_503_and_resident_compositions_keep_serving() {
    let c = Cluster::new();
    let a = c.start("a");
    let (_, comp) = a.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.3, 0.2]}),
    );
    let served = classify(&a, &id(&comp));
    assert_eq!(served.0, 200);
    let db = c.url.rsplit('/').next().unwrap().to_string();
    let admin = |sql: &str| {
        let url = postgres::cluster().url("postgres");
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap();
        client.batch_execute(sql).unwrap();
    };
    admin(&format!(
        "ALTER DATABASE {db} ALLOW_CONNECTIONS false;
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}';"
    ));
    let t0 = Instant::now();
    let r = reqwest::blocking::get(format!("{}/readyz", a.base)).unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let (code, r) = a.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.1, 0.1]}),
    );
    assert_eq!(code, 503, "{r}");
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "answered within the connect timeout"
    );
    assert_eq!(
        classify(&a, &id(&comp)),
        served,
        "resident compositions keep serving"
    );
    assert!(a.metrics().contains("atlas_db_up 0"));
    admin(&format!("ALTER DATABASE {db} ALLOW_CONNECTIONS true"));
    wait_until(
        Duration::from_secs(15),
        "readiness after the outage",
        || {
            reqwest::blocking::get(format!("{}/readyz", a.base))
                .unwrap()
                .status()
                == 200
        },
    );
    let (code, r) = a.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.1, 0.1]}),
    );
    assert_eq!(code, 201, "{r}");
}

/// /classify on a composition and head the replica has served before makes no database round
/// trip (the only ones counted are the metrics scrape's own job count). A long lease keeps the
/// workers' and heartbeat's periodic round trips out of the window.
#[test]
fn classify_on_a_resident_composition_makes_no_database_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = tiny_flags();
    flags.extend(["--job-lease-s", "3600"].map(String::from));
    let s = start(&dir.path().join("data"), &flags, &[]);
    let (_, comp) = s.post(
        "/compositions",
        &json!({"task_vectors": TV_NAMES, "coefficients": [0.3, 0.2]}),
    );
    let (_, head) = s.post("/heads", &json!({"classes": CLASSES}));
    let body = json!({"composition": id(&comp), "head": id(&head), "images": [b64(&png(5))]});
    assert_eq!(s.post("/classify", &body).0, 200);
    let trips = |s: &Server| -> u64 {
        let m = s.metrics();
        let line = m
            .lines()
            .find(|l| l.starts_with("atlas_db_queries_total "))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let before = trips(&s);
    for _ in 0..20 {
        assert_eq!(s.post("/classify", &body).0, 200);
    }
    assert_eq!(trips(&s) - before, 1, "only the second scrape's job count");
}
