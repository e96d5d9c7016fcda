//! Learning jobs: worker threads claim queued jobs from the store (oldest first), learn Λ with
//! atlas-learn off the serving path, publish progress to the store and to SSE subscribers, and
//! checkpoint every epoch into the job's directory, so that a job interrupted by a restart
//! resumes where it was.

use super::api::{Composition, LearnRequest, Status, TaskData};
use super::metrics::Metrics;
use super::store::Store;
use atlas_clip::preprocess::Preprocess;
use atlas_clip::Backbone;
use atlas_core::Library;
use atlas_learn::{learn, Dataset, Event, EventKind, Job, LearnError, Task};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;

/// What SSE subscribers receive: a job's status and, while it learns, its latest event.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    pub id: String,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Event>,
}

/// The learning workers: threads that claim queued jobs, with each running job's cancel flag.
pub struct Workers {
    store: Arc<Store>,
    backbone: Arc<Backbone>,
    library: Arc<RwLock<Library>>,
    metrics: Arc<Metrics>,
    wake: (Mutex<()>, Condvar),
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    stopping: AtomicBool,
    pub events: broadcast::Sender<JobEvent>,
}

impl Workers {
    /// Requeues jobs left running by a previous process and starts `workers` threads.
    pub fn start(
        store: Arc<Store>,
        backbone: Arc<Backbone>,
        library: Arc<RwLock<Library>>,
        metrics: Arc<Metrics>,
        workers: usize,
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
            backbone,
            library,
            metrics,
            wake: (Mutex::new(()), Condvar::new()),
            cancels: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            events: broadcast::channel(1024).0,
        });
        jobs.refresh_gauges();
        for i in 0..workers {
            let j = jobs.clone();
            std::thread::Builder::new()
                .name(format!("atlas-learn-{i}"))
                .spawn(move || j.work())
                .expect("learning thread");
        }
        Ok(jobs)
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
            match self.store.claim_next() {
                Ok(Some(c)) => self.run(c),
                Ok(None) => {
                    let guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = self.wake.1.wait_timeout(guard, Duration::from_secs(1));
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
            let recorded = self.store.update(id, |c| {
                if c.status == Status::Running {
                    c.status = status;
                    c.error = error.clone();
                    c.updated_at = now();
                }
            });
            match recorded {
                Ok(c) => return c.map_or(status, |c| c.status),
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
        let req = c
            .request
            .as_ref()
            .ok_or_else(|| LearnError::Job("the job has no stored request".into()))?;
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
            // The log shows long jobs moving (events and SSE have every step).
            if e.kind == EventKind::Step && last_line.elapsed() >= LOG_EVERY {
                last_line = Instant::now();
                eprintln!("atlas-serve: job {}: {}", c.id, progress_line(e));
            }
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
        self.store
            .update(&c.id, |c| {
                c.coefficients = Some(out.coefs.values.clone());
                c.summary = Some(summary);
            })
            .map_err(|e| LearnError::Job(e.to_string()))?;
        Ok(())
    }

    /// Stores a progress event (epoch events also join the history) and publishes it.
    fn record(&self, id: &str, e: &Event) -> Result<(), super::store::StoreError> {
        self.store.update(id, |c| {
            if matches!(e.kind, EventKind::Epoch | EventKind::Resumed) {
                c.history.push(e.clone());
            }
            c.progress = Some(e.clone());
            c.updated_at = now();
        })?;
        self.publish(id, Status::Running, Some(e.clone()));
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
    let data = Dataset::from_bytes(t.classes.clone(), items, &pre)?;
    let templates =
        super::heads::resolve_templates(&t.templates).map_err(|e| LearnError::Job(e.detail))?;
    let t_refs: Vec<&str> = templates.iter().map(String::as_str).collect();
    let name = t.name.clone().unwrap_or_else(|| format!("task{i}"));
    Task::new(backbone, &name, data, &t_refs)
}

/// Time between a running job's progress lines in the log.
const LOG_EVERY: Duration = Duration::from_secs(10);

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

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
