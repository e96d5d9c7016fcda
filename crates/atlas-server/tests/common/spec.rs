//! Validation of JSON values against the schemas of openapi.yaml (JSON Schema 2020-12, the
//! dialect of OpenAPI 3.1). Internal `$ref`s resolve against the whole spec document.

use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// openapi.yaml (repository root) as JSON.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi.yaml");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("openapi.yaml parses");
        serde_json::to_value(yaml).expect("openapi.yaml is JSON-compatible")
    })
}

/// A validator for the schema at `pointer` (a JSON pointer into the spec, such as
/// `/components/schemas/Composition`), compiled once.
fn validator(pointer: &str) -> Arc<jsonschema::Validator> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = cache.get(pointer) {
        return v.clone();
    }
    let doc = document();
    assert!(
        doc.pointer(pointer).is_some(),
        "openapi.yaml has no schema at {pointer}"
    );
    // The spec document itself is the root schema (its OpenAPI keys are unknown keywords and
    // so ignored), so that every "#/components/..." reference inside it resolves.
    // Braces (of path templates) are not allowed in a URI fragment: percent-encode them.
    let fragment = pointer.replace('{', "%7B").replace('}', "%7D");
    let mut root = doc.clone();
    root["$ref"] = Value::String(format!("#{fragment}"));
    let v = jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&root)
        .unwrap_or_else(|e| panic!("the schema at {pointer} does not compile: {e}"));
    let v = Arc::new(v);
    cache.insert(pointer.to_string(), v.clone());
    v
}

/// Why `value` does not validate against the schema at `pointer`: one line per error, with the
/// path inside `value` and the reason; empty when it validates.
pub fn errors(pointer: &str, value: &Value) -> Vec<String> {
    let v = validator(pointer);
    v.iter_errors(value)
        .map(|e| {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            format!("at {at}: {e}")
        })
        .collect()
}

/// Panics, saying where and why, unless `value` validates against
/// `#/components/schemas/<schema>` of openapi.yaml.
pub fn validate(schema: &str, value: &Value) {
    let errs = errors(&format!("/components/schemas/{schema}"), value);
    assert!(
        errs.is_empty(),
        "does not validate against openapi.yaml's {schema}:\n  {}\nvalue: {}",
        errs.join("\n  "),
        short(value)
    );
}

/// The value as JSON, cut to a readable length.
fn short(value: &Value) -> String {
    let s = value.to_string();
    match s.char_indices().nth(2000) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}
