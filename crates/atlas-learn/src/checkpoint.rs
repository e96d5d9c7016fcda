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

pub fn save(path: &Path, state: &State) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| LearnError::Checkpoint {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let text = serde_json::to_string(state).map_err(|e| err(&e))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| err(&e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(&e))
}

/// The saved state, or None when there is no checkpoint yet.
pub fn load(path: &Path, fingerprint: &str) -> Result<Option<State>> {
    let err = |m: String| LearnError::Checkpoint {
        path: path.display().to_string(),
        message: m,
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    let state: State = serde_json::from_str(&text).map_err(|e| err(format!("unreadable: {e}")))?;
    if state.version != VERSION {
        return Err(err(format!("version {} is not {VERSION}", state.version)));
    }
    if state.fingerprint != fingerprint {
        return Err(err(
            "belongs to another job (different config, task vectors or data)".into(),
        ));
    }
    Ok(Some(state))
}
