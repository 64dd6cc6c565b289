//! The durable job engine: workers claim queued jobs (one at a time per VM), journal a
//! plan before touching any file, record each finished step together with the metadata
//! that describes it, and on start resume every job a crash interrupted.
//!
//! A job moves through: queued -> (plan journaled, `mark` applied) -> steps ->
//! (`finish` applied, phase committed) -> files dropped -> succeeded. Stopping before
//! the plan's point of no return rolls back (`undo`, created files removed); failing
//! after it applies `fail`, which flags what the interrupted merge made unreadable.

pub mod accept;
pub mod exports;
mod run;
pub mod uploads;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::domain::plan::{FileOp, MetaOp, Plan};
use crate::domain::{Job, JobKind, JobPhase, JobStatus, Uuid};
use crate::error::{Error, ErrorCode, Result};
use crate::files;
use crate::qemu::{Qemu, QemuError};
use crate::store::{self, Db};

pub use accept::{NewRecords, NewSnapshot, Request, accept, accept_in};
pub use run::{dependent_vms, find_snapshot, require_ready, require_stopped};

/// How often a job whose journal write failed is resumed before it is left for the
/// next start.
const BOOKKEEPING_RETRIES: u32 = 4;

/// How often a step whose qemu-img was killed by someone else is tried again.
const KILLED_RETRIES: u32 = 3;

/// How often a failing step past the point of no return is tried again before the job
/// gives up (a full file system is waited out without limit, see `PARK_FOR`).
const FORWARD_RETRIES: u32 = 5;

/// How long a job that ran out of space past its point of no return waits before it
/// is tried again.
const PARK_FOR: Duration = Duration::from_secs(5);

/// Engine settings (a slice of the service config).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub workers: usize,
    pub volumes_dir: PathBuf,
    /// Free space a merge must leave untouched on the data file system.
    pub reserved_bytes: u64,
    /// Test-only crash point, `<job kind>:<point>` (see `Engine::fault_point`).
    pub fault: Option<String>,
    /// Imports (inspection in the request, conversion in the job) running at once.
    pub import_slots: usize,
}

pub struct Engine {
    pub db: Db,
    pub qemu: Qemu,
    pub config: EngineConfig,
    wake: Notify,
    /// Bumped whenever a job changes state; long-polls wait on it.
    changed: watch::Sender<u64>,
    /// Cancel signals of running jobs.
    running: Mutex<HashMap<Uuid, watch::Sender<bool>>>,
    /// Progress of running jobs within a step (see `progress_reporter`).
    live_progress: Mutex<HashMap<Uuid, u8>>,
    /// Slots for work on untrusted images (see `EngineConfig::import_slots`).
    import_slots: Arc<tokio::sync::Semaphore>,
}

/// How a job ended early.
enum Stop {
    Cancelled,
    Failed(Error),
    /// Past its point of no return, out of space: it waits (parked) and goes on later.
    Parked(Error),
}

/// A stop as the journal records it: the final status and, for a failure, its code
/// and message.
struct Outcome {
    status: JobStatus,
    error: Option<(String, String)>,
}

impl Outcome {
    fn of(job: &Job, stop: Stop) -> Self {
        match stop {
            Stop::Cancelled => Self {
                status: JobStatus::Cancelled,
                error: None,
            },
            Stop::Failed(e) | Stop::Parked(e) => {
                if e.code().status().is_server_error() {
                    tracing::error!(job = %job.id, kind = %job.kind, error = %e, "job failed");
                } else {
                    tracing::info!(job = %job.id, kind = %job.kind, error = %e, "job refused");
                }
                Self {
                    status: JobStatus::Failed,
                    error: Some((e.code().as_str().to_owned(), e.to_string())),
                }
            }
        }
    }

    /// What a job journaled as stopping ends with.
    fn recorded(job: &Job) -> Self {
        match &job.error_code {
            Some(code) => Self {
                status: JobStatus::Failed,
                error: Some((code.clone(), job.error_message.clone().unwrap_or_default())),
            },
            None => Self {
                status: JobStatus::Cancelled,
                error: None,
            },
        }
    }

    fn error_pair(&self) -> Option<(&str, &str)> {
        self.error.as_ref().map(|(c, m)| (c.as_str(), m.as_str()))
    }
}

impl Engine {
    pub fn new(db: Db, qemu: Qemu, config: EngineConfig) -> Arc<Self> {
        Arc::new(Self {
            db,
            qemu,
            import_slots: Arc::new(tokio::sync::Semaphore::new(config.import_slots.max(1))),
            config,
            wake: Notify::new(),
            changed: watch::channel(0).0,
            running: Mutex::new(HashMap::new()),
            live_progress: Mutex::new(HashMap::new()),
        })
    }

    pub fn volume_path(&self, volume: Uuid) -> PathBuf {
        files::volume_path(&self.config.volumes_dir, volume)
    }

    /// The directory every volume file sits in.
    pub fn volumes_dir(&self) -> &std::path::Path {
        &self.config.volumes_dir
    }

    /// Free space a copy must leave untouched on the data file system.
    pub fn reserved_bytes(&self) -> u64 {
        self.config.reserved_bytes
    }

    /// Refuse with `507 insufficient_storage` unless `bytes` (plus `reserve`) are free
    /// on the volumes' file system. Nothing needed, nothing refused: removing files is
    /// how space comes back.
    pub fn require_free_space(&self, bytes: u64, reserve: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let available = files::available_bytes(&self.config.volumes_dir)?;
        let needed = bytes.saturating_add(reserve);
        if available < needed {
            return Err(insufficient_storage(needed, available));
        }
        Ok(())
    }

    /// A slot for inspecting an untrusted image now, or `503 imports_busy` when every
    /// slot is taken (the client tries again after Retry-After).
    pub fn try_import_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.import_slots)
            .try_acquire_owned()
            .map_err(|_| {
                Error::problem(
                    ErrorCode::ImportsBusy,
                    format!(
                        "{} images are being inspected or imported, the most allowed at once (--import-slots)",
                        self.config.import_slots
                    ),
                )
            })
    }

    /// Tell idle workers that a job was queued.
    pub fn notify_enqueued(&self) {
        self.wake.notify_waiters();
        self.bump();
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that changes whenever any job changes state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Ask a running job to stop; it honours the request at its next safe point.
    pub fn signal_cancel(&self, job: Uuid) {
        if let Some(tx) = self.running.lock().expect("cancel map").get(&job) {
            let _ = tx.send(true);
        }
    }

    /// Cancel a queued job at once, or ask a running one to stop while it still can.
    pub async fn cancel(&self, id: Uuid) -> Result<Job> {
        let mut tx = self.db.begin().await?;
        let job = store::jobs::get(&mut tx, id).await?.ok_or_else(|| {
            Error::problem(ErrorCode::JobNotFound, format!("job {id} does not exist"))
        })?;
        match job.status {
            JobStatus::Queued => {
                // The single write connection serialises this with claiming, so the job
                // cannot start in between.
                let ops = run::unwind(&job.spec, &mut tx, true).await?;
                store::apply(&mut tx, &ops).await?;
                store::jobs::finish(&mut tx, id, JobStatus::Cancelled, None, store::now()).await?;
            }
            JobStatus::Running => {
                // Past the last step, or at/after the first commit, the job only goes forward.
                let past = job.past_no_return
                    || job
                        .plan
                        .as_ref()
                        .is_some_and(|plan| job.next_step >= plan.steps.len());
                if past {
                    return Err(Error::problem(
                        ErrorCode::JobNotCancellable,
                        "the job has started a step it cannot take back (a merge commit or a grow) or has none left, and must finish",
                    ));
                }
                store::jobs::request_cancel(&mut tx, id).await?;
            }
            status => {
                return Err(Error::problem(
                    ErrorCode::JobNotCancellable,
                    format!("the job has already ended ({status})"),
                ));
            }
        }
        let job = store::jobs::get(&mut tx, id)
            .await?
            .expect("job read in this transaction");
        tx.commit().await?;
        if job.status == JobStatus::Cancelled
            && let Some(upload) = job.spec.upload()
        {
            uploads::remove(self, upload).await;
        }
        self.signal_cancel(id);
        self.bump();
        Ok(job)
    }

    /// Finish or roll back every job a crash interrupted, oldest first, before any
    /// worker claims new work. Each resumes from its journal.
    pub async fn recover(self: &Arc<Self>) -> Result<usize> {
        let interrupted = store::jobs::list_running(&mut *self.db.reader().await?).await?;
        let count = interrupted.len();
        for job in interrupted {
            tracing::warn!(job = %job.id, kind = %job.kind, phase = ?job.phase, step = job.next_step, "resuming interrupted job");
            self.run(job).await;
        }
        Ok(count)
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
                            Ok(Some(job)) => {
                                engine.run(job).await;
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

    async fn claim(&self) -> Result<Option<Job>> {
        let mut tx = self.db.begin().await?;
        let now = store::now();
        let job = match store::jobs::claim_parked(&mut tx, now).await? {
            Some(job) => Some(job),
            None => store::jobs::claim_next(&mut tx, now).await?,
        };
        tx.commit().await?;
        Ok(job)
    }

    /// Drive one claimed job to its end and record the outcome.
    async fn run(self: &Arc<Self>, job: Job) {
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
            uploads::remove(self, upload).await;
        }
        self.bump();
        // A finished job may unblock the next job of its VM.
        self.wake.notify_waiters();
    }

    async fn reload(&self, id: Uuid) -> Result<Option<Job>> {
        store::jobs::get(&mut *self.db.reader().await?, id).await
    }

    async fn drive(self: &Arc<Self>, mut job: Job, cancel: watch::Receiver<bool>) -> Result<()> {
        // The first step a previous process (or attempt) may have been in the middle of
        // when it stopped; it and every later step may be half done.
        let resumed_at = (job.phase == Some(JobPhase::Executing)).then_some(job.next_step);
        if job.phase.is_none() {
            if *cancel.borrow() {
                return self.abandon(&job, Stop::Cancelled).await;
            }
            let plan = match run::plan(self, &job.spec, job.seq).await {
                Ok(plan) => plan,
                Err(e) => return self.abandon(&job, Stop::Failed(e)).await,
            };
            let mut tx = self.db.begin().await?;
            store::apply(&mut tx, &plan.mark).await?;
            store::jobs::save_plan(&mut tx, job.id, &plan).await?;
            tx.commit().await?;
            self.fault_point(&job, "planned").await;
            job.phase = Some(JobPhase::Executing);
            job.next_step = 0;
            job.plan = Some(plan);
        }
        let plan = job
            .plan
            .clone()
            .ok_or_else(|| Error::Internal(format!("job {} has a phase but no plan", job.id)))?;
        if job.phase == Some(JobPhase::Stopping) {
            let outcome = Outcome::recorded(&job);
            return self
                .finish_stopping(&job, &plan, job.next_step, outcome)
                .await;
        }
        if job.phase == Some(JobPhase::Executing) {
            let total = plan.steps.len().max(1) as f32;
            let mut last_step_done = false;
            for index in job.next_step..plan.steps.len() {
                let step = &plan.steps[index];
                let cancellable = plan.point_of_no_return().is_none_or(|p| index <= p);
                if *cancel.borrow() && cancellable {
                    return self.stop(&job, &plan, index, Stop::Cancelled).await;
                }
                if plan.point_of_no_return() == Some(index) && !job.past_no_return {
                    let mut tx = self.db.begin().await?;
                    let entered = store::jobs::enter_no_return(&mut tx, job.id).await?;
                    tx.commit().await?;
                    if !entered {
                        return self.stop(&job, &plan, index, Stop::Cancelled).await;
                    }
                    job.past_no_return = true;
                }
                let progress = self.progress_reporter(job.id, index as f32 / total, 1.0 / total);
                let interrupt = (cancellable && step.op.is_interruptible()).then_some(&cancel);
                // A resumed job may have run this step (or, for steps the journal does
                // not record one by one, a later one) before the process died.
                let again = resumed_at.is_some_and(|first| index >= first);
                let past_no_return = job.past_no_return;
                let executed = self
                    .execute_with_retries(
                        &job,
                        &step.op,
                        again,
                        past_no_return,
                        interrupt,
                        &progress,
                    )
                    .await;
                match executed {
                    Ok(()) => {}
                    Err(Stop::Parked(error)) => return self.park(&job, &error).await,
                    Err(stop) => return self.stop(&job, &plan, index, stop).await,
                }
                // Creating an empty file is cheap and is redone from scratch on resume,
                // so only steps that copy data or change metadata cost a journal write.
                // The last step's entry goes into the final transaction instead: a crash
                // between the two redoes that step, and every file operation is
                // idempotent.
                let last = index + 1 == plan.steps.len();
                if last {
                    last_step_done = true;
                } else if !(matches!(step.op, FileOp::Create { .. }) && step.then.is_empty()) {
                    let mut tx = self.db.begin().await?;
                    store::apply(&mut tx, &step.then).await?;
                    let progress = ((index + 1) as f32 / total * 99.0) as u8;
                    store::jobs::set_next_step(&mut tx, job.id, index + 1, progress).await?;
                    tx.commit().await?;
                }
                self.fault_point(&job, &format!("after-step-{index}")).await;
            }
            let mut tx = self.db.begin().await?;
            // A cancel accepted while the last step ran is honoured here, in the
            // transaction that would otherwise commit the result: the same statement
            // that makes the job uncancellable sees whether a cancel came first, so
            // either the cancel was refused (409) or the job rolls back, never both.
            if !job.past_no_return && !store::jobs::enter_no_return(&mut tx, job.id).await? {
                drop(tx);
                let last = plan.steps.len().saturating_sub(1);
                return self.stop(&job, &plan, last, Stop::Cancelled).await;
            }
            if last_step_done && let Some(step) = plan.steps.last() {
                store::apply(&mut tx, &step.then).await?;
            }
            store::apply(&mut tx, &plan.finish).await?;
            store::jobs::set_phase(&mut tx, job.id, JobPhase::Committed).await?;
            let done = plan.drops.is_empty();
            if done {
                // Nothing left to clean up: end the job in the same transaction.
                store::jobs::finish(&mut tx, job.id, JobStatus::Succeeded, None, store::now())
                    .await?;
            }
            tx.commit().await?;
            self.fault_point(&job, "committed").await;
            if done {
                tracing::info!(job = %job.id, kind = %job.kind, "job succeeded");
                return Ok(());
            }
        }
        self.drop_files(&plan.drops).await?;
        let mut tx = self.db.begin().await?;
        store::jobs::finish(&mut tx, job.id, JobStatus::Succeeded, None, store::now()).await?;
        tx.commit().await?;
        tracing::info!(job = %job.id, kind = %job.kind, "job succeeded");
        Ok(())
    }

    /// Run one step's file operation, trying again where that is the right answer:
    /// a qemu-img killed by someone else is retried at once (a few times); past the
    /// point of no return, where stopping would leave a half-merged layer, every
    /// failure is retried with a growing pause, and a full file system parks the job
    /// (it resumes once space is freed, without holding a worker meanwhile). Returns
    /// how the job must stop if it cannot go on.
    async fn execute_with_retries(
        &self,
        job: &Job,
        op: &FileOp,
        mut again: bool,
        past_no_return: bool,
        cancel: Option<&watch::Receiver<bool>>,
        progress: &(dyn Fn(f32) + Send + Sync),
    ) -> Result<(), Stop> {
        let mut failures = 0u32;
        loop {
            let error = match self.execute(op, again, cancel, progress).await {
                Ok(()) => return Ok(()),
                Err(Error::Qemu(QemuError::Cancelled)) => return Err(Stop::Cancelled),
                Err(e) => e,
            };
            failures += 1;
            // A half-done merge must wait for space; a grow that did not fit changed
            // nothing (qemu-img writes the new size last) and simply fails.
            let can_fail = matches!(op, FileOp::Resize { .. });
            if past_no_return && error.is_out_of_space() && !can_fail {
                return Err(Stop::Parked(error));
            }
            let killed = matches!(error, Error::Qemu(QemuError::Killed { .. }));
            let retry = if past_no_return {
                failures <= FORWARD_RETRIES
            } else {
                killed && failures <= KILLED_RETRIES
            };
            if !retry {
                return Err(Stop::Failed(error));
            }
            let pause = Duration::from_millis(250 << failures.min(7));
            tracing::warn!(job = %job.id, kind = %job.kind, error = %error, attempt = failures, ?pause, "step failed; trying it again");
            tokio::time::sleep(pause).await;
            if cancel.is_some_and(|c| *c.borrow()) {
                return Err(Stop::Cancelled);
            }
            again = true;
        }
    }

    /// Run one file operation. `again` is true when an earlier process or attempt may
    /// have run it partway: never trust what it left, header included.
    async fn execute(
        &self,
        op: &FileOp,
        again: bool,
        cancel: Option<&watch::Receiver<bool>>,
        progress: &(dyn Fn(f32) + Send + Sync),
    ) -> Result<()> {
        match *op {
            FileOp::Create {
                volume,
                backing,
                size_bytes,
            } => {
                let path = self.volume_path(volume);
                // Idempotent: a file left by an interrupted attempt is ours (the id is new).
                remove_if_exists(&path).await?;
                let backing = backing.map(files::volume_file_name);
                self.qemu
                    .create(&path, size_bytes, backing.as_deref())
                    .await?;
            }
            FileOp::Commit { top, base } => {
                if again {
                    // A killed commit leaves leaked clusters in the base it wrote; the
                    // top (kept with -d) was only read.
                    self.qemu.repair_leaks(&self.volume_path(base)).await?;
                }
                self.qemu
                    .commit(
                        &self.volume_path(top),
                        &self.volume_path(base),
                        cancel,
                        Some(progress),
                    )
                    .await?;
            }
            FileOp::Stream {
                volume,
                from,
                backing,
            } => {
                if again {
                    self.restore_stream(volume, from).await?;
                }
                let backing = backing.map(files::volume_file_name);
                self.qemu
                    .stream(
                        &self.volume_path(volume),
                        backing.as_deref(),
                        cancel,
                        Some(progress),
                    )
                    .await?;
            }
            FileOp::Repoint { volume, backing } => {
                self.qemu
                    .repoint(&self.volume_path(volume), &files::volume_file_name(backing))
                    .await?;
            }
            FileOp::Resize { volume, size_bytes } => {
                let path = self.volume_path(volume);
                if again {
                    self.qemu.repair_leaks(&path).await?;
                }
                self.qemu.resize(&path, size_bytes).await?;
            }
            FileOp::Import {
                upload,
                format,
                volume,
            } => {
                let path = self.volume_path(volume);
                remove_if_exists(&path).await?;
                let source = files::upload_path(&self.config.volumes_dir, upload);
                let copied = self
                    .qemu
                    .import(&source, format.as_str(), &path, cancel, Some(progress))
                    .await;
                if copied.is_err() {
                    remove_if_exists(&path).await?;
                }
                copied?;
                sync_file(&path).await?;
            }
            FileOp::Convert { source, volume } => {
                let path = self.volume_path(volume);
                // A partial copy from an interrupted attempt is ours (the id is new):
                // start over rather than trust it.
                remove_if_exists(&path).await?;
                let copied = self
                    .qemu
                    .convert(
                        &self.volume_path(source),
                        &path,
                        false,
                        cancel,
                        Some(progress),
                    )
                    .await;
                if copied.is_err() {
                    // Never leave a partial copy behind, cancelled or failed.
                    remove_if_exists(&path).await?;
                }
                copied?;
                sync_file(&path).await?;
            }
        }
        Ok(())
    }

    /// Put a file an interrupted safe rebase wrote back to what it read before: point
    /// it at its old backing again (the clusters the rebase did map equal what that
    /// backing shows), then free the clusters it wrote but never mapped.
    async fn restore_stream(&self, volume: Uuid, from: Option<Uuid>) -> Result<()> {
        let from = match from {
            Some(from) => Some(from),
            None => store::vms::volume_parent(&mut *self.db.reader().await?, volume).await?,
        };
        let path = self.volume_path(volume);
        match from {
            // Pointing at a file that is not there would break a file that may well be
            // whole: leave the header as it is and say so.
            Some(from) if !tokio::fs::try_exists(self.volume_path(from)).await? => {
                tracing::error!(%volume, %from, "the layer an interrupted stream read from is gone; its file is left as it is");
            }
            Some(from) => {
                self.qemu
                    .repoint(&path, &files::volume_file_name(from))
                    .await?;
            }
            None => {}
        }
        self.qemu.repair_leaks(&path).await?;
        Ok(())
    }

    /// Maps a step's own progress into the job's 0-100 range and stores it (at most a
    /// few times a second).
    fn progress_reporter(
        self: &Arc<Self>,
        job: Uuid,
        start: f32,
        span: f32,
    ) -> impl Fn(f32) + Send + Sync + use<> {
        // Kept in memory, not written: a progress write per tick would fsync the
        // database in the middle of every copy. The journal records progress at each
        // step boundary; `progress_of` gives the live figure in between.
        let engine = Arc::clone(self);
        move |fraction: f32| {
            let value = ((start + fraction * span) * 99.0) as u8;
            engine
                .live_progress
                .lock()
                .expect("progress map")
                .insert(job, value);
        }
    }

    /// The progress of a running job within its current step, if it reported any.
    pub fn progress_of(&self, job: Uuid) -> Option<u8> {
        self.live_progress
            .lock()
            .expect("progress map")
            .get(&job)
            .copied()
    }

    /// Stop a job at step `index` (not completed): roll back if the point of no return
    /// was not reached, otherwise record what the partial merge left unreadable. The
    /// plan's `undo` and `fail` restore every status it flagged to what it was before
    /// the job.
    async fn stop(&self, job: &Job, plan: &Plan, index: usize, stop: Stop) -> Result<()> {
        let outcome = Outcome::of(job, stop);
        // Decided once: the decision is journaled before any file is touched, so a crash
        // while rolling back rolls back again instead of running the job on from a
        // state whose files were already removed.
        let mut tx = self.db.begin().await?;
        store::jobs::begin_stopping(&mut tx, job.id, outcome.error_pair()).await?;
        tx.commit().await?;
        self.finish_stopping(job, plan, index, outcome).await
    }

    /// The file work and final entry of a stop (also what a restart redoes for a job
    /// journaled as stopping, from its first unjournaled step).
    async fn finish_stopping(
        &self,
        job: &Job,
        plan: &Plan,
        index: usize,
        outcome: Outcome,
    ) -> Result<()> {
        // A stream at this step or later may have been cut short (in this process, or in
        // one that died before the journal caught up): the records keep its old backing,
        // so its file goes back to reading through that backing too.
        for step in &plan.steps[index..] {
            if let FileOp::Stream { volume, from, .. } = step.op
                && tokio::fs::try_exists(self.volume_path(volume)).await?
            {
                self.restore_stream(volume, from).await?;
            }
        }
        // A commit or resize cut short leaves clusters it allocated but never mapped.
        if let Some(step) = plan.steps.get(index) {
            let written = match step.op {
                FileOp::Commit { base, .. } => Some(base),
                FileOp::Resize { volume, .. } => Some(volume),
                _ => None,
            };
            if let Some(volume) = written {
                self.qemu.repair_leaks(&self.volume_path(volume)).await?;
            }
        }
        // The journal says whether the step of no return was entered (see `enter_no_return`).
        let past_no_return =
            job.past_no_return || plan.point_of_no_return().is_some_and(|p| p < index);
        if past_no_return {
            return self.end(job, &plan.fail, &outcome).await;
        }
        // Every file a Create or Convert step made is new and ours, including those of
        // later steps an earlier process ran before it died (Creates are not journaled
        // one by one).
        for step in &plan.steps {
            if let Some(volume) = step.op.created_volume() {
                remove_if_exists(&self.volume_path(volume)).await?;
            }
        }
        // A job that did not happen leaves the tree as it found it, not only the bytes:
        // each stream it finished is pointed back at the layer it read (which is still
        // there: nothing is dropped before the final commit), and the records with it.
        // The copied clusters stay in the file and read exactly as that layer does.
        let mut undo = Vec::new();
        for step in &plan.steps[..index] {
            if let FileOp::Stream {
                volume,
                from: Some(from),
                ..
            } = step.op
            {
                // Nothing is dropped before the final commit, so `from` is there; were it
                // not, the records must not name it: the stop waits (the job stays
                // `stopping` and is tried again at the next start).
                if !tokio::fs::try_exists(self.volume_path(from)).await? {
                    return Err(Error::Internal(format!(
                        "cannot roll back the stream into {volume}: the layer {from} it read is gone"
                    )));
                }
                self.restore_stream(volume, Some(from)).await?;
                undo.push(MetaOp::SetVolumeParent {
                    volume,
                    parent: Some(from),
                });
            }
        }
        undo.extend_from_slice(match (outcome.status, &plan.cancel) {
            (JobStatus::Cancelled, Some(cancel)) => cancel,
            _ => &plan.undo,
        });
        self.end(job, &undo, &outcome).await
    }

    /// Hand a job that cannot go on for want of space back to the queue, to be tried
    /// again in a while from its journal (the step it was in is redone as interrupted).
    async fn park(&self, job: &Job, error: &Error) -> Result<()> {
        tracing::warn!(job = %job.id, kind = %job.kind, error = %error, "out of space in the middle of a merge; the job waits for free space");
        let retry_at = store::now() + chrono::Duration::from_std(PARK_FOR).expect("a short pause");
        let message = format!(
            "waiting for free space to finish (tried again every {} s): {error}",
            PARK_FOR.as_secs()
        );
        let mut tx = self.db.begin().await?;
        store::jobs::park(
            &mut tx,
            job.id,
            retry_at,
            (ErrorCode::InsufficientStorage.as_str(), &message),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// End a job that never journaled a plan.
    async fn abandon(&self, job: &Job, stop: Stop) -> Result<()> {
        let cancelled = matches!(stop, Stop::Cancelled);
        let ops = run::unwind(&job.spec, &mut *self.db.reader().await?, cancelled).await?;
        self.end(job, &ops, &Outcome::of(job, stop)).await
    }

    async fn end(&self, job: &Job, ops: &[MetaOp], outcome: &Outcome) -> Result<()> {
        let mut tx = self.db.begin().await?;
        store::apply(&mut tx, ops).await?;
        store::jobs::finish(
            &mut tx,
            job.id,
            outcome.status,
            outcome.error_pair(),
            store::now(),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Remove files whose metadata is gone, refusing any that something still uses as
    /// its backing file.
    async fn drop_files(&self, volumes: &[Uuid]) -> Result<()> {
        let mut conn = self.db.reader().await?;
        for &volume in volumes {
            let children: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM volumes WHERE parent_id = ? OR id = ?")
                    .bind(store::id_text(volume))
                    .bind(store::id_text(volume))
                    .fetch_one(&mut *conn)
                    .await?;
            if children > 0 {
                return Err(Error::Internal(format!(
                    "refusing to remove volume {volume}: it is still referenced"
                )));
            }
            remove_if_exists(&self.volume_path(volume)).await?;
        }
        Ok(())
    }

    /// Deterministic fault injection for recovery tests: `STRATA_FAULT=<kind>:<point>`
    /// aborts the process (no cleanup, like kill -9) when a job of that kind reaches the
    /// point; `<kind>:<point>:pause[=MS]` holds the job there (two seconds by default)
    /// instead, so a test can act while it runs.
    async fn fault_point(&self, job: &Job, point: &str) {
        let Some(fault) = &self.config.fault else {
            return;
        };
        let mut parts = fault.split(':');
        if parts.next() != Some(job.kind.as_str()) || parts.next() != Some(point) {
            return;
        }
        if let Some(pause) = parts.next().and_then(|action| action.strip_prefix("pause")) {
            let millis = pause
                .strip_prefix('=')
                .and_then(|ms| ms.parse().ok())
                .unwrap_or(2000);
            tokio::time::sleep(Duration::from_millis(millis)).await;
        } else {
            tracing::warn!(job = %job.id, point, "fault injection: aborting");
            std::process::abort();
        }
    }
}

/// qemu-img leaves what it wrote in the page cache: make a new copy durable before the
/// journal records it, so a power cut can never leave metadata naming a file whose
/// data never reached the disk.
async fn sync_file(path: &std::path::Path) -> Result<()> {
    tokio::fs::File::open(path).await?.sync_all().await?;
    Ok(())
}

async fn remove_if_exists(path: &std::path::Path) -> Result<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Build an `insufficient_storage` problem with the figures.
pub fn insufficient_storage(needed: u64, available: u64) -> Error {
    Error::with_extra(
        ErrorCode::InsufficientStorage,
        format!(
            "the operation needs {needed} free bytes on the data file system (including the reserve) but only {available} are available"
        ),
        serde_json::json!({ "needed_bytes": needed, "available_bytes": available }),
    )
}
