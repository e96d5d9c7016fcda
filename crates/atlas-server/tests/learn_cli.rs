//! `atlas-serve learn` on an ImageFolder directory with the tiny fixture CLIP and two task
//! vectors: writes a coefficients file that loads, names the task vectors by digest, and
//! reports the validation metric before and after and whether anything was learned.

use atlas_learn::output::CoefficientsFile;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

fn image_folder(dir: &Path) {
    for (c, class) in ["red_circle", "blue_square", "dog_toy"].iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..6u32 {
            let img = image::RgbImage::from_fn(36, 36, |x, y| {
                image::Rgb([
                    (x * 7 + i * 13) as u8,
                    (y * 5 + c as u32 * 80) as u8,
                    (c as u32 * 90 + i) as u8,
                ])
            });
            img.save(dir.join(class).join(format!("{i}.png"))).unwrap();
        }
    }
}

fn learn(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atlas-serve"));
    cmd.arg("learn").arg("--model").arg(fixtures().join("clip"));
    for tv in [
        "delta_c_openclip.safetensors",
        "delta_a_openclip_with_proj.safetensors",
    ] {
        cmd.arg("--tv").arg(fixtures().join(tv));
    }
    cmd.args(args).output().unwrap()
}

#[test]
fn learns_over_an_image_folder_and_writes_coefficients() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    image_folder(&data);
    let out_file = dir.path().join("coefs.json");
    let out = learn(&[
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "2",
        "--batch-size",
        "6",
        "--layout",
        "per-part",
        "--parts",
        "2",
        "--templates",
        "a photo of a {}.",
        "--templates",
        "a drawing of a {}.",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Not a terminal: progress comes as log lines, the last with its step count and an ETA.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr
        .lines()
        .rfind(|l| l.contains("learning: "))
        .unwrap_or("");
    assert!(
        last.contains(" (100 %), ") && last.contains("eta"),
        "{stderr}"
    );
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("before") && stdout.contains("after"),
        "{stdout}"
    );
    let file = CoefficientsFile::load(&out_file).unwrap();
    assert_eq!(file.task_vectors.len(), 2);
    assert_eq!(file.coefficients.values.len(), 2 * file.blocks.len() * 2);
    assert_eq!(file.summary["metric"], "accuracy");
    assert!(file.summary["before"].is_number() && file.summary["after"].is_number());
    // Whether anything was learned is said, in the file and on the terminal.
    let outcome = file.summary["outcome"].as_str().unwrap();
    assert!(["improved", "kept_start"].contains(&outcome), "{outcome}");
    assert!(stdout.contains(&format!("outcome: {outcome}")), "{stdout}");
    assert!(file.summary["warnings"].is_array());

    // Templates and overrides are checked as the API checks them.
    for (flags, says) in [
        (
            ["--templates", "no placeholder here"],
            "no templates for data set",
        ),
        (["--epochs", "100000"], "epochs must be at most"),
        (["--dtype", "f16"], "--dtype \"f16\": use f32 or bf16"),
    ] {
        let mut args = vec!["--data", data.to_str().unwrap(), "--out", "unused.json"];
        args.extend(flags);
        let out = learn(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{stderr}");
    }

    // bf16: the linear products on the CPU's bf16 kernel where it has one (f32 elsewhere).
    let out = learn(&[
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--dtype",
        "bf16",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    succeeded(&out);
    let file = CoefficientsFile::load(&out_file).unwrap();
    assert!(file.coefficients.values.iter().all(|v| v.is_finite()));

    // A directory with no class folders is refused with a message naming it.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = learn(&[
        "--data",
        empty.to_str().unwrap(),
        "--out",
        out_file.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("empty") && stderr.contains("class"),
        "{stderr}"
    );
}

fn atlas(cache: &Path, args: &[&str]) -> std::process::Output {
    atlas_in(Path::new("."), cache, args)
}

/// [`atlas`] run in the directory `cwd`.
fn atlas_in(cwd: &Path, cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_atlas-serve"))
        .current_dir(cwd)
        .args(args)
        .env("ATLAS_CACHE", cache)
        // The demo world's tensors are tiny: one thread each is faster.
        .env("CANDLE_NUM_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn succeeded(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// The demo world had no name the CLI took (its path appeared only in the server log):
/// `--model demo:ci` builds it if needed (the log says which) and learns and fine-tunes on it,
/// with its task vectors named by task.
#[test]
fn learn_and_finetune_take_the_demo_world_by_name() {
    // Shared with tests/demo_service.rs: the ci world is built once per target directory.
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("atlas-cache");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("position");
    let export = [
        "demo", "export", "--preset", "ci", "--task", "position", "--split", "val", "--out",
    ];
    let mut args = export.to_vec();
    args.push(data.to_str().unwrap());
    succeeded(&atlas(&cache, &args));

    let coefs = dir.path().join("coefs.json");
    // Run beside the exported `position/`, as the README does: `--tv position` is still the
    // task vector, not that directory.
    let stderr = succeeded(&atlas_in(
        dir.path(),
        &cache,
        &[
            "learn",
            "--model",
            "demo:ci",
            "--tv",
            "position",
            "--tv",
            "count",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
            "--out",
            coefs.to_str().unwrap(),
        ],
    ));
    assert!(stderr.contains("demo world 'demo:ci'"), "{stderr}");
    // Whether built by this test or an earlier one, the log says which.
    assert!(
        stderr.contains("(cached)") || stderr.contains("building it now"),
        "{stderr}"
    );
    let file = CoefficientsFile::load(&coefs).unwrap();
    let names: Vec<&str> = file.task_vectors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["position", "count"]);

    let tv = dir.path().join("tv.safetensors");
    let stderr = succeeded(&atlas(
        &cache,
        &[
            "finetune",
            "--model",
            "demo:ci",
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--out",
            tv.to_str().unwrap(),
        ],
    ));
    assert!(stderr.contains("demo world 'demo:ci'"), "{stderr}");
    // The fine-tuned task vector is relative to the demo backbone, named the same way.
    let inspect = atlas(
        &cache,
        &[
            "task-vector",
            "inspect",
            tv.to_str().unwrap(),
            "--base",
            "demo:ci",
        ],
    );
    succeeded(&inspect);
    let stdout = String::from_utf8_lossy(&inspect.stdout);
    assert!(stdout.contains("position"), "{stdout}");

    // A preset that does not exist is named in the refusal.
    let out = atlas(
        &cache,
        &["learn", "--model", "demo:huge", "--data", "x", "--out", "y"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("demo:huge") && stderr.contains("demo:ci"),
        "{stderr}"
    );
}

/// AdaMerging from the command line: one folder per task, read without labels, a layer-wise
/// merge judged by the tasks' mean mutual information.
#[test]
fn adamerging_learns_a_merge_over_several_folders() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    image_folder(&a);
    image_folder(&b);
    let out_file = dir.path().join("coefs.json");
    let out = learn(&[
        "--objective",
        "adamerging",
        "--data",
        a.to_str().unwrap(),
        "--data",
        b.to_str().unwrap(),
        "--epochs",
        "2",
        "--out",
        out_file.to_str().unwrap(),
    ]);
    succeeded(&out);
    let file = CoefficientsFile::load(&out_file).unwrap();
    assert_eq!(file.summary["metric"], "mean_mutual_information");
    assert_eq!(
        file.coefficients.values.len(),
        2 * file.blocks.len(),
        "per block by default"
    );
}
