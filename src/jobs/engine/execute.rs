//! Executing one file operation of a plan with qemu-img: idempotently (a step may be
//! redone after a crash), with the retries each failure calls for, and reporting its
//! progress (with the bytes a copy is estimated to move, see `copy_estimate`).

use std::time::Duration;

use tokio::sync::watch;

use super::super::{Engine, FORWARD_RETRIES, KILLED_RETRIES};
use super::Stop;
use super::live::Switch;
use super::live_merge::LiveMerge;
use super::progress::StepProgress;
use crate::domain::plan::FileOp;
use crate::domain::{Job, Uuid};
use crate::error::{Error, Result};
use crate::files;
use crate::qemu::{QemuError, qcow2};
use crate::store;

/// Where a step stands in its plan, for what a failure of it may do.
#[derive(Debug, Clone, Copy)]
pub(super) struct StepPlace {
    /// The job entered its point of no return.
    pub past_no_return: bool,
    /// This step is the plan's point of no return (nothing of no return ran before).
    pub first_of_no_return: bool,
    /// The plan works on a running VM's QEMU.
    pub live_plan: bool,
}

impl Engine {
    /// Run one step's file operation, trying again where that is the right answer:
    /// a qemu-img killed by someone else is retried at once (a few times); past the
    /// point of no return, where stopping would leave a half-merged layer, every
    /// failure is retried with a growing pause, and a full file system parks the job
    /// (it resumes once space is freed, without holding a worker meanwhile). Past the
    /// point of no return of a live plan nothing fails: QEMU's graph may have changed
    /// (a pivot, a stream, a rewritten header), which the records of a failed job would
    /// not follow, so the job waits (parked) and tries again. Returns how the job must
    /// stop if it cannot go on.
    pub(super) async fn execute_with_retries(
        &self,
        job: &Job,
        op: &FileOp,
        mut again: bool,
        place: StepPlace,
        cancel: Option<&watch::Receiver<bool>>,
        progress: &StepProgress,
    ) -> Result<(), Stop> {
        let past_no_return = place.past_no_return;
        let mut failures = 0u32;
        loop {
            let error = match self.execute(job.id, op, again, cancel, progress).await {
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
            // A switch or grow that may have happened must be recorded, never given
            // up: the job waits until QEMU answers (or is gone) and tries again. One
            // that surely did not happen (QEMU refused it; a required freeze failed
            // before the switch was sent) is undone, or fails as an offline grow does.
            // A guest that may still be frozen is never left so: the step waits and
            // tries the thaw again, whatever else it was doing.
            if error.code() == crate::error::ErrorCode::ThawFailed {
                return Err(Stop::Parked(error));
            }
            match op {
                FileOp::LiveSwitch { .. } => {
                    let nothing_done = error.is_refused_by_qemu()
                        || error.code() == crate::error::ErrorCode::QuiesceFailed;
                    return Err(if nothing_done {
                        Stop::Undone(error)
                    } else {
                        Stop::Parked(error)
                    });
                }
                FileOp::LiveResize { .. } if error.is_refused_by_qemu() => {
                    return Err(Stop::Failed(error));
                }
                FileOp::LiveResize { .. } if matches!(error, Error::Qmp(_)) => {
                    return Err(Stop::Parked(error));
                }
                // QEMU refused to start the plan's first merge: nothing changed.
                FileOp::LiveCommit { .. } | FileOp::LiveStream { .. }
                    if error.is_refused_by_qemu() && place.first_of_no_return =>
                {
                    return Err(Stop::Undone(error));
                }
                // A QEMU that cannot be asked now, or a graph that is not what the
                // records say: the merge waits (its files all stay) until QEMU answers,
                // the graph is put right, or the VM is marked stopped.
                FileOp::LiveCommit { .. } | FileOp::LiveStream { .. }
                    if matches!(error, Error::Qmp(_))
                        || matches!(
                            error.code(),
                            crate::error::ErrorCode::RuntimeMismatch
                                | crate::error::ErrorCode::VmRunning
                        ) =>
                {
                    return Err(Stop::Parked(error));
                }
                _ => {}
            }
            let killed = matches!(error, Error::Qemu(QemuError::Killed { .. }));
            let retry = if past_no_return {
                failures <= FORWARD_RETRIES
            } else {
                killed && failures <= KILLED_RETRIES
            };
            if !retry && past_no_return && place.live_plan {
                return Err(Stop::Parked(error));
            }
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
    pub(super) async fn execute(
        &self,
        job: Uuid,
        op: &FileOp,
        again: bool,
        cancel: Option<&watch::Receiver<bool>>,
        progress: &StepProgress,
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
                create_image(path, size_bytes, backing.map(files::volume_file_name)).await?;
            }
            FileOp::Commit { .. } | FileOp::Stream { .. } => {
                progress.start(self.copy_estimate(op).await);
                self.merge(op, again, cancel, progress).await?;
            }
            FileOp::Repoint { volume, backing } => {
                let backing = files::volume_file_name(backing);
                self.qemu
                    .repoint(&self.volume_path(volume), &backing)
                    .await?;
            }
            FileOp::Resize { volume, size_bytes } => {
                let path = self.volume_path(volume);
                if again {
                    self.qemu.repair_leaks(&path).await?;
                }
                self.qemu.resize(&path, size_bytes).await?;
            }
            FileOp::Import { .. } | FileOp::Convert { .. } => {
                progress.start(self.copy_estimate(op).await);
                self.copy(op, cancel, progress).await?;
            }
            FileOp::LiveAdd { vm, ref overlays } => self.live_add(vm, overlays).await?,
            FileOp::LiveSwitch {
                vm,
                ref overlays,
                snapshot,
                freeze,
            } => {
                let switch = Switch {
                    job,
                    vm,
                    overlays,
                    snapshot,
                    freeze,
                    again,
                };
                self.live_switch(switch).await?
            }
            FileOp::LiveResize {
                vm,
                volume,
                size_bytes,
            } => self.live_resize(vm, volume, size_bytes, again).await?,
            FileOp::LiveCopy {
                vm,
                ref copies,
                freeze,
            } => {
                self.live_copy(job, vm, copies, freeze, cancel, progress)
                    .await?
            }
            FileOp::LiveCommit { .. } | FileOp::LiveStream { .. } => {
                let merge = LiveMerge::of(op).expect("a live merge step");
                self.live_merge(job, merge, progress).await?
            }
        }
        Ok(())
    }

    /// A merge step: a commit into a base, or a stream (safe rebase) into a volume.
    ///
    /// The file written is checked for leaks afterwards too. A qemu-img killed just
    /// after it raised the refcount of a cluster past the end of the file, before it
    /// wrote that cluster, leaves a reference-less refcount `qemu-img check` cannot see
    /// (it only scans clusters inside the file), so the repair after the kill misses
    /// it; the next write that grows the file over that cluster turns it into an
    /// ordinary leak, which this repair frees.
    pub(super) async fn merge(
        &self,
        op: &FileOp,
        again: bool,
        cancel: Option<&watch::Receiver<bool>>,
        progress: &StepProgress,
    ) -> Result<()> {
        match *op {
            FileOp::Commit { top, base } => {
                if again {
                    // A killed commit leaves leaked clusters in the base it wrote; the
                    // top (kept with -d) was only read.
                    self.qemu.repair_leaks(&self.volume_path(base)).await?;
                }
                let (top, base) = (self.volume_path(top), self.volume_path(base));
                let report = |fraction| progress.fraction(fraction);
                self.qemu.commit(&top, &base, cancel, Some(&report)).await?;
                self.qemu.repair_leaks(&base).await?;
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
                let path = self.volume_path(volume);
                let report = |fraction| progress.fraction(fraction);
                let stream = self
                    .qemu
                    .stream(&path, backing.as_deref(), cancel, Some(&report));
                stream.await?;
                self.qemu.repair_leaks(&path).await?;
            }
            _ => return Err(Error::Internal(format!("not a merge step: {op:?}"))),
        }
        Ok(())
    }

    /// A copy step: an uploaded image converted into a volume, or a full clone's copy.
    pub(super) async fn copy(
        &self,
        op: &FileOp,
        cancel: Option<&watch::Receiver<bool>>,
        progress: &StepProgress,
    ) -> Result<()> {
        match *op {
            FileOp::Import {
                upload,
                format,
                volume,
            } => {
                let source = files::upload_path(self.volumes_dir(), upload);
                let path = self.volume_path(volume);
                let report = |fraction| progress.fraction(fraction);
                let copy = self
                    .qemu
                    .import(&source, format.as_str(), &path, cancel, Some(&report));
                self.copy_into(&path, copy).await?;
            }
            FileOp::Convert { source, volume } => {
                let (source, path) = (self.volume_path(source), self.volume_path(volume));
                let report = |fraction| progress.fraction(fraction);
                let copy = self
                    .qemu
                    .convert(&source, &path, false, cancel, Some(&report));
                self.copy_into(&path, copy).await?;
            }
            _ => return Err(Error::Internal(format!("not a copy step: {op:?}"))),
        }
        Ok(())
    }

    /// Write `path`, a new volume file, with `copy` (not started yet: futures run
    /// when awaited). A partial copy from an interrupted attempt is ours (the id is
    /// new): start over rather than trust it. Never leave a partial copy behind,
    /// cancelled or failed. The copy is made durable before the journal records it, so
    /// a power cut cannot leave metadata naming a file whose data never reached the
    /// disk.
    async fn copy_into(
        &self,
        path: &std::path::Path,
        copy: impl std::future::Future<Output = std::result::Result<(), QemuError>>,
    ) -> Result<()> {
        remove_if_exists(path).await?;
        let copied = copy.await;
        if copied.is_err() {
            remove_if_exists(path).await?;
        }
        copied?;
        sync_file(path).await
    }

    /// Put a file an interrupted safe rebase wrote back to what it read before: point
    /// it at its old backing again (the clusters the rebase did map equal what that
    /// backing shows), then free the clusters it wrote but never mapped (those inside
    /// the file: one counted past its end is freed by the next merge into it, see
    /// `merge`).
    pub(super) async fn restore_stream(&self, volume: Uuid, from: Option<Uuid>) -> Result<()> {
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

    /// The bytes a qemu-img copy step moves, estimated before it starts (its progress
    /// shows them as `bytes_total`): the allocated bytes of the files of the layers it
    /// copies, as the records chain them (what the planner compared to choose a merge's
    /// direction, and a full clone's space check): for a commit, the layers from the top
    /// down to the base; for a safe rebase, those from the layer it read down to its new
    /// backing; for a convert, the source's whole chain; for an import, the upload's
    /// file. An upper bound of what qemu-img writes (zeros are skipped). None, logged,
    /// when the records cannot be read: the step shows its percentage only.
    pub(super) async fn copy_estimate(&self, op: &FileOp) -> Option<u64> {
        let dir = self.volumes_dir();
        let estimate = async {
            let mut conn = self.db.reader().await?;
            Ok::<_, Error>(match *op {
                FileOp::Commit { top, base } => {
                    Some(files::layers_bytes(dir, &mut conn, top, Some(base)).await?)
                }
                FileOp::Stream {
                    volume,
                    from,
                    backing,
                } => {
                    let from = match from {
                        Some(from) => Some(from),
                        None => store::vms::volume_parent(&mut conn, volume).await?,
                    };
                    match from {
                        Some(from) => {
                            Some(files::layers_bytes(dir, &mut conn, from, backing).await?)
                        }
                        None => None,
                    }
                }
                FileOp::Convert { source, .. } => {
                    Some(files::chain_bytes(dir, &mut conn, source).await?)
                }
                FileOp::Import { upload, .. } => {
                    Some(files::allocated_bytes(&files::upload_path(dir, upload)))
                }
                _ => None,
            })
        };
        match estimate.await {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, ?op, "cannot estimate a copy's bytes; its progress shows a percentage only");
                None
            }
        }
    }
}

/// qemu-img leaves what it wrote in the page cache: make a new copy durable before the
/// journal records it, so a power cut can never leave metadata naming a file whose
/// data never reached the disk.
pub(super) async fn sync_file(path: &std::path::Path) -> Result<()> {
    tokio::fs::File::open(path).await?.sync_all().await?;
    Ok(())
}

/// Write an empty qcow2 file (on `backing`, a file name in the same directory),
/// durably: natively (`qemu::qcow2`, the bytes qemu-img would write), a few writes and
/// two fsyncs on a blocking thread instead of a qemu-img process. Never replaces a
/// file already at `path`.
pub(super) async fn create_image(
    path: std::path::PathBuf,
    size_bytes: u64,
    backing: Option<String>,
) -> Result<()> {
    tokio::task::spawn_blocking(move || {
        qcow2::create_overlay(&path, size_bytes, backing.as_deref())
    })
    .await
    .map_err(|e| Error::Internal(format!("creating an image file: {e}")))??;
    Ok(())
}

pub(super) async fn remove_if_exists(path: &std::path::Path) -> Result<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.into()),
    }
}
