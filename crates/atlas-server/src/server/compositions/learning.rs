//! Learning requests: checked against the server's bounds, their examples stored, then queued as
//! a job (202); an Idempotency-Key seen before answers with the earlier job.

use super::examples::{request_hash, store_examples};
use super::{check_name, insert_bound, new_id, provenance, select};
use crate::server::api::*;
use crate::server::body::{parse, Body};
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::now;
use crate::server::store::Inserted;
use crate::server::{heads, AppState, Model};
use atlas_core::Layout;
use atlas_learn::LearnConfig;
use axum::http::{HeaderMap, StatusCode};

/// Largest number of tasks in one multi-task merge.
pub(crate) const MAX_TASKS: usize = 64;

pub(super) fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
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

/// Validates a learning request, stores its examples and queues it (202). With an
/// Idempotency-Key seen before, answers with that earlier job instead.
pub(super) async fn learn(
    s: &AppState,
    model: &Model,
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
        model
            .library()
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
    let tvs = select(model, &names)?;
    check_budget(&req.budget, tvs.len())?;
    let layout = layout(&req.layout, s.config.max_parts)?;
    check_tasks(s, &req)?;
    check_overrides(&req.config)?;
    check_queue(s)?;
    let config = learn_config(&req, layout).map_err(|e| ApiError::bad(e.to_string()))?;
    let id = new_id();
    let image_size = model.backbone.config.vision.image_size;
    let what = |i, j| format!("task {i} example {j}");
    let data_hash = store_examples(s, &id, &mut req.tasks, &what, body.files, image_size).await?;
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
            ..provenance(model, &tvs)
        },
        request: Some(JobRequest::Learn(req)),
        created_at: t,
        updated_at: t,
    };
    let key_ref = key.as_ref().map(|(k, h)| (k.as_str(), h.as_str()));
    let inserted = insert_bound(s, model, &c, key_ref, Some(s.config.job_queue));
    let inserted = inserted.inspect_err(|_| {
        let _ = std::fs::remove_dir_all(s.store.job_dir(&id));
    })?;
    if !matches!(inserted, Inserted::New) {
        let _ = std::fs::remove_dir_all(s.store.job_dir(&id));
    }
    match inserted {
        Inserted::New => {
            model.workers.notify();
            Ok((StatusCode::ACCEPTED, c))
        }
        // Lost a race with the same key: keep the first job.
        Inserted::Earlier(earlier, earlier_hash) => {
            let (k, hash) = key.as_ref().expect("a key was given");
            replay(k, hash, *earlier, &earlier_hash)
        }
        Inserted::QueueFull(queued) => Err(queue_full(s, queued)),
    }
}

/// Refuses a job early when `job_queue` jobs are queued, before its examples are decoded and
/// written; the insert checks again, atomically.
pub(crate) fn check_queue(s: &AppState) -> ApiResult<()> {
    let queued = s
        .store
        .count_by_status()?
        .iter()
        .filter(|(k, _)| k == "queued")
        .map(|c| c.1)
        .sum::<i64>();
    if queued as usize >= s.config.job_queue {
        return Err(queue_full(s, queued as usize));
    }
    Ok(())
}

pub(crate) fn queue_full(s: &AppState, queued: usize) -> ApiError {
    s.metrics.rejected.with_label_values(&["jobs_full"]).inc();
    ApiError::busy(
        StatusCode::TOO_MANY_REQUESTS,
        format!("{queued} jobs are queued already; retry later"),
        30,
    )
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

/// A budget keeps between one and all of the job's task vectors.
fn check_budget(budget: &Option<BudgetSpec>, n: usize) -> ApiResult<()> {
    match budget {
        Some(b) if b.task_vectors == 0 || b.task_vectors > n => Err(ApiError::bad(format!(
            "budget.task_vectors must be between 1 and the job's {n} task vector(s), got {}",
            b.task_vectors
        ))),
        _ => Ok(()),
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
        // Classes, templates, and whether the tokenizer tells the classes apart.
        heads::head_for(s, t.classes.clone(), &t.templates)
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
    o.check().map_err(|e| ApiError::bad(e.to_string()))
}

/// The recipe of an objective with the request's overrides, validated.
fn learn_config(
    req: &LearnRequest,
    layout: atlas_core::Layout,
) -> atlas_learn::Result<LearnConfig> {
    let c = LearnConfig {
        layout,
        ..LearnConfig::recipe(req.objective)
    }
    .with(&req.config);
    c.validate()?;
    Ok(c)
}
