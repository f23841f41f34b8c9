-- Schema version 3: per-epoch outcome counts kept by the server as it records them, so the
-- figures yadtqctl shows for a worker agree with the tasks in the store (a worker's own
-- heartbeat counts lag, and stop when it dies).
ALTER TABLE workers ADD COLUMN succeeded INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN failed_runs INTEGER NOT NULL DEFAULT 0;
