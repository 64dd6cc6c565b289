-- Set (atomically with a check that no cancel was requested) just before a job starts
-- the step it cannot undo (a commit), so cancel requests are accepted exactly until then.
ALTER TABLE jobs ADD COLUMN past_no_return INTEGER NOT NULL DEFAULT 0;
