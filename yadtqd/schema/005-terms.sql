-- Schema version 5: the active servers' terms (DESIGN 13), replicated like every other row, so
-- every server can say which one is active and how the last takeover went. One row per term:
-- who served, since when, how long the takeover took, and when and why the term ended (said
-- by the server stepping down, or, when it could not, inferred by the one that took over).
CREATE TABLE terms (
    term       INTEGER PRIMARY KEY,
    server     TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    started_at REAL NOT NULL,
    took       REAL NOT NULL,
    ended_at   REAL,
    ended      TEXT
);
