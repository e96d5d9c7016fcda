//! Loading by hub id through a local Hugging Face cache (no network): `HF_HUB_CACHE`,
//! `HF_HOME`, revisions (branch, tag, commit hash) and offline errors.
//!
//! Environment variables are process-global, so every check that sets them lives in the one
//! test function of this file.

mod common;

use atlas_clip::checkpoint::{self, Checkpoint};
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::safetensors_io::{read_file, write_file, OutTensor};
use candle_core::Tensor;
use common::*;
use safetensors::Dtype;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const REPO: &str = "atlas/tiny-clip";
const FOLDER: &str = "models--atlas--tiny-clip";
const COMMIT_1: &str = "0123456789abcdef0123456789abcdef01234567";
const COMMIT_2: &str = "fedcba9876543210fedcba9876543210fedcba98";

/// Adds a snapshot `commit` of the files in `src` to the repo folder `repo` the way the hub
/// client does: content-addressed blobs, relative symlinks from the snapshot.
fn add_snapshot(repo: &Path, commit: &str, src: &Path) {
    let blobs = repo.join("blobs");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let bytes = std::fs::read(src.join(file)).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        std::fs::write(blobs.join(&sha), &bytes).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&sha), snap.join(file)).unwrap();
    }
}

fn set_ref(repo: &Path, name: &str, commit: &str) {
    let refs = repo.join("refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join(name), commit).unwrap();
}

/// A copy of the tiny CLIP whose visual projection is changed (so its image embeddings differ).
fn modified_clip(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let src = tiny().join("clip");
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let (tensors, _) = read_file(&src.join("model.safetensors")).unwrap();
    let out: Vec<OutTensor> = tensors
        .into_iter()
        .map(|t| {
            let data: Vec<f32> = if t.name == "visual_projection.weight" {
                t.data.iter().map(|x| x * -2.0).collect()
            } else {
                t.data
            };
            OutTensor {
                name: t.name,
                dtype: Dtype::F32,
                shape: t.shape,
                bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            }
        })
        .collect();
    write_file(&dir.join("model.safetensors"), &out, HashMap::new()).unwrap();
}

fn embed(model: &str, pixels: &Tensor) -> (Backbone, Tensor) {
    let bb =
        Backbone::load(model, LoadOptions::default()).unwrap_or_else(|e| panic!("{model}: {e}"));
    let img = bb.base_vision().unwrap().forward(pixels).unwrap();
    (bb, img)
}

fn load_err(model: &str) -> (String, Duration) {
    let t0 = Instant::now();
    let e = match Backbone::load(model, LoadOptions::default()) {
        Ok(_) => panic!("{model}: expected an error"),
        Err(e) => e.to_string(),
    };
    (e, t0.elapsed())
}

const ENV: [&str; 3] = ["HF_HUB_CACHE", "HF_HOME", "HF_HUB_OFFLINE"];

#[test]
fn loads_by_hub_id_from_the_local_cache() {
    let saved: Vec<_> = ENV.iter().map(|k| (k, std::env::var_os(k))).collect();
    for k in ENV {
        std::env::remove_var(k);
    }

    let r = Reference::load();
    let pixels = r.t("pixel_values");
    let dir = tiny().join("clip");
    let (bb_dir, want) = embed(dir.to_str().unwrap(), &pixels);

    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let repo = cache.join(FOLDER);
    let other = tmp.path().join("other_clip");
    modified_clip(&other);
    add_snapshot(&repo, COMMIT_1, &dir);
    add_snapshot(&repo, COMMIT_2, &other);
    set_ref(&repo, "main", COMMIT_1);
    set_ref(&repo, "v2", COMMIT_2);

    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert!(checkpoint::offline());

    // HF_HUB_CACHE, default revision (refs/main).
    let (bb, got) = embed(REPO, &pixels);
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    assert_eq!(bb.id, REPO);
    assert_eq!(bb.base_digest(), bb_dir.base_digest());
    assert!(bb.tokenizer().is_some());
    let files = Checkpoint::open(REPO).unwrap().files;
    assert!(
        files
            .weights
            .starts_with(repo.join("snapshots").join(COMMIT_1)),
        "{}",
        files.weights.display()
    );

    // Revisions: a branch, a tag, a commit hash (no refs/<hash>: the snapshot is used directly).
    let (_, main) = embed(&format!("{REPO}@main"), &pixels);
    assert_eq!(max_abs_diff(&main, &want), 0.0);
    let (_, v2) = embed(&format!("{REPO}@v2"), &pixels);
    assert!(
        max_abs_diff(&v2, &want) > 1e-3,
        "the second snapshot differs"
    );
    let (_, c2) = embed(&format!("{REPO}@{COMMIT_2}"), &pixels);
    assert_eq!(max_abs_diff(&c2, &v2), 0.0);
    let (_, c1) = embed(&format!("{REPO}@{COMMIT_1}"), &pixels);
    assert_eq!(max_abs_diff(&c1, &want), 0.0);
    // Moving the branch moves what the bare id loads.
    set_ref(&repo, "main", COMMIT_2);
    let (_, moved) = embed(REPO, &pixels);
    assert_eq!(max_abs_diff(&moved, &v2), 0.0);
    set_ref(&repo, "main", COMMIT_1);

    // Not in the cache, offline: a quick error naming the id and offline mode.
    for (model, name) in [
        ("atlas/not-cached", "atlas/not-cached"),
        (
            "atlas/tiny-clip@no-such-branch",
            "atlas/tiny-clip@no-such-branch",
        ),
        (
            "atlas/tiny-clip@aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ),
    ] {
        let (e, took) = load_err(model);
        assert!(
            e.contains(name) && e.contains("HF_HUB_OFFLINE") && e.contains("config.json"),
            "{model}: {e}"
        );
        assert!(took < Duration::from_secs(2), "{model}: took {took:?}");
    }

    // An existing file is never taken for a hub id, even when it reads like `org/name`
    // (the working directory of integration tests is the crate's).
    assert!(Path::new("src/lib.rs").is_file());
    let (e, _) = load_err("src/lib.rs");
    assert!(e.contains("src/lib.rs") && e.contains("is a file"), "{e}");
    assert!(!e.contains("cache"), "{e}");

    // HF_HOME/hub when HF_HUB_CACHE is unset.
    std::env::remove_var("HF_HUB_CACHE");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join("hub")).unwrap();
    std::fs::rename(&repo, home.join("hub").join(FOLDER)).unwrap();
    std::env::set_var("HF_HOME", &home);
    let (_, got) = embed(REPO, &pixels);
    assert_eq!(max_abs_diff(&got, &want), 0.0);
    // HF_HUB_CACHE wins over HF_HOME.
    std::env::set_var("HF_HUB_CACHE", &cache);
    let (e, _) = load_err(REPO);
    assert!(e.contains(cache.to_str().unwrap()), "{e}");
    std::env::remove_var("HF_HUB_CACHE");

    // HF_HUB_OFFLINE takes the spellings huggingface_hub accepts, in any case.
    for v in ["1", "true", "True", "TRUE", "yes", "YES", "on", "On", " 1 "] {
        std::env::set_var("HF_HUB_OFFLINE", v);
        assert!(checkpoint::offline(), "{v:?}");
    }
    for v in ["0", "false", "no", "off", ""] {
        std::env::set_var("HF_HUB_OFFLINE", v);
        assert!(!checkpoint::offline(), "{v:?}");
    }
    std::env::remove_var("HF_HUB_OFFLINE");
    assert!(!checkpoint::offline());

    for (k, v) in saved {
        match v {
            Some(v) => std::env::set_var(k, v),
            None => std::env::remove_var(k),
        }
    }
}
