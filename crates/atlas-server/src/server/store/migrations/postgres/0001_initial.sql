CREATE TABLE compositions (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    doc TEXT NOT NULL
);
CREATE INDEX compositions_status ON compositions(status, seq);
CREATE TABLE heads (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE task_vectors (name TEXT PRIMARY KEY, file TEXT NOT NULL, source TEXT NOT NULL);
CREATE TABLE job_interruptions (id TEXT PRIMARY KEY, count BIGINT NOT NULL);
