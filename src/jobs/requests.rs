//! Accepting work: the state checks and writes that turn a request into a queued job,
//! shared by the HTTP handlers and the expiry sweep. Each check is made again inside
//! the write transaction (the single write connection serialises them), so two
//! conflicting requests can never both be accepted.

use crate::domain::plan::CloneMode;
use crate::domain::{
    Disk, Job, JobKind, ResourceStatus, Snapshot, TargetType, Timestamp, Uuid, Vm, VmKind, VmState,
    new_id,
};
use crate::error::{Error, ErrorCode, Result};
use crate::store::{self, Tx};

use super::{Engine, kinds};

/// Refuse work on a VM that is still being created, is going away, or failed.
pub fn require_ready(vm: &Vm) -> Result<()> {
    if vm.status != ResourceStatus::Ready {
        return Err(Error::problem(
            ErrorCode::VmNotReady,
            format!("VM {} is {}, not ready", vm.name, vm.status),
        ));
    }
    Ok(())
}

pub fn require_stopped(vm: &Vm, action: &str) -> Result<()> {
    if vm.state == VmState::Running {
        return Err(Error::problem(
            ErrorCode::VmRunning,
            format!("VM {} is running; stop it first to {action}", vm.name),
        ));
    }
    Ok(())
}

/// Insert a queued job inside the caller's transaction, commit, and wake the workers.
pub async fn enqueue(
    engine: &Engine,
    mut tx: Tx,
    kind: JobKind,
    target: (TargetType, Uuid),
    vm: Uuid,
    params: serde_json::Value,
) -> Result<Job> {
    recheck_if_running(engine, &mut tx, kind, vm, target.1, &params).await?;
    // Deleting or flattening a linked disk may drop a layer of its source that nothing
    // reads any more (decided when the job runs): the job works on the source too, so
    // no job of the source plans around that layer meanwhile.
    let sources = match kind {
        JobKind::DiskDelete | JobKind::DiskFlatten => {
            store::vms::sources_of(&mut tx, vm, Some(target.1)).await?
        }
        _ => Vec::new(),
    };
    let job = store::jobs::new_job(kind, target.0, target.1, Some(vm), params);
    store::jobs::insert(&mut tx, &job, &sources).await?;
    tx.commit().await?;
    engine.notify_enqueued();
    Ok(job)
}

/// Handlers check the VM's power state before their write transaction; a `PATCH
/// {"state": "running"}` may have committed in between. Inside the transaction (the
/// single writer, so the state cannot change any more) a VM found running has the
/// job's plan checked again against it, and a job that needs the VM stopped is
/// refused now instead of accepted and failed later.
async fn recheck_if_running(
    engine: &Engine,
    tx: &mut sqlx::SqliteConnection,
    kind: JobKind,
    vm: Uuid,
    target: Uuid,
    params: &serde_json::Value,
) -> Result<()> {
    let running = store::vms::get_vm(tx, vm)
        .await?
        .is_some_and(|vm| vm.state == VmState::Running);
    if running {
        // The state change is committed, so the planner's own read sees it.
        kinds::preflight(engine, kind, vm, target, params).await?;
    }
    Ok(())
}

/// What a new snapshot carries besides its place in the tree.
pub struct NewSnapshot {
    pub name: String,
    pub description: String,
    pub expires_at: Option<Timestamp>,
    pub hold: bool,
    /// The schedule taking it; `None` for a manual snapshot.
    pub schedule_id: Option<Uuid>,
}

/// Check that `vm` can be snapshotted now, and record the snapshot (status `creating`)
/// with its job in the caller's transaction, which the caller commits before calling
/// `Engine::notify_enqueued`. Shared by `POST /v1/vms/{id}/snapshots` and schedule runs.
pub async fn insert_snapshot(
    tx: &mut sqlx::SqliteConnection,
    vm: &Vm,
    new: NewSnapshot,
) -> Result<(Snapshot, Job)> {
    require_ready(vm)?;
    require_stopped(vm, "take an offline snapshot of it")?;
    if store::vms::list_disks(tx, vm.id).await?.is_empty() {
        return Err(Error::problem(
            ErrorCode::VmHasNoDisks,
            format!("VM {} has no disks to snapshot", vm.name),
        ));
    }
    let snapshot = Snapshot {
        id: new_id(),
        vm_id: vm.id,
        name: new.name,
        description: new.description,
        // Provisional: the job sets the VM's current snapshot at the time it runs.
        parent_id: vm.current_snapshot_id,
        status: ResourceStatus::Creating,
        created_at: store::now(),
        expires_at: new.expires_at,
        hold: new.hold,
        schedule_id: new.schedule_id,
        volumes: Vec::new(),
    };
    if let Err(e) = store::snapshots::insert(tx, &snapshot).await {
        return Err(if store::is_unique_violation(&e) {
            Error::problem(
                ErrorCode::NameTaken,
                format!(
                    "VM {} already has a snapshot named {}",
                    vm.name, snapshot.name
                ),
            )
        } else {
            e
        });
    }
    let job = store::jobs::new_job(
        JobKind::SnapshotCreate,
        TargetType::Snapshot,
        snapshot.id,
        Some(vm.id),
        serde_json::json!({}),
    );
    store::jobs::insert(tx, &job, &[]).await?;
    Ok((snapshot, job))
}

pub async fn find_snapshot(conn: &mut sqlx::SqliteConnection, id: Uuid) -> Result<(Snapshot, Vm)> {
    let not_found = || {
        Error::problem(
            ErrorCode::SnapshotNotFound,
            format!("snapshot {id} does not exist"),
        )
    };
    let snapshot = store::snapshots::get(conn, id)
        .await?
        .ok_or_else(not_found)?;
    let vm = store::vms::get_vm(conn, snapshot.vm_id)
        .await?
        .ok_or_else(not_found)?;
    Ok((snapshot, vm))
}

/// Refuse deleting a snapshot that another job creates, deletes or reverts to.
pub async fn require_deletable(
    conn: &mut sqlx::SqliteConnection,
    snapshot: &Snapshot,
) -> Result<()> {
    match snapshot.status {
        ResourceStatus::Ready | ResourceStatus::Error => {}
        ResourceStatus::Deleting => {
            return Err(Error::problem(
                ErrorCode::SnapshotBusy,
                format!("snapshot {} is already being deleted", snapshot.name),
            ));
        }
        status => {
            return Err(Error::problem(
                ErrorCode::SnapshotNotReady,
                format!("snapshot {} is {status}", snapshot.name),
            ));
        }
    }
    let reverts =
        store::jobs::pending_for_target(conn, snapshot.id, &[JobKind::SnapshotRevert]).await?;
    if let Some(job) = reverts.first() {
        return Err(Error::with_extra(
            ErrorCode::SnapshotBusy,
            format!(
                "a revert to snapshot {} is pending (job {})",
                snapshot.name, job.id
            ),
            serde_json::json!({ "job_ids": [job.id] }),
        ));
    }
    // A full clone accepted from this snapshot reads it when it runs; deleting it first
    // would make the clone fail after its 202. (A pending linked clone is a reader of
    // the layer and is refused as `has_dependents` by the plan check.)
    let snapshot_text = snapshot.id.to_string();
    let clones: Vec<Uuid> = store::jobs::pending_for_vm(conn, snapshot.vm_id)
        .await?
        .into_iter()
        .filter(|job| {
            matches!(
                job.kind,
                JobKind::VmClone | JobKind::TemplateCreate | JobKind::TemplateDeploy
            ) && job.params["snapshot_id"].as_str() == Some(snapshot_text.as_str())
                && job.params["mode"].as_str() != Some("linked")
        })
        .map(|job| job.id)
        .collect();
    if let Some(first) = clones.first() {
        return Err(Error::with_extra(
            ErrorCode::SnapshotBusy,
            format!(
                "a clone of snapshot {} is pending (job {first}); delete it once the clone is made",
                snapshot.name
            ),
            serde_json::json!({ "job_ids": clones }),
        ));
    }
    Ok(())
}

/// Why snapshot `id` cannot be deleted now (409, 507...), checked without writing:
/// the record's state, then the merge's own run-time conditions (a running VM, free
/// space, linked clones reading its layers). Retention previews use it to show which
/// prunes would be held.
pub async fn check_deletable(engine: &Engine, id: Uuid) -> Result<(Snapshot, Vm)> {
    check_deletable_flattening(engine, id, false).await
}

/// The job parameters of a snapshot deletion.
fn delete_params(previous: ResourceStatus, flatten_dependents: bool) -> serde_json::Value {
    serde_json::json!({ "previous_status": previous, "flatten_dependents": flatten_dependents })
}

async fn check_deletable_flattening(
    engine: &Engine,
    id: Uuid,
    flatten_dependents: bool,
) -> Result<(Snapshot, Vm)> {
    let mut conn = engine.db.reader().await?;
    let (snapshot, vm) = find_snapshot(&mut conn, id).await?;
    require_ready(&vm)?;
    require_deletable(&mut conn, &snapshot).await?;
    drop(conn);
    kinds::preflight(
        engine,
        JobKind::SnapshotDelete,
        vm.id,
        snapshot.id,
        &delete_params(snapshot.status, flatten_dependents),
    )
    .await?;
    Ok((snapshot, vm))
}

/// Flag every snapshot of `vm` `deleting` for a job that collapses them all (delete-all,
/// conversion to a template), refusing if one is busy; returns the job parameters
/// recording the set and the statuses to restore if the job is undone.
pub async fn flag_all_snapshots(
    tx: &mut sqlx::SqliteConnection,
    vm: Uuid,
) -> Result<serde_json::Value> {
    let snapshots = store::snapshots::list(tx, vm, None, u32::MAX).await?;
    let mut previous = Vec::with_capacity(snapshots.len());
    for snapshot in &snapshots {
        require_deletable(tx, snapshot).await?;
        previous.push(serde_json::json!({ "id": snapshot.id, "previous_status": snapshot.status }));
    }
    for snapshot in &snapshots {
        store::snapshots::set_status(tx, snapshot.id, ResourceStatus::Deleting).await?;
    }
    Ok(serde_json::json!({ "snapshots": previous }))
}

/// Queue the deletion of one snapshot, refusing early (409, 507) when the merge it
/// needs cannot run now (including when linked clones read the layers it merges).
pub async fn delete_snapshot(engine: &Engine, id: Uuid) -> Result<Job> {
    delete_snapshot_flattening(engine, id, false).await
}

/// `delete_snapshot`; with `flatten_dependents`, linked clones reading the layers the
/// merge would change are first made standalone by the same job (which locks them).
pub async fn delete_snapshot_flattening(
    engine: &Engine,
    id: Uuid,
    flatten_dependents: bool,
) -> Result<Job> {
    check_deletable_flattening(engine, id, flatten_dependents).await?;
    // Checked again in the write transaction: another request may have come between.
    let mut tx = engine.db.begin().await?;
    let (snapshot, vm) = find_snapshot(&mut tx, id).await?;
    require_ready(&vm)?;
    require_deletable(&mut tx, &snapshot).await?;
    store::snapshots::set_status(&mut tx, snapshot.id, ResourceStatus::Deleting).await?;
    let dependents = if flatten_dependents {
        dependent_vms(&mut tx, vm.id).await?
    } else {
        Vec::new()
    };
    let mut params = delete_params(snapshot.status, flatten_dependents);
    if flatten_dependents {
        params["locked_vms"] = serde_json::json!(dependents);
    }
    let job = store::jobs::new_job(
        JobKind::SnapshotDelete,
        TargetType::Snapshot,
        snapshot.id,
        Some(vm.id),
        params,
    );
    store::jobs::insert(&mut tx, &job, &dependents).await?;
    tx.commit().await?;
    engine.notify_enqueued();
    Ok(job)
}

/// The VMs with linked disks on `vm`'s files (which a flattening job locks).
pub async fn dependent_vms(conn: &mut sqlx::SqliteConnection, vm: Uuid) -> Result<Vec<Uuid>> {
    let mut vms: Vec<Uuid> = store::vms::dependents_of(conn, vm)
        .await?
        .into_iter()
        .map(|(_, dependent)| dependent)
        .collect();
    vms.sort();
    vms.dedup();
    Ok(vms)
}

/// A clone, a batch deploy or a copy into a template, as accepted from a request.
pub struct CloneRequest {
    pub source: Uuid,
    /// Start from this snapshot of the source instead of its present state.
    pub snapshot_id: Option<Uuid>,
    pub mode: CloneMode,
    /// One new record per name.
    pub names: Vec<String>,
    pub description: String,
    /// What the new records are.
    pub kind: VmKind,
    pub job_kind: JobKind,
}

/// Accept a clone: refuse early what the job would refuse (a running source for the
/// present state, too little space for a full copy, a snapshot that is not ready),
/// then record the new VMs (or templates) with their disks, status `creating`, and
/// queue one job that locks the source and every new record.
pub async fn clone(engine: &Engine, request: CloneRequest) -> Result<Job> {
    let mut conn = engine.db.reader().await?;
    let source = store::vms::get_vm(&mut conn, request.source)
        .await?
        .ok_or_else(|| {
            Error::problem(
                ErrorCode::VmNotFound,
                format!("VM {} does not exist", request.source),
            )
        })?;
    require_ready(&source)?;
    let disks = store::vms::list_disks(&mut conn, source.id).await?;
    // (source disk, name, size) of each disk the clone gets.
    let starts: Vec<(Uuid, String, u64)> = match request.snapshot_id {
        Some(id) => {
            let (snapshot, owner) = find_snapshot(&mut conn, id).await?;
            if owner.id != source.id {
                return Err(Error::problem(
                    ErrorCode::SnapshotNotFound,
                    format!("snapshot {id} is not a snapshot of VM {}", source.name),
                ));
            }
            let volumes = store::vms::list_volumes(&mut conn, source.id).await?;
            snapshot
                .volumes
                .iter()
                .filter_map(|(disk, volume)| {
                    let disk = disks.iter().find(|d| d.id == *disk)?;
                    let size = volumes.iter().find(|v| v.id == *volume)?.size_bytes;
                    Some((disk.id, disk.name.clone(), size))
                })
                .collect()
        }
        // The present as it is when the clone runs, after every job accepted before it:
        // a disk being added is there by then (if its creation fails, so does the
        // clone, making nothing), one being deleted is not.
        None => disks
            .iter()
            .filter(|d| match d.status {
                ResourceStatus::Ready => d.active_volume_id.is_some(),
                ResourceStatus::Creating => true,
                _ => false,
            })
            .map(|d| (d.id, d.name.clone(), d.size_bytes))
            .collect(),
    };
    drop(conn);
    if starts.is_empty() {
        return Err(Error::problem(
            ErrorCode::VmHasNoDisks,
            format!("{} has no disks to clone", source.name),
        ));
    }
    let now = store::now();
    let mut records = Vec::with_capacity(request.names.len());
    let mut targets = Vec::with_capacity(request.names.len());
    for name in &request.names {
        let vm = Vm {
            kind: request.kind,
            source_vm_id: (source.kind == VmKind::Vm).then_some(source.id),
            template_id: (source.kind == VmKind::Template).then_some(source.id),
            ..Vm::new(name.clone(), request.description.clone(), now)
        };
        let disks: Vec<Disk> = starts
            .iter()
            .map(|(_, name, size)| Disk {
                id: new_id(),
                vm_id: vm.id,
                name: name.clone(),
                size_bytes: *size,
                status: ResourceStatus::Creating,
                active_volume_id: None,
                created_at: now,
            })
            .collect();
        targets.push(kinds::CloneTarget {
            id: vm.id,
            disks: disks
                .iter()
                .zip(&starts)
                .map(|(disk, (source_disk, _, _))| (disk.id, *source_disk))
                .collect(),
        });
        records.push((vm, disks));
    }
    let params = serde_json::to_value(kinds::CloneParams {
        mode: request.mode,
        snapshot_id: request.snapshot_id,
        vms: targets,
    })
    .expect("clone parameters serialise");
    let first = records[0].0.id;
    kinds::preflight(engine, request.job_kind, source.id, first, &params).await?;

    let mut tx = engine.db.begin().await?;
    let source = store::vms::get_vm(&mut tx, source.id)
        .await?
        .ok_or_else(|| Error::problem(ErrorCode::VmNotFound, "the source VM was deleted"))?;
    require_ready(&source)?;
    // Checked again under the write lock: a delete of the snapshot, or the VM marked
    // running, may have been accepted since the checks above.
    if let Some(id) = request.snapshot_id {
        let (snapshot, _) = find_snapshot(&mut tx, id).await?;
        if snapshot.status != ResourceStatus::Ready {
            return Err(Error::problem(
                ErrorCode::SnapshotNotReady,
                format!("snapshot {} is {}", snapshot.name, snapshot.status),
            ));
        }
    }
    recheck_if_running(engine, &mut tx, request.job_kind, source.id, first, &params).await?;
    for (vm, disks) in &records {
        if let Err(e) = store::vms::insert_vm(&mut tx, vm).await {
            return Err(if store::is_unique_violation(&e) {
                Error::problem(
                    ErrorCode::NameTaken,
                    format!("a VM or template named {} already exists", vm.name),
                )
            } else {
                e
            });
        }
        for disk in disks {
            store::vms::insert_disk(&mut tx, disk).await?;
        }
    }
    let ids: Vec<Uuid> = records.iter().map(|(vm, _)| vm.id).collect();
    let mut job = store::jobs::new_job(
        request.job_kind,
        TargetType::Vm,
        first,
        Some(source.id),
        params,
    );
    job.detail = Some(serde_json::json!({ "vm_ids": ids }));
    store::jobs::insert(&mut tx, &job, &ids).await?;
    tx.commit().await?;
    engine.notify_enqueued();
    Ok(job)
}
