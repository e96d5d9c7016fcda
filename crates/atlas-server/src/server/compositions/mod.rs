//! Compositions: the HTTP handlers. A request with `objective` is a learning job ([`learning`]),
//! one with `method` a merge ([`merge`]), any other explicit coefficients ([`explicit`]); listing, cancel and delete are here, progress
//! streams in [`events`] and Λ heat maps in `heatmap.rs`.

mod events;
pub(crate) mod examples;
mod explicit;
pub(crate) mod learning;
pub(crate) mod merge;

pub use events::{events, MAX_STREAMS};

use super::api::*;
use super::body::{parse, Body};
use super::error::{ApiError, ApiResult};
use super::jobs::now;
use super::store::Inserted;
use super::{AppState, Model};
use atlas_core::TaskVector;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use explicit::explicit;
use learning::{idempotency_key, learn};
use merge::merge;
use std::sync::Arc;

pub async fn create(
    State(s): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let model = s.ready()?;
    let learning = body.json.get("objective").is_some();
    let (status, c) = if learning {
        let key = idempotency_key(&headers)?;
        learn(&s, model, body, key).await?
    } else if body.json.get("method").is_some() {
        merge(&s, model, body).await?
    } else {
        let req: ExplicitRequest = parse(body.json, "explicit composition")?;
        (StatusCode::CREATED, explicit(&s, model, req)?)
    };
    let location = format!("/compositions/{}", c.id);
    Ok((status, [(header::LOCATION, location)], Json(c)).into_response())
}

/// Largest `offset` of a listing.
const MAX_OFFSET: usize = i64::MAX as usize - 1000;

pub(crate) fn new_id() -> String {
    format!("c{:016x}", rand::random::<u64>())
}

fn select(model: &Model, names: &[String]) -> ApiResult<Vec<Arc<TaskVector>>> {
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = names.iter().find(|n| !seen.insert(n.as_str())) {
        return Err(ApiError::bad(format!(
            "task vector {dup:?} is listed twice"
        )));
    }
    let lib = model.library();
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

/// Inserts `c` while holding the library, after checking that its task vectors are still
/// there with the digests it was built on: deleting a task vector holds the library to check
/// its users and remove it, so the two cannot interleave (a composition never outlives a
/// vector it names).
fn insert_bound(
    s: &AppState,
    model: &Model,
    c: &Composition,
    key: Option<(&str, &str)>,
    queue_limit: Option<usize>,
) -> ApiResult<Inserted> {
    let lib = model.library();
    let bound = c.task_vectors.iter().zip(&c.provenance.task_vector_digests);
    for (name, digest) in bound {
        match lib.get(name) {
            Some(tv) if tv.digest() == digest => {}
            Some(_) => {
                return Err(ApiError::conflict(format!(
                    "task vector {name:?} was replaced while the composition was being created"
                )))
            }
            None => {
                return Err(ApiError::conflict(format!(
                    "task vector {name:?} was deleted while the composition was being created"
                )))
            }
        }
    }
    Ok(s.store.insert(c, key, queue_limit)?)
}

fn provenance(model: &Model, tvs: &[Arc<TaskVector>]) -> Provenance {
    Provenance {
        backbone: model.backbone.id.clone(),
        backbone_digest: model.backbone.base_digest().to_string(),
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
    // SQLite's OFFSET is an i64: a larger one would wrap round to the first page.
    if q.offset > MAX_OFFSET {
        return Err(ApiError::bad(format!(
            "offset must be at most {MAX_OFFSET}"
        )));
    }
    let items = s.store.list(status, q.offset, limit + 1)?;
    let more = items.len() > limit;
    Ok(Json(CompositionPage {
        items: items.into_iter().take(limit).collect(),
        next_offset: more.then_some(q.offset + limit),
    }))
}

pub(super) fn find(s: &AppState, id: &str) -> ApiResult<Composition> {
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
    let model = s.ready()?;
    let c = find(&s, &id)?;
    if c.status.is_final() {
        return Err(ApiError::conflict(format!(
            "composition {id} is {} already",
            c.status.as_str()
        )));
    }
    let running_here = model.workers.cancel(&id);
    // Queued, or marked running with no worker on it (one that ended without the store taking
    // its end, or one just claiming it, which then sees this): cancelled in the store.
    let updated = s.store.update(&id, |c| {
        if c.status == Status::Queued || (c.status == Status::Running && !running_here) {
            c.status = Status::Cancelled;
            c.updated_at = now();
        }
    })?;
    model.workers.refresh_gauges();
    let c = updated.unwrap_or(c);
    if c.status == Status::Cancelled {
        model.workers.publish(&id, c.status, None);
    }
    Ok((StatusCode::ACCEPTED, Json(c)))
}

/// Deletes a composition (cancelling its job if it runs) and its stored examples.
pub async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    find(&s, &id)?;
    if let Some(model) = s.model.get() {
        model.workers.cancel(&id);
    }
    s.store.delete(&id)?;
    let dir = s.store.job_dir(&id);
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    if let Some(model) = s.model.get() {
        model.workers.refresh_gauges();
    }
    Ok(StatusCode::NO_CONTENT)
}
