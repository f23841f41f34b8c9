-- Schema version 11: the two indexes that serve only some statuses hold only those rows (issue
-- 15). tasks_waiting serves the queries for queued tasks, which all say "status = 'queued'":
-- now only queued tasks are in it, so a grant deletes one entry, and a task's start and end
-- touch none (each was an entry deleted and another inserted). tasks_ended serves retention,
-- whose queries all compare finished_at, which implies "finished_at IS NOT NULL": a task enters
-- it once, when it ends (it moved with every change of status before).
DROP INDEX IF EXISTS tasks_waiting;
CREATE INDEX tasks_waiting ON tasks (name, priority DESC, seq) WHERE status = 'queued';
DROP INDEX IF EXISTS tasks_ended;
CREATE INDEX tasks_ended ON tasks (status, finished_at) WHERE finished_at IS NOT NULL;
