-- Schema version 10: the changes not yet confirmed in the changelog as an append-only list (issue
-- 15). Each change of a replicated row appends (tbl, key); a confirmation deletes the notes it
-- read, by seq, so a row changed again meanwhile stays noted by its later note. (Version 4 kept
-- one note per row, keyed by (tbl, key) with a change count: an update at a random place in an
-- index for every change, and another to delete it.)
CREATE TABLE changelog_notes (
    seq INTEGER PRIMARY KEY,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL
);
INSERT INTO changelog_notes (tbl, key) SELECT tbl, key FROM changelog_pending;
DROP TABLE changelog_pending;
ALTER TABLE changelog_notes RENAME TO changelog_pending;
