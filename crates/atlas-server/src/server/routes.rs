//! The router: routes, request metrics, authentication, body limits, health and readiness.
//! Handlers live beside it by resource (classify, compositions, heatmap, task_vectors).

use super::error::{problem, ApiError, ApiResult};
use super::{classify, compositions, heatmap, task_vectors, AppState, Model};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_mib << 20;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/classify", post(classify::classify))
        .route("/heads", post(classify::create_head))
        .route(
            "/heads/{id}",
            get(classify::get_head).delete(classify::delete_head),
        )
        .route(
            "/task-vectors",
            get(task_vectors::list).post(task_vectors::create),
        )
        .route(
            "/task-vectors/{name}",
            get(task_vectors::get).delete(task_vectors::delete),
        )
        .route(
            "/compositions",
            post(compositions::create).get(compositions::list),
        )
        .route(
            "/compositions/{id}",
            get(compositions::get).delete(compositions::delete),
        )
        .route("/compositions/{id}/events", get(compositions::events))
        .route("/compositions/{id}/cancel", post(compositions::cancel))
        .route("/compositions/{id}/coefficients.svg", get(heatmap::svg))
        .route("/compositions/{id}/coefficients.png", get(heatmap::png))
        .fallback(not_found)
        .layer(middleware::from_fn(plain_errors_as_problems))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            read_body_in_time,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn(check_head))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route {} {}", req.method(), req.uri().path()))
}

/// axum's own refusals (405, undecodable path parameters) come as plain text; every error
/// answer of the API is a problem, so they are rewritten with their text as the detail.
async fn plain_errors_as_problems(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == b"application/problem+json");
    if status.as_u16() < 400 || is_problem {
        return resp;
    }
    let allow = resp.headers().get(header::ALLOW).cloned();
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let detail = match (text.trim(), &allow) {
        ("", Some(a)) => format!(
            "method not allowed here; allowed: {}",
            a.to_str().unwrap_or("")
        ),
        ("", None) => status.canonical_reason().unwrap_or("error").to_string(),
        (t, _) => t.to_string(),
    };
    let mut out = problem(status, detail, None);
    if let Some(a) = allow {
        out.headers_mut().insert(header::ALLOW, a);
    }
    out
}

/// Request counts and latency by route template (never by id), method and status.
async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = method_label(req.method()).to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .request_seconds
        .with_label_values(&[&route, &method])
        .observe(started.elapsed().as_secs_f64());
    s.metrics
        .requests
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    resp
}

/// Longest request target (path and query), in bytes.
pub const MAX_URI_BYTES: usize = 8 << 10;
/// Most header fields in a request, and most bytes of them together.
pub const MAX_HEADERS: usize = 64;
pub const MAX_HEADER_BYTES: usize = 32 << 10;

/// Refuses a request whose target or headers are over the bounds above with a problem that
/// says which (414, 431). hyper's own refusals, for what is over its larger limits (a target
/// of 64 KiB, 100 headers, 400 KiB of headers), come before any of this and have no body.
async fn check_head(req: Request, next: Next) -> Response {
    let uri = req.uri().to_string().len();
    if uri > MAX_URI_BYTES {
        let detail = format!("the request target is {uri} bytes; at most {MAX_URI_BYTES}");
        return problem(StatusCode::URI_TOO_LONG, detail, None);
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        let detail = format!(
            "the request has {} header fields of {bytes} bytes; at most {MAX_HEADERS} fields \
             and {MAX_HEADER_BYTES} bytes",
            headers.len()
        );
        return problem(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, detail, None);
    }
    next.run(req).await
}

/// Reads the whole body before the handler runs, within `body_timeout_s` and `max_body_mib`: a
/// body trickled in, or cut short, cannot hold a connection and a task for longer than that.
/// A client that waits for `100 Continue` with a declared length over the limit gets the 413
/// at once, before anything is read. One that sends its body anyway is read up to the limit,
/// as before: answering mid-upload makes most clients report a broken pipe, not the 413.
async fn read_body_in_time(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let limit = s.config.max_body_mib << 20;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let waits = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waits && declared.is_some_and(|n| n > limit as u64) {
        let detail = format!(
            "the body declares {} bytes; at most {} MiB are accepted",
            declared.unwrap_or_default(),
            s.config.max_body_mib
        );
        return problem(StatusCode::PAYLOAD_TOO_LARGE, detail, None);
    }
    let (parts, body) = req.into_parts();
    let within = Duration::from_secs(s.config.body_timeout_s);
    let read = http_body_util::Limited::new(body, limit).collect();
    let bytes = match tokio::time::timeout(within, read).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            let detail = format!("the body is larger than {} MiB", s.config.max_body_mib);
            return problem(StatusCode::PAYLOAD_TOO_LARGE, detail, None);
        }
        Ok(Err(e)) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("reading the body: {e}"),
                None,
            )
        }
        Err(_) => {
            s.metrics
                .rejected
                .with_label_values(&["body_timeout"])
                .inc();
            let detail = format!("the body did not arrive within {within:?}");
            return problem(StatusCode::REQUEST_TIMEOUT, detail, None);
        }
    };
    let is_json = parts
        .headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        if let Err(detail) = check_json_size(&bytes) {
            return problem(StatusCode::BAD_REQUEST, detail, None);
        }
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Most values (numbers, strings, containers...) a JSON body may hold, and its deepest nesting:
/// parsed into a JSON tree, each value takes tens of bytes, so a body of small numbers would
/// cost many times its size before any handler could refuse it. 10^6 values is more than the
/// largest explicit composition (64 task vectors × 200 blocks × 64 parts) needs.
const MAX_JSON_VALUES: usize = 1_000_000;
const MAX_JSON_DEPTH: usize = 64;

/// Counts a JSON text's values and nesting from its bytes alone (strings skipped), so that an
/// oversized one is refused before it is parsed.
fn check_json_size(bytes: &[u8]) -> Result<(), String> {
    let (mut values, mut depth) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(format!("the JSON body nests deeper than {MAX_JSON_DEPTH}"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            b',' => {
                values += 1;
                if values >= MAX_JSON_VALUES {
                    return Err(format!(
                        "the JSON body holds more than {MAX_JSON_VALUES} values"
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A request's method as a metric label: one of the methods HTTP defines, else "other", so
/// that clients cannot create series (the route label is already a template or "unmatched").
fn method_label(m: &Method) -> &'static str {
    const KNOWN: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    KNOWN
        .iter()
        .find(|k| *k == m)
        .map_or("other", |k| k.as_str())
}

/// With API keys configured: a valid bearer key on every mutating route, and on reads too
/// when `auth_reads` is set (health, readiness and metrics stay open for probes and scrapes).
async fn authenticate(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &s.config.api_keys;
    let open_path = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    let needed = !keys.is_empty() && !open_path && (!read || s.config.auth_reads);
    if !needed {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let Some(given) = given else {
        return unauthorized("missing bearer token: send Authorization: Bearer <api key>");
    };
    // Compare against every key without stopping early: timing says nothing about which.
    let ok = keys.iter().fold(subtle::Choice::from(0u8), |acc, k| {
        acc | k.as_bytes().ct_eq(given.as_bytes())
    });
    if bool::from(ok) {
        next.run(req).await
    } else {
        unauthorized("invalid API key")
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 7235).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn unauthorized(detail: &str) -> Response {
    let mut resp = problem(StatusCode::UNAUTHORIZED, detail.to_string(), None);
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

/// 200 while the process serves HTTP and, once loaded, while the engine thread runs.
async fn healthz(State(s): State<AppState>) -> Response {
    match s.model.get() {
        Some(c) if !c.engine.is_alive() => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine has stopped".into(),
            None,
        ),
        _ => (StatusCode::OK, "ok").into_response(),
    }
}

/// 200 once the backbone and library are loaded and the database answers; 503 before (and if
/// loading failed), and while the database is unreachable (/classify on resident compositions
/// still answers then).
async fn readyz(State(s): State<AppState>) -> Response {
    if let Err(e) = s.ready() {
        return e.into_response();
    }
    // Any failure to answer is "not ready" (503), never a 500.
    let db = s.store.clone();
    let why = match tokio::task::spawn_blocking(move || db.ping()).await {
        Ok(Ok(())) => return (StatusCode::OK, "ready").into_response(),
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    let detail = format!("the database does not answer: {why}");
    ApiError::busy(StatusCode::SERVICE_UNAVAILABLE, detail, 5).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let store = s.store.clone();
    let model_workers = s.model.get().map(|m| m.workers.clone());
    let metrics = s.metrics.clone();
    // Job counts come from the database (every replica's jobs): off the async threads.
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(w) = model_workers {
            w.refresh_gauges();
        }
        metrics.observe_store(&store);
    })
    .await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

impl AppState {
    /// The loaded model side, or 503 while loading.
    pub fn ready(&self) -> ApiResult<&Model> {
        if let Some(c) = self.model.get() {
            return Ok(c);
        }
        // A failed load is permanent: no Retry-After then.
        match self.load_error.get() {
            Some(e) => Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("loading failed: {e}"),
            )),
            None => Err(ApiError::busy(
                StatusCode::SERVICE_UNAVAILABLE,
                "the backbone and task vectors are still loading",
                5,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_a_closed_set() {
        assert_eq!(method_label(&Method::POST), "POST");
        let odd = Method::from_bytes(b"FROBNICATE").unwrap();
        assert_eq!(method_label(&odd), "other");
    }

    #[test]
    fn json_size_is_counted_outside_strings() {
        assert!(check_json_size(br#"{"a": [1, 2, 3], "s": "[[[,,,"}"#).is_ok());
        let many = format!("[{}0]", "0,".repeat(MAX_JSON_VALUES));
        assert!(check_json_size(many.as_bytes())
            .unwrap_err()
            .contains("values"));
        let deep = "[".repeat(MAX_JSON_DEPTH + 1);
        assert!(check_json_size(deep.as_bytes())
            .unwrap_err()
            .contains("nests"));
        let escaped =
            br#"{"s": "a\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}"#;
        assert!(check_json_size(escaped).is_ok());
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
    }
}
