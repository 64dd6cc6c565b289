-- Job parameters become typed (src/domain/job_spec.rs): each kind's spec names its VM
-- and its target, and every field it reads is present. Earlier releases kept the VM and
-- target only in their own columns and let a reader default a missing field; this
-- rewrites their stored parameters into the typed shape, with the defaults those
-- readers applied (`previous_status` ready, `flatten_dependents` false, a collapse
-- without its list taking the VM's current snapshots), so queued and interrupted jobs
-- resume as before. A field stored as JSON null counts as missing.
UPDATE jobs SET params = json_set(params, '$.vm', vm_id) WHERE vm_id IS NOT NULL;

UPDATE jobs SET params = json_set(params, '$.disk', target_id)
WHERE kind IN ('disk_create', 'disk_delete', 'disk_resize', 'disk_flatten');

UPDATE jobs SET params = json_set(params, '$.snapshot', target_id)
WHERE kind IN ('snapshot_create', 'snapshot_revert', 'snapshot_delete');

UPDATE jobs SET params = json_set(params, '$.previous_status', 'ready')
WHERE kind IN ('vm_delete', 'disk_delete', 'disk_resize', 'snapshot_delete')
  AND coalesce(json_type(params, '$.previous_status'), 'null') = 'null';

UPDATE jobs SET params = json_set(params, '$.flatten_dependents', json('false'))
WHERE kind IN ('vm_delete', 'snapshot_delete')
  AND coalesce(json_type(params, '$.flatten_dependents'), 'null') = 'null';

-- The earliest collapses stored no list: their reader took every snapshot of the VM
-- not being created, with the status it had when the job ran.
UPDATE jobs SET params = json_set(params, '$.snapshots', (
    SELECT json_group_array(json_object('id', s.id, 'previous_status', s.status))
    FROM snapshots s WHERE s.vm_id = jobs.vm_id AND s.status <> 'creating'))
WHERE kind IN ('snapshot_delete_all', 'vm_to_template')
  AND coalesce(json_type(params, '$.snapshots'), 'null') = 'null';

-- A collapse's listed snapshot without a status was read as ready.
UPDATE jobs SET params = json_set(params, '$.snapshots', (
    SELECT json_group_array(json_set(value, '$.previous_status',
        coalesce(json_extract(value, '$.previous_status'), 'ready')))
    FROM json_each(jobs.params, '$.snapshots')))
WHERE kind IN ('snapshot_delete_all', 'vm_to_template')
  AND json_array_length(params, '$.snapshots') > 0;
