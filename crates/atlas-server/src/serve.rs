//! `atlas-serve serve`: load the backbone and task vectors, start the HTTP service.

use crate::server::{self, engine::EngineSettings, Settings};
use anyhow::Context;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::{Library, StoreDType};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "ATLAS_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Backbone: a CLIPModel directory or hub id. Without one, the demo world is served.
    #[arg(long, env = "ATLAS_MODEL")]
    model: Option<String>,
    /// Task-vector files (repeat), HF or open_clip naming.
    #[arg(long = "tv")]
    tvs: Vec<PathBuf>,
    /// A directory whose *.safetensors files are task vectors.
    #[arg(long, env = "ATLAS_TV_DIR")]
    tv_dir: Option<PathBuf>,
    /// Storage dtype of resident task vectors.
    #[arg(long, env = "ATLAS_STORE", default_value = "f16")]
    store: String,
    /// Bytes of composed models kept (MiB).
    #[arg(long, env = "ATLAS_CACHE_MIB", default_value_t = 2048)]
    cache_mib: usize,
    /// Classification requests waiting for the engine before 429.
    #[arg(long, env = "ATLAS_QUEUE", default_value_t = 64)]
    queue: usize,
    /// Images per forward pass.
    #[arg(long, env = "ATLAS_MAX_BATCH", default_value_t = 64)]
    max_batch: usize,
    /// Learning jobs waiting before 429.
    #[arg(long, env = "ATLAS_JOB_QUEUE", default_value_t = 16)]
    job_queue: usize,
    /// Demo-world preset served when no model is given (full or ci).
    #[arg(long, env = "ATLAS_DEMO_PRESET", default_value = "full")]
    demo_preset: String,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let store = StoreDType::parse(&a.store).context("--store must be f16, bf16 or f32")?;
    let (backbone, mut library) = match &a.model {
        Some(model) => {
            let backbone = Backbone::load(model, LoadOptions::default())
                .with_context(|| format!("loading {model}"))?;
            let library = Library::new(backbone.manifest().clone(), backbone.base_digest());
            (backbone, library)
        }
        None => demo_world(&a.demo_preset)?,
    };
    let mut tv_paths = a.tvs.clone();
    if let Some(dir) = &a.tv_dir {
        tv_paths.extend(safetensors_in(dir)?);
    }
    for p in &tv_paths {
        let tv = backbone
            .load_task_vector(p, None, store)
            .with_context(|| format!("loading {}", p.display()))?;
        library.add(tv)?;
    }
    let backbone = Arc::new(backbone);
    eprintln!(
        "atlas-serve: backbone {} ({} blocks), {} task vectors ({} MiB), listening on {}",
        backbone.id,
        backbone.manifest().len(),
        library.len(),
        library.nbytes() >> 20,
        a.listen
    );
    let settings = Settings {
        engine: EngineSettings {
            queue: a.queue,
            cache_bytes: a.cache_mib << 20,
            max_batch: a.max_batch,
        },
        job_queue: a.job_queue,
    };
    let app = server::app(backbone, Arc::new(library), settings);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown())
            .await?;
        anyhow::Ok(())
    })
}

/// Ctrl-C or SIGTERM (what Kubernetes sends): stop accepting, finish requests in flight.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    eprintln!("atlas-serve: shutting down");
}

fn safetensors_in(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    out.sort();
    Ok(out)
}

/// No model configured: the demo world (a tiny CLIP pre-trained here, with fine-tuned task
/// vectors), built on first use into the cache and loaded from there afterwards.
fn demo_world(preset: &str) -> anyhow::Result<(Backbone, Library)> {
    let preset = atlas_demo::Preset::parse(preset)
        .with_context(|| format!("unknown demo preset {preset:?} (full or ci)"))?;
    let params = atlas_demo::WorldParams::preset(preset);
    let root = atlas_demo::world::default_cache_root()?;
    eprintln!(
        "atlas-serve: no model configured (--model / ATLAS_MODEL): serving the offline demo world '{}' from {} (built on first use; that takes minutes)",
        preset.name(),
        atlas_demo::world::world_dir(&root, &params).display()
    );
    let (world, built) = atlas_demo::World::open(
        &params,
        &root,
        &mut LogProgress,
        &std::sync::atomic::AtomicBool::new(false),
    )?;
    if built {
        eprintln!("atlas-serve: demo world built");
    }
    let mut library = Library::new(
        world.backbone.manifest().clone(),
        world.backbone.base_digest(),
    );
    for tv in &world.task_vectors {
        library.add((**tv).clone())?;
    }
    Ok((world.backbone, library))
}

/// Build progress of the demo world, as log lines.
struct LogProgress;

impl atlas_demo::world::Progress for LogProgress {
    fn stage(&mut self, name: &str, total: u64) {
        eprintln!("atlas-serve: demo world: {name} ({total} steps)");
    }
    fn tick(&mut self, _done: u64, _message: &str) {}
    fn note(&mut self, line: &str) {
        eprintln!("atlas-serve: demo world: {line}");
    }
}
