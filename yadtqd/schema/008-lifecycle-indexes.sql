-- Schema version 8: retention finds the oldest ended tasks of each status by one index (the
-- partial index on finished_at alone left SQLite scanning a status's rows and sorting them).
DROP INDEX IF EXISTS tasks_finished;
CREATE INDEX tasks_ended ON tasks (status, finished_at);
