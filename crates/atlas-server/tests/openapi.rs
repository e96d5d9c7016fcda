//! `openapi.yaml` (repository root) against the server's source: the documented operations are
//! exactly the routes that `server/routes.rs` registers, every `$ref` resolves, the limits and
//! enums match the code, the examples deserialize into the real request types, and the response
//! schemas list exactly the fields the real types serialize.

// The request and response types, compiled from the server's own source (the binary crate has
// no library to import them from).
#[allow(dead_code)]
#[path = "../src/server/api.rs"]
mod api;

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn spec() -> Value {
    let text = std::fs::read_to_string(repo_root().join("openapi.yaml")).expect("openapi.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("openapi.yaml parses");
    serde_json::to_value(yaml).expect("openapi.yaml is JSON-compatible")
}

fn routes_source() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/server/routes.rs");
    strip_comments(&std::fs::read_to_string(path).expect("routes.rs"))
}

/// Drops `//` comments (outside string literals) so that commented-out routes do not count.
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

/// The text between the parenthesis that opens at `open` and its match.
fn balanced(src: &str, open: usize) -> &str {
    assert_eq!(&src[open..open + 1], "(");
    let mut depth = 0;
    let mut in_str = false;
    let mut prev = ' ';
    for (i, c) in src[open..].char_indices() {
        match c {
            '"' if prev != '\\' => in_str = !in_str,
            '(' if !in_str => depth += 1,
            ')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return &src[open + 1..open + i];
                }
            }
            _ => {}
        }
        prev = c;
    }
    panic!("unbalanced parenthesis in routes.rs")
}

const METHODS: [&str; 8] = [
    "get", "post", "put", "delete", "patch", "head", "options", "trace",
];

/// The HTTP methods of a method router such as `post(create).get(list)`: method names called at
/// the top level of the expression (handlers' own calls sit deeper and are not counted).
fn methods_of(expr: &str) -> Vec<String> {
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
                if METHODS.contains(&ident) && expr[i..].trim_start().starts_with('(') {
                    out.push(ident.to_string());
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// (method, path) of every `.route("path", method_router)` in routes.rs.
fn served_routes() -> BTreeSet<(String, String)> {
    routes_in(&routes_source())
}

fn routes_in(src: &str) -> BTreeSet<(String, String)> {
    for unsupported in [".nest(", ".merge(", ".route_service(", ".nest_service("] {
        assert!(
            !src.contains(unsupported),
            "routes.rs uses {unsupported}: teach tests/openapi.rs to read it"
        );
    }
    let mut out = BTreeSet::new();
    for (at, _) in src.match_indices(".route(") {
        let args = balanced(src, at + ".route".len());
        let args = args.trim_start();
        assert!(args.starts_with('"'), "route path is not a literal: {args}");
        let end = args[1..].find('"').expect("closing quote") + 1;
        let path = &args[1..end];
        let rest = args[end + 1..].trim_start();
        let router = rest.strip_prefix(',').expect("route(path, router)");
        let methods = methods_of(router);
        assert!(!methods.is_empty(), "no methods found for route {path}");
        for m in methods {
            // axum 0.8 writes captures as `{id}`, like OpenAPI; 0.7's `:id` is converted.
            let path = path
                .split('/')
                .map(|seg| match seg.strip_prefix(':') {
                    Some(name) => format!("{{{name}}}"),
                    None => seg.to_string(),
                })
                .collect::<Vec<_>>()
                .join("/");
            assert!(out.insert((m.clone(), path.clone())), "{m} {path} twice");
        }
    }
    assert!(!out.is_empty(), "no routes found in routes.rs");
    out
}

fn documented_routes(spec: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for (key, _) in item.as_object().expect("path item") {
            if METHODS.contains(&key.as_str()) {
                out.insert((key.clone(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn the_route_reader_reads_method_routers() {
    assert_eq!(
        methods_of(r#" post(create).get(list) "#),
        vec!["post", "get"]
    );
    assert_eq!(
        methods_of(r#"get(|| async { s.get(1).post(2) })"#),
        vec!["get"]
    );
    assert_eq!(
        methods_of("axum::routing::delete(h).put(p)"),
        vec!["delete", "put"]
    );
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
                get(b).delete(|Path(id): Path<String>| async move { s.delete(id) }),
            )
            // .route("/commented", get(c))
            .route("/old/:id", axum::routing::put(d))
            .layer(x)
    "#;
    let want: BTreeSet<(String, String)> = [
        ("post", "/a"),
        ("get", "/b/{id}"),
        ("delete", "/b/{id}"),
        ("put", "/old/{id}"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(routes_in(&strip_comments(src)), want);
}

#[test]
fn documented_operations_are_exactly_the_served_routes() {
    let served = served_routes();
    let documented = documented_routes(&spec());
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let phantom: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty() && phantom.is_empty(),
        "openapi.yaml is out of step with routes.rs\n  served but not documented: {undocumented:?}\n  documented but not served: {phantom:?}"
    );
    // What the lead asked for, so that a reader-side bug cannot make both sides empty.
    for (m, p) in [
        ("post", "/classify"),
        ("post", "/compositions"),
        ("get", "/compositions"),
        ("get", "/compositions/{id}"),
        ("delete", "/compositions/{id}"),
        ("get", "/task-vectors"),
        ("get", "/healthz"),
        ("get", "/metrics"),
    ] {
        assert!(served.contains(&(m.to_string(), p.to_string())), "{m} {p}");
    }
}

fn resolve<'a>(spec: &'a Value, reference: &str) -> Option<&'a Value> {
    let pointer = reference.strip_prefix('#')?;
    spec.pointer(pointer)
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
    collect_refs(&spec, "", &mut refs);
    assert!(refs.len() > 20, "suspiciously few $refs: {}", refs.len());
    let unresolved: Vec<_> = refs
        .iter()
        .filter(|(_, r)| resolve(&spec, r).is_none())
        .collect();
    assert!(unresolved.is_empty(), "unresolved $refs: {unresolved:?}");
    let used: BTreeSet<&str> = refs.iter().map(|(_, r)| r.as_str()).collect();
    for kind in ["schemas", "responses", "parameters"] {
        for name in spec["components"][kind]
            .as_object()
            .into_iter()
            .flat_map(|m| m.keys())
        {
            let r = format!("#/components/{kind}/{name}");
            assert!(used.contains(r.as_str()), "{r} is never referenced");
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
fn operations_have_responses_and_declared_path_parameters() {
    let spec = spec();
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
            assert!(
                op["operationId"].is_string(),
                "{method} {path} has no operationId"
            );
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path} has no responses");
            let declared: BTreeSet<String> = item["parameters"]
                .as_array()
                .into_iter()
                .chain(op["parameters"].as_array())
                .flatten()
                .map(|p| deref(&spec, p))
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(declared, captures, "{method} {path}: path parameters");
        }
    }
}

/// Status codes that routes.rs answers with appear in the spec, each on some operation.
#[test]
fn status_codes_used_by_the_handlers_are_documented() {
    let src = routes_source();
    let documented: BTreeSet<String> = spec()["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op.get("responses")?.as_object())
        .flat_map(|r| r.keys().cloned())
        .collect();
    let mut seen = 0;
    for (at, _) in src.match_indices("StatusCode::") {
        let name: String = src[at + "StatusCode::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        let code = match name.as_str() {
            "OK" => "200",
            "CREATED" => "201",
            "ACCEPTED" => "202",
            "BAD_REQUEST" => "400",
            "NOT_FOUND" => "404",
            "CONFLICT" => "409",
            "PAYLOAD_TOO_LARGE" => "413",
            "UNPROCESSABLE_ENTITY" => "422",
            "TOO_MANY_REQUESTS" => "429",
            "INTERNAL_SERVER_ERROR" => "500",
            "SERVICE_UNAVAILABLE" => "503",
            other => {
                panic!("StatusCode::{other} in routes.rs: add it to this test and openapi.yaml")
            }
        };
        assert!(
            documented.contains(code),
            "routes.rs answers {code} ({name}), openapi.yaml never does"
        );
        seen += 1;
    }
    assert!(seen >= 5, "found only {seen} StatusCode uses in routes.rs");
}

/// `pub const NAME: usize = <expr>;` from routes.rs, for plain numbers and `a << b`.
fn routes_const(name: &str) -> u64 {
    let src = routes_source();
    let decl = format!("pub const {name}: usize = ");
    let at = src
        .find(&decl)
        .unwrap_or_else(|| panic!("{name} in routes.rs"))
        + decl.len();
    let expr: String = src[at..]
        .split(';')
        .next()
        .unwrap()
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '_')
        .collect();
    match expr.split_once("<<") {
        Some((a, b)) => a.parse::<u64>().unwrap() << b.parse::<u64>().unwrap(),
        None => expr.parse().unwrap(),
    }
}

#[test]
fn limits_match_the_code() {
    let spec = spec();
    let s = &spec["components"]["schemas"];
    let images = routes_const("MAX_IMAGES");
    let classes = routes_const("MAX_CLASSES");
    let examples = routes_const("MAX_EXAMPLES");
    let body = routes_const("MAX_BODY");
    assert_eq!(
        s["ClassifyRequest"]["properties"]["images"]["maxItems"],
        images
    );
    assert_eq!(s["Classes"]["maxItems"], classes);
    assert_eq!(
        s["TaskData"]["properties"]["examples"]["maxItems"],
        examples
    );
    assert_eq!(s["PerPartLayout"]["properties"]["k"]["maximum"], 256);
    let description = spec["info"]["description"].as_str().unwrap();
    for needle in [
        format!("{} MiB ({body} bytes)", body >> 20),
        format!("1 to\n{images} images"),
        format!("1 to {classes} classes"),
        format!("1 to\n{examples} examples"),
    ] {
        assert!(
            description
                .replace('\n', " ")
                .contains(&needle.replace('\n', " ")),
            "info.description does not say {needle:?}"
        );
    }
}

fn enum_of(spec: &Value, schema: &str) -> BTreeSet<String> {
    spec["components"]["schemas"][schema]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("{schema} has no enum"))
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

#[test]
fn enums_match_the_serde_names() {
    use api::{Objective, Status};
    use atlas_learn::EventKind;
    // Exhaustive matches: a new variant stops this test compiling until it is listed here.
    let objectives = [
        Objective::FewShot,
        Objective::MultiTask,
        Objective::Negation,
        Objective::Entropy,
        Objective::Ufm,
    ];
    for o in objectives {
        match o {
            Objective::FewShot
            | Objective::MultiTask
            | Objective::Negation
            | Objective::Entropy
            | Objective::Ufm => {}
        }
    }
    let statuses = [
        Status::Queued,
        Status::Running,
        Status::Ready,
        Status::Failed,
        Status::Cancelled,
    ];
    for s in statuses {
        match s {
            Status::Queued
            | Status::Running
            | Status::Ready
            | Status::Failed
            | Status::Cancelled => {}
        }
    }
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
    let spec = spec();
    assert_eq!(enum_of(&spec, "Objective"), serde_names(&objectives));
    assert_eq!(enum_of(&spec, "Status"), serde_names(&statuses));
    assert_eq!(enum_of(&spec, "EventKind"), serde_names(&kinds));

    // Layouts: each variant's serde form has the kind the spec's mapping names.
    use atlas_core::Layout;
    let layouts = [
        Layout::Isotropic,
        Layout::PerBlock,
        Layout::PerPart { k: 4, seed: 0 },
    ];
    let mapping = spec["components"]["schemas"]["Layout"]["discriminator"]["mapping"]
        .as_object()
        .unwrap();
    let mut kinds_seen = BTreeSet::new();
    for l in layouts {
        match l {
            Layout::Isotropic | Layout::PerBlock | Layout::PerPart { .. } => {}
        }
        let v = serde_json::to_value(l).unwrap();
        let kind = v["kind"].as_str().unwrap().to_string();
        let schema = resolve(&spec, mapping[&kind].as_str().unwrap()).expect("mapping resolves");
        assert_eq!(
            keys(&v),
            property_names(schema),
            "layout {kind}: fields differ"
        );
        kinds_seen.insert(kind);
    }
    assert_eq!(kinds_seen, mapping.keys().cloned().collect());
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object().unwrap().keys().cloned().collect()
}

fn property_names(schema: &Value) -> BTreeSet<String> {
    schema["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .cloned()
        .collect()
}

fn schema<'a>(spec: &'a Value, name: &str) -> &'a Value {
    &spec["components"]["schemas"][name]
}

/// Response schemas list exactly the fields the real types serialize, all of them set.
#[test]
fn response_schemas_match_the_serialized_types() {
    let spec = spec();
    let event = atlas_learn::Event {
        kind: atlas_learn::EventKind::Epoch,
        epoch: 1,
        epochs: 2,
        step: 3,
        total_steps: 6,
        loss: Some(0.5),
        lr: 0.1,
        grad_norm: Some(1.0),
        val_metric: Some(0.9),
        elapsed_s: 1.5,
        eta_s: Some(1.5),
    };
    let ev = serde_json::to_value(&event).unwrap();
    assert_eq!(keys(&ev), property_names(schema(&spec, "Event")));
    // Every Event field is always serialized (None as null), so all are required.
    let required: BTreeSet<String> = schema(&spec, "Event")["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys(&ev), required);

    let view = api::CompositionView {
        id: "c1".into(),
        name: Some("n".into()),
        status: api::Status::Ready,
        task_vectors: vec!["MNIST".into()],
        layout: atlas_core::Layout::PerBlock,
        n_coefficients: 12,
        progress: Some(event),
        summary: Some(json!({})),
        error: Some("e".into()),
    };
    let v = serde_json::to_value(&view).unwrap();
    assert_eq!(keys(&v), property_names(schema(&spec, "CompositionView")));

    let response = api::ClassifyResponse {
        composition: None,
        predictions: vec![vec![api::Prediction {
            class: "cat".into(),
            score: 1.0,
        }]],
    };
    let v = serde_json::to_value(&response).unwrap();
    assert_eq!(keys(&v), property_names(schema(&spec, "ClassifyResponse")));
    assert_eq!(
        keys(&v["predictions"][0][0]),
        property_names(schema(&spec, "Prediction"))
    );
    let v = serde_json::to_value(api::ErrorBody { error: "x".into() }).unwrap();
    assert_eq!(keys(&v), property_names(schema(&spec, "ErrorBody")));
    let v = serde_json::to_value(api::LearnOverrides::default()).unwrap();
    assert_eq!(keys(&v), property_names(schema(&spec, "LearnOverrides")));

    // The learning summary and the task-vector listing are built with json! in jobs.rs and
    // routes.rs: their keys are read from the source.
    let jobs = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/server/jobs.rs"),
    )
    .unwrap();
    let built = json_objects(&strip_comments(&jobs));
    let want = property_names(schema(&spec, "LearnSummary"));
    assert!(
        built.contains(&want),
        "jobs.rs builds {built:?}, not {want:?}"
    );
    let built = json_objects(&routes_source());
    for name in ["TaskVectorList", "TaskVectorInfo"] {
        let want = property_names(schema(&spec, name));
        assert!(
            built.contains(&want),
            "routes.rs builds {built:?}, not {name} {want:?}"
        );
    }
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

/// The request examples in the spec deserialize into the real request types.
#[test]
fn request_examples_deserialize_into_the_real_types() {
    let spec = spec();
    let classify = &spec["paths"]["/classify"]["post"]["requestBody"]["content"]
        ["application/json"]["example"];
    let req: api::ClassifyRequest = serde_json::from_value(classify.clone()).unwrap();
    assert_eq!(req.composition.as_deref(), Some("c1"));
    let resp = &spec["paths"]["/classify"]["post"]["responses"]["200"]["content"]
        ["application/json"]["example"];
    let _: api::ClassifyResponse = serde_json::from_value(resp.clone()).unwrap();

    let examples = spec["paths"]["/compositions"]["post"]["requestBody"]["content"]
        ["application/json"]["examples"]
        .as_object()
        .unwrap();
    assert!(examples.len() >= 2);
    for (name, ex) in examples {
        let body = ex["value"].clone();
        let parsed: api::CompositionRequest = serde_json::from_value(body)
            .unwrap_or_else(|e| panic!("example {name} does not deserialize: {e}"));
        match (name.as_str(), parsed) {
            ("explicit", api::CompositionRequest::Explicit { .. })
            | ("learn", api::CompositionRequest::Learn { .. }) => {}
            (name, other) => panic!("example {name} parsed as {other:?}"),
        }
    }

    // Defaults that the spec states are the ones serde applies.
    let minimal: api::ClassifyRequest =
        serde_json::from_value(json!({"classes": ["a"], "images": ["x"]})).unwrap();
    let props = &schema(&spec, "ClassifyRequest")["properties"];
    assert_eq!(props["top_k"]["default"], minimal.top_k);
    assert_eq!(
        schema(&spec, "Templates")["default"],
        serde_json::to_value(&minimal.templates).unwrap()
    );
    let learn: api::CompositionRequest = serde_json::from_value(json!({
        "kind": "learn", "objective": "entropy", "task_vectors": ["a"],
        "tasks": [{"classes": ["a"], "examples": [{"image": "x"}]}]
    }))
    .unwrap();
    let api::CompositionRequest::Learn { layout, .. } = learn else {
        panic!("not a learning request")
    };
    assert_eq!(
        schema(&spec, "LearnComposition")["properties"]["layout"]["default"],
        serde_json::to_value(layout).unwrap()
    );
    // Templates: a name or a list, both accepted by the real type.
    for t in [json!("MNIST"), json!(["a photo of a {}."])] {
        let _: api::Templates = serde_json::from_value(t).unwrap();
    }
}
