-- Schema version 12: a worker failure lists at most 500 of the tasks it re-queued (the started
-- ones first) and counts them all (issue 15). An epoch may hold thousands of grants (slots plus
-- an adaptive prefetch of up to 4,096), and a failure row listing them all could outgrow a
-- changelog record sized for one task row under small [server] max_task_bytes and [worker]
-- max_result_bytes: its commit then failed on every turn. NULL in rows written before: their
-- list is complete.
ALTER TABLE failures ADD COLUMN requeued_count INTEGER;
