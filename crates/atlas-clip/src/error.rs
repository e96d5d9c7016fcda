//! One error type for the crate; every variant names what was wrong (file, tensor, input).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ClipError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("image: {0}")]
    Image(String),
    #[error("hub: {0}")]
    Hub(String),
    #[error(transparent)]
    Core(#[from] atlas_core::CoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ClipError>;

impl ClipError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        ClipError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }
    pub fn tensor(name: impl Into<String>, message: impl std::fmt::Display) -> Self {
        ClipError::Tensor {
            name: name.into(),
            message: message.to_string(),
        }
    }
}
