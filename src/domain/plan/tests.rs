//! Unit tests for the chain planner, on small hand-built volume trees.
//!
//! Besides checking the steps each plan lists, the tests replay plans on `Store`, a
//! tiny in-memory copy of the metadata the store keeps, which enforces the store's
//! reference rules (a volume row cannot go while a child, a snapshot or a disk still
//! points at it) and then rebuilds the planner's view from the result.

use std::collections::BTreeMap;

use super::*;
use crate::domain::{ResourceStatus, Uuid, VolumeStatus, new_id};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------

/// Builds one disk's volume tree; every volume gets the disk's size unless resized.
struct Disk {
    graph: DiskGraph,
}

impl Disk {
    fn new(size_bytes: u64) -> Self {
        Disk {
            graph: DiskGraph {
                disk_id: new_id(),
                size_bytes,
                volumes: Vec::new(),
            },
        }
    }

    fn volume(&mut self, parent: Option<Uuid>, allocated_bytes: u64, owner: Owner) -> Uuid {
        let id = new_id();
        let size_bytes = self.graph.size_bytes;
        self.graph.volumes.push(VolumeNode {
            id,
            parent,
            size_bytes,
            allocated_bytes,
            owner,
            status: VolumeStatus::Ready,
            dependents: Vec::new(),
        });
        id
    }

    /// A layer frozen by `snapshot`.
    fn frozen(&mut self, parent: Option<Uuid>, snapshot: Uuid, allocated_bytes: u64) -> Uuid {
        self.volume(parent, allocated_bytes, Owner::Snapshot(snapshot))
    }

    /// The writable top.
    fn active(&mut self, parent: Option<Uuid>, allocated_bytes: u64) -> Uuid {
        self.volume(parent, allocated_bytes, Owner::Active)
    }

    /// Give one volume another virtual size (as a resize before it was frozen did).
    fn sized(&mut self, volume: Uuid, size_bytes: u64) -> &mut Self {
        let node = self
            .graph
            .volumes
            .iter_mut()
            .find(|v| v.id == volume)
            .expect("volume in the fixture");
        node.size_bytes = size_bytes;
        self
    }

    fn id(&self) -> Uuid {
        self.graph.disk_id
    }

    fn build(&self) -> DiskGraph {
        self.graph.clone()
    }
}

/// DOMAIN.md's example: base disk, snap01 and snap02 taken in turn, the VM running
/// after snap02. `l0` is snap01's layer, `l1` snap02's, `l2` the present.
struct Classic {
    disk: Disk,
    snap01: Uuid,
    snap02: Uuid,
    l0: Uuid,
    l1: Uuid,
    l2: Uuid,
}

fn classic(l0_bytes: u64, l1_bytes: u64, l2_bytes: u64) -> Classic {
    let (snap01, snap02) = (new_id(), new_id());
    let mut disk = Disk::new(10 * GIB);
    let l0 = disk.frozen(None, snap01, l0_bytes);
    let l1 = disk.frozen(Some(l0), snap02, l1_bytes);
    let l2 = disk.active(Some(l1), l2_bytes);
    Classic {
        disk,
        snap01,
        snap02,
        l0,
        l1,
        l2,
    }
}

/// DOMAIN.md's case 3: the classic chain reverted to snap01 (new present `l3` on
/// `l0`; the old present was discarded), so nothing sits on `l1` any more.
struct Reverted {
    disk: Disk,
    snap01: Uuid,
    snap02: Uuid,
    l0: Uuid,
    l1: Uuid,
    l3: Uuid,
}

fn reverted() -> Reverted {
    let (snap01, snap02) = (new_id(), new_id());
    let mut disk = Disk::new(10 * GIB);
    let l0 = disk.frozen(None, snap01, 700 * MIB);
    let l1 = disk.frozen(Some(l0), snap02, 40 * MIB);
    let l3 = disk.active(Some(l0), 3 * MIB);
    Reverted {
        disk,
        snap01,
        snap02,
        l0,
        l1,
        l3,
    }
}

fn all_ops(plan: &Plan) -> Vec<MetaOp> {
    let mut ops = plan.mark.clone();
    ops.extend(plan.steps.iter().flat_map(|s| s.then.iter().cloned()));
    ops.extend(plan.finish.iter().cloned());
    ops.extend(plan.undo.iter().cloned());
    ops.extend(plan.fail.iter().cloned());
    ops.extend(plan.cancel.iter().flatten().cloned());
    ops
}

fn file_ops(plan: &Plan) -> Vec<FileOp> {
    plan.steps.iter().map(|s| s.op.clone()).collect()
}

/// Index of `op` in `ops`; fails the test when it is missing.
fn position(ops: &[MetaOp], op: &MetaOp) -> usize {
    ops.iter()
        .position(|o| o == op)
        .unwrap_or_else(|| panic!("{op:?} missing from {ops:#?}"))
}

fn removed_volumes(ops: &[MetaOp]) -> Vec<Uuid> {
    ops.iter()
        .filter_map(|op| match *op {
            MetaOp::RemoveVolume { volume } => Some(volume),
            _ => None,
        })
        .collect()
}

/// The order the store and the file cleanup rely on, checked against the graphs the
/// plan was made from:
/// - in `finish`, a snapshot row goes before the volume rows it referenced;
/// - in `finish`, a volume row goes before its parent's, and `drops` lists files
///   children before parents.
fn assert_store_order(plan: &Plan, disks: &[DiskGraph]) {
    let removed = removed_volumes(&plan.finish);
    for (index, op) in plan.finish.iter().enumerate() {
        if let MetaOp::DeleteSnapshot { snapshot } = *op {
            for disk in disks {
                if let Some(frozen) = disk.frozen_by(snapshot)
                    && let Some(at) = plan
                        .finish
                        .iter()
                        .position(|o| *o == MetaOp::RemoveVolume { volume: frozen.id })
                {
                    assert!(
                        index < at,
                        "snapshot {snapshot} deleted after its volume {} was removed",
                        frozen.id
                    );
                }
            }
        }
    }
    for list in [&removed, &plan.drops] {
        for (index, id) in list.iter().enumerate() {
            let parent = disks.iter().find_map(|d| d.get(*id)).and_then(|v| v.parent);
            if let Some(parent) = parent
                && let Some(at) = list.iter().position(|v| *v == parent)
            {
                assert!(
                    index < at,
                    "volume {id} is listed after its parent {parent} in {list:?}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// A model of the store's metadata
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Row {
    disk: Uuid,
    parent: Option<Uuid>,
    size_bytes: u64,
    status: VolumeStatus,
}

/// The rows plans change, with the store's reference rules asserted on every op.
#[derive(Debug, Clone, Default)]
struct Store {
    /// disk id -> (size, active volume)
    disks: BTreeMap<Uuid, (u64, Uuid)>,
    volumes: BTreeMap<Uuid, Row>,
    /// (snapshot, disk) -> frozen volume
    frozen: BTreeMap<(Uuid, Uuid), Uuid>,
}

impl Store {
    fn from_graphs(disks: &[DiskGraph]) -> Self {
        let mut store = Store::default();
        for disk in disks {
            let active = disk
                .active()
                .expect("fixture disks have an active volume")
                .id;
            store.disks.insert(disk.disk_id, (disk.size_bytes, active));
            for v in &disk.volumes {
                let row = Row {
                    disk: disk.disk_id,
                    parent: v.parent,
                    size_bytes: v.size_bytes,
                    status: VolumeStatus::Ready,
                };
                store.volumes.insert(v.id, row);
                if let Owner::Snapshot(snapshot) = v.owner {
                    store.frozen.insert((snapshot, disk.disk_id), v.id);
                }
            }
        }
        store
    }

    fn apply(&mut self, ops: &[MetaOp]) {
        for op in ops {
            match *op {
                MetaOp::InsertVolume {
                    volume,
                    disk,
                    parent,
                    size_bytes,
                } => {
                    assert!(
                        !self.volumes.contains_key(&volume),
                        "volume {volume} inserted twice"
                    );
                    if let Some(parent) = parent {
                        assert!(
                            self.volumes.contains_key(&parent),
                            "volume {volume} inserted on missing {parent}"
                        );
                    }
                    self.volumes.insert(
                        volume,
                        Row {
                            disk,
                            parent,
                            size_bytes,
                            status: VolumeStatus::Ready,
                        },
                    );
                }
                MetaOp::SetVolumeParent { volume, parent } => {
                    if let Some(parent) = parent {
                        assert!(
                            self.volumes.contains_key(&parent),
                            "volume {volume} repointed to missing {parent}"
                        );
                    }
                    self.row(volume).parent = parent;
                }
                MetaOp::SetVolumeStatus { volume, status } => self.row(volume).status = status,
                MetaOp::SetVolumeSize { volume, size_bytes } => {
                    self.row(volume).size_bytes = size_bytes
                }
                MetaOp::RemoveVolume { volume } => {
                    assert!(
                        !self.volumes.values().any(|r| r.parent == Some(volume)),
                        "volume {volume} removed while a volume still sits on it"
                    );
                    assert!(
                        !self.frozen.values().any(|v| *v == volume),
                        "volume {volume} removed while a snapshot still references it"
                    );
                    assert!(
                        !self.disks.values().any(|(_, active)| *active == volume),
                        "volume {volume} removed while it is a disk's active volume"
                    );
                    self.volumes
                        .remove(&volume)
                        .unwrap_or_else(|| panic!("volume {volume} removed twice"));
                }
                MetaOp::SetActiveVolume { disk, volume } => {
                    assert_eq!(
                        self.row(volume).disk,
                        disk,
                        "active volume {volume} belongs to another disk"
                    );
                    self.disks.get_mut(&disk).expect("known disk").1 = volume;
                }
                MetaOp::SetSnapshotVolume {
                    snapshot,
                    disk,
                    volume,
                } => {
                    assert_eq!(
                        self.row(volume).disk,
                        disk,
                        "snapshot volume {volume} belongs to another disk"
                    );
                    assert!(
                        !self
                            .frozen
                            .iter()
                            .any(|(key, v)| *v == volume && *key != (snapshot, disk)),
                        "volume {volume} would be frozen by two snapshots"
                    );
                    self.frozen.insert((snapshot, disk), volume);
                }
                MetaOp::DeleteSnapshot { snapshot } => {
                    self.frozen.retain(|(s, _), _| *s != snapshot)
                }
                MetaOp::SetDiskSize { disk, size_bytes } => {
                    let (size, active) = self.disks.get_mut(&disk).expect("known disk");
                    *size = size_bytes;
                    let active = *active;
                    // Like the store: the writable top carries the disk's size.
                    self.row(active).size_bytes = size_bytes;
                }
                MetaOp::SetSnapshotStatus { .. }
                | MetaOp::SetSnapshotParent { .. }
                | MetaOp::SetCurrentSnapshot { .. }
                | MetaOp::SetDiskStatus { .. }
                | MetaOp::SetVmStatus { .. }
                | MetaOp::SetVmKind { .. }
                | MetaOp::TouchVm { .. } => {}
                MetaOp::DeleteDisk { .. } | MetaOp::DeleteVm { .. } => panic!("unexpected {op:?}"),
            }
        }
    }

    fn row(&mut self, volume: Uuid) -> &mut Row {
        self.volumes
            .get_mut(&volume)
            .unwrap_or_else(|| panic!("volume {volume} is not in the store"))
    }

    /// Journal the plan, apply every step's metadata, then the end: what a job that
    /// ran to completion leaves. Every dropped file must have lost its row.
    fn run(&mut self, plan: &Plan) {
        self.apply(&plan.mark);
        for step in &plan.steps {
            self.apply(&step.then);
        }
        self.apply(&plan.finish);
        for dropped in &plan.drops {
            assert!(
                !self.volumes.contains_key(dropped),
                "file {dropped} dropped while its row is kept"
            );
        }
        for (id, row) in &self.volumes {
            assert_eq!(
                row.status,
                VolumeStatus::Ready,
                "volume {id} left flagged after the job"
            );
        }
    }

    /// The planner's view of the rows, as `store::vms::disk_graphs` builds it: every
    /// volume must have exactly one owner.
    fn graphs(&self) -> Vec<DiskGraph> {
        self.disks
            .iter()
            .map(|(&disk_id, &(size_bytes, active))| {
                let volumes = self
                    .volumes
                    .iter()
                    .filter(|(_, row)| row.disk == disk_id)
                    .map(|(&id, row)| {
                        let snapshot = self
                            .frozen
                            .iter()
                            .find(|(_, v)| **v == id)
                            .map(|((s, _), _)| *s);
                        let owner = match (snapshot, id == active) {
                            (Some(snapshot), false) => Owner::Snapshot(snapshot),
                            (None, true) => Owner::Active,
                            (Some(_), true) => panic!("volume {id} is both frozen and active"),
                            (None, false) => Owner::Shared,
                        };
                        VolumeNode {
                            id,
                            parent: row.parent,
                            size_bytes: row.size_bytes,
                            allocated_bytes: 0,
                            owner,
                            status: row.status,
                            dependents: Vec::new(),
                        }
                    })
                    .collect();
                DiskGraph {
                    disk_id,
                    size_bytes,
                    volumes,
                }
            })
            .collect()
    }
}

/// Run `plan` on the metadata of `disks` and return the planner's view afterwards.
fn after(plan: &Plan, disks: &[DiskGraph]) -> Vec<DiskGraph> {
    let mut store = Store::from_graphs(disks);
    store.run(plan);
    store.graphs()
}

fn parent_of(disk: &DiskGraph, volume: Uuid) -> Option<Uuid> {
    disk.get(volume)
        .unwrap_or_else(|| panic!("volume {volume} is gone"))
        .parent
}

// ---------------------------------------------------------------------------------
// Taking a snapshot
// ---------------------------------------------------------------------------------

#[test]
fn taking_a_snapshot_puts_one_empty_overlay_on_each_disks_active_volume() {
    let mut system = Disk::new(20 * GIB);
    let system_active = system.active(None, 3 * GIB);
    let mut data = Disk::new(100 * GIB);
    let data_base = data.frozen(None, new_id(), 5 * GIB);
    let data_active = data.active(Some(data_base), 10 * MIB);
    let (vm, snapshot) = (new_id(), new_id());

    let plan = plan_snapshot_create(vm, snapshot, None, &[system.build(), data.build()]).unwrap();

    assert_eq!(plan.steps.len(), 2);
    for (step, (backing, size)) in plan
        .steps
        .iter()
        .zip([(system_active, 20 * GIB), (data_active, 100 * GIB)])
    {
        match step.op {
            FileOp::Create {
                backing: b,
                size_bytes,
                ..
            } => {
                assert_eq!(b, Some(backing));
                assert_eq!(size_bytes, size);
            }
            ref other => panic!("expected a create, got {other:?}"),
        }
        assert!(
            step.then.is_empty(),
            "new files are recorded at the end only"
        );
    }
    assert!(plan.drops.is_empty());
    assert!(plan.merges.is_empty());
    assert_eq!(plan.space_needed, 2 * MIB);
}

#[test]
fn finishing_a_snapshot_freezes_the_old_active_volume_and_makes_the_overlay_active() {
    let mut disk = Disk::new(8 * GIB);
    let previous = new_id();
    let base = disk.frozen(None, previous, GIB);
    let active = disk.active(Some(base), 50 * MIB);
    let (vm, snapshot) = (new_id(), new_id());
    let graphs = [disk.build()];

    let plan = plan_snapshot_create(vm, snapshot, Some(previous), &graphs).unwrap();

    let FileOp::Create {
        volume: overlay, ..
    } = plan.steps[0].op
    else {
        panic!("expected a create")
    };
    assert_ne!(overlay, active);
    let d = disk.id();
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::InsertVolume {
                volume: overlay,
                disk: d,
                parent: Some(active),
                size_bytes: 8 * GIB
            },
            MetaOp::SetSnapshotVolume {
                snapshot,
                disk: d,
                volume: active
            },
            MetaOp::SetActiveVolume {
                disk: d,
                volume: overlay
            },
            MetaOp::SetSnapshotParent {
                snapshot,
                parent: Some(previous)
            },
            MetaOp::SetSnapshotStatus {
                snapshot,
                status: ResourceStatus::Ready
            },
            MetaOp::SetCurrentSnapshot {
                vm,
                snapshot: Some(snapshot)
            },
        ]
    );

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.active().unwrap().id, overlay);
    assert_eq!(graph.active().unwrap().parent, Some(active));
    assert_eq!(graph.frozen_by(snapshot).unwrap().id, active);
    assert_eq!(graph.frozen_by(previous).unwrap().id, base);
}

#[test]
fn a_snapshot_that_cannot_be_taken_is_deleted_again() {
    let mut disk = Disk::new(GIB);
    disk.active(None, MIB);
    let snapshot = new_id();

    let plan = plan_snapshot_create(new_id(), snapshot, None, &[disk.build()]).unwrap();

    assert_eq!(plan.undo, vec![MetaOp::DeleteSnapshot { snapshot }]);
    assert_eq!(plan.cancel, None);
    assert!(plan.mark.is_empty());
    assert_eq!(plan.point_of_no_return(), None);
}

#[test]
fn a_live_snapshot_ends_with_its_switch_which_carries_the_freeze() {
    let mut root = Disk::new(GIB);
    root.active(None, MIB);
    let mut data = Disk::new(GIB);
    data.active(None, MIB);
    let (vm, snapshot) = (new_id(), new_id());
    let graphs = [root.build(), data.build()];

    for freeze in [None, Some(Quiesce::Required), Some(Quiesce::BestEffort)] {
        let plan = plan_live_snapshot_create(vm, snapshot, None, &graphs, freeze).unwrap();
        let ops = file_ops(&plan);
        // Two overlays, opened in QEMU, then the switch: the point of no return, and
        // the only step during which the guest is frozen.
        assert_eq!(ops.len(), 4);
        assert!(matches!(ops[2], FileOp::LiveAdd { .. }));
        assert_eq!(plan.point_of_no_return(), Some(3));
        assert!(
            matches!(ops[3], FileOp::LiveSwitch { freeze: f, snapshot: s, .. } if f == freeze && s == Some(snapshot)),
            "{freeze:?}"
        );
        assert!(plan.is_live());
    }
}

#[test]
fn a_snapshot_of_a_disk_without_an_active_volume_is_refused() {
    let mut disk = Disk::new(GIB);
    disk.frozen(None, new_id(), MIB);

    let error = plan_snapshot_create(new_id(), new_id(), None, &[disk.build()]).unwrap_err();

    assert_eq!(error, PlanError::NoActiveVolume(disk.id()));
}

// ---------------------------------------------------------------------------------
// Reverting
// ---------------------------------------------------------------------------------

#[test]
fn reverting_puts_a_new_overlay_on_the_snapshots_layer_and_drops_the_present_one() {
    let c = classic(GIB, 200 * MIB, 30 * MIB);
    let vm = new_id();
    let graphs = [c.disk.build()];

    let plan = plan_revert(vm, c.snap01, &graphs).unwrap();

    let [
        Step {
            op:
                FileOp::Create {
                    volume: overlay,
                    backing,
                    size_bytes,
                },
            then,
        },
    ] = plan.steps.as_slice()
    else {
        panic!("expected one create, got {:?}", plan.steps);
    };
    assert_eq!(*backing, Some(c.l0));
    assert_eq!(*size_bytes, 10 * GIB);
    assert!(then.is_empty());
    let d = c.disk.id();
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::InsertVolume {
                volume: *overlay,
                disk: d,
                parent: Some(c.l0),
                size_bytes: 10 * GIB
            },
            MetaOp::SetActiveVolume {
                disk: d,
                volume: *overlay
            },
            MetaOp::SetDiskSize {
                disk: d,
                size_bytes: 10 * GIB
            },
            MetaOp::RemoveVolume { volume: c.l2 },
            MetaOp::SetCurrentSnapshot {
                vm,
                snapshot: Some(c.snap01)
            },
        ]
    );
    assert_eq!(plan.drops, vec![c.l2]);
    assert_eq!(plan.point_of_no_return(), None);

    // snap02's layer stays: it is a branch of the snapshot tree now.
    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.active().unwrap().id, *overlay);
    assert_eq!(graph.frozen_by(c.snap02).unwrap().id, c.l1);
    assert_eq!(graph.children(c.l0).len(), 2);
}

#[test]
fn reverting_restores_the_disk_size_the_snapshot_was_taken_with() {
    let snapshot = new_id();
    let mut disk = Disk::new(4 * GIB);
    let frozen = disk.frozen(None, snapshot, GIB);
    let active = disk.active(Some(frozen), MIB);
    // The disk was grown from 1 GiB to 4 GiB after the snapshot.
    disk.sized(frozen, GIB).sized(active, 4 * GIB);
    let graphs = [disk.build()];

    let plan = plan_revert(new_id(), snapshot, &graphs).unwrap();

    assert!(matches!(plan.steps[0].op, FileOp::Create { size_bytes, .. } if size_bytes == GIB));
    assert!(plan.finish.contains(&MetaOp::SetDiskSize {
        disk: disk.id(),
        size_bytes: GIB
    }));
    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.size_bytes, GIB);
    assert_eq!(graph.active().unwrap().size_bytes, GIB);
}

#[test]
fn reverting_leaves_disks_the_snapshot_does_not_cover_untouched() {
    let c = classic(GIB, 100 * MIB, 10 * MIB);
    // A disk added after both snapshots: no layer of it belongs to snap01.
    let mut added = Disk::new(GIB);
    let added_active = added.active(None, 300 * MIB);
    let graphs = [c.disk.build(), added.build()];

    let plan = plan_revert(new_id(), c.snap01, &graphs).unwrap();

    assert_eq!(plan.steps.len(), 1);
    let mentions_added = |op: &MetaOp| {
        let text = format!("{op:?}");
        text.contains(&added.id().to_string()) || text.contains(&added_active.to_string())
    };
    assert!(!all_ops(&plan).iter().any(mentions_added), "{plan:#?}");
    assert!(!plan.drops.contains(&added_active));
    assert_eq!(plan.drops, vec![c.l2]);
    assert_eq!(after(&plan, &graphs)[1].active().unwrap().id, added_active);
}

#[test]
fn reverting_is_refused_when_a_volume_sits_on_the_active_one() {
    let snapshot = new_id();
    let mut disk = Disk::new(GIB);
    let frozen = disk.frozen(None, snapshot, MIB);
    let active = disk.active(Some(frozen), MIB);
    disk.frozen(Some(active), new_id(), MIB);

    let error = plan_revert(new_id(), snapshot, &[disk.build()]).unwrap_err();

    assert_eq!(error, PlanError::ActiveHasChildren(active));
}

// ---------------------------------------------------------------------------------
// Case 1: delete the snapshot before the current one
// ---------------------------------------------------------------------------------

#[test]
fn deleting_the_snapshot_before_the_current_one_commits_its_smaller_child_down() {
    let c = classic(800 * MIB, 100 * MIB, 10 * MIB);
    let graphs = [c.disk.build()];
    let d = c.disk.id();

    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![
            Step {
                op: FileOp::Commit {
                    top: c.l1,
                    base: c.l0
                },
                then: vec![]
            },
            Step {
                op: FileOp::Repoint {
                    volume: c.l2,
                    backing: c.l0
                },
                then: vec![MetaOp::SetVolumeParent {
                    volume: c.l2,
                    parent: Some(c.l0)
                }],
            },
        ]
    );
    assert_eq!(
        plan.mark,
        vec![
            MetaOp::SetSnapshotStatus {
                snapshot: c.snap01,
                status: ResourceStatus::Deleting
            },
            MetaOp::SetVolumeStatus {
                volume: c.l0,
                status: VolumeStatus::Rewriting
            },
            MetaOp::SetVolumeStatus {
                volume: c.l1,
                status: VolumeStatus::Deleting
            },
        ]
    );
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::DeleteSnapshot { snapshot: c.snap01 },
            MetaOp::SetSnapshotVolume {
                snapshot: c.snap02,
                disk: d,
                volume: c.l0
            },
            MetaOp::SetVolumeSize {
                volume: c.l0,
                size_bytes: 10 * GIB
            },
            MetaOp::RemoveVolume { volume: c.l1 },
            MetaOp::SetVolumeStatus {
                volume: c.l0,
                status: VolumeStatus::Ready
            },
        ]
    );
    assert_eq!(plan.drops, vec![c.l1]);
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: d,
            action: MergeAction::Commit,
            commit_bytes: 100 * MIB,
            stream_bytes: 800 * MIB,
            bytes_to_copy: 100 * MIB,
        }]
    );
    assert_eq!(plan.space_needed, 100 * MIB);
    // Undo puts every flag back as it was; a failure after the commit started keeps the
    // half-merged base flagged `rewriting` and only releases the child.
    assert_eq!(
        plan.undo,
        vec![
            MetaOp::SetSnapshotStatus {
                snapshot: c.snap01,
                status: ResourceStatus::Ready
            },
            MetaOp::SetVolumeStatus {
                volume: c.l0,
                status: VolumeStatus::Ready
            },
            MetaOp::SetVolumeStatus {
                volume: c.l1,
                status: VolumeStatus::Ready
            },
        ]
    );
    assert_eq!(
        plan.fail,
        vec![
            MetaOp::SetSnapshotStatus {
                snapshot: c.snap01,
                status: ResourceStatus::Error
            },
            MetaOp::SetVolumeStatus {
                volume: c.l1,
                status: VolumeStatus::Ready
            },
        ]
    );

    // snap02 now reads L0 (which holds L1's content); the present still grows from it.
    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.frozen_by(c.snap02).unwrap().id, c.l0);
    assert_eq!(graph.frozen_by(c.snap01).map(|v| v.id), None);
    assert_eq!(parent_of(graph, c.l2), Some(c.l0));
    assert_eq!(graph.volumes.len(), 2);
}

#[test]
fn deleting_the_snapshot_before_the_current_one_streams_its_smaller_parent_up() {
    let c = classic(20 * MIB, 300 * MIB, 10 * MIB);
    let graphs = [c.disk.build()];
    let d = c.disk.id();

    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![Step {
            op: FileOp::Stream {
                volume: c.l1,
                from: Some(c.l0),
                backing: None
            },
            then: vec![MetaOp::SetVolumeParent {
                volume: c.l1,
                parent: None
            }],
        }]
    );
    assert_eq!(
        plan.mark,
        vec![
            MetaOp::SetSnapshotStatus {
                snapshot: c.snap01,
                status: ResourceStatus::Deleting
            },
            MetaOp::SetVolumeStatus {
                volume: c.l0,
                status: VolumeStatus::Deleting
            },
        ]
    );
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::DeleteSnapshot { snapshot: c.snap01 },
            MetaOp::RemoveVolume { volume: c.l0 }
        ]
    );
    assert_eq!(plan.drops, vec![c.l0]);
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: d,
            action: MergeAction::Stream,
            commit_bytes: 300 * MIB,
            stream_bytes: 20 * MIB,
            bytes_to_copy: 20 * MIB,
        }]
    );
    assert_eq!(plan.space_needed, 20 * MIB);

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.frozen_by(c.snap02).unwrap().id, c.l1);
    assert_eq!(parent_of(graph, c.l1), None);
    assert_eq!(parent_of(graph, c.l2), Some(c.l1));
}

#[test]
fn streaming_a_deleted_layer_up_rebases_its_child_onto_the_layer_below() {
    let snap00 = new_id();
    let mut c = classic(20 * MIB, 300 * MIB, 10 * MIB);
    let base = c.disk.frozen(None, snap00, GIB);
    c.disk
        .graph
        .volumes
        .iter_mut()
        .find(|v| v.id == c.l0)
        .unwrap()
        .parent = Some(base);
    let graphs = [c.disk.build()];

    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![Step {
            op: FileOp::Stream {
                volume: c.l1,
                from: Some(c.l0),
                backing: Some(base)
            },
            then: vec![MetaOp::SetVolumeParent {
                volume: c.l1,
                parent: Some(base)
            }],
        }]
    );
    assert_eq!(parent_of(&after(&plan, &graphs)[0], c.l1), Some(base));
}

#[test]
fn equal_sides_are_merged_by_commit() {
    let c = classic(64 * MIB, 64 * MIB, MIB);

    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &[c.disk.build()]).unwrap();

    assert_eq!(plan.merges[0].action, MergeAction::Commit);
    assert_eq!(plan.merges[0].bytes_to_copy, 64 * MIB);
}

#[test]
fn a_commit_repoints_every_volume_on_the_committed_child() {
    // snap02's layer is a branch point itself: the present and an older branch.
    let c = classic(800 * MIB, 100 * MIB, 10 * MIB);
    let mut disk = c.disk;
    let other = disk.frozen(Some(c.l1), new_id(), 5 * MIB);
    let graphs = [disk.build()];

    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(
        plan.steps[0].op,
        FileOp::Commit {
            top: c.l1,
            base: c.l0
        }
    );
    let repointed: Vec<FileOp> = file_ops(&plan)[1..].to_vec();
    assert_eq!(
        repointed,
        vec![
            FileOp::Repoint {
                volume: c.l2,
                backing: c.l0
            },
            FileOp::Repoint {
                volume: other,
                backing: c.l0
            }
        ]
    );
    let graph = &after(&plan, &graphs)[0];
    assert_eq!(parent_of(graph, c.l2), Some(c.l0));
    assert_eq!(parent_of(graph, other), Some(c.l0));
}

// ---------------------------------------------------------------------------------
// Case 2: delete the current snapshot
// ---------------------------------------------------------------------------------

#[test]
fn deleting_the_current_snapshot_commits_the_present_and_moves_the_active_role_down() {
    let c = classic(500 * MIB, 400 * MIB, 5 * MIB);
    let graphs = [c.disk.build()];
    let d = c.disk.id();

    let plan = plan_snapshot_delete(c.snap02, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![Step {
            op: FileOp::Commit {
                top: c.l2,
                base: c.l1
            },
            then: vec![]
        }]
    );
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::DeleteSnapshot { snapshot: c.snap02 },
            MetaOp::SetActiveVolume {
                disk: d,
                volume: c.l1
            },
            MetaOp::SetVolumeSize {
                volume: c.l1,
                size_bytes: 10 * GIB
            },
            MetaOp::RemoveVolume { volume: c.l2 },
            MetaOp::SetVolumeStatus {
                volume: c.l1,
                status: VolumeStatus::Ready
            },
        ]
    );
    assert_eq!(plan.drops, vec![c.l2]);
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: d,
            action: MergeAction::Commit,
            commit_bytes: 5 * MIB,
            stream_bytes: 400 * MIB,
            bytes_to_copy: 5 * MIB,
        }]
    );

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.active().unwrap().id, c.l1);
    assert_eq!(parent_of(graph, c.l1), Some(c.l0));
    assert_eq!(graph.frozen_by(c.snap01).unwrap().id, c.l0);
}

#[test]
fn deleting_the_current_snapshot_streams_it_into_a_bigger_present() {
    let c = classic(500 * MIB, 40 * MIB, 600 * MIB);
    let graphs = [c.disk.build()];
    let d = c.disk.id();

    let plan = plan_snapshot_delete(c.snap02, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![Step {
            op: FileOp::Stream {
                volume: c.l2,
                from: Some(c.l1),
                backing: Some(c.l0)
            },
            then: vec![MetaOp::SetVolumeParent {
                volume: c.l2,
                parent: Some(c.l0)
            }],
        }]
    );
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::DeleteSnapshot { snapshot: c.snap02 },
            MetaOp::RemoveVolume { volume: c.l1 }
        ]
    );
    assert_eq!(plan.drops, vec![c.l1]);
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: d,
            action: MergeAction::Stream,
            commit_bytes: 600 * MIB,
            stream_bytes: 40 * MIB,
            bytes_to_copy: 40 * MIB,
        }]
    );

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.active().unwrap().id, c.l2);
    assert_eq!(parent_of(graph, c.l2), Some(c.l0));
}

// ---------------------------------------------------------------------------------
// Case 3: a snapshot nothing sits on
// ---------------------------------------------------------------------------------

#[test]
fn deleting_a_snapshot_nothing_sits_on_drops_its_layer_without_copying() {
    let r = reverted();
    let graphs = [r.disk.build()];

    let plan = plan_snapshot_delete(r.snap02, ResourceStatus::Ready, &graphs).unwrap();

    assert!(plan.steps.is_empty());
    assert_eq!(
        plan.mark,
        vec![
            MetaOp::SetSnapshotStatus {
                snapshot: r.snap02,
                status: ResourceStatus::Deleting
            },
            MetaOp::SetVolumeStatus {
                volume: r.l1,
                status: VolumeStatus::Deleting
            },
        ]
    );
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::DeleteSnapshot { snapshot: r.snap02 },
            MetaOp::RemoveVolume { volume: r.l1 }
        ]
    );
    assert_eq!(plan.drops, vec![r.l1]);
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: r.disk.id(),
            action: MergeAction::Drop,
            commit_bytes: 0,
            stream_bytes: 0,
            bytes_to_copy: 0,
        }]
    );
    assert_eq!(plan.space_needed, 0);

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.active().unwrap().id, r.l3);
    assert_eq!(graph.frozen_by(r.snap01).unwrap().id, r.l0);
    assert_eq!(graph.volumes.len(), 2);
}

#[test]
fn deleting_a_snapshot_skips_disks_it_does_not_cover() {
    let c = classic(800 * MIB, 100 * MIB, 10 * MIB);
    let mut added = Disk::new(GIB);
    let added_active = added.active(None, 300 * MIB);
    let graphs = [c.disk.build(), added.build()];

    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(plan.merges.len(), 1);
    assert_eq!(plan.merges[0].disk_id, c.disk.id());
    assert!(
        !plan
            .steps
            .iter()
            .any(|s| s.op.written_volumes().contains(&added_active))
    );
    assert!(!plan.drops.contains(&added_active));
}

// ---------------------------------------------------------------------------------
// Branch points
// ---------------------------------------------------------------------------------

#[test]
fn deleting_a_branch_point_streams_into_every_child() {
    // snap00 <- snap01 (900 MiB) with two tiny children: snap02's layer and the present.
    let (snap00, snap01, snap02) = (new_id(), new_id(), new_id());
    let mut disk = Disk::new(10 * GIB);
    let base = disk.frozen(None, snap00, 2 * GIB);
    let point = disk.frozen(Some(base), snap01, 900 * MIB);
    let old_branch = disk.frozen(Some(point), snap02, MIB);
    let present = disk.active(Some(point), MIB);
    let graphs = [disk.build()];

    let plan = plan_snapshot_delete(snap01, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![
            Step {
                op: FileOp::Stream {
                    volume: old_branch,
                    from: Some(point),
                    backing: Some(base)
                },
                then: vec![MetaOp::SetVolumeParent {
                    volume: old_branch,
                    parent: Some(base)
                }],
            },
            Step {
                op: FileOp::Stream {
                    volume: present,
                    from: Some(point),
                    backing: Some(base)
                },
                then: vec![MetaOp::SetVolumeParent {
                    volume: present,
                    parent: Some(base)
                }],
            },
        ]
    );
    assert!(
        !file_ops(&plan)
            .iter()
            .any(|op| matches!(op, FileOp::Commit { .. }))
    );
    assert!(!plan.mark.contains(&MetaOp::SetVolumeStatus {
        volume: point,
        status: VolumeStatus::Rewriting
    }));
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: disk.id(),
            action: MergeAction::Stream,
            commit_bytes: 0,
            stream_bytes: 1800 * MIB,
            bytes_to_copy: 1800 * MIB,
        }]
    );
    assert_eq!(plan.space_needed, 1800 * MIB);
    assert_eq!(
        plan.finish,
        vec![
            MetaOp::DeleteSnapshot { snapshot: snap01 },
            MetaOp::RemoveVolume { volume: point }
        ]
    );
    assert_eq!(plan.drops, vec![point]);

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(parent_of(graph, old_branch), Some(base));
    assert_eq!(parent_of(graph, present), Some(base));
    assert_eq!(graph.frozen_by(snap02).unwrap().id, old_branch);
}

#[test]
fn a_branch_point_at_the_base_makes_every_child_standalone() {
    let snapshot = new_id();
    let mut disk = Disk::new(GIB);
    let point = disk.frozen(None, snapshot, 100 * MIB);
    let children = [
        disk.frozen(Some(point), new_id(), 0),
        disk.frozen(Some(point), new_id(), 0),
        disk.active(Some(point), 0),
    ];

    let plan = plan_snapshot_delete(snapshot, ResourceStatus::Ready, &[disk.build()]).unwrap();

    let expected: Vec<FileOp> = children
        .iter()
        .map(|&volume| FileOp::Stream {
            volume,
            from: Some(point),
            backing: None,
        })
        .collect();
    assert_eq!(file_ops(&plan), expected);
    assert_eq!(plan.merges[0].stream_bytes, 300 * MIB);
    assert_eq!(plan.merges[0].commit_bytes, 0);
}

// ---------------------------------------------------------------------------------
// Case 4: delete all snapshots
// ---------------------------------------------------------------------------------

/// base (s1) <- mid (s2) <- present, and an older branch base <- x (s3) <- y (s4).
struct Tree {
    disk: Disk,
    snapshots: Vec<Uuid>,
    base: Uuid,
    mid: Uuid,
    present: Uuid,
    x: Uuid,
    y: Uuid,
}

fn tree(base_bytes: u64, mid_bytes: u64, present_bytes: u64) -> Tree {
    let snapshots: Vec<Uuid> = (0..4).map(|_| new_id()).collect();
    let mut disk = Disk::new(10 * GIB);
    let base = disk.frozen(None, snapshots[0], base_bytes);
    let mid = disk.frozen(Some(base), snapshots[1], mid_bytes);
    let present = disk.active(Some(mid), present_bytes);
    let x = disk.frozen(Some(base), snapshots[2], 30 * MIB);
    let y = disk.frozen(Some(x), snapshots[3], 30 * MIB);
    Tree {
        disk,
        snapshots,
        base,
        mid,
        present,
        x,
        y,
    }
}

#[test]
fn deleting_all_snapshots_commits_the_present_chain_into_its_base_when_the_top_is_smaller() {
    let t = tree(GIB, 50 * MIB, 5 * MIB);
    let graphs = [t.disk.build()];
    let (vm, d) = (new_id(), t.disk.id());

    let plan = plan_delete_all_snapshots(vm, &ready(&t.snapshots), &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![Step {
            op: FileOp::Commit {
                top: t.present,
                base: t.base
            },
            then: vec![]
        }]
    );
    let mut finish: Vec<MetaOp> = t
        .snapshots
        .iter()
        .map(|&snapshot| MetaOp::DeleteSnapshot { snapshot })
        .collect();
    finish.extend([
        MetaOp::SetCurrentSnapshot { vm, snapshot: None },
        MetaOp::SetActiveVolume {
            disk: d,
            volume: t.base,
        },
        MetaOp::SetVolumeSize {
            volume: t.base,
            size_bytes: 10 * GIB,
        },
        MetaOp::SetVolumeStatus {
            volume: t.base,
            status: VolumeStatus::Ready,
        },
        MetaOp::RemoveVolume { volume: t.y },
        MetaOp::RemoveVolume { volume: t.x },
        MetaOp::RemoveVolume { volume: t.present },
        MetaOp::RemoveVolume { volume: t.mid },
    ]);
    assert_eq!(plan.finish, finish);
    assert_eq!(plan.drops, vec![t.y, t.x, t.present, t.mid]);
    assert!(plan.mark.contains(&MetaOp::SetVolumeStatus {
        volume: t.base,
        status: VolumeStatus::Rewriting
    }));
    for volume in [t.y, t.x, t.present, t.mid] {
        assert!(plan.mark.contains(&MetaOp::SetVolumeStatus {
            volume,
            status: VolumeStatus::Deleting
        }));
    }
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: d,
            action: MergeAction::Commit,
            commit_bytes: 55 * MIB,
            stream_bytes: GIB + 50 * MIB,
            bytes_to_copy: 55 * MIB,
        }]
    );
    assert_eq!(plan.space_needed, 55 * MIB);

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.volumes.len(), 1);
    assert_eq!(graph.active().unwrap().id, t.base);
    assert_eq!(graph.active().unwrap().parent, None);
}

#[test]
fn deleting_all_snapshots_streams_the_chain_into_the_present_when_the_base_is_smaller() {
    let t = tree(10 * MIB, 50 * MIB, 500 * MIB);
    let graphs = [t.disk.build()];
    let vm = new_id();

    let plan = plan_delete_all_snapshots(vm, &ready(&t.snapshots), &graphs).unwrap();

    assert_eq!(
        plan.steps,
        vec![Step {
            op: FileOp::Stream {
                volume: t.present,
                from: Some(t.mid),
                backing: None
            },
            then: vec![MetaOp::SetVolumeParent {
                volume: t.present,
                parent: None
            }],
        }]
    );
    assert!(
        !plan
            .finish
            .iter()
            .any(|op| matches!(op, MetaOp::SetActiveVolume { .. }))
    );
    assert_eq!(removed_volumes(&plan.finish), vec![t.y, t.x, t.mid, t.base]);
    assert_eq!(plan.drops, vec![t.y, t.x, t.mid, t.base]);
    assert_eq!(
        plan.merges,
        vec![MergeChoice {
            disk_id: t.disk.id(),
            action: MergeAction::Stream,
            commit_bytes: 550 * MIB,
            stream_bytes: 60 * MIB,
            bytes_to_copy: 60 * MIB,
        }]
    );

    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.volumes.len(), 1);
    assert_eq!(graph.active().unwrap().id, t.present);
    assert_eq!(graph.active().unwrap().parent, None);
}

#[test]
fn deleting_all_snapshots_of_a_disk_with_one_volume_copies_nothing() {
    let t = tree(GIB, 50 * MIB, 5 * MIB);
    let mut added = Disk::new(GIB);
    let added_active = added.active(None, 300 * MIB);
    let graphs = [t.disk.build(), added.build()];

    let plan = plan_delete_all_snapshots(new_id(), &ready(&t.snapshots), &graphs).unwrap();

    assert_eq!(plan.merges.len(), 2);
    assert_eq!(
        plan.merges[1],
        MergeChoice {
            disk_id: added.id(),
            action: MergeAction::None,
            commit_bytes: 0,
            stream_bytes: 0,
            bytes_to_copy: 0
        }
    );
    assert!(
        !plan
            .steps
            .iter()
            .any(|s| s.op.written_volumes().contains(&added_active))
    );
    assert!(!plan.drops.contains(&added_active));
    assert_eq!(after(&plan, &graphs)[1].active().unwrap().id, added_active);
}

#[test]
fn deleting_all_snapshots_drops_every_branch_children_before_parents() {
    // A bushy tree: branches of several depths hang off every layer of the present chain.
    let mut disk = Disk::new(GIB);
    let mut snapshots = Vec::new();
    let mut frozen = |disk: &mut Disk, parent: Option<Uuid>| {
        let snapshot = new_id();
        snapshots.push(snapshot);
        disk.frozen(parent, snapshot, 10 * MIB)
    };
    let base = frozen(&mut disk, None);
    let mid = frozen(&mut disk, Some(base));
    let a1 = frozen(&mut disk, Some(base));
    let a2 = frozen(&mut disk, Some(a1));
    let a3 = frozen(&mut disk, Some(a2));
    let b1 = frozen(&mut disk, Some(mid));
    let c1 = frozen(&mut disk, Some(a1));
    let present = disk.active(Some(mid), MIB);
    let graphs = [disk.build()];

    let plan = plan_delete_all_snapshots(new_id(), &ready(&snapshots), &graphs).unwrap();

    assert_store_order(&plan, &graphs);
    let mut dropped = plan.drops.clone();
    dropped.sort();
    let mut expected = vec![a1, a2, a3, b1, c1, mid, present];
    expected.sort();
    assert_eq!(dropped, expected, "commit keeps only the base");
    let graph = &after(&plan, &graphs)[0];
    assert_eq!(graph.volumes.len(), 1);
    assert_eq!(graph.active().unwrap().id, base);
}

// ---------------------------------------------------------------------------------
// Point of no return and running VMs
// ---------------------------------------------------------------------------------

#[test]
fn only_commits_and_grows_have_a_point_of_no_return() {
    let commit_case1 = classic(800 * MIB, 100 * MIB, 10 * MIB);
    let plan = plan_snapshot_delete(
        commit_case1.snap01,
        ResourceStatus::Ready,
        &[commit_case1.disk.build()],
    )
    .unwrap();
    assert_eq!(plan.point_of_no_return(), Some(0));

    let commit_case2 = classic(800 * MIB, 100 * MIB, 10 * MIB);
    let plan = plan_snapshot_delete(
        commit_case2.snap02,
        ResourceStatus::Ready,
        &[commit_case2.disk.build()],
    )
    .unwrap();
    assert_eq!(plan.point_of_no_return(), Some(0));

    let stream = classic(20 * MIB, 300 * MIB, 10 * MIB);
    let plan =
        plan_snapshot_delete(stream.snap01, ResourceStatus::Ready, &[stream.disk.build()]).unwrap();
    assert_eq!(plan.point_of_no_return(), None);

    let r = reverted();
    let plan = plan_snapshot_delete(r.snap02, ResourceStatus::Ready, &[r.disk.build()]).unwrap();
    assert_eq!(plan.point_of_no_return(), None);

    let t = tree(GIB, 50 * MIB, 5 * MIB);
    let plan =
        plan_delete_all_snapshots(new_id(), &ready(&t.snapshots), &[t.disk.build()]).unwrap();
    assert_eq!(plan.point_of_no_return(), Some(0));

    let t = tree(10 * MIB, 50 * MIB, 500 * MIB);
    let plan =
        plan_delete_all_snapshots(new_id(), &ready(&t.snapshots), &[t.disk.build()]).unwrap();
    assert_eq!(plan.point_of_no_return(), None);

    let grow = plan_resize(&t.disk.build(), 100 * GIB).unwrap();
    assert_eq!(grow.point_of_no_return(), Some(0));
}

#[test]
fn a_commit_on_a_second_disk_is_the_point_of_no_return_after_the_first_disks_streams() {
    let stream = classic(20 * MIB, 300 * MIB, 10 * MIB);
    // Same snapshot on a second disk, where committing is cheaper.
    let mut second = Disk::new(GIB);
    let s_l0 = second.frozen(None, stream.snap01, 800 * MIB);
    let s_l1 = second.frozen(Some(s_l0), stream.snap02, MIB);
    second.active(Some(s_l1), MIB);
    let graphs = [stream.disk.build(), second.build()];

    let plan = plan_snapshot_delete(stream.snap01, ResourceStatus::Ready, &graphs).unwrap();

    assert!(matches!(plan.steps[0].op, FileOp::Stream { .. }));
    assert_eq!(
        plan.steps[1].op,
        FileOp::Commit {
            top: s_l1,
            base: s_l0
        }
    );
    assert_eq!(plan.point_of_no_return(), Some(1));
    let actions: Vec<MergeAction> = plan.merges.iter().map(|m| m.action).collect();
    assert_eq!(actions, vec![MergeAction::Stream, MergeAction::Commit]);
    assert_store_order(&plan, &graphs);
    after(&plan, &graphs);
}

#[test]
fn dropping_a_leaf_on_another_branch_leaves_the_active_chain_alone() {
    let r = reverted();
    let graphs = [r.disk.build()];

    let plan = plan_snapshot_delete(r.snap02, ResourceStatus::Ready, &graphs).unwrap();

    assert!(!plan.touches_active_chains(&graphs));
}

#[test]
fn merging_layers_of_another_branch_leaves_the_active_chain_alone() {
    let t = tree(GIB, 50 * MIB, 5 * MIB);
    let graphs = [t.disk.build()];
    // x (s3) has one child y (s4): a merge, but only on the old branch.
    let plan = plan_snapshot_delete(t.snapshots[2], ResourceStatus::Ready, &graphs).unwrap();

    assert!(!plan.steps.is_empty());
    assert!(!plan.touches_active_chains(&graphs));
}

#[test]
fn a_merge_into_the_active_chain_touches_it() {
    for (l0, l1, l2) in [
        (800 * MIB, 100 * MIB, 10 * MIB),
        (20 * MIB, 300 * MIB, 10 * MIB),
    ] {
        for current in [false, true] {
            let c = classic(l0, l1, l2);
            let graphs = [c.disk.build()];
            let snapshot = if current { c.snap02 } else { c.snap01 };
            let plan = plan_snapshot_delete(snapshot, ResourceStatus::Ready, &graphs).unwrap();
            assert!(plan.touches_active_chains(&graphs), "{:?}", plan.merges);
        }
    }
    let t = tree(GIB, 50 * MIB, 5 * MIB);
    let plan =
        plan_delete_all_snapshots(new_id(), &ready(&t.snapshots), &[t.disk.build()]).unwrap();
    assert!(plan.touches_active_chains(&[t.disk.build()]));
}

// ---------------------------------------------------------------------------------
// Ordering the store relies on, over every kind of plan
// ---------------------------------------------------------------------------------

/// Every delete scenario above, as (graphs, plan).
fn delete_plans() -> Vec<(Vec<DiskGraph>, Plan)> {
    let mut plans = Vec::new();
    for (l0, l1, l2) in [
        (800 * MIB, 100 * MIB, 10 * MIB),
        (20 * MIB, 300 * MIB, 10 * MIB),
        (20 * MIB, 10 * MIB, 300 * MIB),
    ] {
        let c = classic(l0, l1, l2);
        for snapshot in [c.snap01, c.snap02] {
            let graphs = vec![c.disk.build()];
            let plan = plan_snapshot_delete(snapshot, ResourceStatus::Ready, &graphs).unwrap();
            plans.push((graphs, plan));
        }
    }
    let r = reverted();
    for snapshot in [r.snap01, r.snap02] {
        let graphs = vec![r.disk.build()];
        let plan = plan_snapshot_delete(snapshot, ResourceStatus::Ready, &graphs).unwrap();
        plans.push((graphs, plan));
    }
    for (base, mid, present) in [(GIB, 50 * MIB, 5 * MIB), (10 * MIB, 50 * MIB, 500 * MIB)] {
        let t = tree(base, mid, present);
        let graphs = vec![t.disk.build()];
        for &snapshot in &t.snapshots {
            plans.push((
                graphs.clone(),
                plan_snapshot_delete(snapshot, ResourceStatus::Ready, &graphs).unwrap(),
            ));
        }
        plans.push((
            graphs.clone(),
            plan_delete_all_snapshots(new_id(), &ready(&t.snapshots), &graphs).unwrap(),
        ));
    }
    plans
}

#[test]
fn a_snapshot_row_is_deleted_before_the_volume_rows_it_referenced() {
    for (graphs, plan) in delete_plans() {
        for op in &plan.finish {
            let MetaOp::DeleteSnapshot { snapshot } = *op else {
                continue;
            };
            let deleted_at = position(&plan.finish, op);
            for disk in &graphs {
                let frozen = disk.frozen_by(snapshot).unwrap().id;
                if let Some(removed_at) = plan
                    .finish
                    .iter()
                    .position(|o| *o == MetaOp::RemoveVolume { volume: frozen })
                {
                    assert!(deleted_at < removed_at, "{plan:#?}");
                }
            }
        }
    }
}

#[test]
fn volume_rows_and_files_are_removed_children_before_parents() {
    for (graphs, plan) in delete_plans() {
        assert_store_order(&plan, &graphs);
    }
    let c = classic(GIB, 100 * MIB, 10 * MIB);
    let graphs = [c.disk.build()];
    let revert = plan_revert(new_id(), c.snap01, &graphs).unwrap();
    assert_store_order(&revert, &graphs);
}

#[test]
fn every_plan_leaves_metadata_the_store_accepts_with_one_owner_per_volume() {
    for (graphs, plan) in delete_plans() {
        let result = after(&plan, &graphs);
        for (before, after) in graphs.iter().zip(&result) {
            assert!(after.active().is_some());
            // What was dropped is gone; nothing else is.
            let kept: Vec<Uuid> = before
                .volumes
                .iter()
                .map(|v| v.id)
                .filter(|id| !plan.drops.contains(id))
                .collect();
            let mut left: Vec<Uuid> = after.volumes.iter().map(|v| v.id).collect();
            left.sort();
            let mut kept_sorted = kept.clone();
            kept_sorted.sort();
            assert_eq!(left, kept_sorted, "{plan:#?}");
        }
    }
}

#[test]
fn a_snapshot_taken_then_deleted_leaves_the_chain_as_it_was() {
    let c = classic(800 * MIB, 100 * MIB, 10 * MIB);
    let graphs = vec![c.disk.build()];
    let snapshot = new_id();

    let take = plan_snapshot_create(new_id(), snapshot, Some(c.snap02), &graphs).unwrap();
    let mut store = Store::from_graphs(&graphs);
    store.run(&take);
    // The new overlay is empty, so deleting the new (current) snapshot commits it.
    let taken = store.graphs();
    let delete = plan_snapshot_delete(snapshot, ResourceStatus::Ready, &taken).unwrap();
    assert_eq!(delete.merges[0].action, MergeAction::Commit);
    store.run(&delete);

    let graph = &store.graphs()[0];
    assert_eq!(graph.active().unwrap().id, c.l2);
    assert_eq!(parent_of(graph, c.l2), Some(c.l1));
    assert_eq!(graph.volumes.len(), 3);
}

// ---------------------------------------------------------------------------------
// Known planner bugs
// ---------------------------------------------------------------------------------

/// Disk grown from 1 GiB to 2 GiB between snap01 and snap02: L0 is 1 GiB, L1 and L2
/// are 2 GiB. L1 is small, so deleting snap01 commits L1 into L0.
fn resized_between_snapshots() -> Classic {
    let mut c = classic(800 * MIB, 100 * MIB, 10 * MIB);
    c.disk.graph.size_bytes = 2 * GIB;
    let (l0, l1, l2) = (c.l0, c.l1, c.l2);
    c.disk.sized(l0, GIB).sized(l1, 2 * GIB).sized(l2, 2 * GIB);
    c
}

// Regression (plan.rs, `commit_child_into`): committing a child into its parent does not record
// the child's virtual size on the parent. `qemu-img commit` grows the base to the top's
// size when the top is larger (checked with qemu-img 10: a 1 MiB base under a 2 MiB top
// is 2 MiB after `commit -d -b`), and the comment in `commit_child_into` says the size
// moves with the content, but no MetaOp updates the surviving volume's `size_bytes`
// (there is no MetaOp that can, for a snapshot-owned volume). The volume row keeps the
// old size, and a later revert to the snapshot that now reads it (which restores the disk
// size "from the frozen volume") shrinks the disk: here snap02 was taken at 2 GiB but
// reverting to it after snap01 is deleted gives a 1 GiB disk (overlay created at 1 GiB).
#[test]
fn reverting_after_a_commit_restores_the_size_of_the_merged_snapshot() {
    let c = resized_between_snapshots();
    let graphs = [c.disk.build()];
    let delete = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &graphs).unwrap();
    assert_eq!(delete.merges[0].action, MergeAction::Commit);
    let mut store = Store::from_graphs(&graphs);
    store.run(&delete);

    let revert = plan_revert(new_id(), c.snap02, &store.graphs()).unwrap();

    assert!(
        matches!(revert.steps[0].op, FileOp::Create { size_bytes, .. } if size_bytes == 2 * GIB),
        "{revert:#?}"
    );
    assert!(
        revert.finish.contains(&MetaOp::SetDiskSize {
            disk: c.disk.id(),
            size_bytes: 2 * GIB
        }),
        "{revert:#?}"
    );
}

// Regression (same root cause, case 2): deleting the current snapshot by commit makes the
// 1 GiB-recorded L0 the 2 GiB disk's active volume; a snapshot taken next freezes L0 with
// that stale 1 GiB, and reverting to it shrinks the disk to 1 GiB.
#[test]
fn committing_the_present_keeps_the_disk_size_on_the_new_active_volume() {
    let snap01 = new_id();
    let mut disk = Disk::new(2 * GIB);
    let l0 = disk.frozen(None, snap01, 800 * MIB);
    let l1 = disk.active(Some(l0), 10 * MIB);
    disk.sized(l0, GIB).sized(l1, 2 * GIB);
    let graphs = [disk.build()];
    let delete = plan_snapshot_delete(snap01, ResourceStatus::Ready, &graphs).unwrap();
    assert_eq!(delete.merges[0].action, MergeAction::Commit);
    let mut store = Store::from_graphs(&graphs);
    store.run(&delete);

    let graph = &store.graphs()[0];
    assert_eq!(graph.active().unwrap().id, l0);
    assert_eq!(
        graph.active().unwrap().size_bytes,
        graph.size_bytes,
        "active volume row disagrees with the disk size"
    );
}

// Regression (same root cause, `plan_delete_all_snapshots`): the commit direction makes the base
// the active volume without recording the disk's current size on it.
#[test]
fn deleting_all_snapshots_by_commit_keeps_the_disk_size_on_the_base() {
    let c = resized_between_snapshots();
    let graphs = [c.disk.build()];
    let plan = plan_delete_all_snapshots(new_id(), &ready(&[c.snap01, c.snap02]), &graphs).unwrap();
    assert_eq!(plan.merges[0].action, MergeAction::Commit);

    let graph = &after(&plan, &graphs)[0];

    assert_eq!(graph.active().unwrap().id, c.l0);
    assert_eq!(graph.active().unwrap().size_bytes, 2 * GIB);
}

/// Snapshot ids paired with the status `ready`, as a request finds them.
fn ready(ids: &[Uuid]) -> Vec<(Uuid, ResourceStatus)> {
    ids.iter().map(|id| (*id, ResourceStatus::Ready)).collect()
}

#[test]
fn undoing_a_retried_delete_restores_the_error_and_rewriting_flags_it_found() {
    // A first delete of snap01 failed half-way through its commit: snap01 is `error`
    // and L0 `rewriting`. A retry (here by stream, the child having grown) that is
    // undone must leave both flagged, or a revert could read half-merged data.
    let mut c = classic(MIB, 100 * MIB, MIB);
    for volume in &mut c.disk.graph.volumes {
        if volume.id == c.l0 {
            volume.status = VolumeStatus::Rewriting;
        }
    }
    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Error, &[c.disk.build()]).unwrap();
    assert_eq!(plan.merges[0].action, MergeAction::Stream);
    assert!(plan.undo.contains(&MetaOp::SetVolumeStatus {
        volume: c.l0,
        status: VolumeStatus::Rewriting
    }));
    assert!(plan.undo.contains(&MetaOp::SetSnapshotStatus {
        snapshot: c.snap01,
        status: ResourceStatus::Error
    }));
    assert!(!plan.undo.iter().any(|op| matches!(
        op,
        MetaOp::SetSnapshotStatus {
            status: ResourceStatus::Ready,
            ..
        }
    )));
}

// ---------------------------------------------------------------------------------
// Linked clones: protection, clone and flatten plans
// ---------------------------------------------------------------------------------

/// The classic chain with a linked clone (VM `reader`) sitting on snap01's layer.
fn classic_read_at_l0() -> (Classic, Uuid, DiskGraph) {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let reader = new_id();
    let mut graph = c.disk.build();
    graph
        .volumes
        .iter_mut()
        .find(|v| v.id == c.l0)
        .unwrap()
        .dependents
        .push(reader);
    (c, reader, graph)
}

#[test]
fn a_clone_protects_its_layer_and_everything_below_but_nothing_above() {
    let (c, reader, graph) = classic_read_at_l0();
    let protected = graph.protected();
    assert_eq!(protected.keys().copied().collect::<Vec<_>>(), vec![c.l0]);
    assert!(protected[&c.l0].contains(&reader));
    // On snap02's layer instead, l1 and l0 are both protected; the present is not.
    let mut graph = c.disk.build();
    graph
        .volumes
        .iter_mut()
        .find(|v| v.id == c.l1)
        .unwrap()
        .dependents
        .push(reader);
    let protected = graph.protected();
    assert!(protected.contains_key(&c.l0) && protected.contains_key(&c.l1));
    assert!(!protected.contains_key(&c.l2));
}

#[test]
fn every_merge_that_rewrites_or_drops_a_read_layer_endangers_its_reader() {
    let (c, reader, graph) = classic_read_at_l0();
    let graphs = [graph];
    // snap01 merged with snap02's layer: l0 is rewritten (commit) or dropped (stream).
    for (l0, l1) in [(700 * MIB, 40 * MIB), (MIB, 40 * MIB)] {
        let c2 = classic(l0, l1, 3 * MIB);
        let mut g = c2.disk.build();
        g.volumes
            .iter_mut()
            .find(|v| v.id == c2.l0)
            .unwrap()
            .dependents
            .push(reader);
        let plan = plan_snapshot_delete(c2.snap01, ResourceStatus::Ready, &[g.clone()]).unwrap();
        assert_eq!(
            plan.endangered_dependents(&[g])
                .into_iter()
                .collect::<Vec<_>>(),
            vec![reader]
        );
    }
    // Collapsing everything, or deleting the disk, endangers it too.
    let all = plan_delete_all_snapshots(
        new_id(),
        &[
            (c.snap01, ResourceStatus::Ready),
            (c.snap02, ResourceStatus::Ready),
        ],
        &graphs,
    )
    .unwrap();
    assert!(all.endangered_dependents(&graphs).contains(&reader));
    let gone = plan_delete_disks(new_id(), &graphs, true, ResourceStatus::Ready);
    assert!(gone.endangered_dependents(&graphs).contains(&reader));
    // Merging snap02 with the present touches neither l0 nor anything the reader reads.
    let safe = plan_snapshot_delete(c.snap02, ResourceStatus::Ready, &graphs).unwrap();
    assert!(safe.endangered_dependents(&graphs).is_empty());
}

#[test]
fn a_linked_clone_of_the_present_freezes_it_and_sits_on_it() {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let (vm, disk) = (new_id(), new_id());
    let plan = plan_clone(
        &[(
            vm,
            vec![CloneDisk {
                disk,
                source: c.l2,
                size_bytes: 10 * GIB,
                copy_bytes: 0,
            }],
        )],
        CloneMode::Linked,
        &[Freeze {
            disk: c.disk.id(),
            active: c.l2,
            size_bytes: 10 * GIB,
        }],
    );
    let ops = file_ops(&plan);
    assert_eq!(ops.len(), 2);
    let (
        FileOp::Create {
            volume: new_top,
            backing: Some(b1),
            ..
        },
        FileOp::Create {
            volume: clone_top,
            backing: Some(b2),
            ..
        },
    ) = (&ops[0], &ops[1])
    else {
        panic!("{ops:?}")
    };
    assert_eq!(
        (*b1, *b2),
        (c.l2, c.l2),
        "both overlays sit on the frozen present"
    );
    assert!(plan.finish.contains(&MetaOp::SetActiveVolume {
        disk: c.disk.id(),
        volume: *new_top
    }));
    assert!(plan.finish.contains(&MetaOp::SetActiveVolume {
        disk,
        volume: *clone_top
    }));
    assert!(plan.finish.contains(&MetaOp::SetVmStatus {
        vm,
        status: ResourceStatus::Ready
    }));
    assert_eq!(plan.undo, vec![MetaOp::DeleteVm { vm }]);
    // Nothing is copied and nothing of the source is rewritten or dropped.
    assert!(!plan.copies_data());
    assert!(plan.drops.is_empty());
    // In the source's records, the frozen present keeps its row and gets the new
    // writable layer on top: with no snapshot naming it, it reads as a shared layer.
    assert!(plan.finish.contains(&MetaOp::InsertVolume {
        volume: *new_top,
        disk: c.disk.id(),
        parent: Some(c.l2),
        size_bytes: 10 * GIB,
    }));
    assert!(!all_ops(&plan).iter().any(|op| matches!(
        op,
        MetaOp::SetSnapshotVolume { .. } | MetaOp::RemoveVolume { .. }
    )));
}

#[test]
fn a_full_clone_copies_each_disk_into_a_standalone_file() {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let (vm, disk) = (new_id(), new_id());
    let plan = plan_clone(
        &[(
            vm,
            vec![CloneDisk {
                disk,
                source: c.l1,
                size_bytes: 10 * GIB,
                copy_bytes: 740 * MIB,
            }],
        )],
        CloneMode::Full,
        &[],
    );
    let ops = file_ops(&plan);
    assert!(matches!(ops.as_slice(), [FileOp::Convert { source, .. }] if *source == c.l1));
    assert!(plan.copies_data());
    assert!(plan.space_needed >= 740 * MIB);
    let created = ops[0].created_volume().unwrap();
    assert!(plan.finish.contains(&MetaOp::InsertVolume {
        volume: created,
        disk,
        parent: None,
        size_bytes: 10 * GIB
    }));
}

#[test]
fn a_full_clone_of_the_present_works_from_a_temporary_layer_it_drops_afterwards() {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let (vm, disk) = (new_id(), new_id());
    let plan = plan_clone(
        &[(
            vm,
            vec![CloneDisk {
                disk,
                source: c.l2,
                size_bytes: 10 * GIB,
                copy_bytes: 743 * MIB,
            }],
        )],
        CloneMode::Full,
        &[Freeze {
            disk: c.disk.id(),
            active: c.l2,
            size_bytes: 10 * GIB,
        }],
    );
    let ops = file_ops(&plan);
    let [
        FileOp::Create {
            volume: temporary,
            backing: Some(frozen),
            ..
        },
        FileOp::Convert { source, .. },
    ] = ops.as_slice()
    else {
        panic!("{ops:?}")
    };
    assert_eq!(
        (*frozen, *source),
        (c.l2, c.l2),
        "the copy reads the frozen present"
    );
    assert_eq!(plan.drops, vec![*temporary]);
    // The temporary layer never enters the source's records: its chain is unchanged.
    assert!(!all_ops(&plan).iter().any(|op| matches!(
        op,
        MetaOp::InsertVolume { disk: d, .. } | MetaOp::SetActiveVolume { disk: d, .. } if *d == c.disk.id()
    )));
    assert!(
        plan.point_of_no_return().is_none(),
        "cancellable to the end"
    );
}

#[test]
fn flattening_streams_the_lowest_layer_onto_nothing_and_only_for_a_linked_disk() {
    let source_volume = new_id();
    let mut linked = Disk::new(GIB);
    let root = linked.frozen(Some(source_volume), new_id(), MIB);
    linked.active(Some(root), MIB);
    let plan = plan_flatten(&linked.build(), 300 * MIB).unwrap();
    assert_eq!(
        file_ops(&plan),
        vec![FileOp::Stream {
            volume: root,
            from: Some(source_volume),
            backing: None
        }]
    );
    assert_eq!(plan.space_needed, 300 * MIB);
    let mut standalone = Disk::new(GIB);
    standalone.active(None, MIB);
    assert!(plan_flatten(&standalone.build(), 0).is_none());
}

#[test]
fn flattening_a_disk_that_sits_on_its_source_twice_cuts_both_links() {
    // A snapshot deletion streamed the disk's lowest layer, a branch point, into both
    // branches: each now sits on the source's layer.
    let source_volume = new_id();
    let mut linked = Disk::new(GIB);
    let branch = linked.frozen(Some(source_volume), new_id(), MIB);
    let present = linked.active(Some(source_volume), MIB);
    let graph = linked.build();
    assert_eq!(graph.link_sources(), vec![source_volume]);

    let plan = plan_flatten(&graph, 300 * MIB).unwrap();

    let mut streamed: Vec<Uuid> = file_ops(&plan)
        .into_iter()
        .map(|op| match op {
            FileOp::Stream {
                volume,
                from,
                backing,
            } => {
                assert_eq!((from, backing), (Some(source_volume), None));
                volume
            }
            other => panic!("unexpected step {other:?}"),
        })
        .collect();
    streamed.sort();
    let mut expected = vec![branch, present];
    expected.sort();
    assert_eq!(streamed, expected);
    let left = after(&plan, &[graph]);
    assert!(left[0].links().is_empty(), "no volume reads the source");
}

#[test]
fn collapsing_a_linked_disk_keeps_its_link_instead_of_copying_the_source() {
    let source_volume = new_id();
    let mut disk = Disk::new(GIB);
    let root = disk.frozen(Some(source_volume), new_id(), MIB);
    let top = disk.active(Some(root), 500 * MIB);
    let snapshot = match disk.build().get(root).unwrap().owner {
        Owner::Snapshot(s) => s,
        _ => unreachable!(),
    };
    let plan = plan_delete_all_snapshots(
        new_id(),
        &[(snapshot, ResourceStatus::Ready)],
        &[disk.build()],
    )
    .unwrap();
    // The root is small: it is streamed up, onto the source's volume, never onto nothing.
    assert_eq!(
        file_ops(&plan),
        vec![FileOp::Stream {
            volume: top,
            from: Some(root),
            backing: Some(source_volume)
        }]
    );
}

#[test]
fn reverting_away_from_a_shared_layer_nobody_reads_drops_it_with_the_present() {
    // snap01's layer, the present frozen for a linked clone that is gone since (a
    // shared layer nobody reads), and the present on top of it.
    let snap01 = new_id();
    let mut disk = Disk::new(GIB);
    let l0 = disk.frozen(None, snap01, 10 * MIB);
    let shared = disk.volume(Some(l0), 5 * MIB, Owner::Shared);
    let present = disk.active(Some(shared), MIB);

    let plan = plan_revert(new_id(), snap01, &[disk.build()]).unwrap();
    assert_eq!(plan.drops, vec![present, shared]);
    assert!(
        plan.finish
            .contains(&MetaOp::RemoveVolume { volume: shared })
    );

    // Still read by a linked clone: it stays.
    disk.graph
        .volumes
        .iter_mut()
        .find(|v| v.id == shared)
        .unwrap()
        .dependents
        .push(new_id());
    let plan = plan_revert(new_id(), snap01, &[disk.build()]).unwrap();
    assert_eq!(plan.drops, vec![present]);
}

#[test]
fn a_shared_layer_under_a_snapshot_is_kept_when_the_present_goes() {
    // A snapshot was taken on top of the shared layer: the layer is part of what that
    // snapshot shows.
    let (snap01, snap02) = (new_id(), new_id());
    let mut disk = Disk::new(GIB);
    let l0 = disk.frozen(None, snap01, 10 * MIB);
    let shared = disk.volume(Some(l0), 5 * MIB, Owner::Shared);
    let l2 = disk.frozen(Some(shared), snap02, MIB);
    let present = disk.active(Some(l2), MIB);
    let plan = plan_revert(new_id(), snap01, &[disk.build()]).unwrap();
    assert_eq!(plan.drops, vec![present]);
}

/// A VM reverted to snap01 after a linked clone froze its present and snap02 was
/// taken on top: snap01's layer carries the present, and the shared layer carries
/// only snap02's layer. Returns (disk, snap01, snap02, l0, shared, l2, present).
fn shared_layer_under_a_reverted_away_snapshot() -> (Disk, Uuid, Uuid, Uuid, Uuid, Uuid, Uuid) {
    let (snap01, snap02) = (new_id(), new_id());
    let mut disk = Disk::new(GIB);
    let l0 = disk.frozen(None, snap01, 10 * MIB);
    let shared = disk.volume(Some(l0), 5 * MIB, Owner::Shared);
    let l2 = disk.frozen(Some(shared), snap02, MIB);
    let present = disk.active(Some(l0), MIB);
    (disk, snap01, snap02, l0, shared, l2, present)
}

#[test]
fn deleting_the_last_snapshot_on_a_shared_layer_drops_the_layer_too() {
    let (disk, _, snap02, _, shared, l2, _) = shared_layer_under_a_reverted_away_snapshot();
    let graphs = [disk.build()];

    let plan = plan_snapshot_delete(snap02, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(plan.drops, vec![l2, shared]);
    assert_store_order(&plan, &graphs);
    let left = after(&plan, &graphs);
    assert!(left[0].get(shared).is_none());
    assert_eq!(
        left[0].volumes.len(),
        2,
        "snap01's layer and the present stay"
    );
}

#[test]
fn a_shared_layer_a_linked_clone_still_reads_outlives_the_snapshot_above_it() {
    let (mut disk, _, snap02, _, shared, l2, _) = shared_layer_under_a_reverted_away_snapshot();
    let clone = new_id();
    disk.graph
        .volumes
        .iter_mut()
        .find(|v| v.id == shared)
        .unwrap()
        .dependents
        .push(clone);
    let graphs = [disk.build()];

    let plan = plan_snapshot_delete(snap02, ResourceStatus::Ready, &graphs).unwrap();
    assert_eq!(plan.drops, vec![l2]);

    // The clone goes later: its deletion's plan (which only names the clone's own
    // disks) drops the layer once nothing else reads it.
    let after_delete = after(&plan, &graphs).remove(0);
    let with_dependent = DiskGraph {
        volumes: after_delete
            .volumes
            .into_iter()
            .map(|mut v| {
                if v.id == shared {
                    v.dependents = vec![clone];
                }
                v
            })
            .collect(),
        ..after_delete
    };
    let mut clone_delete = Plan::default();
    clone_delete.drop_unread_shared_layers(&with_dependent, &[clone]);
    assert_eq!(clone_delete.drops, vec![shared]);
    assert_eq!(
        clone_delete.finish,
        vec![MetaOp::RemoveVolume { volume: shared }]
    );
    // Another clone still on it: it stays.
    let mut other_clone_stays = Plan::default();
    other_clone_stays.drop_unread_shared_layers(&with_dependent, &[new_id()]);
    assert!(other_clone_stays.drops.is_empty());
}

#[test]
fn stacked_shared_layers_nobody_reads_are_dropped_top_down() {
    // Two linked clones of the present in a row froze two shared layers, a snapshot was
    // taken on top, the VM reverted to snap01: deleting the snapshot leaves both unread.
    let (snap01, snap02) = (new_id(), new_id());
    let mut disk = Disk::new(GIB);
    let l0 = disk.frozen(None, snap01, 10 * MIB);
    let lower = disk.volume(Some(l0), 5 * MIB, Owner::Shared);
    let upper = disk.volume(Some(lower), 5 * MIB, Owner::Shared);
    let l3 = disk.frozen(Some(upper), snap02, MIB);
    disk.active(Some(l0), MIB);
    let graphs = [disk.build()];

    let plan = plan_snapshot_delete(snap02, ResourceStatus::Ready, &graphs).unwrap();

    assert_eq!(plan.drops, vec![l3, upper, lower]);
    assert_store_order(&plan, &graphs);
    after(&plan, &graphs);
}

#[test]
fn a_shared_layer_another_snapshot_or_the_present_sits_on_is_never_dropped() {
    // The present sits on the shared layer: merging snap02 away keeps it.
    let (snap01, snap02) = (new_id(), new_id());
    let mut disk = Disk::new(GIB);
    let l0 = disk.frozen(None, snap01, 10 * MIB);
    let shared = disk.volume(Some(l0), 5 * MIB, Owner::Shared);
    let l2 = disk.frozen(Some(shared), snap02, MIB);
    let present = disk.active(Some(l2), 2 * MIB);
    let graphs = [disk.build()];
    let plan = plan_snapshot_delete(snap02, ResourceStatus::Ready, &graphs).unwrap();
    assert!(!plan.drops.contains(&shared), "{plan:#?}");
    let left = after(&plan, &graphs);
    assert_eq!(
        left[0].chain_from(present).len(),
        3,
        "the present still reads through the shared layer"
    );
    // Deleting snap01 merges the shared layer down into snap01's: its content stays.
    let plan = plan_snapshot_delete(snap01, ResourceStatus::Ready, &graphs).unwrap();
    assert_eq!(
        plan.steps[0].op,
        FileOp::Commit {
            top: shared,
            base: l0
        }
    );
    // Deleting every snapshot merges the whole chain into one file: no layer is left
    // behind, shared or not.
    let all = plan_delete_all_snapshots(
        new_id(),
        &[
            (snap01, ResourceStatus::Ready),
            (snap02, ResourceStatus::Ready),
        ],
        &graphs,
    )
    .unwrap();
    let left = after(&all, &graphs);
    assert_eq!(left[0].volumes.len(), 1);
}

// ---------------------------------------------------------------------------------
// Live merges (a running VM reached through its QEMU)
// ---------------------------------------------------------------------------------

#[test]
fn a_live_delete_of_a_middle_layer_is_committed_by_qemu_which_repoints_the_layer_above() {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let graphs = [c.disk.build()];
    let vm = new_id();
    let plan =
        plan_live_snapshot_delete(vm, c.snap01, ResourceStatus::Ready, &graphs, false).unwrap();
    // The repoint of l2 is QEMU's (block-commit's backing-file), recorded with the step.
    assert_eq!(
        file_ops(&plan),
        [FileOp::LiveCommit {
            vm,
            top: c.l1,
            base: c.l0,
            above: Some(c.l2),
        }]
    );
    assert!(plan.steps[0].then.contains(&MetaOp::SetVolumeParent {
        volume: c.l2,
        parent: Some(c.l0),
    }));
    assert!(!plan.writes_offline_into_active_chains(&graphs));
    assert_eq!(plan.point_of_no_return(), Some(0));
    assert_store_order(&plan, &graphs);
}

#[test]
fn a_live_delete_of_the_newest_snapshot_pivots_only_where_qemu_can_pause() {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let graphs = [c.disk.build()];
    let vm = new_id();
    let pivot =
        plan_live_snapshot_delete(vm, c.snap02, ResourceStatus::Ready, &graphs, true).unwrap();
    assert_eq!(
        file_ops(&pivot),
        [FileOp::LiveCommit {
            vm,
            top: c.l2,
            base: c.l1,
            above: None,
        }]
    );
    assert_eq!(pivot.merges[0].action, MergeAction::Commit);
    // Without a pause the snapshot's layer is streamed up, though it costs more.
    let stream =
        plan_live_snapshot_delete(vm, c.snap02, ResourceStatus::Ready, &graphs, false).unwrap();
    assert_eq!(
        file_ops(&stream),
        [FileOp::LiveStream {
            vm,
            volume: c.l2,
            from: c.l1,
            backing: Some(c.l0),
        }]
    );
    assert_eq!(stream.merges[0].action, MergeAction::Stream);
    for plan in [&pivot, &stream] {
        assert!(!plan.writes_offline_into_active_chains(&graphs));
        assert_store_order(plan, &graphs);
    }
}

#[test]
fn a_live_plan_leaves_the_merges_of_layers_qemu_has_not_open_to_qemu_img() {
    // x and y sit on the base beside the present chain: QEMU does not read them.
    let t = tree(100 * MIB, 200 * MIB, 3 * MIB);
    let graphs = [t.disk.build()];
    let vm = new_id();
    let plan = plan_live_snapshot_delete(vm, t.snapshots[2], ResourceStatus::Ready, &graphs, true)
        .unwrap();
    assert!(!plan.is_live(), "{:?}", file_ops(&plan));
    assert!(!plan.writes_offline_into_active_chains(&graphs));
    // Deleting everything: QEMU collapses the present chain, the branch is dropped.
    let all = plan_live_delete_all_snapshots(
        vm,
        &t.snapshots
            .iter()
            .map(|s| (*s, ResourceStatus::Ready))
            .collect::<Vec<_>>(),
        &graphs,
        true,
    )
    .unwrap();
    assert_eq!(
        file_ops(&all),
        [FileOp::LiveCommit {
            vm,
            top: t.present,
            base: t.base,
            above: None,
        }]
    );
    assert!(all.drops.contains(&t.x) && all.drops.contains(&t.y));
    assert_store_order(&all, &graphs);
}

#[test]
fn an_offline_plan_on_the_present_chain_is_seen_writing_files_qemu_has_open() {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let graphs = [c.disk.build()];
    let plan = plan_snapshot_delete(c.snap01, ResourceStatus::Ready, &graphs).unwrap();
    assert!(plan.writes_offline_into_active_chains(&graphs));
}

#[test]
fn a_live_linked_clone_switches_the_source_onto_its_new_layers_last() {
    let c = classic(700 * MIB, 40 * MIB, 3 * MIB);
    let (vm, clone, clone_disk) = (new_id(), new_id(), new_id());
    let freeze = [Freeze {
        disk: c.disk.id(),
        active: c.l2,
        size_bytes: 10 * GIB,
    }];
    let disks = vec![CloneDisk {
        disk: clone_disk,
        source: c.l2,
        size_bytes: 10 * GIB,
        copy_bytes: 0,
    }];
    let plan = plan_live_linked_clone(vm, &[(clone, disks)], &freeze, None);
    let ops = file_ops(&plan);
    let FileOp::Create { volume: layer, .. } = ops[0] else {
        panic!("{ops:?}")
    };
    let overlays = vec![LiveOverlay {
        disk: c.disk.id(),
        active: c.l2,
        overlay: layer,
    }];
    assert!(matches!(ops[1], FileOp::Create { backing: Some(b), .. } if b == c.l2));
    assert_eq!(
        ops[2],
        FileOp::LiveAdd {
            vm,
            overlays: overlays.clone()
        }
    );
    assert_eq!(
        ops[3],
        FileOp::LiveSwitch {
            vm,
            overlays,
            snapshot: None,
            freeze: None,
        }
    );
    assert_eq!(plan.point_of_no_return(), Some(3));
    assert!(plan.finish.contains(&MetaOp::SetActiveVolume {
        disk: c.disk.id(),
        volume: layer,
    }));
}
