//! CLIP for atlas-serve: configuration, image and text towers over plain or composed weights,
//! tokenizer, OpenAI preprocessing, zero-shot heads and checkpoint loading.

pub mod backbone;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_kernels;
pub mod device_compose;
pub mod error;
pub mod grad;
pub mod heads;
pub mod kernel_check;
pub mod loss;
pub mod manifest;
pub mod model;
pub mod openclip;
pub mod preprocess;
pub mod templates;
pub mod tokenizer;

pub use backbone::{Backbone, LoadOptions};
pub use config::{ClipConfig, TextConfig, VisionConfig};
pub use error::{ClipError, Result};
pub use heads::ZeroShotHead;
pub use manifest::{vision_manifest, QkvBlocks};
pub use model::{Bf16Matmuls, TextTower, VisionTower, WeightSource};

/// Whether the project's own CUDA kernels (composition, fused epilogues, attention, the
/// learning step's reduction) may run on a GPU: yes unless `ATLAS_CUDA_KERNELS` is `0`, `off`,
/// `false` or `no`. With them off the GPU runs plain candle ops, to compare against or to get around a
/// kernel that fails its check. Read once per process.
pub fn cuda_kernels_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| kernels_switch(std::env::var("ATLAS_CUDA_KERNELS").ok().as_deref()))
}

fn kernels_switch(value: Option<&str>) -> bool {
    !matches!(value.map(str::trim), Some("0" | "off" | "false" | "no"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_switch_is_on_unless_turned_off() {
        for (v, on) in [
            (None, true),
            (Some("1"), true),
            (Some(""), true),
            (Some("0"), false),
            (Some("off"), false),
            (Some(" false "), false),
            (Some("no"), false),
        ] {
            assert_eq!(super::kernels_switch(v), on, "{v:?}");
        }
    }
}

/// The server's allocator in the unit tests too, so that the timing tests see the same reuse of
/// activation buffers.
#[cfg(test)]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
