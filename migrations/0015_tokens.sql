-- API tokens. `id` is the public part of a token's text (strata_<id>_<secret>);
-- only the SHA-256 digest of its secret is kept. A revoked token's row stays, so the
-- name that asked for past jobs (`jobs.requested_by`) still means something; a name
-- is unique among tokens not revoked.
CREATE TABLE tokens (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    scope TEXT NOT NULL CHECK (scope IN ('read', 'operate', 'admin')),
    digest BLOB NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    revoked_at TEXT
);
CREATE UNIQUE INDEX tokens_live_name ON tokens (name) WHERE revoked_at IS NULL;

-- The name of the token whose request created the job (null when authentication is
-- off, and for jobs of earlier releases); `scheduler` for the scheduler's own jobs.
ALTER TABLE jobs ADD COLUMN requested_by TEXT;
CREATE INDEX jobs_requested_by ON jobs (requested_by) WHERE requested_by IS NOT NULL;
