-- Snapshot expiry and hold. An expired snapshot (expires_at <= now) is deleted by the
-- periodic sweep unless it is on hold; a snapshot on hold is never pruned.
ALTER TABLE snapshots ADD COLUMN expires_at TEXT;
ALTER TABLE snapshots ADD COLUMN hold INTEGER NOT NULL DEFAULT 0;
CREATE INDEX snapshots_expiry ON snapshots(expires_at) WHERE expires_at IS NOT NULL;
