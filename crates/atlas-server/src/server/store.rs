//! The durable store: one SQLite database (WAL) in the data directory, holding compositions
//! (with their jobs' state), heads and uploaded task vectors; files (job examples, checkpoints,
//! uploaded task vectors) live beside it. Each record is a JSON document plus the columns
//! queries need.

use super::api::{Composition, HeadView, Status};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct Store {
    conn: Mutex<Connection>,
    dir: PathBuf,
}

/// What went wrong in the store: the database, a stored record, or a directory of its own.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("store: a stored record: {0}")]
    Record(#[from] serde_json::Error),
    #[error("store: {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StoreError {
    /// True when the write failed for want of disk space (SQLite's SQLITE_FULL, or ENOSPC).
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Database(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Dir { source, .. } => source.kind() == std::io::ErrorKind::StorageFull,
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

fn find_idempotent(conn: &Connection, key: &str) -> Result<Option<(Composition, String)>> {
    let row: Option<(String, Option<String>)> = conn
        .query_row(
            "SELECT doc, request_hash FROM compositions WHERE idempotency_key = ?1",
            [key],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(doc, hash)| Ok((serde_json::from_str(&doc)?, hash.unwrap_or_default())))
        .transpose()
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS compositions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS compositions_status ON compositions(status, seq);
CREATE TABLE IF NOT EXISTS heads (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS task_vectors (name TEXT PRIMARY KEY, file TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_interruptions (id TEXT PRIMARY KEY, count INTEGER NOT NULL);
";

/// A job found running at start this many times (the process died under it each time) fails
/// instead of being requeued: a job that kills the process would otherwise do so forever.
pub const MAX_INTERRUPTIONS: i64 = 3;

impl Store {
    /// Opens (creating) the store in `dir`: `atlas.db` plus `jobs/` and `task-vectors/`.
    pub fn open(dir: &Path) -> Result<Store> {
        for sub in ["jobs", "task-vectors"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|source| StoreError::Dir {
                path: dir.join(sub),
                source,
            })?;
        }
        remove_unfinished(&dir.join("jobs"));
        let conn = Connection::open(dir.join("atlas.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Mutex::new(conn),
            dir: dir.to_path_buf(),
        })
    }

    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join("jobs").join(id)
    }

    pub fn tv_dir(&self) -> PathBuf {
        self.dir.join("task-vectors")
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (statements are atomic).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a new composition, with an optional (idempotency key, request hash), unless
    /// the key was used before or, with `queue_limit`, that many jobs are queued already. The
    /// checks and the insert hold the connection throughout: concurrent requests cannot both
    /// pass a check and then both insert.
    pub fn insert(
        &self,
        c: &Composition,
        key: Option<(&str, &str)>,
        queue_limit: Option<usize>,
    ) -> Result<Inserted> {
        let conn = self.conn();
        if let Some((k, _)) = key {
            if let Some((earlier, hash)) = find_idempotent(&conn, k)? {
                return Ok(Inserted::Earlier(Box::new(earlier), hash));
            }
        }
        if let Some(limit) = queue_limit {
            let queued: i64 = conn.query_row(
                "SELECT COUNT(*) FROM compositions WHERE status = 'queued'",
                [],
                |r| r.get(0),
            )?;
            if queued as usize >= limit {
                return Ok(Inserted::QueueFull(queued as usize));
            }
        }
        conn.execute(
            "INSERT INTO compositions (id, status, idempotency_key, request_hash, doc)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                c.id,
                c.status.as_str(),
                key.map(|k| k.0),
                key.map(|k| k.1),
                serde_json::to_string(c)?
            ],
        )?;
        Ok(Inserted::New)
    }

    /// The composition created earlier with this idempotency key, and its request's hash.
    pub fn find_idempotent(&self, key: &str) -> Result<Option<(Composition, String)>> {
        find_idempotent(&self.conn(), key)
    }

    pub fn get(&self, id: &str) -> Result<Option<Composition>> {
        let doc: Option<String> = self
            .conn()
            .query_row("SELECT doc FROM compositions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(doc.map(|d| serde_json::from_str(&d)).transpose()?)
    }

    /// Applies `f` to a stored composition and writes it back; None when it does not exist.
    pub fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut Composition),
    ) -> Result<Option<Composition>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let doc: Option<String> = tx
            .query_row("SELECT doc FROM compositions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        let Some(doc) = doc else { return Ok(None) };
        let mut c: Composition = serde_json::from_str(&doc)?;
        f(&mut c);
        tx.execute(
            "UPDATE compositions SET status = ?2, doc = ?3 WHERE id = ?1",
            params![id, c.status.as_str(), serde_json::to_string(&c)?],
        )?;
        tx.commit()?;
        Ok(Some(c))
    }

    pub fn delete(&self, id: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM compositions WHERE id = ?1", [id])?;
        Ok(n > 0)
    }

    /// A page of compositions in creation order, optionally of one status.
    pub fn list(
        &self,
        status: Option<Status>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<Composition>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT doc FROM compositions WHERE (?1 IS NULL OR status = ?1)
             ORDER BY seq LIMIT ?2 OFFSET ?3",
        )?;
        let rows = stmt.query_map(
            params![status.map(|s| s.as_str()), limit as i64, offset as i64],
            |r| r.get::<_, String>(0),
        )?;
        rows.map(|d| Ok(serde_json::from_str(&d?)?)).collect()
    }

    /// The oldest queued job, marked running in the same transaction (so two workers never
    /// claim one job).
    pub fn claim_next(&self) -> Result<Option<Composition>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let row: Option<(String, String)> = tx
            .query_row(
                "SELECT id, doc FROM compositions WHERE status = 'queued' ORDER BY seq LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((id, doc)) = row else {
            return Ok(None);
        };
        let mut c: Composition = serde_json::from_str(&doc)?;
        c.status = Status::Running;
        tx.execute(
            "UPDATE compositions SET status = 'running', doc = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(&c)?],
        )?;
        tx.commit()?;
        Ok(Some(c))
    }

    /// After a restart: jobs that were running go back to the queue (they resume from their
    /// checkpoints), unless they were found running [`MAX_INTERRUPTIONS`] times: those fail,
    /// saying so. Returns (requeued, failed).
    pub fn requeue_running(&self) -> Result<(usize, usize)> {
        let ids: Vec<String> = {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT id FROM compositions WHERE status = 'running'")?;
            let ids = stmt
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            ids
        };
        let mut failed = 0;
        for id in &ids {
            let count: i64 = self.conn().query_row(
                "INSERT INTO job_interruptions (id, count) VALUES (?1, 1)
                 ON CONFLICT(id) DO UPDATE SET count = count + 1 RETURNING count",
                [id],
                |r| r.get(0),
            )?;
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

    /// Learning jobs (not explicit compositions) by status.
    pub fn count_by_status(&self) -> Result<Vec<(String, i64)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT status, COUNT(*) FROM compositions
             WHERE json_extract(doc, '$.kind') != 'explicit' GROUP BY status",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Ids of compositions (any status but failed or cancelled) that use the task vector.
    pub fn users_of(&self, tv: &str) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, doc FROM compositions WHERE status NOT IN ('failed', 'cancelled')",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, doc) = row?;
            let c: Composition = serde_json::from_str(&doc)?;
            if c.task_vectors.iter().any(|t| t == tv) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// Stores a head; false when it was there already (same content, same id).
    /// Stores a head unless it is stored already or `max` heads are (one statement: the
    /// count and the insert cannot interleave with another request's).
    pub fn put_head(&self, h: &HeadView, max: usize) -> Result<PutHead> {
        let conn = self.conn();
        let n = conn.execute(
            "INSERT OR IGNORE INTO heads (id, doc) SELECT ?1, ?2
             WHERE (SELECT COUNT(*) FROM heads) < ?3",
            params![h.id, serde_json::to_string(h)?, max as i64],
        )?;
        if n > 0 {
            return Ok(PutHead::New);
        }
        let exists = conn
            .query_row("SELECT 1 FROM heads WHERE id = ?1", [&h.id], |_| Ok(()))
            .optional()?
            .is_some();
        Ok(if exists {
            PutHead::Existing
        } else {
            PutHead::Full
        })
    }

    /// Deletes a stored head; false when there was none.
    pub fn delete_head(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute("DELETE FROM heads WHERE id = ?1", [id])?
            > 0)
    }

    pub fn get_head(&self, id: &str) -> Result<Option<HeadView>> {
        let doc: Option<String> = self
            .conn()
            .query_row("SELECT doc FROM heads WHERE id = ?1", [id], |r| r.get(0))
            .optional()?;
        Ok(doc.map(|d| serde_json::from_str(&d)).transpose()?)
    }

    /// Records a task vector the server stored itself (uploads, conversions), so that it is
    /// loaded again at start.
    pub fn put_task_vector(&self, name: &str, file: &str, source: &str) -> Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO task_vectors (name, file, source) VALUES (?1, ?2, ?3)",
            params![name, file, source],
        )?;
        Ok(())
    }

    pub fn task_vectors(&self) -> Result<Vec<(String, String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, file, source FROM task_vectors ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_task_vector(&self, name: &str) -> Result<Option<String>> {
        let conn = self.conn();
        let file: Option<String> = conn
            .query_row(
                "SELECT file FROM task_vectors WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        conn.execute("DELETE FROM task_vectors WHERE name = ?1", [name])?;
        Ok(file)
    }
}

/// Removes the `*.tmp` directories of job examples whose writing never finished (the process
/// stopped, or the disk filled, before the rename that makes them whole).
fn remove_unfinished(jobs: &Path) {
    let Ok(entries) = std::fs::read_dir(jobs) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "tmp") {
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
