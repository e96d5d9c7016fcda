//! One error type for the demo world; messages name the file, task or value at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("data: {0}")]
    Data(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the build was cancelled")]
    Cancelled,
    #[error(transparent)]
    Clip(#[from] atlas_clip::ClipError),
    #[error(transparent)]
    Core(#[from] atlas_core::CoreError),
    #[error(transparent)]
    Finetune(#[from] atlas_learn::finetune::FinetuneError),
    #[error(transparent)]
    Learn(#[from] atlas_learn::LearnError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DemoError>;

impl DemoError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        DemoError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
}
