//! Replicas sharing PostgreSQL follow each other's changes. Every change to a job, head or
//! stored task vector is announced on the store's change channel (NOTIFY, sent at commit); each
//! replica LISTENs on a connection of its own and:
//! - forgets the cached record (so /classify never serves a deleted composition or head);
//! - publishes a job's new state to its own event streams (so a job is followed from any
//!   replica) and stops the job here if it runs here and was cancelled or deleted elsewhere;
//! - wakes its workers when a job was queued elsewhere;
//! - brings its library up to the stored task vectors (also polled every second, so a lost
//!   notice delays a change by at most that).
//!
//! When the listening connection drops, every cached record is forgotten on reconnecting, as
//! notices may have been missed meanwhile.

use super::api::Status;
use super::jobs::{JobEvent, Workers};
use super::metrics::Metrics;
use super::store::{Store, CHANGES};
use super::task_vectors::LibrarySync;
use atlas_clip::Backbone;
use atlas_core::{Library, StorageDType};
use postgres::fallible_iterator::FallibleIterator;
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What a replica needs to follow the others.
pub struct Follow {
    pub store: Arc<Store>,
    pub workers: Arc<Workers>,
    pub backbone: Arc<Backbone>,
    pub library: Arc<RwLock<Library>>,
    pub storage_dtype: StorageDType,
    pub metrics: Arc<Metrics>,
    pub sync: LibrarySync,
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// How often the library counter is read when no notice came.
const LIBRARY_POLL: Duration = Duration::from_secs(1);
/// How often the listening connection is checked alive when no notice came.
const LISTEN_CHECK: Duration = Duration::from_secs(10);

/// Starts the listening thread and the library's thread.
pub fn follow(mut f: Follow) {
    let following = Arc::new(Following {
        wake: (Mutex::new(false), Condvar::new()),
        store: f.store.clone(),
        workers: f.workers.clone(),
        stopping: f.stopping.clone(),
    });
    let listener = following.clone();
    std::thread::Builder::new()
        .name("atlas-listen".into())
        .spawn(move || listener.listen())
        .expect("listening thread");
    std::thread::Builder::new()
        .name("atlas-library".into())
        .spawn(move || following.keep_library(&mut f))
        .expect("library thread");
}

struct Following {
    /// Set when the library should be synced now.
    wake: (Mutex<bool>, Condvar),
    store: Arc<Store>,
    workers: Arc<Workers>,
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Following {
    fn stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    fn wake_library(&self) {
        *self.wake.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.wake.1.notify_one();
    }

    fn keep_library(&self, f: &mut Follow) {
        while !self.stopping() {
            {
                let woken = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
                let (mut woken, _) = self
                    .wake
                    .1
                    .wait_timeout_while(woken, LIBRARY_POLL, |w| !*w)
                    .unwrap_or_else(|p| p.into_inner());
                *woken = false;
            }
            match f
                .sync
                .run(&f.store, &f.backbone, &f.library, f.storage_dtype)
            {
                Ok(()) => {
                    let bytes = f.library.read().map_or(0, |l| l.nbytes());
                    f.metrics
                        .memory
                        .with_label_values(&["library"])
                        .set(bytes as i64);
                }
                Err(e) => eprintln!("atlas-serve: following the stored task vectors: {e}"),
            }
        }
    }

    fn listen(&self) {
        let mut logged = false;
        while !self.stopping() {
            let mut client = match self.store.connect_alone().and_then(|mut c| {
                c.batch_execute(&format!("LISTEN {CHANGES}"))?;
                Ok(c)
            }) {
                Ok(c) => c,
                Err(e) => {
                    if !logged {
                        eprintln!("atlas-serve: listening for other replicas' changes: {e}; retrying every second");
                        logged = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            logged = false;
            // Notices sent while not listening are lost: start from the database's state.
            self.store.forget_all();
            self.wake_library();
            self.workers.notify();
            self.follow_notices(&mut client);
        }
    }

    /// Handles notices until the connection fails or the server stops.
    fn follow_notices(&self, client: &mut postgres::Client) {
        let mut checked = Instant::now();
        while !self.stopping() {
            let next = client
                .notifications()
                .timeout_iter(Duration::from_secs(1))
                .next();
            match next {
                Ok(Some(notice)) => self.handle(notice.payload()),
                Err(e) => {
                    eprintln!("atlas-serve: the listening connection failed: {e}; reconnecting");
                    return;
                }
                Ok(None) if checked.elapsed() >= LISTEN_CHECK => {
                    checked = Instant::now();
                    if client.is_valid(super::store::CONNECT_TIMEOUT).is_err() {
                        eprintln!("atlas-serve: the listening connection is gone; reconnecting");
                        return;
                    }
                }
                Ok(None) => {}
            }
        }
    }

    fn handle(&self, notice: &str) {
        let Some((origin, what)) = notice.split_once(' ') else {
            return;
        };
        if origin == self.store.origin() {
            return;
        }
        match what.split_once(':') {
            None if what == "queued" => self.workers.notify(),
            None if what == "library" => self.wake_library(),
            Some(("head", id)) => self.store.forget(id),
            Some(("job", id)) => self.job_changed(id),
            _ => {}
        }
    }

    /// Another replica changed job `id`: its state goes to this replica's event streams, and
    /// the job stops here if it runs here and is no longer running under this replica.
    fn job_changed(&self, id: &str) {
        self.store.forget(id);
        match self.store.get(id) {
            Ok(Some(c)) => {
                if c.status != Status::Running {
                    self.workers.cancel(id);
                }
                let _ = self.workers.events.send(JobEvent {
                    id: id.to_string(),
                    status: c.status,
                    progress: c.progress.filter(|_| c.status == Status::Running),
                });
            }
            Ok(None) => {
                self.workers.cancel(id);
            }
            Err(e) => eprintln!("atlas-serve: reading job {id} after a change notice: {e}"),
        }
    }
}
