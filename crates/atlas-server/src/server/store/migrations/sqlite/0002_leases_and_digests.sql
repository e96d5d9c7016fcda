-- Job leases (which replica runs a job, until when), the composition's kind as a column, task
-- vectors' digests, and the library's change counter.
ALTER TABLE compositions ADD COLUMN kind TEXT NOT NULL DEFAULT '';
UPDATE compositions SET kind = COALESCE(json_extract(doc, '$.kind'), '');
ALTER TABLE compositions ADD COLUMN lease_owner TEXT;
ALTER TABLE compositions ADD COLUMN lease_until INTEGER NOT NULL DEFAULT 0;
ALTER TABLE task_vectors ADD COLUMN digest TEXT NOT NULL DEFAULT '';
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO counters (name, value) VALUES ('library', 0);
