//! The engine: one thread that runs forward passes for serving, and nothing else (heads and
//! composed towers are built on threads of their own and handed to it with each request).
//! Requests arrive on a bounded channel (full means 429, not an unbounded queue); the thread
//! waits up to `max_wait` for more, groups requests by (composition, head) into forward batches
//! and answers each request on its own oneshot channel.

use super::api::Prediction;
use super::metrics::Metrics;
use atlas_clip::{Backbone, ClipError, VisionTower, ZeroShotHead};
use atlas_core::{Coefficients, TaskVector};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What to compose: None is the pre-trained model.
pub struct Target {
    /// Composition id plus the digests of its task vectors.
    pub key: String,
    pub tvs: Vec<Arc<TaskVector>>,
    pub coefs: Coefficients,
}

/// One /classify request's images as the engine thread receives them, with where to answer.
pub struct EngineRequest {
    /// The composition's cache key (see [`super::composer::key`]) and its composed tower.
    pub key: String,
    pub tower: Arc<VisionTower>,
    /// The head's id (requests with the same composition and head share a forward pass).
    pub head_id: String,
    pub head: Arc<ZeroShotHead>,
    /// CHW pixels at the model's image size, preprocessed off the engine thread.
    pub pixels: Vec<Vec<f32>>,
    pub top_k: usize,
    pub reply: oneshot::Sender<Result<Vec<Vec<Prediction>>, EngineError>>,
}

impl EngineRequest {
    fn group_key(&self) -> (&str, &str) {
        (&self.key, &self.head_id)
    }
}

#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<EngineRequest>,
    queue: usize,
    alive: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

/// Why the engine could not answer a request. Clone: one failure answers a whole batch.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The head could not be built from the request's class names and templates.
    #[error("building the head: {0}")]
    Head(Arc<ClipError>),
    /// Composing the model or running it failed.
    #[error("running the model: {0}")]
    Model(Arc<ClipError>),
    /// The model's outputs are not finite numbers: its weights or activations overflow the
    /// serving dtype (coefficients too large for it).
    #[error("the composed model's outputs overflow {dtype:?}: its coefficients are too large for that dtype (serve it at f32, or use smaller coefficients)")]
    NonFinite { dtype: candle_core::DType },
}

impl EngineError {
    pub fn model(e: impl Into<ClipError>) -> Self {
        EngineError::Model(Arc::new(e.into()))
    }
}

/// Why a request was not queued.
pub enum Refused {
    Full,
    Stopped,
}

/// Marks the engine dead when its thread ends, by return or by panic.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

pub struct EngineSettings {
    pub queue: usize,
    pub max_batch: usize,
    pub max_wait: Duration,
}

impl Engine {
    pub fn start(backbone: Arc<Backbone>, metrics: Arc<Metrics>, s: EngineSettings) -> Self {
        let (tx, rx) = sync_channel(s.queue);
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        metrics.queue_capacity.set(s.queue as i64);
        let mut worker = Worker {
            backbone,
            metrics: metrics.clone(),
            max_batch: s.max_batch,
            max_wait: s.max_wait,
        };
        std::thread::Builder::new()
            .name("atlas-engine".into())
            .spawn(move || {
                let _guard = guard;
                worker.run(rx)
            })
            .expect("engine thread");
        Engine {
            tx,
            queue: s.queue,
            alive,
            metrics,
        }
    }

    /// Queues a request, or says why not.
    pub fn submit(&self, request: EngineRequest) -> Result<(), Refused> {
        match self.tx.try_send(request) {
            Ok(()) => {
                self.metrics.queue_depth.inc();
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(Refused::Full),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Stopped),
        }
    }

    /// True while the queue is full: callers refuse before decoding images they could not
    /// queue (under overload, that decoding took the cores the engine needed).
    pub fn is_full(&self) -> bool {
        self.metrics.queue_depth.get() >= self.queue as i64
    }

    /// False once the engine thread has ended (health checks report it).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

struct Worker {
    backbone: Arc<Backbone>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    max_wait: Duration,
}

impl Worker {
    fn run(&mut self, rx: Receiver<EngineRequest>) {
        while let Ok(first) = rx.recv() {
            let mut requests = vec![first];
            let mut images = requests[0].pixels.len();
            let deadline = Instant::now() + self.max_wait;
            while images < self.max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(more) => {
                        images += more.pixels.len();
                        requests.push(more);
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            self.metrics.queue_depth.sub(requests.len() as i64);
            for group in group_requests(requests) {
                self.serve_group(group);
            }
        }
    }

    fn serve_group(&mut self, group: Vec<EngineRequest>) {
        // Requests whose caller gave up (timeout, closed connection) are not computed.
        let group: Vec<EngineRequest> =
            group.into_iter().filter(|j| !j.reply.is_closed()).collect();
        if group.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self.predict(&group);
        self.metrics
            .classify_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(mut per_request) => {
                for request in group.into_iter().rev() {
                    let preds = per_request.pop().expect("one result per request");
                    let _ = request.reply.send(Ok(preds));
                }
            }
            Err(e) => {
                for request in group {
                    let _ = request.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn predict(
        &mut self,
        group: &[EngineRequest],
    ) -> Result<Vec<Vec<Vec<Prediction>>>, EngineError> {
        let first = &group[0];
        let tower = first.tower.clone();
        let head = first.head.clone();
        let pixels: Vec<&Vec<f32>> = group.iter().flat_map(|j| j.pixels.iter()).collect();
        let pre =
            atlas_clip::preprocess::Preprocess::from_config(self.backbone.config.vision.image_size);
        let mut probs = Vec::with_capacity(pixels.len());
        for chunk in pixels.chunks(self.max_batch) {
            self.metrics.batch_size.observe(chunk.len() as f64);
            let owned: Vec<Vec<f32>> = chunk.iter().map(|p| (*p).clone()).collect();
            let batch = pre
                .batch(&owned, self.backbone.device())
                .map_err(EngineError::model)?;
            let emb = tower.forward(&batch).map_err(EngineError::model)?;
            let logits = head.logits(&emb).map_err(EngineError::model)?;
            let p = head.probabilities(&logits).map_err(EngineError::model)?;
            if p.iter().flatten().any(|x| !x.is_finite()) {
                let dtype = self.backbone.dtype();
                return Err(EngineError::NonFinite { dtype });
            }
            probs.extend(p);
        }
        self.metrics.images.inc_by(pixels.len() as u64);
        for p in &probs {
            self.observe_prediction(p);
        }
        let mut rows = probs.into_iter();
        Ok(group
            .iter()
            .map(|j| {
                (0..j.pixels.len())
                    .map(|_| top_k(&head, &rows.next().expect("row"), j.top_k))
                    .collect()
            })
            .collect())
    }

    fn observe_prediction(&self, p: &[f32]) {
        let entropy: f64 = p
            .iter()
            .filter(|&&x| x > 0.0)
            .map(|&x| -(x as f64) * (x as f64).ln())
            .sum();
        let top = p.iter().copied().fold(0.0f32, f32::max);
        self.metrics.prediction_entropy.observe(entropy);
        self.metrics.prediction_confidence.observe(top as f64);
    }
}

/// Requests grouped by (composition, head), keeping arrival order inside a group.
fn group_requests(requests: Vec<EngineRequest>) -> Vec<Vec<EngineRequest>> {
    let mut groups: Vec<Vec<EngineRequest>> = Vec::new();
    for request in requests {
        match groups
            .iter_mut()
            .find(|g| g[0].group_key() == request.group_key())
        {
            Some(g) => g.push(request),
            None => groups.push(vec![request]),
        }
    }
    groups
}

/// The `k` most probable classes of one image as the API's predictions.
fn top_k(head: &ZeroShotHead, probs: &[f32], k: usize) -> Vec<Prediction> {
    head.top_k(probs, k)
        .into_iter()
        .map(|(_, label, probability)| Prediction {
            label: label.to_string(),
            probability,
        })
        .collect()
}
