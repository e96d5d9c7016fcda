//! The two database backends behind [`super::Store`]: the embedded SQLite file (one process) and
//! PostgreSQL (shared by replicas). Queries are written once, in PostgreSQL's placeholder style
//! (`$1`), and rewritten for SQLite (`?1`); where the dialects differ the caller asks
//! [`Db::dialect`]. Values cross as [`Arg`] and come back as [`Row`]s of [`Cell`]s.

use super::{Result, StoreError};
use postgres::types::{to_sql_checked, IsNull, ToSql as PgToSql, Type};
use r2d2_postgres::{postgres::NoTls, PostgresConnectionManager};
use rusqlite::types::{ToSqlOutput, ValueRef};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A query argument.
#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Text(Option<&'a str>),
    Int(i64),
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(s: &'a str) -> Self {
        Arg::Text(Some(s))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(s: Option<&'a str>) -> Self {
        Arg::Text(s)
    }
}

impl From<i64> for Arg<'_> {
    fn from(n: i64) -> Self {
        Arg::Int(n)
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Arg::Text(Some(s)) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Arg::Text(None) => ToSqlOutput::Borrowed(ValueRef::Null),
            Arg::Int(n) => ToSqlOutput::Borrowed(ValueRef::Integer(n)),
        })
    }
}

impl PgToSql for Arg<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Arg::Text(s) => s.to_sql(ty, out),
            Arg::Int(n) => n.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <&str as PgToSql>::accepts(ty) || <i64 as PgToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Text(String),
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(pub Vec<Cell>);

impl Row {
    pub fn text(&self, i: usize) -> Result<String> {
        match self.0.get(i) {
            Some(Cell::Text(s)) => Ok(s.clone()),
            other => Err(StoreError::Shape(format!(
                "column {i}: text expected, {other:?}"
            ))),
        }
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>> {
        match self.0.get(i) {
            Some(Cell::Null) => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64> {
        match self.0.get(i) {
            Some(Cell::Int(n)) => Ok(*n),
            other => Err(StoreError::Shape(format!(
                "column {i}: integer expected, {other:?}"
            ))),
        }
    }
}

/// A connection or a transaction of either backend.
pub trait Conn {
    fn query(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>>;
    fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64>;
    /// Several statements, no arguments (migrations).
    fn batch(&mut self, sql: &str) -> Result<()>;

    fn query_opt(&mut self, sql: &str, args: &[Arg]) -> Result<Option<Row>> {
        Ok(self.query(sql, args)?.into_iter().next())
    }
}

/// `$1` → `?1`: SQLite's numbered placeholders.
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

/// `Conn` for a backend's connection and its transaction, which run statements alike.
macro_rules! conn {
    ($($ty:ty),+ => $query:expr, $execute:expr, $batch:expr) => {$(
        impl Conn for $ty {
            fn query(&mut self, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
                $query(self, sql, args)
            }
            fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64> {
                $execute(self, sql, args)
            }
            fn batch(&mut self, sql: &str) -> Result<()> {
                $batch(self, sql)
            }
        }
    )+};
}

conn!(rusqlite::Connection, rusqlite::Transaction<'_> => sqlite_query, sqlite_execute, sqlite_batch);

fn sqlite_query(conn: &rusqlite::Connection, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
    let mut stmt = conn.prepare_cached(&sqlite_sql(sql))?;
    let n = stmt.column_count();
    let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| {
        (0..n)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Real(v) => Cell::Int(v as i64),
                    ValueRef::Blob(_) => Cell::Null,
                })
            })
            .collect::<rusqlite::Result<Vec<_>>>()
            .map(Row)
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn sqlite_batch(conn: &rusqlite::Connection, sql: &str) -> Result<()> {
    Ok(conn.execute_batch(sql)?)
}

fn sqlite_execute(conn: &rusqlite::Connection, sql: &str, args: &[Arg]) -> Result<u64> {
    let mut stmt = conn.prepare_cached(&sqlite_sql(sql))?;
    Ok(stmt.execute(rusqlite::params_from_iter(args.iter()))? as u64)
}

fn pg_args<'a>(args: &'a [Arg<'a>]) -> Vec<&'a (dyn PgToSql + Sync)> {
    args.iter().map(|a| a as &(dyn PgToSql + Sync)).collect()
}

fn pg_rows(rows: Vec<postgres::Row>) -> Result<Vec<Row>> {
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    let ty = r.columns()[i].type_();
                    Ok(if *ty == Type::INT8 {
                        r.try_get::<_, Option<i64>>(i)?
                            .map_or(Cell::Null, Cell::Int)
                    } else if *ty == Type::INT4 {
                        r.try_get::<_, Option<i32>>(i)?
                            .map_or(Cell::Null, |v| Cell::Int(v.into()))
                    } else if <String as postgres::types::FromSql>::accepts(ty) {
                        r.try_get::<_, Option<String>>(i)?
                            .map_or(Cell::Null, Cell::Text)
                    } else {
                        // void (pg_notify, advisory locks) and types the store never reads.
                        Cell::Null
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Row)
        })
        .collect()
}

conn!(postgres::Client, postgres::Transaction<'_> => pg_query, pg_execute, pg_batch);

fn pg_query<C: postgres::GenericClient>(c: &mut C, sql: &str, args: &[Arg]) -> Result<Vec<Row>> {
    pg_rows(c.query(sql, &pg_args(args))?)
}

fn pg_execute<C: postgres::GenericClient>(c: &mut C, sql: &str, args: &[Arg]) -> Result<u64> {
    Ok(c.execute(sql, &pg_args(args))?)
}

fn pg_batch<C: postgres::GenericClient>(c: &mut C, sql: &str) -> Result<()> {
    Ok(c.batch_execute(sql)?)
}

type PgPool = r2d2::Pool<PostgresConnectionManager<NoTls>>;

/// What a round trip was for, in the error counts.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Read,
    Write,
    Claim,
    Heartbeat,
    Sync,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Claim, Op::Heartbeat, Op::Sync];
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Claim => "claim",
            Op::Heartbeat => "heartbeat",
            Op::Sync => "sync",
        }
    }
}

/// Connections of the chosen backend, with the counters the metrics read.
pub struct Db {
    backend: Backend,
    /// Round trips made (statements and transactions).
    pub queries: AtomicU64,
    /// Failed round trips, by [`Op`].
    pub errors: [AtomicU64; 5],
    /// False after a round trip failed for want of the database, true after one succeeded.
    pub up: AtomicBool,
}

enum Backend {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(PgPool, postgres::Config),
}

/// Connections per replica: the handlers and the workers share them; a request that finds none
/// free waits at most [`CONNECT_TIMEOUT`].
const POOL_SIZE: u32 = 8;
/// How long a request waits for the database (to connect, or for a pooled connection) before
/// it is answered 503.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl Db {
    pub fn sqlite(conn: rusqlite::Connection) -> Db {
        Db::new(Backend::Sqlite(Mutex::new(conn)))
    }

    /// A pool of connections to `url` (`postgres://…`). It connects lazily: a server whose
    /// database is down still starts, and says so on /readyz.
    pub fn postgres(url: &str) -> Result<Db> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|e| StoreError::Config(format!("database_url: {e}")))?;
        config.connect_timeout(CONNECT_TIMEOUT);
        if config.get_application_name().is_none() {
            config.application_name("atlas-serve");
        }
        let pool = r2d2::Pool::builder()
            .max_size(POOL_SIZE)
            .min_idle(Some(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .build_unchecked(PostgresConnectionManager::new(config.clone(), NoTls));
        Ok(Db::new(Backend::Postgres(pool, config)))
    }

    fn new(backend: Backend) -> Db {
        Db {
            backend,
            queries: AtomicU64::new(0),
            errors: Default::default(),
            up: AtomicBool::new(true),
        }
    }

    pub fn dialect(&self) -> Dialect {
        match self.backend {
            Backend::Sqlite(_) => Dialect::Sqlite,
            Backend::Postgres(..) => Dialect::Postgres,
        }
    }

    /// Runs `f` on a connection, outside a transaction (each statement commits by itself).
    pub fn with<T>(&self, op: Op, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        self.counted(op, || match &self.backend {
            Backend::Sqlite(conn) => f(&mut *lock(conn)),
            Backend::Postgres(pool, _) => f(&mut *pool.get()?),
        })
    }

    /// Runs `f` in one transaction, committed when `f` returns Ok. In SQLite it takes the write
    /// lock at once (`BEGIN IMMEDIATE`); in PostgreSQL statements may lock rows themselves
    /// (`FOR UPDATE`).
    pub fn tx<T>(&self, op: Op, f: impl FnOnce(&mut dyn Conn) -> Result<T>) -> Result<T> {
        self.counted(op, || match &self.backend {
            Backend::Sqlite(conn) => {
                let mut conn = lock(conn);
                let mut tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            }
            Backend::Postgres(pool, _) => {
                let mut conn = pool.get()?;
                let mut tx = conn.transaction()?;
                let out = f(&mut tx)?;
                tx.commit()?;
                Ok(out)
            }
        })
    }

    /// A connection of its own, outside the pool, for LISTEN (PostgreSQL only).
    pub fn connect_alone(&self) -> Result<postgres::Client> {
        match &self.backend {
            Backend::Postgres(_, config) => off_async(|| Ok(config.connect(NoTls)?)),
            Backend::Sqlite(_) => Err(StoreError::Config("SQLite has no LISTEN".into())),
        }
    }

    /// Counts the round trip and records whether the database answered. PostgreSQL's blocking
    /// client runs its own runtime, which may not start on a thread that drives async tasks:
    /// there, the call runs in `block_in_place`.
    fn counted<T>(&self, op: Op, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        let out = match self.backend {
            Backend::Postgres(..) => off_async(f),
            Backend::Sqlite(_) => f(),
        };
        match &out {
            Err(e) => {
                self.errors[op as usize].fetch_add(1, Ordering::Relaxed);
                self.up.store(!e.is_unavailable(), Ordering::Relaxed);
            }
            Ok(_) => self.up.store(true, Ordering::Relaxed),
        }
        out
    }
}

/// Runs blocking work from anywhere: inside a multi-threaded tokio runtime it leaves the
/// runtime's context first.
pub fn off_async<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

fn lock(conn: &Mutex<rusqlite::Connection>) -> std::sync::MutexGuard<'_, rusqlite::Connection> {
    // A panic while holding the lock leaves SQLite consistent (statements are atomic).
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_sqlite_s() {
        assert_eq!(
            sqlite_sql("SELECT doc FROM t WHERE id = $1 AND n < $12"),
            "SELECT doc FROM t WHERE id = ?1 AND n < ?12"
        );
    }

    #[test]
    fn sqlite_round_trips_every_kind_of_value() {
        let mut c = rusqlite::Connection::open_in_memory().unwrap();
        c.execute("CREATE TABLE t (a TEXT, b INTEGER, c TEXT)", [])
            .unwrap();
        Conn::execute(
            &mut c,
            "INSERT INTO t VALUES ($1, $2, $3)",
            &["x".into(), 7.into(), Arg::Text(None)],
        )
        .unwrap();
        let rows = Conn::query(&mut c, "SELECT a, b, c FROM t WHERE b = $1", &[7.into()]).unwrap();
        assert_eq!(rows[0].text(0).unwrap(), "x");
        assert_eq!(rows[0].int(1).unwrap(), 7);
        assert_eq!(rows[0].opt_text(2).unwrap(), None);
        assert!(rows[0].int(0).is_err());
    }
}
