//! Bodies of the `task_vector` and `coefficients` fuzz targets. Each returns the error message
//! of a rejected input and panics when an accepted input breaks an invariant, which is what the
//! fuzzer hunts for. Also compiled into atlas-core's `fuzz_corpus` test, which replays the
//! committed corpus on stable.

use atlas_core::coefficients::{Coefficients, CoefficientsRequest};
use atlas_core::task_vector::{check_name, Delta};
use atlas_core::{
    compose, Block, Library, Manifest, StorageDType, TaskVector, TaskVectorMeta, TensorSpec,
};
use std::sync::Arc;

/// The manifest inputs are checked against: a one-tensor block, a block grouping three tensors,
/// a bias, and `proj`, which files may leave out (as CLIP checkpoints without a projection do).
/// fuzz/make_seeds.py writes its seed files for exactly these names and shapes.
pub fn manifest() -> Manifest {
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
    .expect("a valid manifest")
}

pub fn may_be_missing(name: &str) -> bool {
    name == "proj"
}

/// Parses `data` as a task-vector safetensors file over [`manifest`], stored at f16.
pub fn task_vector(data: &[u8]) -> Result<(), String> {
    let m = manifest();
    let defaults = TaskVectorMeta {
        name: "upload".into(),
        source: "fuzz input".into(),
        ..TaskVectorMeta::default()
    };
    let tv = TaskVector::from_bytes(data, &m, StorageDType::F16, &may_be_missing, defaults)
        .map_err(|e| e.to_string())?;
    check_name(tv.name()).expect("an accepted task vector has a valid name");
    assert_eq!(tv.blocks().len(), m.len());
    for (block, buf) in m.blocks().iter().zip(tv.blocks()) {
        assert_eq!(buf.len(), block.numel(), "block {}", block.name);
        let values = buf.to_f32_vec();
        assert!(
            values.iter().all(|x| x.is_finite()),
            "block {} stores a non-finite value",
            block.name
        );
    }
    Ok(())
}

/// Task vectors `a`, `b`, `c` over [`manifest`], with elements up to the largest f16 so that
/// an accepted coefficient that could overflow a composition shows up as an infinity.
pub fn library() -> Library {
    let m = Arc::new(manifest());
    let mut lib = Library::new(m.clone(), "");
    for (t, name) in ["a", "b", "c"].into_iter().enumerate() {
        let deltas = m.tensor_specs().map(|(spec, _)| Delta {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            data: (0..spec.numel())
                .map(|j| match (j + t) % 4 {
                    0 => 65504.0,
                    1 => -65504.0,
                    2 => 0.5,
                    _ => 0.0,
                })
                .collect(),
        });
        let meta = TaskVectorMeta {
            name: name.into(),
            ..TaskVectorMeta::default()
        };
        let tv = TaskVector::from_deltas(&m, meta, StorageDType::F16, deltas, &|_| false)
            .expect("a valid task vector");
        lib.add(tv).expect("distinct names");
    }
    lib
}

/// Parses `data` both as an explicit-coefficients request resolved against [`library`] and as
/// stored [`Coefficients`]. Rejected only if both parses are; an accepted request must compose
/// to finite weights.
pub fn coefficients(data: &[u8]) -> Result<(), String> {
    let request = explicit_request(data);
    let stored = stored_coefficients(data);
    match (request, stored) {
        (Err(a), Err(b)) => Err(format!("as a request: {a}; as stored coefficients: {b}")),
        _ => Ok(()),
    }
}

fn explicit_request(data: &[u8]) -> Result<(), String> {
    let lib = library();
    let request = CoefficientsRequest::from_json(data).map_err(|e| e.to_string())?;
    let (tvs, coefs) = request.resolve(&lib).map_err(|e| e.to_string())?;
    let m = lib.manifest();
    let base: Vec<Vec<f32>> = m.blocks().iter().map(|b| vec![1.0; b.numel()]).collect();
    let theta: Vec<Vec<f32>> =
        compose(m, &base, &tvs, &coefs).expect("resolved coefficients compose");
    for (block, values) in m.blocks().iter().zip(&theta) {
        assert!(
            values.iter().all(|x| x.is_finite()),
            "block {} composes to a non-finite weight with {:?}",
            block.name,
            coefs.values
        );
    }
    Ok(())
}

/// Stored coefficients that deserialize must be usable: every (task vector, block) readable.
fn stored_coefficients(data: &[u8]) -> Result<(), String> {
    let c: Coefficients = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let expanded = c.expanded();
    assert_eq!(expanded.len(), c.n_tv * c.n_blocks * c.parts());
    assert!(expanded.iter().all(|v| v.is_finite()));
    Ok(())
}
