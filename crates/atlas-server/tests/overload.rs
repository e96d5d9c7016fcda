//! Overload: /classify driven on loopback at several times what the server sustains, with a
//! small queue. Bounded in requests and time. The server refuses the excess quickly with 429
//! and Retry-After instead of queueing it, admitted requests keep a bounded p99, memory stays
//! bounded, and it serves normally once the load stops.

mod common;

use common::{b64, png, start, tiny_flags, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const CLIENTS: usize = 48;
const MAX_REQUESTS: usize = 3000;
const LOAD: Duration = Duration::from_secs(4);

struct Answer {
    status: u16,
    retry_after: bool,
    latency: Duration,
}

fn send(client: &reqwest::blocking::Client, base: &str, body: &Value) -> Answer {
    let t0 = Instant::now();
    let r = client
        .post(format!("{base}/classify"))
        .json(body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r.headers().contains_key("retry-after");
    let _ = r.bytes();
    Answer {
        status,
        retry_after,
        latency: t0.elapsed(),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Requests per second one client gets when nothing else runs.
fn sustainable(s: &Server, body: &Value) -> f64 {
    let client = reqwest::blocking::Client::new();
    let t0 = Instant::now();
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(1) {
        assert_eq!(send(&client, &s.base, body).status, 200);
        n += 1;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn overload_is_refused_quickly_and_the_server_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = tiny_flags();
    for f in ["--queue", "4", "--max-batch", "8", "--max-wait-ms", "1"] {
        flags.push(f.into());
    }
    let s = start(&dir.path().join("data"), &flags, &[]);
    // Eight images a request: each fills a batch, so requests cannot share forward passes.
    let images: Vec<String> = (0..8).map(|i| b64(&png(i))).collect();
    let body = json!({"classes": ["a", "b", "c"], "images": images});
    let rate = sustainable(&s, &body);
    let rss_before = s.rss_mib();

    let started = Instant::now();
    let sent = std::sync::atomic::AtomicUsize::new(0);
    let answers: Vec<Answer> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..CLIENTS)
            .map(|_| {
                scope.spawn(|| {
                    let client = reqwest::blocking::Client::new();
                    let mut out = Vec::new();
                    while started.elapsed() < LOAD
                        && sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < MAX_REQUESTS
                    {
                        out.push(send(&client, &s.base, &body));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let rss_peak = s.rss_mib();

    let mut admitted: Vec<Duration> = Vec::new();
    let mut refused: Vec<Duration> = Vec::new();
    for a in &answers {
        match a.status {
            200 => admitted.push(a.latency),
            429 => {
                assert!(a.retry_after, "429 without Retry-After");
                refused.push(a.latency);
            }
            other => panic!("status {other} under load"),
        }
    }
    admitted.sort();
    refused.sort();
    let offered = answers.len() as f64 / elapsed;
    let (p50, p99) = (percentile(&admitted, 0.5), percentile(&admitted, 0.99));
    println!(
        "sustainable {rate:.0} req/s (one client); offered {offered:.0} req/s by {CLIENTS} clients: \
         {} requests, {} admitted, {} refused 429; admitted p50 {p50:?} p99 {p99:?}; \
         429 p99 {:?}; RSS {rss_before:.0} MiB before, {rss_peak:.0} MiB after load",
        answers.len(),
        admitted.len(),
        refused.len(),
        refused.last().map(|_| percentile(&refused, 0.99)),
    );
    assert!(!refused.is_empty(), "no 429 at {offered:.0} req/s");
    assert!(!admitted.is_empty());
    assert!(
        percentile(&refused, 0.99) < Duration::from_secs(1),
        "slow refusals"
    );
    // A queue of 4 batches ahead: an admitted request waits for a handful of forward passes.
    assert!(p99 < Duration::from_secs(5), "admitted p99 {p99:?}");
    assert!(
        rss_peak < rss_before + 512.0,
        "RSS {rss_before} -> {rss_peak} MiB"
    );

    // Recovery: once the load stops, requests are served again without refusals.
    let client = reqwest::blocking::Client::new();
    for _ in 0..20 {
        let a = send(&client, &s.base, &body);
        assert_eq!(a.status, 200);
        assert!(a.latency < Duration::from_secs(2), "{:?}", a.latency);
    }
    assert_eq!(s.get("/readyz").0, 200);
    assert!(!s.log_text().contains("panicked"));
}
