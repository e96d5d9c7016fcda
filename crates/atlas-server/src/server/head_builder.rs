//! Zero-shot heads are built here, on a thread of their own, not on the engine thread: a head
//! runs every prompt (classes × templates) through the text tower, and built on the engine it
//! held every other client's classification until it was done. Built heads are cached (by the
//! content id of their classes and templates) and handed to the engine with each request.

use super::api::HeadView;
use super::engine::EngineError;
use atlas_clip::{Backbone, ZeroShotHead};
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// Heads kept built; past it the cache starts again (heads are small: classes × embedding).
const CACHED_HEADS: usize = 256;

type Reply = oneshot::Sender<Result<Arc<ZeroShotHead>, EngineError>>;

/// Why a head was not built.
pub enum HeadRefused {
    /// As many heads as the queue holds are waiting to be built.
    Busy,
    Stopped,
    Failed(EngineError),
}

pub struct HeadBuilder {
    tx: SyncSender<(HeadView, Reply)>,
    cache: Arc<Mutex<HashMap<String, Arc<ZeroShotHead>>>>,
}

impl HeadBuilder {
    /// Starts the builder thread; at most `queue` heads wait to be built.
    pub fn start(backbone: Arc<Backbone>, queue: usize) -> Self {
        let (tx, rx) = sync_channel(queue);
        let cache = Arc::new(Mutex::new(HashMap::new()));
        let shared = cache.clone();
        std::thread::Builder::new()
            .name("atlas-heads".into())
            .spawn(move || build_all(&backbone, rx, &shared))
            .expect("head builder thread");
        HeadBuilder { tx, cache }
    }

    /// The head of `view`: from the cache, or built on the builder thread.
    pub async fn get(&self, view: HeadView) -> Result<Arc<ZeroShotHead>, HeadRefused> {
        if let Some(h) = lock(&self.cache).get(&view.id) {
            return Ok(h.clone());
        }
        let (reply, answer) = oneshot::channel();
        match self.tx.try_send((view, reply)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(HeadRefused::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(HeadRefused::Stopped),
        }
        match answer.await {
            Ok(built) => built.map_err(HeadRefused::Failed),
            Err(_) => Err(HeadRefused::Stopped),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn build_all(
    backbone: &Backbone,
    rx: Receiver<(HeadView, Reply)>,
    cache: &Mutex<HashMap<String, Arc<ZeroShotHead>>>,
) {
    for (view, reply) in rx {
        // Another request may have had the same head built while this one waited.
        let cached = lock(cache).get(&view.id).cloned();
        let built = match cached {
            Some(h) => Ok(h),
            None => build(backbone, &view).inspect(|h| {
                let mut c = lock(cache);
                if c.len() >= CACHED_HEADS {
                    c.clear();
                }
                c.insert(view.id.clone(), h.clone());
            }),
        };
        let _ = reply.send(built);
    }
}

fn build(backbone: &Backbone, view: &HeadView) -> Result<Arc<ZeroShotHead>, EngineError> {
    let templates: Vec<&str> = view.templates.iter().map(String::as_str).collect();
    super::background::run(super::background::Pool::Heads, || {
        ZeroShotHead::build(backbone, &view.classes, &templates)
    })
    .map(Arc::new)
    .map_err(|e| EngineError::Head(Arc::new(e)))
}
