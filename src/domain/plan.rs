//! The chain planner: given the volume trees of a VM's disks, decide which files to
//! create, merge, repoint and drop for one operation, and which metadata changes go
//! with each step. Plans are pure data (serialised into the job journal before any file
//! is touched) so the job engine can replay them after a crash.
//!
//! Safety rules the planner enforces:
//! - a file's own content is only rewritten (`Commit` into it) when nothing but the
//!   doomed snapshot and the chain being merged reads it, i.e. never a branch point;
//! - every step keeps the guest-visible content of every remaining chain identical, so
//!   any prefix of a plan leaves metadata and files describing the same bytes;
//! - files are dropped only after the metadata that referenced them is gone.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::image::ImageFormat;
use super::{Quiesce, ResourceStatus, Uuid, VmKind, VolumeStatus, new_id};

/// Who reads a volume as its own content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The writable top of a disk.
    Active,
    /// The layer a snapshot froze.
    Snapshot(Uuid),
    /// A frozen layer no snapshot names: the present state a linked clone was taken
    /// from. The source's chain keeps it under its new writable layer, and the clones
    /// read it as their base.
    Shared,
}

/// One qcow2 file as the planner sees it.
#[derive(Debug, Clone)]
pub struct VolumeNode {
    pub id: Uuid,
    pub parent: Option<Uuid>,
    pub size_bytes: u64,
    /// Bytes the file occupies on disk: the upper bound of what a merge copies out of it.
    pub allocated_bytes: u64,
    pub owner: Owner,
    /// Status before the plan: what an undo restores (a half-merged `rewriting` layer
    /// must stay flagged even if a later attempt is rolled back).
    pub status: VolumeStatus,
    /// VMs with a volume of their own directly on this one (linked clones, VMs deployed
    /// from a template): they read this file and everything below it.
    pub dependents: Vec<Uuid>,
}

/// All volumes of one disk (a tree rooted at the base image).
#[derive(Debug, Clone)]
pub struct DiskGraph {
    pub disk_id: Uuid,
    pub size_bytes: u64,
    pub volumes: Vec<VolumeNode>,
}

impl DiskGraph {
    pub fn get(&self, id: Uuid) -> Option<&VolumeNode> {
        self.volumes.iter().find(|v| v.id == id)
    }

    pub fn children(&self, id: Uuid) -> Vec<&VolumeNode> {
        self.volumes
            .iter()
            .filter(|v| v.parent == Some(id))
            .collect()
    }

    pub fn active(&self) -> Option<&VolumeNode> {
        self.volumes.iter().find(|v| v.owner == Owner::Active)
    }

    pub fn frozen_by(&self, snapshot: Uuid) -> Option<&VolumeNode> {
        self.volumes
            .iter()
            .find(|v| v.owner == Owner::Snapshot(snapshot))
    }

    /// The chain from `top` down to the base, top first.
    pub fn chain_from(&self, top: Uuid) -> Vec<&VolumeNode> {
        let mut chain = Vec::new();
        let mut next = self.get(top);
        while let Some(volume) = next {
            chain.push(volume);
            next = volume.parent.and_then(|p| self.get(p));
        }
        chain
    }

    /// Every volume that linked clones read (the one they sit on and all below it),
    /// with the VMs reading it.
    pub fn protected(&self) -> BTreeMap<Uuid, BTreeSet<Uuid>> {
        let mut protected: BTreeMap<Uuid, BTreeSet<Uuid>> = BTreeMap::new();
        for volume in self.volumes.iter().filter(|v| !v.dependents.is_empty()) {
            for below in self.chain_from(volume.id) {
                protected
                    .entry(below.id)
                    .or_default()
                    .extend(volume.dependents.iter().copied());
            }
        }
        protected
    }

    /// The lowest volume of the disk's own tree, and the volume of another disk it
    /// sits on if the disk is a linked clone.
    pub fn root(&self) -> Option<&VolumeNode> {
        self.volumes
            .iter()
            .find(|v| v.parent.is_none_or(|p| self.get(p).is_none()))
    }

    /// The volumes that sit on a volume of another disk (a linked clone's source).
    /// Usually one, the disk's lowest layer; a snapshot deletion that streams a branch
    /// point at the bottom onto the source leaves one per branch.
    pub fn links(&self) -> Vec<&VolumeNode> {
        self.volumes
            .iter()
            .filter(|v| v.parent.is_some_and(|p| self.get(p).is_none()))
            .collect()
    }

    /// The source volumes this disk's links sit on, each once.
    pub fn link_sources(&self) -> Vec<Uuid> {
        let mut sources: Vec<Uuid> = self.links().iter().filter_map(|v| v.parent).collect();
        sources.sort();
        sources.dedup();
        sources
    }

    /// Volume ids with every child listed before its parent, so drops never orphan a
    /// file that still has something on top of it.
    fn leaves_first(&self, ids: &[Uuid]) -> Vec<Uuid> {
        let depth = |id: Uuid| self.chain_from(id).len();
        let mut sorted = ids.to_vec();
        sorted.sort_by_key(|id| std::cmp::Reverse(depth(*id)));
        sorted
    }
}

/// A file operation, executed by the job engine with qemu-img. Each is idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FileOp {
    /// Create an empty qcow2 file, optionally on top of a backing volume.
    Create {
        volume: Uuid,
        backing: Option<Uuid>,
        size_bytes: u64,
    },
    /// Copy the clusters of `top` (and any layers between) down into `base`.
    Commit { top: Uuid, base: Uuid },
    /// Copy into `volume` whatever its current backing `from` shows and `backing` does
    /// not, then point it at `backing` (`None`: make it standalone). Safe rebase.
    ///
    /// `from` is kept until the plan is over, and it is what makes the step safe to
    /// interrupt: qemu-img writes the new backing pointer into the header before the
    /// cluster tables of what it copied reach the file, so a killed rebase leaves a
    /// file that reads neither way. Pointing the file back at `from` (the clusters it
    /// did map equal what `from` shows) restores what it read before. (`None` only in
    /// plans journaled before it was recorded: then the volume's recorded parent, which
    /// the records keep until the step is done.)
    Stream {
        volume: Uuid,
        #[serde(default)]
        from: Option<Uuid>,
        backing: Option<Uuid>,
    },
    /// Only rewrite the backing pointer; the caller guarantees identical content.
    Repoint { volume: Uuid, backing: Uuid },
    /// Grow the virtual size.
    Resize { volume: Uuid, size_bytes: u64 },
    /// Write a new standalone file with what the chain topped by `source` shows (sparse:
    /// zero clusters are not written). A full clone.
    Convert { source: Uuid, volume: Uuid },
    /// Write a new qcow2 file from an uploaded image (untrusted; its header and
    /// `qemu-img info`/`check` passed when it was accepted), read as `format`.
    Import {
        upload: Uuid,
        format: ImageFormat,
        volume: Uuid,
    },
    /// Open each overlay (made by earlier `Create` steps) in the running VM's QEMU,
    /// beside its disk, after checking QEMU reads exactly the recorded chains. Changes
    /// nothing the guest reads; undone by closing the nodes again.
    LiveAdd {
        vm: Uuid,
        overlays: Vec<LiveOverlay>,
    },
    /// Switch every disk of the running VM onto its overlay at one instant (one QMP
    /// transaction): from then on the guest writes into the overlays, so the job can
    /// only go forward. Redone, it finds the switch made and does nothing; with no QEMU
    /// left to ask (the VM stopped), the overlays are right to record either way (an
    /// overlay QEMU never wrote reads exactly as the layer below it).
    ///
    /// With `freeze`, the guest agent freezes the guest's file systems right before
    /// the transaction and thaws them right after its answer, in this step: no journal
    /// write ever happens while the guest is frozen. A required freeze that fails, or a
    /// transaction QEMU refuses, changed nothing: the job is undone as if it had
    /// stopped before this step. The snapshot's consistency is recorded once the
    /// switch is made.
    LiveSwitch {
        vm: Uuid,
        overlays: Vec<LiveOverlay>,
        /// The snapshot whose consistency is recorded; none for the layer a linked
        /// clone of the present sits on.
        snapshot: Option<Uuid>,
        #[serde(default)]
        freeze: Option<Quiesce>,
    },
    /// Grow a running VM's disk through its QEMU (`block_resize`), so the guest sees the
    /// new size; offline (as `Resize`) once the VM is marked stopped.
    LiveResize {
        vm: Uuid,
        volume: Uuid,
        size_bytes: u64,
    },
    /// `Commit` of layers the running VM's QEMU reads, done by QEMU (`block-commit`):
    /// `above` is the layer QEMU reads on top of `top`, which QEMU points at `base` by
    /// its relative name. With no `above`, `top` is the disk's active layer: once the
    /// copy has converged QEMU switches the disk onto `base` (the pivot), the guest
    /// paused from before the switch until strata has recorded it. Until that record
    /// `top` over `base` is the disk; after it, `base` alone (`top` is never read again).
    /// With the VM stopped, it is finished offline from the files, which all stay until
    /// the plan is over.
    LiveCommit {
        vm: Uuid,
        top: Uuid,
        base: Uuid,
        above: Option<Uuid>,
    },
    /// Copy what each source disk of the running VM shows now into a new standalone file
    /// (made by an earlier `Create`), by QEMU: `blockdev-backup` with `sync: full`
    /// started for every disk in one transaction, so the copies are of one instant.
    /// Redone with no QEMU job under way, the copies start over on fresh files; with the
    /// VM stopped, each is made offline (`Convert`) from the files as the VM left them.
    /// With `freeze`, the guest's file systems are frozen around the transaction that
    /// starts the copies, as for `LiveSwitch`.
    LiveCopy {
        vm: Uuid,
        copies: Vec<LiveCopy>,
        #[serde(default)]
        freeze: Option<Quiesce>,
    },
    /// `Stream` into `volume`, a layer the running VM's QEMU reads, done by QEMU
    /// (`block-stream`, which then points `volume` at `backing` by its relative name).
    /// `from` (the layer `volume` reads now) stays until the plan is over: QEMU writes
    /// the new backing name before it writes the tables of what it copied, so until
    /// `volume`'s file maps those clusters on disk, `volume` over `from` is the disk.
    LiveStream {
        vm: Uuid,
        volume: Uuid,
        from: Uuid,
        backing: Option<Uuid>,
    },
}

/// One disk of a live full clone: the source disk's active layer (QEMU's node for the
/// disk) and the new file the copy goes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveCopy {
    pub source: Uuid,
    pub volume: Uuid,
    pub size_bytes: u64,
}

/// One disk of a live snapshot: the layer QEMU writes now and the overlay that takes
/// over from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveOverlay {
    pub disk: Uuid,
    pub active: Uuid,
    pub overlay: Uuid,
}

impl FileOp {
    /// A commit rewrites its base: once one starts, the doomed snapshot's own content is
    /// gone and the job can only go forward. A grow cannot be taken back either (the
    /// file's new size is in its header once qemu-img is done), so a cancel arriving
    /// while it runs is refused rather than accepted and not honoured.
    pub fn is_point_of_no_return(&self) -> bool {
        matches!(
            self,
            FileOp::Commit { .. }
                | FileOp::Resize { .. }
                | FileOp::LiveSwitch { .. }
                | FileOp::LiveResize { .. }
                // QEMU points the layer above at the new backing itself: the graph
                // cannot be put back as it was.
                | FileOp::LiveCommit { .. }
                | FileOp::LiveStream { .. }
        )
    }

    /// Steps whose child process may be killed at any moment without changing what any
    /// chain reads (a partial safe rebase only adds clusters equal to the old backing).
    pub fn is_interruptible(&self) -> bool {
        matches!(
            self,
            FileOp::Create { .. }
                | FileOp::Stream { .. }
                | FileOp::Convert { .. }
                | FileOp::Import { .. }
                | FileOp::LiveCopy { .. }
        )
    }

    /// Whether the operation works through a running VM's QEMU.
    pub fn is_live(&self) -> bool {
        matches!(
            self,
            FileOp::LiveAdd { .. }
                | FileOp::LiveSwitch { .. }
                | FileOp::LiveResize { .. }
                | FileOp::LiveCommit { .. }
                | FileOp::LiveStream { .. }
                | FileOp::LiveCopy { .. }
        )
    }

    /// The file this operation brings into existence, which an undo removes.
    pub fn created_volume(&self) -> Option<Uuid> {
        match *self {
            FileOp::Create { volume, .. }
            | FileOp::Convert { volume, .. }
            | FileOp::Import { volume, .. } => Some(volume),
            _ => None,
        }
    }

    /// The volumes whose files this operation writes (content or header).
    pub fn written_volumes(&self) -> Vec<Uuid> {
        match *self {
            FileOp::Create { volume, .. }
            | FileOp::Stream { volume, .. }
            | FileOp::Repoint { volume, .. }
            | FileOp::Resize { volume, .. }
            | FileOp::Convert { volume, .. }
            | FileOp::Import { volume, .. } => vec![volume],
            FileOp::Commit { top, base } => vec![top, base],
            FileOp::LiveAdd { .. } => vec![],
            FileOp::LiveResize { volume, .. } => vec![volume],
            FileOp::LiveCommit {
                top, base, above, ..
            } => [Some(top), Some(base), above]
                .into_iter()
                .flatten()
                .collect(),
            FileOp::LiveStream { volume, .. } => vec![volume],
            FileOp::LiveCopy { ref copies, .. } => copies.iter().map(|c| c.volume).collect(),
            // QEMU writes the overlays from the switch on.
            FileOp::LiveSwitch { ref overlays, .. } => overlays.iter().map(|o| o.overlay).collect(),
        }
    }
}

/// A metadata change, applied by the store in the same transaction that records the
/// step (or the job's end) in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum MetaOp {
    InsertVolume {
        volume: Uuid,
        disk: Uuid,
        parent: Option<Uuid>,
        size_bytes: u64,
    },
    SetVolumeParent {
        volume: Uuid,
        parent: Option<Uuid>,
    },
    SetVolumeStatus {
        volume: Uuid,
        status: VolumeStatus,
    },
    /// Record a volume's virtual size (a commit grows the base to the top's size).
    SetVolumeSize {
        volume: Uuid,
        size_bytes: u64,
    },
    /// Remove a volume row; references to it must already be gone.
    RemoveVolume {
        volume: Uuid,
    },
    SetActiveVolume {
        disk: Uuid,
        volume: Uuid,
    },
    SetSnapshotVolume {
        snapshot: Uuid,
        disk: Uuid,
        volume: Uuid,
    },
    SetSnapshotStatus {
        snapshot: Uuid,
        status: ResourceStatus,
    },
    SetSnapshotParent {
        snapshot: Uuid,
        parent: Option<Uuid>,
    },
    /// Delete a snapshot row: its children move to its parent, and a VM whose current
    /// snapshot it was now grows from that parent.
    DeleteSnapshot {
        snapshot: Uuid,
    },
    SetCurrentSnapshot {
        vm: Uuid,
        snapshot: Option<Uuid>,
    },
    SetDiskStatus {
        disk: Uuid,
        status: ResourceStatus,
    },
    SetDiskSize {
        disk: Uuid,
        size_bytes: u64,
    },
    DeleteDisk {
        disk: Uuid,
    },
    SetVmStatus {
        vm: Uuid,
        status: ResourceStatus,
    },
    DeleteVm {
        vm: Uuid,
    },
    /// Mark a VM or template changed (its `updated_at`): a template's exports are
    /// made again after a job rewrote its files.
    TouchVm {
        vm: Uuid,
    },
    /// Turn a VM into a template or back (same record, nothing copied).
    SetVmKind {
        vm: Uuid,
        kind: VmKind,
    },
}

/// One step of a plan: a file operation and the metadata that describes its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub op: FileOp,
    #[serde(default)]
    pub then: Vec<MetaOp>,
}

string_enum!(
    /// How one disk's layers are merged when a snapshot goes away (shown in the job).
    MergeAction {
        /// Nothing reads the layer any more: its file is removed, nothing is copied.
        Drop => "drop",
        /// The child's clusters were committed down into the snapshot's layer.
        Commit => "commit",
        /// The snapshot's clusters were streamed up into the child (safe rebase).
        Stream => "stream",
        /// The snapshot did not cover this disk, or there was nothing to merge.
        None => "none",
    }
);

/// The planner's choice for one disk, with the estimates it compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeChoice {
    pub disk_id: Uuid,
    pub action: MergeAction,
    /// Upper bound of bytes copied by committing the upper side down.
    pub commit_bytes: u64,
    /// Upper bound of bytes copied by streaming the lower side up (all children).
    pub stream_bytes: u64,
    /// What the chosen action copies (0 for a drop).
    pub bytes_to_copy: u64,
}

/// Everything a job does, in order, with what to do if it has to stop early.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Applied when the plan is journaled, before any file is touched.
    pub mark: Vec<MetaOp>,
    pub steps: Vec<Step>,
    /// Applied with the final journal entry, after every step.
    pub finish: Vec<MetaOp>,
    /// Files removed after `finish` is committed, children before parents.
    pub drops: Vec<Uuid>,
    /// Applied when the job stops before its point of no return (failure or cancel);
    /// the engine also removes the files that `Create` steps made.
    pub undo: Vec<MetaOp>,
    /// Applied when the job is cancelled, instead of `undo`, where they differ.
    pub cancel: Option<Vec<MetaOp>>,
    /// Applied when the job fails after its point of no return.
    pub fail: Vec<MetaOp>,
    /// Free bytes the steps may consume before anything is freed.
    pub space_needed: u64,
    pub merges: Vec<MergeChoice>,
}

impl Plan {
    /// Flag a volume for the job and record how to put it back: an undo restores its
    /// old status; a failure after the point of no return restores a layer that was
    /// only to be deleted but leaves one being rewritten flagged.
    fn flag_volume(&mut self, volume: &VolumeNode, status: VolumeStatus) {
        self.mark.push(MetaOp::SetVolumeStatus {
            volume: volume.id,
            status,
        });
        let restore = MetaOp::SetVolumeStatus {
            volume: volume.id,
            status: volume.status,
        };
        if status != VolumeStatus::Rewriting {
            self.fail.push(restore.clone());
        }
        self.undo.push(restore);
    }

    /// Flag a snapshot for deletion: an undo puts back the status the request found;
    /// a failure after the point of no return marks it `error` (its layer may be
    /// half-merged, so it must not be reverted to).
    fn flag_snapshot_deleting(&mut self, snapshot: Uuid, previous: ResourceStatus) {
        self.mark.push(MetaOp::SetSnapshotStatus {
            snapshot,
            status: ResourceStatus::Deleting,
        });
        self.undo.push(MetaOp::SetSnapshotStatus {
            snapshot,
            status: previous,
        });
        self.fail.push(MetaOp::SetSnapshotStatus {
            snapshot,
            status: ResourceStatus::Error,
        });
    }

    /// Whether any step copies data (and so needs free space checked first).
    pub fn copies_data(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(
                s.op,
                FileOp::Commit { .. }
                    | FileOp::Stream { .. }
                    | FileOp::Convert { .. }
                    | FileOp::Import { .. }
                    | FileOp::LiveCommit { .. }
                    | FileOp::LiveStream { .. }
                    | FileOp::LiveCopy { .. }
            )
        })
    }

    /// Whether a step works on a running VM's QEMU.
    pub fn is_live(&self) -> bool {
        self.steps.iter().any(|s| s.op.is_live())
    }

    /// Index of the first step after which the job can no longer be undone.
    pub fn point_of_no_return(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.op.is_point_of_no_return())
    }

    /// Every volume whose file the plan writes or removes.
    fn touched_volumes(&self) -> Vec<Uuid> {
        let mut touched: Vec<Uuid> = self
            .steps
            .iter()
            .flat_map(|s| s.op.written_volumes())
            .collect();
        touched.extend(&self.drops);
        touched
    }

    /// The VMs (linked clones) reading a file this plan would rewrite or remove. A plan
    /// with any must not run: their disks would change under them or break.
    pub fn endangered_dependents(&self, disks: &[DiskGraph]) -> BTreeSet<Uuid> {
        let touched = self.touched_volumes();
        let mut endangered = BTreeSet::new();
        for disk in disks {
            let protected = disk.protected();
            for volume in &touched {
                if let Some(vms) = protected.get(volume) {
                    endangered.extend(vms.iter().copied());
                }
            }
        }
        endangered
    }

    /// True when the plan writes or removes a file that a hypervisor running the VM
    /// holds open (any layer of a disk's active chain).
    /// Whether a step outside QEMU (a qemu-img step) writes a file on a disk's active
    /// chain, which a running VM's QEMU has open.
    pub fn writes_offline_into_active_chains(&self, disks: &[DiskGraph]) -> bool {
        let open: BTreeSet<Uuid> = disks
            .iter()
            .filter_map(|disk| disk.active().map(|active| disk.chain_from(active.id)))
            .flatten()
            .map(|v| v.id)
            .collect();
        self.steps.iter().any(|step| {
            !step.op.is_live() && step.op.written_volumes().iter().any(|v| open.contains(v))
        })
    }

    pub fn touches_active_chains(&self, disks: &[DiskGraph]) -> bool {
        let touched = self.touched_volumes();
        disks.iter().any(|disk| {
            disk.active()
                .map(|active| {
                    disk.chain_from(active.id)
                        .iter()
                        .any(|v| touched.contains(&v.id))
                })
                .unwrap_or(false)
        })
    }
}

/// Free space set aside for one new empty qcow2 file (header, L1 and refcount
/// tables; a few hundred KiB even for the largest disk).
pub const EMPTY_IMAGE_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("disk {0} has no active volume")]
    NoActiveVolume(Uuid),
    #[error("volume {0} is missing from the disk's volume tree")]
    MissingVolume(Uuid),
    #[error("the active volume {0} of a disk has volumes on top of it")]
    ActiveHasChildren(Uuid),
}

/// Record, when the plan finishes, a disk's first volume as its writable layer and the
/// disk as ready, with the size the volume was made with: a clone takes its source's
/// size when it runs, which a grow queued before it may have changed since the
/// request recorded the disk.
fn finish_new_disk(
    plan: &mut Plan,
    disk: Uuid,
    volume: Uuid,
    parent: Option<Uuid>,
    size_bytes: u64,
) {
    plan.finish.extend([
        MetaOp::InsertVolume {
            volume,
            disk,
            parent,
            size_bytes,
        },
        MetaOp::SetActiveVolume { disk, volume },
        MetaOp::SetDiskSize { disk, size_bytes },
        MetaOp::SetDiskStatus {
            disk,
            status: ResourceStatus::Ready,
        },
    ]);
}

/// Create empty base images for new disks (VM creation or disk addition).
pub fn plan_create_disks(vm: Uuid, disks: &[(Uuid, u64)], new_vm: bool) -> Plan {
    let mut plan = Plan::default();
    for &(disk, size_bytes) in disks {
        let volume = new_id();
        plan.steps.push(Step {
            op: FileOp::Create {
                volume,
                backing: None,
                size_bytes,
            },
            then: vec![],
        });
        finish_new_disk(&mut plan, disk, volume, None, size_bytes);
        plan.undo.push(MetaOp::SetDiskStatus {
            disk,
            status: ResourceStatus::Error,
        });
        if !new_vm {
            plan.cancel
                .get_or_insert_with(Vec::new)
                .push(MetaOp::DeleteDisk { disk });
        }
        plan.space_needed += EMPTY_IMAGE_BYTES;
    }
    if new_vm {
        plan.finish.push(MetaOp::SetVmStatus {
            vm,
            status: ResourceStatus::Ready,
        });
        plan.undo.push(MetaOp::SetVmStatus {
            vm,
            status: ResourceStatus::Error,
        });
        plan.cancel = Some(vec![MetaOp::DeleteVm { vm }]);
    }
    plan
}

/// Freeze every disk's active layer for `snapshot` and put an empty overlay on top.
/// `parent` is the VM's current snapshot when the job runs.
pub fn plan_snapshot_create(
    vm: Uuid,
    snapshot: Uuid,
    parent: Option<Uuid>,
    disks: &[DiskGraph],
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    for disk in disks {
        let active = disk
            .active()
            .ok_or(PlanError::NoActiveVolume(disk.disk_id))?;
        let overlay = new_id();
        plan.steps.push(Step {
            op: FileOp::Create {
                volume: overlay,
                backing: Some(active.id),
                size_bytes: disk.size_bytes,
            },
            then: vec![],
        });
        plan.finish.extend([
            MetaOp::InsertVolume {
                volume: overlay,
                disk: disk.disk_id,
                parent: Some(active.id),
                size_bytes: disk.size_bytes,
            },
            MetaOp::SetSnapshotVolume {
                snapshot,
                disk: disk.disk_id,
                volume: active.id,
            },
            MetaOp::SetActiveVolume {
                disk: disk.disk_id,
                volume: overlay,
            },
        ]);
        plan.space_needed += EMPTY_IMAGE_BYTES;
    }
    plan.finish.extend([
        MetaOp::SetSnapshotParent { snapshot, parent },
        MetaOp::SetSnapshotStatus {
            snapshot,
            status: ResourceStatus::Ready,
        },
        MetaOp::SetCurrentSnapshot {
            vm,
            snapshot: Some(snapshot),
        },
    ]);
    // A snapshot that could not be taken never existed.
    plan.undo.push(MetaOp::DeleteSnapshot { snapshot });
    Ok(plan)
}

/// A snapshot of a running VM: the offline plan's overlays, opened in its QEMU and
/// switched in at one instant before the records change.
pub fn plan_live_snapshot_create(
    vm: Uuid,
    snapshot: Uuid,
    parent: Option<Uuid>,
    disks: &[DiskGraph],
    freeze: Option<Quiesce>,
) -> Result<Plan, PlanError> {
    let mut plan = plan_snapshot_create(vm, snapshot, parent, disks)?;
    let overlays: Vec<LiveOverlay> = plan
        .steps
        .iter()
        .zip(disks)
        .filter_map(|(step, disk)| match step.op {
            FileOp::Create {
                volume,
                backing: Some(active),
                ..
            } => Some(LiveOverlay {
                disk: disk.disk_id,
                active,
                overlay: volume,
            }),
            _ => None,
        })
        .collect();
    push_live_switch(&mut plan, vm, overlays, Some(snapshot), freeze);
    Ok(plan)
}

/// End a plan whose `Create` steps made `overlays` with the two live steps that put
/// them under the running VM's guest: open them in QEMU, then switch every disk onto
/// its overlay at one instant.
fn push_live_switch(
    plan: &mut Plan,
    vm: Uuid,
    overlays: Vec<LiveOverlay>,
    snapshot: Option<Uuid>,
    freeze: Option<Quiesce>,
) {
    plan.steps.push(Step {
        op: FileOp::LiveAdd {
            vm,
            overlays: overlays.clone(),
        },
        then: vec![],
    });
    plan.steps.push(Step {
        op: FileOp::LiveSwitch {
            vm,
            overlays,
            snapshot,
            freeze,
        },
        then: vec![],
    });
}

/// Throw away each covered disk's present layer and start a new empty one on the
/// snapshot's layer. Disks the snapshot does not cover keep their present state.
pub fn plan_revert(vm: Uuid, snapshot: Uuid, disks: &[DiskGraph]) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    for disk in disks {
        let Some(frozen) = disk.frozen_by(snapshot) else {
            continue;
        };
        let active = disk
            .active()
            .ok_or(PlanError::NoActiveVolume(disk.disk_id))?;
        if !disk.children(active.id).is_empty() {
            return Err(PlanError::ActiveHasChildren(active.id));
        }
        let overlay = new_id();
        plan.steps.push(Step {
            op: FileOp::Create {
                volume: overlay,
                backing: Some(frozen.id),
                size_bytes: frozen.size_bytes,
            },
            then: vec![],
        });
        plan.finish.extend([
            MetaOp::InsertVolume {
                volume: overlay,
                disk: disk.disk_id,
                parent: Some(frozen.id),
                size_bytes: frozen.size_bytes,
            },
            MetaOp::SetActiveVolume {
                disk: disk.disk_id,
                volume: overlay,
            },
            MetaOp::SetDiskSize {
                disk: disk.disk_id,
                size_bytes: frozen.size_bytes,
            },
            MetaOp::RemoveVolume { volume: active.id },
        ]);
        plan.drops.push(active.id);
        plan.space_needed += EMPTY_IMAGE_BYTES;
    }
    for disk in disks {
        plan.drop_unread_shared_layers(disk, &[]);
    }
    plan.finish.push(MetaOp::SetCurrentSnapshot {
        vm,
        snapshot: Some(snapshot),
    });
    Ok(plan)
}

impl Plan {
    /// Drop, with the plan, every layer of `disk` that nothing reads once the plan is
    /// done: no writable top, no snapshot, no layer on top of it and no linked clone
    /// (other than `leaving_vms`, clones that stop reading this disk with the plan).
    /// Only shared layers (a present state frozen for a linked clone) end up like that:
    /// their last reader may be a clone that goes, a present that is reverted away, or
    /// a snapshot deleted above them. Without this their files would stay for good,
    /// shown by no view. (A layer left unread by a job that stopped halfway, e.g. one
    /// that flattened the clones and was then cancelled, goes with the VM's next job.)
    ///
    /// The plan's own metadata changes are replayed on a copy of the disk's tree to
    /// see what it leaves, so this holds for every planner and every shape, however
    /// deep the unread layers are stacked (each is dropped after the ones above it).
    pub fn drop_unread_shared_layers(&mut self, disk: &DiskGraph, leaving_vms: &[Uuid]) {
        let mut after = TreeAfter::replay(self, disk);
        loop {
            let unread: Vec<Uuid> = after
                .parents
                .keys()
                .copied()
                .filter(|&id| after.is_unread(id, disk, leaving_vms))
                .collect();
            if unread.is_empty() {
                return;
            }
            for volume in unread {
                after.parents.remove(&volume);
                self.finish.push(MetaOp::RemoveVolume { volume });
                self.drops.push(volume);
            }
        }
    }
}

/// One disk's volume tree as a plan leaves it: which volume is the writable top,
/// which ones snapshots freeze, and what each sits on.
struct TreeAfter {
    parents: BTreeMap<Uuid, Option<Uuid>>,
    active: Option<Uuid>,
    frozen: BTreeMap<Uuid, Uuid>,
}

impl TreeAfter {
    /// The files the plan drops are gone, whatever records still name them (a disk or
    /// VM deleted outright drops every file it has).
    fn replay(plan: &Plan, disk: &DiskGraph) -> Self {
        let mut tree = TreeAfter {
            parents: disk.volumes.iter().map(|v| (v.id, v.parent)).collect(),
            active: disk.active().map(|v| v.id),
            frozen: disk
                .volumes
                .iter()
                .filter_map(|v| match v.owner {
                    Owner::Snapshot(snapshot) => Some((snapshot, v.id)),
                    _ => None,
                })
                .collect(),
        };
        let ops = plan
            .mark
            .iter()
            .chain(plan.steps.iter().flat_map(|s| &s.then))
            .chain(&plan.finish);
        let ours = |d: Uuid| d == disk.disk_id;
        for op in ops {
            match *op {
                MetaOp::InsertVolume {
                    volume,
                    disk: d,
                    parent,
                    ..
                } if ours(d) => {
                    tree.parents.insert(volume, parent);
                }
                MetaOp::SetVolumeParent { volume, parent } => {
                    if let Some(p) = tree.parents.get_mut(&volume) {
                        *p = parent;
                    }
                }
                MetaOp::RemoveVolume { volume } => {
                    tree.parents.remove(&volume);
                }
                MetaOp::SetActiveVolume { disk: d, volume } if ours(d) => {
                    tree.active = Some(volume);
                }
                MetaOp::SetSnapshotVolume {
                    snapshot,
                    disk: d,
                    volume,
                } if ours(d) => {
                    tree.frozen.insert(snapshot, volume);
                }
                MetaOp::DeleteSnapshot { snapshot } => {
                    tree.frozen.remove(&snapshot);
                }
                _ => {}
            }
        }
        for dropped in &plan.drops {
            tree.parents.remove(dropped);
        }
        tree
    }

    fn is_unread(&self, id: Uuid, disk: &DiskGraph, leaving_vms: &[Uuid]) -> bool {
        let read_by_clone = disk
            .get(id)
            .is_some_and(|v| v.dependents.iter().any(|vm| !leaving_vms.contains(vm)));
        self.active != Some(id)
            && !self.frozen.values().any(|&v| v == id)
            && !self.parents.values().any(|&p| p == Some(id))
            && !read_by_clone
    }
}

/// Remove one snapshot, keeping every other snapshot and the present state identical.
/// Per disk, the snapshot's layer V is dropped when nothing sits on it (case 3), merged
/// with its only child in the cheaper direction (cases 1 and 2), or streamed into each
/// child when it is a branch point (never committed into).
/// `previous` is the snapshot's status before the request (restored on undo).
pub fn plan_snapshot_delete(
    snapshot: Uuid,
    previous: ResourceStatus,
    disks: &[DiskGraph],
) -> Result<Plan, PlanError> {
    plan_snapshot_delete_with(snapshot, previous, disks, true)
}

/// `plan_snapshot_delete` for a running VM reached through its QEMU: the merges of
/// layers QEMU reads run inside QEMU (see `go_live`). `can_pivot`: whether the VM's
/// QEMU can pause the guest around a pivot; if not, an active layer is never committed
/// down (the snapshot's layer is streamed up into it instead, whatever it costs).
pub fn plan_live_snapshot_delete(
    vm: Uuid,
    snapshot: Uuid,
    previous: ResourceStatus,
    disks: &[DiskGraph],
    can_pivot: bool,
) -> Result<Plan, PlanError> {
    let plan = plan_snapshot_delete_with(snapshot, previous, disks, can_pivot)?;
    Ok(go_live(plan, vm, disks))
}

fn plan_snapshot_delete_with(
    snapshot: Uuid,
    previous: ResourceStatus,
    disks: &[DiskGraph],
    commit_active: bool,
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    plan.flag_snapshot_deleting(snapshot, previous);
    for disk in disks {
        let Some(frozen) = disk.frozen_by(snapshot) else {
            continue;
        };
        let children = disk.children(frozen.id);
        let stream_bytes = frozen.allocated_bytes * children.len() as u64;
        match children.as_slice() {
            [] => {
                plan.flag_volume(frozen, VolumeStatus::Deleting);
                plan.merges.push(MergeChoice {
                    disk_id: disk.disk_id,
                    action: MergeAction::Drop,
                    commit_bytes: 0,
                    stream_bytes: 0,
                    bytes_to_copy: 0,
                });
            }
            [child]
                if child.allocated_bytes <= frozen.allocated_bytes
                    && (commit_active || child.owner != Owner::Active) =>
            {
                commit_child_into(&mut plan, disk, frozen, child);
                plan.merges.push(MergeChoice {
                    disk_id: disk.disk_id,
                    action: MergeAction::Commit,
                    commit_bytes: child.allocated_bytes,
                    stream_bytes,
                    bytes_to_copy: child.allocated_bytes,
                });
                continue;
            }
            _ => {
                let commit_bytes = match children.as_slice() {
                    [child] => child.allocated_bytes,
                    _ => 0, // not allowed: a branch point is never committed into
                };
                for child in &children {
                    plan.steps.push(Step {
                        op: FileOp::Stream {
                            volume: child.id,
                            from: Some(frozen.id),
                            backing: frozen.parent,
                        },
                        then: vec![MetaOp::SetVolumeParent {
                            volume: child.id,
                            parent: frozen.parent,
                        }],
                    });
                }
                plan.flag_volume(frozen, VolumeStatus::Deleting);
                plan.space_needed += stream_bytes;
                plan.merges.push(MergeChoice {
                    disk_id: disk.disk_id,
                    action: MergeAction::Stream,
                    commit_bytes,
                    stream_bytes,
                    bytes_to_copy: stream_bytes,
                });
            }
        }
        plan.finish.push(MetaOp::RemoveVolume { volume: frozen.id });
        plan.drops.push(frozen.id);
    }
    // Remove the snapshot row before the volume rows it references.
    plan.finish.insert(0, MetaOp::DeleteSnapshot { snapshot });
    for disk in disks {
        plan.drop_unread_shared_layers(disk, &[]);
    }
    Ok(plan)
}

/// Commit `child` down into `frozen` (which must have no other child); the child's
/// owner then reads `frozen`, the child's children are repointed, and the child's file
/// is dropped.
fn commit_child_into(plan: &mut Plan, disk: &DiskGraph, frozen: &VolumeNode, child: &VolumeNode) {
    plan.flag_volume(frozen, VolumeStatus::Rewriting);
    plan.flag_volume(child, VolumeStatus::Deleting);
    plan.steps.push(Step {
        op: FileOp::Commit {
            top: child.id,
            base: frozen.id,
        },
        then: vec![],
    });
    for grandchild in disk.children(child.id) {
        plan.steps.push(Step {
            op: FileOp::Repoint {
                volume: grandchild.id,
                backing: frozen.id,
            },
            then: vec![MetaOp::SetVolumeParent {
                volume: grandchild.id,
                parent: Some(frozen.id),
            }],
        });
    }
    match child.owner {
        Owner::Active => plan.finish.push(MetaOp::SetActiveVolume {
            disk: disk.disk_id,
            volume: frozen.id,
        }),
        Owner::Snapshot(owner) => plan.finish.push(MetaOp::SetSnapshotVolume {
            snapshot: owner,
            disk: disk.disk_id,
            volume: frozen.id,
        }),
        // No record names a shared layer: the merged file simply takes its place.
        Owner::Shared => {}
    }
    // `qemu-img commit` grows the base to the top's size (sizes only grow up a chain),
    // so the merged volume now has the child's virtual size.
    plan.finish.extend([
        MetaOp::SetVolumeSize {
            volume: frozen.id,
            size_bytes: child.size_bytes.max(frozen.size_bytes),
        },
        MetaOp::RemoveVolume { volume: child.id },
        MetaOp::SetVolumeStatus {
            volume: frozen.id,
            status: VolumeStatus::Ready,
        },
    ]);
    plan.drops.push(child.id);
    plan.space_needed += child.allocated_bytes;
}

string_enum!(
    /// How a clone's disks relate to their source.
    CloneMode {
        /// A new overlay on the source's layer: instant, but the source layer must stay.
        Linked => "linked",
        /// A standalone copy of what the source shows: independent of the source.
        Full => "full",
    }
);

/// One disk a clone makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneDisk {
    /// The new disk's record (inserted with the request, status `creating`).
    pub disk: Uuid,
    /// The source volume whose content the disk starts with: a snapshot's frozen layer,
    /// a template's volume, or a source's active layer frozen by the same plan.
    pub source: Uuid,
    pub size_bytes: u64,
    /// Upper bound of what a full copy writes (the source chain's allocated bytes).
    pub copy_bytes: u64,
}

/// The present state of one source disk, frozen so a linked clone can sit on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Freeze {
    pub disk: Uuid,
    pub active: Uuid,
    pub size_bytes: u64,
}

/// Make the disks of new VMs (or templates) from source layers, linked or copied, and
/// mark each new VM ready when all its disks exist. A job that stops early removes what
/// it created and deletes the new VMs' records.
///
/// `freeze` lists the source disks whose present state is cloned. Like a snapshot
/// taken for the purpose, each first gets a new writable layer on top, so the clone
/// works from one point in time. For a linked clone that frozen layer stays for good
/// (a shared layer, no snapshot names it): the clones sit on it and the source's
/// snapshot tree is unchanged. For a full clone, once the copies are made, the
/// temporary layer is merged back: it holds nothing, so it is dropped, leaving the
/// source's chain exactly as it was.
pub fn plan_clone(new_vms: &[(Uuid, Vec<CloneDisk>)], mode: CloneMode, freeze: &[Freeze]) -> Plan {
    let mut plan = Plan::default();
    let mut temporary: Vec<Uuid> = Vec::new();
    for frozen in freeze {
        let volume = new_id();
        plan.steps.push(Step {
            op: FileOp::Create {
                volume,
                backing: Some(frozen.active),
                size_bytes: frozen.size_bytes,
            },
            then: vec![],
        });
        match mode {
            CloneMode::Linked => plan.finish.extend([
                MetaOp::InsertVolume {
                    volume,
                    disk: frozen.disk,
                    parent: Some(frozen.active),
                    size_bytes: frozen.size_bytes,
                },
                MetaOp::SetActiveVolume {
                    disk: frozen.disk,
                    volume,
                },
            ]),
            CloneMode::Full => temporary.push(volume),
        }
        plan.space_needed += EMPTY_IMAGE_BYTES;
    }
    for (vm, disks) in new_vms {
        for disk in disks {
            let volume = new_id();
            let (op, parent) = match mode {
                CloneMode::Linked => (
                    FileOp::Create {
                        volume,
                        backing: Some(disk.source),
                        size_bytes: disk.size_bytes,
                    },
                    Some(disk.source),
                ),
                CloneMode::Full => (
                    FileOp::Convert {
                        source: disk.source,
                        volume,
                    },
                    None,
                ),
            };
            plan.steps.push(Step { op, then: vec![] });
            finish_new_disk(&mut plan, disk.disk, volume, parent, disk.size_bytes);
            plan.space_needed += match mode {
                CloneMode::Linked => EMPTY_IMAGE_BYTES,
                CloneMode::Full => disk.copy_bytes + EMPTY_IMAGE_BYTES,
            };
        }
        plan.finish.push(MetaOp::SetVmStatus {
            vm: *vm,
            status: ResourceStatus::Ready,
        });
        plan.undo.push(MetaOp::DeleteVm { vm: *vm });
    }
    // The temporary layers never entered the records and hold no data: nothing can
    // write to them while the job holds the stopped source. Merging one back into the
    // frozen present therefore copies nothing: it is dropped, and the source's chain
    // is exactly as it was.
    plan.drops.extend(temporary);
    plan
}

/// A linked clone of a running VM's present state: the plan of `plan_clone`, whose new
/// layers on the source's disks are then opened in its QEMU and switched in at one
/// instant, as for a live snapshot (crash-consistent). The clones' overlays are made
/// before the switch, on the layers it freezes, so the switch stays the last step:
/// before it a stop undoes everything; from it on the source's records follow.
pub fn plan_live_linked_clone(
    vm: Uuid,
    new_vms: &[(Uuid, Vec<CloneDisk>)],
    freeze: &[Freeze],
    quiesce: Option<Quiesce>,
) -> Plan {
    let mut plan = plan_clone(new_vms, CloneMode::Linked, freeze);
    // `plan_clone` makes the source's new layers first, one per frozen disk.
    let overlays: Vec<LiveOverlay> = plan.steps[..freeze.len()]
        .iter()
        .zip(freeze)
        .filter_map(|(step, frozen)| match step.op {
            FileOp::Create { volume, .. } => Some(LiveOverlay {
                disk: frozen.disk,
                active: frozen.active,
                overlay: volume,
            }),
            _ => None,
        })
        .collect();
    push_live_switch(&mut plan, vm, overlays, None, quiesce);
    plan
}

/// A full clone of a running VM's present state: a new standalone file per disk, then
/// one step in which the VM's QEMU copies every disk as it is at one instant.
pub fn plan_live_full_clone(
    vm: Uuid,
    new_vms: &[(Uuid, Vec<CloneDisk>)],
    freeze: Option<Quiesce>,
) -> Plan {
    let mut plan = Plan::default();
    let mut copies = Vec::new();
    for (new_vm, disks) in new_vms {
        for disk in disks {
            let volume = new_id();
            plan.steps.push(Step {
                op: FileOp::Create {
                    volume,
                    backing: None,
                    size_bytes: disk.size_bytes,
                },
                then: vec![],
            });
            copies.push(LiveCopy {
                source: disk.source,
                volume,
                size_bytes: disk.size_bytes,
            });
            finish_new_disk(&mut plan, disk.disk, volume, None, disk.size_bytes);
            plan.space_needed += disk.copy_bytes + EMPTY_IMAGE_BYTES;
        }
        plan.finish.push(MetaOp::SetVmStatus {
            vm: *new_vm,
            status: ResourceStatus::Ready,
        });
        plan.undo.push(MetaOp::DeleteVm { vm: *new_vm });
    }
    plan.steps.push(Step {
        op: FileOp::LiveCopy { vm, copies, freeze },
        then: vec![],
    });
    plan
}

/// Make a template's only disk from an uploaded image: a new qcow2 file converted
/// from the upload (`copy_bytes` as measured), then the template is ready. A job
/// that stops early removes the file and the template's record.
pub fn plan_import(
    template: Uuid,
    disk: Uuid,
    size_bytes: u64,
    upload: Uuid,
    format: ImageFormat,
    copy_bytes: u64,
) -> Plan {
    let volume = new_id();
    let mut plan = Plan::default();
    plan.steps.push(Step {
        op: FileOp::Import {
            upload,
            format,
            volume,
        },
        then: vec![],
    });
    finish_new_disk(&mut plan, disk, volume, None, size_bytes);
    plan.finish.push(MetaOp::SetVmStatus {
        vm: template,
        status: ResourceStatus::Ready,
    });
    plan.undo.push(MetaOp::DeleteVm { vm: template });
    plan.space_needed = copy_bytes;
    plan
}

/// Make a linked disk standalone: copy into each volume that sits on the source (its
/// lowest layer, or one per branch) whatever the source's layers below show (at most
/// `copy_bytes` in all), then cut the link. Every layer of the disk reads the same
/// throughout: a partial safe rebase only adds clusters equal to what the backing
/// showed. `None` when the disk is not linked.
pub fn plan_flatten(disk: &DiskGraph, copy_bytes: u64) -> Option<Plan> {
    let links = disk.links();
    if links.is_empty() {
        return None;
    }
    let mut plan = Plan::default();
    for link in links {
        plan.steps.push(Step {
            op: FileOp::Stream {
                volume: link.id,
                from: link.parent,
                backing: None,
            },
            then: vec![MetaOp::SetVolumeParent {
                volume: link.id,
                parent: None,
            }],
        });
    }
    plan.space_needed += copy_bytes;
    Some(plan)
}

/// Remove every snapshot of a VM: each disk collapses into one file holding the present
/// state, and every layer off the present chain is dropped.
/// `snapshots` lists every snapshot of the VM with its status before the request.
pub fn plan_delete_all_snapshots(
    vm: Uuid,
    snapshots: &[(Uuid, ResourceStatus)],
    disks: &[DiskGraph],
) -> Result<Plan, PlanError> {
    plan_delete_all_with(vm, snapshots, disks, true)
}

/// `plan_delete_all_snapshots` for a running VM reached through its QEMU (see
/// `plan_live_snapshot_delete`): each chain collapses by a live commit into its base
/// (only where QEMU can pause the guest around the pivot) or a live stream into its
/// active layer.
pub fn plan_live_delete_all_snapshots(
    vm: Uuid,
    snapshots: &[(Uuid, ResourceStatus)],
    disks: &[DiskGraph],
    can_pivot: bool,
) -> Result<Plan, PlanError> {
    let plan = plan_delete_all_with(vm, snapshots, disks, can_pivot)?;
    Ok(go_live(plan, vm, disks))
}

fn plan_delete_all_with(
    vm: Uuid,
    snapshots: &[(Uuid, ResourceStatus)],
    disks: &[DiskGraph],
    commit_active: bool,
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    for &(snapshot, previous) in snapshots {
        plan.flag_snapshot_deleting(snapshot, previous);
        plan.finish.push(MetaOp::DeleteSnapshot { snapshot });
    }
    plan.finish
        .push(MetaOp::SetCurrentSnapshot { vm, snapshot: None });
    for disk in disks {
        let active = disk
            .active()
            .ok_or(PlanError::NoActiveVolume(disk.disk_id))?;
        let chain = disk.chain_from(active.id); // top first
        let off_chain: Vec<Uuid> = disk
            .volumes
            .iter()
            .map(|v| v.id)
            .filter(|id| !chain.iter().any(|c| c.id == *id))
            .collect();
        let mut removed = disk.leaves_first(&off_chain);
        let base = *chain.last().expect("a chain holds at least its top");
        if chain.len() == 1 {
            plan.merges.push(MergeChoice {
                disk_id: disk.disk_id,
                action: if removed.is_empty() {
                    MergeAction::None
                } else {
                    MergeAction::Drop
                },
                commit_bytes: 0,
                stream_bytes: 0,
                bytes_to_copy: 0,
            });
        } else {
            let commit_bytes: u64 = chain[..chain.len() - 1]
                .iter()
                .map(|v| v.allocated_bytes)
                .sum();
            let stream_bytes: u64 = chain[1..].iter().map(|v| v.allocated_bytes).sum();
            // Committing into the base rewrites it even if other branches sit on it; that
            // is safe here only because every one of those branches is dropped too.
            let action = if commit_bytes <= stream_bytes && commit_active {
                MergeAction::Commit
            } else {
                MergeAction::Stream
            };
            if action == MergeAction::Commit {
                plan.flag_volume(base, VolumeStatus::Rewriting);
                plan.steps.push(Step {
                    op: FileOp::Commit {
                        top: active.id,
                        base: base.id,
                    },
                    then: vec![],
                });
                plan.finish.extend([
                    MetaOp::SetActiveVolume {
                        disk: disk.disk_id,
                        volume: base.id,
                    },
                    // The commit grew the base to the present layer's size.
                    MetaOp::SetVolumeSize {
                        volume: base.id,
                        size_bytes: active.size_bytes.max(base.size_bytes),
                    },
                    MetaOp::SetVolumeStatus {
                        volume: base.id,
                        status: VolumeStatus::Ready,
                    },
                ]);
                removed.extend(chain[..chain.len() - 1].iter().map(|v| v.id));
            } else {
                // Onto what the base sits on: nothing, or for a linked clone the
                // source's layer, which stays shared rather than being copied in.
                plan.steps.push(Step {
                    op: FileOp::Stream {
                        volume: active.id,
                        from: Some(chain[1].id),
                        backing: base.parent,
                    },
                    then: vec![MetaOp::SetVolumeParent {
                        volume: active.id,
                        parent: base.parent,
                    }],
                });
                removed.extend(chain[1..].iter().map(|v| v.id));
            }
            let bytes_to_copy = if action == MergeAction::Commit {
                commit_bytes
            } else {
                stream_bytes
            };
            plan.space_needed += bytes_to_copy;
            plan.merges.push(MergeChoice {
                disk_id: disk.disk_id,
                action,
                commit_bytes,
                stream_bytes,
                bytes_to_copy,
            });
        }
        for &volume in &removed {
            let node = disk.get(volume).ok_or(PlanError::MissingVolume(volume))?;
            plan.flag_volume(node, VolumeStatus::Deleting);
            plan.finish.push(MetaOp::RemoveVolume { volume });
        }
        plan.drops.extend(removed);
    }
    for disk in disks {
        plan.drop_unread_shared_layers(disk, &[]);
    }
    Ok(plan)
}

/// Hand the merges of layers a running VM's QEMU reads to QEMU: a `Commit` or `Stream`
/// of a layer on a disk's active chain becomes its live form, and the repoint of the
/// layer QEMU reads above a committed one is QEMU's to do (its record goes with the live
/// commit). Every other step works on files QEMU has not open and stays as it is.
pub fn go_live(plan: Plan, vm: Uuid, disks: &[DiskGraph]) -> Plan {
    let open: BTreeSet<Uuid> = disks
        .iter()
        .filter_map(|disk| disk.active().map(|active| disk.chain_from(active.id)))
        .flatten()
        .map(|v| v.id)
        .collect();
    // The layer QEMU reads directly on top of an open one.
    let above = |volume: Uuid| {
        disks
            .iter()
            .flat_map(|d| &d.volumes)
            .find(|v| v.parent == Some(volume) && open.contains(&v.id))
            .map(|v| v.id)
    };
    let mut steps: Vec<Step> = Vec::with_capacity(plan.steps.len());
    for step in plan.steps {
        let op = match step.op {
            FileOp::Commit { top, base } if open.contains(&top) => FileOp::LiveCommit {
                vm,
                top,
                base,
                above: above(top),
            },
            FileOp::Stream {
                volume,
                from: Some(from),
                backing,
            } if open.contains(&volume) => FileOp::LiveStream {
                vm,
                volume,
                from,
                backing,
            },
            FileOp::Repoint { volume, backing } => {
                let done_by_qemu = steps.iter_mut().find(|s| {
                    matches!(s.op, FileOp::LiveCommit { base, above: Some(above), .. }
                        if above == volume && base == backing)
                });
                if let Some(live_commit) = done_by_qemu {
                    live_commit.then.extend(step.then);
                    continue;
                }
                FileOp::Repoint { volume, backing }
            }
            op => op,
        };
        steps.push(Step {
            op,
            then: step.then,
        });
    }
    Plan { steps, ..plan }
}

/// Grow a running VM's disk through its QEMU: the offline plan, its step done live.
pub fn plan_live_resize(vm: Uuid, disk: &DiskGraph, size_bytes: u64) -> Result<Plan, PlanError> {
    let mut plan = plan_resize(disk, size_bytes)?;
    for step in &mut plan.steps {
        if let FileOp::Resize { volume, size_bytes } = step.op {
            step.op = FileOp::LiveResize {
                vm,
                volume,
                size_bytes,
            };
        }
    }
    Ok(plan)
}

/// Grow a disk: only the writable top changes size; lower layers keep theirs. A grow
/// either happens or not, so a failed one is simply undone.
pub fn plan_resize(disk: &DiskGraph, size_bytes: u64) -> Result<Plan, PlanError> {
    let active = disk
        .active()
        .ok_or(PlanError::NoActiveVolume(disk.disk_id))?;
    Ok(Plan {
        steps: vec![Step {
            op: FileOp::Resize {
                volume: active.id,
                size_bytes,
            },
            then: vec![],
        }],
        finish: vec![
            MetaOp::SetDiskSize {
                disk: disk.disk_id,
                size_bytes,
            },
            MetaOp::SetDiskStatus {
                disk: disk.disk_id,
                status: ResourceStatus::Ready,
            },
        ],
        undo: vec![MetaOp::SetDiskStatus {
            disk: disk.disk_id,
            status: ResourceStatus::Ready,
        }],
        // Failed after its retries: qemu-img changes the header last, so the file keeps
        // its old size, as the records do.
        fail: vec![MetaOp::SetDiskStatus {
            disk: disk.disk_id,
            status: ResourceStatus::Ready,
        }],
        space_needed: EMPTY_IMAGE_BYTES,
        ..Plan::default()
    })
}

/// Remove disks and every file they own. `delete_vm` also removes the VM record.
/// `previous` is the status of the VM (or of the one disk) before the request: a
/// deletion stopped early puts it back (a disk whose creation failed stays `error`).
pub fn plan_delete_disks(
    vm: Uuid,
    disks: &[DiskGraph],
    delete_vm: bool,
    previous: ResourceStatus,
) -> Plan {
    let mut plan = Plan::default();
    for disk in disks {
        let ids: Vec<Uuid> = disk.volumes.iter().map(|v| v.id).collect();
        for volume in &disk.volumes {
            plan.flag_volume(volume, VolumeStatus::Deleting);
        }
        if !delete_vm {
            plan.finish.push(MetaOp::DeleteDisk { disk: disk.disk_id });
            plan.undo.push(MetaOp::SetDiskStatus {
                disk: disk.disk_id,
                status: previous,
            });
        }
        plan.drops.extend(disk.leaves_first(&ids));
    }
    if delete_vm {
        plan.finish.push(MetaOp::DeleteVm { vm });
        plan.undo.push(MetaOp::SetVmStatus {
            vm,
            status: previous,
        });
    }
    plan
}

#[cfg(test)]
mod tests;
