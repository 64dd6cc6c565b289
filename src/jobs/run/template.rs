//! Converting a VM into a template and back, and importing an uploaded image as a new
//! template.

use sqlx::SqliteConnection;

use super::guards::{
    dependents_problem, list_all_for_collapse, listed_snapshots, load_vm, require_ready,
    require_stopped, restore_listed,
};
use super::{Admission, Planning, Run};
use crate::domain::job_spec::{TemplateImport, TemplateToVm, VmToTemplate};
use crate::domain::plan::{self, MetaOp, Plan};
use crate::domain::{ResourceStatus, Uuid, VmKind};
use crate::error::{Error, Result};
use crate::{files, store};

/// Nothing else may start on the VM while it changes kind: `creating` until the job
/// ends, and ready again however it ends.
fn hold(vm: Uuid) -> MetaOp {
    MetaOp::SetVmStatus {
        vm,
        status: ResourceStatus::Creating,
    }
}

fn ready(vm: Uuid) -> MetaOp {
    MetaOp::SetVmStatus {
        vm,
        status: ResourceStatus::Ready,
    }
}

impl Run for VmToTemplate {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let vm = load_vm(conn, self.vm).await?;
        require_ready(&vm)?;
        require_stopped(&vm, "convert it to a template")?;
        let (listed, mut flags) = list_all_for_collapse(conn, vm.id).await?;
        self.snapshots = listed;
        flags.push(hold(vm.id));
        Ok(Admission {
            flags,
            locks: Vec::new(),
        })
    }

    /// Collapse the snapshots first (merges, like deleting them all); nothing is copied
    /// when each disk is one file.
    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        require_stopped(&cx.vm, "convert it to a template")?;
        let snapshots = listed_snapshots(cx.conn, self.vm, &self.snapshots).await?;
        let mut plan = plan::plan_delete_all_snapshots(self.vm, &snapshots, &cx.graphs)?;
        plan.finish.extend([
            MetaOp::SetVmKind {
                vm: self.vm,
                kind: VmKind::Template,
            },
            ready(self.vm),
        ]);
        // Stopped early or failed, it stays a VM, usable again.
        plan.undo.push(ready(self.vm));
        plan.fail.push(ready(self.vm));
        Ok(plan)
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        let mut ops = restore_listed(&self.snapshots);
        ops.push(ready(self.vm));
        Ok(ops)
    }
}

impl Run for TemplateToVm {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        require_ready(&load_vm(conn, self.vm).await?)?;
        Ok(Admission {
            flags: vec![hold(self.vm)],
            locks: Vec::new(),
        })
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        // The template's volumes become writable again: nothing may read them.
        let readers: Vec<Uuid> = cx
            .graphs
            .iter()
            .flat_map(|g| g.volumes.iter().flat_map(|v| v.dependents.iter().copied()))
            .collect();
        if !readers.is_empty() {
            return Err(dependents_problem(cx.conn, &readers).await?);
        }
        Ok(Plan {
            finish: vec![
                MetaOp::SetVmKind {
                    vm: self.vm,
                    kind: VmKind::Vm,
                },
                ready(self.vm),
            ],
            undo: vec![ready(self.vm)],
            fail: vec![ready(self.vm)],
            ..Plan::default()
        })
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![ready(self.vm)])
    }
}

impl Run for TemplateImport {
    // The request inspected and measured the image and refused what does not fit.
    const PLAN_AT_ACCEPT: bool = false;

    async fn admit(&mut self, _: &mut SqliteConnection) -> Result<Admission> {
        Ok(Admission::default())
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        let disk = store::vms::list_disks(cx.conn, self.template)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| Error::Internal("import template without a disk".into()))?;
        let upload_bytes =
            files::allocated_bytes(&files::upload_path(cx.engine.volumes_dir(), self.upload));
        Ok(plan::plan_import(
            self.template,
            disk.id,
            disk.size_bytes,
            self.upload,
            self.format,
            upload_bytes,
        ))
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![MetaOp::DeleteVm { vm: self.template }])
    }
}
