//! With the `cuda` feature, compiles every `kernels/*.cu` to PTX (nvcc from $NVCC, else the
//! PATH) for sm_$CUDA_COMPUTE_CAP (default 90, the H100/H200) into OUT_DIR, where `src/ptx.rs`
//! includes it. Without the feature it does nothing: CPU builds need no CUDA toolchain.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ folder")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        compile(&nvcc, &cap, src, &out);
    }
}

fn compile(nvcc: &str, cap: &str, src: &Path, out: &Path) {
    let stem = src.file_stem().expect("file name").to_string_lossy();
    let ptx = out.join(format!("{stem}.ptx"));
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} (set NVCC or put nvcc on PATH): {e}"));
    assert!(status.success(), "{nvcc} failed on {}", src.display());
}
