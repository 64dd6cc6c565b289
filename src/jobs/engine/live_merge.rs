//! Live merges: a snapshot's layer merged away while its VM runs, by QEMU's own block
//! jobs on the chain it has open (`block-commit`, `block-stream`). strata never runs a
//! writing qemu-img on a file a running QEMU has open.
//!
//! Every step learns where it stands from QEMU and the journal, never from what an
//! earlier attempt remembers: the QEMU job has an id derived from the layer it merges,
//! `auto-dismiss` off, and is dismissed only after strata recorded its success in the
//! job's `detail.live_merges`. So a redone step finds the QEMU job running, ready or
//! concluded, or finds its success recorded, or finds no job and starts one.
//!
//! Two facts of QEMU 10 shape the rest (both seen with qemu-storage-daemon):
//! - QEMU writes a layer's new backing name into its header when a job completes, but
//!   may keep the cluster tables that make that header true in its cache: after a
//!   completed stream, the header named the new backing while the streamed clusters were
//!   not mapped on disk, and a kill -9 lost them. So the file merged away stays until
//!   the file that took its clusters maps them on disk (`qemu-img map -U`) and strata
//!   fsync'd it (QEMU is asked to write its caches out by pausing the guest, where it
//!   can; otherwise the job waits, parked, for the guest's next flush). A QEMU crash
//!   before that is finished offline from files that are all still there.
//! - An active commit's pivot cannot be seen in the files: after a kill -9 nothing says
//!   whether QEMU switched the disk onto the base. So the guest is paused (`stop`) before
//!   `job-complete` and resumed (`cont`) only after strata recorded the pivot. QEMU killed
//!   before that record: nothing was written since the pause, the old top over the base
//!   still holds the whole disk, and committing it down again offline loses nothing.
//!   After it: the base alone is the disk (QEMU flushed it before switching), and the old
//!   top is never read again. (With `auto-finalize` off, a write made while the job
//!   waited to be finalized reached the old top only and was lost by the pivot: it stays
//!   on.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::super::Engine;
use super::live::Reach;
use super::progress::StepProgress;
use crate::domain::Uuid;
use crate::domain::plan::FileOp;
use crate::error::{Error, ErrorCode, Result};
use crate::files;
use crate::qemu::qmp::{BlockNode, JobInfo, Qmp, QmpError};
use crate::store;

/// How often a running QEMU job is asked how far it got, when no event (a change of
/// its status) wakes the step sooner.
const POLL: Duration = Duration::from_millis(50);

/// How long a merge waits, within its step, for a QEMU that cannot pause to write the
/// merged tables out (at the guest's next flush), and how often it looks; then it
/// waits parked.
const FLUSH_WAIT: Duration = Duration::from_secs(30);
const FLUSH_POLL: Duration = Duration::from_millis(200);

/// One live merge, as its plan step describes it.
#[derive(Debug, Clone, Copy)]
pub(super) enum LiveMerge {
    Commit {
        vm: Uuid,
        top: Uuid,
        base: Uuid,
        above: Option<Uuid>,
    },
    Stream {
        vm: Uuid,
        volume: Uuid,
        from: Uuid,
        backing: Option<Uuid>,
    },
}

impl LiveMerge {
    pub(super) fn of(op: &FileOp) -> Option<Self> {
        match *op {
            FileOp::LiveCommit {
                vm,
                top,
                base,
                above,
            } => Some(Self::Commit {
                vm,
                top,
                base,
                above,
            }),
            FileOp::LiveStream {
                vm,
                volume,
                from,
                backing,
            } => Some(Self::Stream {
                vm,
                volume,
                from,
                backing,
            }),
            _ => None,
        }
    }

    fn vm(&self) -> Uuid {
        match *self {
            Self::Commit { vm, .. } | Self::Stream { vm, .. } => vm,
        }
    }

    /// The layer whose merge this is: it names the QEMU job and the record.
    fn key(&self) -> Uuid {
        match *self {
            Self::Commit { top, .. } => top,
            Self::Stream { volume, .. } => volume,
        }
    }

    /// The QEMU job's id: the same for every attempt of this strata job, so a redone
    /// step finds it, and another job's leftover is never taken for it.
    fn qemu_job_id(&self, job: Uuid) -> String {
        let kind = match self {
            Self::Commit { .. } => "commit",
            Self::Stream { .. } => "stream",
        };
        format!("strata-{kind}-{}-{}", job.simple(), self.key().simple())
    }

    /// The file that takes the merged clusters and stays.
    fn kept(&self) -> Uuid {
        match *self {
            Self::Commit { base, .. } => base,
            Self::Stream { volume, .. } => volume,
        }
    }

    fn is_pivot(&self) -> bool {
        matches!(self, Self::Commit { above: None, .. })
    }
}

impl Engine {
    /// Run one live merge to its end: QEMU's job done and recorded, the nodes of the
    /// merged-away layers closed, and the kept file's tables on disk. With the VM
    /// stopped, the merge is finished offline from the files.
    pub(super) async fn live_merge(
        &self,
        job: Uuid,
        merge: LiveMerge,
        progress: &StepProgress,
    ) -> Result<()> {
        let mut qmp = match self.connect_live(merge.vm()).await? {
            Reach::Reached(qmp) => qmp,
            Reach::Stopped => return self.merge_offline(job, merge, progress).await,
            // Past the point of no return: the job waits (parked) for QEMU to answer or
            // for the VM to be marked stopped.
            Reach::Unreachable(e) => return Err(e),
        };
        let gone = self.merged_away(&merge).await?;
        let id = merge.qemu_job_id(job);
        if self.merge_recorded(job, &merge).await? {
            // Recorded by an attempt that died before it dismissed QEMU's job or let
            // the guest run again. QEMU must still read the merged chain: one restarted
            // on the old chain meanwhile would be writing files about to go.
            if !self.merged_in_qemu(&mut qmp, &merge, &gone).await? {
                return Err(mismatch(
                    "the merge is recorded, but QEMU reads the layers it merged away".into(),
                ));
            }
            if qmp.jobs().await?.iter().any(|j| j.id == id) {
                qmp.execute::<Value>("job-dismiss", json!({ "id": id }))
                    .await?;
            }
            self.resume_guest(&mut qmp, job, &id, None).await?;
        } else {
            self.run_qemu_job(&mut qmp, job, &merge, &gone, progress)
                .await?;
        }
        self.close_nodes(&mut qmp, &gone).await?;
        self.settle_on_disk(&mut qmp, job, &merge, &gone).await
    }

    /// Drive QEMU's job from wherever it stands to its recorded success. QEMU's graph,
    /// not the job's status, says whether the merge happened: a ready active commit
    /// cancelled by someone else concludes without an error and without a pivot.
    async fn run_qemu_job(
        &self,
        qmp: &mut Qmp,
        job: Uuid,
        merge: &LiveMerge,
        gone: &[Uuid],
        progress: &StepProgress,
    ) -> Result<()> {
        let id = merge.qemu_job_id(job);
        let mut paused_at: Option<Instant> = None;
        loop {
            let found: Option<JobInfo> = qmp.jobs().await?.into_iter().find(|j| j.id == id);
            let Some(info) = found else {
                if self.merged_in_qemu(qmp, merge, gone).await? {
                    // Done by a job that ended unseen (dismissed by someone else).
                    self.record_merged(job, merge).await?;
                    return self.resume_guest(qmp, job, &id, paused_at).await;
                }
                // Never started, or gone without merging: nothing pivots now.
                self.forget_pivot(qmp, job, &id, paused_at).await?;
                paused_at = None;
                self.start_qemu_job(qmp, job, merge).await?;
                self.live_fault_point(job, "started").await;
                continue;
            };
            progress.bytes(info.current_progress, info.total_progress);
            match info.status.as_str() {
                "concluded" => {
                    // A stream ends only by changing the backing or with an error; its
                    // graph cannot be read before it is dismissed (QEMU 10.0 crashed
                    // listing its nodes then), so it is checked after.
                    let merged = info.error.is_none()
                        && match merge {
                            LiveMerge::Stream { .. } => true,
                            LiveMerge::Commit { .. } => {
                                self.merged_in_qemu(qmp, merge, gone).await?
                            }
                        };
                    if merged {
                        // Recorded before the job is dismissed, and before the guest
                        // runs again: from here on the kept file is the disk.
                        self.live_fault_point(job, "concluded").await;
                        self.record_merged(job, merge).await?;
                        self.live_fault_point(job, "recorded").await;
                        self.resume_guest(qmp, job, &id, paused_at).await?;
                        qmp.execute::<Value>("job-dismiss", json!({ "id": id }))
                            .await?;
                        if !self.merged_in_qemu(qmp, merge, gone).await? {
                            return Err(mismatch(
                                "QEMU's job ended, but QEMU still reads the layers it merged away"
                                    .into(),
                            ));
                        }
                        return Ok(());
                    }
                    // Failed, or ended without merging: the graph is as before.
                    qmp.execute::<Value>("job-dismiss", json!({ "id": id }))
                        .await?;
                    self.forget_pivot(qmp, job, &id, paused_at).await?;
                    paused_at = None;
                    if let Some(error) = info.error {
                        return Err(qemu_job_failed(&id, &error));
                    }
                    continue;
                }
                "ready" if merge.is_pivot() => {
                    if !self.paused_for(job, &id).await? {
                        // Only under a pause strata set itself: one set by someone
                        // else may end before the pivot is recorded.
                        if !qmp.guest_running().await? {
                            tokio::time::sleep(POLL).await;
                            continue;
                        }
                        paused_at = Some(self.pause_guest(qmp, job, &id).await?);
                        self.live_fault_point(job, "paused").await;
                    }
                    let detail = self.job_detail(job).await?;
                    if detail.get("pivot_requested").and_then(Value::as_str) != Some(&id) {
                        self.add_detail(job, &json!({ "pivot_requested": id }))
                            .await?;
                    }
                    // Refused while QEMU cannot complete yet (a new write to copy):
                    // asked again at the next poll.
                    match qmp
                        .execute::<Value>("job-complete", json!({ "id": id }))
                        .await
                    {
                        Ok(_) | Err(QmpError::Command { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                // Paused by someone else: a paused merge never ends.
                "paused" | "standby" => {
                    qmp.execute::<Value>("job-resume", json!({ "id": id }))
                        .await?;
                }
                "pending" => {
                    qmp.execute::<Value>("job-finalize", json!({ "id": id }))
                        .await?;
                }
                _ => {}
            }
            // Woken by QEMU's next event (the job's status changed), or asks again.
            qmp.wait_event(POLL).await?;
        }
    }

    /// Start QEMU's job, after checking QEMU reads the layers the step merges. The
    /// device is the node a device or an export reads: QEMU takes no other.
    async fn start_qemu_job(&self, qmp: &mut Qmp, job: Uuid, merge: &LiveMerge) -> Result<()> {
        let nodes = qmp.block_nodes().await?;
        let attached = qmp.attached_nodes().await?;
        let mut arguments = match *merge {
            LiveMerge::Commit {
                top, base, above, ..
            } => {
                let top_node = self.node_reading(&nodes, top, Some(base))?;
                let base_node = self.node_reading(&nodes, base, None)?;
                let device = self.attached_reading(&nodes, &attached, top)?;
                if above.is_none() && device != top_node {
                    return Err(mismatch(format!(
                        "{} is not the layer the guest writes",
                        self.volume_path(top).display()
                    )));
                }
                let mut arguments = json!({
                    "device": device,
                    "top-node": top_node,
                    "base-node": base_node,
                });
                if above.is_some() {
                    // Written into the header of the layer above as given: relative, as
                    // strata names every backing file. (QEMU refuses it for an active
                    // commit, which rewrites no header.)
                    arguments["backing-file"] = json!(files::volume_file_name(base));
                }
                arguments
            }
            LiveMerge::Stream {
                volume,
                from,
                backing,
                ..
            } => {
                let node = self.node_reading(&nodes, volume, Some(from))?;
                self.attached_reading(&nodes, &attached, volume)?;
                let mut arguments = json!({ "device": node });
                if let Some(backing) = backing {
                    arguments["base-node"] = json!(self.node_reading(&nodes, backing, None)?);
                    arguments["backing-file"] = json!(files::volume_file_name(backing));
                }
                arguments
            }
        };
        arguments["job-id"] = json!(merge.qemu_job_id(job));
        arguments["auto-dismiss"] = json!(false);
        let command = match merge {
            LiveMerge::Commit { .. } => "block-commit",
            LiveMerge::Stream { .. } => "block-stream",
        };
        qmp.execute::<Value>(command, arguments)
            .await
            .map_err(Error::from_graph_change)?;
        Ok(())
    }

    /// The format node QEMU reads `volume`'s file through, with `below` somewhere
    /// beneath it (or anything, when `None`). Any other graph is a mismatch: never
    /// guessed.
    pub(super) fn node_reading(
        &self,
        nodes: &[BlockNode],
        volume: Uuid,
        below: Option<Uuid>,
    ) -> Result<String> {
        let file = self.volume_path(volume).display().to_string();
        let below = below.map(|b| self.volume_path(b).display().to_string());
        let found: Vec<&BlockNode> = nodes
            .iter()
            .filter(|n| n.drv == "qcow2" && n.image.file_name() == file)
            .filter(|n| {
                below
                    .as_ref()
                    .is_none_or(|b| n.image.chain()[1..].contains(b))
            })
            .collect();
        match found.as_slice() {
            [node] => Ok(node.node_name.clone()),
            [] => Err(mismatch(format!(
                "QEMU does not read {file}{}",
                below.map(|b| format!(" on top of {b}")).unwrap_or_default()
            ))),
            several => Err(mismatch(format!(
                "QEMU opened {file} {} times",
                several.len()
            ))),
        }
    }

    /// The chains (files, top first) of the nodes devices and exports read.
    async fn attached_chains(&self, qmp: &mut Qmp) -> Result<Vec<Vec<String>>> {
        let nodes = qmp.block_nodes().await?;
        let attached = qmp.attached_nodes().await?;
        Ok(nodes
            .into_iter()
            .filter(|n| attached.contains(&n.node_name))
            .map(|n| n.image.chain())
            .collect())
    }

    /// The attached node whose chain reads `volume`'s file: the device a job on that
    /// chain must name. None, or several, is a mismatch.
    fn attached_reading(
        &self,
        nodes: &[BlockNode],
        attached: &[String],
        volume: Uuid,
    ) -> Result<String> {
        let file = self.volume_path(volume).display().to_string();
        let found: Vec<&BlockNode> = nodes
            .iter()
            .filter(|n| attached.contains(&n.node_name) && n.image.chain().contains(&file))
            .collect();
        match found.as_slice() {
            [node] => Ok(node.node_name.clone()),
            [] => Err(mismatch(format!(
                "no device or export of QEMU reads {file}"
            ))),
            several => Err(mismatch(format!(
                "{file} is read by {} devices or exports",
                several.len()
            ))),
        }
    }

    /// Whether QEMU's graph shows the merge done: a device or export reads the kept
    /// file, and none reads a merged-away one.
    async fn merged_in_qemu(
        &self,
        qmp: &mut Qmp,
        merge: &LiveMerge,
        gone: &[Uuid],
    ) -> Result<bool> {
        let kept = self.volume_path(merge.kept()).display().to_string();
        let gone: Vec<String> = gone
            .iter()
            .map(|v| self.volume_path(*v).display().to_string())
            .collect();
        let chains = self.attached_chains(qmp).await?;
        let reads_kept = chains.iter().any(|chain| chain.contains(&kept));
        let reads_gone = chains
            .iter()
            .any(|chain| chain.iter().any(|f| gone.contains(f)));
        Ok(reads_kept && !reads_gone)
    }

    async fn paused_for(&self, job: Uuid, qemu_job: &str) -> Result<bool> {
        let detail = self.job_detail(job).await?;
        Ok(detail.get("paused_for").and_then(Value::as_str) == Some(qemu_job))
    }

    /// Pause the running guest, recording first that strata paused it (so a restart
    /// resumes it).
    async fn pause_guest(&self, qmp: &mut Qmp, job: Uuid, qemu_job: &str) -> Result<Instant> {
        self.add_detail(job, &json!({ "paused_for": qemu_job }))
            .await?;
        qmp.execute::<Value>("stop", json!({})).await?;
        Ok(Instant::now())
    }

    /// Let the guest run again if strata paused it for this QEMU job.
    async fn resume_guest(
        &self,
        qmp: &mut Qmp,
        job: Uuid,
        qemu_job: &str,
        paused_at: Option<Instant>,
    ) -> Result<()> {
        if !self.paused_for(job, qemu_job).await? {
            return Ok(());
        }
        qmp.execute::<Value>("cont", json!({})).await?;
        let mut cleared = json!({ "paused_for": null, "pivot_requested": null });
        if let Some(at) = paused_at {
            cleared["paused_ms"] = json!(at.elapsed().as_millis() as u64);
        }
        self.add_detail(job, &cleared).await
    }

    /// A pivot that did not happen and will not (its QEMU job is gone or ended
    /// without it): forget the request and let a guest strata paused run again.
    async fn forget_pivot(
        &self,
        qmp: &mut Qmp,
        job: Uuid,
        qemu_job: &str,
        paused_at: Option<Instant>,
    ) -> Result<()> {
        self.resume_guest(qmp, job, qemu_job, paused_at).await?;
        let detail = self.job_detail(job).await?;
        if detail.get("pivot_requested").is_some_and(|r| !r.is_null()) {
            self.add_detail(job, &json!({ "pivot_requested": null }))
                .await?;
        }
        Ok(())
    }

    /// At start, before any job resumes: a guest strata paused before the restart runs
    /// again. With no pivot asked for, at once (a pause for a flush, or one before
    /// `job-complete` was sent); otherwise once QEMU's job ended (waited for a while),
    /// the pivot recorded first if the graph shows it. A pivot still under way is left
    /// to its resumed job.
    pub(super) async fn resume_paused_guest(&self, job: Uuid, merge: LiveMerge) -> Result<()> {
        let id = merge.qemu_job_id(job);
        if !self.paused_for(job, &id).await? {
            return Ok(());
        }
        let Reach::Reached(mut qmp) = self.connect_live(merge.vm()).await? else {
            return Ok(());
        };
        let detail = self.job_detail(job).await?;
        if detail.get("pivot_requested").and_then(Value::as_str) == Some(&id) {
            let gone = self.merged_away(&merge).await?;
            let mut ended = false;
            for _ in 0..100 {
                let found = qmp.jobs().await?.into_iter().find(|j| j.id == id);
                if found.as_ref().is_none_or(|j| j.status == "concluded") {
                    ended = true;
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            if !ended {
                return Ok(());
            }
            if self.merged_in_qemu(&mut qmp, &merge, &gone).await? {
                self.record_merged(job, &merge).await?;
            }
        }
        self.forget_pivot(&mut qmp, job, &id, None).await
    }

    async fn merge_recorded(&self, job: Uuid, merge: &LiveMerge) -> Result<bool> {
        let detail = self.job_detail(job).await?;
        Ok(detail["live_merges"][merge.key().to_string()] == json!("done"))
    }

    async fn record_merged(&self, job: Uuid, merge: &LiveMerge) -> Result<()> {
        let detail = json!({ "live_merges": { merge.key().to_string(): "done" } });
        self.add_detail(job, &detail).await
    }

    /// The layers whose clusters the merge moved into the kept file: from `top` down to
    /// `base` (excluded) for a commit, from `from` down to `backing` (excluded) for a
    /// stream, as the records say (they change with the step's journal entry, after
    /// this).
    async fn merged_away(&self, merge: &LiveMerge) -> Result<Vec<Uuid>> {
        let (start, stop) = match *merge {
            LiveMerge::Commit { top, base, .. } => (top, Some(base)),
            LiveMerge::Stream { from, backing, .. } => (from, backing),
        };
        let chain = store::vms::volume_chain(&mut *self.db.reader().await?, start).await?;
        Ok(chain.into_iter().take_while(|v| Some(*v) != stop).collect())
    }

    /// Close the nodes of merged-away layers QEMU still has open though nothing reads
    /// them (one the orchestrator or a live snapshot added by name stays after the
    /// merge), upper ones first, until none more closes, before their files go. One
    /// that will not close is left: removing the file cannot harm a process that holds
    /// it open.
    async fn close_nodes(&self, qmp: &mut Qmp, gone: &[Uuid]) -> Result<()> {
        let files: BTreeSet<String> = gone
            .iter()
            .map(|v| self.volume_path(*v).display().to_string())
            .collect();
        loop {
            let nodes = qmp.block_nodes().await?;
            let read_below: BTreeSet<String> = nodes
                .iter()
                .filter(|n| n.drv == "qcow2")
                .flat_map(|n| n.image.chain().into_iter().skip(1))
                .collect();
            let mut closed = false;
            for node in nodes.iter().filter(|n| n.drv == "qcow2") {
                let file = node.image.file_name();
                if !files.contains(&file) || read_below.contains(&file) {
                    continue;
                }
                match qmp
                    .execute::<Value>("blockdev-del", json!({"node-name": node.node_name}))
                    .await
                {
                    Ok(_) => closed = true,
                    Err(e) => {
                        tracing::debug!(node = %node.node_name, error = %e, "a merged-away node stays open");
                    }
                }
            }
            if !closed {
                return Ok(());
            }
        }
    }

    /// Make sure the kept file holds, on disk, every cluster the merged-away layers
    /// mapped, and fsync it (and the layer above a commit, whose header QEMU rewrote),
    /// so their files can go. If QEMU has not written its tables out yet, a QEMU that
    /// can pause its guest is made to (`stop` flushes every image, the guest paused
    /// already or not) and the check is made again; otherwise the step waits for the
    /// guest's next flush (up to `FLUSH_WAIT`, then parked).
    async fn settle_on_disk(
        &self,
        qmp: &mut Qmp,
        job: Uuid,
        merge: &LiveMerge,
        gone: &[Uuid],
    ) -> Result<()> {
        let kept = self.volume_path(merge.kept());
        let mut needed: Vec<(u64, u64)> = Vec::new();
        for volume in gone {
            needed.extend(self.qemu.own_ranges(&self.volume_path(*volume)).await?);
        }
        let mut flushed = false;
        // Asked once, and only if a flush turns out to be needed.
        let mut can_pause = None;
        let waiting_since = Instant::now();
        while !crate::qemu::ranges_cover(&self.qemu.own_ranges(&kept).await?, &needed) {
            let pausable = match can_pause {
                Some(known) => known,
                None => *can_pause.insert(qmp.can_pause().await?),
            };
            if !flushed && !pausable && waiting_since.elapsed() < FLUSH_WAIT {
                // A guest flushes its disks every few seconds while it writes.
                tokio::time::sleep(FLUSH_POLL).await;
                continue;
            }
            if flushed || !pausable {
                return Err(Error::Qmp(QmpError::Protocol {
                    command: "flush".into(),
                    detail: format!(
                        "QEMU has not written the tables of what it merged into {} to disk yet (it does at the guest's next flush)",
                        kept.display()
                    ),
                }));
            }
            let id = merge.qemu_job_id(job);
            if qmp.guest_running().await? {
                let paused_at = self.pause_guest(qmp, job, &id).await?;
                self.resume_guest(qmp, job, &id, Some(paused_at)).await?;
            } else {
                qmp.execute::<Value>("stop", json!({})).await?;
            }
            flushed = true;
        }
        super::execute::sync_file(&kept).await?;
        if let LiveMerge::Commit {
            above: Some(above), ..
        } = *merge
        {
            super::execute::sync_file(&self.volume_path(above)).await?;
        }
        Ok(())
    }

    /// Finish a merge whose VM stopped, from the files, which all stay until the plan
    /// is over.
    async fn merge_offline(
        &self,
        job: Uuid,
        merge: LiveMerge,
        progress: &StepProgress,
    ) -> Result<()> {
        tracing::warn!(%job, vm = %merge.vm(), "the VM stopped; the merge is finished offline");
        match merge {
            LiveMerge::Commit {
                top,
                base,
                above: Some(above),
                ..
            } => {
                // QEMU may have pointed `above` at `base` before `base`'s tables reached
                // the disk; `above` over `top` is the disk either way (`top` is
                // untouched, and what the commit copied only hides under it).
                self.qemu
                    .repoint(&self.volume_path(above), &files::volume_file_name(top))
                    .await?;
                let commit = FileOp::Commit { top, base };
                progress.start(self.copy_estimate(&commit).await);
                self.merge(&commit, true, None, progress).await?;
                self.qemu
                    .repoint(&self.volume_path(above), &files::volume_file_name(base))
                    .await?;
            }
            LiveMerge::Commit {
                top,
                base,
                above: None,
                ..
            } => {
                if self.merge_recorded(job, &merge).await? {
                    // Pivoted: the base alone is the disk; the old top is never read.
                    self.qemu.repair_leaks(&self.volume_path(base)).await?;
                } else {
                    let commit = FileOp::Commit { top, base };
                    progress.start(self.copy_estimate(&commit).await);
                    self.merge(&commit, true, None, progress).await?;
                }
            }
            LiveMerge::Stream {
                volume,
                from,
                backing,
                ..
            } => {
                // Pointed back at `from` first (`again`): what QEMU streamed equals it.
                let stream = FileOp::Stream {
                    volume,
                    from: Some(from),
                    backing,
                };
                progress.start(self.copy_estimate(&stream).await);
                self.merge(&stream, true, None, progress).await?;
            }
        }
        Ok(())
    }
}

fn mismatch(what: String) -> Error {
    Error::problem(
        ErrorCode::RuntimeMismatch,
        format!("the VM's QEMU does not read the chain strata records: {what}"),
    )
}

/// A QEMU block job that ended in error: a full file system waits for space (parked),
/// anything else is retried, then fails the job.
fn qemu_job_failed(id: &str, error: &str) -> Error {
    if error.contains("No space left on device") {
        return Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC));
    }
    Error::problem(
        ErrorCode::QemuFailed,
        format!("QEMU's block job {id} failed: {error}"),
    )
}
