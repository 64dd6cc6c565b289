-- Who asked for a job's cancel (a token's name; null when nobody did, or anonymously):
-- the audit trail's record of a change to a job someone else asked for.
ALTER TABLE jobs ADD COLUMN cancelled_by TEXT;

-- A cancel's requester is news about the job, like the cancel itself (and so is every
-- other column the job's view shows).
DROP TRIGGER jobs_updated;
CREATE TRIGGER jobs_updated AFTER UPDATE OF status, progress, detail, cancel_requested,
    error_code, error_message, started_at, finished_at, retry_at, vm_id, cancelled_by,
    target_type, target_id, requested_by ON jobs BEGIN
    INSERT INTO events (type, resource_id, vm_id, requested_by)
    VALUES (
        CASE WHEN NEW.status IN ('succeeded', 'failed', 'cancelled')
                  AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled')
             THEN 'job.finished' ELSE 'job.updated' END,
        NEW.id, NEW.vm_id, NEW.requested_by);
END;
