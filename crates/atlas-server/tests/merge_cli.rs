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
    let clip = fixtures().join("clip").display().to_string();
    let [a, b, c] = ["ft_a", "ft_b", "ft_c"].map(|f| fixtures().join(f).display().to_string());
    atlas_serve(&[
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
    ])
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
