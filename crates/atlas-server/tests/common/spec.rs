//! Validation of live responses against openapi.yaml's schemas (being written).

use serde_json::Value;

/// Panics when `value` does not validate against `#/components/schemas/<schema>`.
pub fn validate(_schema: &str, _value: &Value) {}
