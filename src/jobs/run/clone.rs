//! Clones: a linked or full clone of a VM, a copy of one into a template, and VMs
//! deployed from a template. The three kinds differ only in what the new records are
//! (made by the request), so they share one spec and one runner.

use std::collections::HashMap;

use sqlx::SqliteConnection;

use super::guards::{
    decide_consistency, find_snapshot, load_vm, merges_live, require_ready, require_snapshot_ready,
    require_stopped,
};
use super::{Admission, Planning, Run};
use crate::domain::job_spec::Clone;
use crate::domain::plan::{self, CloneMode, MetaOp, Plan};
use crate::domain::{ResourceStatus, Snapshot, Uuid, VmKind};
use crate::error::{Error, ErrorCode, Result};
use crate::{files, store};

impl Run for Clone {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let source = load_vm(conn, self.source).await?;
        require_ready(&source)?;
        // Checked under the write lock: a delete of the snapshot may have been accepted
        // since the request read it.
        if let Some(id) = self.snapshot_id {
            let (snapshot, _) = find_snapshot(conn, id).await?;
            require_snapshot_ready(&snapshot)?;
        }
        if self.snapshot_id.is_none() && source.kind == VmKind::Vm {
            decide_consistency(&source, &mut self.consistency, &mut self.quiesce)?;
        } else if self.consistency.is_some() || self.quiesce.is_some() {
            return Err(Error::validation(
                "consistency and quiesce apply to a clone of a VM's present state, not to one of a snapshot or a template",
            ));
        }
        Ok(Admission {
            flags: Vec::new(),
            locks: self.vms.iter().map(|vm| vm.id).collect(),
        })
    }

    /// Resolve each source disk to the layer the clone starts from (the snapshot's
    /// frozen layer, the template's volume, or the present state, frozen first for a
    /// linked clone of a VM) and measure what a full copy writes.
    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        let snapshot = match self.snapshot_id {
            Some(id) => Some(self.ready_snapshot(cx, id).await?),
            None => None,
        };
        // A template's volumes never change, so clones start from them directly; a VM's
        // present state is frozen first, like a snapshot taken for the purpose (it must
        // be stopped, as for a snapshot).
        let freeze_present = snapshot.is_none() && cx.vm.kind == VmKind::Vm;
        let live = freeze_present && merges_live(&cx.vm);
        if freeze_present && !live {
            require_stopped(&cx.vm, "clone its present state")?;
        }
        let mut freeze = Vec::new();
        let mut starts: HashMap<Uuid, (Uuid, u64)> = HashMap::new();
        for graph in &cx.graphs {
            let start = match &snapshot {
                Some(snapshot) => snapshot
                    .volumes
                    .iter()
                    .find(|(disk, _)| *disk == graph.disk_id)
                    .map(|(_, volume)| *volume),
                None => graph.active().map(|v| v.id),
            };
            let Some(start) = start else { continue };
            let size = graph.get(start).map_or(graph.size_bytes, |v| v.size_bytes);
            if freeze_present {
                freeze.push(plan::Freeze {
                    disk: graph.disk_id,
                    active: start,
                    size_bytes: size,
                });
            }
            starts.insert(graph.disk_id, (start, size));
        }
        let mut new_vms = Vec::with_capacity(self.vms.len());
        for target in &self.vms {
            let mut disks = Vec::with_capacity(target.disks.len());
            for (disk, source_disk) in &target.disks {
                let Some(&(start, size_bytes)) = starts.get(source_disk) else {
                    self.refuse_unless_adding(cx, *source_disk).await?;
                    continue;
                };
                let copy_bytes = match self.mode {
                    CloneMode::Linked => 0,
                    CloneMode::Full => {
                        files::chain_bytes(cx.engine.volumes_dir(), cx.conn, start).await?
                    }
                };
                disks.push(plan::CloneDisk {
                    disk: *disk,
                    source: start,
                    size_bytes,
                    copy_bytes,
                });
            }
            new_vms.push((target.id, disks));
        }
        if live {
            return Ok(match self.mode {
                CloneMode::Linked => {
                    plan::plan_live_linked_clone(cx.vm.id, &new_vms, &freeze, self.freeze())
                }
                CloneMode::Full => plan::plan_live_full_clone(cx.vm.id, &new_vms, self.freeze()),
            });
        }
        Ok(plan::plan_clone(&new_vms, self.mode, &freeze))
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(self
            .vms
            .iter()
            .map(|target| MetaOp::DeleteVm { vm: target.id })
            .collect())
    }
}

impl Clone {
    async fn ready_snapshot(&self, cx: &mut Planning<'_>, id: Uuid) -> Result<Snapshot> {
        let snapshot = store::snapshots::get(cx.conn, id)
            .await?
            .filter(|s| s.vm_id == self.source)
            .ok_or_else(|| {
                Error::problem(
                    ErrorCode::SnapshotNotFound,
                    format!("snapshot {id} of VM {} does not exist", cx.vm.name),
                )
            })?;
        require_snapshot_ready(&snapshot)?;
        Ok(snapshot)
    }

    /// A source disk with nothing to start from: one a job queued before the clone is
    /// still adding will have it when the clone runs (jobs of a VM run in order), so it
    /// is only left out of the plan made at accept; any other is gone.
    async fn refuse_unless_adding(&self, cx: &mut Planning<'_>, source_disk: Uuid) -> Result<()> {
        let adding = store::vms::get_disk(cx.conn, source_disk)
            .await?
            .is_some_and(|d| d.status == ResourceStatus::Creating);
        if adding {
            return Ok(());
        }
        Err(Error::problem(
            ErrorCode::DiskNotFound,
            format!(
                "source disk {source_disk} is gone (deleted, or its creation failed, since the request)"
            ),
        ))
    }
}
