//! `POST /v1/vms/{id}/clone` and `POST /v1/vms/{vm}/disks/{disk}/flatten`: linked and
//! full clones of a VM, and cutting a linked disk loose from its source.

use axum::extract::{Path, State};
use axum::response::Response;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::extract::Json;
use super::problem::problems;
use super::vms::{find_vm, find_vm_disk};
use super::{AppState, accept_job};
use crate::domain::plan::CloneMode;
use crate::domain::{
    Consistency, Disk, JobSpec, Quiesce, ResourceStatus, Uuid, Vm, VmKind, job_spec, new_id,
    validate,
};
use crate::error::{Error, ErrorCode, Result};
use crate::jobs::{NewRecords, Request};
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
    /// present state: the VM must be stopped, or running with a QMP socket. Then a
    /// linked clone switches the VM's disks onto new layers live and sits on the layers
    /// they leave; a full clone is copied by the VM's QEMU (`blockdev-backup`, every
    /// disk at one instant).
    pub snapshot_id: Option<Uuid>,
    /// For the present state of a running VM, as for a snapshot: freeze its file
    /// systems through the guest agent around the instant the clone captures
    /// (`filesystem`), or not (`crash`). Default: `filesystem` when the VM has a
    /// guest-agent socket, else `crash`. Refused with `snapshot_id`.
    pub consistency: Option<Consistency>,
    /// With `filesystem`: `required` fails the job (making nothing) when the freeze
    /// fails; `best_effort` (the default) clones crash-consistent and says why in the
    /// job's `quiesce_error`. Giving it implies `filesystem`.
    pub quiesce: Option<Quiesce>,
}

problems!(CloneVmProblems = JSON_BODY, NAMED, VM, SNAPSHOT, CHAIN_JOB; VmHasNoDisks, SnapshotNotReady, GuestAgentUnavailable);

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
        CloneVmProblems,
    ))]
async fn clone_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<CloneVm>,
) -> Result<Response> {
    validate::name("name", &body.name).map_err(Error::validation)?;
    validate::description(&body.description).map_err(Error::validation)?;
    let source = find_vm(&mut *state.db.reader().await?, &id).await?;
    let request = CloneRequest {
        snapshot_id: body.snapshot_id,
        mode: body.mode,
        names: vec![body.name],
        description: body.description,
        kind: VmKind::Vm,
        consistency: body.consistency,
        quiesce: body.quiesce,
    };
    let request = clone_request(&state, &source, request, JobSpec::VmClone).await?;
    accept_job(&state, &caller, request).await
}

/// A clone, a batch deploy or a copy into a template, as a request asks for it.
pub(crate) struct CloneRequest {
    /// Start from this snapshot of the source instead of its present state.
    pub snapshot_id: Option<Uuid>,
    pub mode: CloneMode,
    /// One new record per name.
    pub names: Vec<String>,
    pub description: String,
    /// What the new records are.
    pub kind: VmKind,
    /// For a clone of a running VM's present state (`CloneVm`).
    pub consistency: Option<Consistency>,
    pub quiesce: Option<Quiesce>,
}

/// The records a clone makes (one VM or template per name, with a disk per source
/// disk, status `creating`) and its job, `kind` being `JobSpec::VmClone`,
/// `TemplateCreate` or `TemplateDeploy`. The job locks the source and every new
/// record; its checks and plan are made when it is accepted.
pub(crate) async fn clone_request(
    state: &AppState,
    source: &Vm,
    request: CloneRequest,
    kind: fn(job_spec::Clone) -> JobSpec,
) -> Result<Request> {
    let starts = clone_starts(state, source, request.snapshot_id).await?;
    if starts.is_empty() {
        return Err(Error::problem(
            ErrorCode::VmHasNoDisks,
            format!("{} has no disks to clone", source.name),
        ));
    }
    let now = store::now();
    let mut records = Vec::with_capacity(request.names.len());
    let mut targets = Vec::with_capacity(request.names.len());
    for name in request.names {
        let vm = Vm {
            kind: request.kind,
            source_vm_id: (source.kind == VmKind::Vm).then_some(source.id),
            template_id: (source.kind == VmKind::Template).then_some(source.id),
            ..Vm::new(name, request.description.clone(), now)
        };
        let mut disks = Vec::with_capacity(starts.len());
        let mut pairs = Vec::with_capacity(starts.len());
        for (source_disk, name, size_bytes) in &starts {
            let disk = Disk {
                id: new_id(),
                vm_id: vm.id,
                name: name.clone(),
                size_bytes: *size_bytes,
                status: ResourceStatus::Creating,
                active_volume_id: None,
                created_at: now,
            };
            pairs.push((disk.id, *source_disk));
            disks.push(disk);
        }
        targets.push(job_spec::CloneTarget {
            id: vm.id,
            disks: pairs,
        });
        records.push((vm, disks));
    }
    let ids: Vec<Uuid> = targets.iter().map(|t| t.id).collect();
    let spec = kind(job_spec::Clone {
        source: source.id,
        mode: request.mode,
        snapshot_id: request.snapshot_id,
        vms: targets,
        consistency: request.consistency,
        quiesce: request.quiesce,
    });
    let mut request = Request::creating(spec, NewRecords::Vms(records));
    request.detail = Some(serde_json::json!({ "vm_ids": ids }));
    Ok(request)
}

/// (source disk, name, size) of each disk a clone of `source` gets: those a snapshot
/// covers, or those of the present state as it will be when the clone runs, after
/// every job accepted before it (a disk being added is there by then; if its creation
/// fails, so does the clone, making nothing), one being deleted is not.
async fn clone_starts(
    state: &AppState,
    source: &Vm,
    snapshot_id: Option<Uuid>,
) -> Result<Vec<(Uuid, String, u64)>> {
    let mut conn = state.db.reader().await?;
    let disks = store::vms::list_disks(&mut conn, source.id).await?;
    let Some(id) = snapshot_id else {
        return Ok(disks
            .iter()
            .filter(|d| match d.status {
                ResourceStatus::Ready => d.active_volume_id.is_some(),
                ResourceStatus::Creating => true,
                _ => false,
            })
            .map(|d| (d.id, d.name.clone(), d.size_bytes))
            .collect());
    };
    let (snapshot, owner) = crate::jobs::find_snapshot(&mut conn, id).await?;
    if owner.id != source.id {
        return Err(Error::problem(
            ErrorCode::SnapshotNotFound,
            format!("snapshot {id} is not a snapshot of VM {}", source.name),
        ));
    }
    let volumes = store::vms::list_volumes(&mut conn, source.id).await?;
    Ok(snapshot
        .volumes
        .iter()
        .filter_map(|(disk, volume)| {
            let disk = disks.iter().find(|d| d.id == *disk)?;
            let size = volumes.iter().find(|v| v.id == *volume)?.size_bytes;
            Some((disk.id, disk.name.clone(), size))
        })
        .collect())
}

problems!(FlattenDiskProblems = DISK, CHAIN_JOB, READ_BY_CLONES; DiskNotLinked, DiskNotReady);

/// Make a linked disk standalone: copy in what its source's layers show, then cut the
/// link (`qemu-img rebase -b ''` on the disk's lowest layer). The guest sees the same
/// bytes throughout; the VM must be stopped. Afterwards the source's layers no longer
/// depend on this disk.
#[utoipa::path(post, path = "/v1/vms/{vm_id}/disks/{disk_id}/flatten", tag = "clones",
    params(("vm_id" = Uuid, Path, description = "VM id"), ("disk_id" = Uuid, Path, description = "Disk id")),
    responses(
        (status = 202, description = "The `disk_flatten` job", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        FlattenDiskProblems,
    ))]
async fn flatten_disk(
    State(state): State<AppState>,
    caller: Caller,
    Path((vm_id, disk_id)): Path<(String, String)>,
) -> Result<Response> {
    let (vm, disk) = find_vm_disk(&state, &vm_id, &disk_id).await?;
    let spec = JobSpec::DiskFlatten(job_spec::DiskFlatten {
        vm: vm.id,
        disk: disk.id,
    });
    accept_job(&state, &caller, Request::new(spec)).await
}
