-- The schema before versioned migrations (IF NOT EXISTS: such databases already have it).
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
