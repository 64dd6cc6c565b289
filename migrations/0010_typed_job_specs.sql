-- Job parameters become typed (src/domain/job_spec.rs): each kind's spec names its VM
-- and its target, and every field it reads is present. Earlier releases kept the VM and
-- target only in their own columns and let a reader default a missing field; this
-- rewrites their stored parameters into the typed shape, with the defaults those
-- readers applied (`previous_status` ready, `flatten_dependents` false, the listed
-- snapshots of a collapse empty), so queued and interrupted jobs resume as before.
UPDATE jobs SET params = json_set(params, '$.vm', vm_id) WHERE vm_id IS NOT NULL;

UPDATE jobs SET params = json_set(params, '$.disk', target_id)
WHERE kind IN ('disk_create', 'disk_delete', 'disk_resize', 'disk_flatten');

UPDATE jobs SET params = json_set(params, '$.snapshot', target_id)
WHERE kind IN ('snapshot_create', 'snapshot_revert', 'snapshot_delete');

UPDATE jobs SET params = json_set(params, '$.previous_status', 'ready')
WHERE kind IN ('vm_delete', 'disk_delete', 'disk_resize', 'snapshot_delete')
  AND json_type(params, '$.previous_status') IS NULL;

UPDATE jobs SET params = json_set(params, '$.flatten_dependents', json('false'))
WHERE kind IN ('vm_delete', 'snapshot_delete')
  AND json_type(params, '$.flatten_dependents') IS NULL;

UPDATE jobs SET params = json_set(params, '$.snapshots', json('[]'))
WHERE kind IN ('snapshot_delete_all', 'vm_to_template')
  AND json_type(params, '$.snapshots') IS NULL;

-- A collapse's listed snapshot without a status was read as ready.
UPDATE jobs SET params = json_set(params, '$.snapshots', (
    SELECT json_group_array(json_set(value, '$.previous_status',
        coalesce(json_extract(value, '$.previous_status'), 'ready')))
    FROM json_each(jobs.params, '$.snapshots')))
WHERE kind IN ('snapshot_delete_all', 'vm_to_template')
  AND json_array_length(params, '$.snapshots') > 0;
