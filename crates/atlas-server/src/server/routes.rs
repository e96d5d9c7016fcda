//! HTTP routes. Handlers validate input and decode images off the async threads, then hand
//! model work to the engine (classification) or the learning worker (jobs).

use super::api::*;
use super::engine::{ClassifyJob, Engine, Refused};
use super::jobs::{Jobs, LearnSpec, TaskSpec};
use super::metrics::Metrics;
use super::registry::Registry;
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{templates, Backbone};
use atlas_core::{Coefficients, Library};
use atlas_learn::{Dataset, LearnConfig};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use std::sync::Arc;
use std::time::Duration;

pub const MAX_IMAGES: usize = 256;
pub const MAX_CLASSES: usize = 1000;
pub const MAX_EXAMPLES: usize = 10_000;
pub const MAX_BODY: usize = 256 << 20;

#[derive(Clone)]
pub struct AppState {
    pub backbone: Arc<Backbone>,
    pub library: Arc<Library>,
    pub registry: Arc<Registry>,
    pub engine: Engine,
    pub jobs: Jobs,
    pub metrics: Arc<Metrics>,
}

pub struct ApiError(StatusCode, String);

impl ApiError {
    fn bad(m: impl Into<String>) -> Self {
        ApiError(StatusCode::BAD_REQUEST, m.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/classify", post(classify))
        .route(
            "/compositions",
            post(create_composition).get(list_compositions),
        )
        .route(
            "/compositions/{id}",
            get(get_composition).delete(cancel_composition),
        )
        .route("/task-vectors", get(task_vectors))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn count_requests(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    s.metrics
        .requests
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// 200 while the engine thread runs; 503 once it has stopped, so liveness probes restart us.
async fn healthz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if s.engine.is_alive() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
    }
}

/// JSON bodies whose rejections (malformed JSON, wrong shape, wrong content type) come back as
/// the API's JSON error with status 400, saying what was wrong.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => {
                let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    e.status()
                } else {
                    StatusCode::BAD_REQUEST
                };
                Err(ApiError(code, e.body_text()))
            }
        }
    }
}

async fn metrics(State(s): State<AppState>) -> String {
    s.metrics.render()
}

async fn task_vectors(State(s): State<AppState>) -> Json<serde_json::Value> {
    let tvs: Vec<_> = s
        .library
        .all()
        .iter()
        .map(|t| serde_json::json!({"name": t.name(), "digest": t.digest(), "bytes": t.nbytes()}))
        .collect();
    Json(
        serde_json::json!({"base_model": s.backbone.id, "blocks": s.backbone.manifest().len(), "task_vectors": tvs}),
    )
}

fn resolve_templates(t: &Templates) -> ApiResult<Vec<String>> {
    let list: Vec<String> = match t {
        Templates::Named(n) if n == "default" => templates::default_templates()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Templates::Named(n) => templates::templates_for(n)
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "no templates for data set {n:?}; known: default, {}",
                    templates::dataset_names().join(", ")
                ))
            })?
            .iter()
            .map(|s| s.to_string())
            .collect(),
        Templates::List(l) => l.clone(),
    };
    if list.is_empty() || list.iter().any(|t| t.matches("{}").count() != 1) {
        return Err(ApiError::bad(
            "templates must be non-empty, each with exactly one {} for the class name",
        ));
    }
    Ok(list)
}

fn check_classes(classes: &[String]) -> ApiResult<()> {
    if classes.is_empty() || classes.len() > MAX_CLASSES {
        return Err(ApiError::bad(format!(
            "give between 1 and {MAX_CLASSES} class names"
        )));
    }
    if classes.iter().any(|c| c.trim().is_empty()) {
        return Err(ApiError::bad("class names must not be empty"));
    }
    Ok(())
}

fn b64(s: &str, what: &str) -> ApiResult<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| ApiError::bad(format!("{what} is not valid base64: {e}")))
}

async fn classify(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<ClassifyRequest>,
) -> ApiResult<Json<ClassifyResponse>> {
    check_classes(&req.classes)?;
    if req.images.is_empty() || req.images.len() > MAX_IMAGES {
        return Err(ApiError::bad(format!(
            "give between 1 and {MAX_IMAGES} images"
        )));
    }
    if req.top_k == 0 {
        return Err(ApiError::bad("top_k must be at least 1"));
    }
    let templates = resolve_templates(&req.templates)?;
    if let Some(id) = &req.composition {
        s.registry.ready(id).map_err(|e| {
            let code = if s.registry.view(id).is_some() {
                StatusCode::CONFLICT
            } else {
                StatusCode::NOT_FOUND
            };
            ApiError(code, e)
        })?;
    }
    let pre = Preprocess::from_config(s.backbone.config.vision.image_size);
    let images = req.images;
    let pixels = tokio::task::spawn_blocking(move || -> ApiResult<Vec<Vec<f32>>> {
        use rayon::prelude::*;
        images
            .par_iter()
            .enumerate()
            .map(|(i, img)| {
                pre.from_bytes(&b64(img, &format!("image {i}"))?)
                    .map_err(|e| ApiError::bad(format!("image {i}: {e}")))
            })
            .collect()
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = ClassifyJob {
        composition: req.composition.clone(),
        classes: req.classes,
        templates,
        pixels,
        top_k: req.top_k,
        reply: tx,
    };
    match s.engine.submit(job) {
        Ok(()) => {}
        Err(Refused::Full) => {
            s.metrics.rejected.inc();
            return Err(ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                "the engine queue is full; retry later".into(),
            ));
        }
        Err(Refused::Stopped) => {
            return Err(ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine has stopped".into(),
            ))
        }
    }
    let predictions = tokio::time::timeout(Duration::from_secs(300), rx)
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "classification timed out".into(),
            )
        })?
        .map_err(|_| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine has stopped".into(),
            )
        })?
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(Json(ClassifyResponse {
        composition: req.composition,
        predictions,
    }))
}

async fn create_composition(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<CompositionRequest>,
) -> ApiResult<(StatusCode, Json<CompositionView>)> {
    match req {
        CompositionRequest::Explicit {
            name,
            task_vectors,
            layout,
            values,
        } => {
            let tvs = s
                .library
                .select(&task_vectors)
                .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
            let coefs = Coefficients::new(layout, tvs.len(), s.backbone.manifest().len(), values)
                .map_err(|e| ApiError::bad(e.to_string()))?;
            let id = s
                .registry
                .insert(name, tvs, layout, Some(coefs), Status::Ready);
            Ok((
                StatusCode::CREATED,
                Json(s.registry.view(&id).expect("inserted")),
            ))
        }
        CompositionRequest::Learn {
            name,
            objective,
            task_vectors,
            layout,
            tasks,
            config,
        } => {
            let tvs = s
                .library
                .select(&task_vectors)
                .map_err(|e| ApiError(StatusCode::NOT_FOUND, e.to_string()))?;
            if tvs.is_empty() {
                return Err(ApiError::bad(
                    "a learning job needs at least one task vector",
                ));
            }
            check_task_count(objective, tasks.len())?;
            let unlabelled = matches!(objective, Objective::Entropy | Objective::Ufm);
            let specs = tokio::task::spawn_blocking(move || {
                tasks
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| task_spec(i, t, unlabelled))
                    .collect::<ApiResult<Vec<_>>>()
            })
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
            let config = learn_config(objective, layout, &config)?;
            let id = s
                .registry
                .insert(name, tvs.clone(), layout, None, Status::Queued);
            let spec = LearnSpec {
                id: id.clone(),
                objective,
                tasks: specs,
                tvs,
                config,
            };
            if !s.jobs.submit(spec) {
                s.registry.remove(&id);
                s.metrics.rejected.inc();
                return Err(ApiError(
                    StatusCode::TOO_MANY_REQUESTS,
                    "the learning queue is full; retry later".into(),
                ));
            }
            Ok((
                StatusCode::ACCEPTED,
                Json(s.registry.view(&id).expect("inserted")),
            ))
        }
    }
}

fn check_task_count(objective: Objective, n: usize) -> ApiResult<()> {
    let ok = match objective {
        Objective::MultiTask => n >= 1,
        Objective::Negation => n == 2,
        _ => n == 1,
    };
    if !ok {
        return Err(ApiError::bad(format!(
            "{objective:?} takes {} task(s), got {n}",
            match objective {
                Objective::MultiTask => "one or more",
                Objective::Negation => "two (target, then control)",
                _ => "exactly one",
            }
        )));
    }
    Ok(())
}

fn task_spec(i: usize, t: TaskData, unlabelled: bool) -> ApiResult<TaskSpec> {
    check_classes(&t.classes)?;
    if t.examples.is_empty() || t.examples.len() > MAX_EXAMPLES {
        return Err(ApiError::bad(format!(
            "task {i}: give between 1 and {MAX_EXAMPLES} examples"
        )));
    }
    let mut items = Vec::with_capacity(t.examples.len());
    for (j, ex) in t.examples.iter().enumerate() {
        let label = if unlabelled {
            None
        } else {
            Some(ex.label.ok_or_else(|| {
                ApiError::bad(format!(
                    "task {i} example {j}: a label is required for this objective"
                ))
            })?)
        };
        if let Some(l) = label.filter(|&l| l as usize >= t.classes.len()) {
            return Err(ApiError::bad(format!(
                "task {i} example {j}: label {l} is out of range for {} classes",
                t.classes.len()
            )));
        }
        items.push((b64(&ex.image, &format!("task {i} example {j}"))?, label));
    }
    let data = Dataset::from_bytes(t.classes.clone(), items)
        .map_err(|e| ApiError::bad(format!("task {i}: {e}")))?;
    Ok(TaskSpec {
        name: t.name.unwrap_or_else(|| format!("task{i}")),
        data,
        templates: resolve_templates(&t.templates)?,
    })
}

fn learn_config(
    objective: Objective,
    layout: atlas_core::Layout,
    o: &LearnOverrides,
) -> ApiResult<LearnConfig> {
    // The recipe depends only on the job's kind; build it from a placeholder of that kind.
    let mut c = recipe_for(objective);
    c.layout = layout;
    if let Some(v) = o.epochs {
        c.epochs = v;
    }
    if let Some(v) = o.lr {
        c.optimizer.lr = v;
    }
    if let Some(v) = o.weight_decay {
        c.optimizer.weight_decay = v;
    }
    if let Some(v) = o.batch_size {
        c.batch_size = v;
    }
    if let Some(v) = o.seed {
        c.seed = v;
    }
    if let Some(v) = o.val_fraction {
        c.val_fraction = v;
    }
    c.validate().map_err(|e| ApiError::bad(e.to_string()))?;
    Ok(c)
}

fn recipe_for(objective: Objective) -> LearnConfig {
    atlas_learn::job::recipe_for_kind(match objective {
        Objective::FewShot => "few_shot",
        Objective::MultiTask => "multi_task",
        Objective::Negation => "negation",
        Objective::Entropy => "entropy",
        Objective::Ufm => "ufm",
    })
}

async fn list_compositions(State(s): State<AppState>) -> Json<Vec<CompositionView>> {
    Json(s.registry.list())
}

async fn get_composition(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<CompositionView>> {
    s.registry
        .view(&id)
        .map(Json)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no composition {id}")))
}

/// Cancels a queued or running learning job (it ends `cancelled`); removes any other
/// composition. Answers with the composition as it was.
async fn cancel_composition(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<CompositionView>> {
    let view = s
        .registry
        .view(&id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no composition {id}")))?;
    match view.status {
        Status::Queued | Status::Running => {
            if let Some(flag) = s.registry.cancel_flag(&id) {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        _ => {
            s.registry.remove(&id);
        }
    }
    Ok(Json(view))
}
