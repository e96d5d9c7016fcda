//! Merges by FusionBench method name (a body with `method`). Simple average and task
//! arithmetic give coefficients: an isotropic composition of the inputs. The other methods
//! build a new delta, added to the library as a derived task vector (its source records the
//! method, every parameter, seed included, and the inputs' digests) and served as a
//! composition of it with the method's scaling factor, so caching, heat maps, provenance,
//! deletion and digest bindings are those of any composition.
//!
//! Merges whose work is minutes on ViT-B/32 (the SVD merges, WUDI's gradient steps) and those
//! that read each input model on its task's images (RegMean, RegMean++, Fisher merging: `tasks`, one per
//! task vector, stored like a learning job's examples) run as jobs on the learning workers:
//! 202 with a queued composition whose progress is followed like a learning job's; the others
//! run in the request (201).

use super::examples::store_examples;
use super::learning::{check_queue, queue_full, MAX_TASKS};
use super::{check_name, insert_bound, new_id, provenance, select};
use crate::server::api::*;
use crate::server::background::{self, Pool};
use crate::server::body::{parse, Body, FilePart};
use crate::server::error::{ApiError, ApiResult};
use crate::server::jobs::now;
use crate::server::store::{Inserted, Store, StoreError};
use crate::server::task_vectors::{self, add_derived};
use crate::server::{heads, jobs};
use crate::server::{AppState, Model};
use atlas_clip::{Backbone, ZeroShotHead};
use atlas_core::merge::{self, Merged, Method};
use atlas_core::{Layout, Library, Manifest, StorageDType, TaskVector, TaskVectorMeta};
use atlas_learn::merge_data::{merge_on_data, Watch};
use atlas_learn::{Event, EventKind, LearnError};
use axum::http::StatusCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Whether the method runs as a job: its work grows with the square or cube of a layer's width
/// (an SVD per tensor, or WUDI's products per step), minutes on ViT-B/32.
fn runs_as_job(method: &Method) -> bool {
    matches!(method, Method::Iso(_) | Method::Tsv(_) | Method::Wudi(_)) || reads_data(method)
}

fn reads_data(method: &Method) -> bool {
    method.examples().is_some()
}

/// One merge at a time: each reads every input in full and holds its result (a model's worth
/// of f32 or more), so concurrent merges would multiply that.
static MERGING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);

pub(super) async fn merge(
    s: &AppState,
    model: &Model,
    body: Body,
) -> ApiResult<(StatusCode, Composition)> {
    let req: MergeRequest = parse(body.json, "merge request")?;
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
        .and_then(|m| m.check(model.backbone.manifest()).map(|()| m))
        .map_err(|e| ApiError::bad(e.to_string()))?;
    check_tasks(s, &req, &method)?;
    let record = MergeRecord {
        method: method.name().into(),
        params: method.params(),
        inputs: req.task_vectors.clone(),
        input_digests: inputs.iter().map(|t| t.digest().to_string()).collect(),
    };
    if runs_as_job(&method) {
        let c = queue(s, model, req, record, &inputs, body.files).await?;
        return Ok((StatusCode::ACCEPTED, c));
    }
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
            let tv = derived(
                model.backbone.manifest(),
                model.storage_dtype,
                &record,
                base,
                req.task_vector,
                &blocks,
            )?;
            let tv = add_derived(s, model, tv).await?;
            (vec![tv.name().to_string()], vec![tv], vec![scale])
        }
    };
    let mut c = composition(
        req.name,
        names,
        Provenance {
            merge: Some(record),
            ..provenance(model, &tvs)
        },
    );
    c.status = Status::Succeeded;
    c.coefficients = Some(coefficients);
    insert_bound(s, model, &c, None, None)?;
    Ok((StatusCode::CREATED, c))
}

/// A data merge reads one task per task vector, each with images (and for Fisher merging
/// class names for its head), within the server's bounds on examples; other merges read none.
fn check_tasks(s: &AppState, req: &MergeRequest, method: &Method) -> ApiResult<()> {
    if !reads_data(method) {
        return match req.tasks.is_empty() {
            true => Ok(()),
            false => Err(ApiError::bad(format!(
                "tasks: {} reads no data (only regmean, regmean_plusplus and fisher_merging do)",
                method.name()
            ))),
        };
    }
    if req.tasks.len() != req.task_vectors.len() || req.tasks.len() > MAX_TASKS {
        return Err(ApiError::bad(format!(
            "tasks: {} reads one task per task vector, in order (at most {MAX_TASKS}): {} task vectors, {} tasks",
            method.name(),
            req.task_vectors.len(),
            req.tasks.len()
        )));
    }
    let total: usize = req.tasks.iter().map(|t| t.examples.len()).sum();
    if total > s.config.max_examples {
        return Err(ApiError::bad(format!(
            "tasks: {total} examples in all; at most {} per job",
            s.config.max_examples
        )));
    }
    for (i, t) in req.tasks.iter().enumerate() {
        if t.examples.is_empty() {
            return Err(ApiError::bad(format!("task {i} has no examples")));
        }
        if matches!(method, Method::Fisher(_)) {
            heads::head_for(s, t.classes.clone(), &t.templates)
                .map_err(|e| ApiError::bad(format!("task {i}: {}", e.detail)))?;
        }
    }
    Ok(())
}

/// Queues a merge job: the composition names its inputs until the job replaces them with the
/// derived task vector. A data merge's images are stored first, like a learning job's.
async fn queue(
    s: &AppState,
    model: &Model,
    mut req: MergeRequest,
    record: MergeRecord,
    inputs: &[Arc<TaskVector>],
    files: Vec<FilePart>,
) -> ApiResult<Composition> {
    check_queue(s)?;
    let mut c = composition(
        req.name.clone(),
        req.task_vectors.clone(),
        Provenance {
            merge: Some(record),
            ..provenance(model, inputs)
        },
    );
    if !req.tasks.is_empty() {
        let what = |i, j| format!("task {i} example {j}");
        let size = model.backbone.config.vision.image_size;
        let hash = store_examples(s, &c.id, &mut req.tasks, &what, files, size).await?;
        c.provenance.data_hash = Some(hash);
    }
    c.request = Some(JobRequest::Merge(req));
    let inserted = insert_bound(s, model, &c, None, Some(s.config.job_queue));
    if !matches!(inserted, Ok(Inserted::New)) {
        let _ = std::fs::remove_dir_all(s.store.job_dir(&c.id));
    }
    match inserted? {
        Inserted::QueueFull(queued) => Err(queue_full(s, queued)),
        _ => {
            model.workers.notify();
            Ok(c)
        }
    }
}

/// A merge's composition, queued with no coefficients yet: an isotropic one of `task_vectors`.
fn composition(
    name: Option<String>,
    task_vectors: Vec<String>,
    provenance: Provenance,
) -> Composition {
    let t = now();
    Composition {
        id: new_id(),
        name,
        kind: "merge".into(),
        status: Status::Queued,
        task_vectors,
        layout: Layout::Isotropic,
        coefficients: None,
        progress: None,
        history: Vec::new(),
        summary: None,
        error: None,
        provenance,
        request: None,
        created_at: t,
        updated_at: t,
    }
}

/// What a merge job needs from the worker that runs it.
pub(crate) struct MergeJob<'a> {
    pub backbone: &'a Backbone,
    pub library: &'a RwLock<Library>,
    pub store: &'a Store,
    /// The replica running it (its lease).
    pub owner: &'a str,
    pub storage_dtype: StorageDType,
}

/// How often a running merge's progress is recorded.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

impl MergeJob<'_> {
    /// Runs the merge of job `c` (its inputs must still have the digests it was queued with),
    /// recording progress per tensor, then adds the derived task vector and makes the job's
    /// composition serve it. A cancel takes effect between blocks (data merges: between
    /// batches and layers).
    pub fn run(
        &self,
        c: &Composition,
        req: &MergeRequest,
        cancel: &AtomicBool,
        record: &mut dyn FnMut(&Event) -> Result<(), StoreError>,
    ) -> Result<(), LearnError> {
        let job = |e: String| LearnError::Job(e);
        let rec = c
            .provenance
            .merge
            .clone()
            .ok_or_else(|| job("no merge record".into()))?;
        let inputs = self
            .library
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .select(&req.task_vectors)?;
        for (tv, digest) in inputs.iter().zip(&rec.input_digests) {
            if tv.digest() != digest {
                return Err(job(format!(
                    "task vector {:?} changed since the merge was queued (digest {digest}, now {})",
                    tv.name(),
                    tv.digest()
                )));
            }
        }
        let method = Method::parse(&req.method, &req.params, inputs.len())
            .map_err(|e| job(e.to_string()))?;
        let merged = match reads_data(&method) {
            true => self.compute_on_data(c, req, &method, &inputs, cancel, record)?,
            false => self.compute(&method, &inputs, cancel, record)?,
        };
        let Merged::Delta { blocks, scale } = merged else {
            return Err(job("a merge job's method gives a delta".into()));
        };
        let tv = derived(
            self.backbone.manifest(),
            self.storage_dtype,
            &rec,
            inputs[0].meta.clone(),
            req.task_vector.clone(),
            &blocks,
        )
        .map_err(|e| job(e.detail))?;
        let tv = self.keep(tv)?;
        self.store
            .update_held(&c.id, self.owner, |c| {
                c.task_vectors = vec![tv.name().to_string()];
                c.provenance.task_vector_digests = vec![tv.digest().to_string()];
                c.coefficients = Some(vec![scale]);
                c.summary = Some(serde_json::json!({
                    "task_vector": tv.name(), "digest": tv.digest(),
                }));
            })
            .map_err(|e| job(e.to_string()))?;
        Ok(())
    }

    /// The merge on a thread of its own; this one records its progress meanwhile.
    fn compute(
        &self,
        method: &Method,
        inputs: &[Arc<TaskVector>],
        cancel: &AtomicBool,
        record: &mut dyn FnMut(&Event) -> Result<(), StoreError>,
    ) -> Result<Merged, LearnError> {
        let (done, total) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let started = Instant::now();
        let manifest = self.backbone.manifest();
        let merged = std::thread::scope(|scope| {
            let work = scope.spawn(|| {
                let refs: Vec<&TaskVector> = inputs.iter().map(Arc::as_ref).collect();
                let progress = |d, t| {
                    done.store(d, Ordering::Relaxed);
                    total.store(t, Ordering::Relaxed);
                };
                merge::merge_reporting(method, manifest, &refs, &progress, cancel)
            });
            let mut recorded = 0;
            while !work.is_finished() {
                std::thread::sleep(PROGRESS_EVERY);
                let d = done.load(Ordering::Relaxed);
                if d > recorded {
                    recorded = d;
                    let e = step_event(d, total.load(Ordering::Relaxed), started);
                    if let Err(e) = record(&e) {
                        eprintln!("atlas-serve: recording a merge's progress: {e}");
                    }
                }
            }
            work.join()
        });
        match merged.map_err(|_| LearnError::Job("the merge panicked".into()))? {
            _ if cancel.load(Ordering::Relaxed) => Err(LearnError::Cancelled),
            Err(e) => Err(LearnError::Job(e.to_string())),
            Ok(merged) => Ok(merged),
        }
    }

    /// A data merge: each input model read on its task's stored images, progress recorded
    /// every `PROGRESS_EVERY`, cancelled between batches and between layers solved.
    fn compute_on_data(
        &self,
        c: &Composition,
        req: &MergeRequest,
        method: &Method,
        inputs: &[Arc<TaskVector>],
        cancel: &AtomicBool,
        record: &mut dyn FnMut(&Event) -> Result<(), StoreError>,
    ) -> Result<Merged, LearnError> {
        let dir = self.store.job_dir(&c.id);
        let data = req
            .tasks
            .iter()
            .map(|t| jobs::dataset(self.backbone, t, &dir))
            .collect::<Result<Vec<_>, _>>()?;
        let heads = match method {
            Method::Fisher(_) => req
                .tasks
                .iter()
                .map(|t| {
                    let templates = jobs::templates(t)?;
                    let refs: Vec<&str> = templates.iter().map(String::as_str).collect();
                    Ok(ZeroShotHead::build(self.backbone, &t.classes, &refs)?)
                })
                .collect::<Result<Vec<_>, LearnError>>()?,
            _ => Vec::new(),
        };
        let started = Instant::now();
        let mut last: Option<Instant> = None;
        let mut progress = |done: usize, total: usize| {
            if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) && done < total {
                return;
            }
            last = Some(Instant::now());
            if let Err(e) = record(&step_event(done, total, started)) {
                eprintln!("atlas-serve: recording a merge's progress: {e}");
            }
        };
        merge_on_data(
            self.backbone,
            method,
            inputs,
            &data.iter().collect::<Vec<_>>(),
            &heads.iter().collect::<Vec<_>>(),
            Watch {
                progress: &mut progress,
                cancel,
            },
        )
    }

    /// Adds the derived task vector to the library (kept durably first), or the one already
    /// there with the same deltas.
    fn keep(&self, tv: TaskVector) -> Result<Arc<TaskVector>, LearnError> {
        let _one_at_a_time = task_vectors::CREATING.blocking_lock();
        let lib = self.library.read().unwrap_or_else(|p| p.into_inner());
        if let Some(same) = lib.by_digest(tv.digest()) {
            return Ok(same.clone());
        }
        if lib.get(tv.name()).is_some() {
            return Err(LearnError::Job(format!(
                "a task vector named {:?} was added while the merge ran",
                tv.name()
            )));
        }
        drop(lib);
        task_vectors::keep(self.store, self.backbone, &tv)
            .map_err(|e| LearnError::Job(e.detail))?;
        let name = tv.name().to_string();
        let mut lib = self.library.write().unwrap_or_else(|p| p.into_inner());
        if lib.get(&name).is_none() {
            lib.add(tv).map_err(|e| LearnError::Job(e.to_string()))?;
        }
        lib.get(&name)
            .cloned()
            .ok_or_else(|| LearnError::Job("the derived task vector is gone".into()))
    }
}

/// A merge job's progress: `done` of `total` tensors.
fn step_event(done: usize, total: usize, started: Instant) -> Event {
    let elapsed = started.elapsed().as_secs_f64();
    Event {
        kind: EventKind::Step,
        epoch: 0,
        epochs: 1,
        step: done,
        total_steps: total,
        loss: None,
        lr: 0.0,
        grad_norm: None,
        val_metric: None,
        elapsed_s: elapsed,
        eta_s: (done > 0).then(|| elapsed / done as f64 * total.saturating_sub(done) as f64),
    }
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
    manifest: &Manifest,
    dtype: StorageDType,
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
    let mut tv = merge::to_task_vector(manifest, meta, dtype, blocks)
        .map_err(|e| ApiError::bad(format!("task_vector: {e}")))?;
    if name.is_none() {
        tv.meta.name = format!("{}-{}", record.method, &tv.digest()[..12]);
    }
    Ok(tv)
}
