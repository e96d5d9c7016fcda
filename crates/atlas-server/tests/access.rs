//! Access with API keys configured, over every route openapi.yaml lists (tests/openapi.rs keeps
//! it in step with the router): mutating routes refuse a missing or wrong key with 401, read
//! routes follow auth_reads, probes stay open, and the keys never appear in answers or logs.

mod common;

use common::{spec, start, tiny_flags, Server};
use reqwest::Method;

const KEY: &str = "atlas-test-key-5f2c9d1e8b7a6043";
const OTHER: &str = "second-key-0a1b2c3d4e5f6a7b";

/// Every (method, path) of openapi.yaml, path parameters filled with a placeholder.
fn routes() -> Vec<(Method, String)> {
    let mut out = Vec::new();
    for (path, item) in spec::document()["paths"].as_object().unwrap() {
        let path = path.replace("{id}", "c-none").replace("{name}", "none");
        for method in item.as_object().unwrap().keys() {
            // Other keys of a path item (parameters, summary) are no methods.
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.push((method.to_uppercase().parse().unwrap(), path.clone()));
            }
        }
    }
    assert_eq!(out.len(), 19, "{out:?}");
    out
}

/// Status and body text of one request with the given bearer token (or none).
fn call(s: &Server, m: &Method, path: &str, token: Option<&str>) -> (u16, String) {
    let mut r = reqwest::blocking::Client::new()
        .request(m.clone(), format!("{}{path}", s.base))
        .header("content-type", "application/json")
        .body("{}");
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    // Event streams of a missing composition answer at once (404), so this cannot hang.
    let r = r
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.text().unwrap_or_default())
}

fn open_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics")
}

fn check_routes(s: &Server, auth_reads: bool) -> usize {
    let mut checked = 0;
    for (m, path) in routes() {
        let read = m == Method::GET;
        let guarded = !open_probe(&path) && (!read || auth_reads);
        let wrong = format!("{KEY}x");
        for token in [None, Some(wrong.as_str()), Some(&KEY[..10]), Some("")] {
            let (code, body) = call(s, &m, &path, token);
            checked += 1;
            if guarded {
                assert_eq!(code, 401, "{m} {path} with {token:?}: {body}");
                assert!(body.contains("application/problem") || body.contains("detail"));
            } else {
                assert_ne!(code, 401, "{m} {path} with {token:?}: {body}");
            }
            assert!(!body.contains(KEY) && !body.contains(OTHER), "{body}");
            assert!(
                !body.contains(&KEY[..10]),
                "the key's prefix echoed: {body}"
            );
        }
        // Either key lets the request through to its handler.
        for key in [KEY, OTHER] {
            let (code, body) = call(s, &m, &path, Some(key));
            checked += 1;
            assert_ne!(code, 401, "{m} {path} with a valid key: {body}");
            assert!(!body.contains(key), "{body}");
        }
    }
    checked
}

#[test]
fn every_route_follows_the_key_policy() {
    let keys = format!("{KEY},{OTHER}");
    let mut checked = 0;
    for auth_reads in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let reads = if auth_reads { "true" } else { "false" };
        let s = start(
            &dir.path().join("data"),
            &tiny_flags(),
            &[("ATLAS_API_KEYS", &keys), ("ATLAS_AUTH_READS", reads)],
        );
        checked += check_routes(&s, auth_reads);
        let log = s.kill();
        assert!(
            !log.contains(KEY) && !log.contains(OTHER),
            "a key in the log"
        );
        assert!(!log.contains(&KEY[..10]), "a wrong key in the log");
        assert!(!log.contains("panicked"), "{log}");
    }
    println!(
        "access checks: {checked} requests over {} routes",
        routes().len()
    );
}
