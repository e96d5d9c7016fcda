//! RegMean, RegMean++ and Fisher merging against FusionBench's own `regmean_merging`,
//! `RegMeanAlgorithmForCLIPPlusPlus` and `fisher_merging`, run by
//! tests/fixtures/merge/generate_data.py on the tiny CLIP fixtures with fixed pixels and heads:
//! every merged tensor must match to 1e-5 in f32.

use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::{Backbone, LoadOptions, ZeroShotHead};
use atlas_core::merge::{Merged, Method};
use atlas_core::safetensors_io::read_bytes;
use atlas_core::{StorageDType, TaskVector};
use atlas_learn::merge_data::{merge_batches, Watch};
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const TOLERANCE: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Oracle {
    backbone: Backbone,
    inputs: Vec<Arc<TaskVector>>,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    cases: serde_json::Map<String, Value>,
}

fn oracle() -> Oracle {
    let tiny = fixtures().join("tiny");
    let backbone =
        Backbone::load(tiny.join("clip").to_str().unwrap(), LoadOptions::default()).unwrap();
    let json: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("merge/data_oracle.json")).unwrap(),
    )
    .unwrap();
    let inputs = json["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let n = n.as_str().unwrap();
            let ck = Checkpoint::open(tiny.join(n).to_str().unwrap()).unwrap();
            Arc::new(
                backbone
                    .task_vector_from_checkpoint(ck, n, StorageDType::F32)
                    .unwrap(),
            )
        })
        .collect();
    let mut bytes = Vec::new();
    let gz = std::fs::File::open(fixtures().join("merge/data_oracle.safetensors.gz")).unwrap();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    let tensors = read_bytes(&bytes)
        .unwrap()
        .0
        .into_iter()
        .map(|t| (t.name, (t.shape, t.data)))
        .collect();
    Oracle {
        backbone,
        inputs,
        tensors,
        cases: json["cases"].as_object().unwrap().clone(),
    }
}

impl Oracle {
    fn tensor(&self, name: &str) -> Tensor {
        let (shape, data) = &self.tensors[name];
        Tensor::from_vec(data.clone(), shape.as_slice(), &Device::Cpu).unwrap()
    }

    /// Input i's pixels as the method reads them: whole batches until its count is reached.
    fn batches(&self, method: &Method, i: usize) -> Vec<Tensor> {
        let ex = method.examples().unwrap();
        let px = self.tensor(&format!("pixels/{i}"));
        let used = ex.used(px.dim(0).unwrap());
        (0..used)
            .step_by(ex.batch_size)
            .map(|s| px.narrow(0, s, ex.batch_size.min(used - s)).unwrap())
            .collect()
    }

    fn head(&self, i: usize) -> ZeroShotHead {
        ZeroShotHead {
            classes: (0..4).map(|c| format!("class {c}")).collect(),
            weights: self.tensor(&format!("head/{i}")),
            scale: self.tensors["logit_scale_exp"].1[0] as f64,
        }
    }

    /// Runs `method` as the case `case` ran FusionBench's, checking the images each input read.
    fn check(&self, case: &str, method: &str, params: Value) {
        let method = Method::parse(method, params.as_object().unwrap(), 3).unwrap();
        let spec = &self.cases[case];
        let batches: Vec<Vec<Tensor>> = (0..3).map(|i| self.batches(&method, i)).collect();
        for (b, used) in batches.iter().zip(spec["images_used"].as_array().unwrap()) {
            let n: usize = b.iter().map(|t| t.dim(0).unwrap()).sum();
            assert_eq!(n as u64, used.as_u64().unwrap(), "{case}");
        }
        let heads: Vec<ZeroShotHead> = (0..3).map(|i| self.head(i)).collect();
        let head_refs: Vec<&ZeroShotHead> = heads.iter().collect();
        let mut steps = Vec::new();
        let cancel = AtomicBool::new(false);
        let merged = merge_batches(
            &self.backbone,
            &method,
            &self.inputs,
            &batches,
            &head_refs,
            Watch {
                progress: &mut |d, t| steps.push((d, t)),
                cancel: &cancel,
            },
        )
        .unwrap();
        let Merged::Delta { blocks, scale } = merged else {
            panic!("{case}: a delta expected");
        };
        assert_eq!(scale, 1.0);
        assert_eq!(
            steps.last().map(|s| s.0 == s.1),
            Some(true),
            "{case}: {steps:?}"
        );
        let manifest = self.backbone.manifest();
        let mut compared = 0;
        for (spec, loc) in manifest.tensor_specs() {
            let ours = &blocks[loc.block][loc.offset..loc.offset + loc.numel];
            let Some((_, theirs)) = self.tensors.get(&format!("{case}/{}", spec.name)) else {
                // Outside FusionBench's merged model: the projection, zero in every input.
                assert!(ours.iter().all(|x| *x == 0.0), "{case}: {}", spec.name);
                continue;
            };
            let diff = ours
                .iter()
                .zip(theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff <= TOLERANCE, "{case}: {} differs by {diff}", spec.name);
            compared += 1;
        }
        assert_eq!(compared, 39, "{case}");
    }
}

#[test]
fn regmean_matches_fusion_bench() {
    let o = oracle();
    let bs = json!({"batch_size": 4});
    o.check(
        "regmean",
        "regmean",
        json!({"num_regmean_examples": 6, "dataloader_kwargs": bs}),
    );
    o.check(
        "regmean_all",
        "regmean",
        json!({"num_regmean_examples": 100, "reduce_non_diagonal_ratio": 0.5,
               "dataloader_kwargs": bs}),
    );
}

/// Layer by layer, each layer's inputs coming through the layers merged before it; the
/// post-LayerNorm stays θ0's.
#[test]
fn regmean_plusplus_matches_fusion_bench() {
    let o = oracle();
    o.check(
        "regmean_plusplus",
        "regmean_plusplus",
        json!({"num_regmean_examples": 6, "dataloader_kwargs": {"batch_size": 4}}),
    );
}

#[test]
fn fisher_merging_matches_fusion_bench() {
    let o = oracle();
    let bs = json!({"batch_size": 4});
    o.check(
        "fisher",
        "fisher_merging",
        json!({"num_fisher_examples": 6, "dataloader_kwargs": bs}),
    );
    o.check(
        "fisher_plain",
        "fisher_merging",
        json!({"num_fisher_examples": 8, "normalize_fisher_weight": false,
               "dataloader_kwargs": bs}),
    );
}

/// AdaMerging's objective as the learner computes it (per task, the batch's mean prediction
/// entropy, `atlas_clip::loss::entropy`; summed over tasks), differentiated with respect to
/// the coefficients at their prior 0.3: per block (layer-wise) and per task vector
/// (task-wise), against FusionBench's `LayerWiseMergedModel` and `TaskWiseMergedModel` with
/// its `entropy_loss` on the same images and heads.
#[test]
fn adamerging_gradients_match_fusion_bench() {
    use atlas_clip::grad::coefficient_gradient;
    use atlas_clip::loss::entropy;
    use atlas_core::{Coefficients, Layout};
    let o = oracle();
    let manifest = o.backbone.manifest().clone();
    let nb = manifest.len();
    let pixels: Vec<Tensor> = (0..3)
        .map(|i| o.tensor(&format!("pixels/{i}")).narrow(0, 0, 4).unwrap())
        .collect();
    let heads: Vec<ZeroShotHead> = (0..3).map(|i| o.head(i)).collect();
    let gradient = |layout: Layout, values: Vec<f64>| {
        let coefs = Coefficients::new(layout, 3, nb, values).unwrap();
        coefficient_gradient::<f32>(&o.backbone, &o.inputs, &coefs, |tower| {
            let mut total: Option<Tensor> = None;
            for (p, h) in pixels.iter().zip(&heads) {
                let l = entropy(&h.logits(&tower.forward(p)?)?)?;
                total = Some(match total {
                    Some(t) => (t + l)?,
                    None => l,
                });
            }
            Ok(total.unwrap())
        })
        .unwrap()
    };
    let spec = &o.cases["adamerging_layer_wise"];
    let want_loss = spec["loss"].as_f64().unwrap();
    let names: Vec<&str> = spec["param_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let theirs = &o.tensors["adamerging_layer_wise/grad"].1;
    let scale = theirs.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    let (loss, grad) = gradient(Layout::PerBlock, vec![0.3; 3 * nb]);
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss,
        "{loss} vs {want_loss}"
    );
    let mut compared = 0;
    for (i, row) in theirs.chunks(names.len()).enumerate() {
        for (name, &g) in names.iter().zip(row) {
            let b = manifest.block_index(name).unwrap();
            let ours = grad[i * nb + b];
            // Absolute, against the largest entry: the key biases' gradients are 0 exactly.
            let diff = (ours - g as f64).abs();
            assert!(diff <= 1e-4 * scale, "input {i} {name}: {ours} vs {g}");
            compared += 1;
        }
    }
    assert_eq!(compared, 3 * 39);
    let theirs = &o.tensors["adamerging_task_wise/grad"].1;
    let (loss, grad) = gradient(Layout::Isotropic, vec![0.3; 3]);
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss,
        "{loss} vs {want_loss}"
    );
    for (ours, g) in grad.iter().zip(theirs) {
        assert!((ours - *g as f64).abs() <= 1e-4 * scale, "{ours} vs {g}");
    }
}
