//! Worker tasks: claim the next runnable job, drive it, record what happened; and the
//! start-up pass that finishes or rolls back every job a crash interrupted.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::super::{BOOKKEEPING_RETRIES, Engine, run};
use crate::domain::plan::FileOp;
use crate::domain::{Job, JobKind, JobStatus, Uuid};
use crate::error::{Error, Result};
use crate::files::uploads;
use crate::store;

impl Engine {
    /// Finish or roll back every job a crash interrupted, oldest first, before any
    /// worker claims new work. Each resumes from its journal.
    pub async fn recover(self: &Arc<Self>) -> Result<usize> {
        let interrupted = store::jobs::list_running(&mut *self.db.reader().await?).await?;
        let count = interrupted.len();
        // A guest frozen for a switch the crash cut short must not wait for the older
        // jobs resumed before its own: it is thawed first (a thaw with nothing frozen
        // does nothing), and its resumed job records what it can prove.
        for job in &interrupted {
            for step in job.plan.iter().flat_map(|plan| &plan.steps) {
                let frozen_vm = match step.op {
                    FileOp::LiveSwitch {
                        vm,
                        freeze: Some(_),
                        ..
                    }
                    | FileOp::LiveCopy {
                        vm,
                        freeze: Some(_),
                        ..
                    } => Some(vm),
                    _ => None,
                };
                if let Some(vm) = frozen_vm
                    && let Err(e) = self.thaw_guest(job.id, vm).await
                {
                    tracing::error!(job = %job.id, %vm, error = %e, "could not thaw a guest frozen before the restart");
                }
            }
        }
        // Likewise a guest paused for a pivot (or a flush) the crash cut short.
        for job in &interrupted {
            for step in job.plan.iter().flat_map(|plan| &plan.steps) {
                if let Some(merge) = super::live_merge::LiveMerge::of(&step.op)
                    && let Err(e) = self.resume_paused_guest(job.id, merge).await
                {
                    tracing::error!(job = %job.id, error = %e, "could not resume a guest paused before the restart");
                }
            }
        }
        // After the thaws and resumes, which must not wait for the writer connection
        // (a frozen or paused guest waits for nothing), and before any copy resumes.
        self.clear_stale_copy_progress().await;
        for job in interrupted {
            tracing::warn!(job = %job.id, kind = %job.kind, phase = ?job.phase, step = job.next_step, "resuming interrupted job");
            self.run(job, false).await;
        }
        Ok(count)
    }

    /// No copy runs before a job is resumed: the figures a previous process left in
    /// the rows (it stopped while copying) go. Best effort, like every progress write:
    /// views never show such figures as live anyway once the job left its step (see
    /// `store::jobs`), and a resumed copy writes its own.
    async fn clear_stale_copy_progress(&self) {
        let cleared = async {
            let mut tx = self.db.begin().await?;
            let cleared = store::jobs::clear_copy_progress(&mut tx).await?;
            tx.commit().await?;
            Ok::<_, crate::error::Error>(cleared)
        };
        match cleared.await {
            Ok(0) => {}
            Ok(jobs) => tracing::info!(jobs, "cleared the copy progress an earlier process left"),
            Err(e) => {
                tracing::warn!(error = %e, "could not clear the copy progress an earlier process left; ignored")
            }
        }
    }

    /// Start the worker tasks; they stop when `shutdown` turns true.
    pub fn spawn_workers(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.config.workers.max(1))
            .map(|_| {
                let engine = Arc::clone(self);
                let mut shutdown = shutdown.clone();
                tokio::spawn(async move {
                    loop {
                        if *shutdown.borrow() {
                            break;
                        }
                        let notified = engine.wake.notified();
                        match engine.claim().await {
                            Ok(Some((job, planned))) => {
                                // More may be queued: the next idle worker looks.
                                engine.wake.notify_one();
                                engine.run(job, planned).await;
                                continue;
                            }
                            Ok(None) => {}
                            Err(e) => tracing::error!(error = %e, "claiming a job failed"),
                        }
                        tokio::select! {
                            _ = notified => {}
                            _ = shutdown.changed() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                })
            })
            .collect()
    }

    /// Take the next runnable job. A job never planned is planned and its plan
    /// journaled in the same transaction: the state it is planned from is the one its
    /// claim commits with, and the job costs one write transaction less. A job whose
    /// plan is refused (`has_dependents`, no space, unreadable parameters) is claimed
    /// unplanned; `drive` plans it again and ends it with the refusal. A database
    /// error fails the claim (the job stays queued), as it may have cost the
    /// transaction. An import is planned by
    /// `drive` after it holds an import slot, which it may wait for. True with the job
    /// when its plan was journaled here.
    pub(super) async fn claim(&self) -> Result<Option<(Job, bool)>> {
        let mut tx = self.db.begin().await?;
        let now = store::now();
        let mut job = match store::jobs::claim_parked(&mut tx, now).await? {
            Some(job) => Some(job),
            None => store::jobs::claim_next(&mut tx, now).await?,
        };
        let mut planned = false;
        if let Some(job) = &mut job
            && job.phase.is_none()
            && !job.cancel_requested
            && job.kind != JobKind::TemplateImport
        {
            tx.act_for(job.requested_by.as_deref());
            match run::plan_in(self, &mut tx, &job.spec, Some(job.seq)).await {
                Ok(plan) => {
                    super::drive::journal_plan_in(&mut tx, job, plan).await?;
                    planned = true;
                }
                // SQLite may have rolled the transaction back behind it (and the
                // RELEASE at commit would fail anyway): the job stays queued.
                Err(e @ Error::Database(_)) => return Err(e),
                Err(_) => {}
            }
        }
        tx.commit().await?;
        Ok(job.map(|job| (job, planned)))
    }

    /// Drive one claimed job to its end and record the outcome; `planned`: its claim
    /// journaled its plan.
    pub(super) async fn run(self: &Arc<Self>, job: Job, planned: bool) {
        let (cancel_tx, cancel_rx) = watch::channel(job.cancel_requested);
        self.running
            .lock()
            .expect("cancel map")
            .insert(job.id, cancel_tx);
        self.bump();
        let id = job.id;
        let upload = job.spec.upload();
        // An import's conversion reads an untrusted file: it takes an import slot
        // for its whole run (waiting for one if need be).
        let _slot = match job.kind {
            JobKind::TemplateImport => Arc::clone(&self.import_slots).acquire_owned().await.ok(),
            _ => None,
        };
        if planned {
            // Where `drive` marks a plan it journals itself.
            self.fault_point(&job, "planned").await;
        }
        let mut outcome = self.drive(job, cancel_rx.clone()).await;
        // A failed journal write (e.g. the database's file system was full) leaves the
        // job as its last committed entry describes it: resume from there, as a restart
        // would, after a pause.
        for attempt in 1..=BOOKKEEPING_RETRIES {
            let Err(e) = &outcome else { break };
            tracing::error!(job = %id, error = %e, attempt, "job bookkeeping failed; resuming from the journal");
            tokio::time::sleep(Duration::from_secs(2 << attempt)).await;
            outcome = match self.reload(id).await {
                Ok(Some(job)) if job.status == JobStatus::Running => {
                    self.drive(job, cancel_rx.clone()).await
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
        }
        self.running.lock().expect("cancel map").remove(&id);
        self.live_progress.lock().expect("progress map").remove(&id);
        if let Err(e) = outcome {
            tracing::error!(job = %id, error = %e, "job bookkeeping keeps failing; it will be resumed at the next start");
        } else if let Some(upload) = upload
            && !matches!(self.reload(id).await, Ok(Some(job)) if job.status == JobStatus::Running)
        {
            // Imported or not, the job is over (not parked): the upload is not needed
            // any more.
            uploads::remove(&self.files, upload).await;
        }
        self.bump();
        // A finished job may unblock the next job of its VM.
        self.wake.notify_waiters();
    }

    pub(super) async fn reload(&self, id: Uuid) -> Result<Option<Job>> {
        store::jobs::get(&mut *self.db.reader().await?, id).await
    }
}
