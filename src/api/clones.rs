//! `POST /v1/vms/{id}/clone` and `POST /v1/vms/{vm}/disks/{disk}/flatten`: linked and
//! full clones of a VM, and cutting a linked disk loose from its source.

use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::extract::{Json, parse_id};
use super::problem::Problem;
use super::vms::{enqueue, find_vm};
use super::{AppState, accepted};
use crate::domain::plan::CloneMode;
use crate::domain::{JobKind, TargetType, Uuid, VmKind, validate};
use crate::error::{Error, ErrorCode, Result};
use crate::jobs::preflight;
use crate::jobs::requests::{self, CloneRequest, require_ready, require_stopped};
use crate::store;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(clone_vm))
        .routes(routes!(flatten_disk))
}

/// A clone of a VM: from one of its snapshots, or from its present state.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "web-02", "mode": "linked"}))]
pub struct CloneVm {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `linked`: each new disk is an overlay on the source's layer (instant; the source
    /// layers are then shared and protected). `full`: a standalone copy.
    pub mode: CloneMode,
    /// Clone this snapshot of the VM (the VM may then be running). Without one, the
    /// present state: the VM must be stopped.
    pub snapshot_id: Option<Uuid>,
}

/// Clone a VM. The new VM exists at once with status `creating` and becomes `ready`
/// when the job ends. A linked clone of the present state first freezes each disk's
/// writable layer under a new one (no snapshot record: the source's tree is unchanged)
/// and sits on the frozen layer; a full clone copies what the chosen point shows
/// (`qemu-img convert`, sparse, no backing file) with progress, and a cancelled or
/// failed copy leaves no file behind.
#[utoipa::path(post, path = "/v1/vms/{id}/clone", tag = "clones", request_body = CloneVm,
    params(("id" = Uuid, Path, description = "Source VM id")),
    responses(
        (status = 202, description = "The `vm_clone` job; `target.id` (and `detail.vm_ids`) is the new VM", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        (status = 400, description = "Invalid name or mode (`validation_failed`, `invalid_json`)", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such VM or snapshot (`vm_not_found`, `snapshot_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Name used (`name_taken`); present state of a running VM (`vm_running`); source not ready (`vm_not_ready`), without disks (`vm_has_no_disks`); snapshot not ready (`snapshot_not_ready`)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the configured limit (`payload_too_large`)", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Body is not JSON (`unsupported_media_type`)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "Not enough free space for a full copy (`insufficient_storage`)", body = Problem, content_type = "application/problem+json"),
    ))]
async fn clone_vm(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<CloneVm>,
) -> Result<Response> {
    validate::name("name", &body.name).map_err(Error::validation)?;
    validate::description(&body.description).map_err(Error::validation)?;
    let source = find_vm(&mut *state.engine.db.reader().await?, &id).await?;
    if body.snapshot_id.is_none() {
        require_stopped(&source, "clone its present state")?;
    }
    let job = requests::clone(
        &state.engine,
        CloneRequest {
            source: source.id,
            snapshot_id: body.snapshot_id,
            mode: body.mode,
            names: vec![body.name],
            description: body.description,
            kind: VmKind::Vm,
            job_kind: JobKind::VmClone,
        },
    )
    .await?;
    Ok(accepted(job.into()))
}

/// Make a linked disk standalone: copy in what its source's layers show, then cut the
/// link (`qemu-img rebase -b ''` on the disk's lowest layer). The guest sees the same
/// bytes throughout; the VM must be stopped. Afterwards the source's layers no longer
/// depend on this disk.
#[utoipa::path(post, path = "/v1/vms/{vm_id}/disks/{disk_id}/flatten", tag = "clones",
    params(("vm_id" = Uuid, Path, description = "VM id"), ("disk_id" = Uuid, Path, description = "Disk id")),
    responses(
        (status = 202, description = "The `disk_flatten` job", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        (status = 404, description = "No such VM or disk (`vm_not_found`, `disk_not_found`)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The disk is not linked (`disk_not_linked`), the VM runs (`vm_running`) or is not ready (`vm_not_ready`), the disk is not ready (`disk_not_ready`), or linked clones of this VM read the layer flattening rewrites (`has_dependents`)", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "Not enough free space for the copy (`insufficient_storage`)", body = Problem, content_type = "application/problem+json"),
    ))]
async fn flatten_disk(
    State(state): State<AppState>,
    Path((vm_id, disk_id)): Path<(String, String)>,
) -> Result<Response> {
    let (vm, disk) = {
        let mut conn = state.engine.db.reader().await?;
        let vm = find_vm(&mut conn, &vm_id).await?;
        let disk_id = parse_id(&disk_id, ErrorCode::DiskNotFound, "disk")?;
        let disk = store::vms::get_disk(&mut conn, disk_id)
            .await?
            .filter(|d| d.vm_id == vm.id)
            .ok_or_else(|| {
                Error::problem(
                    ErrorCode::DiskNotFound,
                    format!("VM {} has no disk {disk_id}", vm.name),
                )
            })?;
        (vm, disk)
    };
    require_ready(&vm)?;
    require_stopped(&vm, "flatten one of its disks")?;
    preflight(
        &state.engine,
        JobKind::DiskFlatten,
        vm.id,
        disk.id,
        &serde_json::Value::Null,
    )
    .await?;
    let tx = state.engine.db.begin().await?;
    enqueue(
        &state,
        tx,
        JobKind::DiskFlatten,
        (TargetType::Disk, disk.id),
        vm.id,
        serde_json::json!({}),
    )
    .await
}
