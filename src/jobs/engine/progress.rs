//! A step's progress as it runs: the job's percentage and, for a step that copies data,
//! its bytes (done, the step's total, seconds left at the rate observed since the copy
//! began). Kept in memory for `GET /v1/jobs/{id}` (`Engine::progress_of`), and written
//! to the job's row at most once a second while they change, so that `job.updated`
//! events carry them; cleared when the step ends.
//!
//! The byte totals are estimates fixed when the copy starts. A qemu-img copy (commit,
//! safe rebase, convert) prints only a percentage: its total is the allocated bytes of
//! the files of the layers it copies (the figure the planner compares to choose a
//! merge's direction and checks free space with, `files::layers_bytes`), or of the
//! upload an import converts. QEMU's own jobs (live merges and copies) count bytes
//! themselves; their step's total is QEMU's first figure, and later ones are scaled to
//! it (a commit's total grows while the guest writes), so the total the UI shows never
//! moves during a step and `bytes_done` never passes it.
//!
//! These writes are not the journal. Each is a small transaction of its own through the
//! store's normal write path, which changes the row only while the job is still in the
//! step the figures describe (`store::jobs::set_copy_progress`), so one landing late
//! changes nothing; one that fails (a full disk) is logged and dropped, never failing
//! the job. At the step's end the job waits for a write under way, then clears the
//! figures and counts the bytes moved (best effort too), before it journals the step:
//! no progress write ever comes between the journal writes of a step, and a journal
//! entry's event never shows the figures of a step it ended.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::super::{Engine, LiveProgress};
use crate::domain::{CopyProgress, Job, Uuid};
use crate::error::Result;
use crate::store;

/// The most often a job's live figures are written (and so sent as `job.updated`).
pub(super) const WRITE_EVERY: Duration = Duration::from_secs(1);

/// How long a copy must have run before its rate says when it will end: its first
/// moments (qemu-img starting, its first clusters) say little about the rest.
pub(super) const RATE_AFTER: Duration = Duration::from_secs(1);

/// Seconds left of a copy at the rate it kept since it began (`elapsed` ago, with
/// `done_at_start` bytes already done then); none before `RATE_AFTER` or while it has
/// not moved.
pub(super) fn eta_seconds(
    done_at_start: u64,
    done: u64,
    total: u64,
    elapsed: Duration,
) -> Option<u64> {
    if elapsed < RATE_AFTER || done <= done_at_start {
        return None;
    }
    let rate = (done - done_at_start) as f64 / elapsed.as_secs_f64();
    let left = total.saturating_sub(done) as f64;
    Some((left / rate).ceil() as u64)
}

/// What a progress write records: the job's percentage and the copy's figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Figures {
    pub progress: u8,
    pub copy: CopyProgress,
}

/// When `figures` are to be written, given the last write (when, and what): never if
/// they are what it wrote; else `WRITE_EVERY` after it, or after the copy `began` for
/// the first (a copy shorter than that is only recorded when it ends).
pub(super) fn write_at(
    last: Option<(Instant, Figures)>,
    began: Instant,
    figures: &Figures,
) -> Option<Instant> {
    match last {
        Some((_, written)) if written == *figures => None,
        Some((at, _)) => Some(at + WRITE_EVERY),
        None => Some(began + WRITE_EVERY),
    }
}

/// The copy a step is making.
#[derive(Debug, Clone, Copy)]
struct Copying {
    /// The step's total: fixed at its first copy.
    total: u64,
    /// The part of `total` the copy running now covers (offset, length): a step may
    /// copy several files one after another.
    part: (u64, u64),
    /// When the copy (its first part) began, and what was done then.
    began: Instant,
    done_at_start: u64,
    done: u64,
}

impl Copying {
    fn figures(&self, now: Instant) -> CopyProgress {
        CopyProgress {
            bytes_done: self.done,
            bytes_total: self.total,
            eta_seconds: eta_seconds(
                self.done_at_start,
                self.done,
                self.total,
                now.saturating_duration_since(self.began),
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Meter {
    /// The job's percentage (0-99) as of the step's last report.
    progress: Option<u8>,
    copy: Option<Copying>,
}

impl Meter {
    /// The step's own progress `fraction` (0-1), which is `percent` of the job's.
    fn fraction(&mut self, percent: u8, fraction: f64) {
        self.progress = Some(percent);
        if let Some(copy) = &mut self.copy {
            let (offset, len) = copy.part;
            copy.done = (offset + (len as f64 * fraction) as u64).min(copy.total);
        }
    }

    /// A copy of the part `offset..offset + len` of the step's `total` bytes starts.
    /// The step's total is the one its first copy gave; a copy starting at 0 (the
    /// first, or one tried again) restarts the rate's clock.
    fn start_part(&mut self, now: Instant, total: u64, offset: u64, len: u64) {
        let earlier = self.copy;
        let total = earlier.map_or(total, |c| c.total);
        let offset = offset.min(total);
        let (began, done_at_start) = match earlier {
            Some(copy) if offset > 0 => (copy.began, copy.done_at_start),
            _ => (now, offset),
        };
        self.copy = Some(Copying {
            total,
            part: (offset, len.min(total - offset)),
            began,
            done_at_start,
            done: offset,
        });
    }

    /// QEMU's figures, `done` of `total` (not 0) bytes, `percent` of the job. The first
    /// ones fix the step's total; later ones are scaled to it, so it never moves and is
    /// never passed (a commit's total grows while the guest writes). True when they
    /// started the step's copy.
    fn bytes(&mut self, now: Instant, percent: u8, done: u64, total: u64) -> bool {
        self.progress = Some(percent);
        let fraction = (done as f64 / total as f64).clamp(0.0, 1.0);
        let first = self.copy.is_none();
        let copy = self.copy.get_or_insert_with(|| {
            // A QEMU job found under way (a step redone) was partway already: the rate
            // counts from here.
            let done = done.min(total);
            Copying {
                total,
                part: (0, total),
                began: now,
                done_at_start: done,
                done,
            }
        });
        copy.done = ((copy.total as f64 * fraction) as u64).min(copy.total);
        first
    }
}

struct Shared {
    meter: Mutex<Meter>,
    /// Told of every report; the writer waits on it.
    changed: Notify,
}

struct Writer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The progress of one step of a job, as its file operation reports it.
pub(super) struct StepProgress {
    engine: Arc<Engine>,
    job: Uuid,
    requested_by: Option<String>,
    step: usize,
    /// Where the step sits in the job's 0-100 range: from `start`, `span` wide (0-1).
    start: f32,
    span: f32,
    shared: Arc<Shared>,
    writer: Mutex<Option<Writer>>,
}

impl StepProgress {
    pub(super) fn new(engine: &Arc<Engine>, job: &Job, step: usize, start: f32, span: f32) -> Self {
        Self {
            engine: Arc::clone(engine),
            job: job.id,
            requested_by: job.requested_by.clone(),
            step,
            start,
            span,
            shared: Arc::new(Shared {
                meter: Mutex::default(),
                changed: Notify::new(),
            }),
            writer: Mutex::new(None),
        }
    }

    fn percent(&self, fraction: f64) -> u8 {
        ((self.start as f64 + fraction * self.span as f64) * 99.0) as u8
    }

    /// The step's own progress, 0 to 1 (qemu-img's `-p`): the job's percentage and,
    /// while a copy runs, its bytes.
    pub(super) fn fraction(&self, fraction: f32) {
        let fraction = f64::from(fraction).clamp(0.0, 1.0);
        let mut meter = self.shared.meter.lock().expect("progress meter");
        meter.fraction(self.percent(fraction), fraction);
        self.publish(&meter);
    }

    /// A qemu-img copy of `estimate` bytes starts (none: the estimate could not be
    /// made, and the step shows its percentage only).
    pub(super) fn start(&self, estimate: Option<u64>) {
        if let Some(total) = estimate {
            self.start_part(total, 0, total);
        }
    }

    /// A qemu-img copy of the part `offset..offset + len` of the step's `total` bytes
    /// starts (see `Meter::start_part`).
    pub(super) fn start_part(&self, total: u64, offset: u64, len: u64) {
        let mut meter = self.shared.meter.lock().expect("progress meter");
        meter.start_part(Instant::now(), total, offset, len);
        self.publish(&meter);
        drop(meter);
        self.ensure_writer();
    }

    /// QEMU's figures of a copy it makes (a live merge or full clone): `done` of `total`
    /// bytes (see `Meter::bytes`).
    pub(super) fn bytes(&self, done: u64, total: u64) {
        if total == 0 {
            return;
        }
        let fraction = (done as f64 / total as f64).clamp(0.0, 1.0);
        let mut meter = self.shared.meter.lock().expect("progress meter");
        let first = meter.bytes(Instant::now(), self.percent(fraction), done, total);
        self.publish(&meter);
        drop(meter);
        if first {
            self.ensure_writer();
        }
    }

    /// Show the meter in the engine's in-memory view and wake the writer.
    fn publish(&self, meter: &Meter) {
        let now = Instant::now();
        let copy = meter.copy.map(|c| c.figures(now));
        let mut live = self.engine.live_progress.lock().expect("progress map");
        let entry = live.entry(self.job).or_insert(LiveProgress {
            progress: 0,
            copy: None,
        });
        if let Some(progress) = meter.progress {
            entry.progress = progress;
        }
        entry.copy = copy;
        drop(live);
        self.shared.changed.notify_one();
    }

    fn ensure_writer(&self) {
        let mut writer = self.writer.lock().expect("progress writer");
        if writer.is_some() {
            return;
        }
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(write_figures(
            Arc::clone(&self.engine),
            self.job,
            self.requested_by.clone(),
            self.step,
            Arc::clone(&self.shared),
            stopped,
        ));
        *writer = Some(Writer { stop, task });
    }

    /// The step ended (`completed`: its work is done). Stop the writes and wait for
    /// one under way. A completed copy's bytes (all of its total) are returned, for the
    /// step's journal entry to clear the figures and count them in the same
    /// transaction: a crash before that entry redoes the copy, and the bytes are counted
    /// once, by the attempt that is journaled. An unfinished copy's figures are cleared
    /// here, counting as far as it got. Best effort: a failed write is logged, the job
    /// goes on.
    pub(super) async fn finish(self, completed: bool) -> Option<u64> {
        let writer = self.writer.lock().expect("progress writer").take()?;
        let _ = writer.stop.send(true);
        let _ = writer.task.await;
        let copy = {
            let mut meter = self.shared.meter.lock().expect("progress meter");
            let copy = meter.copy.take();
            self.publish(&meter);
            copy
        }?;
        if completed {
            return Some(copy.total);
        }
        if let Err(e) = self.end_copy(copy.done).await {
            tracing::warn!(job = %self.job, step = self.step, error = %e, "could not clear a stopped copy's progress; ignored");
        }
        None
    }

    async fn end_copy(&self, copied: u64) -> Result<()> {
        let mut tx = self.engine.db.begin().await?;
        tx.act_for(self.requested_by.as_deref());
        store::jobs::end_copy(&mut tx, self.job, copied).await?;
        tx.commit().await
    }
}

/// Write a step's figures to its job's row as they change, at most every
/// `WRITE_EVERY`, until told to stop.
async fn write_figures(
    engine: Arc<Engine>,
    job: Uuid,
    requested_by: Option<String>,
    step: usize,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut last: Option<(Instant, Figures)> = None;
    loop {
        // Biased towards the stop: at the end of a step a last report usually leaves a
        // wake-up pending, which must not win over the stop and write once more before
        // the step's journal entry.
        tokio::select! {
            biased;
            _ = stopped.changed() => return,
            _ = shared.changed.notified() => {}
        }
        // Wait until a write is due, then write the figures as they are then.
        loop {
            let now = Instant::now();
            let (figures, began) = {
                let meter = shared.meter.lock().expect("progress meter");
                let Some(copy) = meter.copy else { break };
                let figures = Figures {
                    progress: meter.progress.unwrap_or(0),
                    copy: copy.figures(now),
                };
                (figures, copy.began)
            };
            let Some(at) = write_at(last, began, &figures) else {
                break;
            };
            if at > now {
                tokio::select! {
                    biased;
                    _ = stopped.changed() => return,
                    _ = tokio::time::sleep_until(at.into()) => continue,
                }
            }
            if *stopped.borrow() {
                return;
            }
            // Tried once whatever happens: a failing database is not hammered.
            last = Some((now, figures));
            let written = async {
                let mut tx = engine.db.begin().await?;
                tx.act_for(requested_by.as_deref());
                let written = store::jobs::set_copy_progress(
                    &mut tx,
                    job,
                    step,
                    figures.progress,
                    &figures.copy,
                )
                .await?;
                tx.commit().await?;
                Ok::<_, crate::error::Error>(written)
            };
            match written.await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::debug!(%job, step, "the job left the step; its progress is not written");
                }
                Err(e) => {
                    tracing::warn!(%job, step, error = %e, "could not write a job's progress; ignored");
                }
            }
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn no_eta_before_the_copy_has_run_a_while_and_moved() {
        let second = Duration::from_secs(1);
        assert_eq!(eta_seconds(0, 10 * MIB, 100 * MIB, second / 2), None);
        assert_eq!(eta_seconds(0, 0, 100 * MIB, 5 * second), None);
        // A QEMU job found partway has not moved since.
        assert_eq!(eta_seconds(40 * MIB, 40 * MIB, 100 * MIB, 5 * second), None);
    }

    #[test]
    fn the_eta_comes_from_the_rate_since_the_copy_began() {
        let second = Duration::from_secs(1);
        // 30 MiB in 3 s: 10 MiB/s, 70 MiB left.
        assert_eq!(eta_seconds(0, 30 * MIB, 100 * MIB, 3 * second), Some(7));
        // Counted from what was done when it began: 20 MiB in 2 s, 60 MiB left.
        assert_eq!(
            eta_seconds(20 * MIB, 40 * MIB, 100 * MIB, 2 * second),
            Some(6)
        );
        // Rounded up, and 0 once done.
        assert_eq!(eta_seconds(0, 30 * MIB, 31 * MIB, 3 * second), Some(1));
        assert_eq!(eta_seconds(0, 100 * MIB, 100 * MIB, 3 * second), Some(0));
    }

    fn done(meter: &Meter) -> (u64, u64) {
        let copy = meter.copy.expect("a copy");
        (copy.done, copy.total)
    }

    #[test]
    fn a_copys_bytes_follow_its_fraction_against_a_total_fixed_for_the_step() {
        let began = Instant::now();
        let mut meter = Meter::default();
        meter.start_part(began, 100 * MIB, 0, 100 * MIB);
        meter.fraction(10, 0.25);
        assert_eq!(done(&meter), (25 * MIB, 100 * MIB));
        // Tried again, measured anew: the total the step showed stays, the count and
        // the rate's clock start over.
        let again = began + Duration::from_secs(3);
        meter.start_part(again, 120 * MIB, 0, 120 * MIB);
        assert_eq!(done(&meter), (0, 100 * MIB));
        assert_eq!(meter.copy.unwrap().began, again);
        meter.fraction(40, 1.0);
        assert_eq!(done(&meter), (100 * MIB, 100 * MIB));
        assert_eq!(meter.progress, Some(40));
    }

    #[test]
    fn copies_made_one_after_another_are_parts_of_the_steps_total() {
        let began = Instant::now();
        let mut meter = Meter::default();
        meter.start_part(began, 300 * MIB, 0, 100 * MIB);
        meter.fraction(5, 1.0);
        assert_eq!(done(&meter), (100 * MIB, 300 * MIB));
        meter.start_part(
            began + Duration::from_secs(2),
            300 * MIB,
            100 * MIB,
            200 * MIB,
        );
        meter.fraction(20, 0.5);
        assert_eq!(done(&meter), (200 * MIB, 300 * MIB));
        // One rate since the first part began.
        assert_eq!(meter.copy.unwrap().began, began);
    }

    #[test]
    fn qemus_figures_are_scaled_to_its_first_total() {
        let began = Instant::now();
        let mut meter = Meter::default();
        // Found partway (a step redone): the rate counts from there.
        assert!(meter.bytes(began, 30, 40 * MIB, 100 * MIB));
        assert_eq!(done(&meter), (40 * MIB, 100 * MIB));
        assert_eq!(meter.copy.unwrap().done_at_start, 40 * MIB);
        // The guest wrote meanwhile: QEMU's total grew, the step's did not.
        assert!(!meter.bytes(began, 35, 75 * MIB, 150 * MIB));
        assert_eq!(done(&meter), (50 * MIB, 100 * MIB));
        assert!(!meter.bytes(began, 60, 150 * MIB, 150 * MIB));
        assert_eq!(done(&meter), (100 * MIB, 100 * MIB));
    }

    fn figures(done: u64, eta: Option<u64>) -> Figures {
        Figures {
            progress: (done * 99 / (100 * MIB)) as u8,
            copy: CopyProgress {
                bytes_done: done,
                bytes_total: 100 * MIB,
                eta_seconds: eta,
            },
        }
    }

    #[test]
    fn figures_are_written_a_second_after_the_copy_began_then_at_most_every_second() {
        let began = Instant::now();
        let first = figures(MIB, None);
        assert_eq!(write_at(None, began, &first), Some(began + WRITE_EVERY));
        let written_at = began + Duration::from_millis(1300);
        let last = Some((written_at, first));
        assert_eq!(
            write_at(last, began, &figures(2 * MIB, Some(30))),
            Some(written_at + WRITE_EVERY)
        );
        // An ETA that changed is news too.
        assert_eq!(
            write_at(last, began, &figures(MIB, Some(9))),
            Some(written_at + WRITE_EVERY)
        );
    }

    #[test]
    fn figures_already_written_are_not_written_again() {
        let began = Instant::now();
        let same = figures(5 * MIB, Some(12));
        assert_eq!(write_at(Some((began, same)), began, &same), None);
    }
}
