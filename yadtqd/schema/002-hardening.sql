-- Schema version 2: grant numbers per epoch (exact duplicate detection in workers), where each
-- epoch reads and writes (partition counts may grow), boot ids (a second process under a
-- worker id), undelivered events, and an index that finds the queued tasks of one name.
ALTER TABLE tasks ADD COLUMN grant_no INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN grants INTEGER NOT NULL DEFAULT 0;
ALTER TABLE workers ADD COLUMN boot TEXT NOT NULL DEFAULT '';
ALTER TABLE workers ADD COLUMN dispatch_partition INTEGER NOT NULL DEFAULT -1;
ALTER TABLE workers ADD COLUMN events_partition INTEGER NOT NULL DEFAULT -1;
ALTER TABLE workers ADD COLUMN undelivered INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tasks_queued_by_name ON tasks (status, name, seq);
