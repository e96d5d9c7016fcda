//! The engine: one thread that owns model work for serving. Requests arrive on a bounded
//! channel (full means 429, not an unbounded queue); the thread drains what is waiting, groups
//! requests by (composition, head) into one forward batch, composes models on a cache miss
//! (LRU by bytes) and answers each request on its own oneshot channel.

use super::api::Prediction;
use super::metrics::Metrics;
use super::registry::Registry;
use atlas_clip::{Backbone, VisionTower, ZeroShotHead};
use atlas_core::Coefficients;
use candle_core::{Tensor, D};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::oneshot;

pub struct ClassifyJob {
    /// None: the pre-trained model.
    pub composition: Option<String>,
    pub classes: Vec<String>,
    pub templates: Vec<String>,
    /// CHW pixels at the model's image size, preprocessed off the engine thread.
    pub pixels: Vec<Vec<f32>>,
    pub top_k: usize,
    pub reply: oneshot::Sender<Result<Vec<Vec<Prediction>>, String>>,
}

#[derive(Clone)]
pub struct Engine {
    tx: SyncSender<ClassifyJob>,
    alive: Arc<AtomicBool>,
}

/// Why a job was not queued.
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
    pub cache_bytes: usize,
    pub max_batch: usize,
}

impl Engine {
    pub fn start(
        backbone: Arc<Backbone>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        s: EngineSettings,
    ) -> Self {
        let (tx, rx) = sync_channel(s.queue);
        let alive = Arc::new(AtomicBool::new(true));
        let guard = AliveGuard(alive.clone());
        let mut worker = Worker {
            backbone,
            registry,
            metrics,
            cache: Cache::new(s.cache_bytes),
            heads: HashMap::new(),
            max_batch: s.max_batch,
        };
        std::thread::Builder::new()
            .name("atlas-engine".into())
            .spawn(move || {
                let _guard = guard;
                worker.run(rx)
            })
            .expect("engine thread");
        Engine { tx, alive }
    }

    /// Queues a job, or says why not.
    pub fn submit(&self, job: ClassifyJob) -> Result<(), Refused> {
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Refused::Full),
            Err(TrySendError::Disconnected(_)) => Err(Refused::Stopped),
        }
    }

    /// False once the engine thread has ended (health checks report it).
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

/// Composed image towers by composition id, least recently used evicted past the byte budget.
struct Cache {
    budget: usize,
    entries: HashMap<String, (Arc<VisionTower>, usize, u64)>,
    clock: u64,
}

impl Cache {
    fn new(budget: usize) -> Self {
        Cache {
            budget,
            entries: HashMap::new(),
            clock: 0,
        }
    }
    fn get(&mut self, key: &str) -> Option<Arc<VisionTower>> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|e| {
            e.2 = clock;
            e.0.clone()
        })
    }
    fn put(&mut self, key: String, tower: Arc<VisionTower>, bytes: usize) {
        while !self.entries.is_empty() && self.bytes() + bytes > self.budget {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|e| e.1 .2)
                .map(|e| e.0.clone())
                .expect("non-empty");
            self.entries.remove(&oldest);
        }
        self.clock += 1;
        self.entries.insert(key, (tower, bytes, self.clock));
    }
    fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.1).sum()
    }
}

struct Worker {
    backbone: Arc<Backbone>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    cache: Cache,
    heads: HashMap<(Vec<String>, Vec<String>), ZeroShotHead>,
    max_batch: usize,
}

impl Worker {
    fn run(&mut self, rx: Receiver<ClassifyJob>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while let Ok(more) = rx.try_recv() {
                jobs.push(more);
            }
            for group in group_jobs(jobs) {
                self.serve_group(group);
            }
        }
    }

    fn serve_group(&mut self, group: Vec<ClassifyJob>) {
        let started = Instant::now();
        let result = self.predict(&group);
        self.metrics
            .classify_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(mut per_job) => {
                for job in group.into_iter().rev() {
                    let preds = per_job.pop().expect("one result per job");
                    let _ = job.reply.send(Ok(preds));
                }
            }
            Err(e) => {
                for job in group {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }

    fn predict(&mut self, group: &[ClassifyJob]) -> Result<Vec<Vec<Vec<Prediction>>>, String> {
        let first = &group[0];
        let tower = self.tower(first.composition.as_deref())?;
        let head = self.head(&first.classes, &first.templates)?;
        let pixels: Vec<Vec<f32>> = group
            .iter()
            .flat_map(|j| j.pixels.iter().cloned())
            .collect();
        let pre =
            atlas_clip::preprocess::Preprocess::from_config(self.backbone.config.vision.image_size);
        let mut probs = Vec::new();
        for chunk in pixels.chunks(self.max_batch) {
            self.metrics.batch_size.observe(chunk.len() as f64);
            let batch = pre
                .batch(chunk, self.backbone.device())
                .map_err(|e| e.to_string())?;
            let emb = tower.forward(&batch).map_err(|e| e.to_string())?;
            let logits = head.logits(&emb).map_err(|e| e.to_string())?;
            let p: Vec<Vec<f32>> = candle_nn_softmax(&logits).map_err(|e| e.to_string())?;
            probs.extend(p);
        }
        self.metrics.images.inc_by(pixels.len() as u64);
        let mut rows = probs.into_iter();
        Ok(group
            .iter()
            .map(|j| {
                (0..j.pixels.len())
                    .map(|_| top_k(&rows.next().expect("row"), &j.classes, j.top_k))
                    .collect()
            })
            .collect())
    }

    fn tower(&mut self, composition: Option<&str>) -> Result<Arc<VisionTower>, String> {
        let key = composition.unwrap_or("").to_string();
        if let Some(t) = self.cache.get(&key) {
            self.metrics.cache_hits.inc();
            return Ok(t);
        }
        self.metrics.cache_misses.inc();
        let started = Instant::now();
        let tower = match composition {
            None => self.backbone.base_vision(),
            Some(id) => {
                let (tvs, coefs): (_, Coefficients) = self.registry.ready(id)?;
                self.backbone.composed_vision(&tvs, &coefs)
            }
        }
        .map_err(|e| e.to_string())?;
        self.metrics
            .compose_seconds
            .observe(started.elapsed().as_secs_f64());
        let bytes = self.backbone.manifest().numel() * self.backbone.dtype().size_in_bytes();
        let tower = Arc::new(tower);
        self.cache.put(key, tower.clone(), bytes);
        self.metrics.cache_bytes.set(self.cache.bytes() as i64);
        Ok(tower)
    }

    fn head(&mut self, classes: &[String], templates: &[String]) -> Result<ZeroShotHead, String> {
        let key = (classes.to_vec(), templates.to_vec());
        if let Some(h) = self.heads.get(&key) {
            return Ok(h.clone());
        }
        let t: Vec<&str> = templates.iter().map(String::as_str).collect();
        let head = ZeroShotHead::build(&self.backbone, classes, &t).map_err(|e| e.to_string())?;
        if self.heads.len() > 256 {
            self.heads.clear();
        }
        self.heads.insert(key, head.clone());
        Ok(head)
    }
}

/// Jobs grouped by (composition, classes, templates), keeping arrival order inside a group.
fn group_jobs(jobs: Vec<ClassifyJob>) -> Vec<Vec<ClassifyJob>> {
    let mut groups: Vec<Vec<ClassifyJob>> = Vec::new();
    for job in jobs {
        match groups.iter_mut().find(|g| {
            g[0].composition == job.composition
                && g[0].classes == job.classes
                && g[0].templates == job.templates
        }) {
            Some(g) => g.push(job),
            None => groups.push(vec![job]),
        }
    }
    groups
}

/// Softmax rows of logits (already scaled); inference only, so the fused path is fine.
fn candle_nn_softmax(logits: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec2()
}

fn top_k(probs: &[f32], classes: &[String], k: usize) -> Vec<Prediction> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    idx.into_iter()
        .take(k.max(1))
        .map(|i| Prediction {
            class: classes[i].clone(),
            score: probs[i],
        })
        .collect()
}
