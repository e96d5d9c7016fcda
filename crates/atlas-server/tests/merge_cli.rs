//! `atlas-serve merge` run as a user would on the tiny fixtures' fine-tuned checkpoints; the
//! written task vector is FusionBench's merged model minus θ0 (tests/fixtures/merge).

mod common;

use atlas_clip::backbone::may_be_missing;
use atlas_core::{Manifest, StorageDType, TaskVector};
use common::fixtures;
use std::process::{Command, Output};

fn atlas_serve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atlas-serve"))
        .args(args)
        .output()
        .expect("run atlas-serve")
}

fn merge(method: &str, params: &str, out: &std::path::Path) -> Output {
    merge_with(method, params, out, &[])
}

fn merge_with(method: &str, params: &str, out: &std::path::Path, extra: &[&str]) -> Output {
    let clip = fixtures().join("clip").display().to_string();
    let [a, b, c] = ["ft_a", "ft_b", "ft_c"].map(|f| fixtures().join(f).display().to_string());
    atlas_serve(
        &[
            "merge",
            "--base",
            &clip,
            "--method",
            method,
            "--tv",
            &a,
            "--tv",
            &b,
            "--tv",
            &c,
            "--params",
            params,
            "--store",
            "f32",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
    )
}

fn manifest() -> std::sync::Arc<Manifest> {
    let clip = fixtures().join("clip").display().to_string();
    let bb = atlas_clip::Backbone::load(&clip, atlas_clip::LoadOptions::default()).unwrap();
    bb.manifest().clone()
}

#[test]
fn merge_writes_fusionbenchs_merged_delta() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = manifest();
    for (case, method, params) in [
        (
            "ties_sum",
            "ties_merging",
            r#"{"scaling_factor": 0.3, "threshold": 20}"#,
        ),
        ("magmax", "magmax", r#"{"scaling_factor": 0.5}"#),
        ("iso_cts", "iso_cts", r#"{"scaling_factor": 1.1}"#),
        (
            "task_arithmetic",
            "task_arithmetic",
            r#"{"scaling_factor": 0.3}"#,
        ),
    ] {
        let out = dir.path().join(format!("{case}.safetensors"));
        let run = merge(method, params, &out);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let tv = TaskVector::load(&out, &manifest, StorageDType::F32, &may_be_missing).unwrap();
        assert!(tv.meta.source.contains(method), "{}", tv.meta.source);
        let oracle = common::oracle::case(case);
        assert!(!oracle.is_empty());
        for (name, want) in oracle {
            let ours = tv.tensor_f32(&manifest, &name).unwrap();
            let worst = ours
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "{case} {name}: {worst:e}");
        }
    }
}

#[test]
fn merge_refuses_bad_parameters_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let run = merge("ties_merging", r#"{"threshold": 100}"#, &out);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("params.threshold"), "{stderr}");
    assert!(!out.exists());
}

/// Three ImageFolder directories (two classes each), one per fine-tune.
fn image_folders(root: &std::path::Path) -> Vec<std::path::PathBuf> {
    (0..3u32)
        .map(|t| {
            let dir = root.join(format!("task{t}"));
            for (c, class) in ["cat", "dog"].iter().enumerate() {
                std::fs::create_dir_all(dir.join(class)).unwrap();
                for i in 0..3u32 {
                    let img = image::RgbImage::from_fn(36, 36, |x, y| {
                        let k = t * 40 + c as u32 * 90 + i * 11;
                        image::Rgb([
                            (x * 7 + k) as u8,
                            (y * 5 + k) as u8,
                            (x ^ y) as u8 + k as u8,
                        ])
                    });
                    img.save(dir.join(class).join(format!("{i}.png"))).unwrap();
                }
            }
            dir
        })
        .collect()
}

/// `--data` per `--tv` for RegMean and Fisher merging: the written task vector is the merge
/// the library computes on the same folders; a missing folder is refused.
#[test]
fn data_merges_read_one_image_folder_per_input() {
    let dir = tempfile::tempdir().unwrap();
    let folders = image_folders(dir.path());
    let folder_args: Vec<String> = folders.iter().map(|f| f.display().to_string()).collect();
    let bb = common::data_merge::backbone();
    let manifest = bb.manifest().clone();
    let pre = atlas_clip::preprocess::Preprocess::from_config(bb.config.vision.image_size);
    let data: Vec<atlas_learn::Dataset> = folders
        .iter()
        .map(|f| atlas_learn::Dataset::from_image_folder(f, &pre).unwrap())
        .collect();
    for method in ["regmean", "fisher_merging"] {
        let out = dir.path().join(format!("{method}.safetensors"));
        let mut extra = Vec::new();
        for f in &folder_args {
            extra.extend(["--data", f.as_str()]);
        }
        let run = merge_with(method, "{}", &out, &extra);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        let tv = TaskVector::load(&out, &manifest, StorageDType::F32, &may_be_missing).unwrap();
        let blocks = common::data_merge::merged(&bb, method, &data);
        for (b, want) in blocks.iter().enumerate() {
            let ours = tv.block(b).to_f32_vec();
            let worst = ours
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-6, "{method} block {b}: {worst:e}");
        }
    }
    let out = dir.path().join("x.safetensors");
    let run = merge_with("regmean", "{}", &out, &["--data", &folder_args[0]]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("one --data directory per --tv"), "{stderr}");
}

/// `--checkpoint DIR` writes the merged model as a CLIPVisionModel checkpoint: it loads as
/// one (config and `vision_model.*` tensors), and its tensors are θ0 plus FusionBench's merged
/// delta.
#[test]
fn merge_writes_a_clip_vision_model_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("merged");
    let out = dir.path().join("ties.safetensors");
    let run = merge_with(
        "ties_merging",
        r#"{"scaling_factor": 0.3, "threshold": 20}"#,
        &out,
        &["--checkpoint", ckpt.to_str().unwrap()],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let loaded = atlas_clip::checkpoint::Checkpoint::open(ckpt.to_str().unwrap()).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "clip_vision_model");
    assert_eq!(config["architectures"][0], "CLIPVisionModel");
    let bb = common::data_merge::backbone();
    assert_eq!(loaded.config.vision, bb.config.vision);
    let manifest = bb.manifest();
    let oracle = common::oracle::case("ties_sum");
    let mut compared = 0;
    for t in &loaded.tensors {
        assert!(t.name.starts_with("vision_model."), "{}", t.name);
        let loc = manifest.locate(&t.name).unwrap();
        let base = &bb.base_blocks()[loc.block][loc.offset..loc.offset + loc.numel];
        let want: Vec<f32> = base
            .iter()
            .zip(&oracle[&t.name])
            .map(|(b, d)| b + d)
            .collect();
        let worst = t
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{}: {worst:e}", t.name);
        compared += 1;
    }
    assert_eq!(
        compared,
        manifest.tensor_specs().count() - 1,
        "all but the projection"
    );
}
