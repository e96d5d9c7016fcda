//! The store on both backends: the embedded SQLite file and a real PostgreSQL (a cluster the
//! tests start, as the integration tests do). Two `Store`s on one database stand for two
//! replicas.

use super::*;
use serde_json::json;
use std::sync::Arc;

#[path = "../../../tests/common/postgres.rs"]
#[allow(dead_code)]
mod pg;

struct Backend {
    dir: tempfile::TempDir,
    url: String,
}

impl Backend {
    fn sqlite() -> Backend {
        Backend {
            dir: tempfile::tempdir().unwrap(),
            url: String::new(),
        }
    }

    fn postgres() -> Backend {
        Backend {
            dir: tempfile::tempdir().unwrap(),
            url: pg::database(),
        }
    }

    /// A replica's store on this backend.
    fn open(&self, origin: &str) -> Store {
        Store::open(Location {
            data_dir: self.dir.path(),
            blob_dir: &self.dir.path().join("blobs"),
            database_url: &self.url,
            origin,
        })
        .unwrap()
    }
}

fn job(id: &str) -> Composition {
    serde_json::from_value(json!({
        "id": id, "name": null, "kind": "few_shot", "status": "queued",
        "task_vectors": ["a"], "layout": {"kind": "isotropic"},
        "provenance": {"backbone": "b", "backbone_digest": "d", "task_vector_digests": ["x"]},
        "created_at": 0.0, "updated_at": 0.0
    }))
    .unwrap()
}

/// Each test, once per backend.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $name() { super::$name(super::Backend::sqlite()) })*
        }
        mod postgres {
            $(#[test] fn $name() { super::$name(super::Backend::postgres()) })*
        }
    };
}

on_both!(
    migrations_are_applied_once_and_recorded,
    records_round_trip,
    idempotency_keys_and_the_queue_limit_hold_across_replicas,
    a_job_is_claimed_once_and_resumed_after_its_lease_expires,
    a_lapsed_lease_blocks_the_old_owner,
    heads_are_bounded_and_cached,
    stored_task_vectors_move_the_library_counter,
);

fn migrations_are_applied_once_and_recorded(b: Backend) {
    let s = b.open("a");
    let versions =
        s.db.with(Op::Read, |c| {
            c.query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
        })
        .unwrap();
    let versions: Vec<i64> = versions.iter().map(|r| r.int(0).unwrap()).collect();
    assert_eq!(versions, (1..=migrations::latest()).collect::<Vec<_>>());
    drop(s);
    // Reopened (a restart, or a second replica): nothing is applied again.
    assert!(migrations::apply(&b.open("b").db, 0).unwrap().is_empty());
    // A database written by a newer release is refused, naming both versions.
    let s = b.open("c");
    s.db.with(Op::Write, |c| {
        c.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 0)",
            &[],
        )
    })
    .unwrap();
    let e = migrations::apply(&s.db, 0).unwrap_err().to_string();
    assert!(e.contains("999") && e.contains("newer"), "{e}");
}

fn records_round_trip(b: Backend) {
    let s = b.open("a");
    let c = job("j1");
    assert!(matches!(s.insert(&c, None, None).unwrap(), Inserted::New));
    assert_eq!(s.get("j1").unwrap().unwrap().kind, "few_shot");
    let updated = s
        .update("j1", |c| c.name = Some("x".into()))
        .unwrap()
        .unwrap();
    assert_eq!(updated.name.as_deref(), Some("x"));
    assert_eq!(s.list(Some(Status::Queued), 0, 10).unwrap().len(), 1);
    assert_eq!(s.list(Some(Status::Running), 0, 10).unwrap().len(), 0);
    assert_eq!(
        s.count_by_status().unwrap(),
        vec![("queued".to_string(), 1)]
    );
    assert_eq!(s.users_of("a").unwrap(), vec!["j1".to_string()]);
    assert!(s.delete("j1").unwrap());
    assert!(s.get("j1").unwrap().is_none());
    assert!(!s.delete("j1").unwrap());
}

fn idempotency_keys_and_the_queue_limit_hold_across_replicas(b: Backend) {
    let replicas: Vec<Arc<Store>> = (0..2).map(|i| Arc::new(b.open(&format!("r{i}")))).collect();
    // 16 racing inserts on two replicas, each with `key` and `limit`: how many were new.
    let race = |prefix: &str, key: Option<&'static str>, limit: Option<usize>| -> usize {
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let s = replicas[i % 2].clone();
                let id = format!("{prefix}{i}");
                std::thread::spawn(move || {
                    match s
                        .insert(&job(&id), key.map(|k| (k, "hash")), limit)
                        .unwrap()
                    {
                        Inserted::New => 1,
                        Inserted::Earlier(c, hash) => {
                            assert_eq!(hash, "hash");
                            assert!(c.id.starts_with("k"));
                            0
                        }
                        Inserted::QueueFull(n) => {
                            assert_eq!(n, limit.unwrap());
                            0
                        }
                    }
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    };
    assert_eq!(race("k", Some("key"), None), 1, "one job per key");
    assert_eq!(
        race("q", None, Some(5)),
        4,
        "the queue limit is exact (one queued before)"
    );
    assert_eq!(
        replicas[0]
            .list(Some(Status::Queued), 0, 100)
            .unwrap()
            .len(),
        5
    );
}

fn a_job_is_claimed_once_and_resumed_after_its_lease_expires(b: Backend) {
    let (a, c) = (Arc::new(b.open("a")), Arc::new(b.open("c")));
    for i in 0..6 {
        a.insert(&job(&format!("j{i}")), None, None).unwrap();
    }
    let far = now_ms() + 60_000;
    let claimers: Vec<_> = [a.clone(), c.clone(), a.clone(), c.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            std::thread::spawn(move || {
                let owner = if i % 2 == 0 { "a" } else { "c" };
                let mut got = Vec::new();
                while let Some((job, how)) = s.claim_next(owner, far).unwrap() {
                    assert_eq!(how, Claim::Queued);
                    got.push((owner, job.id));
                }
                got
            })
        })
        .collect();
    let claimed: Vec<(&str, String)> = claimers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let by_c = claimed.iter().filter(|(o, _)| *o == "c").count();
    let mut all: Vec<String> = claimed.into_iter().map(|(_, id)| id).collect();
    all.sort();
    assert_eq!(all, (0..6).map(|i| format!("j{i}")).collect::<Vec<_>>());

    // Replica a dies holding a job; its lease expires; c resumes it, counting the interruption.
    let b2 = b.open("a");
    b2.insert(&job("k"), None, None).unwrap();
    let (k, _) = b2.claim_next("a", now_ms() - 1).unwrap().unwrap();
    assert_eq!(k.id, "k");
    let (k, how) = c.claim_next("c", far).unwrap().unwrap();
    assert_eq!((k.id.as_str(), how), ("k", Claim::Expired));
    assert_eq!(c.renew("c", far).unwrap().len(), by_c + 1);

    // A job whose replicas keep dying under it fails after MAX_INTERRUPTIONS, saying so.
    b2.insert(&job("doomed"), None, None).unwrap();
    b2.claim_next("a", now_ms() - 1).unwrap().unwrap();
    for _ in 1..MAX_INTERRUPTIONS {
        let (d, how) = c.claim_next("c", now_ms() - 1).unwrap().unwrap();
        assert_eq!((d.id.as_str(), how), ("doomed", Claim::Expired));
    }
    assert!(c.claim_next("c", far).unwrap().is_none());
    let d = c.get("doomed").unwrap().unwrap();
    assert_eq!(d.status, Status::Failed);
    assert!(d.error.unwrap().contains("stopped abruptly"));
}

fn a_lapsed_lease_blocks_the_old_owner(b: Backend) {
    let (a, c) = (b.open("a"), b.open("c"));
    a.insert(&job("j"), None, None).unwrap();
    a.claim_next("a", now_ms() - 1).unwrap().unwrap();
    assert!(a
        .update_held("j", "a", |c| c.name = Some("a".into()))
        .unwrap()
        .is_some());
    c.claim_next("c", now_ms() + 60_000).unwrap().unwrap();
    // a's progress and end no longer land; c's do.
    assert!(a
        .update_held("j", "a", |c| c.name = Some("late".into()))
        .unwrap()
        .is_none());
    assert!(a.renew("a", now_ms() + 60_000).unwrap().is_empty());
    assert!(c
        .update_held("j", "c", |c| c.status = Status::Succeeded)
        .unwrap()
        .is_some());
    // Finished, it is no one's: no more updates under a lease.
    assert!(c
        .update_held("j", "c", |c| c.name = None)
        .unwrap()
        .is_none());
    assert_eq!(a.get("j").unwrap().unwrap().name.as_deref(), Some("a"));
}

fn heads_are_bounded_and_cached(b: Backend) {
    let (a, c) = (b.open("a"), b.open("c"));
    let head = |id: &str| HeadView {
        id: id.into(),
        classes: vec!["x".into()],
        templates: vec!["{}".into()],
    };
    assert!(matches!(a.put_head(&head("h1"), 2).unwrap(), PutHead::New));
    assert!(matches!(
        c.put_head(&head("h1"), 2).unwrap(),
        PutHead::Existing
    ));
    assert!(matches!(c.put_head(&head("h2"), 2).unwrap(), PutHead::New));
    assert!(matches!(a.put_head(&head("h3"), 2).unwrap(), PutHead::Full));
    let before = c.round_trips();
    assert!(c.get_head("h1").unwrap().is_some());
    assert!(c.get_head("h1").unwrap().is_some());
    assert_eq!(
        c.round_trips() - before,
        1,
        "the second read is the cache's"
    );
    assert!(a.delete_head("h1").unwrap());
    // c learns of the delete from the change notice (here, by hand).
    c.forget("h1");
    assert!(c.get_head("h1").unwrap().is_none());
}

fn stored_task_vectors_move_the_library_counter(b: Backend) {
    let (a, c) = (b.open("a"), b.open("c"));
    let g0 = c.library_generation().unwrap();
    let tv = StoredTaskVector {
        name: "t".into(),
        file: "t.0123.safetensors".into(),
        source: "upload".into(),
        digest: "sha256:0123".into(),
    };
    a.put_task_vector(&tv).unwrap();
    let (listed, g1) = c.task_vectors().unwrap();
    assert_eq!(listed, vec![tv]);
    assert!(g1 > g0);
    assert_eq!(
        c.delete_task_vector("t").unwrap().as_deref(),
        Some("t.0123.safetensors")
    );
    assert!(a.library_generation().unwrap() > g1);
    assert_eq!(a.delete_task_vector("t").unwrap(), None);
}

/// A database written before migrations were versioned (the first release's schema, no
/// schema_migrations table) is taken over as it is: its records kept, its kind column filled.
#[test]
fn an_unversioned_sqlite_database_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let conn = rusqlite::Connection::open(dir.path().join("atlas.db")).unwrap();
    conn.execute_batch(include_str!("migrations/sqlite/0001_initial.sql"))
        .unwrap();
    let doc = serde_json::to_string(&job("old")).unwrap();
    conn.execute(
        "INSERT INTO compositions (id, status, doc) VALUES ('old', 'queued', ?1)",
        [doc],
    )
    .unwrap();
    drop(conn);
    let b = Backend {
        dir,
        url: String::new(),
    };
    let s = b.open("a");
    assert_eq!(s.get("old").unwrap().unwrap().id, "old");
    assert_eq!(
        s.count_by_status().unwrap(),
        vec![("queued".to_string(), 1)]
    );
}
