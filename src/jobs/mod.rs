//! The durable job engine: workers claim queued jobs (one at a time per VM), journal a
//! plan before touching any file, record each finished step together with the metadata
//! that describes it, and on start resume every job a crash interrupted.
//!
//! A job moves through: queued -> (plan journaled, `mark` applied) -> steps ->
//! (`finish` applied, phase committed) -> files dropped -> succeeded. Stopping before
//! the plan's point of no return rolls back (`undo`, created files removed); failing
//! after it applies `fail`, which flags what the interrupted merge made unreadable.

pub mod accept;
mod engine;
mod run;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::domain::{CopyProgress, Job, JobStatus, Uuid};
use crate::error::{Error, ErrorCode, Result};
use crate::files::{Files, uploads};
use crate::qemu::Qemu;
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
    /// Test-only crash point, `<job kind>:<point>` (see `Engine::fault_point`).
    pub fault: Option<String>,
    /// Imports (inspection in the request, conversion in the job) running at once.
    pub import_slots: usize,
    /// Bounds a guest agent's freeze (and thaw) of the guest's file systems.
    pub freeze_timeout: Duration,
}

/// How far a running job has got, as its current step last reported (fresher than the
/// figures its row holds, which are written at most once a second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveProgress {
    /// 0 to 99 (100 is written when the job succeeds).
    pub progress: u8,
    /// The copy the step is making, if it copies data.
    pub copy: Option<CopyProgress>,
}

pub struct Engine {
    db: Db,
    qemu: Qemu,
    config: EngineConfig,
    /// The uploads an import job owns are removed through it.
    files: Files,
    wake: Notify,
    /// Bumped whenever a job changes state; long-polls wait on it.
    changed: watch::Sender<u64>,
    /// Cancel signals of running jobs.
    running: Mutex<HashMap<Uuid, watch::Sender<bool>>>,
    /// Progress of running jobs within a step (see `engine::progress`).
    live_progress: Mutex<HashMap<Uuid, LiveProgress>>,
    /// Slots for work on untrusted images (see `EngineConfig::import_slots`).
    import_slots: Arc<tokio::sync::Semaphore>,
}

impl Engine {
    pub fn new(db: Db, qemu: Qemu, files: Files, config: EngineConfig) -> Arc<Self> {
        Arc::new(Self {
            db,
            qemu,
            files,
            import_slots: Arc::new(tokio::sync::Semaphore::new(config.import_slots.max(1))),
            config,
            wake: Notify::new(),
            changed: watch::channel(0).0,
            running: Mutex::new(HashMap::new()),
            live_progress: Mutex::new(HashMap::new()),
        })
    }

    pub fn volume_path(&self, volume: Uuid) -> PathBuf {
        self.files.volume_path(volume)
    }

    /// The directory every volume file sits in.
    pub fn volumes_dir(&self) -> &std::path::Path {
        self.files.volumes_dir()
    }

    /// Free space a copy must leave untouched on the data file system.
    pub fn reserved_bytes(&self) -> u64 {
        self.files.reserved_bytes()
    }

    /// Worker tasks running jobs at once.
    pub fn workers(&self) -> usize {
        self.config.workers.max(1)
    }

    /// Refuse with `507 insufficient_storage` unless `bytes` (plus `reserve`) are free
    /// on the volumes' file system. Nothing needed, nothing refused: removing files is
    /// how space comes back.
    pub fn require_free_space(&self, bytes: u64, reserve: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.files.require_free(bytes.saturating_add(reserve))
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

    /// Tell an idle worker that a job was queued (one job wakes one worker; each
    /// worker that claims a job looks for another after it).
    pub fn notify_enqueued(&self) {
        self.wake.notify_one();
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

    /// Cancel a queued job at once, or ask a running one to stop while it still can;
    /// `by` (a token's name) is recorded as who cancelled it.
    pub async fn cancel(&self, id: Uuid, by: Option<&str>) -> Result<Job> {
        let mut tx = self.db.begin().await?;
        tx.act_for(by);
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
        if let Some(by) = by {
            store::jobs::set_cancelled_by(&mut tx, id, by).await?;
        }
        let job = store::jobs::get(&mut tx, id)
            .await?
            .expect("job read in this transaction");
        tx.commit().await?;
        if job.status == JobStatus::Cancelled
            && let Some(upload) = job.spec.upload()
        {
            uploads::remove(&self.files, upload).await;
        }
        self.signal_cancel(id);
        self.bump();
        Ok(job)
    }

    /// The progress of a running job within its current step, if it reported any.
    pub fn progress_of(&self, job: Uuid) -> Option<LiveProgress> {
        self.live_progress
            .lock()
            .expect("progress map")
            .get(&job)
            .copied()
    }
}
