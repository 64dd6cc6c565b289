//! `/v1/vms` and `/v1/vms/{id}/disks`: VMs and their disks.

use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashSet};

use axum::extract::{Path, State};
use axum::response::{IntoResponse as _, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Caller;
use super::extract::{Json, Query, parse_id};
use super::problem::problems;
use super::{AppState, PageQuery, Views, accept_job, page};
use crate::domain::{
    Disk, JobSpec, ResourceStatus, Uuid, Vm, VmKind, VmState, Volume, VolumeStatus, job_spec,
    new_id, validate,
};
use crate::error::{Error, ErrorCode, Result};
use crate::files as storage;
use crate::jobs::accept::name_taken;
use crate::jobs::{NewRecords, Request};
use crate::store;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_vms, create_vm))
        .routes(routes!(get_vm, patch_vm, delete_vm))
        .routes(routes!(list_disks, create_disk))
        .routes(routes!(get_disk, delete_disk))
        .routes(routes!(resize_disk))
}

/// Role of a layer in a disk's chain.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VolumeRole {
    /// The writable top that a hypervisor opens.
    Active,
    /// A layer frozen by a snapshot (read-only while anything sits on it).
    Snapshot,
    /// A frozen layer no snapshot names: the present state linked clones were taken
    /// from, kept under the disk's writable layer because they read it.
    Shared,
}

/// One qcow2 file in a disk's backing chain.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChainEntry {
    pub volume_id: Uuid,
    /// Absolute path of the file.
    pub path: String,
    pub role: VolumeRole,
    /// The snapshot that froze this layer (role `snapshot`).
    pub snapshot_id: Option<Uuid>,
    /// Virtual size of the layer.
    pub size_bytes: u64,
    /// Bytes the file occupies on disk (measured at most a second ago).
    pub allocated_bytes: u64,
    /// `rewriting` while a merge changes the file's own content (its snapshot is not
    /// usable until the job ends), `deleting` while it is about to go.
    pub status: VolumeStatus,
}

/// A virtual disk: a chain of qcow2 files, of which the top is writable.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub name: String,
    /// Guest-visible size.
    pub size_bytes: u64,
    /// Image format of every layer (`qcow2`).
    pub format: String,
    pub status: ResourceStatus,
    /// Absolute path of the writable qcow2 a hypervisor should open (absent until the
    /// disk has been created).
    pub active_path: Option<String>,
    /// The disk's own layers, top (active) first.
    pub chain: Vec<ChainEntry>,
    /// For a linked disk (a linked clone or a VM deployed from a template): the volume
    /// of another VM or template its lowest layer sits on. Absent for a standalone disk.
    pub source_volume_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
}

/// A VM with its disks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({
    "id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b", "name": "web-01", "description": "front end",
    "labels": {"tier": "web"}, "dependent_vm_ids": [], "runtime": null,
    "state": "stopped", "status": "ready", "current_snapshot_id": null, "snapshot_count": 0,
    "disks": [{"id": "019a6f5e-3333-7b3e-9f2a-3c4d5e6f7a8b", "vm_id": "019a6f5e-2222-7b3e-9f2a-3c4d5e6f7a8b",
        "name": "root", "size_bytes": 10737418240u64, "format": "qcow2", "status": "ready",
        "active_path": "/var/lib/strata/volumes/019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a8b.qcow2",
        "chain": [{"volume_id": "019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a8b",
            "path": "/var/lib/strata/volumes/019a6f5e-4444-7b3e-9f2a-3c4d5e6f7a8b.qcow2", "role": "active",
            "snapshot_id": null, "size_bytes": 10737418240u64, "allocated_bytes": 200704, "status": "ready"}],
        "created_at": "2026-11-21T10:00:00Z"}],
    "created_at": "2026-11-21T10:00:00Z", "updated_at": "2026-11-21T10:00:00Z"
}))]
pub struct VmView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub labels: BTreeMap<String, String>,
    /// Power state, set by the orchestrator.
    pub state: VmState,
    pub status: ResourceStatus,
    /// The snapshot the present state grows from.
    pub current_snapshot_id: Option<Uuid>,
    /// How many snapshots the VM has, in every branch of its tree.
    pub snapshot_count: u32,
    pub disks: Vec<DiskView>,
    /// The VM this one was cloned from.
    pub source_vm_id: Option<Uuid>,
    /// The template this VM was deployed from.
    pub template_id: Option<Uuid>,
    /// VMs with linked disks reading this VM's files: while any exist, deleting the VM
    /// or a snapshot they read is refused (`has_dependents`).
    pub dependent_vm_ids: Vec<Uuid>,
    /// The running VM's sockets; null when none was given.
    pub runtime: Option<RuntimeView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmList {
    pub items: Vec<VmView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DiskList {
    pub items: Vec<DiskView>,
    /// Pass as `cursor` to get the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "root", "size_bytes": 10737418240u64}))]
pub struct NewDisk {
    /// Unique within the VM.
    pub name: String,
    /// Positive multiple of 512, at most the configured maximum.
    pub size_bytes: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "web-01", "description": "front end", "disks": [{"name": "root", "size_bytes": 10737418240u64}]}))]
pub struct CreateVm {
    /// Unique among VMs.
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Key/value labels (keys and values: letters, digits, `-`, `_`, `.`; keys may hold `/`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub disks: Vec<NewDisk>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"state": "running", "qmp_socket": "/run/strata/vm-01.qmp", "guest_agent_socket": "/run/strata/vm-01.qga"}))]
pub struct PatchVm {
    pub name: Option<String>,
    pub description: Option<String>,
    /// Replaces all labels of the VM.
    pub labels: Option<BTreeMap<String, String>>,
    /// Set by the orchestrator when it starts or stops the VM. While `running`,
    /// revert and merges of the active chain are refused, and snapshot and resize
    /// are done live through the QMP socket (refused without one). Marking it
    /// `stopped` forgets its sockets.
    pub state: Option<VmState>,
    /// The running VM's QMP monitor socket, inside `--runtime-dir`: checked to be a
    /// unix socket answering as a QEMU monitor. Given with `state: running` or for a
    /// VM already running; left out, the recorded one stays.
    #[schema(example = "/run/strata/vm-01.qmp")]
    pub qmp_socket: Option<String>,
    /// The running VM's guest-agent socket, inside `--runtime-dir`: checked to be a
    /// unix socket (the agent may start later than the VM).
    #[schema(example = "/run/strata/vm-01.qga")]
    pub guest_agent_socket: Option<String>,
}

/// How strata reaches a running VM's QEMU.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RuntimeView {
    pub qmp_socket: Option<String>,
    pub guest_agent_socket: Option<String>,
    /// Whether strata's last contact with the monitor succeeded; null when it has not
    /// contacted it since it started.
    pub connected: Option<bool>,
    /// QEMU's version, as the monitor reported it when the socket was given.
    #[schema(example = "10.0.2")]
    pub qemu_version: Option<String>,
    /// Whether that QEMU can pause its guest (`stop`/`cont`; a VM's QEMU can, a
    /// qemu-storage-daemon cannot). Deleting a snapshot whose layer is the parent of a
    /// disk's active layer commits the active layer down and switches the disk onto the
    /// merged file, with the guest paused for that moment, only then; otherwise the
    /// snapshot's layer is streamed up into the active layer.
    #[schema(example = true)]
    pub can_pause: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"size_bytes": 21474836480u64}))]
pub struct ResizeDisk {
    /// New size: larger than the current one, a multiple of 512.
    pub size_bytes: u64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmFilter {
    /// Only the VM with exactly this name.
    pub name: Option<String>,
    /// Only VMs carrying this label, written `key=value`.
    #[param(example = "tier=web")]
    pub label: Option<String>,
}

impl VmFilter {
    fn label(&self) -> Result<Option<(&str, &str)>> {
        self.label
            .as_deref()
            .map(|l| {
                l.split_once('=').ok_or_else(|| {
                    Error::problem(ErrorCode::InvalidQuery, "label must be written key=value")
                })
            })
            .transpose()
    }
}

/// Paths of the disk's chain, top first, with live allocation figures.
pub(crate) fn disk_view(views: Views, disk: Disk, volumes: &[Volume]) -> DiskView {
    let dir = views.volumes_dir;
    let mut chain = Vec::new();
    let mut next = disk.active_volume_id;
    let mut source_volume_id = None;
    while let Some(id) = next {
        let Some(volume) = volumes.iter().find(|v| v.id == id && v.disk_id == disk.id) else {
            // The chain goes on in another VM's (or template's) disk: a linked disk.
            source_volume_id = Some(id);
            break;
        };
        let path = storage::volume_path(dir, id);
        chain.push(ChainEntry {
            volume_id: id,
            path: path.display().to_string(),
            role: if volume.snapshot_id.is_some() {
                VolumeRole::Snapshot
            } else if Some(id) == disk.active_volume_id {
                VolumeRole::Active
            } else {
                VolumeRole::Shared
            },
            snapshot_id: volume.snapshot_id,
            size_bytes: volume.size_bytes,
            allocated_bytes: storage::shown_allocation(&path),
            status: volume.status,
        });
        next = volume.parent_id;
    }
    DiskView {
        id: disk.id,
        vm_id: disk.vm_id,
        name: disk.name,
        size_bytes: disk.size_bytes,
        format: "qcow2".into(),
        status: disk.status,
        active_path: chain.first().map(|c| c.path.clone()),
        chain,
        source_volume_id,
        created_at: disk.created_at,
    }
}

pub(crate) async fn vm_view(
    views: Views<'_>,
    conn: &mut sqlx::SqliteConnection,
    vm: Vm,
) -> Result<VmView> {
    let disks = store::vms::list_disks(conn, vm.id).await?;
    let volumes = store::vms::list_volumes(conn, vm.id).await?;
    let mut dependent_vm_ids: Vec<Uuid> = store::vms::dependents_of(conn, vm.id)
        .await?
        .into_iter()
        .map(|(_, vm)| vm)
        .collect();
    dependent_vm_ids.sort();
    dependent_vm_ids.dedup();
    let runtime = runtime_view(views, &vm);
    let snapshot_count = store::snapshots::count_of_vm(conn, vm.id).await?;
    Ok(VmView {
        id: vm.id,
        name: vm.name,
        description: vm.description,
        labels: vm.labels,
        state: vm.state,
        status: vm.status,
        current_snapshot_id: vm.current_snapshot_id,
        snapshot_count,
        disks: disks
            .into_iter()
            .map(|d| disk_view(views, d, &volumes))
            .collect(),
        source_vm_id: vm.source_vm_id,
        template_id: vm.template_id,
        dependent_vm_ids,
        runtime,
        created_at: vm.created_at,
        updated_at: vm.updated_at,
    })
}

fn runtime_view(views: Views, vm: &Vm) -> Option<RuntimeView> {
    let runtime = &vm.runtime;
    if runtime.qmp_socket.is_none() && runtime.guest_agent_socket.is_none() {
        return None;
    }
    Some(RuntimeView {
        qmp_socket: runtime.qmp_socket.clone(),
        guest_agent_socket: runtime.guest_agent_socket.clone(),
        connected: runtime
            .qmp_socket
            .as_ref()
            .and_then(|_| views.live.last_contact(vm.id)),
        qemu_version: runtime.qemu_version.clone(),
        can_pause: runtime.can_pause,
    })
}

/// The VM with this id; a template is not a VM (it is under /v1/templates).
pub(crate) async fn find_vm(conn: &mut sqlx::SqliteConnection, id: &str) -> Result<Vm> {
    let id = parse_id(id, ErrorCode::VmNotFound, "VM")?;
    match store::vms::get_vm(conn, id).await? {
        Some(vm) if vm.kind == VmKind::Vm => Ok(vm),
        Some(_) => Err(Error::problem(
            ErrorCode::VmNotFound,
            format!("{id} is a template, not a VM: see /v1/templates/{id}"),
        )),
        None => Err(Error::problem(
            ErrorCode::VmNotFound,
            format!("VM {id} does not exist"),
        )),
    }
}

async fn find_disk(conn: &mut sqlx::SqliteConnection, vm: &Vm, id: &str) -> Result<Disk> {
    let id = parse_id(id, ErrorCode::DiskNotFound, "disk")?;
    match store::vms::get_disk(conn, id).await? {
        Some(disk) if disk.vm_id == vm.id => Ok(disk),
        _ => Err(Error::problem(
            ErrorCode::DiskNotFound,
            format!("VM {} has no disk {id}", vm.name),
        )),
    }
}

fn validate_disks(disks: &[NewDisk], max: u64) -> Result<()> {
    let mut names = HashSet::new();
    for (i, disk) in disks.iter().enumerate() {
        validate::name(&format!("disks[{i}].name"), &disk.name).map_err(Error::validation)?;
        validate::disk_size(disk.size_bytes, max)
            .map_err(|m| Error::validation(format!("disks[{i}].{m}")))?;
        if !names.insert(disk.name.as_str()) {
            return Err(Error::problem(
                ErrorCode::NameTaken,
                format!("disk name {} is used twice", disk.name),
            ));
        }
    }
    Ok(())
}

problems!(CreateVmProblems = JSON_BODY, NAMED);

/// Create a VM and its disks (empty qcow2 files).
#[utoipa::path(post, path = "/v1/vms", tag = "vms", request_body = CreateVm,
    responses(
        (status = 202, description = "The VM exists with status `creating`; the job creates its disk files", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        CreateVmProblems,
    ))]
async fn create_vm(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<CreateVm>,
) -> Result<Response> {
    validate::name("name", &body.name).map_err(Error::validation)?;
    validate::description(&body.description).map_err(Error::validation)?;
    validate::labels(&body.labels).map_err(Error::validation)?;
    validate_disks(&body.disks, state.max_disk_size)?;
    let now = store::now();
    let vm = Vm {
        labels: body.labels,
        ..Vm::new(body.name, body.description, now)
    };
    let disks = body
        .disks
        .into_iter()
        .map(|disk| new_disk(vm.id, disk, now))
        .collect();
    let spec = JobSpec::VmCreate(job_spec::VmCreate { vm: vm.id });
    let records = NewRecords::Vms(vec![(vm, disks)]);
    accept_job(&state, &caller, Request::creating(spec, records)).await
}

/// A disk record as a request creates it: no file yet, the job makes it.
fn new_disk(vm: Uuid, disk: NewDisk, now: crate::domain::Timestamp) -> Disk {
    Disk {
        id: new_id(),
        vm_id: vm,
        name: disk.name,
        size_bytes: disk.size_bytes,
        status: ResourceStatus::Creating,
        active_volume_id: None,
        created_at: now,
    }
}

problems!(ListVmsProblems = PAGED);

/// List VMs in creation order.
#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(VmFilter, PageQuery),
    responses(
        (status = 200, description = "A page of VMs", body = VmList),
        ListVmsProblems,
    ))]
async fn list_vms(
    State(state): State<AppState>,
    Query(filter): Query<VmFilter>,
    Query(page_query): Query<PageQuery>,
) -> Result<Response> {
    let (limit, cursor) = page_query.parse()?;
    let mut conn = state.db.reader().await?;
    let selected = store::vms::VmPage {
        kind: VmKind::Vm,
        name: filter.name.as_deref(),
        label: filter.label()?,
        after: cursor,
        limit: limit + 1,
    };
    let ids = store::vms::list_vm_ids(&mut conn, selected).await?;
    drop(conn);
    let (ids, next_cursor) = page(ids, limit, |id| *id);
    let views = state.views();
    // A `VmList`, written from each VM's kept JSON.
    let mut body = Vec::with_capacity(64 + ids.len() * 4096);
    body.extend_from_slice(b"{\"items\":[");
    let mut first = true;
    for id in ids {
        // Gone since the page was read: left out, as if the page had been read later.
        let Some(kept) = state.read_model.kept::<VmView>("vm", id).await? else {
            continue;
        };
        if !std::mem::take(&mut first) {
            body.push(b',');
        }
        let json = state
            .read_model
            .json(&kept, |view| refresh_vm(views, view))?;
        body.extend_from_slice(&json);
    }
    body.extend_from_slice(b"],\"next_cursor\":");
    serde_json::to_writer(&mut body, &next_cursor).map_err(|e| Error::Internal(e.to_string()))?;
    body.push(b'}');
    Ok(super::json_answer(body.into()))
}

problems!(GetVmProblems = VM);

/// Get a VM with its disks and their chains.
#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms", params(("id" = Uuid, Path, description = "VM id")),
    responses(
        (status = 200, description = "The VM", body = VmView),
        GetVmProblems,
    ))]
async fn get_vm(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let vm_id = parse_id(&id, ErrorCode::VmNotFound, "VM")?;
    let views = state.views();
    if let Some(kept) = state.read_model.kept::<VmView>("vm", vm_id).await? {
        let json = state
            .read_model
            .json(&kept, |view| refresh_vm(views, view))?;
        return Ok(super::json_answer(json));
    }
    // Not a VM: which answer (none, or a template).
    let mut conn = state.db.reader().await?;
    let vm = find_vm(&mut conn, &id).await?;
    Ok(axum::Json(vm_view(views, &mut conn, vm).await?).into_response())
}

/// Bring a VM's view up to date in what changes without a write: the allocation of
/// each volume file (a guest writing) and the last contact with its monitor.
pub(crate) fn refresh_vm(views: Views, view: &mut VmView) {
    for disk in &mut view.disks {
        refresh_chain(disk);
    }
    let vm = view.id;
    if let Some(runtime) = &mut view.runtime {
        runtime.connected = runtime
            .qmp_socket
            .as_ref()
            .and_then(|_| views.live.last_contact(vm));
    }
}

/// Each volume file's allocation, as it is now.
pub(crate) fn refresh_chain(disk: &mut DiskView) {
    for entry in &mut disk.chain {
        entry.allocated_bytes = storage::shown_allocation(std::path::Path::new(&entry.path));
    }
}

problems!(PatchVmProblems = JSON_BODY, NAMED, VM; VmBusy, SocketRefused, QmpUnavailable);

/// Rename a VM, change its description, or record its power state and, while it runs,
/// the sockets of its QEMU.
#[utoipa::path(patch, path = "/v1/vms/{id}", tag = "vms", request_body = PatchVm, params(("id" = Uuid, Path, description = "VM id")),
    responses(
        (status = 200, description = "The updated VM", body = VmView),
        PatchVmProblems,
    ))]
async fn patch_vm(
    caller: Caller,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(body): Json<PatchVm>,
) -> Result<axum::Json<VmView>> {
    if let Some(name) = &body.name {
        validate::name("name", name).map_err(Error::validation)?;
    }
    if let Some(description) = &body.description {
        validate::description(description).map_err(Error::validation)?;
    }
    if let Some(labels) = &body.labels {
        validate::labels(labels).map_err(Error::validation)?;
    }
    // Checked before the write transaction: greeting a monitor may take seconds.
    let sockets = checked_sockets(&state, &id, &body).await?;
    let mut tx = state.db.begin().await?;
    tx.act_for(caller.name());
    let mut vm = find_vm(&mut tx, &id).await?;
    // A VM started, or a QEMU strata reaches another way, while jobs work on its
    // files could write a layer a job is switching away from.
    let starts = body.state == Some(VmState::Running) && vm.state != VmState::Running;
    if starts || sockets.changes_qmp(&vm) {
        refuse_while_busy(&mut tx, &vm).await?;
    }
    if let Some(name) = body.name {
        vm.name = name;
    }
    if let Some(description) = body.description {
        vm.description = description;
    }
    if let Some(labels) = body.labels {
        vm.labels = labels;
    }
    if let Some(power) = body.state {
        vm.state = power;
    }
    sockets.apply(&mut vm)?;
    vm.updated_at = store::now();
    store::vms::update_vm(&mut tx, &vm)
        .await
        .map_err(|e| name_taken(e, || format!("a VM named {} already exists", vm.name)))?;
    tx.commit().await?;
    if vm.state == VmState::Stopped {
        state.live.forget(vm.id);
    }
    let mut conn = state.db.reader().await?;
    Ok(axum::Json(vm_view(state.views(), &mut conn, vm).await?))
}

/// `vm_busy` while jobs work on the VM's files.
async fn refuse_while_busy(conn: &mut sqlx::SqliteConnection, vm: &Vm) -> Result<()> {
    let pending = store::jobs::pending_for_vm(conn, vm.id).await?;
    if pending.is_empty() {
        return Ok(());
    }
    Err(Error::with_extra(
        ErrorCode::VmBusy,
        format!(
            "VM {} has {} unfinished job(s) working on its files; wait for them before starting it or giving another QMP socket",
            vm.name,
            pending.len()
        ),
        serde_json::json!({ "job_ids": pending.iter().map(|j| j.id).collect::<Vec<_>>() }),
    ))
}

/// The sockets a PATCH gives, checked: inside `--runtime-dir`, unix sockets, and a
/// monitor that greets as QEMU's (unless it is the one already recorded).
struct GivenSockets {
    /// The monitor's socket, with its QEMU's version and whether it can pause the guest.
    qmp: Option<(String, Option<String>, Option<bool>)>,
    guest_agent: Option<String>,
}

async fn checked_sockets(state: &AppState, id: &str, body: &PatchVm) -> Result<GivenSockets> {
    let guest_agent = body
        .guest_agent_socket
        .as_deref()
        .map(|path| state.live.check_socket("guest_agent_socket", path))
        .transpose()?;
    let qmp = match body.qmp_socket.as_deref() {
        None => None,
        Some(path) => {
            let socket = state.live.check_socket("qmp_socket", path)?;
            let mut conn = state.db.reader().await?;
            let vm = find_vm(&mut conn, id).await?;
            let (version, can_pause) = if vm.runtime.qmp_socket.as_deref() == Some(socket.as_str())
            {
                (vm.runtime.qemu_version, vm.runtime.can_pause)
            } else {
                // Refused before greeting a monitor for nothing (checked again when
                // the change is written).
                refuse_while_busy(&mut conn, &vm).await?;
                drop(conn);
                let (version, can_pause) = state.live.probe_qmp(vm.id, &socket).await?;
                (Some(version), Some(can_pause))
            };
            Some((socket, version, can_pause))
        }
    };
    Ok(GivenSockets { qmp, guest_agent })
}

impl GivenSockets {
    /// Whether the request points strata at another QEMU monitor than the recorded one.
    fn changes_qmp(&self, vm: &Vm) -> bool {
        self.qmp
            .as_ref()
            .is_some_and(|(socket, _, _)| vm.runtime.qmp_socket.as_ref() != Some(socket))
    }

    /// Record the sockets on the VM as read in the write transaction; a stopped VM
    /// has none.
    fn apply(self, vm: &mut Vm) -> Result<()> {
        let given = self.qmp.is_some() || self.guest_agent.is_some();
        if vm.state == VmState::Stopped {
            if given {
                return Err(Error::problem(
                    ErrorCode::SocketRefused,
                    format!(
                        "VM {} is stopped: give its sockets with \"state\": \"running\"",
                        vm.name
                    ),
                ));
            }
            vm.runtime = Default::default();
            return Ok(());
        }
        if let Some((socket, version, can_pause)) = self.qmp {
            vm.runtime.qmp_socket = Some(socket);
            vm.runtime.qemu_version = version;
            vm.runtime.can_pause = can_pause;
        }
        if let Some(socket) = self.guest_agent {
            vm.runtime.guest_agent_socket = Some(socket);
        }
        Ok(())
    }
}

problems!(DeleteVmProblems = VM, CHAIN_JOB, READ_BY_CLONES);

/// Delete a VM with all its disks, snapshots and files.
#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms", params(("id" = Uuid, Path, description = "VM id"), super::FlattenQuery),
    responses(
        (status = 202, description = "The VM is `deleting`; the job removes its files and records", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        DeleteVmProblems,
    ))]
async fn delete_vm(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<super::FlattenQuery>,
) -> Result<Response> {
    let vm = find_vm(&mut *state.db.reader().await?, &id).await?;
    let spec = JobSpec::VmDelete(job_spec::VmDelete {
        vm: vm.id,
        previous_status: vm.status,
        flatten: query.flatten(),
    });
    accept_job(&state, &caller, Request::new(spec)).await
}

problems!(ListDisksProblems = PAGED, VM);

/// List a VM's disks in creation order.
#[utoipa::path(get, path = "/v1/vms/{id}/disks", tag = "vms", params(("id" = Uuid, Path, description = "VM id"), PageQuery),
    responses(
        (status = 200, description = "A page of the VM's disks", body = DiskList),
        ListDisksProblems,
    ))]
async fn list_disks(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(page_query): Query<PageQuery>,
) -> Result<axum::Json<DiskList>> {
    let (limit, cursor) = page_query.parse()?;
    let mut conn = state.db.reader().await?;
    let vm = find_vm(&mut conn, &id).await?;
    // A VM has a handful of disks: page over the full list rather than in SQL.
    let disks = store::vms::list_disks(&mut conn, vm.id).await?;
    let volumes = store::vms::list_volumes(&mut conn, vm.id).await?;
    let rows: Vec<Disk> = disks
        .into_iter()
        .filter(|d| cursor.is_none_or(|c| d.id > c))
        .take(limit as usize + 1)
        .collect();
    let (rows, next_cursor) = page(rows, limit, |d| d.id);
    let items = rows
        .into_iter()
        .map(|d| disk_view(state.views(), d, &volumes))
        .collect();
    Ok(axum::Json(DiskList { items, next_cursor }))
}

problems!(CreateDiskProblems = JSON_BODY, NAMED, VM; VmNotReady);

/// Add a disk (an empty qcow2 file) to a VM.
#[utoipa::path(post, path = "/v1/vms/{id}/disks", tag = "vms", request_body = NewDisk, params(("id" = Uuid, Path, description = "VM id")),
    responses(
        (status = 202, description = "The disk exists with status `creating`", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        CreateDiskProblems,
    ))]
async fn create_disk(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<NewDisk>,
) -> Result<Response> {
    validate_disks(std::slice::from_ref(&body), state.max_disk_size)?;
    let vm = find_vm(&mut *state.db.reader().await?, &id).await?;
    let disk = new_disk(vm.id, body, store::now());
    let spec = JobSpec::DiskCreate(job_spec::DiskCreate {
        vm: vm.id,
        disk: disk.id,
    });
    accept_job(
        &state,
        &caller,
        Request::creating(spec, NewRecords::Disk(disk)),
    )
    .await
}

problems!(GetDiskProblems = DISK);

/// Get one disk with its chain.
#[utoipa::path(get, path = "/v1/vms/{vm_id}/disks/{disk_id}", tag = "vms",
    params(("vm_id" = Uuid, Path, description = "VM id"), ("disk_id" = Uuid, Path, description = "Disk id")),
    responses(
        (status = 200, description = "The disk", body = DiskView),
        GetDiskProblems,
    ))]
async fn get_disk(
    State(state): State<AppState>,
    Path((vm_id, disk_id)): Path<(String, String)>,
) -> Result<axum::Json<DiskView>> {
    let mut conn = state.db.reader().await?;
    let vm = find_vm(&mut conn, &vm_id).await?;
    let disk = find_disk(&mut conn, &vm, &disk_id).await?;
    let volumes = store::vms::list_volumes(&mut conn, vm.id).await?;
    Ok(axum::Json(disk_view(state.views(), disk, &volumes)))
}

problems!(DeleteDiskProblems = DISK, CHAIN_JOB; DiskNotReady);

/// Remove a disk, its layers in every snapshot, and its files.
#[utoipa::path(delete, path = "/v1/vms/{vm_id}/disks/{disk_id}", tag = "vms",
    params(("vm_id" = Uuid, Path, description = "VM id"), ("disk_id" = Uuid, Path, description = "Disk id")),
    responses(
        (status = 202, description = "The disk is `deleting`", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        DeleteDiskProblems,
    ))]
async fn delete_disk(
    State(state): State<AppState>,
    caller: Caller,
    Path((vm_id, disk_id)): Path<(String, String)>,
) -> Result<Response> {
    let (vm, disk) = find_vm_disk(&state, &vm_id, &disk_id).await?;
    let spec = JobSpec::DiskDelete(job_spec::DiskDelete {
        vm: vm.id,
        disk: disk.id,
        previous_status: disk.status,
    });
    accept_job(&state, &caller, Request::new(spec)).await
}

/// The VM and its disk a path names (404 otherwise).
pub(crate) async fn find_vm_disk(
    state: &AppState,
    vm_id: &str,
    disk_id: &str,
) -> Result<(Vm, Disk)> {
    let mut conn = state.db.reader().await?;
    let vm = find_vm(&mut conn, vm_id).await?;
    let disk = find_disk(&mut conn, &vm, disk_id).await?;
    Ok((vm, disk))
}

problems!(ResizeDiskProblems = JSON_BODY, DISK, CHAIN_JOB; DiskShrinkRefused, DiskNotReady);

/// Grow a disk. Only the writable top grows; snapshots keep the size they had, and a
/// revert restores it. A running VM's disk grows through its QEMU (`block_resize`),
/// which needs its QMP socket; QEMU refusing fails the job (`qemu_failed`).
#[utoipa::path(post, path = "/v1/vms/{vm_id}/disks/{disk_id}/resize", tag = "vms", request_body = ResizeDisk,
    params(("vm_id" = Uuid, Path, description = "VM id"), ("disk_id" = Uuid, Path, description = "Disk id")),
    responses(
        (status = 202, description = "The disk grows when the job runs", body = super::jobs::JobView,
            headers(("Location" = String, description = "/v1/jobs/{id}"))),
        ResizeDiskProblems,
    ))]
async fn resize_disk(
    State(state): State<AppState>,
    caller: Caller,
    Path((vm_id, disk_id)): Path<(String, String)>,
    Json(body): Json<ResizeDisk>,
) -> Result<Response> {
    validate::disk_size(body.size_bytes, state.max_disk_size).map_err(Error::validation)?;
    let (vm, disk) = find_vm_disk(&state, &vm_id, &disk_id).await?;
    let spec = JobSpec::DiskResize(job_spec::DiskResize {
        vm: vm.id,
        disk: disk.id,
        size_bytes: body.size_bytes,
        previous_status: disk.status,
    });
    accept_job(&state, &caller, Request::new(spec)).await
}
