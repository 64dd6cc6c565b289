-- Whether a job's view shows its copy figures depends on the journal too (`copy_step`
-- against `next_step`, and the phase: figures of a step the journal has moved past
-- are not live), so a change of those columns can change the view: it is an event
-- like any other change of the view (the seal drops one that leaves the view as it
-- was). The read model (`store::views`) is kept in step by these events.
DROP TRIGGER jobs_updated;
CREATE TRIGGER jobs_updated AFTER UPDATE OF status, progress, detail, cancel_requested,
    error_code, error_message, started_at, finished_at, retry_at, vm_id, cancelled_by,
    target_type, target_id, requested_by, bytes_done, bytes_total, eta_seconds,
    bytes_copied, copy_step, next_step, phase ON jobs BEGIN
    INSERT INTO events (type, resource_id, vm_id, requested_by)
    VALUES (
        CASE WHEN NEW.status IN ('succeeded', 'failed', 'cancelled')
                  AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled')
             THEN 'job.finished' ELSE 'job.updated' END,
        NEW.id, NEW.vm_id, NEW.requested_by);
END;
