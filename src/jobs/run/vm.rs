//! Creating and deleting a VM (or a template: a deletion is the same job).

use sqlx::SqliteConnection;

use super::guards::{load_vm, noun, require_stopped};
use super::links::{drop_unread_source_layers, flatten_dependents_first};
use super::{Admission, Planning, Run};
use crate::domain::ResourceStatus;
use crate::domain::job_spec::{VmCreate, VmDelete};
use crate::domain::plan::{self, MetaOp, Plan};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

impl Run for VmCreate {
    // The request inserted the VM and its disks; there is nothing to refuse.
    const PLAN_AT_ACCEPT: bool = false;

    async fn admit(&mut self, _: &mut SqliteConnection) -> Result<Admission> {
        Ok(Admission::default())
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        let disks = store::vms::list_disks(cx.conn, self.vm).await?;
        let sizes: Vec<_> = disks.iter().map(|d| (d.id, d.size_bytes)).collect();
        Ok(plan::plan_create_disks(self.vm, &sizes, true))
    }

    async fn unwind(&self, conn: &mut SqliteConnection, cancelled: bool) -> Result<Vec<MetaOp>> {
        if cancelled {
            return Ok(vec![MetaOp::DeleteVm { vm: self.vm }]);
        }
        let disks = store::vms::list_disks(conn, self.vm).await?;
        let mut ops: Vec<MetaOp> = disks
            .iter()
            .map(|d| MetaOp::SetDiskStatus {
                disk: d.id,
                status: ResourceStatus::Error,
            })
            .collect();
        ops.push(MetaOp::SetVmStatus {
            vm: self.vm,
            status: ResourceStatus::Error,
        });
        Ok(ops)
    }
}

impl Run for VmDelete {
    const PLAN_AT_ACCEPT: bool = true;

    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission> {
        let vm = load_vm(conn, self.vm).await?;
        match vm.status {
            ResourceStatus::Ready | ResourceStatus::Error => {}
            ResourceStatus::Deleting => {
                return Err(Error::problem(
                    ErrorCode::VmNotReady,
                    format!("{} {} is already being deleted", noun(&vm), vm.name),
                ));
            }
            // The job making it (a create, clone, deploy or conversion) ends by setting
            // its status; a deletion accepted meanwhile would be overwritten.
            ResourceStatus::Creating => {
                return Err(Error::problem(
                    ErrorCode::VmNotReady,
                    format!(
                        "{} {} is still being created; wait for its job to end, or cancel it",
                        noun(&vm),
                        vm.name
                    ),
                ));
            }
        }
        require_stopped(&vm, "delete it")?;
        self.previous_status = vm.status;
        // A flattening deletion also works on the linked clones: it locks them.
        let mut locks = Vec::new();
        if self.flatten.flatten_dependents {
            let dependents = super::dependent_vms(conn, vm.id).await?;
            self.flatten.locked_vms = Some(dependents.clone());
            locks = dependents;
        }
        // A linked clone's deletion may drop a layer of its source nothing reads any
        // more: it works on the source too.
        locks.extend(store::vms::sources_of(conn, vm.id, None).await?);
        Ok(Admission {
            flags: vec![MetaOp::SetVmStatus {
                vm: vm.id,
                status: ResourceStatus::Deleting,
            }],
            locks,
        })
    }

    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan> {
        require_stopped(&cx.vm, "delete it")?;
        let plan = plan::plan_delete_disks(self.vm, &cx.graphs, true, self.previous_status);
        let plan = drop_unread_source_layers(cx, plan, None).await?;
        flatten_dependents_first(cx, plan, &self.flatten).await
    }

    async fn unwind(&self, _: &mut SqliteConnection, _: bool) -> Result<Vec<MetaOp>> {
        Ok(vec![MetaOp::SetVmStatus {
            vm: self.vm,
            status: self.previous_status,
        }])
    }
}
