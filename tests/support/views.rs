//! strata's own view types, as the tests read them, and the look-ups on them that the
//! tests repeat (a VM's disk by name, a disk's writable file, a snapshot's layer of a
//! disk, a job's merges). Re-exported here so that a moved type is fixed in one place.

pub use strata::api::jobs::{JobList, JobView, MergeChoice};
pub use strata::api::snapshots::{
    SnapshotList, SnapshotListing, SnapshotTree, SnapshotView, SnapshotVolume,
};
pub use strata::api::templates::{TemplateList, TemplateView};
pub use strata::api::vms::{DiskList, DiskView, VmList, VmView, VolumeRole};
pub use strata::domain::plan::MergeAction;
pub use strata::domain::{
    JobKind, JobStatus, ResourceStatus, TargetType, Uuid, VmState, VolumeStatus,
};

/// A view as JSON, to compare whole views (they do not implement `PartialEq`).
pub fn to_json(view: &impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(view).expect("a view serialises")
}

pub trait VmViewExt {
    /// The disk named `name`; fails when the VM has none.
    fn disk(&self, name: &str) -> &DiskView;
}

impl VmViewExt for VmView {
    fn disk(&self, name: &str) -> &DiskView {
        self.disks
            .iter()
            .find(|d| d.name == name)
            .unwrap_or_else(|| panic!("no disk {name} in {self:?}"))
    }
}

pub trait DiskViewExt {
    /// The disk's writable top file; fails while it has none (being created).
    fn path(&self) -> &str;
}

impl DiskViewExt for DiskView {
    fn path(&self) -> &str {
        self.active_path
            .as_deref()
            .unwrap_or_else(|| panic!("disk {} has no active path yet", self.name))
    }
}

pub trait SnapshotViewExt {
    /// The layer the snapshot froze for `disk`; fails when it does not cover the disk.
    fn volume_of(&self, disk: Uuid) -> &SnapshotVolume;
}

impl SnapshotViewExt for SnapshotView {
    fn volume_of(&self, disk: Uuid) -> &SnapshotVolume {
        self.volumes
            .iter()
            .find(|v| v.disk_id == disk)
            .unwrap_or_else(|| panic!("snapshot {} does not cover disk {disk}", self.name))
    }
}

pub trait JobViewExt {
    /// `detail.merges`: per disk, how a snapshot deletion merged (empty when absent).
    fn merges(&self) -> &[MergeChoice];
    /// `detail.vm_ids`: the VMs a clone or deploy made (empty when absent).
    fn vm_ids(&self) -> &[Uuid];
}

impl JobViewExt for JobView {
    fn merges(&self) -> &[MergeChoice] {
        self.detail
            .as_ref()
            .and_then(|d| d.merges.as_deref())
            .unwrap_or_default()
    }

    fn vm_ids(&self) -> &[Uuid] {
        self.detail
            .as_ref()
            .and_then(|d| d.vm_ids.as_deref())
            .unwrap_or_default()
    }
}
