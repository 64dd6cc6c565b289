//! Pure domain types and rules: resource states, validation and the chain planner.
//! Nothing here knows about HTTP, SQL or processes, so every rule is unit-testable.

/// A closed set of values stored and sent as snake_case strings. The trait lets the
/// API describe every such set from one place without the domain knowing the API's
/// schema framework.
pub trait StringEnum: Copy + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// The type's doc comment.
    const DOC: &'static str;
    /// Each value's doc comment ("" when it has none), in the order of `ALL`.
    const VALUE_DOCS: &'static [&'static str];
    fn as_str(self) -> &'static str;
}

/// Declares a [`StringEnum`]: the serde names are the given strings, so `as_str`,
/// `parse`, the stored text and the JSON always agree. `derives(...)` adds derives.
macro_rules! string_enum {
    (
        $(#[doc = $doc:literal])*
        $name:ident $(derives($($derive:ident),+))? {
            $($(#[doc = $value_doc:literal])* $variant:ident => $text:literal),+ $(,)?
        }
    ) => {
        $(#[doc = $doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        $(#[derive($($derive),+)])?
        pub enum $name { $($(#[doc = $value_doc])* #[serde(rename = $text)] $variant),+ }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl $crate::domain::StringEnum for $name {
            const ALL: &'static [Self] = &[$(Self::$variant),+];
            const DOC: &'static str = concat!($($doc, "\n"),*);
            const VALUE_DOCS: &'static [&'static str] = &[$(concat!($($value_doc, "\n"),*)),+];
            fn as_str(self) -> &'static str {
                self.as_str()
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub mod image;
pub mod job_spec;
pub mod plan;
pub mod retention;
pub mod schedule;
pub mod validate;

use serde::{Deserialize, Serialize};

pub use job_spec::JobSpec;
pub use uuid::Uuid;

/// Sort-friendly unique id (UUIDv7) for every resource and job.
pub fn new_id() -> Uuid {
    Uuid::now_v7()
}

string_enum!(
    /// Power state of a VM, reported by the orchestrator that runs it.
    VmState { Stopped => "stopped", Running => "running" }
);
string_enum!(
    /// A VM, or a template: a read-only golden image VMs are deployed from. Both are
    /// rows of one table, so converting one into the other copies nothing.
    VmKind { Vm => "vm", Template => "template" }
);
string_enum!(
    /// Lifecycle of a VM, disk or snapshot record while background jobs work on it.
    /// `error` means a job failed part-way: the record is kept so it can be inspected
    /// and deleted again; a snapshot in `error` cannot be reverted to.
    ResourceStatus { Creating => "creating", Ready => "ready", Deleting => "deleting", Error => "error" }
);
string_enum!(
    /// State of one qcow2 file. `rewriting` marks a file whose own content is being
    /// changed by a merge (oVirt calls such a volume ILLEGAL): only the chains above it
    /// are guaranteed to read correctly until the job ends.
    VolumeStatus { Ready => "ready", Rewriting => "rewriting", Deleting => "deleting" }
);
string_enum!(
    /// What a job does; one runner per kind.
    JobKind {
        VmCreate => "vm_create",
        VmDelete => "vm_delete",
        DiskCreate => "disk_create",
        DiskDelete => "disk_delete",
        DiskResize => "disk_resize",
        SnapshotCreate => "snapshot_create",
        SnapshotDelete => "snapshot_delete",
        SnapshotDeleteAll => "snapshot_delete_all",
        SnapshotRevert => "snapshot_revert",
        VmClone => "vm_clone",
        DiskFlatten => "disk_flatten",
        TemplateCreate => "template_create",
        TemplateDeploy => "template_deploy",
        VmToTemplate => "vm_to_template",
        TemplateToVm => "template_to_vm",
        TemplateImport => "template_import",
    }
);
string_enum!(
    JobStatus { Queued => "queued", Running => "running", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled" }
);
string_enum!(
    /// What an API token may do, each scope allowing everything the one before it does:
    /// `read` every GET; `operate` also the day-to-day changes an orchestrator makes
    /// (snapshots, reverts, clones, deploys, schedule runs, marking VMs running or
    /// stopped); `admin` everything, including deletions of VMs, disks and templates,
    /// imports, template conversions, schedule management and tokens.
    Scope derives(PartialOrd, Ord) { Read => "read", Operate => "operate", Admin => "admin" }
);
string_enum!(
    /// Kind of resource a job works on.
    TargetType { Vm => "vm", Disk => "disk", Snapshot => "snapshot" }
);

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

pub type Timestamp = chrono::DateTime<chrono::Utc>;

/// A VM record as stored.
#[derive(Debug, Clone)]
pub struct Vm {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// Free-form key/value labels for selecting VMs.
    pub labels: std::collections::BTreeMap<String, String>,
    pub state: VmState,
    pub status: ResourceStatus,
    pub current_snapshot_id: Option<Uuid>,
    pub kind: VmKind,
    /// The VM this one was cloned from, or the VM a template was made from.
    pub source_vm_id: Option<Uuid>,
    /// The template this VM was deployed from.
    pub template_id: Option<Uuid>,
    /// How to reach the VM's QEMU while it runs (none when stopped).
    pub runtime: VmRuntime,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

string_enum!(
    /// How consistent a snapshot's point in time is.
    SnapshotConsistency {
        /// Taken while the VM was stopped: the disks as the VM left them.
        Stopped => "stopped",
        /// Taken from a running VM without its file systems frozen: what the disks
        /// hold after a power loss at that instant.
        Crash => "crash",
        /// Taken while the guest agent held the guest's file systems frozen: every
        /// file system clean at that instant.
        Filesystem => "filesystem"
    }
);
string_enum!(
    /// The consistency a snapshot of a running VM asks for. Default: `filesystem` when
    /// the VM has a guest-agent socket, else `crash`.
    Consistency {
        /// No freeze: the disks as after a power loss at the instant of the snapshot.
        Crash => "crash",
        /// The guest agent freezes the guest's file systems around the switch.
        Filesystem => "filesystem"
    }
);
string_enum!(
    /// What a snapshot asking for `filesystem` consistency does when the guest's file
    /// systems cannot be frozen. Default: `best_effort`.
    Quiesce {
        /// The job fails and changes nothing.
        Required => "required",
        /// The snapshot is taken crash-consistent; the job says why in `quiesce_error`.
        BestEffort => "best_effort"
    }
);

/// The sockets of a running VM's QEMU, given by the orchestrator that started it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmRuntime {
    /// The QMP monitor: live operations go through it.
    pub qmp_socket: Option<String>,
    /// The guest agent's channel: file-system freezes go through it.
    pub guest_agent_socket: Option<String>,
    /// QEMU's version, as its monitor reported it when the socket was given.
    pub qemu_version: Option<String>,
    /// Whether that QEMU can pause its guest (`stop`/`cont`), as its monitor listed its
    /// commands then: a live deletion pivots a disk onto its parent only then.
    pub can_pause: Option<bool>,
}

impl Vm {
    /// A new, stopped VM in status `creating` (its job makes it `ready`).
    pub fn new(name: String, description: String, now: Timestamp) -> Self {
        Self {
            id: new_id(),
            name,
            description,
            labels: Default::default(),
            state: VmState::Stopped,
            status: ResourceStatus::Creating,
            current_snapshot_id: None,
            kind: VmKind::Vm,
            source_vm_id: None,
            template_id: None,
            runtime: VmRuntime::default(),
            created_at: now,
            updated_at: now,
        }
    }
}

/// One export of a template's disk: the volume, compressed or not, in the template's
/// current generation (its `updated_at`; see `jobs::exports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportKey {
    pub volume: Uuid,
    pub compress: bool,
    pub generation: i64,
}

#[derive(Debug, Clone)]
pub struct Disk {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub name: String,
    pub size_bytes: u64,
    pub status: ResourceStatus,
    pub active_volume_id: Option<Uuid>,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub id: Uuid,
    pub disk_id: Uuid,
    pub parent_id: Option<Uuid>,
    pub size_bytes: u64,
    pub status: VolumeStatus,
    /// The snapshot that froze this layer, if any.
    pub snapshot_id: Option<Uuid>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: Uuid,
    pub vm_id: Uuid,
    pub name: String,
    pub description: String,
    pub parent_id: Option<Uuid>,
    pub status: ResourceStatus,
    pub created_at: Timestamp,
    /// The periodic sweep deletes the snapshot after this time (unless on hold).
    pub expires_at: Option<Timestamp>,
    /// Never pruned by expiry or retention while set.
    pub hold: bool,
    /// The schedule that took it (None for manual snapshots).
    pub schedule_id: Option<Uuid>,
    pub consistency: SnapshotConsistency,
    /// (disk id, frozen volume id) for each disk the snapshot covers.
    pub volumes: Vec<(Uuid, Uuid)>,
}

/// A job as stored: the API view leaves out the journal.
#[derive(Debug, Clone)]
pub struct Job {
    pub seq: i64,
    pub id: Uuid,
    pub kind: JobKind,
    pub status: JobStatus,
    pub progress: u8,
    pub target_type: TargetType,
    pub target_id: Uuid,
    pub vm_id: Option<Uuid>,
    /// What the job was asked to do (its kind is `kind`).
    pub spec: JobSpec,
    pub phase: Option<JobPhase>,
    pub plan: Option<plan::Plan>,
    pub next_step: usize,
    pub detail: Option<serde_json::Value>,
    pub cancel_requested: bool,
    /// The job has started (or finished) the step it cannot undo.
    pub past_no_return: bool,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub created_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    /// The name of the token whose request made the job (`scheduler` for the
    /// scheduler's own); none when the request was anonymous.
    pub requested_by: Option<String>,
    /// The name of the token whose request cancelled the job, if one did.
    pub cancelled_by: Option<String>,
    /// The copy the running job is making, as its last progress write left it; none
    /// when no copy runs (or the figures are no longer live: see `store::jobs`).
    pub copy: Option<CopyProgress>,
    /// Bytes the job's copying steps moved, counted as each of them ended.
    pub bytes_copied: u64,
}

/// How far the copy a running job is making has got: a step that copies data (a merge,
/// a full clone's copy, an import, a copy QEMU makes for a running VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyProgress {
    /// Bytes copied so far; never more than `bytes_total`.
    pub bytes_done: u64,
    /// What the step copies in all: an estimate fixed when its copy starts (see
    /// `jobs::engine::progress`).
    pub bytes_total: u64,
    /// Seconds left at the rate observed since the copy began; none until that rate
    /// says something.
    pub eta_seconds: Option<u64>,
}

string_enum!(
    /// Where a job stands in its journal: `executing` its plan's steps, `stopping`
    /// (decided to roll back or to fail; a restart finishes that, never runs on), or
    /// `committed` (metadata switched; only dropping files is left).
    JobPhase { Executing => "executing", Stopping => "stopping", Committed => "committed" }
);

/// Which VMs a schedule snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScheduleTarget {
    Vm(Uuid),
    /// Every VM carrying the label `key=value` at the time of the run.
    Selector {
        key: String,
        value: String,
    },
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub id: Uuid,
    pub name: String,
    pub target: ScheduleTarget,
    pub cron: String,
    pub timezone: String,
    pub enabled: bool,
    pub name_template: String,
    pub retention: retention::RetentionPolicy,
    /// What each snapshot asks for; `None` leaves it to the VM (see `Consistency`).
    pub consistency: Option<Consistency>,
    pub quiesce: Option<Quiesce>,
    pub next_run_at: Option<Timestamp>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

string_enum!(
    /// Outcome of one schedule run. `running` until the snapshot jobs it queued end;
    /// `skipped` when it took no snapshot (the reason says why).
    RunStatus { Running => "running", Succeeded => "succeeded", Failed => "failed", Skipped => "skipped" }
);
string_enum!(
    /// What started a run: the schedule's cron expression or `POST .../run`.
    RunTrigger { Cron => "cron", Manual => "manual" }
);
string_enum!(
    /// Outcome of one run for one VM.
    TargetOutcome { Queued => "queued", Succeeded => "succeeded", Failed => "failed", Cancelled => "cancelled", Skipped => "skipped" }
);

#[derive(Debug, Clone)]
pub struct ScheduleRun {
    pub id: Uuid,
    pub schedule_id: Uuid,
    pub trigger: RunTrigger,
    pub started_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    pub status: RunStatus,
    pub reason: Option<String>,
    pub detail: RunDetail,
}

/// What a run did, per VM, and what retention decided afterwards.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunDetail {
    pub targets: Vec<RunTarget>,
    /// Filled in when the run's snapshots are done and its retention pass has run.
    pub retention: Option<PruneReport>,
}

/// One VM of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunTarget {
    pub vm_id: Uuid,
    pub vm_name: String,
    pub outcome: TargetOutcome,
    /// The snapshot the run took, absent when skipped.
    pub snapshot_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    /// Why the VM was skipped or its job failed: an error code such as `vm_running`.
    pub code: Option<String>,
    pub reason: Option<String>,
}

/// What a pruning pass (after a run, or the periodic sweep) did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Deletions queued, oldest snapshot first.
    pub pruned: Vec<PruneEntry>,
    /// Snapshots the policy prunes that cannot be deleted now (a running VM, a linked
    /// clone depending on them, short of space...): `code` and `reason` say why. They
    /// are tried again by every later pass.
    pub held: Vec<PruneEntry>,
    /// Snapshots left for a later pass so that merges do not all start at once.
    pub deferred: Vec<PruneEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PruneEntry {
    pub snapshot_id: Uuid,
    pub snapshot_name: String,
    pub vm_id: Uuid,
    /// `expired` or `outside_policy`.
    pub why_pruned: retention::PruneReason,
    /// The deletion job, for queued deletions.
    pub job_id: Option<Uuid>,
    /// For held and deferred snapshots: an error code (`vm_running`, `snapshot_in_use`,
    /// `insufficient_storage`...) or `spread` / `vm_busy`.
    pub code: Option<String>,
    pub reason: Option<String>,
}

/// An API token's record (its secret is never kept: only a digest, in the store).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiToken {
    /// The public part of the token's text.
    pub id: String,
    /// Unique among tokens not revoked; what jobs record as `requested_by`.
    pub name: String,
    pub scope: Scope,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

impl ApiToken {
    /// Whether requests may use the token at `now`: not revoked, not expired.
    pub fn usable_at(&self, now: Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }

    pub fn status_at(&self, now: Timestamp) -> TokenStatus {
        match (self.revoked_at, self.usable_at(now)) {
            (Some(_), _) => TokenStatus::Revoked,
            (None, true) => TokenStatus::Active,
            (None, false) => TokenStatus::Expired,
        }
    }
}

string_enum!(
    /// Whether an API token can be used now.
    TokenStatus { Active => "active", Expired => "expired", Revoked => "revoked" }
);
