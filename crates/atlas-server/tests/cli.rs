//! The `atlas-serve task-vector` subcommands, run as a user would, on the committed tiny
//! fixtures (a random tiny CLIPModel, fine-tuned image towers, an open_clip-named delta).

use atlas_clip::backbone::may_be_missing;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::{StorageDType, TaskVector};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn clip_dir() -> String {
    fixtures().join("clip").display().to_string()
}

fn atlas_serve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atlas-serve"))
        .args(args)
        .output()
        .expect("run atlas-serve")
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn backbone() -> Backbone {
    Backbone::load(&clip_dir(), LoadOptions::default()).expect("load the tiny backbone")
}

#[test]
fn build_inspect_and_convert() {
    let dir = tempfile::tempdir().unwrap();
    let bb = backbone();
    let manifest = bb.manifest();

    // build from a fine-tuned CLIPVisionModel
    let tv_a = dir.path().join("a.safetensors");
    let ft_a = fixtures().join("ft_a").display().to_string();
    let out = atlas_serve(&[
        "task-vector",
        "build",
        "--base",
        &clip_dir(),
        "--finetuned",
        &ft_a,
        "--name",
        "task_a",
        "--out",
        tv_a.to_str().unwrap(),
    ]);
    let stdout = ok(&out);
    let loaded = TaskVector::load(&tv_a, manifest, StorageDType::F16, &may_be_missing).unwrap();
    assert_eq!(loaded.name(), "task_a");
    assert_eq!(loaded.meta.base_digest, bb.base_digest());
    assert!(loaded.blocks().iter().any(|b| !b.is_zero()));
    assert!(stdout.contains(loaded.digest()), "{stdout}");
    // the same task vector as the library builds in-process
    let want = bb
        .task_vector_from_checkpoint(
            atlas_clip::checkpoint::Checkpoint::open(&ft_a).unwrap(),
            "task_a",
            StorageDType::F16,
        )
        .unwrap();
    assert_eq!(loaded.digest(), want.digest());

    // inspect it
    let stdout = ok(&atlas_serve(&[
        "task-vector",
        "inspect",
        tv_a.to_str().unwrap(),
        "--base",
        &clip_dir(),
    ]));
    assert!(stdout.contains("task_a"), "{stdout}");
    assert!(
        stdout.contains("matches the file's recorded digest"),
        "{stdout}"
    );
    assert!(
        stdout.contains("base digest    matches the backbone"),
        "{stdout}"
    );
    assert!(stdout.contains("top 5 blocks by norm"), "{stdout}");

    // convert an open_clip-named delta, stored at f32
    let delta = fixtures().join("delta_c_openclip.safetensors");
    let tv_c = dir.path().join("c.safetensors");
    ok(&atlas_serve(&[
        "task-vector",
        "convert",
        "--base",
        &clip_dir(),
        "--delta",
        delta.to_str().unwrap(),
        "--name",
        "task_c",
        "--store",
        "f32",
        "--out",
        tv_c.to_str().unwrap(),
    ]));
    let loaded = TaskVector::load(&tv_c, manifest, StorageDType::F32, &may_be_missing).unwrap();
    assert_eq!(loaded.name(), "task_c");
    let want = bb
        .load_task_vector(&delta, Some("task_c"), StorageDType::F32)
        .unwrap();
    assert_eq!(loaded.digest(), want.digest());
}

#[test]
fn missing_finetuned_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no_such_checkpoint");
    let out_file = dir.path().join("x.safetensors");
    let out = atlas_serve(&[
        "task-vector",
        "build",
        "--base",
        &clip_dir(),
        "--finetuned",
        missing.to_str().unwrap(),
        "--name",
        "x",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
    assert!(!out_file.exists());
}

#[test]
fn missing_task_vector_file_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.safetensors");
    let out = atlas_serve(&[
        "task-vector",
        "inspect",
        missing.to_str().unwrap(),
        "--base",
        &clip_dir(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(missing.to_str().unwrap()), "{stderr}");
}

/// Runs `atlas-serve args` and returns its peak resident memory in KiB (VmHWM, read until the
/// process exits; the last reading is within one poll of the end).
fn peak_kib(args: &[&str]) -> u64 {
    let mut child = Command::new(env!("CARGO_BIN_EXE_atlas-serve"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        let hwm = std::fs::read_to_string(&status)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0);
        peak = peak.max(hwm);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        child.wait().unwrap().success(),
        "atlas-serve {args:?} failed"
    );
    peak
}

/// Fine-tuning kept something per step (the optimiser's moments chained every step's graph):
/// peak memory grew with the number of steps (2.4 GB for 115 steps, 7.2 GB for 380). Four
/// times the steps must not cost more than a few percent more memory.
#[test]
#[cfg(target_os = "linux")]
fn finetune_memory_does_not_grow_with_the_number_of_steps() {
    let dir = tempfile::tempdir().unwrap();
    for (class, colour) in [("red", [200u8, 20, 10]), ("blue", [10, 20, 200])] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        for i in 0..16u8 {
            let img =
                image::RgbImage::from_pixel(32, 32, image::Rgb([colour[0], i * 8, colour[2]]));
            img.save(dir.path().join(class).join(format!("{i}.png")))
                .unwrap();
        }
    }
    let data = dir.path().display().to_string();
    let run = |epochs: &str| {
        let out = dir.path().join(format!("tv{epochs}.safetensors"));
        let out = out.display().to_string();
        let args = [
            "finetune",
            "--base",
            &clip_dir(),
            "--data",
            &data,
            "--out",
            &out,
            "--epochs",
            epochs,
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
            "--holdout",
            "0",
        ];
        peak_kib(&args)
    };
    let (n, four_n) = (run("10"), run("40"));
    assert!(
        four_n as f64 <= n as f64 * 1.05 + 4096.0,
        "peak {n} KiB for 80 steps, {four_n} KiB for 320"
    );
}
