//! Composed image towers are built here, on a thread of their own, and kept in a cache (least
//! recently used evicted past a byte budget; task-vector digests are part of the key). Composed
//! on the engine thread, a cache miss held every request for models already resident until it
//! was done; now the engine runs forward passes only, and a miss waits here alone.

use super::engine::{EngineError, Target};
use super::metrics::Metrics;
use atlas_clip::{Backbone, VisionTower};
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

type Reply = oneshot::Sender<Result<Arc<VisionTower>, EngineError>>;

/// Why a tower was not had.
pub enum ComposeRefused {
    /// As many compositions as the queue holds are waiting to be composed.
    Busy,
    Stopped,
    Failed(EngineError),
}

/// The cache and, per key being composed, who waits for it (one composition serves them all).
struct Shared {
    cache: Cache,
    waiting: HashMap<String, Vec<Reply>>,
}

pub struct Composer {
    tx: SyncSender<Option<Arc<Target>>>,
    shared: Arc<Mutex<Shared>>,
    metrics: Arc<Metrics>,
}

impl Composer {
    /// Starts the composer thread; at most `queue` compositions wait to be composed.
    pub fn start(
        backbone: Arc<Backbone>,
        metrics: Arc<Metrics>,
        cache_bytes: usize,
        queue: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(queue);
        metrics.cache_capacity.set(cache_bytes as i64);
        let shared = Arc::new(Mutex::new(Shared {
            cache: Cache::new(cache_bytes),
            waiting: HashMap::new(),
        }));
        let worker = Worker {
            backbone,
            metrics: metrics.clone(),
            shared: shared.clone(),
        };
        std::thread::Builder::new()
            .name("atlas-composer".into())
            .spawn(move || worker.run(rx))
            .expect("composer thread");
        Composer {
            tx,
            shared,
            metrics,
        }
    }

    /// The tower of `target` (None: the pre-trained one): from the cache, or composed on the
    /// composer thread.
    pub async fn get(
        &self,
        target: Option<Arc<Target>>,
    ) -> Result<Arc<VisionTower>, ComposeRefused> {
        let key = key(target.as_deref()).to_string();
        let (reply, answer) = oneshot::channel();
        {
            let mut s = lock(&self.shared);
            if let Some(t) = s.cache.get(&key) {
                self.metrics.cache_hits.inc();
                return Ok(t);
            }
            if let Some(waiting) = s.waiting.get_mut(&key) {
                waiting.push(reply);
            } else {
                match self.tx.try_send(target) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => return Err(ComposeRefused::Busy),
                    Err(TrySendError::Disconnected(_)) => return Err(ComposeRefused::Stopped),
                }
                self.metrics.cache_misses.inc();
                s.waiting.insert(key, vec![reply]);
            }
        }
        match answer.await {
            Ok(built) => built.map_err(ComposeRefused::Failed),
            Err(_) => Err(ComposeRefused::Stopped),
        }
    }
}

/// The cache key of a target: its composition id and task-vector digests, or "base".
pub fn key(target: Option<&Target>) -> &str {
    target.map_or("base", |t| t.key.as_str())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Worker {
    backbone: Arc<Backbone>,
    metrics: Arc<Metrics>,
    shared: Arc<Mutex<Shared>>,
}

impl Worker {
    fn run(&self, rx: Receiver<Option<Arc<Target>>>) {
        for target in rx {
            let key = key(target.as_deref()).to_string();
            let built = self.compose(target.as_deref());
            let mut s = lock(&self.shared);
            if let Ok(tower) = &built {
                self.keep(&mut s.cache, key.clone(), tower.clone());
            }
            for reply in s.waiting.remove(&key).unwrap_or_default() {
                let _ = reply.send(built.clone());
            }
        }
    }

    fn compose(&self, target: Option<&Target>) -> Result<Arc<VisionTower>, EngineError> {
        let started = Instant::now();
        let tower =
            super::background::run(super::background::Pool::Compositions, || match target {
                None => self.backbone.base_vision(),
                Some(t) => self.backbone.composed_vision(&t.tvs, &t.coefs),
            })
            .map_err(EngineError::model)?;
        self.metrics
            .compose_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(Arc::new(tower))
    }

    fn keep(&self, cache: &mut Cache, key: String, tower: Arc<VisionTower>) {
        let bytes = self.backbone.manifest().numel() * self.backbone.dtype().size_in_bytes();
        let evicted = cache.put(key, tower, bytes);
        self.metrics.cache_evictions.inc_by(evicted as u64);
        let resident = cache.bytes() as i64;
        self.metrics.cache_bytes.set(resident);
        self.metrics
            .memory
            .with_label_values(&["cache"])
            .set(resident);
    }
}

/// Composed image towers by key, least recently used evicted past the byte budget.
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
    /// Inserts, evicting least recently used entries first; returns how many were evicted.
    fn put(&mut self, key: String, tower: Arc<VisionTower>, bytes: usize) -> usize {
        let mut evicted = 0;
        while !self.entries.is_empty() && self.bytes() + bytes > self.budget {
            let oldest = self
                .entries
                .iter()
                .min_by_key(|e| e.1 .2)
                .map(|e| e.0.clone())
                .expect("non-empty");
            self.entries.remove(&oldest);
            evicted += 1;
        }
        self.clock += 1;
        self.entries.insert(key, (tower, bytes, self.clock));
        evicted
    }
    fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.1).sum()
    }
}
