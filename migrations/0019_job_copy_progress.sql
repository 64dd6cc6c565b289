-- The copy a running job is making, as its progress writes last left it (at most about
-- once a second, each its own small transaction: not the journal): bytes copied so far,
-- the step's estimated total, and the seconds left at the rate observed since the copy
-- began. `copy_step` is the plan step they describe: figures of a step the journal has
-- moved past, or left by a crash, are never shown as live. All null when no copy runs.
ALTER TABLE jobs ADD COLUMN copy_step INTEGER;
ALTER TABLE jobs ADD COLUMN bytes_done INTEGER;
ALTER TABLE jobs ADD COLUMN bytes_total INTEGER;
ALTER TABLE jobs ADD COLUMN eta_seconds INTEGER;
-- Bytes the job's finished (or cut short) copies moved, added as each copying step
-- ends: what `strata_job_bytes_copied_total` counts.
ALTER TABLE jobs ADD COLUMN bytes_copied INTEGER NOT NULL DEFAULT 0;

-- The live figures are news about the job (its view shows them), like every other
-- column the view shows.
DROP TRIGGER jobs_updated;
CREATE TRIGGER jobs_updated AFTER UPDATE OF status, progress, detail, cancel_requested,
    error_code, error_message, started_at, finished_at, retry_at, vm_id, cancelled_by,
    target_type, target_id, requested_by, bytes_done, bytes_total, eta_seconds,
    bytes_copied ON jobs BEGIN
    INSERT INTO events (type, resource_id, vm_id, requested_by)
    VALUES (
        CASE WHEN NEW.status IN ('succeeded', 'failed', 'cancelled')
                  AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled')
             THEN 'job.finished' ELSE 'job.updated' END,
        NEW.id, NEW.vm_id, NEW.requested_by);
END;
