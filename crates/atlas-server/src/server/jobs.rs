//! Learning jobs: worker threads claim queued jobs from the store (oldest first), learn Λ with
//! atlas-learn off the serving path, publish progress to the store and to SSE subscribers, and
//! checkpoint every epoch into the job's directory, so that a job interrupted by a restart
//! resumes where it was.

use super::api::{
    BlockSelection, BudgetSelection, BudgetSpec, Composition, JobRequest, LearnRequest, Status,
    TaskData,
};
use super::metrics::Metrics;
use super::store::{now_ms, Claim, Store};
use atlas_clip::preprocess::Preprocess;
use atlas_clip::Backbone;
use atlas_core::{Coefficients, Layout, Library, TaskVector};
use atlas_learn::budget::{self, Budget, Selection};
use atlas_learn::{learn, Dataset, Event, EventKind, Job, LearnConfig, LearnError, Task};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// How the workers run.
pub struct WorkerSettings {
    pub workers: usize,
    /// Storage dtype of task vectors the jobs make (merges).
    pub storage_dtype: atlas_core::StorageDType,
    /// This replica's name in job leases.
    pub owner: String,
    pub lease: Duration,
}

/// What SSE subscribers receive: a job's status and, while it learns, its latest event.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub id: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Event>,
}

/// The learning workers: threads that claim queued jobs, with each running job's cancel flag,
/// and the heartbeat that renews this replica's leases on the jobs it runs.
pub struct Workers {
    store: Arc<Store>,
    /// This replica's name in the leases it takes.
    owner: String,
    lease: Duration,
    storage_dtype: atlas_core::StorageDType,
    backbone: Arc<Backbone>,
    library: Arc<RwLock<Library>>,
    metrics: Arc<Metrics>,
    wake: (Mutex<()>, Condvar),
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    stopping: AtomicBool,
    pub events: broadcast::Sender<JobEvent>,
}

impl Workers {
    /// Requeues jobs left running by a previous process (the embedded store's only one), and
    /// starts `workers` threads and the heartbeat.
    pub fn start(
        store: Arc<Store>,
        backbone: Arc<Backbone>,
        library: Arc<RwLock<Library>>,
        metrics: Arc<Metrics>,
        settings: WorkerSettings,
    ) -> Result<Arc<Workers>, super::store::StoreError> {
        let (resumed, failed) = store.requeue_running()?;
        if resumed > 0 {
            eprintln!("atlas-serve: {resumed} interrupted learning job(s) requeued; they resume from their checkpoints");
        }
        if failed > 0 {
            eprintln!("atlas-serve: {failed} learning job(s) failed: the server stopped abruptly under each of them {} times", super::store::MAX_INTERRUPTIONS);
        }
        let jobs = Arc::new(Workers {
            store,
            owner: settings.owner,
            lease: settings.lease,
            storage_dtype: settings.storage_dtype,
            backbone,
            library,
            metrics,
            wake: (Mutex::new(()), Condvar::new()),
            cancels: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            events: broadcast::channel(1024).0,
        });
        jobs.refresh_gauges();
        for i in 0..settings.workers {
            let j = jobs.clone();
            std::thread::Builder::new()
                .name(format!("atlas-learn-{i}"))
                .spawn(move || j.work())
                .expect("learning thread");
        }
        let j = jobs.clone();
        std::thread::Builder::new()
            .name("atlas-lease".into())
            .spawn(move || j.heartbeat())
            .expect("lease thread");
        Ok(jobs)
    }

    /// Renews this replica's leases every third of a lease. A job whose lease it no longer
    /// holds (cancelled or deleted on another replica, or taken over after a lapse) stops; so
    /// do all its jobs once the database has been unreachable for a whole lease, since another
    /// replica may then resume them.
    fn heartbeat(&self) {
        let mut renewed = Instant::now();
        while !self.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(self.lease / 3);
            let running: Vec<String> = self.lock_cancels().keys().cloned().collect();
            match self
                .store
                .renew(&self.owner, now_ms() + self.lease.as_millis() as i64)
            {
                Ok(held) => {
                    renewed = Instant::now();
                    for id in running.iter().filter(|id| !held.contains(id)) {
                        self.lost(id);
                    }
                }
                Err(e) if renewed.elapsed() >= self.lease => {
                    eprintln!("atlas-serve: job leases not renewed for {:?} ({e}): this replica's jobs stop; another replica resumes them", self.lease);
                    for id in &running {
                        self.metrics.leases_lost.inc();
                        self.cancel(id);
                    }
                }
                Err(e) => eprintln!("atlas-serve: renewing job leases: {e}"),
            }
        }
    }

    /// A running job is no longer under this replica's lease: it stops here.
    fn lost(&self, id: &str) {
        let taken = matches!(self.store.get(id), Ok(Some(c)) if c.status == Status::Running);
        if taken {
            eprintln!("atlas-serve: job {id}: the lease lapsed and another replica runs it; stopping here");
            self.metrics.leases_lost.inc();
        }
        self.cancel(id);
    }

    /// A new job is in the store: wake a worker.
    pub fn notify(&self) {
        self.refresh_gauges();
        self.wake.1.notify_one();
    }

    /// Asks a running job to stop; true when it was running here.
    pub fn cancel(&self, id: &str) -> bool {
        match self.lock_cancels().get(id) {
            Some(flag) => {
                flag.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    /// Shutdown: running jobs stop at their next step and go back to the queue (their last
    /// epoch checkpoint is on disk); no new job starts.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for flag in self.lock_cancels().values() {
            flag.store(true, Ordering::Relaxed);
        }
        self.wake.1.notify_all();
    }

    /// True while some worker is inside a job.
    pub fn busy(&self) -> bool {
        !self.lock_cancels().is_empty()
    }

    fn lock_cancels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn refresh_gauges(&self) {
        if let Ok(counts) = self.store.count_by_status() {
            for s in Status::ALL {
                let n = counts
                    .iter()
                    .find(|(k, _)| k == s.as_str())
                    .map_or(0, |c| c.1);
                self.metrics.jobs.with_label_values(&[s.as_str()]).set(n);
            }
        }
    }

    fn work(&self) {
        while !self.stopping.load(Ordering::Relaxed) {
            let until = now_ms() + self.lease.as_millis() as i64;
            match self.store.claim_next(&self.owner, until) {
                Ok(Some((c, how))) => {
                    let how = match how {
                        Claim::Queued => "queued",
                        Claim::Expired => {
                            eprintln!(
                                "atlas-serve: job {}: resumed here after its lease expired",
                                c.id
                            );
                            "expired"
                        }
                    };
                    self.metrics.job_claims.with_label_values(&[how]).inc();
                    self.run(c)
                }
                // New jobs wake a worker (here, or by another replica's notice); the timeout
                // is for leases expiring, which nothing announces.
                Ok(None) => {
                    let guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = self.wake.1.wait_timeout(guard, self.lease / 3);
                }
                Err(e) => {
                    eprintln!("atlas-serve: claiming a job: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn run(&self, c: Composition) {
        let id = c.id.clone();
        let flag = Arc::new(AtomicBool::new(false));
        self.lock_cancels().insert(id.clone(), flag.clone());
        // A cancel between the claim and the line above found no worker and cancelled the job
        // in the store: it stays cancelled.
        if !matches!(self.store.get(&id), Ok(Some(now)) if now.status == Status::Running) {
            self.lock_cancels().remove(&id);
            return;
        }
        self.publish(&id, Status::Running, None);
        self.refresh_gauges();
        let started = Instant::now();
        let result = self.learn(&c, &flag);
        self.lock_cancels().remove(&id);
        let objective = c.kind.clone();
        let status = match result {
            Ok(()) => Status::Succeeded,
            Err(LearnError::Cancelled) if self.stopping.load(Ordering::Relaxed) => Status::Queued,
            Err(LearnError::Cancelled) => Status::Cancelled,
            Err(_) => Status::Failed,
        };
        let error = match (&status, &result) {
            (Status::Failed, Err(e)) => Some(e.to_string()),
            _ => None,
        };
        let status = self.finish(&id, status, error);
        if status.is_final() {
            self.metrics
                .job_seconds
                .with_label_values(&[&objective])
                .observe(started.elapsed().as_secs_f64());
        }
        self.publish(&id, status, None);
        self.refresh_gauges();
    }

    /// Records how a job ended, retrying while the store refuses the write (a full disk):
    /// a job whose end is not recorded would look running forever. A cancel that reached the
    /// store meanwhile wins. Returns the status the store holds.
    fn finish(&self, id: &str, status: Status, error: Option<String>) -> Status {
        let mut logged = false;
        loop {
            let recorded = self.store.update_held(id, &self.owner, |c| {
                c.status = status;
                c.error = error.clone();
                c.updated_at = now();
            });
            match recorded {
                Ok(Some(c)) => return c.status,
                // Cancelled, deleted or taken over meanwhile: that stands.
                Ok(None) => {
                    return match self.store.get(id) {
                        Ok(Some(c)) => c.status,
                        _ => Status::Cancelled,
                    }
                }
                Err(e) if self.stopping.load(Ordering::Relaxed) => {
                    eprintln!("atlas-serve: job {id} ended {} but the store refused it ({e}); it is requeued at the next start", status.as_str());
                    return Status::Running;
                }
                Err(e) => {
                    if !logged {
                        eprintln!("atlas-serve: job {id} ended {}; the store refuses to record it, retrying every second: {e}", status.as_str());
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    pub fn publish(&self, id: &str, status: Status, progress: Option<Event>) {
        let _ = self.events.send(JobEvent {
            id: id.to_string(),
            status,
            progress,
        });
    }

    fn learn(&self, c: &Composition, cancel: &AtomicBool) -> Result<(), LearnError> {
        let req = match &c.request {
            Some(JobRequest::Learn(req)) => req,
            Some(JobRequest::Finetune(job)) => {
                let mut last_line = Instant::now();
                let mut record = |e: &Event| {
                    log_progress(&c.id, e, &mut last_line);
                    self.record(&c.id, e)
                };
                let run = super::finetune::Run {
                    backbone: &self.backbone,
                    store: &self.store,
                    owner: &self.owner,
                    library: &self.library,
                    metrics: &self.metrics,
                };
                return run.run(c, job, cancel, &mut record);
            }
            Some(JobRequest::Merge(req)) => {
                let mut last_line = Instant::now();
                let mut record = |e: &Event| {
                    log_progress(&c.id, e, &mut last_line);
                    self.record(&c.id, e)
                };
                let run = super::compositions::merge::MergeJob {
                    backbone: &self.backbone,
                    library: &self.library,
                    store: &self.store,
                    owner: &self.owner,
                    storage_dtype: self.storage_dtype,
                };
                return run.run(c, req, cancel, &mut record);
            }
            None => return Err(LearnError::Job("the job has no stored request".into())),
        };
        let dir = self.store.job_dir(&c.id);
        let tvs = self
            .library
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .select(&c.task_vectors)?;
        let job = build_job(&self.backbone, req, &dir)?;
        let config = c
            .provenance
            .config
            .clone()
            .ok_or_else(|| LearnError::Job("the job has no stored configuration".into()))?;
        let (tvs, selection) = match &req.budget {
            Some(spec) => self.budget(c, spec, tvs, &job, &config)?,
            None => (tvs, None),
        };
        let mut last_step = Instant::now();
        let mut last_line = Instant::now();
        let mut refused = None;
        let mut on_event = |e: &Event| {
            if e.kind == EventKind::Step {
                self.metrics
                    .step_seconds
                    .observe(last_step.elapsed().as_secs_f64());
                last_step = Instant::now();
            }
            log_progress(&c.id, e, &mut last_line);
            // Progress the store cannot keep (a full disk) would be lost, and the checkpoints
            // with it: the job stops and fails, saying why.
            if let Err(err) = self.record(&c.id, e) {
                refused.get_or_insert(err);
                cancel.store(true, Ordering::Relaxed);
            }
        };
        let learned = learn(
            &self.backbone,
            &tvs,
            &job,
            &config,
            &mut on_event,
            cancel,
            Some(&dir.join("checkpoint.json")),
        );
        let out = match (learned, refused) {
            (Err(LearnError::Cancelled), Some(err)) => {
                return Err(LearnError::Job(format!(
                    "the store could not record the job's progress: {err}"
                )))
            }
            (learned, _) => learned?,
        };
        let summary = serde_json::json!({
            "metric": out.metric, "before": out.before, "after": out.after,
            "best_epoch": out.best_epoch, "outcome": out.outcome, "warnings": out.warnings,
            "epochs": out.history,
        });
        let (layout, values) = match &selection {
            Some(Selection::Blockwise(ranked)) => spread(&out.coefs, ranked, c.task_vectors.len()),
            _ => (out.coefs.layout, out.coefs.values.clone()),
        };
        self.store
            .update_held(&c.id, &self.owner, |c| {
                c.layout = layout;
                c.coefficients = Some(values.clone());
                c.summary = Some(summary);
            })
            .map_err(|e| LearnError::Job(e.to_string()))?;
        Ok(())
    }

    /// The task vectors a job with a budget learns over, and the selection behind them. The
    /// selection is made once (one gradient pass) and recorded before training, so a resumed
    /// job learns over the same ones: a whole budget narrows the composition's task vectors to
    /// those kept; a blockwise one keeps them all and learns over mixed task vectors, whose
    /// coefficients [`spread`] maps back.
    fn budget(
        &self,
        c: &Composition,
        spec: &BudgetSpec,
        tvs: Vec<Arc<TaskVector>>,
        job: &Job,
        config: &LearnConfig,
    ) -> Result<(Vec<Arc<TaskVector>>, Option<Selection>), LearnError> {
        let manifest = self.backbone.manifest().clone();
        let selection = match &c.provenance.budget {
            // Recorded by an earlier run of this job: a whole budget's task vectors are the
            // composition's already.
            Some(rec) => match &rec.blocks {
                None => Selection::Whole((0..tvs.len()).collect()),
                Some(blocks) => {
                    let index = |n: &String| c.task_vectors.iter().position(|t| t == n);
                    let ranked = blocks
                        .iter()
                        .map(|b| b.task_vectors.iter().map(index).collect::<Option<Vec<_>>>())
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            LearnError::Job(
                                "the recorded budget names an unknown task vector".into(),
                            )
                        })?;
                    Selection::Blockwise(ranked)
                }
            },
            None => {
                let mode = match spec.blockwise {
                    true => Budget::Blockwise(spec.task_vectors),
                    false => Budget::Whole(spec.task_vectors),
                };
                let selection = budget::rank(&self.backbone, &tvs, job, config, mode)?;
                let name = |i: &usize| c.task_vectors[*i].clone();
                let rec = match &selection {
                    Selection::Whole(kept) => BudgetSelection {
                        task_vectors: spec.task_vectors,
                        blockwise: spec.blockwise,
                        kept: kept.iter().map(name).collect(),
                        blocks: None,
                    },
                    Selection::Blockwise(ranked) => {
                        let mut kept: Vec<String> = Vec::new();
                        for i in
                            (0..spec.task_vectors).flat_map(|j| ranked.iter().map(move |r| r[j]))
                        {
                            if !kept.contains(&c.task_vectors[i]) {
                                kept.push(c.task_vectors[i].clone());
                            }
                        }
                        let blocks = manifest
                            .blocks()
                            .iter()
                            .zip(ranked)
                            .map(|(b, r)| BlockSelection {
                                block: b.name.clone(),
                                task_vectors: r.iter().map(name).collect(),
                            })
                            .collect();
                        BudgetSelection {
                            task_vectors: spec.task_vectors,
                            blockwise: true,
                            kept,
                            blocks: Some(blocks),
                        }
                    }
                };
                let whole = match &selection {
                    Selection::Whole(kept) => Some(kept.clone()),
                    Selection::Blockwise(_) => None,
                };
                self.store
                    .update_held(&c.id, &self.owner, |c| {
                        if let Some(kept) = &whole {
                            let digests = &c.provenance.task_vector_digests;
                            let digests = kept.iter().map(|&i| digests[i].clone()).collect();
                            c.task_vectors = rec.kept.clone();
                            c.provenance.task_vector_digests = digests;
                        }
                        c.provenance.budget = Some(rec.clone());
                        c.updated_at = now();
                    })
                    .map_err(|e| LearnError::Job(e.to_string()))?;
                selection
            }
        };
        let kept = budget::apply(&self.backbone, &tvs, &selection)?;
        Ok((kept, Some(selection)))
    }

    /// Stores a progress event (epoch events also join the history) and publishes it. A job no
    /// longer under this replica's lease (cancelled elsewhere, or taken over) stops instead.
    pub(super) fn record(&self, id: &str, e: &Event) -> Result<(), super::store::StoreError> {
        let held = self.store.update_held(id, &self.owner, |c| {
            if matches!(e.kind, EventKind::Epoch | EventKind::Resumed) {
                c.history.push(e.clone());
            }
            c.progress = Some(e.clone());
            c.updated_at = now();
        })?;
        match held {
            Some(_) => self.publish(id, Status::Running, Some(e.clone())),
            None => {
                self.cancel(id);
            }
        }
        Ok(())
    }
}

/// The learning job of a stored request: its examples are files in the job's directory.
fn build_job(backbone: &Backbone, req: &LearnRequest, dir: &Path) -> Result<Job, LearnError> {
    let tasks = req
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| task(backbone, i, t, dir))
        .collect::<Result<Vec<_>, _>>()?;
    Job::from_tasks(req.objective, tasks)
}

fn task(backbone: &Backbone, i: usize, t: &TaskData, dir: &Path) -> Result<Task, LearnError> {
    let data = dataset(backbone, t, dir)?;
    let templates = templates(t)?;
    let t_refs: Vec<&str> = templates.iter().map(String::as_str).collect();
    let name = t.name.clone().unwrap_or_else(|| format!("task{i}"));
    Task::new(backbone, &name, data, &t_refs)
}

/// A stored task's templates, resolved.
pub(crate) fn templates(t: &TaskData) -> Result<Vec<String>, LearnError> {
    super::heads::resolve_templates(&t.templates).map_err(|e| LearnError::Job(e.detail))
}

/// A stored task's examples, read from the job's directory.
pub(crate) fn dataset(
    backbone: &Backbone,
    t: &TaskData,
    dir: &Path,
) -> Result<Dataset, LearnError> {
    let items = t
        .examples
        .iter()
        .map(|e| {
            let file = e.file.as_deref().unwrap_or_default();
            let bytes = std::fs::read(dir.join(file))
                .map_err(|err| LearnError::Data(format!("example file {file}: {err}")))?;
            Ok((bytes, e.label))
        })
        .collect::<Result<Vec<_>, LearnError>>()?;
    let pre = Preprocess::from_config(backbone.config.vision.image_size);
    Dataset::from_bytes(t.classes.clone(), items, &pre)
}

/// Time between a running job's progress lines in the log.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The log shows long jobs moving (events and SSE have every step): a line per `LOG_EVERY`.
fn log_progress(id: &str, e: &Event, last_line: &mut Instant) {
    if e.kind == EventKind::Step && last_line.elapsed() >= LOG_EVERY {
        *last_line = Instant::now();
        eprintln!("atlas-serve: job {id}: {}", progress_line(e));
    }
}

fn progress_line(e: &Event) -> String {
    let pct = 100.0 * e.step as f64 / e.total_steps.max(1) as f64;
    let eta = e.eta_s.map_or("unknown".into(), |s| format!("{s:.0} s"));
    format!(
        "step {}/{} ({pct:.0} %), epoch {}/{}, loss {:.4}, {:.0} s, eta {eta}",
        e.step,
        e.total_steps,
        e.epoch + 1,
        e.epochs,
        e.loss.unwrap_or(f64::NAN),
        e.elapsed_s
    )
}

/// Coefficients learned over blockwise-mixed task vectors, written over the original `n_tv`
/// ones: block b of mixed vector j is block b of original `ranked[b][j]`, so that original
/// takes its coefficient there and every block not kept is 0. Per block at least (an
/// isotropic scalar of a mixed vector lands on different originals per block).
fn spread(coefs: &Coefficients, ranked: &[Vec<usize>], n_tv: usize) -> (Layout, Vec<f64>) {
    let layout = match coefs.layout {
        Layout::Isotropic => Layout::PerBlock,
        l => l,
    };
    let k = coefs.parts();
    let n_blocks = ranked.len();
    let mut values = vec![0.0; n_tv * n_blocks * k];
    for (b, r) in ranked.iter().enumerate() {
        for (j, &i) in r.iter().enumerate() {
            let at = (i * n_blocks + b) * k;
            values[at..at + k].copy_from_slice(coefs.block(j, b));
        }
    }
    (layout, values)
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::spread;
    use atlas_core::{Coefficients, Layout};

    #[test]
    fn spread_puts_each_mixed_coefficient_on_the_original_of_its_block() {
        // 3 originals, 2 blocks, 2 mixed vectors; block 0 keeps originals 2 then 0, block 1
        // keeps 1 then 2.
        let ranked = vec![vec![2, 0], vec![1, 2]];
        let iso = Coefficients::new(Layout::Isotropic, 2, 2, vec![0.5, -1.0]).unwrap();
        let (layout, v) = spread(&iso, &ranked, 3);
        assert_eq!(layout, Layout::PerBlock);
        // Rows: original 0, 1, 2; columns: block 0, 1.
        assert_eq!(v, [-1.0, 0.0, 0.0, 0.5, 0.5, -1.0]);

        let parts = Layout::PerPart { k: 2, seed: 3 };
        let pp = Coefficients::new(parts, 2, 2, (1..=8).map(f64::from).collect()).unwrap();
        let (layout, v) = spread(&pp, &ranked, 3);
        assert_eq!(layout, parts);
        // Mixed j, block b, part p is value 4j + 2b + p + 1.
        let want = [5., 6., 0., 0., 0., 0., 3., 4., 1., 2., 7., 8.];
        assert_eq!(v, want);
    }
}
