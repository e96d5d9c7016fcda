//! Merges by FusionBench method name (a body with `method`). Simple average and task
//! arithmetic give coefficients: an isotropic composition of the inputs. The other methods
//! build a new delta, added to the library as a derived task vector (its source records the
//! method, every parameter, seed included, and the inputs' digests) and served as a
//! composition of it with the method's scaling factor, so caching, heat maps, provenance,
//! deletion and digest bindings are those of any composition.

use super::{check_name, insert_bound, new_id, provenance, select};
use crate::server::api::*;
use crate::server::background::{self, Pool};
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::now;
use crate::server::task_vectors::{self, add_derived};
use crate::server::{AppState, Model};
use atlas_core::merge::{self, Merged, Method};
use atlas_core::{Layout, TaskVector, TaskVectorMeta};
use axum::http::StatusCode;
use std::sync::Arc;

/// One merge at a time: each reads every input in full and holds its result (a model's worth
/// of f32 or more), so concurrent merges would multiply that.
static MERGING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

pub(super) async fn merge(
    s: &AppState,
    model: &Model,
    req: MergeRequest,
) -> ApiResult<Composition> {
    check_name(&req.name)?;
    if req.method == "adamerging" {
        return Err(ApiError::bad(
            "adamerging learns from the tasks' unlabelled images: POST /compositions with \
             \"objective\": \"adamerging\" and \"tasks\" (class names and unlabelled examples \
             per task); layout per_block is layer-wise (the default), isotropic task-wise",
        ));
    }
    if let Some(name) = &req.task_vector {
        task_vectors::check_name(name)?;
    }
    if req.task_vectors.is_empty() {
        return Err(ApiError::bad("give at least one task vector"));
    }
    let inputs = select(model, &req.task_vectors)?;
    let method = Method::parse(&req.method, &req.params, inputs.len())
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let record = MergeRecord {
        method: method.name().into(),
        params: method.params(),
        inputs: req.task_vectors.clone(),
        input_digests: inputs.iter().map(|t| t.digest().to_string()).collect(),
    };
    let _one_at_a_time = MERGING.try_acquire().map_err(|_| {
        s.metrics.rejected.with_label_values(&["merge_busy"]).inc();
        ApiError::busy(
            StatusCode::TOO_MANY_REQUESTS,
            "a merge is running; merges run one at a time",
            5,
        )
    })?;
    let base = inputs[0].meta.clone();
    let (names, tvs, coefficients) = match run(model, method, inputs.clone()).await? {
        Merged::Coefficients(c) => (req.task_vectors, inputs, c),
        Merged::Delta { blocks, scale } => {
            let tv = derived(model, &record, base, req.task_vector, &blocks)?;
            let tv = add_derived(s, model, tv).await?;
            (vec![tv.name().to_string()], vec![tv], vec![scale])
        }
    };
    let t = now();
    let c = Composition {
        id: new_id(),
        name: req.name,
        kind: "merge".into(),
        status: Status::Succeeded,
        task_vectors: names,
        layout: Layout::Isotropic,
        coefficients: Some(coefficients),
        progress: None,
        history: Vec::new(),
        summary: None,
        error: None,
        provenance: Provenance {
            merge: Some(record),
            ..provenance(model, &tvs)
        },
        request: None,
        created_at: t,
        updated_at: t,
    };
    insert_bound(s, model, &c, None, None)?;
    Ok(c)
}

/// The merge itself, off the async threads (it reads every input in full).
async fn run(model: &Model, method: Method, inputs: Vec<Arc<TaskVector>>) -> ApiResult<Merged> {
    let backbone = model.backbone.clone();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&TaskVector> = inputs.iter().map(Arc::as_ref).collect();
        // On the compositions' pool: a merge shares the cores with serving, not ahead of it.
        background::run(Pool::Compositions, || {
            merge::merge(&method, backbone.manifest(), &refs)
        })
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|e| ApiError::bad(e.to_string()))
}

/// The merged delta as a task vector over `base`'s base model, named `name`, or
/// `{method}-{digest prefix}`.
fn derived(
    model: &Model,
    record: &MergeRecord,
    base: TaskVectorMeta,
    name: Option<String>,
    blocks: &[Vec<f32>],
) -> ApiResult<TaskVector> {
    let meta = TaskVectorMeta {
        name: name.clone().unwrap_or_else(|| record.method.clone()),
        base_model: base.base_model,
        base_digest: base.base_digest,
        source: format!(
            "merge {}",
            serde_json::to_string(record).unwrap_or_default()
        ),
    };
    let manifest = model.backbone.manifest();
    let mut tv = merge::to_task_vector(manifest, meta, model.storage_dtype, blocks)
        .map_err(|e| ApiError::bad(format!("task_vector: {e}")))?;
    if name.is_none() {
        tv.meta.name = format!("{}-{}", record.method, &tv.digest()[..12]);
    }
    Ok(tv)
}
