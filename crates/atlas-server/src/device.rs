//! Devices and compute dtypes as users name them (`--device cpu|cuda|cuda:N`, `--dtype
//! f32|f16|bf16`): one parser for the server, the benchmarks and the other subcommands.

use anyhow::{bail, Context};
use candle_core::{DType, Device};

/// `cpu`, `cuda` (GPU 0) or `cuda:N`.
pub fn open(name: &str) -> anyhow::Result<Device> {
    let n = match name.strip_prefix("cuda") {
        None if name == "cpu" => return Ok(Device::Cpu),
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("device {name:?}: use cpu, cuda or cuda:N"))?,
        None => bail!("device {name:?}: use cpu, cuda or cuda:N"),
    };
    open_cuda(n).with_context(|| format!("device {name:?}"))
}

/// CUDA device `n`. cudarc panics when it cannot load the driver library (a machine without
/// an NVIDIA driver): that becomes an error saying so, not a crash.
fn open_cuda(n: usize) -> anyhow::Result<Device> {
    match std::panic::catch_unwind(|| Device::new_cuda(n)) {
        Ok(dev) => Ok(dev?),
        Err(_) => bail!(
            "the CUDA driver library could not be loaded (no NVIDIA driver here, or \
             libcuda.so.1 not on LD_LIBRARY_PATH)"
        ),
    }
}

/// A floating-point compute dtype: `f32`, `f16` or `bf16` (also `float32`, `float16`,
/// `bfloat16`).
pub fn compute_dtype(name: &str) -> anyhow::Result<DType> {
    Ok(match name {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        _ => bail!("dtype {name:?}: use f32, f16 or bf16"),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_parse_or_say_what_is_accepted() {
        assert!(super::open("cpu").unwrap().is_cpu());
        for bad in ["gpu", "cuda:x", "cuda0", "cpu:0", ""] {
            let e = super::open(bad).unwrap_err().to_string();
            assert!(e.contains("use cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        assert_eq!(
            super::compute_dtype("bfloat16").unwrap(),
            candle_core::DType::BF16
        );
        assert!(super::compute_dtype("u8").is_err());
    }
}
