//! Learning jobs run on their own worker thread (serving goes on meanwhile): each job builds its
//! tasks' heads, learns Λ with atlas-learn, publishes progress into the registry and, on
//! success, makes the composition servable.

use super::api::{Objective, Status};
use super::metrics::Metrics;
use super::registry::Registry;
use atlas_clip::Backbone;
use atlas_core::TaskVector;
use atlas_learn::{learn, Dataset, Job, LearnConfig, LearnError, Task};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

pub struct TaskSpec {
    pub name: String,
    pub data: Dataset,
    pub templates: Vec<String>,
}

pub struct LearnSpec {
    pub id: String,
    pub objective: Objective,
    pub tasks: Vec<TaskSpec>,
    pub tvs: Vec<Arc<TaskVector>>,
    pub config: LearnConfig,
}

#[derive(Clone)]
pub struct Jobs {
    tx: SyncSender<LearnSpec>,
}

impl Jobs {
    pub fn start(
        backbone: Arc<Backbone>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        queue: usize,
    ) -> Self {
        let (tx, rx) = sync_channel::<LearnSpec>(queue);
        std::thread::Builder::new()
            .name("atlas-learn".into())
            .spawn(move || {
                while let Ok(spec) = rx.recv() {
                    let id = spec.id.clone();
                    let status = match run(&backbone, &registry, spec) {
                        Ok(()) => Status::Ready,
                        Err(e) => {
                            let status = if matches!(e, LearnError::Cancelled) {
                                Status::Cancelled
                            } else {
                                Status::Failed
                            };
                            registry.update(&id, |entry| {
                                entry.view.status = status;
                                entry.view.error = Some(e.to_string());
                            });
                            status
                        }
                    };
                    metrics
                        .jobs
                        .with_label_values(&[&format!("{status:?}").to_lowercase()])
                        .inc();
                }
            })
            .expect("learning thread");
        Jobs { tx }
    }

    /// Queues a job; false when the queue is full (or the worker has stopped).
    pub fn submit(&self, spec: LearnSpec) -> bool {
        self.tx.try_send(spec).is_ok()
    }
}

fn run(backbone: &Backbone, registry: &Registry, spec: LearnSpec) -> Result<(), LearnError> {
    let id = spec.id.clone();
    registry.update(&id, |e| e.view.status = Status::Running);
    let cancel = registry.cancel_flag(&id).unwrap_or_default();
    let job = build_job(backbone, spec.objective, spec.tasks)?;
    let mut on_event = |e: &atlas_learn::Event| {
        registry.update(&id, |entry| entry.view.progress = Some(e.clone()))
    };
    let out = learn(
        backbone,
        &spec.tvs,
        &job,
        &spec.config,
        &mut on_event,
        &cancel,
        None,
    )?;
    let summary = serde_json::json!({
        "objective": job.kind(), "metric": out.metric, "before": out.before, "after": out.after,
        "best_epoch": out.best_epoch, "history": out.history,
    });
    registry.update(&id, |entry| {
        entry.view.n_coefficients = out.coefs.values.len();
        entry.coefs = Some(out.coefs);
        entry.view.summary = Some(summary);
        entry.view.status = Status::Ready;
    });
    Ok(())
}

fn build_job(
    backbone: &Backbone,
    objective: Objective,
    specs: Vec<TaskSpec>,
) -> Result<Job, LearnError> {
    let mut tasks = specs
        .into_iter()
        .map(|s| {
            let t: Vec<&str> = s.templates.iter().map(String::as_str).collect();
            Task::new(backbone, &s.name, s.data, &t)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let one = |mut ts: Vec<Task>| ts.remove(0);
    Ok(match objective {
        Objective::FewShot => Job::FewShot(one(tasks)),
        Objective::Entropy => Job::Entropy(one(tasks)),
        Objective::Ufm => Job::Ufm(one(tasks)),
        Objective::MultiTask => Job::MultiTask(tasks),
        Objective::Negation => {
            let control = tasks.pop().expect("validated: two tasks");
            Job::Negation {
                target: tasks.pop().expect("two tasks"),
                control,
            }
        }
    })
}
