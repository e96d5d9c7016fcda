//! `atlas-serve serve`: load the backbone and task vectors, start the HTTP service.

use crate::server::config::Config;
use crate::server::http::{self, ConnectionLimits};
use crate::server::AppState;
use anyhow::Context;
use atlas_clip::{Backbone, LoadOptions};
use atlas_core::{Library, StorageDType};
use std::path::PathBuf;
use std::time::Duration;

pub type Args = crate::server::config::Args;

/// Binds the listener first (so /healthz answers and /readyz says "loading"), loads the
/// backbone and library on a thread, and serves until SIGTERM or Ctrl-C.
pub fn run(a: Args) -> anyhow::Result<()> {
    let config = Config::load(&a)?;
    let state = AppState::new(config.clone())?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        // The URL's password stays out of the log: only where the state is.
        let store = match config.database_url.is_empty() {
            true => format!("data in {}", config.data_dir.display()),
            false => format!(
                "PostgreSQL as replica {}, blobs in {}",
                config.replica,
                config.blob_dir.display()
            ),
        };
        eprintln!(
            "atlas-serve: listening on {}, {store}{}",
            config.listen,
            if config.api_keys.is_empty() {
                ""
            } else {
                ", API keys required"
            }
        );
        let loader = state.clone();
        std::thread::spawn(move || {
            if let Err(e) = load(&loader) {
                // A server that can never become ready should say so and stop, not linger.
                eprintln!("atlas-serve: loading failed: {e:#}");
                loader.fail(format!("{e:#}"));
                std::process::exit(1);
            }
        });
        let signalled = state.clone();
        let limits = ConnectionLimits {
            max: config.max_connections,
            header_timeout: Duration::from_secs(config.header_timeout_s),
        };
        http::serve(listener, state.router(), limits, async move {
            shutdown().await;
            signalled.stopping.send_replace(true);
        })
        .await;
        // Requests in flight are done; running jobs go back to the queue at their next step.
        let s = state.clone();
        tokio::task::spawn_blocking(move || {
            s.stop_jobs();
            s.wait_jobs(Duration::from_secs(20));
        })
        .await?;
        anyhow::Ok(())
    })
}

fn load(state: &AppState) -> anyhow::Result<()> {
    let c = &state.config;
    let store: StorageDType = c.store.parse().map_err(|e| anyhow::anyhow!("store: {e}"))?;
    let demo = if c.model.is_empty() {
        let preset = atlas_demo::Preset::parse(&c.demo_preset)
            .with_context(|| format!("unknown demo preset {:?} (full or ci)", c.demo_preset))?;
        eprintln!(
            "atlas-serve: no model configured (--model / ATLAS_MODEL): serving the offline demo \
             world (--model demo:{})",
            preset.name()
        );
        Some(preset)
    } else {
        super::model::demo_preset(&c.model)?
    };
    let (backbone, mut library) = if let Some(preset) = demo {
        demo_world(preset, load_options(c)?)?
    } else {
        let backbone = Backbone::load(&c.model, load_options(c)?)
            .with_context(|| format!("loading {}", c.model))?;
        let library = Library::new(backbone.manifest().clone(), backbone.base_digest());
        (backbone, library)
    };
    let mut tv_paths: Vec<PathBuf> = c.tvs.iter().map(PathBuf::from).collect();
    if !c.tv_dir.is_empty() {
        tv_paths.extend(safetensors_in(std::path::Path::new(&c.tv_dir))?);
    }
    for p in &tv_paths {
        let mut tv = backbone
            .load_task_vector(p, None, store)
            .with_context(|| format!("loading {}", p.display()))?;
        // Shown to clients: the file's name, not where this server keeps it.
        if tv.meta.source == p.display().to_string() {
            let file = p.file_name().unwrap_or_default().to_string_lossy();
            tv.meta.source = format!("file {file}");
        }
        library.add(tv)?;
    }
    eprintln!(
        "atlas-serve: backbone {} ({} blocks), {} task vectors ({} MiB): ready",
        backbone.id,
        backbone.manifest().len(),
        library.len(),
        library.nbytes() >> 20,
    );
    state.attach(backbone, library, store)
}

/// Device and compute dtype from the settings; with bf16 on a CPU, says which kernel runs.
fn load_options(c: &Config) -> anyhow::Result<LoadOptions> {
    let opts = LoadOptions {
        device: crate::device::open(&c.device)?,
        dtype: crate::device::compute_dtype(&c.dtype)?,
        ..LoadOptions::default()
    };
    if opts.device.is_cpu() && opts.dtype == candle_core::DType::BF16 {
        match opts.bf16_kernel() {
            Some(k) => eprintln!(
                "atlas-serve: bf16 on the CPU: matmuls on {} (bf16 products, f32 sums and \
                 activations)",
                k.name()
            ),
            None => eprintln!(
                "atlas-serve: bf16 on the CPU: no bf16 kernel (this CPU has no AMX, is not \
                 AMD's with AVX512-BF16, and ATLAS_CPU_BF16 names no other it has): the f32 \
                 path runs"
            ),
        }
    }
    Ok(opts)
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

/// The demo world and its task vectors as the library.
fn demo_world(
    preset: atlas_demo::Preset,
    opts: LoadOptions,
) -> anyhow::Result<(Backbone, Library)> {
    let world = super::model::demo_world(preset, opts)?;
    let mut library = Library::new(
        world.backbone.manifest().clone(),
        world.backbone.base_digest(),
    );
    for tv in &world.task_vectors {
        library.add((**tv).clone())?;
    }
    Ok((world.backbone, library))
}
