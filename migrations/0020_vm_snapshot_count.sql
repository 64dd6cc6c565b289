-- A VM's view counts its snapshots (`snapshot_count`), so making or deleting one is
-- also a change of the VM's view. (Number 0019 is left to the job byte progress
-- columns.)
CREATE TRIGGER snapshots_counted AFTER INSERT ON snapshots BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', id, id FROM vms WHERE id = NEW.vm_id AND kind = 'vm';
END;
CREATE TRIGGER snapshots_uncounted AFTER DELETE ON snapshots BEGIN
    INSERT INTO events (type, resource_id, vm_id)
    SELECT 'vm.updated', id, id FROM vms WHERE id = OLD.vm_id AND kind = 'vm';
END;
