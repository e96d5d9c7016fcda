//! Checkpoint loading: errors that name the file or tensor at fault, vision-only fine-tuned
//! checkpoints (with and without the `vision_model.` prefix), task-vector validation, the real
//! ViT-B/32, B/16 and L/14 shapes, config parsing and the backbone's dtype / q-k-v options.

mod common;

use atlas_clip::checkpoint::Checkpoint;
use atlas_clip::config::Activation;
use atlas_clip::manifest::{vision_tensors, VISUAL_PROJECTION};
use atlas_clip::model::{bf16_gemm, normalize};
use atlas_clip::{
    vision_manifest, Backbone, ClipConfig, LoadOptions, QkvBlocks, TextConfig, VisionConfig,
    VisionTower,
};
use atlas_core::parts::fnv1a64;
use atlas_core::safetensors_io::{read_file, write_file, OutTensor};
use atlas_core::{Coefficients, Layout, Library, StorageDType, TaskVector};
use candle_core::{DType, Device, Tensor};
use common::*;
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Helpers: temporary copies of the fixtures, edited.

/// A copy of fixture directory `name` (e.g. "clip", "ft_a") in a fresh temporary directory.
fn fixture_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(tiny().join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    (tmp, dst)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tensors of a safetensors file as f32 tensors to write back (the fixtures have no
/// integer tensors).
fn tensors_of(path: &Path) -> Vec<OutTensor> {
    let (tensors, _) = read_file(path).unwrap();
    tensors
        .into_iter()
        .map(|t| {
            assert!(t.is_float(), "{}", t.name);
            f32_tensor(&t.name, &t.shape, &t.data)
        })
        .collect()
}

fn f32_tensor(name: &str, shape: &[usize], data: &[f32]) -> OutTensor {
    assert_eq!(shape.iter().product::<usize>(), data.len(), "{name}");
    OutTensor {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape: shape.to_vec(),
        bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn position_ids(name: &str, n: usize) -> OutTensor {
    OutTensor {
        name: name.to_string(),
        dtype: Dtype::I64,
        shape: vec![1, n],
        bytes: (0..n as i64).flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// Rewrites `path` after `edit` changed its tensor list.
fn rewrite(path: &Path, edit: impl FnOnce(&mut Vec<OutTensor>)) {
    let mut tensors = tensors_of(path);
    edit(&mut tensors);
    write_file(path, &tensors, HashMap::new()).unwrap();
}

fn find<'a>(tensors: &'a mut [OutTensor], name: &str) -> &'a mut OutTensor {
    tensors
        .iter_mut()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}

fn remove(tensors: &mut Vec<OutTensor>, name: &str) {
    let n = tensors.len();
    tensors.retain(|t| t.name != name);
    assert_eq!(tensors.len(), n - 1, "no tensor {name}");
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(model: &str) -> String {
    match Backbone::load(model, LoadOptions::default()) {
        Ok(_) => panic!("{model}: expected a loading error"),
        Err(e) => e.to_string(),
    }
}

fn err<T>(r: atlas_clip::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn open(dir: &Path) -> Checkpoint {
    Checkpoint::open(s(dir)).unwrap()
}

fn tv_from(bb: &Backbone, dir: &Path) -> atlas_clip::Result<TaskVector> {
    bb.task_vector_from_checkpoint(Checkpoint::open(s(dir))?, "t", StorageDType::F32)
}

fn assert_same_tv(a: &TaskVector, b: &TaskVector) {
    assert_eq!(a.blocks().len(), b.blocks().len());
    for (i, (x, y)) in a.blocks().iter().zip(b.blocks()).enumerate() {
        assert_eq!(x, y, "block {i} differs");
    }
    assert_eq!(a.digest(), b.digest());
}

fn logits(bb: &Backbone, img: &Tensor, r: &Reference) -> Tensor {
    let txt = bb.text().unwrap().forward(&r.ids()).unwrap();
    let img = normalize(&img.to_dtype(DType::F32).unwrap()).unwrap();
    let txt = normalize(&txt.to_dtype(DType::F32).unwrap()).unwrap();
    (img.matmul(&txt.t().unwrap()).unwrap() * bb.logit_scale().exp()).unwrap()
}

const FC1_L1: &str = "vision_model.encoder.layers.1.mlp.fc1.weight";

// ---------------------------------------------------------------------------------------------
// 1. Errors name the file or tensor.

#[test]
fn missing_files_are_named() {
    let (_t, dir) = fixture_copy("clip");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(s(&dir));
    assert!(
        e.contains("model.safetensors") && e.contains("missing"),
        "{e}"
    );

    let (_t, dir) = fixture_copy("clip");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    let e = load_err(s(&dir));
    assert!(e.contains("config.json") && e.contains("missing"), "{e}");

    // An empty directory: the first missing file is named.
    let empty = tempfile::tempdir().unwrap();
    let e = load_err(s(empty.path()));
    assert!(e.contains("config.json"), "{e}");

    // No tokenizer is not an error: the backbone just has none.
    let (_t, dir) = fixture_copy("clip");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let bb = Backbone::load(s(&dir), LoadOptions::default()).unwrap();
    assert!(bb.tokenizer().is_none());
}

#[test]
fn configs_that_are_not_clip_are_refused_by_name() {
    let (_t, dir) = fixture_copy("clip");
    edit_config(&dir, |v| v["model_type"] = "bert".into());
    let e = load_err(s(&dir));
    assert!(
        e.contains("config.json") && e.contains("\"bert\"") && e.contains("not a CLIP model"),
        "{e}"
    );

    edit_config(&dir, |v| {
        v.as_object_mut().unwrap().remove("model_type");
    });
    let e = load_err(s(&dir));
    assert!(e.contains("config.json") && e.contains("model_type"), "{e}");

    std::fs::write(dir.join("config.json"), "{ \"model_type\": \"clip\", ").unwrap();
    let e = load_err(s(&dir));
    assert!(e.contains("config.json"), "{e}");

    let (_t, dir) = fixture_copy("clip");
    edit_config(&dir, |v| {
        v["vision_config"]["num_attention_heads"] = 5.into()
    });
    let e = load_err(s(&dir));
    assert!(
        e.contains("config.json") && e.contains("vision hidden_size 32"),
        "{e}"
    );

    let (_t, dir) = fixture_copy("clip");
    edit_config(&dir, |v| v["vision_config"]["patch_size"] = 7.into());
    let e = load_err(s(&dir));
    assert!(
        e.contains("config.json") && e.contains("patch_size 7"),
        "{e}"
    );
}

#[test]
fn wrong_or_missing_tensors_are_named() {
    type Edit = Box<dyn Fn(&mut Vec<OutTensor>)>;
    let cases: Vec<(&str, Edit, &[&str])> = vec![
        (
            "vision tensor with a wrong shape",
            Box::new(|t| {
                // Same element count, other shape: only a shape check catches it.
                find(t, FC1_L1).shape = vec![32, 64];
            }),
            &[FC1_L1, "[32, 64]", "[64, 32]"],
        ),
        (
            "missing vision tensor",
            Box::new(|t| remove(t, "vision_model.post_layernorm.bias")),
            &["vision_model.post_layernorm.bias", "missing"],
        ),
        (
            "missing visual projection",
            Box::new(|t| remove(t, VISUAL_PROJECTION)),
            &[VISUAL_PROJECTION, "missing"],
        ),
        (
            "missing text tensor",
            Box::new(|t| remove(t, "text_model.encoder.layers.1.self_attn.v_proj.bias")),
            &[
                "text_model.encoder.layers.1.self_attn.v_proj.bias",
                "missing",
            ],
        ),
        (
            "text tensor with a wrong shape",
            Box::new(|t| find(t, "text_projection.weight").shape = vec![32, 16]),
            &["text_projection.weight", "[32, 16]"],
        ),
        (
            "missing logit scale",
            Box::new(|t| remove(t, "logit_scale")),
            &["logit_scale"],
        ),
        (
            "integer vision tensor",
            Box::new(|t| {
                let x = find(t, "vision_model.pre_layrnorm.bias");
                x.dtype = Dtype::I32;
            }),
            &["vision_model.pre_layrnorm.bias", "I32"],
        ),
    ];
    for (what, edit, want) in cases {
        let (_t, dir) = fixture_copy("clip");
        rewrite(&dir.join("model.safetensors"), |t| edit(t));
        let e = load_err(s(&dir));
        for w in want {
            assert!(e.contains(w), "{what}: {e:?} does not mention {w}");
        }
    }
}

#[test]
fn a_weights_file_that_is_not_safetensors_is_named() {
    let (_t, dir) = fixture_copy("clip");
    std::fs::write(
        dir.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .unwrap();
    let e = load_err(s(&dir));
    assert!(e.contains("model.safetensors"), "{e}");

    let bytes = std::fs::read(tiny().join("clip/model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 3]).unwrap();
    let e = load_err(s(&dir));
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn strings_that_are_neither_directories_nor_hub_ids() {
    // None of these may reach the hub: they are not `org/name`.
    for model in [
        "",
        "not-a-model",
        "/nonexistent/atlas/clip-dir",
        "a/b/c",
        "org/",
        "/org",
        "../up/one",
    ] {
        let e = load_err(model);
        assert!(
            e.contains("neither a directory nor a hub model id"),
            "{model:?}: {e}"
        );
    }
    // A file is not a checkpoint directory.
    let file = tiny().join("clip/model.safetensors");
    let e = load_err(s(&file));
    assert!(
        e.contains("model.safetensors") && e.contains("is a file"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Vision-only fine-tuned checkpoints.

#[test]
fn a_vision_only_checkpoint_loads_but_is_no_backbone() {
    let ckpt = open(&tiny().join("ft_a"));
    assert!(ckpt.config.text.is_none());
    assert_eq!(ckpt.config.vision.hidden_size, 32);
    assert_eq!(ckpt.config.projection_dim, 16);
    // Every image-tower tensor but the projection.
    assert_eq!(
        ckpt.tensors.len(),
        vision_tensors(&ckpt.config.vision, 16).len() - 1
    );
    assert!(ckpt
        .tensors
        .iter()
        .all(|t| t.name.starts_with("vision_model.")));

    let e = load_err(s(&tiny().join("ft_a")));
    assert!(
        e.contains("vision-only") && e.contains("config.json"),
        "{e}"
    );
}

#[test]
fn a_vision_only_checkpoint_without_the_prefix_gives_the_same_task_vector() {
    let bb = backbone(DType::F32);
    let want = tv_from(&bb, &tiny().join("ft_a")).unwrap();

    // transformers 5 saves CLIPVisionModel weights without `vision_model.`.
    let (_t, dir) = fixture_copy("ft_a");
    rewrite(&dir.join("model.safetensors"), |ts| {
        for t in ts.iter_mut() {
            t.name = t.name.strip_prefix("vision_model.").unwrap().to_string();
        }
        ts.push(position_ids("embeddings.position_ids", 17));
    });
    let (raw, _) = read_file(&dir.join("model.safetensors")).unwrap();
    assert!(raw.iter().all(|t| !t.name.starts_with("vision_model.")));

    let ckpt = open(&dir);
    assert!(ckpt
        .tensors
        .iter()
        .all(|t| t.name.starts_with("vision_model.")));
    let got = bb
        .task_vector_from_checkpoint(ckpt, "t", StorageDType::F32)
        .unwrap();
    assert_same_tv(&got, &want);
    // And the task vector is not trivially zero.
    assert!(got.blocks()[..got.blocks().len() - 1]
        .iter()
        .all(|b| !b.is_zero()));
}

// ---------------------------------------------------------------------------------------------
// 3. Task-vector validation.

#[test]
fn task_vectors_from_checkpoints_are_validated() {
    let bb = backbone(DType::F32);
    let m = bb.manifest().clone();
    let last = m.len() - 1;
    assert_eq!(m.blocks()[last].name, VISUAL_PROJECTION);
    let tv_a = tv_from(&bb, &tiny().join("ft_a")).unwrap();

    // The visual projection is absent from a CLIPVisionModel: a zero block.
    assert!(tv_a.block(last).is_zero());
    assert!(!tv_a.block(0).is_zero());
    assert_eq!(tv_a.meta.base_digest, bb.base_digest());
    assert!(tv_a.meta.source.ends_with("ft_a"), "{}", tv_a.meta.source);

    // Wrong shape: the tensor and the file are named.
    let (_t, dir) = fixture_copy("ft_a");
    rewrite(&dir.join("model.safetensors"), |t| {
        find(t, FC1_L1).shape = vec![32, 64];
    });
    let e = err(tv_from(&bb, &dir));
    assert!(
        e.contains(FC1_L1) && e.contains("[32, 64]") && e.contains("model.safetensors"),
        "{e}"
    );

    // An image-tower tensor the backbone does not have.
    let extra = "vision_model.encoder.layers.9.mlp.fc1.weight";
    let (_t, dir) = fixture_copy("ft_a");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.push(f32_tensor(extra, &[64, 32], &[0.5; 64 * 32]));
    });
    let e = err(tv_from(&bb, &dir));
    assert!(e.contains(extra), "{e}");

    // A missing image-tower tensor (other than the projection).
    let gone = "vision_model.encoder.layers.0.layer_norm2.bias";
    let (_t, dir) = fixture_copy("ft_a");
    rewrite(&dir.join("model.safetensors"), |t| remove(t, gone));
    let e = err(tv_from(&bb, &dir));
    assert!(e.contains(gone) && e.contains("missing"), "{e}");

    // A non-finite weight.
    let (_t, dir) = fixture_copy("ft_a");
    rewrite(&dir.join("model.safetensors"), |t| {
        let x = find(t, "vision_model.pre_layrnorm.weight");
        x.bytes[8..12].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let e = err(tv_from(&bb, &dir));
    assert!(
        e.contains("vision_model.pre_layrnorm.weight") && e.contains("element 2"),
        "{e}"
    );

    // Integer buffers are skipped.
    let (_t, dir) = fixture_copy("ft_a");
    rewrite(&dir.join("model.safetensors"), |t| {
        t.push(position_ids("vision_model.embeddings.position_ids", 17));
    });
    assert_same_tv(&tv_from(&bb, &dir).unwrap(), &tv_a);

    // A full CLIPModel checkpoint: text tensors are ignored, the projection is used.
    assert!(tv_from(&bb, &tiny().join("clip"))
        .unwrap()
        .blocks()
        .iter()
        .all(|b| b.is_zero()));
    let (_t, dir) = fixture_copy("clip");
    rewrite(&dir.join("model.safetensors"), |t| {
        let p = find(t, VISUAL_PROJECTION);
        let x = f32::from_le_bytes(p.bytes[12..16].try_into().unwrap());
        p.bytes[12..16].copy_from_slice(&(x + 0.5).to_le_bytes());
    });
    let tv = tv_from(&bb, &dir).unwrap();
    assert!(tv.blocks()[..last].iter().all(|b| b.is_zero()));
    let proj = tv.tensor_f32(&m, VISUAL_PROJECTION).unwrap();
    assert!((proj[3] - 0.5).abs() < 1e-6, "{}", proj[3]);
    assert_eq!(proj.iter().filter(|&&x| x != 0.0).count(), 1);
}

#[test]
fn a_fine_tuned_checkpoint_with_another_tower_config_is_refused() {
    let bb = backbone(DType::F32);
    let tv_a = tv_from(&bb, &tiny().join("ft_a")).unwrap();
    // These change the tower's function without changing any shape: only the config check
    // can catch them.
    let edits: [(&str, serde_json::Value); 3] = [
        ("hidden_act", "gelu".into()),
        ("layer_norm_eps", 1e-6.into()),
        ("num_attention_heads", 8.into()),
    ];
    for (key, value) in edits {
        let (_t, dir) = fixture_copy("ft_a");
        edit_config(&dir, |v| v[key] = value);
        let e = err(tv_from(&bb, &dir));
        assert!(
            e.contains("config.json") && e.contains("differs"),
            "{key}: {e}"
        );
    }
    // A different number of layers is refused too (before any tensor is looked at).
    let (_t, dir) = fixture_copy("ft_a");
    edit_config(&dir, |v| v["num_hidden_layers"] = 3.into());
    let e = err(tv_from(&bb, &dir));
    assert!(e.contains("config.json") && e.contains("differs"), "{e}");

    // projection_dim is not part of a CLIPVisionModel's tower: a config that states another
    // one (or omits it, reading as 512) describes the same tower.
    for edit in [
        Box::new(|v: &mut serde_json::Value| v["projection_dim"] = 768.into())
            as Box<dyn Fn(&mut serde_json::Value)>,
        Box::new(|v: &mut serde_json::Value| {
            v.as_object_mut().unwrap().remove("projection_dim");
        }),
    ] {
        let (_t, dir) = fixture_copy("ft_a");
        edit_config(&dir, |v| edit(v));
        assert_same_tv(&tv_from(&bb, &dir).unwrap(), &tv_a);
    }
}

/// Writes τ in Hugging Face names (every manifest tensor but the projection) to `path`.
fn write_hf_delta(bb: &Backbone, tv: &TaskVector, path: &Path, extra: Vec<OutTensor>) {
    let m = bb.manifest();
    let mut out: Vec<OutTensor> = m
        .tensor_specs()
        .filter(|(spec, _)| spec.name != VISUAL_PROJECTION)
        .map(|(spec, _)| {
            f32_tensor(
                &spec.name,
                &spec.shape,
                &tv.tensor_f32(m, &spec.name).unwrap(),
            )
        })
        .collect();
    out.extend(extra);
    write_file(path, &out, HashMap::new()).unwrap();
}

#[test]
fn task_vectors_from_delta_files_are_validated() {
    let bb = backbone(DType::F32);
    let last = bb.manifest().len() - 1;
    let tv_a = tv_from(&bb, &tiny().join("ft_a")).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // HF-named deltas, no projection, with an integer buffer: the same task vector.
    let path = tmp.path().join("a_hf.safetensors");
    write_hf_delta(
        &bb,
        &tv_a,
        &path,
        vec![position_ids("vision_model.embeddings.position_ids", 17)],
    );
    let got = bb
        .load_task_vector(&path, Some("cars"), StorageDType::F32)
        .unwrap();
    assert_eq!(got.name(), "cars");
    assert!(got.block(last).is_zero());
    for (x, y) in got.blocks().iter().zip(tv_a.blocks()) {
        assert_eq!(x, y);
    }
    let unnamed = bb.load_task_vector(&path, None, StorageDType::F32).unwrap();
    assert_eq!(unnamed.name(), "a_hf");

    // Wrong shape.
    write_hf_delta(&bb, &tv_a, &path, vec![]);
    let mut t = tensors_of(&path);
    find(&mut t, FC1_L1).shape = vec![32, 64];
    write_file(&path, &t, HashMap::new()).unwrap();
    let e = err(bb.load_task_vector(&path, None, StorageDType::F32));
    assert!(
        e.contains(FC1_L1) && e.contains("a_hf.safetensors") && e.contains("[32, 64]"),
        "{e}"
    );

    // Unknown tensor.
    let extra = "vision_model.encoder.layers.9.mlp.fc1.weight";
    write_hf_delta(
        &bb,
        &tv_a,
        &path,
        vec![f32_tensor(extra, &[64, 32], &[0.25; 64 * 32])],
    );
    let e = err(bb.load_task_vector(&path, None, StorageDType::F32));
    assert!(e.contains(extra), "{e}");

    // A garbage file.
    std::fs::write(&path, b"garbage").unwrap();
    let e = err(bb.load_task_vector(&path, None, StorageDType::F32));
    assert!(e.contains("a_hf.safetensors"), "{e}");

    // A saved task vector keeps its base digest; the library refuses one over another base.
    let saved = tmp.path().join("saved.safetensors");
    let mut foreign = tv_from(&bb, &tiny().join("ft_b")).unwrap();
    foreign.meta.base_digest = "0123456789abcdef".into();
    foreign.save(&saved, bb.manifest()).unwrap();
    let back = bb
        .load_task_vector(&saved, None, StorageDType::F16)
        .unwrap();
    assert_eq!(back.meta.base_digest, "0123456789abcdef");
    let mut lib = Library::new(bb.manifest().clone(), bb.base_digest());
    lib.add(tv_a).unwrap();
    let e = lib.add(back).unwrap_err().to_string();
    assert!(e.contains("0123456789ab"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 4. Real architectures: shapes and a forward pass on random weights.

fn random_tower(cfg: &VisionConfig, proj: usize) -> HashMap<String, Tensor> {
    vision_tensors(cfg, proj)
        .into_iter()
        .map(|spec| {
            let is_norm_weight = spec.name.ends_with(".weight")
                && (spec.name.contains("layer_norm")
                    || spec.name.contains("layrnorm")
                    || spec.name.contains("layernorm"));
            let t = if is_norm_weight {
                Tensor::ones(spec.shape.as_slice(), DType::F32, &Device::Cpu).unwrap()
            } else {
                Tensor::randn(0f32, 0.02, spec.shape.as_slice(), &Device::Cpu).unwrap()
            };
            (spec.name, t)
        })
        .collect()
}

fn run_random_tower(cfg: &VisionConfig, proj: usize) {
    let w = random_tower(cfg, proj);
    let tower = VisionTower::new(cfg, Some(proj), &w).unwrap();
    let pixels = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let out = tower.forward(&pixels).unwrap();
    assert_eq!(out.dims(), [1, proj]);
    let v: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    assert!(v.iter().any(|&x| x != v[0]), "degenerate output");
    // Without a projection the pooled hidden state comes out.
    let pooled = VisionTower::new(cfg, None, &w)
        .unwrap()
        .forward(&pixels)
        .unwrap();
    assert_eq!(pooled.dims(), [1, cfg.hidden_size]);
    // A wrong image size is an error, not a panic.
    let small = Tensor::zeros((1, 3, 112, 112), DType::F32, &Device::Cpu).unwrap();
    assert!(tower.forward(&small).is_err());
}

#[test]
fn vit_b32_and_b16_run_on_random_weights() {
    let b32 = VisionConfig::vit_b32();
    let b16 = VisionConfig::vit_b16();
    assert_eq!((b32.num_patches(), b16.num_patches()), (49, 196));
    run_random_tower(&b32, 512);
    run_random_tower(&b16, 512);
}

#[test]
fn vit_l14_runs_on_random_weights() {
    let l14 = VisionConfig::vit_l14();
    assert_eq!(l14.num_patches(), 256);
    assert_eq!(l14.projection_dim, 768);
    run_random_tower(&l14, 768);
}

#[test]
fn manifest_sizes_of_the_real_architectures() {
    // (config, projection, blocks, parameters, fused blocks); parameter counts computed
    // independently from the architecture (embeddings + layers + post-LN + projection).
    let cases = [
        (VisionConfig::vit_b32(), 512, 200, 87_849_216, 152),
        (VisionConfig::vit_b16(), 512, 200, 86_192_640, 152),
        (VisionConfig::vit_l14(), 768, 392, 303_966_208, 296),
    ];
    for (cfg, proj, blocks, params, fused) in cases {
        let m = vision_manifest(&cfg, proj, QkvBlocks::Separate);
        assert_eq!(m.len(), blocks, "{cfg:?}");
        assert_eq!(m.numel(), params, "{cfg:?}");
        let f = vision_manifest(&cfg, proj, QkvBlocks::Fused);
        assert_eq!(f.len(), fused, "{cfg:?}");
        assert_eq!(f.numel(), params);
        assert_eq!(m.blocks().last().unwrap().name, VISUAL_PROJECTION);
        assert_eq!(
            m.spec(VISUAL_PROJECTION).unwrap().shape,
            [proj, cfg.hidden_size]
        );
    }
    assert_eq!(VisionConfig::vit_l14().num_hidden_layers, 24);
}

// ---------------------------------------------------------------------------------------------
// 5. Config parsing.

/// openai/clip-vit-base-patch32's config.json as published (transformers 4.16 era), trimmed of
/// some generation keys but keeping its shape: `eos_token_id: 2`, `*_config_dict: null`, nulls
/// in fields CLIP does not use, no `num_channels`.
const OPENAI_B32: &str = r#"{
  "_name_or_path": "openai/clip-vit-base-patch32",
  "architectures": ["CLIPModel"],
  "initializer_factor": 1.0,
  "logit_scale_init_value": 2.6592,
  "model_type": "clip",
  "projection_dim": 512,
  "text_config": {
    "_name_or_path": "",
    "add_cross_attention": false,
    "architectures": null,
    "attention_dropout": 0.0,
    "bad_words_ids": null,
    "bos_token_id": 0,
    "chunk_size_feed_forward": 0,
    "decoder_start_token_id": null,
    "dropout": 0.0,
    "eos_token_id": 2,
    "finetuning_task": null,
    "hidden_act": "quick_gelu",
    "hidden_size": 512,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "is_decoder": false,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "layer_norm_eps": 1e-05,
    "max_length": 20,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 8,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "prefix": null,
    "projection_dim": 512,
    "pruned_heads": {},
    "task_specific_params": null,
    "torch_dtype": null,
    "transformers_version": "4.16.0.dev0",
    "vocab_size": 49408
  },
  "text_config_dict": null,
  "transformers_version": null,
  "vision_config": {
    "_name_or_path": "",
    "architectures": null,
    "attention_dropout": 0.0,
    "bos_token_id": null,
    "dropout": 0.0,
    "eos_token_id": null,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "image_size": 224,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": null,
    "patch_size": 32,
    "projection_dim": 512,
    "pruned_heads": {},
    "torch_dtype": null,
    "transformers_version": "4.16.0.dev0"
  },
  "vision_config_dict": null
}"#;

#[test]
fn the_openai_b32_config_parses() {
    let cfg = ClipConfig::from_json(OPENAI_B32).unwrap();
    assert_eq!(cfg.vision, VisionConfig::vit_b32());
    assert_eq!(cfg.projection_dim, 512);
    let t = cfg.text.unwrap();
    assert_eq!(
        (t.vocab_size, t.hidden_size, t.intermediate_size),
        (49408, 512, 2048)
    );
    assert_eq!((t.num_hidden_layers, t.num_attention_heads), (12, 8));
    assert_eq!(t.max_position_embeddings, 77);
    assert_eq!((t.bos_token_id, t.eos_token_id, t.pad_token_id), (0, 2, 1));
    assert!(t.pools_at_argmax());
    assert_eq!(t.hidden_act, Activation::QuickGelu);

    // The later style: `*_config_dict` objects next to the full configs (as in the ViT-L/14
    // configs), a vision_config without projection_dim, the top-level one 768.
    let mut v: serde_json::Value = serde_json::from_str(OPENAI_B32).unwrap();
    v["projection_dim"] = 768.into();
    let vc = &mut v["vision_config"];
    for (k, x) in [
        ("hidden_size", 1024),
        ("intermediate_size", 4096),
        ("num_attention_heads", 16),
        ("num_hidden_layers", 24),
        ("patch_size", 14),
    ] {
        vc[k] = x.into();
    }
    vc.as_object_mut().unwrap().remove("projection_dim");
    v["vision_config_dict"] = serde_json::json!({"hidden_size": 1024, "intermediate_size": 4096,
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14});
    v["text_config_dict"] = serde_json::json!({"hidden_size": 512, "intermediate_size": 2048,
        "num_attention_heads": 8, "num_hidden_layers": 12});
    let cfg = ClipConfig::from_json(&v.to_string()).unwrap();
    assert_eq!(cfg.projection_dim, 768);
    assert_eq!(
        cfg.vision,
        VisionConfig {
            projection_dim: 512,
            ..VisionConfig::vit_l14()
        }
    );
    // The manifest follows the top-level projection dim.
    let m = vision_manifest(&cfg.vision, cfg.projection_dim, QkvBlocks::Separate);
    assert_eq!(m.spec(VISUAL_PROJECTION).unwrap().shape, [768, 1024]);
}

#[test]
fn missing_config_fields_take_the_transformers_defaults() {
    let cfg = ClipConfig::from_json(r#"{"model_type": "clip"}"#).unwrap();
    assert_eq!(cfg.vision, VisionConfig::vit_b32());
    assert_eq!(cfg.text.as_ref().unwrap(), &TextConfig::default());
    assert_eq!(cfg.projection_dim, 512);

    let cfg = ClipConfig::from_json(
        r#"{"model_type": "clip", "projection_dim": 64,
            "text_config": {"hidden_size": 64, "num_attention_heads": 4, "hidden_act": "gelu"},
            "vision_config": {"hidden_size": 96, "num_attention_heads": 6, "patch_size": 16}}"#,
    )
    .unwrap();
    let t = cfg.text.unwrap();
    assert_eq!(t.hidden_size, 64);
    assert_eq!(t.hidden_act, Activation::Gelu);
    assert_eq!(
        (t.vocab_size, t.intermediate_size, t.num_hidden_layers),
        (49408, 2048, 12)
    );
    assert_eq!(
        (t.bos_token_id, t.eos_token_id, t.pad_token_id),
        (49406, 49407, 1)
    );
    assert!(!t.pools_at_argmax());
    assert_eq!(t.layer_norm_eps, 1e-5);
    let v = &cfg.vision;
    assert_eq!(
        (v.hidden_size, v.num_attention_heads, v.patch_size),
        (96, 6, 16)
    );
    assert_eq!(
        (v.image_size, v.num_channels, v.intermediate_size),
        (224, 3, 3072)
    );
    assert_eq!(v.hidden_act, Activation::QuickGelu);
    assert_eq!(cfg.projection_dim, 64);

    // A CLIPVisionModel config is flat.
    let cfg = ClipConfig::from_json(
        r#"{"model_type": "clip_vision_model", "hidden_size": 1024, "num_attention_heads": 16,
            "num_hidden_layers": 24, "intermediate_size": 4096, "patch_size": 14,
            "projection_dim": 768, "architectures": ["CLIPVisionModel"]}"#,
    )
    .unwrap();
    assert!(cfg.text.is_none());
    assert_eq!(cfg.vision, VisionConfig::vit_l14());
    assert_eq!(cfg.projection_dim, 768);

    let e = ClipConfig::from_json(
        r#"{"model_type": "clip", "vision_config": {"hidden_act": "gelu_new"}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("gelu_new"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// 6. Backbone options.

#[test]
fn half_precision_towers_stay_close_to_f32() {
    // Tolerance, relative to the largest |entry| of the f32 result: 5e-3 for f16 (10 mantissa
    // bits), 3e-2 for bf16 (7 bits); measured about 7e-4 and 8e-3.
    let r = Reference::load();
    let pixels = r.t("pixel_values");
    let bb32 = backbone(DType::F32);
    let img32 = bb32.base_vision().unwrap().forward(&pixels).unwrap();
    let txt32 = bb32.text().unwrap().forward(&r.ids()).unwrap();
    let nb = bb32.manifest().len();
    let coefs = Coefficients::new(Layout::PerBlock, 3, nb, r.f64s("coef_block")).unwrap();
    for (dtype, tol) in [(DType::F16, 5e-3), (DType::BF16, 3e-2)] {
        let bb = backbone(dtype);
        assert_eq!(bb.dtype(), dtype);
        // bf16 on the CPU is bf16 matmuls over f32 activations (f32 where the CPU has no bf16
        // kernel); f16 runs every op in f16.
        let out = if dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        // θ0 is kept in f32 whatever the compute dtype.
        assert_eq!(bb.base_digest(), bb32.base_digest());
        let img = bb.base_vision().unwrap().forward(&pixels).unwrap();
        assert_eq!(img.dtype(), out);
        let d_img = rel_diff(&img, &img32);
        let txt = bb.text().unwrap().forward(&r.ids()).unwrap();
        assert_eq!(txt.dtype(), out);
        let d_txt = rel_diff(&txt, &txt32);
        let d_log = rel_diff(&logits(&bb, &img, &r), &r.t("logits_per_image"));
        let tvs = task_vectors(&bb, StorageDType::F32);
        let composed = bb
            .composed_vision(&tvs, &coefs)
            .unwrap()
            .forward(&pixels)
            .unwrap();
        let d_comp = rel_diff(&logits(&bb, &composed, &r), &r.t("composed_block_logits"));
        println!(
            "{dtype:?} relative max diff: image {d_img:.2e}, text {d_txt:.2e}, \
             logits {d_log:.2e}, composed logits {d_comp:.2e}"
        );
        assert!(d_img <= tol, "{dtype:?} image {d_img}");
        assert!(d_txt <= tol, "{dtype:?} text {d_txt}");
        assert!(d_log <= tol, "{dtype:?} logits {d_log}");
        assert!(d_comp <= tol, "{dtype:?} composed logits {d_comp}");
        // Not trivially close: the half-precision result is not bit-identical to f32; except
        // bf16 on a CPU without a bf16 kernel, which is the f32 path (cpu_bf16_off.rs).
        if dtype == DType::BF16 && bf16_gemm::chosen().is_none() {
            assert_eq!(d_img, 0.0);
        } else {
            assert!(d_img > 0.0);
        }
    }
}

/// max |a − b| / max |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    max_abs_diff(a, b) / scale
}

/// A deterministic coefficient for task vector `i` on a block, by the block's fused name
/// (q/k/v weights or biases of one layer share it).
fn coef_for(i: usize, block: &str) -> f64 {
    let key = ["q_proj", "k_proj", "v_proj"]
        .iter()
        .find_map(|p| {
            let pat = format!(".self_attn.{p}.");
            block.find(&pat).map(|at| {
                let kind = &block[at + pat.len()..];
                format!("{}.self_attn.in_proj_{kind}", &block[..at])
            })
        })
        .unwrap_or_else(|| block.to_string());
    let h = fnv1a64(format!("{i}:{key}").as_bytes());
    (h % 1000) as f64 / 1000.0 * 1.6 - 0.4
}

fn per_block(bb: &Backbone, n_tv: usize) -> Coefficients {
    let m = bb.manifest();
    let values = (0..n_tv)
        .flat_map(|i| m.blocks().iter().map(move |b| coef_for(i, &b.name)))
        .collect();
    Coefficients::new(Layout::PerBlock, n_tv, m.len(), values).unwrap()
}

#[test]
fn fused_qkv_blocks_compose_like_shared_separate_coefficients() {
    let r = Reference::load();
    let pixels = r.t("pixel_values");
    let sep = backbone(DType::F32);
    let fused = Backbone::load(
        s(&tiny().join("clip")),
        LoadOptions {
            qkv: QkvBlocks::Fused,
            ..Default::default()
        },
    )
    .unwrap();
    let layers = sep.config.vision.num_hidden_layers;
    assert_eq!(fused.manifest().len(), sep.manifest().len() - 4 * layers);
    assert_eq!(fused.manifest().numel(), sep.manifest().numel());
    let qkv = fused
        .manifest()
        .blocks()
        .iter()
        .find(|b| b.name == "vision_model.encoder.layers.1.self_attn.in_proj_bias")
        .unwrap();
    assert_eq!(qkv.tensors.len(), 3);

    // Same θ0, same base digest: the digest does not depend on the block grouping.
    assert_eq!(fused.base_digest(), sep.base_digest());

    let tvs_sep = task_vectors(&sep, StorageDType::F32);
    let tvs_fused = task_vectors(&fused, StorageDType::F32);
    let c_sep = per_block(&sep, 3);
    let c_fused = per_block(&fused, 3);
    let img_sep = sep
        .composed_vision(&tvs_sep, &c_sep)
        .unwrap()
        .forward(&pixels)
        .unwrap();
    let img_fused = fused
        .composed_vision(&tvs_fused, &c_fused)
        .unwrap()
        .forward(&pixels)
        .unwrap();
    let l_sep = logits(&sep, &img_sep, &r);
    let l_fused = logits(&fused, &img_fused, &r);
    let d = max_abs_diff(&l_sep, &l_fused);
    let moved = max_abs_diff(&l_sep, &r.t("logits_per_image"));
    println!("fused vs separate: {d:.2e} (composition moves logits by {moved:.2})");
    assert!(d <= 1e-5, "{d}");
    assert!(moved > 1e-2);

    // Giving q, k and v different coefficients in the separate layout is something the fused
    // layout cannot express: the logits then differ (so the check above can fail).
    let mut values = c_sep.values.clone();
    let q0 = sep
        .manifest()
        .block_index("vision_model.encoder.layers.0.self_attn.q_proj.weight")
        .unwrap();
    values[q0] += 1.0;
    let c_diff = Coefficients::new(Layout::PerBlock, 3, sep.manifest().len(), values).unwrap();
    let img = sep
        .composed_vision(&tvs_sep, &c_diff)
        .unwrap()
        .forward(&pixels)
        .unwrap();
    assert!(max_abs_diff(&logits(&sep, &img, &r), &l_fused) > 1e-4);
}

#[test]
fn a_task_vector_saved_under_one_qkv_layout_loads_under_the_other() {
    let sep = backbone(DType::F32);
    let fused = Backbone::load(
        s(&tiny().join("clip")),
        LoadOptions {
            qkv: QkvBlocks::Fused,
            ..Default::default()
        },
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("a.safetensors");
    let tv_sep = tv_from(&sep, &tiny().join("ft_a")).unwrap();
    tv_sep.save(&path, sep.manifest()).unwrap();

    let loaded = fused
        .load_task_vector(&path, None, StorageDType::F32)
        .unwrap();
    let direct = tv_from(&fused, &tiny().join("ft_a")).unwrap();
    for (x, y) in loaded.blocks().iter().zip(direct.blocks()) {
        assert_eq!(x, y);
    }
    let mut lib = Library::new(fused.manifest().clone(), fused.base_digest());
    lib.add(loaded).unwrap();
    // But a task vector object over the other manifest is refused.
    let e = lib.add(tv_sep).unwrap_err().to_string();
    assert!(e.contains("another block manifest"), "{e}");
}

#[test]
fn the_base_digest_is_the_hash_of_the_image_tower_in_parameter_order() {
    let bb = backbone(DType::F32);
    let (tensors, _) = read_file(&tiny().join("clip/model.safetensors")).unwrap();
    let by_name: HashMap<_, _> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut h = Sha256::new();
    for spec in vision_tensors(&bb.config.vision, bb.config.projection_dim) {
        for x in &by_name[spec.name.as_str()].data {
            h.update(x.to_le_bytes());
        }
    }
    assert_eq!(bb.base_digest(), hex::encode(h.finalize()));
}
