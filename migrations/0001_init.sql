-- strata schema, version 1.
-- Ids are UUIDv7 stored as hyphenated TEXT everywhere (never BLOB), timestamps are
-- RFC 3339 UTC TEXT. Files live at <data_dir>/volumes/<volume_id>.qcow2, so no path is
-- stored: a volume's file name follows from its id and backing references stay relative.

CREATE TABLE vms (
    id                  TEXT PRIMARY KEY NOT NULL,
    name                TEXT NOT NULL UNIQUE,
    description         TEXT NOT NULL DEFAULT '',
    -- power state, owned by the orchestrator (PATCH): stopped | running
    state               TEXT NOT NULL DEFAULT 'stopped',
    -- lifecycle of the record: creating | ready | deleting | error
    status              TEXT NOT NULL,
    -- the snapshot the present state grows from (NULL before the first snapshot)
    current_snapshot_id TEXT,
    created_at          TEXT NOT NULL,
    updated_at          TEXT NOT NULL
);

CREATE TABLE disks (
    id                TEXT PRIMARY KEY NOT NULL,
    vm_id             TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name              TEXT NOT NULL,
    size_bytes        INTEGER NOT NULL,
    -- creating | ready | deleting | error
    status            TEXT NOT NULL,
    -- the writable top of the chain; NULL only while the disk is being created
    active_volume_id  TEXT,
    created_at        TEXT NOT NULL,
    UNIQUE (vm_id, name)
);

-- One qcow2 file. Volumes of one disk form a tree through parent_id (the backing file).
CREATE TABLE volumes (
    id          TEXT PRIMARY KEY NOT NULL,
    disk_id     TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
    parent_id   TEXT REFERENCES volumes(id),
    -- virtual size the file was created with (a revert restores the disk size from it)
    size_bytes  INTEGER NOT NULL,
    -- creating | ready | rewriting (being merged: its own content is not trustworthy,
    -- like an oVirt ILLEGAL volume) | deleting
    status      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX volumes_disk ON volumes(disk_id);
CREATE INDEX volumes_parent ON volumes(parent_id);

CREATE TABLE snapshots (
    id          TEXT PRIMARY KEY NOT NULL,
    vm_id       TEXT NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    parent_id   TEXT REFERENCES snapshots(id),
    -- creating | ready | deleting | error
    status      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    UNIQUE (vm_id, name)
);
CREATE INDEX snapshots_vm ON snapshots(vm_id);

-- The layer a snapshot froze for each disk it covers.
CREATE TABLE snapshot_volumes (
    snapshot_id TEXT NOT NULL REFERENCES snapshots(id) ON DELETE CASCADE,
    disk_id     TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
    volume_id   TEXT NOT NULL REFERENCES volumes(id),
    PRIMARY KEY (snapshot_id, disk_id)
);
CREATE UNIQUE INDEX snapshot_volumes_volume ON snapshot_volumes(volume_id);

-- Durable job queue and journal. `plan` is written before the first file is touched and
-- `next_step` after each step completes, so a restart resumes (or rolls back) exactly.
CREATE TABLE jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    kind             TEXT NOT NULL,
    -- queued | running | succeeded | failed | cancelled
    status           TEXT NOT NULL,
    progress         INTEGER NOT NULL DEFAULT 0,
    target_type      TEXT NOT NULL,
    target_id        TEXT NOT NULL,
    vm_id            TEXT,
    params           TEXT NOT NULL DEFAULT '{}',
    -- journal: planned | executing | committed (metadata applied, only file cleanup left)
    phase            TEXT,
    plan             TEXT,
    next_step        INTEGER NOT NULL DEFAULT 0,
    -- what the planner chose (e.g. merge directions), shown in the API
    detail           TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX jobs_status ON jobs(status, seq);
CREATE INDEX jobs_vm ON jobs(vm_id, status);
