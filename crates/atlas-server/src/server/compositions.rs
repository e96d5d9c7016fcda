//! Compositions: explicit coefficients (succeeded at once) or learning jobs (queued, then run by
//! the workers), listing, progress over Server-Sent Events, cancel, delete, and Λ heat maps.

use super::api::*;
use super::body::{parse, Body, FilePart};
use super::error::{ApiError, ApiResult};
use super::jobs::{learn_config, now};
use super::{heads, heatmap, images, AppState, Core};
use atlas_core::{Coefficients, Layout, Manifest, TaskVector};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::sync::Arc;

/// Largest epochs and batch size a request may ask for (bounded work per job).
const MAX_EPOCHS: usize = 1000;
const MAX_BATCH: usize = 1024;
/// Longest learning-rate warm-up a request may ask for, in steps.
const MAX_WARMUP: usize = 100_000;
/// Largest number of tasks in one multi-task merge.
const MAX_TASKS: usize = 64;

pub async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let core = s.ready()?;
    let learning = body.json.get("objective").is_some();
    let (status, c) = if learning {
        let key = idempotency_key(&headers)?;
        learn(&s, core, body, key).await?
    } else {
        let req: ExplicitRequest = parse(body.json, "explicit composition")?;
        (StatusCode::CREATED, explicit(&s, core, req)?)
    };
    let location = format!("/compositions/{}", c.id);
    Ok((status, [(header::LOCATION, location)], Json(c)).into_response())
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = v
        .to_str()
        .map_err(|_| ApiError::bad("Idempotency-Key must be visible ASCII"))?;
    if k.is_empty() || k.len() > 200 {
        return Err(ApiError::bad("Idempotency-Key must be 1 to 200 characters"));
    }
    Ok(Some(k.to_string()))
}

fn new_id() -> String {
    format!("c{:016x}", rand::random::<u64>())
}

fn select(core: &Core, names: &[String]) -> ApiResult<Vec<Arc<TaskVector>>> {
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(ApiError::bad(format!(
            "task vector {dup:?} is listed twice"
        )));
    }
    let lib = core.library();
    names
        .iter()
        .map(|n| {
            lib.get(n).cloned().ok_or_else(|| {
                ApiError::bad(format!(
                    "unknown task vector {n:?}; known: {}",
                    lib.names().join(", ")
                ))
            })
        })
        .collect()
}

fn provenance(core: &Core, tvs: &[Arc<TaskVector>]) -> Provenance {
    Provenance {
        backbone: core.backbone.id.clone(),
        backbone_digest: core.backbone.base_digest().to_string(),
        task_vector_digests: tvs.iter().map(|t| t.digest().to_string()).collect(),
        ..Provenance::default()
    }
}

/// Composition names are labels shown back to callers: bounded, no control characters.
fn check_name(name: &Option<String>) -> ApiResult<()> {
    match name {
        Some(n) if n.chars().count() > 200 || n.chars().any(char::is_control) => {
            Err(ApiError::bad(format!(
                "composition name {:?} must be at most 200 characters without control characters",
                n.chars().take(40).collect::<String>()
            )))
        }
        _ => Ok(()),
    }
}

fn explicit(s: &AppState, core: &Core, req: ExplicitRequest) -> ApiResult<Composition> {
    check_name(&req.name)?;
    if req.task_vectors.is_empty() {
        return Err(ApiError::bad("give at least one task vector"));
    }
    let tvs = select(core, &req.task_vectors)?;
    if req.coefficients.len() != tvs.len() {
        return Err(ApiError::bad(format!(
            "give one coefficients entry per task vector: {} task vectors, {} entries",
            tvs.len(),
            req.coefficients.len()
        )));
    }
    let coefs = explicit_coefficients(
        &req.coefficients,
        &req.task_vectors,
        core.backbone.manifest(),
        req.parts_seed,
        s.config.max_parts,
    )?;
    let t = now();
    let c = Composition {
        id: new_id(),
        name: req.name,
        kind: "explicit".into(),
        status: Status::Succeeded,
        task_vectors: req.task_vectors,
        layout: coefs.layout,
        coefficients: Some(coefs.values),
        progress: None,
        history: Vec::new(),
        summary: None,
        error: None,
        provenance: provenance(core, &tvs),
        request: None,
        created_at: t,
        updated_at: t,
    };
    s.store.insert(&c, None)?;
    Ok(c)
}

/// Row-major Λ from per-task-vector entries: scalars, per-block rows, per-part rows or maps by
/// block name. Scalars and maps widen to per block when any entry is per block.
pub fn explicit_coefficients(
    entries: &[TvCoefficients],
    names: &[String],
    manifest: &Manifest,
    seed: u64,
    max_parts: usize,
) -> ApiResult<Coefficients> {
    let n_blocks = manifest.len();
    let k = entries.iter().find_map(|e| match e {
        TvCoefficients::PerPart(rows) => Some(rows.first().map_or(0, Vec::len)),
        _ => None,
    });
    let any_block = entries
        .iter()
        .any(|e| matches!(e, TvCoefficients::PerBlock(_) | TvCoefficients::ByName(_)));
    let layout = match k {
        Some(k) if k == 0 || k > max_parts => {
            return Err(ApiError::bad(format!(
                "parts per block must be between 1 and {max_parts}, got {k}"
            )))
        }
        Some(k) => Layout::PerPart { k, seed },
        None if any_block => Layout::PerBlock,
        None => Layout::Isotropic,
    };
    let mut values = Vec::with_capacity(layout.len(entries.len(), n_blocks));
    for (e, name) in entries.iter().zip(names) {
        values.extend(entry_values(e, name, manifest, layout)?);
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(ApiError::bad(format!(
            "coefficient {i} is not a finite number"
        )));
    }
    if let Some(v) = values.iter().find(|v| v.abs() > 1e6) {
        return Err(ApiError::bad(format!(
            "coefficient {v} is out of range (|λ| ≤ 1e6)"
        )));
    }
    Coefficients::new(layout, entries.len(), n_blocks, values)
        .map_err(|e| ApiError::bad(e.to_string()))
}

fn entry_values(
    e: &TvCoefficients,
    tv: &str,
    manifest: &Manifest,
    layout: Layout,
) -> ApiResult<Vec<f64>> {
    let n_blocks = manifest.len();
    let per = layout.parts();
    let wrong = |what: &str| {
        ApiError::bad(format!(
            "task vector {tv:?}: {what}; the backbone has {n_blocks} blocks (GET /task-vectors/{{name}} lists them)"
        ))
    };
    let widen = |v: f64| match layout {
        Layout::Isotropic => vec![v],
        _ => vec![v; n_blocks * per],
    };
    match e {
        TvCoefficients::Scalar(v) => Ok(widen(*v)),
        TvCoefficients::PerBlock(row) if matches!(layout, Layout::PerPart { .. }) => {
            Err(wrong(&format!(
                "a per-block row beside per-part entries ({} values)",
                row.len()
            )))
        }
        TvCoefficients::PerBlock(row) if row.len() != n_blocks => {
            Err(wrong(&format!("{} values given", row.len())))
        }
        TvCoefficients::PerBlock(row) => Ok(row.clone()),
        TvCoefficients::PerPart(rows) => {
            if rows.len() != n_blocks || rows.iter().any(|r| r.len() != per) {
                return Err(wrong(&format!(
                    "per-part rows must be {n_blocks} rows of {per} values"
                )));
            }
            Ok(rows.concat())
        }
        TvCoefficients::ByName(map) => {
            let default = map.get("*").copied().unwrap_or(0.0);
            let mut row = vec![default; n_blocks];
            for (name, v) in map.iter().filter(|(n, _)| n.as_str() != "*") {
                let b = manifest
                    .block_index(name)
                    .ok_or_else(|| wrong(&format!("no block named {name:?}")))?;
                row[b] = *v;
            }
            Ok(row.into_iter().flat_map(|v| vec![v; per]).collect())
        }
    }
}

/// Validates a learning request, stores its examples and queues it (202). With an
/// Idempotency-Key seen before, answers with that earlier job instead.
async fn learn(
    s: &AppState,
    core: &Core,
    body: Body,
    key: Option<String>,
) -> ApiResult<(StatusCode, Composition)> {
    let mut req: LearnRequest = parse(body.json.clone(), "learning request")?;
    check_name(&req.name)?;
    let key = key.map(|k| (k, request_hash(&body)));
    if let Some((k, hash)) = &key {
        if let Some((earlier, earlier_hash)) = s.store.find_idempotent(k)? {
            return replay(k, hash, earlier, &earlier_hash);
        }
    }
    let names = req.task_vectors.clone().unwrap_or_else(|| {
        core.library()
            .names()
            .iter()
            .map(|n| n.to_string())
            .collect()
    });
    if names.is_empty() {
        return Err(ApiError::bad(
            "a learning job needs at least one task vector",
        ));
    }
    let tvs = select(core, &names)?;
    let layout = layout(&req.layout, s.config.max_parts)?;
    check_tasks(s, &req)?;
    check_overrides(&req.config)?;
    let queued = s
        .store
        .count_by_status()?
        .iter()
        .filter(|(k, _)| k == "queued")
        .map(|c| c.1)
        .sum::<i64>();
    if queued as usize >= s.config.job_queue {
        s.metrics.rejected.with_label_values(&["jobs_full"]).inc();
        return Err(ApiError::busy(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{queued} learning jobs are queued already; retry later"),
            30,
        ));
    }
    let config = learn_config(&req, layout).map_err(ApiError::bad)?;
    let id = new_id();
    let data_hash = store_examples(s, &id, &mut req, body.files).await?;
    let t = now();
    let c = Composition {
        id: id.clone(),
        name: req.name.clone(),
        kind: req.objective.to_string(),
        status: Status::Queued,
        task_vectors: names,
        layout,
        coefficients: None,
        progress: None,
        history: Vec::new(),
        summary: None,
        error: None,
        provenance: Provenance {
            data_hash: Some(data_hash),
            seed: Some(config.seed),
            config: Some(config),
            ..provenance(core, &tvs)
        },
        request: Some(req),
        created_at: t,
        updated_at: t,
    };
    let key_ref = key.as_ref().map(|(k, h)| (k.as_str(), h.as_str()));
    if let Some((earlier, earlier_hash)) = s.store.insert(&c, key_ref)? {
        // Lost a race with the same key: keep the first job.
        let _ = std::fs::remove_dir_all(s.store.job_dir(&id));
        let (k, hash) = key.as_ref().expect("a key was given");
        return replay(k, hash, earlier, &earlier_hash);
    }
    core.jobs.notify();
    Ok((StatusCode::ACCEPTED, c))
}

/// The same key again: the earlier job if the request is the same, else a conflict.
fn replay(
    key: &str,
    hash: &str,
    earlier: Composition,
    earlier_hash: &str,
) -> ApiResult<(StatusCode, Composition)> {
    if hash != earlier_hash {
        return Err(ApiError::conflict(format!(
            "Idempotency-Key {key:?} was used for a different request (composition {})",
            earlier.id
        )));
    }
    Ok((StatusCode::ACCEPTED, earlier))
}

/// Hash of a request: its JSON (keys sorted by serde_json's map) and its file parts.
fn request_hash(body: &Body) -> String {
    let mut h = Sha256::new();
    h.update(body.json.to_string().as_bytes());
    for f in &body.files {
        for part in [f.filename.as_bytes(), &f.bytes] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
    }
    hex::encode(h.finalize())
}

fn layout(spec: &LayoutSpec, max_parts: usize) -> ApiResult<Layout> {
    match spec {
        LayoutSpec::Named(n) if n == "isotropic" => Ok(Layout::Isotropic),
        LayoutSpec::Named(n) if n == "blockwise" || n == "per_block" => Ok(Layout::PerBlock),
        LayoutSpec::Named(n) => Err(ApiError::bad(format!(
            "unknown layout {n:?}: use \"isotropic\", \"blockwise\" or {{\"parts\": K}}"
        ))),
        LayoutSpec::Parts(p) if p.parts == 0 || p.parts > max_parts => Err(ApiError::bad(format!(
            "parts must be between 1 and {max_parts}, got {}",
            p.parts
        ))),
        LayoutSpec::Parts(p) => Ok(Layout::PerPart {
            k: p.parts,
            seed: p.seed,
        }),
    }
}

fn check_tasks(s: &AppState, req: &LearnRequest) -> ApiResult<()> {
    let n = req.tasks.len();
    req.objective
        .check_task_count(n)
        .map_err(|e| ApiError::bad(e.to_string()))?;
    if n > MAX_TASKS {
        return Err(ApiError::bad(format!(
            "objective {} takes at most {MAX_TASKS} tasks, got {n}",
            req.objective
        )));
    }
    let total: usize = req.tasks.iter().map(|t| t.examples.len()).sum();
    if total > s.config.max_examples {
        return Err(ApiError::bad(format!(
            "{total} examples in all; at most {} per job",
            s.config.max_examples
        )));
    }
    for (i, t) in req.tasks.iter().enumerate() {
        heads::check_classes(&t.classes, s.config.max_classes)
            .map_err(|e| ApiError::bad(format!("task {i}: {}", e.detail)))?;
        heads::resolve_templates(&t.templates)
            .map_err(|e| ApiError::bad(format!("task {i}: {}", e.detail)))?;
        if t.examples.is_empty() {
            return Err(ApiError::bad(format!("task {i} has no examples")));
        }
        for (j, e) in t.examples.iter().enumerate() {
            check_label(req.objective, i, j, e.label, t.classes.len())?;
        }
    }
    Ok(())
}

fn check_label(o: Objective, i: usize, j: usize, label: Option<u32>, n: usize) -> ApiResult<()> {
    match label {
        None if !o.is_unsupervised() => Err(ApiError::bad(format!(
            "task {i} example {j}: a label is required for objective {o}"
        ))),
        Some(l) if l as usize >= n => Err(ApiError::bad(format!(
            "task {i} example {j}: label {l} is out of range for {n} classes"
        ))),
        _ => Ok(()),
    }
}

fn check_overrides(o: &Overrides) -> ApiResult<()> {
    if o.epochs.is_some_and(|e| e > MAX_EPOCHS) {
        return Err(ApiError::bad(format!(
            "epochs must be at most {MAX_EPOCHS}"
        )));
    }
    if o.batch_size.is_some_and(|b| b > MAX_BATCH) {
        return Err(ApiError::bad(format!(
            "batch_size must be at most {MAX_BATCH}"
        )));
    }
    if o.warmup_steps.is_some_and(|w| w > MAX_WARMUP) {
        return Err(ApiError::bad(format!(
            "warmup_steps must be at most {MAX_WARMUP}"
        )));
    }
    if o.val_fraction.is_some_and(|v| !(0.0..1.0).contains(&v)) {
        return Err(ApiError::bad("val_fraction must be in [0, 1)"));
    }
    Ok(())
}

/// Writes every example image into the job's directory (checked and decoded first, so a corrupt
/// image is a 400 now rather than a failed job later), rewrites the request to name the files,
/// and returns the hash of the data (images and labels).
async fn store_examples(
    s: &AppState,
    id: &str,
    req: &mut LearnRequest,
    files: Vec<FilePart>,
) -> ApiResult<String> {
    let mut items = Vec::new();
    for (i, t) in req.tasks.iter_mut().enumerate() {
        for (j, e) in t.examples.iter_mut().enumerate() {
            let what = format!("task {i} example {j}");
            let bytes = match (&e.image, &e.file) {
                (Some(b), None) => images::b64(b, &what)?,
                (None, Some(f)) => files
                    .iter()
                    .find(|p| &p.filename == f)
                    .map(|p| p.bytes.clone())
                    .ok_or_else(|| ApiError::bad(format!("{what}: no multipart file named {f:?}")))?,
                _ => {
                    return Err(ApiError::bad(format!(
                        "{what}: give exactly one of \"image\" (base64) or \"file\" (a multipart filename)"
                    )))
                }
            };
            let name = format!("t{i}-e{j}");
            e.image = None;
            e.file = Some(name.clone());
            items.push((what, name, bytes, e.label));
        }
    }
    let dir = s.store.job_dir(id);
    let max_pixels = s.config.max_image_pixels;
    tokio::task::spawn_blocking(move || write_examples(&dir, items, max_pixels))
        .await
        .map_err(ApiError::internal)?
}

type Item = (String, String, Vec<u8>, Option<u32>);

fn write_examples(dir: &std::path::Path, items: Vec<Item>, max_pixels: u64) -> ApiResult<String> {
    use rayon::prelude::*;
    items.par_iter().try_for_each(|(what, _, bytes, _)| {
        images::check(bytes, max_pixels, what)?;
        atlas_clip::preprocess::decode(bytes)
            .map(|_| ())
            .map_err(|e| ApiError::bad(format!("{what}: {e}")))
    })?;
    let tmp = dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(ApiError::internal)?;
    let mut hash = Sha256::new();
    for (_, name, bytes, label) in &items {
        write_synced(&tmp.join(name), bytes)?;
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
        hash.update(label.map_or(-1i64, i64::from).to_le_bytes());
    }
    // The directory appears whole or not at all; the job row is inserted only after it.
    std::fs::rename(&tmp, dir).map_err(ApiError::internal)?;
    Ok(hex::encode(hash.finalize()))
}

fn write_synced(path: &std::path::Path, bytes: &[u8]) -> ApiResult<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(ApiError::internal)?;
    f.write_all(bytes).map_err(ApiError::internal)?;
    f.sync_all().map_err(ApiError::internal)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    #[serde(default)]
    offset: usize,
    limit: Option<usize>,
}

pub async fn list(
    State(s): State<AppState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<CompositionPage>> {
    let Query(q) = q.map_err(|e| ApiError::bad(e.body_text()))?;
    let status = match q.status.as_deref() {
        None => None,
        Some(v) => Some(Status::parse(v).ok_or_else(|| {
            ApiError::bad(format!(
                "unknown status {v:?}; use queued, running, succeeded, failed or cancelled"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(ApiError::bad("limit must be between 1 and 500"));
    }
    let items = s.store.list(status, q.offset, limit + 1)?;
    let more = items.len() > limit;
    Ok(Json(CompositionPage {
        items: items.into_iter().take(limit).collect(),
        next_offset: more.then_some(q.offset + limit),
    }))
}

fn find(s: &AppState, id: &str) -> ApiResult<Composition> {
    s.store
        .get(id)?
        .ok_or_else(|| ApiError::not_found(format!("no composition {id}")))
}

pub async fn get(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Composition>> {
    find(&s, &id).map(Json)
}

/// Cancels a queued or running job (202 with the composition); a finished one is a 409.
pub async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Composition>)> {
    let core = s.ready()?;
    let c = find(&s, &id)?;
    if c.status.is_final() {
        return Err(ApiError::conflict(format!(
            "composition {id} is {} already",
            c.status.as_str()
        )));
    }
    // Still queued: cancel in the store (a worker claiming it meanwhile sees the flag below).
    let updated = s.store.update(&id, |c| {
        if c.status == Status::Queued {
            c.status = Status::Cancelled;
            c.updated_at = now();
        }
    })?;
    core.jobs.cancel(&id);
    core.jobs.refresh_gauges();
    let c = updated.unwrap_or(c);
    if c.status == Status::Cancelled {
        core.jobs.publish(&id, c.status, None);
    }
    Ok((StatusCode::ACCEPTED, Json(c)))
}

/// Deletes a composition (cancelling its job if it runs) and its stored examples.
pub async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    find(&s, &id)?;
    if let Some(core) = s.core.get() {
        core.jobs.cancel(&id);
    }
    s.store.delete(&id)?;
    let dir = s.store.job_dir(&id);
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    if let Some(core) = s.core.get() {
        core.jobs.refresh_gauges();
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Server-Sent Events: the composition's current state, then each progress event, until the
/// job ends (the last event has its final status).
pub async fn events(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let core = s.ready()?;
    let rx = core.jobs.events.subscribe();
    let c = find(&s, &id)?;
    let first = super::jobs::JobEvent {
        id: id.clone(),
        status: c.status,
        progress: c.progress,
    };
    let done = first.status.is_final();
    let state = (Some(first), rx, done, id);
    let stream = stream::unfold(state, |(first, mut rx, done, id)| async move {
        if let Some(e) = first {
            let ev = sse(&e);
            return Some((Ok(ev), (None, rx, done, id)));
        }
        if done {
            return None;
        }
        loop {
            match rx.recv().await {
                Ok(e) if e.id == id => {
                    let end = e.status.is_final();
                    return Some((Ok(sse(&e)), (None, rx, end, id)));
                }
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

fn sse(e: &super::jobs::JobEvent) -> SseEvent {
    // "status" whenever the status is news (the first event, the end); "progress" in between.
    let name = if e.progress.is_some() && e.status == Status::Running {
        "progress"
    } else {
        "status"
    };
    SseEvent::default()
        .event(name)
        .json_data(e)
        .unwrap_or_else(|_| SseEvent::default().event(name))
}

fn heatmap_of(s: &AppState, id: &str) -> ApiResult<heatmap::Heatmap> {
    let core = s.ready()?;
    let c = find(s, id)?;
    let values = c.coefficients.ok_or_else(|| {
        ApiError::conflict(format!(
            "composition {id} has no coefficients yet (it is {})",
            c.status.as_str()
        ))
    })?;
    let blocks: Vec<String> = core
        .backbone
        .manifest()
        .blocks()
        .iter()
        .map(|b| b.name.clone())
        .collect();
    heatmap::Heatmap::new(c.task_vectors, blocks, c.layout, &values).map_err(ApiError::internal)
}

pub async fn heatmap_svg(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let svg = heatmap_of(&s, &id)?.svg();
    Ok(([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}

pub async fn heatmap_png(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<Response> {
    let png = heatmap_of(&s, &id)?.png().map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}
