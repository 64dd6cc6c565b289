//! Full clones of a running VM: QEMU copies each disk as it is at one instant
//! (`blockdev-backup`, `sync: full`, every disk's job started in one transaction) into
//! new files strata made, opened in QEMU as nodes of their own.
//!
//! Nothing the source reads changes, so this is no point of no return: a cancel or a
//! failure cancels QEMU's jobs, closes the target nodes and removes the new files. As for
//! merges, the QEMU jobs have ids derived from the target files and are dismissed only
//! after strata recorded the result (`detail.live_copies`); a step redone with no job
//! under way starts over on fresh files, since a target an earlier attempt half wrote
//! may hold stale clusters where the source reads zeros.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::super::Engine;
use super::execute::{create_image, remove_if_exists, sync_file};
use super::live::{Frozen, Reach};
use super::progress::StepProgress;
use crate::domain::plan::{FileOp, LiveCopy};
use crate::domain::{Quiesce, Uuid};
use crate::error::{Error, ErrorCode, Result};
use crate::qemu::QemuError;
use crate::qemu::qmp::{JobInfo, Qmp};

/// How often the copies are asked how far they got.
const POLL: Duration = Duration::from_millis(100);

fn job_id(copy: &LiveCopy) -> String {
    format!("strata-copy-{}", copy.volume.simple())
}

/// The target's node in QEMU: deterministic, so a redone step finds it, and within
/// QEMU's 31-character limit for node names.
fn target_node(copy: &LiveCopy) -> String {
    let hex = copy.volume.simple().to_string();
    format!("strata-{}", &hex[8..])
}

impl Engine {
    pub(super) async fn live_copy(
        &self,
        job: Uuid,
        vm: Uuid,
        copies: &[LiveCopy],
        freeze: Option<Quiesce>,
        cancel: Option<&watch::Receiver<bool>>,
        progress: &StepProgress,
    ) -> Result<()> {
        let mut qmp = match self.connect_live(vm).await? {
            Reach::Reached(qmp) => qmp,
            Reach::Stopped => {
                tracing::warn!(%job, %vm, "the VM stopped; its disks are copied offline");
                let converts: Vec<FileOp> = copies
                    .iter()
                    .map(|copy| FileOp::Convert {
                        source: copy.source,
                        volume: copy.volume,
                    })
                    .collect();
                // One after another, as parts of the step's total.
                let mut parts = Vec::with_capacity(converts.len());
                for convert in &converts {
                    parts.push(self.copy_estimate(convert).await);
                }
                let parts: Option<Vec<u64>> = parts.into_iter().collect();
                let total = parts.as_ref().map_or(0, |parts| parts.iter().sum());
                let mut offset = 0;
                for (index, convert) in converts.iter().enumerate() {
                    if let Some(part) = parts.as_ref().map(|parts| parts[index]) {
                        progress.start_part(total, offset, part);
                        offset += part;
                    }
                    self.copy(convert, cancel, progress).await?;
                }
                return Ok(());
            }
            Reach::Unreachable(e) => return Err(e),
        };
        let detail = self.job_detail(job).await?;
        // An attempt (or the thaw at start) that could not thaw the guest after the
        // copies' freeze: the guest is thawed before anything else.
        if freeze.is_some() && detail.get("thaw_error").is_some_and(|e| !e.is_null()) {
            self.thaw_or_wait(job, vm).await?;
        }
        if detail["live_copies"] != json!("done") {
            let running = self.copy_jobs(&mut qmp, copies).await?;
            if running.is_empty() {
                let frozen = Frozen {
                    job,
                    vm,
                    freeze,
                    snapshot: None,
                };
                self.start_copies(&mut qmp, copies, frozen).await?;
                self.live_fault_point(job, "copying").await;
            }
            if let Err(e) = self
                .follow_copies(&mut qmp, job, copies, cancel, progress)
                .await
            {
                self.abandon_copies(&mut qmp, copies).await;
                return Err(e);
            }
        }
        // Done and recorded: QEMU's jobs and nodes go, the copies are made durable.
        for info in self.copy_jobs(&mut qmp, copies).await? {
            qmp.execute::<Value>("job-dismiss", json!({ "id": info.id }))
                .await?;
        }
        self.close_targets(&mut qmp, copies).await?;
        for copy in copies {
            sync_file(&self.volume_path(copy.volume)).await?;
        }
        Ok(())
    }

    /// The copy jobs QEMU knows of.
    async fn copy_jobs(&self, qmp: &mut Qmp, copies: &[LiveCopy]) -> Result<Vec<JobInfo>> {
        let ids: Vec<String> = copies.iter().map(job_id).collect();
        Ok(qmp
            .jobs()
            .await?
            .into_iter()
            .filter(|j| ids.contains(&j.id))
            .collect())
    }

    /// Open fresh target files in QEMU and start every copy at one instant, the guest
    /// frozen around it when asked.
    async fn start_copies(&self, qmp: &mut Qmp, copies: &[LiveCopy], frozen: Frozen) -> Result<()> {
        self.close_targets(qmp, copies).await?;
        let nodes = qmp.block_nodes().await?;
        let mut actions = Vec::with_capacity(copies.len());
        for copy in copies {
            let device = self.node_reading(&nodes, copy.source, None)?;
            let path = self.volume_path(copy.volume);
            remove_if_exists(&path).await?;
            create_image(path.clone(), copy.size_bytes, None).await?;
            let node = json!({
                "driver": "qcow2",
                "node-name": target_node(copy),
                "file": {"driver": "file", "filename": path},
            });
            qmp.execute::<Value>("blockdev-add", node).await?;
            actions.push(json!({"type": "blockdev-backup", "data": {
                "job-id": job_id(copy),
                "device": device,
                "target": target_node(copy),
                "sync": "full",
                "auto-dismiss": false,
            }}));
        }
        self.transaction_frozen(qmp, frozen, actions).await??;
        Ok(())
    }

    /// Wait for every copy to end, reporting progress; recorded once all succeeded.
    async fn follow_copies(
        &self,
        qmp: &mut Qmp,
        job: Uuid,
        copies: &[LiveCopy],
        cancel: Option<&watch::Receiver<bool>>,
        progress: &StepProgress,
    ) -> Result<()> {
        loop {
            if cancel.is_some_and(|c| *c.borrow()) {
                return Err(Error::Qemu(QemuError::Cancelled));
            }
            let jobs = self.copy_jobs(qmp, copies).await?;
            if jobs.len() < copies.len() {
                return Err(Error::problem(
                    ErrorCode::RuntimeMismatch,
                    "QEMU lost track of a copy it was making (restarted?)",
                ));
            }
            let (done, total) = jobs.iter().fold((0, 0), |(d, t), j| {
                (d + j.current_progress, t + j.total_progress)
            });
            progress.bytes(done, total);
            if jobs.iter().all(|j| j.status == "concluded") {
                if let Some(failed) = jobs.iter().find(|j| j.error.is_some()) {
                    return Err(Error::problem(
                        ErrorCode::QemuFailed,
                        format!(
                            "QEMU's copy {} failed: {}",
                            failed.id,
                            failed.error.as_deref().unwrap_or_default()
                        ),
                    ));
                }
                return self
                    .add_detail(job, &json!({ "live_copies": "done" }))
                    .await;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stop every copy and close the targets (their files are removed by the caller's
    /// rollback). Best effort: a QEMU that cannot be asked keeps writing into files
    /// that are gone, which harms nothing the source reads.
    async fn abandon_copies(&self, qmp: &mut Qmp, copies: &[LiveCopy]) {
        let stopped = async {
            for info in self.copy_jobs(qmp, copies).await? {
                if info.status != "concluded" {
                    let _ = qmp
                        .execute::<Value>("job-cancel", json!({ "id": info.id }))
                        .await;
                }
            }
            for _ in 0..100 {
                let jobs = self.copy_jobs(qmp, copies).await?;
                if jobs.iter().all(|j| j.status == "concluded") {
                    for info in jobs {
                        qmp.execute::<Value>("job-dismiss", json!({ "id": info.id }))
                            .await?;
                    }
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            self.close_targets(qmp, copies).await
        };
        if let Err(e) = stopped.await {
            tracing::warn!(error = %e, "could not stop QEMU's copies cleanly");
        }
    }

    /// Close the target nodes a copy opened (before their files go or are made again).
    async fn close_targets(&self, qmp: &mut Qmp, copies: &[LiveCopy]) -> Result<()> {
        let nodes = qmp.block_nodes().await?;
        for copy in copies {
            let name = target_node(copy);
            if nodes.iter().any(|n| n.node_name == name) {
                qmp.execute::<Value>("blockdev-del", json!({ "node-name": name }))
                    .await?;
            }
        }
        Ok(())
    }

    /// At a rollback: stop the copies of a live clone and close their targets, before
    /// the new files are removed.
    pub(super) async fn live_copy_remove(&self, vm: Uuid, copies: &[LiveCopy]) {
        if let Ok(Reach::Reached(mut qmp)) = self.connect_live(vm).await {
            self.abandon_copies(&mut qmp, copies).await;
        }
    }
}
