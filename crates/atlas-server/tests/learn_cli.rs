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
        "--out",
        out_file.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
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
