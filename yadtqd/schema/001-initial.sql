-- Schema version 1, the first release's (SQLite, WAL). Every statement is idempotent, because
-- databases made before schema versions existed (user_version 0) already hold some of it.
-- All queries live in yadtqd/store.py; later versions are the numbered files beside this one.
CREATE TABLE IF NOT EXISTS tasks (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    id            TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    status        TEXT NOT NULL,
    worker        TEXT,
    epoch         TEXT,
    attempt       INTEGER NOT NULL DEFAULT 0,
    failures      INTEGER NOT NULL DEFAULT 0,
    lost          INTEGER NOT NULL DEFAULT 0,
    max_retries   INTEGER NOT NULL DEFAULT 0,
    retry_backoff REAL NOT NULL DEFAULT 1.0,
    run_after     REAL NOT NULL DEFAULT 0,
    submitted_at  REAL NOT NULL,
    assigned_at   REAL,
    started_at    REAL,
    finished_at   REAL,
    result        TEXT,
    error         TEXT
);
-- Not a partial index: SQLite uses a partial index only when the query repeats its WHERE
-- term, and "status = 'queued'" does not repeat "status IN (...)".
DROP INDEX IF EXISTS tasks_waiting;
CREATE INDEX IF NOT EXISTS tasks_by_status ON tasks (status, seq);
CREATE INDEX IF NOT EXISTS tasks_by_epoch ON tasks (epoch)
    WHERE status IN ('assigned', 'processing');
CREATE TABLE IF NOT EXISTS offsets (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS workers (
    epoch          TEXT PRIMARY KEY,
    worker         TEXT NOT NULL,
    host           TEXT NOT NULL,
    pid            INTEGER NOT NULL,
    slots          INTEGER NOT NULL,
    prefetch       INTEGER NOT NULL,
    tasks          TEXT NOT NULL,
    version        TEXT NOT NULL,
    state          TEXT NOT NULL,
    joined_at      REAL NOT NULL,
    last_heartbeat REAL NOT NULL,
    left_at        REAL,
    busy           INTEGER NOT NULL DEFAULT 0,
    done           INTEGER NOT NULL DEFAULT 0,
    failed         INTEGER NOT NULL DEFAULT 0,
    executed       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS workers_live ON workers (state) WHERE state IN ('live', 'leaving');
CREATE TABLE IF NOT EXISTS failures (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    worker         TEXT NOT NULL,
    epoch          TEXT NOT NULL,
    host           TEXT NOT NULL,
    last_heartbeat REAL NOT NULL,
    detected_at    REAL NOT NULL,
    reason         TEXT NOT NULL,
    requeued       TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
-- Tasks per status, kept by triggers in the same transaction as every change, so reading the
-- totals costs the same with a million tasks as with ten.
CREATE TABLE IF NOT EXISTS status_counts (
    status TEXT PRIMARY KEY,
    n      INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS status_counts_insert AFTER INSERT ON tasks BEGIN
    INSERT INTO status_counts (status, n) VALUES (new.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS status_counts_update AFTER UPDATE OF status ON tasks
    WHEN old.status != new.status BEGIN
    UPDATE status_counts SET n = n - 1 WHERE status = old.status;
    INSERT INTO status_counts (status, n) VALUES (new.status, 1)
        ON CONFLICT (status) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS status_counts_delete AFTER DELETE ON tasks BEGIN
    UPDATE status_counts SET n = n - 1 WHERE status = old.status;
END;
-- A database from before the triggers: count once.
INSERT INTO status_counts (status, n) SELECT status, count(*) FROM tasks
    WHERE NOT EXISTS (SELECT 1 FROM status_counts) GROUP BY status;
