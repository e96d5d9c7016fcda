//! The durable store: a database holding compositions (with their jobs' state and leases),
//! heads and stored task vectors, either the embedded SQLite file (WAL) in the data directory or
//! a PostgreSQL database shared by replicas; files (job examples, checkpoints, stored task
//! vectors) live in the blob directory. Each record is a JSON document plus the columns queries
//! need.

mod db;
mod migrations;

pub use db::{Dialect, CONNECT_TIMEOUT};

use super::api::{Composition, HeadView, Status};
pub use db::Op;
use db::{Conn, Db, Row};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// The durable state: records in the database (SQLite or PostgreSQL), large objects (job
/// examples and checkpoints, stored task vectors) as files under the blob directory, and a
/// per-replica cache of the records /classify reads, so that serving a resident composition
/// makes no database round trip.
pub struct Store {
    db: Db,
    origin: String,
    blob_dir: PathBuf,
    /// Finished compositions and heads by id: they change only by deletion, which evicts them
    /// here (and, from other replicas, through [`Store::forget`]).
    cache: Mutex<HashMap<String, Cached>>,
}

#[derive(Clone)]
enum Cached {
    Composition(Box<Composition>),
    Head(Box<HeadView>),
}

/// The channel of change notices between replicas (LISTEN/NOTIFY).
pub const CHANGES: &str = "atlas_changes";

/// Records the cache holds at most.
const CACHE_ENTRIES: usize = 4096;

/// What went wrong in the store: the database, a stored record, or a directory of its own.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("store: {0}")]
    Postgres(#[from] postgres::Error),
    #[error("store: the database is unreachable: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("store: a stored record: {0}")]
    Record(#[from] serde_json::Error),
    #[error("store: a stored record: {0}")]
    Shape(String),
    #[error("store: {0}")]
    Config(String),
    #[error("store: {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// True when the write failed for want of disk space (SQLite's SQLITE_FULL, PostgreSQL's
    /// disk_full, or ENOSPC).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Database(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Postgres(e) => e.code() == Some(&postgres::error::SqlState::DISK_FULL),
            StoreError::Dir { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
            _ => false,
        }
    }

    /// True when the database could not be reached (or went away mid-statement): the request
    /// may succeed later, so it is answered 503 with Retry-After.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Pool(_) => true,
            StoreError::Postgres(e) => {
                e.is_closed()
                    || e.code().is_none_or(|c| {
                        matches!(c.code().get(..2), Some("08" | "57" | "53"))
                            && *c != postgres::error::SqlState::DISK_FULL
                    })
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What [`Store::put_head`] did.
pub enum PutHead {
    New,
    Existing,
    /// Nothing: the store holds its most heads.
    Full,
}

/// What [`Store::insert`] did.
pub enum Inserted {
    New,
    /// The idempotency key was used before: that composition and its request's hash.
    Earlier(Box<Composition>, String),
    /// Nothing: this many jobs are queued already.
    QueueFull(usize),
}

/// How a worker came by the job [`Store::claim_next`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// It was queued.
    Queued,
    /// Another replica's lease on it had expired (that replica died or lost the database):
    /// the job resumes from its last checkpoint.
    Expired,
}

/// A job found running (its process died under it) this many times fails instead of being
/// resumed again: a job that kills the process would otherwise do so forever.
pub const MAX_INTERRUPTIONS: i64 = 3;

/// Milliseconds since the Unix epoch: leases are compared against the clock of whichever
/// replica reads them, so replicas' clocks must agree to well within a lease.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn composition(row: &Row, col: usize) -> Result<Composition> {
    Ok(serde_json::from_str(&row.text(col)?)?)
}

fn find_idempotent(c: &mut dyn Conn, key: &str) -> Result<Option<(Composition, String)>> {
    let row = c.query_opt(
        "SELECT doc, request_hash FROM compositions WHERE idempotency_key = $1",
        &[key.into()],
    )?;
    row.map(|r| Ok((composition(&r, 0)?, r.opt_text(1)?.unwrap_or_default())))
        .transpose()
}

fn write(c: &mut dyn Conn, comp: &Composition) -> Result<()> {
    c.execute(
        "UPDATE compositions SET status = $2, doc = $3 WHERE id = $1",
        &[
            comp.id.as_str().into(),
            comp.status.as_str().into(),
            serde_json::to_string(comp)?.as_str().into(),
        ],
    )?;
    Ok(())
}

/// How the store is set up: where its files go and which database holds its records.
pub struct Location<'a> {
    /// The SQLite file's directory (when `database_url` is empty).
    pub data_dir: &'a Path,
    /// Job examples and checkpoints, stored task vectors; shared by replicas.
    pub blob_dir: &'a Path,
    /// `postgres://…`, or empty for SQLite.
    pub database_url: &'a str,
    /// This replica's name: other replicas ignore the change notices it sends itself.
    pub origin: &'a str,
}

impl Store {
    /// Opens (creating) the store: the database, migrated to this build's schema, and the
    /// blob directory's `jobs/` and `task-vectors/`.
    pub fn open(at: Location) -> Result<Store> {
        for sub in ["jobs", "task-vectors"] {
            let path = at.blob_dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| StoreError::Dir { path, source })?;
        }
        let db = if at.database_url.is_empty() {
            std::fs::create_dir_all(at.data_dir).map_err(|source| StoreError::Dir {
                path: at.data_dir.to_path_buf(),
                source,
            })?;
            let conn = rusqlite::Connection::open(at.data_dir.join("atlas.db"))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            Db::sqlite(conn)
        } else if at.database_url.starts_with("postgres://")
            || at.database_url.starts_with("postgresql://")
        {
            Db::postgres(at.database_url)?
        } else {
            return Err(StoreError::Config(
                "database_url must start with postgres:// (or be empty: SQLite in data_dir)".into(),
            ));
        };
        remove_unfinished(&at.blob_dir.join("jobs"), db.dialect());
        let applied = migrations::apply(&db, now_ms())?;
        if !applied.is_empty() {
            eprintln!(
                "atlas-serve: database schema migrated to version {}",
                migrations::latest()
            );
        }
        Ok(Store {
            db,
            origin: at.origin.to_string(),
            blob_dir: at.blob_dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// Database round trips so far.
    pub fn round_trips(&self) -> u64 {
        self.db.queries.load(Ordering::Relaxed)
    }

    /// Failed database round trips so far, by what they were for.
    pub fn errors(&self) -> impl Iterator<Item = (Op, u64)> + '_ {
        Op::ALL
            .into_iter()
            .map(|op| (op, self.db.errors[op as usize].load(Ordering::Relaxed)))
    }

    /// False after a round trip failed because the database was unreachable.
    pub fn database_up(&self) -> bool {
        self.db.up.load(Ordering::Relaxed)
    }

    /// Asks the database whether it answers (for /readyz).
    pub fn ping(&self) -> Result<()> {
        self.db
            .with(Op::Read, |c| c.query("SELECT 1", &[]).map(drop))
    }

    /// A connection of its own for LISTEN (PostgreSQL only).
    pub fn connect_alone(&self) -> Result<postgres::Client> {
        self.db.connect_alone()
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.blob_dir.join("jobs").join(id)
    }

    pub fn tv_dir(&self) -> PathBuf {
        self.blob_dir.join("task-vectors")
    }

    /// Tells other replicas that `what` changed: PostgreSQL's NOTIFY on [`CHANGES`], delivered
    /// at commit, as "<origin> <what>".
    fn announce(&self, c: &mut dyn Conn, what: &str) -> Result<()> {
        if self.dialect() == Dialect::Postgres {
            let notice = format!("{} {what}", self.origin);
            c.query(
                "SELECT pg_notify('atlas_changes', $1)",
                &[notice.as_str().into()],
            )?;
        }
        Ok(())
    }

    /// This replica's name in change notices.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Inserts a new composition, with an optional (idempotency key, request hash), unless
    /// the key was used before or, with `queue_limit`, that many jobs are queued already. The
    /// checks and the insert are one transaction that holds the store's insert lock (SQLite's
    /// write lock; an advisory lock in PostgreSQL): concurrent requests, on any replica,
    /// cannot both pass a check and then both insert.
    pub fn insert(
        &self,
        comp: &Composition,
        key: Option<(&str, &str)>,
        queue_limit: Option<usize>,
    ) -> Result<Inserted> {
        self.db.tx(Op::Write, |c| {
            self.insert_lock(c)?;
            if let Some((k, _)) = key {
                if let Some((earlier, hash)) = find_idempotent(c, k)? {
                    return Ok(Inserted::Earlier(Box::new(earlier), hash));
                }
            }
            if let Some(limit) = queue_limit {
                let queued = c
                    .query_opt(
                        "SELECT COUNT(*) FROM compositions WHERE status = 'queued'",
                        &[],
                    )?
                    .map_or(Ok(0), |r| r.int(0))?;
                if queued as usize >= limit {
                    return Ok(Inserted::QueueFull(queued as usize));
                }
            }
            c.execute(
                "INSERT INTO compositions (id, status, idempotency_key, request_hash, doc, kind)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    comp.id.as_str().into(),
                    comp.status.as_str().into(),
                    key.map(|k| k.0).into(),
                    key.map(|k| k.1).into(),
                    serde_json::to_string(comp)?.as_str().into(),
                    comp.kind.as_str().into(),
                ],
            )?;
            if comp.status == Status::Queued {
                self.announce(c, "queued")?;
            }
            Ok(Inserted::New)
        })
    }

    /// Serialises inserts that check a count or a key first, across replicas.
    fn insert_lock(&self, c: &mut dyn Conn) -> Result<()> {
        if self.dialect() == Dialect::Postgres {
            c.query("SELECT pg_advisory_xact_lock(7216540020)", &[])?;
        }
        Ok(())
    }

    /// The composition created earlier with this idempotency key, and its request's hash.
    pub fn find_idempotent(&self, key: &str) -> Result<Option<(Composition, String)>> {
        self.db.with(Op::Read, |c| find_idempotent(c, key))
    }

    /// A composition; a finished one from this replica's cache when it is there.
    pub fn get(&self, id: &str) -> Result<Option<Composition>> {
        if let Some(Cached::Composition(c)) = self.cached(id) {
            return Ok(Some(*c));
        }
        let found = self.db.with(Op::Read, |c| {
            c.query_opt("SELECT doc FROM compositions WHERE id = $1", &[id.into()])?
                .map(|r| composition(&r, 0))
                .transpose()
        })?;
        if let Some(c) = found.as_ref().filter(|c| c.status.is_final()) {
            self.remember(id, Cached::Composition(Box::new(c.clone())));
        }
        Ok(found)
    }

    fn cached(&self, id: &str) -> Option<Cached> {
        self.lock_cache().get(id).cloned()
    }

    fn remember(&self, id: &str, entry: Cached) {
        let mut cache = self.lock_cache();
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(id.to_string(), entry);
    }

    /// Drops a record from the cache: it changed, here or on another replica.
    pub fn forget(&self, id: &str) {
        self.lock_cache().remove(id);
    }

    /// Drops every cached record (changes may have been missed while not listening).
    pub fn forget_all(&self) {
        self.lock_cache().clear();
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to a stored composition and writes it back; None when it does not exist.
    pub fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut Composition),
    ) -> Result<Option<Composition>> {
        self.update_where(id, None, f)
    }

    /// As [`Store::update`], only while the job runs under `owner`'s lease: a worker whose
    /// job was cancelled, or whose lease lapsed (and whose job another replica may have
    /// resumed), changes nothing. None then.
    pub fn update_held(
        &self,
        id: &str,
        owner: &str,
        f: impl FnOnce(&mut Composition),
    ) -> Result<Option<Composition>> {
        self.update_where(id, Some(owner), f)
    }

    fn update_where(
        &self,
        id: &str,
        owner: Option<&str>,
        f: impl FnOnce(&mut Composition),
    ) -> Result<Option<Composition>> {
        let lock = match self.dialect() {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let out = self.db.tx(Op::Write, |c| {
            let sql = format!(
                "SELECT doc FROM compositions
                 WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL
                     OR (lease_owner = $2 AND status = 'running')){lock}"
            );
            let Some(row) = c.query_opt(&sql, &[id.into(), owner.into()])? else {
                return Ok(None);
            };
            let mut comp = composition(&row, 0)?;
            f(&mut comp);
            write(c, &comp)?;
            self.announce(c, &format!("job:{id}"))?;
            Ok(Some(comp))
        })?;
        self.forget(id);
        Ok(out)
    }

    pub fn delete(&self, id: &str) -> Result<bool> {
        let n = self.db.tx(Op::Write, |c| {
            let n = c.execute("DELETE FROM compositions WHERE id = $1", &[id.into()])?;
            self.announce(c, &format!("job:{id}"))?;
            Ok(n)
        })?;
        self.forget(id);
        Ok(n > 0)
    }

    /// A page of compositions in creation order, optionally of one status.
    pub fn list(
        &self,
        status: Option<Status>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Composition>> {
        let rows = self.db.with(Op::Read, |c| {
            c.query(
                "SELECT doc FROM compositions WHERE (CAST($1 AS TEXT) IS NULL OR status = $1)
                 ORDER BY seq LIMIT $2 OFFSET $3",
                &[
                    status.map(|s| s.as_str()).into(),
                    (limit as i64).into(),
                    (offset as i64).into(),
                ],
            )
        })?;
        rows.iter().map(|r| composition(r, 0)).collect()
    }

    /// The oldest job that is queued, or running under an expired lease, marked running under
    /// `owner`'s lease until `lease_until_ms` in the same transaction: two workers, on any
    /// replicas, never claim one job. A job found under an expired lease
    /// [`MAX_INTERRUPTIONS`] times fails instead, saying so, and the next is looked at.
    pub fn claim_next(
        &self,
        owner: &str,
        lease_until_ms: i64,
    ) -> Result<Option<(Composition, Claim)>> {
        loop {
            match self.claim_one(owner, lease_until_ms)? {
                Claimed::Job(c, how) => return Ok(Some((*c, how))),
                Claimed::GaveUp(id) => {
                    eprintln!("atlas-serve: job {id} failed: the server stopped abruptly under it {MAX_INTERRUPTIONS} times");
                }
                Claimed::Nothing => return Ok(None),
            }
        }
    }

    fn claim_one(&self, owner: &str, lease_until_ms: i64) -> Result<Claimed> {
        let skip = match self.dialect() {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let now = now_ms();
        self.db.tx(Op::Claim, |c| {
            let sql = format!(
                "SELECT id, doc, status FROM compositions
                 WHERE status = 'queued' OR (status = 'running' AND lease_until < $1)
                 ORDER BY seq LIMIT 1{skip}"
            );
            let Some(row) = c.query_opt(&sql, &[now.into()])? else {
                return Ok(Claimed::Nothing);
            };
            let (id, mut comp) = (row.text(0)?, composition(&row, 1)?);
            let how = match row.text(2)?.as_str() {
                "running" => Claim::Expired,
                _ => Claim::Queued,
            };
            if how == Claim::Expired && interrupted(c, &id)? >= MAX_INTERRUPTIONS {
                comp.status = Status::Failed;
                comp.error = Some(format!(
                    "the server stopped abruptly {MAX_INTERRUPTIONS} times while this job ran \
                     (out of memory or killed); it is not retried again"
                ));
                write(c, &comp)?;
                self.announce(c, &format!("job:{id}"))?;
                return Ok(Claimed::GaveUp(id));
            }
            comp.status = Status::Running;
            write(c, &comp)?;
            c.execute(
                "UPDATE compositions SET lease_owner = $2, lease_until = $3 WHERE id = $1",
                &[id.as_str().into(), owner.into(), lease_until_ms.into()],
            )?;
            self.announce(c, &format!("job:{id}"))?;
            Ok(Claimed::Job(Box::new(comp), how))
        })
    }

    /// Extends `owner`'s leases to `lease_until_ms`; returns the ids of the jobs it still holds
    /// (running, under its lease). A job missing from them was cancelled, deleted or taken over.
    pub fn renew(&self, owner: &str, lease_until_ms: i64) -> Result<Vec<String>> {
        let rows = self.db.with(Op::Heartbeat, |c| {
            c.query(
                "UPDATE compositions SET lease_until = $2
                 WHERE lease_owner = $1 AND status = 'running' RETURNING id",
                &[owner.into(), lease_until_ms.into()],
            )
        })?;
        rows.iter().map(|r| r.text(0)).collect()
    }

    /// After a restart of the embedded store's only process: jobs that were running go back
    /// to the queue (they resume from their checkpoints), unless they were found running
    /// [`MAX_INTERRUPTIONS`] times: those fail, saying so. Returns (requeued, failed). With a
    /// shared database this is left to the leases: other replicas may be running them.
    pub fn requeue_running(&self) -> Result<(usize, usize)> {
        if self.dialect() == Dialect::Postgres {
            return Ok((0, 0));
        }
        let ids: Vec<String> = self.db.with(Op::Read, |c| {
            c.query("SELECT id FROM compositions WHERE status = 'running'", &[])?
                .iter()
                .map(|r| r.text(0))
                .collect()
        })?;
        let mut failed = 0;
        for id in &ids {
            let count = self.db.with(Op::Read, |c| interrupted(c, id))?;
            let give_up = count >= MAX_INTERRUPTIONS;
            failed += usize::from(give_up);
            self.update(id, |c| {
                if give_up {
                    c.status = Status::Failed;
                    c.error = Some(format!(
                        "the server stopped abruptly {count} times while this job ran (out of \
                         memory or killed); it is not retried again"
                    ));
                } else {
                    c.status = Status::Queued;
                }
            })?;
        }
        Ok((ids.len() - failed, failed))
    }

    /// Learning jobs (not explicit compositions) by status, over every replica.
    pub fn count_by_status(&self) -> Result<Vec<(String, i64)>> {
        let rows = self.db.with(Op::Read, |c| {
            c.query(
                "SELECT status, COUNT(*) FROM compositions WHERE kind != 'explicit'
                 GROUP BY status",
                &[],
            )
        })?;
        rows.iter().map(|r| Ok((r.text(0)?, r.int(1)?))).collect()
    }

    /// Ids of compositions (any status but failed or cancelled) that use the task vector.
    pub fn users_of(&self, tv: &str) -> Result<Vec<String>> {
        let rows = self.db.with(Op::Read, |c| {
            c.query(
                "SELECT id, doc FROM compositions WHERE status NOT IN ('failed', 'cancelled')",
                &[],
            )
        })?;
        let mut out = Vec::new();
        for row in &rows {
            if composition(row, 1)?.task_vectors.iter().any(|t| t == tv) {
                out.push(row.text(0)?);
            }
        }
        Ok(out)
    }

    /// Stores a head unless it is stored already or `max` heads are (the count and the insert
    /// hold the insert lock: they cannot interleave with another request's).
    pub fn put_head(&self, h: &HeadView, max: usize) -> Result<PutHead> {
        let doc = serde_json::to_string(h)?;
        self.db.tx(Op::Write, |c| {
            self.insert_lock(c)?;
            if c.query_opt("SELECT 1 FROM heads WHERE id = $1", &[h.id.as_str().into()])?
                .is_some()
            {
                return Ok(PutHead::Existing);
            }
            let n = c
                .query_opt("SELECT COUNT(*) FROM heads", &[])?
                .map_or(Ok(0), |r| r.int(0))?;
            if n as usize >= max {
                return Ok(PutHead::Full);
            }
            c.execute(
                "INSERT INTO heads (id, doc) VALUES ($1, $2)",
                &[h.id.as_str().into(), doc.as_str().into()],
            )?;
            Ok(PutHead::New)
        })
    }

    /// Deletes a stored head; false when there was none.
    pub fn delete_head(&self, id: &str) -> Result<bool> {
        let n = self.db.tx(Op::Write, |c| {
            let n = c.execute("DELETE FROM heads WHERE id = $1", &[id.into()])?;
            self.announce(c, &format!("head:{id}"))?;
            Ok(n)
        })?;
        self.forget(id);
        Ok(n > 0)
    }

    /// A stored head; from this replica's cache when it is there.
    pub fn get_head(&self, id: &str) -> Result<Option<HeadView>> {
        if let Some(Cached::Head(h)) = self.cached(id) {
            return Ok(Some(*h));
        }
        let found: Option<HeadView> = self.db.with(Op::Read, |c| {
            c.query_opt("SELECT doc FROM heads WHERE id = $1", &[id.into()])?
                .map(|r| Ok(serde_json::from_str(&r.text(0)?)?))
                .transpose()
        })?;
        if let Some(h) = &found {
            self.remember(id, Cached::Head(Box::new(h.clone())));
        }
        Ok(found)
    }

    /// Records a task vector the server stored itself (uploads, conversions, merges) with its
    /// digest, so that every replica loads it, now and at start.
    pub fn put_task_vector(&self, tv: &StoredTaskVector) -> Result<()> {
        self.db.tx(Op::Write, |c| {
            c.execute(
                "INSERT INTO task_vectors (name, file, source, digest) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE
                 SET file = excluded.file, source = excluded.source, digest = excluded.digest",
                &[
                    tv.name.as_str().into(),
                    tv.file.as_str().into(),
                    tv.source.as_str().into(),
                    tv.digest.as_str().into(),
                ],
            )?;
            self.library_changed(c)
        })
    }

    /// The stored task vectors, and the library's change counter they were read at.
    pub fn task_vectors(&self) -> Result<(Vec<StoredTaskVector>, i64)> {
        self.db.tx(Op::Sync, |c| {
            let rows = c.query(
                "SELECT name, file, source, digest FROM task_vectors ORDER BY name",
                &[],
            )?;
            let tvs = rows
                .iter()
                .map(|r| {
                    Ok(StoredTaskVector {
                        name: r.text(0)?,
                        file: r.text(1)?,
                        source: r.text(2)?,
                        digest: r.text(3)?,
                    })
                })
                .collect::<Result<_>>()?;
            Ok((tvs, library_generation(c)?))
        })
    }

    /// The library's change counter: it moves whenever a stored task vector is added or
    /// deleted, on any replica.
    pub fn library_generation(&self) -> Result<i64> {
        self.db.with(Op::Sync, library_generation)
    }

    fn library_changed(&self, c: &mut dyn Conn) -> Result<()> {
        c.execute(
            "UPDATE counters SET value = value + 1 WHERE name = 'library'",
            &[],
        )?;
        self.announce(c, "library")
    }

    pub fn delete_task_vector(&self, name: &str) -> Result<Option<String>> {
        self.db.tx(Op::Write, |c| {
            let file = c
                .query_opt(
                    "SELECT file FROM task_vectors WHERE name = $1",
                    &[name.into()],
                )?
                .map(|r| r.text(0))
                .transpose()?;
            if file.is_some() {
                c.execute("DELETE FROM task_vectors WHERE name = $1", &[name.into()])?;
                self.library_changed(c)?;
            }
            Ok(file)
        })
    }
}

/// A task vector the server stored: its file under the blob directory's `task-vectors/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTaskVector {
    pub name: String,
    pub file: String,
    pub source: String,
    /// Empty for records written before digests were kept.
    pub digest: String,
}

enum Claimed {
    Job(Box<Composition>, Claim),
    GaveUp(String),
    Nothing,
}

/// Counts one more interruption of job `id`; returns the count.
fn interrupted(c: &mut dyn Conn, id: &str) -> Result<i64> {
    c.query_opt(
        "INSERT INTO job_interruptions (id, count) VALUES ($1, 1)
         ON CONFLICT (id) DO UPDATE SET count = job_interruptions.count + 1 RETURNING count",
        &[id.into()],
    )?
    .map_or(Ok(1), |r| r.int(0))
}

fn library_generation(c: &mut dyn Conn) -> Result<i64> {
    c.query_opt("SELECT value FROM counters WHERE name = 'library'", &[])?
        .map_or(Ok(0), |r| r.int(0))
}

/// Temporary files and directories older than this were left by a writer that stopped; younger
/// ones may belong to a replica writing now (the blob directory is shared).
pub const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// True when a temporary file or directory found at start was left by a writer that stopped:
/// always with the embedded store (this process is the only writer), and with a shared
/// database when it was last modified more than [`STALE_TEMPORARY`] ago.
pub fn is_abandoned(path: &Path, dialect: Dialect) -> bool {
    dialect == Dialect::Sqlite
        || std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMPORARY)
}

/// Removes the `*.tmp` directories of job examples whose writing never finished (the process
/// stopped, or the disk filled, before the rename that makes them whole): those older than
/// [`STALE_TEMPORARY`] when replicas share the blob directory, since a younger one may be
/// another replica's upload in progress.
fn remove_unfinished(jobs: &Path, dialect: Dialect) {
    let Ok(entries) = std::fs::read_dir(jobs) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "tmp") && is_abandoned(&path, dialect) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => eprintln!(
                    "atlas-serve: removed unfinished job examples {}",
                    e.file_name().to_string_lossy()
                ),
                Err(err) => eprintln!(
                    "atlas-serve: removing unfinished job examples {}: {err}",
                    e.file_name().to_string_lossy()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests;
