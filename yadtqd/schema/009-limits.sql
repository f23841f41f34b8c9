-- Schema version 9: global limits (issue 14). The key a task was submitted with: the limits of
-- its name apply to each key's tasks apart.
ALTER TABLE tasks ADD COLUMN limit_key TEXT;
