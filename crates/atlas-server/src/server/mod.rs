//! The HTTP service: axum routes over an engine thread (serving; heads and composed models are
//! built on threads of their own and handed to it), learning workers (jobs), a
//! durable store (SQLite + data directory) and Prometheus metrics. The listener comes up
//! first; the model side attaches once loaded, and /readyz flips then.

pub mod api;
pub mod background;
pub mod body;
pub mod classify;
pub mod composer;
pub mod compositions;
pub mod config;
pub mod engine;
pub mod error;
pub mod finetune;
pub mod head_builder;
pub mod heads;
pub mod heatmap;
pub mod http;
pub mod images;
pub mod jobs;
pub mod metrics;
pub mod replicas;
pub mod routes;
pub mod store;
pub mod task_vectors;

use atlas_clip::Backbone;
use atlas_core::{Library, StorageDType};
use composer::Composer;
use config::Config;
use engine::{Engine, EngineSettings};
use head_builder::HeadBuilder;
use jobs::Workers;
use metrics::Metrics;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;
use store::Store;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

pub struct Shared {
    pub config: Config,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub model: OnceLock<Model>,
    pub load_error: OnceLock<String>,
    /// Flips to true when shutdown begins: open event streams end so the server can exit.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// One permit per open event stream.
    pub streams: Arc<tokio::sync::Semaphore>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The model side: present once loaded.
pub struct Model {
    pub backbone: Arc<Backbone>,
    pub library: Arc<RwLock<Library>>,
    pub storage_dtype: StorageDType,
    pub engine: Engine,
    pub composer: Composer,
    pub heads: HeadBuilder,
    pub workers: Arc<Workers>,
}

impl Model {
    pub fn library(&self) -> std::sync::RwLockReadGuard<'_, Library> {
        self.library.read().unwrap_or_else(|p| p.into_inner())
    }
    pub fn library_mut(&self) -> std::sync::RwLockWriteGuard<'_, Library> {
        self.library.write().unwrap_or_else(|p| p.into_inner())
    }
}

impl AppState {
    /// Opens the store; the model side is attached later with [`AppState::attach`].
    pub fn new(config: Config) -> anyhow::Result<AppState> {
        let store = Store::open(store::Location {
            data_dir: &config.data_dir,
            blob_dir: &config.blob_dir,
            database_url: &config.database_url,
            origin: &config.replica,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(AppState(Arc::new(Shared {
            config,
            store: Arc::new(store),
            metrics: Arc::new(Metrics::new()),
            model: OnceLock::new(),
            load_error: OnceLock::new(),
            stopping: tokio::sync::watch::channel(false).0,
            streams: Arc::new(tokio::sync::Semaphore::new(compositions::MAX_STREAMS)),
        })))
    }

    pub fn router(&self) -> axum::Router {
        routes::router(self.clone())
    }

    /// Starts the engine and the learning workers over a loaded backbone and library, adds the
    /// task vectors uploaded earlier, and flips readiness.
    pub fn attach(
        &self,
        backbone: Backbone,
        library: Library,
        storage_dtype: StorageDType,
    ) -> anyhow::Result<()> {
        let library = Arc::new(RwLock::new(library));
        let mut sync = task_vectors::LibrarySync::default();
        sync.run(&self.store, &backbone, &library, storage_dtype)?;
        let library_bytes = library.read().map_or(0, |l| l.nbytes());
        let backbone = Arc::new(backbone);
        let m = &self.metrics;
        m.memory
            .with_label_values(&["backbone"])
            .set((backbone.manifest().numel() * 4) as i64);
        m.memory
            .with_label_values(&["library"])
            .set(library_bytes as i64);
        let c = &self.config;
        let engine = Engine::start(
            backbone.clone(),
            self.metrics.clone(),
            EngineSettings {
                queue: c.queue,
                max_batch: c.max_batch,
                max_wait: Duration::from_millis(c.max_wait_ms),
            },
        );
        let composer = Composer::start(
            backbone.clone(),
            self.metrics.clone(),
            c.cache_mib << 20,
            c.queue,
        );
        let heads = HeadBuilder::start(backbone.clone(), c.queue);
        let workers = Workers::start(
            self.store.clone(),
            backbone.clone(),
            library.clone(),
            self.metrics.clone(),
            jobs::WorkerSettings {
                workers: c.workers,
                storage_dtype,
                owner: c.replica.clone(),
                lease: Duration::from_secs(c.job_lease_s),
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        if self.store.dialect() == store::Dialect::Postgres {
            replicas::follow(replicas::Follow {
                store: self.store.clone(),
                workers: workers.clone(),
                backbone: backbone.clone(),
                library: library.clone(),
                storage_dtype,
                metrics: self.metrics.clone(),
                sync,
                stopping: self.stopping.subscribe(),
            });
        }
        let model = Model {
            backbone,
            library,
            storage_dtype,
            engine,
            composer,
            heads,
            workers,
        };
        if self.model.set(model).is_err() {
            anyhow::bail!("the model side is already attached");
        }
        self.metrics.ready.set(1);
        Ok(())
    }

    /// Loading failed: /readyz says why (the process keeps serving /healthz and errors).
    pub fn fail(&self, why: String) {
        let _ = self.load_error.set(why);
    }

    /// Shutdown: running jobs go back to the queue at their next step.
    pub fn stop_jobs(&self) {
        if let Some(c) = self.model.get() {
            c.workers.stop();
        }
    }

    /// Waits (bounded) for running jobs to stop after [`AppState::stop_jobs`].
    pub fn wait_jobs(&self, limit: Duration) {
        let Some(c) = self.model.get() else { return };
        let deadline = std::time::Instant::now() + limit;
        while c.workers.busy() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
