-- Schema version 6: the task lifecycle (issue 14).
-- A task's priority (higher first, FIFO within one); 'scheduled' tasks wait for run_after (their
-- delay or eta) and are promoted to 'queued' when due, found by their own partial index however
-- many wait. cancel_requested: when an operator asked to cancel a task a worker holds (it ends
-- 'cancelled' once the worker confirms, or when the worker is declared dead). history: the
-- earlier runs of a task an operator retried (JSON list), newest last.
ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN cancel_requested REAL;
ALTER TABLE tasks ADD COLUMN history TEXT;
-- Chains: then_task, the follow-up to queue when this task succeeds (JSON); parent, the task
-- whose success queued this one.
ALTER TABLE tasks ADD COLUMN then_task TEXT;
ALTER TABLE tasks ADD COLUMN parent TEXT;
DROP INDEX IF EXISTS tasks_queued_by_name;
CREATE INDEX tasks_waiting ON tasks (status, name, priority DESC, seq);
CREATE INDEX tasks_scheduled ON tasks (run_after) WHERE status = 'scheduled';
-- Retention: terminal tasks by when they ended, so the oldest are found without a scan.
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX failures_detected ON failures (detected_at);
-- Ids of tasks deleted by retention or a purge, so a status query can say "purged"; kept as
-- long as the tasks themselves were.
CREATE TABLE purged (
    id        TEXT PRIMARY KEY,
    purged_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX purged_at ON purged (purged_at);
-- Purges an operator ordered (yadtqctl purge), worked through in small batches by the active.
CREATE TABLE purge_orders (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    before   REAL NOT NULL,
    statuses TEXT NOT NULL,
    ordered  REAL NOT NULL,
    deleted  INTEGER NOT NULL DEFAULT 0
);
