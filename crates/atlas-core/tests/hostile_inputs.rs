//! Hostile safetensors files, task-vector names and coefficients, built in code: each is
//! refused with a message naming the problem, and the inputs just inside the limits pass.

use atlas_core::coefficients::{resolve, CoefficientsRequest, MAX_ABS_COEFFICIENT};
use atlas_core::safetensors_io::{check_header, printable, read_bytes, MAX_HEADER_BYTES};
use atlas_core::task_vector::{check_name, Delta};
use atlas_core::{
    Block, Coefficients, Layout, Library, Manifest, StorageDType, TaskVector, TaskVectorMeta,
    TensorSpec,
};
use std::sync::Arc;

fn manifest() -> Manifest {
    Manifest::new(vec![
        Block::single(TensorSpec::new("w", &[2, 2])),
        Block::single(TensorSpec::new("b", &[3])),
    ])
    .unwrap()
}

/// A safetensors file from a raw JSON header and data section.
fn file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// `w` then `b` as F32, end to end (28 bytes), with the given metadata name.
fn good_file(name: &str, b: [f32; 3]) -> Vec<u8> {
    let header = format!(
        r#"{{"__metadata__":{{"name":{name:?}}},"w":{{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}},"b":{{"dtype":"F32","shape":[3],"data_offsets":[16,28]}}}}"#
    );
    let data: Vec<u8> = [0.5f32, -0.5, 0.25, 1.0]
        .iter()
        .chain(&b)
        .flat_map(|x| x.to_le_bytes())
        .collect();
    file(&header, &data)
}

fn parse(bytes: &[u8], dtype: StorageDType) -> Result<TaskVector, String> {
    let defaults = TaskVectorMeta {
        name: "upload".into(),
        ..TaskVectorMeta::default()
    };
    TaskVector::from_bytes(bytes, &manifest(), dtype, &|_| false, defaults)
        .map_err(|e| e.to_string())
}

#[test]
fn header_length_is_bounded_and_checked() {
    let e = check_header(&(1u64 << 63).to_le_bytes())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("header length 9223372036854775808") && e.contains("over the limit"),
        "{e}"
    );
    // One over the limit is refused from the length alone, before anything is read.
    let e = check_header(&(MAX_HEADER_BYTES + 1).to_le_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("over the limit"), "{e}");
    let mut short = 100u64.to_le_bytes().to_vec();
    short.extend_from_slice(b"{}");
    let e = check_header(&short).unwrap_err().to_string();
    assert!(
        e.contains("header length 100") && e.contains("2 bytes follow"),
        "{e}"
    );
    assert!(check_header(&file("{}", b"")).is_ok());
}

#[test]
fn offsets_must_tile_the_data_exactly() {
    let entry = |name: &str, s: usize, e: usize| {
        format!(r#""{name}":{{"dtype":"F32","shape":[2],"data_offsets":[{s},{e}]}}"#)
    };
    let cases = [
        (
            format!("{{{},{}}}", entry("a", 0, 8), entry("b", 4, 12)),
            12,
            "tensor b: data offsets [4, 12] overlap tensor a",
        ),
        (
            format!("{{{},{}}}", entry("a", 0, 8), entry("b", 12, 20)),
            20,
            "tensor b: data starts at 12, leaving a gap after byte 8",
        ),
        (
            format!("{{{}}}", entry("a", 8, 16)),
            8,
            "tensor a: data offsets [8, 16] run past the end of the data (8 bytes)",
        ),
        (
            format!("{{{}}}", entry("a", 0, 4)),
            4,
            "tensor a: shape [2] of F32 needs 8 bytes, its data offsets [0, 4] hold 4",
        ),
        (
            format!("{{{}}}", entry("a", 0, 8)),
            12,
            "4 bytes after the last tensor's data",
        ),
        (
            format!("{{{},{}}}", entry("a", 0, 8), entry("a", 8, 16)),
            16,
            "tensor a: appears twice in the header",
        ),
    ];
    for (header, data_len, want) in cases {
        let e = read_bytes(&file(&header, &vec![0; data_len]))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{header}: {e}");
    }
}

#[test]
fn from_bytes_validates_and_matches_load() {
    let bytes = good_file("mine", [1.0, 2.0, 3.0]);
    let tv = parse(&bytes, StorageDType::F16).unwrap();
    assert_eq!(tv.name(), "mine");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let loaded = TaskVector::load(&path, &manifest(), StorageDType::F16, &|_| false).unwrap();
    assert_eq!(loaded.digest(), tv.digest());

    // Tensors are checked against the manifest before their data is converted.
    let header = r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[3],"data_offsets":[16,28]}}"#;
    let e = parse(&file(header, &[0; 28]), StorageDType::F16).unwrap_err();
    assert!(
        e.contains("tensor w: has shape [4], the backbone has [2, 2]"),
        "{e}"
    );
    // A load error names the file too.
    std::fs::write(&path, file(header, &[0; 28])).unwrap();
    let e = TaskVector::load(&path, &manifest(), StorageDType::F16, &|_| false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("t.safetensors") && e.contains("tensor w"), "{e}");
}

#[test]
fn values_must_fit_the_storage_dtype() {
    let big = good_file("big", [1.0, 1e10, 3.0]);
    let e = parse(&big, StorageDType::F16).unwrap_err();
    assert!(
        e.contains("tensor b: element 1 is 10000000000, beyond the range of F16"),
        "{e}"
    );
    // f32 storage holds it; 65504 is the largest f16 and fits.
    assert!(parse(&big, StorageDType::F32).is_ok());
    assert!(parse(
        &good_file("edge", [65504.0, -65504.0, 0.0]),
        StorageDType::F16
    )
    .is_ok());
}

#[test]
fn task_vector_names_are_checked() {
    for ok in ["ft_a", "task arithmetic (α = 0.3)", &"é".repeat(128)] {
        check_name(ok).unwrap();
    }
    let cases = [
        ("", "has 0 characters"),
        (&*"é".repeat(129), "has 129 characters"),
        ("a\0b", "control character"),
        ("line\nbreak", "control character"),
        ("../evil", "must not be a path"),
        ("a\\b", "must not be a path"),
        ("..", "must not be a path"),
    ];
    for (name, want) in cases {
        let e = check_name(name).unwrap_err().to_string();
        assert!(e.contains(want), "{name:?}: {e}");
    }
    let e = parse(&good_file("../../x", [0.0; 3]), StorageDType::F16).unwrap_err();
    assert!(
        e.contains("task vector name \"../../x\" must not be a path"),
        "{e}"
    );
}

#[test]
fn printable_escapes_and_shortens() {
    assert_eq!(printable("a\0b\n"), "a\\u{0}b\\n");
    let long = printable(&"ж".repeat(5000));
    assert_eq!(long.chars().count(), 103);
    assert!(long.ends_with("..."));
}

fn library() -> Library {
    let m = Arc::new(manifest());
    let mut lib = Library::new(m.clone(), "");
    for name in ["a", "b"] {
        let deltas = m.tensor_specs().map(|(s, _)| Delta {
            name: s.name.clone(),
            shape: s.shape.clone(),
            data: vec![0.5; s.numel()],
        });
        let meta = TaskVectorMeta {
            name: name.into(),
            ..TaskVectorMeta::default()
        };
        lib.add(TaskVector::from_deltas(&m, meta, StorageDType::F16, deltas, &|_| false).unwrap())
            .unwrap();
    }
    lib
}

#[test]
fn resolve_names_the_task_vector_and_block() {
    let lib = library();
    let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let e = resolve(
        &lib,
        &names(&["a", "b"]),
        Layout::PerBlock,
        vec![0.0, 0.0, 1e308, 0.0],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("value 1e308 at index 2 (task vector b, block w)"),
        "{e}"
    );
    let e = resolve(
        &lib,
        &names(&["b"]),
        Layout::PerPart { k: 2, seed: 0 },
        vec![0.0, 0.0, 0.0, f64::NAN],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("task vector b, block b, part 1"), "{e}");
    let (tvs, c) = resolve(
        &lib,
        &names(&["b", "a"]),
        Layout::Isotropic,
        vec![MAX_ABS_COEFFICIENT, -MAX_ABS_COEFFICIENT],
    )
    .unwrap();
    assert_eq!((tvs[0].name(), c.values.len()), ("b", 2));
    for (bad, want) in [
        (names(&[]), "at least one task vector"),
        (names(&["a", "a"]), "task vector a is named twice"),
        (names(&["a", "zz"]), "no task vector named zz"),
    ] {
        let n = bad.len();
        let e = resolve(&lib, &bad, Layout::Isotropic, vec![0.0; n])
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{bad:?}: {e}");
    }
}

#[test]
fn absurd_k_is_refused_in_json_and_before_allocating() {
    for k in ["0", "1000000000"] {
        let json = format!(
            r#"{{"task_vectors":["a"],"layout":{{"kind":"per_part","k":{k},"seed":0}},"values":[]}}"#
        );
        let e = CoefficientsRequest::from_json(json.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("must be in 1..=256, got {k}")), "{e}");
    }
    // zeros() used to allocate n_tv x n_blocks x K values before checking K.
    let e = Coefficients::zeros(
        Layout::PerPart {
            k: 1 << 40,
            seed: 0,
        },
        1 << 20,
        1 << 20,
    );
    assert!(e.unwrap_err().to_string().contains("parts per block"));
    let e = Coefficients::new(Layout::PerBlock, usize::MAX, 2, vec![0.0]);
    assert!(e.unwrap_err().to_string().contains("over the limit"));
}

#[test]
fn stored_coefficients_are_validated_when_read() {
    // Before, this deserialised and then panicked on `block(1, 1)` (index out of range).
    let json = r#"{"layout":{"kind":"per_block"},"n_tv":2,"n_blocks":2,"values":[1.0]}"#;
    let e = serde_json::from_str::<Coefficients>(json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected 4 values"), "{e}");
    let json = r#"{"layout":{"kind":"isotropic"},"n_tv":1,"n_blocks":2,"values":[2e6]}"#;
    let e = serde_json::from_str::<Coefficients>(json)
        .unwrap_err()
        .to_string();
    assert!(e.contains("value 2000000 at index 0"), "{e}");
    // Found reviewing the fuzz harness: one isotropic value claiming 2^40 blocks passed, then
    // expanded() asked for 8 TiB.
    let json =
        r#"{"layout":{"kind":"isotropic"},"n_tv":1,"n_blocks":1099511627776,"values":[0.5]}"#;
    let e = serde_json::from_str::<Coefficients>(json)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("1 task vectors x 1099511627776 blocks x 1 parts is over the limit of 16777216"),
        "{e}"
    );
    let e = Coefficients::new(Layout::Isotropic, usize::MAX, 2, vec![]).unwrap_err();
    assert!(e.to_string().contains("over the limit"), "{e}");
    let c = Coefficients::new(Layout::PerPart { k: 2, seed: 3 }, 1, 2, vec![0.5; 4]).unwrap();
    let back: Coefficients = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}
