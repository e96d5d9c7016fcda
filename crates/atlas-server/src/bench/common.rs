//! What the benchmarks share: timing with a median, bandwidth, the image-tower shapes by name,
//! and (from atlas-core) deterministic random weights, task vectors and coefficients.

use anyhow::bail;
use atlas_clip::VisionConfig;
use serde_json::json;
use std::time::Instant;

/// Timing summary of one figure, in milliseconds.
pub(crate) struct Timing {
    pub(crate) median: f64,
    min: f64,
    max: f64,
}

impl Timing {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({ "median_ms": self.median, "min_ms": self.min, "max_ms": self.max })
    }
}

/// Runs `f` `warmup` times untimed, then `iters` times timed. Whatever `f` returns is dropped
/// outside the timed region.
pub(crate) fn time<R>(warmup: usize, iters: usize, mut f: impl FnMut() -> R) -> Timing {
    for _ in 0..warmup {
        drop(f());
    }
    let ms: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let t = Instant::now();
            let r = f();
            let dt = t.elapsed().as_secs_f64() * 1e3;
            drop(r);
            dt
        })
        .collect();
    Timing {
        median: median(&ms),
        min: ms.iter().copied().fold(f64::INFINITY, f64::min),
        max: ms.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    }
}

pub(crate) use atlas_core::random::{random_blocks, random_coefficients, random_task_vector};

pub(crate) fn gbps(bytes: usize, ms: f64) -> f64 {
    bytes as f64 / (ms * 1e-3) / 1e9
}

/// The median of `v` (the mean of the middle two for an even count).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The image-tower shape called `name`.
pub(crate) fn vision_config(name: &str) -> anyhow::Result<VisionConfig> {
    Ok(match name {
        "B/32" => VisionConfig::vit_b32(),
        "B/16" => VisionConfig::vit_b16(),
        "L/14" => VisionConfig::vit_l14(),
        "tiny" => VisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            image_size: 32,
            patch_size: 8,
            projection_dim: 32,
            ..VisionConfig::default()
        },
        _ => bail!("unknown model {name:?} (B/32, B/16, L/14 or tiny)"),
    })
}

/// The CPU a figure was measured on: its model name, vendor, family, model and stepping (a
/// virtual machine often names its CPU "Intel(R) Xeon(R) Processor" alone; the numbers tell
/// the core), logical cores and the instruction-set features that decide which kernels run (a
/// lead on one CPU is not a lead on another, so every result carries this).
pub(crate) fn machine() -> serde_json::Value {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let present: Vec<&str> = KERNEL_FEATURES
        .iter()
        .copied()
        .filter(|f| flags.split_whitespace().any(|g| g == *f))
        .collect();
    let number = |name: &str| field(name).and_then(|v| v.parse::<u32>().ok());
    json!({
        "cpu": field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string()),
        "vendor": field("vendor_id"),
        "family": number("cpu family"),
        "model": number("model"),
        "stepping": number("stepping"),
        "logical_cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "features": present,
    })
}

/// CPU flags (as /proc/cpuinfo names them) that matter to gemm and the project's kernels.
const KERNEL_FEATURES: [&str; 9] = [
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "neon",
];

#[cfg(test)]
mod tests {
    #[test]
    fn the_machine_is_named_with_its_features() {
        let m = super::machine();
        assert!(!m["cpu"].as_str().unwrap().is_empty());
        assert!(m["logical_cores"].as_u64().unwrap() >= 1);
        assert!(m["features"].is_array());
        // x86-64 Linux names family, model and stepping in /proc/cpuinfo; "model" is not
        // mistaken for "model name".
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            for k in ["family", "model", "stepping"] {
                assert!(m[k].is_u64(), "{k}: {}", m[k]);
            }
            assert!(m["vendor"].is_string());
        }
    }
}
