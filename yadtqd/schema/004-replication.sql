-- Schema version 4: replication (DESIGN 13). Where this file is in the changelog: the next offset
-- to apply of each changelog partition. Local to each server's file, never itself replicated.
CREATE TABLE changelog_positions (
    partition   INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
-- The rows changed and not yet confirmed in the changelog (tbl, key), written by the triggers
-- the writers' connections create; gen counts changes, so a confirmation removes only what
-- it sent. Non-empty at start: the last changes may not have reached Kafka.
CREATE TABLE changelog_pending (
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    gen INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
-- Facts about this file's replication, by name: publishing = 1 while rows that only this file
-- holds (a database from before the changelog) are being sent to the changelog in chunks.
CREATE TABLE replication (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
