-- Clones and templates.
--
-- A template is a VM converted into a read-only golden image: the same row with
-- kind = 'template' (so converting either way copies nothing, and VM and template names
-- share one namespace). Its disks are ordinary disks whose single volume linked clones
-- use as backing.
ALTER TABLE vms ADD COLUMN kind TEXT NOT NULL DEFAULT 'vm';
-- Where a VM or template came from (informational, not foreign keys: the source may go).
ALTER TABLE vms ADD COLUMN source_vm_id TEXT;
ALTER TABLE vms ADD COLUMN template_id TEXT;
CREATE INDEX vms_kind ON vms(kind, id);

-- Every VM a job works on. Most jobs touch one VM (jobs.vm_id); a clone also touches
-- its source, a deploy its template, a deletion that flattens dependents those VMs.
-- A job is claimed only when none of its VMs has a running job.
CREATE TABLE job_vms (
    job_seq INTEGER NOT NULL REFERENCES jobs(seq) ON DELETE CASCADE,
    vm_id   TEXT NOT NULL,
    PRIMARY KEY (job_seq, vm_id)
);
CREATE INDEX job_vms_vm ON job_vms(vm_id);
INSERT INTO job_vms (job_seq, vm_id) SELECT seq, vm_id FROM jobs WHERE vm_id IS NOT NULL;
