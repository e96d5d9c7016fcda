//! Replays the committed fuzz corpus (fuzz/corpus/task_vector and fuzz/corpus/coefficients)
//! through the fuzz targets' own bodies, on stable: no input may panic or take long, every
//! `seed-*` file is accepted, and every `hostile-*` file is refused with a message naming the
//! problem (the tables below). Other files are minimised fuzzer findings: they must not panic.

#[path = "../../../fuzz/src/core_harness.rs"]
#[allow(dead_code)]
mod harness;

#[path = "../../../fuzz/corpus_replay.rs"]
mod corpus_replay;

use corpus_replay::{check, replay};

#[test]
fn task_vector_corpus() {
    let results = replay("task_vector", harness::task_vector);
    let expected: &[(&str, &[&str])] = &[
        ("hostile-empty", &["0 bytes is too short"]),
        ("hostile-too-short", &["3 bytes is too short"]),
        ("hostile-no-tensors", &["tensor emb", "missing"]),
        (
            "hostile-header-len-2pow63",
            &["header length 9223372036854775808", "over the limit"],
        ),
        (
            "hostile-header-len-u64-max",
            &["header length 18446744073709551615", "over the limit"],
        ),
        (
            "hostile-header-len-past-end",
            &["header length 1000", "past the end"],
        ),
        ("hostile-header-not-utf8", &["header is not UTF-8"]),
        ("hostile-header-not-json", &["header is not a JSON object"]),
        ("hostile-header-array", &["header is not a JSON object"]),
        (
            "hostile-header-deep-nesting",
            &["header is not a JSON object", "recursion limit"],
        ),
        ("hostile-offsets-overlap", &["tensor q", "overlap tensor k"]),
        ("hostile-offsets-gap", &["tensor bias", "gap"]),
        (
            "hostile-offsets-out-of-range",
            &["tensor emb", "run past the end of the data"],
        ),
        (
            "hostile-offsets-past-u64",
            &["tensor emb", "bad header entry"],
        ),
        ("hostile-offsets-reversed", &["tensor emb", "reversed"]),
        (
            "hostile-offsets-size-mismatch",
            &["tensor emb", "needs 48 bytes", "hold 40"],
        ),
        (
            "hostile-trailing-bytes",
            &["16 bytes after the last tensor"],
        ),
        ("hostile-unknown-dtype", &["tensor emb", "F128"]),
        (
            "hostile-shape-overflow",
            &["tensor emb", "no whole byte size"],
        ),
        (
            "hostile-wrong-shape",
            &["tensor emb", "shape [3, 4]", "the backbone has [4, 3]"],
        ),
        (
            "hostile-wrong-dtype",
            &["tensor emb", "I32", "expected a float"],
        ),
        ("hostile-meta-not-strings", &["__metadata__", "strings"]),
        (
            "hostile-meta-name-dotdot",
            &["task vector name", "../../etc/passwd", "must not be a path"],
        ),
        (
            "hostile-meta-name-nul",
            &["task vector name", "evil\\u{0}", "control character"],
        ),
        (
            "hostile-meta-name-long-unicode",
            &["task vector name", "6000 characters", "1 to 128"],
        ),
        (
            "hostile-name-dotdot",
            &["tensor ../../etc/passwd", "not a tensor of the backbone"],
        ),
        (
            "hostile-name-nul",
            &["tensor emb\\u{0}/x", "not a tensor of the backbone"],
        ),
        (
            "hostile-name-long-unicode",
            &["...", "not a tensor of the backbone"],
        ),
        ("hostile-name-empty", &["not a tensor of the backbone"]),
        ("hostile-duplicate-tensor", &["tensor emb", "appears twice"]),
        (
            "hostile-nan-value",
            &["tensor bias", "element 2 is not finite"],
        ),
        (
            "hostile-inf-value",
            &["tensor bias", "element 3 is not finite"],
        ),
        (
            "hostile-f16-overflow",
            &["tensor bias", "element 4 is 10000000000", "F16"],
        ),
        (
            "hostile-f64-overflow",
            &["tensor emb", "element 0 is not finite"],
        ),
        ("hostile-missing-tensor", &["tensor bias", "missing"]),
        (
            "hostile-extra-float-tensor",
            &["tensor extra", "not a tensor"],
        ),
    ];
    check("task_vector", &results, expected);
}

#[test]
fn coefficients_corpus() {
    let results = replay("coefficients", harness::coefficients);
    let expected: &[(&str, &[&str])] = &[
        ("hostile-empty", &["EOF while parsing"]),
        ("hostile-not-json", &["expected value"]),
        ("hostile-nan-token", &["expected value"]),
        ("hostile-nan-string", &["invalid type: string \"NaN\""]),
        ("hostile-infinity", &["expected value"]),
        (
            "hostile-1e308",
            &[
                "value 1e308 at index 1",
                "task vector b, every block",
                "at most 1e6",
            ],
        ),
        (
            "hostile-minus-1e308-per-block",
            &["value -1e308 at index 2", "task vector b, block bias"],
        ),
        ("hostile-1e309", &["number out of range"]),
        (
            "hostile-just-over-max",
            &["value 1000000.5", "task vector a"],
        ),
        ("hostile-k0", &["parts per block must be in 1..=256, got 0"]),
        (
            "hostile-k1e9",
            &["parts per block must be in 1..=256, got 1000000000"],
        ),
        ("hostile-k-negative", &["invalid value: integer `-1`"]),
        ("hostile-k-1e30", &["invalid type: floating point"]),
        ("hostile-wrong-count", &["expected 8 values", "got 7"]),
        ("hostile-unknown-tv", &["no task vector named nope"]),
        ("hostile-duplicate-tv", &["task vector a is named twice"]),
        ("hostile-no-tvs", &["at least one task vector"]),
        ("hostile-tv-name-nul", &["no task vector named a\\u{0}b"]),
        (
            "hostile-tv-name-long-unicode",
            &["no task vector named", "..."],
        ),
        ("hostile-unknown-layout", &["unknown variant `per_galaxy`"]),
        ("hostile-wrong-types", &["invalid type"]),
        ("hostile-deep-nesting", &["missing field `task_vectors`"]),
        (
            "hostile-stored-k1e9",
            &["parts per block must be in 1..=256, got 1000000000"],
        ),
        ("hostile-stored-huge-shape", &["over the limit of 16777216"]),
        (
            "hostile-stored-isotropic-2pow40-blocks",
            &["1099511627776 blocks", "over the limit of 16777216"],
        ),
        (
            "hostile-stored-1e308",
            &["value 1e308 at index 0", "task vector 0, every block"],
        ),
    ];
    check("coefficients", &results, expected);
}
