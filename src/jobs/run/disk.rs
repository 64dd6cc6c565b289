//! Adding, removing, growing and flattening one disk of a VM.

use sqlx::SqliteConnection;

use super::guards::{
    load_disk, load_vm, refuse_if_readers_running, require_ready, require_stopped,
    require_stopped_or_reachable,
};
use super::links::{drop_unread_source_layers, links_bytes};
use super::{Admission, Planning, Run};
use crate::domain::job_spec::{DiskCreate, DiskDelete, DiskFlatten, DiskResize};
use crate::domain::plan::{self, DiskGraph, MetaOp, Plan};
use crate::domain::{ResourceStatus, Uuid, VmState};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

/// The graph of disk `id` among the VM's.
fn disk_graph(cx: &Planning<'_>, id: Uuid) -> Result<DiskGraph> {
    cx.graphs
        .iter()
        .find(|g| g.disk_id == id)
        .cloned()
        .ok_or_else(|| Error::problem(ErrorCode::DiskNotFound, format!("disk {id} does not exist")))
}

fn require_disk_status(disk: &crate::domain::Disk, allowed: &[ResourceStatus]) -> Result<()> {
    if !allowed.contains(&disk.status) {
        return Err(Error::problem(
            ErrorCode::DiskNotReady,
            format!("disk {} is {}", disk.name, disk.status),
        ));
    }
    Ok(())
}

impl Run for DiskCreate {
    const PLAN_AT_ACCEPT: bool = false;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        require_ready(&load_vm(conn, self.vm).await?)?;
        Ok(Admission::default())
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        let disk = store::vms::get_disk(cx.conn, self.disk)
            .await?
            .ok_or_else(|| {
                Error::problem(
                    ErrorCode::DiskNotFound,
                    format!("disk {} does not exist", self.disk),
                )
            })?;
        Ok(plan::plan_create_disks(
            self.vm,
            &[(disk.id, disk.size_bytes)],
            false,
        ))
    }

    async fn unwind(&self, _: &mut SqliteConnection, cancelled: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![if cancelled {
            MetaOp::DeleteDisk { disk: self.disk }
        } else {
            MetaOp::SetDiskStatus {
                disk: self.disk,
                status: ResourceStatus::Error,
            }
        }])
    }
}

impl Run for DiskDelete {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let vm = load_vm(conn, self.vm).await?;
        let disk = load_disk(conn, &vm, self.disk).await?;
        require_ready(&vm)?;
        require_stopped(&vm, "remove one of its disks")?;
        require_disk_status(&disk, &[ResourceStatus::Ready, ResourceStatus::Error])?;
        self.previous_status = disk.status;
        Ok(Admission {
            flags: vec![MetaOp::SetDiskStatus {
                disk: disk.id,
                status: ResourceStatus::Deleting,
            }],
            // Deleting a linked disk may drop a layer of its source that nothing reads
            // any more (decided when the job runs): the job works on the source too, so
            // no job of the source plans around that layer meanwhile.
            locks: store::vms::sources_of(conn, vm.id, Some(disk.id)).await?,
        })
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        require_stopped(&cx.vm, "delete one of its disks")?;
        // A disk whose creation failed has no files, only its record to remove.
        let graph = disk_graph(cx, self.disk).unwrap_or(DiskGraph {
            disk_id: self.disk,
            size_bytes: 0,
            volumes: Vec::new(),
        });
        let plan = plan::plan_delete_disks(self.vm, &[graph], false, self.previous_status);
        drop_unread_source_layers(cx, plan, Some(self.disk)).await
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![MetaOp::SetDiskStatus {
            disk: self.disk,
            status: self.previous_status,
        }])
    }
}

impl Run for DiskResize {
    const PLAN_AT_ACCEPT: bool = false;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let vm = load_vm(conn, self.vm).await?;
        let disk = load_disk(conn, &vm, self.disk).await?;
        require_ready(&vm)?;
        require_stopped_or_reachable(&vm, "resize one of its disks")?;
        require_disk_status(&disk, &[ResourceStatus::Ready])?;
        if self.size_bytes <= disk.size_bytes {
            return Err(Error::with_extra(
                ErrorCode::DiskShrinkRefused,
                format!(
                    "disk {} is {} bytes; a resize must make it larger (shrinking would cut guest data)",
                    disk.name, disk.size_bytes
                ),
                serde_json::json!({ "current_size_bytes": disk.size_bytes }),
            ));
        }
        self.previous_status = disk.status;
        Ok(Admission::default())
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        require_stopped_or_reachable(&cx.vm, "resize one of its disks")?;
        let disk = disk_graph(cx, self.disk)?;
        // Re-checked here: an earlier resize in the queue may have grown it further.
        if self.size_bytes <= disk.size_bytes {
            return Err(Error::problem(
                ErrorCode::DiskShrinkRefused,
                format!(
                    "disk {} is already {} bytes; a resize must make it larger",
                    self.disk, disk.size_bytes
                ),
            ));
        }
        Ok(if cx.vm.state == VmState::Running {
            plan::plan_live_resize(self.vm, &disk, self.size_bytes)?
        } else {
            plan::plan_resize(&disk, self.size_bytes)?
        })
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![MetaOp::SetDiskStatus {
            disk: self.disk,
            status: self.previous_status,
        }])
    }
}

impl Run for DiskFlatten {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let vm = load_vm(conn, self.vm).await?;
        let disk = load_disk(conn, &vm, self.disk).await?;
        require_ready(&vm)?;
        require_stopped(&vm, "flatten one of its disks")?;
        Ok(Admission {
            flags: Vec::new(),
            // Flattening may drop a layer of the source nothing reads any more.
            locks: store::vms::sources_of(conn, vm.id, Some(disk.id)).await?,
        })
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        require_stopped(&cx.vm, "flatten one of its disks")?;
        refuse_if_readers_running(cx.conn, &cx.vm).await?;
        let disk = disk_graph(cx, self.disk)?;
        let copy_bytes = links_bytes(cx, &disk).await?;
        let plan = plan::plan_flatten(&disk, copy_bytes).ok_or_else(|| {
            Error::problem(
                ErrorCode::DiskNotLinked,
                format!(
                    "disk {} is not a linked clone: it has no source to cut loose from",
                    self.disk
                ),
            )
        })?;
        drop_unread_source_layers(cx, plan, Some(self.disk)).await
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(Vec::new())
    }
}
