-- Scheduled snapshots with retention. A schedule targets one VM (vm_id) or every VM
-- carrying a label (selector, "key=value"); runs are recorded in schedule_runs.
CREATE TABLE schedules (
    id            TEXT PRIMARY KEY NOT NULL,
    name          TEXT NOT NULL UNIQUE,
    vm_id         TEXT REFERENCES vms(id) ON DELETE CASCADE,
    selector      TEXT,
    cron          TEXT NOT NULL,
    timezone      TEXT NOT NULL DEFAULT 'UTC',
    enabled       INTEGER NOT NULL DEFAULT 1,
    name_template TEXT NOT NULL,
    -- RetentionPolicy as JSON
    retention     TEXT NOT NULL DEFAULT '{}',
    next_run_at   TEXT,
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    CHECK ((vm_id IS NULL) <> (selector IS NULL))
);
CREATE INDEX schedules_due ON schedules(next_run_at) WHERE enabled = 1;

CREATE TABLE schedule_runs (
    id            TEXT PRIMARY KEY NOT NULL,
    schedule_id   TEXT NOT NULL REFERENCES schedules(id) ON DELETE CASCADE,
    -- cron | manual
    trigger       TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    finished_at   TEXT,
    -- running | succeeded | failed | skipped
    status        TEXT NOT NULL,
    reason        TEXT,
    -- per VM: snapshot and job ids, or why it was skipped; and what retention decided
    detail        TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX schedule_runs_schedule ON schedule_runs(schedule_id, started_at);

-- The schedule that took a snapshot (NULL for manual ones). Not a foreign key: deleting
-- a schedule keeps its snapshots, which then count as manual.
ALTER TABLE snapshots ADD COLUMN schedule_id TEXT;
CREATE INDEX snapshots_schedule ON snapshots(schedule_id) WHERE schedule_id IS NOT NULL;
