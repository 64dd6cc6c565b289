//! What a job is asked to do: one `JobSpec` variant per job kind, carrying that kind's
//! typed inputs. This is what the journal stores (the `params` column, the variant's
//! fields as JSON; the `kind` column names the variant), so a reader never agrees with
//! a writer on key names by hand: a missing or misspelt field fails to decode instead
//! of silently defaulting.
//!
//! The types here are plain data: each kind's checks, plan and unwind live in
//! `jobs/run/<family>.rs`. They sit in `domain`, not in `jobs`, because the stored
//! `Job` carries one and `store::jobs` reads and writes it: in `jobs` they would make
//! the store depend on the engine that depends on the store.
//!
//! Migration 0010 rewrote the parameters stored by earlier releases into this shape.

use serde::{Deserialize, Serialize};

use super::image::ImageFormat;
use super::plan::CloneMode;
use super::{Consistency, JobKind, Quiesce, ResourceStatus, TargetType, Uuid};

/// Create the files of a new VM's disks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmCreate {
    pub vm: Uuid,
}

/// Delete a VM (or a template) with every disk, snapshot and file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmDelete {
    pub vm: Uuid,
    /// The status the request found the VM in, restored if the job is undone.
    pub previous_status: ResourceStatus,
    #[serde(flatten)]
    pub flatten: Flatten,
}

/// `?flatten_dependents=true`: linked clones that read files the job would rewrite or
/// remove are first made standalone by the same job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Flatten {
    pub flatten_dependents: bool,
    /// The clones the job locked when it was accepted, the only ones it may flatten (one
    /// linked since, by a clone queued earlier, makes the job refuse). `None` for a job
    /// stored before this was recorded: it may flatten any.
    pub locked_vms: Option<Vec<Uuid>>,
}

/// Add a disk (an empty qcow2 file) to a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskCreate {
    pub vm: Uuid,
    pub disk: Uuid,
}

/// Remove a disk, its layers in every snapshot and its files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskDelete {
    pub vm: Uuid,
    pub disk: Uuid,
    pub previous_status: ResourceStatus,
}

/// Grow a disk's writable layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskResize {
    pub vm: Uuid,
    pub disk: Uuid,
    pub size_bytes: u64,
    pub previous_status: ResourceStatus,
}

/// Make a linked disk standalone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskFlatten {
    pub vm: Uuid,
    pub disk: Uuid,
}

/// Take a snapshot of every disk of a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotCreate {
    pub vm: Uuid,
    pub snapshot: Uuid,
    /// As requested; decided at accept from the VM (`None` in jobs of releases before
    /// live snapshots: crash).
    #[serde(default)]
    pub consistency: Option<Consistency>,
    /// With `filesystem`: what a failed freeze does (decided at accept).
    #[serde(default)]
    pub quiesce: Option<Quiesce>,
}

impl SnapshotCreate {
    /// The freeze a live snapshot of this job does: `None` for crash consistency.
    pub fn freeze(&self) -> Option<Quiesce> {
        freeze_for(self.consistency, self.quiesce)
    }
}

/// The freeze a live step does for a request's consistency and quiesce policy.
fn freeze_for(consistency: Option<Consistency>, quiesce: Option<Quiesce>) -> Option<Quiesce> {
    match consistency {
        Some(Consistency::Filesystem) => Some(quiesce.unwrap_or(Quiesce::BestEffort)),
        _ => None,
    }
}

/// Revert a VM to a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRevert {
    pub vm: Uuid,
    pub snapshot: Uuid,
}

/// Delete one snapshot, merging its layers where something sits on them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDelete {
    pub vm: Uuid,
    pub snapshot: Uuid,
    pub previous_status: ResourceStatus,
    #[serde(flatten)]
    pub flatten: Flatten,
}

impl SnapshotDelete {
    /// The deletion of `snapshot` as found now, without flattening linked clones (the
    /// expiry sweep and retention prunes ask for it).
    pub fn of(snapshot: &super::Snapshot) -> Self {
        Self {
            vm: snapshot.vm_id,
            snapshot: snapshot.id,
            previous_status: snapshot.status,
            flatten: Flatten::default(),
        }
    }
}

/// One snapshot a collapse (delete-all, conversion to a template) was asked to remove,
/// with the status to restore if the job is undone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListedSnapshot {
    pub id: Uuid,
    pub previous_status: ResourceStatus,
}

/// Delete every snapshot of a VM: each disk collapses into one file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotDeleteAll {
    pub vm: Uuid,
    /// Exactly the snapshots the request saw; if the tree changed since, the job is
    /// refused rather than collapse more than was asked.
    pub snapshots: Vec<ListedSnapshot>,
}

/// A clone, a batch deploy or a copy into a template: for each new VM, its new disks
/// and the source disk each starts from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clone {
    /// The VM or template cloned from.
    #[serde(rename = "vm")]
    pub source: Uuid,
    pub mode: CloneMode,
    /// Start from this snapshot of the source; without one, from its present state.
    pub snapshot_id: Option<Uuid>,
    pub vms: Vec<CloneTarget>,
    /// For the present state of a running VM: as requested, decided at accept (`None`
    /// in jobs of releases before quiesced clones: crash).
    #[serde(default)]
    pub consistency: Option<Consistency>,
    #[serde(default)]
    pub quiesce: Option<Quiesce>,
}

impl Clone {
    /// The freeze a live clone of this job does: `None` for crash consistency.
    pub fn freeze(&self) -> Option<Quiesce> {
        freeze_for(self.consistency, self.quiesce)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloneTarget {
    pub id: Uuid,
    /// (new disk, source disk)
    pub disks: Vec<(Uuid, Uuid)>,
}

/// Turn a VM into a template, collapsing its snapshots first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmToTemplate {
    pub vm: Uuid,
    pub snapshots: Vec<ListedSnapshot>,
}

/// Turn a template back into a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateToVm {
    pub vm: Uuid,
}

/// Convert an uploaded image into a new template's disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateImport {
    /// The template the request created (status `creating`).
    #[serde(rename = "vm")]
    pub template: Uuid,
    /// The staged upload (see `files::uploads`), removed when the job ends.
    pub upload: Uuid,
    pub format: ImageFormat,
    /// What `qemu-img measure` said the copy takes, when the request was accepted
    /// (informational: the job measures the upload itself; early releases did not
    /// record it).
    #[serde(default)]
    pub copy_bytes: u64,
}

/// A stored job whose parameters cannot be read (written by hand, or by a release
/// whose shape no migration knows). It is kept as it is so that it does not stop every
/// other job: listed like any job, and failed alone when it would run.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreadable {
    pub kind: JobKind,
    pub vm: Uuid,
    pub params: String,
    /// Why it cannot be read.
    pub error: String,
}

/// Declares `JobSpec` with one variant per kind, and the mappings between a spec, its
/// kind and its stored form, so adding a kind is one line here.
macro_rules! job_specs {
    ($($variant:ident($inner:ty)),+ $(,)?) => {
        /// A job's kind with its typed inputs.
        #[derive(Debug, Clone, PartialEq)]
        pub enum JobSpec {
            $($variant($inner),)+
            Unreadable(Unreadable),
        }

        impl JobSpec {
            pub fn kind(&self) -> JobKind {
                match self {
                    $(JobSpec::$variant(_) => JobKind::$variant,)+
                    JobSpec::Unreadable(unreadable) => unreadable.kind,
                }
            }

            /// The stored `params` column.
            pub fn params_json(&self) -> String {
                let encoded = match self {
                    $(JobSpec::$variant(inner) => serde_json::to_string(inner),)+
                    JobSpec::Unreadable(unreadable) => Ok(unreadable.params.clone()),
                };
                encoded.expect("a job spec serialises")
            }

            /// Read a spec back from its `kind` and `params` columns.
            pub fn decode(kind: JobKind, params: &str) -> Result<Self, serde_json::Error> {
                Ok(match kind {
                    $(JobKind::$variant => JobSpec::$variant(serde_json::from_str(params)?)),+
                })
            }

            /// `decode`, keeping parameters it cannot read as `Unreadable` (of the job's
            /// VM `vm`) instead of failing.
            pub fn decode_or_keep(kind: JobKind, vm: Uuid, params: &str) -> Self {
                Self::decode(kind, params).unwrap_or_else(|e| {
                    JobSpec::Unreadable(Unreadable {
                        kind,
                        vm,
                        params: params.to_owned(),
                        error: e.to_string(),
                    })
                })
            }
        }
    };
}

job_specs!(
    VmCreate(VmCreate),
    VmDelete(VmDelete),
    DiskCreate(DiskCreate),
    DiskDelete(DiskDelete),
    DiskResize(DiskResize),
    DiskFlatten(DiskFlatten),
    SnapshotCreate(SnapshotCreate),
    SnapshotRevert(SnapshotRevert),
    SnapshotDelete(SnapshotDelete),
    SnapshotDeleteAll(SnapshotDeleteAll),
    VmClone(Clone),
    TemplateCreate(Clone),
    TemplateDeploy(Clone),
    VmToTemplate(VmToTemplate),
    TemplateToVm(TemplateToVm),
    TemplateImport(TemplateImport),
);

impl JobSpec {
    /// The VM whose jobs this one queues behind (and locks).
    pub fn vm(&self) -> Uuid {
        match self {
            JobSpec::VmCreate(s) => s.vm,
            JobSpec::VmDelete(s) => s.vm,
            JobSpec::DiskCreate(s) => s.vm,
            JobSpec::DiskDelete(s) => s.vm,
            JobSpec::DiskResize(s) => s.vm,
            JobSpec::DiskFlatten(s) => s.vm,
            JobSpec::SnapshotCreate(s) => s.vm,
            JobSpec::SnapshotRevert(s) => s.vm,
            JobSpec::SnapshotDelete(s) => s.vm,
            JobSpec::SnapshotDeleteAll(s) => s.vm,
            JobSpec::VmClone(s) | JobSpec::TemplateCreate(s) | JobSpec::TemplateDeploy(s) => {
                s.source
            }
            JobSpec::VmToTemplate(s) => s.vm,
            JobSpec::TemplateToVm(s) => s.vm,
            JobSpec::TemplateImport(s) => s.template,
            JobSpec::Unreadable(s) => s.vm,
        }
    }

    /// The resource the job is shown as working on: a clone's first new VM, a disk or
    /// snapshot job's disk or snapshot, otherwise the VM.
    pub fn target(&self) -> (TargetType, Uuid) {
        match self {
            JobSpec::DiskCreate(DiskCreate { disk, .. })
            | JobSpec::DiskDelete(DiskDelete { disk, .. })
            | JobSpec::DiskResize(DiskResize { disk, .. })
            | JobSpec::DiskFlatten(DiskFlatten { disk, .. }) => (TargetType::Disk, *disk),
            JobSpec::SnapshotCreate(SnapshotCreate { snapshot, .. })
            | JobSpec::SnapshotRevert(SnapshotRevert { snapshot, .. })
            | JobSpec::SnapshotDelete(SnapshotDelete { snapshot, .. }) => {
                (TargetType::Snapshot, *snapshot)
            }
            JobSpec::VmClone(s) | JobSpec::TemplateCreate(s) | JobSpec::TemplateDeploy(s) => (
                TargetType::Vm,
                s.vms.first().map_or(s.source, |target| target.id),
            ),
            _ => (TargetType::Vm, self.vm()),
        }
    }

    /// What the job's VM must be when the job is accepted: a job that changes a VM's
    /// disks or snapshots, clones it or makes a template of it never works on a
    /// template, and one that deploys from or converts a template needs one. `None`
    /// where either is right (a deletion) or the record is new.
    pub fn vm_kind(&self) -> Option<super::VmKind> {
        use super::VmKind;
        match self {
            JobSpec::VmCreate(_) | JobSpec::VmDelete(_) | JobSpec::TemplateImport(_) => None,
            JobSpec::Unreadable(_) => None,
            JobSpec::TemplateDeploy(_) | JobSpec::TemplateToVm(_) => Some(VmKind::Template),
            _ => Some(VmKind::Vm),
        }
    }

    /// The staged upload an import owns (removed when the job ends).
    pub fn upload(&self) -> Option<Uuid> {
        match self {
            JobSpec::TemplateImport(s) => Some(s.upload),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::new_id;

    #[test]
    fn every_kind_round_trips_through_its_stored_form() {
        let vm = new_id();
        let flatten = Flatten {
            flatten_dependents: true,
            locked_vms: Some(vec![new_id()]),
        };
        let clone = Clone {
            source: vm,
            mode: CloneMode::Linked,
            snapshot_id: Some(new_id()),
            vms: vec![CloneTarget {
                id: new_id(),
                disks: vec![(new_id(), new_id())],
            }],
            consistency: Some(Consistency::Filesystem),
            quiesce: Some(Quiesce::Required),
        };
        let listed = vec![ListedSnapshot {
            id: new_id(),
            previous_status: ResourceStatus::Error,
        }];
        let specs = [
            JobSpec::VmCreate(VmCreate { vm }),
            JobSpec::VmDelete(VmDelete {
                vm,
                previous_status: ResourceStatus::Error,
                flatten: flatten.clone(),
            }),
            JobSpec::DiskResize(DiskResize {
                vm,
                disk: new_id(),
                size_bytes: 1 << 30,
                previous_status: ResourceStatus::Ready,
            }),
            JobSpec::SnapshotDelete(SnapshotDelete {
                vm,
                snapshot: new_id(),
                previous_status: ResourceStatus::Ready,
                flatten,
            }),
            JobSpec::SnapshotDeleteAll(SnapshotDeleteAll {
                vm,
                snapshots: listed.clone(),
            }),
            JobSpec::VmToTemplate(VmToTemplate {
                vm,
                snapshots: listed,
            }),
            JobSpec::TemplateDeploy(clone.clone()),
            JobSpec::VmClone(clone),
            JobSpec::TemplateImport(TemplateImport {
                template: vm,
                upload: new_id(),
                format: ImageFormat::Raw,
                copy_bytes: 4096,
            }),
        ];
        for spec in specs {
            let decoded = JobSpec::decode(spec.kind(), &spec.params_json()).unwrap();
            assert_eq!(decoded, spec);
            assert_eq!(decoded.vm(), vm);
        }
    }

    #[test]
    fn a_spec_missing_a_field_is_refused_not_defaulted() {
        let vm = new_id();
        let stored = format!(r#"{{"vm":"{vm}","disk":"{vm}","size_bytes":512}}"#);
        assert!(JobSpec::decode(JobKind::DiskResize, &stored).is_err());
    }
}
