//! What each kind of job plans, and how a job that never started is unwound. The
//! chain logic itself lives in `domain::plan`; this file loads the state it needs,
//! re-checks the preconditions at run time (the VM may have changed since the request)
//! and measures files and free space.

use std::sync::Arc;

use serde_json::Value;

use super::{Engine, insufficient_storage, storage};
use crate::domain::plan::{self, DiskGraph, MetaOp, Plan};
use crate::domain::{Job, JobKind, ResourceStatus, Uuid, Vm, VmState};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

/// Plan a job from the current state (also used by handlers to refuse early).
pub async fn plan(engine: &Arc<Engine>, job: &Job) -> Result<Plan> {
    let vm_id = job
        .vm_id
        .ok_or_else(|| Error::Internal(format!("job {} has no VM", job.id)))?;
    preflight(engine, job.kind, vm_id, job.target_id, &job.params).await
}

/// Compute the plan a job of `kind` would follow now, refusing with a problem when the
/// VM's state or the free space does not allow it. Touches no file.
pub async fn preflight(
    engine: &Engine,
    kind: JobKind,
    vm_id: Uuid,
    target: Uuid,
    params: &Value,
) -> Result<Plan> {
    let mut conn = engine.db.reader().await?;
    let vm = store::vms::get_vm(&mut conn, vm_id).await?.ok_or_else(|| {
        Error::problem(ErrorCode::VmNotFound, format!("VM {vm_id} does not exist"))
    })?;
    let mut graphs = store::vms::disk_graphs(&mut conn, vm_id).await?;
    storage::measure(&engine.config.volumes_dir, &mut graphs);
    let disk_graph = |graphs: &[DiskGraph]| {
        graphs
            .iter()
            .find(|g| g.disk_id == target)
            .cloned()
            .ok_or_else(|| {
                Error::problem(
                    ErrorCode::DiskNotFound,
                    format!("disk {target} does not exist"),
                )
            })
    };
    let plan = match kind {
        JobKind::VmCreate => {
            let disks = store::vms::list_disks(&mut conn, vm_id).await?;
            plan::plan_create_disks(
                vm_id,
                &disks
                    .iter()
                    .map(|d| (d.id, d.size_bytes))
                    .collect::<Vec<_>>(),
                true,
            )
        }
        JobKind::DiskCreate => {
            let disk = store::vms::get_disk(&mut conn, target)
                .await?
                .ok_or_else(|| {
                    Error::problem(
                        ErrorCode::DiskNotFound,
                        format!("disk {target} does not exist"),
                    )
                })?;
            plan::plan_create_disks(vm_id, &[(disk.id, disk.size_bytes)], false)
        }
        JobKind::DiskDelete => {
            refuse_if_running(&vm, "delete a disk of")?;
            // A disk whose creation failed has no files, only its record to remove.
            let graph = disk_graph(&graphs).unwrap_or(DiskGraph {
                disk_id: target,
                size_bytes: 0,
                volumes: Vec::new(),
            });
            plan::plan_delete_disks(vm_id, &[graph], false)
        }
        JobKind::DiskResize => {
            refuse_if_running(&vm, "resize a disk of")?;
            let size = params["size_bytes"]
                .as_u64()
                .ok_or_else(|| Error::Internal("resize job without size_bytes".into()))?;
            let disk = disk_graph(&graphs)?;
            // Re-checked here: an earlier resize in the queue may have grown it further.
            if size <= disk.size_bytes {
                return Err(Error::problem(
                    ErrorCode::DiskShrinkRefused,
                    format!(
                        "disk {target} is already {} bytes; a resize must make it larger",
                        disk.size_bytes
                    ),
                ));
            }
            plan::plan_resize(&disk, size)?
        }
        JobKind::VmDelete => {
            refuse_if_running(&vm, "delete")?;
            plan::plan_delete_disks(vm_id, &graphs, true)
        }
        JobKind::SnapshotCreate => {
            refuse_if_running(&vm, "snapshot")?;
            if graphs.is_empty() {
                return Err(Error::problem(
                    ErrorCode::VmHasNoDisks,
                    "a snapshot needs at least one disk",
                ));
            }
            plan::plan_snapshot_create(vm_id, target, vm.current_snapshot_id, &graphs)?
        }
        JobKind::SnapshotRevert => {
            refuse_if_running(&vm, "revert")?;
            let plan = plan::plan_revert(vm_id, target, &graphs)?;
            if plan.steps.is_empty() {
                return Err(Error::problem(
                    ErrorCode::SnapshotNotReady,
                    "the snapshot covers none of the VM's disks any more (they were deleted); there is nothing to revert to",
                ));
            }
            plan
        }
        JobKind::SnapshotDelete => {
            let plan = plan::plan_snapshot_delete(target, previous_status(params), &graphs)?;
            refuse_merge_while_running(&vm, &plan, &graphs)?;
            plan
        }
        JobKind::SnapshotDeleteAll => {
            let current: Vec<(Uuid, ResourceStatus)> =
                store::snapshots::list(&mut conn, vm_id, None, u32::MAX)
                    .await?
                    .iter()
                    // A snapshot still being created (queued after this job) has no layer yet
                    // and is taken after the collapse.
                    .filter(|s| s.status != ResourceStatus::Creating)
                    .map(|s| (s.id, s.status))
                    .collect();
            // A queued job deletes exactly the snapshots its request saw (and flagged);
            // anything else means the tree changed and collapsing it would take more.
            let snapshots = match params["snapshots"].as_array() {
                None => current,
                Some(listed) => {
                    let listed: Vec<(Uuid, ResourceStatus)> = listed
                        .iter()
                        .filter_map(|s| Some((s["id"].as_str()?.parse().ok()?, previous_status(s))))
                        .collect();
                    let mut a: Vec<Uuid> = listed.iter().map(|s| s.0).collect();
                    let mut b: Vec<Uuid> = current.iter().map(|s| s.0).collect();
                    a.sort();
                    b.sort();
                    if a != b {
                        return Err(Error::problem(
                            ErrorCode::SnapshotBusy,
                            "the VM's snapshots changed since the request; ask again to delete the current set",
                        ));
                    }
                    listed
                }
            };
            let plan = plan::plan_delete_all_snapshots(vm_id, &snapshots, &graphs)?;
            refuse_merge_while_running(&vm, &plan, &graphs)?;
            plan
        }
    };
    check_space(engine, &plan)?;
    Ok(plan)
}

fn refuse_if_running(vm: &Vm, action: &str) -> Result<()> {
    if vm.state == VmState::Running {
        return Err(Error::problem(
            ErrorCode::VmRunning,
            format!(
                "cannot {action} VM {} while it is running; stop it first",
                vm.name
            ),
        ));
    }
    Ok(())
}

/// A merge may run beside a running guest only if it leaves every file the hypervisor
/// has open alone (e.g. dropping a layer on another branch).
fn refuse_merge_while_running(vm: &Vm, plan: &Plan, graphs: &[DiskGraph]) -> Result<()> {
    if vm.state == VmState::Running && plan.touches_active_chains(graphs) {
        return Err(Error::problem(
            ErrorCode::VmRunning,
            format!(
                "deleting this snapshot merges layers VM {} is running on; stop the VM first",
                vm.name
            ),
        ));
    }
    Ok(())
}

/// Refuse before any file changes when a merge would not fit, keeping the reserve.
fn check_space(engine: &Engine, plan: &Plan) -> Result<()> {
    if plan.merges.iter().all(|m| m.bytes_to_copy == 0) {
        return Ok(());
    }
    let available = storage::available_bytes(&engine.config.volumes_dir)?;
    let needed = plan
        .space_needed
        .saturating_add(engine.config.reserved_bytes);
    if available < needed {
        return Err(insufficient_storage(needed, available));
    }
    Ok(())
}

/// The status a request found its snapshot in (restored if the job is undone).
fn previous_status(params: &Value) -> ResourceStatus {
    params["previous_status"]
        .as_str()
        .and_then(ResourceStatus::parse)
        .unwrap_or(ResourceStatus::Ready)
}

/// Metadata changes that unwind a job ended before it journaled a plan: the records
/// the request created or flagged go back to how they were.
pub async fn abandon(engine: &Engine, job: &Job, cancelled: bool) -> Result<Vec<MetaOp>> {
    let vm = job.vm_id.unwrap_or(job.target_id);
    Ok(match job.kind {
        JobKind::VmCreate if cancelled => vec![MetaOp::DeleteVm { vm }],
        JobKind::VmCreate => {
            let disks = store::vms::list_disks(&mut *engine.db.reader().await?, vm).await?;
            let mut ops: Vec<MetaOp> = disks
                .iter()
                .map(|d| MetaOp::SetDiskStatus {
                    disk: d.id,
                    status: ResourceStatus::Error,
                })
                .collect();
            ops.push(MetaOp::SetVmStatus {
                vm,
                status: ResourceStatus::Error,
            });
            ops
        }
        JobKind::DiskCreate if cancelled => vec![MetaOp::DeleteDisk {
            disk: job.target_id,
        }],
        JobKind::DiskCreate => vec![MetaOp::SetDiskStatus {
            disk: job.target_id,
            status: ResourceStatus::Error,
        }],
        JobKind::DiskDelete | JobKind::DiskResize => vec![MetaOp::SetDiskStatus {
            disk: job.target_id,
            status: previous_status(&job.params),
        }],
        JobKind::VmDelete => vec![MetaOp::SetVmStatus {
            vm,
            status: previous_status(&job.params),
        }],
        JobKind::SnapshotCreate => vec![MetaOp::DeleteSnapshot {
            snapshot: job.target_id,
        }],
        JobKind::SnapshotDelete => vec![MetaOp::SetSnapshotStatus {
            snapshot: job.target_id,
            status: previous_status(&job.params),
        }],
        JobKind::SnapshotDeleteAll => job.params["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| {
                let snapshot = s["id"].as_str()?.parse().ok()?;
                Some(MetaOp::SetSnapshotStatus {
                    snapshot,
                    status: previous_status(s),
                })
            })
            .collect(),
        JobKind::SnapshotRevert => vec![],
    })
}
