//! The HTTP service: axum routes over an engine thread (serving), a learning worker (jobs), a
//! registry of compositions and Prometheus metrics.

pub mod api;
pub mod engine;
pub mod jobs;
pub mod metrics;
pub mod registry;
pub mod routes;

use atlas_clip::Backbone;
use atlas_core::Library;
use engine::{Engine, EngineSettings};
use jobs::Jobs;
use metrics::Metrics;
use registry::Registry;
use routes::AppState;
use std::sync::Arc;

pub struct Settings {
    pub engine: EngineSettings,
    pub job_queue: usize,
}

/// The application: shared state wired to its worker threads.
pub fn app(backbone: Arc<Backbone>, library: Arc<Library>, settings: Settings) -> axum::Router {
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(Metrics::new());
    let engine = Engine::start(
        backbone.clone(),
        registry.clone(),
        metrics.clone(),
        settings.engine,
    );
    let jobs = Jobs::start(
        backbone.clone(),
        registry.clone(),
        metrics.clone(),
        settings.job_queue,
    );
    routes::router(AppState {
        backbone,
        library,
        registry,
        engine,
        jobs,
        metrics,
    })
}
