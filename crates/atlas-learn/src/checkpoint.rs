//! The resumable state of a learning job, written atomically (temporary file, then rename) after
//! every epoch. Randomness is derived from (seed, epoch, item), so the state needs no RNG bytes:
//! a resumed run repeats exactly what the uninterrupted run would have done.

use crate::optim::AdamW;
use crate::{LearnError, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: usize,
    pub train_loss: f64,
    /// The validation metric (accuracy, mean normalised accuracy, target accuracy or entropy).
    pub val_metric: f64,
    /// Negation: whether the control guard held.
    pub eligible: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// What job this is: config, task vectors and data; a checkpoint of another job is refused.
    pub fingerprint: String,
    pub epochs_done: usize,
    pub step: usize,
    pub values: Vec<f64>,
    pub adam: AdamW,
    pub best_values: Vec<f64>,
    pub best_epoch: usize,
    pub best_score: f64,
    pub before: f64,
    pub control_zero_shot: Option<f64>,
    pub history: Vec<EpochSummary>,
}

pub const VERSION: u32 = 1;

/// Writes the state durably (temporary file, fsync, rename, fsync of the directory); the
/// checkpoint it replaces is kept as the previous one, which [`load`] falls back to.
pub fn save(path: &Path, state: &State) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| LearnError::Checkpoint {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let text = serde_json::to_string(state).map_err(|e| err(&e))?;
    if path.exists() {
        std::fs::rename(path, previous(path)).map_err(|e| err(&e))?;
    }
    atlas_core::safetensors_io::write_durably(path, text.as_bytes()).map_err(|e| err(&e))
}

/// Where the checkpoint before the last one is kept.
fn previous(path: &Path) -> std::path::PathBuf {
    path.with_extension("prev.json")
}

/// The saved state, or None when there is no checkpoint yet. A checkpoint that cannot be read
/// (cut short, emptied) gives way to the previous one, and with neither readable the job
/// starts again from epoch 0; a checkpoint of another job is an error.
pub fn load(path: &Path, fingerprint: &str) -> Result<Option<State>> {
    for p in [path.to_path_buf(), previous(path)] {
        if let Some(state) = read(&p)? {
            if state.fingerprint != fingerprint {
                return Err(LearnError::Checkpoint {
                    path: p.display().to_string(),
                    message: "belongs to another job (different config, task vectors or data)"
                        .into(),
                });
            }
            return Ok(Some(state));
        }
    }
    Ok(None)
}

/// A checkpoint file's state; None when it is missing or cannot be read as one.
fn read(path: &Path) -> Result<Option<State>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(LearnError::Checkpoint {
                path: path.display().to_string(),
                message: e.to_string(),
            })
        }
    };
    Ok(serde_json::from_str::<State>(&text)
        .ok()
        .filter(|s| s.version == VERSION))
}
