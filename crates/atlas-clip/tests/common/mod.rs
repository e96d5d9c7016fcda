//! Fixture access for the parity tests (files written by tests/fixtures/make_reference.py).
#![allow(dead_code)]

use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::{StorageDType, TaskVector};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

pub fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

impl Reference {
    pub fn load() -> Self {
        let tensors =
            candle_core::safetensors::load(tiny().join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let json =
            serde_json::from_str(&std::fs::read_to_string(tiny().join("reference.json")).unwrap())
                .unwrap();
        Reference { tensors, json }
    }
    pub fn t(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor {name}"))
            .clone()
    }
    pub fn f64s(&self, name: &str) -> Vec<f64> {
        self.t(name)
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap()
    }
    pub fn ids(&self) -> Tensor {
        self.t("input_ids").to_dtype(DType::U32).unwrap()
    }
    pub fn labels(&self) -> Tensor {
        self.t("labels").to_dtype(DType::U32).unwrap()
    }
}

pub fn backbone(dtype: DType) -> Backbone {
    let opts = LoadOptions {
        dtype,
        ..Default::default()
    };
    Backbone::load(tiny().join("clip").to_str().unwrap(), opts).unwrap()
}

/// τ_a, τ_b, τ_c from the fine-tuned checkpoints.
pub fn task_vectors(bb: &Backbone, dtype: StorageDType) -> Vec<Arc<TaskVector>> {
    ["ft_a", "ft_b", "ft_c"]
        .iter()
        .map(|n| {
            let ckpt = Checkpoint::open(tiny().join(n).to_str().unwrap()).unwrap();
            Arc::new(bb.task_vector_from_checkpoint(ckpt, n, dtype).unwrap())
        })
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Largest |a−b| / max(|b|, floor) over two gradients.
pub fn max_rel_err(a: &[f64], b: &[f64], floor: f64) -> (f64, usize) {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .map(|(i, (x, y))| ((x - y).abs() / y.abs().max(floor), i))
        .fold((0.0, 0), |m, v| if v.0 > m.0 { v } else { m })
}
