//! Task vectors over a small hand-made manifest (no CLIP): save/load round trips at every storage
//! dtype, validation that names the first bad tensor, and the library's admission rules.

use atlas_core::safetensors_io::{read_file, write_file, OutTensor};
use atlas_core::task_vector::Delta;
use atlas_core::{
    Block, Buffer, Library, Manifest, StorageDType, TaskVector, TaskVectorMeta, TensorSpec,
};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::sync::Arc;

/// `emb` [4,3], a grouped `qkv` block (q, k, v each [2,3]), `bias` [5] and `proj` [2,2], the
/// one tensor checkpoints may leave out.
fn manifest() -> Manifest {
    Manifest::new(vec![
        Block::single(TensorSpec::new("emb", &[4, 3])),
        Block {
            name: "qkv".into(),
            tensors: vec![
                TensorSpec::new("q", &[2, 3]),
                TensorSpec::new("k", &[2, 3]),
                TensorSpec::new("v", &[2, 3]),
            ],
        },
        Block::single(TensorSpec::new("bias", &[5])),
        Block::single(TensorSpec::new("proj", &[2, 2])),
    ])
    .unwrap()
}

/// The same tensors, but `bias` has 6 elements: another manifest.
fn other_manifest() -> Manifest {
    Manifest::new(vec![
        Block::single(TensorSpec::new("emb", &[4, 3])),
        Block {
            name: "qkv".into(),
            tensors: vec![
                TensorSpec::new("q", &[2, 3]),
                TensorSpec::new("k", &[2, 3]),
                TensorSpec::new("v", &[2, 3]),
            ],
        },
        Block::single(TensorSpec::new("bias", &[6])),
        Block::single(TensorSpec::new("proj", &[2, 2])),
    ])
    .unwrap()
}

fn only_proj(name: &str) -> bool {
    name == "proj"
}
fn nothing(_: &str) -> bool {
    false
}

fn delta(name: &str, shape: &[usize], seed: f32) -> Delta {
    let n: usize = shape.iter().product();
    Delta {
        name: name.into(),
        shape: shape.to_vec(),
        // Distinct, non-trivial values with a spread of magnitudes (not exactly representable
        // at half precision).
        data: (0..n)
            .map(|i| (seed + i as f32 * 0.37).sin() * 10f32.powi(i as i32 % 3 - 2))
            .collect(),
    }
}

/// Every tensor except `proj`.
fn deltas(seed: f32) -> Vec<Delta> {
    vec![
        delta("emb", &[4, 3], seed),
        delta("k", &[2, 3], seed + 1.0),
        delta("q", &[2, 3], seed + 2.0),
        delta("v", &[2, 3], seed + 3.0),
        delta("bias", &[5], seed + 4.0),
    ]
}

fn meta(name: &str) -> TaskVectorMeta {
    TaskVectorMeta {
        name: name.into(),
        base_model: "org/base-model".into(),
        base_digest: "ab12cd34ef56".into(),
        source: "/data/finetuned/cars".into(),
    }
}

fn build(name: &str, dtype: StorageDType, seed: f32) -> TaskVector {
    TaskVector::from_deltas(&manifest(), meta(name), dtype, deltas(seed), &only_proj).unwrap()
}

fn err_of(r: atlas_core::Result<TaskVector>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn blocks_follow_the_manifest_layout() {
    let m = manifest();
    let tv = build("t", StorageDType::F32, 0.5);
    let ds = deltas(0.5);
    // Grouped block: q, k, v concatenated in manifest order, whatever order the deltas came in.
    let qkv = tv.block(1).to_f32_vec();
    let want: Vec<f32> = ["q", "k", "v"]
        .iter()
        .flat_map(|n| ds.iter().find(|d| d.name == *n).unwrap().data.clone())
        .collect();
    assert_eq!(qkv, want);
    assert_eq!(tv.tensor_f32(&m, "k").unwrap(), ds[1].data);
    // The tensor allowed to be missing is a zero block taking no memory.
    assert!(tv.block(3).is_zero());
    assert_eq!(tv.tensor_f32(&m, "proj").unwrap(), vec![0.0; 4]);
    assert_eq!(tv.nbytes(), (12 + 18 + 5) * 4);
    assert_eq!(tv.manifest_digest(), m.digest());
}

#[test]
fn save_and_load_round_trip_at_every_dtype() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    for (dtype, st_dtype) in [
        (StorageDType::F16, Dtype::F16),
        (StorageDType::BF16, Dtype::BF16),
        (StorageDType::F32, Dtype::F32),
    ] {
        let tv = build("cars", dtype, 0.25);
        assert_eq!(tv.dtype(), dtype);
        let path = dir.path().join(format!("cars-{dtype:?}.safetensors"));
        tv.save(&path, &m).unwrap();
        assert!(
            !path.with_extension("safetensors.tmp").exists(),
            "temporary file left behind"
        );

        let back = TaskVector::load(&path, &m, dtype, &nothing).unwrap();
        assert_eq!(back.blocks(), tv.blocks(), "{dtype:?}: blocks differ");
        assert_eq!(back.digest(), tv.digest(), "{dtype:?}: digest differs");
        assert_eq!(back.meta, tv.meta, "{dtype:?}: metadata differs");
        assert_eq!(back.dtype(), dtype);
        assert!(back.block(3).is_zero(), "zero block must stay zero");

        // Values stay within the storage precision of the originals.
        let tol = match dtype {
            StorageDType::F32 => 0.0,
            StorageDType::F16 => 1e-3,
            StorageDType::BF16 => 8e-3,
        };
        for d in deltas(0.25) {
            let got = back.tensor_f32(&m, &d.name).unwrap();
            for (g, w) in got.iter().zip(&d.data) {
                assert!(
                    (g - w).abs() <= w.abs() * tol + 1e-7,
                    "{dtype:?} {}",
                    d.name
                );
            }
        }

        // Readable with the safetensors crate directly: provenance in the metadata, every
        // manifest tensor stored at the storage dtype with its shape.
        let bytes = std::fs::read(&path).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let md = header.metadata().clone().unwrap();
        assert_eq!(md["name"], "cars");
        assert_eq!(md["base_model"], "org/base-model");
        assert_eq!(md["base_digest"], "ab12cd34ef56");
        assert_eq!(md["source"], "/data/finetuned/cars");
        assert_eq!(md["digest"], tv.digest());
        assert_eq!(md["manifest_digest"], m.digest());
        assert_eq!(md["format"], "atlas-task-vector/1");
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(names, ["bias", "emb", "k", "proj", "q", "v"]);
        for (spec, _) in m.tensor_specs() {
            let view = st.tensor(&spec.name).unwrap();
            assert_eq!(view.dtype(), st_dtype, "{}", spec.name);
            assert_eq!(view.shape(), spec.shape.as_slice(), "{}", spec.name);
        }
    }
}

#[test]
fn digest_depends_on_values_and_dtype() {
    let a = build("a", StorageDType::F32, 0.25);
    let same = build("other-name", StorageDType::F32, 0.25);
    assert_eq!(
        a.digest(),
        same.digest(),
        "the name is provenance, not content"
    );
    let mut ds = deltas(0.25);
    ds[4].data[2] += 0.5;
    let changed =
        TaskVector::from_deltas(&manifest(), meta("a"), StorageDType::F32, ds, &only_proj).unwrap();
    assert_ne!(a.digest(), changed.digest());
    assert_ne!(
        a.digest(),
        build("a", StorageDType::F16, 0.25).digest(),
        "storage dtype is part of the digest"
    );
}

#[test]
fn loading_at_another_dtype_converts() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f32.safetensors");
    build("t", StorageDType::F32, 1.5).save(&path, &m).unwrap();
    let as_f16 = TaskVector::load(&path, &m, StorageDType::F16, &nothing).unwrap();
    let direct = build("t", StorageDType::F16, 1.5);
    assert_eq!(as_f16.blocks(), direct.blocks());
    assert!(matches!(as_f16.block(0), Buffer::F16(_)));
}

#[test]
fn files_without_metadata_take_the_file_name_and_skip_integer_buffers() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain_delta.safetensors");
    let mut out: Vec<OutTensor> = deltas(0.1).into_iter().map(f32_tensor).collect();
    out.push(OutTensor {
        name: "position_ids".into(),
        dtype: Dtype::I64,
        shape: vec![1, 3],
        bytes: [0i64, 1, 2].iter().flat_map(|x| x.to_le_bytes()).collect(),
    });
    write_file(&path, &out, HashMap::new()).unwrap();
    let tv = TaskVector::load(&path, &m, StorageDType::F32, &only_proj).unwrap();
    assert_eq!(tv.name(), "plain_delta");
    assert_eq!(tv.meta.source, path.display().to_string());
    assert_eq!(tv.meta.base_digest, "");
    assert_eq!(tv.blocks(), build("x", StorageDType::F32, 0.1).blocks());

    // An integer tensor under a manifest name is not a buffer to skip.
    let mut out: Vec<OutTensor> = deltas(0.1).into_iter().map(f32_tensor).collect();
    out.retain(|t| t.name != "bias");
    out.push(OutTensor {
        name: "bias".into(),
        dtype: Dtype::I32,
        shape: vec![5],
        bytes: vec![0; 20],
    });
    write_file(&path, &out, HashMap::new()).unwrap();
    let e = err_of(TaskVector::load(&path, &m, StorageDType::F32, &only_proj));
    assert!(e.contains("bias") && e.contains("I32"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
}

fn f32_tensor(d: Delta) -> OutTensor {
    OutTensor {
        name: d.name,
        dtype: Dtype::F32,
        shape: d.shape,
        bytes: d.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

#[test]
fn validation_names_the_first_bad_tensor() {
    let m = manifest();
    let make = |ds: Vec<Delta>, missing: &dyn Fn(&str) -> bool| {
        TaskVector::from_deltas(&m, meta("t"), StorageDType::F16, ds, missing)
    };

    // Unknown name; a second bad tensor after it must not be the one reported.
    let mut ds = deltas(0.0);
    ds.insert(1, delta("mystery", &[3], 0.0));
    ds.push(delta("bias2", &[5], 0.0));
    let e = err_of(make(ds, &only_proj));
    assert!(e.contains("mystery") && !e.contains("bias2"), "{e}");

    // Wrong shape (same element count, so only the shape check can catch it).
    let mut ds = deltas(0.0);
    ds[0] = delta("emb", &[3, 4], 0.0);
    ds[4] = delta("bias", &[6], 0.0);
    let e = err_of(make(ds, &only_proj));
    assert!(
        e.contains("tensor emb")
            && e.contains("[3, 4]")
            && e.contains("[4, 3]")
            && !e.contains("bias"),
        "{e}"
    );

    // Data length not matching the declared shape.
    let mut ds = deltas(0.0);
    ds[4].data.pop();
    let e = err_of(make(ds, &only_proj));
    assert!(e.contains("tensor bias"), "{e}");

    // Duplicated.
    let mut ds = deltas(0.0);
    ds.push(delta("q", &[2, 3], 9.0));
    let e = err_of(make(ds, &only_proj));
    assert!(e.contains("tensor q") && e.contains("twice"), "{e}");

    // Non-finite values, each kind.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut ds = deltas(0.0);
        ds[3].data[4] = bad;
        let e = err_of(make(ds, &only_proj));
        assert!(
            e.contains("tensor v") && e.contains("element 4") && e.contains("finite"),
            "{bad}: {e}"
        );
    }

    // Missing tensor that may not be missing: named, with where it is missing from.
    let ds: Vec<Delta> = deltas(0.0).into_iter().filter(|d| d.name != "k").collect();
    let e = err_of(make(ds, &only_proj));
    assert!(
        e.contains("tensor k") && e.contains("missing") && e.contains("/data/finetuned/cars"),
        "{e}"
    );
    // `proj` is only allowed to be missing when the caller says so.
    let e = err_of(make(deltas(0.0), &nothing));
    assert!(e.contains("tensor proj") && e.contains("missing"), "{e}");
    // With every tensor present, nothing needs to be allowed missing.
    let mut ds = deltas(0.0);
    ds.push(delta("proj", &[2, 2], 3.0));
    let tv = make(ds, &nothing).unwrap();
    assert!(!tv.block(3).is_zero());
}

#[test]
fn file_errors_name_the_path() {
    let m = manifest();
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("nope.safetensors");
    let e = err_of(TaskVector::load(&missing, &m, StorageDType::F16, &nothing));
    assert!(e.contains("nope.safetensors"), "{e}");

    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    let e = err_of(TaskVector::load(&garbage, &m, StorageDType::F16, &nothing));
    assert!(e.contains("garbage.safetensors"), "{e}");

    let good = dir.path().join("good.safetensors");
    build("t", StorageDType::F16, 0.3).save(&good, &m).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    for cut in [4, 20, bytes.len() / 2, bytes.len() - 1] {
        let truncated = dir.path().join("truncated.safetensors");
        std::fs::write(&truncated, &bytes[..cut]).unwrap();
        let e = err_of(TaskVector::load(
            &truncated,
            &m,
            StorageDType::F16,
            &nothing,
        ));
        assert!(e.contains("truncated.safetensors"), "cut at {cut}: {e}");
        assert!(read_file(&truncated).is_err());
    }

    // A well-formed file whose content does not fit names both the file and the tensor.
    let wrong = dir.path().join("wrong_shape.safetensors");
    let mut out: Vec<OutTensor> = deltas(0.0).into_iter().map(f32_tensor).collect();
    out[4] = f32_tensor(delta("bias", &[7], 0.0));
    write_file(&wrong, &out, HashMap::new()).unwrap();
    let e = err_of(TaskVector::load(&wrong, &m, StorageDType::F16, &only_proj));
    assert!(
        e.contains("wrong_shape.safetensors") && e.contains("tensor bias") && e.contains("[7]"),
        "{e}"
    );
}

#[test]
fn saving_over_another_manifest_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tv = build("t", StorageDType::F16, 0.0);
    let path = dir.path().join("t.safetensors");
    let e = tv.save(&path, &other_manifest()).unwrap_err().to_string();
    assert!(e.contains("another block manifest"), "{e}");
    assert!(!path.exists());
}

#[test]
fn library_admission_and_selection() {
    let m = Arc::new(manifest());
    let mut lib = Library::new(m.clone(), "ab12cd34ef56");
    assert!(lib.is_empty());
    lib.add(build("cars", StorageDType::F16, 0.0)).unwrap();
    lib.add(build("dtd", StorageDType::F16, 1.0)).unwrap();
    // A task vector that records no base digest is accepted.
    let mut no_base = build("svhn", StorageDType::F16, 2.0);
    no_base.meta.base_digest.clear();
    lib.add(no_base).unwrap();
    assert_eq!(lib.names(), ["cars", "dtd", "svhn"]);
    assert_eq!(lib.nbytes(), 3 * (12 + 18 + 5) * 2);

    // Duplicate name.
    let e = lib
        .add(build("dtd", StorageDType::F16, 5.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("dtd") && e.contains("already"), "{e}");

    // Over another manifest (same names, one shape differs).
    let other = TaskVector::from_deltas(
        &other_manifest(),
        meta("eurosat"),
        StorageDType::F16,
        {
            let mut ds = deltas(0.0);
            ds[4] = delta("bias", &[6], 0.0);
            ds
        },
        &only_proj,
    )
    .unwrap();
    let e = lib.add(other).unwrap_err().to_string();
    assert!(
        e.contains("eurosat") && e.contains("another block manifest"),
        "{e}"
    );

    // Relative to another base.
    let mut foreign = build("gtsrb", StorageDType::F16, 0.0);
    foreign.meta.base_digest = "ffff0000ffff0000".into();
    let e = lib.add(foreign).unwrap_err().to_string();
    assert!(e.contains("gtsrb") && e.contains("ffff0000ffff"), "{e}");
    assert_eq!(lib.len(), 3, "rejected task vectors must not be added");

    // Selection keeps the requested order and names the unknown one.
    let sel = lib.select(&["svhn", "cars"]).unwrap();
    assert_eq!(
        sel.iter().map(|t| t.name()).collect::<Vec<_>>(),
        ["svhn", "cars"]
    );
    let e = lib.select(&["cars", "mnist"]).unwrap_err().to_string();
    assert!(e.contains("mnist"), "{e}");

    assert!(lib.remove("dtd").is_some());
    assert!(lib.remove("dtd").is_none());
    assert!(lib.select(&["dtd"]).is_err());
}

#[test]
fn a_library_without_a_base_digest_takes_any_base() {
    let mut lib = Library::new(Arc::new(manifest()), "");
    lib.add(build("cars", StorageDType::F16, 0.0)).unwrap();
    assert_eq!(lib.len(), 1);
}
