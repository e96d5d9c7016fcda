//! Fine-tuning jobs: `POST /task-vectors` with `finetune` fine-tunes the image tower on uploaded
//! labelled images in the background, making a new task vector. The job is a row of the same
//! job store as learning jobs (kind `finetune`), so it is queued, bounded, claimed, streamed,
//! cancelled, deleted and resumed after a restart exactly like them, at `/compositions/{id}`.
//! It checkpoints θ after every epoch (a resumed job restarts from the last completed epoch).
//! On success the task vector joins the library, kept durably like every added one with its
//! source ("finetune", the job and the examples' digest), and the job's composition (that task
//! vector at coefficient 1) serves the fine-tuned model.

use super::api::*;
use super::body::FilePart;
use super::compositions::examples::store_examples;
use super::compositions::learning::{check_queue, queue_full};
use super::compositions::new_id;
use super::error::{ApiError, ApiResult};
use super::jobs::now;
use super::metrics::Metrics;
use super::store::{Inserted, Store, StoreError};
use super::{heads, AppState, Model};
use atlas_clip::preprocess::Preprocess;
use atlas_clip::{Backbone, ZeroShotHead};
use atlas_core::{Layout, Library};
use atlas_learn::finetune::{
    finetune_from, EpochDone, FinetuneConfig, FinetuneError, Labelled, Resume, Step,
};
use atlas_learn::{Event, EventKind, LearnError};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Instant;

/// Largest epochs and batch size a fine-tuning request may ask for (bounded work per job).
const MAX_EPOCHS: usize = 1000;
const MAX_BATCH: usize = 1024;

/// Checks a fine-tuning request, stores its examples and queues the job: 202 with the job's
/// composition, at `/compositions/{id}`.
pub(super) async fn create(
    s: &AppState,
    model: &Model,
    name: String,
    mut ft: FinetuneRequest,
    files: Vec<FilePart>,
) -> ApiResult<Response> {
    if model.library().get(&name).is_some() {
        return Err(ApiError::conflict(format!(
            "a task vector named {name:?} exists already"
        )));
    }
    heads::head_for(s, ft.classes.clone(), &ft.templates)
        .map_err(|e| ApiError::bad(format!("finetune: {}", e.detail)))?;
    let n = ft.examples.len();
    if n == 0 {
        return Err(ApiError::bad("finetune.examples must not be empty"));
    }
    if n > s.config.max_examples {
        return Err(ApiError::bad(format!(
            "finetune.examples: {n} examples; at most {} per job",
            s.config.max_examples
        )));
    }
    let classes = ft.classes.len();
    for (j, e) in ft.examples.iter().enumerate() {
        match e.label {
            None => {
                return Err(ApiError::bad(format!(
                    "finetune example {j}: a label is required"
                )))
            }
            Some(l) if l as usize >= classes => {
                return Err(ApiError::bad(format!(
                    "finetune example {j}: label {l} is out of range for {classes} classes"
                )))
            }
            _ => {}
        }
    }
    let config = config(&name, &ft.config, model)?;
    check_queue(s)?;
    let id = new_id();
    let mut tasks = [TaskData {
        name: None,
        classes: std::mem::take(&mut ft.classes),
        templates: ft.templates.clone(),
        examples: std::mem::take(&mut ft.examples),
    }];
    let what = |_, j| format!("finetune example {j}");
    let image_size = model.backbone.config.vision.image_size;
    let data_hash = store_examples(s, &id, &mut tasks, &what, files, image_size).await?;
    let [task] = tasks;
    ft.classes = task.classes;
    ft.examples = task.examples;
    let t = now();
    let c = Composition {
        id: id.clone(),
        name: Some(name.clone()),
        kind: "finetune".into(),
        status: Status::Queued,
        task_vectors: Vec::new(),
        layout: Layout::Isotropic,
        coefficients: None,
        progress: None,
        history: Vec::new(),
        summary: None,
        error: None,
        provenance: Provenance {
            backbone: model.backbone.id.clone(),
            backbone_digest: model.backbone.base_digest().to_string(),
            data_hash: Some(data_hash),
            seed: Some(config.seed),
            ..Provenance::default()
        },
        request: Some(JobRequest::Finetune(FinetuneJob {
            task_vector: name,
            finetune: ft,
            config,
        })),
        created_at: t,
        updated_at: t,
    };
    let inserted = s.store.insert(&c, None, Some(s.config.job_queue));
    if !matches!(inserted, Ok(Inserted::New)) {
        let _ = std::fs::remove_dir_all(s.store.job_dir(&id));
    }
    match inserted? {
        Inserted::New => {
            model.workers.notify();
            let location = format!("/compositions/{id}");
            Ok((
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(c),
            )
                .into_response())
        }
        Inserted::QueueFull(queued) => Err(queue_full(s, queued)),
        Inserted::Earlier(..) => Err(ApiError::internal("an unkeyed job matched a key")),
    }
}

/// The defaults with the request's overrides, each checked and named when wrong.
fn config(name: &str, o: &FinetuneOverrides, model: &Model) -> ApiResult<FinetuneConfig> {
    let d = FinetuneConfig::default();
    let c = FinetuneConfig {
        name: name.to_string(),
        epochs: o.epochs.unwrap_or(d.epochs),
        batch_size: o.batch_size.unwrap_or(d.batch_size),
        lr: o.lr.unwrap_or(d.lr),
        weight_decay: o.weight_decay.unwrap_or(d.weight_decay),
        warmup: o.warmup.unwrap_or(d.warmup),
        seed: o.seed.unwrap_or(d.seed),
        store: model.storage_dtype,
        ..d
    };
    let bad = |m: String| Err(ApiError::bad(format!("finetune.config.{m}")));
    if !(1..=MAX_EPOCHS).contains(&c.epochs) {
        return bad(format!("epochs must be between 1 and {MAX_EPOCHS}"));
    }
    if !(1..=MAX_BATCH).contains(&c.batch_size) {
        return bad(format!("batch_size must be between 1 and {MAX_BATCH}"));
    }
    if !(c.lr.is_finite() && c.lr > 0.0 && c.lr <= 10.0) {
        return bad("lr must be a number in (0, 10]".into());
    }
    if !(c.weight_decay.is_finite() && (0.0..=10.0).contains(&c.weight_decay)) {
        return bad("weight_decay must be a number in [0, 10]".into());
    }
    if !(0.0..=1.0).contains(&c.warmup) {
        return bad("warmup must be a fraction of the steps in [0, 1]".into());
    }
    Ok(c)
}

/// What a fine-tuning job needs from the workers.
pub struct Run<'a> {
    pub backbone: &'a Backbone,
    pub store: &'a Store,
    /// The replica running the job (its lease).
    pub owner: &'a str,
    pub library: &'a RwLock<Library>,
    pub metrics: &'a Metrics,
}

/// The epoch checkpoint: which file holds θ after how many epochs.
#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    epochs_done: usize,
    file: String,
    loss: f32,
}

const CHECKPOINT: &str = "finetune.json";

impl Run<'_> {
    /// Runs (or resumes) the job `c`, then adds its task vector to the library. `record` stores
    /// and publishes a progress event.
    pub fn run(
        &self,
        c: &Composition,
        job: &FinetuneJob,
        cancel: &AtomicBool,
        record: &mut dyn FnMut(&Event) -> Result<(), StoreError>,
    ) -> Result<(), LearnError> {
        let dir = self.store.job_dir(&c.id);
        let source = format!(
            "finetune job {} on examples sha256:{}",
            c.id,
            c.provenance.data_hash.as_deref().unwrap_or("")
        );
        // Added already by an earlier run that stopped before recording its end.
        let done = self
            .lock_library()
            .get(&job.task_vector)
            .is_some_and(|t| t.meta.source == source);
        if !done {
            self.train(job, &dir, &source, cancel, record)?;
        }
        let lib = self.library.write().unwrap_or_else(|p| p.into_inner());
        let tv = lib
            .get(&job.task_vector)
            .cloned()
            .ok_or_else(|| LearnError::Job("the fine-tuned task vector is gone".into()))?;
        // Under the library's lock, like a composition being created: a delete of the task
        // vector checks its users under it too.
        self.store
            .update_held(&c.id, self.owner, |c| {
                c.task_vectors = vec![tv.name().to_string()];
                c.provenance.task_vector_digests = vec![tv.digest().to_string()];
                c.layout = Layout::Isotropic;
                c.coefficients = Some(vec![1.0]);
                let loss = c.history.last().and_then(|e| e.loss);
                c.summary = Some(serde_json::json!({
                    "task_vector": tv.name(), "digest": tv.digest(), "final_loss": loss,
                }));
            })
            .map_err(|e| LearnError::Job(e.to_string()))?;
        drop(lib);
        remove_checkpoints(&dir);
        Ok(())
    }

    fn lock_library(&self) -> std::sync::RwLockReadGuard<'_, Library> {
        self.library.read().unwrap_or_else(|p| p.into_inner())
    }

    fn train(
        &self,
        job: &FinetuneJob,
        dir: &Path,
        source: &str,
        cancel: &AtomicBool,
        record: &mut dyn FnMut(&Event) -> Result<(), StoreError>,
    ) -> Result<(), LearnError> {
        let pre = Preprocess::from_config(self.backbone.config.vision.image_size);
        let mut pixels = Vec::with_capacity(job.finetune.examples.len());
        let mut labels = Vec::with_capacity(job.finetune.examples.len());
        for e in &job.finetune.examples {
            let file = e.file.as_deref().unwrap_or_default();
            let bytes = std::fs::read(dir.join(file))
                .map_err(|err| LearnError::Data(format!("example file {file}: {err}")))?;
            pixels.push(
                pre.from_bytes(&bytes)
                    .map_err(|err| LearnError::Data(format!("example file {file}: {err}")))?,
            );
            labels.push(e.label.unwrap_or_default());
        }
        let templates = heads::resolve_templates(&job.finetune.templates)
            .map_err(|e| LearnError::Job(e.detail))?;
        let t_refs: Vec<&str> = templates.iter().map(String::as_str).collect();
        let head = ZeroShotHead::build(self.backbone, &job.finetune.classes, &t_refs)?;
        let resume = self.resume(dir)?;
        let epochs = job.config.epochs;
        let started = Instant::now();
        let (start_epoch, start_kind) = match &resume {
            Some(r) => (r.epochs_done, EventKind::Resumed),
            None => (0, EventKind::Started),
        };
        let per_epoch = pixels.len().div_ceil(job.config.batch_size);
        let total = per_epoch * epochs;
        let event = |kind, epoch, step, loss, lr| {
            let elapsed = started.elapsed().as_secs_f64();
            let done_here = step - (start_epoch * per_epoch).min(step);
            Event {
                kind,
                epoch,
                epochs,
                step,
                total_steps: total,
                loss,
                lr,
                grad_norm: None,
                val_metric: None,
                elapsed_s: elapsed,
                eta_s: (done_here > 0).then(|| elapsed / done_here as f64 * (total - step) as f64),
            }
        };
        // Progress the store cannot keep (a full disk) stops the job, as for learning jobs.
        let refused: RefCell<Option<StoreError>> = RefCell::new(None);
        let record = RefCell::new(record);
        let emit = |e: Event| {
            if let Err(err) = (*record.borrow_mut())(&e) {
                refused.borrow_mut().get_or_insert(err);
                cancel.store(true, Ordering::Relaxed);
            }
        };
        emit(event(
            start_kind,
            start_epoch,
            start_epoch * per_epoch,
            None,
            0.0,
        ));
        // The rate of the epoch's last step, for its epoch event.
        let last_lr = std::cell::Cell::new(0.0);
        let mut progress = |s: &Step| {
            last_lr.set(s.lr);
            emit(event(
                EventKind::Step,
                s.epoch,
                s.step,
                Some(s.loss as f64),
                s.lr,
            ));
        };
        let mut on_epoch = |d: &EpochDone<'_>| -> Result<(), FinetuneError> {
            save_checkpoint(dir, d).map_err(|e| FinetuneError::Invalid(e.to_string()))?;
            let step = d.epochs_done * per_epoch;
            emit(event(
                EventKind::Epoch,
                d.epochs_done,
                step,
                Some(d.loss as f64),
                last_lr.get(),
            ));
            Ok(())
        };
        let data = Labelled {
            pixels: &pixels,
            labels: &labels,
        };
        let out = finetune_from(
            self.backbone,
            &head,
            data,
            &job.config,
            resume,
            &mut progress,
            &mut on_epoch,
            cancel,
        );
        if let Some(err) = refused.into_inner() {
            return Err(LearnError::Job(format!(
                "the store could not record the job's progress: {err}"
            )));
        }
        let mut tv = match out {
            Ok(ft) => ft.task_vector,
            Err(FinetuneError::Cancelled) => return Err(LearnError::Cancelled),
            Err(e) => return Err(LearnError::Job(e.to_string())),
        };
        tv.meta.source = source.to_string();
        drop(pixels);
        // One creation at a time with POST /task-vectors: the name is checked free, then the
        // file written and recorded, then the task vector added.
        let _one_at_a_time = super::task_vectors::CREATING.blocking_lock();
        if let Some(other) = self.lock_library().get(&job.task_vector) {
            return Err(LearnError::Job(format!(
                "a task vector named {:?} was added while the job ran ({})",
                job.task_vector, other.meta.source
            )));
        }
        super::task_vectors::keep(self.store, self.backbone, &tv)
            .map_err(|e| LearnError::Job(e.detail))?;
        let mut lib = self.library.write().unwrap_or_else(|p| p.into_inner());
        lib.add(tv).map_err(|e| LearnError::Job(e.to_string()))?;
        self.metrics
            .memory
            .with_label_values(&["library"])
            .set(lib.nbytes() as i64);
        Ok(())
    }

    /// θ after the last completed epoch, if a checkpoint is there.
    fn resume(&self, dir: &Path) -> Result<Option<Resume>, LearnError> {
        let Ok(bytes) = std::fs::read(dir.join(CHECKPOINT)) else {
            return Ok(None);
        };
        let ck: Checkpoint = serde_json::from_slice(&bytes)
            .map_err(|e| LearnError::Job(format!("the fine-tuning checkpoint: {e}")))?;
        let weights: HashMap<String, candle_core::Tensor> =
            candle_core::safetensors::load(dir.join(&ck.file), self.backbone.device())
                .map_err(|e| LearnError::Job(format!("the fine-tuning checkpoint: {e}")))?;
        Ok(Some(Resume {
            epochs_done: ck.epochs_done,
            weights,
        }))
    }
}

/// Writes θ to a file named by its epoch, then points `finetune.json` at it (each written to
/// a temporary name, synced and renamed), then removes the previous epoch's file: a crash at
/// any point leaves a checkpoint that matches its file.
fn save_checkpoint(dir: &Path, d: &EpochDone<'_>) -> std::io::Result<()> {
    let io = |e: candle_core::Error| std::io::Error::other(e.to_string());
    let file = format!("finetune-epoch{}.safetensors", d.epochs_done);
    let tmp = dir.join(format!("{file}.tmp"));
    candle_core::safetensors::save(d.weights, &tmp).map_err(io)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(&file))?;
    let ck = Checkpoint {
        epochs_done: d.epochs_done,
        file: file.clone(),
        loss: d.loss,
    };
    let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
    std::fs::write(
        &tmp,
        serde_json::to_vec(&ck).map_err(std::io::Error::other)?,
    )?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT))?;
    std::fs::File::open(dir)?.sync_all()?;
    let previous = format!("finetune-epoch{}.safetensors", d.epochs_done - 1);
    let _ = std::fs::remove_file(dir.join(previous));
    Ok(())
}

/// θ is the size of the model: once the task vector is kept, the checkpoints go.
fn remove_checkpoints(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("finetune") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}
