//! Errors of the core crate; each names the block, tensor, file or value at fault.

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("coefficients: {0}")]
    Coefficients(String),
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, CoreError>;

impl CoreError {
    pub fn tensor(name: impl Into<String>, message: impl std::fmt::Display) -> Self {
        CoreError::Tensor {
            name: name.into(),
            message: message.to_string(),
        }
    }
    pub fn file(path: impl AsRef<std::path::Path>, message: impl std::fmt::Display) -> Self {
        CoreError::File {
            path: path.as_ref().display().to_string(),
            message: message.to_string(),
        }
    }
}
