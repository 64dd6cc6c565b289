-- A job past its point of no return that ran out of space is parked instead of holding
-- a worker: it stays `running` (its VMs stay locked, it cannot be cancelled) and a
-- worker picks it up again at `retry_at`. NULL for every job that is not parked.
ALTER TABLE jobs ADD COLUMN retry_at TEXT;
CREATE INDEX jobs_parked ON jobs(retry_at) WHERE retry_at IS NOT NULL;
