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
pub use model::{TextTower, VisionTower, WeightSource};
