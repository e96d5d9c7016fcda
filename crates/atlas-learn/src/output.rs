//! The learned-coefficients file: Λ with its layout, the task vectors it applies to (names and
//! digests, so a mismatched library is refused) and a summary of how it was learned.

use crate::{LearnError, Result};
use atlas_core::{Coefficients, Manifest, TaskVector};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

pub const FORMAT: &str = "atlas-coefficients/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskVectorRef {
    pub name: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoefficientsFile {
    pub format: String,
    pub base_model: String,
    pub base_digest: String,
    pub manifest_digest: String,
    pub task_vectors: Vec<TaskVectorRef>,
    pub blocks: Vec<String>,
    pub coefficients: Coefficients,
    #[serde(default)]
    pub summary: serde_json::Value,
}

impl CoefficientsFile {
    pub fn new(
        manifest: &Manifest,
        base_model: &str,
        base_digest: &str,
        tvs: &[Arc<TaskVector>],
        coefficients: Coefficients,
        summary: serde_json::Value,
    ) -> Self {
        CoefficientsFile {
            format: FORMAT.into(),
            base_model: base_model.into(),
            base_digest: base_digest.into(),
            manifest_digest: manifest.digest().into(),
            task_vectors: tvs
                .iter()
                .map(|t| TaskVectorRef {
                    name: t.name().into(),
                    digest: t.digest().into(),
                })
                .collect(),
            blocks: manifest.blocks().iter().map(|b| b.name.clone()).collect(),
            coefficients,
            summary,
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| LearnError::Data(e.to_string()))?;
        let tmp = path.with_extension("json.tmp");
        let io = |e: std::io::Error| LearnError::Data(format!("{}: {e}", path.display()));
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LearnError::Data(format!("{}: {e}", path.display())))?;
        let file: CoefficientsFile = serde_json::from_str(&text)
            .map_err(|e| LearnError::Data(format!("{}: {e}", path.display())))?;
        if file.format != FORMAT {
            return Err(LearnError::Data(format!(
                "{}: format {:?} is not {FORMAT}",
                path.display(),
                file.format
            )));
        }
        // Re-validate (finite values, sizes) rather than trusting the file.
        let c = &file.coefficients;
        Coefficients::new(c.layout, c.n_tv, c.n_blocks, c.values.clone())?;
        Ok(file)
    }

    /// The task vectors of `library` this file refers to, in its order; refuses a digest mismatch.
    pub fn resolve(&self, library: &atlas_core::Library) -> Result<Vec<Arc<TaskVector>>> {
        if self.manifest_digest != library.manifest().digest() {
            return Err(LearnError::Data(
                "the coefficients were learned over another block manifest".into(),
            ));
        }
        self.task_vectors
            .iter()
            .map(|r| {
                let tv = library
                    .get(&r.name)
                    .ok_or_else(|| LearnError::Data(format!("no task vector named {}", r.name)))?;
                if tv.digest() != r.digest {
                    return Err(LearnError::Data(format!(
                        "task vector {} differs from the one the coefficients were learned with",
                        r.name
                    )));
                }
                Ok(tv.clone())
            })
            .collect()
    }
}
