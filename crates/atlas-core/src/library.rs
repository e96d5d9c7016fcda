//! The library: the task vectors resident next to one backbone, by name.

use crate::manifest::Manifest;
use crate::task_vector::TaskVector;
use crate::{CoreError, Result};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Library {
    manifest: Arc<Manifest>,
    base_digest: String,
    tvs: Vec<Arc<TaskVector>>,
}

impl Library {
    pub fn new(manifest: Arc<Manifest>, base_digest: impl Into<String>) -> Self {
        Library {
            manifest,
            base_digest: base_digest.into(),
            tvs: Vec::new(),
        }
    }

    /// Adds a task vector; it must be over this manifest, relative to this base (when the task
    /// vector records its base digest), and have a name not yet used.
    pub fn add(&mut self, tv: TaskVector) -> Result<Arc<TaskVector>> {
        tv.check_manifest(&self.manifest)?;
        let tv_base = &tv.meta.base_digest;
        if !tv_base.is_empty() && !self.base_digest.is_empty() && *tv_base != self.base_digest {
            return Err(CoreError::Invalid(format!(
                "task vector {} is relative to base {}, the backbone is {}",
                tv.name(),
                short(tv_base),
                short(&self.base_digest)
            )));
        }
        if self.get(tv.name()).is_some() {
            return Err(CoreError::Invalid(format!(
                "a task vector named {} is already loaded",
                tv.name()
            )));
        }
        let tv = Arc::new(tv);
        self.tvs.push(tv.clone());
        Ok(tv)
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<TaskVector>> {
        let i = self.tvs.iter().position(|t| t.name() == name)?;
        Some(self.tvs.remove(i))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<TaskVector>> {
        self.tvs.iter().find(|t| t.name() == name)
    }

    /// The task vector with these deltas, under whatever name.
    pub fn by_digest(&self, digest: &str) -> Option<&Arc<TaskVector>> {
        self.tvs.iter().find(|t| t.digest() == digest)
    }

    /// The named task vectors in the given order; unknown names are an error naming them.
    pub fn select(&self, names: &[impl AsRef<str>]) -> Result<Vec<Arc<TaskVector>>> {
        names
            .iter()
            .map(|n| {
                self.get(n.as_ref()).cloned().ok_or_else(|| {
                    CoreError::Invalid(format!("no task vector named {}", n.as_ref()))
                })
            })
            .collect()
    }

    pub fn all(&self) -> &[Arc<TaskVector>] {
        &self.tvs
    }
    pub fn names(&self) -> Vec<&str> {
        self.tvs.iter().map(|t| t.name()).collect()
    }
    pub fn len(&self) -> usize {
        self.tvs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tvs.is_empty()
    }
    pub fn manifest(&self) -> &Arc<Manifest> {
        &self.manifest
    }
    pub fn base_digest(&self) -> &str {
        &self.base_digest
    }
    /// Bytes of task-vector storage resident in memory.
    pub fn nbytes(&self) -> usize {
        self.tvs.iter().map(|t| t.nbytes()).sum()
    }
}

fn short(d: &str) -> &str {
    &d[..d.len().min(12)]
}
