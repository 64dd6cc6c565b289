//! Accepting work: the state checks and writes that turn a request into a queued job,
//! shared by the HTTP handlers and the expiry sweep. Each check is made again inside
//! the write transaction (the single write connection serialises them), so two
//! conflicting requests can never both be accepted.

use crate::domain::{Job, JobKind, ResourceStatus, Snapshot, TargetType, Uuid, Vm, VmState};
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
    store::jobs::insert(&mut tx, &job).await?;
    tx.commit().await?;
    engine.notify_enqueued();
    Ok(job)
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

/// Queue the deletion of one snapshot, refusing early (409, 507) when the merge it
/// needs cannot run now.
pub async fn delete_snapshot(engine: &Engine, id: Uuid) -> Result<Job> {
    let (snapshot, vm) = find_snapshot(&mut *engine.db.reader().await?, id).await?;
    kinds::preflight(
        engine,
        JobKind::SnapshotDelete,
        vm.id,
        snapshot.id,
        &serde_json::Value::Null,
    )
    .await?;
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
