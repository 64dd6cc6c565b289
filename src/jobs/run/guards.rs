//! Checks several job kinds share, when a request is accepted and again when its job
//! runs: the state a VM, disk or snapshot must be in, and the linked clones that read a
//! VM's files.

use std::collections::HashSet;

use sqlx::SqliteConnection;

use crate::domain::job_spec::ListedSnapshot;
use crate::domain::plan::{self, CloneMode, DiskGraph, MetaOp, Plan};
use crate::domain::{
    Consistency, Disk, JobKind, JobSpec, Quiesce, ResourceStatus, Snapshot, Uuid, Vm, VmKind,
    VmState,
};
use crate::error::{Error, ErrorCode, Result};
use crate::store;

/// "VM" or "template", for messages about either.
pub fn noun(vm: &Vm) -> &'static str {
    match vm.kind {
        VmKind::Vm => "VM",
        VmKind::Template => "template",
    }
}

/// Settle the consistency a live snapshot or clone of `vm` left open, from the VM as
/// it is now: `filesystem` by default when strata can reach a guest agent, and then
/// `best_effort` by default. A freeze that is required but cannot even be tried is
/// refused now, not failed later.
pub fn decide_consistency(
    vm: &Vm,
    consistency: &mut Option<Consistency>,
    quiesce: &mut Option<Quiesce>,
) -> Result<()> {
    if quiesce.is_some() && *consistency == Some(Consistency::Crash) {
        return Err(Error::validation(
            "quiesce applies to filesystem consistency; leave it out with consistency crash",
        ));
    }
    let agent = vm.runtime.guest_agent_socket.is_some();
    let decided = match (*consistency, *quiesce) {
        (Some(asked), _) => asked,
        (None, Some(_)) => Consistency::Filesystem,
        (None, None) if agent => Consistency::Filesystem,
        (None, None) => Consistency::Crash,
    };
    *consistency = Some(decided);
    if decided == Consistency::Filesystem {
        let policy = *quiesce.get_or_insert(Quiesce::BestEffort);
        if policy == Quiesce::Required && vm.state == VmState::Running && !agent {
            return Err(Error::problem(
                ErrorCode::GuestAgentUnavailable,
                format!(
                    "VM {} has no guest-agent socket to freeze its file systems with: give it (PATCH guest_agent_socket), or ask for quiesce best_effort or consistency crash",
                    vm.name
                ),
            ));
        }
    }
    Ok(())
}

/// Refuse work on a VM that is still being created, is going away, or failed.
pub fn require_ready(vm: &Vm) -> Result<()> {
    if vm.status != ResourceStatus::Ready {
        return Err(Error::problem(
            ErrorCode::VmNotReady,
            format!("{} {} is {}, not ready", noun(vm), vm.name, vm.status),
        ));
    }
    Ok(())
}

/// Refuse an offline operation on a running VM; `action` says what was asked.
pub fn require_stopped(vm: &Vm, action: &str) -> Result<()> {
    if vm.state == VmState::Running {
        return Err(Error::problem(
            ErrorCode::VmRunning,
            format!("VM {} is running; stop it first to {action}", vm.name),
        ));
    }
    Ok(())
}

/// A running VM is worked on live through its QEMU, which strata can only reach by the
/// QMP socket the orchestrator gave.
pub fn require_stopped_or_reachable(vm: &Vm, action: &str) -> Result<()> {
    if vm.state == VmState::Running && vm.runtime.qmp_socket.is_none() {
        return Err(Error::problem(
            ErrorCode::VmRunning,
            format!(
                "VM {} is running and strata has no QMP socket for it: stop it first, or give its QMP socket (PATCH qmp_socket, inside --runtime-dir) to {action} live",
                vm.name
            ),
        ));
    }
    Ok(())
}

/// The VM, which a request found a moment ago: gone since is a 404 all the same.
pub async fn load_vm(conn: &mut SqliteConnection, id: Uuid) -> Result<Vm> {
    store::vms::get_vm(conn, id)
        .await?
        .ok_or_else(|| Error::problem(ErrorCode::VmNotFound, format!("VM {id} does not exist")))
}

/// The disk of `vm` with this id.
pub async fn load_disk(conn: &mut SqliteConnection, vm: &Vm, id: Uuid) -> Result<Disk> {
    store::vms::get_disk(conn, id)
        .await?
        .filter(|d| d.vm_id == vm.id)
        .ok_or_else(|| {
            Error::problem(
                ErrorCode::DiskNotFound,
                format!("VM {} has no disk {id}", vm.name),
            )
        })
}

/// A snapshot and its VM.
pub async fn find_snapshot(conn: &mut SqliteConnection, id: Uuid) -> Result<(Snapshot, Vm)> {
    let not_found = || {
        Error::problem(
            ErrorCode::SnapshotNotFound,
            format!("snapshot {id} does not exist"),
        )
    };
    let snapshot = store::snapshots::get(conn, id)
        .await?
        .ok_or_else(not_found)?;
    let vm = store::vms::get_vm(conn, snapshot.vm_id)
        .await?
        .ok_or_else(not_found)?;
    Ok((snapshot, vm))
}

pub fn require_snapshot_ready(snapshot: &Snapshot) -> Result<()> {
    if snapshot.status != ResourceStatus::Ready {
        return Err(Error::problem(
            ErrorCode::SnapshotNotReady,
            format!("snapshot {} is {}", snapshot.name, snapshot.status),
        ));
    }
    Ok(())
}

/// Refuse deleting a snapshot that another job creates, deletes, reverts to or fully
/// clones.
pub async fn require_deletable(conn: &mut SqliteConnection, snapshot: &Snapshot) -> Result<()> {
    match snapshot.status {
        ResourceStatus::Ready | ResourceStatus::Error => {}
        ResourceStatus::Deleting => {
            return Err(Error::problem(
                ErrorCode::SnapshotBusy,
                format!("snapshot {} is already being deleted", snapshot.name),
            ));
        }
        status => {
            return Err(Error::problem(
                ErrorCode::SnapshotNotReady,
                format!("snapshot {} is {status}", snapshot.name),
            ));
        }
    }
    let reverts =
        store::jobs::pending_for_target(conn, snapshot.id, &[JobKind::SnapshotRevert]).await?;
    if let Some(job) = reverts.first() {
        return Err(Error::with_extra(
            ErrorCode::SnapshotBusy,
            format!(
                "a revert to snapshot {} is pending (job {})",
                snapshot.name, job.id
            ),
            serde_json::json!({ "job_ids": [job.id] }),
        ));
    }
    // A full clone accepted from this snapshot reads it when it runs; deleting it first
    // would make the clone fail after its 202. (A pending linked clone is a reader of
    // the layer and is refused as `has_dependents` by the plan check.)
    let clones: Vec<Uuid> = store::jobs::pending_for_vm(conn, snapshot.vm_id)
        .await?
        .into_iter()
        .filter(|job| match &job.spec {
            JobSpec::VmClone(c) | JobSpec::TemplateCreate(c) | JobSpec::TemplateDeploy(c) => {
                c.snapshot_id == Some(snapshot.id) && c.mode != CloneMode::Linked
            }
            _ => false,
        })
        .map(|job| job.id)
        .collect();
    if let Some(first) = clones.first() {
        return Err(Error::with_extra(
            ErrorCode::SnapshotBusy,
            format!(
                "a clone of snapshot {} is pending (job {first}); delete it once the clone is made",
                snapshot.name
            ),
            serde_json::json!({ "job_ids": clones }),
        ));
    }
    Ok(())
}

/// Check every snapshot of `vm` can go in a collapse (delete-all, conversion to a
/// template): the list the job records, and the flags that mark them `deleting`.
pub async fn list_all_for_collapse(
    conn: &mut SqliteConnection,
    vm: Uuid,
) -> Result<(Vec<ListedSnapshot>, Vec<MetaOp>)> {
    let snapshots = store::snapshots::list(conn, vm, None, u32::MAX).await?;
    let mut listed = Vec::with_capacity(snapshots.len());
    let mut flags = Vec::with_capacity(snapshots.len());
    for snapshot in &snapshots {
        require_deletable(conn, snapshot).await?;
        listed.push(ListedSnapshot {
            id: snapshot.id,
            previous_status: snapshot.status,
        });
        flags.push(MetaOp::SetSnapshotStatus {
            snapshot: snapshot.id,
            status: ResourceStatus::Deleting,
        });
    }
    Ok((listed, flags))
}

/// The snapshots a collapse removes: exactly those its request saw and flagged; if the
/// tree changed since, collapsing it would take more than was asked, so it is refused.
pub async fn listed_snapshots(
    conn: &mut SqliteConnection,
    vm: Uuid,
    listed: &[ListedSnapshot],
) -> Result<Vec<(Uuid, ResourceStatus)>> {
    let mut current: Vec<Uuid> = store::snapshots::list(conn, vm, None, u32::MAX)
        .await?
        .iter()
        // A snapshot still being created (queued after this job) has no layer yet
        // and is taken after the collapse.
        .filter(|s| s.status != ResourceStatus::Creating)
        .map(|s| s.id)
        .collect();
    let mut asked: Vec<Uuid> = listed.iter().map(|s| s.id).collect();
    current.sort();
    asked.sort();
    if asked != current {
        return Err(Error::problem(
            ErrorCode::SnapshotBusy,
            "the VM's snapshots changed since the request; ask again to delete the current set",
        ));
    }
    Ok(listed.iter().map(|s| (s.id, s.previous_status)).collect())
}

/// Put back the statuses of the snapshots a collapse request flagged `deleting`.
pub fn restore_listed(listed: &[ListedSnapshot]) -> Vec<MetaOp> {
    listed
        .iter()
        .map(|s| MetaOp::SetSnapshotStatus {
            snapshot: s.id,
            status: s.previous_status,
        })
        .collect()
}

/// Whether merges on `vm` run inside its QEMU: it runs, and strata can reach its
/// monitor.
pub fn merges_live(vm: &Vm) -> bool {
    vm.state == VmState::Running && vm.runtime.qmp_socket.is_some()
}

/// A merge may run beside a running guest only if QEMU does every part of it that
/// touches a file QEMU has open (a live plan), or if it leaves those files alone (e.g.
/// dropping a layer on another branch).
pub fn refuse_merge_while_running(vm: &Vm, plan: &Plan, graphs: &[DiskGraph]) -> Result<()> {
    if vm.state != VmState::Running {
        return Ok(());
    }
    if merges_live(vm) {
        // Never reached: `go_live` hands QEMU every step on an open file. Refused
        // rather than run a writing qemu-img under a running guest.
        if plan.writes_offline_into_active_chains(graphs) {
            return Err(Error::problem(
                ErrorCode::VmRunning,
                format!(
                    "this deletion would rewrite a file VM {} is running on outside its QEMU; stop the VM first",
                    vm.name
                ),
            ));
        }
        return Ok(());
    }
    if plan.touches_active_chains(graphs) {
        return Err(Error::problem(
            ErrorCode::VmRunning,
            format!(
                "deleting this snapshot merges layers VM {} is running on: stop the VM first, or give its QMP socket (PATCH qmp_socket, inside --runtime-dir) to merge them live",
                vm.name
            ),
        ));
    }
    Ok(())
}

/// The VMs with linked disks on `vm`'s files (which a flattening job locks).
pub async fn dependent_vms(conn: &mut SqliteConnection, vm: Uuid) -> Result<Vec<Uuid>> {
    let mut vms: Vec<Uuid> = store::vms::dependents_of(conn, vm)
        .await?
        .into_iter()
        .map(|(_, dependent)| dependent)
        .collect();
    vms.sort();
    vms.dedup();
    Ok(vms)
}

/// Flattening rewrites a disk's lowest layer, which linked clones of *that* VM read
/// too: refuse while one of them runs (its hypervisor holds the file open).
pub async fn refuse_if_readers_running(conn: &mut SqliteConnection, vm: &Vm) -> Result<()> {
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

pub fn volume_ids(graphs: &[DiskGraph]) -> HashSet<Uuid> {
    graphs
        .iter()
        .flat_map(|g| g.volumes.iter().map(|v| v.id))
        .collect()
}

/// Refuse a plan that would rewrite or remove a file linked clones read (or will read:
/// `pending`, accepted but not made yet), naming them.
pub async fn refuse_endangering_dependents(
    conn: &mut SqliteConnection,
    plan: &Plan,
    graphs: &[DiskGraph],
    pending: &HashSet<Uuid>,
) -> Result<()> {
    // Links the plan itself cuts first (flattened dependents) protect nothing any more.
    let cut: HashSet<Uuid> = plan
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
pub async fn dependents_problem(conn: &mut SqliteConnection, vms: &[Uuid]) -> Result<Error> {
    let mut vms = vms.to_vec();
    vms.sort();
    vms.dedup();
    let mut named = Vec::with_capacity(vms.len());
    for id in &vms {
        let name = store::vms::get_vm(conn, *id)
            .await?
            .map(|vm| vm.name)
            .unwrap_or_default();
        named.push((*id, name));
    }
    let names: Vec<&str> = named.iter().map(|(_, name)| name.as_str()).collect();
    let listed: Vec<serde_json::Value> = named
        .iter()
        .map(|(id, name)| serde_json::json!({ "id": id, "name": name }))
        .collect();
    Ok(Error::with_extra(
        ErrorCode::HasDependents,
        format!(
            "linked clones read these files: {}; delete or flatten them first (or pass flatten_dependents=true where offered)",
            names.join(", ")
        ),
        serde_json::json!({ "dependent_vms": listed }),
    ))
}
