-- Schema version 4: replication (DESIGN 13). Where this file is in the changelog: the next offset
-- to apply of each changelog partition. Local to each server's file, never itself replicated.
CREATE TABLE changelog_positions (
    partition   INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL
);
