//! CLIP for atlas-serve: configuration, image and text towers over plain or composed weights,
//! tokenizer, OpenAI preprocessing, zero-shot heads and checkpoint loading.

pub mod error;
pub mod preprocess;
pub mod templates;
pub mod tokenizer;

pub use error::{ClipError, Result};
