//! POST /classify and the heads it uses (POST /heads, GET /heads/{id}).

use super::api::{ClassifyRequest, ClassifyResponse, HeadRequest, HeadView, Status};
use super::body::{parse, Body};
use super::composer::{self, ComposeRefused};
use super::engine::{EngineError, EngineRequest, Refused, Target};
use super::error::{ApiError, ApiJson, ApiResult};
use super::head_builder::HeadRefused;
use super::store::PutHead;
use super::{heads, images, AppState, Model};
use atlas_clip::ClipError;
use atlas_core::Coefficients;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use std::sync::Arc;
use std::time::Duration;

pub async fn create_head(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<HeadRequest>,
) -> ApiResult<(StatusCode, Json<HeadView>)> {
    let head = heads::head_for(&s, req.classes, &req.templates)?;
    let status = match s.store.put_head(&head, s.config.max_heads)? {
        PutHead::New => StatusCode::CREATED,
        PutHead::Existing => StatusCode::OK,
        PutHead::Full => {
            return Err(ApiError::conflict(format!(
                "{} heads are stored, the most allowed (max_heads): delete some with DELETE \
                 /heads/{{id}}, or send class names with each /classify request",
                s.config.max_heads
            )))
        }
    };
    Ok((status, Json(head)))
}

/// Deletes a stored head (204; 404 when there is none).
pub async fn delete_head(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    if s.store.delete_head(&id)? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no head {id}")))
    }
}

pub async fn get_head(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<HeadView>> {
    s.store
        .get_head(&id)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no head {id}")))
}

pub async fn classify(State(s): State<AppState>, body: Body) -> ApiResult<Json<ClassifyResponse>> {
    let model = s.ready()?;
    let req: ClassifyRequest = parse(body.json.clone(), "classify request")?;
    let head = resolve_head(&s, &req)?;
    let mut raw = Vec::new();
    for (i, img) in req.images.iter().enumerate() {
        let what = format!("image {i}");
        raw.push((what.clone(), images::b64(img, &what)?));
    }
    for f in &body.files {
        raw.push((format!("file {:?}", f.filename), f.bytes.clone()));
    }
    if raw.is_empty() || raw.len() > s.config.max_images {
        return Err(ApiError::bad(format!(
            "give between 1 and {} images (base64 in \"images\" or multipart file parts), got {}",
            s.config.max_images,
            raw.len()
        )));
    }
    if req.top_k == 0 {
        return Err(ApiError::bad("top_k must be at least 1"));
    }
    let composition = req.composition.clone().unwrap_or_else(|| "base".into());
    let target = resolve_target(&s, model, &composition)?;
    if model.engine.is_full() {
        return Err(queue_full(&s));
    }
    let size = model.backbone.config.vision.image_size;
    let bounds = images::PixelBounds {
        image: s.config.max_image_pixels,
        request: s.config.max_request_pixels,
    };
    // One bound for the whole answer: a head or a composition still being built when it
    // passes goes on being built (and cached), so a retry finds it.
    let timeout = Duration::from_secs(s.config.request_timeout_s);
    let head_id = head.id.clone();
    let answer = async {
        let pixels = images::preprocess(raw, size, bounds).await?;
        answer(&s, model, head, target, pixels, req.top_k).await
    };
    let predictions = tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| timed_out(&s, timeout))??;
    Ok(Json(ClassifyResponse {
        composition,
        head: head_id,
        predictions,
    }))
}

fn resolve_head(s: &AppState, req: &ClassifyRequest) -> ApiResult<HeadView> {
    match (&req.head, &req.classes) {
        (Some(_), Some(_)) => Err(ApiError::bad("give either head or classes, not both")),
        (Some(id), None) => s
            .store
            .get_head(id)?
            .ok_or_else(|| ApiError::not_found(format!("no head {id}"))),
        (None, Some(classes)) => heads::head(classes.clone(), &req.templates, s.config.max_classes),
        (None, None) => Err(ApiError::bad(
            "give a head id (POST /heads) or class names in \"classes\"",
        )),
    }
}

/// The composition to serve: None for "base"; 404 unknown, 409 not (yet) succeeded.
fn resolve_target(s: &AppState, model: &Model, id: &str) -> ApiResult<Option<Arc<Target>>> {
    if id == "base" {
        return Ok(None);
    }
    let c = s
        .store
        .get(id)?
        .ok_or_else(|| ApiError::not_found(format!("no composition {id}")))?;
    let (Status::Succeeded, Some(values)) = (c.status, c.coefficients) else {
        let when = if c.status.is_final() {
            "it will not serve (create it again)"
        } else {
            "it cannot serve yet"
        };
        return Err(ApiError::conflict(format!(
            "composition {id} is {}, not succeeded: {when}",
            c.status.as_str()
        )));
    };
    let tvs = model
        .library()
        .select(&c.task_vectors)
        .map_err(|e| ApiError::conflict(format!("composition {id}: {e}")))?;
    // A composition is bound to the task vectors it was made with, not to their names.
    let bound = c.provenance.task_vector_digests.iter();
    for ((name, tv), digest) in c.task_vectors.iter().zip(&tvs).zip(bound) {
        if tv.digest() != digest {
            return Err(ApiError::conflict(format!(
                "composition {id} was made with task vector {name:?} of digest {digest}; the \
                 library's {name:?} now has digest {}: serving it would silently change the model",
                tv.digest()
            )));
        }
    }
    let coefs = Coefficients::new(c.layout, tvs.len(), model.backbone.manifest().len(), values)
        .map_err(ApiError::internal)?;
    let digests: Vec<&str> = tvs.iter().map(|t| t.digest()).collect();
    Ok(Some(Arc::new(Target {
        key: format!("{id}:{}", digests.join(",")),
        tvs,
        coefs,
    })))
}

/// Has the head and the composed tower built (at once, each on its thread), then the engine
/// run them over the images.
async fn answer(
    s: &AppState,
    model: &Model,
    head: HeadView,
    target: Option<Arc<Target>>,
    pixels: Vec<Vec<f32>>,
    top_k: usize,
) -> ApiResult<Vec<Vec<super::api::Prediction>>> {
    let head_id = head.id.clone();
    let key = composer::key(target.as_deref()).to_string();
    let (built, tower) = tokio::join!(model.heads.get(head), model.composer.get(target));
    let built = built.map_err(|e| head_refused(s, e))?;
    let tower = tower.map_err(|e| compose_refused(s, e))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let request = EngineRequest {
        key,
        tower,
        head_id,
        head: built,
        pixels,
        top_k,
        reply: tx,
    };
    match model.engine.submit(request) {
        Ok(()) => {}
        Err(Refused::Full) => return Err(queue_full(s)),
        Err(Refused::Stopped) => return Err(engine_stopped()),
    }
    match rx.await {
        Err(_) => Err(engine_stopped()),
        Ok(Err(e)) => Err(engine_error(e)),
        Ok(Ok(p)) => Ok(p),
    }
}

fn engine_stopped() -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
}

fn timed_out(s: &AppState, timeout: Duration) -> ApiError {
    s.metrics.rejected.with_label_values(&["timeout"]).inc();
    ApiError::busy(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "classification did not finish within {timeout:?} (request_timeout_s); a head or \
             composition still being built goes on being built, so retry"
        ),
        1,
    )
}

/// A head the tokenizer or the config refuses is the request's fault (400); the rest is ours.
fn engine_error(e: EngineError) -> ApiError {
    match &e {
        EngineError::Head(c) if matches!(**c, ClipError::Tokenizer(_) | ClipError::Config(_)) => {
            ApiError::bad(format!("classes or templates: {e}"))
        }
        EngineError::NonFinite { .. } => ApiError::conflict(e.to_string()),
        _ => ApiError::internal(format!("classification failed: {e}")),
    }
}

fn head_refused(s: &AppState, e: HeadRefused) -> ApiError {
    match e {
        HeadRefused::Busy => {
            s.metrics.rejected.with_label_values(&["heads_full"]).inc();
            ApiError::busy(
                StatusCode::TOO_MANY_REQUESTS,
                "too many heads are waiting to be built; retry later",
                1,
            )
        }
        HeadRefused::Stopped => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the head builder has stopped",
        ),
        HeadRefused::Failed(e) => engine_error(e),
    }
}

fn compose_refused(s: &AppState, e: ComposeRefused) -> ApiError {
    match e {
        ComposeRefused::Busy => {
            s.metrics
                .rejected
                .with_label_values(&["composer_full"])
                .inc();
            ApiError::busy(
                StatusCode::TOO_MANY_REQUESTS,
                "too many compositions are waiting to be composed; retry later",
                1,
            )
        }
        ComposeRefused::Stopped => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the composer has stopped")
        }
        ComposeRefused::Failed(e) => engine_error(e),
    }
}

fn queue_full(s: &AppState) -> ApiError {
    s.metrics.rejected.with_label_values(&["queue_full"]).inc();
    ApiError::busy(
        StatusCode::TOO_MANY_REQUESTS,
        "the classification queue is full; retry later",
        1,
    )
}
