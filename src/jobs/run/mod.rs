//! One runner per job kind. Each kind's spec (`domain::job_spec`) implements `Run` in
//! the file of its family (`vm.rs`, `disk.rs`, `snapshot.rs`, `clone.rs`,
//! `template.rs`): what accepting the request checks and flags, the plan it follows
//! when it runs (computed by the pure planner in `domain::plan` from the state loaded
//! here), and how it is unwound when it ends before it journaled a plan.
//!
//! What every plan goes through whatever its kind lives here: loading the VM and its
//! measured disk graphs, counting pending linked clones as readers, dropping layers the
//! plan leaves unread, refusing a plan that endangers a linked clone, and the space
//! check. Checks several kinds share are in `guards.rs`.

mod clone;
mod disk;
mod guards;
mod links;
mod snapshot;
mod template;
mod unreadable;
mod vm;

use std::collections::HashSet;

use sqlx::SqliteConnection;

use super::Engine;
use crate::domain::plan::{CloneMode, DiskGraph, MetaOp, Owner, Plan, VolumeNode};
use crate::domain::{JobSpec, Uuid, Vm, VmKind, VolumeStatus, new_id};
use crate::error::{Error, ErrorCode, Result};
use crate::files;
use crate::store;

pub use guards::{dependent_vms, find_snapshot, require_ready, require_stopped};

/// What one job kind does.
pub(super) trait Run {
    /// Whether accepting the request also plans the job, refusing now (409, 507) what
    /// the job would refuse when it runs. Kinds whose plan depends on jobs queued before
    /// them (a revert, a snapshot) are planned only when they run.
    const PLAN_AT_ACCEPT: bool;

    /// The checks of a request, made inside the transaction that accepts it (so nothing
    /// can change between check and write), on the records as committed. Completes the
    /// spec with what it found (statuses to restore) and says what accepting writes.
    async fn admit(&mut self, conn: &mut SqliteConnection) -> Result<Admission>;

    /// The plan from the current state, re-checking the preconditions (the VM may have
    /// changed since the request).
    async fn plan(&self, cx: &mut Planning<'_>) -> Result<Plan>;

    /// Metadata changes that unwind a job ended before it journaled a plan: the
    /// records the request created or flagged go back to how they were.
    async fn unwind(&self, conn: &mut SqliteConnection, cancelled: bool) -> Result<Vec<MetaOp>>;
}

/// What accepting a request writes besides the job itself.
#[derive(Debug, Default)]
pub struct Admission {
    /// Status flags on the records the job works on.
    pub flags: Vec<MetaOp>,
    /// VMs besides its own the job locks (works on, or must not see change).
    pub locks: Vec<Uuid>,
}

/// The state a plan is made from, loaded in one read (or the accepting write)
/// transaction.
pub(super) struct Planning<'a> {
    pub engine: &'a Engine,
    pub conn: &'a mut SqliteConnection,
    pub vm: Vm,
    /// The VM's disks with their layers, measured, pending linked clones counted as
    /// readers.
    pub graphs: Vec<DiskGraph>,
}

/// Calls `$body` with `$inner` bound to the spec's typed inputs, whatever its kind.
macro_rules! dispatch {
    ($spec:expr, $inner:ident => $body:expr) => {
        match $spec {
            JobSpec::VmCreate($inner) => $body,
            JobSpec::VmDelete($inner) => $body,
            JobSpec::DiskCreate($inner) => $body,
            JobSpec::DiskDelete($inner) => $body,
            JobSpec::DiskResize($inner) => $body,
            JobSpec::DiskFlatten($inner) => $body,
            JobSpec::SnapshotCreate($inner) => $body,
            JobSpec::SnapshotRevert($inner) => $body,
            JobSpec::SnapshotDelete($inner) => $body,
            JobSpec::SnapshotDeleteAll($inner) => $body,
            JobSpec::VmClone($inner) => $body,
            JobSpec::TemplateCreate($inner) => $body,
            JobSpec::TemplateDeploy($inner) => $body,
            JobSpec::VmToTemplate($inner) => $body,
            JobSpec::TemplateToVm($inner) => $body,
            JobSpec::TemplateImport($inner) => $body,
            JobSpec::Unreadable($inner) => $body,
        }
    };
}

/// Whether accepting a job of this spec plans it (see `Run::PLAN_AT_ACCEPT`).
pub(super) fn plans_at_accept(spec: &JobSpec) -> bool {
    fn of<R: Run>(_: &R) -> bool {
        R::PLAN_AT_ACCEPT
    }
    dispatch!(spec, s => of(s))
}

pub(super) async fn admit(spec: &mut JobSpec, conn: &mut SqliteConnection) -> Result<Admission> {
    dispatch!(spec, s => s.admit(conn).await)
}

pub(super) async fn unwind(
    spec: &JobSpec,
    conn: &mut SqliteConnection,
    cancelled: bool,
) -> Result<Vec<MetaOp>> {
    dispatch!(spec, s => s.unwind(conn, cancelled).await)
}

/// Plan a job from the current state, in one read transaction. `accepted_before` is
/// the job's own place in the queue: linked clones accepted before it read the VM's
/// layers as soon as they run (they run first), so they count as readers already;
/// those accepted after it do not.
pub(super) async fn plan(engine: &Engine, spec: &JobSpec, accepted_before: i64) -> Result<Plan> {
    let mut conn = engine.db.read_tx().await?;
    let plan = plan_in(engine, &mut conn, spec, Some(accepted_before)).await;
    conn.finish().await;
    plan
}

/// The plan a job of `spec` would follow now, on `conn` (a read transaction, or the
/// transaction accepting the job). Touches no file.
pub(super) async fn plan_in(
    engine: &Engine,
    conn: &mut SqliteConnection,
    spec: &JobSpec,
    accepted_before: Option<i64>,
) -> Result<Plan> {
    let vm_id = spec.vm();
    let vm = store::vms::get_vm(conn, vm_id).await?.ok_or_else(|| {
        Error::problem(ErrorCode::VmNotFound, format!("VM {vm_id} does not exist"))
    })?;
    let mut graphs = store::vms::disk_graphs(conn, vm_id).await?;
    files::measure(engine.volumes_dir(), &mut graphs);
    let pending_clones =
        count_pending_linked_clones(conn, &vm, &mut graphs, accepted_before).await?;
    let mut cx = Planning {
        engine,
        conn,
        vm,
        graphs,
    };
    let mut plan = dispatch!(spec, s => s.plan(&mut cx).await)?;
    // Whatever layer of this VM the plan, or an earlier job that stopped halfway,
    // leaves unread goes with it (pending linked clones count as readers: they were
    // added to the graphs above).
    for graph in &cx.graphs {
        plan.drop_unread_shared_layers(graph, &[]);
    }
    guards::refuse_endangering_dependents(cx.conn, &plan, &cx.graphs, &pending_clones).await?;
    check_space(engine, &plan)?;
    Ok(plan)
}

/// Add, as readers of the layers they will sit on, the VMs of linked clones and
/// deploys from this VM that were accepted (before `accepted_before`, if given) but
/// have not run yet: a request that would rewrite or remove those layers is refused
/// now (`has_dependents`), not accepted and failed once the clone exists. A pending
/// linked clone of a VM's *present* state will freeze each disk's writable layer under
/// a new one when it runs: that freeze is made on the graphs too, so a collapse or a
/// revert planned now sees the frozen layer its clone reads. (Only a plan made at
/// accept meets pending clones: when a job runs, every older job of its VM has.)
/// Returns those VMs.
async fn count_pending_linked_clones(
    conn: &mut SqliteConnection,
    vm: &Vm,
    graphs: &mut [DiskGraph],
    accepted_before: Option<i64>,
) -> Result<HashSet<Uuid>> {
    let mut pending = HashSet::new();
    for job in store::jobs::pending_for_vm(conn, vm.id).await? {
        let (JobSpec::VmClone(clone) | JobSpec::TemplateDeploy(clone)) = &job.spec else {
            continue;
        };
        let earlier = accepted_before.is_none_or(|seq| job.seq < seq);
        if clone.source != vm.id || !earlier || clone.mode != CloneMode::Linked {
            continue;
        }
        let freezes_present = clone.snapshot_id.is_none() && vm.kind == VmKind::Vm;
        for target in &clone.vms {
            for (_, source_disk) in &target.disks {
                let Some(graph) = graphs.iter_mut().find(|g| g.disk_id == *source_disk) else {
                    continue;
                };
                let start = match clone.snapshot_id {
                    Some(snapshot) => graph.frozen_by(snapshot).map(|v| v.id),
                    None if freezes_present => freeze_present(graph),
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

/// What a linked clone of the present does to a disk's graph when it runs: the
/// writable layer becomes a shared layer under a new, empty writable one. Returns the
/// frozen layer (the clone's base).
fn freeze_present(graph: &mut DiskGraph) -> Option<Uuid> {
    let active = graph
        .volumes
        .iter_mut()
        .find(|v| v.owner == Owner::Active)?;
    active.owner = Owner::Shared;
    let fresh = VolumeNode {
        id: new_id(),
        parent: Some(active.id),
        size_bytes: active.size_bytes,
        allocated_bytes: 0,
        owner: Owner::Active,
        status: VolumeStatus::Ready,
        dependents: Vec::new(),
    };
    let frozen = active.id;
    graph.volumes.push(fresh);
    Some(frozen)
}

/// Refuse before any file changes when the plan would not fit: a copy must also leave
/// the reserve (so there is always room to merge and free space later); new empty
/// files (snapshots, reverts) need only their own few KiB. A plan that only removes
/// files is never refused: it is how space comes back.
fn check_space(engine: &Engine, plan: &Plan) -> Result<()> {
    let reserve = if plan.copies_data() {
        engine.reserved_bytes()
    } else {
        0
    };
    engine.require_free_space(plan.space_needed, reserve)
}
