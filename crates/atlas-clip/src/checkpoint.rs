//! Finding and reading Hugging Face CLIP checkpoints: a local directory, or a model id resolved
//! through the Hugging Face cache (hf-hub), honouring `HF_HOME`, `HF_HUB_CACHE` and
//! `HF_HUB_OFFLINE`.

use crate::config::ClipConfig;
use crate::{ClipError, Result};
use atlas_core::safetensors_io::{self, RawTensor};
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const TOKENIZER: &str = "tokenizer.json";

/// A checkpoint's files on disk.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    /// What the user named (a directory or a hub id), for provenance.
    pub id: String,
    pub config: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: Option<PathBuf>,
}

/// A directory if `model` is one; otherwise a hub id (`org/name` or `org/name@revision`).
pub fn resolve(model: &str) -> Result<CheckpointFiles> {
    let dir = Path::new(model);
    if dir.is_dir() {
        return from_dir(dir);
    }
    if dir.exists() {
        // An existing file is never a hub id, even when it reads like `org/name`.
        return Err(ClipError::file(
            dir,
            "is a file; expected a checkpoint directory (config.json, model.safetensors) or a hub model id (org/name)",
        ));
    }
    if !looks_like_hub_id(model) {
        return Err(ClipError::file(
            dir,
            "is neither a directory nor a hub model id (org/name)",
        ));
    }
    from_hub(model)
}

pub fn from_dir(dir: &Path) -> Result<CheckpointFiles> {
    let need = |f: &str| {
        let p = dir.join(f);
        if p.is_file() {
            Ok(p)
        } else {
            Err(ClipError::file(
                &p,
                "missing (a CLIP checkpoint needs config.json and model.safetensors)",
            ))
        }
    };
    let tokenizer = Some(dir.join(TOKENIZER)).filter(|p| p.is_file());
    Ok(CheckpointFiles {
        id: dir.display().to_string(),
        config: need(CONFIG)?,
        weights: need(WEIGHTS)?,
        tokenizer,
    })
}

fn looks_like_hub_id(s: &str) -> bool {
    let name = s.split('@').next().unwrap_or("");
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

/// The hub cache folder: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => hf_hub::Cache::new(PathBuf::from(p)),
        None => hf_hub::Cache::from_env(),
    }
}

pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        let v = v.trim();
        ["1", "true", "yes", "on"]
            .iter()
            .any(|t| v.eq_ignore_ascii_case(t))
    })
}

/// A hub id (`org/name` or `org/name@revision`) from the cache, or fetched unless offline.
pub fn from_hub(model: &str) -> Result<CheckpointFiles> {
    let (id, revision) = match model.split_once('@') {
        Some((id, rev)) => (id, rev),
        None => (model, "main"),
    };
    let repo = hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let cache = hub_cache();
    let fetch = |file: &str| -> Result<PathBuf> {
        if let Some(p) = cached_file(&cache, &repo, revision, file) {
            return Ok(p);
        }
        if offline() {
            return Err(ClipError::Hub(format!(
                "{model}: {file} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set",
                cache.path().display()
            )));
        }
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_progress(true)
            .build()
            .map_err(|e| ClipError::Hub(format!("{model}: {e}")))?;
        api.repo(repo.clone())
            .get(file)
            .map_err(|e| ClipError::Hub(format!("{model}: cannot fetch {file}: {e}")))
    };
    Ok(CheckpointFiles {
        id: model.to_string(),
        config: fetch(CONFIG)?,
        weights: fetch(WEIGHTS)?,
        tokenizer: fetch(TOKENIZER).ok(),
    })
}

/// A file of the cache's snapshot for `revision`. hf-hub only follows `refs/<revision>`, which
/// exists for branches and tags; a commit hash names its snapshot folder directly.
fn cached_file(
    cache: &hf_hub::Cache,
    repo: &hf_hub::Repo,
    revision: &str,
    file: &str,
) -> Option<PathBuf> {
    let cached = cache.repo(repo.clone());
    if let Some(p) = cached.get(file) {
        return Some(p);
    }
    let is_commit = revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_commit {
        return None;
    }
    Some(cached.pointer_path(revision).join(file)).filter(|p| p.exists())
}

/// A checkpoint read into memory: its config and its tensors (f32), names normalised to
/// `vision_model.*` / `text_model.*` where a vision-only save left the prefix out.
pub struct Checkpoint {
    pub files: CheckpointFiles,
    pub config: ClipConfig,
    pub tensors: Vec<RawTensor>,
}

impl Checkpoint {
    pub fn read(files: CheckpointFiles) -> Result<Self> {
        let config = ClipConfig::from_file(&files.config)?;
        let (mut tensors, _) = safetensors_io::read_file(&files.weights)?;
        if config.text.is_none() {
            for t in &mut tensors {
                if !t.name.starts_with("vision_model.") && !t.name.starts_with("visual_projection.")
                {
                    t.name = format!("vision_model.{}", t.name);
                }
            }
        }
        Ok(Checkpoint {
            files,
            config,
            tensors,
        })
    }

    pub fn open(model: &str) -> Result<Self> {
        Self::read(resolve(model)?)
    }
}

/// Writes a transformers `CLIPVisionModel` checkpoint into `dir`: `config.json` (the vision
/// config, `model_type` clip_vision_model) and `model.safetensors` with `tensors` (`vision_model.*`
/// names, f32), as `CLIPVisionModel.from_pretrained(dir)` loads it.
pub fn write_vision_model(
    dir: &Path,
    config: &crate::VisionConfig,
    tensors: &[RawTensor],
) -> Result<()> {
    let io = |e: std::io::Error| ClipError::file(dir, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut doc = serde_json::to_value(config).map_err(|e| ClipError::Config(e.to_string()))?;
    doc["model_type"] = "clip_vision_model".into();
    doc["architectures"] = serde_json::json!(["CLIPVisionModel"]);
    doc["torch_dtype"] = "float32".into();
    let text = serde_json::to_string_pretty(&doc).map_err(|e| ClipError::Config(e.to_string()))?;
    safetensors_io::write_durably(&dir.join("config.json"), text.as_bytes()).map_err(io)?;
    let out: Vec<safetensors_io::OutTensor> = tensors
        .iter()
        .map(|t| safetensors_io::OutTensor {
            name: t.name.clone(),
            dtype: safetensors::Dtype::F32,
            shape: t.shape.clone(),
            bytes: t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    // transformers reads "format": "pt" to know the layout is PyTorch's.
    let metadata = [("format".to_string(), "pt".to_string())].into();
    safetensors_io::write_file(&dir.join("model.safetensors"), &out, metadata)?;
    Ok(())
}
