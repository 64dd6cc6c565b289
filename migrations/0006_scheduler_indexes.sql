-- The scheduler looks for runs still waiting on their jobs at every tick; keep that a
-- lookup in a tiny index rather than a scan of the whole run history.
CREATE INDEX schedule_runs_running ON schedule_runs(schedule_id) WHERE status = 'running';

-- Due schedules are found by id alone: cover the lookup with the index.
DROP INDEX schedules_due;
CREATE INDEX schedules_due ON schedules(next_run_at, id) WHERE enabled = 1;
