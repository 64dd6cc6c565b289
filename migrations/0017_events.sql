-- The event stream's history (`GET /v1/events`). Triggers write a row for every change
-- to a resource, inside the transaction that makes it, so an event exists exactly when
-- its change was committed, and ids (assigned by the one writer) follow commit order.
-- Before the transaction commits, strata folds its rows (a resource created and then
-- updated is one `created`) and fills `data` with the resource's API view as the
-- transaction leaves it, `at` with strata's clock and `requested_by` with who asked;
-- rows with `data` still NULL belong to the transaction in progress. Only the newest
-- rows are kept.
CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    type         TEXT NOT NULL,
    resource_id  TEXT NOT NULL,
    vm_id        TEXT,
    requested_by TEXT,
    at           TEXT,
    data         TEXT
);
CREATE INDEX events_unsealed ON events (id) WHERE data IS NULL;
-- A resource's last event: a change that leaves its view as it was is no event.
CREATE INDEX events_resource ON events (resource_id, id);

-- The newest event id pruned from the history: a client resuming from an older id
-- missed events that are gone, and is told to reload.
CREATE TABLE events_pruned (
    through_id INTEGER NOT NULL
);
INSERT INTO events_pruned (through_id) VALUES (0);

-- VMs and templates share the vms table; converting a VM into a template changes its
-- kind, which is the VM's deletion and the template's creation.
CREATE TRIGGER vms_created AFTER INSERT ON vms BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES (NEW.kind || '.created', NEW.id, NEW.id);
END;
CREATE TRIGGER vms_updated AFTER UPDATE ON vms WHEN OLD.kind = NEW.kind BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES (NEW.kind || '.updated', NEW.id, NEW.id);
END;
CREATE TRIGGER vms_converted AFTER UPDATE ON vms WHEN OLD.kind <> NEW.kind BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES (OLD.kind || '.deleted', OLD.id, OLD.id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'disk.deleted', id, vm_id FROM disks WHERE vm_id = NEW.id AND OLD.kind = 'vm';
    INSERT INTO events (type, resource_id, vm_id) VALUES (NEW.kind || '.created', NEW.id, NEW.id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'disk.created', id, vm_id FROM disks WHERE vm_id = NEW.id AND NEW.kind = 'vm';
END;
-- A snapshot's view says whether it is the VM's current one.
CREATE TRIGGER vms_current_moved AFTER UPDATE OF current_snapshot_id ON vms
    WHEN OLD.current_snapshot_id IS NOT NEW.current_snapshot_id BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'snapshot.updated', id, vm_id FROM snapshots
    WHERE id IN (OLD.current_snapshot_id, NEW.current_snapshot_id);
END;
CREATE TRIGGER vms_deleted AFTER DELETE ON vms BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES (OLD.kind || '.deleted', OLD.id, OLD.id);
END;

-- A VM's view shows its disks, so a change to a disk (or to its chain of volumes) is
-- also the VM's. A disk of a template is part of the template's view (it has no view
-- of its own).
CREATE TRIGGER disks_created AFTER INSERT ON disks BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES (
        CASE (SELECT kind FROM vms WHERE id = NEW.vm_id) WHEN 'template' THEN 'template.updated' ELSE 'disk.created' END,
        CASE (SELECT kind FROM vms WHERE id = NEW.vm_id) WHEN 'template' THEN NEW.vm_id ELSE NEW.id END,
        NEW.vm_id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', id, id FROM vms WHERE id = NEW.vm_id AND kind = 'vm';
END;
CREATE TRIGGER disks_updated AFTER UPDATE ON disks BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES (
        CASE (SELECT kind FROM vms WHERE id = NEW.vm_id) WHEN 'template' THEN 'template.updated' ELSE 'disk.updated' END,
        CASE (SELECT kind FROM vms WHERE id = NEW.vm_id) WHEN 'template' THEN NEW.vm_id ELSE NEW.id END,
        NEW.vm_id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', id, id FROM vms WHERE id = NEW.vm_id AND kind = 'vm';
END;
-- With its VM (deleted first, by a cascade), a disk is simply deleted.
CREATE TRIGGER disks_deleted AFTER DELETE ON disks BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES (
        CASE (SELECT kind FROM vms WHERE id = OLD.vm_id) WHEN 'template' THEN 'template.updated' ELSE 'disk.deleted' END,
        CASE (SELECT kind FROM vms WHERE id = OLD.vm_id) WHEN 'template' THEN OLD.vm_id ELSE OLD.id END,
        OLD.vm_id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', id, id FROM vms WHERE id = OLD.vm_id AND kind = 'vm';
END;
-- A disk's view shows its chain of volumes (a template's, its template's view). A
-- volume over another VM's (or template's) volume makes a linked clone, which that
-- VM's view lists among its dependents.
CREATE TRIGGER volumes_created AFTER INSERT ON volumes BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT CASE v.kind WHEN 'template' THEN 'template.updated' ELSE 'disk.updated' END,
           CASE v.kind WHEN 'template' THEN v.id ELSE d.id END, d.vm_id
    FROM disks d JOIN vms v ON v.id = d.vm_id WHERE d.id = NEW.disk_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT v.kind || '.updated', v.id, v.id
    FROM volumes p JOIN disks d ON d.id = p.disk_id JOIN vms v ON v.id = d.vm_id
    WHERE p.id = NEW.parent_id AND d.vm_id <> (SELECT vm_id FROM disks WHERE id = NEW.disk_id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', v.id, v.id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = NEW.disk_id AND v.kind = 'vm';
END;
CREATE TRIGGER volumes_updated AFTER UPDATE ON volumes BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT CASE v.kind WHEN 'template' THEN 'template.updated' ELSE 'disk.updated' END,
           CASE v.kind WHEN 'template' THEN v.id ELSE d.id END, d.vm_id
    FROM disks d JOIN vms v ON v.id = d.vm_id WHERE d.id = NEW.disk_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT v.kind || '.updated', v.id, v.id
    FROM volumes p JOIN disks d ON d.id = p.disk_id JOIN vms v ON v.id = d.vm_id
    WHERE p.id IN (OLD.parent_id, NEW.parent_id) AND OLD.parent_id IS NOT NEW.parent_id
      AND d.vm_id <> (SELECT vm_id FROM disks WHERE id = NEW.disk_id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', v.id, v.id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = NEW.disk_id AND v.kind = 'vm';
END;
CREATE TRIGGER volumes_deleted AFTER DELETE ON volumes BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT CASE v.kind WHEN 'template' THEN 'template.updated' ELSE 'disk.updated' END,
           CASE v.kind WHEN 'template' THEN v.id ELSE d.id END, d.vm_id
    FROM disks d JOIN vms v ON v.id = d.vm_id WHERE d.id = OLD.disk_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT v.kind || '.updated', v.id, v.id
    FROM volumes p JOIN disks d ON d.id = p.disk_id JOIN vms v ON v.id = d.vm_id
    WHERE p.id = OLD.parent_id
      AND d.vm_id IS NOT (SELECT vm_id FROM disks WHERE id = OLD.disk_id);
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', v.id, v.id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = OLD.disk_id AND v.kind = 'vm';
END;

CREATE TRIGGER snapshots_created AFTER INSERT ON snapshots BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES ('snapshot.created', NEW.id, NEW.vm_id);
END;
CREATE TRIGGER snapshots_updated AFTER UPDATE ON snapshots BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES ('snapshot.updated', NEW.id, NEW.vm_id);
END;
CREATE TRIGGER snapshots_deleted AFTER DELETE ON snapshots BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES ('snapshot.deleted', OLD.id, OLD.vm_id);
END;
-- A snapshot's view lists the volume it keeps of each disk, and a disk's chain (so its
-- VM's view) names the snapshot each layer belongs to.
CREATE TRIGGER snapshot_volumes_created AFTER INSERT ON snapshot_volumes BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'snapshot.updated', id, vm_id FROM snapshots WHERE id = NEW.snapshot_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'disk.updated', d.id, d.vm_id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = NEW.disk_id AND v.kind = 'vm';
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', v.id, v.id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = NEW.disk_id AND v.kind = 'vm';
END;
CREATE TRIGGER snapshot_volumes_updated AFTER UPDATE ON snapshot_volumes BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'snapshot.updated', id, vm_id FROM snapshots WHERE id = NEW.snapshot_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'disk.updated', d.id, d.vm_id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = NEW.disk_id AND v.kind = 'vm';
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', v.id, v.id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = NEW.disk_id AND v.kind = 'vm';
END;
-- Deleting a disk takes its layer out of every snapshot (a cascade).
CREATE TRIGGER snapshot_volumes_deleted AFTER DELETE ON snapshot_volumes BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'snapshot.updated', id, vm_id FROM snapshots WHERE id = OLD.snapshot_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'disk.updated', d.id, d.vm_id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = OLD.disk_id AND v.kind = 'vm';
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', v.id, v.id FROM disks d JOIN vms v ON v.id = d.vm_id
    WHERE d.id = OLD.disk_id AND v.kind = 'vm';
END;

-- A job's journal (phase, plan, next step) is not in its view: only a change a client
-- sees is an event. A job reaching succeeded, failed or cancelled is `job.finished`.
CREATE TRIGGER jobs_created AFTER INSERT ON jobs BEGIN
    INSERT INTO events (type, resource_id, vm_id, requested_by)
    VALUES ('job.created', NEW.id, NEW.vm_id, NEW.requested_by);
END;
CREATE TRIGGER jobs_updated AFTER UPDATE OF status, progress, detail, cancel_requested,
    error_code, error_message, started_at, finished_at, retry_at, vm_id ON jobs BEGIN
    INSERT INTO events (type, resource_id, vm_id, requested_by)
    VALUES (
        CASE WHEN NEW.status IN ('succeeded', 'failed', 'cancelled')
                  AND OLD.status NOT IN ('succeeded', 'failed', 'cancelled')
             THEN 'job.finished' ELSE 'job.updated' END,
        NEW.id, NEW.vm_id, NEW.requested_by);
END;
CREATE TRIGGER jobs_deleted AFTER DELETE ON jobs BEGIN
    INSERT INTO events (type, resource_id, vm_id, requested_by)
    VALUES ('job.deleted', OLD.id, OLD.vm_id, OLD.requested_by);
END;

CREATE TRIGGER schedules_created AFTER INSERT ON schedules BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES ('schedule.created', NEW.id, NEW.vm_id);
END;
CREATE TRIGGER schedules_updated AFTER UPDATE ON schedules BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES ('schedule.updated', NEW.id, NEW.vm_id);
END;
CREATE TRIGGER schedules_deleted AFTER DELETE ON schedules BEGIN
    INSERT INTO events (type, resource_id, vm_id) VALUES ('schedule.deleted', OLD.id, OLD.vm_id);
END;
-- A schedule's view shows its last run.
CREATE TRIGGER schedule_runs_created AFTER INSERT ON schedule_runs BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'run.created', NEW.id, vm_id FROM schedules WHERE id = NEW.schedule_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'schedule.updated', id, vm_id FROM schedules WHERE id = NEW.schedule_id;
END;
CREATE TRIGGER schedule_runs_updated AFTER UPDATE ON schedule_runs BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'run.updated', NEW.id, vm_id FROM schedules WHERE id = NEW.schedule_id;
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'schedule.updated', id, vm_id FROM schedules WHERE id = NEW.schedule_id;
END;
CREATE TRIGGER schedule_runs_deleted AFTER DELETE ON schedule_runs BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    VALUES ('run.deleted', OLD.id, (SELECT vm_id FROM schedules WHERE id = OLD.schedule_id));
END;
