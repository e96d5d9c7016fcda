//! Errors of the learning engine.

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("data: {0}")]
    Data(String),
    #[error("job: {0}")]
    Job(String),
    #[error("learning was cancelled")]
    Cancelled,
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
    #[error(transparent)]
    Clip(#[from] atlas_clip::ClipError),
    #[error(transparent)]
    Core(#[from] atlas_core::CoreError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LearnError>;
