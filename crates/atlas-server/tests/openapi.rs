//! `openapi.yaml` (repository root) against the server's source: the documented operations are
//! exactly the routes that `server/routes.rs` registers, every `$ref` resolves, each operation
//! documents the status codes its handler can answer with (and no others), authentication and
//! limits match the code and config/default.toml, enums match the serde names, the examples
//! validate against the spec and deserialize into the real request types, the request schemas
//! accept and refuse what the real types do, and the response schemas list exactly the fields
//! the real types serialize.

// The request and response types, compiled from the server's own source (the binary crate has
// no library to import them from).
#[allow(dead_code)]
#[path = "../src/server/api.rs"]
mod api;

mod common;

use common::spec;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

fn spec() -> &'static Value {
    spec::document()
}

/// The source of a server module: `name.rs`, or every file of the folder `name/` (mod.rs first).
fn server_source(module: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/server");
    let file = dir.join(format!("{module}.rs"));
    let files = if file.exists() {
        vec![file]
    } else {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join(module))
            .unwrap_or_else(|e| panic!("{module}: {e}"))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort_by_key(|p| (!p.ends_with("mod.rs"), p.clone()));
        files
    };
    let read = |p: &PathBuf| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p:?}: {e}"));
    strip_comments(&files.iter().map(read).collect::<Vec<_>>().join("\n"))
}

fn routes_source() -> String {
    server_source("routes")
}

/// Drops `//` comments (outside string literals) so that commented-out code does not count.
fn strip_comments(src: &str) -> String {
    src.lines()
        .map(|line| {
            let mut in_str = false;
            let mut prev = ' ';
            for (i, c) in line.char_indices() {
                match c {
                    '"' if prev != '\\' => in_str = !in_str,
                    '/' if !in_str && prev == '/' => return &line[..i - 1],
                    _ => {}
                }
                prev = c;
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Byte length of a character literal starting at `i` (`'"'`, `'\''`), or 0 when the quote
/// there is a lifetime.
fn char_literal_len(src: &[u8], i: usize) -> usize {
    match (src.get(i + 1), src.get(i + 2), src.get(i + 3)) {
        (Some(b'\\'), Some(_), Some(b'\'')) => 4,
        (Some(_), Some(b'\''), _) => 3,
        _ => 0,
    }
}

/// The text between the bracket that opens at `open` and its match (strings and character
/// literals skipped).
fn balanced(src: &str, open: usize) -> &str {
    let bytes = src.as_bytes();
    let (opening, closing) = match bytes[open] {
        b'(' => (b'(', b')'),
        b'{' => (b'{', b'}'),
        other => panic!("no bracket at {open}: {}", other as char),
    };
    let mut depth = 0;
    let mut in_str = false;
    let mut i = open;
    while i < bytes.len() {
        let c = bytes[i];
        if in_str {
            match c {
                b'\\' => i += 1,
                b'"' => in_str = false,
                _ => {}
            }
        } else if c == b'"' {
            in_str = true;
        } else if c == b'\'' {
            i += char_literal_len(bytes, i).max(1);
            continue;
        } else if c == opening {
            depth += 1;
        } else if c == closing {
            depth -= 1;
            if depth == 0 {
                return &src[open + 1..i];
            }
        }
        i += 1;
    }
    panic!("unbalanced bracket at {open}")
}

const METHODS: [&str; 8] = [
    "get", "post", "put", "delete", "patch", "head", "options", "trace",
];

/// The (method, handler) pairs of a method router such as `post(m::create).get(m::list)`:
/// method names called at the top level of the expression (handlers' own calls sit deeper).
fn methods_of(expr: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut depth = 0;
    let mut in_str = false;
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i] as char;
        match c {
            '"' if i == 0 || bytes[i - 1] != b'\\' => in_str = !in_str,
            '(' | '{' | '[' if !in_str => depth += 1,
            ')' | '}' | ']' if !in_str => depth -= 1,
            _ if !in_str && depth == 0 && (c.is_ascii_alphabetic() || c == '_') => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                let ident = &expr[start..i];
                let rest = expr[i..].trim_start();
                if METHODS.contains(&ident) && rest.starts_with('(') {
                    let open = expr.len() - rest.len();
                    let handler = balanced(expr, open).trim().to_string();
                    out.push((ident.to_string(), handler));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

type Routes = BTreeMap<(String, String), String>;

/// (method, path) → handler expression of every `.route("path", method_router)` in `src`.
fn routes_in(src: &str) -> Routes {
    for unsupported in [".nest(", ".merge(", ".route_service(", ".nest_service("] {
        assert!(
            !src.contains(unsupported),
            "routes.rs uses {unsupported}: teach tests/openapi.rs to read it"
        );
    }
    let mut out = Routes::new();
    for (at, _) in src.match_indices(".route(") {
        let args = balanced(src, at + ".route".len()).trim_start();
        assert!(args.starts_with('"'), "route path is not a literal: {args}");
        let end = args[1..].find('"').expect("closing quote") + 1;
        let path = &args[1..end];
        let router = args[end + 1..]
            .trim_start()
            .strip_prefix(',')
            .expect("route(path, router)");
        let methods = methods_of(router);
        assert!(!methods.is_empty(), "no methods found for route {path}");
        // axum 0.8 writes captures as `{id}`, like OpenAPI; 0.7's `:id` is converted.
        let path = path
            .split('/')
            .map(|seg| match seg.strip_prefix(':') {
                Some(name) => format!("{{{name}}}"),
                None => seg.to_string(),
            })
            .collect::<Vec<_>>()
            .join("/");
        for (m, handler) in methods {
            let key = (m.clone(), path.clone());
            assert!(out.insert(key, handler).is_none(), "{m} {path} twice");
        }
    }
    assert!(!out.is_empty(), "no routes found in routes.rs");
    out
}

fn served_routes() -> Routes {
    routes_in(&routes_source())
}

/// (method, path) → operation of every documented operation.
fn operations(spec: &Value) -> BTreeMap<(String, String), &Value> {
    let mut out = BTreeMap::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (key, op) in item.as_object().expect("path item") {
            if METHODS.contains(&key.as_str()) {
                out.insert((key.clone(), path.clone()), op);
            }
        }
    }
    out
}

#[test]
fn the_route_reader_reads_method_routers() {
    let pairs = |v: Vec<(String, String)>| -> Vec<(String, String)> { v };
    assert_eq!(
        pairs(methods_of(" post(m::create).get(m::list) ")),
        vec![
            ("post".to_string(), "m::create".to_string()),
            ("get".to_string(), "m::list".to_string())
        ]
    );
    let got = methods_of("get(|| async { s.get(1).post(2) })");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "get");
    let got: Vec<String> = methods_of("axum::routing::delete(h).put(p)")
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    assert_eq!(got, ["delete", "put"]);
    assert_eq!(
        strip_comments("a // .route(\"/x\", get(h))\nb \"//\" c"),
        "a \nb \"//\" c"
    );
}

#[test]
fn the_route_reader_reads_a_router() {
    let src = r#"
        Router::new()
            .route("/a", post(a))
            .route(
                "/b/{id}",
                get(b::get).delete(|Path(id): Path<String>| async move { s.delete(id) }),
            )
            // .route("/commented", get(c))
            .route("/old/:id", axum::routing::put(d))
            .layer(x)
    "#;
    let got: BTreeSet<(String, String, String)> = routes_in(&strip_comments(src))
        .into_iter()
        .map(|((m, p), h)| (m, p, h))
        .collect();
    let want: BTreeSet<(String, String, String)> = [
        ("post", "/a", "a"),
        ("get", "/b/{id}", "b::get"),
        (
            "delete",
            "/b/{id}",
            "|Path(id): Path<String>| async move { s.delete(id) }",
        ),
        ("put", "/old/{id}", "d"),
    ]
    .iter()
    .map(|(m, p, h)| (m.to_string(), p.to_string(), h.to_string()))
    .collect();
    assert_eq!(got, want);
}

#[test]
fn documented_operations_are_exactly_the_served_routes() {
    let served: BTreeSet<_> = served_routes().into_keys().collect();
    let documented: BTreeSet<_> = operations(spec()).into_keys().collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && phantom.is_empty(),
        "openapi.yaml is out of step with routes.rs\n  served but not documented: {undocumented:?}\n  documented but not served: {phantom:?}"
    );
    // Routes the issue asks for, so that a reader-side bug cannot make both sides empty.
    for (m, p) in [
        ("post", "/classify"),
        ("post", "/heads"),
        ("post", "/compositions"),
        ("get", "/compositions"),
        ("get", "/compositions/{id}/events"),
        ("delete", "/task-vectors/{name}"),
        ("get", "/readyz"),
        ("get", "/metrics"),
    ] {
        assert!(served.contains(&(m.to_string(), p.to_string())), "{m} {p}");
    }
}

fn resolve<'a>(spec: &'a Value, reference: &str) -> Option<&'a Value> {
    spec.pointer(reference.strip_prefix('#')?)
}

fn collect_refs(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if k == "$ref" {
                    out.push((at.to_string(), child.as_str().expect("$ref string").into()));
                } else if k == "mapping" {
                    // Discriminator mappings name schemas too.
                    for target in child.as_object().into_iter().flat_map(|m| m.values()) {
                        if let Some(t) = target.as_str() {
                            out.push((format!("{at}/mapping"), t.to_string()));
                        }
                    }
                } else {
                    collect_refs(child, &format!("{at}/{k}"), out);
                }
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                collect_refs(child, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_ref_resolves_and_every_component_is_used() {
    let spec = spec();
    assert_eq!(spec["openapi"].as_str(), Some("3.1.0"));
    let mut refs = Vec::new();
    collect_refs(spec, "", &mut refs);
    assert!(refs.len() > 50, "suspiciously few $refs: {}", refs.len());
    let unresolved: Vec<_> = refs
        .iter()
        .filter(|(_, r)| resolve(spec, r).is_none())
        .collect();
    assert!(unresolved.is_empty(), "unresolved $refs: {unresolved:?}");
    let used: BTreeSet<String> = refs
        .iter()
        .map(|(_, r)| {
            // A reference into a component (its properties) uses the component.
            let parts: Vec<&str> = r.splitn(5, '/').collect();
            parts[..parts.len().min(4)].join("/")
        })
        .collect();
    for kind in ["schemas", "responses", "parameters", "headers"] {
        for name in spec["components"][kind]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            let r = format!("#/components/{kind}/{name}");
            assert!(used.contains(&r), "{r} is never referenced");
        }
    }
}

/// The value, following `$ref`s.
fn deref<'a>(spec: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => deref(spec, resolve(spec, r).expect("resolves")),
        None => v,
    }
}

#[test]
fn operations_have_ids_responses_and_declared_path_parameters() {
    let spec = spec();
    let mut ids = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        let captures: BTreeSet<String> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .map(String::from)
            .collect();
        for (method, op) in item.as_object().unwrap() {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let id = op["operationId"].as_str();
            assert!(id.is_some(), "{method} {path} has no operationId");
            assert!(ids.insert(id.unwrap()), "operationId {id:?} twice");
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path} has no responses");
            let declared: BTreeSet<String> = item["parameters"]
                .as_array()
                .into_iter()
                .chain(op["parameters"].as_array())
                .flatten()
                .map(|p| deref(spec, p))
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(declared, captures, "{method} {path}: path parameters");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Status codes: what each handler can answer with, read from the source.

/// The server modules whose functions the handlers reach.
const MODULES: [&str; 10] = [
    "routes",
    "classify",
    "compositions",
    "heatmap",
    "task_vectors",
    "finetune",
    "heads",
    "images",
    "body",
    "error",
];

/// Every `fn` of the server modules: (module, name) → its text (signature and body), and per
/// module the names it imports from sibling modules.
struct Code {
    fns: BTreeMap<(String, String), String>,
    imports: BTreeMap<(String, String), String>,
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

fn fns_of(src: &str) -> Vec<(String, String)> {
    let bytes = src.as_bytes();
    let mut out = Vec::new();
    for (at, _) in src.match_indices("fn ") {
        if at > 0 && is_ident(bytes[at - 1]) {
            continue;
        }
        let name: String = src[at + 3..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let Some(open) = src[at..].find('(').map(|i| at + i) else {
            continue;
        };
        let params_end = open + balanced(src, open).len() + 1;
        let body_open = src[params_end..].find(['{', ';']).map(|i| params_end + i);
        let Some(body_open) = body_open.filter(|&i| bytes[i] == b'{') else {
            continue;
        };
        let end = body_open + balanced(src, body_open).len() + 2;
        out.push((name, src[at..end].to_string()));
    }
    out
}

/// `use super::m::{a, b};` and `use super::m::a;` (or `crate::server::m`, from a module in a
/// folder) → (a, m), (b, m).
fn imports_of(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for stmt in src.split(';') {
        let stmt = stmt.trim();
        let Some(rest) = stmt
            .strip_prefix("use super::")
            .or_else(|| stmt.strip_prefix("use crate::server::"))
        else {
            continue;
        };
        let Some((module, names)) = rest.split_once("::") else {
            continue;
        };
        let names = names.trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            out.push((name.to_string(), module.to_string()));
        }
    }
    out
}

fn code() -> Code {
    let sources: Vec<(&str, String)> = MODULES.iter().map(|m| (*m, server_source(m))).collect();
    code_of(&sources)
}

fn code_of(sources: &[(&str, String)]) -> Code {
    let mut fns = BTreeMap::new();
    let mut imports = BTreeMap::new();
    for (m, src) in sources {
        for (name, text) in fns_of(src) {
            fns.insert((m.to_string(), name), text);
        }
        for (name, from) in imports_of(src) {
            imports.insert((m.to_string(), name), from);
        }
    }
    Code { fns, imports }
}

impl Code {
    /// The functions that `text` (in `module`) calls: `m::f(` for a server module `m`, `f(` for
    /// a function of the same module or one imported from a sibling (also passed as a value,
    /// `map_err(f)`), and `.ready()` (the 503 of the model side still loading). Other method
    /// calls are not followed.
    fn calls(&self, module: &str, text: &str) -> Vec<(String, String)> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if !is_ident(bytes[i]) || (i > 0 && is_ident(bytes[i - 1])) {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && is_ident(bytes[i]) {
                i += 1;
            }
            let name = &text[start..i];
            let before = &text[..start];
            let called = text[i..].trim_start().starts_with('(');
            let passed = before.trim_end().ends_with(['(', ','])
                && text[i..].trim_start().starts_with([')', ',']);
            if !called && !passed {
                continue;
            }
            let target = if before.ends_with('.') {
                (name == "ready").then(|| ("routes".to_string(), name.to_string()))
            } else if let Some(path) = before.strip_suffix("::") {
                let m: String = path
                    .chars()
                    .rev()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Some((m, name.to_string()))
            } else if self
                .fns
                .contains_key(&(module.to_string(), name.to_string()))
            {
                Some((module.to_string(), name.to_string()))
            } else {
                self.imports
                    .get(&(module.to_string(), name.to_string()))
                    .map(|m| (m.clone(), name.to_string()))
            };
            if let Some(t) = target.filter(|t| self.fns.contains_key(t)) {
                out.push(t);
            }
        }
        // Extractors run before the handler: their rejections are its answers too.
        let signature = &text[..text.find('{').unwrap_or(text.len())];
        if signature.contains(": Body") {
            out.push(("body".into(), "from_request".into()));
        }
        if signature.contains("ApiJson<") {
            out.push(("error".into(), "from_request".into()));
        }
        out
    }

    /// The status codes that the function `f` and everything it reaches can answer with.
    fn codes(&self, f: (String, String)) -> BTreeSet<u16> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![f];
        let mut codes = BTreeSet::new();
        while let Some(f) = todo.pop() {
            if !seen.insert(f.clone()) {
                continue;
            }
            let text = &self.fns[&f];
            codes.extend(codes_in(text));
            todo.extend(self.calls(&f.0, text));
        }
        codes
    }
}

fn status_code(name: &str) -> u16 {
    match name {
        "OK" => 200,
        "CREATED" => 201,
        "ACCEPTED" => 202,
        "NO_CONTENT" => 204,
        "BAD_REQUEST" => 400,
        "UNAUTHORIZED" => 401,
        "NOT_FOUND" => 404,
        "CONFLICT" => 409,
        "PAYLOAD_TOO_LARGE" => 413,
        "UNSUPPORTED_MEDIA_TYPE" => 415,
        "TOO_MANY_REQUESTS" => 429,
        "INTERNAL_SERVER_ERROR" => 500,
        "SERVICE_UNAVAILABLE" => 503,
        "INSUFFICIENT_STORAGE" => 507,
        other => panic!("StatusCode::{other} in the server: add it to tests/openapi.rs"),
    }
}

/// Codes a function's own text answers with: `StatusCode::X`, the `ApiError` constructors, and
/// 500 and 503 for the store's errors (`?` turns them into internal errors, or 503 while the
/// database is unreachable; a full disk's 507 is documented where the handler writes files,
/// through `ApiError::io`).
fn codes_in(text: &str) -> BTreeSet<u16> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("StatusCode::") {
        let name: String = text[at + "StatusCode::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        out.insert(status_code(&name));
    }
    for (call, code) in [
        ("ApiError::bad(", 400),
        ("ApiError::not_found(", 404),
        ("ApiError::conflict(", 409),
        ("ApiError::internal", 500),
        ("ApiError::io", 500),
        ("ApiError::io", 507),
    ] {
        if text.contains(call) {
            out.insert(code);
        }
    }
    // `s.store.get(..)?`, possibly across lines.
    let store_call = text.match_indices("store").any(|(at, _)| {
        let rest = text[at + "store".len()..].trim_start();
        rest.starts_with('.') && !rest.starts_with(".clone()")
    });
    if store_call {
        out.insert(500);
        out.insert(503);
    }
    out
}

/// The handler function of a route's handler expression: `m::f` or `f` (routes.rs).
fn handler_fn(handler: &str) -> (String, String) {
    match handler.split_once("::") {
        Some((m, f)) => (m.to_string(), f.to_string()),
        None => ("routes".to_string(), handler.to_string()),
    }
}

fn documented_codes(op: &Value) -> BTreeSet<u16> {
    op["responses"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.parse().unwrap_or_else(|_| panic!("status {k}")))
        .collect()
}

#[test]
fn the_code_reader_follows_calls_into_sibling_modules() {
    let src = |s: &str| s.to_string();
    let code = code_of(&[
        (
            "a",
            src(r#"
            use super::b::{check, Body};
            pub async fn handler(State(s): State<AppState>, body: Body) -> ApiResult<X> {
                s.ready()?;
                let x = helper(1).map_err(convert)?;
                b::other(x);
                s.store
                    .get(1)?;
                check(x).unwrap_or(other(2))
            }
            fn helper(x: u8) -> ApiResult<u8> { Err(ApiError::conflict("{x}")) }
            fn convert(e: E) -> ApiError { ApiError::new(StatusCode::TOO_MANY_REQUESTS, "") }
            fn other(x: u8) { let _ = StatusCode::ACCEPTED; }
            fn unused() { let _ = StatusCode::NO_CONTENT; }
        "#),
        ),
        (
            "b",
            src(r#"
            pub fn check(x: u8) -> ApiResult<()> { Err(ApiError::bad(format!("'{{'"))) }
            pub fn other(x: u8) -> ApiResult<()> { Err(ApiError::not_found("x")) }
            async fn from_request(req: Request) -> Result<Self, ApiError> { Err(json_rejection()) }
            fn json_rejection() -> ApiError { ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "") }
        "#),
        ),
        (
            "routes",
            src("pub fn ready(&self) -> ApiResult<&Model> { Err(busy(StatusCode::SERVICE_UNAVAILABLE)) }"),
        ),
    ]);
    // Calls, a function passed as a value, `m::f`, imports, `.ready()`, the store across lines
    // and the body extractor; not `unused`; `other(2)` is a's own (202), `b::other` b's (404).
    let mut code = code;
    code.fns.insert(
        ("body".into(), "from_request".into()),
        "fn from_request() { b::from_request() }".into(),
    );
    let c = code.codes(("a".into(), "handler".into()));
    assert_eq!(c, [202, 400, 404, 409, 413, 429, 500, 503].into());
    assert!(code
        .calls("a", "fn f() { other(1); }")
        .contains(&("a".into(), "other".into())));

    // POST /classify on the real source.
    let c = crate::code().codes(("classify".into(), "classify".into()));
    assert_eq!(c, [400, 404, 409, 413, 415, 429, 500, 503].into());
    assert_eq!(
        imports_of("use super::body::{parse, Body};\nuse super::api::*;"),
        [
            ("parse".to_string(), "body".to_string()),
            ("Body".to_string(), "body".to_string()),
            ("*".to_string(), "api".to_string())
        ]
    );
}

/// Each operation documents the codes its handler can answer with and none it cannot; its
/// success codes are exactly the handler's (200 when it names none).
#[test]
fn status_codes_of_the_handlers_are_documented() {
    let spec = spec();
    let code = code();
    let ops = operations(spec);
    for ((method, path), handler) in served_routes() {
        let op = ops[&(method.clone(), path.clone())];
        let f = handler_fn(&handler);
        assert!(code.fns.contains_key(&f), "handler {handler} not found");
        let mut reached = code.codes(f);
        if !reached.iter().any(|c| (200..300).contains(c)) {
            reached.insert(200);
        }
        let documented = documented_codes(op);
        // 401 comes from the authentication middleware (checked separately).
        let documented: BTreeSet<u16> = documented.into_iter().filter(|&c| c != 401).collect();
        let missing: Vec<_> = reached.difference(&documented).collect();
        let phantom: Vec<_> = documented.difference(&reached).collect();
        assert!(
            missing.is_empty() && phantom.is_empty(),
            "{method} {path} ({handler}):\n  answered but not documented: {missing:?}\n  documented but never answered: {phantom:?}"
        );
    }
}

/// Operations whose handlers read a body document it (JSON, and multipart where the handler
/// takes one); the others have none.
#[test]
fn request_bodies_match_the_extractors() {
    let spec = spec();
    let code = code();
    let ops = operations(spec);
    for ((method, path), handler) in served_routes() {
        let op = ops[&(method.clone(), path.clone())];
        let text = &code.fns[&handler_fn(&handler)];
        let signature = &text[..text.find('{').unwrap()];
        let multipart = signature.contains(": Body");
        let json = multipart || signature.contains("ApiJson<");
        let content = &op["requestBody"]["content"];
        assert_eq!(
            content.get("application/json").is_some(),
            json,
            "{method} {path}: JSON body"
        );
        assert_eq!(
            content.get("multipart/form-data").is_some(),
            multipart,
            "{method} {path}: multipart body"
        );
        if json {
            assert_eq!(op["requestBody"]["required"], true, "{method} {path}");
        }
        if multipart {
            let enc = &content["multipart/form-data"]["encoding"]["request"]["contentType"];
            assert_eq!(enc, "application/json", "{method} {path}: the request part");
        }
    }
}

/// The paths that routes.rs leaves open (`open_path`) have no security; every other operation
/// inherits the optional bearer scheme and documents 401.
#[test]
fn authentication_matches_the_middleware() {
    let spec = spec();
    let src = routes_source();
    let at = src.find("let open_path").expect("open_path in routes.rs");
    let stmt = &src[at..at + src[at..].find(';').unwrap()];
    let open: BTreeSet<String> = stmt
        .split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    assert!(open.contains("/healthz"), "open paths: {open:?}");
    assert!(src.contains("ct_eq"), "keys are compared in constant time");
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["type"],
        "http"
    );
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(spec["security"], json!([{}, {"bearer": []}]));
    for ((method, path), op) in operations(spec) {
        let codes = documented_codes(op);
        if open.contains(&path) {
            assert_eq!(op["security"], json!([]), "{method} {path} is open");
            assert!(!codes.contains(&401), "{method} {path} is open");
        } else {
            assert!(op.get("security").is_none(), "{method} {path}: security");
            assert!(codes.contains(&401), "{method} {path} documents no 401");
        }
    }
}

/// Error answers are problem+json Problems; 429 and `ready`'s 503 carry Retry-After.
#[test]
fn errors_are_problems() {
    let spec = spec();
    for ((method, path), op) in operations(spec) {
        for (status, resp) in op["responses"].as_object().unwrap() {
            let resp = deref(spec, resp);
            if status.as_str() < "400" {
                continue;
            }
            let content = resp["content"].as_object().expect("content");
            let keys: Vec<&String> = content.keys().collect();
            assert_eq!(
                keys,
                ["application/problem+json"],
                "{method} {path} {status}"
            );
            assert_eq!(
                content["application/problem+json"]["schema"]["$ref"],
                "#/components/schemas/Problem",
                "{method} {path} {status}"
            );
            if status == "429" || (status == "503" && path != "/healthz") {
                assert!(
                    resp["headers"].get("Retry-After").is_some(),
                    "{method} {path} {status}: Retry-After"
                );
            }
        }
    }
    let error = server_source("error");
    assert!(error.contains("application/problem+json") && error.contains("RETRY_AFTER"));
}

/// Media types of the non-JSON answers: the ones the handlers set.
#[test]
fn other_media_types_match_the_handlers() {
    let spec = spec();
    let compositions = server_source("compositions");
    let heatmap = server_source("heatmap");
    let routes = routes_source();
    let ok_types = |method: &str, path: &str| -> BTreeSet<String> {
        spec["paths"][path][method]["responses"]["200"]["content"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    for (path, ctype) in [
        ("/compositions/{id}/coefficients.svg", "image/svg+xml"),
        ("/compositions/{id}/coefficients.png", "image/png"),
    ] {
        assert!(heatmap.contains(&format!("\"{ctype}\"")), "{ctype}");
        assert_eq!(ok_types("get", path), [ctype.to_string()].into());
    }
    assert!(compositions.contains("Sse::new("));
    assert_eq!(
        ok_types("get", "/compositions/{id}/events"),
        ["text/event-stream".to_string()].into()
    );
    // Event names: the ones `sse` gives, all described.
    let sse = &fns_of(&compositions)
        .into_iter()
        .find(|(n, _)| n == "sse")
        .expect("fn sse")
        .1;
    let description = spec["paths"]["/compositions/{id}/events"]["get"]["description"]
        .as_str()
        .unwrap();
    for name in sse.split('"').skip(1).step_by(2) {
        assert!(description.contains(&format!("`{name}`")), "event {name}");
    }
    assert!(routes.contains("text/plain; version=0.0.4"));
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            ok_types("get", path),
            ["text/plain".to_string()].into(),
            "{path}"
        );
    }
}

#[test]
fn every_metric_is_documented() {
    let src = server_source("metrics");
    let description = spec()["paths"]["/metrics"]["get"]["description"]
        .as_str()
        .unwrap();
    let names: BTreeSet<&str> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("atlas_"))
        .collect();
    assert!(names.len() >= 15, "only {} metric names found", names.len());
    for name in names {
        assert!(
            description.contains(&format!("`{name}`"))
                || description.contains(&format!("`{name}{{")),
            "/metrics does not describe {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Limits and enums.

fn config_default() -> toml::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/default.toml");
    toml::from_str(&std::fs::read_to_string(path).expect("config/default.toml")).unwrap()
}

fn setting(config: &toml::Value, key: &str) -> u64 {
    config[key]
        .as_integer()
        .unwrap_or_else(|| panic!("{key} in config/default.toml")) as u64
}

/// The number right after the first `needle` in `src` (underscores allowed).
fn number_after(src: &str, needle: &str) -> u64 {
    let at = src
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not found"))
        + needle.len();
    let digits: String = src[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '_')
        .filter(|c| *c != '_')
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number after {needle:?}"))
}

fn schema<'a>(spec: &'a Value, name: &str) -> &'a Value {
    let s = &spec["components"]["schemas"][name];
    assert!(s.is_object(), "no schema {name}");
    s
}

#[test]
fn limits_match_the_config_and_the_code() {
    let spec = spec();
    let config = config_default();
    let compositions = server_source("compositions");
    let s = |name| schema(spec, name);
    let images = setting(&config, "max_images");
    let classes = setting(&config, "max_classes");
    let examples = setting(&config, "max_examples");
    let parts = setting(&config, "max_parts");
    let body_mib = setting(&config, "max_body_mib");
    let pixels = setting(&config, "max_image_pixels");
    assert_eq!(
        s("ClassifyRequest")["properties"]["images"]["maxItems"],
        images
    );
    assert_eq!(s("Classes")["maxItems"], classes);
    assert_eq!(
        s("TaskData")["properties"]["examples"]["maxItems"],
        examples
    );
    assert_eq!(
        s("LayoutSpec")["oneOf"][1]["properties"]["parts"]["maximum"],
        parts
    );
    assert_eq!(s("TvCoefficients")["anyOf"][2]["items"]["maxItems"], parts);
    let per_part = &s("PerPartLayout")["properties"]["k"]["maximum"];
    assert_eq!(*per_part, atlas_core::coefficients::MAX_PARTS as u64);

    let overrides = &s("LearnOverrides")["properties"];
    use atlas_learn::recipe::{MAX_BATCH, MAX_EPOCHS, MAX_WARMUP};
    assert_eq!(overrides["epochs"]["maximum"], MAX_EPOCHS as u64);
    assert_eq!(overrides["batch_size"]["maximum"], MAX_BATCH as u64);
    assert_eq!(overrides["warmup_steps"]["maximum"], MAX_WARMUP as u64);
    let tasks = number_after(&compositions, "const MAX_TASKS: usize = ");
    assert_eq!(s("LearnRequest")["properties"]["tasks"]["maxItems"], tasks);

    use atlas_clip::templates::{MAX_TEMPLATES, MAX_TEXT};
    assert_eq!(s("ClassName")["maxLength"], MAX_TEXT as u64);
    assert_eq!(s("Template")["maxLength"], MAX_TEXT as u64);
    assert_eq!(s("Templates")["oneOf"][1]["maxItems"], MAX_TEMPLATES as u64);

    let params = &spec["components"]["parameters"];
    assert_eq!(
        params["Limit"]["schema"]["maximum"],
        number_after(&compositions, "limit > ")
    );
    assert_eq!(
        params["Limit"]["schema"]["default"],
        number_after(&compositions, "q.limit.unwrap_or(")
    );
    assert_eq!(
        params["IdempotencyKey"]["schema"]["maxLength"],
        number_after(&compositions, "k.len() > ")
    );
    assert_eq!(
        number_after(&compositions, "|v| v.abs() > 1e"),
        6,
        "coefficients are bounded by 1e6"
    );
    assert_eq!(s("Coefficient")["maximum"], 1_000_000);
    assert_eq!(s("Coefficient")["minimum"], -1_000_000);

    let description = spec["info"]["description"]
        .as_str()
        .unwrap()
        .replace('\n', " ");
    for needle in [
        format!("{body_mib} MiB ({} bytes", body_mib << 20),
        format!("at most {pixels} pixels"),
        format!("1 to {images} images"),
        format!("1 to {classes} classes"),
        format!("1 to {MAX_TEMPLATES} templates"),
        format!("1 to {examples} examples"),
        format!("K from 1 to {parts}"),
    ] {
        assert!(
            description.contains(&needle),
            "info.description does not say {needle:?}"
        );
    }
}

fn enum_of(v: &Value) -> BTreeSet<String> {
    v["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no enum in {v}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn serde_names<T: serde::Serialize>(values: &[T]) -> BTreeSet<String> {
    values
        .iter()
        .map(|v| {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

const OBJECTIVES: [api::Objective; 6] = [
    api::Objective::FewShot,
    api::Objective::TaskAddition,
    api::Objective::Negation,
    api::Objective::Entropy,
    api::Objective::Ufm,
    api::Objective::AdaMerging,
];

#[test]
fn enums_match_the_serde_names() {
    use api::{Objective, Status};
    use atlas_learn::augment::View;
    use atlas_learn::EventKind;
    // Exhaustive matches: a new variant stops this test compiling until it is listed here.
    for o in OBJECTIVES {
        match o {
            Objective::FewShot
            | Objective::TaskAddition
            | Objective::Negation
            | Objective::Entropy
            | Objective::Ufm
            | Objective::AdaMerging => {}
        }
    }
    let statuses = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];
    for s in statuses {
        match s {
            Status::Queued
            | Status::Running
            | Status::Succeeded
            | Status::Failed
            | Status::Cancelled => {}
        }
    }
    assert_eq!(statuses, Status::ALL);
    let kinds = [
        EventKind::Started,
        EventKind::Resumed,
        EventKind::Step,
        EventKind::Epoch,
        EventKind::Finished,
    ];
    for k in kinds {
        match k {
            EventKind::Started
            | EventKind::Resumed
            | EventKind::Step
            | EventKind::Epoch
            | EventKind::Finished => {}
        }
    }
    let methods: BTreeSet<String> = atlas_core::merge::METHODS
        .iter()
        .map(|m| m.to_string())
        .collect();
    assert_eq!(enum_of(schema(spec(), "MergeMethod")), methods);
    let views = [
        View::Plain,
        View::Train,
        View::Crop,
        View::Weak,
        View::Strong,
    ];
    for v in views {
        match v {
            View::Plain | View::Train | View::Crop | View::Weak | View::Strong => {}
        }
    }
    let spec = spec();
    let s = |name| schema(spec, name);
    assert_eq!(enum_of(s("Objective")), serde_names(&OBJECTIVES));
    assert_eq!(enum_of(s("Status")), serde_names(&statuses));
    assert_eq!(enum_of(s("EventKind")), serde_names(&kinds));
    assert_eq!(enum_of(s("View")), serde_names(&views));
    // The list filter takes the same names.
    for st in statuses {
        assert_eq!(Status::parse(st.as_str()), Some(st));
        assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
    }
    // A composition's kind: "explicit", the objective's name, "merge" (a method request) or
    // "finetune" (a fine-tuning job).
    let mut kinds: BTreeSet<String> = OBJECTIVES.iter().map(|o| o.to_string()).collect();
    assert_eq!(kinds, serde_names(&OBJECTIVES));
    kinds.insert("explicit".into());
    kinds.insert("merge".into());
    kinds.insert("finetune".into());
    assert!(server_source("finetune").contains("kind: \"finetune\".into()"));
    let merge = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/server/compositions/merge.rs"),
    )
    .unwrap();
    assert!(merge.contains("kind: \"merge\".into()"));
    assert_eq!(enum_of(s("CompositionKind")), kinds);
    // The other name of task_addition.
    let alias = &s("LearnRequest")["properties"]["objective"]["oneOf"][1]["const"];
    let parsed: Objective = serde_json::from_value(alias.clone()).unwrap();
    assert_eq!(parsed, Objective::TaskAddition);
    // Task-vector dtypes, as task_vectors.rs writes them.
    let dtypes = [
        atlas_core::StorageDType::F32,
        atlas_core::StorageDType::F16,
        atlas_core::StorageDType::BF16,
    ];
    for d in dtypes {
        match d {
            atlas_core::StorageDType::F32
            | atlas_core::StorageDType::F16
            | atlas_core::StorageDType::BF16 => {}
        }
    }
    assert!(server_source("task_vectors").contains("format!(\"{:?}\", t.dtype()).to_lowercase()"));
    let names: BTreeSet<String> = dtypes
        .iter()
        .map(|d| format!("{d:?}").to_lowercase())
        .collect();
    assert_eq!(
        enum_of(&s("TaskVectorSummary")["properties"]["dtype"]),
        names
    );
    // Layout names of a learning request: the ones compositions' `layout` accepts.
    let src = server_source("compositions");
    let layout_fn = &fns_of(&src)
        .into_iter()
        .find(|(n, _)| n == "layout")
        .expect("fn layout")
        .1;
    let accepted: BTreeSet<String> = layout_fn
        .match_indices("n == \"")
        .map(|(at, _)| {
            let rest = &layout_fn[at + 6..];
            rest[..rest.find('"').unwrap()].to_string()
        })
        .collect();
    assert_eq!(enum_of(&s("LayoutSpec")["oneOf"][0]), accepted);
    for name in &accepted {
        let spec: api::LayoutSpec = serde_json::from_value(json!(name)).unwrap();
        assert_eq!(spec, api::LayoutSpec::Named(name.clone()));
    }
}

#[test]
fn layouts_match_the_discriminator_mapping() {
    use atlas_core::Layout;
    let spec = spec();
    let layouts = [
        Layout::Isotropic,
        Layout::PerBlock,
        Layout::PerPart { k: 4, seed: 9 },
    ];
    let mapping = schema(spec, "Layout")["discriminator"]["mapping"]
        .as_object()
        .unwrap();
    let mut kinds_seen = BTreeSet::new();
    for l in layouts {
        match l {
            Layout::Isotropic | Layout::PerBlock | Layout::PerPart { .. } => {}
        }
        let v = serde_json::to_value(l).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        let target = resolve(spec, mapping[&kind].as_str().unwrap()).expect("mapping resolves");
        assert_eq!(keys(&v), property_names(target), "layout {kind}: fields");
        spec::validate("Layout", &v);
        kinds_seen.insert(kind);
    }
    assert_eq!(kinds_seen, mapping.keys().cloned().collect());
}

// ---------------------------------------------------------------------------------------------
// Response schemas against the serialized types.

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn property_names(schema: &Value) -> BTreeSet<String> {
    schema["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .cloned()
        .collect()
}

fn required(schema: &Value) -> BTreeSet<String> {
    schema["required"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// `full` (every optional field set) serializes exactly the schema's properties and `bare`
/// (every optional field unset) exactly its required ones; both validate.
fn check_shape<T: serde::Serialize>(name: &str, full: &T, bare: &T) {
    let spec = spec();
    let full = serde_json::to_value(full).unwrap();
    let bare = serde_json::to_value(bare).unwrap();
    let s = schema(spec, name);
    assert_eq!(keys(&full), property_names(s), "{name}: properties");
    assert_eq!(keys(&bare), required(s), "{name}: required");
    assert_eq!(s["additionalProperties"], false, "{name} is closed");
    spec::validate(name, &full);
    spec::validate(name, &bare);
}

fn event(kind: atlas_learn::EventKind, set: bool) -> atlas_learn::Event {
    let some = |x: f64| set.then_some(x);
    atlas_learn::Event {
        kind,
        epoch: 1,
        epochs: 2,
        step: 3,
        total_steps: 6,
        loss: some(0.5),
        lr: 0.1,
        grad_norm: some(1.0),
        val_metric: some(0.9),
        elapsed_s: 1.5,
        eta_s: some(1.5),
    }
}

fn learn_request(set: bool) -> api::LearnRequest {
    api::LearnRequest {
        name: set.then(|| "digits".into()),
        objective: api::Objective::TaskAddition,
        task_vectors: set.then(|| vec!["MNIST".into()]),
        layout: if set {
            api::LayoutSpec::Parts(api::PartsSpec { parts: 4, seed: 2 })
        } else {
            api::LayoutSpec::default()
        },
        tasks: vec![api::TaskData {
            name: set.then(|| "mnist".into()),
            classes: vec!["zero".into(), "one".into()],
            templates: api::Templates::List(vec!["a photo of the number {}.".into()]),
            examples: vec![api::Example {
                image: None,
                file: Some("t0-e0".into()),
                label: set.then_some(1),
            }],
        }],
        config: api::Overrides {
            epochs: set.then_some(3),
            lr: set.then_some(0.1),
            weight_decay: set.then_some(0.0),
            batch_size: set.then_some(8),
            warmup_steps: set.then_some(2),
            seed: set.then_some(u64::MAX),
            val_fraction: set.then_some(0.5),
            augment: set.then_some(false),
            flip: set.then_some(false),
        },
        budget: set.then_some(api::BudgetSpec {
            task_vectors: 1,
            blockwise: true,
        }),
    }
}

fn learn_config(set: bool) -> atlas_learn::LearnConfig {
    let mut c = atlas_learn::LearnConfig::recipe(api::Objective::Ufm);
    c.layout = atlas_core::Layout::PerPart { k: 2, seed: 3 };
    // travel: the recipe's, or none once a request gives lr.
    c.travel = set.then_some(0.2);
    if set {
        c.grad_clip = None;
        c.initial = Some(
            atlas_core::Coefficients::new(atlas_core::Layout::PerBlock, 1, 2, vec![0.1, -0.2])
                .unwrap(),
        );
    }
    c
}

fn composition(set: bool) -> api::Composition {
    use atlas_learn::EventKind;
    api::Composition {
        id: "c0123456789abcdef".into(),
        name: set.then(|| "digits".into()),
        kind: "task_addition".into(),
        status: api::Status::Succeeded,
        task_vectors: vec!["MNIST".into()],
        layout: atlas_core::Layout::PerPart { k: 4, seed: 2 },
        coefficients: set.then(|| vec![0.1; 4]),
        progress: set.then(|| event(EventKind::Finished, true)),
        history: vec![event(EventKind::Resumed, false), event(EventKind::Epoch, true)],
        summary: set.then(|| {
            json!({"metric": "accuracy", "before": 0.5, "after": 0.75, "best_epoch": 1,
                   "outcome": "improved", "warnings": ["Λ barely moved"],
                   "epochs": [{"epoch": 1, "train_loss": 0.4, "val_metric": 0.75, "eligible": true}]})
        }),
        error: set.then(|| "boom".into()),
        provenance: provenance(set),
        request: set.then(|| api::JobRequest::Learn(learn_request(true))),
        created_at: 1.5,
        updated_at: 2.5,
    }
}

fn provenance(set: bool) -> api::Provenance {
    api::Provenance {
        backbone: "openai/clip-vit-base-patch32".into(),
        backbone_digest: "abc".into(),
        task_vector_digests: vec!["def".into()],
        data_hash: set.then(|| "0f".into()),
        seed: set.then_some(7),
        config: set.then(|| learn_config(true)),
        budget: set.then(|| api::BudgetSelection {
            task_vectors: 1,
            blockwise: true,
            kept: vec!["MNIST".into()],
            blocks: Some(vec![api::BlockSelection {
                block: "conv1.weight".into(),
                task_vectors: vec!["MNIST".into()],
            }]),
        }),
        merge: set.then(|| api::MergeRecord {
            method: "ties_merging".into(),
            params: json!({"scaling_factor": 0.3, "threshold": 20.0, "merge_func": "sum"}),
            inputs: vec!["MNIST".into(), "SVHN".into()],
            input_digests: vec!["def".into(), "0a".into()],
        }),
    }
}

fn summary() -> api::TaskVectorSummary {
    api::TaskVectorSummary {
        name: "MNIST".into(),
        dtype: "f16".into(),
        digest: "5e0f".into(),
        bytes: 1024,
        source: "MNIST.safetensors".into(),
    }
}

#[test]
fn response_schemas_match_the_serialized_types() {
    use atlas_learn::EventKind;
    check_shape(
        "Event",
        &event(EventKind::Step, true),
        &event(EventKind::Step, true),
    );
    // Every Event field is serialized, None as null: all are required, and null validates.
    spec::validate(
        "Event",
        &serde_json::to_value(event(EventKind::Started, false)).unwrap(),
    );
    check_shape("Composition", &composition(true), &composition(false));
    check_shape("Provenance", &provenance(true), &provenance(false));
    check_shape("LearnConfig", &learn_config(true), &learn_config(false));
    check_shape(
        "AdamWConfig",
        &learn_config(true).optimizer,
        &learn_config(false).optimizer,
    );
    let coefs = learn_config(true).initial.unwrap();
    check_shape("Coefficients", &coefs, &coefs);
    check_shape(
        "CompositionPage",
        &api::CompositionPage {
            items: vec![composition(true), composition(false)],
            next_offset: Some(2),
        },
        &api::CompositionPage {
            items: vec![],
            next_offset: None,
        },
    );
    let prediction = api::Prediction {
        label: "cat".into(),
        probability: 0.75,
    };
    check_shape("Prediction", &prediction, &prediction);
    let response = api::ClassifyResponse {
        composition: "base".into(),
        head: "h0123456789abcdef".into(),
        predictions: vec![vec![prediction.clone()], vec![]],
    };
    check_shape("ClassifyResponse", &response, &response);
    let head = api::HeadView {
        id: "h0123456789abcdef".into(),
        classes: vec!["cat".into()],
        templates: vec!["a {}.".into()],
    };
    check_shape("HeadView", &head, &head);
    check_shape("TaskVectorSummary", &summary(), &summary());
    let block = || api::BlockInfo {
        name: "visual.conv1".into(),
        numel: 10,
        norm: 0.5,
    };
    check_shape("BlockInfo", &block(), &block());
    let detail = || api::TaskVectorDetail {
        summary: summary(),
        blocks: vec![block()],
    };
    check_shape("TaskVectorDetail", &detail(), &detail());
    let list = || api::TaskVectorList {
        backbone: "b".into(),
        backbone_digest: "d".into(),
        blocks: 3,
        task_vectors: vec![summary()],
    };
    check_shape("TaskVectorList", &list(), &list());
    let problem = || api::Problem {
        kind: "about:blank".into(),
        title: "Not Found".into(),
        status: 404,
        detail: "no composition c1".into(),
    };
    check_shape("Problem", &problem(), &problem());
    let epoch = atlas_learn::checkpoint::EpochSummary {
        epoch: 1,
        train_loss: 0.5,
        val_metric: 0.25,
        eligible: false,
    };
    check_shape("EpochSummary", &epoch, &epoch);
    // The stored learning request inside a composition.
    // Requests serialize unset options as null, so only the properties are compared.
    let full = serde_json::to_value(learn_request(true)).unwrap();
    assert_eq!(keys(&full), property_names(schema(spec(), "LearnRequest")));
    spec::validate("LearnRequest", &full);
    spec::validate(
        "LearnRequest",
        &serde_json::to_value(learn_request(false)).unwrap(),
    );
}

/// Fields of `pub struct name` in `src`: (field, optional), where optional means serde skips
/// it when unset.
fn struct_fields(src: &str, name: &str) -> Vec<(String, bool)> {
    let at = src
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name}"));
    let open = at + src[at..].find('{').unwrap();
    let mut out = Vec::new();
    let mut skip = false;
    for line in balanced(src, open).lines().map(str::trim) {
        if line.starts_with("#[serde") && line.contains("skip_serializing_if") {
            skip = true;
        } else if let Some(field) = line.strip_prefix("pub ") {
            let field = field.split(':').next().unwrap().trim().to_string();
            out.push((field, skip));
            skip = false;
        }
    }
    out
}

/// JobEvent (jobs.rs, not compiled here) and the learning summary (built with json! in jobs.rs):
/// their fields are read from the source.
#[test]
fn schemas_of_the_job_types_match_jobs_rs() {
    let spec = spec();
    let jobs = server_source("jobs");
    let fields = struct_fields(&jobs, "JobEvent");
    let s = schema(spec, "JobEvent");
    let all: BTreeSet<String> = fields.iter().map(|f| f.0.clone()).collect();
    let always: BTreeSet<String> = fields
        .iter()
        .filter(|f| !f.1)
        .map(|f| f.0.clone())
        .collect();
    assert_eq!(all, property_names(s));
    assert_eq!(always, required(s));
    spec::validate(
        "JobEvent",
        &json!({"id": "c1", "status": "running",
                "progress": serde_json::to_value(event(atlas_learn::EventKind::Step, true)).unwrap()}),
    );

    let built = json_objects(&jobs);
    let want = property_names(schema(spec, "LearnSummary"));
    assert!(
        built.contains(&want),
        "jobs.rs builds {built:?}, not {want:?}"
    );
    // Summaries stored before outcome and warnings existed lack them.
    let later: BTreeSet<String> = ["outcome", "warnings"].map(String::from).into();
    assert_eq!(
        required(schema(spec, "LearnSummary")),
        &want - &later,
        "required: all but {later:?}"
    );
    assert!(
        jobs.contains("\"epochs\": out.history"),
        "the summary's epochs are EpochSummary values"
    );
    // The metric names: those of atlas-learn's `metric_name`.
    let learner = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../atlas-learn/src/learner.rs");
    let learner = strip_comments(&std::fs::read_to_string(learner).expect("learner.rs"));
    let (_, metric_fn) = fns_of(&learner)
        .into_iter()
        .find(|(n, _)| n == "metric_name")
        .expect("fn metric_name in atlas-learn");
    let names: BTreeSet<String> = metric_fn
        .split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    assert_eq!(
        enum_of(&schema(spec, "LearnSummary")["properties"]["metric"]),
        names
    );
    use atlas_learn::Outcome;
    let outcomes = [Outcome::Improved, Outcome::KeptStart];
    for o in outcomes {
        match o {
            Outcome::Improved | Outcome::KeptStart => {}
        }
    }
    assert_eq!(
        enum_of(&schema(spec, "LearnSummary")["properties"]["outcome"]),
        serde_names(&outcomes)
    );
}

/// The top-level keys of every `json!({...})` object in `src`.
fn json_objects(src: &str) -> Vec<BTreeSet<String>> {
    let mut all = Vec::new();
    for (at, _) in src.match_indices("json!(") {
        let body = balanced(src, at + "json!".len()).trim();
        let Some(body) = body.strip_prefix('{').and_then(|b| b.strip_suffix('}')) else {
            continue;
        };
        let mut out = BTreeSet::new();
        let mut depth = 0;
        let mut in_str = false;
        let mut key_start = None;
        let mut expect_key = true;
        let mut prev = ' ';
        for (i, c) in body.char_indices() {
            match c {
                '"' if prev != '\\' => {
                    in_str = !in_str;
                    if depth == 0 && expect_key {
                        match key_start {
                            None => key_start = Some(i + 1),
                            Some(s) => {
                                out.insert(body[s..i].to_string());
                                key_start = None;
                                expect_key = false;
                            }
                        }
                    }
                }
                '(' | '{' | '[' if !in_str => depth += 1,
                ')' | '}' | ']' if !in_str => depth -= 1,
                ',' if !in_str && depth == 0 => expect_key = true,
                _ => {}
            }
            prev = c;
        }
        all.push(out);
    }
    all
}

// ---------------------------------------------------------------------------------------------
// Examples and request schemas against the real request types.

/// JSON pointer escaping of one key.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// (where, pointer to the schema, example value) for every example of every media type of
/// every request body and response.
fn examples(spec: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for ((method, path), op) in operations(spec) {
        let base = format!("/paths/{}/{method}", escape(&path));
        let mut contents = vec![(
            format!("{base}/requestBody/content"),
            &op["requestBody"]["content"],
        )];
        for (status, resp) in op["responses"].as_object().unwrap() {
            let content = &deref(spec, resp)["content"];
            let at = match resp.get("$ref").and_then(Value::as_str) {
                Some(r) => format!("{}/content", r.strip_prefix('#').unwrap()),
                None => format!("{base}/responses/{status}/content"),
            };
            contents.push((at, content));
        }
        for (at, content) in contents {
            for (mtype, media) in content.as_object().into_iter().flatten() {
                let pointer = format!("{at}/{}/schema", escape(mtype));
                let mut values: Vec<(String, Value)> = Vec::new();
                if let Some(v) = media.get("example") {
                    values.push(("example".into(), v.clone()));
                }
                for (name, ex) in media["examples"].as_object().into_iter().flatten() {
                    values.push((name.clone(), ex["value"].clone()));
                }
                for (name, v) in values {
                    let place = format!("{method} {path} {mtype} {name} ({at})");
                    out.push((place, pointer.clone(), v));
                }
            }
        }
    }
    out
}

#[test]
fn every_example_validates_against_its_schema() {
    let spec = spec();
    let all = examples(spec);
    assert!(all.len() >= 20, "only {} examples", all.len());
    let mut json_examples = 0;
    for (place, pointer, value) in &all {
        // Text bodies (plain text, event streams) are examples of strings.
        if value.is_string() {
            continue;
        }
        json_examples += 1;
        let errs = spec::errors(pointer, value);
        assert!(errs.is_empty(), "{place}:\n  {}", errs.join("\n  "));
    }
    assert!(json_examples >= 15);
}

fn parse<T: DeserializeOwned>(v: &Value, what: &str) -> T {
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{what} does not deserialize: {e}"))
}

fn request_examples(spec: &Value, path: &str, mtype: &str) -> Vec<(String, Value)> {
    let media = &spec["paths"][path]["post"]["requestBody"]["content"][mtype];
    let mut out: Vec<(String, Value)> = media["examples"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v["value"].clone()))
        .collect();
    if let Some(v) = media.get("example") {
        out.push(("example".into(), v.clone()));
    }
    out
}

#[test]
fn request_examples_deserialize_into_the_real_types() {
    let spec = spec();
    let classify = request_examples(spec, "/classify", "application/json");
    assert!(classify.len() >= 2);
    for (name, v) in &classify {
        let _: api::ClassifyRequest = parse(v, &format!("classify example {name}"));
    }
    for (name, v) in request_examples(spec, "/heads", "application/json") {
        let _: api::HeadRequest = parse(&v, &format!("head example {name}"));
    }
    for (name, v) in request_examples(spec, "/task-vectors", "application/json") {
        let r: api::TaskVectorRequest = parse(&v, &format!("task-vector example {name}"));
        let sources = [
            r.checkpoint.is_some(),
            r.file.is_some(),
            r.safetensors.is_some(),
            r.finetune.is_some(),
        ];
        assert_eq!(sources.iter().filter(|&&x| x).count(), 1, "{name}");
    }
    // Compositions: with `objective` a learning request, else explicit coefficients (the rule
    // of compositions::create); every shape of explicit coefficients is shown.
    let create = server_source("compositions");
    assert!(create.contains("body.json.get(\"objective\").is_some()"));
    let mut shapes = BTreeSet::new();
    let mut learned = 0;
    assert!(create.contains("body.json.get(\"method\").is_some()"));
    let mut merged = BTreeSet::new();
    for (name, v) in request_examples(spec, "/compositions", "application/json") {
        if v.get("objective").is_some() {
            let _: api::LearnRequest = parse(&v, &format!("composition example {name}"));
            learned += 1;
            continue;
        }
        if v.get("method").is_some() {
            let r: api::MergeRequest = parse(&v, &format!("composition example {name}"));
            merged.insert(r.method);
            continue;
        }
        let r: api::ExplicitRequest = parse(&v, &format!("composition example {name}"));
        for c in r.coefficients {
            shapes.insert(match c {
                api::TvCoefficients::Scalar(_) => "scalar",
                api::TvCoefficients::PerBlock(_) => "per block",
                api::TvCoefficients::PerPart(_) => "per part",
                api::TvCoefficients::ByName(_) => "by name",
            });
        }
    }
    assert_eq!(shapes.len(), 4, "explicit examples show only {shapes:?}");
    assert!(learned >= 2);
    assert!(merged.len() >= 2, "merge examples show only {merged:?}");
    let multipart = request_examples(spec, "/compositions", "multipart/form-data");
    assert!(!multipart.is_empty());
    for (name, v) in multipart {
        let r: api::LearnRequest = parse(&v["request"], &format!("multipart example {name}"));
        assert!(r.tasks[0].examples.iter().all(|e| e.file.is_some()));
    }
}

/// Asserts that the schema and the real type agree on `value`: both accept it or both refuse.
fn agree<T: DeserializeOwned>(schema: &str, value: Value) {
    let errs = spec::errors(&format!("/components/schemas/{schema}"), &value);
    let by_type = serde_json::from_value::<T>(value.clone()).map(|_| ());
    assert_eq!(
        errs.is_empty(),
        by_type.is_ok(),
        "{schema} and the real type disagree on {value}:\n  schema: {errs:?}\n  type: {by_type:?}"
    );
}

const IMG: &str =
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNoAAAAggCBd81ytgAAAABJRU5ErkJggg==";

#[test]
fn request_schemas_accept_and_refuse_what_the_types_do() {
    use api::*;
    for v in [
        json!({"classes": ["a"], "images": [IMG]}),
        json!({"head": "h1", "composition": null, "top_k": 3}),
        json!({"classes": ["a"], "templates": "MNIST"}),
        json!({"classes": ["a"], "templates": ["a {}."]}),
        json!({"classes": ["a"], "zzz": 1}),
        json!({"classes": "a"}),
        json!({"top_k": "3"}),
        json!({"top_k": -1}),
        json!({"templates": 3}),
        json!({"images": [1]}),
    ] {
        agree::<ClassifyRequest>("ClassifyRequest", v);
    }
    for v in [
        json!({"classes": ["a"]}),
        json!({"classes": ["a"], "templates": ["a {}."]}),
        json!({}),
        json!({"classes": ["a"], "head": "h1"}),
    ] {
        agree::<HeadRequest>("HeadRequest", v);
    }
    for v in [
        json!({"task_vectors": ["a"], "coefficients": [1]}),
        json!({"task_vectors": ["a"], "coefficients": [[1, 2]], "name": null}),
        json!({"task_vectors": ["a"], "coefficients": [[[1], [2]]], "parts_seed": 3}),
        json!({"task_vectors": ["a"], "coefficients": [{"*": 1, "b": -2}]}),
        json!({"task_vectors": ["a"], "coefficients": ["x"]}),
        json!({"task_vectors": ["a"]}),
        json!({"task_vectors": ["a"], "coefficients": [1], "objective": "few_shot"}),
        json!({"task_vectors": ["a"], "coefficients": [1], "parts_seed": -1}),
    ] {
        agree::<ExplicitRequest>("ExplicitRequest", v);
    }
    let task = json!({"classes": ["a"], "examples": [{"image": IMG}]});
    for v in [
        json!({"objective": "entropy", "tasks": [task]}),
        json!({"objective": "multi_task", "tasks": [task, task]}),
        json!({"objective": "few_shot", "layout": {"parts": 4}, "tasks": [task]}),
        json!({"objective": "few_shot", "layout": "isotropic", "task_vectors": null, "tasks": [task]}),
        json!({"objective": "ufm", "config": {"epochs": 3, "lr": null}, "tasks": [task]}),
        json!({"objective": "few_shot", "tasks": [{"classes": ["a"], "examples": [{"file": "x.png", "label": 0}]}]}),
        json!({"objective": "few_shot", "tasks": [{"classes": ["a"], "examples": [{"image": IMG, "label": null}]}]}),
        json!({"objective": "bogus", "tasks": [task]}),
        json!({"objective": "few_shot", "layout": 3, "tasks": [task]}),
        json!({"objective": "few_shot", "config": {"epoch": 3}, "tasks": [task]}),
        json!({"objective": "few_shot", "tasks": [{"classes": ["a"], "examples": [{"image": IMG, "label": -1}]}]}),
        json!({"objective": "few_shot", "tasks": [{"classes": ["a"], "examples": [{"image": IMG, "x": 1}]}]}),
        json!({"objective": "few_shot", "tasks": [{"classes": ["a"]}]}),
        json!({"objective": "few_shot"}),
        json!({"objective": "few_shot", "tasks": [task], "coefficients": [1]}),
    ] {
        agree::<LearnRequest>("LearnRequest", v);
    }
    for v in [
        json!({"name": "a", "file": "a.safetensors"}),
        json!({"name": "a", "checkpoint": null, "safetensors": "AAAA"}),
        json!({"name": "a", "url": "x"}),
        json!({"file": "a.safetensors"}),
    ] {
        agree::<TaskVectorRequest>("TaskVectorRequest", v);
    }
    for v in [
        json!({"method": "ties_merging", "task_vectors": ["a"]}),
        json!({"method": "magmax", "task_vectors": ["a", "b"], "params": {"scaling_factor": 1}}),
        json!({"method": "simple_average", "task_vectors": ["a"], "name": null, "task_vector": "m"}),
        json!({"method": "ties_merging"}),
        json!({"method": "ties_merging", "task_vectors": ["a"], "coefficients": [1]}),
        json!({"method": "ties_merging", "task_vectors": ["a"], "params": [1]}),
        json!({"method": "bogus", "task_vectors": ["a"]}),
    ] {
        agree::<MergeRequest>("MergeRequest", v);
    }
    // A body is one kind only.
    for v in [
        json!({"task_vectors": ["a"], "coefficients": [1]}),
        json!({"objective": "entropy", "tasks": [task]}),
        json!({"method": "task_arithmetic", "task_vectors": ["a"]}),
    ] {
        let errs = spec::errors("/components/schemas/CompositionRequest", &v);
        assert!(errs.is_empty(), "{v}: {errs:?}");
    }
}

/// Defaults the spec states are the ones serde and the handlers apply.
#[test]
fn defaults_match_the_code() {
    let spec = spec();
    let s = |name| schema(spec, name);
    let minimal: api::ClassifyRequest = parse(&json!({}), "an empty classify request");
    let props = &s("ClassifyRequest")["properties"];
    assert_eq!(props["top_k"]["default"], minimal.top_k);
    assert_eq!(props["images"]["default"], json!(minimal.images));
    assert!(minimal.composition.is_none());
    assert!(server_source("classify").contains(&format!(
        "unwrap_or_else(|| {}.into())",
        props["composition"]["default"]
    )));
    assert_eq!(
        s("Templates")["default"],
        serde_json::to_value(api::Templates::default()).unwrap()
    );
    assert_eq!(
        s("LayoutSpec")["default"],
        serde_json::to_value(api::LayoutSpec::default()).unwrap()
    );
    let parts: api::LayoutSpec = parse(&json!({"parts": 2}), "a parts layout");
    let parts_schema = &s("LayoutSpec")["oneOf"][1]["properties"];
    assert_eq!(
        serde_json::to_value(parts).unwrap()["seed"],
        parts_schema["seed"]["default"]
    );
    let explicit: api::ExplicitRequest = parse(
        &json!({"task_vectors": ["a"], "coefficients": [1]}),
        "an explicit request",
    );
    assert_eq!(
        s("ExplicitRequest")["properties"]["parts_seed"]["default"],
        explicit.parts_seed
    );
    assert_eq!(
        spec["components"]["parameters"]["Offset"]["schema"]["default"],
        0
    );
    assert!(server_source("compositions").contains("#[serde(default)]\n    offset: usize"));
}

// ---------------------------------------------------------------------------------------------
// The validator itself.

fn panic_message(f: impl FnOnce() + std::panic::UnwindSafe) -> Option<String> {
    let err = std::panic::catch_unwind(f).err()?;
    Some(
        err.downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default(),
    )
}

#[test]
fn validate_accepts_a_good_object_and_rejects_a_bad_one() {
    let good = json!({"type": "about:blank", "title": "Not Found", "status": 404,
                      "detail": "no composition c1"});
    spec::validate("Problem", &good);
    // A wrong type, a missing field and an unknown one: each is refused with its path.
    let msg = panic_message(|| {
        spec::validate(
            "Problem",
            &json!({"type": "about:blank", "title": "x", "status": "404"}),
        )
    })
    .expect("a bad Problem is refused");
    assert!(msg.contains("Problem"), "{msg}");
    assert!(msg.contains("at /status"), "{msg}");
    assert!(msg.contains("detail"), "{msg}");
    let mut extra = good.clone();
    extra["error"] = json!("x");
    assert!(panic_message(|| spec::validate("Problem", &extra)).is_some());
    // Through $refs: a composition whose layout has an unknown kind, and a nested event.
    let mut c = serde_json::to_value(composition(true)).unwrap();
    spec::validate("Composition", &c);
    c["layout"] = json!({"kind": "diagonal"});
    c["history"][1]["epoch"] = json!(-1);
    let msg = panic_message(|| spec::validate("Composition", &c)).expect("refused");
    assert!(msg.contains("at /layout"), "{msg}");
    assert!(msg.contains("at /history/1/epoch"), "{msg}");
    // An unknown schema is a test bug, said as such.
    let msg = panic_message(|| spec::validate("NoSuchSchema", &good)).expect("refused");
    assert!(
        msg.contains("no schema at /components/schemas/NoSuchSchema"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// Request examples against a real server.

/// Ids the examples use for objects a client made earlier.
const EXAMPLE_COMPOSITION: &str = "c5f0e1d2c3b4a5968";
const EXAMPLE_HEAD: &str = "h3f9a0c1b2d3e4f50";

/// Every string equal to `from`, anywhere in `v`, becomes `to`.
fn replace_strings(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) if s == from => *s = to.to_string(),
        Value::Array(a) => a.iter_mut().for_each(|x| replace_strings(x, from, to)),
        Value::Object(o) => o.values_mut().for_each(|x| replace_strings(x, from, to)),
        _ => {}
    }
}

/// Rows written for a short backbone, widened to `n_blocks` by repeating their last block.
fn widen_rows(v: &mut Value, n_blocks: usize) {
    for entry in v["coefficients"].as_array_mut().into_iter().flatten() {
        if let Some(row) = entry.as_array_mut() {
            let last = row.last().cloned().unwrap();
            row.resize(n_blocks, last);
        }
    }
}

/// A safetensors file with every f32 doubled: a delta or checkpoint whose task vector has a
/// digest new to the library (the fixture's fine-tunes are the fixture's deltas).
fn doubled(path: &std::path::Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert!(header
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, t)| k == "__metadata__" || t["dtype"] == "F32"));
    for x in bytes[8 + n..].chunks_exact_mut(4) {
        let v = f32::from_le_bytes(x.try_into().unwrap()) * 2.0;
        x.copy_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// Every request example in openapi.yaml is posted to a real server (the tiny fixture model,
/// its library and hub cache laid out with the names the examples use) and must be accepted.
/// The liberties taken, and no others: the example ids of a composition and a head become ids
/// this server made; an uploaded delta's placeholder bytes become a real delta; rows written
/// for "a 2-block backbone" widen to the fixture's blocks; multipart examples get the file
/// parts they name.
#[test]
fn every_request_example_is_accepted_by_a_real_server() {
    let fixtures = common::fixtures();
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib");
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::copy(fixtures.join(common::TVS[0]), lib.join("MNIST.safetensors")).unwrap();
    for (ft, to) in [("ft_a", "finetuned/gtsrb"), ("ft_c", "finetuned/dtd")] {
        common::copy_dir(&fixtures.join(ft), &lib.join(to));
        let weights = lib.join(to).join("model.safetensors");
        std::fs::write(&weights, doubled(&weights)).unwrap();
    }
    // The hub id of the checkpoint example, in a hub cache (the server runs offline).
    let hub = dir.path().join("hub");
    let repo = hub.join("models--someone--clip-vit-b32-eurosat");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    common::copy_dir(&fixtures.join("ft_b"), &repo.join("snapshots").join(commit));
    let s = common::start(
        &dir.path().join("data"),
        &common::library_flags(&lib),
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HUB_CACHE", hub.to_str().unwrap()),
        ],
    );
    // Copied after the start, as the `file` example's description has it.
    std::fs::copy(fixtures.join(common::TVS[1]), lib.join("SVHN.safetensors")).unwrap();
    let upload = common::b64(&doubled(&fixtures.join(common::TVS[0])));
    let (_, mnist) = s.get("/task-vectors/MNIST");
    let blocks: Vec<String> = mnist["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();

    let spec = spec();
    // In this order: task vectors before the compositions that use them, and a composition
    // and a head before the classifications that name them.
    let order = ["/task-vectors", "/heads", "/compositions", "/classify"];
    for ((method, path), op) in operations(spec) {
        let content = &op["requestBody"]["content"];
        let has_examples = content.as_object().into_iter().flatten().any(|(_, m)| {
            m.get("example").is_some() || m.get("examples").is_some_and(|e| e.is_object())
        });
        assert!(
            !has_examples || order.contains(&path.as_str()),
            "{method} {path} has request examples this test does not post"
        );
    }
    let (mut composition, mut head) = (None::<String>, None::<String>);
    let mut posted = 0;
    for path in order {
        let media = &spec["paths"][path]["post"]["requestBody"]["content"];
        for mtype in ["application/json", "multipart/form-data"] {
            let summaries = &media[mtype]["examples"];
            for (name, mut value) in request_examples(spec, path, mtype) {
                let place = format!("POST {path} {mtype} example {name:?}");
                let summary = summaries[&name]["summary"].as_str().unwrap_or("");
                if let Some(id) = &composition {
                    replace_strings(&mut value, EXAMPLE_COMPOSITION, id);
                }
                if let Some(id) = &head {
                    replace_strings(&mut value, EXAMPLE_HEAD, id);
                }
                if summary.contains("2-block backbone") {
                    widen_rows(&mut value, blocks.len());
                }
                if value.get("safetensors").is_some() {
                    value["safetensors"] = json!(upload);
                }
                let (code, answer) = if mtype == "application/json" {
                    s.post(path, &value)
                } else {
                    let mut form = reqwest::blocking::multipart::Form::new()
                        .text("request", value["request"].to_string());
                    let files = value["request"]["tasks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .flat_map(|t| t["examples"].as_array().unwrap())
                        .filter_map(|e| e["file"].as_str());
                    for (i, f) in files.enumerate() {
                        let part = reqwest::blocking::multipart::Part::bytes(common::png(i as u8))
                            .file_name(f.to_string());
                        form = form.part("images", part);
                    }
                    s.post_with(path, |r| r.multipart(form))
                };
                assert!(
                    (200..300).contains(&code),
                    "{place} was refused: {code} {answer}"
                );
                posted += 1;
                if path == "/compositions" && code == 201 && composition.is_none() {
                    composition = answer["id"].as_str().map(String::from);
                }
                if path == "/heads" {
                    head = answer["id"].as_str().map(String::from);
                }
                if name == "by_block_name" {
                    check_by_name(&value, &answer, &blocks);
                }
            }
        }
    }
    assert!(composition.is_some() && head.is_some());
    assert!(posted >= 15, "only {posted} examples posted");
}

/// The by-name example's stored row: exact names over patterns, `*` for the rest.
fn check_by_name(request: &Value, answer: &Value, blocks: &[String]) {
    let map = request["coefficients"][0].as_object().unwrap();
    let row = answer["coefficients"].as_array().unwrap();
    assert_eq!(row.len(), blocks.len(), "{answer}");
    let mut patterned = 0;
    for (b, name) in blocks.iter().enumerate() {
        let want = if let Some(v) = map.get(name) {
            v
        } else if let Some(prefix) = map
            .keys()
            .filter_map(|k| k.strip_suffix(".*").filter(|p| !p.contains('*')))
            .find(|p| name.starts_with(&format!("{p}.")))
        {
            patterned += 1;
            &map[&format!("{prefix}.*")]
        } else {
            &map["*"]
        };
        assert_eq!(&row[b], want, "block {name}");
    }
    assert!(
        patterned > 1,
        "the example's pattern matched {patterned} blocks"
    );
}
