//! Versioned schema migrations, one list per backend, applied at start in one transaction: a
//! replica that starts beside others waits for the one migrating (an advisory lock in
//! PostgreSQL, the write lock in SQLite), and a database from a newer release is refused.

use super::db::{Conn, Db, Dialect, Op};
use super::{Result, StoreError};

struct Migration {
    version: i64,
    name: &'static str,
    sqlite: &'static str,
    postgres: &'static str,
}

macro_rules! migration {
    ($version:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sqlite: include_str!(concat!("migrations/sqlite/", $name, ".sql")),
            postgres: include_str!(concat!("migrations/postgres/", $name, ".sql")),
        }
    };
}

const MIGRATIONS: &[Migration] = &[
    migration!(1, "0001_initial"),
    migration!(2, "0002_leases_and_digests"),
];

/// The schema version this build writes.
pub fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// Applies the migrations the database lacks; returns the versions applied.
pub fn apply(db: &Db, now_ms: i64) -> Result<Vec<i64>> {
    let dialect = db.dialect();
    db.tx(Op::Write, |c| {
        if dialect == Dialect::Postgres {
            // Held to the end of the transaction: replicas starting together migrate in turn.
            c.query("SELECT pg_advisory_xact_lock(7216540019)", &[])?;
        }
        c.batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        )?;
        let current = current_version(c)?;
        if current > latest() {
            return Err(StoreError::Config(format!(
                "the database's schema is version {current}, newer than this build's {}: \
                 run the release that wrote it, or a newer one",
                latest()
            )));
        }
        let mut applied = Vec::new();
        for m in MIGRATIONS.iter().filter(|m| m.version > current) {
            c.batch(match dialect {
                Dialect::Sqlite => m.sqlite,
                Dialect::Postgres => m.postgres,
            })?;
            c.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                &[m.version.into(), m.name.into(), now_ms.into()],
            )?;
            applied.push(m.version);
        }
        Ok(applied)
    })
}

fn current_version(c: &mut dyn Conn) -> Result<i64> {
    let row = c.query_opt("SELECT MAX(version) FROM schema_migrations", &[])?;
    Ok(match row {
        Some(r) => r.0.first().map_or(0, |v| match v {
            super::db::Cell::Int(n) => *n,
            _ => 0,
        }),
        None => 0,
    })
}
