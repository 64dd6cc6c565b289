//! What each kind of job plans, and how a job that never started is unwound. The
//! chain logic itself lives in `domain::plan`; this file loads the state it needs,
//! re-checks the preconditions at run time (the VM may have changed since the request)
//! and measures files and free space.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::requests::require_stopped;
use super::{Engine, storage};
use crate::domain::image::ImageFormat;
use crate::domain::plan::{self, CloneMode, DiskGraph, MetaOp, Plan};
use crate::domain::{Job, JobKind, ResourceStatus, Uuid, Vm, VmKind, VmState};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

/// Plan a job from the current state, when it runs.
pub async fn plan(engine: &Arc<Engine>, job: &Job) -> Result<Plan> {
    let vm_id = job
        .vm_id
        .ok_or_else(|| Error::Internal(format!("job {} has no VM", job.id)))?;
    plan_now(
        engine,
        kind_request(job.kind, vm_id, job.target_id, &job.params),
        Some(job.seq),
    )
    .await
}

/// Compute the plan a job of `kind` would follow now, refusing with a problem when the
/// VM's state or the free space does not allow it (handlers call it to refuse early).
/// Touches no file.
pub async fn preflight(
    engine: &Engine,
    kind: JobKind,
    vm_id: Uuid,
    target: Uuid,
    params: &Value,
) -> Result<Plan> {
    plan_now(engine, kind_request(kind, vm_id, target, params), None).await
}

/// What is planned: the job's kind, VM, target and parameters.
struct Request<'a> {
    kind: JobKind,
    vm_id: Uuid,
    target: Uuid,
    params: &'a Value,
}

fn kind_request(kind: JobKind, vm_id: Uuid, target: Uuid, params: &Value) -> Request<'_> {
    Request {
        kind,
        vm_id,
        target,
        params,
    }
}

/// `accepted_before`: the planning job's own place in the queue. Linked clones
/// accepted before it read the VM's layers as soon as they run (they run first), so
/// they count as readers already; those accepted after it do not.
async fn plan_now(
    engine: &Engine,
    request: Request<'_>,
    accepted_before: Option<i64>,
) -> Result<Plan> {
    // One read transaction: the plan is made from one committed state.
    let mut conn = engine.db.read_tx().await?;
    let plan = plan_in(engine, &mut conn, request, accepted_before).await;
    conn.finish().await;
    plan
}

async fn plan_in(
    engine: &Engine,
    conn: &mut sqlx::SqliteConnection,
    request: Request<'_>,
    accepted_before: Option<i64>,
) -> Result<Plan> {
    let Request {
        kind,
        vm_id,
        target,
        params,
    } = request;
    let vm = store::vms::get_vm(conn, vm_id).await?.ok_or_else(|| {
        Error::problem(ErrorCode::VmNotFound, format!("VM {vm_id} does not exist"))
    })?;
    let mut graphs = store::vms::disk_graphs(conn, vm_id).await?;
    storage::measure(&engine.config.volumes_dir, &mut graphs);
    let pending_clones =
        count_pending_linked_clones(conn, vm_id, &mut graphs, accepted_before).await?;
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
            let disks = store::vms::list_disks(conn, vm_id).await?;
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
            let disk = store::vms::get_disk(conn, target).await?.ok_or_else(|| {
                Error::problem(
                    ErrorCode::DiskNotFound,
                    format!("disk {target} does not exist"),
                )
            })?;
            plan::plan_create_disks(vm_id, &[(disk.id, disk.size_bytes)], false)
        }
        JobKind::DiskDelete => {
            require_stopped(&vm, "delete one of its disks")?;
            // A disk whose creation failed has no files, only its record to remove.
            let graph = disk_graph(&graphs).unwrap_or(DiskGraph {
                disk_id: target,
                size_bytes: 0,
                volumes: Vec::new(),
            });
            plan::plan_delete_disks(vm_id, &[graph], false, previous_status(params))
        }
        JobKind::DiskResize => {
            require_stopped(&vm, "resize one of its disks")?;
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
            require_stopped(&vm, "delete it")?;
            plan::plan_delete_disks(vm_id, &graphs, true, previous_status(params))
        }
        JobKind::SnapshotCreate => {
            require_stopped(&vm, "take an offline snapshot of it")?;
            if graphs.is_empty() {
                return Err(Error::problem(
                    ErrorCode::VmHasNoDisks,
                    "a snapshot needs at least one disk",
                ));
            }
            plan::plan_snapshot_create(vm_id, target, vm.current_snapshot_id, &graphs)?
        }
        JobKind::SnapshotRevert => {
            require_stopped(&vm, "revert it")?;
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
        JobKind::VmClone | JobKind::TemplateCreate | JobKind::TemplateDeploy => {
            clone_plan(engine, conn, &vm, &graphs, params).await?
        }
        JobKind::DiskFlatten => {
            require_stopped(&vm, "flatten one of its disks")?;
            refuse_if_readers_running(conn, &vm).await?;
            let disk = disk_graph(&graphs)?;
            let copy_bytes = links_bytes(engine, conn, &disk).await?;
            plan::plan_flatten(&disk, copy_bytes).ok_or_else(|| {
                Error::problem(
                    ErrorCode::DiskNotLinked,
                    format!(
                        "disk {target} is not a linked clone: it has no source to cut loose from"
                    ),
                )
            })?
        }
        JobKind::TemplateImport => {
            let upload: Uuid = params["upload"]
                .as_str()
                .and_then(|u| u.parse().ok())
                .ok_or_else(|| Error::Internal("import job without upload".into()))?;
            let format: ImageFormat = serde_json::from_value(params["format"].clone())
                .map_err(|e| Error::Internal(format!("import job format: {e}")))?;
            let disk = store::vms::list_disks(conn, vm_id)
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| Error::Internal("import template without a disk".into()))?;
            let upload_bytes =
                storage::allocated_bytes(&storage::upload_path(&engine.config.volumes_dir, upload));
            plan::plan_import(
                vm_id,
                disk.id,
                disk.size_bytes,
                upload,
                format,
                upload_bytes,
            )
        }
        JobKind::VmToTemplate => {
            require_stopped(&vm, "convert it to a template")?;
            let snapshots = listed_snapshots(conn, vm_id, params).await?;
            let mut plan = plan::plan_delete_all_snapshots(vm_id, &snapshots, &graphs)?;
            let ready = MetaOp::SetVmStatus {
                vm: vm_id,
                status: ResourceStatus::Ready,
            };
            plan.finish.extend([
                MetaOp::SetVmKind {
                    vm: vm_id,
                    kind: VmKind::Template,
                },
                ready.clone(),
            ]);
            // Stopped early or failed, it stays a VM, usable again (the request set it
            // `creating`).
            plan.undo.push(ready.clone());
            plan.fail.push(ready);
            plan
        }
        JobKind::TemplateToVm => {
            // The template's volumes become writable again: nothing may read them.
            let readers: Vec<Uuid> = graphs
                .iter()
                .flat_map(|g| g.volumes.iter().flat_map(|v| v.dependents.iter().copied()))
                .collect();
            if !readers.is_empty() {
                return Err(dependents_problem(conn, &readers).await?);
            }
            let ready = MetaOp::SetVmStatus {
                vm: vm_id,
                status: ResourceStatus::Ready,
            };
            Plan {
                finish: vec![
                    MetaOp::SetVmKind {
                        vm: vm_id,
                        kind: VmKind::Vm,
                    },
                    ready.clone(),
                ],
                undo: vec![ready.clone()],
                fail: vec![ready],
                ..Plan::default()
            }
        }
        JobKind::SnapshotDeleteAll => {
            let snapshots = listed_snapshots(conn, vm_id, params).await?;
            let plan = plan::plan_delete_all_snapshots(vm_id, &snapshots, &graphs)?;
            refuse_merge_while_running(&vm, &plan, &graphs)?;
            plan
        }
    };
    let plan = match kind {
        JobKind::VmDelete | JobKind::DiskDelete | JobKind::DiskFlatten => {
            drop_unread_source_layers(conn, plan, &graphs, kind, vm_id, target).await?
        }
        _ => plan,
    };
    let plan = if params["flatten_dependents"].as_bool() == Some(true) {
        // Only the clones the job locked when it was accepted may be flattened; one
        // linked since (by a clone queued earlier) is not, and makes the job refuse.
        let locked: Option<Vec<Uuid>> = params["locked_vms"].as_array().map(|vms| {
            vms.iter()
                .filter_map(|v| v.as_str()?.parse().ok())
                .collect()
        });
        let (mut plan, flattened) =
            flatten_dependents_first(engine, conn, plan, &graphs, locked.as_deref()).await?;
        // A shared layer only the flattened clones read goes too.
        for graph in &graphs {
            plan.drop_unread_shared_layers(graph, &flattened);
        }
        plan
    } else {
        plan
    };
    // Whatever layer of this VM the plan, or an earlier job that stopped halfway,
    // leaves unread goes with it (pending linked clones count as readers: they were
    // added to the graphs above).
    let mut plan = plan;
    for graph in &graphs {
        plan.drop_unread_shared_layers(graph, &[]);
    }
    refuse_endangering_dependents(conn, &plan, &graphs, &pending_clones).await?;
    check_space(engine, &plan)?;
    Ok(plan)
}

/// `?flatten_dependents=true`: before the plan rewrites or removes files linked clones
/// read, make each of those clones' linked disks standalone (stream the shared data in,
/// cut the link). The clones must be stopped; their bytes never change. Returns the
/// plan, which no longer endangers anyone (the caller checks it again), and the clones
/// it flattens.
async fn flatten_dependents_first(
    engine: &Engine,
    conn: &mut sqlx::SqliteConnection,
    plan: Plan,
    graphs: &[DiskGraph],
    locked: Option<&[Uuid]>,
) -> Result<(Plan, Vec<Uuid>)> {
    let endangered = plan.endangered_dependents(graphs);
    if endangered.is_empty() {
        return Ok((plan, Vec::new()));
    }
    let ours = volume_ids(graphs);
    let mut flatten = Plan::default();
    let mut flattened = Vec::new();
    for dependent in endangered {
        if locked.is_some_and(|locked| !locked.contains(&dependent)) {
            continue;
        }
        flattened.push(dependent);
        let vm = store::vms::get_vm(conn, dependent)
            .await?
            .ok_or_else(|| Error::Internal(format!("dependent VM {dependent} vanished")))?;
        require_stopped(&vm, "flatten its linked disks")?;
        refuse_if_readers_running(conn, &vm).await?;
        if vm.kind == VmKind::Template {
            // Its exports were made from the linked file: a new generation.
            flatten.finish.push(MetaOp::TouchVm { vm: vm.id });
        }
        for disk in store::vms::disk_graphs(conn, dependent).await? {
            if !disk.link_sources().iter().any(|s| ours.contains(s)) {
                continue;
            }
            let copy_bytes = links_bytes(engine, conn, &disk).await?;
            if let Some(part) = plan::plan_flatten(&disk, copy_bytes) {
                flatten.steps.extend(part.steps);
                flatten.space_needed += part.space_needed;
            }
        }
    }
    // The flattened links are gone once those steps ran: the plan's own steps follow.
    let mut plan = plan;
    flatten.steps.append(&mut plan.steps);
    plan.steps = flatten.steps;
    plan.finish.extend(flatten.finish);
    plan.space_needed += flatten.space_needed;
    Ok((plan, flattened))
}

/// Add, as readers of the layers they will sit on, the VMs of linked clones and
/// deploys from this VM that were accepted (before `accepted_before`, if given) but
/// have not run yet: a request that would rewrite or remove those layers is refused
/// now (`has_dependents`), not accepted and failed once the clone exists. Returns
/// those VMs.
async fn count_pending_linked_clones(
    conn: &mut sqlx::SqliteConnection,
    vm_id: Uuid,
    graphs: &mut [DiskGraph],
    accepted_before: Option<i64>,
) -> Result<HashSet<Uuid>> {
    let mut pending = HashSet::new();
    for job in store::jobs::pending_for_vm(conn, vm_id).await? {
        let clones = matches!(job.kind, JobKind::VmClone | JobKind::TemplateDeploy);
        if !clones || job.vm_id != Some(vm_id) || accepted_before.is_some_and(|seq| job.seq >= seq)
        {
            continue;
        }
        let request: CloneParams = serde_json::from_value(job.params.clone())
            .map_err(|e| Error::Internal(format!("bad clone parameters: {e}")))?;
        if request.mode != CloneMode::Linked {
            continue;
        }
        for target in &request.vms {
            for (_, source_disk) in &target.disks {
                let Some(graph) = graphs.iter_mut().find(|g| g.disk_id == *source_disk) else {
                    continue;
                };
                let start = match request.snapshot_id {
                    Some(snapshot) => graph.frozen_by(snapshot).map(|v| v.id),
                    None => graph.active().map(|v| v.id),
                };
                if let Some(volume) =
                    start.and_then(|id| graph.volumes.iter_mut().find(|v| v.id == id))
                    && !volume.dependents.contains(&target.id)
                {
                    volume.dependents.push(target.id);
                    pending.insert(target.id);
                }
            }
        }
    }
    Ok(pending)
}

/// A linked clone's disk that is deleted or flattened stops reading the source layer
/// it sat on. When that was a shared layer (the source's present, frozen for the
/// clone) and nothing else reads it, it goes too, once this job's records are
/// committed: its file would otherwise stay for good, shown by no view. Nothing can
/// start reading it meanwhile: clones start from snapshots and present states, never
/// from a shared layer.
async fn drop_unread_source_layers(
    conn: &mut sqlx::SqliteConnection,
    mut plan: Plan,
    graphs: &[DiskGraph],
    kind: JobKind,
    vm_id: Uuid,
    target: Uuid,
) -> Result<Plan> {
    let (leaving, staying): (Vec<&DiskGraph>, Vec<&DiskGraph>) = graphs
        .iter()
        .partition(|g| kind == JobKind::VmDelete || g.disk_id == target);
    // Every link of the leaving disks is cut (removed, or streamed standalone); the VM
    // stops reading a source disk unless one of its other disks still links into it.
    let still_read: HashSet<Uuid> = staying.iter().flat_map(|g| g.link_sources()).collect();
    let mut done: HashSet<Uuid> = HashSet::new();
    for source in leaving.iter().flat_map(|g| g.link_sources()) {
        let Some(owner) = store::vms::volume_owner(conn, source).await? else {
            continue;
        };
        let source_graphs = store::vms::disk_graphs(conn, owner.id).await?;
        let Some(source_disk) = source_graphs.iter().find(|g| g.get(source).is_some()) else {
            continue;
        };
        if !done.insert(source_disk.disk_id)
            || source_disk
                .volumes
                .iter()
                .any(|v| still_read.contains(&v.id))
        {
            continue;
        }
        plan.drop_unread_shared_layers(source_disk, &[vm_id]);
    }
    Ok(plan)
}

/// Upper bound of what flattening `disk` copies: each link streams in the whole source
/// chain it reads.
async fn links_bytes(
    engine: &Engine,
    conn: &mut sqlx::SqliteConnection,
    disk: &DiskGraph,
) -> Result<u64> {
    let mut bytes = 0;
    for source in disk.links().iter().filter_map(|link| link.parent) {
        bytes += storage::chain_bytes(&engine.config.volumes_dir, conn, source).await?;
    }
    Ok(bytes)
}

/// Flattening rewrites a disk's lowest layer, which linked clones of *that* VM read
/// too: refuse while one of them runs (its hypervisor holds the file open).
async fn refuse_if_readers_running(conn: &mut sqlx::SqliteConnection, vm: &Vm) -> Result<()> {
    for (_, reader) in store::vms::dependents_of(conn, vm.id).await? {
        if let Some(reader) = store::vms::get_vm(conn, reader).await?
            && reader.state == VmState::Running
        {
            return Err(Error::problem(
                ErrorCode::VmRunning,
                format!(
                    "VM {} reads the files of {} and is running; stop it first",
                    reader.name, vm.name
                ),
            ));
        }
    }
    Ok(())
}

/// What a clone, deploy or template copy makes: for each new VM, its new disks and the
/// source disk each starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneParams {
    pub mode: CloneMode,
    /// Start from this snapshot of the source; without one, from its present state.
    pub snapshot_id: Option<Uuid>,
    pub vms: Vec<CloneTarget>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneTarget {
    pub id: Uuid,
    /// (new disk, source disk)
    pub disks: Vec<(Uuid, Uuid)>,
}

/// Plan a clone: resolve each source disk to the layer the clone starts from (the
/// snapshot's frozen layer, the template's volume, or the present state, frozen first
/// for a linked clone of a VM) and measure what a full copy writes.
async fn clone_plan(
    engine: &Engine,
    conn: &mut sqlx::SqliteConnection,
    source: &Vm,
    graphs: &[DiskGraph],
    params: &Value,
) -> Result<Plan> {
    let request: CloneParams = serde_json::from_value(params.clone())
        .map_err(|e| Error::Internal(format!("bad clone parameters: {e}")))?;
    let snapshot = match request.snapshot_id {
        Some(id) => {
            let snapshot = store::snapshots::get(conn, id)
                .await?
                .filter(|s| s.vm_id == source.id)
                .ok_or_else(|| {
                    Error::problem(
                        ErrorCode::SnapshotNotFound,
                        format!("snapshot {id} of VM {} does not exist", source.name),
                    )
                })?;
            if snapshot.status != ResourceStatus::Ready {
                return Err(Error::problem(
                    ErrorCode::SnapshotNotReady,
                    format!("snapshot {} is {}", snapshot.name, snapshot.status),
                ));
            }
            Some(snapshot)
        }
        None => None,
    };
    // A template's volumes never change, so clones start from them directly; a VM's
    // present state is frozen first, like a snapshot taken for the purpose (it must be
    // stopped, as for a snapshot).
    let freeze_present = snapshot.is_none() && source.kind == VmKind::Vm;
    if snapshot.is_none() && source.kind == VmKind::Vm {
        require_stopped(source, "clone its present state")?;
    }
    let mut freeze = Vec::new();
    let mut starts: HashMap<Uuid, (Uuid, u64)> = HashMap::new();
    for graph in graphs {
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
    let mut new_vms = Vec::with_capacity(request.vms.len());
    for target in &request.vms {
        let mut disks = Vec::with_capacity(target.disks.len());
        for (disk, source_disk) in &target.disks {
            let Some(&(start, size_bytes)) = starts.get(source_disk) else {
                // Checked when the request comes: a disk a job queued before the clone
                // is still adding has nothing to start from yet, but will have when
                // the clone runs (jobs of a VM run in order).
                let adding = store::vms::get_disk(conn, *source_disk)
                    .await?
                    .is_some_and(|d| d.status == ResourceStatus::Creating);
                if adding {
                    continue;
                }
                return Err(Error::problem(
                    ErrorCode::DiskNotFound,
                    format!(
                        "source disk {source_disk} is gone (deleted, or its creation failed, since the request)"
                    ),
                ));
            };
            let copy_bytes = match request.mode {
                CloneMode::Linked => 0,
                CloneMode::Full => {
                    storage::chain_bytes(&engine.config.volumes_dir, conn, start).await?
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
    Ok(plan::plan_clone(&new_vms, request.mode, &freeze))
}

fn volume_ids(graphs: &[DiskGraph]) -> std::collections::HashSet<Uuid> {
    graphs
        .iter()
        .flat_map(|g| g.volumes.iter().map(|v| v.id))
        .collect()
}

/// Refuse a plan that would rewrite or remove a file linked clones read (or will read:
/// `pending`, accepted but not made yet), naming them.
async fn refuse_endangering_dependents(
    conn: &mut sqlx::SqliteConnection,
    plan: &Plan,
    graphs: &[DiskGraph],
    pending: &HashSet<Uuid>,
) -> Result<()> {
    // Links the plan itself cuts first (flattened dependents) protect nothing any more.
    let cut: std::collections::HashSet<Uuid> = plan
        .steps
        .iter()
        .filter_map(|s| match s.op {
            plan::FileOp::Stream {
                volume,
                backing: None,
                ..
            } => Some(volume),
            _ => None,
        })
        .collect();
    let ours = volume_ids(graphs);
    let mut endangered = Vec::new();
    for vm in plan.endangered_dependents(graphs) {
        let still_linked = store::vms::disk_graphs(conn, vm).await?.iter().any(|disk| {
            disk.links().iter().any(|link| {
                link.parent.is_some_and(|p| ours.contains(&p)) && !cut.contains(&link.id)
            })
        });
        if still_linked || pending.contains(&vm) {
            endangered.push(vm);
        }
    }
    if endangered.is_empty() {
        return Ok(());
    }
    Err(dependents_problem(conn, &endangered).await?)
}

/// `has_dependents`, naming the VMs (id and name) whose disks read the files.
pub async fn dependents_problem(conn: &mut sqlx::SqliteConnection, vms: &[Uuid]) -> Result<Error> {
    let mut vms = vms.to_vec();
    vms.sort();
    vms.dedup();
    let mut named = Vec::with_capacity(vms.len());
    for id in &vms {
        let name = store::vms::get_vm(conn, *id)
            .await?
            .map(|vm| vm.name)
            .unwrap_or_default();
        named.push(serde_json::json!({ "id": id, "name": name }));
    }
    let names: Vec<&str> = named.iter().filter_map(|v| v["name"].as_str()).collect();
    Ok(Error::with_extra(
        ErrorCode::HasDependents,
        format!(
            "linked clones read these files: {}; delete or flatten them first (or pass flatten_dependents=true where offered)",
            names.join(", ")
        ),
        serde_json::json!({ "dependent_vms": named }),
    ))
}

/// The snapshots a delete-all (or a conversion to template) collapses: exactly those
/// its request saw and flagged; if the tree changed since, collapsing it would take
/// more than was asked, so the job is refused.
async fn listed_snapshots(
    conn: &mut sqlx::SqliteConnection,
    vm_id: Uuid,
    params: &Value,
) -> Result<Vec<(Uuid, ResourceStatus)>> {
    let current: Vec<(Uuid, ResourceStatus)> = store::snapshots::list(conn, vm_id, None, u32::MAX)
        .await?
        .iter()
        // A snapshot still being created (queued after this job) has no layer yet
        // and is taken after the collapse.
        .filter(|s| s.status != ResourceStatus::Creating)
        .map(|s| (s.id, s.status))
        .collect();
    let Some(listed) = params["snapshots"].as_array() else {
        return Ok(current);
    };
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
    Ok(listed)
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

/// Refuse before any file changes when the plan would not fit: a copy must also leave
/// the reserve (so there is always room to merge and free space later); new empty
/// files (snapshots, reverts) need only their own few KiB. A plan that only removes
/// files is never refused: it is how space comes back.
fn check_space(engine: &Engine, plan: &Plan) -> Result<()> {
    let reserve = if plan.copies_data() {
        engine.config.reserved_bytes
    } else {
        0
    };
    engine.require_free_space(plan.space_needed, reserve)
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
        JobKind::SnapshotDeleteAll => restore_listed_snapshots(&job.params),
        JobKind::SnapshotRevert | JobKind::DiskFlatten => vec![],
        JobKind::TemplateImport => vec![MetaOp::DeleteVm { vm }],
        JobKind::VmClone | JobKind::TemplateCreate | JobKind::TemplateDeploy => {
            let params: CloneParams = serde_json::from_value(job.params.clone())
                .map_err(|e| Error::Internal(format!("bad clone parameters: {e}")))?;
            params
                .vms
                .iter()
                .map(|target| MetaOp::DeleteVm { vm: target.id })
                .collect()
        }
        JobKind::VmToTemplate => {
            let mut ops = restore_listed_snapshots(&job.params);
            ops.push(MetaOp::SetVmStatus {
                vm,
                status: ResourceStatus::Ready,
            });
            ops
        }
        JobKind::TemplateToVm => vec![MetaOp::SetVmStatus {
            vm,
            status: ResourceStatus::Ready,
        }],
    })
}

/// Put back the statuses of the snapshots a collapse request flagged `deleting`.
fn restore_listed_snapshots(params: &Value) -> Vec<MetaOp> {
    params["snapshots"]
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
        .collect()
}
