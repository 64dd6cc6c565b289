//! Taking, reverting to and deleting snapshots (one, or all of a VM's at once).

use sqlx::SqliteConnection;

use super::guards::{
    decide_consistency, find_snapshot, list_all_for_collapse, listed_snapshots, load_vm,
    merges_live, refuse_merge_while_running, require_deletable, require_ready,
    require_stopped_or_reachable, restore_listed,
};
use super::links::flatten_dependents_first;
use super::{Admission, Planning, Run};
use crate::domain::job_spec::{SnapshotCreate, SnapshotDelete, SnapshotDeleteAll, SnapshotRevert};
use crate::domain::plan::{self, MetaOp, Plan};
use crate::domain::{ResourceStatus, Vm, VmState};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

impl Run for SnapshotCreate {
    // Planned when it runs: a disk queued to be added by then gets its layer too.
    const PLAN_AT_ACCEPT: bool = false;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let vm = load_vm(conn, self.vm).await?;
        require_ready(&vm)?;
        require_stopped_or_reachable(&vm, "snapshot it")?;
        if store::vms::list_disks(conn, vm.id).await?.is_empty() {
            return Err(Error::problem(
                ErrorCode::VmHasNoDisks,
                format!("VM {} has no disks to snapshot", vm.name),
            ));
        }
        decide_consistency(&vm, &mut self.consistency, &mut self.quiesce)?;
        Ok(Admission::default())
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        // Decided from the VM as it is when the job runs: a VM stopped since the
        // request is snapshotted offline.
        require_stopped_or_reachable(&cx.vm, "snapshot it")?;
        if cx.graphs.is_empty() {
            return Err(Error::problem(
                ErrorCode::VmHasNoDisks,
                "a snapshot needs at least one disk",
            ));
        }
        let parent = cx.vm.current_snapshot_id;
        Ok(if cx.vm.state == VmState::Running {
            plan::plan_live_snapshot_create(
                self.vm,
                self.snapshot,
                parent,
                &cx.graphs,
                self.freeze(),
            )?
        } else {
            plan::plan_snapshot_create(self.vm, self.snapshot, parent, &cx.graphs)?
        })
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![MetaOp::DeleteSnapshot {
            snapshot: self.snapshot,
        }])
    }
}

/// A revert is never done live, QMP socket or not: the guest's memory holds the state
/// it runs on, so it must boot again on the reverted disks.
fn refuse_revert_while_running(vm: &Vm) -> Result<()> {
    if vm.state == VmState::Running {
        return Err(Error::problem(
            ErrorCode::VmRunning,
            format!(
                "VM {} is running, and a revert cannot be done live: the guest keeps running on the state it holds in memory. Stop the VM, revert, and start it again on the disks' new active_path",
                vm.name
            ),
        ));
    }
    Ok(())
}

impl Run for SnapshotRevert {
    // Planned when it runs: the layers to drop are those of the present state then.
    const PLAN_AT_ACCEPT: bool = false;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let (snapshot, vm) = find_snapshot(conn, self.snapshot).await?;
        require_ready(&vm)?;
        refuse_revert_while_running(&vm)?;
        if snapshot.status != ResourceStatus::Ready {
            return Err(Error::problem(
                ErrorCode::SnapshotNotReady,
                format!(
                    "snapshot {} is {}; only a ready snapshot can be reverted to",
                    snapshot.name, snapshot.status
                ),
            ));
        }
        Ok(Admission::default())
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        refuse_revert_while_running(&cx.vm)?;
        let plan = plan::plan_revert(self.vm, self.snapshot, &cx.graphs)?;
        if plan.steps.is_empty() {
            return Err(Error::problem(
                ErrorCode::SnapshotNotReady,
                "the snapshot covers none of the VM's disks any more (they were deleted); there is nothing to revert to",
            ));
        }
        Ok(plan)
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(Vec::new())
    }
}

impl Run for SnapshotDelete {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let (snapshot, vm) = find_snapshot(conn, self.snapshot).await?;
        require_ready(&vm)?;
        require_deletable(conn, &snapshot).await?;
        self.previous_status = snapshot.status;
        let mut locks = Vec::new();
        if self.flatten.flatten_dependents {
            // The linked clones it may flatten: locked, and recorded.
            locks = super::dependent_vms(conn, vm.id).await?;
            self.flatten.locked_vms = Some(locks.clone());
        }
        Ok(Admission {
            flags: vec![MetaOp::SetSnapshotStatus {
                snapshot: snapshot.id,
                status: ResourceStatus::Deleting,
            }],
            locks,
        })
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        let plan = if merges_live(&cx.vm) {
            plan::plan_live_snapshot_delete(
                cx.vm.id,
                self.snapshot,
                self.previous_status,
                &cx.graphs,
                cx.vm.runtime.can_pause == Some(true),
            )?
        } else {
            plan::plan_snapshot_delete(self.snapshot, self.previous_status, &cx.graphs)?
        };
        refuse_merge_while_running(&cx.vm, &plan, &cx.graphs)?;
        flatten_dependents_first(cx, plan, &self.flatten).await
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![MetaOp::SetSnapshotStatus {
            snapshot: self.snapshot,
            status: self.previous_status,
        }])
    }
}

impl Run for SnapshotDeleteAll {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        require_ready(&load_vm(conn, self.vm).await?)?;
        let (listed, flags) = list_all_for_collapse(conn, self.vm).await?;
        self.snapshots = listed;
        Ok(Admission {
            flags,
            locks: Vec::new(),
        })
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        let snapshots = listed_snapshots(cx.conn, self.vm, &self.snapshots).await?;
        let plan = if merges_live(&cx.vm) {
            plan::plan_live_delete_all_snapshots(
                self.vm,
                &snapshots,
                &cx.graphs,
                cx.vm.runtime.can_pause == Some(true),
            )?
        } else {
            plan::plan_delete_all_snapshots(self.vm, &snapshots, &cx.graphs)?
        };
        refuse_merge_while_running(&cx.vm, &plan, &cx.graphs)?;
        Ok(plan)
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(restore_listed(&self.snapshots))
    }
}
