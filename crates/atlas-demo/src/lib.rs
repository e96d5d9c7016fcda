//! atlas-demo: a small offline world in which everything is real. Generated 32x32 scenes
//! (coloured shapes, counts, positions, textured backgrounds) plus the UCI handwritten digits
//! make six classification tasks; a tiny CLIP is pre-trained here on captions of those scenes,
//! fine-tuned per task into task vectors, and cached on disk as a Hugging Face checkpoint.

pub mod digits;
pub mod error;
pub mod pretrain;
pub mod replicate;
pub mod scene;
pub mod tasks;
pub mod vocab;
pub mod world;

pub use error::{DemoError, Result};
pub use world::{Preset, World, WorldParams};
