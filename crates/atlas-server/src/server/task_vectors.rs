//! The task-vector library over HTTP: list, inspect (block norms), add (from a fine-tuned
//! checkpoint, a file inside the library directory, or an uploaded safetensors delta; always
//! validated against the backbone) and delete (refused while a composition uses it).

use super::api::*;
use super::body::{parse, Body};
use super::error::{ApiError, ApiResult};
use super::store::{Store, StoreError, StoredTaskVector};
use super::{images, AppState, Model};
use atlas_clip::checkpoint::{self, Checkpoint};
use atlas_clip::Backbone;
use atlas_core::{Library, StorageDType, TaskVector};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub(super) static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn summary(t: &TaskVector) -> TaskVectorSummary {
    TaskVectorSummary {
        name: t.name().to_string(),
        dtype: format!("{:?}", t.dtype()).to_lowercase(),
        digest: t.digest().to_string(),
        bytes: t.nbytes(),
        source: t.meta.source.clone(),
    }
}

pub async fn list(State(s): State<AppState>) -> ApiResult<Json<TaskVectorList>> {
    let model = s.ready()?;
    let lib = model.library();
    Ok(Json(TaskVectorList {
        backbone: model.backbone.id.clone(),
        backbone_digest: model.backbone.base_digest().to_string(),
        blocks: model.backbone.manifest().len(),
        task_vectors: lib.all().iter().map(|t| summary(t)).collect(),
    }))
}

pub async fn get(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> ApiResult<Json<TaskVectorDetail>> {
    let model = s.ready()?;
    let tv = model
        .library()
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no task vector {name:?}")))?;
    let backbone = model.backbone.clone();
    let detail = tokio::task::spawn_blocking(move || detail(&backbone, &tv))
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(detail))
}

fn detail(backbone: &Backbone, tv: &TaskVector) -> TaskVectorDetail {
    let blocks = backbone
        .manifest()
        .blocks()
        .iter()
        .zip(tv.block_norms())
        .map(|(b, norm)| BlockInfo {
            name: b.name.clone(),
            numel: b.numel(),
            norm,
        })
        .collect();
    TaskVectorDetail {
        summary: summary(tv),
        blocks,
    }
}

/// Names become file names: a conservative alphabet, no leading dot, bounded length.
pub(crate) fn check_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "task-vector name {:?} must be 1 to 100 characters of A-Z a-z 0-9 - _ . and not start with a dot",
            name.chars().take(60).collect::<String>()
        )))
    }
}

pub async fn create(State(s): State<AppState>, body: Body) -> ApiResult<Response> {
    let model = s.ready()?;
    let mut req: TaskVectorRequest = parse(body.json.clone(), "task-vector request")?;
    check_name(&req.name)?;
    if let Some(ft) = req.finetune.take() {
        if req.checkpoint.is_some() || req.file.is_some() || req.safetensors.is_some() {
            return Err(ApiError::bad(
                "give exactly one source: \"checkpoint\", \"file\", \"safetensors\" (or one multipart file) or \"finetune\"",
            ));
        }
        // The multipart file parts are the examples' images.
        return super::finetune::create(&s, model, req.name, ft, body.files).await;
    }
    // One creation at a time: two racing under one name would otherwise share the temporary
    // file and the final file, and the store could keep the loser's bytes.
    let _one_at_a_time = CREATING.lock().await;
    if model.library().get(&req.name).is_some() {
        return Err(ApiError::conflict(format!(
            "a task vector named {:?} exists already",
            req.name
        )));
    }
    let upload = match (&req.safetensors, body.files.as_slice()) {
        (Some(b), []) => Some(images::b64(b, "safetensors")?),
        (None, [f]) => Some(f.bytes.clone()),
        (None, []) => None,
        _ => {
            return Err(ApiError::bad(
                "give the safetensors once: base64 in \"safetensors\" or one multipart file",
            ))
        }
    };
    let sources = [
        req.checkpoint.is_some(),
        req.file.is_some(),
        upload.is_some(),
    ];
    if sources.iter().filter(|&&x| x).count() != 1 {
        return Err(ApiError::bad(
            "give exactly one source: \"checkpoint\", \"file\", \"safetensors\" (or one multipart file) or \"finetune\"",
        ));
    }
    let (backbone, dtype, store, tv_dir) = (
        model.backbone.clone(),
        model.storage_dtype,
        s.store.clone(),
        s.config.tv_dir.clone(),
    );
    let name = req.name.clone();
    let made = tokio::task::spawn_blocking(move || -> ApiResult<(TaskVector, String)> {
        match (req.checkpoint, req.file, upload) {
            (Some(ckpt), _, _) => from_checkpoint(&backbone, &ckpt, &tv_dir, &name, dtype)
                .map(|tv| (tv, format!("checkpoint {ckpt}"))),
            (_, Some(file), _) => {
                let path = inside_library(&tv_dir, "file", &file)?;
                load(&backbone, &path, &name, dtype).map(|tv| (tv, format!("file {file}")))
            }
            (_, _, Some(bytes)) => {
                from_upload(&backbone, &store, &bytes, &name, dtype).map(|tv| (tv, "upload".into()))
            }
            _ => unreachable!("one source checked above"),
        }
    });
    let roots = [
        std::fs::canonicalize(&s.config.tv_dir).ok(),
        Some(s.store.tv_dir()),
    ];
    let made = made.await.map_err(ApiError::internal)?;
    let (mut tv, source) = made.map_err(|e| without_paths(e, &roots))?;
    check_unique(model, &tv)?;
    tv.meta.source = source;
    let (store, backbone) = (s.store.clone(), model.backbone.clone());
    let kept = tokio::task::spawn_blocking(move || keep(&store, &backbone, &tv).map(|_| tv));
    let tv = kept.await.map_err(ApiError::internal)??;
    add(&s, model, tv).map(IntoResponse::into_response)
}

/// Adds a task vector the server made (a merge's result) as an upload is added: kept in the
/// data directory, then in the library. One with the same deltas already there is returned
/// instead, so a repeated merge reuses its result.
pub(crate) async fn add_derived(
    s: &AppState,
    model: &Model,
    tv: TaskVector,
) -> ApiResult<Arc<TaskVector>> {
    let name = tv.name().to_string();
    check_name(&name)?;
    let _one_at_a_time = CREATING.lock().await;
    {
        let lib = model.library();
        if let Some(same) = lib.by_digest(tv.digest()) {
            return Ok(same.clone());
        }
        if lib.get(&name).is_some() {
            return Err(ApiError::conflict(format!(
                "a task vector named {name:?} exists already"
            )));
        }
    }
    let (store, backbone) = (s.store.clone(), model.backbone.clone());
    let kept = tokio::task::spawn_blocking(move || keep(&store, &backbone, &tv).map(|_| tv));
    let _summary = add(s, model, kept.await.map_err(ApiError::internal)??)?;
    let lib = model.library();
    lib.get(&name)
        .cloned()
        .ok_or_else(|| ApiError::conflict(format!("task vector {name:?} was deleted meanwhile")))
}

/// The error with the server's own directories cut from its detail: a client learns which
/// of its files was wrong, not where this server keeps them.
fn without_paths(mut e: ApiError, roots: &[Option<PathBuf>]) -> ApiError {
    for root in roots.iter().flatten() {
        let root = root.display().to_string();
        e.detail = e
            .detail
            .replace(&format!("{root}/"), "")
            .replace(&root, ".");
    }
    e
}

/// One stored copy per digest: the same deltas under a second name are refused, naming the
/// first (the same checkpoint under 1,000 names once stored, and held, 1,000 copies).
fn check_unique(model: &Model, tv: &TaskVector) -> ApiResult<()> {
    match model.library().by_digest(tv.digest()) {
        Some(other) => Err(ApiError::conflict(format!(
            "task vector {:?} has the same deltas (digest {}); use it instead",
            other.name(),
            tv.digest()
        ))),
        None => Ok(()),
    }
}

fn add(
    s: &AppState,
    model: &Model,
    tv: TaskVector,
) -> ApiResult<(StatusCode, Json<TaskVectorSummary>)> {
    let out = summary(&tv);
    let mut lib = model.library_mut();
    // Stored already, the library's follower may have loaded it first.
    if lib.get(tv.name()).is_none_or(|t| t.digest() != tv.digest()) {
        lib.add(tv).map_err(|e| ApiError::conflict(e.to_string()))?;
    }
    s.metrics
        .memory
        .with_label_values(&["library"])
        .set(lib.nbytes() as i64);
    Ok((StatusCode::CREATED, Json(out)))
}

fn load(
    backbone: &Backbone,
    path: &std::path::Path,
    name: &str,
    dtype: StorageDType,
) -> ApiResult<TaskVector> {
    backbone
        .load_task_vector(path, Some(name), dtype)
        .map_err(|e| ApiError::bad(format!("task vector {name:?}: {e}")))
}

/// A path for `rel` (the request's `field`) that stays inside the library directory (no `..`,
/// no absolute paths, no links out of it).
fn inside_library(tv_dir: &str, field: &str, rel: &str) -> ApiResult<PathBuf> {
    if tv_dir.is_empty() {
        return Err(ApiError::bad(format!(
            "no library directory is configured (tv_dir), so \"{field}\" {rel:?} cannot name a local {}",
            if field == "file" { "file" } else { "directory" }
        )));
    }
    let root = std::fs::canonicalize(tv_dir).map_err(ApiError::internal)?;
    let path = std::path::Path::new(rel);
    if !is_plain(path) || rel.contains('\0') {
        return Err(ApiError::bad(format!(
            "{field} {rel:?} must be a relative path inside the library directory (no \"..\", not absolute)"
        )));
    }
    let path = std::fs::canonicalize(root.join(path)).map_err(|_| {
        ApiError::not_found(format!(
            "{field} {rel:?}: nothing of that name in the library directory"
        ))
    })?;
    if !path.starts_with(&root) {
        return Err(ApiError::bad(format!(
            "{field} {rel:?} resolves outside the library directory"
        )));
    }
    Ok(path)
}

/// Only names below the current directory: `a/b` or `./a/b`, never `..`, `/` or a prefix.
fn is_plain(path: &std::path::Path) -> bool {
    use std::path::Component;
    let mut names = 0;
    for c in path.components() {
        match c {
            Component::Normal(_) => names += 1,
            Component::CurDir => {}
            _ => return false,
        }
    }
    names > 0
}

/// Where a `checkpoint` is read from: the forms documented for POST /task-vectors.
enum CheckpointSource {
    /// A directory inside the library directory (`./dir`, or `dir` / `sub/dir` when it exists).
    Local(PathBuf),
    /// A hub id, `org/name` or `org/name@revision`.
    Hub(String),
}

/// `./dir` is always local; any other relative path is local when it names something inside
/// the library directory (so `sub/dir` is not taken for a hub id), else a hub id if it reads
/// as one; anything else is refused, naming the forms.
fn checkpoint_source(tv_dir: &str, ckpt: &str) -> ApiResult<CheckpointSource> {
    if ckpt.starts_with("./") || ckpt == "." {
        return inside_library(tv_dir, "checkpoint", ckpt).map(CheckpointSource::Local);
    }
    if !tv_dir.is_empty() && is_plain(std::path::Path::new(ckpt)) {
        let in_library = std::fs::canonicalize(tv_dir).map(|root| root.join(ckpt).exists());
        if in_library.unwrap_or(false) {
            return inside_library(tv_dir, "checkpoint", ckpt).map(CheckpointSource::Local);
        }
    }
    if is_hub_id(ckpt) {
        return Ok(CheckpointSource::Hub(ckpt.to_string()));
    }
    if !is_plain(std::path::Path::new(ckpt)) || tv_dir.is_empty() {
        // The path error (`..`, absolute, no library directory), naming the field.
        return inside_library(tv_dir, "checkpoint", ckpt).map(CheckpointSource::Local);
    }
    Err(ApiError::not_found(format!(
        "checkpoint {ckpt:?} names nothing in the library directory and is not a hub id (\"org/name\" or \"org/name@revision\")"
    )))
}

fn from_checkpoint(
    backbone: &Backbone,
    ckpt: &str,
    tv_dir: &str,
    name: &str,
    dtype: StorageDType,
) -> ApiResult<TaskVector> {
    let bad = |e: atlas_clip::ClipError| ApiError::bad(format!("checkpoint {ckpt:?}: {e}"));
    // Read through the form decided here: the checkpoint loader's own guess (a path if one
    // exists relative to the server's working directory) must not pick the source.
    let files = match checkpoint_source(tv_dir, ckpt)? {
        CheckpointSource::Local(dir) if !dir.is_dir() => {
            return Err(ApiError::bad(format!(
                "checkpoint {ckpt:?} is a file; it must be a checkpoint directory (config.json, model.safetensors)"
            )))
        }
        CheckpointSource::Local(dir) => checkpoint::from_dir(&dir).map_err(bad)?,
        CheckpointSource::Hub(id) => checkpoint::from_hub(&id).map_err(bad)?,
    };
    let ft = Checkpoint::read(files).map_err(bad)?;
    backbone
        .task_vector_from_checkpoint(ft, name, dtype)
        .map_err(bad)
}

/// `org/name` or `org/name@revision` in the hub's alphabet: no `..`, no leading dots, no
/// other separators, so it can name nothing on the local disk by itself.
fn is_hub_id(s: &str) -> bool {
    let (id, revision) = s.split_once('@').unwrap_or((s, "main"));
    let plain = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    matches!(id.split_once('/'), Some((org, name)) if plain(org) && plain(name)) && plain(revision)
}

/// Validates an uploaded delta (read from a temporary file of the data directory, removed
/// after).
fn from_upload(
    backbone: &Backbone,
    store: &Store,
    bytes: &[u8],
    name: &str,
    dtype: StorageDType,
) -> ApiResult<TaskVector> {
    let tmp = store.tv_dir().join(format!(".{name}.upload"));
    if let Err(e) = write_synced(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(ApiError::io(e));
    }
    let tv = load(backbone, &tmp, name, dtype);
    let _ = std::fs::remove_file(&tmp);
    tv
}

fn write_synced(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Keeps a task vector in the data directory (written durably), recorded with its source, so
/// that after a restart it is in the library exactly as it was added, whatever its source
/// (an upload, a checkpoint that may change or go away, a library file that may be edited).
pub(super) fn keep(store: &Store, backbone: &Backbone, tv: &TaskVector) -> ApiResult<()> {
    // The digest in the name: a replica reading the blob directory never sees one name's file
    // replaced under it.
    let digest = tv.digest().trim_start_matches("sha256:");
    let file = format!(
        "{}.{}.safetensors",
        tv.name(),
        &digest[..digest.len().min(16)]
    );
    tv.save(&store.tv_dir().join(&file), backbone.manifest())
        .map_err(ApiError::internal)?;
    store.put_task_vector(&StoredTaskVector {
        name: tv.name().to_string(),
        file,
        source: tv.meta.source.clone(),
        digest: tv.digest().to_string(),
    })?;
    Ok(())
}

pub async fn delete(State(s): State<AppState>, Path(name): Path<String>) -> ApiResult<StatusCode> {
    let model = s.ready()?;
    // Held from the check of its users to the removal: a composition being created checks
    // its task vectors and inserts itself under the same lock.
    let mut lib = model.library_mut();
    if lib.get(&name).is_none() {
        return Err(ApiError::not_found(format!("no task vector {name:?}")));
    }
    let users = s.store.users_of(&name)?;
    if !users.is_empty() {
        return Err(ApiError::conflict(format!(
            "task vector {name:?} is used by composition(s) {}; delete them first",
            users.join(", ")
        )));
    }
    let removed: Option<Arc<TaskVector>> = lib.remove(&name);
    drop(lib);
    if removed.is_some() {
        if let Some(file) = s.store.delete_task_vector(&name)? {
            let _ = std::fs::remove_file(s.store.tv_dir().join(file));
        }
    }
    s.metrics
        .memory
        .with_label_values(&["library"])
        .set(model.library().nbytes() as i64);
    Ok(StatusCode::NO_CONTENT)
}

/// Keeps the library in step with the task vectors stored by the server (uploads, conversions,
/// merges, fine-tuning), on this replica and on the others: at start, and whenever the store's
/// library counter moves.
#[derive(Default)]
pub struct LibrarySync {
    /// Stored task vectors in this replica's library, with their digests.
    loaded: HashMap<String, String>,
    /// The library's own files, loaded at start from tv_dir and tvs (not stored).
    files: Option<HashSet<String>>,
    generation: Option<i64>,
}

impl LibrarySync {
    /// Brings the library up to the store's stored task vectors, if they changed since the
    /// last run: new ones are read from the blob directory and added, deleted ones removed.
    pub fn run(
        &mut self,
        store: &Store,
        backbone: &Backbone,
        library: &RwLock<Library>,
        dtype: StorageDType,
    ) -> anyhow::Result<()> {
        let any = |e: StoreError| anyhow::anyhow!("{e}");
        if self.generation.is_some()
            && self.generation == Some(store.library_generation().map_err(any)?)
        {
            return Ok(());
        }
        if self.generation.is_none() {
            remove_unfinished(store)?;
        }
        let (stored, generation) = store.task_vectors().map_err(any)?;
        let is_stored = |n: &str| stored.iter().any(|t| t.name == n);
        let library_names: Vec<String> = library
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        // The library's files (tv_dir, tvs) are this replica's own; everything else in it was
        // stored (recorded before it joined a library), and goes when its record goes.
        let files = self.files.get_or_insert_with(|| {
            library_names
                .iter()
                .filter(|n| !is_stored(n))
                .cloned()
                .collect()
        });
        for name in library_names
            .iter()
            .filter(|n| !is_stored(n) && !files.contains(*n))
        {
            self.loaded.remove(name);
            library
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
        }
        for rec in &stored {
            if self.loaded.get(&rec.name) == Some(&rec.digest) && !rec.digest.is_empty() {
                continue;
            }
            if let Some(tv) = self.load(store, backbone, library, dtype, rec)? {
                self.loaded.insert(rec.name.clone(), tv);
            }
        }
        self.generation = Some(generation);
        Ok(())
    }

    /// Reads one stored task vector into the library (unless it is there with its digest);
    /// returns its digest, or None when it could not be read (quarantined).
    fn load(
        &self,
        store: &Store,
        backbone: &Backbone,
        library: &RwLock<Library>,
        dtype: StorageDType,
        rec: &StoredTaskVector,
    ) -> anyhow::Result<Option<String>> {
        let there = library
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rec.name)
            .map(|t| t.digest().to_string());
        if there.as_deref() == Some(rec.digest.as_str()) {
            return Ok(Some(rec.digest.clone()));
        }
        let path = store.tv_dir().join(&rec.file);
        let mut tv = match backbone.load_task_vector(&path, Some(&rec.name), dtype) {
            Ok(tv) => tv,
            Err(e) => {
                quarantine(store, &rec.name, &rec.file, &e.to_string())?;
                return Ok(None);
            }
        };
        tv.meta.source = rec.source.clone();
        let digest = tv.digest().to_string();
        let mut lib = library.write().unwrap_or_else(|p| p.into_inner());
        match lib.get(&rec.name).map(|t| t.digest() == tv.digest()) {
            Some(true) => return Ok(Some(digest)),
            Some(false) => {
                // Added over HTTP from a file of the library directory, it may stand there
                // too; what was acknowledged is the stored copy.
                eprintln!(
                    "atlas-serve: task vector {:?} differs from the library's copy of that \
                     name; the stored copy is served",
                    rec.name
                );
                lib.remove(&rec.name);
            }
            None => {}
        }
        lib.add(tv)?;
        Ok(Some(digest))
    }
}

/// Uploads and saves cut off by a crash are temporary files never recorded in the store. The
/// blob directory may be shared with replicas writing now: see
/// [`crate::server::store::is_abandoned`].
fn remove_unfinished(store: &Store) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(store.tv_dir())?.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        let temporary = (n.starts_with('.') && n.ends_with(".upload")) || n.ends_with(".tmp");
        if temporary && crate::server::store::is_abandoned(&entry.path(), store.dialect()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(())
}

/// A stored task vector that cannot be read (cut short by a power loss, say) is moved to
/// `task-vectors/quarantine/` and dropped from the store, with a line in the log; the server
/// serves the rest, and compositions that use it answer 409 naming it.
fn quarantine(store: &Store, name: &str, file: &str, why: &str) -> anyhow::Result<()> {
    let dir = store.tv_dir().join("quarantine");
    std::fs::create_dir_all(&dir)?;
    std::fs::rename(store.tv_dir().join(file), dir.join(file))?;
    store
        .delete_task_vector(name)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "atlas-serve: task vector {name:?} ({file}) cannot be read ({why}): moved to \
         task-vectors/quarantine/ and not served"
    );
    Ok(())
}
