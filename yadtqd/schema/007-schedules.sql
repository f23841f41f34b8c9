-- Schema version 7: schedules (issue 14). The last tick each schedule fired (or considered), by
-- name, replicated with the tasks the ticks made, so a tick fires once across restarts and
-- takeovers; fired counts the tasks the schedule made.
CREATE TABLE schedules (
    name      TEXT PRIMARY KEY,
    last_tick REAL NOT NULL,
    fired     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
