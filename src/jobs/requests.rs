//! Accepting work: the state checks and writes that turn a request into a queued job,
//! shared by the HTTP handlers and the expiry sweep. Each check is made again inside
//! the write transaction (the single write connection serialises them), so two
//! conflicting requests can never both be accepted.

use crate::domain::{
    Job, JobKind, ResourceStatus, Snapshot, TargetType, Timestamp, Uuid, Vm, VmState, new_id,
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
            format!(
                "cannot {action} while VM {} is running; stop it first",
                vm.name
            ),
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
    let job = store::jobs::new_job(kind, target.0, target.1, Some(vm), params);
    store::jobs::insert(&mut tx, &job, &[]).await?;
    tx.commit().await?;
    engine.notify_enqueued();
    Ok(job)
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
    require_stopped(vm, "take an offline snapshot")?;
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
    Ok(())
}

/// Why snapshot `id` cannot be deleted now (409, 507...), checked without writing:
/// the record's state, then the merge's own run-time conditions (a running VM, free
/// space). Retention previews use it to show which prunes would be held.
pub async fn check_deletable(engine: &Engine, id: Uuid) -> Result<(Snapshot, Vm)> {
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
        &serde_json::Value::Null,
    )
    .await?;
    Ok((snapshot, vm))
}

/// Queue the deletion of one snapshot, refusing early (409, 507) when the merge it
/// needs cannot run now.
pub async fn delete_snapshot(engine: &Engine, id: Uuid) -> Result<Job> {
    check_deletable(engine, id).await?;
    // Checked again in the write transaction: another request may have come between.
    let mut tx = engine.db.begin().await?;
    let (snapshot, vm) = find_snapshot(&mut tx, id).await?;
    require_ready(&vm)?;
    require_deletable(&mut tx, &snapshot).await?;
    store::snapshots::set_status(&mut tx, snapshot.id, ResourceStatus::Deleting).await?;
    let params = serde_json::json!({ "previous_status": snapshot.status });
    enqueue(
        engine,
        tx,
        JobKind::SnapshotDelete,
        (TargetType::Snapshot, snapshot.id),
        vm.id,
        params,
    )
    .await
}
